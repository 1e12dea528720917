"""The agent: its modules, optimisers and one update (:meth:`Agent.update`).

The update is DrQ-v2's (Yarats et al. 2021, ``drqv2.py``): encode the augmented batch once,
step the critic (which trains the encoder), step the actor on the same features detached
with the updated critic, then Polyak-average the target critic. A CP3ER run distilling from
a diffusion teacher steps the teacher between critic and actor. The losses are the agents'
``LossModule`` s (``agents.consistency_policy.CP3ERLoss``, ``agents.drqv2.DrQV2Loss``).

``perf.precision``: ``tf32`` allows TF32 CUDA matmuls/convolutions for the whole update;
``bf16`` runs the forward computations under bfloat16 autocast, losses cast back to
float32 before ``backward`` (parameters, gradients, optimiser steps stay float32); acting
stays float32. ``perf.cuda_graph``: the whole update captured once as a CUDA graph
(tensordict's ``CudaGraphModule``) and replayed; what that asks of the update (static
shapes, no host reads, capturable Adam, schedules held in tensors) is in
docs/performance.md and checked by ``tests/test_cuda_graph.py``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from tensordict import TensorDictBase
from tensordict.nn import CudaGraphModule, TensorDictSequential
from torchrl.objectives import LossModule, SoftUpdate

from agents.drqv2 import ScheduledGaussianNoise
from cp3er.choices import PRECISIONS

Metrics = dict[str, torch.Tensor]
#: ``perf.cuda_graph``: eager updates before the captured one (module docstring).
CUDA_GRAPH_WARMUP = 3
#: Optimiser options that choose the implementation, not the update rule: kept as built
#: when a state is loaded (``Optimizer.load_state_dict`` takes them from the saved
#: ``param_groups``: a CPU run's checkpoint would otherwise turn a graph-captured run's
#: ``capturable`` off, a GPU run's ``fused`` on for a CPU resume).
IMPLEMENTATION_OPTIONS = ("capturable", "fused", "foreach", "differentiable")


@contextlib.contextmanager
def tf32_allowed() -> Iterator[None]:
    """CUDA matmuls and cuDNN convolutions may use TF32 inside the block
    (``torch.backends.cuda.matmul.allow_tf32``, ``torch.backends.cudnn.allow_tf32``; the
    previous values are restored after it). The flags concern CUDA only: no-op on a CPU."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = matmul.allow_tf32, cudnn.allow_tf32
    matmul.allow_tf32 = cudnn.allow_tf32 = True
    try:
        yield
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved


@dataclass
class Agent:
    """Everything the training loop and the evaluator need of an agent."""

    policy: TensorDictSequential  # observation -> action (acting)
    loss: LossModule
    optimizers: dict[str, torch.optim.Optimizer]
    updater: SoftUpdate
    obs_key: str
    grad_clip: float | None = None  # max global grad norm per optimiser step (None: off)
    actor_grad_clip: float | None = None  # the actor's own limit (CPQL: 2.0); None: grad_clip
    exploration: ScheduledGaussianNoise | None = None  # acting noise (DrQ-v2), None: none
    precision: str = "fp32"  # PRECISIONS: the update's (module docstring)
    cuda_graph: bool = False  # capture the update as a CUDA graph (module docstring)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"perf.precision={self.precision!r}; valid: {PRECISIONS}")
        self._graphed: CudaGraphModule | None = None
        if self.cuda_graph:
            self._check_capturable()

    def _check_capturable(self) -> None:
        """``cuda_graph`` needs the parameters on a CUDA device and capturable optimisers
        (``agents.build`` makes them so for ``perf.cuda_graph=true``)."""
        device = next(self.loss.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"perf.cuda_graph=true needs the agent on a CUDA device; it is "
                             f"on {device} (set device=cuda, or perf.cuda_graph=false)")
        plain = sorted(name for name, optimizer in self.optimizers.items()
                       if not all(g.get("capturable") for g in optimizer.param_groups))
        if plain:
            raise ValueError(f"perf.cuda_graph=true needs optimisers built with "
                             f"capturable=True; not: {plain}")

    # -- one update -----------------------------------------------------------------------
    def update(self, batch: TensorDictBase) -> Metrics:
        """One update on a replay batch (not modified). Returns the registered metrics
        (``agents.metrics.UPDATE_METRICS``) as detached 0-d tensors on the agent's device:
        no host synchronisation (``float(v)`` reads one). With ``cuda_graph``: replayed."""
        if not self.cuda_graph:
            return self._update(batch)
        if self._graphed is None:
            self._graphed = _graph_module(self._update, CUDA_GRAPH_WARMUP)
        return self._graphed(batch)

    def _update(self, batch: TensorDictBase) -> Metrics:
        loss = self.loss
        with tf32_allowed() if self.precision == "tf32" else contextlib.nullcontext():
            with self._forward():
                features, next_features = loss.encode_transition(batch)
                critic_loss, metrics = loss.critic_loss(batch, features, next_features)
            self._step(("encoder", "critic"), critic_loss)  # the encoder learns from Q only
            metrics = {"loss_critic": critic_loss.detach(), **metrics}
            features = features.detach()
            if loss.teacher is not None:  # distillation: the teacher first, then its student
                with self._forward():
                    teacher_loss, teacher_metrics = loss.teacher_loss(batch, features)
                self._step(("teacher",), teacher_loss)
                metrics |= {"loss_teacher": teacher_loss.detach(), **teacher_metrics}
            with self._forward():
                actor_loss, actor_metrics = loss.actor_loss(batch, features)  # updated critic
            self._step(("actor",), actor_loss)
            actor_metrics = _float32(actor_metrics)
            loss.after_actor_step(actor_metrics)  # CP3ER's EMA target and adaptive lambda
            metrics |= {"loss_actor": actor_loss.detach(), **actor_metrics}
            self.updater.step()  # Polyak: target critic <- tau critic + (1 - tau) target
        return _float32(metrics)

    def _forward(self) -> contextlib.AbstractContextManager:
        """The forward computations' context: bfloat16 autocast for ``precision="bf16"``."""
        if self.precision != "bf16":
            return contextlib.nullcontext()
        device_type = next(self.loss.parameters()).device.type
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)

    def _step(self, names: tuple[str, ...], loss: torch.Tensor) -> None:
        """Zero the named optimisers' gradients, backpropagate ``loss``, clip each
        optimiser's gradient norm to ``grad_clip`` (the actor's to ``actor_grad_clip`` when
        set) and step them. The encoder has no optimiser on state tasks (no parameters):
        names not built are skipped."""
        optimizers = {n: self.optimizers[n] for n in names if n in self.optimizers}
        for optimizer in optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        loss.float().backward()  # a bf16 loss is cast back first
        for name, optimizer in optimizers.items():
            limit = self.grad_clip
            if name == "actor" and self.actor_grad_clip is not None:
                limit = self.actor_grad_clip
            if limit is not None:
                params = [p for group in optimizer.param_groups for p in group["params"]]
                torch.nn.utils.clip_grad_norm_(params, limit)
        for optimizer in optimizers.values():
            optimizer.step()

    # -- acting ---------------------------------------------------------------------------
    @property
    def collect_policy(self) -> TensorDictSequential:
        """The policy the training collector runs: ``policy`` plus exploration noise."""
        if self.exploration is None:
            return self.policy
        return TensorDictSequential(self.policy, self.exploration)

    def advance(self, steps: int) -> None:
        """Tell the agent ``steps`` more agent steps were taken (exploration schedule)."""
        if self.exploration is not None:
            self.exploration.step(steps)

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "loss": self.loss.state_dict(),
            "optimizers": {k: v.state_dict() for k, v in self.optimizers.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Load :meth:`state_dict`'s output; the optimisers keep the implementation they
        were built with (:data:`IMPLEMENTATION_OPTIONS`), and a captured update is dropped
        (captured again at the next updates: the optimiser states are new tensors)."""
        self.loss.load_state_dict(state["loss"])
        for name, optimizer in self.optimizers.items():
            load_optimizer_state(optimizer, state["optimizers"][name])
        self._graphed = None


def _float32(metrics: Metrics) -> Metrics:
    """Floating-point metrics as float32 (bf16 ones from autocast; no-op otherwise)."""
    return {k: v.float() if v.is_floating_point() else v for k, v in metrics.items()}


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)`` keeping the optimiser's own
    :data:`IMPLEMENTATION_OPTIONS` (the saved hyper-parameters, e.g. ``lr``, are loaded), with
    each step count where that implementation keeps it (on the parameter's device for
    ``capturable`` / ``fused``, on the CPU otherwise: PyTorch's Adam) and state tensors of
    its own: ``Optimizer.load_state_dict`` keeps the given tensors where they already have
    the parameter's device and dtype, so two agents loaded from one live agent's
    :meth:`Agent.state_dict` would share (and both move) its Adam moments."""
    built = [{k: group[k] for k in IMPLEMENTATION_OPTIONS if k in group}
             for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, options in zip(optimizer.param_groups, built, strict=True):
        group.update(options)
        on_device = bool(group.get("capturable") or group.get("fused"))
        for param in group["params"]:
            param_state = optimizer.state.get(param, {})
            for key, value in param_state.items():
                if not isinstance(value, torch.Tensor):
                    continue
                if key == "step":
                    value = value.to(param.device if on_device else "cpu", torch.float32)
                param_state[key] = value.clone()


def _graph_module(update: Callable[[TensorDictBase], Metrics], warmup: int
                  ) -> CudaGraphModule:
    """``update`` wrapped in tensordict's ``CudaGraphModule`` (module docstring), captured
    at the call after ``warmup`` eager ones (its own ``warmup`` counts the capturing call).
    Its constructor takes TensorDicts out of PyTorch's pytree registry for the process (it
    says so in a warning, as intended here: the batch is one input) and warns on a machine
    without CUDA (refused before: :meth:`Agent._check_capturable`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Tensordict is registered in PyTree")
        return CudaGraphModule(update, warmup=warmup + 1)
