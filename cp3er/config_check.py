"""Validate a run's config before anything heavy starts: one clear error per problem,
naming the key, the value and the valid choices."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from numbers import Integral, Real
from pathlib import Path

import torch
from omegaconf import DictConfig

from cp3er.replay import SAMPLER_MODES, STORAGES
from cp3er.runlog import LOGGER_BACKENDS
from cp3er.threads import parse_threads

DEVICES = ("cpu", "cuda")


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
    """Raise :class:`ConfigError` (or ``UnknownTaskError``) for the first invalid value."""
    from agents.build import (
        AGENTS,
        COMPILE_MODES,
        CONSISTENCY_LOSSES,
        DIFFICULTIES,
        perf_setting,
    )
    from cp3er.consistency import ODE_SOLVERS
    from envs import OBS_TYPES, TASKS
    from envs.registry import lookup

    lookup(cfg.task_name, TASKS)  # unknown task -> closest names
    _require(cfg.agent.name in AGENTS, "agent", cfg.agent.name, f"one of {AGENTS}")
    _require(cfg.get("difficulty", "easy") in DIFFICULTIES, "difficulty", cfg.get("difficulty"),
             f"one of {DIFFICULTIES}")
    _require(cfg.obs in OBS_TYPES, "obs", cfg.obs, f"one of {OBS_TYPES}")
    _require(cfg.device in DEVICES, "device", cfg.device, f"one of {DEVICES}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config device='cuda' is invalid: no CUDA device is available "
                          "on this machine (use device=cpu)")
    for key in ("frames", "batch_size", "n_step", "hidden_dim", "feature_dim",
                "replay.capacity", "schedule.update_every_steps", "schedule.eval_episodes",
                "env.action_repeat", "env.frame_stack", "env.image_size"):
        _positive_int(cfg, key)
    for key in ("seed", "checkpoint_every", "schedule.seed_frames",
                "schedule.explore_frames", "schedule.eval_every_frames"):
        _positive_int(cfg, key, minimum=0)
    _require(cfg.batch_size <= cfg.replay.capacity, "batch_size", cfg.batch_size,
             f"at most replay.capacity={cfg.replay.capacity}")
    _require(isinstance(cfg.lr, Real) and cfg.lr > 0, "lr", cfg.lr, "a number > 0")
    _require(isinstance(cfg.gamma, Real) and 0 < cfg.gamma <= 1, "gamma", cfg.gamma,
             "a number in (0, 1]")
    clip = cfg.get("optim", {}).get("grad_clip")
    _require(clip is None or (isinstance(clip, Real) and not isinstance(clip, bool) and clip > 0),
             "optim.grad_clip", clip, "null or a number > 0")
    _require(isinstance(cfg.resume, bool), "resume", cfg.resume, "true or false")
    try:
        parse_threads(cfg.get("threads"))
    except ValueError as error:
        raise ConfigError(f"config {error}") from None
    trust = cfg.get("trust_checkpoint", False)
    _require(isinstance(trust, bool), "trust_checkpoint", trust, "true or false")
    label = cfg.get("label")
    _require(label is None or (isinstance(label, str) and label.strip() != ""), "label", label,
             "null or a non-empty name")
    _require(cfg.replay.sampler in SAMPLER_MODES, "replay.sampler", cfg.replay.sampler,
             f"one of {SAMPLER_MODES}")
    _require(cfg.replay.storage in STORAGES, "replay.storage", cfg.replay.storage,
             f"one of {STORAGES}")
    _require(isinstance(cfg.replay.alpha, Real) and cfg.replay.alpha > 0, "replay.alpha",
             cfg.replay.alpha, "a number > 0")
    _require(cfg.log.backend in LOGGER_BACKENDS, "log.backend", cfg.log.backend,
             f"one of {LOGGER_BACKENDS}")
    compile_mode = perf_setting(cfg, "compile_mode", "default")
    _require(compile_mode in COMPILE_MODES, "perf.compile_mode", compile_mode,
             f"one of {COMPILE_MODES}")
    consistency = cfg.agent.get("consistency", {})
    if cfg.agent.name == "cp3er":
        loss = consistency.get("loss", "training")
        _require(loss in CONSISTENCY_LOSSES, "agent.consistency.loss", loss,
                 f"one of {CONSISTENCY_LOSSES}")
        solver = consistency.get("solver", "euler")
        _require(solver in ODE_SOLVERS, "agent.consistency.solver", solver,
                 f"one of {ODE_SOLVERS}")


def _unknown(kind: str, value: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(value, choices, n=3, cutoff=0.5)
    listed = ", ".join(choices) if len(choices) <= 8 else ", ".join(close)
    label = "valid choices" if len(choices) <= 8 else "closest"
    if not listed:
        return f"unknown {kind} {value!r} ({len(choices)} choices: see the README)"
    return f"unknown {kind} {value!r}; {label}: {listed}"


def check_group_overrides(argv: Sequence[str], config_dir: str | Path) -> str | None:
    """A one-line message for the first command-line argument naming a config that does
    not exist: a ``group=value`` / ``+group=value`` override of a config group (a folder of
    ``config_dir``: task, agent, profile, ...) or ``--config-name`` / ``-cn``; ``None`` when
    all exist. Hydra reports these as a long missing-config dump."""
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
        group = config_dir / key
        if not group.is_dir() or value in ("", "null"):
            continue
        choices = sorted(p.stem for p in group.glob("*.yaml"))
        if value not in choices:
            return _unknown(key, value, choices)
    return None
