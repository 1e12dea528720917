"""``perf.precision``: fp32 keeps the update's numbers, tf32 switches CUDA flags for the
update only (a no-op on a CPU), bf16 autocasts the update's forward passes (losses,
parameters and optimiser steps in fp32); acting stays fp32."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hydra import compose, initialize_config_dir
from tiny_run import random_state_batch

from agents.agent import Agent
from agents.build import build_agent
from cp3er.config_schema import CONFIG_DIR
from envs import make_env

UPDATES = 3


def _agent(precision: str) -> tuple[Agent, int]:
    """A tiny CP3ER agent on state cartpole_swingup built from seed 0; its obs size."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose(config_name="config", overrides=[
            "task=cartpole_swingup", "obs=state", "hidden_dim=32", "batch_size=16",
            f"perf.precision={precision}"])
    env = make_env("cartpole_swingup", "state")
    obs_dim = env.observation_spec["observation"].shape[-1]
    env.close()
    torch.manual_seed(0)
    return build_agent(cfg, env), obs_dim


def _run(agent: Agent, obs_dim: int) -> list[dict[str, float]]:
    """The metrics of UPDATES updates on fixed batches, each from its own seed."""
    metrics = []
    for i in range(UPDATES):
        batch = random_state_batch(obs_dim, size=16, seed=i)
        torch.manual_seed(100 + i)
        metrics.append({k: float(v) for k, v in agent.update(batch).items()})
    return metrics


@pytest.fixture(scope="module")
def fp32() -> list[dict[str, float]]:
    return _run(*_agent("fp32"))


def _tf32_flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def test_fp32_and_cpu_tf32_keep_the_updates_numbers(fp32) -> None:
    """fp32 is the agent without the option (the dataclass default), bit for bit; tf32
    changes CUDA flags only, so on a CPU it is bit-identical too; it sets them for the
    update (its losses see them) and restores them after."""
    agent, obs_dim = _agent("fp32")
    default = Agent(**{f.name: getattr(agent, f.name) for f in dataclasses.fields(Agent)
                       if f.name != "precision"})
    assert default.precision == "fp32"
    assert _run(default, obs_dim) == fp32
    before = _tf32_flags()
    agent, obs_dim = _agent("tf32")
    seen = []
    critic_loss = agent.loss.critic_loss

    def recording_critic_loss(*args):
        seen.append(_tf32_flags())
        return critic_loss(*args)

    agent.loss.critic_loss = recording_critic_loss
    assert _run(agent, obs_dim) == fp32
    assert seen == [(True, True)] * UPDATES and _tf32_flags() == before


def test_bf16_updates_are_finite_close_to_fp32_and_keep_fp32_state(fp32) -> None:
    agent, obs_dim = _agent("bf16")
    bf16 = _run(agent, obs_dim)
    for metrics in bf16:
        assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), metrics
    for key in ("loss_critic", "loss_actor"):  # first update: same parameters and batch
        assert bf16[0][key] == pytest.approx(fp32[0][key], rel=0.05, abs=1e-3), key
    assert bf16[0] != fp32[0]  # autocast did run the forward passes in bfloat16
    assert all(p.dtype == torch.float32 for p in agent.loss.parameters())
    for optimizer in agent.optimizers.values():
        for state in optimizer.state.values():
            assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())
    batch = random_state_batch(obs_dim, size=4)
    with torch.no_grad():  # acting is not autocast
        assert agent.policy(batch.select("observation"))["action"].dtype == torch.float32


def test_unknown_precision_is_refused() -> None:
    agent, _ = _agent("fp32")
    with pytest.raises(ValueError, match=r"perf.precision='fp16'.*'fp32', 'tf32', 'bf16'"):
        dataclasses.replace(agent, precision="fp16")
