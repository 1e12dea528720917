"""Sweeps through Hydra's submitit launcher (docs/scale.md): a local sweep, a requeued job
that continues from its checkpoint (``resume=auto``), the Slurm preset's sbatch script."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_run import TINY_STATE

from cp3er.checkpoint import load_checkpoint
from cp3er.config_schema import CONFIG_DIR
from cp3er.plot import summarize

pytest.importorskip("hydra_plugins.hydra_submitit_launcher",
                    reason="the cluster extra is not installed (pip install -e '.[cluster]')")


def _sweep(tmp_path: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "cp3er.train_cli", "-m", "hydra/launcher=local",
            *TINY_STATE, "threads=1", "resume=auto", "checkpoint_every=500",
            f"run_dir={tmp_path}/${{task_name}}_s${{seed}}",
            f"hydra.sweep.dir={tmp_path}/.sweep", *overrides]


def _rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_local_sweep_completes_every_run_and_plots_as_one_folder(tmp_path: Path) -> None:
    """2 tasks x 2 seeds through submitit's local executor: every run folder complete (final
    evaluation, curve, checkpoint); ``cp3er-plot`` takes the sweep's folder."""
    result = subprocess.run(
        _sweep(tmp_path, "task=cartpole_balance,pendulum_swingup", "seed=1,2", "frames=1000",
               "schedule.eval_every_frames=500"),
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    runs = sorted(p for p in tmp_path.iterdir() if p.name.endswith(("_s1", "_s2")))
    assert [p.name for p in runs] == ["cartpole_balance_s1", "cartpole_balance_s2",
                                      "pendulum_swingup_s1", "pendulum_swingup_s2"]
    for run in runs:
        assert (run / "learning_curve.png").is_file()
        assert (run / "checkpoints" / "latest.pt").is_file()
        evals = [r for r in _rows(run) if r["phase"] == "eval"]
        assert [r["frame"] for r in evals] == ["500", "1000"]
        # the job's command line beside its run, as a single run's (benchmarks/collect.py)
        overrides = (run / ".hydra" / "overrides.yaml").read_text()
        assert f"seed={run.name[-1]}" in overrides and f"task={run.name[:-3]}" in overrides
    report = summarize([tmp_path], tmp_path / "sweep.png")
    assert {task: set(agents) for task, agents in report["curves"].items()} == {
        "cartpole_balance": {"cp3er"}, "pendulum_swingup": {"cp3er"}}
    assert all(c["cp3er"]["seeds"] == 2 for c in report["curves"].values())


def test_a_requeued_job_continues_from_its_checkpoint(tmp_path: Path) -> None:
    """A job interrupted the way a cluster preempts it (SIGUSR2 to the job) checkpoints the
    run where the signal found it, then hands the signal to submitit, which requeues the
    job with the same command; ``resume=auto`` continues from that checkpoint: the run ends
    at the requested frame with no duplicated metrics rows."""
    sweep = subprocess.Popen(_sweep(tmp_path, "task=cartpole_balance", "seed=1", "frames=3000",
                                    "schedule.eval_every_frames=1000"),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run, jobs = tmp_path / "cartpole_balance_s1", tmp_path / ".sweep" / ".submitit"
    deadline = time.monotonic() + 600
    while not (run / "checkpoints" / "latest.pt").is_file():  # the checkpoint at frame 500
        assert sweep.poll() is None and time.monotonic() < deadline, sweep.stdout.read()
        time.sleep(0.2)
    job_id = next(p.name for p in jobs.iterdir() if p.name.isdigit())  # the controller's pid
    children = Path(f"/proc/{job_id}/task/{job_id}/children").read_text().split()
    assert len(children) == 1  # the job's process (submitit's local controller runs it)
    os.kill(int(children[0]), signal.SIGUSR2)  # what Slurm sends before the time limit
    output, _ = sweep.communicate(timeout=900)
    assert sweep.returncode == 0, output[-2000:]
    logs = "".join(p.read_text() for p in (jobs / job_id).glob("*_log.*"))
    assert "Requeued job" in logs
    # the trainer checkpointed where the signal found it, and the requeued job went on
    # from that frame (nothing redone)
    stopped = re.search(r"SIGUSR2 received: checkpoint written at frame ([\d,]+)", logs)
    assert stopped is not None, logs[-3000:]
    assert f"from frame {stopped.group(1).replace(',', '')}" in logs
    rows = _rows(run)
    train = [int(r["frame"]) for r in rows if r["phase"] == "train"]
    assert train == sorted(set(train)) and train  # no row twice, in order
    assert [r["frame"] for r in rows if r["phase"] == "eval"] == ["1000", "2000", "3000"]
    assert load_checkpoint(run)["counters"]["step"] == 1500  # 3,000 frames, action repeat 2


def test_the_slurm_preset_renders_an_sbatch_script(tmp_path: Path, monkeypatch) -> None:
    """No Slurm here: the preset's parameters, given to submitit's Slurm executor the way
    the launcher gives them (``AutoExecutor(cluster="slurm")``, Slurm-only keys prefixed),
    render an sbatch script with the partition, GPU, time limit, requeue signal and setup
    lines (an empty ``srun`` on PATH stands for the cluster submitit looks for)."""
    import submitit
    from hydra import compose, initialize_config_dir
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = compose(config_name="config", return_hydra_config=True, overrides=[
            "hydra/launcher=slurm", "hydra.launcher.partition=gpu",
            f"hydra.sweep.dir={tmp_path}", "hydra.job.name=cp3er"])
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    params.pop("_target_")
    assert params["max_num_timeout"] > 0  # preempted / timed-out jobs are requeued
    executor = submitit.AutoExecutor(folder=params.pop("submitit_folder"), cluster="slurm",
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v
                                  for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python -m cp3er.train_cli", "uid")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1", "#SBATCH --time=1440",
                 "#SBATCH --signal=USR2@300", "#SBATCH --cpus-per-task=8",
                 "#SBATCH --mem=64GB", "export MUJOCO_GL=egl"):
        assert line in script, (line, script)
