"""How fast can each critic's output reach the scale of the returns? ``python
benchmarks/diagnostics/critic_scale.py [--steps 10000] [--scale 100]`` prints one JSON object.

A supervised stand-in for the first phase of TD learning: regress Q(s, a) onto a fixed
target ``scale * (1 + 0.2 tanh(w.s) - 0.1 a^2)`` (64-dim features, 1-dim actions, batch 32,
Adam) and report the mean absolute error, for DrQ-v2's double-Q critic (MSE) and CP3ER's
MoG critic (NLL of 20 targets with unit noise) over widths, ``init_scale`` and lr. Cartpole
returns reach ~100-200 per state: a critic that cannot grow that far in the first ~10k
updates lags its TD targets.
"""

from __future__ import annotations

import argparse
import json

import torch

from agents.critic import MoGCritic, mog_log_prob, mog_mean
from agents.drqv2 import DoubleQCritic

VARIANTS = {  # name: (critic, hidden_dim, init_scale, lr)
    "drqv2_h256": ("drqv2", 256, None, 1e-4),
    "drqv2_h1024": ("drqv2", 1024, None, 1e-4),
    "cp3er_h256": ("cp3er", 256, 1e-3, 1e-4),
    "cp3er_h256_init0.1": ("cp3er", 256, 0.1, 1e-4),
    "cp3er_h1024": ("cp3er", 1024, 1e-3, 1e-4),
    "cp3er_h256_lr3e-4": ("cp3er", 256, 1e-3, 3e-4),
    "cp3er_h1024_lr3e-4": ("cp3er", 1024, 1e-3, 3e-4),
}
CHECKPOINTS = (500, 1000, 2000, 4000, 6000, 10_000, 20_000, 40_000)


def run(kind: str, hidden: int, init_scale: float | None, lr: float, steps: int,
        scale: float, seed: int = 0) -> dict[int, float]:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    repr_dim, action_dim, batch = 64, 1, 32
    features = torch.randn(4096, repr_dim, generator=generator)
    actions = torch.rand(4096, action_dim, generator=generator) * 2 - 1
    w = torch.randn(repr_dim, generator=generator) / repr_dim ** 0.5
    targets = scale * (1 + 0.2 * torch.tanh(features @ w) - 0.1 * actions[:, 0] ** 2)
    targets = targets.unsqueeze(-1)
    if kind == "cp3er":
        critic = MoGCritic(repr_dim, action_dim, 50, hidden, 3, init_scale)
    else:
        critic = DoubleQCritic(repr_dim, action_dim, 50, hidden)
    optimizer = torch.optim.Adam(critic.parameters(), lr=lr)

    def q_values(f: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        if kind == "cp3er":
            loc, _, logits = critic(f, a)
            return mog_mean(loc, logits)
        return critic(f, a)[0]

    errors = {}
    for step in range(1, steps + 1):
        index = torch.randint(0, 4096, (batch,), generator=generator)
        f, a, y = features[index], actions[index], targets[index]
        if kind == "cp3er":
            samples = y + torch.randn(batch, 20, generator=generator)
            loss = -mog_log_prob(*critic(f, a), samples).mean()
        else:
            q1, q2 = critic(f, a)
            loss = (q1 - y).square().mean() + (q2 - y).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step in CHECKPOINTS:
            with torch.no_grad():
                errors[step] = round(float((q_values(features[:512], actions[:512])
                                            - targets[:512]).abs().mean()), 2)
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--scale", type=float, default=100.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result = {"scale": args.scale, "metric": "mean |Q - target| after N updates",
              "variants": {name: run(*spec, args.steps, args.scale)
                           for name, spec in VARIANTS.items()}}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
