"""The consistency-policy network ``F`` (CP3ER / CPQL reference architecture)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["ConditionalMLP", "SinusoidalTimeEmbedding"]


class SinusoidalTimeEmbedding(nn.Module):
    """Transformer/DDPM sinusoidal embedding (Vaswani et al. 2017; Ho et al. 2020).

    ``(*batch,) -> (*batch, dim)``: ``[sin(t w_k), cos(t w_k)]`` with
    ``w_k = 10000^(-k / (dim/2 - 1))``, ``k = 0..dim/2-1``.
    """

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        if dim < 4 or dim % 2:
            raise ValueError(f"dim must be even and >= 4, got {dim}")
        half = dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half) / (half - 1))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        args = t.unsqueeze(-1) * self.freqs.to(t.dtype)
        return torch.cat([args.sin(), args.cos()], dim=-1)


class ConditionalMLP(nn.Module):
    """The CP3ER / CPQL consistency-policy network ``F(x, t, cond)``.

    An MLP on ``[x, t_emb, cond]`` with ``num_layers`` hidden layers of ``hidden_dim``
    units and Mish activations, then a linear head to ``action_dim``. ``t_emb`` is the
    16-dim sinusoidal embedding of the noise input followed by
    ``Linear(16, 32)-Mish-Linear(32, 16)`` (REFERENCE section 1).

    ``trunk_dim`` (optional, off in the reference) first maps ``cond`` through
    ``Linear(cond_dim, trunk_dim)-LayerNorm-Tanh``, the reference code's disabled trunk;
    on the 39,200-dim encoder output with ``trunk_dim=50`` it takes the network from
    ~42M to ~4M parameters.

    ``forward(x, t, cond)``: ``x`` is the *scaled* input ``c_in x`` and ``t`` the noise
    input ``c_noise = 250 ln(sigma)`` (a scalar or ``(*batch,)``), both supplied by
    :class:`Denoiser`.
    """

    def __init__(
        self,
        action_dim: int,
        cond_dim: int,
        hidden_dim: int = 1024,
        num_layers: int = 3,
        time_embed_dim: int = 16,
        trunk_dim: int | None = None,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.action_dim, self.cond_dim = action_dim, cond_dim
        self.time_embed = nn.Sequential(
            SinusoidalTimeEmbedding(time_embed_dim),
            nn.Linear(time_embed_dim, 2 * time_embed_dim),
            nn.Mish(),
            nn.Linear(2 * time_embed_dim, time_embed_dim),
        )
        if trunk_dim is None:
            self.trunk: nn.Module = nn.Identity()
            feature_dim = cond_dim
        else:
            self.trunk = nn.Sequential(
                nn.Linear(cond_dim, trunk_dim), nn.LayerNorm(trunk_dim), nn.Tanh()
            )
            feature_dim = trunk_dim
        layers: list[nn.Module] = []
        in_dim = action_dim + time_embed_dim + feature_dim
        for _ in range(num_layers):
            layers += [nn.Linear(in_dim, hidden_dim), nn.Mish()]
            in_dim = hidden_dim
        layers.append(nn.Linear(hidden_dim, action_dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).broadcast_to(x.shape[:-1])
        features = self.trunk(cond)
        return self.mlp(torch.cat([x, self.time_embed(t), features], dim=-1))
