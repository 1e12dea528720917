"""Replay for CP3ER: the age-weighted ring samplers and the n-step frame buffer.

- :func:`make_sampler` / :class:`RingSampler`: TorchRL ``Sampler`` drawing rows by age under
  one law per mode (``proximal``: PPE, CP3ER arXiv 2410.00051; ``reference``: the reference
  code's episode weighting; ``uniform``); :class:`ProximalSampler` is the PPE one.
- :class:`NStepReplayBuffer` / :func:`make_replay_buffer`: DrQ-v2-style storage of
  each frame once, with frame stacks and n-step targets rebuilt at sampling time
  (``buffer``; its jobs: ``rows`` writes, ``transitions`` samples, ``dump`` checkpoints).
- :class:`StreamedReplayBuffer`: one such ring per collector worker (``collector.workers``),
  so that no frame stack or n-step window mixes two workers' transitions.
"""

from typing import Any

from cp3er.replay.buffer import STORAGE_DEVICES, STORAGES, NStepReplayBuffer
from cp3er.replay.dump import UnsafeBufferError
from cp3er.replay.sampler import (
    SAMPLER_MODES,
    ProximalSampler,
    RingSampler,
    make_sampler,
    proximal_weight,
)
from cp3er.replay.streams import StreamedReplayBuffer


def make_replay_buffer(capacity: int, *, streams: int = 1,
                       **kwargs: Any) -> NStepReplayBuffer | StreamedReplayBuffer:
    """The CP3ER/DrQ-v2 replay buffer; keyword arguments as :class:`NStepReplayBuffer`.
    ``streams > 1``: a :class:`StreamedReplayBuffer`, one ring per collector worker.

    Examples:
        >>> rb = make_replay_buffer(100_000, obs_key="pixels", frame_stack=3, n_step=3)
        >>> # for batch in collector: rb.extend(batch); batch = rb.sample()
    """
    if streams == 1:
        return NStepReplayBuffer(capacity, **kwargs)
    return StreamedReplayBuffer(capacity, streams, **kwargs)


__all__ = [
    "SAMPLER_MODES",
    "STORAGES",
    "STORAGE_DEVICES",
    "NStepReplayBuffer",
    "ProximalSampler",
    "RingSampler",
    "StreamedReplayBuffer",
    "UnsafeBufferError",
    "make_replay_buffer",
    "make_sampler",
    "proximal_weight",
]
