"""What ``cp3er-train`` tells its user besides ``metrics.csv``: lines on stderr (kept in
``<run_dir>/train.log``), evaluations, expected durations, the random-policy reference and
``--help``."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

from omegaconf import DictConfig

from cp3er.run_data import RANDOM_POLICY_FILE

LOG = logging.getLogger("cp3er.console")

#: A run expected to take longer than this (seconds) says so at its start.
LONG_RUN_S = 3600.0
#: Training frames per second measured in docs/performance.md and docs/implementation.md,
#: by (obs, device, actor trunk, batch size), with where they come from. A rough guide:
#: other sizes run at other speeds.
DOCUMENTED_FPS: dict[tuple[str, str, bool, int], tuple[float, str]] = {
    ("pixels", "cpu", False, 256): (3.3, "docs/performance.md: pixels on a 2-core CPU, the "
                                         "paper's sizes"),
    ("pixels", "cpu", True, 256): (4.9, "docs/performance.md: pixels on a 2-core CPU, the "
                                        "paper's sizes with the actor trunk"),
    # +profile=cpu_pixels: a 60k-frame run in 131 minutes (69 with the trunk) alone on a core
    ("pixels", "cpu", False, 32): (7.6, "docs/implementation.md: the CPU pixel profile "
                                        "without the actor trunk, one run per core"),
    ("pixels", "cpu", True, 32): (14.5, "docs/implementation.md: the CPU pixel profile, one "
                                        "run per core"),
    ("pixels", "cuda", False, 256): (84.0, "docs/performance.md: pixels on one H200"),
    ("pixels", "cuda", True, 256): (84.0, "docs/performance.md: pixels on one H200"),
    ("state", "cpu", False, 256): (80.0, "+profile=cpu_states: 100,000 frames in 15-25 "
                                         "minutes on one core at hidden_dim 256"),
    ("state", "cpu", True, 256): (80.0, "+profile=cpu_states: 100,000 frames in 15-25 "
                                        "minutes on one core at hidden_dim 256"),
}
#: Updates timed (from this process's first) before the measured estimate.
TIMED_UPDATES = 50

#: The random-policy reference: episodes and seed of ``cp3er-eval --random-policy``'s
#: defaults' seed, so ``cp3er-eval --random-policy TASK --episodes 10`` prints the same.
RANDOM_EPISODES, RANDOM_SEED = 10, 12345
#: Measured when its frames (from states: no rendering, no updates) are at most this share
#: of the run's frames: under ~10% of the run's time (step costs: docs/performance.md).
RANDOM_SHARE = {"state": 0.5, "pixels": 4.0}


def say(message: str) -> None:
    """``cp3er-train: <message>`` on stderr above a tqdm bar, and into ``train.log`` when
    Hydra's job logging is set up."""
    from tqdm import tqdm

    LOG.info(message)  # first: a line seen on stderr is already in train.log
    tqdm.write(f"cp3er-train: {message}", file=sys.stderr)
    sys.stderr.flush()


def plural(count: int, noun: str) -> str:
    """``1 episode``, ``2 episodes``."""
    return f"{count:,} {noun}" + ("" if count == 1 else "s")


def eval_line(frame: int, summary: dict, seconds: float) -> str:
    """``eval at frame 10,000: return 241.3 (10 episodes, min 198.0, max 290.2, std
    27.1), 12.3 s`` (and the success rate on Meta-World) of a :func:`cp3er.evaluate.summarize`
    summary."""
    returns = summary["returns"]
    spread = "" if len(returns) == 1 else (
        f", min {min(returns):.1f}, max {max(returns):.1f}, std {_std(returns):.1f}")
    success = ("" if "success_rate" not in summary
               else f", success {summary['success_rate']:.2f}")
    return (f"eval at frame {frame:,}: return {summary['return_mean']:.1f} "
            f"({plural(len(returns), 'episode')}{spread}){success}, {seconds:.1f} s")


def _std(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5


def duration(seconds: float) -> str:
    """``40 seconds``, ``45 minutes``, ``3.8 hours``, ``11 days``."""
    if seconds < 90:
        return f"{seconds:.0f} seconds"
    if seconds < 5400:
        return f"{seconds / 60:.0f} minutes"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 86400:.0f} days"


def documented_fps(obs: str, device: str, trunk: bool, batch_size: int
                   ) -> tuple[float, str] | None:
    """:data:`DOCUMENTED_FPS` for these sizes; at another batch size, the figure measured at
    the nearest one (by ratio) with the batch it was measured at named; ``None`` if none."""
    figures = {batch: figure for (o, d, t, batch), figure in DOCUMENTED_FPS.items()
               if (o, d, t) == (obs, device, trunk)}
    if not figures:
        return None
    if batch_size in figures:
        return figures[batch_size]
    nearest = min(figures, key=lambda batch: abs(math.log(batch / batch_size)))
    fps, source = figures[nearest]
    return fps, f"{source}, measured at batch {nearest}, this run's is {batch_size}"


def expected_duration(cfg: DictConfig, from_frame: int = 0) -> str | None:
    """The start-up line of a run expected (:data:`DOCUMENTED_FPS`) to take more than
    :data:`LONG_RUN_S`, else ``None``."""
    trunk = bool(cfg.agent.get("actor_trunk", False))
    figure = documented_fps(str(cfg.obs), str(cfg.device), trunk, int(cfg.batch_size))
    frames = cfg.frames - from_frame
    if figure is None or frames / figure[0] <= LONG_RUN_S:
        return None
    fps, source = figure
    return (f"expected duration about {duration(frames / fps)}: {frames:,} frames at "
            f"~{fps:g} frames/s ({source}); measured again after the first "
            f"{TIMED_UPDATES} updates. Runs of minutes: +profile=cpu_states (states) or "
            "--config-name demo")


def measured_duration(frames_left: int, fps: float, updates: int, announced: bool = False
                      ) -> str | None:
    """The line after the first ``updates`` updates of a run longer than :data:`LONG_RUN_S`
    at the measured ``fps``, or whose start ``announced`` an estimate; else ``None``."""
    if fps <= 0 or (frames_left / fps <= LONG_RUN_S and not announced):
        return None
    return (f"measured {fps:.2f} frames/s over {updates} updates: about "
            f"{duration(frames_left / fps)} left for {frames_left:,} frames")


class SpeedReport:
    """The run's measured duration, said once: times this process's first
    :data:`TIMED_UPDATES` updates (with the collection between them) and says the time
    left if over an hour, or whatever it is when the start line gave an estimate
    (``announced``)."""

    def __init__(self, frames: int) -> None:
        self.frames, self.announced, self.done = frames, False, False
        self._mark: tuple[int, int, float] | None = None  # (updates, frame, time) at the start

    def tick(self, updates: int, frame: int) -> None:
        if self.done:
            return
        now = time.perf_counter()
        if self._mark is None:
            self._mark = (updates, frame, now)
            return
        start_updates, start_frame, start = self._mark
        if updates - start_updates < TIMED_UPDATES or now <= start:
            return
        self.done = True
        line = measured_duration(self.frames - frame, (frame - start_frame) / (now - start),
                                 updates - start_updates, self.announced)
        if line is not None:
            say(line)


def random_reference(cfg: DictConfig, run_dir: Path, frames: int
                     ) -> tuple[dict | None, str | None]:
    """``(summary, None)`` of :data:`RANDOM_EPISODES` uniform-random episodes on the run's
    task from states (same returns as pixels, no rendering), cached in
    :data:`~cp3er.run_data.RANDOM_POLICY_FILE`; ``(None, reason)`` when too costly
    (:data:`RANDOM_SHARE`) or failed. It draws from torch's global RNG: the run's RNG
    states are restored afterwards."""
    from envs import TASKS

    path = run_dir / RANDOM_POLICY_FILE
    cached = _read_reference(path, cfg.task_name)
    if cached is not None:
        return cached, None
    cost = RANDOM_EPISODES * TASKS[cfg.task_name].episode_env_steps
    if cost > RANDOM_SHARE[str(cfg.obs)] * frames:
        return None, (f"not measured: {RANDOM_EPISODES} episodes ({cost:,} frames) would "
                      f"cost more than ~10% of this {frames:,}-frame run; cp3er-eval "
                      f"--random-policy {cfg.task_name} --episodes {RANDOM_EPISODES} "
                      "measures it")
    from cp3er.checkpoint import atomic_write

    # a reference that cannot be had is said, never fails the finished run
    try:
        summary = _measure_random(cfg)
        summary.update(obs="state", seed=RANDOM_SEED, policy="uniform random actions")
        atomic_write(path, lambda handle: handle.write(json.dumps(summary).encode()))
    except (ValueError, RuntimeError, KeyError, OSError, ImportError) as error:
        detail = (str(error).splitlines() or [""])[0]
        return None, f"not measured: {type(error).__name__}: {detail}"
    return summary, None


def _read_reference(path: Path, task: str) -> dict | None:
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict):
        return None
    if (summary.get("task"), summary.get("episodes"), summary.get("seed")) != (
            task, RANDOM_EPISODES, RANDOM_SEED):
        return None
    return summary


def _measure_random(cfg: DictConfig) -> dict:
    """The measurement of :func:`random_reference`, on a fresh state env with the run's
    env settings (action repeat), the caller's RNG states untouched."""
    import torch

    from cp3er.builders import env_overrides
    from cp3er.evaluate import run_episodes, summarize
    from cp3er.run_state import rng_state, set_rng_state
    from envs import make_env

    saved = rng_state()
    try:
        env = make_env(cfg.task_name, "state", seed=RANDOM_SEED, **env_overrides(cfg))
        try:
            torch.manual_seed(RANDOM_SEED)  # the action spec's uniform draws: torch's RNG
            results = run_episodes(env, None, RANDOM_EPISODES)
        finally:
            env.close()
    finally:
        set_rng_state(saved)
    return summarize(cfg.task_name, results, seed=RANDOM_SEED)


def reference_phrase(final_return: float, reference: dict) -> str:
    """``uniform random actions 332.1 (10 episodes): the trained policy is below random``."""
    random_return = reference["return_mean"]
    verdict = "below" if final_return < random_return else "above"
    episodes = plural(reference["episodes"], "episode")
    return (f"uniform random actions {random_return:.1f} ({episodes} from states, seed "
            f"{reference['seed']}): the trained policy is {verdict} random")


def help_text(config_dir: str | Path) -> str:
    """``cp3er-train --help``: usage, examples and the config choices (``configs/``)."""
    config_dir = Path(config_dir)

    def names(group: str) -> list[str]:
        return sorted(p.stem for p in (config_dir / group).glob("*.yaml"))

    tasks = names("task")
    dmc = [t for t in tasks if not t.startswith("mw_")]
    return f"""\
usage: cp3er-train [--config-name demo] [KEY=VALUE ...] [+profile=NAME] [-m]

Train an agent on one task: environment -> collector -> replay -> updates, with
evaluations, checkpoints and metrics in the run folder. Every setting is a Hydra override
of configs/config.yaml (print the composed config with --cfg job).

Examples:
  cp3er-train +profile=cpu_states task=cartpole_swingup
      learns from states in about 20 minutes on one core (100,000 frames)
  cp3er-train --config-name demo
      `make run`: 8,000 pixel frames of cartpole_balance, a pipeline check (~10 minutes)
  cp3er-train task=cartpole_balance obs=state frames=20000 seed=2 run_dir=runs/try
  cp3er-train +profile=cpu_pixels task=reacher_easy
      pixels sized for a CPU (60,000 frames, about 70 minutes on one core)
  cp3er-train task=cheetah_run device=cuda
      the paper's pixel setting: 3,100,000 frames, ~10 hours on one H200 (~11 days on
      a 2-core CPU; docs/performance.md)
  cp3er-train run_dir=runs/try resume=true
      continue a stopped run from its last checkpoint
  cp3er-train -m task=cartpole_balance,walker_walk seed=1,2,3
      a sweep, one run folder per job

Common keys:
  agent=NAME      {", ".join(names("agent"))} (default cp3er)
  task=NAME       {len(tasks)} tasks (configs/task/): {len(dmc)} DeepMind Control
                  (cartpole_balance, cheetah_run, walker_walk, ...), {len(tasks) - len(dmc)} \
Meta-World (mw_assembly, ...)
  +profile=NAME   {", ".join(names("profile"))}: sizes for a CPU (configs/profile/)
  obs=pixels|state  device=cpu|cuda  seed=INT  frames=INT  run_dir=PATH
  checkpoint_every=FRAMES  resume=true|false|auto  threads=auto|INT  log.progress=false

Hydra's own options: --cfg job (the composed config), --info, --hydra-help.
"""
