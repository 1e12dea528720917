"""The training run: collect -> store -> update -> evaluate -> checkpoint (:meth:`Trainer.run`).

DrQ-v2's schedule (Yarats et al. 2021; kept by the CP3ER reference): random actions for
``explore_frames``, updates from ``seed_frames`` on, one per ``update_every_steps`` agent
steps, an evaluation (own env, never replayed) every ``eval_every_frames``. Frames = agent
steps x action repeat. Checkpoints and faults: docs/checkpoints.md; CLI: cp3er.train_cli.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import shutil
import signal
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tensordict import TensorDict
from torch import nn
from torchrl.collectors import BaseCollector, Collector
from tqdm import tqdm

from agents.agent import Agent
from agents.build import build_agent
from cp3er import builders, checkpoint, collection, faults, logs, run_state
from cp3er.config_check import ConfigError, validate_config
from cp3er.console import SpeedReport, eval_line, random_reference, say
from cp3er.evaluate import run_episodes, summarize, write_video
from cp3er.folder_lock import RunLock
from cp3er.perf import tune_allocator
from cp3er.plot import plot_learning_curve
from cp3er.run_metrics import UpdateMetrics, finished_episodes
from cp3er.threads import apply_threads
from envs import physics_errors


class Trainer:
    """One training run in ``cfg.run_dir``; :meth:`train` runs it to ``cfg.frames``."""

    def __init__(self, cfg: DictConfig) -> None:
        validate_config(cfg)
        self.run_dir = Path(cfg.run_dir)
        # one process per run folder, from before the folder is read until the run ends
        self.lock = RunLock(run_state.prepare_run_dir(self.run_dir)).acquire()
        try:
            self._setup(cfg)
        except BaseException:
            self.lock.release(discard=True)  # a lock file this refused launch created
            raise

    def _setup(self, cfg: DictConfig) -> None:
        run_state.refuse_outside_links(self.run_dir)  # before anything in the folder is read
        # a resume takes the saved config, with the launch's own values where allowed
        cfg, resume_state, replay_dir, self.resume_changes = run_state.resolve_run_config(cfg)
        self.cfg = cfg
        # the run's record of its settings: config.yaml, the logger's, each checkpoint's
        self.record = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        self.record["resume"] = False
        self.device = torch.device(cfg.device)
        self.threads, self.threads_how = apply_threads(cfg.threads)
        if cfg.perf.tune_allocator:
            tune_allocator()
        run_state.seed_everything(cfg.seed)
        self.repeat = cfg.env.action_repeat
        self.env = builders.make_train_env(cfg)
        self.eval_env = builders.make_eval_env(cfg)
        try:
            self.agent: Agent = build_agent(cfg, self.env, self.device)
        except ValueError as error:  # an agent hyper-parameter its modules refuse
            raise ConfigError(f"config is invalid for the {cfg.agent.name} agent: "
                              f"{checkpoint.first_line(error)}") from None
        if cfg.replay.storage == "memmap":  # scratch space (checkpoints hold their own copy):
            shutil.rmtree(self.run_dir / "replay", ignore_errors=True)  # old files block it
        self.buffer = builders.make_buffer(cfg, self.run_dir)
        self.metrics = logs.MetricsWriter(self.run_dir / "metrics.csv", fresh=resume_state is None)
        self.logger = logs.make_logger(cfg.log.backend, self.run_dir, cfg.task_name)
        if cfg.log.backend == "csv":  # TorchRL's CSV logger makes logs/videos; GIFs go to eval/
            with contextlib.suppress(OSError):
                (self.run_dir / "logs" / "videos").rmdir()
        eval_every, ckpt_every = cfg.schedule.eval_every_frames, cfg.checkpoint_every
        self.loop = run_state.LoopState(next_eval=eval_every if eval_every > 0 else None,
                                        next_ckpt=ckpt_every if ckpt_every > 0 else None)
        self.start_time = time.perf_counter()
        self.worker_policy: nn.Module | None = None  # the workers' copy (make_collector)
        self.last_return = float("nan")
        self.resumed_from: int | None = None  # frame of the checkpoint resumed from
        self._last_obs: torch.Tensor | None = None  # newest collected observation
        self._succeeded: set[int] = set()  # trajectory ids of episodes that succeeded so far
        self.speed = SpeedReport(cfg.frames)
        self.random_reference: dict | None = None  # console.random_reference's, at the end
        self.random_note: str | None = None  # or why it was not measured
        if resume_state is not None:  # before config.yaml: a refused resume leaves it as it was
            self._restore(resume_state, replay_dir)
        self.update_metrics = UpdateMetrics(self.agent.loss, cfg.log.metrics_every_updates,
                                            self.loop.pending_metrics)
        if resume_state is None or self.resume_changes:
            text = OmegaConf.to_yaml(self.record).encode()
            checkpoint.atomic_write(self.run_dir / "config.yaml", lambda f: f.write(text))
        if resume_state is None:
            logs.log_config(self.logger, cfg.log.backend, self.record)

    # -- the loop --------------------------------------------------------------------------
    def train(self) -> str | signal.Signals:
        """Run to ``cfg.frames``, evaluate and checkpoint at the end: ``"done"``, or the signal
        that stopped the run (its checkpoint written). The folder lock is released at the end."""
        try:
            with faults.Preemption():  # a signal after the last batch just finishes the run
                try:
                    received = self.run(self.cfg.frames)
                except collection.WorkerDiedError:  # keep what the live workers collected
                    if self.step > 0 and self.frame != self.resumed_from:
                        self.save_checkpoint()
                    raise
                if received is not None:
                    self.save_checkpoint()
                    return received
                if self.loop.last_eval_frame != self.frame:
                    self.evaluate()
                self.save_checkpoint()
                # after the last checkpoint, on an env of its own, the RNG states restored
                self.random_reference, self.random_note = random_reference(
                    self.cfg, self.run_dir, self.cfg.frames)
            plot_learning_curve(self.run_dir)
            return "done"
        finally:
            try:
                self.env.close()
                self.eval_env.close()
            finally:
                self.lock.release()

    def run(self, until_frame: int) -> signal.Signals | None:
        """The loop to ``until_frame`` (no final evaluation or checkpoint: :meth:`train`).
        SIGTERM/SIGINT stop it at the next batch boundary: returns that signal, else None."""
        cfg, loop = self.cfg, self.loop
        if self.step >= self._steps(until_frame):
            return None
        ray = (collection.ray_runtime(cfg.collector.ray_address, cfg.collector.workers)
               if cfg.collector.backend == "ray" else contextlib.nullcontext())
        with faults.Preemption() as preemption, ray:  # Ray stopped at the end if started here
            collector = collection.start_collector(lambda: self.make_collector(until_frame))
            pushed = loop.updates  # the update count the workers' weights are from
            progress = tqdm(total=until_frame, initial=self.frame, unit="frame",
                            disable=not cfg.log.progress, dynamic_ncols=True)
            try:
                for batch in collection.batches(collector):
                    # [workers, T] (workers in lockstep) or one worker's [T] chunk
                    self.store(batch.reshape(-1, batch.shape[-1]))
                    progress.update(batch.numel() * self.repeat)
                    due = self.due_updates()  # the step count does not change while updating
                    if due > loop.updates:
                        while loop.updates < due:
                            self.update()
                        self.speed.tick(loop.updates, self.frame)
                        if (self.worker_policy is not None
                                and loop.updates - pushed >= cfg.collector.sync_every):
                            collection.push_weights(collector, self.worker_policy,
                                         self.agent.collect_policy)
                            pushed = loop.updates
                    if loop.next_eval is not None and self.frame >= loop.next_eval:
                        self.evaluate()
                        loop.next_eval += cfg.schedule.eval_every_frames
                    if loop.next_ckpt is not None and self.frame >= loop.next_ckpt:
                        loop.next_ckpt += cfg.checkpoint_every
                        self.save_checkpoint()
                    if preemption.received is not None:  # a safe point: between batches
                        break
                    progress.set_postfix(ret=f"{self.last_return:.1f}", refresh=False)
            finally:
                collector.shutdown()
                progress.close()
        return preemption.received

    # -- its steps -------------------------------------------------------------------------
    def make_collector(self, until_frame: int) -> BaseCollector:
        """TorchRL's ``Collector`` on ``self.env`` (one worker, ``sync``, ``local``), else
        :func:`~cp3er.collection.worker_collector` acting with a copy of the policy
        (docs/scale.md), for the agent steps from here to ``until_frame``."""
        cfg = self.cfg
        backend, chunk = str(cfg.collector.backend), cfg.schedule.update_every_steps
        device = self.device if backend == "local" else torch.device("cpu")  # Ray: CPU nodes
        common = {
            "total_frames": self._steps(until_frame) - self.step,
            "init_random_frames": max(0, self._steps(cfg.schedule.explore_frames) - self.step),
            "device": device, "storing_device": "cpu",
            # feed-forward policies: no InitTracker/primer (0.14 warns when unset)
            "auto_register_policy_transforms": False,
        }
        if cfg.collector.workers == 1 and cfg.collector.sync and backend == "local":
            return Collector(self.env, self.agent.collect_policy, frames_per_batch=chunk,
                             **common)
        # a copy: TorchRL shares CPU weights with the workers in place, mid-update otherwise
        self.worker_policy = copy.deepcopy(self.agent.collect_policy).to(device)
        factories = builders.worker_env_factories(cfg, cfg.seed + self.step)  # new initial states
        return collection.worker_collector(factories, self.worker_policy, backend=backend,
                                           sync=cfg.collector.sync, chunk=chunk, **common)

    def store(self, rows: TensorDict) -> None:
        """A collected ``[W, T]`` batch into the replay buffer, the step counters and the
        exploration schedule; a train row of ``metrics.csv`` for each episode it ends."""
        steps = rows.numel()
        try:
            faults.check_finite_actions(rows["action"],
                                        f"collection, frame {self.frame + steps * self.repeat}")
        except faults.NumericalError:
            self.update_metrics.read()  # a non-finite loss not read yet: name it instead
            raise
        self._last_obs = rows[-1, -1:][self.agent.obs_key].clone()
        self.buffer.extend(rows)
        step_before = self.loop.step
        self.loop.step += steps
        self.agent.advance(steps)
        for step, episode_return, length, success in finished_episodes(
                rows, self.buffer.episode_ends, step_before, self._succeeded):
            self.loop.episode += 1
            row = {"frame": step * self.repeat, "step": step, "phase": "train",
                   "episode": self.loop.episode, "episode_return": episode_return,
                   "episode_length": length, **self._timing(),
                   "physics_errors": self.physics_errors}
            if success is not None:
                row["success"] = success
            row |= self.update_metrics.means()
            self.metrics.write(row)
            logs.log_scalars(self.logger, {f"train/{k}": v for k, v in row.items()
                                           if isinstance(v, (int, float)) and k != "frame"},
                             self.frame)
            self.last_return = episode_return

    def update(self) -> dict[str, torch.Tensor]:
        """One agent update on a replay batch (copied to the agent's device); its metrics."""
        batch = self.buffer.sample().to(self.device)
        try:
            metrics = self.agent.update(batch)
        except (RuntimeError, ValueError) as error:
            if not faults.numeric_failure(error):
                raise
            # name the first bad update read so far or a non-finite parameter, else this one
            self.update_metrics.read()
            faults.check_finite_parameters(self.agent.loss, update=self.loop.updates + 1,
                                           frame=self.frame)
            raise faults.NumericalError(
                f"update {self.loop.updates + 1} (frame {self.frame}) failed on non-finite "
                f"values: {checkpoint.first_line(error)}") from None
        self.loop.updates += 1
        self.update_metrics.add(self.loop.updates, self.frame, metrics)
        return metrics

    def evaluate(self) -> dict:
        """``schedule.eval_episodes`` episodes of the deterministic policy: an eval row, the
        logger's scalars, a GIF of the first episode (pixels, ``log.video``), a console line."""
        cfg = self.cfg
        started = time.perf_counter()
        record = bool(cfg.log.video) and cfg.obs == "pixels"
        self.agent.loss.eval()
        results = run_episodes(self.eval_env, self.agent.policy, cfg.schedule.eval_episodes,
                               record_video=record)
        self.agent.loss.train()
        summary = summarize(cfg.task_name, results, seed=cfg.seed)
        self.loop.last_eval_frame = self.frame
        row = {"frame": self.frame, "step": self.step, "phase": "eval",
               "episode_return": summary["return_mean"],
               "episode_length": summary["episode_length_mean"], **self._timing()}
        if "success_rate" in summary:
            row["success"] = summary["success_rate"]
        self.metrics.write(row)
        logs.log_scalars(self.logger, {"eval/episode_return": summary["return_mean"],
                                       "eval/return_iqm": summary["return_iqm"]}, self.frame)
        if record and results.frames:
            gif = write_video(results.frames, self.run_dir / "eval" / f"frame_{self.frame:09d}.gif")
            logs.log_eval_video(self.logger, cfg.log.backend, gif, self.frame)
        say(eval_line(self.frame, summary, time.perf_counter() - started))
        return summary

    def save_checkpoint(self) -> None:
        """Agent, replay buffer, RNG states and loop state, after a clean metrics read and a
        policy that acts finitely (:func:`~cp3er.checkpoint.save_run_checkpoint`)."""
        self.update_metrics.read()
        faults.check_finite_parameters(self.agent.loss, update=self.loop.updates, frame=self.frame)
        if self._last_obs is not None:  # finite but exploding weights act non-finitely
            obs = TensorDict({self.agent.obs_key: self._last_obs}, [1]).to(self.device)
            faults.check_policy_acts(self.agent.policy, obs,
                                     f"at the checkpoint, frame {self.frame}")
        state = {
            "agent": self.agent.state_dict(),
            "config": self.record,
            "counters": dataclasses.replace(
                self.loop, physics_errors=self.physics_errors,
                seconds=time.perf_counter() - self.start_time).to_checkpoint(),
            "rng": run_state.rng_state(),
        }
        checkpoint.save_run_checkpoint(state, self.run_dir, self.buffer, self.frame)

    def _restore(self, state: dict, replay_dir: Path) -> None:
        """Continue from a checkpoint: the metrics rows after it dropped, the interrupted
        episode cut (like a truncation), new initial states from the checkpoint's step."""
        try:
            self.agent.load_state_dict(state["agent"])
        except (RuntimeError, KeyError, ValueError) as error:
            raise checkpoint.CheckpointError(f"the checkpoint does not match this run's agent: "
                                             f"{checkpoint.load_error_detail(error)}") from error
        try:
            self.buffer.loads(replay_dir)
        except Exception as error:  # torchrl/tensordict raise several types for bad folders
            detail = checkpoint.first_line(error)
            raise checkpoint.CheckpointError(f"replay buffer checkpoint {replay_dir} is "
                                             f"unreadable: {detail}") from error
        self.buffer.cut_episode()
        self.loop = run_state.LoopState.from_checkpoint(state)
        self.start_time = time.perf_counter() - self.loop.seconds
        self.metrics.truncate_after(self.frame)
        train_rows = [r for r in self.metrics.rows() if r.get("phase") == "train"]
        if train_rows:  # the progress bar's last return, as before the interruption
            self.last_return = float(train_rows[-1]["episode_return"])
        self.resumed_from = self.frame
        self.env.set_seed(self.cfg.seed + self.step)
        self.eval_env.set_seed(self.cfg.seed + builders.EVAL_SEED_OFFSET + self.step)
        run_state.set_rng_state(state["rng"])

    # -- counters --------------------------------------------------------------------------
    def _steps(self, frames: int) -> int:
        return math.ceil(frames / self.repeat)

    @property
    def step(self) -> int:
        """Agent steps taken in the training env."""
        return self.loop.step

    @step.setter
    def step(self, value: int) -> None:
        self.loop.step = value

    @property
    def frame(self) -> int:
        return self.loop.step * self.repeat

    def due_updates(self) -> int:
        """Updates due by the current step: one per ``update_every_steps`` agent steps
        from ``seed_frames`` on, however the steps arrive."""
        every = self.cfg.schedule.update_every_steps
        first = max(1, math.ceil(self._steps(self.cfg.schedule.seed_frames) / every))
        return max(0, self.step // every - first + 1)

    def updates_per_frame(self) -> float | None:
        """Updates per frame after ``seed_frames`` (the first update aside; None before):
        ``1 / (update_every_steps x action_repeat)`` when the schedule is kept."""
        after_seed = self.frame - self.cfg.schedule.seed_frames
        if after_seed <= 0:
            return None
        return max(self.loop.updates - 1, 0) / after_seed

    @property
    def physics_errors(self) -> int:
        """Training-env steps whose physics failed, whole run (workers' envs not counted)."""
        return self.loop.physics_errors + physics_errors(self.env)

    def _timing(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start_time
        return {"seconds": elapsed, "fps": self.frame / max(elapsed, 1e-9)}
