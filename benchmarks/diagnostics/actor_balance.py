"""Does CP3ER's sample-based entropy term hold the policy's spread against a critic that
prefers the action bounds? ``python benchmarks/diagnostics/actor_balance.py [--updates 2000]
[--seeds 2]`` prints one JSON object (docs/results/actor_balance.json).

A controlled stand-in for the pixel runs' actor step (docs/results, "Diagnosis"): the
production :meth:`agents.consistency_policy.CP3ERLoss.actor_loss` on the profile's actor
(3 x 1024, trunk to 50, clamp, Adam lr 1e-4), the critic replaced by a *fixed* function,
the replay holding uniform random actions only (the most favourable replay for the entropy
term). Critics, with ``u(s) = tanh(3 W s)``, ``a*(s) = 0.5 tanh(W s)``:

- ``none``: Q = 0, the control (the policy should spread like the replay, ~0.58);
- ``linear``: Q = slope * u(s) . a, best on the bound sign(u(s)); slopes 0.05 and 0.15 vary
  Q by 0.1 and 0.3 over the range, as the checkpoint probe measured in the pixel runs;
- ``interior``: Q = -slope * |a - a*(s)|^2, best inside the box.

Reported per checkpoint on 64 held-out states x 8 draws: ``bound_frac`` (within 1e-3 of
+-1), ``spread`` (``action_spread``) and, for ``interior``, ``dist`` (mean |mean draw -
a*(s)|). Variants differ in the critic, slope, batch (32: CPU pixel profile, 256: paper) or
lambda.
"""

from __future__ import annotations

import argparse
import json

import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn

from agents.consistency_policy import CP3ERLoss, make_consistency_actor
from agents.policy_stats import action_spread, bound_fraction

#: name: (critic kind, slope, batch size, lambda)
VARIANTS = {
    "none_b32": ("none", 0.0, 32, 0.05),
    "linear0.05_b32": ("linear", 0.05, 32, 0.05),
    "linear0.05_b256": ("linear", 0.05, 256, 0.05),
    "linear0.15_b32": ("linear", 0.15, 32, 0.05),
    "linear0.15_b64": ("linear", 0.15, 64, 0.05),
    "linear0.15_b256": ("linear", 0.15, 256, 0.05),
    "linear0.05_b32_lambda0.5": ("linear", 0.05, 32, 0.5),
    "linear0.15_b32_lambda0.5": ("linear", 0.15, 32, 0.5),
    "linear0.15_b32_lambda2": ("linear", 0.15, 32, 2.0),
    "interior0.15_b32": ("interior", 0.15, 32, 0.05),
}
CHECKPOINTS = (250, 500, 1000, 1500, 2000, 3000, 4000, 6000)
REPR_DIM, POOL, EVAL_STATES, EVAL_DRAWS = 256, 4096, 64, 8


class FixedCritic(nn.Module):
    """A critic that does not learn: ``mean(features, action)`` is a fixed function (module
    docstring). ``scale`` is its one (frozen) parameter, for the loss's functional copy."""

    def __init__(self, kind: str, slope: float, action_dim: int,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.kind = kind
        self.register_buffer("weight", torch.randn(REPR_DIM, action_dim, generator=generator)
                             / REPR_DIM ** 0.5)
        self.scale = nn.Parameter(torch.tensor(slope), requires_grad=False)

    def best_action(self, features: torch.Tensor) -> torch.Tensor:
        if self.kind == "interior":
            return 0.5 * torch.tanh(features @ self.weight)
        return torch.sign(features @ self.weight)

    def mean(self, features: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return self.scale * (torch.tanh(3 * features @ self.weight) * action).sum(-1)
        if self.kind == "interior":
            return -self.scale * (action - self.best_action(features)).square().sum(-1)
        return (0 * action).sum(-1)


def run(kind: str, slope: float, batch: int, lambda_: float, updates: int,
        action_dim: int, seed: int) -> dict[int, dict[str, float]]:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    features = torch.randn(POOL + EVAL_STATES, REPR_DIM, generator=generator)
    actions = torch.rand(POOL, action_dim, generator=generator) * 2 - 1
    held_out = features[POOL:]
    actor = make_consistency_actor(REPR_DIM, action_dim, hidden_dim=1024, trunk_dim=50)
    critic = FixedCritic(kind, slope, action_dim, generator)
    encoder = TensorDictModule(nn.Identity(), ["observation"], ["features"])
    loss_module = CP3ERLoss(encoder, actor, critic, lambda_consistency=lambda_)
    optimizer = torch.optim.Adam(actor.parameters(), lr=1e-4)
    policy = loss_module.policy
    out = {}
    for step in range(1, updates + 1):
        index = torch.randint(0, POOL, (batch,), generator=generator)
        batch_td = TensorDict({"action": actions[index]}, [batch])
        loss, _ = loss_module.actor_loss(batch_td, features[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step in CHECKPOINTS:
            samples = policy.samples_at(held_out, EVAL_STATES, EVAL_DRAWS)
            stats = {"bound_frac": round(float(bound_fraction(samples)), 4),
                     "spread": round(float(action_spread(samples)), 4)}
            if kind == "interior":
                dist = (samples.mean(0) - critic.best_action(held_out)).abs().mean()
                stats["dist"] = round(float(dist), 4)
            out[step] = stats
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=2000)
    parser.add_argument("--action-dim", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--only", nargs="*", choices=sorted(VARIANTS),
                        help="run only these variants (default: all)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    names = args.only or list(VARIANTS)
    result = {
        "what": "fixed critic, uniform replay, the production CP3ER actor loss; "
                "per variant and seed: {updates: {bound_frac, spread[, dist]}}",
        "action_dim": args.action_dim,
        "variants": {name: {seed: run(*VARIANTS[name], args.updates, args.action_dim, seed)
                            for seed in range(1, args.seeds + 1)}
                     for name in names},
    }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
