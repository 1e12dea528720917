"""Bad configs fail before anything heavy starts, with the key, value and valid choices."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from cp3er.config_check import ConfigError, validate_config
from cp3er.train import CONFIG_DIR
from envs.registry import UnknownTaskError


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def test_default_config_is_valid() -> None:
    validate_config(_cfg())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("obs=rgb", "obs='rgb'.*'pixels', 'state'"),
        ("device=tpu", "device='tpu'.*'cpu', 'cuda'"),
        ("batch_size=0", "batch_size=0.*>= 1"),
        ("batch_size=-3", "batch_size=-3.*>= 1"),
        ("batch_size=abc", "batch_size='abc'.*integer"),
        ("n_step=0", "n_step=0.*>= 1"),
        ("frames=-1", "frames=-1"),
        ("replay.capacity=100", "batch_size=256.*replay.capacity=100"),
        ("replay.sampler=prioritized", "replay.sampler='prioritized'.*'proximal'"),
        ("replay.storage=disk", "replay.storage='disk'.*'memmap'"),
        ("gamma=1.5", "gamma=1.5"),
        ("lr=0", "lr=0"),
        ("label=' '", "label=.*null or a non-empty name"),
        ("label=3", "label=3.*null or a non-empty name"),
        ("env.action_repeat=0", "env.action_repeat=0"),
        ("log.backend=mlflow", "log.backend='mlflow'.*'tensorboard'"),
        ("schedule.eval_episodes=0", "schedule.eval_episodes=0"),
        ("optim.grad_clip=0", "optim.grad_clip=0.*null or a number > 0"),
        ("optim.grad_clip=-1.5", "optim.grad_clip=-1.5"),
        ("resume=maybe", "resume='maybe'.*true or false"),
        ("trust_checkpoint=1", "trust_checkpoint=1.*true or false"),
        ("threads=0", "threads=0 is invalid.*auto, an integer >= 1"),
        ("threads=abc", "threads='abc' is invalid.*auto, an integer >= 1"),
        ("perf.compile_mode=fast", "perf.compile_mode='fast'.*'reduce-overhead'"),
        ("agent.consistency.loss=distill",
         "agent.consistency.loss='distill'.*'training', 'distillation'"),
        ("agent.consistency.solver=rk4", "agent.consistency.solver='rk4'.*'euler', 'heun'"),
    ],
)
def test_bad_values_name_key_value_and_choices(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_config(_cfg(override))


def test_unknown_agent_and_task() -> None:
    cfg = _cfg()
    cfg.agent.name = "sac"
    with pytest.raises(ConfigError, match=r"agent='sac'.*cp3er"):
        validate_config(cfg)
    cfg = _cfg()
    cfg.task_name = "cheetah_runn"
    with pytest.raises(UnknownTaskError, match="cheetah_run"):
        validate_config(cfg)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu_is_named() -> None:
    with pytest.raises(ConfigError, match="no CUDA device"):
        validate_config(_cfg("device=cuda"))


def test_cli_reports_one_line_not_a_traceback(tmp_path) -> None:
    cmd = [sys.executable, "-m", "cp3er.train", "n_step=0", f"run_dir={tmp_path / 'r'}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "cp3er-train: config n_step=0 is invalid" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "r" / "metrics.csv").exists()
