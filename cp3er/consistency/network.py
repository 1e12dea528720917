"""The consistency-policy network ``F`` (CP3ER / CPQL reference architecture)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["ConditionalMLP", "ConstantsModule", "ProjectedCondition", "SinusoidalTimeEmbedding"]


class ConstantsModule(nn.Module):
    """A module whose tensor attributes named in ``constants`` follow ``.to()``, ``.cuda()``,
    ``.double()`` (:meth:`_apply`) as buffers do, without being buffers or parameters.

    For fixed tensors a module derives from its arguments (frequencies, action bounds).
    TorchRL losses collect a module's parameters *and* buffers (``TensorDict.from_module``:
    ``loss.actor_network_params``, its target copy), so a buffer lands among the tensors an
    optimiser is usually built from; a constant does not, and is not saved either (it is
    rebuilt from the arguments).
    """

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

    The first layer is linear in ``[x, t_emb, cond]``, so
    ``W [x, t_emb, cond] + b = W_in [x, t_emb] + b + W_cond trunk(cond)``: the ``cond``
    term depends on the states only. CP3ER's actor step evaluates the network several
    times on the same states (the one-step sample for the Q term, the online and target
    calls of the consistency loss); projecting ``cond`` once and passing this object as
    ``cond`` computes that term (a 39,200 x 1024 matmul per state at the reference sizes)
    once instead of every call, with the same result. Gradients flow through ``hidden``
    as through a fresh projection (they are summed into ``W_cond`` by one backward matmul).

    Used by a network other than ``owner`` (an EMA target copy) it is re-projected from
    ``cond`` by that network, so a stale projection is never mixed with other weights.
    Exposes ``shape``/``device``/``dtype`` of the batch like the raw ``cond`` tensor does
    (``shape[:-1]`` is the batch shape), so the samplers accept it.
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

    ``(*batch,) -> (*batch, dim)``: ``[sin(t w_k), cos(t w_k)]`` with
    ``w_k = 10000^(-k / (dim/2 - 1))``, ``k = 0..dim/2-1``.

    The frequencies ``freqs`` are a constant of ``dim`` (:class:`ConstantsModule`), not a
    buffer, so they are not among the tensors of a TorchRL loss's actor parameters (they
    were a non-persistent buffer, never saved: state dicts are unchanged).
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
    """:class:`ConditionalMLP`'s ``cond`` block (no bias) with its input size read on the
    first call. Initialised then as the eager block: ``U(+-1/sqrt(fan_in))`` with ``fan_in``
    the whole first layer's (``partner``'s inputs + ``cond``'s), and ``partner`` (the
    ``[x, t_emb]`` block, built with its own smaller ``fan_in``) scaled to the same bound, so
    the two blocks are distributed as one ``Linear`` over all inputs."""

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

    An MLP on ``[x, t_emb, cond]`` with ``num_layers`` hidden layers of ``hidden_dim``
    units and Mish activations, then a linear head to ``action_dim``. ``t_emb`` is the
    16-dim sinusoidal embedding of the noise input followed by
    ``Linear(16, 32)-Mish-Linear(32, 16)`` (docs/implementation.md, item 4).

    ``trunk_dim`` (optional, off in the reference) first maps ``cond`` through
    ``Linear(cond_dim, trunk_dim)-LayerNorm-Tanh``, the reference code's disabled trunk;
    on the 39,200-dim encoder output with ``trunk_dim=50`` it takes the network from
    ~42M to ~4M parameters.

    ``forward(x, t, cond)``: ``x`` is the *scaled* input ``c_in x`` and ``t`` the noise
    input ``c_noise = 250 ln(sigma)`` (a scalar or ``(*batch,)``), both supplied by
    :class:`Denoiser`; ``cond`` is a tensor or a :class:`ProjectedCondition` from
    :meth:`project` (the same output, the ``cond`` part of the first layer computed once).

    The first ``Linear(action_dim + time_embed_dim + feature_dim, hidden_dim)`` is stored as
    two blocks of its weight, ``input_layer`` (``[x, t_emb]`` columns, with the bias) and
    ``cond_layer`` (``cond`` columns), initialised exactly like the single layer (PyTorch's
    default bound ``1/sqrt(fan_in)`` of the whole input).

    ``cond_dim=None`` reads the conditioning size on the first call (a lazy first layer, as
    TorchRL's ``DiffusionActor`` has): the ``cond`` block (or, with ``trunk_dim``, the
    trunk's first ``Linear``) is a ``torch.nn.LazyLinear``, initialised when it is first
    called as the eager layer is. As with any lazy module, call the network once (e.g. the
    actor on a reset) before building an optimiser, a loss's copies of its parameters or an
    EMA target.
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
        """``input_layer`` and ``cond_layer`` as the two column blocks of one
        ``Linear(split + feature_dim, hidden_dim)`` (its initialisation)."""
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
