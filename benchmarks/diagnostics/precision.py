"""What ``perf.precision`` changes in the update: ``python benchmarks/diagnostics/precision.py
[--device cpu|cuda] [--task cheetah_run] [--obs state] [--agent cp3er] [--updates 20]
[overrides ...]`` prints one JSON object.

The same agent (seed 0) takes ``--updates`` updates per precision on the same replay
batches (a seeded random-action rollout), each update from the same seed. Per precision:
``loss_critic`` / ``loss_actor``, their relative difference to fp32's (the first update
from identical parameters, later ones with the drift) and the median ms per update after
the first. ``tf32`` needs ``--device cuda``. Extra arguments are Hydra overrides.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from hydra import compose, initialize_config_dir

from agents.build import build_agent
from cp3er.builders import make_buffer
from cp3er.config_schema import CONFIG_DIR
from envs import make_env

LOSSES = ("loss_critic", "loss_actor")


def replay_batches(cfg, count: int, rollout_steps: int) -> list:
    """``count`` batches of a random-action rollout of ``rollout_steps`` agent steps."""
    import tempfile

    env = make_env(cfg.task_name, str(cfg.obs), seed=0)
    data = env.rollout(rollout_steps, break_when_any_done=False)
    env.close()
    with tempfile.TemporaryDirectory(prefix="cp3er-precision-") as scratch:
        buffer = make_buffer(cfg, scratch)
        buffer.extend(data)
        torch.manual_seed(0)
        return [buffer.sample() for _ in range(count)]


def run(cfg, precision: str, batches: list, device: torch.device) -> dict:
    """Losses of one update per batch and the median ms per update after the first."""
    cfg.perf.precision = precision
    env = make_env(cfg.task_name, str(cfg.obs), seed=0)
    torch.manual_seed(0)
    agent = build_agent(cfg, env, device)
    env.close()
    losses, times = {k: [] for k in LOSSES}, []
    for i, batch in enumerate(batches):
        torch.manual_seed(1000 + i)
        start = time.perf_counter()
        metrics = {k: float(v) for k, v in agent.update(batch.to(device)).items()}  # synced
        times.append(time.perf_counter() - start)
        for key in LOSSES:
            losses[key].append(metrics[key])
    return {"losses": losses, "update_ms": round(1000 * statistics.median(times[1:]), 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--task", default="cheetah_run")
    parser.add_argument("--obs", default="state", choices=("state", "pixels"))
    parser.add_argument("--agent", default="cp3er", choices=("cp3er", "drqv2"))
    parser.add_argument("--updates", type=int, default=20)
    parser.add_argument("--rollout-steps", type=int, default=2000)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the run config")
    args = parser.parse_args(argv)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose(config_name="config", overrides=[
            f"task={args.task}", f"obs={args.obs}", f"agent={args.agent}",
            "replay.capacity=100000", *args.overrides])
    device = torch.device(args.device)
    precisions = ("fp32", "tf32", "bf16") if device.type == "cuda" else ("fp32", "bf16")
    batches = replay_batches(cfg, args.updates, args.rollout_steps)
    runs = {p: run(cfg, p, batches, device) for p in precisions}
    result = {"device": str(device), "task": args.task, "obs": args.obs, "agent": args.agent,
              "batch_size": cfg.batch_size, "hidden_dim": cfg.hidden_dim,
              "updates": args.updates, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "precisions": {}}
    reference = runs["fp32"]["losses"]
    for precision, out in runs.items():
        rel = {k: [abs(x - r) / max(abs(r), 1e-12) for x, r in zip(v, reference[k], strict=True)]
               for k, v in out["losses"].items()}
        result["precisions"][precision] = {
            "update_ms": out["update_ms"],
            "losses": {k: [float(f"{x:.6g}") for x in v] for k, v in out["losses"].items()},
            "rel_diff_vs_fp32": {k: {"first": float(f"{v[0]:.3g}"),
                                     "median": float(f"{statistics.median(v):.3g}"),
                                     "max": float(f"{max(v):.3g}")} for k, v in rel.items()},
        }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
