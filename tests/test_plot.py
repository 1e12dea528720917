"""``cp3er-plot`` on synthetic run folders with known numbers (no training involved)."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from benchmark_scripts import benchmark_module
from scipy import stats

from cp3er.plot import PlotError, main, plot_learning_curve, summarize

COLUMNS = [
    "frame", "step", "phase", "episode", "episode_return", "episode_length", "success",
    "seconds", "fps", "loss_critic", "loss_actor", "q_mean", "target_mean", "critic_std",
    "actor_q", "consistency_loss", "action_spread", "action_bound_frac",
]
# Final evaluation returns per (task, agent), one per seed 0, 1, 2.
FINAL = {
    ("cheetah_run", "cp3er"): [800.0, 850.0, 100.0],
    ("walker_walk", "cp3er"): [900.0, 950.0, 990.0],
    ("cheetah_run", "drqv2"): [300.0, 400.0, 500.0],
    ("walker_walk", "drqv2"): [600.0, 200.0, 950.0],
}
FRAMES = [0, 10_000, 20_000, 30_000]
# cheetah_run/cp3er seed 2 is shorter and evaluated at other frames: 0, 5k, 20k.
SHORT_FRAMES = [0, 5_000, 20_000]


def write_run(run_dir: Path, task: str, agent: str, seed: int,
              evals: list[tuple[int, float, float | None]], label: str | None = None) -> Path:
    """A run folder: config.yaml and metrics.csv with eval rows ``(frame, return, success)``.

    Train rows carry a sentinel return (12345) that would spoil any eval statistic.
    """
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(
        f"task_name: {task}\nobs: pixels\nseed: {seed}\nframes: 30000\n"
        f"agent:\n  name: {agent}\n  lr: 0.0001\n" + (f"label: {label}\n" if label else ""))
    rows = []
    for index, (frame, ret, success) in enumerate(evals):
        if frame > 0:
            rows.append({"frame": frame - 500, "step": (frame - 500) // 2, "phase": "train",
                         "episode": index, "episode_return": 12345.0,
                         "episode_length": 500, "loss_critic": 0.1})
        rows.append({"frame": frame, "step": frame // 2, "phase": "eval", "episode": index,
                     "episode_return": ret, "episode_length": 500,
                     "success": "" if success is None else success})
    with open(run_dir / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return run_dir


def ramp(final: float, frames: list[int]) -> list[tuple[int, float, None]]:
    """Eval returns rising linearly from 0 at frame 0 to ``final`` at the last frame."""
    return [(f, final * f / frames[-1], None) for f in frames]


@pytest.fixture
def dmc_runs(tmp_path: Path) -> list[Path]:
    """2 tasks x 2 agents x 3 seeds."""
    runs = []
    for (task, agent), finals in FINAL.items():
        for seed, final in enumerate(finals):
            short = (task, agent, seed) == ("cheetah_run", "cp3er", 2)
            evals = ramp(final, SHORT_FRAMES if short else FRAMES)
            if (task, agent, seed) == ("walker_walk", "cp3er", 0):
                evals[-2] = (evals[-2][0], 1000.0, None)  # a peak: the final score is the last
            runs.append(write_run(tmp_path / f"{task}_{agent}_s{seed}", task, agent, seed, evals))
    return runs


def assert_png(path: Path, min_bytes: int = 10_000) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert width >= 300 and height >= 200
    assert len(data) > min_bytes
    import matplotlib.image

    pixels = matplotlib.image.imread(path)
    assert pixels[..., :3].std() > 0.01  # something is drawn


def run_main(args: list[str], capsys) -> tuple[int, dict | str, str]:
    code = main(args)
    captured = capsys.readouterr()
    out = json.loads(captured.out) if code == 0 and "--json" in args else captured.out
    return code, out, captured.err


def test_plot_runs_curves_and_aggregates(dmc_runs, tmp_path, capsys):
    out_png = tmp_path / "figs" / "compare.png"
    code, report, _ = run_main([*map(str, dmc_runs), "--out", str(out_png), "--json"], capsys)
    assert code == 0
    assert report["out"] == str(out_png)
    assert_png(out_png, min_bytes=30_000)

    # Curves: seed 2 of cheetah_run/cp3er is interpolated onto the union grid, which stops
    # at the shortest run's last frame (20k). At 10k: 800/3, 850/3 and 25 + 75/3 = 50.
    curve = report["curves"]["cheetah_run"]["cp3er"]
    assert curve["frames"] == [0, 5_000, 10_000, 20_000]
    at_10k = np.array([800 / 3, 850 / 3, 50.0])
    i = curve["frames"].index(10_000)
    assert curve["mean"][i] == pytest.approx(at_10k.mean())  # = 200
    assert curve["mean"][i] == pytest.approx(200.0)
    # Bootstrap over 3 seeds: each all-same-seed resample has probability 1/27 > 2.5%, so
    # the percentile band runs from the lowest to the highest seed.
    assert curve["ci_low"][i] == pytest.approx(at_10k.min())
    assert curve["ci_high"][i] == pytest.approx(at_10k.max())
    regular = report["curves"]["walker_walk"]["drqv2"]
    assert regular["frames"] == FRAMES
    assert regular["mean"][-1] == pytest.approx(np.mean(FINAL["walker_walk", "drqv2"]))
    assert set(report["curves"]) == {"cheetah_run", "walker_walk"}
    assert all(set(by_agent) == {"cp3er", "drqv2"} for by_agent in report["curves"].values())

    # Aggregates over the 6 final scores of each agent, normalized by 1000.
    for agent in ("cp3er", "drqv2"):
        scores = np.array(FINAL["cheetah_run", agent] + FINAL["walker_walk", agent]) / 1000
        agg = report["aggregate"][agent]
        expected = {
            "iqm": stats.trim_mean(scores, 0.25),
            "mean": scores.mean(),
            "optimality_gap": np.mean(np.maximum(0.0, 1.0 - scores)),
        }
        for name, value in expected.items():
            assert agg[name] == pytest.approx(value), (agent, name)
            low, high = agg[f"{name}_ci"]
            assert low <= agg[name] <= high, (agent, name)
            assert high - low > 0.01, (agent, name)  # seeds differ, so the CI has width
        assert agg["runs"] == 6
        assert agg["tasks"] == ["cheetah_run", "walker_walk"]
    # The hand numbers, so a wrong reference cannot hide a wrong estimator.
    assert report["aggregate"]["cp3er"]["iqm"] == pytest.approx(0.875)
    assert report["aggregate"]["cp3er"]["mean"] == pytest.approx(0.765)
    assert report["aggregate"]["cp3er"]["optimality_gap"] == pytest.approx(0.235)


def test_train_phase_curves_use_train_rows(dmc_runs, tmp_path, capsys):
    runs = [str(p) for p in dmc_runs if p.name.startswith("walker_walk_drqv2")]
    code, report, _ = run_main(
        [*runs, "--out", str(tmp_path / "train.png"), "--phase", "train", "--json"], capsys)
    assert code == 0
    curve = report["curves"]["walker_walk"]["drqv2"]
    assert curve["frames"] == [f - 500 for f in FRAMES[1:]]
    assert curve["mean"] == pytest.approx([12345.0] * 3)
    # The aggregates still use the final evaluation.
    final = np.mean(FINAL["walker_walk", "drqv2"]) / 1000
    assert report["aggregate"]["drqv2"]["mean"] == pytest.approx(final)


def test_meta_world_success_is_not_rescaled(tmp_path, capsys):
    runs = [
        write_run(tmp_path / f"mw_s{seed}", "mw_assembly", "cp3er", seed,
                  [(0, 10.0, 0.0), (10_000, 900.0, 0.5), (20_000, 1500.0, final)])
        for seed, final in enumerate([0.5, 1.0])
    ]
    code, report, _ = run_main(
        [*map(str, runs), "--out", str(tmp_path / "mw.png"), "--metric", "success", "--json"],
        capsys)
    assert code == 0
    agg = report["aggregate"]["cp3er"]
    assert agg["mean"] == pytest.approx(0.75)
    assert agg["optimality_gap"] == pytest.approx(0.25)
    assert report["curves"]["mw_assembly"]["cp3er"]["mean"] == pytest.approx([0.0, 0.5, 0.75])


def test_plot_learning_curve_single_run(tmp_path):
    run = write_run(tmp_path / "run", "cheetah_run", "cp3er", 0, ramp(700.0, FRAMES))
    out = plot_learning_curve(run)
    assert out == run / "learning_curve.png"
    assert_png(out)
    mw = write_run(tmp_path / "mw", "mw_assembly", "cp3er", 0,
                   [(0, 1.0, 0.0), (10_000, 50.0, 1.0)])
    assert_png(plot_learning_curve(mw, tmp_path / "elsewhere" / "mw.png"))
    empty = tmp_path / "empty"
    write_run(empty, "cheetah_run", "cp3er", 0, [])
    assert_png(plot_learning_curve(empty), min_bytes=5_000)  # "no finished episodes yet"


def test_clear_errors(dmc_runs, tmp_path, capsys):
    out = str(tmp_path / "x.png")
    missing = tmp_path / "not_a_run"
    missing.mkdir()
    code, _, err = run_main([str(dmc_runs[0]), str(missing), "--out", out], capsys)
    assert code == 2
    assert err.startswith("cp3er-plot: no run folders (metrics.csv + config.yaml) under")
    assert str(missing) in err
    assert "Traceback" not in err
    with pytest.raises(PlotError, match=r"no metrics\.csv"):
        plot_learning_curve(missing)

    code, _, err = run_main([str(dmc_runs[0]), "--out", out, "--metric", "reward"], capsys)
    assert code == 2
    assert "unknown metric 'reward'" in err and "episode_return" in err

    code, _, err = run_main([str(dmc_runs[0]), "--out", out, "--metric", "success"], capsys)
    assert code == 2
    assert "no eval rows with a success value" in err

    no_eval = write_run(tmp_path / "no_eval", "cheetah_run", "cp3er", 0, [])
    with open(no_eval / "metrics.csv", "a", newline="") as handle:
        csv.DictWriter(handle, COLUMNS, restval="").writerow(
            {"frame": 1000, "phase": "train", "episode_return": 5.0})
    code, _, err = run_main([str(no_eval), "--out", out], capsys)
    assert code == 2
    assert "no eval rows" in err and "no_eval" in err
    assert not Path(out).exists()


def test_label_groups_variants_of_one_agent(tmp_path, capsys):
    """Runs of one agent with a ``label`` form their own group (an ablation beside it)."""
    runs = [write_run(tmp_path / f"plain{s}", "cheetah_run", "cp3er", s, ramp(100.0, FRAMES))
            for s in range(2)]
    runs += [write_run(tmp_path / f"variant{s}", "cheetah_run", "cp3er", s,
                       ramp(500.0, FRAMES), label="cp3er_st") for s in range(2)]
    code, report, _ = run_main([*map(str, runs), "--out", str(tmp_path / "c.png"), "--json"],
                               capsys)
    assert code == 0
    assert sorted(report["aggregate"]) == ["cp3er", "cp3er_st"]
    assert report["aggregate"]["cp3er"]["mean"] == pytest.approx(0.1)
    assert report["aggregate"]["cp3er_st"]["mean"] == pytest.approx(0.5)


def test_collect_writes_rows_tables_and_each_run_command(dmc_runs: list[Path],
                                                         tmp_path: Path, capsys) -> None:
    collect = benchmark_module("collect")
    launched = dmc_runs[0]
    (launched / ".hydra").mkdir()
    (launched / ".hydra" / "overrides.yaml").write_text(
        "- +profile=cpu_pixels\n- task=cheetah_run\n- seed=0\n- resume=true\n"
        "- log.progress=false\n")
    started = write_run(tmp_path / "started", "cheetah_run", "cp3er", 9, [])  # no eval yet
    out = tmp_path / "out" / "grid"
    assert collect.main([str(tmp_path), "--out", str(out)]) == 0
    assert f"collect: skipped: {started} has no evaluation rows yet" in capsys.readouterr().err
    with open(out.with_suffix(".csv"), newline="") as handle:
        rows = {r["run_dir"].rsplit("/", 1)[-1]: r for r in csv.DictReader(handle)}
    assert len(rows) == len(dmc_runs)
    first = rows[launched.name]
    # the run's command without the launch-only overrides; runs without Hydra files: empty
    assert first["command"] == "cp3er-train +profile=cpu_pixels task=cheetah_run seed=0"
    assert rows[dmc_runs[1].name]["command"] == ""
    assert float(first["final_return"]) == FINAL[("cheetah_run", "cp3er")][0]
    table = Path(f"{out}_table.md").read_text()
    assert "| cheetah_run | cp3er |" in table and Path(f"{out}_aggregate.json").is_file()


def collect_leaving_runs_out(runs: list[Path], tmp_path: Path, flags: list[str],
                             capsys) -> tuple[Path, str]:
    """Run collect.py with ``flags`` that leave some runs out of the comparison; check that
    every run still has its CSV row. Returns the output prefix and collect's stderr."""
    collect = benchmark_module("collect")
    out = tmp_path / "out" / "grid"
    assert collect.main([str(tmp_path), "--out", str(out), *flags]) == 0
    err = capsys.readouterr().err
    with open(out.with_suffix(".csv"), newline="") as handle:
        assert len(list(csv.DictReader(handle))) == len(runs)  # every run in the CSV
    return out, err


def test_collect_min_frames_compares_runs_at_equal_frames(dmc_runs: list[Path],
                                                          tmp_path: Path, capsys) -> None:
    out, err = collect_leaving_runs_out(dmc_runs, tmp_path, ["--min-frames", "30000"], capsys)
    short = tmp_path / "cheetah_run_cp3er_s2"  # its last evaluation is at 20k frames
    assert (f"left out of the table, plot and aggregates: {short} stopped at frame 20000 "
            "(< --min-frames 30000)") in err
    table = Path(f"{out}_table.md").read_text()
    # cheetah_run / cp3er: seeds 0 and 1 only (800, 850), all at 30k frames
    assert "| cheetah_run | cp3er | 825 [800, 850] | 2 | 30000 |" in table
    aggregate = json.loads(Path(f"{out}_aggregate.json").read_text())["aggregate"]
    finals = [800.0, 850.0, *FINAL[("walker_walk", "cp3er")]]
    assert aggregate["cp3er"]["mean"] == pytest.approx(np.mean(finals) / 1000)
    # without it the short run's last evaluation (100 at 20k) is its final score
    collect = benchmark_module("collect")
    assert collect.main([str(tmp_path), "--out", str(out)]) == 0
    table = Path(f"{out}_table.md").read_text()
    assert "| cheetah_run | cp3er | 583 " in table and "| 3 | 20000/30000 |" in table
    assert collect.main([str(tmp_path), "--out", str(out), "--min-frames", "40000"]) == 2
    assert "no run under" in capsys.readouterr().err


def test_collect_seeds_compares_a_balanced_grid(dmc_runs: list[Path], tmp_path: Path,
                                                capsys) -> None:
    """``--seeds 0,1``: the seed-2 runs keep their CSV rows and leave the table and the
    aggregates (a later seed still running must not tilt the comparison)."""
    out, err = collect_leaving_runs_out(dmc_runs, tmp_path, ["--seeds", "0,1"], capsys)
    assert "(seed 2 not in --seeds)" in err
    aggregate = json.loads(Path(f"{out}_aggregate.json").read_text())["aggregate"]
    finals = [*FINAL[("cheetah_run", "cp3er")][:2], *FINAL[("walker_walk", "cp3er")][:2]]
    assert aggregate["cp3er"]["runs"] == 4
    assert aggregate["cp3er"]["mean"] == pytest.approx(np.mean(finals) / 1000)


def test_collect_agents_compares_only_the_named_agents(dmc_runs: list[Path], tmp_path: Path,
                                                       capsys) -> None:
    """``--agents cp3er``: the other agent's runs keep their CSV rows and leave the table,
    the aggregates and the pairwise comparisons."""
    out, err = collect_leaving_runs_out(dmc_runs, tmp_path, ["--agents", "cp3er"], capsys)
    assert "(agent drqv2 not in --agents)" in err
    report = json.loads(Path(f"{out}_aggregate.json").read_text())
    assert list(report["aggregate"]) == ["cp3er"]
    assert report["probability_of_improvement"] == {}
    assert "drqv2" not in Path(f"{out}_table.md").read_text()


def test_cp3er_plot_of_one_run_draws_its_own_curves(tmp_path, capsys):
    """One run: the figure is the run's eval and train curves (the learning-curve figure),
    not a comparison with single-score aggregate panels."""
    run = write_run(tmp_path / "run", "cheetah_run", "cp3er", 0, ramp(700.0, FRAMES))
    out = tmp_path / "one.png"
    code, report, _ = run_main([str(run), "--out", str(out), "--json"], capsys)
    assert code == 0 and report["figure"] == "single run"
    assert_png(out)
    plot_learning_curve(run, tmp_path / "same.png")
    assert out.read_bytes() == (tmp_path / "same.png").read_bytes()
    code, text, _ = run_main([str(run), "--out", str(out)], capsys)
    assert code == 0 and "one run: its eval and train curves" in text
    assert "final episode_return 700.000" in text
    code, report, _ = run_main([str(run), str(write_run(tmp_path / "b", "cheetah_run", "cp3er",
                                                          1, ramp(600.0, FRAMES))),
                                "--out", str(out), "--json"], capsys)
    assert report["figure"] == "comparison"


def test_a_folder_of_runs_stands_for_its_runs(dmc_runs, tmp_path) -> None:
    """A grid's or sweep's folder given to ``cp3er-plot`` is read as the run folders
    under it (the same report as listing them)."""
    grid = dmc_runs[0].parent
    listed = summarize(dmc_runs, tmp_path / "listed.png")
    folder = summarize([grid], tmp_path / "folder.png")
    assert folder["curves"] == listed["curves"] and folder["aggregate"] == listed["aggregate"]


def test_damaged_run_files_and_nan_rows_are_one_line_each(dmc_runs, tmp_path, capsys):
    """Issue 31, item 7: a malformed config.yaml and a binary metrics.csv are one line
    each (exit 2); evaluation rows whose return is nan are reported, not dropped silently."""
    out = str(tmp_path / "x.png")
    broken = write_run(tmp_path / "broken_yaml", "cheetah_run", "cp3er", 0, ramp(1.0, FRAMES))
    for config in ("task_name: [cheetah_run\nagent: {name: cp3er\n", "- a list\n"):
        (broken / "config.yaml").write_text(config)
        code, _, err = run_main([str(broken), "--out", out], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert err.startswith(f"cp3er-plot: {broken / 'config.yaml'} is not a")
    binary = write_run(tmp_path / "binary", "cheetah_run", "cp3er", 0, ramp(1.0, FRAMES))
    (binary / "metrics.csv").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01" * 50)
    code, _, err = run_main([str(binary), "--out", out], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"cp3er-plot: {binary / 'metrics.csv'} is not a metrics CSV")
    # a nan final evaluation: the run's final score is its previous evaluation, and says so
    nan_run = write_run(tmp_path / "nan_run", "cheetah_run", "cp3er", 3,
                        [*ramp(600.0, FRAMES)[:-1], (30_000, float("nan"), None)])
    code, report, err = run_main([str(nan_run), *map(str, dmc_runs), "--out", out, "--json"],
                                 capsys)
    assert code == 0
    assert (f"cp3er-plot: warning: {nan_run / 'metrics.csv'}: 1 eval row(s) with a "
            "non-finite episode_return (frames 30000) left out") in err
    assert report["left_out"] == [{"run": str(nan_run), "phase": "eval", "frames": [30_000]}]


def test_collect_reports_the_collapse_metrics_at_the_end_of_each_run(tmp_path) -> None:
    """bound_frac_end / spread_end: means over the train rows of the last 10% of the run's
    frames; a run (DrQ-v2) that logs no spread gets an empty cell."""
    from cp3er.run_data import Run

    collect = benchmark_module("collect")
    rows = [{"frame": str(f), "phase": "train", "action_bound_frac": str(f / 100_000),
             "action_spread": "0.5" if f < 90_000 else "0.1"} for f in range(10_000, 100_001,
                                                                              5_000)]
    rows.insert(3, {"frame": "25000", "phase": "eval", "action_bound_frac": "",
                    "action_spread": ""})
    run = Run(tmp_path, "cheetah_run", "cp3er", "state", 1, rows)
    # frames 90k < f <= 100k: 95k and 100k
    assert collect.collapse_end(run, "action_bound_frac", 100_000) == pytest.approx(0.975)
    assert collect.collapse_end(run, "action_spread", 100_000) == pytest.approx(0.1)
    # at a 50k-frame final evaluation: 50k only (45k < f <= 50k)
    assert collect.collapse_end(run, "action_bound_frac", 50_000) == pytest.approx(0.5)
    no_spread = Run(tmp_path, "cheetah_run", "drqv2", "state", 1,
                    [{**r, "action_spread": ""} for r in rows])
    assert collect.collapse_end(no_spread, "action_spread", 100_000) == ""
