"""Validate a run's config before anything heavy starts: one clear error per problem,
naming the key, the value and the valid choices."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from numbers import Integral
from pathlib import Path

import torch
from omegaconf import DictConfig

from cp3er.choices import AGENTS
from cp3er.threads import parse_threads


class ConfigError(ValueError):
    """A config value that cannot work; the message names key, value and valid choices."""


def _require(ok: bool, key: str, value, expected: str) -> None:
    if not ok:
        raise ConfigError(f"config {key}={value!r} is invalid: expected {expected}")


def _positive_int(cfg: DictConfig, key: str, minimum: int = 1) -> None:
    value = cfg
    for part in key.split("."):
        value = value[part]
    ok = isinstance(value, Integral) and not isinstance(value, bool) and value >= minimum
    _require(ok, key, value, f"an integer >= {minimum}")


def validate_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` (or ``UnknownTaskError``) for the first invalid value: task
    name, ranges, keys that depend on each other or on the machine (Hydra checks types and
    choices against :mod:`cp3er.config_schema`)."""
    from envs import TASKS
    from envs.registry import lookup

    lookup(cfg.task_name, TASKS)  # unknown task -> closest names
    _require(cfg.agent.name in AGENTS, "agent", cfg.agent.name, f"one of {AGENTS}")
    replay_device, storage = str(cfg.replay.device), str(cfg.replay.storage)
    _require(replay_device in ("cpu", cfg.device), "replay.device", replay_device,
             f"cpu, or {replay_device} with device={replay_device} (the agent trains on "
             f"device={cfg.device})")
    _require(replay_device == "cpu" or storage == "memory", "replay.storage", storage,
             f"memory with replay.device={replay_device} (memmap storage lives on the CPU)")
    _require(not cfg.perf.cuda_graph or cfg.device == "cuda", "perf.cuda_graph",
             cfg.perf.cuda_graph, "false with device=cpu (a CUDA graph needs device=cuda)")
    _require(not (cfg.perf.cuda_graph and cfg.perf.compile
                  and cfg.perf.compile_mode == "reduce-overhead"), "perf.compile_mode",
             cfg.perf.compile_mode, "not reduce-overhead with perf.cuda_graph=true (the "
             "whole update is one CUDA graph already: use compile_mode=default)")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config device='cuda' is invalid: no CUDA device is available "
                          "on this machine (use device=cpu)")
    for key in ("frames", "batch_size", "n_step", "hidden_dim", "feature_dim",
                "replay.capacity", "schedule.update_every_steps", "schedule.eval_episodes",
                "env.action_repeat", "env.frame_stack", "env.image_size",
                "log.metrics_every_updates", "collector.workers", "collector.sync_every"):
        _positive_int(cfg, key)
    for key in ("seed", "checkpoint_every", "schedule.seed_frames",
                "schedule.explore_frames", "schedule.eval_every_frames"):
        _positive_int(cfg, key, minimum=0)
    _require(cfg.batch_size <= cfg.replay.capacity, "batch_size", cfg.batch_size,
             f"at most replay.capacity={cfg.replay.capacity}")
    workers = cfg.collector.workers
    _require(cfg.batch_size <= cfg.replay.capacity // workers, "replay.capacity",
             cfg.replay.capacity, f"at least batch_size x collector.workers = "
             f"{cfg.batch_size * workers} (one replay stream per worker)")
    _check_collector_backend(cfg.collector)
    _require(cfg.lr > 0, "lr", cfg.lr, "a number > 0")
    _require(0 < cfg.gamma <= 1, "gamma", cfg.gamma, "a number in (0, 1]")
    clip = cfg.optim.grad_clip
    _require(clip is None or clip > 0, "optim.grad_clip", clip, "null or a number > 0")
    try:
        parse_threads(cfg.threads)
    except ValueError as error:
        raise ConfigError(f"config {error}") from None
    _require(cfg.label is None or cfg.label.strip() != "", "label", cfg.label,
             "null or a non-empty name")
    _require(cfg.replay.alpha > 0, "replay.alpha", cfg.replay.alpha, "a number > 0")
    _require(isinstance(cfg.resume, bool) or cfg.resume == "auto", "resume", cfg.resume,
             "true, false or auto")
    ema = cfg.agent.get("consistency", {}).get("ema_decay")  # CP3ER only
    _require(ema is None or 0 < ema < 1, "agent.consistency.ema_decay", ema,
             "null or a number in (0, 1)")
    if cfg.agent.name == "cp3er":
        _check_stability(cfg.agent)
        _require(cfg.agent.stability.act_candidates == 1 or (
                     cfg.collector.workers == 1 and cfg.collector.backend == "local"),
                 "agent.stability.act_candidates", cfg.agent.stability.act_candidates,
                 "1 with collector.workers > 1 or backend=ray (the candidates are ranked by "
                 "the critic, which worker processes do not hold)")
    if cfg.agent.name == "drqv2":
        _require(cfg.agent.actor_trunk, "agent.actor_trunk", cfg.agent.actor_trunk,
                 "true for drqv2 (its actor always has the trunk)")


def _check_stability(agent: DictConfig) -> None:
    """``agent.stability`` (CP3ER's collapse remedies, ``agents.stability``)."""
    st = agent.stability
    _require(st.bound_penalty >= 0, "agent.stability.bound_penalty", st.bound_penalty,
             "a number >= 0 (0: off)")
    clip = st.actor_grad_clip
    _require(clip is None or clip > 0, "agent.stability.actor_grad_clip", clip,
             "null or a number > 0")
    _require(st.act_candidates >= 1, "agent.stability.act_candidates", st.act_candidates,
             "an integer >= 1 (1: the one-step sample itself)")
    _require(st.act_temperature > 0, "agent.stability.act_temperature", st.act_temperature,
             "a number > 0")
    _require(st.target_spread is None or st.target_bound_frac is None,
             "agent.stability.target_bound_frac", st.target_bound_frac,
             "null when agent.stability.target_spread is set (one adaptive target at a time)")
    if st.target_spread is None and st.target_bound_frac is None:
        return
    _require(st.target_spread is None or st.target_spread > 0, "agent.stability.target_spread",
             st.target_spread, "null (fixed lambda) or a number > 0")
    _require(st.target_bound_frac is None or 0 < st.target_bound_frac < 1,
             "agent.stability.target_bound_frac", st.target_bound_frac,
             "null (fixed lambda) or a number in (0, 1)")
    _require(st.lambda_lr > 0, "agent.stability.lambda_lr", st.lambda_lr, "a number > 0")
    _require(0 < st.lambda_min <= agent.lambda_consistency <= st.lambda_max,
             "agent.lambda_consistency", agent.lambda_consistency,
             f"in [agent.stability.lambda_min, lambda_max] = [{st.lambda_min}, "
             f"{st.lambda_max}] with an adaptive lambda (its starting value)")


def _check_collector_backend(collector: DictConfig) -> None:
    """``collector.backend=ray`` needs Ray installed; ``collector.ray_address`` is a Ray
    backend's setting (set with ``backend=local`` it would be ignored: refused)."""
    from cp3er.collection import RAY_INSTALL, ray_installed

    backend, address = str(collector.backend), collector.ray_address
    if backend == "ray" and not ray_installed():
        raise ConfigError(f"config collector.backend='ray' needs Ray, which is not installed: "
                          f"{RAY_INSTALL} (or collector.backend=local)")
    _require(address is None or backend == "ray", "collector.ray_address", address,
             "null with collector.backend=local (the address is the Ray backend's: set "
             "collector.backend=ray)")
    _require(address is None or address.strip() != "", "collector.ray_address", address,
             "null (start Ray here) or a Ray cluster's address (auto, ray://host:10001)")


def _unknown(kind: str, value: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(value, choices, n=3, cutoff=0.5)
    listed = ", ".join(choices) if len(choices) <= 8 else ", ".join(close)
    label = "valid choices" if len(choices) <= 8 else "closest"
    if not listed:
        return f"unknown {kind} {value!r} ({len(choices)} choices: see docs/usage.md)"
    return f"unknown {kind} {value!r}; {label}: {listed}"


def check_group_overrides(argv: Sequence[str], config_dir: str | Path) -> str | None:
    """A one-line message for the first config group value or ``--config-name`` that does
    not exist (Hydra prints a long dump), else ``None``."""
    config_dir = Path(config_dir)
    args = list(argv)
    for i, arg in enumerate(args):
        name = None
        if arg in ("--config-name", "-cn") and i + 1 < len(args):
            name = args[i + 1]
        elif arg.startswith("--config-name="):
            name = arg.split("=", 1)[1]
        if name is not None:
            choices = sorted(p.stem for p in config_dir.glob("*.yaml"))
            if Path(name).stem not in choices:
                return _unknown("config name", name, choices)
            continue
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.lstrip("+~").split("=", 1)
        if key.startswith("hydra/"):  # Hydra's own groups (plugins add choices): its check
            continue
        group = config_dir / key
        if not group.is_dir() or value in ("", "null"):
            continue
        if "(" in value:  # a sweep function (glob(...), choice(...)): Hydra expands it
            continue
        choices = sorted(p.stem for p in group.glob("*.yaml"))
        for name in value.split(","):  # a multirun sweep list: task=cartpole_balance,walker_walk
            if name not in choices:
                return _unknown(key, name, choices)
    return None


def check_override_values(argv: Sequence[str], config_dir: str | Path) -> str | None:
    """A one-line message when the command line does not compose (a wrong type, an unknown
    choice or key), else ``None``; multirun sweeps are left to Hydra."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import OmegaConfBaseException

    import cp3er.config_schema  # noqa: F401  (registers the schema nodes)

    args = list(argv)
    if "-m" in args or "--multirun" in args:
        return None
    config_name, overrides, skip_next = "config", [], False
    for i, arg in enumerate(args):
        if skip_next:
            skip_next = False
        elif arg in ("--config-name", "-cn"):
            config_name, skip_next = (args[i + 1] if i + 1 < len(args) else config_name), True
        elif arg.startswith("--config-name="):
            config_name = arg.split("=", 1)[1]
        elif arg in ("--config-path", "-cp", "--config-dir", "-cd"):
            skip_next = True
        elif not arg.startswith("-") and not arg.lstrip("+~").startswith("hydra."):
            overrides.append(arg)
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base=None):
            compose(config_name=Path(config_name).stem, overrides=overrides)
    except (ConfigCompositionException, OmegaConfBaseException) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        cause = error.__cause__
        if cause is not None and str(cause).strip():
            lines = [*lines[:1], str(cause).strip().splitlines()[0]]
        return ": ".join(line.rstrip(":.") for line in lines[:2])
    return None
