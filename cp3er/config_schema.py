"""The typed run config: Hydra structured configs in Hydra's ``ConfigStore``.

``configs/`` holds the values; these dataclasses hold the types and the choices (the tuples
of :mod:`cp3er.choices` as ``str`` enums), so Hydra refuses a wrong type or an unknown
choice while composing. Ranges and cross-key checks: :mod:`cp3er.config_check`. Importing
this module registers ``run_schema`` and the ``agent`` group's ``cp3er_schema`` /
``drqv2_schema`` (each config file's first default): do it before composing with Hydra's
compose API (docs/usage.md, "Configuration").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from cp3er.choices import (
    AGENTS,
    CLIP_MODES,
    COLLECTOR_BACKENDS,
    COMPILE_MODES,
    CONSISTENCY_LOSSES,
    COUPLINGS,
    DETERMINISTIC_MODES,
    DEVICES,
    DIFFICULTIES,
    LOGGER_BACKENDS,
    OBS_TYPES,
    ODE_SOLVERS,
    PRECISIONS,
    SAMPLER_MODES,
    STORAGE_DEVICES,
    STORAGES,
)

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


class Choice(str, Enum):
    """A ``str`` enum that prints as its value (Python 3.11's ``enum.StrEnum``, on 3.10)."""

    __str__ = str.__str__
    __format__ = str.__format__


def choices(name: str, values: tuple[str, ...]) -> type[Choice]:
    """A :class:`Choice` enum whose members are ``values`` (member name = value)."""
    return Choice(name, {value: value for value in values})


Obs = choices("Obs", OBS_TYPES)
Device = choices("Device", DEVICES)
Difficulty = choices("Difficulty", DIFFICULTIES)
SamplerMode = choices("SamplerMode", SAMPLER_MODES)
Storage = choices("Storage", STORAGES)
StorageDevice = choices("StorageDevice", STORAGE_DEVICES)
LoggerBackend = choices("LoggerBackend", LOGGER_BACKENDS)
CompileMode = choices("CompileMode", COMPILE_MODES)
Precision = choices("Precision", PRECISIONS)
ConsistencyLoss = choices("ConsistencyLoss", CONSISTENCY_LOSSES)
OdeSolver = choices("OdeSolver", ODE_SOLVERS)
Coupling = choices("Coupling", COUPLINGS)
ClipMode = choices("ClipMode", CLIP_MODES)
CollectorBackend = choices("CollectorBackend", COLLECTOR_BACKENDS)
EvalNoise = choices("EvalNoise", DETERMINISTIC_MODES)


@dataclass
class EnvConfig:
    action_repeat: int = MISSING
    frame_stack: int = MISSING
    image_size: int = MISSING
    camera: Any = MISSING  # null (task default), a camera id or a camera name


@dataclass
class OptimConfig:
    grad_clip: float | None = MISSING


@dataclass
class ReplayConfig:
    capacity: int = MISSING
    sampler: SamplerMode = MISSING
    alpha: float = MISSING
    storage: Storage = MISSING
    device: StorageDevice = MISSING  # cuda: with device=cuda, storage=memory (config_check)


@dataclass
class ScheduleConfig:
    seed_frames: int = MISSING
    explore_frames: int = MISSING
    update_every_steps: int = MISSING
    eval_every_frames: int = MISSING
    eval_episodes: int = MISSING


@dataclass
class CollectorConfig:
    workers: int = MISSING
    sync: bool = MISSING
    sync_every: int = MISSING
    backend: CollectorBackend = MISSING  # ray: needs the ray extra (cp3er.config_check)
    ray_address: str | None = MISSING  # null: a Ray started here; else a cluster's address


@dataclass
class LogConfig:
    backend: LoggerBackend = MISSING
    video: bool = MISSING
    progress: bool = MISSING
    metrics_every_updates: int = MISSING


@dataclass
class PerfConfig:
    channels_last: bool = MISSING
    fused_adam: bool = MISSING
    share_condition: bool = MISSING
    tune_allocator: bool = MISSING
    compile: bool = MISSING
    compile_mode: CompileMode = MISSING
    precision: Precision = MISSING
    cuda_graph: bool = MISSING


@dataclass
class RunConfig:
    """``configs/config.yaml``: everything but the agent's own hyper-parameters."""

    task_name: str = MISSING  # a key of envs.TASKS (checked with the closest names)
    obs: Obs = MISSING
    seed: int = MISSING
    device: Device = MISSING
    frames: int = MISSING
    difficulty: Difficulty = MISSING
    run_dir: str = MISSING
    label: str | None = MISSING
    checkpoint_every: int = MISSING
    resume: Any = MISSING  # true | false | auto (cp3er.config_check)
    env: EnvConfig = field(default_factory=EnvConfig)
    lr: float = MISSING
    batch_size: int = MISSING
    n_step: int = MISSING
    gamma: float = MISSING
    feature_dim: int = MISSING
    hidden_dim: int = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    collector: CollectorConfig = field(default_factory=CollectorConfig)
    log: LogConfig = field(default_factory=LogConfig)
    threads: Any = MISSING  # auto | an integer >= 1 | null (cp3er.threads.parse_threads)
    perf: PerfConfig = field(default_factory=PerfConfig)
    agent: Any = MISSING  # the agent group's node (its own schema)


@dataclass
class ConsistencyConfig:
    loss: ConsistencyLoss = MISSING
    solver: OdeSolver = MISSING
    sigma_min: float = MISSING
    sigma_max: float = MISSING
    rho: float = MISSING
    num_steps: int = MISSING
    sigma_data: float = MISSING
    coupling: Coupling = MISSING
    mu: float = MISSING
    clip_outputs: bool = MISSING
    ema_decay: float | None = MISSING


@dataclass
class StabilityConfig:
    """``agent.stability`` of ``configs/agent/cp3er.yaml`` (``agents.stability``)."""

    normalize_q: bool = MISSING
    bound_penalty: float = MISSING
    actor_grad_clip: float | None = MISSING
    target_spread: float | None = MISSING
    target_bound_frac: float | None = MISSING
    lambda_lr: float = MISSING
    lambda_min: float = MISSING
    lambda_max: float = MISSING
    act_candidates: int = MISSING
    act_temperature: float = MISSING


@dataclass
class CP3ERAgentConfig:
    """``configs/agent/cp3er.yaml``."""

    name: str = MISSING
    lambda_consistency: float = MISSING
    critic_tau: float = MISSING
    num_components: int = MISSING
    init_scale: float = MISSING
    target_samples: int = MISSING
    actor_trunk: bool = MISSING
    clip: ClipMode = MISSING
    eval_noise: EvalNoise = MISSING
    consistency: ConsistencyConfig = field(default_factory=ConsistencyConfig)
    stability: StabilityConfig = field(default_factory=StabilityConfig)


@dataclass
class DrQV2AgentConfig:
    """``configs/agent/drqv2.yaml``."""

    name: str = MISSING
    critic_tau: float = MISSING
    stddev_init: float = MISSING
    stddev_final: float = MISSING
    stddev_steps: int | None = MISSING
    stddev_clip: float = MISSING
    # DrQ-v2's actor always has the trunk; the key lets a profile that sets it for CP3ER
    # compose with either agent (config_check refuses false).
    actor_trunk: bool = MISSING


AGENT_SCHEMAS = {"cp3er": CP3ERAgentConfig, "drqv2": DrQV2AgentConfig}
assert set(AGENT_SCHEMAS) == set(AGENTS), "every agent needs a schema"


def register_configs() -> None:
    """Store the schema nodes in Hydra's ``ConfigStore`` (idempotent)."""
    store = ConfigStore.instance()
    store.store(name="run_schema", node=RunConfig)
    for name, schema in AGENT_SCHEMAS.items():
        store.store(group="agent", name=f"{name}_schema", node=schema)


def complete_run_config(saved: DictConfig | dict) -> DictConfig:
    """A saved run config on today's defaults for its agent and task: its own values on top,
    keys the schema no longer has dropped (``ValidationError`` for a refused value)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    plain = saved if isinstance(saved, dict) else OmegaConf.to_container(saved, resolve=True)
    overrides = [f"agent={plain['agent']['name']}", f"task={plain['task_name']}"]
    if GlobalHydra.instance().is_initialized():  # inside a Hydra app: its config dir
        base = compose(config_name="config", overrides=overrides)
    else:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
            base = compose(config_name="config", overrides=overrides)
    return OmegaConf.merge(base, known_entries(plain, OmegaConf.to_container(base)))


def known_entries(values: dict, base: dict) -> dict:
    """The entries of ``values`` whose keys ``base`` has (recursively): a saved config
    without the keys removed since it was written."""
    return {k: known_entries(v, base[k]) if isinstance(v, dict) and isinstance(base[k], dict)
            else v for k, v in values.items() if k in base}


register_configs()
