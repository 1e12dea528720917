"""The suite job lists (benchmarks/*.txt, run by benchmarks/suite.sh) name real tasks,
agents and overrides: each job composes and validates with its profile, so a typo fails
here and not hours into a suite."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from cp3er.config_check import validate_config
from cp3er.config_schema import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]
#: job list -> the PROFILE its header names (benchmarks/suite.sh)
JOB_LISTS = {
    "cpu_pixel_main.txt": "cpu_pixels",
    "cpu_pixel_ablations.txt": "cpu_pixels",
    "cpu_pixel_stable.txt": "cpu_pixels",
    "cpu_pixel_penalty.txt": "cpu_pixels",
    "state_screen.txt": "cpu_states",
    "state_suite.txt": "cpu_states",
}


def _jobs(name: str) -> list[list[str]]:
    lines = (ROOT / "benchmarks" / name).read_text().splitlines()
    return [line.split() for line in lines if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.parametrize("name", sorted(JOB_LISTS))
def test_every_job_composes_and_validates(name: str, tmp_path: Path) -> None:
    jobs = _jobs(name)
    assert jobs, f"{name} lists no job"
    seen, composed, tasks = set(), set(), set()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        for task, agent, seed, *rest in jobs:
            label = rest[0] if rest else agent
            run = (task, label, seed)
            assert run not in seen, f"{name}: {run} listed twice (one run folder)"
            seen.add(run)
            # seeds and labels compose alike, and a task file only adds its deltas: each
            # agent with its overrides and each task is composed at least once
            config = (agent, *rest[1:])
            if config in composed and task in tasks:
                continue
            composed.add(config)
            tasks.add(task)
            cfg = compose(config_name="config", overrides=[
                f"+profile={JOB_LISTS[name]}", f"task={task}", f"agent={agent}",
                f"seed={seed}", f"label={label}", f"run_dir={tmp_path / 'r'}", *rest[1:]])
            validate_config(cfg)


def _run_suite(tmp_path: Path, bin_dir: Path, **settings: str) -> subprocess.CompletedProcess:
    """benchmarks/suite.sh with OUT under ``tmp_path``, ``bin_dir`` first on PATH and
    ``settings`` (PROFILE, LANES, JOBS, ARCHIVE...) as environment variables."""
    env = {**os.environ, "OUT": str(tmp_path / "out"), **settings,
           "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return subprocess.run(["bash", "benchmarks/suite.sh"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_suite_refuses_an_unknown_profile(tmp_path: Path) -> None:
    result = _run_suite(tmp_path, ROOT / ".venv" / "bin", PROFILE="cpu_nope")
    assert result.returncode == 2
    assert "unknown PROFILE=cpu_nope" in result.stderr
    assert "cpu_pixels" in result.stderr and "cpu_states" in result.stderr
    assert not (tmp_path / "out").exists()


def _fake_train(tmp_path: Path) -> Path:
    """A stand-in cp3er-train that records its task, finishes the run (learning_curve.png),
    and on the job of task "first" appends a job to the list while the suite runs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "cp3er-train"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'for a in "$@"; do case $a in\n'
        '  run_dir=*) d=${a#run_dir=};; task=*) t=${a#task=};; esac; done\n'
        'mkdir -p "$d"; echo "$t" >> "$RAN"\n'
        '[ "$t" = first ] && echo "added cp3er 1" >> "$JOBS"\n'
        'touch "$d/learning_curve.png"\n')
    fake.chmod(0o755)
    return bin_dir


def test_a_lane_reads_the_job_list_again_before_each_pick(tmp_path: Path) -> None:
    bin_dir = _fake_train(tmp_path)
    jobs, ran = tmp_path / "jobs.txt", tmp_path / "ran.txt"
    jobs.write_text("# a job list\nfirst cp3er 1\nsecond cp3er 1\n")
    result = _run_suite(tmp_path, bin_dir, PROFILE="cpu_states", LANES="1", JOBS=str(jobs),
                        RAN=str(ran))
    assert result.returncode == 0, result.stderr
    assert ran.read_text().split() == ["first", "second", "added"]
    log = (tmp_path / "out" / "lane.log").read_text()
    assert log.count(" end ") == 3


def test_archived_runs_are_skipped_and_a_missing_archive_is_refused(tmp_path: Path) -> None:
    bin_dir = _fake_train(tmp_path)
    jobs, ran, archive = tmp_path / "jobs.txt", tmp_path / "ran.txt", tmp_path / "archive"
    jobs.write_text("second cp3er 1\nthird cp3er 2 lbl x=1\nfourth cp3er 1\n")
    (archive / "second_cp3er_s1").mkdir(parents=True)
    (archive / "second_cp3er_s1" / "metrics.csv").write_text("frame\n")
    (archive / "third_lbl_s2").mkdir()  # a folder without metrics.csv is not a finished run
    settings = {"PROFILE": "cpu_states", "LANES": "1", "JOBS": str(jobs), "RAN": str(ran)}
    result = _run_suite(tmp_path, bin_dir, **settings, ARCHIVE=str(archive))
    assert result.returncode == 0, result.stderr
    assert ran.read_text().split() == ["third", "fourth"]
    missing = _run_suite(tmp_path, bin_dir, **settings, ARCHIVE=str(tmp_path / "nope"))
    assert missing.returncode == 2
    assert "ARCHIVE=" in missing.stderr and "is not a folder" in missing.stderr
