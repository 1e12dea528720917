"""Replay for CP3ER: age-weighted ring samplers (PPE) and the n-step frame buffer.

``sampler``: TorchRL ``Sampler`` s, one law of the rows' ages per ``replay.sampler`` mode;
``buffer``: frames stored once, stacks and n-step targets rebuilt at sampling (``rows``
writes, ``transitions`` samples, ``dump`` checkpoints); ``streams``: one ring per collector
worker. Layout and rules: docs/implementation.md, "The replay buffer".
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
