"""CP3ER's collapse remedies (agents.stability, agent.stability): each one does what it
claims, and the defaults are the paper's objective."""

from __future__ import annotations

import math

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.envs.utils import ExplorationType, set_exploration_type

from agents.consistency_policy import CP3ERLoss, QSelectedPolicy, make_consistency_actor
from agents.critic import MoGCritic
from agents.policy_stats import action_spread, bound_fraction
from agents.stability import AdaptiveWeight, bound_penalty, normalized_q_term
from tests.tiny_run import random_state_batch, tiny_cfg

REPR, ACTION_DIM = 8, 2


class LinearCritic(nn.Module):
    """Q(s, a) = offset + slope * u(s) . a with u(s) = tanh(3 W s): best action on a bound
    (the shape both agents' critics had in the pixel runs, docs/results "Diagnosis")."""

    def __init__(self, slope: float, offset: float = 10.0, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("weight", torch.randn(REPR, ACTION_DIM, generator=gen))
        self.slope = nn.Parameter(torch.tensor(slope), requires_grad=False)
        self.offset = offset

    def mean(self, features: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        u = torch.tanh(3 * features @ self.weight)
        return (self.offset + self.slope * (u * action).sum(-1)).unsqueeze(-1)


def _loss(critic: nn.Module, hidden: int = 64, **options) -> CP3ERLoss:
    encoder = TensorDictModule(nn.Identity(), ["observation"], ["features"])
    # deterministic="sample": the agent's default (agent.eval_noise), so DETERMINISTIC picks
    # the best of sampled candidates
    actor = make_consistency_actor(REPR, ACTION_DIM, hidden_dim=hidden, deterministic="sample")
    return CP3ERLoss(encoder, actor, critic, **options)


def _train_actor(loss: CP3ERLoss, updates: int, seed: int = 0) -> dict[str, float]:
    """The actor step alone against a fixed critic on uniform replayed actions (the data
    of the uniform exploration phase); the collapse statistics on held-out states."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    features = torch.randn(1024, REPR, generator=gen)
    actions = torch.rand(1024, ACTION_DIM, generator=gen) * 2 - 1
    optimizer = torch.optim.Adam(loss.actor.parameters(), lr=1e-3)
    for _ in range(updates):
        index = torch.randint(0, 1024, (64,), generator=gen)
        batch = TensorDict({"action": actions[index]}, [64])
        value, metrics = loss.actor_loss(batch, features[index])
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        loss.after_actor_step(metrics)
    held_out = torch.randn(32, REPR, generator=gen)
    samples = loss.policy.samples_at(held_out, 32, 8)
    return {"bound_frac": float(bound_fraction(samples)),
            "spread": float(action_spread(samples)),
            "lambda": float(loss.consistency_weight)}


# -- normalised Q term -------------------------------------------------------------------
def test_normalized_q_term_is_scale_free() -> None:
    """-Q / stopgrad mean|Q|: the same value and action gradient whatever the return scale
    (the paper's -Q grows with it)."""
    action = torch.tensor([[0.2, -0.5], [0.7, 0.1]], requires_grad=True)
    grads, values = [], []
    for scale in (1.0, 100.0):
        q = scale * (3.0 + action.sum(-1))
        value, q_scale = normalized_q_term(q)
        (grad,) = torch.autograd.grad(value, action)
        grads.append(grad)
        values.append(value.item())
        assert q_scale.item() == pytest.approx(scale * (3.0 + 0.25), rel=1e-6)
    assert values[0] == pytest.approx(values[1], rel=1e-6)
    assert torch.allclose(grads[0], grads[1], rtol=1e-5)
    assert values[0] == pytest.approx(-1.0, rel=1e-6)  # all Q positive: -mean Q / mean|Q|


def test_normalize_q_changes_only_the_q_term() -> None:
    """With the same draws, the normalised loss is the paper's with -Q divided by mean|Q|."""
    critic = LinearCritic(0.3, offset=5.0)
    batch = TensorDict({"action": torch.rand(16, ACTION_DIM) * 2 - 1}, [16])
    features = torch.randn(16, REPR)
    torch.manual_seed(0)
    paper = _loss(critic, lambda_consistency=0.05)
    torch.manual_seed(0)
    normed = _loss(critic, lambda_consistency=0.05, normalize_q=True)
    torch.manual_seed(1)
    paper_value, paper_metrics = paper.actor_loss(batch, features)
    torch.manual_seed(1)
    normed_value, _ = normed.actor_loss(batch, features)
    q = paper_metrics["actor_q"]
    consistency = 0.05 * paper_metrics["consistency_loss"]
    assert paper_value.item() == pytest.approx((-q + consistency).item(), rel=1e-5)
    assert normed_value.item() == pytest.approx((-q / q.abs() + consistency).item(), rel=1e-5)


# -- bound penalty -----------------------------------------------------------------------
def test_bound_penalty_is_zero_inside_and_pulls_back_outside() -> None:
    inside = torch.tensor([[0.99, -1.0], [0.0, 1.0]])
    assert bound_penalty(inside).item() == 0.0
    outside = torch.tensor([[1.5, -3.0], [0.0, 1.0]], requires_grad=True)
    value = bound_penalty(outside)
    assert value.item() == pytest.approx((0.5**2 + 2.0**2) / 2)
    (grad,) = torch.autograd.grad(value, outside)
    assert grad[0, 0] > 0 and grad[0, 1] < 0  # descent moves both back toward the box
    assert grad[1].abs().sum() == 0


def test_bound_penalty_gives_gradient_where_the_clamp_has_none() -> None:
    """An actor whose one-step outputs all lie beyond +1 gets no gradient from the paper's
    Q term through the clamp; the penalty gives one, and it lowers the outputs."""
    critic = LinearCritic(0.3)
    batch = TensorDict({"action": torch.rand(16, ACTION_DIM) * 2 - 1}, [16])
    features = torch.randn(16, REPR)
    for penalty in (0.0, 1.0):
        torch.manual_seed(0)
        loss = _loss(critic, lambda_consistency=0.0, bound_penalty=penalty)
        head = loss.policy.denoiser.network.mlp[-1]
        with torch.no_grad():
            head.bias.fill_(50.0)  # c_out(80) ~ 0.5: outputs ~ +25
        value, metrics = loss.actor_loss(batch, features)
        assert metrics["preclip_beyond_frac"].item() == 1.0
        value.backward()
        grad = head.bias.grad
        if penalty == 0.0:
            assert grad is None or grad.abs().sum() == 0
        else:
            assert (grad > 0).all()  # gradient descent lowers the bias: back toward the box


# -- adaptive lambda ---------------------------------------------------------------------
def test_adaptive_weight_dual_ascent_and_bounds() -> None:
    weight = AdaptiveWeight(0.05, target=0.2, lr=0.1, minimum=0.01, maximum=1.0)
    weight.step(torch.tensor(0.0))  # collapsed: log w + 0.1
    assert weight.value.item() == pytest.approx(0.05 * math.exp(0.1), rel=1e-5)
    weight.step(torch.tensor(0.4))  # twice the target: log w - 0.1
    assert weight.value.item() == pytest.approx(0.05, rel=1e-5)
    for _ in range(100):
        weight.step(torch.tensor(0.0))
    assert weight.value.item() == pytest.approx(1.0, rel=1e-5)
    for _ in range(200):
        weight.step(torch.tensor(1.0))
    assert weight.value.item() == pytest.approx(0.01, rel=1e-5)
    above = AdaptiveWeight(0.05, target=0.2, lr=0.1, raise_when="above")
    above.step(torch.tensor(0.4))  # a bound fraction twice its target: log w + 0.1
    assert above.value.item() == pytest.approx(0.05 * math.exp(0.1), rel=1e-5)
    restored = AdaptiveWeight(0.05, target=0.2)
    restored.load_state_dict(weight.state_dict())
    assert restored.value.item() == pytest.approx(0.01, rel=1e-5)
    with pytest.raises(ValueError, match="minimum <= initial <= maximum"):
        AdaptiveWeight(5.0, target=0.2, maximum=1.0)


def test_adaptive_lambda_holds_the_spread_that_the_paper_lambda_loses() -> None:
    """Against a critic that prefers the bounds, the paper's lambda 0.05 lets the samples
    collapse onto them; the adaptive lambda (target spread 0.3) raises lambda and keeps the
    samples spread and mostly inside the box."""
    torch.manual_seed(0)
    paper = _train_actor(_loss(LinearCritic(0.1), lambda_consistency=0.05), 400)
    torch.manual_seed(0)
    adaptive = _loss(LinearCritic(0.1), lambda_consistency=0.05,
                     adaptive_lambda=AdaptiveWeight(0.05, target=0.3, lr=0.02, maximum=10.0))
    held = _train_actor(adaptive, 400)
    # measured: paper 0.89 on the bounds, spread 0.02; adaptive 0.0, 0.18, lambda 5.9
    assert paper["bound_frac"] > 0.6 and paper["spread"] < 0.08, paper
    assert held["lambda"] > 1.0, held
    assert held["bound_frac"] < 0.2 and held["spread"] > 0.12, held


def test_adaptive_lambda_holds_the_bound_fraction_under_its_target() -> None:
    """The other statistic: lambda raised while more than 20% of the samples sit on the
    bounds (measured: 0.21 on the bounds, lambda 1.6; the paper's lambda: 0.89)."""
    torch.manual_seed(0)
    loss = _loss(LinearCritic(0.1), lambda_consistency=0.05,
                 adaptive_lambda=AdaptiveWeight(0.05, target=0.2, lr=0.02, maximum=10.0,
                                                raise_when="above"),
                 adaptive_statistic="action_bound_frac")
    held = _train_actor(loss, 400)
    assert held["lambda"] > 0.5, held
    assert held["bound_frac"] < 0.35, held


# -- actor gradient clipping -------------------------------------------------------------
def test_actor_grad_clip_limits_the_actor_step_only(tmp_path) -> None:
    from agents.build import build_agent
    from envs import make_env

    cfg = tiny_cfg(tmp_path, "agent.stability.actor_grad_clip=1e-3")
    env = make_env(cfg.task_name, obs="state", seed=0)
    agent = build_agent(cfg, env)
    env.close()
    assert agent.actor_grad_clip == pytest.approx(1e-3) and agent.grad_clip is None
    norms = {}
    original = torch.optim.Adam.step

    def recording_step(optimizer, *args, **kwargs):
        name = next(k for k, v in agent.optimizers.items() if v is optimizer)
        grads = [p.grad for g in optimizer.param_groups for p in g["params"]
                 if p.grad is not None]
        norms[name] = torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in grads])).item()
        return original(optimizer, *args, **kwargs)

    torch.optim.Adam.step = recording_step
    try:
        agent.update(random_state_batch(int(env.observation_spec["observation"].shape[-1]),
                                        size=16))
    finally:
        torch.optim.Adam.step = original
    assert norms["actor"] <= 1e-3 * (1 + 1e-4)
    assert norms["critic"] > 1e-2  # not clipped


# -- acting by Q over candidates ---------------------------------------------------------
def _mog_loss() -> CP3ERLoss:
    torch.manual_seed(0)
    critic = MoGCritic(REPR, ACTION_DIM, feature_dim=8, hidden_dim=32, init_scale=0.1)
    return _loss(critic)


def test_q_selected_policy_picks_the_best_candidate_when_deterministic() -> None:
    loss = _mog_loss()
    selector = QSelectedPolicy(loss, num_candidates=16, temperature=1.0)
    features = torch.randn(5, REPR)
    torch.manual_seed(3)
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        chosen = selector(features)
    torch.manual_seed(3)
    expanded = features.expand(16, 5, REPR)
    candidates = loss.policy(expanded)
    with loss.critic_params.to_module(loss.critic):
        q = loss.critic.mean(expanded, candidates).squeeze(-1)
    best = candidates[q.argmax(0), torch.arange(5)]
    assert chosen.shape == (5, ACTION_DIM)
    assert torch.equal(chosen, best)


def test_q_selected_policy_samples_by_softmax_of_q() -> None:
    """A cold softmax picks the best candidate, a hot one any candidate (close to uniform)."""
    loss = _mog_loss()
    features = torch.randn(1, REPR).expand(4000, REPR)
    with set_exploration_type(ExplorationType.RANDOM):
        torch.manual_seed(5)
        cold = QSelectedPolicy(loss, 8, temperature=1e-6)(features)
        torch.manual_seed(5)
        hot = QSelectedPolicy(loss, 8, temperature=1e6)(features)
        torch.manual_seed(5)
        plain = loss.policy(features)
    with loss.critic_params.to_module(loss.critic):
        q = lambda a: loss.critic.mean(features, a).mean().item()  # noqa: E731
    assert q(cold) > q(hot) + 1e-4
    assert q(hot) == pytest.approx(q(plain), abs=0.05 * abs(q(cold) - q(plain)) + 1e-5)


# -- configuration -----------------------------------------------------------------------
def test_paper_defaults_switch_every_remedy_off(tmp_path) -> None:
    cfg = tiny_cfg(tmp_path)
    st = cfg.agent.stability
    assert (st.normalize_q, st.bound_penalty, st.actor_grad_clip, st.target_spread,
            st.target_bound_frac, st.act_candidates) == (False, 0.0, None, None, None, 1)
    assert cfg.agent.lambda_consistency == 0.05


@pytest.mark.parametrize(("override", "message"), [
    ("agent.stability.bound_penalty=-1", "agent.stability.bound_penalty"),
    ("agent.stability.target_spread=0", "agent.stability.target_spread"),
    ("agent.stability.act_candidates=0", "agent.stability.act_candidates"),
    ("agent.stability.lambda_max=0.01", "agent.lambda_consistency"),
    ("agent.stability.target_bound_frac=1.5", "agent.stability.target_bound_frac"),
])
def test_bad_stability_values_are_refused(tmp_path, override, message) -> None:
    from cp3er.config_check import ConfigError, validate_config

    overrides = [override]
    if "lambda_max" in override:
        overrides.append("agent.stability.target_spread=0.2")
    with pytest.raises(ConfigError, match=message):
        validate_config(tiny_cfg(tmp_path, *overrides))


def test_stable_preset_is_the_paper_agent_plus_its_two_remedies(tmp_path) -> None:
    """agent=cp3er_stable changes the bound penalty and the adaptive lambda target and
    nothing else of agent=cp3er (its name stays cp3er: checkpoints, evaluation, resume)."""
    from omegaconf import OmegaConf

    paper = OmegaConf.to_container(tiny_cfg(tmp_path).agent)
    stable = OmegaConf.to_container(tiny_cfg(tmp_path, "agent=cp3er_stable").agent)
    changed = {k for k in paper["stability"] if paper["stability"][k] != stable["stability"][k]}
    assert changed == {"bound_penalty", "target_bound_frac"}
    assert stable["stability"]["bound_penalty"] > 0
    assert 0 < stable["stability"]["target_bound_frac"] < 0.5
    paper.pop("stability")
    stable.pop("stability")
    assert stable == paper


def test_one_adaptive_target_at_a_time(tmp_path) -> None:
    from cp3er.config_check import ConfigError, validate_config

    with pytest.raises(ConfigError, match="one adaptive target at a time"):
        validate_config(tiny_cfg(tmp_path, "agent.stability.target_spread=0.2",
                                 "agent.stability.target_bound_frac=0.3"))


def test_candidates_need_the_critic_in_process(tmp_path) -> None:
    from cp3er.config_check import ConfigError, validate_config

    with pytest.raises(ConfigError, match=r"collector\.workers"):
        validate_config(tiny_cfg(tmp_path, "agent.stability.act_candidates=4",
                                 "collector.workers=2"))
