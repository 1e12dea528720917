"""Parallel collection (``collector.workers``): one replay stream per worker, checked
against each worker's stream written alone; the schedule's update count however the frames
arrive; reproducible synchronous collection; a resumed multi-worker run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_replay import RUN, Episode, FakeCollector, _check_against_oracle
from tiny_run import tiny_cfg

from cp3er.replay import NStepReplayBuffer, StreamedReplayBuffer, make_replay_buffer
from cp3er.train import Trainer

# worker B's episodes (worker A runs test_replay.RUN); B's trajectory ids are offset
RUN_B = [Episode(4, "truncated"), Episode(10, "terminated"), Episode(2, "terminated"),
         Episode(15, None)]
TRAJ_B = 100


def _batch_b(fake: FakeCollector, first: int, last: int):
    batch = fake.batch(first, last)
    batch["collector", "traj_ids"] = batch["collector", "traj_ids"] + TRAJ_B
    return batch


@pytest.mark.parametrize("obs_key,stack,shape",
                         [("pixels", 3, (3, 2, 2)), ("observation", 1, (4,))],
                         ids=["pixels", "state"])
def test_each_stream_equals_its_workers_stream_written_alone(obs_key: str, stack: int,
                                                             shape: tuple) -> None:
    """Two workers' chunks interleaved (one at a time, as MultiAsyncCollector yields them,
    and stacked [2, T] as MultiSyncCollector does) give, in each ring, exactly the stacks,
    n-step targets and valid slots of that worker's stream alone, through ring wraps. (No
    one-at-a-time chunk starts an episode after the first two, so routing by trajectory
    keeps each worker in its ring here too.)"""
    kwargs = {"obs_key": obs_key, "frame_stack": stack, "n_step": 3, "gamma": 0.97}
    fake_a, fake_b = (FakeCollector(run, obs_key, stack, shape) for run in (RUN, RUN_B))
    streamed = StreamedReplayBuffer(32, 2, **kwargs)  # 16 rows a stream: both wrap
    alone = [NStepReplayBuffer(16, **kwargs) for _ in range(2)]
    chunks_a, chunks_b = [4, 6, 1, 9, 7], [3, 2, 8, 5, 7]
    a = b = 0
    for size_a, size_b in zip(chunks_a, chunks_b, strict=True):
        batch_a, batch_b = fake_a.batch(a, a + size_a), _batch_b(fake_b, b, b + size_b)
        for batch, rb in ((batch_a, alone[0]), (batch_b, alone[1])):
            rb.extend(batch)
        if size_a == size_b:  # the stacked path
            streamed.extend(torch.stack([batch_a, batch_b]))
        else:
            streamed.extend(batch_b if a % 2 else batch_a)
            streamed.extend(batch_a if a % 2 else batch_b)
        a, b = a + size_a, b + size_b
        for stream, fake, steps in ((streamed.streams[0], fake_a, a),
                                    (streamed.streams[1], fake_b, b)):
            _check_against_oracle(stream, fake, steps)
    # a stacked [2, T] batch: row 0 continues worker A's episode, row 1 worker B's
    streamed.extend(torch.stack([fake_a.batch(a, a + 6), _batch_b(fake_b, b, b + 6)]))
    _check_against_oracle(streamed.streams[0], fake_a, a + 6)
    _check_against_oracle(streamed.streams[1], fake_b, b + 6)
    assert streamed.streams[0].write_count == 33 + 5  # steps + final-frame rows
    assert len(streamed) == 32


def _state_chunk(first: int, count: int, traj: int):
    """``count`` steps of one unfinished episode whose observation is the step number."""
    from tensordict import TensorDict
    steps = torch.arange(first, first + count, dtype=torch.float32)[:, None]
    false = torch.zeros(count, 1, dtype=torch.bool)
    return TensorDict({
        "observation": steps, "action": torch.zeros(count, 1),
        "next": {"observation": steps + 1, "reward": torch.ones(count, 1), "done": false,
                 "terminated": false, "truncated": false},
        "collector": {"traj_ids": torch.full((count,), traj)}}, [count])


def test_a_batch_is_split_between_streams_by_their_sampling_mass() -> None:
    """Uniform sampling over all stored rows: a stream holding 3x the rows of the other
    gives 3/4 of a batch; ``index`` numbers the whole buffer, ``stream`` names the ring."""
    rb = make_replay_buffer(2000, streams=2, obs_key="observation", frame_stack=1,
                            sampler="uniform", batch_size=4000,
                            generator=torch.Generator().manual_seed(0))
    rb.extend(_state_chunk(0, 600, traj=0))
    rb.extend(_state_chunk(0, 200, traj=1))
    batch = rb.sample()
    share = float((batch["stream"] == 0).double().mean())
    assert share == pytest.approx(600 / 800, abs=0.02)  # 4000 draws: sd 0.007
    in_second = batch["stream"] == 1
    assert bool((batch["index"][in_second] >= 1000).all())
    assert bool((batch["index"][~in_second] < 1000).all())
    # a row's observation is its step: the second stream's rows all come from its 200
    assert float(batch["observation"][in_second].max()) < 200


def test_streams_checkpoint_round_trip_and_layout_check(tmp_path: Path) -> None:
    kwargs = {"obs_key": "observation", "frame_stack": 1, "batch_size": 64}
    rb = make_replay_buffer(400, streams=2, **kwargs)
    rb.extend(torch.stack([_state_chunk(0, 50, traj=0), _state_chunk(0, 50, traj=1)]))
    rb.dumps(tmp_path / "rb")
    restored = make_replay_buffer(400, streams=2, **kwargs)
    restored.loads(tmp_path / "rb")
    torch.manual_seed(3)
    want = rb.sample()
    torch.manual_seed(3)
    assert (restored.sample() == want).all()
    with pytest.raises(ValueError, match=r"collector\.workers"):
        make_replay_buffer(400, streams=3, **kwargs).loads(tmp_path / "rb")
    with pytest.raises(ValueError, match=r"collector\.workers > 1"):
        make_replay_buffer(400, **kwargs).loads(tmp_path / "rb")


@pytest.mark.parametrize("sync", [True, False], ids=["sync", "async"])
def test_two_workers_collect_the_frames_and_the_schedules_updates(tmp_path: Path,
                                                                  sync: bool) -> None:
    """2 worker processes: the run collects its frames, performs one update per
    ``update_every_steps`` agent steps from ``seed_frames`` on (as one worker does), and a
    resumed run continues with the same count."""
    args = ("frames=1000", "collector.workers=2", f"collector.sync={str(sync).lower()}",
            "checkpoint_every=0")
    trainer = Trainer(tiny_cfg(tmp_path, *args))
    assert trainer.run(600) is None
    assert trainer.frame == 600 and trainer.loop.updates == 300 // 2 - 100 // 2 + 1
    trainer.save_checkpoint()
    trainer.lock.release()
    resumed = Trainer(tiny_cfg(tmp_path, *args, "resume=true"))
    assert resumed.train() == "done"
    assert resumed.frame == 1000 and resumed.buffer.write_count == 500
    assert resumed.loop.updates == 500 // 2 - 100 // 2 + 1  # 201: as with one worker
    # seed_frames 200 (tiny run, action repeat 2): 200 updates for 800 frames after them
    assert resumed.updates_per_frame() == 0.25
    rows = [len(s) for s in resumed.buffer.streams]
    # sync: every batch holds both workers' chunks; async: chunks as they come
    assert rows == [250, 250] if sync else sum(rows) == 500


def test_synchronous_workers_are_reproducible(tmp_path: Path) -> None:
    """``collector.workers=2`` with ``sync=true`` and a fixed seed: the same transitions in
    each stream, the same update metrics, the same parameters."""
    runs = []
    for name in ("a", "b"):
        trainer = Trainer(tiny_cfg(tmp_path / name, "frames=800", "collector.workers=2",
                                   "checkpoint_every=0"))
        assert trainer.run(800) is None
        trainer.update_metrics.read()
        stored = [s.storage._storage[: len(s)].select("frame", "action").clone()
                  for s in trainer.buffer.streams]
        runs.append((stored, dict(trainer.loop.pending_metrics),
                     trainer.agent.loss.state_dict()))
        trainer.lock.release()
    (stored_a, metrics_a, params_a), (stored_b, metrics_b, params_b) = runs
    assert len(metrics_a["loss_critic"]) == 400 // 2 - 100 // 2 + 1
    assert [len(a) for a in stored_a] == [200, 200]
    assert all((a == b).all() for a, b in zip(stored_a, stored_b, strict=True))
    # the two workers act differently (their own seeds): the streams are not copies
    assert not torch.equal(stored_a[0]["action"], stored_a[1]["action"])
    assert metrics_a == metrics_b
    assert all(torch.equal(params_a[k], params_b[k]) for k in params_a)
