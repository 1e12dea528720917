"""``cp3er-train``: env -> TorchRL collector -> replay -> updates -> logs and checkpoints.

DrQ-v2's schedule (Yarats et al. 2021; the CP3ER reference keeps it): uniform random
actions for the first ``schedule.explore_frames`` frames, no updates before
``schedule.seed_frames``, one update every ``schedule.update_every_steps`` agent steps,
evaluation every
``schedule.eval_every_frames`` frames on a separate environment whose transitions never
enter the replay buffer. "Frames" are environment frames (agent steps x action repeat).

Checkpoints, resume and faults (docs/checkpoints.md): every
``checkpoint_every`` frames (and at the end) the agent, the replay buffer, the RNG
states, counters and loop state are written to ``<run_dir>/checkpoints``;
``resume=true`` continues from there. The training environment itself is not saved: a
resumed run starts its collector on a fresh reset, the interrupted episode is cut (the
replay buffer treats the cut like a truncation: no n-step target crosses it) and gets no
metrics row. SIGTERM/SIGINT checkpoint at the next batch boundary and exit (code 0 for
SIGTERM, 130 for SIGINT). A non-finite loss, parameter or action, or a loss or Q value
beyond 1e8, stops the run before anything more is written, so the last checkpoint stays
the last good one. A collector worker that dies stops the run after a checkpoint of what
was collected. One process at a time trains a run folder (an ``flock`` on
``<run_dir>/.lock``), never through a symlink.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import math
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tensordict import TensorDict
from tensordict.nn import TensorDictSequential
from torchrl.collectors import BaseCollector, Collector
from torchrl.envs.utils import ExplorationType, set_exploration_type
from tqdm import tqdm

from agents.agent import Agent
from agents.build import build_agent
from agents.metrics import LOSS_METRICS
from cp3er.builders import (
    EVAL_SEED_OFFSET,
    make_buffer,
    make_eval_env,
    make_train_env,
    worker_env_factories,
)
from cp3er.checkpoint import (
    CheckpointError,
    atomic_write,
    first_line,
    has_checkpoint,
    load_error_detail,
    save_run_checkpoint,
)
from cp3er.collection import (
    RayClusterError,
    WorkerDiedError,
    ray_runtime,
    watching_workers,
    worker_collector,
    worker_death,
)
from cp3er.config_check import (
    ConfigError,
    check_group_overrides,
    check_override_values,
    validate_config,
)
from cp3er.config_schema import CONFIG_DIR
from cp3er.console import (
    TIMED_UPDATES,
    eval_line,
    expected_duration,
    help_text,
    measured_duration,
    plural,
    random_reference,
    reference_phrase,
    say,
)
from cp3er.evaluate import run_episodes, summarize, write_video
from cp3er.faults import (
    Q_METRICS,
    NumericalError,
    Preemption,
    check_finite_actions,
    check_finite_losses,
    check_finite_parameters,
    numeric_failure,
    pass_on,
)
from cp3er.folder_lock import RunLock, RunLockedError
from cp3er.logs import (
    MetricsFileError,
    MetricsWriter,
    close_logger_files,
    log_config,
    log_eval_video,
    make_logger,
    quiet_torchrl,
)
from cp3er.perf import tune_allocator
from cp3er.plot import plot_learning_curve
from cp3er.run_state import (
    LoopState,
    ResumeError,
    prepare_run_dir,
    refuse_outside_links,
    resolve_run_config,
    rng_state,
    seed_everything,
    set_rng_state,
)
from cp3er.threads import apply_threads
from envs import physics_errors
from envs.registry import UnknownTaskError

# after a preemption checkpoint (SIGUSR2: a cluster's requeue handler, if any, exits first)
EXIT_CODES = {signal.SIGTERM: 0, signal.SIGINT: 130, signal.SIGUSR2: 0}
# The run folder is held by a live process (EX_TEMPFAIL): not the run's fault
# (benchmarks/suite.sh tells it apart from errors, exit code 1).
EXIT_LOCKED = 75


class Trainer:
    """One training run in ``cfg.run_dir`` (see module docstring for the schedule)."""

    def __init__(self, cfg: DictConfig) -> None:
        validate_config(cfg)
        self.run_dir = Path(cfg.run_dir)
        # one process per run folder, from before the folder is read until the run ends
        self.lock = RunLock(prepare_run_dir(self.run_dir)).acquire()
        try:
            self._setup(cfg)
        except BaseException:
            self.lock.release(discard=True)  # a lock file this refused launch created
            raise

    def _setup(self, cfg: DictConfig) -> None:
        refuse_outside_links(self.run_dir)  # before anything in the folder is read
        # the launch config was validated; a resume takes the saved one, checked when the
        # run started, with the launch's own values
        cfg, resume_state, replay_dir, self.resume_changes = resolve_run_config(cfg)
        self.cfg = cfg
        # the run's record of its settings: config.yaml, the logger's, each checkpoint's
        self.record = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        self.record["resume"] = False
        self.device = torch.device(cfg.device)
        self.threads, self.threads_how = apply_threads(cfg.threads)
        if cfg.perf.tune_allocator:
            tune_allocator()
        seed_everything(cfg.seed)
        self.repeat = cfg.env.action_repeat
        self.env = make_train_env(cfg)
        self.eval_env = make_eval_env(cfg)
        try:
            self.agent: Agent = build_agent(cfg, self.env, self.device)
        except ValueError as error:  # an agent hyper-parameter its modules refuse
            raise ConfigError(f"config is invalid for the {cfg.agent.name} agent: "
                              f"{first_line(error)}") from None
        if cfg.replay.storage == "memmap":
            # the memmap storage is scratch space (checkpoints hold their own copy): files
            # left by a killed or finished process would block the new storage
            shutil.rmtree(self.run_dir / "replay", ignore_errors=True)
        self.buffer = make_buffer(cfg, self.run_dir)
        self.metrics = MetricsWriter(self.run_dir / "metrics.csv", fresh=resume_state is None)
        self.logger = make_logger(cfg.log.backend, self.run_dir, cfg.task_name)
        if cfg.log.backend == "csv":  # TorchRL's CSV logger makes logs/videos; GIFs go to eval/
            with contextlib.suppress(OSError):  # kept if not empty (a run of an older version)
                (self.run_dir / "logs" / "videos").rmdir()
        eval_every, ckpt_every = cfg.schedule.eval_every_frames, cfg.checkpoint_every
        self.loop = LoopState(next_eval=eval_every if eval_every > 0 else None,
                              next_ckpt=ckpt_every if ckpt_every > 0 else None)
        self.start_time = time.perf_counter()
        # (update, frame, metrics on the device) of the updates since the last read
        self._unread: list[tuple[int, int, dict[str, torch.Tensor]]] = []
        self._episode_success: set[int] = set()  # traj ids of episodes that succeeded so far
        self.worker_policy: TensorDictSequential | None = None  # workers' copy (make_collector)
        self.last_return = float("nan")
        self.resumed_from: int | None = None  # frame of the checkpoint resumed from
        self._last_obs: torch.Tensor | None = None  # newest collected observation
        # the measured duration (console.measured_duration): (updates, frame, time) at this
        # process's first update, then None once reported; duration_announced: the start
        # line gave an estimate (cp3er-train's main), so the measured one follows anyway
        self._speed_mark: tuple[int, int, float] | None = None
        self._speed_reported = False
        self.duration_announced = False
        # the uniform random policy's return (console.random_reference), or why not measured
        self.random_reference: dict | None = None
        self.random_note: str | None = None
        if resume_state is not None:  # before config.yaml: a refused resume leaves it as it was
            self._restore(resume_state, replay_dir)
        if resume_state is None or self.resume_changes:
            text = OmegaConf.to_yaml(self.record).encode()
            atomic_write(self.run_dir / "config.yaml", lambda handle: handle.write(text))
        if resume_state is None:
            log_config(self.logger, cfg.log.backend, self.record)

    # -- schedule ------------------------------------------------------------------------
    def _steps(self, frames: int) -> int:
        return math.ceil(frames / self.repeat)

    @property
    def step(self) -> int:
        """Agent steps taken in the training env (``self.loop.step``)."""
        return self.loop.step

    @step.setter
    def step(self, value: int) -> None:
        self.loop.step = value

    @property
    def frame(self) -> int:
        return self.loop.step * self.repeat

    # -- pieces --------------------------------------------------------------------------
    def make_collector(self, until_frame: int) -> BaseCollector:
        """A collector for the agent steps from here to ``until_frame``: TorchRL's
        ``Collector`` stepping ``self.env`` here (``collector.workers=1``, ``sync``, the
        ``local`` backend), else :func:`~cp3er.collection.worker_collector`: workers
        (spawned processes, or Ray actors with ``collector.backend=ray``) yielding
        ``[workers, update_every_steps]`` stacks (``sync``: the workers idle while the
        learner updates) or each worker's ``update_every_steps`` chunk as it comes
        (collecting while the learner updates), acting with a copy of the policy that
        :meth:`push_weights` refreshes every ``collector.sync_every`` updates. With the Ray
        backend Ray must be running (:meth:`_collect` starts it: :func:`ray_runtime`)."""
        cfg = self.cfg
        workers, chunk = cfg.collector.workers, cfg.schedule.update_every_steps
        backend = str(cfg.collector.backend)
        # the Ray workers act on the CPU (a collector node may have no GPU)
        device = self.device if backend == "local" else torch.device("cpu")
        common = {
            "total_frames": self._steps(until_frame) - self.step,
            "init_random_frames": max(0, self._steps(cfg.schedule.explore_frames) - self.step),
            "device": device,
            "storing_device": "cpu",
            # the policies are feed-forward: no InitTracker/primer to add to the env (said
            # explicitly: TorchRL 0.14 warns when unset, and 0.15 changes the default)
            "auto_register_policy_transforms": False,
        }
        if workers == 1 and cfg.collector.sync and backend == "local":
            return Collector(self.env, self.agent.collect_policy, frames_per_batch=chunk,
                             **common)
        # The workers' policy: a copy (TorchRL shares its CPU weights with the workers in
        # place, so the learner's own would reach them mid-update, at every step).
        self.worker_policy = copy.deepcopy(self.agent.collect_policy).to(device)
        # new initial states on each call (a resumed run, a bench's second run() call)
        factories = worker_env_factories(cfg, cfg.seed + self.step)
        return worker_collector(factories, self.worker_policy, backend=backend,
                                sync=cfg.collector.sync, chunk=chunk, **common)

    def push_weights(self, collector: BaseCollector) -> None:
        """Copy the learner's policy (weights and buffers, e.g. DrQ-v2's noise schedule)
        into the workers' (``collector.workers > 1``, ``sync=false`` or the Ray backend):
        into their shared copy (local workers), sent on to each actor (Ray workers:
        ``RayCollector.update_policy_weights_``, torch.distributed from this process)."""
        self.worker_policy.load_state_dict(self.agent.collect_policy.state_dict())
        try:
            with watching_workers(collector):  # a dead worker never acknowledges
                collector.update_policy_weights_()
        except WorkerDiedError:  # a local worker, named by the watch
            raise
        except Exception as error:  # a Ray actor's death surfaces in its acknowledgement
            died = worker_death(error)
            if died is None:
                raise
            raise died from None

    def due_updates(self) -> int:
        """Updates the schedule calls for by the current agent step: one per
        ``schedule.update_every_steps`` agent steps collected from ``schedule.seed_frames``
        on, however the steps arrive (one worker's chunk, several workers' stack)."""
        every = self.cfg.schedule.update_every_steps
        first = max(1, math.ceil(self._steps(self.cfg.schedule.seed_frames) / every))
        return max(0, self.step // every - first + 1)

    def updates_per_frame(self) -> float | None:
        """Updates made per frame collected after ``schedule.seed_frames`` (``None`` before
        any), the first update (due at the seed phase's last batch) aside: exactly
        ``1 / (update_every_steps x action_repeat)`` when the schedule is kept, however the
        frames arrive (the end line and ``cp3er-bench``'s ``train_fps_workers``)."""
        after_seed = self.frame - self.cfg.schedule.seed_frames
        if after_seed <= 0:
            return None
        return max(self.loop.updates - 1, 0) / after_seed

    @property
    def physics_errors(self) -> int:
        """Training-env steps whose physics failed (episode truncated), whole run. With
        ``collector.workers > 1``, ``collector.sync=false`` or ``collector.backend=ray``
        the envs live in the worker processes (or Ray actors), whose counters are not read:
        0 there."""
        return self.loop.physics_errors + physics_errors(self.env)

    def _log_scalars(self, values: dict[str, float]) -> None:
        for name, value in values.items():
            try:
                self.logger.log_scalar(name, value, step=self.frame)
            except OSError as error:  # a full disk: name the file, leave nothing to flush
                raise OSError(error.errno, error.strerror,
                              str(close_logger_files(self.logger, name))) from None

    def _finish_episodes(self, rows: TensorDict, step_before: int) -> None:
        """A train row of ``metrics.csv`` for each episode ending in ``rows`` (``[W, T]``:
        ``W`` workers stepping in lockstep, or one worker's chunk; the ends the buffer
        found writing them), in step order; an episode ending at step ``t`` of the chunk
        gets ``step_before + (t + 1) * W``."""
        workers, steps = rows.shape
        done = self.buffer.episode_ends.reshape(workers, steps)
        if done.any():  # a train row takes the metrics so far
            self.read_metrics()
        success = rows.get(("next", "success"), None)
        success = None if success is None else success.reshape(workers, steps)
        traj = rows.get(("collector", "traj_ids"), None)
        traj = (torch.zeros(workers, steps, dtype=torch.long) if traj is None
                else traj.reshape(workers, steps))
        returns = rows["next", "episode_reward"].reshape(workers, steps)
        lengths = rows["next", "step_count"].reshape(workers, steps)
        for t in range(steps):
            for w in range(workers):
                episode = int(traj[w, t])
                if success is not None and bool(success[w, t]):
                    self._episode_success.add(episode)
                if done[w, t]:
                    self._write_train_row(step_before + (t + 1) * workers,
                                          float(returns[w, t]), int(lengths[w, t]),
                                          None if success is None
                                          else episode in self._episode_success)
                    self._episode_success.discard(episode)

    def _write_train_row(self, step: int, episode_return: float, length: int,
                         success: bool | None) -> None:
        self.loop.episode += 1
        elapsed = time.perf_counter() - self.start_time
        row = {
            "frame": step * self.repeat,
            "step": step,
            "phase": "train",
            "episode": self.loop.episode,
            "episode_return": episode_return,
            "episode_length": length,
            "seconds": elapsed,
            "fps": self.frame / max(elapsed, 1e-9),
            "physics_errors": self.physics_errors,
        }
        if success is not None:
            row["success"] = success
        for name, values in self.loop.pending_metrics.items():
            row[name] = float(np.mean(values))
        self.loop.pending_metrics.clear()
        self.metrics.write(row)
        self._log_scalars({f"train/{k}": v for k, v in row.items()
                           if isinstance(v, (int, float)) and k != "frame"})
        self.last_return = row["episode_return"]

    def update(self) -> dict[str, torch.Tensor]:
        """One agent update; its metrics stay on the device until :meth:`read_metrics`,
        every ``log.metrics_every_updates`` updates (1: after each). Returns them."""
        # built on replay.device: a host-to-device copy with replay.device=cpu, no copy
        # with replay.device=cuda (config_check: it is then the agent's device)
        batch = self.buffer.sample().to(self.device)
        try:
            metrics = self.agent.update_on_device(batch)
        except (RuntimeError, ValueError) as error:
            if not numeric_failure(error):
                raise
            # an update that failed on NaN/inf values: name the first bad update read so
            # far or a non-finite parameter, else the failure itself, in one line
            self.read_metrics()
            check_finite_parameters(self.agent.loss, update=self.loop.updates + 1,
                                    frame=self.frame)
            raise NumericalError(f"update {self.loop.updates + 1} (frame {self.frame}) "
                                 f"failed on non-finite values: {first_line(error)}") from None
        self.loop.updates += 1
        self._unread.append((self.loop.updates, self.frame, metrics))
        if len(self._unread) >= self.cfg.log.metrics_every_updates:
            self.read_metrics()
        return metrics

    def read_metrics(self) -> None:
        """Read the metrics of the updates since the last read in one host transfer, stop
        the run (:class:`NumericalError`, naming the loss and the update) on a NaN/inf loss
        or parameter, and queue the values for the next train row of ``metrics.csv``.
        Called every ``log.metrics_every_updates`` updates and before anything is written
        (a train row, a checkpoint), so a checkpoint follows a clean read only."""
        if not self._unread:
            return
        names = list(self._unread[-1][2])
        values = torch.stack([torch.stack([m[n].float() for n in names])
                              for _, _, m in self._unread]).cpu()  # [updates, metrics]
        for (update, frame, _), row in zip(self._unread, values.tolist(), strict=True):
            check_finite_losses(dict(zip(names, row, strict=True)), (*LOSS_METRICS, *Q_METRICS),
                                update=update, frame=frame)
        last_update, last_frame, _ = self._unread[-1]
        check_finite_parameters(self.agent.loss, update=last_update, frame=last_frame)
        for name, column in zip(names, values.T.tolist(), strict=True):
            self.loop.pending_metrics.setdefault(name, []).extend(column)
        self._unread.clear()

    def evaluate(self) -> dict:
        """``schedule.eval_episodes`` episodes of the deterministic policy on the eval env:
        an eval row of ``metrics.csv``, the logger's scalars, a GIF of the first episode
        (pixels, ``log.video``) and one console line (:func:`~cp3er.console.eval_line`)."""
        cfg = self.cfg
        started = time.perf_counter()
        record = bool(cfg.log.video) and cfg.obs == "pixels"
        self.agent.loss.eval()
        results = run_episodes(self.eval_env, self.agent.policy, cfg.schedule.eval_episodes,
                               record_video=record)
        self.agent.loss.train()
        summary = summarize(cfg.task_name, results, seed=cfg.seed)
        self.loop.last_eval_frame = self.frame
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
            gif = write_video(results.frames, self.run_dir / "eval" / f"frame_{self.frame:09d}.gif")
            log_eval_video(self.logger, cfg.log.backend, gif, self.frame)
        say(eval_line(self.frame, summary, time.perf_counter() - started))
        return summary

    def _report_speed(self) -> None:
        """Time this process's first :data:`~cp3er.console.TIMED_UPDATES` updates (with
        the collection and evaluations between them), then print the run's expected
        remaining duration if it is over an hour or the start line gave an estimate."""
        now = time.perf_counter()
        if self._speed_mark is None:
            self._speed_mark = (self.loop.updates, self.frame, now)
            return
        updates, frame, start = self._speed_mark
        if self.loop.updates - updates < TIMED_UPDATES or now <= start:
            return
        self._speed_reported = True
        line = measured_duration(self.cfg.frames - self.frame, (self.frame - frame) / (now - start),
                                 self.loop.updates - updates, self.duration_announced)
        if line is not None:
            say(line)

    def save_checkpoint(self) -> None:
        """Agent, replay buffer, RNG states, counters and loop state (see
        :func:`~cp3er.checkpoint.save_run_checkpoint` for the write order)."""
        self.read_metrics()  # a checkpoint only after a clean read
        check_finite_parameters(self.agent.loss, update=self.loop.updates, frame=self.frame)
        self._check_policy_acts()
        state = {
            "agent": self.agent.state_dict(),
            "config": self.record,
            "counters": dataclasses.replace(
                self.loop, physics_errors=self.physics_errors,
                seconds=time.perf_counter() - self.start_time).to_checkpoint(),
            "rng": rng_state(),
        }
        save_run_checkpoint(state, self.run_dir, self.buffer, self.frame)

    def _check_policy_acts(self) -> None:
        """The policy about to be checkpointed acts finitely at the newest observation
        (finite but exploding weights pass :func:`check_finite_parameters`)."""
        if self._last_obs is None:  # nothing collected by this process
            return
        td = TensorDict({self.agent.obs_key: self._last_obs}, [1]).to(self.device)
        devices = [self.device] if self.device.type == "cuda" else []
        # forked RNG: the probe draws no number of the run's streams
        with torch.random.fork_rng(devices=devices), torch.no_grad(), \
                set_exploration_type(ExplorationType.DETERMINISTIC):
            action = self.agent.policy(td)["action"]
        check_finite_actions(action, f"at the checkpoint, frame {self.frame}")

    def _restore(self, state: dict, replay_dir: Path) -> None:
        """Continue from a checkpoint: everything :meth:`save_checkpoint` wrote, the
        metrics rows after it dropped, the interrupted episode cut."""
        try:
            self.agent.load_state_dict(state["agent"])
        except (RuntimeError, KeyError, ValueError) as error:
            raise CheckpointError(f"the checkpoint does not match this run's agent: "
                                  f"{load_error_detail(error)}") from error
        try:
            self.buffer.loads(replay_dir)
        except Exception as error:  # torchrl/tensordict raise several types for bad folders
            raise CheckpointError(f"replay buffer checkpoint {replay_dir} is unreadable: "
                                  f"{first_line(error)}") from error
        self.buffer.cut_episode()
        self.loop = LoopState.from_checkpoint(state)
        self.start_time = time.perf_counter() - self.loop.seconds
        self.metrics.truncate_after(self.frame)
        train_rows = [r for r in self.metrics.rows() if r.get("phase") == "train"]
        if train_rows:  # the progress bar's last return, as before the interruption
            self.last_return = float(train_rows[-1]["episode_return"])
        self.resumed_from = self.frame
        # New initial states after resume (not a replay of the run's first episodes),
        # deterministic given the checkpoint.
        self.env.set_seed(self.cfg.seed + self.step)
        self.eval_env.set_seed(self.cfg.seed + EVAL_SEED_OFFSET + self.step)
        set_rng_state(state["rng"])

    # -- loop ----------------------------------------------------------------------------
    def train(self) -> str | signal.Signals:
        """Run to ``cfg.frames``, evaluate and checkpoint at the end; returns ``"done"``, or
        the signal that preempted the run (after its checkpoint is written). The run
        folder's lock is released at the end, whatever the outcome."""
        try:
            with Preemption():  # a signal after the last batch just finishes the run
                try:
                    received = self.run(self.cfg.frames)
                except WorkerDiedError:  # keep what the live workers collected
                    if self.step > 0 and self.frame != self.resumed_from:
                        self.save_checkpoint()
                    self.env.close()
                    self.eval_env.close()
                    raise
                if received is not None:
                    self.save_checkpoint()
                    self.env.close()
                    self.eval_env.close()
                    return received
                if self.loop.last_eval_frame != self.frame:
                    self.evaluate()
                self.save_checkpoint()
                # after the last checkpoint, on an env of its own, the RNG states restored
                self.random_reference, self.random_note = random_reference(
                    self.cfg, self.run_dir, self.cfg.frames)
            plot_learning_curve(self.run_dir)
            self.env.close()
            self.eval_env.close()
            return "done"
        finally:
            self.lock.release()

    def run(self, until_frame: int) -> signal.Signals | None:
        """The loop from the current frame to ``until_frame``: collect a batch of
        ``schedule.update_every_steps`` agent steps (random actions before
        ``schedule.explore_frames``), store it, update (from ``schedule.seed_frames`` on),
        evaluate and checkpoint when their frames come. SIGTERM/SIGINT stop it at the next
        batch boundary: returns that signal (nothing is saved here; :meth:`train` saves),
        else ``None``. No final evaluation or checkpoint (:meth:`train` adds them)."""
        with Preemption() as preemption:
            if self.step < self._steps(until_frame):
                self._collect(until_frame, preemption)
        return preemption.received

    def _collect(self, until_frame: int, preemption: Preemption) -> None:
        """:meth:`run`'s loop; with ``collector.backend=ray`` inside :func:`ray_runtime`
        (Ray started for the loop unless already running in this process, shut down at its
        end or on preemption only if it was started here)."""
        collector_cfg = self.cfg.collector
        runtime = (ray_runtime(collector_cfg.ray_address, collector_cfg.workers)
                   if collector_cfg.backend == "ray" else contextlib.nullcontext())
        with runtime:
            self._collect_from(self._start_collector(until_frame), until_frame, preemption)

    def _start_collector(self, until_frame: int) -> BaseCollector:
        """:meth:`make_collector`; a worker that dies while it starts is a one-line
        :class:`~cp3er.collection.WorkerDiedError`, raised once the half-built collector
        is collected (its weight-sync queues, left to the interpreter's exit, hung it)."""
        try:
            return self.make_collector(until_frame)
        except Exception as error:
            died = worker_death(error)
            if died is None:
                raise
        gc.collect()  # outside the except: nothing refers to the half-built collector
        raise died

    @staticmethod
    def _next_batch(batches: Iterator[TensorDict]) -> TensorDict | None:
        """The collector's next batch (``None`` at its end); a worker that died is a
        one-line :class:`~cp3er.collection.WorkerDiedError` (:meth:`train` then
        checkpoints what was collected)."""
        try:
            return next(batches)
        except StopIteration:
            return None
        except Exception as error:
            died = worker_death(error)
            if died is None:
                raise
            raise died from None

    def _collect_from(self, collector: BaseCollector, until_frame: int,
                      preemption: Preemption) -> None:
        cfg, loop = self.cfg, self.loop
        pushed = loop.updates  # the update count the workers' weights are from
        progress = tqdm(total=until_frame, initial=self.frame, unit="frame",
                        disable=not cfg.log.progress, dynamic_ncols=True)
        batches = iter(collector)
        try:
            while (batch := self._next_batch(batches)) is not None:
                # [workers, T] (a MultiSyncCollector's stack) or one worker's [T] chunk
                rows = batch.reshape(-1, batch.shape[-1])
                steps = rows.numel()
                try:
                    check_finite_actions(rows["action"], f"collection, frame "
                                         f"{self.frame + steps * self.repeat}")
                except NumericalError:
                    self.read_metrics()  # a non-finite loss not read yet: name it instead
                    raise
                self._last_obs = rows[-1, -1:][self.agent.obs_key].clone()
                self.buffer.extend(rows)
                step_before = loop.step
                loop.step += steps
                self.agent.advance(steps)
                progress.update(steps * self.repeat)
                self._finish_episodes(rows, step_before)
                due = self.due_updates()  # the step count does not change while updating
                if due > loop.updates:
                    while loop.updates < due:
                        self.update()
                    if not self._speed_reported:
                        self._report_speed()
                    if (self.worker_policy is not None
                            and loop.updates - pushed >= cfg.collector.sync_every):
                        self.push_weights(collector)
                        pushed = loop.updates
                if loop.next_eval is not None and self.frame >= loop.next_eval:
                    self.evaluate()
                    loop.next_eval += cfg.schedule.eval_every_frames
                if loop.next_ckpt is not None and self.frame >= loop.next_ckpt:
                    loop.next_ckpt += cfg.checkpoint_every
                    self.save_checkpoint()
                if preemption.received is not None:  # a safe point: between batches
                    break
                # tqdm's own rate is this process's speed (one speed, also after a resume)
                progress.set_postfix(ret=f"{self.last_return:.1f}", refresh=False)
        finally:
            collector.shutdown()
            progress.close()




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
        trainer.duration_announced = True
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
