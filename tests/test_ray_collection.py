"""Collection through Ray (``collector.backend=ray``, TorchRL's ``RayCollector``): 2 workers
as actors of a Ray started on this machine collect the frames, the learner makes the
schedule's update count, each worker's trajectory ids stay its own, the random exploration
steps are split as documented, Ray is shut down after the run and on preemption (whose
SIGTERM handler ``ray.init`` must not replace). Each test starts its own Ray (about 30 s
on 2 busy cores: Ray, then the actors importing torch, TorchRL and dm_control). Skipped
where the ``ray`` extra is not installed."""

from __future__ import annotations

import os
import signal
from datetime import timedelta
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="collector.backend=ray needs the ray extra: "
                                        "pip install -e '.[ray]'")

from tiny_run import tiny_cfg  # noqa: E402

from cp3er.checkpoint import load_run_checkpoint  # noqa: E402
from cp3er.collection import (  # noqa: E402
    RAY_WEIGHT_SYNC_TIMEOUT,
    TRAJ_ID_OFFSET,
    RayClusterError,
    WorkerDiedError,
    lengthen_ray_weight_sync_timeout,
    ray_random_steps,
    ray_runtime,
)
from cp3er.train import Trainer  # noqa: E402

RAY = ("collector.backend=ray", "collector.workers=2", "checkpoint_every=0")


def test_random_steps_are_rounded_up_to_whole_batches_of_all_workers() -> None:
    """RayCollector gives each worker ``init_random_frames // workers`` random steps; the
    request is rounded up so each share is whole chunks and the total the local sync one."""
    assert ray_random_steps(100, workers=2, chunk=2) == 100  # 50 a worker
    assert ray_random_steps(5000, workers=3, chunk=2) == 5004  # as ceil(5000 / 6) batches
    assert ray_random_steps(1, workers=4, chunk=2) == 8
    assert ray_random_steps(0, workers=2, chunk=2) == ray_random_steps(-1, 2, 2) == 0


def test_ray_weight_sync_waits_for_slow_actors(monkeypatch) -> None:
    """TorchRL's 60 s wait for the actors to join the weight-sync group is raised, never
    lowered. The constant must exist: if a TorchRL upgrade renames it, this fails and the
    workaround (cp3er.collection) needs a look."""
    from torchrl.weight_update import _ray as ray_weight_sync

    assert isinstance(ray_weight_sync._DIST_TIMEOUT, timedelta)
    monkeypatch.setattr(ray_weight_sync, "_DIST_TIMEOUT", timedelta(seconds=60))
    lengthen_ray_weight_sync_timeout()
    assert ray_weight_sync._DIST_TIMEOUT == RAY_WEIGHT_SYNC_TIMEOUT > timedelta(seconds=60)
    monkeypatch.setattr(ray_weight_sync, "_DIST_TIMEOUT", timedelta(minutes=30))
    lengthen_ray_weight_sync_timeout()
    assert ray_weight_sync._DIST_TIMEOUT == timedelta(minutes=30)


def test_ray_runtime_checks_the_cpus_and_leaves_a_ray_it_did_not_start_running() -> None:
    """Fewer CPUs than workers: one clear error, not actors waiting forever; a Ray already
    running in the process (a cluster connected to) is used and left running."""
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False,
             logging_level="warning")
    try:
        with pytest.raises(RayClusterError, match=r"collector.workers=2 needs 2 CPUs "
                                                  r"\(one per worker\); .* has 1"):
            with ray_runtime(None, workers=2):
                pass
        with ray_runtime(None, workers=1):
            assert ray.is_initialized()
        assert ray.is_initialized()
    finally:
        ray.shutdown()


class _Probe:
    """Wraps a trainer: records each batch written to replay (shape, trajectory ids per
    row), the remote workers' ``init_random_frames``, whether the preemption handler held
    SIGTERM at each update, and sends SIGTERM at update ``preempt_at`` (if given)."""

    def __init__(self, trainer: Trainer, preempt_at: int | None = None) -> None:
        self.batches: list[tuple[tuple[int, ...], list[set[int]]]] = []
        self.random_steps: list[int] = []
        self.handler_kept: list[bool] = []
        extend, make_collector, update = (trainer.buffer.extend, trainer.make_collector,
                                          trainer.update)

        def probe_extend(rows):
            traj = rows["collector", "traj_ids"]
            self.batches.append((tuple(rows.shape), [set(r.tolist()) for r in traj]))
            return extend(rows)

        def probe_make_collector(until_frame: int):
            collector = make_collector(until_frame)
            self.random_steps = collector.get_distant_attr("init_random_frames")
            return collector

        def probe_update():
            handler = signal.getsignal(signal.SIGTERM)
            self.handler_kept.append(getattr(handler, "__name__", "") == "_handle")
            if trainer.loop.updates + 1 == preempt_at:
                os.kill(os.getpid(), signal.SIGTERM)
            return update()

        trainer.buffer.extend = probe_extend
        trainer.make_collector = probe_make_collector
        trainer.update = probe_update


def test_ray_sync_workers_collect_the_frames_and_the_schedules_updates(tmp_path: Path) -> None:
    """Sync: ``[2, 2]`` stacks, row k from worker k (its trajectory ids offset by k); 50
    random steps a worker (100 in all: the schedule's explore frames); the run collects its
    frames with one update per 2 agent steps from the seed frames on (151, as one local
    worker makes), each replay stream holding its worker's 150 steps; the preemption
    handler keeps SIGTERM during the run and Ray, started by the run, is shut down after."""
    trainer = Trainer(tiny_cfg(tmp_path, "frames=600", *RAY))
    probe = _Probe(trainer)
    assert trainer.run(600) is None
    assert not ray.is_initialized()
    assert probe.random_steps == [50, 50]
    assert probe.handler_kept and all(probe.handler_kept)
    assert {shape for shape, _ in probe.batches} == {(2, 2)}
    for _, rows in probe.batches:
        assert [min(r) // TRAJ_ID_OFFSET for r in rows] == [0, 1]
    assert trainer.frame == 600 and trainer.buffer.write_count == 300
    assert trainer.loop.updates == 300 // 2 - 100 // 2 + 1
    assert [len(s) for s in trainer.buffer.streams] == [150, 150]
    trainer.lock.release()


def test_ray_async_chunks_go_to_their_workers_streams_and_preemption_stops_ray(
        tmp_path: Path) -> None:
    """Async, from pixels (a channels-last encoder, whose weights the pushes must carry):
    one worker's ``[2]`` chunk at a time, each chunk's trajectory ids those of one worker
    (both workers seen), routed to the replay streams; SIGTERM at update 60 stops the run
    at the next batch (workers' tasks still in flight) with the schedule's update count so
    far and Ray shut down; a checkpoint is then written as cp3er-train does."""
    trainer = Trainer(tiny_cfg(tmp_path, "frames=600", *RAY, "collector.sync=false",
                               "obs=pixels", "agent.actor_trunk=true"))
    assert trainer.cfg.perf.channels_last
    probe = _Probe(trainer, preempt_at=60)
    assert trainer.run(600) == signal.SIGTERM
    assert not ray.is_initialized()
    assert 200 < trainer.frame < 600 and trainer.loop.updates == trainer.due_updates() >= 60
    assert sum(len(s) for s in trainer.buffer.streams) == trainer.step
    assert {shape for shape, _ in probe.batches} == {(1, 2)}
    workers = [{i // TRAJ_ID_OFFSET for i in rows[0]} for _, rows in probe.batches]
    assert all(len(w) == 1 for w in workers)  # no chunk mixes two workers' ids
    assert set().union(*workers) == {0, 1}
    trainer.save_checkpoint()
    trainer.lock.release()


def test_a_ray_actor_killed_mid_run_is_one_line_and_a_checkpoint(tmp_path: Path) -> None:
    """Issue "run safety, round 3", item 1 for the Ray backend: a worker actor killed
    (``ray.kill``, as a lost node or an out-of-memory kill ends it) after 30 updates stops
    the run with a :class:`WorkerDiedError` naming a Ray actor, not a hang; ``train`` writes
    a checkpoint of what was collected and Ray, started by the run, is shut down."""
    trainer = Trainer(tiny_cfg(tmp_path, "frames=2000", *RAY))
    make_collector, update = trainer.make_collector, trainer.update
    collectors = []

    def keep_collector(until_frame: int):
        collectors.append(make_collector(until_frame))
        return collectors[-1]

    def update_then_kill():
        if trainer.loop.updates + 1 == 30:
            ray.kill(collectors[0].remote_collectors[1])
        return update()

    trainer.make_collector, trainer.update = keep_collector, update_then_kill
    with pytest.raises(WorkerDiedError, match=r"^a collector worker \(Ray actor\) died"):
        trainer.train()
    assert not ray.is_initialized()
    state, _ = load_run_checkpoint(tmp_path)
    assert 0 < state["counters"]["step"] == trainer.step < 1000
    assert trainer.loop.updates >= 30 and not trainer.lock.held
