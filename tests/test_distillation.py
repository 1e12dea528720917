"""Consistency distillation in the core: the probability-flow ODE step and sampler against
a Gaussian target's exact flow, the EDM denoising loss, and distillation from an ideal
Gaussian teacher."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor, nn

from cp3er.consistency import (
    ConditionalMLP,
    ConsistencyDistillationLoss,
    ConsistencyTrainingLoss,
    Denoiser,
    DenoisingLoss,
    KarrasSchedule,
    batch_sigma,
    ema_target,
    ode_calls,
    probability_flow_step,
    sample_ode,
    sample_one_step,
)

MEAN = torch.tensor([0.3, -0.2], dtype=torch.float64)
COV = torch.tensor([[0.04, 0.02], [0.02, 0.05]], dtype=torch.float64)
EIGVALS, EIGVECS = torch.linalg.eigh(COV)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class GaussianDenoiser(nn.Module):
    """The ideal denoiser of ``N(MEAN, COV)``: ``E[a | a + t z] = m + S (S + t^2 I)^-1 (x - m)``."""

    def __init__(self, num_steps: int = 40) -> None:
        super().__init__()
        self.schedule = KarrasSchedule(num_steps=num_steps)

    def forward(self, x: Tensor, sigma: Tensor | float, cond: Tensor) -> Tensor:
        t2 = batch_sigma(sigma, x).unsqueeze(-1) ** 2
        mean, vecs, vals = (v.to(x.dtype) for v in (MEAN, EIGVECS, EIGVALS))
        return mean + (((x - mean) @ vecs) * vals / (vals + t2)) @ vecs.T


def exact_flow(x: Tensor, t: float | Tensor, t_next: float | Tensor) -> Tensor:
    """The probability-flow ODE of ``N(MEAN, COV)`` in closed form: along each eigenvector
    ``(x - m) / sqrt(lambda + t^2)`` is constant."""
    t, t_next = torch.as_tensor(t, dtype=x.dtype), torch.as_tensor(t_next, dtype=x.dtype)
    ratio = torch.sqrt((EIGVALS + t_next**2) / (EIGVALS + t**2))
    return MEAN + (((x - MEAN) @ EIGVECS) * ratio) @ EIGVECS.T


def gaussian_samples(n: int, generator: torch.Generator, dtype=torch.float64) -> Tensor:
    return (MEAN + torch.randn(n, 2, generator=generator, dtype=torch.float64)
            @ torch.linalg.cholesky(COV).T).to(dtype)


def step_error(solver: str, t: float, t_next: float, x: Tensor) -> float:
    step = probability_flow_step(GaussianDenoiser(), x, t, t_next, x[:, :0], solver)
    return (step - exact_flow(x, t, t_next)).norm(dim=-1).max().item()


@pytest.mark.parametrize("solver, order", [("euler", 1), ("heun", 2)])
def test_ode_step_converges_to_the_exact_gaussian_flow(solver: str, order: int) -> None:
    """One solver step with the ideal denoiser lands on the exact probability-flow
    trajectory up to its local error ``O(h^(order+1))``: halving the step divides the
    error by ``2^(order+1)`` (4 for Euler, 8 for Heun), and on the consistency grid every
    step is within a tolerance of the exact one."""
    x = gaussian_samples(512, gen()) + 0.5 * torch.randn(512, 2, generator=gen(1),
                                                         dtype=torch.float64)
    errors = [step_error(solver, 0.5, 0.5 - h, x) for h in (0.08, 0.04, 0.02)]
    for coarse, fine in itertools.pairwise(errors):
        assert coarse / fine == pytest.approx(2.0 ** (order + 1), rel=0.2)
    sigmas = KarrasSchedule().sigmas(dtype=torch.float64)
    worst = 0.0
    for t, t_next in itertools.pairwise(sigmas):
        xt = gaussian_samples(512, gen()) + t * torch.randn(512, 2, generator=gen(2),
                                                            dtype=torch.float64)
        moved = (exact_flow(xt, t, t_next) - xt).norm(dim=-1).max().item()
        worst = max(worst, step_error(solver, t.item(), t_next.item(), xt) / moved)
    assert worst < (0.35 if solver == "euler" else 0.02)


def test_heun_sampler_follows_the_exact_flow_to_the_target() -> None:
    """``sample_ode`` with the ideal denoiser maps ``sigma_max z`` to the exact flow's
    endpoint (per sample), so its samples have the target's mean and covariance."""
    cond = torch.zeros(4096, 0, dtype=torch.float64)
    samples = sample_ode(GaussianDenoiser(), cond, 2, num_steps=40, solver="heun",
                         generator=gen(3))
    start = 80.0 * torch.randn(4096, 2, generator=gen(3), dtype=torch.float64)
    torch.testing.assert_close(samples, exact_flow(start, 80.0, 0.0), atol=0.01, rtol=0)
    torch.testing.assert_close(samples.mean(0), MEAN, atol=0.01, rtol=0)
    torch.testing.assert_close(torch.cov(samples.T), COV, atol=0.004, rtol=0)
    assert (ode_calls(40, "heun"), ode_calls(18, "heun"), ode_calls(18, "euler")) == (79, 35, 18)
    with pytest.raises(ValueError, match="solver must be one of"):
        probability_flow_step(GaussianDenoiser(), start, 1.0, 0.5, cond, solver="rk4")


class ConstantDenoiser(nn.Module):
    def __init__(self, value: Tensor) -> None:
        super().__init__()
        self.schedule = KarrasSchedule()
        self.value = nn.Parameter(value.clone())

    def forward(self, x: Tensor, sigma: Tensor, cond: Tensor) -> Tensor:
        return self.value.expand(x.shape)


def test_denoising_loss_is_edm_weighted_at_lognormal_levels() -> None:
    """On Dirac data ``a0`` and the constant model ``c`` every per-sample loss is
    ``lambda(t) mean_d (c - a0)^2`` with EDM's ``lambda(t) = 1/t^2 + 1/sigma_data^2``;
    inverting it recovers the levels, which follow ``ln t ~ N(-1.2, 1.2^2)``."""
    a0, c = torch.tensor([0.3, -0.6], dtype=torch.float64), torch.tensor([-0.2, 0.1])
    actions, cond = a0.expand(40_000, 2), torch.zeros(40_000, 0, dtype=torch.float64)
    per_sample, metrics = DenoisingLoss()(ConstantDenoiser(c.double()), actions, cond,
                                          generator=gen())
    mse = (c.double() - a0).pow(2).mean()
    log_t = (-0.5 * torch.log(per_sample / mse - 1.0 / 0.5**2))
    assert log_t.mean().item() == pytest.approx(-1.2, abs=0.03)
    assert log_t.std().item() == pytest.approx(1.2, abs=0.03)
    assert set(metrics) == {"denoise_weighted", "denoise_mse", "denoise_sigma"}
    zero, _ = DenoisingLoss()(ConstantDenoiser(a0), actions, cond, generator=gen())
    assert zero.abs().max().item() == 0.0
    with pytest.raises(ValueError, match="p_std must be positive"):
        DenoisingLoss(p_std=0.0)


def test_distillation_pair_is_the_teacher_step() -> None:
    """The target's input is the teacher's ODE step from ``x_t`` (not ``a + t2 z``): with
    the ideal Gaussian teacher and a student equal to it, the Heun pair lies on one exact
    trajectory, so the loss is ~0; consistency training's pair is not on it."""
    teacher = GaussianDenoiser()
    actions = gaussian_samples(2048, gen())
    cond = actions[:, :0]
    distill = ConsistencyDistillationLoss(teacher, solver="heun")
    # the ideal denoiser is not a consistency function, but the exact flow map is one:
    # f(x, t) = exact_flow(x, t, 0) is constant along trajectories
    student = FlowMap()
    per_sample, metrics = distill(student, actions, cond, generator=gen(1))
    assert per_sample.max().item() < 1e-3
    assert set(metrics) == {"cd_weighted", "cd_mse", "cd_sigma"}
    ct, _ = ConsistencyTrainingLoss()(student, actions, cond, generator=gen(1))
    assert ct.mean().item() > 100 * per_sample.mean().item()
    with pytest.raises(ValueError, match="solver must be one of"):
        ConsistencyDistillationLoss(teacher, solver="rk4")


class FlowMap(nn.Module):
    """The exact consistency function of ``N(MEAN, COV)``: ``f(x, t) = flow(x, t -> 0)``."""

    def __init__(self) -> None:
        super().__init__()
        self.schedule = KarrasSchedule()

    def forward(self, x: Tensor, sigma: Tensor | float, cond: Tensor) -> Tensor:
        t = batch_sigma(sigma, x).unsqueeze(-1)
        ratio = torch.sqrt(EIGVALS / (EIGVALS + t**2))
        return MEAN + (((x - MEAN) @ EIGVECS) * ratio) @ EIGVECS.T


def _distil(loss: nn.Module, steps: int = 400, seed: int = 0) -> Tensor:
    """Train a small student with ``loss`` on *broad* data ``N(0, 0.4^2 I)`` (not the
    teacher's target) and return 8192 of its one-step samples."""
    torch.manual_seed(seed)
    schedule = KarrasSchedule(num_steps=18)  # Song et al.'s CD grid on small images
    student = Denoiser(ConditionalMLP(2, 0, hidden_dim=64, num_layers=2), schedule, clip="none")
    optimizer = torch.optim.Adam(student.parameters(), lr=2e-3)
    decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1 - k / steps)
    generator = gen(seed)
    for _ in range(steps):
        actions = 0.4 * torch.randn(256, 2, generator=generator)
        per_sample, _ = loss(student, actions, actions[:, :0], generator=generator)
        optimizer.zero_grad(set_to_none=True)
        per_sample.mean().backward()
        optimizer.step()
        decay.step()
    with torch.no_grad():
        return sample_one_step(student, torch.zeros(8192, 0), 2, generator=gen(5)).double()


def test_distilled_one_step_student_matches_the_gaussian_teacher() -> None:
    """Distillation from the ideal teacher of ``N(MEAN, COV)`` gives a one-step student
    with the target's mean and covariance, although the student only sees actions from
    ``N(0, 0.16 I)``: it learns the teacher's flow. Consistency training on the same data
    learns the data instead (mean off by ~0.3, variance ~0.1); so does distillation if the
    teacher step is replaced by the data-only target ``a + t2 z``."""
    samples = _distil(ConsistencyDistillationLoss(GaussianDenoiser(18), solver="heun"))
    torch.testing.assert_close(samples.mean(0), MEAN, atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(samples.T), COV, atol=0.012, rtol=0)
    ct = _distil(ConsistencyTrainingLoss(), steps=100)
    assert (ct.mean(0) - MEAN).abs().max().item() > 0.1  # the contrast the test relies on


def test_distillation_gradients_reach_the_student_only() -> None:
    """Student gets gradients; the teacher and an EMA target get none (no_grad step)."""
    torch.manual_seed(0)
    student = Denoiser(ConditionalMLP(2, 3, hidden_dim=32, num_layers=2))
    teacher = Denoiser(ConditionalMLP(2, 3, hidden_dim=32, num_layers=2))
    target = ema_target(student)
    actions, cond = torch.rand(64, 2) * 2 - 1, torch.randn(64, 3)
    for solver in ("euler", "heun"):
        student.zero_grad(set_to_none=True)
        loss = ConsistencyDistillationLoss(teacher, solver=solver)
        per_sample, _ = loss(student, actions, cond, target=target, generator=gen())
        per_sample.mean().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
        assert all(p.grad is None for p in teacher.parameters())
        assert all(p.grad is None for p in target.parameters())
    assert any(k.startswith("teacher.") for k in loss.state_dict())  # saved with the loss
