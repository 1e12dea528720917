"""Checkpoints and resume: real runs killed (SIGKILL) or preempted (SIGTERM) and resumed;
a resumed run continues exactly from its checkpoint; broken or mismatched checkpoints and
run folders give clear errors."""

from __future__ import annotations

import csv
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from tiny_run import floats
from tiny_run import tiny_cfg as _cfg
from tiny_run import tiny_command as _command
from tiny_run import wait_for as _wait_for

from cp3er import evaluate
from cp3er.checkpoint import (
    CheckpointError,
    atomic_torch_save,
    load_checkpoint,
    load_run_checkpoint,
)
from cp3er.run_state import LoopState, ResumeError
from cp3er.train import Trainer

TIMING_COLUMNS = ("seconds", "fps")


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _untimed(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows]


def _counters(run_dir: Path) -> dict:
    state, _ = load_run_checkpoint(run_dir)
    return state["counters"]


def _cut_point(trainer: Trainer) -> tuple[int, int]:
    return trainer.buffer.write_count, trainer.buffer._last_episode


def _check_cut(trainer: Trainer, cut_at: int, last_episode: int) -> None:
    """The episode interrupted at the checkpoint is cut in the replay buffer: the first row
    written after the resume starts a new episode, and the cut episode's last row (its next
    frame was never written) is not a transition start."""
    buffer = trainer.buffer
    storage = buffer.storage._storage
    slot = (buffer._head_slot - (buffer.write_count - 1 - cut_at)) % buffer.capacity
    assert int(storage["episode"][slot]) == last_episode + 1
    assert int(storage["step"][slot]) == 0
    before = torch.tensor([(slot - 1) % buffer.capacity])
    assert int(storage["episode"][before]) == last_episode
    assert not bool(buffer.valid_mask(before))


# One update every 10 agent steps keeps the subprocess runs short (the loop is the same).
FAST = ("schedule.update_every_steps=10",)


def test_sigkill_then_resume(tmp_path: Path) -> None:
    """SIGKILL after a checkpoint, resume twice from copies of the killed run: both finish
    with the right step count and clean metrics, and are identical (same checkpoint, same
    updates after it)."""
    run = tmp_path / "run"
    args = ("frames=2000", "checkpoint_every=400", *FAST)
    process = subprocess.Popen(_command(run, *args), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    # meanwhile (startup takes a while): resume=true without a checkpoint is a clear error
    refused = subprocess.run(_command(tmp_path / "none", "resume=true"), capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 1
    assert "cp3er-train: resume=true but run_dir=" in refused.stderr
    assert "Traceback" not in refused.stderr

    ckpt = run / "checkpoints" / "latest.pt"
    _wait_for(ckpt.exists, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    frame = 2 * _counters(run)["step"]
    assert 400 <= frame < 2000 and frame % 400 == 0
    before = _rows(run)
    shutil.copytree(run, tmp_path / "twin")

    # one resume in a subprocess, the other in this process, at the same time
    resumed = subprocess.Popen(_command(run, *args, "resume=true"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    twin = Trainer(_cfg(tmp_path / "twin", *args, "resume=true"))
    assert twin.resumed_from == frame
    cut = _cut_point(twin)
    assert twin.train() == "done"
    _check_cut(twin, *cut)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resumed {run} from frame {frame}" in err

    counters = _counters(run)
    assert counters["step"] == 1000
    rows = _rows(run)
    # rows up to the checkpoint kept as they were, rows written after it dropped
    kept = [r for r in before if int(r["frame"]) <= frame]
    assert rows[: len(kept)] == kept
    train = [int(r["frame"]) for r in rows if r["phase"] == "train"]
    # 500-step episodes end every 1000 frames; the episode interrupted at the checkpoint is
    # cut (no row); the resumed collector starts a new one at the checkpoint's frame
    expected = list(range(1000, frame + 1, 1000)) + list(range(frame + 1000, 2001, 1000))
    assert train == expected
    assert len({(r["phase"], r["frame"]) for r in rows}) == len(rows)  # no duplicates
    assert [r["frame"] for r in rows if r["phase"] == "eval"] == ["2000"]
    assert counters["episode"] == len(train)
    # same checkpoint, same seed: the updates after resume match between the two processes
    assert _untimed(rows) == _untimed(_rows(tmp_path / "twin"))
    assert counters["updates"] == _counters(tmp_path / "twin")["updates"] == 91  # steps 100..1000
    final = [load_run_checkpoint(d)[0]["agent"]["loss"] for d in (run, tmp_path / "twin")]
    assert final[0].keys() == final[1].keys()
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    # only the newest replay-buffer checkpoint is kept (the final checkpoint at the frame of
    # the periodic one writes a folder of a new name: frame_<frame>_<k>)
    kept = [p.name for p in (run / "checkpoints" / "replay").iterdir()]
    assert len(kept) == 1 and re.fullmatch(r"frame_0000002000(_\d+)?", kept[0]), kept


def test_sigterm_checkpoints_and_resumes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ("frames=2000", "checkpoint_every=0", *FAST)  # no periodic checkpoints
    process = subprocess.Popen(_command(run, *args), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.csv"
    _wait_for(lambda: metrics.exists() and len(_rows(run)) >= 1, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-3000:]
    assert "SIGTERM received: checkpoint written at frame" in err
    step = _counters(run)["step"]
    assert 500 <= step < 1000
    # resume in this process (saves a start-up): the run finishes
    trainer = Trainer(_cfg(run, *args, "resume=true"))
    assert trainer.step == step
    cut = _cut_point(trainer)
    assert trainer.train() == "done"
    _check_cut(trainer, *cut)
    assert _counters(run)["step"] == 1000
    train = [r["frame"] for r in _rows(run) if r["phase"] == "train"]
    assert train[0] == "1000" and len(train) == len(set(train))


@pytest.mark.parametrize("storage", ["memory", pytest.param("memmap", marks=pytest.mark.slow)])
def test_resume_continues_exactly(tmp_path: Path, storage: str) -> None:
    """In one process: the updates right after a checkpoint equal those of a trainer
    restored from it (agent, target critic, optimisers, replay buffer, RNG states)."""
    args = ("frames=1000", f"replay.storage={storage}", "checkpoint_every=0")
    original = Trainer(_cfg(tmp_path, *args))
    original.train()  # ends with a checkpoint
    expected = [floats(original.update()) for _ in range(3)]
    restored = Trainer(_cfg(tmp_path, *args, "resume=true"))
    assert restored.step == 500 and restored.loop.updates == original.loop.updates - 3
    assert [floats(restored.update()) for _ in range(3)] == expected


def _copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def test_run_folder_errors(finished_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ResumeError, match="has no checkpoint"):
        Trainer(_cfg(tmp_path / "empty", "resume=true"))
    run = _copy(finished_run, tmp_path)
    with pytest.raises(ResumeError, match="pass resume=true to continue it, or another run_dir"):
        Trainer(_cfg(run, "frames=400"))
    with pytest.raises(ResumeError, match="task_name: run has 'cartpole_balance', command "
                                          "line 'cartpole_swingup'"):
        Trainer(_cfg(run, "frames=400", "resume=true", "task=cartpole_swingup"))
    with pytest.raises(ResumeError, match="hidden_dim"):
        Trainer(_cfg(run, "frames=400", "resume=true", "hidden_dim=64"))
    # rows written after the checkpoint (a killed run) are dropped on resume
    rows = _rows(run)
    with open(run / "metrics.csv", "a", newline="") as handle:
        csv.DictWriter(handle, list(rows[0])).writerow({**rows[0], "frame": "402"})
    assert len(_rows(run)) == len(rows) + 1
    # a finished run resumes as a no-op
    trainer = Trainer(_cfg(run, "frames=400", "resume=true"))
    assert _rows(run) == rows
    assert trainer.train() == "done" and trainer.step == 200


def test_new_run_sets_aside_rows_of_a_run_that_never_checkpointed(tmp_path: Path) -> None:
    """A run killed before its first checkpoint leaves metrics rows; a new run in that folder
    (resume=false is allowed: nothing to resume) starts its own file and keeps the old one."""
    run = tmp_path / "run"
    args = ("frames=2000", "checkpoint_every=0", *FAST)
    Trainer(_cfg(run, *args)).train()
    shutil.rmtree(run / "checkpoints")  # the folder as a run killed before its checkpoint
    old = _rows(run)
    # one row per 1000-frame episode, the final evaluation
    assert [(r["phase"], r["frame"]) for r in old] == [("train", "1000"), ("train", "2000"),
                                                        ("eval", "2000")]
    trainer = Trainer(_cfg(run, *args, "seed=7"))
    assert trainer.train() == "done"
    rows = _rows(run)
    assert [r["frame"] for r in rows] == [r["frame"] for r in old]  # not appended
    assert _untimed(rows) != _untimed(old)  # another seed: this run's own rows
    with open(run / "metrics.stale1.csv", newline="") as handle:
        assert list(csv.DictReader(handle)) == old


def test_corrupted_checkpoints_are_detected(finished_run: Path, tmp_path: Path,
                                            capsys) -> None:
    run = _copy(finished_run, tmp_path)
    ckpt = run / "checkpoints" / "latest.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])  # a truncated file
    with pytest.raises(CheckpointError, match="unreadable or corrupted"):
        Trainer(_cfg(run, "frames=400", "resume=true"))
    assert evaluate.main([str(run), "--episodes", "1"]) == 2
    err = capsys.readouterr().err
    assert "unreadable or corrupted" in err and "Traceback" not in err

    ckpt.write_bytes(data)
    for path in (run / "checkpoints" / "replay").rglob("*"):  # a damaged buffer checkpoint
        if path.is_file() and path.suffix == ".memmap":
            path.write_bytes(path.read_bytes()[:10])
    with pytest.raises(CheckpointError, match=r"replay buffer checkpoint .* is unreadable"):
        Trainer(_cfg(run, "frames=400", "resume=true"))
    shutil.rmtree(run / "checkpoints" / "replay")
    with pytest.raises(CheckpointError, match="which is missing"):
        Trainer(_cfg(run, "frames=400", "resume=true"))


def test_eval_of_mismatched_checkpoint(finished_run: Path, tmp_path: Path, capsys) -> None:
    state = load_checkpoint(finished_run)
    state["config"]["task_name"] = "cheetah_run"  # 17-d states instead of cartpole's 5
    path = tmp_path / "other.pt"
    atomic_torch_save(state, path)
    assert evaluate.main([str(path), "--episodes", "1"]) == 2
    err = capsys.readouterr().err
    assert "does not match the cp3er agent for task cheetah_run" in err
    atomic_torch_save({"weights": 1}, path)
    assert evaluate.main([str(path), "--episodes", "1"]) == 2
    assert "not a cp3er checkpoint" in capsys.readouterr().err


def test_failed_checkpoint_write_keeps_the_previous(finished_run: Path, tmp_path: Path,
                                                    monkeypatch) -> None:
    """A crash while the buffer is written leaves latest.pt naming a complete buffer."""
    run = _copy(finished_run, tmp_path)
    trainer = Trainer(_cfg(run, "frames=400", "resume=true"))
    good = (run / "checkpoints" / "latest.pt").read_bytes()

    def crash(path):
        Path(path).mkdir(parents=True)
        (Path(path) / "partial").write_bytes(b"x")
        raise OSError("disk full")

    monkeypatch.setattr(trainer.buffer, "dumps", crash)
    trainer.step += 10  # a later frame
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint()
    assert (run / "checkpoints" / "latest.pt").read_bytes() == good
    state, replay = load_run_checkpoint(run)
    assert state["counters"]["step"] == 200 and (replay / "nstep_buffer.json").is_file()
    trainer.buffer.loads(replay)  # the buffer it names is complete


def test_loop_state_is_saved_whole() -> None:
    """The loop's counters are one object in the checkpoint; a field this version does not
    know is refused, not dropped."""
    state = LoopState(step=5, updates=2, episode=1, next_eval=10, next_ckpt=None,
                      last_eval_frame=-1, physics_errors=3, seconds=1.5,
                      pending_metrics={"q_mean": [1.0, 2.0]})
    saved = state.to_checkpoint()
    assert LoopState.from_checkpoint({"counters": saved}) == state
    with pytest.raises(KeyError, match="bogus"):
        LoopState.from_checkpoint({"counters": {**saved, "bogus": 1}})
