"""``cp3er-bench --quick``: the CI smoke run prints one JSON object with every figure."""

from __future__ import annotations

import json

import torch

from cp3er.bench import main

FIGURES = ("update_ms", "update_trunk_ms", "act_ms", "act_trunk_ms", "sample_ms",
           "replay_bytes_per_transition", "replay_rss_gb_1e6", "train_fps", "train_fps_workers",
           "flops_floor_ms", "update_gflop", "matmul_gflops", "machine", "env_ms",
           "update_cuda_graph", "train_fps_cuda_graph")


def test_quick_bench_prints_every_figure(capsys) -> None:
    assert main(["--quick", "--json", "--checkpoint-transitions", "0", "--threads", "1"]) == 0
    result = json.loads(capsys.readouterr().out)  # stdout holds the JSON object and nothing else
    for key in FIGURES:
        assert key in result, key
    assert result["quick"] is True and result["train_fps"] is None
    # the FLOP count of the reference update: conv encoder on 2 x 256 frame stacks plus its
    # backward (~86 GFLOP) and the 39,200-wide actor input layer three times (~62 GFLOP)
    assert 140 < result["update_gflop"] < 190
    assert result["update_trunk_gflop"] < result["update_gflop"]
    assert result["replay_bytes_per_transition"] < 21.5 * 1024
    assert result["update_ms"] > 0 and result["flops_floor_ms"] > 0
    assert result["machine"]["torch"] == torch.__version__
    assert result["sample_device"] == "cpu" and result["sample_ms"] > 0
    # CUDA graph figures: a GPU's only, reported as not measured (null), never estimated
    assert result["update_cuda_graph"] is None and result["train_fps_cuda_graph"] is None


def test_sampler_figure_samples_on_the_device() -> None:
    import cp3er.bench as bench

    assert bench.bench_sampler(1, torch.device("cpu")) > 0


def test_profile_sizes_times_each_agent_and_size(capsys, monkeypatch) -> None:
    import cp3er.bench as bench

    monkeypatch.setattr(bench, "PROFILE_SIZES", ((8, 32, True), (8, 32, False)))
    monkeypatch.setattr(bench, "PROFILE_TASKS", ("cartpole_swingup",))
    assert main(["--profile-sizes", "--quick", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["profile_sizes"]
    assert result["threads"] == 1 and result["frames"] > 0
    # DrQ-v2 has no trunk-free variant
    assert set(result["update_ms"]) == {"cp3er/batch8/hidden32", "cp3er/batch8/hidden32/no_trunk",
                                        "drqv2/batch8/hidden32"}
    assert set(result["run_minutes"]) == set(result["update_ms"])
    assert all(v > 0 for v in result["update_ms"].values())
    assert result["env_ms"]["cartpole_swingup"] > 0


def test_checkpoint_figure_reports_the_hashing_share(capsys) -> None:
    assert main(["--checkpoint-only", "--checkpoint-transitions", "300", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)["checkpoint"]
    assert result["transitions"] == 300 and result["bytes"] > 300 * 21_000
    assert 0 < result["hash_s"] and 0 < result["hash_frac_write"] and 0 < result["hash_frac_load"]


def test_collection_figures_time_the_batches_after_start_up(capsys, monkeypatch) -> None:
    """``--ray-collection``: per backend, observation and workers; the measurement itself
    runs here with the local backend only (the Ray one: tests/test_ray_collection.py)."""
    import cp3er.bench as bench

    measured = bench.bench_collection_fps("local", "state", 1, 200)
    assert measured["fps"] > 0 and measured["startup_s"] >= 0
    calls = []
    monkeypatch.setattr(bench, "bench_collection_fps", lambda *args: calls.append(args)
                        or measured)
    assert main(["--ray-collection", "state", "--workers", "1,2", "--collection-frames",
                 "200", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for backend in ("ray", "local"):
        assert set(result[f"{backend}_collection_fps"]) == {"state/workers1", "state/workers2"}
    assert ("ray", "state", 2, 200) in calls and len(calls) == 4
