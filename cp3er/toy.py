"""``cp3er-toy``: the consistency core on 2-D targets, on CPU.

Targets in ``[-1, 1]^2``: ``eight_gaussians`` (std 0.05 on a ring of radius 0.75),
``two_moons`` (noise 0.05, rescaled by 1/1.6), ``conditional`` (the 8 modes, a one-hot
condition selecting one). Rows: CT with ``independent`` or ``generator``-induced coupling
and ``reconstruction`` (each sampled ``one_step`` and ``multi_step``), ``phased``, and
``distillation`` (an EDM teacher, sampled by its Heun ODE as ``teacher``, then a student).
``--json`` report: ``{"results": [{"target", "sampler", "coupling", "swd", "nfe",
"seconds"}], "floor": {target: swd}, "untrained": {target: swd}}``. ``swd``: sliced
1-Wasserstein distance to fresh target samples (per condition on ``conditional``);
``floor``: between two fresh target sets; ``untrained``: the initial network, one step;
``nfe``: network calls per sample; ``seconds``: training (a student's includes its
teacher's) plus sampling.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cp3er.consistency import (
    ConditionalMLP,
    ConsistencyDistillationLoss,
    ConsistencyTrainingLoss,
    Denoiser,
    DenoisingLoss,
    PhasedConsistencyLoss,
    ReconstructionLoss,
    ode_calls,
    sample_multi_step,
    sample_ode,
    sample_one_step,
    sample_phased,
)

__all__ = [
    "COUPLINGS",
    "SAMPLERS",
    "TARGETS",
    "ToyConfig",
    "evaluate",
    "main",
    "make_denoiser",
    "make_loss",
    "mode_accuracy",
    "network_calls",
    "sample_target",
    "sliced_wasserstein",
    "target_distance",
    "train",
    "train_row",
]

TARGETS = ("eight_gaussians", "two_moons", "conditional")
COUPLINGS = ("independent", "generator", "reconstruction", "phased", "distillation")
SAMPLERS = ("one_step", "multi_step", "phased", "teacher")
TEACHER_SOLVER = "heun"  # the teacher's sampler (EDM); the distillation step uses config.solver
NUM_MODES = 8
RING_RADIUS, RING_STD = 0.75, 0.05
MOONS_NOISE, MOONS_SCALE = 0.05, 1.6


@dataclass(frozen=True)
class ToyConfig:
    """Training and evaluation settings of one toy model."""

    steps: int = 1500
    batch_size: int = 256
    hidden_dim: int = 256
    num_layers: int = 3
    lr: float = 1e-3
    num_phases: int = 4
    multi_steps: int = 2
    eval_samples: int = 2048
    mu: float = 0.5
    teacher_steps: int = 18  # Heun grid points of the teacher's sampler (EDM: 18, 35 calls)
    solver: str = "heun"  # ODE solver of the distillation teacher step


# -- targets and distances -------------------------------------------------------------


def ring_centers(dtype: torch.dtype = torch.float32) -> Tensor:
    """The 8 mode centres, ``0.75 (cos 2 pi k/8, sin 2 pi k/8)``, shape ``(8, 2)``."""
    angles = torch.arange(NUM_MODES, dtype=torch.float64) * (2 * math.pi / NUM_MODES)
    return (RING_RADIUS * torch.stack([angles.cos(), angles.sin()], dim=-1)).to(dtype)


def _two_moons(n: int, generator: torch.Generator | None) -> Tensor:
    upper = torch.rand(n, generator=generator) < 0.5
    angle = torch.rand(n, generator=generator) * math.pi
    x = torch.where(upper, angle.cos(), 1.0 - angle.cos())
    y = torch.where(upper, angle.sin(), 0.5 - angle.sin())
    points = torch.stack([x, y], dim=-1) + MOONS_NOISE * torch.randn(n, 2, generator=generator)
    return (points - torch.tensor([0.5, 0.25])) / MOONS_SCALE


def sample_target(
    name: str, n: int, generator: torch.Generator | None = None, *, balanced: bool = False
) -> tuple[Tensor, Tensor]:
    """``(actions [n, 2], cond [n, cond_dim])`` of a toy target; ``conditional``'s one-hot
    modes are uniform, or cycle ``0..7`` when ``balanced`` (others: ``cond_dim = 0``)."""
    if name == "two_moons":
        return _two_moons(n, generator).clamp(-1, 1), torch.zeros(n, 0)
    if name not in ("eight_gaussians", "conditional"):
        raise ValueError(f"unknown target {name!r}; choose from {TARGETS}")
    if balanced:
        modes = torch.arange(n) % NUM_MODES
    else:
        modes = torch.randint(0, NUM_MODES, (n,), generator=generator)
    points = ring_centers()[modes] + RING_STD * torch.randn(n, 2, generator=generator)
    cond = nn.functional.one_hot(modes, NUM_MODES).float()
    if name == "eight_gaussians":
        cond = torch.zeros(n, 0)
    return points.clamp(-1, 1), cond


def target_cond_dim(name: str) -> int:
    return NUM_MODES if name == "conditional" else 0


def sliced_wasserstein(
    x: Tensor, y: Tensor, num_projections: int = 256, generator: torch.Generator | None = None
) -> float:
    """Sliced 1-Wasserstein distance of two equal-size sets (Rabin et al. 2011): the mean
    over random unit ``theta`` of ``mean_j |sort(x theta)_j - sort(y theta)_j|``."""
    if x.shape != y.shape:
        raise ValueError(f"need equal-size sets, got {tuple(x.shape)} and {tuple(y.shape)}")
    theta = torch.randn(x.shape[-1], num_projections, generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px = (x.double() @ theta).sort(dim=0).values
    py = (y.double() @ theta).sort(dim=0).values
    return (px - py).abs().mean().item()


def target_distance(name: str, generated: Tensor, reference: Tensor, cond: Tensor) -> float:
    """SWD with fixed projections; on ``conditional`` averaged over modes (``generated`` and
    ``reference`` share ``cond`` row for row)."""
    projections = torch.Generator().manual_seed(1234)
    if name != "conditional":
        return sliced_wasserstein(generated, reference, generator=projections)
    modes = cond.argmax(-1)
    distances = [
        sliced_wasserstein(generated[modes == k], reference[modes == k], generator=projections)
        for k in range(NUM_MODES)
    ]
    return sum(distances) / NUM_MODES


def mode_accuracy(samples: Tensor, cond: Tensor) -> float:
    """Share of samples whose nearest ring centre is the mode their one-hot ``cond`` selects."""
    nearest = torch.cdist(samples.float(), ring_centers()).argmin(-1)
    return (nearest == cond.argmax(-1)).float().mean().item()


# -- models, training, evaluation -------------------------------------------------------


def make_denoiser(cond_dim: int, config: ToyConfig) -> Denoiser:
    """A small :class:`ConditionalMLP` denoiser on 2-D actions, reference clamp."""
    network = ConditionalMLP(
        action_dim=2, cond_dim=cond_dim, hidden_dim=config.hidden_dim,
        num_layers=config.num_layers,
    )
    return Denoiser(network)


def make_loss(coupling: str, config: ToyConfig, teacher: nn.Module | None = None) -> nn.Module:
    """The loss a ``coupling`` label trains with (see :data:`COUPLINGS`); ``distillation``
    needs the trained ``teacher``."""
    if coupling == "distillation":
        if teacher is None:
            raise ValueError("coupling 'distillation' needs a trained teacher")
        return ConsistencyDistillationLoss(teacher, solver=config.solver)
    if coupling in ("independent", "generator"):
        return ConsistencyTrainingLoss(coupling=coupling, mu=config.mu)
    if coupling == "reconstruction":
        return ReconstructionLoss()
    if coupling == "phased":
        return PhasedConsistencyLoss(num_phases=config.num_phases)
    raise ValueError(f"unknown coupling {coupling!r}; choose from {COUPLINGS}")


def train(
    denoiser: Denoiser,
    loss: nn.Module,
    target: str,
    config: ToyConfig,
    generator: torch.Generator,
) -> float:
    """Adam on fresh target batches for ``config.steps`` steps; returns wall seconds. The lr
    decays linearly to 0: it settles the noisy CT updates (~10% lower SWD on 8 Gaussians)."""
    optimizer = torch.optim.Adam(denoiser.parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 1.0 - step / config.steps
    )
    start = time.perf_counter()
    for _ in range(config.steps):
        actions, cond = sample_target(target, config.batch_size, generator)
        per_sample, _ = loss(denoiser, actions, cond, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        per_sample.mean().backward()
        optimizer.step()
        schedule.step()
    return time.perf_counter() - start


def sampler_fn(name: str, config: ToyConfig) -> Callable[..., Tensor]:
    """The sampler a label names, with the toy's step / phase counts bound."""
    if name == "one_step":
        return sample_one_step
    if name == "multi_step":
        return lambda d, c, a, **kw: sample_multi_step(d, c, a, num_steps=config.multi_steps, **kw)
    if name == "phased":
        return lambda d, c, a, **kw: sample_phased(d, c, a, num_phases=config.num_phases, **kw)
    if name == "teacher":
        return lambda d, c, a, **kw: sample_ode(d, c, a, num_steps=config.teacher_steps,
                                                solver=TEACHER_SOLVER, **kw)
    raise ValueError(f"unknown sampler {name!r}; choose from {SAMPLERS}")


def network_calls(name: str, config: ToyConfig) -> int:
    """Network calls per sample of the sampler a label names."""
    calls = {"one_step": 1, "multi_step": config.multi_steps, "phased": config.num_phases,
             "teacher": ode_calls(config.teacher_steps, TEACHER_SOLVER)}
    return calls[name]


@torch.no_grad()
def evaluate(
    denoiser: Denoiser, target: str, sampler: str, config: ToyConfig, seed: int
) -> tuple[float, Tensor, Tensor]:
    """``(swd, samples, cond)`` of ``config.eval_samples`` generated samples vs fresh ones."""
    generator = torch.Generator().manual_seed(seed)
    reference, cond = sample_target(target, config.eval_samples, generator, balanced=True)
    samples = sampler_fn(sampler, config)(denoiser, cond, 2, generator=generator)
    return target_distance(target, samples, reference, cond), samples, cond


def floor_distance(target: str, config: ToyConfig, seed: int) -> float:
    """SWD between two fresh target sets of ``config.eval_samples`` (sampling noise)."""
    generator = torch.Generator().manual_seed(seed)
    first, cond = sample_target(target, config.eval_samples, generator, balanced=True)
    second, _ = sample_target(target, config.eval_samples, generator, balanced=True)
    return target_distance(target, first, second, cond)


def grid(quick: bool, couplings: Sequence[str] | None = None
         ) -> list[tuple[str, str, tuple[str, ...]]]:
    """``(target, coupling, samplers)`` of every model to train (``couplings``: only those)."""
    if quick:
        rows = [("eight_gaussians", c, ("one_step",)) for c in ("independent", "generator")]
    else:
        rows = []
        for target in TARGETS:
            for coupling in ("independent", "generator", "reconstruction"):
                rows.append((target, coupling, ("one_step", "multi_step")))
            rows.append((target, "phased", ("phased",)))
            rows.append((target, "distillation", ("teacher", "one_step", "multi_step")))
    if couplings is not None:
        unknown = sorted(set(couplings) - set(COUPLINGS))
        if unknown:
            raise ValueError(f"unknown couplings {unknown}; choose from {COUPLINGS}")
        rows = [row for row in rows if row[1] in couplings]
    return rows


def train_row(
    target: str, coupling: str, config: ToyConfig, seed: int
) -> tuple[Denoiser, Denoiser | None, float]:
    """``(model, teacher, seconds)`` of one grid row; a distilled student starts from the
    seed's fresh initialisation as the CT rows do, not from its teacher's weights."""
    generator = torch.Generator().manual_seed(seed)
    teacher, seconds = None, 0.0
    if coupling == "distillation":
        torch.manual_seed(seed)
        teacher = make_denoiser(target_cond_dim(target), config)
        seconds += train(teacher, DenoisingLoss(), target, config, generator)
    torch.manual_seed(seed)
    model = make_denoiser(target_cond_dim(target), config)
    seconds += train(model, make_loss(coupling, config, teacher), target, config, generator)
    return model, teacher, seconds


def run(config: ToyConfig, seed: int, quick: bool, couplings: Sequence[str] | None = None
        ) -> tuple[dict, dict[str, Tensor]]:
    """Train and evaluate the grid; returns the JSON report and samples for plotting."""
    results, samples, floor, untrained = [], {}, {}, {}
    eval_seed = seed + 10_000
    for target, coupling, samplers in grid(quick, couplings):
        if target not in untrained:
            torch.manual_seed(seed)
            denoiser = make_denoiser(target_cond_dim(target), config)
            untrained[target] = evaluate(denoiser, target, "one_step", config, eval_seed)[0]
            floor[target] = floor_distance(target, config, eval_seed + 1)
        model, teacher, seconds = train_row(target, coupling, config, seed)
        for sampler in samplers:
            start = time.perf_counter()
            denoiser = teacher if sampler == "teacher" else model
            swd, points, _ = evaluate(denoiser, target, sampler, config, eval_seed)
            elapsed = seconds + time.perf_counter() - start
            results.append({
                "target": target, "sampler": sampler, "coupling": coupling,
                "swd": round(swd, 4), "nfe": network_calls(sampler, config),
                "seconds": round(elapsed, 2),
            })
            samples[f"{target}/{sampler}/{coupling}"] = points
    report = {
        "results": results,
        "floor": {k: round(v, 4) for k, v in floor.items()},
        "untrained": {k: round(v, 4) for k, v in untrained.items()},
    }
    return report, samples


def plot(samples: dict[str, Tensor], config: ToyConfig, seed: int, path: str,
         swd: dict[str, float] | None = None) -> None:
    """Each model's samples over fresh target samples, one panel per
    ``target/sampler/coupling`` key, titled with ``swd`` (:func:`swd_by_key`) when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(dict.fromkeys(key.split("/")[0] for key in samples))
    columns = max(sum(key.startswith(f"{t}/") for key in samples) for t in targets)
    fig, axes = plt.subplots(
        len(targets), columns, figsize=(2.6 * columns, 2.6 * len(targets)), squeeze=False
    )
    for ax in axes.flat:
        ax.set_axis_off()
    for row, target in enumerate(targets):
        reference, _ = sample_target(
            target, config.eval_samples, torch.Generator().manual_seed(seed)
        )
        keys = [key for key in samples if key.startswith(f"{target}/")]
        for col, key in enumerate(keys):
            ax = axes[row, col]
            ax.set_axis_on()
            ax.scatter(*reference.T, s=1, c="0.75", label="target samples")
            ax.scatter(*samples[key].T, s=1, c="tab:blue", label="model samples")
            ax.set(xlim=(-1.05, 1.05), ylim=(-1.05, 1.05), xticks=[], yticks=[])
            ax.set_aspect("equal")
            title = key.replace("/", "\n", 1)
            if swd is not None and key in swd:
                title += f"\nSWD {swd[key]:.4f}"
            ax.set_title(title, fontsize=7)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, markerscale=6,
               frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def swd_by_key(report: dict) -> dict[str, float]:
    """``{"target/sampler/coupling": swd}`` of a :func:`run` report (the keys of its
    samples)."""
    return {f"{r['target']}/{r['sampler']}/{r['coupling']}": r["swd"] for r in report["results"]}


def table(report: dict) -> str:
    """A :func:`run` report as a plain-text table (``cp3er-toy`` without ``--json``)."""
    lines = ["sliced Wasserstein distance (swd) to the target: lower is better; nfe: network "
             "calls per sample",
             f"{'target':<16} {'coupling':<14} {'sampler':<11} {'swd':>7} {'nfe':>4} "
             f"{'seconds':>8}"]
    for row in report["results"]:
        lines.append(f"{row['target']:<16} {row['coupling']:<14} {row['sampler']:<11} "
                     f"{row['swd']:>7.4f} {row['nfe']:>4} {row['seconds']:>8.2f}")
    for name, what in (("floor", "two fresh target sets"),
                       ("untrained", "the untrained network, one step")):
        values = ", ".join(f"{target} {value:.4f}" for target, value in report[name].items())
        lines.append(f"{name} ({what}): {values}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: the report as a table, or one JSON line with ``--json``."""
    parser = argparse.ArgumentParser(prog="cp3er-toy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="reduced grid (8 Gaussians, CT couplings, one-step; < 1 min)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps per model (default 1500, 600 with --quick)")
    parser.add_argument("--batch-size", type=int, default=ToyConfig.batch_size)
    parser.add_argument("--hidden-dim", type=int, default=ToyConfig.hidden_dim)
    parser.add_argument("--num-phases", type=int, default=ToyConfig.num_phases)
    parser.add_argument("--multi-steps", type=int, default=ToyConfig.multi_steps)
    parser.add_argument("--teacher-steps", type=int, default=ToyConfig.teacher_steps,
                        help="Heun grid points of the distillation teacher's sampler")
    parser.add_argument("--solver", choices=("euler", "heun"), default=ToyConfig.solver,
                        help="ODE solver of the distillation teacher step")
    parser.add_argument("--couplings", default=None,
                        help=f"comma-separated subset of the grid's rows, of {COUPLINGS}")
    parser.add_argument("--eval-samples", type=int, default=ToyConfig.eval_samples)
    parser.add_argument("--plot", metavar="PNG", default=None,
                        help="draw samples over the target to this file")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: these nets are too small to share)")
    parser.add_argument("--json", action="store_true",
                        help="print the report as one JSON object (default: a table)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = args.steps if args.steps is not None else (600 if args.quick else ToyConfig.steps)
    config = ToyConfig(
        steps=steps, batch_size=args.batch_size, hidden_dim=args.hidden_dim,
        num_phases=args.num_phases, multi_steps=args.multi_steps,
        eval_samples=args.eval_samples, teacher_steps=args.teacher_steps, solver=args.solver,
    )
    couplings = None if args.couplings is None else args.couplings.split(",")
    if args.quick:
        print(f"cp3er-toy: --quick is a smoke run ({steps} training steps, "
              f"{len(grid(True, couplings))} models): the models are under-trained, its "
              f"distances are no result (run without --quick: {ToyConfig.steps} steps, the "
              "full grid)", file=sys.stderr)
    report, samples = run(config, args.seed, args.quick, couplings)
    if args.plot:
        plot(samples, config, args.seed, args.plot, swd_by_key(report))
    print(json.dumps(report) if args.json else table(report))


if __name__ == "__main__":
    main()
