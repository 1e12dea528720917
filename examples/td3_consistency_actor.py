"""The CP3ER consistency actor inside TorchRL's own ``TD3Loss``, with the CP3ER regulariser.

A plain TorchRL TD3 pipeline (collector, ``ReplayBuffer`` with ``LazyTensorStorage``,
``TD3Loss`` with its own twin Q-networks, target networks and TD(0) estimator,
``SoftUpdate``) in which only the actor is swapped for CP3ER's one-step consistency
policy, and the actor loss gets CP3ER's sample-based entropy term:

    loss_actor = TD3 actor loss (-Q1(s, pi(s))) + lambda * L_c(a_replay, s)

Runs on a state-based DMC task (default ``cartpole_balance``)::

    python examples/td3_consistency_actor.py --frames 20000

and prints the evaluation return every ``--eval-every`` frames. Any TorchRL env with a
continuous action spec in [-1, 1] and an ``observation`` entry works the same way.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torchrl.collectors import Collector
from torchrl.data import LazyTensorStorage, ReplayBuffer
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules import MLP, ValueOperator
from torchrl.objectives import SoftUpdate, TD3Loss

from agents.cp3er import ConsistencyRegularizer, make_consistency_actor
from envs import make_env


class QNetwork(nn.Module):
    """``Q(s, a)``: an MLP on the concatenated observation and action."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: int) -> None:
        super().__init__()
        self.net = MLP(in_features=obs_dim + action_dim, out_features=1,
                       num_cells=[hidden, hidden], activation_class=nn.ReLU)

    def forward(self, observation: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([observation, action], -1))


def build(obs_dim: int, action_dim: int, action_spec, hidden: int = 256,
          weight: float = 0.05, gamma: float = 0.99):
    """(policy, TD3Loss, regulariser) for vector observations read from ``observation``."""
    actor = make_consistency_actor(obs_dim, action_dim, hidden_dim=hidden,
                                   in_key="observation")
    qvalue = ValueOperator(QNetwork(obs_dim, action_dim, hidden),
                           in_keys=["observation", "action"])
    loss = TD3Loss(actor, qvalue, action_spec=action_spec, loss_function="l2")
    loss.make_value_estimator(gamma=gamma)
    return actor, loss, ConsistencyRegularizer(actor, weight=weight)


def evaluate(env, policy, episodes: int = 3) -> float:
    returns = []
    with torch.no_grad(), set_exploration_type(ExplorationType.DETERMINISTIC):
        for _ in range(episodes):
            rollout = env.rollout(10_000, policy, break_when_any_done=True)
            returns.append(float(rollout["next", "reward"].sum()))
    return sum(returns) / len(returns)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="cartpole_balance")
    parser.add_argument("--frames", type=int, default=20_000, help="agent steps")
    parser.add_argument("--random-frames", type=int, default=2_000)
    parser.add_argument("--eval-every", type=int, default=5_000)
    parser.add_argument("--weight", type=float, default=0.05, help="lambda of L_c")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    env = make_env(args.task, "state", seed=args.seed, action_repeat=2)
    eval_env = make_env(args.task, "state", seed=args.seed + 1000, action_repeat=2)
    obs_dim = env.observation_spec["observation"].shape[-1]
    action_dim = env.action_spec.shape[-1]
    actor, loss, regularizer = build(obs_dim, action_dim, env.action_spec, weight=args.weight)
    updater = SoftUpdate(loss, tau=0.005)
    actor_opt = torch.optim.Adam(loss.actor_network_params.values(True, True), lr=args.lr)
    critic_opt = torch.optim.Adam(loss.qvalue_network_params.values(True, True), lr=args.lr)
    buffer = ReplayBuffer(storage=LazyTensorStorage(args.frames), batch_size=256)
    collector = Collector(env, actor, frames_per_batch=2, total_frames=args.frames,
                          init_random_frames=args.random_frames)
    for step, batch in enumerate(collector, start=1):
        buffer.extend(batch.reshape(-1))
        frames = step * 2
        if frames < args.random_frames:
            continue
        sample = buffer.sample()
        loss_value, _ = loss.value_loss(sample)
        critic_opt.zero_grad()
        loss_value.backward()
        critic_opt.step()
        if step % 2 == 0:  # TD3's delayed policy update
            loss_actor, _ = loss.actor_loss(sample)
            # TD3Loss keeps the actor's own parameters (same tensors), so the regulariser's
            # gradient reaches actor_opt's parameters
            loss_actor = loss_actor + regularizer(sample)
            actor_opt.zero_grad()
            loss_actor.backward()
            actor_opt.step()
            updater.step()
        if frames % args.eval_every == 0:
            print(f"frame {frames}: eval return {evaluate(eval_env, actor):.1f}", flush=True)
    collector.shutdown()


if __name__ == "__main__":
    main()
