"""``cp3er-train``: env -> TorchRL collector -> replay -> updates -> logs and checkpoints.

DrQ-v2's schedule (Yarats et al. 2021; the CP3ER reference keeps it): uniform random
actions for the first ``schedule.explore_frames`` frames, no updates before
``schedule.seed_frames``, one update every ``schedule.update_every_steps`` agent steps,
evaluation every
``schedule.eval_every_frames`` frames on a separate environment whose transitions never
enter the replay buffer. "Frames" are environment frames (agent steps x action repeat).

Checkpoints, resume and faults (README "Checkpoints, resume and faults"): every
``checkpoint_every`` frames (and at the end) the agent, the replay buffer, the RNG
states, counters and loop state are written to ``<run_dir>/checkpoints``;
``resume=true`` continues from there. The training environment itself is not saved: a
resumed run starts its collector on a fresh reset, the interrupted episode is cut (the
replay buffer treats the cut like a truncation: no n-step target crosses it) and gets no
metrics row. SIGTERM/SIGINT checkpoint at the next batch boundary and exit (code 0 for
SIGTERM, 130 for SIGINT). A non-finite loss or parameter stops the run before anything
more is written, so the last checkpoint stays the last good one.
"""

from __future__ import annotations

import math
import random
import shutil
import signal
import sys
import time
from collections import defaultdict
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torchrl.collectors import Collector
from tqdm import tqdm

from agents.build import Agent, build_agent, perf_option
from cp3er.checkpoint import (
    CheckpointError,
    has_checkpoint,
    load_run_checkpoint,
    save_run_checkpoint,
)
from cp3er.config_check import ConfigError, validate_config
from cp3er.evaluate import run_episodes, summarize, write_video
from cp3er.faults import NumericalError, Preemption, check_finite_losses, check_finite_parameters
from cp3er.perf import tune_allocator
from cp3er.plot import plot_learning_curve
from cp3er.runlog import MetricsWriter, make_logger
from cp3er.session import EVAL_SEED_OFFSET, make_buffer, make_eval_env, make_train_env
from envs import physics_errors
from envs.registry import UnknownTaskError

UPDATE_METRICS = ("loss_critic", "loss_actor", "q_mean", "target_mean", "critic_std",
                  "actor_q", "consistency_loss", "action_spread", "action_bound_frac",
                  "stddev", "loss_teacher")
LOSSES = ("loss_critic", "loss_actor", "loss_teacher")
# Config entries a resumed run must share with the run it continues (they fix the task,
# the observation and the shapes of every saved tensor).
RESUME_KEYS = ("task_name", "obs", "agent", "env", "hidden_dim", "feature_dim", "n_step",
               "replay.capacity")
# Entries a resumed run takes from its command line, not from the run (machine-specific).
MACHINE_KEYS = ("run_dir", "device", "threads", "log.progress")
EXIT_CODES = {signal.SIGTERM: 0, signal.SIGINT: 130}  # after a preemption checkpoint


class ResumeError(ValueError):
    """A run folder that cannot be (re)started as asked; the message says what to do."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (seeds libraries that use the legacy global RNG)
    torch.manual_seed(seed)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),  # noqa: NPY002
            "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    random.setstate(state["python"])


def resolve_run_config(cfg: DictConfig) -> tuple[DictConfig, dict | None, Path | None]:
    """The config a run uses, and the checkpoint it resumes from (if ``cfg.resume``).

    ``resume=true``: the run folder's saved ``config.yaml`` (with ``resume: true`` and the
    command line's :data:`MACHINE_KEYS`); the command line must agree with it on
    :data:`RESUME_KEYS`. ``resume=false``: refuses a
    run folder that already holds a checkpoint (never overwrites a run silently).
    """
    run_dir = Path(cfg.run_dir)
    if not cfg.resume:
        if has_checkpoint(run_dir):
            raise ResumeError(
                f"run_dir={run_dir} already holds a run with checkpoints; pass resume=true to "
                "continue it, or another run_dir to start a new run"
            )
        return cfg, None, None
    if not has_checkpoint(run_dir):
        raise ResumeError(f"resume=true but run_dir={run_dir} has no checkpoint "
                          "(checkpoints/latest.pt) to resume from")
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise ResumeError(f"resume=true but {saved_path} is missing")
    saved = OmegaConf.load(saved_path)
    given = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))

    def value(config: DictConfig, key: str):
        found = OmegaConf.select(config, key)
        return OmegaConf.to_container(found) if isinstance(found, DictConfig) else found

    differ = [key for key in RESUME_KEYS if value(saved, key) != value(given, key)]
    if differ:
        detail = "; ".join(f"{k}: run has {value(saved, k)!r}, command line "
                           f"{value(given, k)!r}" for k in differ)
        raise ResumeError(f"cannot resume {run_dir}: the command line differs from the run's "
                          f"config.yaml ({detail}); resume with the run's settings or start "
                          "a new run_dir")
    state, replay = load_run_checkpoint(run_dir)
    for key in MACHINE_KEYS:
        OmegaConf.update(saved, key, OmegaConf.select(given, key), merge=False)
    saved.resume = True
    return saved, state, replay


class Trainer:
    """One training run in ``cfg.run_dir`` (see module docstring for the schedule)."""

    def __init__(self, cfg: DictConfig) -> None:
        validate_config(cfg)
        cfg, resume_state, replay_dir = resolve_run_config(cfg)
        validate_config(cfg)
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(cfg.device)
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        if perf_option(cfg, "tune_allocator"):
            tune_allocator()
        seed_everything(cfg.seed)
        self.repeat = cfg.env.action_repeat
        self.env = make_train_env(cfg)
        self.eval_env = make_eval_env(cfg)
        self.agent: Agent = build_agent(cfg, self.env, self.device)
        if cfg.replay.storage == "memmap":
            # the memmap storage is scratch space (checkpoints hold their own copy): files
            # left by a killed or finished process would block the new storage
            shutil.rmtree(self.run_dir / "replay", ignore_errors=True)
        self.buffer = make_buffer(cfg, self.run_dir)
        self.metrics = MetricsWriter(self.run_dir / "metrics.csv", fresh=resume_state is None)
        self.logger = make_logger(cfg.log.backend, self.run_dir, cfg.task_name)
        if resume_state is None:
            OmegaConf.save(cfg, self.run_dir / "config.yaml", resolve=True)
        self.step = 0  # agent steps taken in the training env
        self.updates = 0
        self.episode = 0
        self.start_time = time.perf_counter()
        self._pending = defaultdict(list)  # update metrics since the last train row
        self._episode_success = False
        self.last_eval_frame = -1
        eval_every, ckpt_every = cfg.schedule.eval_every_frames, cfg.checkpoint_every
        self.next_eval = eval_every if eval_every > 0 else None
        self.next_ckpt = ckpt_every if ckpt_every > 0 else None
        self.physics_errors_before = 0  # physics errors of the run before this process
        self.last_return = float("nan")
        self.resumed_from: int | None = None  # frame of the checkpoint resumed from
        if resume_state is not None:
            self._restore(resume_state, replay_dir)

    # -- schedule ------------------------------------------------------------------------
    def _steps(self, frames: int) -> int:
        return math.ceil(frames / self.repeat)

    @property
    def frame(self) -> int:
        return self.step * self.repeat

    # -- pieces --------------------------------------------------------------------------
    def make_collector(self) -> Collector:
        """A collector for the agent steps still to take (all of them unless resumed)."""
        cfg = self.cfg
        return Collector(
            self.env,
            self.agent.collect_policy,
            frames_per_batch=cfg.schedule.update_every_steps,
            total_frames=self._steps(cfg.frames) - self.step,
            init_random_frames=max(0, self._steps(cfg.schedule.explore_frames) - self.step),
            device=self.device,
            storing_device="cpu",
        )

    @property
    def physics_errors(self) -> int:
        """Training-env steps whose physics failed (episode truncated), whole run."""
        return self.physics_errors_before + physics_errors(self.env)

    def _log_scalars(self, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.logger.log_scalar(name, value, step=self.frame)

    def _finish_episodes(self, batch) -> None:
        done = batch["next", "done"].reshape(-1)
        success = batch.get(("next", "success"), None)
        for t in range(done.shape[0]):
            if success is not None:
                self._episode_success |= bool(success.reshape(-1)[t])
            if not done[t]:
                continue
            self.episode += 1
            elapsed = time.perf_counter() - self.start_time
            row = {
                "frame": (self.step - done.shape[0] + t + 1) * self.repeat,
                "step": self.step - done.shape[0] + t + 1,
                "phase": "train",
                "episode": self.episode,
                "episode_return": float(batch["next", "episode_reward"].reshape(-1)[t]),
                "episode_length": int(batch["next", "step_count"].reshape(-1)[t]),
                "seconds": elapsed,
                "fps": self.frame / max(elapsed, 1e-9),
                "physics_errors": self.physics_errors,
            }
            if success is not None:
                row["success"] = self._episode_success
            for name, values in self._pending.items():
                row[name] = float(np.mean(values))
            self._pending.clear()
            self._episode_success = False
            self.metrics.write(row)
            self._log_scalars({f"train/{k}": v for k, v in row.items()
                               if isinstance(v, (int, float)) and k != "frame"})
            self.last_return = row["episode_return"]

    def update(self) -> dict[str, float]:
        """One agent update; stops the run (:class:`NumericalError`) on a NaN/inf loss or
        parameter, before anything else is written."""
        batch = self.buffer.sample().to(self.device)
        metrics = self.agent.update(batch)
        self.updates += 1
        check_finite_losses(metrics, LOSSES, update=self.updates, frame=self.frame)
        check_finite_parameters(self.agent.loss, update=self.updates, frame=self.frame)
        for name in UPDATE_METRICS:
            if name in metrics:
                self._pending[name].append(metrics[name])
        return metrics

    def evaluate(self) -> dict:
        cfg = self.cfg
        record = bool(cfg.log.video) and cfg.obs == "pixels"
        self.agent.loss.eval()
        results = run_episodes(self.eval_env, self.agent.policy, cfg.schedule.eval_episodes,
                               record_video=record)
        self.agent.loss.train()
        summary = summarize(cfg.task_name, results, seed=cfg.seed)
        self.last_eval_frame = self.frame
        elapsed = time.perf_counter() - self.start_time
        row = {"frame": self.frame, "step": self.step, "phase": "eval",
               "episode_return": summary["return_mean"],
               "episode_length": summary["episode_length_mean"], "seconds": elapsed,
               "fps": self.frame / max(elapsed, 1e-9)}
        if "success_rate" in summary:
            row["success"] = summary["success_rate"]
        self.metrics.write(row)
        self._log_scalars({"eval/episode_return": summary["return_mean"],
                           "eval/return_iqm": summary["return_iqm"]})
        if record and results.frames:
            write_video(results.frames, self.run_dir / "eval" / f"frame_{self.frame:09d}.gif")
        return summary

    def save_checkpoint(self) -> None:
        """Agent, replay buffer, RNG states, counters and loop state (see
        :func:`~cp3er.checkpoint.save_run_checkpoint` for the write order)."""
        check_finite_parameters(self.agent.loss, update=self.updates, frame=self.frame)
        config = OmegaConf.to_container(self.cfg, resolve=True)
        config["resume"] = False
        state = {
            "agent": self.agent.state_dict(),
            "config": config,
            "counters": {
                "step": self.step, "updates": self.updates, "episode": self.episode,
                "next_eval": self.next_eval, "next_ckpt": self.next_ckpt,
                "last_eval_frame": self.last_eval_frame,
                "physics_errors": self.physics_errors,
                "seconds": time.perf_counter() - self.start_time,
            },
            "pending_metrics": {k: list(v) for k, v in self._pending.items()},
            "rng": rng_state(),
        }
        save_run_checkpoint(state, self.run_dir, self.buffer, self.frame)

    def _restore(self, state: dict, replay_dir: Path) -> None:
        """Continue from a checkpoint: everything :meth:`save_checkpoint` wrote, the
        metrics rows after it dropped, the interrupted episode cut."""
        try:
            self.agent.load_state_dict(state["agent"])
        except (RuntimeError, KeyError, ValueError) as error:
            raise CheckpointError(f"the checkpoint does not match this run's agent: "
                                  f"{str(error).splitlines()[0]}") from error
        try:
            self.buffer.loads(replay_dir)
        except Exception as error:  # torchrl/tensordict raise several types for bad folders
            raise CheckpointError(f"replay buffer checkpoint {replay_dir} is unreadable: "
                                  f"{error}") from error
        self.buffer.cut_episode()
        counters = state["counters"]
        self.step, self.updates = counters["step"], counters["updates"]
        self.episode = counters["episode"]
        self.next_eval, self.next_ckpt = counters["next_eval"], counters["next_ckpt"]
        self.last_eval_frame = counters["last_eval_frame"]
        self.physics_errors_before = counters["physics_errors"]
        self.start_time = time.perf_counter() - counters["seconds"]
        self._pending = defaultdict(list, state["pending_metrics"])
        self.metrics.truncate_after(self.frame)
        self.resumed_from = self.frame
        # New initial states after resume (not a replay of the run's first episodes),
        # deterministic given the checkpoint.
        self.env.set_seed(self.cfg.seed + self.step)
        self.eval_env.set_seed(self.cfg.seed + EVAL_SEED_OFFSET + self.step)
        set_rng_state(state["rng"])

    # -- loop ----------------------------------------------------------------------------
    def train(self) -> str | signal.Signals:
        """Run to ``cfg.frames``; returns ``"done"``, or the signal that preempted the run
        (after its checkpoint is written)."""
        with Preemption() as preemption:  # a signal after the last batch just finishes
            if self.step < self._steps(self.cfg.frames):
                self._collect(preemption)
            if preemption.received is not None:
                self.save_checkpoint()
                self.env.close()
                self.eval_env.close()
                return preemption.received
            if self.last_eval_frame != self.frame:
                self.evaluate()
            self.save_checkpoint()
        plot_learning_curve(self.run_dir)
        self.env.close()
        self.eval_env.close()
        return "done"

    def _collect(self, preemption: Preemption) -> None:
        cfg = self.cfg
        seed_steps = self._steps(cfg.schedule.seed_frames)
        collector = self.make_collector()
        progress = tqdm(total=cfg.frames, initial=self.frame, unit="frame",
                        disable=not cfg.log.progress, dynamic_ncols=True)
        try:
            for batch in collector:
                batch = batch.reshape(-1)
                self.buffer.extend(batch)
                self.step += batch.shape[0]
                self.agent.advance(batch.shape[0])
                progress.update(batch.shape[0] * self.repeat)
                self._finish_episodes(batch)
                if self.step >= seed_steps:
                    self.update()
                if self.next_eval is not None and self.frame >= self.next_eval:
                    self.evaluate()
                    self.next_eval += cfg.schedule.eval_every_frames
                if self.next_ckpt is not None and self.frame >= self.next_ckpt:
                    self.next_ckpt += cfg.checkpoint_every
                    self.save_checkpoint()
                if preemption.received is not None:  # a safe point: between batches
                    break
                elapsed = time.perf_counter() - self.start_time
                progress.set_postfix(fps=f"{self.frame / max(elapsed, 1e-9):.0f}",
                                     ret=f"{self.last_return:.1f}", refresh=False)
        finally:
            collector.shutdown()
            progress.close()


CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        trainer = Trainer(cfg)
    except (ConfigError, UnknownTaskError, ResumeError, CheckpointError) as error:
        raise SystemExit(f"cp3er-train: {error}") from None
    if trainer.resumed_from is not None:
        print(f"cp3er-train: resumed {trainer.run_dir} from frame {trainer.resumed_from}",
              file=sys.stderr, flush=True)
    if trainer.metrics.set_aside is not None:
        print(f"cp3er-train: {trainer.run_dir} held metrics of a run that never checkpointed;"
              f" moved to {trainer.metrics.set_aside.name}", file=sys.stderr, flush=True)
    try:
        result = trainer.train()
    except NumericalError as error:
        raise SystemExit(f"cp3er-train: run stopped: {error}; the last good checkpoint is "
                         f"left untouched in {trainer.run_dir / 'checkpoints'}") from None
    if result != "done":
        print(f"cp3er-train: {result.name} received: checkpoint written at frame "
              f"{trainer.frame}; continue with resume=true", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_CODES[result])


if __name__ == "__main__":
    main()
