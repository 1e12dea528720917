"""End to end through the real command lines: cp3er-train (pixels) then cp3er-eval."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cp3er.checkpoint import load_checkpoint

TINY = [
    "hidden_dim=32", "feature_dim=16", "agent.actor_trunk=true", "batch_size=16",
    "replay.capacity=5000", "schedule.seed_frames=200", "schedule.explore_frames=200",
    "schedule.eval_episodes=1", "log.progress=false",
]


def _train(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cp3er.train_cli", f"run_dir={run_dir}", *TINY, *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_pixel_run_writes_the_run_folder_and_evaluates(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = _train(run_dir, "task=cartpole_balance", "obs=pixels", "frames=1000",
                    "schedule.eval_every_frames=1000", "log.backend=tensorboard")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("config.yaml", "metrics.csv", "checkpoints/latest.pt"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "eval").glob("*.gif")), "no evaluation video"
    assert list((run_dir / "tb").rglob("events.out.tfevents*")), "no TensorBoard events"
    _check_tensorboard_video_and_config(run_dir / "tb")
    rows = _rows(run_dir)
    train = [r for r in rows if r["phase"] == "train"]
    evals = [r for r in rows if r["phase"] == "eval"]
    assert len(train) == 1 and train[0]["frame"] == "1000"  # one 500-step episode
    assert len(evals) == 1 and evals[0]["frame"] == "1000"
    assert float(train[0]["loss_critic"]) == float(train[0]["loss_critic"])  # updates ran
    state = load_checkpoint(run_dir)
    # updates every 2 agent steps from step 100 (200 seed frames) to step 500 inclusive
    assert state["counters"]["step"] == 500 and state["counters"]["updates"] == 201

    cmd = [sys.executable, "-m", "cp3er.evaluate", str(run_dir), "--episodes", "2", "--video"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["task"] == "cartpole_balance" and summary["episodes"] == 2
    for key in ("return_mean", "return_iqm", "return_ci"):
        assert key in summary
    assert summary["return_ci"][0] <= summary["return_mean"] <= summary["return_ci"][1]
    assert len(summary["returns"]) == 2
    assert abs(sum(summary["returns"]) / 2 - summary["return_mean"]) < 1e-2
    assert Path(summary["video"]).is_file()


def _check_tensorboard_video_and_config(tb_dir: Path) -> None:
    """The evaluation GIF reaches TensorBoard as an animated image, the config as text."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = {p.parent for p in tb_dir.rglob("events.out.tfevents*")}
    acc = EventAccumulator(str(events), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    assert "eval/video" in acc.Tags()["images"]
    video = acc.Images("eval/video")[0]
    assert video.step == 1000 and video.encoded_image_string[:6] == b"GIF89a"
    assert video.width == 84 and video.height == 84
    (config,) = [t for t in acc.Tags()["tensors"] if t.startswith("config")]
    text = acc.Tensors(config)[0].tensor_proto.string_val[0].decode()
    assert "task_name: cartpole_balance" in text


def test_eval_of_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "cp3er.evaluate", str(tmp_path / "nothing")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no checkpoint" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("obs", ["state"])
def test_metaworld_state_run_logs_success(tmp_path: Path, obs: str) -> None:
    run_dir = tmp_path / "mw"
    result = _train(run_dir, "task=mw_reach", f"obs={obs}", "frames=500",
                    "schedule.eval_every_frames=0")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _rows(run_dir)
    assert {r["phase"] for r in rows} == {"train", "eval"}
    assert all(r["success"] in ("0", "1", "0.0", "1.0") for r in rows if r["phase"] == "train")
    assert rows[-1]["success"] != ""


def test_random_policy_evaluation_and_its_errors() -> None:
    from cp3er.evaluate import main as evaluate_main

    cmd = [sys.executable, "-m", "cp3er.evaluate", "--random-policy", "cartpole_swingup",
           "--episodes", "3", "--seed", "4"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert summary["task"] == "cartpole_swingup" and summary["episodes"] == 3
    assert summary["episode_length_mean"] == 500  # full episodes of random actions
    assert 0 < summary["return_mean"] < 300  # uniform actions never swing the pole up
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert json.loads(again.stdout.strip().splitlines()[-1]) == summary  # seeded
    assert evaluate_main(["--random-policy", "cartpole_swingp"]) == 2  # names the closest
    with pytest.raises(SystemExit):
        evaluate_main([])  # neither a run nor --random-policy


def test_constant_action_evaluation_and_its_errors(capsys) -> None:
    from cp3er.evaluate import constant_action_summary
    from cp3er.evaluate import main as evaluate_main

    # the constant push: the cart runs into the end of its rail, the pole never swings up
    summary = constant_action_summary("cartpole_swingup", [1.0], episodes=2, seed=4)
    assert summary["episode_length_mean"] == 500 and 70 < summary["return_mean"] < 78
    assert constant_action_summary("cartpole_swingup", [1.0], episodes=2, seed=4) == summary
    assert evaluate_main(["--constant-action", "cartpole_swingup:-1", "--episodes", "1"]) == 0
    assert 70 < json.loads(capsys.readouterr().out)["return_mean"] < 78
    assert evaluate_main(["--constant-action", "reacher_easy:1"]) == 2
    assert "reacher_easy takes 2 action values, got 1: [1.0]" in capsys.readouterr().err
    assert evaluate_main(["--constant-action", "reacher_easy:1,2"]) == 2
    assert "outside reacher_easy's bounds" in capsys.readouterr().err
    assert evaluate_main(["--constant-action", "reacher_esy:1,1"]) == 2
    assert "closest: reacher_easy" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate_main(["--constant-action", "reacher_easy:1,x"])
    assert "got 'reacher_easy:1,x'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # no action at all
        evaluate_main(["--constant-action", "reacher_easy"])
    with pytest.raises(SystemExit):  # two policies at once
        evaluate_main(["--random-policy", "reacher_easy", "--constant-action",
                       "reacher_easy:1,1"])
