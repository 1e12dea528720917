"""Probe a run's checkpoint for policy collapse: ``python benchmarks/diagnostics/probe_checkpoint.py
<run_dir> [--states 20] [--samples 64]`` prints one JSON object.

At ``--states`` states of an evaluation rollout of the checkpoint's own policy:

* ``bound_frac``: share of action entries on the bounds (CP3ER: its one-step samples;
  DrQ-v2: its mean action ``tanh(mu)``);
* ``spread``: ``action_spread`` of ``--samples`` draws per state (0 for DrQ-v2);
* ``between_states``: ``sqrt(mean over dimensions of the variance over states)`` of the
  per-state mean action: 0 for one action everywhere (cartpole_swingup's constant push),
  ~1 for a bang-bang policy whose side switches with the state;
* ``preclip_beyond_bound`` (CP3ER): share of one-step outputs beyond [-1, 1] before the
  clamp, which no gradient reaches;
* ``q_range``: per state, ``max - min`` of Q over 9 actions ``a = g * 1`` (g in [-1, 1]),
  averaged, beside ``q_mean``: how much the critic distinguishes actions at all.
"""

from __future__ import annotations

import argparse
import json

import torch

from agents.critic import mog_mean
from agents.policy_stats import action_spread, bound_fraction
from cp3er.builders import restore_agent_for_eval
from cp3er.checkpoint import load_checkpoint


def _q_values(loss, features: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    with loss.critic_params.to_module(loss.critic):
        out = loss.critic(features, action)
    if len(out) == 3:  # MoG critic: (loc, scale, logits)
        return mog_mean(out[0], out[2]).squeeze(-1)
    return torch.minimum(*out).squeeze(-1)


def _between_states(actions: torch.Tensor) -> float:
    """``sqrt(mean over dimensions of the variance over states)`` of ``actions [states,
    action_dim]`` (ddof 0): the state-to-state variation of a per-state action."""
    return float(actions.var(dim=0, unbiased=False).mean().sqrt())


@torch.no_grad()
def probe(run_dir: str, states: int = 20, samples: int = 64, seed: int = 7) -> dict:
    torch.manual_seed(seed)
    state = load_checkpoint(run_dir)  # once: a running run replaces latest.pt
    cfg, env, agent = restore_agent_for_eval(state, seed=seed)
    rollout = env.rollout(10 * states, agent.policy, break_when_any_done=False)
    env.close()
    loss = agent.loss
    obs = rollout[agent.obs_key][::10][:states]
    features = loss.encoder.module(obs)
    action_dim = rollout["action"].shape[-1]
    frame = state["counters"]["step"] * cfg.env.action_repeat
    result = {"run_dir": run_dir, "agent": cfg.get("label") or cfg.agent.name, "frame": frame,
              "states": len(obs)}
    if cfg.agent.name == "cp3er":
        policy = loss.actor.module
        draws = policy.samples_at(features, len(obs), samples)
        denoiser = policy.denoiser
        sigma = denoiser.schedule.sigma_max
        noise = sigma * torch.randn(samples, len(obs), action_dim)
        preclip = denoiser.unclipped(noise, sigma, features.expand(samples, *features.shape))
        result.update(bound_frac=float(bound_fraction(draws)),
                      spread=float(action_spread(draws)),
                      between_states=_between_states(draws.mean(0)),
                      preclip_beyond_bound=float((preclip.abs() > 1).float().mean()))
    else:
        mean = loss.mean_actor(features)
        result.update(bound_frac=float(bound_fraction(mean)), spread=0.0,
                      between_states=_between_states(mean))
    grid = torch.linspace(-1, 1, 9)
    q = torch.stack([_q_values(loss, features, torch.full((len(obs), action_dim), float(g)))
                     for g in grid])  # [9, states]
    result.update(q_mean=float(q.mean()), q_range=float((q.max(0).values
                                                         - q.min(0).values).mean()))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--states", type=int, default=20)
    parser.add_argument("--samples", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(json.dumps(probe(args.run_dir, args.states, args.samples)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
