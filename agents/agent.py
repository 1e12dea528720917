"""The agent: its modules, optimisers and one update, read top to bottom.

:meth:`Agent.update` is DrQ-v2's ``update`` (Yarats et al. 2021, ``drqv2.py``): encode the
augmented batch once, step the critic (which trains the encoder), step the actor on the
same features detached (with the updated critic), then move the target critic (Polyak).
A CP3ER run that distils its regulariser from a diffusion teacher
(``agent.consistency.loss=distillation``) steps the teacher between critic and actor, so
the actor distils from the updated teacher. The losses themselves live in the agents'
``LossModule`` s (``agents.cp3er.CP3ERLoss``, ``agents.drqv2.DrQV2Loss``); the metric
names they report are registered in ``agents.metrics``. ``agents.build`` builds an
:class:`Agent` from a config.

Precision (``perf.precision``), of the update only (acting, :attr:`Agent.policy`, stays
float32): ``fp32`` leaves PyTorch's settings alone. ``tf32`` runs the whole update
(forward, backward, optimiser steps) with CUDA matmuls and cuDNN convolutions allowed
TF32 (:func:`tf32_allowed`; a no-op on a CPU). ``bf16`` runs the update's forward
computations (encoder, critic, teacher and actor losses with their targets) under
``torch.autocast`` in bfloat16; the losses are cast back to float32 before ``backward``,
and the parameters, gradients and optimiser steps stay float32.

CUDA graph (``perf.cuda_graph``, a GPU only): the whole update (encode, critic loss and
step, actor loss and step, Polyak, EMA) is captured once as a CUDA graph and replayed
at every later update, through tensordict's :class:`~tensordict.nn.CudaGraphModule` (the
part TorchRL's own SAC/TD3 scripts use for ``compile.cudagraphs``): the first
:data:`CUDA_GRAPH_WARMUP` updates run eagerly on a side stream (optimiser states,
cuDNN algorithms), the next one runs eagerly and is captured, each later one copies the
batch into the graph's input tensors and replays the captured kernels, with no Python
and no kernel-launch cost. What that needs of the update, and what the code keeps:
static shapes (a fixed batch size); no host read of a device value and no tensor built on
the host and copied over, once warmed up (checked on the CPU by
``tests/test_cuda_graph.py`` with dispatch and function modes that record them, on a GPU
by ``torch.cuda.set_sync_debug_mode``); every random number from the default CUDA
generator (the graph advances its Philox offset at each replay: a replay draws what
the eager update would have); Adam with ``capturable=True`` (its step count on the
device); values that change between updates held in tensors read by the kernels, not in
Python numbers (DrQ-v2's exploration sigma is a buffer); autocast without its weight
cache. Loading a state (a resume) re-captures: the optimisers' state tensors are new.
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
from agents.metrics import UPDATE_METRICS
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
    def update(self, batch: TensorDictBase) -> dict[str, float]:
        """One update on a replay batch (not modified); returns the registered metrics
        (``agents.metrics.UPDATE_METRICS``) as floats (a host read: see
        :meth:`update_on_device`)."""
        return {k: float(v) for k, v in self.update_on_device(batch).items()}

    def update_on_device(self, batch: TensorDictBase) -> Metrics:
        """:meth:`update`, its metrics left as detached 0-d tensors on the agent's device:
        no host synchronisation (the trainer reads them every
        ``log.metrics_every_updates`` updates). With ``cuda_graph`` the update is replayed
        from its captured graph (module docstring)."""
        if self.cuda_graph:
            if self._graphed is None:
                self._graphed = _graph_module(self._update, CUDA_GRAPH_WARMUP)
            metrics = self._graphed(batch)
        else:
            metrics = self._update(batch)
        unknown = set(metrics) - set(UPDATE_METRICS)
        if unknown:  # a loss reporting a name the registry, csv and glossary do not know
            raise KeyError(f"update metrics {sorted(unknown)} are not in "
                           "agents.metrics.UPDATE_METRICS")
        return metrics

    def _update(self, batch: TensorDictBase) -> Metrics:
        """The update itself (DrQ-v2's order, module docstring): what a CUDA graph
        captures."""
        with tf32_allowed() if self.precision == "tf32" else contextlib.nullcontext():
            with self._forward():
                features, next_features = self.loss.encode_transition(batch)
            metrics = self.update_critic(batch, features, next_features)
            features = features.detach()
            if self.loss.teacher is not None:
                metrics |= self.update_teacher(batch, features)
            metrics |= self.update_actor(batch, features)
            self.update_target()
        return metrics

    def update_critic(self, batch: TensorDictBase, features: torch.Tensor,
                      next_features: torch.Tensor) -> Metrics:
        """Critic step; its gradient also trains the encoder through ``features``."""
        loss, metrics = self._losses(self.loss.critic_loss, batch, features, next_features)
        self._step(("encoder", "critic"), loss)
        return {"loss_critic": loss.detach(), **metrics}

    def update_teacher(self, batch: TensorDictBase, features: torch.Tensor) -> Metrics:
        """Diffusion teacher step (distillation only) on detached ``features``."""
        loss, metrics = self._losses(self.loss.teacher_loss, batch, features)
        self._step(("teacher",), loss)
        return {"loss_teacher": loss.detach(), **metrics}

    def update_actor(self, batch: TensorDictBase, features: torch.Tensor) -> Metrics:
        """Actor step on detached ``features`` with the (just updated) critic."""
        loss, metrics = self._losses(self.loss.actor_loss, batch, features)
        self._step(("actor",), loss)
        self.loss.after_actor_step(metrics)  # CP3ER's EMA target and adaptive lambda
        return {"loss_actor": loss.detach(), **metrics}

    def update_target(self) -> None:
        """Polyak update of the target critic (TorchRL ``SoftUpdate``, tau
        ``agent.critic_tau``); reports no metric."""
        self.updater.step()

    def _forward(self) -> contextlib.AbstractContextManager:
        """The context of the update's forward computations: bfloat16 autocast on the
        agent's device type for ``precision="bf16"``, nothing otherwise."""
        if self.precision != "bf16":
            return contextlib.nullcontext()
        device_type = next(self.loss.parameters()).device.type
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)

    def _losses(self, loss_fn: Callable[..., tuple[torch.Tensor, Metrics]], *args
                ) -> tuple[torch.Tensor, Metrics]:
        """``loss_fn(*args)`` under :meth:`_forward`; the loss and the floating-point
        metrics as float32 (no-ops when they are already)."""
        with self._forward():
            loss, metrics = loss_fn(*args)
        return loss.float(), {k: v.float() if v.is_floating_point() else v
                              for k, v in metrics.items()}

    def _step(self, names: tuple[str, ...], loss: torch.Tensor) -> None:
        """Zero the named optimisers' gradients, backpropagate ``loss``, clip each
        optimiser's gradient norm to ``grad_clip`` (the actor's to ``actor_grad_clip`` when
        set) and step them. The encoder has no optimiser on state tasks (no parameters):
        names not built are skipped."""
        optimizers = {n: self.optimizers[n] for n in names if n in self.optimizers}
        for optimizer in optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
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
