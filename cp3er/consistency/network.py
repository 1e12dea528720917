"""The consistency-policy network ``F`` (CP3ER / CPQL reference architecture)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["ConditionalMLP", "ConstantsModule", "ProjectedCondition", "SinusoidalTimeEmbedding"]


class ConstantsModule(nn.Module):
    """A module whose tensors named in ``constants`` follow ``.to()``/``.double()`` like buffers,
    without being buffers: TorchRL losses collect buffers with the parameters (and so into
    optimisers); a constant stays out and is not saved (rebuilt from the arguments)."""

    constants: tuple[str, ...] = ()

    def _apply(self, fn, recurse: bool = True):
        for name in self.constants:
            value = getattr(self, name, None)
            if value is not None:
                setattr(self, name, fn(value))
        return super()._apply(fn, recurse)


@dataclass(frozen=True, eq=False)
class ProjectedCondition:
    """A conditioning input already pushed through a :class:`ConditionalMLP`'s first layer.

    ``W [x, t_emb, cond] + b = W_in [x, t_emb] + b + W_cond trunk(cond)``: the ``cond`` term
    (39,200 x 1024 at the reference sizes) is computed once per actor step instead of once
    per network call, same result and gradients (``perf.share_condition``). A network other
    than ``owner`` (an EMA copy) re-projects ``cond``. Has ``cond``'s ``shape``/``device``/
    ``dtype``, so the samplers accept it.
    """

    hidden: Tensor  # W_cond trunk(cond), [*batch, hidden_dim]
    cond: Tensor  # the raw conditioning input, [*batch, cond_dim]
    owner: nn.Module

    @property
    def shape(self) -> torch.Size:
        return self.cond.shape

    @property
    def device(self) -> torch.device:
        return self.cond.device

    @property
    def dtype(self) -> torch.dtype:
        return self.cond.dtype


class SinusoidalTimeEmbedding(ConstantsModule):
    """Transformer/DDPM sinusoidal embedding (Vaswani et al. 2017; Ho et al. 2020).

    ``(*batch,) -> (*batch, dim)``: ``[sin(t w_k), cos(t w_k)]``,
    ``w_k = 10000^(-k / (dim/2 - 1))``, ``k = 0..dim/2-1``; ``freqs`` a constant, not a buffer.
    """

    constants = ("freqs",)
    freqs: Tensor

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        if dim < 4 or dim % 2:
            raise ValueError(f"dim must be even and >= 4, got {dim}")
        half = dim // 2
        self.freqs = torch.exp(-math.log(10000.0) * torch.arange(half) / (half - 1))

    def forward(self, t: Tensor) -> Tensor:
        args = t.unsqueeze(-1) * self.freqs.to(t.dtype)
        return torch.cat([args.sin(), args.cos()], dim=-1)


class _LazyConditionLinear(nn.LazyLinear):
    """Lazy ``cond`` block of :class:`ConditionalMLP`: on the first call both blocks get the
    ``U(+-1/sqrt(fan_in))`` init of one ``Linear`` over all inputs (``partner`` rescaled)."""

    cls_to_become = nn.Linear

    def __init__(self, out_features: int, partner: nn.Linear) -> None:
        self._partner = (partner,)  # a tuple: not a submodule (it is the network's)
        super().__init__(out_features, bias=False)

    def reset_parameters(self) -> None:
        if self.has_uninitialized_params() or self.in_features == 0:
            return
        partner = self._partner[0]
        fan_in = partner.in_features + self.in_features
        bound = 1 / math.sqrt(fan_in)
        with torch.no_grad():
            nn.init.uniform_(self.weight, -bound, bound)
            scale = math.sqrt(partner.in_features / fan_in)  # U(+-1/sqrt(own fan_in)) -> bound
            partner.weight.mul_(scale)
            partner.bias.mul_(scale)


class ConditionalMLP(nn.Module):
    """The CP3ER / CPQL consistency-policy network ``F(x, t, cond)``.

    An MLP on ``[x, t_emb, cond]`` (``num_layers`` x ``hidden_dim`` Mish units, linear head);
    ``t_emb``: 16-dim sinusoidal embedding, then ``Linear(16, 32)-Mish-Linear(32, 16)``.
    ``x`` is the scaled input ``c_in x`` and ``t`` is ``250 ln(sigma)`` (from
    :class:`Denoiser`); ``cond`` a tensor or a :class:`ProjectedCondition`.

    Args:
        trunk_dim: optional ``Linear-LayerNorm-Tanh`` on ``cond`` (the reference code's
            disabled trunk; 39,200 -> 50 takes the network from ~42M to ~4M parameters).
        cond_dim: ``None`` reads it on the first call (lazy, as TorchRL's ``DiffusionActor``):
            call the network once before building optimisers, loss copies or EMA targets.

    The first layer is stored as two column blocks, ``input_layer`` (``[x, t_emb]``, bias)
    and ``cond_layer`` (``cond``), initialised exactly like the single ``Linear``.
    """

    def __init__(
        self,
        action_dim: int,
        cond_dim: int | None,
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
            trunk_in = nn.LazyLinear(trunk_dim) if cond_dim is None else nn.Linear(cond_dim,
                                                                                    trunk_dim)
            self.trunk = nn.Sequential(trunk_in, nn.LayerNorm(trunk_dim), nn.Tanh())
            feature_dim = trunk_dim
        split = action_dim + time_embed_dim
        if feature_dim is None:  # lazy cond block: [x, t_emb] block re-scaled on the first call
            self.input_layer = nn.Linear(split, hidden_dim)
            self.cond_layer = _LazyConditionLinear(hidden_dim, self.input_layer)
        else:
            self._init_first_layer(split, feature_dim, hidden_dim)
        layers: list[nn.Module] = [nn.Mish()]
        for _ in range(num_layers - 1):
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.Mish()]
        layers.append(nn.Linear(hidden_dim, action_dim))
        self.mlp = nn.Sequential(*layers)

    def _init_first_layer(self, split: int, feature_dim: int, hidden_dim: int) -> None:
        """The two blocks initialised as one ``Linear(split + feature_dim, hidden_dim)``."""
        first = nn.Linear(split + feature_dim, hidden_dim)
        self.input_layer = nn.Linear(split, hidden_dim)
        with warnings.catch_warnings():  # an unconditional model (cond_dim 0, the toy's):
            # a zero-width layer (adds 0), whose init torch reports as a no-op
            warnings.filterwarnings("ignore", "Initializing zero-element tensors")
            self.cond_layer = nn.Linear(feature_dim, hidden_dim, bias=False)
        with torch.no_grad():
            self.input_layer.weight.copy_(first.weight[:, :split])
            self.input_layer.bias.copy_(first.bias)
            self.cond_layer.weight.copy_(first.weight[:, split:])

    def project(self, cond: Tensor) -> ProjectedCondition:
        """``cond``'s term of the first layer, to reuse across calls on the same states."""
        if isinstance(cond, ProjectedCondition):
            cond = cond.cond
        return ProjectedCondition(self.cond_layer(self.trunk(cond)), cond, self)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | ProjectedCondition) -> Tensor:
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).broadcast_to(x.shape[:-1])
        if not isinstance(cond, ProjectedCondition) or cond.owner is not self:
            cond = self.project(cond)
        hidden = self.input_layer(torch.cat([x, self.time_embed(t)], dim=-1)) + cond.hidden
        return self.mlp(hidden)
