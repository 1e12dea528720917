"""Bad configs fail before anything heavy starts, with the key, value and valid choices."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from cp3er.config_check import ConfigError, check_override_values, validate_config
from cp3er.config_schema import CONFIG_DIR
from envs.registry import UnknownTaskError


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def test_default_config_is_valid() -> None:
    validate_config(_cfg())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("batch_size=0", "batch_size=0.*>= 1"),
        ("batch_size=-3", "batch_size=-3.*>= 1"),
        ("n_step=0", "n_step=0.*>= 1"),
        ("frames=-1", "frames=-1"),
        ("replay.capacity=100", "batch_size=256.*replay.capacity=100"),
        ("gamma=1.5", "gamma=1.5"),
        ("lr=0", "lr=0"),
        ("label=' '", "label=.*null or a non-empty name"),
        ("env.action_repeat=0", "env.action_repeat=0"),
        ("schedule.eval_episodes=0", "schedule.eval_episodes=0"),
        ("optim.grad_clip=0", "optim.grad_clip=0.*null or a number > 0"),
        ("optim.grad_clip=-1.5", "optim.grad_clip=-1.5"),
        ("threads=0", "threads=0 is invalid.*auto, an integer >= 1"),
        ("threads=abc", "threads='abc' is invalid.*auto, an integer >= 1"),
        ("replay.alpha=0", "replay.alpha=0"),
        ("resume=maybe", "resume='maybe'.*true, false or auto"),
        ("resume=1", "resume=1.*true, false or auto"),
        ("agent.consistency.ema_decay=1.0", "ema_decay=1.0.*null or a number in \\(0, 1\\)"),
    ],
)
def test_bad_values_name_key_value_and_choices(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_config(_cfg(override))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["obs=rgb"], r"obs=rgb: Invalid value 'rgb', expected one of \[pixels, state\]"),
        (["device=tpu"], r"Invalid value 'tpu', expected one of \[cpu, cuda\]"),
        (["batch_size=abc"], "batch_size=abc: Value 'abc' of type 'str' could not be "
                             "converted to Integer"),
        (["replay.sampler=prioritized"],
         r"expected one of \[proximal, reference, uniform\]"),
        (["replay.storage=disk"], r"expected one of \[memory, memmap\]"),
        (["log.backend=mlflow"], r"expected one of \[csv, tensorboard, wandb\]"),
        (["perf.compile_mode=fast"], "expected one of .*reduce-overhead"),
        (["perf.precision=fp16"], r"expected one of \[fp32, tf32, bf16\]"),
        (["replay.device=tpu"], r"replay.device=tpu: Invalid value 'tpu', expected one of "
                                r"\[cpu, cuda\]"),
        (["agent.consistency.loss=distill"], r"expected one of \[training, distillation\]"),
        (["agent.consistency.solver=rk4"], r"expected one of \[euler, heun\]"),
        (["agent.clip=soft"], r"expected one of \[clamp, straight_through, none\]"),
        (["difficulty=extreme"], r"expected one of \[easy, medium, hard\]"),
        (["collector.backend=spark"], r"collector.backend=spark: Invalid value 'spark', "
                                      r"expected one of \[local, ray\]"),
        (["lr_actor=1e-4"], "Key 'lr_actor' not in 'RunConfig'"),
        (["agent=drqv2", "agent.init_scale=0.1"], "Key 'init_scale' not in 'DrQV2AgentConfig'"),
    ],
)
def test_schema_refuses_types_choices_and_unknown_keys_in_one_line(overrides, message) -> None:
    """Hydra checks the structured schema (cp3er/config_schema.py) while composing; the
    CLI turns its report into one line naming the override and the valid choices."""
    result = check_override_values(overrides, CONFIG_DIR)
    assert result is not None and "\n" not in result
    assert re.search(message, result), result
    with pytest.raises(ConfigCompositionException):
        _cfg(*overrides)


def test_schema_choices_are_the_tuples_the_implementing_modules_read() -> None:
    """One definition of each choice tuple (:mod:`cp3er.choices`, a leaf the schema
    imports alone), the same object in the modules that implement the choice."""
    from agents.agent import PRECISIONS
    from agents.build import COMPILE_MODES, CONSISTENCY_LOSSES
    from cp3er import choices
    from cp3er import config_schema as schema
    from cp3er.collection import COLLECTOR_BACKENDS
    from cp3er.replay import SAMPLER_MODES, STORAGE_DEVICES, STORAGES
    from envs import OBS_TYPES

    for enum, values, used in [
            (schema.Obs, choices.OBS_TYPES, OBS_TYPES),
            (schema.SamplerMode, choices.SAMPLER_MODES, SAMPLER_MODES),
            (schema.Storage, choices.STORAGES, STORAGES),
            (schema.CompileMode, choices.COMPILE_MODES, COMPILE_MODES),
            (schema.ConsistencyLoss, choices.CONSISTENCY_LOSSES, CONSISTENCY_LOSSES),
            (schema.Difficulty, choices.DIFFICULTIES, choices.DIFFICULTIES),
            (schema.StorageDevice, choices.STORAGE_DEVICES, STORAGE_DEVICES),
            (schema.Precision, choices.PRECISIONS, PRECISIONS),
            (schema.CollectorBackend, choices.COLLECTOR_BACKENDS, COLLECTOR_BACKENDS)]:
        assert [m.value for m in enum] == list(values) and used is values
    probe = ("import sys, cp3er.config_schema; print(sorted(m for m in sys.modules "
             "if m.split('.')[0] in ('cp3er', 'agents', 'envs')))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert loaded == "['cp3er', 'cp3er.choices', 'cp3er.config_schema']", loaded
    cfg = _cfg("replay.sampler=uniform", "agent=drqv2", "+profile=cpu_pixels")
    assert cfg.replay.sampler == "uniform" and f"{cfg.obs}" == "pixels"
    assert check_override_values(["agent=drqv2", "+profile=cpu_pixels", "seed=2"],
                                 CONFIG_DIR) is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["replay.device=cuda"],
         r"replay.device='cuda' is invalid: expected cpu, or cuda with device=cuda \(the "
         r"agent trains on device=cpu\)"),
        (["device=cuda", "replay.device=cuda", "replay.storage=memmap"],
         r"replay.storage='memmap' is invalid: expected memory with replay.device=cuda"),
    ],
)
def test_replay_device_needs_the_agents_device_and_memory_storage(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_config(_cfg(*overrides))


def test_ray_backend_without_ray_names_the_extra(monkeypatch) -> None:
    import cp3er.collection

    monkeypatch.setattr(cp3er.collection, "ray_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"collector.backend='ray' needs Ray, which is not "
                                          r"installed: pip install -e '\.\[ray\]'"):
        validate_config(_cfg("collector.backend=ray"))
    validate_config(_cfg())  # the local backend needs nothing


def test_ray_address_belongs_to_the_ray_backend(monkeypatch) -> None:
    import cp3er.collection

    monkeypatch.setattr(cp3er.collection, "ray_installed", lambda: True)  # with or without
    with pytest.raises(ConfigError, match=r"collector.ray_address='auto' is invalid: expected "
                                          r"null with collector.backend=local"):
        validate_config(_cfg("collector.ray_address=auto"))
    with pytest.raises(ConfigError, match=r"collector.ray_address=' ' is invalid: expected "
                                          r"null \(start Ray here\) or a Ray cluster's"):
        validate_config(_cfg("collector.backend=ray", "collector.ray_address=' '"))


def test_drqv2_refuses_an_actor_without_its_trunk() -> None:
    with pytest.raises(ConfigError, match=r"agent.actor_trunk=False.*true for drqv2"):
        validate_config(_cfg("agent=drqv2", "agent.actor_trunk=false"))


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
    cmd = [sys.executable, "-m", "cp3er.train_cli", "n_step=0", f"run_dir={tmp_path / 'r'}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "cp3er-train: config n_step=0 is invalid" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "r" / "metrics.csv").exists()
