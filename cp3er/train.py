"""``cp3er-train``: env -> TorchRL collector -> replay -> updates -> logs and checkpoints.

The reference schedule (REFERENCE section 5): uniform random actions for the first
``schedule.explore_frames`` frames, no updates before ``schedule.seed_frames``, one
update every ``schedule.update_every_steps`` agent steps, evaluation every
``schedule.eval_every_frames`` frames on a separate environment whose transitions never
enter the replay buffer. "Frames" are environment frames (agent steps x action repeat).
"""

from __future__ import annotations

import math
import random
import time
from collections import defaultdict
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torchrl.collectors import Collector
from tqdm import tqdm

from agents.build import Agent, build_agent
from cp3er.checkpoint import CHECKPOINT_NAME, atomic_torch_save
from cp3er.config_check import ConfigError, validate_config
from cp3er.evaluate import run_episodes, summarize, write_video
from cp3er.plot import plot_learning_curve
from cp3er.runlog import MetricsWriter, make_logger
from cp3er.session import make_buffer, make_eval_env, make_train_env
from envs.registry import UnknownTaskError

UPDATE_METRICS = ("loss_critic", "loss_actor", "q_mean", "target_mean", "critic_std",
                  "actor_q", "consistency_loss", "action_std")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 (seeds libraries that use the legacy global RNG)
    torch.manual_seed(seed)


class Trainer:
    """One training run in ``cfg.run_dir`` (see module docstring for the schedule)."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        validate_config(cfg)
        self.device = torch.device(cfg.device)
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)
        self.repeat = cfg.env.action_repeat
        self.env = make_train_env(cfg)
        self.eval_env = make_eval_env(cfg)
        self.agent: Agent = build_agent(cfg, self.env, self.device)
        self.buffer = make_buffer(cfg, self.run_dir)
        self.metrics = MetricsWriter(self.run_dir / "metrics.csv")
        self.logger = make_logger(cfg.log.backend, self.run_dir, cfg.task_name)
        OmegaConf.save(cfg, self.run_dir / "config.yaml", resolve=True)
        self.step = 0  # agent steps taken in the training env
        self.updates = 0
        self.episode = 0
        self.start_time = time.perf_counter()
        self._pending = defaultdict(list)  # update metrics since the last train row
        self._episode_success = False
        self.last_eval_frame = -1

    # -- schedule ------------------------------------------------------------------------
    def _steps(self, frames: int) -> int:
        return math.ceil(frames / self.repeat)

    @property
    def frame(self) -> int:
        return self.step * self.repeat

    # -- pieces --------------------------------------------------------------------------
    def make_collector(self) -> Collector:
        cfg = self.cfg
        return Collector(
            self.env,
            self.agent.policy,
            frames_per_batch=cfg.schedule.update_every_steps,
            total_frames=self._steps(cfg.frames),
            init_random_frames=self._steps(cfg.schedule.explore_frames),
            device=self.device,
            storing_device="cpu",
        )

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

    def update(self) -> None:
        batch = self.buffer.sample().to(self.device)
        metrics = self.agent.update(batch)
        self.updates += 1
        for name in UPDATE_METRICS:
            if name in metrics:
                self._pending[name].append(metrics[name])

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
        state = {
            "agent": self.agent.state_dict(),
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "counters": {"step": self.step, "updates": self.updates, "episode": self.episode},
        }
        atomic_torch_save(state, self.run_dir / "checkpoints" / CHECKPOINT_NAME)

    # -- loop ----------------------------------------------------------------------------
    def train(self) -> None:
        cfg = self.cfg
        seed_steps = self._steps(cfg.schedule.seed_frames)
        eval_every = cfg.schedule.eval_every_frames
        ckpt_every = cfg.checkpoint_every
        next_eval = eval_every if eval_every > 0 else None
        next_ckpt = ckpt_every if ckpt_every > 0 else None
        self.last_return = float("nan")
        collector = self.make_collector()
        progress = tqdm(total=cfg.frames, unit="frame", disable=not cfg.log.progress,
                        dynamic_ncols=True)
        try:
            for batch in collector:
                batch = batch.reshape(-1)
                self.buffer.extend(batch)
                self.step += batch.shape[0]
                progress.update(batch.shape[0] * self.repeat)
                self._finish_episodes(batch)
                if self.step >= seed_steps:
                    self.update()
                if next_eval is not None and self.frame >= next_eval:
                    self.evaluate()
                    next_eval += eval_every
                if next_ckpt is not None and self.frame >= next_ckpt:
                    self.save_checkpoint()
                    next_ckpt += ckpt_every
                elapsed = time.perf_counter() - self.start_time
                progress.set_postfix(fps=f"{self.frame / max(elapsed, 1e-9):.0f}",
                                     ret=f"{self.last_return:.1f}", refresh=False)
        finally:
            collector.shutdown()
            progress.close()
        if self.last_eval_frame != self.frame:
            self.evaluate()
        self.save_checkpoint()
        plot_learning_curve(self.run_dir)
        self.env.close()
        self.eval_env.close()


CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        trainer = Trainer(cfg)
    except (ConfigError, UnknownTaskError) as error:
        raise SystemExit(f"cp3er-train: {error}") from None
    trainer.train()


if __name__ == "__main__":
    main()
