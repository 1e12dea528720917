"""Task registry: every DMC suite task, the DrQ-v2 manipulation task and every Meta-World task.

Names follow DrQ-v2 / TD-MPC2 conventions: DMC ``<domain>_<task>`` in lower case
(``cheetah_run``, ``ball_in_cup_catch``, ``humanoid_cmu_run``), Meta-World
``mw_<task with underscores>`` (``mw_assembly``, ``mw_hand_insert``; metaworld 3.x
ships the ``-v3`` variants of the tasks the paper published with ``-v2`` names).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Literal

Suite = Literal["dmc", "manipulation", "metaworld"]

# DrQ-v2: quadruped is filmed from camera 2, everything else from camera 0.
_DMC_CAMERA = {"quadruped": 2}
# The reference code's view is "corner4" (its moved "corner2" of Meta-World v2; `camera=corner4`).
METAWORLD_CAMERA = "corner2"


@dataclass(frozen=True)
class TaskSpec:
    """What is needed to build one task.

    ``domain`` is the dm_control domain or the Meta-World env name (``assembly-v3``);
    ``task`` is empty for Meta-World; ``camera`` an id (DMC) or a name (Meta-World);
    ``episode_env_steps`` counts environment steps before action repeat.
    """

    name: str
    suite: Suite
    domain: str
    task: str
    camera: int | str
    episode_env_steps: int


def _dmc_tasks() -> dict[str, TaskSpec]:
    from dm_control import suite

    tasks = {}
    for domain, task in suite.ALL_TASKS:
        name = f"{domain}_{task}".lower()
        tasks[name] = TaskSpec(name, "dmc", domain, task, _DMC_CAMERA.get(domain, 0), 1000)
    # DrQ-v2's manipulation task (dm_control.manipulation "reach_duplo_vision"): 10 s at a
    # 40 ms control step = 250 environment steps; pixels come from its "front_close" camera.
    tasks["reach_duplo"] = TaskSpec("reach_duplo", "manipulation", "reach_duplo", "", 0, 250)
    return tasks


def _metaworld_tasks() -> dict[str, TaskSpec]:
    import metaworld

    tasks = {}
    for env_name in sorted(metaworld.ALL_V3_ENVIRONMENTS):
        short = env_name.removesuffix("-v3").replace("-", "_")
        name = f"mw_{short}"
        tasks[name] = TaskSpec(name, "metaworld", env_name, "", METAWORLD_CAMERA, 500)
    return tasks


def build_registry() -> dict[str, TaskSpec]:
    """All registered tasks, DMC first, then Meta-World."""
    return {**_dmc_tasks(), **_metaworld_tasks()}


class UnknownTaskError(KeyError):
    """Raised for a task name that is not registered; names the closest valid ones."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


def lookup(name: str, tasks: dict[str, TaskSpec]) -> TaskSpec:
    """The spec of ``name``, or an :class:`UnknownTaskError` listing the closest names."""
    if name in tasks:
        return tasks[name]
    close = difflib.get_close_matches(name.lower(), list(tasks), n=5, cutoff=0.5)
    hint = f"closest: {', '.join(close)}" if close else f"e.g. {', '.join(list(tasks)[:5])}"
    raise UnknownTaskError(
        f"unknown task {name!r} ({hint}); {len(tasks)} tasks are registered, "
        "see envs.TASKS for all of them"
    )
