"""The CP3ER consistency actor inside TorchRL's own ``TD3Loss``, with the CP3ER regulariser.

A plain TorchRL TD3 pipeline (collector, ``ReplayBuffer``, ``TD3Loss`` with its twin
Q-networks, targets and TD(0) estimator, ``SoftUpdate``) with only the actor swapped for
CP3ER's one-step consistency policy and the actor loss
``-Q1(s, pi(s)) + lambda * L_c(a_replay, s)``, on a state DMC task::

    python examples/td3_consistency_actor.py --frames 40000 [--threads auto] [--device cpu]

Frames are environment frames (agent steps x action repeat 2). docs/torchrl_actor.md.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torchrl.collectors import Collector
from torchrl.data import LazyTensorStorage, ReplayBuffer
from torchrl.envs.utils import ExplorationType
from torchrl.modules import MLP, ValueOperator
from torchrl.objectives import SoftUpdate, TD3Loss
from tqdm import tqdm

from agents.consistency_policy import ConsistencyRegularizer, make_consistency_actor
from cp3er.evaluate import run_episodes
from cp3er.logs import quiet_torchrl
from cp3er.threads import add_device_threads_arguments, apply_threads
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
                                   in_key="observation", spec=action_spec)
    qvalue = ValueOperator(QNetwork(obs_dim, action_dim, hidden),
                           in_keys=["observation", "action"])
    loss = TD3Loss(actor, qvalue, action_spec=action_spec, loss_function="l2")
    # TorchRL runs value_loss/actor_loss under DETERMINISTIC by default, where the actor acts
    # its repeatable D(0, sigma_max | s): train on its samples instead
    loss.deterministic_sampling_mode = ExplorationType.RANDOM
    loss.make_value_estimator(gamma=gamma)
    return actor, loss, ConsistencyRegularizer(actor, weight=weight)


def evaluate(env, policy, episodes: int = 3) -> float:
    """Mean return of ``episodes`` deterministic episodes (the policy may sit on a GPU)."""
    results = run_episodes(env, policy, episodes)
    return sum(results.returns) / len(results.returns)


ACTION_REPEAT = 2


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="cartpole_balance")
    parser.add_argument("--frames", type=int, default=40_000,
                        help="environment frames (agent steps x action repeat 2)")
    parser.add_argument("--random-frames", type=int, default=4_000,
                        help="environment frames of uniform random actions first")
    parser.add_argument("--eval-every", type=int, default=10_000, help="environment frames")
    parser.add_argument("--weight", type=float, default=0.05, help="lambda of L_c")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=1)
    add_device_threads_arguments(parser)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available on this machine")
    quiet_torchrl()
    threads, how = apply_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    env = make_env(args.task, "state", seed=args.seed, action_repeat=ACTION_REPEAT)
    eval_env = make_env(args.task, "state", seed=args.seed + 1000, action_repeat=ACTION_REPEAT)
    obs_dim = env.observation_spec["observation"].shape[-1]
    action_dim = env.action_spec.shape[-1]
    actor, loss, regularizer = build(obs_dim, action_dim, env.action_spec, weight=args.weight)
    loss.to(device)
    updater = SoftUpdate(loss, tau=0.005)
    actor_opt = torch.optim.Adam(loss.actor_network_params.values(True, True), lr=args.lr)
    critic_opt = torch.optim.Adam(loss.qvalue_network_params.values(True, True), lr=args.lr)
    steps = args.frames // ACTION_REPEAT
    buffer = ReplayBuffer(storage=LazyTensorStorage(max(steps, 1)), batch_size=256)
    collector = Collector(env, actor, frames_per_batch=2, total_frames=steps,
                          init_random_frames=args.random_frames // ACTION_REPEAT,
                          device=device, storing_device="cpu",
                          auto_register_policy_transforms=False)
    print(f"TD3 + consistency actor on {args.task} (state): {args.frames:,} frames "
          f"({steps:,} agent steps, action repeat {ACTION_REPEAT}), {args.device}, "
          f"{threads} threads ({how}); eval every {args.eval_every:,} frames", flush=True)
    progress = tqdm(total=args.frames, unit="frame", dynamic_ncols=True)
    for step, batch in enumerate(collector, start=1):
        buffer.extend(batch.reshape(-1))
        frames = step * 2 * ACTION_REPEAT  # 2 agent steps a batch
        progress.update(2 * ACTION_REPEAT)
        if frames % args.eval_every == 0:
            progress.write(f"frame {frames}: eval return {evaluate(eval_env, actor):.1f}")
        if frames < args.random_frames:
            continue
        sample = buffer.sample().to(device)
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
    progress.close()
    collector.shutdown()


if __name__ == "__main__":
    main()
