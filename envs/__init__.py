"""Environment builders (pixel and state DMC, manipulation, Meta-World): ``make_env``;
``TASKS`` maps every registered task name to its :class:`TaskSpec`."""

from __future__ import annotations

import os

# Headless rendering through Mesa EGL (osmesa fails); before dm_control / mujoco import.
os.environ.setdefault("MUJOCO_GL", "egl")

from torchrl.envs import EnvBase

from cp3er.choices import OBS_TYPES, obs_key_for
from envs.common import add_standard_transforms
from envs.gl_context import release_mujoco_renderer
from envs.registry import TaskSpec, UnknownTaskError, build_registry, lookup

TASKS: dict[str, TaskSpec] = build_registry()

DEFAULTS = {"action_repeat": 2, "frame_stack": 3, "image_size": 84, "camera": None}


def make_env(task: str, obs: str = "pixels", seed: int = 0, **overrides) -> EnvBase:
    """Build ``task`` as a TorchRL env with DrQ-v2 conventions.

    Args:
        task: a registered name (``cheetah_run``, ``mw_assembly``; see ``TASKS``).
        obs: ``"pixels"`` (key ``pixels``, uint8, (3*frame_stack)x84x84) or ``"state"``
            (key ``observation``, float32 vector).
        seed: seeds the task's randomness (same seed, same first observations).
        **overrides: ``action_repeat`` (2), ``frame_stack`` (3), ``image_size`` (84),
            ``camera`` (task default: 0, quadruped 2, Meta-World corner2).

    Returns:
        A ``TransformedEnv`` with ``episode_reward`` and ``step_count``; Meta-World adds
        a per-step boolean ``success``.
    """
    spec = lookup(task, TASKS)
    if obs not in OBS_TYPES:
        raise ValueError(f"obs must be one of {OBS_TYPES}, got {obs!r}")
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise ValueError(
            f"unknown env override(s) {sorted(unknown)}; valid: {sorted(DEFAULTS)}"
        )
    options = {**DEFAULTS, **overrides}
    for key in ("action_repeat", "frame_stack", "image_size"):
        if not isinstance(options[key], int) or options[key] < 1:
            raise ValueError(f"{key} must be a positive integer, got {options[key]!r}")
    camera = spec.camera if options["camera"] is None else options["camera"]
    obs_key = obs_key_for(obs)
    if spec.suite == "metaworld":
        from envs.metaworld import make_metaworld_env

        base = make_metaworld_env(
            spec, obs_key, seed, options["action_repeat"], options["image_size"], camera
        )
    else:
        from envs.dmc import make_dmc_env

        base = make_dmc_env(
            spec, obs_key, seed, options["action_repeat"], options["image_size"], camera
        )
    env = add_standard_transforms(base, obs_key, options["frame_stack"])
    env.set_seed(seed)
    return env


__all__ = [
    "DEFAULTS",
    "OBS_TYPES",
    "TASKS",
    "TaskSpec",
    "UnknownTaskError",
    "make_env",
    "physics_errors",
    "release_mujoco_renderer",
]


def physics_errors(env: EnvBase) -> int:
    """Steps of ``env`` whose MuJoCo simulation failed (each truncated its episode)."""
    inner = getattr(env, "base_env", env)
    inner = getattr(inner, "_env", None)
    while inner is not None:
        if hasattr(inner, "physics_errors") and isinstance(inner.physics_errors, int):
            return inner.physics_errors
        inner = getattr(inner, "_env", None) or getattr(inner, "env", None)
    return 0
