"""``cp3er-bench [--json] [--quick] [--device cpu|cuda]``: measured figures, one JSON object.

Figures (medians of timed repetitions after warm-up, on this machine):

All agent figures use the run defaults of ``configs/config.yaml`` (``perf.*`` switches on,
glibc allocator tuned); ``--ablation`` adds the update with the switches turned on one by
one from the straightforward implementation.

- ``env_ms``: ms per agent step (action repeat 2) of ``make_env`` for pixels and states.
- ``update_ms``: one CP3ER update (critic step + actor step + Polyak) at the reference
  configuration: batch 256, 9x84x84 pixels, random-shift augmentation, the 39,200-feature
  actor MLP of 3 x 1024 units, MoG critic of 1024 units.
- ``update_trunk_ms``: the same with the actor's Linear+LayerNorm+Tanh trunk (50 features).
- ``act_ms`` / ``act_trunk_ms``: encoder + one-step sampling for one observation (no
  grad), reference actor / actor with the input trunk.
- ``flops_floor_ms``: the update's floating-point work (``torch.utils.flop_counter``:
  matmuls and convolutions, forward and backward, ``update_gflop``) divided by this
  machine's measured dense matmul rate (``matmul_gflops``, a 2048^3 float32 matmul with the
  same threads): the time the update would take at peak; ``update_efficiency`` is
  ``flops_floor_ms / update_ms``.
- ``act_floor_ms``: the bytes of parameters one act reads (encoder + actor), divided by the
  measured memory bandwidth (``memory_gbps``, a 512 MB copy): acting with the 42M-parameter
  reference actor is memory-bound.
- ``update_compile`` (``--compile``): per ``torch.compile`` mode (``default``; on a GPU also
  ``reduce-overhead``, which replays the compiled regions as CUDA graphs): update ms, the
  first (compiling) update's seconds, and that update's losses relative to eager execution
  from the same seeds.
- ``update_cuda_graph`` (``--compile`` on a GPU; ``None`` otherwise): per
  ``perf.precision``, ms per update eager, compiled (``perf.compile``, mode ``default``)
  and replayed from the captured graph (``perf.cuda_graph``; also compiled and graphed,
  fp32), and the largest relative difference of the losses over the first 8 updates with
  the graph against eager updates from the same seeds and batches.
- ``train_fps_cuda_graph`` (a GPU; ``None`` otherwise): ``train_fps`` with
  ``perf.cuda_graph=true``.
- ``train_fps`` / ``train_fps_trunk``: end-to-end training frames per second on pixel
  ``cheetah_run`` at the reference configuration (collector, rendering, replay writes and
  sampling, one update every 2 agent steps), timed after the seed phase over
  ``--fps-updates`` updates.
- ``train_fps_workers``: ``train_fps`` (reference actor) per ``collector.workers``
  (``--workers``: 1,2 on a CPU, 1,4,8 on a GPU) and collector mode (``--collector-modes``:
  sync on a CPU, sync and async on a GPU), from the first timed update to the last (worker
  start-up not timed), with ``updates_per_frame``: updates made per frame collected after
  the seed phase, the first update (at the seed phase's last batch) aside (the schedule's
  0.25, however the workers deliver the frames), and the two counts behind it.
- ``ray_collection_fps`` / ``local_collection_fps`` (``--ray-collection``, printed alone
  with the machine): training-env collection alone, frames per second into the replay
  buffer, per ``collector.backend`` (``ray``: Ray actors on a Ray started on this machine;
  ``local``, for comparison: worker processes, or with 1 worker the env stepped in the
  learner's process), observation (``--ray-collection state,pixels``: pixels 84x84) and
  ``collector.workers`` (``--workers``: 1,2), on cartpole_swingup with the trainer's batches
  (2 agent steps a worker), uniform random actions and no updates; timed from the first
  batch written to the last (``--collection-frames``), the start-up (Ray, actors,
  environments) not timed but reported (``startup_s``).
- ``sample_ms``: one batch of 256 indices from a full 1e6-capacity proximal sampler whose
  storage is on ``--device`` (``sample_device``; the draw itself is on the CPU, the slots
  are then copied there: ``replay.device``).
- ``replay_bytes_per_transition``: storage bytes per stored pixel transition.
- ``replay_1e6`` (``--replay-1e6``): a 1e6-capacity pixel buffer memory-mapped on disk
  (``LazyMemmapStorage``), filled with 1e6 transitions: fill seconds, bytes on disk, the
  process's resident memory (``VmRSS``, anonymous and file-backed) after filling and
  sampling, and ms per sampled batch of 256 (frame stacks and n-step returns included);
  ``replay_rss_gb_1e6`` is that resident memory in GB.
- ``profile_sizes`` (``--profile-sizes``, printed alone with the machine): what the CPU
  pixel profile (``configs/profile/cpu_pixels.yaml``) was sized by: ms per update of each
  agent at candidate sizes (batch, ``hidden_dim``, CP3ER's actor trunk; the profile's
  ``threads``, 1 unless ``--threads``), ms per pixel agent step of its tasks, and
  ``run_minutes``: the estimated wall time of a profile run at each size (agent steps x
  env ms + updates x update ms + evaluation episodes x env ms).
- ``checkpoint``: a training checkpoint's replay buffer of ``--checkpoint-transitions``
  pixel transitions (100,000; 10,000 with ``--quick``): bytes on disk, seconds to write
  it (``save_run_checkpoint``: temporary folder, content hash and fsync of every file, rename,
  atomic ``latest.pt``) and to load it back (``load_run_checkpoint``, which verifies the
  hashes, and ``NStepReplayBuffer.loads``: what a resume does); ``hash_s``: the XXH3-128 of
  every file of the buffer once (page cache warm), the part of ``write_s`` and of
  ``load_s`` the content hashes cost (``hash_frac_write``, ``hash_frac_load``).
  ``--checkpoint-only`` prints this figure alone.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

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


def _synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so host timers measure it (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _update_once(agent, batch, device: torch.device) -> Callable[[], None]:
    """A callable running one update on a copy of ``batch`` (the loss writes into its
    input), finished on the device when it returns: what the update timers time."""

    def update() -> None:
        agent.update(batch)
        _synchronize(device)

    return update


def bench_env(task: str, obs: str, steps: int) -> float:
    from envs import make_env

    env = make_env(task, obs, seed=0)
    env.rollout(3)
    start = time.perf_counter()
    env.rollout(steps, break_when_any_done=False)
    elapsed = time.perf_counter() - start
    env.close()
    return 1000 * elapsed / steps


PERF_SWITCHES = ("tune_allocator", "channels_last", "fused_adam", "share_condition")


def _reference_cfg(trunk: bool, *overrides: str):
    from hydra import compose, initialize_config_dir

    from cp3er.config_schema import CONFIG_DIR

    trunk_key = [] if "agent=drqv2" in overrides else [f"agent.actor_trunk={str(trunk).lower()}"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name="config", overrides=[
            "task=cheetah_run", "obs=pixels", *trunk_key, *overrides])


def _pixel_batch(batch: int, action_dim: int, device: torch.device):
    from tensordict import TensorDict

    pixels = torch.randint(0, 256, (batch, 9, 84, 84), dtype=torch.uint8, device=device)
    return TensorDict({
        "pixels": pixels, "action": torch.rand(batch, action_dim, device=device) * 2 - 1,
        "next": {"pixels": pixels.roll(1, 0),
                 "reward": torch.rand(batch, 1, device=device),
                 "discount": torch.full((batch, 1), 0.99 ** 3, device=device)},
    }, [batch], device=device)


def _build(trunk: bool, device: torch.device, *overrides: str):
    from agents.build import build_agent
    from envs import make_env

    cfg = _reference_cfg(trunk, *overrides)
    env = make_env("cheetah_run", "pixels")
    agent = build_agent(cfg, env, device)
    env.close()
    return cfg, agent


def bench_update(trunk: bool, device: torch.device, repeats: int, *overrides: str,
                 act: bool = True) -> dict:
    """Update ms (and act ms, update GFLOP, parameter bytes per act) at the reference sizes."""
    from tensordict import TensorDict
    from torch.utils.flop_counter import FlopCounterMode

    cfg, agent = _build(trunk, device, *overrides)
    batch = _pixel_batch(cfg.batch_size, 6, device)
    result = {"update_ms": _median_ms(_update_once(agent, batch, device), repeats)}
    if not act:
        return result
    with FlopCounterMode(display=False) as counter:
        agent.update(batch)
    result["update_gflop"] = counter.get_total_flops() / 1e9
    obs = TensorDict({"pixels": batch["pixels"][:1]}, [1])

    def act_once() -> None:
        with torch.no_grad():
            agent.policy(obs.clone())
        _synchronize(device)

    result["act_ms"] = _median_ms(act_once, 20 * repeats, warmup=5)
    result["act_bytes"] = sum(p.numel() * p.element_size() for p in agent.policy.parameters())
    return result


def bench_ablation(device: torch.device, repeats: int) -> dict[str, float]:
    """Update ms with the ``perf`` switches turned on one at a time, cumulatively."""
    out = {}
    for count in range(len(PERF_SWITCHES) + 1):
        on = PERF_SWITCHES[:count]
        overrides = [f"perf.{name}={str(name in on).lower()}" for name in PERF_SWITCHES]
        label = "+".join(on) if on else "straightforward"
        if "tune_allocator" in on:
            from cp3er.perf import tune_allocator

            tune_allocator()  # process-wide and irreversible: hence applied first
        out[label] = round(bench_update(False, device, repeats, *overrides,
                                        act=False)["update_ms"], 1)
    return out


def bench_compile(device: torch.device, mode: str, repeats: int, *overrides: str) -> dict:
    """Update ms with ``torch.compile`` (``perf.compile_mode=mode``) at the reference sizes
    (and ``overrides``, e.g. a precision), the first (compiling) update's seconds, and the
    first update's losses against eager execution from the same seeds (relative
    difference: the same math, reordered)."""
    from tensordict import TensorDict

    from agents.agent import Agent

    def first_update(*overrides: str) -> tuple[Agent, TensorDict, dict, float]:
        torch.manual_seed(0)
        cfg, agent = _build(False, device, *overrides)
        batch = _pixel_batch(cfg.batch_size, 6, device)
        torch.manual_seed(1)
        start = time.perf_counter()
        metrics = {k: float(v) for k, v in agent.update(batch).items()}
        _synchronize(device)
        return agent, batch, metrics, time.perf_counter() - start

    _, _, eager, _ = first_update("perf.compile=false", *overrides)
    agent, batch, compiled, first_s = first_update("perf.compile=true",
                                                   f"perf.compile_mode={mode}", *overrides)
    rel = {k: abs(compiled[k] - eager[k]) / max(abs(eager[k]), 1e-8)
           for k in ("loss_critic", "loss_actor")}
    update = _update_once(agent, batch, device)
    return {"update_ms": round(_median_ms(update, repeats, warmup=3), 2),
            "first_update_s": round(first_s, 1),
            "first_update_rel_diff_vs_eager": {k: float(f"{v:.2e}") for k, v in rel.items()}}


GRAPH_CHECK_UPDATES = 8


def bench_cuda_graph(device: torch.device, precision: str, repeats: int,
                     compiled: bool = False) -> dict:
    """``perf.cuda_graph`` at the reference sizes with ``perf.precision=precision`` (and
    ``perf.compile`` when ``compiled``): ms per replayed update against the eager update's,
    and the largest relative difference of the losses over the first
    ``GRAPH_CHECK_UPDATES`` updates (warm-up, capture, replays) against eager updates from
    the same seeds and batches (the graph replays the eager update's kernels and random
    draws: differences are reordered sums)."""
    def run(*overrides: str) -> tuple[object, list, list[dict[str, float]]]:
        torch.manual_seed(0)
        cfg, agent = _build(False, device, f"perf.precision={precision}",
                            f"perf.compile={str(compiled).lower()}", *overrides)
        batches = []
        for i in range(GRAPH_CHECK_UPDATES):
            torch.manual_seed(10 + i)
            batches.append(_pixel_batch(cfg.batch_size, 6, device))
        torch.cuda.manual_seed(1)
        return agent, batches, [{k: float(v) for k, v in agent.update(b).items()}
                                for b in batches]

    eager, batches, expected = run("perf.cuda_graph=false")
    graphed, _, got = run("perf.cuda_graph=true")
    rel = {key: max(abs(g[key] - e[key]) / max(abs(e[key]), 1e-8)
                    for e, g in zip(expected, got, strict=True))
           for key in ("loss_critic", "loss_actor")}
    return {"eager_ms": round(_median_ms(_update_once(eager, batches[0], device), repeats), 2),
            "graphed_ms": round(_median_ms(_update_once(graphed, batches[0], device),
                                           repeats), 2),
            "max_rel_diff_vs_eager": {k: float(f"{v:.2e}") for k, v in rel.items()}}


#: (batch_size, hidden_dim, CP3ER actor trunk) candidates of the CPU pixel profile.
PROFILE_SIZES = ((32, 256, True), (32, 1024, True), (64, 256, True), (64, 1024, True),
                 (32, 1024, False), (256, 1024, True))
PROFILE_TASKS = ("cartpole_swingup", "reacher_easy")


def bench_profile_sizes(repeats: int) -> dict:
    """Update ms per agent and candidate size, env ms per profile task, and the estimated
    minutes of one run of the profile (its frames, schedule and evaluations) at each size."""
    from hydra import compose, initialize_config_dir

    from cp3er.config_schema import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        profile = compose(config_name="config", overrides=["+profile=cpu_pixels"])
    threads = torch.get_num_threads()
    env_ms = {task: round(bench_env(task, "pixels", 100), 2) for task in PROFILE_TASKS}
    steps = profile.frames // profile.env.action_repeat
    updates = (profile.frames - profile.schedule.seed_frames) // (
        profile.env.action_repeat * profile.schedule.update_every_steps)
    eval_steps = (profile.frames // profile.schedule.eval_every_frames
                  * profile.schedule.eval_episodes * 500)  # 500 agent steps a DMC episode
    mean_env_ms = statistics.mean(env_ms.values())
    update_ms, minutes = {}, {}
    for agent in ("cp3er", "drqv2"):
        for batch, hidden, trunk in PROFILE_SIZES:
            if agent == "drqv2" and not trunk:
                continue  # DrQ-v2's actor always reads the trunk
            name = f"{agent}/batch{batch}/hidden{hidden}" + ("" if trunk else "/no_trunk")
            ms = bench_update(trunk, torch.device("cpu"), repeats, f"agent={agent}",
                              f"batch_size={batch}", f"hidden_dim={hidden}",
                              act=False)["update_ms"]
            update_ms[name] = round(ms, 1)
            total_ms = (steps + eval_steps) * mean_env_ms + updates * ms
            minutes[name] = round(total_ms / 60_000, 1)
    return {"threads": threads, "frames": int(profile.frames), "env_ms": env_ms,
            "update_ms": update_ms, "run_minutes": minutes}


def bench_matmul_gflops(device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)

    def matmul() -> None:
        a @ b
        _synchronize(device)

    return 2 * size**3 / _median_ms(matmul, repeats, warmup=2) / 1e6


def bench_memory_gbps(megabytes: int = 512, repeats: int = 5) -> float:
    """Copy bandwidth (bytes read + written per second) of a large CPU tensor."""
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), repeats, warmup=2)
    return 2 * src.numel() * 4 / ms / 1e6


def bench_train_fps(trunk: bool, device: torch.device, updates: int, workers: int = 1,
                    sync: bool = True, *overrides: str) -> dict[str, float]:
    """End-to-end training speed of ``Trainer`` on pixel cheetah_run after its seed phase,
    with ``collector.workers=workers`` and ``collector.sync=sync``: ``fps``, frames per
    second from the first timed update to the last (``updates`` of them, at the paper's
    ratio: one per 4 frames), and ``updates_per_frame``, the updates the run made per frame
    collected after its seed phase (0.25 at that ratio, however the frames arrived)."""
    import tempfile

    from cp3er.train import Trainer

    seed_frames = 600  # enough transitions for a batch of 256 with n-step and stacks
    frames = seed_frames + 4 * (updates + 1)
    with tempfile.TemporaryDirectory(prefix="cp3er-bench-fps-") as run_dir:
        cfg = _reference_cfg(trunk, f"run_dir={run_dir}", f"device={device.type}",
                             f"schedule.seed_frames={seed_frames}",
                             f"schedule.explore_frames={seed_frames}",
                             f"frames={frames}", "schedule.eval_every_frames=0",
                             "checkpoint_every=0", "log.progress=false", "log.video=false",
                             "replay.capacity=100000", f"collector.workers={workers}",
                             f"collector.sync={str(sync).lower()}", *overrides)
        trainer = Trainer(cfg)
        stamps: list[tuple[int, float]] = []  # (updates made, time) at each update
        update = trainer.update

        def timed_update() -> dict[str, torch.Tensor]:
            metrics = update()
            stamps.append((trainer.loop.updates, time.perf_counter()))
            return metrics

        trainer.update = timed_update  # the collector's start-up (spawning) is not timed
        trainer.run(frames)
        trainer.update_metrics.read()
        (first, start), (last, end) = stamps[0], stamps[-1]
        after_seed = trainer.frame - seed_frames
        result = {
            "fps": (last - first) * 4 / (end - start) if end > start else float("nan"),
            "updates_per_frame": trainer.updates_per_frame(),
            "updates": trainer.loop.updates,
            "frames_after_seed": after_seed,
        }
        trainer.lock.release()
        trainer.env.close()
        trainer.eval_env.close()
    return result


def bench_collection_fps(backend: str, obs: str, workers: int, frames: int,
                         task: str = "cartpole_swingup") -> dict[str, float]:
    """Collection speed of ``Trainer`` with ``collector.backend=backend`` and
    ``collector.workers=workers`` (``sync``: ``[workers, 2]`` batches, as in training) on
    ``task`` from ``obs``: ``fps``, environment frames per second written to the replay
    buffer from the first batch to the last, and ``startup_s``, the seconds before the first
    batch (Ray, the workers and their environments starting). Uniform random actions for
    the whole run (``schedule.explore_frames``) and no updates (``schedule.seed_frames``
    beyond the run): the collection pipeline alone, not the policy's acting."""
    import tempfile

    from hydra import compose, initialize_config_dir

    from cp3er.config_schema import CONFIG_DIR
    from cp3er.train import Trainer

    with tempfile.TemporaryDirectory(prefix="cp3er-bench-collect-") as run_dir:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
            cfg = compose(config_name="config", overrides=[
                f"task={task}", f"obs={obs}", f"run_dir={run_dir}", f"frames={frames}",
                f"schedule.seed_frames={frames + 1}", f"schedule.explore_frames={frames}",
                "schedule.eval_every_frames=0", "checkpoint_every=0", "log.progress=false",
                "log.video=false", f"replay.capacity={max(frames, 256 * workers)}",
                f"collector.backend={backend}", f"collector.workers={workers}"])
        trainer = Trainer(cfg)
        stamps: list[tuple[int, float]] = []  # (agent steps written, time) at each batch
        extend = trainer.buffer.extend

        def timed_extend(rows):
            written = extend(rows)
            stamps.append((trainer.step + rows.numel(), time.perf_counter()))
            return written

        trainer.buffer.extend = timed_extend
        start = time.perf_counter()
        trainer.run(frames)
        (first, t_first), (last, t_last) = stamps[0], stamps[-1]
        repeat = cfg.env.action_repeat
        result = {"fps": (last - first) * repeat / (t_last - t_first) if t_last > t_first
                  else float("nan"), "startup_s": t_first - start}
        trainer.lock.release()
        trainer.env.close()
        trainer.eval_env.close()
    return result


def _rss_gb() -> dict[str, float]:
    fields = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) * 1024 / 1e9
    return fields


def bench_replay_1e6(capacity: int = 1_000_000, samples: int = 20) -> dict:
    """Fill a memory-mapped pixel buffer of ``capacity`` transitions; RSS and sampling."""
    import tempfile

    from tensordict import TensorDict

    from cp3er.replay import make_replay_buffer

    episode, chunk = 500, 1000
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (chunk, 9, 84, 84), dtype=torch.uint8, generator=gen)
    with tempfile.TemporaryDirectory(prefix="cp3er-bench-replay-") as scratch:
        buffer = make_replay_buffer(capacity, obs_key="pixels", storage="memmap",
                                    scratch_dir=scratch)
        start = time.perf_counter()
        for first in range(0, capacity, chunk):
            steps = min(chunk, capacity - first)
            index = torch.arange(first, first + steps)
            done = (index % episode == episode - 1).unsqueeze(-1)
            buffer.extend(TensorDict({
                "pixels": pixels[:steps], "action": torch.zeros(steps, 6),
                "collector": {"traj_ids": index // episode},
                "next": {"pixels": pixels[:steps], "reward": torch.ones(steps, 1),
                         "done": done, "terminated": torch.zeros_like(done),
                         "truncated": done.clone()},
            }, [steps]))
        fill_s = time.perf_counter() - start
        after_fill = _rss_gb()
        disk = sum(p.stat().st_size for p in Path(scratch).rglob("*") if p.is_file())
        sample_ms = _median_ms(buffer.sample, samples, warmup=2)
        after_sample = _rss_gb()
        stored = buffer.storage._storage
        per_transition = sum(t.element_size() * t.numel()
                             for t in stored.values(True, True)) / capacity
    return {"transitions": len(buffer), "fill_s": round(fill_s, 1),
            "disk_bytes": disk, "bytes_per_transition": round(per_transition, 1),
            "rss_gb_after_fill": {k: round(v, 2) for k, v in after_fill.items()},
            "rss_gb_after_sampling": {k: round(v, 2) for k, v in after_sample.items()},
            "sample_batch_ms": round(sample_ms, 1)}


def bench_sampler(repeats: int, device: torch.device) -> float:
    """ms per batch of 256 slots drawn from a full 1e6-row storage on ``device``."""
    from torchrl.data import LazyTensorStorage, ReplayBuffer

    from cp3er.replay import ProximalSampler

    capacity = 1_000_000
    rb = ReplayBuffer(storage=LazyTensorStorage(capacity, device=device),
                      sampler=ProximalSampler())
    rb.extend(torch.zeros(capacity, dtype=torch.uint8, device=device))

    def sample() -> None:
        rb.sampler.sample(rb.storage, 256)
        _synchronize(device)

    return _median_ms(sample, 50 * repeats, warmup=3)


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

    from tensordict import TensorDict

    from cp3er.checkpoint import check_manifest, load_run_checkpoint, save_run_checkpoint
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
        start = time.perf_counter()
        check_manifest(replay)  # the hash of every file once: what a write and a load add
        hash_s = time.perf_counter() - start
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    # The hash and its shares to 3 significant figures, not fixed decimals: hashing the
    # small --quick / test buffers takes a few milliseconds, which round(x, 2) made 0.0.
    return {"transitions": transitions, "bytes": size, "write_s": round(write_s, 2),
            "load_s": round(load_s, 2), "hash_s": float(f"{hash_s:.3g}"),
            "hash_frac_write": float(f"{hash_s / write_s:.3g}"),
            "hash_frac_load": float(f"{hash_s / load_s:.3g}")}


def _machine(device: torch.device) -> dict:
    import os

    import tensordict
    import torchrl

    info = {"platform": platform.platform(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": str(device), "torch": torch.__version__,
            "torchrl": torchrl.__version__, "tensordict": tensordict.__version__}
    try:
        with open("/proc/cpuinfo") as handle:
            info["cpu_model"] = next((line.split(":", 1)[1].strip() for line in handle
                                      if line.startswith("model name")), None)
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _library_logs_to_stderr() -> None:
    """TorchRL logs (``Initialized LazyTensorStorage ...``) to stdout; keep stdout for JSON."""
    import torchrl  # noqa: F401  (its import installs the handler)

    for handler in logging.getLogger("torchrl").handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
            handler.setStream(sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cp3er-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument("--quick", action="store_true",
                        help="fewer repetitions and tasks, no train_fps (CI smoke, < 1 min)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--checkpoint-transitions", type=int, default=None,
                        help="pixel transitions in the checkpoint figure (0: skip it)")
    parser.add_argument("--checkpoint-only", action="store_true",
                        help="only the checkpoint figure (write, load, hashing seconds)")
    parser.add_argument("--replay-1e6", action="store_true",
                        help="fill a 1e6 memory-mapped pixel buffer (~21 GB on disk)")
    parser.add_argument("--ablation", action="store_true",
                        help="update ms with the perf switches turned on one by one")
    parser.add_argument("--compile", action="store_true",
                        help="update ms with torch.compile (and CUDA graphs on a GPU)")
    parser.add_argument("--fps-updates", type=int, default=8,
                        help="updates timed in train_fps (4 frames each)")
    parser.add_argument("--workers", default=None,
                        help="collector.workers values of train_fps_workers (default 1,2 on "
                             "a CPU, 1,4,8 on a GPU)")
    parser.add_argument("--collector-modes", default=None,
                        help="collector modes of train_fps_workers: sync, async or sync,async "
                             "(default sync on a CPU, sync,async on a GPU)")
    parser.add_argument("--ray-collection", nargs="?", const="state,pixels", default=None,
                        metavar="OBS", help="only ray_collection_fps and local_collection_fps "
                        "(collection frames per second on cartpole_swingup, per --workers) "
                        "from these observations (default state,pixels)")
    parser.add_argument("--collection-frames", type=int, default=2000,
                        help="environment frames timed per collection figure")
    parser.add_argument("--profile-sizes", action="store_true",
                        help="only the CPU pixel profile's sizing figures (update ms per "
                             "agent and size, env ms, estimated run minutes; threads 1)")
    parser.add_argument("--env-tasks", default=None,
                        help=f"comma-separated tasks for env_ms (default {','.join(ENV_TASKS)})")
    args = parser.parse_args(argv)
    _library_logs_to_stderr()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.threads is not None or args.profile_sizes:
        torch.set_num_threads(args.threads or 1)
    device = torch.device(args.device)
    repeats = 1 if args.quick else (20 if device.type == "cuda" else 5)
    result: dict = {"machine": _machine(device), "quick": args.quick}
    from cp3er.perf import tune_allocator

    transitions = args.checkpoint_transitions
    if transitions is None:
        transitions = 10_000 if args.quick else 100_000
    if args.checkpoint_only:
        result["checkpoint"] = bench_checkpoint(max(transitions, 1))
        return _print_result(result, args.json)
    if args.ray_collection:
        for backend in ("ray", "local"):
            result[f"{backend}_collection_fps"] = {
                f"{obs}/workers{n}": {k: round(v, 1) for k, v in bench_collection_fps(
                    backend, obs, int(n), args.collection_frames).items()}
                for obs in args.ray_collection.split(",")
                for n in (args.workers or "1,2").split(",")}
        return _print_result(result, args.json)
    if args.profile_sizes:
        result["allocator_tuned"] = tune_allocator()
        result["profile_sizes"] = bench_profile_sizes(min(repeats, 3))
        return _print_result(result, args.json)
    if args.ablation:  # before anything tunes the allocator
        result["update_ablation_ms"] = bench_ablation(device, repeats)
    result["allocator_tuned"] = tune_allocator()
    tasks = ENV_TASKS[:1] if args.quick else ENV_TASKS
    if args.env_tasks is not None:
        tasks = tuple(t for t in args.env_tasks.split(",") if t)
    result["env_ms"] = {f"{t}/{obs}": round(bench_env(t, obs, 30 if args.quick else 200), 2)
                        for t in tasks for obs in ("pixels", "state")}
    reference = bench_update(False, device, repeats)
    trunk = bench_update(True, device, repeats)
    matmul_gflops = bench_matmul_gflops(device, 1024 if args.quick else 2048)
    floor_ms = reference["update_gflop"] / matmul_gflops * 1e3
    result.update({
        "update_ms": round(reference["update_ms"], 1),
        "update_trunk_ms": round(trunk["update_ms"], 1),
        "update_gflop": round(reference["update_gflop"], 1),
        "update_trunk_gflop": round(trunk["update_gflop"], 1),
        "matmul_gflops": round(matmul_gflops, 1),
        "flops_floor_ms": round(floor_ms, 1),
        "update_efficiency": round(floor_ms / reference["update_ms"], 3),
        "act_ms": round(reference["act_ms"], 2),
        "act_trunk_ms": round(trunk["act_ms"], 2),
    })
    if device.type == "cpu":
        gbps = bench_memory_gbps(128 if args.quick else 512)
        result["memory_gbps"] = round(gbps, 1)
        result["act_floor_ms"] = round(reference["act_bytes"] / gbps / 1e6, 2)
    if args.compile:
        modes = ("default", "reduce-overhead") if device.type == "cuda" else ("default",)
        result["update_compile"] = {}
        for mode in modes:
            try:
                result["update_compile"][mode] = bench_compile(device, mode, repeats)
            except Exception as error:  # a mode that fails on this stack is reported
                result["update_compile"][mode] = {"error": f"{type(error).__name__}: "
                                                           f"{str(error)[:300]}"}
    result["update_cuda_graph"] = None
    if args.compile and device.type == "cuda":
        from agents.agent import PRECISIONS

        result["update_cuda_graph"] = {}
        cases = [(p, False) for p in PRECISIONS] + [("fp32", True)]
        for precision, compiled in cases:
            name = precision + ("_compiled" if compiled else "")
            try:
                figures = bench_cuda_graph(device, precision, repeats, compiled)
                if not compiled:  # the compiled update without the graph, this precision
                    figures["compiled_ms"] = bench_compile(
                        device, "default", repeats, f"perf.precision={precision}")["update_ms"]
                result["update_cuda_graph"][name] = figures
            except Exception as error:  # reported, as a failing compile mode is
                result["update_cuda_graph"][name] = {"error": f"{type(error).__name__}: "
                                                              f"{str(error)[:300]}"}
    result["sample_ms"] = round(bench_sampler(min(repeats, 5), device), 3)
    result["sample_device"] = str(device)
    result["replay_bytes_per_transition"] = round(bench_replay_bytes(), 1)
    for key, trunk_on in (("train_fps", False), ("train_fps_trunk", True)):
        result[key] = (None if args.quick else
                       round(bench_train_fps(trunk_on, device, args.fps_updates)["fps"], 2))
    result["train_fps_cuda_graph"] = None
    if not args.quick and device.type == "cuda":
        result["train_fps_cuda_graph"] = round(bench_train_fps(
            False, device, args.fps_updates, 1, True, "perf.cuda_graph=true")["fps"], 2)
    result["train_fps_workers"] = None
    if not args.quick:
        workers = args.workers or ("1,4,8" if device.type == "cuda" else "1,2")
        modes = args.collector_modes or ("sync,async" if device.type == "cuda" else "sync")
        result["train_fps_workers"] = {
            f"workers{n}_{mode}": {k: round(v, 3) for k, v in bench_train_fps(
                False, device, args.fps_updates, int(n), mode == "sync").items()}
            for n in workers.split(",") for mode in modes.split(",")}
    result["replay_rss_gb_1e6"] = None
    if args.replay_1e6:
        result["replay_1e6"] = bench_replay_1e6()
        result["replay_rss_gb_1e6"] = result["replay_1e6"]["rss_gb_after_sampling"]["VmRSS"]
    if transitions > 0:
        result["checkpoint"] = bench_checkpoint(transitions)
    return _print_result(result, args.json)


def _print_result(result: dict, as_json: bool) -> int:
    print(json.dumps(result) if as_json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
