"""One metric registry (``agents.metrics``): what every agent update reports is in it,
``metrics.csv`` has a column for each entry and the glossary of docs/usage.md explains each one."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from tiny_run import random_state_batch

from agents.build import build_agent
from agents.metrics import LOSS_METRICS, UPDATE_METRICS
from cp3er.logs import METRIC_COLUMNS
from envs import make_env

ROOT = Path(__file__).resolve().parents[1]
AGENT_OVERRIDES = {
    "cp3er": ["agent=cp3er"],
    "cp3er-distillation": ["agent=cp3er", "agent.consistency.loss=distillation"],
    "drqv2": ["agent=drqv2"],
}


def _update_metrics(overrides: list[str]) -> dict[str, float]:
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose(config_name="config", overrides=[
            "task=cartpole_swingup", "obs=state", "hidden_dim=32", "batch_size=8", *overrides])
    env = make_env("cartpole_swingup", "state")
    obs_dim = env.observation_spec["observation"].shape[-1]
    torch.manual_seed(0)
    agent = build_agent(cfg, env)
    batch = random_state_batch(obs_dim)
    before = batch.clone()
    metrics = agent.update(batch)
    assert (batch == before).all(), "the update wrote into the replay batch"
    return metrics


@pytest.fixture(scope="module")
def reported() -> dict[str, set[str]]:
    return {name: set(_update_metrics(o)) for name, o in AGENT_OVERRIDES.items()}


def test_every_update_metric_is_registered_and_every_entry_is_reported(reported) -> None:
    for name, keys in reported.items():
        assert keys <= set(UPDATE_METRICS), (name, keys - set(UPDATE_METRICS))
        assert {"loss_critic", "loss_actor"} <= keys, name
    assert set().union(*reported.values()) == set(UPDATE_METRICS)  # no dead entry
    assert "loss_teacher" in reported["cp3er-distillation"] - reported["cp3er"]
    assert "stddev" in reported["drqv2"] and "stddev" not in reported["cp3er"]


def test_metrics_csv_has_a_column_per_registered_metric() -> None:
    assert [c for c in METRIC_COLUMNS if c in UPDATE_METRICS] == list(UPDATE_METRICS)
    assert len(set(METRIC_COLUMNS)) == len(METRIC_COLUMNS)
    assert set(LOSS_METRICS) == {"loss_critic", "loss_actor", "loss_teacher"}


def test_usage_glossary_explains_every_column() -> None:
    text = (ROOT / "docs" / "usage.md").read_text()
    glossary = text.split("## metrics.csv glossary", 1)[1].split("\n## ", 1)[0]
    documented = set()
    for row in re.findall(r"^\| (`[^|]+) \|", glossary, flags=re.M):
        documented |= set(re.findall(r"`([a-z_]+)`", row))
    missing = set(METRIC_COLUMNS) - documented
    assert not missing, f"docs/usage.md glossary lacks {sorted(missing)}"


def test_an_unregistered_metric_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loss that reports a name the registry does not know fails loudly at the first read
    of its metrics (its column would otherwise be dropped from metrics.csv without a word)."""
    from cp3er import run_metrics

    metrics = _update_metrics(AGENT_OVERRIDES["cp3er"])
    registry = {k: v for k, v in run_metrics.UPDATE_METRICS.items() if k != "q_mean"}
    monkeypatch.setattr(run_metrics, "UPDATE_METRICS", registry)
    reader = run_metrics.UpdateMetrics(torch.nn.Linear(1, 1), every=1, queued={})
    with pytest.raises(KeyError, match=r"\['q_mean'\] are not in agents.metrics"):
        reader.add(1, 0, metrics)
