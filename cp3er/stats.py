"""Statistics of evaluation scores for ``cp3er-eval`` and ``cp3er-plot``: rliable's
estimators and bootstraps (Agarwal et al., "Deep Reinforcement Learning at the Edge of the
Statistical Precipice", NeurIPS 2021).

In numpy because ``import rliable.library`` fails inside arch 7.2 with pandas 3. Point
estimates equal rliable's, CIs agree to Monte-Carlo error; with unequal seed counts per task
the pooled estimates weigh tasks by their runs (rliable needs a full runs x tasks matrix).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats

__all__ = [
    "AGGREGATES",
    "CONFIDENCE",
    "aggregate_metrics",
    "bootstrap_mean_ci",
    "interquartile_mean",
    "optimality_gap",
    "pairwise_improvement",
    "percentile_ci",
    "probability_of_improvement",
    "stratified_bootstrap_ci",
]

CONFIDENCE = 0.95


def interquartile_mean(scores: np.ndarray, axis: int | None = -1) -> np.ndarray:
    """IQM: the mean of the middle 50% of scores (rliable ``aggregate_iqm``)."""
    return stats.trim_mean(scores, 0.25, axis=axis)


def optimality_gap(scores: np.ndarray, axis: int | None = -1) -> np.ndarray:
    """Mean shortfall from a normalized score of 1: ``mean(max(0, 1 - s))`` (rliable, gamma=1)."""
    return np.mean(np.maximum(0.0, 1.0 - scores), axis=axis)


AGGREGATES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "iqm": interquartile_mean,
    "mean": lambda scores: np.mean(scores, axis=-1),
    "optimality_gap": optimality_gap,
}


def percentile_ci(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The :data:`CONFIDENCE` percentile interval over axis 0 of bootstrap ``samples``."""
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(samples, [tail, 100 - tail], axis=0)
    return low, high


def bootstrap_mean_ci(values: np.ndarray, reps: int = 2000,
                      rng: np.random.Generator | int = 0) -> tuple[np.ndarray, np.ndarray]:
    """95% percentile CI of the mean over axis 0 (replicates) of ``values``.

    ``[replicates]`` gives 0-d bounds, ``[replicates, columns]`` one CI per column from the
    same resamples (multinomial counts: memory ``reps x chunk``). ``rng``: generator or seed.
    """
    rng = np.random.default_rng(rng) if isinstance(rng, int) else rng
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 1:
        low, high = bootstrap_mean_ci(values[:, None], reps, rng)
        return low[0], high[0]
    replicates = values.shape[0]
    weights = rng.multinomial(replicates, np.full(replicates, 1 / replicates),
                              size=reps) / replicates
    chunk = max(1, 2**21 // reps)
    lows, highs = [], []
    for start in range(0, values.shape[1], chunk):
        low, high = percentile_ci(weights @ values[:, start:start + chunk])
        lows.append(low)
        highs.append(high)
    return np.concatenate(lows), np.concatenate(highs)


def stratified_bootstrap_ci(
    scores_by_task: Sequence[np.ndarray],
    statistic: Callable[[np.ndarray], np.ndarray],
    reps: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """95% percentile CI of ``statistic`` (``[reps, runs] -> [reps]``) over pooled runs,
    resampled within each task (rliable's stratified bootstrap, Agarwal et al. 2021, Sec. 4)."""
    rng = np.random.default_rng(seed)
    resampled = [s[rng.integers(0, len(s), size=(reps, len(s)))] for s in scores_by_task]
    low, high = percentile_ci(statistic(np.concatenate(resampled, axis=1)))
    return float(low), float(high)


def aggregate_metrics(scores_by_task: dict[str, np.ndarray], reps: int = 2000, seed: int = 0,
                      ) -> dict:
    """IQM, mean and optimality gap of ``{task: normalized scores}`` with stratified-bootstrap
    CIs; point estimates pool all runs (as rliable flattens its matrix)."""
    tasks = sorted(scores_by_task)
    per_task = [np.asarray(scores_by_task[t], dtype=np.float64) for t in tasks]
    pooled = np.concatenate(per_task)
    result: dict = {}
    for name, statistic in AGGREGATES.items():
        result[name] = float(statistic(pooled))
        result[f"{name}_ci"] = list(stratified_bootstrap_ci(per_task, statistic, reps, seed))
    result["runs"] = len(pooled)
    result["tasks"] = tasks
    return result


def _improvement(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """P(X > Y) on one task from runs ``x [..., n]`` and ``y [..., m]``: the Mann-Whitney U
    statistic over ``n m`` (pairs won, ties half)."""
    wins = x[..., :, None] - y[..., None, :]
    return np.mean((wins > 0) + 0.5 * (wins == 0), axis=(-2, -1))


def probability_of_improvement(x_by_task: Sequence[np.ndarray], y_by_task: Sequence[np.ndarray],
                               reps: int = 2000, seed: int = 0) -> dict:
    """P(X > Y): the chance that a run of X beats a run of Y on a task drawn at random, the
    mean over tasks of the Mann-Whitney U statistic (rliable ``probability_of_improvement``,
    Agarwal et al. 2021, Sec. 4.3), with a 95% CI from a stratified bootstrap that resamples
    X's and Y's runs of each task independently. Tasks pair up by position."""
    if len(x_by_task) != len(y_by_task) or not x_by_task:
        raise ValueError("probability_of_improvement needs the same tasks, at least one, "
                         f"for X and Y (got {len(x_by_task)} and {len(y_by_task)})")
    rng = np.random.default_rng(seed)
    point, samples = [], []
    for x, y in zip(x_by_task, y_by_task, strict=True):
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        point.append(_improvement(x, y))
        samples.append(_improvement(x[rng.integers(0, len(x), size=(reps, len(x)))],
                                    y[rng.integers(0, len(y), size=(reps, len(y)))]))
    low, high = percentile_ci(np.mean(samples, axis=0))
    return {"probability": float(np.mean(point)), "ci": [float(low), float(high)]}


def pairwise_improvement(scores: dict[str, dict[str, np.ndarray]], reps: int = 2000,
                         seed: int = 0) -> dict[str, dict]:
    """``{"a > b": probability_of_improvement(...)}`` for each pair of agents of
    ``{agent: {task: normalized scores}}``, ``a`` before ``b`` in name order (P(b > a) is one
    minus it), over the tasks both ran; a pair without a common task is left out."""
    agents = sorted(scores)
    result = {}
    for i, a in enumerate(agents):
        for b in agents[i + 1:]:
            tasks = sorted(set(scores[a]) & set(scores[b]))
            if tasks:
                result[f"{a} > {b}"] = {
                    **probability_of_improvement([scores[a][t] for t in tasks],
                                                 [scores[b][t] for t in tasks], reps, seed),
                    "tasks": tasks}
    return result
