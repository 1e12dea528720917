"""Run safety (issue 15): one writer per run folder, a loadable checkpoint after a kill at
any filesystem operation, no code run from a checkpoint, corruption detected, and
checkpoints of an older format refused in one line."""

from __future__ import annotations

import builtins
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tensordict import TensorDict
from tiny_run import tiny_cfg as _cfg
from tiny_run import tiny_command as _command

from cp3er import evaluate
from cp3er.checkpoint import (
    CheckpointError,
    check_manifest,
    hash_file,
    load_checkpoint,
    load_run_checkpoint,
    save_run_checkpoint,
)
from cp3er.config_check import ConfigError
from cp3er.folder_lock import RunLockedError
from cp3er.logs import MetricsFileError
from cp3er.replay import make_replay_buffer
from cp3er.run_state import ResumeError
from cp3er.train import Trainer


def _copy(run: Path, tmp_path: Path, name: str = "run") -> Path:
    target = tmp_path / name
    shutil.copytree(run, target)
    return target


def _one_line_error(text: str) -> str:
    """The one error line of a failed run (the run's own first line, what runs where, is
    not an error)."""
    lines = [line for line in text.strip().splitlines() if line.strip()
             and " run folder " not in line]
    assert len(lines) == 1 and "Traceback" not in text, text[-2000:]
    return lines[0]


# -- 1. one writer per run folder --------------------------------------------------------
def test_a_second_trainer_on_a_held_run_dir_is_refused(finished_run: Path,
                                                       tmp_path: Path) -> None:
    run = _copy(finished_run, tmp_path)
    first = Trainer(_cfg(run, "frames=400", "resume=true"))
    with pytest.raises(RunLockedError, match=rf"in use by another cp3er-train process "
                                             rf"\(pid {os.getpid()}\)"):
        Trainer(_cfg(run, "frames=400", "resume=true"))
    with pytest.raises(RunLockedError):  # a new run in the folder: refused the same way
        Trainer(_cfg(run, "frames=400"))
    assert first.train() == "done"  # the run ends and lets the folder go
    assert Trainer(_cfg(run, "frames=400", "resume=true")).step == 200


def test_a_second_process_is_refused_and_a_dead_holder_does_not_block(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ("frames=200000", "checkpoint_every=400", "schedule.update_every_steps=10")
    first = subprocess.Popen(_command(run, *args), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (run / "checkpoints" / "latest.pt").exists():
            assert first.poll() is None and time.monotonic() < deadline, "first run failed"
            time.sleep(0.05)
        for resume in ("false", "true"):  # a second launch, or a resume of the live run
            second = subprocess.run(_command(run, *args, f"resume={resume}"),
                                    capture_output=True, text=True, timeout=120)
            assert second.returncode == 75  # EX_TEMPFAIL: try again later
            line = _one_line_error(second.stderr)
            assert f"run_dir={run} is in use by another cp3er-train process (pid {first.pid})" \
                   in line
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    # the dead process's lock file is left behind; it does not block the resume
    assert (run / ".lock").read_text().strip() == str(first.pid)
    trainer = Trainer(_cfg(run, *args, "resume=true"))
    assert trainer.step > 0 and trainer.lock.held


# -- 2. a kill at any filesystem operation of a checkpoint write -------------------------
class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (not caught by ``except Exception``)."""


_FS_CALLS = (
    (os, "replace"), (os, "rename"), (os, "unlink"), (os, "remove"), (os, "rmdir"),
    (os, "mkdir"), (os, "fsync"), (shutil, "rmtree"), (shutil, "move"),
)


def _kill_at(monkeypatch, k: int) -> dict:
    """From now on, the k-th filesystem operation (1-based) raises :class:`_Killed` before
    it happens. Returns the counter (``calls["n"]``: operations seen)."""
    calls = {"n": 0}

    def counted(fn):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == k:
                raise _Killed(f"killed before operation {k}: {fn.__name__}{args[:1]}")
            return fn(*args, **kwargs)
        return wrapper

    for module, name in _FS_CALLS:
        monkeypatch.setattr(module, name, counted(getattr(module, name)))
    real_open = builtins.open

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            return counted(real_open)(file, mode, *args, **kwargs)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    return calls


def _episode(buffer, first: int, steps: int) -> None:
    done = torch.zeros(steps, 1, dtype=torch.bool)
    done[-1] = True
    obs = torch.arange(first, first + steps, dtype=torch.float32).unsqueeze(-1).expand(-1, 5)
    buffer.extend(TensorDict({
        "observation": obs, "action": torch.zeros(steps, 1),
        "collector": {"traj_ids": torch.full((steps,), first)},
        "next": {"observation": obs + 1, "reward": torch.ones(steps, 1), "done": done,
                 "terminated": torch.zeros_like(done), "truncated": done.clone()},
    }, [steps]))


def _new_buffer():
    return make_replay_buffer(200, obs_key="observation", frame_stack=1, batch_size=4)


def _state(version: int) -> dict:
    return {"agent": {"w": torch.full((3,), float(version))}, "config": {},
            "counters": {"version": version}, "rng": {}}


@pytest.mark.parametrize("same_frame", [True, False], ids=["same-frame", "next-frame"])
def test_a_kill_at_every_filesystem_operation_leaves_a_loadable_checkpoint(
        tmp_path: Path, monkeypatch, same_frame: bool) -> None:
    """Checkpoint 1 at frame 100; checkpoint 2 (more rows) at frame 100 (the end of a run
    whose frames are a multiple of checkpoint_every) or 110, killed before its k-th
    filesystem operation, for every k: the run folder always loads, as checkpoint 1 or 2,
    with the buffer that checkpoint wrote, and the next checkpoint (after the resume)
    succeeds."""
    buffer = _new_buffer()
    _episode(buffer, 0, 20)
    template = tmp_path / "template"
    save_run_checkpoint(_state(1), template, buffer, frame=100)
    rows = {1: buffer.write_count}
    _episode(buffer, 20, 30)
    rows[2] = buffer.write_count
    frame = 100 if same_frame else 110
    k, outcomes = 0, set()
    while True:
        k += 1
        run = tmp_path / f"k{k}"
        shutil.copytree(template, run)
        with monkeypatch.context() as patch:
            calls = _kill_at(patch, k)
            try:
                save_run_checkpoint(_state(2), run, buffer, frame=frame)
                finished = True
            except _Killed:
                finished = False
        state, replay = load_run_checkpoint(run)
        version = state["counters"]["version"]
        restored = _new_buffer()
        restored.loads(replay)
        assert restored.write_count == rows[version], (k, version)
        outcomes.add(version)
        save_run_checkpoint(_state(3), run, buffer, frame=frame + 10)  # the resumed run
        state, replay = load_run_checkpoint(run)
        assert state["counters"]["version"] == 3
        assert [p.name for p in replay.parent.iterdir()] == [replay.name]  # leftovers gone
        shutil.rmtree(run)
        if finished:
            break
    assert k == calls["n"] + 1 and k > 20, k  # every operation of the write was a kill point
    assert outcomes == {1, 2}


# -- 3. no code from a checkpoint --------------------------------------------------------
class _Payload:
    """Unpickling this creates a file: what a crafted checkpoint could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def test_a_crafted_checkpoint_runs_no_code(finished_run: Path, tmp_path: Path,
                                           capsys) -> None:
    marker = tmp_path / "pwned"
    crafted = tmp_path / "crafted.pt"
    torch.save({"agent": {}, "config": {}, "x": _Payload(marker)}, crafted)
    with pytest.raises(CheckpointError, match="checkpoint format 1"):
        load_checkpoint(crafted)
    assert evaluate.main([str(crafted), "--episodes", "1"]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert re.search(r"holds pickled Python objects \([\w.]*open\).*refused", line), line
    # the same file as a run's latest.pt: resume refuses it
    run = _copy(finished_run, tmp_path)
    shutil.copy(crafted, run / "checkpoints" / "latest.pt")
    with pytest.raises(CheckpointError, match="could run code"):
        Trainer(_cfg(run, "frames=400", "resume=true"))
    assert not marker.exists()


def test_a_pickle_in_the_buffer_folder_is_refused(finished_run: Path, tmp_path: Path) -> None:
    run = _copy(finished_run, tmp_path)
    _, replay = load_run_checkpoint(run)
    assert not list(replay.rglob("*.pkl"))  # a checkpoint holds no pickle
    marker = tmp_path / "pwned"
    with open(replay / "prefetch.pkl", "wb") as handle:  # TorchRL unpickles this on load
        pickle.dump(_Payload(marker), handle)
    manifest = json.loads((replay / "manifest.json").read_text())  # a forged manifest too
    manifest["files"]["prefetch.pkl"] = {"size": (replay / "prefetch.pkl").stat().st_size,
                                         "xxh3_128": hash_file(replay / "prefetch.pkl")}
    (replay / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"prefetch\.pkl.*could run code"):
        Trainer(_cfg(run, "frames=400", "resume=true"))
    assert not marker.exists()


# -- 4. corruption is detected -----------------------------------------------------------
def test_a_flipped_byte_is_detected(finished_run: Path, tmp_path: Path) -> None:
    run = _copy(finished_run, tmp_path)
    ckpt = run / "checkpoints" / "latest.pt"
    good = ckpt.read_bytes()
    state = load_checkpoint(run)
    weights = state["agent"]["loss"]
    name = max(weights, key=lambda k: weights[k].numel())  # the largest tensor
    raw = weights[name].numpy().tobytes()
    at = good.find(raw)  # a byte inside that tensor's data in the file
    assert at > 0
    flipped = bytearray(good)
    flipped[at + len(raw) // 2] ^= 0x10
    ckpt.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="corrupted"):
        load_checkpoint(run)
    ckpt.write_bytes(good)

    _, replay = load_run_checkpoint(run)
    reward = replay / "storage" / "reward.memmap"
    data = bytearray(reward.read_bytes())
    data[8] ^= 0x01
    reward.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"corrupted: the content of \['storage/"
                                              r"reward\.memmap'\] does not match"):
        Trainer(_cfg(run, "frames=400", "resume=true"))


def _rehash_with_sha256(run: Path) -> Path:
    """Rewrite a run's checkpoint as format 2 was written before XXH3: SHA-256 in the
    ``latest.pt`` envelope and in the buffer manifest."""
    import hashlib

    _, replay = load_run_checkpoint(run)
    ckpt = run / "checkpoints" / "latest.pt"
    envelope = torch.load(ckpt, weights_only=True)
    del envelope["xxh3_128"]
    envelope["sha256"] = hashlib.sha256(envelope["payload"].numpy()).hexdigest()
    torch.save(envelope, ckpt)
    manifest = json.loads((replay / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        del entry["xxh3_128"]
        entry["sha256"] = hashlib.sha256((replay / name).read_bytes()).hexdigest()
    (replay / "manifest.json").write_text(json.dumps(manifest))
    return replay


def _as_format_1(run: Path) -> Path:
    """Rewrite a run's checkpoint as cp3er wrote it before format 2: ``torch.save`` of the
    state with numpy's RNG state as a pickled tuple, TorchRL's ``prefetch.pkl`` in the
    buffer folder, a manifest of sizes only."""
    state, replay = load_run_checkpoint(run)
    state["rng"]["numpy"] = np.random.get_state()  # noqa: NPY002
    torch.save(state, run / "checkpoints" / "latest.pt")
    with open(replay / "prefetch.pkl", "wb") as handle:
        pickle.dump({"version": 1, "capacity": 0, "queue": ()}, handle)
    sizes = {str(p.relative_to(replay)): p.stat().st_size for p in sorted(replay.rglob("*"))
             if p.is_file() and p.name != "manifest.json"}
    (replay / "manifest.json").write_text(json.dumps(sizes))
    return replay


# -- 5. an older checkpoint format: one line naming it -----------------------------------
@pytest.mark.parametrize(("rewrite", "named"), [(_as_format_1, "checkpoint format 1"),
                                                (_rehash_with_sha256, "hashed with SHA-256")])
def test_an_older_format_is_refused_in_one_line_naming_it(finished_run: Path, tmp_path: Path,
                                                          capsys, rewrite, named: str) -> None:
    """A format-1 checkpoint (pickled ``latest.pt``, size-only manifest) and a format-2 one
    hashed with SHA-256 (cp3er before XXH3-128): ``cp3er-eval`` and a resume refuse each
    in one line naming its format, and so does its buffer folder's manifest alone."""
    run = _copy(finished_run, tmp_path)
    good = (run / "checkpoints" / "latest.pt").read_bytes()
    replay = rewrite(run)
    with pytest.raises(CheckpointError, match=named):
        Trainer(_cfg(run, "frames=400", "resume=true"))
    assert evaluate.main([str(run), "--episodes", "1"]) == 2
    assert named in _one_line_error(capsys.readouterr().err)
    (run / "checkpoints" / "latest.pt").write_bytes(good)  # the buffer folder's turn
    manifest = "sizes only" if rewrite is _as_format_1 else "without an xxh3_128 hash"
    with pytest.raises(CheckpointError, match=manifest):
        check_manifest(replay)


def test_train_cli_refuses_a_format_1_checkpoint_in_one_line(finished_run: Path,
                                                             tmp_path: Path) -> None:
    run = _copy(finished_run, tmp_path)
    _as_format_1(run)
    result = subprocess.run(_command(run, "frames=400", "resume=true"), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1
    line = _one_line_error(result.stderr)
    assert line.startswith("cp3er-train: checkpoint ") and "checkpoint format 1" in line


# -- 6. what a resume may change ---------------------------------------------------------
@pytest.mark.parametrize(("override", "key"), [("seed=7", "seed"), ("lr=0.001", "lr"),
                                               ("batch_size=32", "batch_size"),
                                               ("schedule.seed_frames=100",
                                                "schedule.seed_frames")])
def test_resume_refuses_a_changed_experiment_setting(finished_run: Path, override: str,
                                                     key: str) -> None:
    with pytest.raises(ResumeError, match=rf"cannot resume .*\({re.escape(key)}: run has "
                                          rf".*, command line .*\); resume with the run's "
                                          r"settings \(only frames, log, perf, "
                                          r"collector.backend may change\)"):
        Trainer(_cfg(finished_run, "frames=400", "resume=true", override))


def test_resume_may_move_the_workers_to_ray_and_to_another_cluster(
        finished_run: Path, tmp_path: Path, monkeypatch) -> None:
    """Where the collector workers run is not the experiment: ``collector.backend`` may
    change (printed), ``collector.ray_address`` too (a requeued job's cluster has a new
    address; silently, like the other machine keys)."""
    import cp3er.collection

    monkeypatch.setattr(cp3er.collection, "ray_installed", lambda: True)
    run = _copy(finished_run, tmp_path)
    trainer = Trainer(_cfg(run, "frames=400", "resume=true", "collector.backend=ray",
                           "collector.ray_address=auto"))
    assert trainer.resume_changes == ["collector.backend='ray' (the run had 'local')"]
    assert trainer.cfg.collector.ray_address == "auto"
    trainer.lock.release()


def test_resume_with_more_frames_extends_a_finished_run(finished_run: Path,
                                                        tmp_path: Path) -> None:
    run = _copy(finished_run, tmp_path)
    with pytest.raises(ResumeError, match="with frames=200: its checkpoint is at frame 400"):
        Trainer(_cfg(run, "frames=200", "resume=true"))
    trainer = Trainer(_cfg(run, "frames=600", "resume=true", "log.video=false"))
    assert trainer.resume_changes == ["frames=600 (the run had 400)",
                                      "log.video=False (the run had True)"]
    assert trainer.train() == "done"
    state, _ = load_run_checkpoint(run)
    assert state["counters"]["step"] == 300 and state["config"]["frames"] == 600
    # the run's config.yaml records the new length: a resume of the run needs no frames=600
    assert "frames: 600" in (run / "config.yaml").read_text()
    assert Trainer(_cfg(run, "frames=600", "resume=true", "log.video=false")).resume_changes == []


# -- 7. one line, not a traceback --------------------------------------------------------
def test_an_agent_setting_its_modules_refuse_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config is invalid for the cp3er agent: "
                                          "init_scale must be > 0, got 0"):
        Trainer(_cfg(tmp_path, "agent.init_scale=0"))


def test_an_unwritable_run_dir_is_named(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)  # tests run as root
    with pytest.raises(ResumeError, match=r"run_dir=.* is not writable by this user"):
        Trainer(_cfg(tmp_path / "run"))


@pytest.mark.parametrize("limit", ["disk", "file size"])
def test_a_checkpoint_that_would_not_fit_stops_the_run_cleanly(tmp_path: Path, monkeypatch,
                                                               limit: str) -> None:
    """No room for the checkpoint at frame 800 (a full disk; ``ulimit -f``): memory-mapped
    writes would die with SIGBUS, so the room is checked before anything is written."""
    import cp3er.checkpoint as checkpoint

    trainer = Trainer(_cfg(tmp_path, "frames=1000", "checkpoint_every=400"))
    if limit == "disk":
        usage = checkpoint.shutil.disk_usage
        monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage(path)._replace(
            free=1000 if trainer.frame > 400 else usage(path).free))
        message = r"not enough free disk space for a checkpoint in .*: it needs 0\.0\d GB, " \
                  r"0\.00 GB are free"
    else:
        getrlimit = checkpoint.resource.getrlimit
        monkeypatch.setattr(checkpoint.resource, "getrlimit", lambda which: (
            (1000, 1000) if which == checkpoint.resource.RLIMIT_FSIZE and trainer.frame > 400
            else getrlimit(which)))
        message = r"the file-size limit \(ulimit -f\) is 1000 bytes; a checkpoint in .* " \
                  r"writes a file of \d+ bytes"
    with pytest.raises(CheckpointError, match=message):
        trainer.train()
    state, replay = load_run_checkpoint(tmp_path)
    assert state["counters"]["step"] == 200  # the checkpoint at frame 400 is intact
    assert [p.name for p in replay.parent.iterdir()] == [replay.name]  # nothing half-written


def test_damaged_run_files_on_resume_are_named(finished_run: Path, tmp_path: Path) -> None:
    run = _copy(finished_run, tmp_path)
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text("task_name: [cartpole\n")
    with pytest.raises(ResumeError, match=r"config\.yaml is unreadable"):
        Trainer(_cfg(run, "frames=400", "resume=true"))
    (run / "config.yaml").write_text(config)

    metrics = (run / "metrics.csv").read_text()
    (run / "metrics.csv").write_text(metrics + "garbage,1,2\n")
    with pytest.raises(MetricsFileError, match=r"metrics\.csv is damaged \(line \d+: "
                                               r"frame='garbage'\); move it aside"):
        Trainer(_cfg(run, "frames=400", "resume=true"))
    (run / "metrics.csv").write_text("\x00\x01 binary")
    with pytest.raises(MetricsFileError, match=r"metrics\.csv is damaged"):
        Trainer(_cfg(run, "frames=400", "resume=true"))
    (run / "metrics.csv").write_text(metrics)

    _, replay = load_run_checkpoint(run)
    (replay / "nstep_buffer.json").write_text("")
    with pytest.raises(CheckpointError, match=r"missing or truncated files "
                                              r"\['nstep_buffer\.json'\]"):
        Trainer(_cfg(run, "frames=400", "resume=true"))


def test_cli_failures_are_one_line(tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    for run_dir in (afile, afile / "sub"):
        result = subprocess.run(_command(run_dir), capture_output=True, text=True, timeout=300)
        assert result.returncode == 1
        assert _one_line_error(result.stderr) == (f"cp3er-train: run_dir={run_dir} is not a "
                                                  "folder (a file is in the way); give a "
                                                  "folder path")
    # a run that stops before its first checkpoint does not claim to keep one
    result = subprocess.run(_command(tmp_path / "run", "lr=inf", "frames=1000",
                                     "checkpoint_every=0"),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    line = _one_line_error("\n".join(x for x in result.stderr.splitlines()
                                     if x.startswith("cp3er-train")))
    assert line.startswith("cp3er-train: run stopped: non-finite")
    assert line.endswith("; no checkpoint was written")


def test_the_checkpoint_action_check_draws_no_random_numbers(finished_run: Path,
                                                             tmp_path: Path) -> None:
    """The policy acts (CP3ER: from noise) at the checkpoint's action check; the run's
    random streams are untouched by it, so a resumed run continues the same streams."""
    trainer = Trainer(_cfg(_copy(finished_run, tmp_path), "frames=400", "resume=true"))
    trainer._last_obs = trainer.buffer.storage._storage["frame"][:1].clone()
    before = torch.get_rng_state()
    trainer.save_checkpoint()
    assert torch.equal(torch.get_rng_state(), before)
