"""Run safety, round 3 (issue 31): exit codes of a preempted run, one-line refusals of
crafted checkpoints, cp3er-plot's one-line errors, refused launches that leave the run
folder as it was, symlinks and paths that leave the run folder, the numeric guard."""

from __future__ import annotations

import errno
import gc
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_checkpoint_safety import _copy, _Payload
from tiny_run import tiny_cfg as _cfg
from tiny_run import tiny_command as _command
from tiny_run import wait_for

from cp3er import evaluate
from cp3er.checkpoint import (
    HASH,
    CheckpointError,
    UnsafePathError,
    atomic_torch_save,
    hash_bytes,
    load_checkpoint,
    load_run_checkpoint,
)
from cp3er.collection import WorkerDiedError, watching_workers
from cp3er.faults import NumericalError, pass_on
from cp3er.folder_lock import RunLock
from cp3er.train import Trainer
from cp3er.train_cli import _check_added_keys


def _one_line(text: str) -> str:
    """The one line of a refusal (no traceback)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text[-2000:]
    return lines[0]


def _wait_for_rows(run: Path, process: subprocess.Popen, rows: int = 1) -> None:
    """Until ``metrics.csv`` of ``run`` has ``rows`` rows (a run well inside its loop)."""
    metrics = run / "metrics.csv"
    wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) > rows,
             process)


# -- item 3: one SIGINT exits 130, without a traceback -----------------------------------
def test_pass_on_leaves_pythons_own_sigint_handler_alone() -> None:
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        pass_on(signal.SIGINT)  # used to raise KeyboardInterrupt after the checkpoint
    except KeyboardInterrupt:
        pytest.fail("pass_on(SIGINT) raised KeyboardInterrupt: exit 1 and a traceback")
    finally:
        signal.signal(signal.SIGINT, previous)


def test_one_sigint_checkpoints_and_exits_130_without_a_traceback(tmp_path: Path) -> None:
    run = tmp_path / "run"
    process = subprocess.Popen(_command(run, "frames=4000", "checkpoint_every=0",
                                        "schedule.update_every_steps=10"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_rows(run, process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert process.returncode == 130, err[-3000:]
    assert "SIGINT received: checkpoint written at frame" in err.strip().splitlines()[-1]
    assert (run / "checkpoints" / "latest.pt").is_file()


# -- item 6: a hashed envelope around a pickle is a one-line refusal ---------------------
def test_a_pickle_inside_a_well_formed_envelope_is_a_one_line_refusal(
        finished_run: Path, tmp_path: Path, capsys) -> None:
    marker = tmp_path / "pwned"
    payload = io.BytesIO()
    torch.save({"agent": {}, "config": {}, "x": _Payload(marker)}, payload)
    data = payload.getbuffer()
    envelope = {"cp3er_format": 2, HASH: hash_bytes(data),
                "payload": torch.frombuffer(data, dtype=torch.uint8)}
    crafted = tmp_path / "crafted.pt"
    torch.save(envelope, crafted)
    with pytest.raises(CheckpointError, match=r"pickled Python objects \([\w.]*open\)"):
        load_checkpoint(crafted)
    assert evaluate.main([str(crafted), "--episodes", "1"]) == 2
    assert "refused (loading could run code)" in _one_line(capsys.readouterr().err)
    run = _copy(finished_run, tmp_path)
    shutil.copy(crafted, run / "checkpoints" / "latest.pt")
    with pytest.raises(CheckpointError, match="could run code"):
        Trainer(_cfg(run, "frames=400", "resume=true"))
    assert not marker.exists()


# -- item 5: a refused or invalid launch leaves the run folder as it was ------------------
def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes; the lock file's only as present (it names its last holder)."""
    return {str(p.relative_to(folder)): b"" if p.name == ".lock" else p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_refused_launches_leave_the_run_folder_as_it_was(finished_run: Path,
                                                        tmp_path: Path) -> None:
    run = _copy(finished_run, tmp_path)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("seed: 1\n")  # the run's own launch
    (run / ".hydra" / "overrides.yaml").write_text("- seed=1\n")
    before = _snapshot(run)
    # a finished run launched again without resume=true
    refused = subprocess.run(_command(run, "frames=400", "seed=7"), capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 1 and "pass resume=true" in _one_line(refused.stderr)
    assert _snapshot(run) == before  # .hydra/config.yaml still says seed 1
    with RunLock(run):  # the run folder held by a live process
        before = _snapshot(run)
        held = subprocess.run(_command(run, "frames=800", "resume=true"), capture_output=True,
                              text=True, timeout=300)
        assert held.returncode == 75 and "is in use" in _one_line(held.stderr)
        assert _snapshot(run) == before


def test_an_invalid_launch_writes_nothing_into_a_new_run_folder(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"  # a value the agent's modules refuse
    invalid = subprocess.run(_command(fresh, "agent.init_scale=0"), capture_output=True,
                             text=True, timeout=300)
    assert invalid.returncode == 1 and "is invalid" in _one_line(invalid.stderr)
    assert _snapshot(fresh) == {} and not (fresh / ".hydra").exists()


# -- item 2: symlinks and paths that leave the run folder --------------------------------
def _outside(tmp_path: Path) -> tuple[Path, Path]:
    """A folder outside the run with a subfolder and a file that must survive."""
    outside = tmp_path / "outside"
    (outside / "precious").mkdir(parents=True)
    victim = outside / "victim.txt"
    victim.write_text("keep me\n")
    return outside, victim


@pytest.mark.parametrize("link", ["checkpoints/replay", "checkpoints/.latest.pt.tmp", ".lock",
                                  "metrics.csv"])
def test_a_resume_refuses_symlinks_in_the_run_folder(finished_run: Path, tmp_path: Path,
                                                     link: str) -> None:
    run = _copy(finished_run, tmp_path)
    outside, victim = _outside(tmp_path)
    if link == "checkpoints/replay":  # the buffer folders moved outside, linked back
        shutil.move(run / link, outside / "replay")
        (run / link).symlink_to(outside / "replay")
        (outside / "replay" / "precious").mkdir()
    else:
        (run / link).unlink(missing_ok=True)
        (run / link).symlink_to(victim)
    before = _snapshot(outside)
    with pytest.raises(UnsafePathError, match="symlink"):
        Trainer(_cfg(run, "frames=600", "resume=true"))
    assert _snapshot(outside) == before and (outside / "precious").is_dir()
    if link == "checkpoints/replay":
        assert (outside / "replay" / "precious").is_dir()


def test_writes_and_deletes_never_go_through_a_link_planted_mid_run(finished_run: Path,
                                                                     tmp_path: Path) -> None:
    run = _copy(finished_run, tmp_path)
    outside, victim = _outside(tmp_path)
    trainer = Trainer(_cfg(run, "frames=600", "resume=true"))
    (run / "checkpoints" / ".latest.pt.tmp").symlink_to(victim)
    with pytest.raises(UnsafePathError, match="refusing to write through it"):
        trainer.save_checkpoint()
    (run / "checkpoints" / ".latest.pt.tmp").unlink()
    shutil.move(run / "checkpoints" / "replay", outside / "replay")
    (run / "checkpoints" / "replay").symlink_to(outside / "replay")
    before = _snapshot(outside)  # the old buffer folders would be deleted after the write
    with pytest.raises(UnsafePathError, match="symlink"):
        trainer.save_checkpoint()
    trainer.lock.release()
    assert victim.read_text() == "keep me\n" and _snapshot(outside) == before
    assert (outside / "replay" / "frame_0000000400").is_dir()


@pytest.mark.parametrize("name", ["../../outside", "/tmp", "replay/..", "replay/../../x"])
def test_a_checkpoint_naming_a_buffer_outside_the_run_is_refused(
        finished_run: Path, tmp_path: Path, name: str) -> None:
    run = _copy(finished_run, tmp_path)
    state, _ = load_run_checkpoint(run)
    atomic_torch_save({**state, "replay": name}, run / "checkpoints" / "latest.pt")
    with pytest.raises(UnsafePathError, match="refused"):
        load_run_checkpoint(run)
    with pytest.raises(UnsafePathError):
        Trainer(_cfg(run, "frames=600", "resume=true"))


# -- item 4: the numeric guard catches a blow-up where it first appears ------------------
@pytest.mark.parametrize("every", [1, 1000])
def test_a_blown_up_run_stops_at_its_first_exploding_update(tmp_path: Path, every: int) -> None:
    """``lr=1e6``: finite weights, Q ~1e13 from the first update on (and, read late, an
    ``invalid multinomial distribution`` in the critic's sampler): the run stops naming
    update 1, and the checkpoint kept is the one before it."""
    trainer = Trainer(_cfg(tmp_path, "lr=1e6", "frames=1200", "checkpoint_every=100",
                           f"log.metrics_every_updates={every}"))
    with pytest.raises(NumericalError, match=r"exploding \w+=\S+ .*at update 1 \(frame 200\)"):
        trainer.train()
    state, _ = load_run_checkpoint(tmp_path)
    assert state["counters"]["updates"] == 0
    assert max(float(t.abs().max()) for t in state["agent"]["loss"].values()
               if t.is_floating_point()) < 1e3


def test_an_update_failing_on_non_finite_values_is_a_numerical_error(tmp_path: Path) -> None:
    trainer = Trainer(_cfg(tmp_path, "frames=1200", "checkpoint_every=0"))

    def failing(batch):
        raise RuntimeError("invalid multinomial distribution (sum of probabilities <= 0)")

    trainer.agent.update = failing
    with pytest.raises(NumericalError, match=r"update 1 \(frame 200\) failed on non-finite "
                                             r"values: invalid multinomial distribution"):
        trainer.train()


# -- item 8: smaller refusals ------------------------------------------------------------
def test_eval_refuses_another_obs_and_names_the_mismatched_entry(finished_run: Path,
                                                                 tmp_path: Path, capsys) -> None:
    assert evaluate.main([str(finished_run), "--obs", "pixels", "--episodes", "1"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("cp3er-eval: --obs pixels: ") and "trained on state" in line
    state = load_checkpoint(finished_run)
    state["config"]["task_name"] = "cheetah_run"  # 17-d states instead of cartpole's 5
    atomic_torch_save(state, tmp_path / "other.pt")
    assert evaluate.main([str(tmp_path / "other.pt"), "--episodes", "1"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "TensorDict(" not in line and re.search(r"agent for task cheetah_run \(state\): "
                                                   r"\w+(\.\w+)*: The size of tensor", line)


def test_an_added_unknown_key_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = subprocess.run(_command(run, "+foo=1"), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1
    assert "+foo=1: the run config has no key 'foo'" in _one_line(result.stderr)
    assert not run.exists()
    assert _check_added_keys(["+profile=cpu_pixels", "++lr=0.001", "+hydra.job.name=x"]) is None
    assert "no key 'agent.lr_actor'" in _check_added_keys(["+agent.lr_actor=0.1"])


# -- item 1: a dead collector worker stops the run, after a checkpoint -------------------
class _DyingCollector:
    """A collector whose worker dies after ``batches`` batches, as TorchRL reports it."""

    def __init__(self, inner, batches: int) -> None:
        self.inner, self.batches = inner, batches

    def __iter__(self):
        for index, batch in enumerate(self.inner):
            if index == self.batches:
                raise RuntimeError("At least one process failed: worker 1 (exit code -9). "
                                   "Check for more infos in the log.")
            yield batch

    def shutdown(self) -> None:
        self.inner.shutdown()


def test_a_dead_worker_stops_the_run_after_a_checkpoint_of_what_was_collected(
        tmp_path: Path) -> None:
    trainer = Trainer(_cfg(tmp_path, "frames=2000", "checkpoint_every=0"))
    make = trainer.make_collector
    trainer.make_collector = lambda until: _DyingCollector(make(until), batches=60)
    with pytest.raises(WorkerDiedError, match=r"^collector worker 1 died \(exit code -9, "
                                              r"killed by SIGKILL\)$"):
        trainer.train()
    state, _ = load_run_checkpoint(tmp_path)
    assert state["counters"]["step"] == trainer.step == 120  # 60 batches of 2 steps
    assert not trainer.lock.held


@pytest.mark.slow
def test_a_killed_worker_process_is_one_line_and_a_checkpoint(tmp_path: Path) -> None:
    """``collector.workers=2``, one worker killed (SIGKILL) after the first checkpoint: the
    run stops within seconds, one line naming the worker, a checkpoint after the first."""
    run = tmp_path / "run"
    process = subprocess.Popen(_command(run, "frames=20000", "collector.workers=2",
                                        "checkpoint_every=400",
                                        "schedule.update_every_steps=10"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (run / "checkpoints" / "latest.pt").is_file(), process)
    first = load_run_checkpoint(run)[0]["counters"]["step"]
    workers = subprocess.run(["pgrep", "-P", str(process.pid), "-f", "spawn_main"],
                             capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(workers[-1]), signal.SIGKILL)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 1 and "Traceback" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert re.match(r"cp3er-train: run stopped: collector worker \d died \(exit code -9, "
                    r"killed by SIGKILL\); checkpoint at frame", line), line
    assert load_run_checkpoint(run)[0]["counters"]["step"] >= first


@pytest.mark.slow
def test_a_worker_dying_at_start_up_is_one_line_and_the_process_exits(tmp_path: Path) -> None:
    """Worker 1's environment factory exits its process: TorchRL raised a traceback, then
    the trainer hung at exit (a half-built collector's weight-sync queue)."""
    (tmp_path / "dying_worker.py").write_text(
        "import functools, os\n"
        "from cp3er.builders import worker_env_factories\n"  # before the launch patches it
        "def die(*args):\n    os._exit(3)\n"
        "def factories(cfg, seed):\n"
        "    return [worker_env_factories(cfg, seed)[0], functools.partial(die)]\n")
    launch = ("import cp3er.train as train, cp3er.train_cli as cli, dying_worker; "
              "train.builders.worker_env_factories = dying_worker.factories; cli.cli()")
    run = tmp_path / "run"
    command = [sys.executable, "-c", launch, *_command(run, "collector.workers=2")[3:]]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "cp3er-train: run stopped: collector worker 1 died during its start-up (building its "
        "environment); nothing was collected, no checkpoint was written")


def test_a_worker_dying_during_a_weight_push_interrupts_the_wait() -> None:
    """TorchRL waits for every worker's acknowledgement of new weights without a timeout:
    a worker killed then hung the trainer for good (no CPU, SIGTERM ignored)."""
    import multiprocessing
    import queue

    context = multiprocessing.get_context("fork")
    worker = context.Process(target=time.sleep, args=(60,), daemon=True)
    worker.start()
    collector = SimpleNamespace(procs=[worker])
    never = context.Queue()  # the acknowledgement that never comes
    threading.Timer(0.5, os.kill, (worker.pid, signal.SIGKILL)).start()
    started = time.monotonic()
    try:
        with pytest.raises(WorkerDiedError, match=r"^collector worker 0 died \(exit code -9"), \
                watching_workers(collector, poll_s=0.1):
            never.get(timeout=10)  # without the watch: queue.Empty after 10 s
    except queue.Empty:
        pytest.fail("the wait for a dead worker was not interrupted")
    assert time.monotonic() - started < 5
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


class _FullDiskFile:
    """A log file on a full disk: writes are buffered, every flush fails (ENOSPC); a
    close flushes (and fails) once, then the file is closed, as Python's own files."""

    def __init__(self, *args, **kwargs) -> None:
        self.closed = False

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.flush()


def test_a_full_disk_names_the_log_file_and_leaves_no_exit_traceback(tmp_path: Path,
                                                                     monkeypatch) -> None:
    import torchrl.record.loggers.csv as torchrl_csv

    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    trainer = Trainer(_cfg(tmp_path, "frames=1000", "checkpoint_every=0"))
    monkeypatch.setattr(torchrl_csv, "open", _FullDiskFile, raising=False)
    with pytest.raises(OSError, match=r"No space left on device: '.*/logs/scalars/"
                                      r"train/\w+\.csv'") as info:
        trainer.train()
    assert info.value.errno == errno.ENOSPC
    del trainer, info
    gc.collect()
    assert not unraisable, [u.exc_value for u in unraisable]  # the logger's __del__: quiet


def test_a_full_disk_under_metrics_csv_names_it(tmp_path: Path, monkeypatch) -> None:
    import cp3er.logs as logs

    writer = logs.MetricsWriter(tmp_path / "metrics.csv", fresh=True)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(logs.os, "fsync", full)
    with pytest.raises(OSError, match=re.escape(f"No space left on device: "
                                                f"'{tmp_path / 'metrics.csv'}'")):
        writer.write({"frame": 2, "phase": "train"})
