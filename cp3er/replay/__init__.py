"""Replay for CP3ER: the age-weighted ring samplers and the n-step frame buffer.

- :func:`make_sampler` / :class:`RingSampler`: TorchRL ``Sampler`` drawing rows by age under
  one law per mode (``proximal``: PPE, CP3ER arXiv 2410.00051; ``reference``: the reference
  code's episode weighting; ``uniform``); :class:`ProximalSampler` is the PPE one.
- :class:`NStepReplayBuffer` / :func:`make_replay_buffer`: DrQ-v2-style storage of
  each frame once, with frame stacks and n-step targets rebuilt at sampling time.
- :class:`StreamedReplayBuffer`: one such ring per collector worker (``collector.workers``),
  so that no frame stack or n-step window mixes two workers' transitions.
"""

from cp3er.replay.buffer import (
    STORAGE_DEVICES,
    STORAGES,
    NStepReplayBuffer,
    UnsafeBufferError,
    make_replay_buffer,
)
from cp3er.replay.sampler import (
    SAMPLER_MODES,
    ProximalSampler,
    RingSampler,
    make_sampler,
    proximal_weight,
)
from cp3er.replay.streams import StreamedReplayBuffer

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
