"""``cp3er-bench [--json] [--quick] [--device cpu|cuda]``: measured figures, one JSON object.

Figures (medians of timed repetitions after warm-up, on this machine):

- ``env_ms``: ms per agent step (action repeat 2) of ``make_env`` for pixels and states.
- ``update_ms``: one CP3ER update (critic step + actor step + Polyak) at the reference
  configuration: batch 256, 9x84x84 pixels, random-shift augmentation, the 39,200-feature
  actor MLP of 3 x 1024 units, MoG critic of 1024 units.
- ``update_trunk_ms``: the same with the actor's Linear+LayerNorm+Tanh trunk (50 features).
- ``act_ms``: encoder + one-step sampling for one observation (no grad).
- ``sample_ms``: one batch of 256 indices from a full 1e6-capacity proximal sampler.
- ``replay_bytes_per_transition``: storage bytes per stored pixel transition.
- ``checkpoint``: a training checkpoint's replay buffer of ``--checkpoint-transitions``
  pixel transitions (100,000; 10,000 with ``--quick``): bytes on disk, seconds to write
  it (``save_run_checkpoint``: temporary folder, rename, atomic ``latest.pt``) and to load
  it back (``NStepReplayBuffer.loads``, what a resume does).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

ENV_TASKS = ("cheetah_run", "humanoid_run", "quadruped_walk", "mw_assembly")


def _median_ms(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def bench_env(task: str, obs: str, steps: int) -> float:
    from envs import make_env

    env = make_env(task, obs, seed=0)
    env.rollout(3)
    start = time.perf_counter()
    env.rollout(steps, break_when_any_done=False)
    elapsed = time.perf_counter() - start
    env.close()
    return 1000 * elapsed / steps


def _reference_cfg(trunk: bool):
    from hydra import compose, initialize_config_dir

    from cp3er.train import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name="config", overrides=[
            "task=cheetah_run", "obs=pixels", f"agent.actor_trunk={str(trunk).lower()}"])


def _pixel_batch(batch: int, action_dim: int, device: torch.device):
    from tensordict import TensorDict

    pixels = torch.randint(0, 256, (batch, 9, 84, 84), dtype=torch.uint8, device=device)
    return TensorDict({
        "pixels": pixels, "action": torch.rand(batch, action_dim, device=device) * 2 - 1,
        "next": {"pixels": pixels.roll(1, 0),
                 "reward": torch.rand(batch, 1, device=device),
                 "discount": torch.full((batch, 1), 0.99 ** 3, device=device)},
    }, [batch], device=device)


def bench_update(trunk: bool, device: torch.device, repeats: int) -> tuple[float, float]:
    """(update ms, act ms) at the reference sizes."""
    from tensordict import TensorDict

    from agents.build import build_agent
    from envs import make_env

    cfg = _reference_cfg(trunk)
    env = make_env("cheetah_run", "pixels")
    agent = build_agent(cfg, env, device)
    env.close()
    action_dim = 6
    batch = _pixel_batch(cfg.batch_size, action_dim, device)

    def update() -> None:
        agent.update(batch.clone())
        if device.type == "cuda":
            torch.cuda.synchronize()

    update_ms = _median_ms(update, repeats)
    obs = TensorDict({"pixels": batch["pixels"][:1]}, [1])

    def act() -> None:
        with torch.no_grad():
            agent.policy(obs.clone())

    act_ms = _median_ms(act, 20 * repeats, warmup=5)
    return update_ms, act_ms


def bench_sampler(repeats: int) -> float:
    from torchrl.data import LazyTensorStorage, ReplayBuffer

    from cp3er.replay import ProximalSampler

    capacity = 1_000_000
    rb = ReplayBuffer(storage=LazyTensorStorage(capacity), sampler=ProximalSampler())
    rb.extend(torch.zeros(capacity, dtype=torch.uint8))
    return _median_ms(lambda: rb.sampler.sample(rb.storage, 256), 50 * repeats, warmup=3)


def bench_replay_bytes() -> float:
    from tensordict import TensorDict

    from cp3er.replay import make_replay_buffer

    buffer = make_replay_buffer(1000, obs_key="pixels", frame_stack=3)
    steps = 200
    pixels = torch.zeros(steps, 9, 84, 84, dtype=torch.uint8)
    done = torch.zeros(steps, 1, dtype=torch.bool)
    batch = TensorDict({
        "pixels": pixels, "action": torch.zeros(steps, 6),
        "collector": {"traj_ids": torch.zeros(steps, dtype=torch.long)},
        "next": {"pixels": pixels, "reward": torch.zeros(steps, 1), "done": done,
                 "terminated": done.clone(), "truncated": done.clone()},
    }, [steps])
    buffer.extend(batch)
    stored = buffer.storage._storage
    total = sum(t.element_size() * t.numel() for t in stored.values(True, True))
    return total / buffer.capacity


def bench_checkpoint(transitions: int) -> dict:
    import shutil
    import tempfile
    from pathlib import Path

    from tensordict import TensorDict

    from cp3er.checkpoint import load_run_checkpoint, save_run_checkpoint
    from cp3er.replay import make_replay_buffer

    episode = 500  # DMC: 500 agent steps an episode; chunks shaped like collector batches
    buffer = make_replay_buffer(transitions + transitions // episode + 1, obs_key="pixels")
    gen = torch.Generator().manual_seed(0)
    chunk = 100
    for first in range(0, transitions, chunk):
        steps = min(chunk, transitions - first)
        pixels = torch.randint(0, 256, (steps, 9, 84, 84), dtype=torch.uint8, generator=gen)
        done = (torch.arange(first, first + steps) % episode == episode - 1).unsqueeze(-1)
        buffer.extend(TensorDict({
            "pixels": pixels, "action": torch.rand(steps, 6, generator=gen),
            "collector": {"traj_ids": torch.arange(first, first + steps) // episode},
            "next": {"pixels": pixels, "reward": torch.rand(steps, 1, generator=gen),
                     "done": done, "terminated": torch.zeros_like(done),
                     "truncated": done.clone()},
        }, [steps]))
    run_dir = Path(tempfile.mkdtemp(prefix="cp3er-bench-ckpt-"))
    try:
        start = time.perf_counter()
        save_run_checkpoint({"agent": {}, "config": {}, "counters": {}, "rng": {}}, run_dir,
                            buffer, frame=2 * transitions)
        write_s = time.perf_counter() - start
        size = sum(p.stat().st_size for p in (run_dir / "checkpoints").rglob("*")
                   if p.is_file())
        fresh = make_replay_buffer(buffer.capacity, obs_key="pixels")
        start = time.perf_counter()
        _, replay = load_run_checkpoint(run_dir)
        fresh.loads(replay)
        load_s = time.perf_counter() - start
        assert fresh.write_count == buffer.write_count
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return {"transitions": transitions, "bytes": size, "write_s": round(write_s, 2),
            "load_s": round(load_s, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cp3er-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and tasks")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--checkpoint-transitions", type=int, default=None,
                        help="pixel transitions in the checkpoint figure (0: skip it)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    device = torch.device(args.device)
    repeats = 2 if args.quick else 5
    tasks = ENV_TASKS[:1] if args.quick else ENV_TASKS
    env_ms = {f"{t}/{obs}": round(bench_env(t, obs, 30 if args.quick else 200), 2)
              for t in tasks for obs in ("pixels", "state")}
    update_ms, act_ms = bench_update(False, device, repeats)
    update_trunk_ms, _ = bench_update(True, device, repeats)
    result = {
        "env_ms": env_ms,
        "update_ms": round(update_ms, 1),
        "update_trunk_ms": round(update_trunk_ms, 1),
        "act_ms": round(act_ms, 2),
        "sample_ms": round(bench_sampler(repeats), 3),
        "replay_bytes_per_transition": round(bench_replay_bytes(), 1),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_threads": torch.get_num_threads(), "device": args.device,
                    "torch": torch.__version__},
        "quick": args.quick,
    }
    transitions = args.checkpoint_transitions
    if transitions is None:
        transitions = 10_000 if args.quick else 100_000
    if transitions > 0:
        result["checkpoint"] = bench_checkpoint(transitions)
    import torchrl

    result["machine"]["torchrl"] = torchrl.__version__
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
