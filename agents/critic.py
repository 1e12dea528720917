"""Mixture-of-Gaussians distributional critic (CP3ER, section "MoG critic"; Shahriari et al.
2022, "Revisiting Gaussian mixture critics in off-policy RL", arXiv 2204.10256).

Z(s, a) is a mixture of K = 3 Gaussians fit by maximum likelihood to 20 sampled targets
``y = r_n + gamma^n q``, ``q ~ target mixture at (s', pi(s'))``; the actor maximises the
mixture mean (docs/method.md, "The critic"). As the CP3ER reference's ``MoGCritic``: the
trunk is Linear + LayerNorm, **no Tanh** (unlike DrQ-v2's), the scale head is Acme's
``GaussianMixture`` parameterisation, and PyTorch's default initialisation is kept (no
DrQ-v2 ``weight_init``). The ``mog_*`` helpers take ``(loc, scale, logits)`` so a loss runs
the network once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import distributions as D
from torch import nn

__all__ = [
    "MIN_SCALE",
    "MoGCritic",
    "mog_distribution",
    "mog_log_prob",
    "mog_mean",
    "mog_sample",
]

#: Floor added to every component's standard deviation (Acme / CP3ER: 1e-4).
MIN_SCALE = 1e-4

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def mog_distribution(
    loc: torch.Tensor, scale: torch.Tensor, logits: torch.Tensor
) -> D.MixtureSameFamily:
    """Mixture of ``Normal(loc, scale)`` by ``softmax(logits)``: ``[..., K]`` -> batch ``[...]``."""
    return D.MixtureSameFamily(D.Categorical(logits=logits), D.Normal(loc, scale))


def mog_mean(loc: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mixture mean ``sum_k softmax(logits)_k * loc_k``: ``[..., K] -> [..., 1]``."""
    return (torch.softmax(logits, dim=-1) * loc).sum(dim=-1, keepdim=True)


def mog_log_prob(
    loc: torch.Tensor, scale: torch.Tensor, logits: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """``log sum_k softmax(logits)_k N(v; loc_k, scale_k)`` of ``values [..., S]`` under the
    row's mixture ``[..., K]``: ``[..., S]``."""
    z = (values.unsqueeze(-1) - loc.unsqueeze(-2)) / scale.unsqueeze(-2)  # [..., S, K]
    log_normal = -0.5 * z.square() - scale.log().unsqueeze(-2) - _LOG_SQRT_2PI
    log_weights = torch.log_softmax(logits, dim=-1).unsqueeze(-2)
    return torch.logsumexp(log_weights + log_normal, dim=-1)


@torch.no_grad()
def mog_sample(
    loc: torch.Tensor,
    scale: torch.Tensor,
    logits: torch.Tensor,
    num_samples: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``num_samples`` ancestral draws per mixture, no gradient: ``[..., K] -> [..., S]``."""
    batch, k = loc.shape[:-1], loc.shape[-1]
    probs = torch.softmax(logits.reshape(-1, k).float(), dim=-1)
    component = torch.multinomial(probs, num_samples, replacement=True, generator=generator)
    component = component.reshape(*batch, num_samples)
    noise = torch.randn(component.shape, generator=generator, device=loc.device, dtype=loc.dtype)
    return loc.gather(-1, component) + scale.gather(-1, component) * noise


class MoGCritic(nn.Module):
    """Mixture-of-Gaussians critic Z(s, a) (CP3ER; Shahriari et al. 2022).

    Args:
        repr_dim: size of the encoder features (39,200 for the DrQ-v2 pixel encoder).
        action_dim: size of the action vector.
        feature_dim: trunk output size (50; 100 on hard tasks).
        hidden_dim: width of the two hidden layers (1024).
        num_components: number of Gaussians K (3).
        init_scale: component standard deviation when the scale head outputs 0
            (``scale = init_scale * softplus(x) / softplus(0) + 1e-4``).
    """

    def __init__(
        self,
        repr_dim: int,
        action_dim: int,
        feature_dim: int = 50,
        hidden_dim: int = 1024,
        num_components: int = 3,
        init_scale: float = 1e-3,
    ) -> None:
        super().__init__()
        if num_components < 1:
            raise ValueError(f"num_components must be >= 1, got {num_components}")
        if init_scale <= 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale}")
        self.num_components = num_components
        self.init_scale = init_scale
        self._scale_factor = init_scale / math.log(2.0)  # init_scale / softplus(0)
        self.trunk = nn.Sequential(nn.Linear(repr_dim, feature_dim), nn.LayerNorm(feature_dim))
        self.torso = nn.Sequential(
            nn.Linear(feature_dim + action_dim, hidden_dim),
            nn.LayerNorm(hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.LayerNorm(hidden_dim),
            nn.ReLU(),
        )
        self.loc_head = nn.Linear(hidden_dim, num_components)
        self.scale_head = nn.Linear(hidden_dim, num_components)
        self.logits_head = nn.Linear(hidden_dim, num_components)

    def forward(
        self, features: torch.Tensor, action: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mixture parameters ``(loc, scale, logits)``, each ``[*batch, K]``."""
        h = torch.cat([self.trunk(features), action], dim=-1)
        h = self.torso(h)
        loc = self.loc_head(h)
        scale = self._scale_factor * F.softplus(self.scale_head(h)) + MIN_SCALE
        logits = self.logits_head(h)
        return loc, scale, logits

    def mixture(self, features: torch.Tensor, action: torch.Tensor) -> D.MixtureSameFamily:
        """The return distribution as a ``torch.distributions.MixtureSameFamily`` of Normals."""
        return mog_distribution(*self(features, action))

    def mean(self, features: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Mixture mean ``[*batch, 1]``: the Q-value the actor maximises."""
        loc, _, logits = self(features, action)
        return mog_mean(loc, logits)

    @torch.no_grad()
    def sample_values(
        self,
        features: torch.Tensor,
        action: torch.Tensor,
        num_samples: int = 20,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``num_samples`` return samples ``[*batch, S]`` (no gradient), for TD targets."""
        return mog_sample(*self(features, action), num_samples, generator=generator)

    def log_prob(
        self, features: torch.Tensor, action: torch.Tensor, values: torch.Tensor
    ) -> torch.Tensor:
        """Log-density ``[*batch, S]`` of ``values [*batch, S]`` under Z(features, action)."""
        return mog_log_prob(*self(features, action), values)
