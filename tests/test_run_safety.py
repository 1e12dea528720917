"""Run safety, round 3 (issue 31): exit codes of a preempted run, one-line refusals of
crafted checkpoints, cp3er-plot's one-line errors, refused launches that leave the run
folder as it was, symlinks and paths that leave the run folder, the numeric guard."""

from __future__ import annotations

import io
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from test_checkpoint_safety import _copy, _Payload
from tiny_run import tiny_cfg as _cfg
from tiny_run import tiny_command as _command
from tiny_run import wait_for

from cp3er import evaluate
from cp3er.checkpoint import HASH, UntrustedCheckpointError, hash_bytes, load_checkpoint
from cp3er.faults import pass_on
from cp3er.train import Trainer


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
    with pytest.raises(UntrustedCheckpointError, match=r"pickled Python objects \([\w.]*open\)"):
        load_checkpoint(crafted)
    assert evaluate.main([str(crafted), "--episodes", "1"]) == 2
    assert "refused: pass trust_checkpoint=true" in _one_line(capsys.readouterr().err)
    run = _copy(finished_run, tmp_path)
    shutil.copy(crafted, run / "checkpoints" / "latest.pt")
    with pytest.raises(UntrustedCheckpointError, match="could run code"):
        Trainer(_cfg(run, "frames=400", "resume=true"))
    assert not marker.exists()
