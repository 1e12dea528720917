"""The training loop's contract: uniform random actions before ``explore_frames`` and the
policy's after, evaluation episodes kept out of the replay buffer, the update order
(critic step, actor step against the updated critic, Polyak after both), and the DrQ-v2
baseline through the same builder and trainer (its noise schedule survives a resume)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from tensordict.nn import TensorDictModule
from tiny_run import floats
from torch import nn

from cp3er.config_schema import CONFIG_DIR
from cp3er.train import Trainer

TINY_STATE = [
    "task=cartpole_balance", "obs=state", "hidden_dim=32", "feature_dim=16", "batch_size=16",
    "replay.capacity=5000", "schedule.seed_frames=200", "schedule.explore_frames=200",
    "schedule.eval_every_frames=0", "schedule.eval_episodes=1", "log.progress=false",
    "checkpoint_every=0",
]


def _cfg(run_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name="config",
                       overrides=[f"run_dir={run_dir}", *TINY_STATE, *overrides])


class _ConstantAction(nn.Module):
    def __init__(self, action_dim: int, value: float) -> None:
        super().__init__()
        self.action_dim, self.value = action_dim, value

    def forward(self, observation: torch.Tensor) -> torch.Tensor:
        return torch.full((*observation.shape[:-1], self.action_dim), self.value)


def _stored_actions(trainer: Trainer) -> torch.Tensor:
    """The actions of the rows written so far, in write order (no episode ended here)."""
    buffer = trainer.buffer
    assert buffer.write_count <= buffer.capacity
    return buffer.storage._storage["action"][: buffer.write_count].reshape(-1)


def test_random_actions_before_explore_frames_then_the_policy(tmp_path: Path) -> None:
    """The collector acts uniformly at random for the first ``explore_frames`` and with the
    agent's policy after: a constant policy makes the two phases tell apart exactly."""
    trainer = Trainer(_cfg(tmp_path, "frames=600", "schedule.explore_frames=400"))
    trainer.agent.policy = TensorDictModule(_ConstantAction(1, 0.321), ["observation"],
                                            ["action"])
    assert trainer.train() == "done"
    actions = _stored_actions(trainer)
    assert actions.numel() == 300  # 600 frames, action repeat 2, no episode ended
    explore, policy = actions[:200], actions[200:]
    assert torch.all(policy == 0.321)
    assert explore.min() < -0.8 and explore.max() > 0.8  # uniform on [-1, 1]
    assert not torch.any(explore == 0.321)
    assert abs(float(explore.mean())) < 0.15


def test_evaluation_episodes_never_enter_the_replay_buffer(tmp_path: Path) -> None:
    """Two evaluations of a 500-step episode each during a 200-step run: the buffer holds
    the 200 training steps only (the reference code writes evaluation rollouts into it)."""
    trainer = Trainer(_cfg(tmp_path, "frames=400", "schedule.eval_every_frames=200"))
    assert trainer.train() == "done"
    with open(tmp_path / "metrics.csv") as handle:
        evals = [line for line in handle if ",eval," in line]
    assert len(evals) == 2
    assert trainer.buffer.write_count == 200 == len(trainer.buffer)


@pytest.mark.parametrize("agent", ["cp3er", "drqv2"])
def test_update_order_critic_then_actor_then_polyak(tmp_path: Path, agent: str) -> None:
    """The actor loss sees the critic after its optimiser step, and the target critic moves
    towards that critic: ``target' = (1 - tau) target + tau critic'``."""
    trainer = Trainer(_cfg(tmp_path, "frames=400", f"agent={agent}"))
    trainer.train()  # fills the buffer (and checks the loop end to end)
    loss, updater = trainer.agent.loss, trainer.agent.updater
    critic_before = loss.critic_params.clone()
    target_before = loss.target_critic_params.clone()
    seen = {}
    actor_loss = loss.actor_loss

    def spying_actor_loss(batch, features):
        seen["critic"] = loss.critic_params.clone()
        return actor_loss(batch, features)

    loss.actor_loss = spying_actor_loss
    trainer.update()
    critic_after = loss.critic_params
    tau = 1.0 - float(updater.eps)  # TorchRL keeps eps = 1 - tau
    for key, value in critic_after.items(True, True):
        assert torch.equal(seen["critic"][key], value), key  # the actor step saw critic'
    changed = [key for key, value in critic_after.items(True, True)
               if not torch.equal(value, critic_before[key])]
    assert changed  # the critic step happened before the actor step
    for key, target in loss.target_critic_params.items(True, True):
        expected = (1 - tau) * target_before[key] + tau * critic_after[key]
        torch.testing.assert_close(target, expected, rtol=1e-5, atol=1e-7)


def test_drqv2_noise_schedule_and_updates_survive_a_resume(tmp_path: Path) -> None:
    """DrQ-v2 through ``build_agent`` and ``Trainer``: its exploration noise follows the
    linear schedule in agent steps, is restored by a resume, and the updates after the
    checkpoint equal those of the trainer that wrote it."""
    args = ("frames=1000", "agent=drqv2", "agent.stddev_steps=2000")
    original = Trainer(_cfg(tmp_path, *args))
    original.train()  # 500 agent steps, ends with a checkpoint
    noise = original.agent.exploration
    assert int(noise.steps) == 500
    assert float(noise.sigma) == pytest.approx(1.0 + (0.1 - 1.0) * 500 / 2000)
    expected = [floats(original.update()) for _ in range(3)]
    restored = Trainer(_cfg(tmp_path, *args, "resume=true"))
    assert int(restored.agent.exploration.steps) == 500
    assert float(restored.agent.exploration.sigma) == pytest.approx(float(noise.sigma))
    assert [floats(restored.update()) for _ in range(3)] == expected


def test_run_until_a_frame_then_train_finishes_the_run(tmp_path: Path) -> None:
    """``Trainer.run(until_frame)`` is the loop alone (no final evaluation or checkpoint);
    ``train()`` continues from where it stopped and adds them."""
    trainer = Trainer(_cfg(tmp_path, "frames=600", "checkpoint_every=400",
                           "schedule.eval_every_frames=400"))
    assert trainer.run(300) is None and trainer.frame == 300
    assert trainer.loop.updates == 26  # updates at agent steps 100, 102, ..., 150
    assert not (tmp_path / "checkpoints").exists() and trainer.loop.last_eval_frame == -1
    assert trainer.run(500) is None and trainer.frame == 500
    assert trainer.loop.last_eval_frame == 400 and (tmp_path / "checkpoints").is_dir()
    assert trainer.train() == "done" and trainer.frame == 600
    assert trainer.loop.last_eval_frame == 600
