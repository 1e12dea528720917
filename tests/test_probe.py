"""benchmarks/diagnostics/probe_checkpoint.py: the collapse probe of a run's checkpoint, and the
restore of an agent from a checkpoint loaded once (cp3er.builders.restore_agent_for_eval)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from benchmark_scripts import benchmark_module
from tiny_run import tiny_cfg

from cp3er import builders
from cp3er.builders import load_agent_for_eval, restore_agent_for_eval
from cp3er.checkpoint import load_checkpoint
from cp3er.run_data import read_metrics
from cp3er.train import Trainer


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("probe") / "run"
    Trainer(tiny_cfg(run, "frames=400")).train()
    return run


def _actions(agent, env, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return env.rollout(5, agent.policy, break_when_any_done=False)["action"]


def test_restore_from_a_loaded_checkpoint_is_the_loaded_agent(tiny_run: Path) -> None:
    _, env_a, loaded = load_agent_for_eval(tiny_run, seed=3)
    _, env_b, restored = restore_agent_for_eval(load_checkpoint(tiny_run), seed=3)
    torch.testing.assert_close(_actions(loaded, env_a, 0), _actions(restored, env_b, 0),
                               rtol=0, atol=0)
    env_a.close()
    env_b.close()


def test_probe_reads_frame_and_weights_from_one_checkpoint(tiny_run: Path, tmp_path: Path,
                                                           monkeypatch) -> None:
    probe = benchmark_module("probe_checkpoint")
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    result = probe.probe(str(run), states=4, samples=8)
    assert result["frame"] == 400 and result["states"] == 4 and result["agent"] == "cp3er"
    assert 0.0 <= result["bound_frac"] <= 1.0 and 0.0 <= result["preclip_beyond_bound"] <= 1.0
    assert result["spread"] > 0.0  # a 400-frame policy has not collapsed
    assert result["q_range"] >= 0.0 and result["between_states"] >= 0.0
    # the checkpoint is read once: a run replacing latest.pt after that cannot mix the
    # frame counter of one checkpoint with the weights of another
    reads = []

    def counted(*args, **kwargs):
        reads.append(args)
        return load_checkpoint(*args, **kwargs)

    monkeypatch.setattr(probe, "load_checkpoint", counted)
    monkeypatch.setattr(builders, "load_checkpoint", counted)
    assert probe.probe(str(run), states=4, samples=8) == result
    assert len(reads) == 1


def test_between_states_of_known_policies() -> None:
    between = benchmark_module("probe_checkpoint")._between_states
    assert between(torch.full((10, 2), 1.0)) == 0.0  # one action everywhere
    half = torch.tensor([[1.0], [-1.0]]).repeat(5, 1)  # bang-bang, sides half the time
    assert between(half) == pytest.approx(1.0)
    # per-dimension variances averaged before the root: dimension 1 constant
    mixed = torch.cat([half, torch.zeros(10, 1)], dim=1)
    assert between(mixed) == pytest.approx(0.5 ** 0.5)


def test_reevaluation_matches_cp3er_eval_and_resumes(tiny_run: Path, tmp_path: Path,
                                                     capsys) -> None:
    """benchmarks/diagnostics/reevaluate.py: the same episodes and returns as cp3er-eval's with
    the same seed, one line per run, and a second invocation evaluates nothing again."""
    from cp3er.evaluate import run_episodes

    reevaluate = benchmark_module("reevaluate")
    out = tmp_path / "reeval.jsonl"
    assert reevaluate.main([str(tiny_run), "--out", str(out), "--episodes", "2",
                            "--seed", "5"]) == 0
    (row,) = reevaluate.read_rows(out)
    assert (row["task"], row["agent"], row["frame"], row["episodes"]) == (
        "cartpole_balance", "cp3er", 400, 2)
    assert row["logged_final_frame"] == 400  # the run's own final evaluation, beside it
    assert row["logged_final_return"] == float(read_metrics(tiny_run)[-1]["episode_return"])
    _, env, agent = load_agent_for_eval(tiny_run, seed=5)
    torch.manual_seed(5)
    expected = run_episodes(env, agent.policy, 2).returns
    env.close()
    assert row["returns"] == [round(r, 3) for r in expected]
    printed = json.loads(capsys.readouterr().out)
    assert printed["cp3er"]["reevaluated"]["mean"] == pytest.approx(row["return_mean"] / 1000)

    text = out.read_text()
    assert reevaluate.main([str(tiny_run), "--out", str(out), "--episodes", "2",
                            "--seed", "5"]) == 0
    assert out.read_text() == text  # nothing evaluated twice
    assert reevaluate.main([str(tmp_path), "--out", str(out)]) == 2  # no run there


def test_reevaluation_aggregates_per_agent_and_task() -> None:
    aggregates = benchmark_module("reevaluate").aggregates
    rows = [{"agent": agent, "task": task, "return_mean": mean, "logged_final_return": logged}
            for agent, task, mean, logged in [
                ("a", "t1", 100.0, 300.0), ("a", "t1", 300.0, 100.0), ("a", "t2", 200.0, 0.0),
                ("b", "t1", 50.0, None)]]
    result = aggregates(rows)
    assert result["a"]["runs_per_task"] == {"t1": 2, "t2": 1}
    assert result["a"]["reevaluated"]["mean"] == pytest.approx(0.2)
    assert result["a"]["logged_final"]["mean"] == pytest.approx(0.4 / 3)
    assert result["b"]["logged_final"] is None
