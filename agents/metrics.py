"""The metric registry: every number an agent update reports, with its meaning; the
``metrics.csv`` columns and docs/usage.md's glossary are checked against it
(tests/test_metrics.py)."""

from __future__ import annotations

#: Update metrics in ``metrics.csv`` column order: name -> what it measures. Losses are the
#: optimised values; the others are detached diagnostics. Train rows hold the mean over the
#: updates since the previous train row.
UPDATE_METRICS: dict[str, str] = {
    "loss_critic": "critic loss (CP3ER: MoG negative log-likelihood of sampled n-step "
                   "targets; DrQ-v2: mse(Q1, y) + mse(Q2, y))",
    "loss_actor": "actor loss (CP3ER: -Q + lambda * L_c; DrQ-v2: -min(Q1, Q2))",
    "q_mean": "mean online Q at replayed (s, a)",
    "target_mean": "mean TD target r_n + discount * q'",
    "critic_std": "CP3ER: mean mixture standard deviation of the critic",
    "actor_q": "mean Q of the actor's actions",
    "consistency_loss": "CP3ER: weighted consistency loss on replayed actions",
    "lambda_consistency": "CP3ER: weight lambda of the consistency term (adaptive: its "
                          "current value)",
    "action_spread": "CP3ER: spread of one-step samples at fixed states",
    "action_bound_frac": "fraction of action entries within 1e-3 of the bounds",
    "preclip_beyond_frac": "CP3ER: fraction of one-step output entries beyond [-1, 1] "
                           "before the clip (no gradient there with the clamp)",
    "stddev": "DrQ-v2: scheduled exploration / smoothing noise standard deviation",
    "loss_teacher": "CP3ER distillation: the diffusion teacher's EDM denoising loss",
}

#: The losses among them: a non-finite value stops a run (``cp3er.faults``).
LOSS_METRICS: tuple[str, ...] = tuple(k for k in UPDATE_METRICS if k.startswith("loss_"))
