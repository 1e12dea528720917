"""Tests of the ``cp3er-toy`` script: targets, the sliced Wasserstein distance, and a
``--quick`` smoke run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cp3er.toy import (
    TARGETS,
    ToyConfig,
    evaluate,
    grid,
    main,
    make_loss,
    mode_accuracy,
    network_calls,
    plot,
    ring_centers,
    sample_target,
    sliced_wasserstein,
    swd_by_key,
    target_distance,
    train_row,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_sliced_wasserstein_known_values():
    x = torch.randn(256, 2, generator=gen())
    assert sliced_wasserstein(x, x.clone(), generator=gen(1)) == 0.0
    # A translation by v moves every 1-D projection by |v . theta|; for directions uniform
    # on the circle E|cos| = 2/pi, so SW1 = |v| 2/pi (up to the projection sample).
    shift = torch.tensor([0.3, -0.4])
    distance = sliced_wasserstein(x, x + shift, num_projections=4096, generator=gen(1))
    assert distance == pytest.approx(0.5 * 2 / math.pi, rel=0.03)
    with pytest.raises(ValueError, match="equal-size"):
        sliced_wasserstein(x, x[:10])


@pytest.mark.parametrize("name", TARGETS)
def test_targets_in_box_with_small_floor(name):
    points, cond = sample_target(name, 2048, gen(), balanced=True)
    assert points.shape == (2048, 2) and bool((points.abs() <= 1).all())
    assert cond.shape == (2048, 8 if name == "conditional" else 0)
    fresh, _ = sample_target(name, 2048, gen(1), balanced=True)
    floor = target_distance(name, points, fresh, cond)
    assert 0 < floor < 0.03
    # Not degenerate: far from a point mass at the origin.
    assert target_distance(name, points, torch.zeros_like(points), cond) > 0.2


def test_target_shapes_and_modes():
    points, cond = sample_target("conditional", 800, gen(), balanced=True)
    assert torch.equal(cond.argmax(-1), torch.arange(800) % 8)
    assert mode_accuracy(points, cond) > 0.999
    # The 8 modes sit at radius 0.75; a wrong condition gives zero accuracy.
    torch.testing.assert_close(ring_centers().norm(dim=-1), torch.full((8,), 0.75))
    assert mode_accuracy(points, cond.roll(1, dims=-1)) < 0.001
    moons, _ = sample_target("two_moons", 4000, gen())
    assert abs(moons[:, 0].mean().item()) < 0.05  # centred by the rescaling
    with pytest.raises(ValueError, match="unknown target"):
        sample_target("spiral", 4)


def test_full_grid_composition():
    rows = [(t, c, s) for t, c, samplers in grid(quick=False) for s in samplers]
    assert len(rows) == 30
    assert {c for _, c, _ in rows} == {"independent", "generator", "reconstruction", "phased",
                                       "distillation"}
    assert all((s == "phased") == (c == "phased") for _, c, s in rows)
    assert {s for _, c, s in rows if c == "distillation"} == {"teacher", "one_step",
                                                               "multi_step"}
    assert all(s != "teacher" for _, c, s in rows if c != "distillation")
    chosen = grid(quick=False, couplings=["independent", "distillation"])
    assert [(t, c) for t, c, _ in chosen] == [(t, c) for t in TARGETS
                                              for c in ("independent", "distillation")]
    with pytest.raises(ValueError, match="unknown couplings"):
        grid(quick=False, couplings=["distilation"])


def test_quick_cli_smoke(tmp_path, capsys, restore_threads):
    plot = tmp_path / "toy.png"
    main(["--quick", "--steps", "150", "--eval-samples", "512", "--seed", "3",
          "--plot", str(plot), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"results", "floor", "untrained"}
    assert len(report["results"]) == 2
    for row in report["results"]:
        assert set(row) == {"target", "sampler", "coupling", "swd", "nfe", "seconds"}
        assert row["target"] == "eight_gaussians" and row["sampler"] == "one_step"
        assert row["swd"] < 0.75 * report["untrained"]["eight_gaussians"]
        assert row["seconds"] > 0
    assert report["floor"]["eight_gaussians"] < 0.03
    assert plot.stat().st_size > 10_000


def test_distillation_row_teacher_and_student_learn_the_target() -> None:
    """The distillation row on the conditional target: the EDM teacher (Heun ODE sampler,
    35 network calls) and the student distilled from it (one call) put their samples on
    the selected mode (chance: 1/8). An untrained teacher's ODE gives ~N(0, 0.25 I) (its
    preconditioned output is ``c_skip x``, the ideal denoiser of that Gaussian): SWD ~0.59.
    On ``eight_gaussians`` such a Gaussian is already close in SWD (0.14: the ring's 1-D
    projections have std 0.53), so the conditional target is the one that can tell."""
    config = ToyConfig(steps=300, batch_size=256, hidden_dim=64, eval_samples=1024)
    student, teacher, seconds = train_row("conditional", "distillation", config, seed=0)
    assert teacher is not None and seconds > 0
    teacher_swd, points, cond = evaluate(teacher, "conditional", "teacher", config, seed=1)
    assert teacher_swd < 0.1 and mode_accuracy(points, cond) > 0.9
    student_swd, points, cond = evaluate(student, "conditional", "one_step", config, seed=1)
    assert student_swd < 0.15 and mode_accuracy(points, cond) > 0.85
    assert (network_calls("teacher", config), network_calls("one_step", config)) == (35, 1)
    with pytest.raises(ValueError, match="needs a trained teacher"):
        make_loss("distillation", config)


def test_toy_plot_has_a_legend_and_each_panels_swd(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    captured = {}
    savefig = Figure.savefig

    def spy(self, *args, **kwargs):
        captured["figure"] = self
        return savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    keys = ["eight_gaussians/one_step/independent", "eight_gaussians/one_step/generator"]
    samples = {keys[0]: torch.zeros(16, 2), keys[1]: torch.full((16, 2), 0.5)}
    plot(samples, ToyConfig(eval_samples=64), 0, str(tmp_path / "toy.png"),
         swd_by_key({"results": [{"target": "eight_gaussians", "sampler": "one_step",
                                  "coupling": c, "swd": v}
                                 for c, v in (("independent", 0.1234), ("generator", 0.5))]}))
    titles = [ax.get_title() for ax in captured["figure"].axes]
    assert any(t.endswith("SWD 0.1234") for t in titles)
    assert any(t.endswith("SWD 0.5000") for t in titles)
    legend = captured["figure"].legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["target samples", "model samples"]
