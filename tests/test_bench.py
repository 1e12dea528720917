"""``cp3er-bench --quick``: the CI smoke run prints one JSON object with every figure."""

from __future__ import annotations

import json

from cp3er.bench import main

FIGURES = ("update_ms", "update_trunk_ms", "act_ms", "act_trunk_ms", "sample_ms",
           "replay_bytes_per_transition", "replay_rss_gb_1e6", "train_fps",
           "flops_floor_ms", "update_gflop", "matmul_gflops", "machine", "env_ms")


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
    assert result["machine"]["torch"].startswith("2.13")
