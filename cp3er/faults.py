"""Run-level fault handling: numerical guards (losses, parameters, actions) and
preemption signals."""

from __future__ import annotations

import math
import re
import signal
from collections.abc import Iterable, Mapping

import torch
from tensordict import TensorDictBase
from torchrl.envs.utils import ExplorationType, set_exploration_type


class NumericalError(FloatingPointError):
    """A loss or parameter became NaN/inf; the message names it and where it happened."""


#: Losses or Q values beyond this mean a blown-up run (returns are at most ~1e4 here: DMC
#: 1000 an episode, Meta-World Q ~2e3); ``lr=1e6`` hits Q 3e13 with finite weights.
EXPLODING = 1e8
#: The Q metrics checked with the losses (an agent reports the ones it has).
Q_METRICS = ("q_mean", "target_mean", "actor_q")


def check_finite_losses(metrics: Mapping[str, float], names: Iterable[str], *, update: int,
                        frame: int) -> None:
    """Raise :class:`NumericalError` naming the first entry of ``names`` that is non-finite
    or beyond :data:`EXPLODING` in magnitude."""
    for name in names:
        value = metrics.get(name)
        if value is not None and not math.isfinite(value):
            raise NumericalError(f"non-finite {name}={value} at update {update} (frame {frame})")
        if value is not None and abs(value) > EXPLODING:
            raise NumericalError(f"exploding {name}={value:.3g} (beyond +-{EXPLODING:.0e}) at "
                                 f"update {update} (frame {frame}): the run has blown up "
                                 "(learning rate too high?)")


#: Errors torch raises on non-finite values (e.g. the mixture critic's multinomial).
_NUMERIC_FAILURE = re.compile(r"multinomial|\b(nan|inf)\b|finite|invalid values",
                              re.IGNORECASE)


def numeric_failure(error: BaseException) -> bool:
    """``error`` (raised by an update) is torch meeting NaN/inf values, not a bug."""
    return (isinstance(error, (RuntimeError, ValueError))
            and bool(_NUMERIC_FAILURE.search(str(error))))


def check_finite_parameters(module: torch.nn.Module, *, update: int, frame: int) -> None:
    """Raise :class:`NumericalError` naming the first parameter/buffer holding NaN/inf (one
    fused reduction; names looked up on failure)."""
    tensors = [(n, t) for n, t in (*module.named_parameters(), *module.named_buffers())
               if t.is_floating_point()]
    if not tensors:
        return
    total = torch.stack([t.detach().float().sum() for _, t in tensors]).sum()
    if bool(torch.isfinite(total)):
        return
    for name, tensor in tensors:  # a finite-valued overflow of the sum is re-checked exactly
        if not bool(torch.isfinite(tensor).all()):
            raise NumericalError(
                f"non-finite values in parameter {name!r} at update {update} (frame {frame})"
            )


def check_finite_actions(actions: torch.Tensor, context: str) -> None:
    """Raise :class:`NumericalError` on a NaN/inf action (exploding finite weights pass the
    parameter check)."""
    if not bool(torch.isfinite(actions).all()):
        raise NumericalError(f"the policy emitted non-finite actions ({context})")



def check_policy_acts(policy: torch.nn.Module, obs: TensorDictBase, context: str) -> None:
    """:func:`check_finite_actions` of ``policy``'s deterministic action at ``obs``, on a
    forked RNG (the probe draws no number of the run's streams)."""
    devices = [obs.device] if obs.device is not None and obs.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad(), \
            set_exploration_type(ExplorationType.DETERMINISTIC):
        action = policy(obs)["action"]
    check_finite_actions(action, context)

class Preemption:
    """Context manager turning SIGTERM/SIGINT/SIGUSR2 into a flag the training loop polls.

    A second SIGINT raises ``KeyboardInterrupt``. SIGUSR2 (Slurm's time-limit warning) is
    passed on to submitit's requeue handler after the checkpoint (:func:`pass_on`;
    docs/scale.md). Does nothing outside the main thread.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum)

    def __enter__(self) -> Preemption:
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread
            self._previous.clear()
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def pass_on(signum: signal.Signals) -> None:
    """Call the restored Python handler of ``signum`` (submitit's SIGUSR2 handler requeues)."""
    handler = signal.getsignal(signum)
    # Python's SIGINT handler raises KeyboardInterrupt: a traceback, not the documented 130
    if callable(handler) and handler is not signal.default_int_handler:
        handler(signum, None)
