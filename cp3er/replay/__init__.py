"""Replay for CP3ER: the prioritized proximal experience sampler and the n-step frame buffer.

- :class:`ProximalSampler`: PPE (CP3ER, arXiv 2410.00051) as a TorchRL ``Sampler``.
- :class:`NStepReplayBuffer` / :func:`make_replay_buffer`: DrQ-v2-style storage of
  each frame once, with frame stacks and n-step targets rebuilt at sampling time.
"""

from cp3er.replay.buffer import NStepReplayBuffer, UnsafeBufferError, make_replay_buffer
from cp3er.replay.sampler import SAMPLER_MODES, ProximalSampler, proximal_weight

__all__ = [
    "SAMPLER_MODES",
    "NStepReplayBuffer",
    "ProximalSampler",
    "UnsafeBufferError",
    "make_replay_buffer",
    "proximal_weight",
]
