"""``cp3er-train``: the command line around :class:`~cp3er.train.Trainer` (Hydra, exit
codes, the start and end lines, the refusals Hydra would answer with a traceback)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from cp3er.checkpoint import CheckpointError, atomic_write, first_line, has_checkpoint
from cp3er.collection import RayClusterError, WorkerDiedError
from cp3er.config_check import (
    ConfigError,
    check_group_overrides,
    check_override_values,
)
from cp3er.config_schema import CONFIG_DIR
from cp3er.console import expected_duration, help_text, plural, reference_phrase, say
from cp3er.faults import NumericalError, pass_on
from cp3er.folder_lock import RunLockedError
from cp3er.logs import MetricsFileError, quiet_torchrl
from cp3er.run_state import ResumeError, prepare_run_dir
from cp3er.train import Trainer
from envs.registry import UnknownTaskError

# after a preemption checkpoint (SIGUSR2: a cluster's requeue handler, if any, exits first)
EXIT_CODES = {signal.SIGTERM: 0, signal.SIGINT: 130, signal.SIGUSR2: 0}
# The run folder is held by a live process (EX_TEMPFAIL): not the run's fault
# (benchmarks/suite.sh tells it apart from errors, exit code 1).
EXIT_LOCKED = 75


def _say(message: str) -> None:
    print(f"cp3er-train: {message}", file=sys.stderr, flush=True)


def _resume_command() -> str:
    """The command that continues this run: the same config name and overrides, with
    ``resume=true`` (run_dir included when it was given)."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    overrides = [o for o in hydra_cfg.overrides.task if not o.startswith("resume=")]
    config = hydra_cfg.job.config_name
    name = "" if config == "config" else f" --config-name {config}"
    return " ".join(["cp3er-train" + name, *overrides, "resume=true"])


def _record_hydra(run_dir: Path, cfg: DictConfig) -> None:
    """Hydra's record of the launch in ``<run_dir>/.hydra``, written once the run folder
    is this launch's (:class:`Trainer` built): :func:`cli` turns Hydra's own early writes
    off, so a refused or invalid launch leaves a run's ``.hydra`` as it was. A single run
    gets ``config.yaml``, ``hydra.yaml`` and ``overrides.yaml``; a multirun job (Hydra's
    folder is the sweep's, ``hydra.sweep.dir/<job>``) gets ``overrides.yaml``, which
    ``benchmarks/collect.py`` reads."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    single = Path(hydra_cfg.runtime.output_dir).resolve() == run_dir.resolve()
    if single and hydra_cfg.output_subdir is not None:
        return  # Hydra wrote them there (main called without cli)
    files = {"overrides.yaml": OmegaConf.to_yaml(list(hydra_cfg.overrides.task))}
    if single:
        files["config.yaml"] = OmegaConf.to_yaml(cfg)
        files["hydra.yaml"] = OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg}))
    for name, text in files.items():
        atomic_write(run_dir / ".hydra" / name, lambda handle, t=text: handle.write(t.encode()))


def _start_line(trainer: Trainer) -> str:
    cfg = trainer.cfg
    label = f" ({cfg.label})" if cfg.label not in (None, cfg.agent.name) else ""
    start = "" if trainer.resumed_from is None else f", from frame {trainer.resumed_from}"
    return (f"{cfg.agent.name}{label} on {cfg.task_name} ({cfg.obs}), seed {cfg.seed}, "
            f"{cfg.frames:,} frames{start}; {cfg.device}, {plural(trainer.threads, 'thread')} "
            f"({trainer.threads_how}); run folder {trainer.run_dir}")


def _end_line(trainer: Trainer) -> str:
    run_dir = trainer.run_dir
    evals = [r for r in trainer.metrics.rows() if r.get("phase") == "eval"]
    final = ""
    if evals:
        final_return = float(evals[-1]["episode_return"])
        episodes = plural(trainer.cfg.schedule.eval_episodes, "episode")
        final = f"final evaluation {final_return:.1f} ({episodes}) at frame {trainer.frame:,}; "
        if trainer.random_reference is not None:
            final += reference_phrase(final_return, trainer.random_reference) + "; "
        elif trainer.random_note is not None:
            final += f"uniform random actions {trainer.random_note}; "
    videos = ("" if not any((run_dir / "eval").glob("*.gif"))
              else f", videos {run_dir / 'eval'}")
    cfg = trainer.cfg
    per_frame = trainer.updates_per_frame()
    ratio = (f"{trainer.loop.updates:,} updates, {per_frame:.4f} per frame after the seed "
             f"frames (schedule: {1 / (cfg.schedule.update_every_steps * trainer.repeat):.4f}); "
             if per_frame is not None else "")
    return (f"done: {final}{ratio}curve {run_dir / 'learning_curve.png'}, metrics "
            f"{run_dir / 'metrics.csv'}{videos}, checkpoint {run_dir / 'checkpoints'}")


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    quiet_torchrl()
    try:
        trainer = Trainer(cfg)
    except RunLockedError as error:
        _say(str(error))
        raise SystemExit(EXIT_LOCKED) from None
    except (ConfigError, UnknownTaskError, ResumeError, CheckpointError,
            MetricsFileError) as error:
        raise SystemExit(f"cp3er-train: {error}") from None
    # from here the run folder is this launch's: say() also keeps the lines in train.log
    if trainer.resumed_from is not None:
        say(f"resumed {trainer.run_dir} from frame {trainer.resumed_from}")
    for change in trainer.resume_changes:
        say(f"resume takes {change} from the command line")
    if trainer.metrics.set_aside is not None:
        say(f"{trainer.run_dir} held metrics of a run that never checkpointed; moved to "
            f"{trainer.metrics.set_aside.name}")
    say(_start_line(trainer))
    estimate = expected_duration(trainer.cfg, trainer.frame)
    if estimate is not None:
        say(estimate)
        trainer.speed.announced = True
    _record_hydra(trainer.run_dir, cfg)
    try:
        result = trainer.train()
    except WorkerDiedError as error:
        if not has_checkpoint(trainer.run_dir):
            raise SystemExit(f"cp3er-train: run stopped: {error}; nothing was collected, "
                             "no checkpoint was written") from None
        raise SystemExit(f"cp3er-train: run stopped: {error}; checkpoint at frame "
                         f"{trainer.frame:,}; continue with: {_resume_command()}") from None
    except (NumericalError, CheckpointError, OSError, RayClusterError) as error:
        kept = (f"the last good checkpoint is left untouched in {trainer.run_dir / 'checkpoints'}"
                if has_checkpoint(trainer.run_dir) else "no checkpoint was written")
        raise SystemExit(f"cp3er-train: run stopped: {first_line(error)}; {kept}") from None
    if result != "done":
        say(f"{result.name} received: checkpoint written at frame {trainer.frame:,}; "
            f"continue with: {_resume_command()}")
        pass_on(result)  # submitit (SIGUSR2): requeue the job, which resumes from here
        raise SystemExit(EXIT_CODES[result])
    say(_end_line(trainer))


def cli() -> None:
    """``cp3er-train``: :func:`main`, after the checks Hydra would answer with a traceback or
    a long dump: a config group value that does not exist (``task=cheetah_rn``: one line
    naming the closest choices), a value the schema refuses (``obs=rgb``, ``lr=fast``) and
    a ``run_dir=`` that cannot hold a run (Hydra writes ``<run_dir>/.hydra`` first).
    ``--help``/``-h``: this project's help (:func:`~cp3er.console.help_text`), not Hydra's
    template (``--hydra-help`` is Hydra's)."""
    if {"--help", "-h"} & set(sys.argv[1:]):
        print(help_text(CONFIG_DIR), end="")
        raise SystemExit(0)
    message = (check_group_overrides(sys.argv[1:], CONFIG_DIR)
               or check_override_values(sys.argv[1:], CONFIG_DIR)
               or _check_added_keys(sys.argv[1:]))
    if message is not None:
        raise SystemExit(f"cp3er-train: {message}")
    for arg in reversed(sys.argv[1:]):
        key, _, value = arg.lstrip("+").partition("=")
        if key == "run_dir":
            if value and "${" not in value and value[0] not in "'\"":
                try:
                    prepare_run_dir(Path(value))
                except ResumeError as error:
                    raise SystemExit(f"cp3er-train: {error}") from None
            break
    if not {"-m", "--multirun"} & set(sys.argv[1:]):
        sys.argv += _quiet_hydra(sys.argv[1:])
    main()


def _check_added_keys(args: list[str]) -> str | None:
    """``+key=value`` adds a key the run config does not have (``+foo=1``, a typo such as
    ``+agent.lr_actor=...``): nothing reads it, so the run would ignore it without a word.
    Refused, unless it selects a config group (``+profile=cpu_pixels``) or is Hydra's."""
    groups = {p.name for p in Path(CONFIG_DIR).iterdir() if p.is_dir()}
    for arg in args:
        if not arg.startswith("+") or arg.startswith("++") or "=" not in arg:
            continue
        key = arg.lstrip("+").partition("=")[0]
        if key in groups or key.startswith(("hydra.", "hydra/")) or "/" in key:
            continue
        return (f"{arg}: the run config has no key {key!r} (a '+' adds one nothing reads); "
                "drop the '+' to set an existing key, or fix its name")
    return None


def _quiet_hydra(args: list[str]) -> list[str]:
    """Hydra overrides that keep a single run's Hydra from writing into ``run_dir`` before
    :func:`main` decides whether the launch goes ahead: no ``.hydra/`` copy (main writes it,
    :func:`_record_hydra`) and a log file opened only when something is logged."""
    keys = {arg.lstrip("+").partition("=")[0] for arg in args}
    extra = [] if "hydra.output_subdir" in keys else ["hydra.output_subdir=null"]
    if not any(key.startswith(("hydra/job_logging", "hydra.job_logging")) for key in keys):
        extra.append("++hydra.job_logging.handlers.file.delay=true")
    return extra


if __name__ == "__main__":
    cli()
