"""Evaluation: run episodes with a policy, aggregate returns; ``cp3er-eval`` CLI.

``cp3er-eval <run_dir or checkpoint> --episodes N [--video]`` prints one JSON object
(``return_mean``, ``return_iqm``, ``return_ci``, ``returns``, ``frame``, ``success_rate``
for Meta-World, ``eval_noise`` for CP3ER; fields in docs/usage.md). ``--random-policy
<task>`` prints it for uniform random actions, ``--constant-action <task>:<a1,a2,...>`` for
one fixed action at every step (what a policy collapsed onto one action scores).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tensordict import TensorDictBase
from torchrl.envs import EnvBase
from torchrl.envs.utils import ExplorationType, set_exploration_type

from agents.consistency_policy import DETERMINISTIC_MODES, set_deterministic_mode
from cp3er.faults import NumericalError, check_finite_actions
from cp3er.stats import bootstrap_mean_ci, interquartile_mean


@dataclass
class EpisodeResults:
    returns: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    successes: list[bool] = field(default_factory=list)
    frames: list[np.ndarray] = field(default_factory=list)  # first episode, HxWx3 uint8


def _acting_on_env_device(policy: Callable) -> Callable:
    """``policy`` fed on its parameters' device, answering on the CPU: TorchRL's
    ``rollout(auto_cast_to_device=True)`` casts back only to a declared ``env.device``."""
    params = next(iter(policy.parameters()), None) if hasattr(policy, "parameters") else None
    if params is None or params.device.type == "cpu":
        return policy
    device = params.device

    def act(tensordict: TensorDictBase) -> TensorDictBase:
        return policy(tensordict.to(device)).to("cpu")

    return act


def run_episodes(
    env: EnvBase, policy, episodes: int, *, record_video: bool = False, max_steps: int = 100_000,
    progress: bool = False,
) -> EpisodeResults:
    """Roll out ``episodes`` full episodes; :class:`~cp3er.faults.NumericalError` on a
    non-finite action."""
    from tqdm import tqdm

    results = EpisodeResults()
    act = _acting_on_env_device(policy)
    for episode in tqdm(range(episodes), desc="episodes", unit="episode", disable=not progress,
                        dynamic_ncols=True):
        with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
            rollout = env.rollout(max_steps, act, break_when_any_done=True)
        check_finite_actions(rollout["action"], f"evaluation episode {episode + 1}")
        results.returns.append(float(rollout["next", "reward"].sum()))
        results.lengths.append(int(rollout.shape[0]))
        if ("next", "success") in rollout.keys(True):
            results.successes.append(bool(rollout["next", "success"].any()))
        if record_video and episode == 0 and "pixels" in rollout.keys():
            frames = torch.cat([rollout["pixels"][:1], rollout["next", "pixels"]])
            results.frames = list(frames[:, -3:].permute(0, 2, 3, 1).numpy())
    return results


def random_policy_summary(task: str, episodes: int, *, obs: str = "state",
                          seed: int = 12345) -> dict:
    """:func:`summarize` of uniform random actions on ``task`` (``obs="state"``: the same
    returns as pixels, without rendering)."""
    return _fixed_policy_summary(task, episodes, obs, seed, lambda env: None)


def constant_action_summary(task: str, action: list[float], episodes: int, *,
                            obs: str = "state", seed: int = 12345) -> dict:
    """:func:`summarize` of ``action`` at every step of ``task``; ``ValueError`` when it does
    not fit the task's action size and bounds."""

    def constant_policy(env: EnvBase) -> Callable:
        spec = env.action_spec
        value = torch.as_tensor(action, dtype=spec.dtype)
        low, high = spec.space.low, spec.space.high
        if value.shape != spec.shape:
            raise ValueError(f"{task} takes {spec.shape[-1]} action values, got "
                             f"{len(action)}: {action}")
        if not bool(((value >= low) & (value <= high)).all()):
            raise ValueError(f"the action {action} is outside {task}'s bounds "
                             f"[{low.tolist()}, {high.tolist()}]")
        return lambda tensordict: tensordict.set("action", value.clone())

    return _fixed_policy_summary(task, episodes, obs, seed, constant_policy)


def _fixed_policy_summary(task: str, episodes: int, obs: str, seed: int,
                          policy_for: Callable[[EnvBase], Callable | None]) -> dict:
    """:func:`summarize` of ``policy_for(env)`` (``None``: random actions) on a fresh env."""
    from envs import make_env

    env = make_env(task, obs, seed=seed)
    try:
        policy = policy_for(env)
        torch.manual_seed(seed)  # the action spec's uniform draws use torch's global RNG
        results = run_episodes(env, policy, episodes)
    finally:
        env.close()
    return summarize(task, results, seed=seed)


def summarize(task: str, results: EpisodeResults, seed: int = 0) -> dict:
    """The JSON summary of ``cp3er-eval``."""
    returns = np.asarray(results.returns, dtype=np.float64)
    low, high = bootstrap_mean_ci(returns, rng=seed)
    summary = {
        "task": task,
        "episodes": len(returns),
        "return_mean": float(returns.mean()),
        "return_iqm": float(interquartile_mean(returns)),
        "return_ci": [float(low), float(high)],
        "episode_length_mean": float(np.mean(results.lengths)),
        # in order: with one --seed, episode i starts from the same state for every policy
        "returns": [round(float(r), 3) for r in returns],
    }
    if results.successes:
        summary["success_rate"] = float(np.mean(results.successes))
    return summary


def _eval_noise(cfg, agent, requested: str | None) -> str | None:
    """Set and return a CP3ER actor's evaluation mode (``None`` for another agent)."""
    if cfg.agent.name != "cp3er":
        if requested is None:
            return None
        raise ValueError(f"--eval-noise applies to CP3ER runs; this is a {cfg.agent.name} "
                          "run, whose evaluation acts its deterministic action already")
    mode = requested or str(cfg.agent.eval_noise)
    set_deterministic_mode(agent.loss, mode)
    return mode


def write_video(frames: list[np.ndarray], path: str | Path, fps: int = 25) -> Path:
    """Write frames as a GIF (no ffmpeg needed)."""
    import imageio.v3 as iio

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, np.stack(frames), duration=1000 // fps, loop=0)
    return path


def main(argv: list[str] | None = None) -> int:
    from cp3er.builders import checkpoint_frame, restore_agent_for_eval
    from cp3er.checkpoint import CheckpointError, load_checkpoint
    from cp3er.logs import quiet_torchrl
    from cp3er.threads import add_device_threads_arguments, apply_threads

    parser = argparse.ArgumentParser(prog="cp3er-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", nargs="?", help="a run folder or a checkpoint file")
    parser.add_argument("--random-policy", metavar="TASK", default=None,
                        help="evaluate uniform random actions on TASK instead of a run")
    parser.add_argument("--constant-action", metavar="TASK:ACTION", default=None,
                        help="evaluate one fixed action at every step of TASK instead of a run; "
                             "ACTION: comma-separated values, one per action dimension "
                             "(e.g. reacher_easy:-1,1)")
    parser.add_argument("--obs", default=None, choices=("state", "pixels"),
                        help="observation type of --random-policy's or --constant-action's "
                             "env (same returns; default state); a run is evaluated on the "
                             "observations it was trained on (another --obs is refused)")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--video", nargs="?", const="", default=None,
                        help="write a GIF of the first episode (optional path)")
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--eval-noise", choices=DETERMINISTIC_MODES, default=None,
                        help="a CP3ER run's evaluation actions: sample (one-step samples, the "
                             "reference's) or zero_noise (the repeatable D(0, sigma_max | s)); "
                             "default: the run's agent.eval_noise")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (one bar per episode on stderr by default)")
    add_device_threads_arguments(parser)
    args = parser.parse_args(argv)
    quiet_torchrl()
    apply_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available on this machine")
    if args.episodes < 1:
        parser.error("--episodes must be >= 1")
    chosen = [args.target, args.random_policy, args.constant_action]
    if sum(choice is not None for choice in chosen) != 1:
        parser.error("give one of: a run folder or checkpoint, --random-policy TASK, "
                     "--constant-action TASK:ACTION")
    if args.constant_action is not None:
        task, _, text = args.constant_action.partition(":")
        try:
            action = [float(value) for value in text.split(",")]
        except ValueError:
            parser.error(f"--constant-action TASK:ACTION, ACTION comma-separated numbers "
                         f"(e.g. reacher_easy:-1,1); got {args.constant_action!r}")
    if args.target is None:
        from envs.registry import UnknownTaskError

        args.obs = args.obs or "state"
        try:
            if args.random_policy is not None:
                summary = random_policy_summary(args.random_policy, args.episodes,
                                                obs=args.obs, seed=args.seed)
            else:
                summary = constant_action_summary(task, action, args.episodes, obs=args.obs,
                                                  seed=args.seed)
        except (UnknownTaskError, ValueError) as error:
            print(f"cp3er-eval: {error}", file=sys.stderr)
            return 2
        print(json.dumps(summary))
        return 0
    try:
        state = load_checkpoint(args.target)
        cfg, env, agent = restore_agent_for_eval(state, seed=args.seed, device=args.device)
    except (CheckpointError, ValueError) as error:
        print(f"cp3er-eval: {error}", file=sys.stderr)
        return 2
    if args.obs is not None and args.obs != cfg.obs:
        env.close()
        print(f"cp3er-eval: --obs {args.obs}: {args.target} was trained on {cfg.obs} "
              f"observations and is evaluated on them (drop --obs)", file=sys.stderr)
        return 2
    try:
        eval_noise = _eval_noise(cfg, agent, args.eval_noise)
    except ValueError as error:
        env.close()
        print(f"cp3er-eval: {error}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    try:
        results = run_episodes(env, agent.policy, args.episodes,
                               record_video=args.video is not None, progress=not args.no_progress)
    except NumericalError as error:
        print(f"cp3er-eval: {error}: the checkpoint's policy is broken", file=sys.stderr)
        return 2
    finally:
        env.close()
    summary = summarize(cfg.task_name, results, seed=args.seed)
    summary["frame"] = checkpoint_frame(state)  # the weights' and the counters' checkpoint
    if args.video is not None and results.frames:
        target = Path(args.target)
        default = (target if target.is_dir() else target.parent.parent) / "eval" / "cp3er-eval.gif"
        summary["video"] = str(write_video(results.frames, args.video or default))
    if eval_noise is not None:
        summary["eval_noise"] = eval_noise
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
