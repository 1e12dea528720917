"""What a newcomer sees: thread settings, the run's first and last lines, a console with
our lines only, one-line errors for mistyped config names, the exact resume command."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from cp3er.config_check import ConfigError, check_group_overrides, validate_config
from cp3er.config_schema import CONFIG_DIR
from cp3er.threads import auto_threads, parse_threads

TINY_STATE = [
    "task=cartpole_balance", "obs=state", "hidden_dim=32", "feature_dim=16", "batch_size=16",
    "replay.capacity=5000", "schedule.seed_frames=200", "schedule.explore_frames=200",
    "schedule.eval_episodes=1", "log.progress=false",
]


def _train_command(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "cp3er.train_cli", f"run_dir={run_dir}", *TINY_STATE, *overrides]


@pytest.mark.parametrize(("cores", "load", "expected"),
                         [(4, 0.0, 4), (2, 2.2, 1), (8, 3.0, 5), (2, 0.4, 2), (2, 9.0, 1)])
def test_auto_threads_takes_the_free_cores(cores: int, load: float, expected: int) -> None:
    assert auto_threads(cores, load) == expected


def test_threads_settings_and_their_errors() -> None:
    assert parse_threads("auto") == "auto"
    assert parse_threads("3") == 3 and parse_threads(2) == 2
    assert parse_threads(None) is None and parse_threads("default") is None
    for bad in ("0", "abc", "1.5", True, -1):
        with pytest.raises(ValueError, match="expected auto, an integer >= 1"):
            parse_threads(bad)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose(config_name="config", overrides=["task=cartpole_balance", "threads=abc"])
    with pytest.raises(ConfigError, match=r"threads='abc' is invalid"):
        validate_config(cfg)


def test_mistyped_config_names_get_the_closest_choices() -> None:
    message = check_group_overrides(["task=cheetah_rn", "seed=2"], CONFIG_DIR)
    assert message.startswith("unknown task 'cheetah_rn'") and "cheetah_run" in message
    message = check_group_overrides(["agent=drqv3"], CONFIG_DIR)
    assert message == "unknown agent 'drqv3'; valid choices: cp3er, cp3er_stable, drqv2"
    assert "cpu_pixels" in check_group_overrides(["+profile=cpu_pixel"], CONFIG_DIR)
    assert "demo" in check_group_overrides(["--config-name", "demoo"], CONFIG_DIR)
    assert check_group_overrides(["task=cheetah_run", "agent=drqv2", "seed=3", "--config-name",
                                  "demo", "+profile=cpu_pixels"], CONFIG_DIR) is None
    # a multirun's sweep list is checked name by name; Hydra's own groups are Hydra's
    assert check_group_overrides(["-m", "task=cartpole_balance,walker_walk"], CONFIG_DIR) is None
    message = check_group_overrides(["-m", "task=cartpole_balance,walker_wlk"], CONFIG_DIR)
    assert message.startswith("unknown task 'walker_wlk'")
    assert check_group_overrides(["hydra/launcher=submitit_slurm"], CONFIG_DIR) is None


def test_mistyped_task_on_the_command_line_is_one_line() -> None:
    result = subprocess.run([sys.executable, "-m", "cp3er.train_cli", "task=cheetah_rn"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cheetah_run" in lines[0], result.stderr[-2000:]


def test_run_console_has_our_lines_only_and_eval_takes_threads_and_device(
        tmp_path: Path) -> None:
    """A state run's stderr holds cp3er-train's own lines (first: what runs where; one per
    evaluation; last: the final evaluation and where the outputs are), kept in train.log
    too, and no library warning; the csv logger leaves no empty videos/ folder (GIFs go to
    eval/); cp3er-eval takes --threads/--device and prints nothing but its JSON, which
    names the checkpoint's frame."""
    run_dir = tmp_path / "run"
    result = subprocess.run(_train_command(run_dir, "frames=400", "threads=1",
                                           "schedule.eval_every_frames=400"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert all(line.startswith("cp3er-train: ") for line in lines), result.stderr[-3000:]
    assert "cp3er on cartpole_balance (state)" in lines[0] and str(run_dir) in lines[0]
    assert "1 thread (set)" in lines[0]
    assert lines[1].startswith("cp3er-train: eval at frame 400: return ")
    assert "(1 episode)" in lines[1] and lines[1].endswith(" s")
    assert lines[-1].startswith("cp3er-train: done: final evaluation ")
    assert " (1 episode) at frame 400" in lines[-1]
    # train.log: the same lines, timestamped (Hydra's job logging, configs/config.yaml)
    logged = (run_dir / "train.log").read_text().splitlines()
    assert [line.split("] - ", 1)[1] for line in logged] == [
        line.removeprefix("cp3er-train: ") for line in lines]
    assert not (run_dir / "logs" / "videos").exists()
    assert str(run_dir / "learning_curve.png") in lines[-1]
    # the csv logger holds the resolved config as its hyper-parameters
    hparams = (run_dir / "logs" / "texts" / "hparams0.txt").read_text()
    assert "task_name: cartpole_balance" in hparams and "agent.name: cp3er" in hparams

    cmd = [sys.executable, "-m", "cp3er.evaluate", str(run_dir), "--episodes", "1",
           "--threads", "1", "--device", "cpu", "--no-progress"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.strip() == ""
    assert json.loads(result.stdout)["episodes"] == 1
    assert json.loads(result.stdout)["frame"] == 400
    bad = subprocess.run([*cmd[:-5], "--threads", "abc"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "threads='abc' is invalid" in bad.stderr


def test_preempted_run_names_the_command_that_continues_it(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = _train_command(run_dir, "frames=20000", "threads=1", "schedule.eval_every_frames=0")
    process = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    metrics = run_dir / "metrics.csv"
    while not metrics.is_file() or len(metrics.read_text().splitlines()) < 2:  # a train row
        assert process.poll() is None and time.monotonic() < deadline, "run ended early"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    hint = stderr.strip().splitlines()[-1]
    assert "continue with: cp3er-train " in hint, stderr[-2000:]
    assert f"run_dir={run_dir}" in hint and "frames=20000" in hint
    assert hint.endswith(" resume=true") and hint.count("resume=") == 1
