"""The TorchRL transforms shared by every suite: channels-first, frame stack, counters."""

from __future__ import annotations

from torchrl.envs import (
    CatFrames,
    DoubleToFloat,
    EnvBase,
    PermuteTransform,
    RewardSum,
    StepCounter,
    TransformedEnv,
)


def add_standard_transforms(env: EnvBase, obs: str, frame_stack: int) -> TransformedEnv:
    """HWC -> CHW and a ``frame_stack``-deep channel stack for pixels; episode return and
    step counters for all (DrQ-v2 conventions: 3 frames -> ``pixels`` 9x84x84 uint8)."""
    env = TransformedEnv(env)
    env.append_transform(DoubleToFloat())  # dm_env rewards are float64
    if obs == "pixels":
        env.append_transform(PermuteTransform((-1, -3, -2), in_keys=["pixels"]))
        if frame_stack > 1:
            env.append_transform(CatFrames(N=frame_stack, dim=-3, in_keys=["pixels"]))
    env.append_transform(RewardSum())
    env.append_transform(StepCounter())
    return env
