"""DeepMind Control (suite + the DrQ-v2 manipulation task) as TorchRL environments.

dm_env wrappers below TorchRL's ``DMControlWrapper``: :class:`ActionRepeat` below the
renderer (one render per agent step; TorchRL's ``frame_skip`` renders every sub-step) and
:class:`ObservationAdapter` (one observation entry; a ``PhysicsError`` ends the episode as
a truncation). Why: docs/implementation.md, "Notes on the software stack".
"""

from __future__ import annotations

import warnings
from typing import Any

import dm_env
import numpy as np
from dm_env import specs
from torchrl.envs.libs.dm_control import DMControlWrapper

from envs.gl_context import bind_dm_control_context
from envs.registry import TaskSpec

_MANIPULATION_CAMERA_KEY = "front_close"


class _DelegatingWrapper(dm_env.Environment):
    """dm_env wrapper base: everything not overridden goes to the wrapped env."""

    def __init__(self, env: dm_env.Environment) -> None:
        self._env = env

    def reset(self) -> dm_env.TimeStep:
        return self._env.reset()

    def step(self, action: np.ndarray) -> dm_env.TimeStep:
        return self._env.step(action)

    def observation_spec(self) -> Any:
        return self._env.observation_spec()

    def action_spec(self) -> Any:
        return self._env.action_spec()

    def reward_spec(self) -> Any:
        return self._env.reward_spec()

    def discount_spec(self) -> Any:
        return self._env.discount_spec()

    def close(self) -> None:
        self._env.close()

    def __getattr__(self, name: str) -> Any:  # physics, task, random_state, ...
        return getattr(self._env, name)


class ActionRepeat(_DelegatingWrapper):
    """Repeat each action ``repeat`` times, rewards summed with the inner discounts
    (DrQ-v2 ``ActionRepeatWrapper``); stops at a LAST time step."""

    def __init__(self, env: dm_env.Environment, repeat: int) -> None:
        if repeat < 1:
            raise ValueError(f"action_repeat must be >= 1, got {repeat}")
        super().__init__(env)
        self._repeat = repeat

    def step(self, action: np.ndarray) -> dm_env.TimeStep:
        reward, discount = 0.0, 1.0
        for _ in range(self._repeat):
            time_step = self._env.step(action)
            reward += (time_step.reward or 0.0) * discount
            discount *= time_step.discount
            if time_step.last():
                break
        return time_step._replace(reward=reward, discount=discount)


class ObservationAdapter(_DelegatingWrapper):
    """One observation entry, ``pixels`` (uint8 HxWx3) or ``observation`` (float32); a
    ``PhysicsError`` becomes a truncation (last good observation, reward 0)."""

    def __init__(
        self, env: dm_env.Environment, obs: str, image_size: int, camera: int | str
    ) -> None:
        super().__init__(env)
        self._obs = obs
        self._render_kwargs = {"height": image_size, "width": image_size, "camera_id": camera}
        self.physics_errors = 0  # steps that raised a PhysicsError (episodes truncated)
        self._last_observation: dict[str, np.ndarray] | None = None
        inner = env.observation_spec()
        self._camera_key = _MANIPULATION_CAMERA_KEY if _MANIPULATION_CAMERA_KEY in inner else None
        if obs == "pixels":
            self._spec = specs.BoundedArray(
                (image_size, image_size, 3), np.uint8, 0, 255, name="pixels"
            )
        else:
            state_keys = [k for k in inner if k != self._camera_key]
            size = sum(int(np.prod(inner[k].shape)) for k in state_keys)
            self._state_keys = state_keys
            self._spec = specs.Array((size,), np.float32, name="observation")

    def _convert(self, time_step: dm_env.TimeStep) -> dm_env.TimeStep:
        if self._obs == "pixels":
            if self._camera_key is not None:
                frame = np.asarray(time_step.observation[self._camera_key])[0]
            else:
                frame = self._env.physics.render(**self._render_kwargs)
            observation = {"pixels": np.ascontiguousarray(frame, dtype=np.uint8)}
        else:
            parts = [np.asarray(time_step.observation[k]).ravel() for k in self._state_keys]
            observation = {"observation": np.concatenate(parts).astype(np.float32)}
        # a copy: TorchRL's reader writes into the dict it is given
        self._last_observation = {k: v.copy() for k, v in observation.items()}
        return time_step._replace(observation=observation)

    def _bind_gl(self) -> None:
        if self._obs == "pixels":  # before anything renders (the camera observation too)
            bind_dm_control_context(self._env.physics)

    def reset(self) -> dm_env.TimeStep:
        self._bind_gl()
        return self._convert(self._env.reset())

    def step(self, action: np.ndarray) -> dm_env.TimeStep:
        from dm_control.rl.control import PhysicsError

        self._bind_gl()
        try:
            return self._convert(self._env.step(action))
        except PhysicsError as error:
            if self._last_observation is None:
                raise
            self.physics_errors += 1
            warnings.warn(f"MuJoCo physics error, episode truncated: {error}", stacklevel=2)
            # A LAST step with discount 1 is a truncation (TorchRL's DMControlWrapper):
            # the episode bootstraps from the last good observation; the collector resets.
            observation = {k: v.copy() for k, v in self._last_observation.items()}
            return dm_env.truncation(0.0, observation)

    def observation_spec(self) -> dict[str, specs.Array]:
        return {self._spec.name: self._spec}


def _reseed(env: Any, seed: int) -> None:
    """Re-seed the innermost dm_control task (suite: ``task._random``; composer: env RNG)."""
    random_state = np.random.RandomState(seed)
    inner = env
    while isinstance(inner, _DelegatingWrapper) or hasattr(inner, "_env"):
        inner = inner._env
    if hasattr(inner, "_random_state"):  # composer.Environment (manipulation)
        inner._random_state = random_state
    else:  # control.Environment (suite)
        inner.task._random = random_state


class DMControlTorchRLEnv(DMControlWrapper):
    """``DMControlWrapper`` accepting any dm_env (it takes dm_control's own classes only)."""

    def _check_kwargs(self, kwargs: dict) -> None:
        if not isinstance(kwargs.get("env"), dm_env.Environment):
            raise TypeError("DMControlTorchRLEnv needs a dm_env.Environment under `env`")

    def _set_seed(self, seed: int | None) -> None:
        if seed is None:
            return
        _reseed(self._env, seed)
        self.reset()


def make_dmc_env(
    spec: TaskSpec,
    obs: str,
    seed: int,
    action_repeat: int,
    image_size: int,
    camera: int | str,
) -> DMControlTorchRLEnv:
    """A TorchRL env for a DMC suite or manipulation task (actions scaled to [-1, 1])."""
    from dm_control.suite.wrappers import action_scale

    if spec.suite == "dmc":
        from dm_control import suite

        env = suite.load(
            spec.domain, spec.task, task_kwargs={"random": seed}, visualize_reward=False
        )
    else:
        from dm_control import manipulation

        # the "_vision" variant renders its camera every step: use "_features" for states
        variant = "vision" if obs == "pixels" else "features"
        env = manipulation.load(f"{spec.domain}_{variant}", seed=seed)
    env = action_scale.Wrapper(env, minimum=-1.0, maximum=1.0)
    env = ActionRepeat(env, action_repeat)
    env = ObservationAdapter(env, obs, image_size, camera)
    return DMControlTorchRLEnv(env)
