"""Meta-World (metaworld 3.x, v3 tasks) as TorchRL environments.

A simulation error ends the episode as a truncation, detected by Meta-World's
``_did_see_sim_exception`` flag (its env would otherwise return its last stable observation
with reward 0 until the time limit) or MuJoCo's instability warnings (mujoco 3 resets the
state silently instead of raising).
"""

from __future__ import annotations

import warnings
from typing import Any

import gymnasium as gym
import mujoco
import numpy as np
import torch
from torchrl.data import Categorical
from torchrl.envs.libs.gym import GymWrapper, default_info_dict_reader

from envs.gl_context import release_mujoco_renderer
from envs.registry import TaskSpec

_UNSTABLE_WARNINGS = (mujoco.mjtWarning.mjWARN_BADQPOS, mujoco.mjtWarning.mjWARN_BADQVEL,
                      mujoco.mjtWarning.mjWARN_BADQACC)


class MetaWorldAdapter(gym.Wrapper):
    """Action repeat below the renderer, renders flipped upright, one observation entry,
    ``success`` at any repeated sub-step."""

    def __init__(self, env: gym.Env, obs: str, action_repeat: int) -> None:
        if action_repeat < 1:
            raise ValueError(f"action_repeat must be >= 1, got {action_repeat}")
        super().__init__(env)
        self._obs = obs
        self._repeat = action_repeat
        self.physics_errors = 0  # agent steps that hit a simulation error (episodes truncated)
        self._last_observation: dict[str, np.ndarray] = {}
        if obs == "pixels":
            height, width = env.unwrapped.height, env.unwrapped.width
            space = gym.spaces.Box(0, 255, (height, width, 3), np.uint8)
        else:
            size = env.observation_space.shape[0]
            space = gym.spaces.Box(-np.inf, np.inf, (size,), np.float32)
        self.observation_space = gym.spaces.Dict({obs: space})

    def _observation(self, state: np.ndarray) -> dict[str, np.ndarray]:
        if self._obs == "pixels":
            # Meta-World renders upside down: flip rows.
            return {"pixels": np.ascontiguousarray(self.env.render()[::-1])}
        return {"observation": np.asarray(state, dtype=np.float32)}

    def _sim_warnings(self) -> int:
        """MuJoCo's count of divergent-simulation warnings in the current data."""
        data = getattr(self.env.unwrapped, "data", None)
        if data is None:
            return 0
        return sum(int(data.warning[int(w)].number) for w in _UNSTABLE_WARNINGS)

    def _sim_error(self, warnings_before: int) -> bool:
        flagged = bool(getattr(self.env.unwrapped, "_did_see_sim_exception", False))
        return flagged or self._sim_warnings() > warnings_before

    def reset(self, **kwargs: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        if getattr(self.env.unwrapped, "_did_see_sim_exception", False):
            self.env.unwrapped._did_see_sim_exception = False  # Meta-World never clears it
        state, info = self.env.reset(**kwargs)
        info = {**info, "success": np.array([False])}
        self._last_observation = self._observation(state)
        return self._copy(self._last_observation), info

    def close(self) -> None:
        release_mujoco_renderer(self.env)  # before gymnasium frees the GL context
        super().close()

    @staticmethod
    def _copy(observation: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in observation.items()}  # TorchRL writes into dicts

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, bool, dict]:
        total, success = 0.0, False
        terminated = truncated = False
        info: dict[str, Any] = {}
        for _ in range(self._repeat):
            before = self._sim_warnings()
            state, reward, terminated, truncated, info = self.env.step(action)
            if self._sim_error(before):
                # The sub-step's state is divergent (or MuJoCo's silent reset): end the
                # episode as a truncation from the last good observation, reward 0.
                self.physics_errors += 1
                warnings.warn("MuJoCo simulation error in Meta-World, episode truncated",
                              stacklevel=2)
                info = {**info, "success": np.array([success])}
                return self._copy(self._last_observation), total, False, True, info
            total += float(reward)
            success = success or bool(info.get("success", 0.0))
            if terminated or truncated:
                break
        info = {**info, "success": np.array([success])}
        self._last_observation = self._observation(state)
        return self._copy(self._last_observation), total, terminated, truncated, info


def make_metaworld_env(
    spec: TaskSpec, obs: str, seed: int, action_repeat: int, image_size: int, camera: str
) -> GymWrapper:
    """A TorchRL env for one Meta-World MT1 task (random goal per episode, seeded)."""
    import metaworld  # noqa: F401  (registers the Meta-World/* gymnasium ids)

    render = {"render_mode": "rgb_array", "width": image_size, "height": image_size,
              "camera_name": camera} if obs == "pixels" else {}
    env = gym.make("Meta-World/MT1", env_name=spec.domain, seed=seed,
                   disable_env_checker=True, **render)
    # MT1's observation space is built before reset makes the goal observable (goal bounds
    # [0, 0]): declare the space the observations come from, then check against it.
    env.reset(seed=seed)
    env.observation_space = env.unwrapped.observation_space = (
        env.unwrapped.sawyer_observation_space)
    with warnings.catch_warnings():
        # some tasks fix a goal coordinate (assembly: the goal's height): equal bounds there
        # are true, not a defect of the space
        warnings.filterwarnings("ignore", message=".*maximum and minimum values are equal")
        env = gym.wrappers.PassiveEnvChecker(env)
    env = MetaWorldAdapter(env, obs, action_repeat)
    torchrl_env = GymWrapper(env)
    # info["success"] is a Python float: read it with a spec.
    reader = default_info_dict_reader(
        ["success"], spec={"success": Categorical(2, shape=(1,), dtype=torch.bool)}
    )
    torchrl_env.set_info_dict_reader(reader)
    return torchrl_env
