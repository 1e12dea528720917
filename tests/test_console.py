"""What ``cp3er-train`` tells its user (issue 32, items 3-6): a line per evaluation, the
uniform random policy's return beside the final evaluation and on the learning curve, the
expected duration of a long run, a help text of its own; ``cp3er-eval`` names the
checkpoint's frame; ``cp3er-toy`` prints a table unless ``--json``, and says ``--quick``
is under-trained."""

from __future__ import annotations

import contextlib
import io
import json
import random
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from tiny_run import tiny_cfg, tiny_command

from cp3er import console, plot
from cp3er.config_schema import CONFIG_DIR
from cp3er.evaluate import main as evaluate_main
from cp3er.evaluate import random_policy_summary
from cp3er.plot import plot_learning_curve
from cp3er.run_data import RANDOM_POLICY_FILE
from cp3er.toy import main as toy_main
from cp3er.train import Trainer
from cp3er.train_cli import _end_line, cli


@pytest.fixture(scope="module")
def talkative_run(tmp_path_factory) -> tuple[Path, Trainer, str]:
    """A finished tiny state run (400 frames, evaluations at frames 200 and 400, one
    episode each) whose end measured the random policy's return (1 episode instead of 10,
    the share rule relaxed: a tiny run would skip it) and whose first 10 updates were timed
    after a start line that announced an estimate: (run folder, trainer, its stderr)."""
    run = tmp_path_factory.mktemp("talkative") / "run"
    stderr = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(console, "RANDOM_EPISODES", 1)
        patch.setattr(console, "RANDOM_SHARE", {"state": 100.0, "pixels": 100.0})
        patch.setattr("cp3er.console.TIMED_UPDATES", 10)
        trainer = Trainer(tiny_cfg(run, "frames=400", "schedule.eval_every_frames=200"))
        trainer.speed.announced = True
        with contextlib.redirect_stderr(stderr):
            assert trainer.train() == "done"
    return run, trainer, stderr.getvalue()


def test_each_evaluation_prints_one_line(talkative_run) -> None:
    """Item 5: frame, mean return, episodes, seconds; the values are metrics.csv's."""
    _, trainer, stderr = talkative_run
    lines = [line for line in stderr.splitlines() if "eval at frame" in line]
    rows = [r for r in trainer.metrics.rows() if r["phase"] == "eval"]
    assert [int(r["frame"]) for r in rows] == [200, 400] and len(lines) == 2
    for line, row in zip(lines, rows, strict=True):
        assert line.startswith(f"cp3er-train: eval at frame {row['frame']}: return "
                               f"{float(row['episode_return']):.1f} (1 episode), ")
        assert line.endswith(" s") and float(line.rsplit(", ", 1)[1][:-2]) > 0
    summary = {"returns": [10.0, 30.0, 20.0], "return_mean": 20.0, "success_rate": 0.5}
    assert console.eval_line(10_000, summary, 3.21) == (
        "eval at frame 10,000: return 20.0 (3 episodes, min 10.0, max 30.0, std 8.2), "
        "success 0.50, 3.2 s")


def test_end_line_and_curve_state_the_random_policy_return(talkative_run, monkeypatch) -> None:
    """Item 3: measured on an env of its own with cp3er-eval --random-policy's seed (the
    same number), kept in the run folder, named in the end line with the verdict, drawn
    on the learning curve."""
    run, trainer, _ = talkative_run
    reference = json.loads((run / RANDOM_POLICY_FILE).read_text())
    assert reference["episodes"] == 1 and reference["seed"] == console.RANDOM_SEED
    assert reference["return_mean"] == random_policy_summary("cartpole_balance", 1)["return_mean"]
    final = float([r for r in trainer.metrics.rows() if r["phase"] == "eval"][-1]["episode_return"])
    verdict = "below" if final < reference["return_mean"] else "above"
    assert (f"final evaluation {final:.1f} (1 episode) at frame 400; uniform random actions "
            f"{reference['return_mean']:.1f} (1 episode from states, seed 12345): the trained "
            f"policy is {verdict} random; ") in _end_line(trainer)
    assert ", videos" not in _end_line(trainer)  # eval/ holds the reference, no GIF
    figures = []
    monkeypatch.setattr(plot, "_save", lambda figure, out: figures.append(figure))
    plot_learning_curve(run)
    labels = figures[0].axes[0].get_legend_handles_labels()[1]
    assert f"uniform random actions ({reference['return_mean']:.1f}, 1 episode)" in labels
    assert console.reference_phrase(241.3, {"return_mean": 332.0, "episodes": 10,
                                            "seed": 12345}).endswith("below random")


def test_random_reference_skips_a_short_run_and_spares_the_run_rng(tmp_path, monkeypatch
                                                                   ) -> None:
    """Item 3: a run too short for 10 random episodes to be cheap says why and how to get
    the number; a measurement leaves torch's, NumPy's and Python's RNG states as it found
    them (the run's streams)."""
    cfg = tiny_cfg(tmp_path / "run", "frames=400")
    reference, reason = console.random_reference(cfg, tmp_path / "run", 400)
    assert reference is None and reason.startswith("not measured: 10 episodes (10,000 frames)")
    assert "cp3er-eval --random-policy cartpole_balance --episodes 10" in reason
    assert not (tmp_path / "run" / RANDOM_POLICY_FILE).exists()
    monkeypatch.setattr(console, "RANDOM_EPISODES", 1)
    torch.manual_seed(5)
    np.random.seed(5)  # noqa: NPY002
    random.seed(5)
    before = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())  # noqa: NPY002
    console._measure_random(cfg)
    assert torch.equal(torch.get_rng_state(), before[0])
    assert np.array_equal(np.random.get_state()[1], before[1])  # noqa: NPY002
    assert random.getstate() == before[2]


def test_a_long_run_states_its_expected_duration(talkative_run, tmp_path) -> None:
    """Item 4: over an hour by docs/performance.md's figure, the start says how long and
    from what; the first updates give a measured figure."""
    def cfg(*overrides: str, name: str = "config"):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
            return compose(config_name=name, overrides=list(overrides))

    line = console.expected_duration(cfg("task=cheetah_run", "obs=pixels", "device=cpu"))
    assert line.startswith("expected duration about 11 days: 3,100,000 frames at ~3.3 frames/s")
    assert "docs/performance.md" in line and "+profile=cpu_states" in line
    assert console.expected_duration(cfg("+profile=cpu_states", "task=cartpole_swingup")) is None
    assert console.expected_duration(cfg(name="demo")) is None  # 8,000 frames
    # the CPU pixel profile's batch 32 has its own figures, with and without the trunk
    profile = ("+profile=cpu_pixels", "task=cartpole_swingup")
    assert console.expected_duration(cfg(*profile, "agent.actor_trunk=false")).startswith(
        "expected duration about 2.2 hours: 60,000 frames at ~7.6 frames/s")
    assert console.expected_duration(cfg(*profile)).startswith(
        "expected duration about 69 minutes: 60,000 frames at ~14.5 frames/s")
    # a batch size with no figure of its own borrows the nearest one's and says so
    line = console.expected_duration(cfg("task=walker_walk", "obs=pixels", "device=cpu"))
    assert "~3.3 frames/s" in line and "measured at batch 256, this run's is 512" in line
    assert console.measured_duration(3_000_000, 3.0, 50).endswith("about 12 days left for "
                                                                   "3,000,000 frames")
    assert console.measured_duration(1000, 100.0, 50) is None
    assert console.measured_duration(1000, 100.0, 50, announced=True) is not None
    assert "cp3er-train: measured " in talkative_run[2]  # the start had announced one
    # the command line: the estimate right after the start line, before any frame
    run = tmp_path / "long"
    process = subprocess.Popen(tiny_command(run, "frames=3100000"), stderr=subprocess.PIPE,
                               text=True)
    try:
        lines, deadline = [], time.monotonic() + 120
        while len(lines) < 2 and time.monotonic() < deadline:
            lines.append(process.stderr.readline())
    finally:
        process.kill()
        process.wait()
    assert "3,100,000 frames" in lines[0], lines
    assert lines[1].startswith("cp3er-train: expected duration about 10.8 hours"), lines
    assert "expected duration" in (run / "train.log").read_text()


def test_help_is_the_projects_own(monkeypatch, capsys) -> None:
    """Item 6: usage, examples and the config choices, no Hydra template or schemas."""
    monkeypatch.setattr("sys.argv", ["cp3er-train", "--help"])
    with pytest.raises(SystemExit) as stop:
        cli()
    assert stop.value.code in (0, None)
    text = capsys.readouterr().out
    assert text.startswith("usage: cp3er-train") and "Examples:" in text
    assert "cp3er, cp3er_stable, drqv2" in text and "cpu_pixels, cpu_states" in text
    assert "_schema" not in text and "powered by Hydra" not in text


def test_eval_json_names_the_checkpoint_frame(talkative_run, capsys) -> None:
    run = talkative_run[0]
    for target in (run, run / "checkpoints" / "latest.pt"):
        assert evaluate_main([str(target), "--episodes", "1", "--no-progress"]) == 0
        assert json.loads(capsys.readouterr().out)["frame"] == 400


def test_toy_prints_a_table_unless_json_and_says_quick_is_under_trained(capsys) -> None:
    args = ["--quick", "--steps", "20", "--eval-samples", "128", "--couplings", "independent"]
    toy_main(args)
    captured = capsys.readouterr()
    assert "under-trained" in captured.err
    assert captured.out.startswith("sliced Wasserstein distance")
    assert "eight_gaussians  independent" in captured.out
    toy_main([*args, "--json"])
    report = json.loads(capsys.readouterr().out)
    assert [r["coupling"] for r in report["results"]] == ["independent"]
