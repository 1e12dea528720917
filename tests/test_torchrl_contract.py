"""The consistency actor as a TorchRL user swaps it in (#32 items 7-11): the action spec's
bounds, ``ExplorationType.DETERMINISTIC``, the regulariser as a ``LossModule``, a lazy first
layer without non-trainable tensors among the optimised ones, and TorchRL's own TD3 recipe
(collector, ``LazyTensorStorage`` replay, ``TD3Loss``, ``SoftUpdate``) on Pendulum-v1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from tiny_run import tiny_cfg
from torch import nn
from torchrl.data import Bounded, Categorical, Composite, LazyTensorStorage, ReplayBuffer, Unbounded
from torchrl.envs.utils import ExplorationType, set_exploration_type
from torchrl.modules import MLP, ValueOperator
from torchrl.objectives import SoftUpdate, TD3Loss

from agents.build import build_agent
from agents.consistency_policy import (
    ConsistencyRegularizedLoss,
    ConsistencyRegularizer,
    CP3ERLoss,
    QSelectedPolicy,
    make_consistency_actor,
    set_deterministic_mode,
)
from agents.critic import MoGCritic
from cp3er import evaluate
from cp3er.checkpoint import atomic_torch_save, load_checkpoint
from cp3er.consistency import ema_target, sample_zero_noise
from cp3er.consistency.network import SinusoidalTimeEmbedding
from envs import make_env

PENDULUM = Bounded(-2.0, 2.0, shape=(1,))


def _obs(n: int = 64, dim: int = 3, seed: int = 0) -> TensorDict:
    gen = torch.Generator().manual_seed(seed)
    return TensorDict({"observation": torch.randn(n, dim, generator=gen)}, [n])


def _actions(actor, td: TensorDict) -> torch.Tensor:
    with torch.no_grad():
        return actor(td.clone())["action"]


# -- item 7: the action spec -------------------------------------------------------------
def test_spec_bounds_map_the_unit_box_onto_the_spec() -> None:
    torch.manual_seed(0)
    spec = Bounded(torch.tensor([-2.0, 0.0]), torch.tensor([2.0, 3.0]), shape=(2,))
    actor = make_consistency_actor(3, 2, in_key="observation", spec=spec, hidden_dim=32)
    policy = actor.module
    unit = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [0.0, 0.0]])
    torch.testing.assert_close(policy.from_unit(unit),
                               torch.tensor([[-2.0, 0.0], [2.0, 3.0], [0.0, 1.5]]))
    torch.testing.assert_close(policy.to_unit(policy.from_unit(unit)), unit)
    # the actions are the denoiser's [-1, 1] output mapped: same draw, same noise
    twin = _unbounded_twin(actor)
    torch.manual_seed(1)
    mapped = _actions(actor, _obs())
    torch.manual_seed(1)
    raw = _actions(twin, _obs())
    torch.testing.assert_close(mapped, policy.from_unit(raw))
    assert spec.is_in(mapped)


def _unbounded_twin(actor) -> nn.Module:
    """The same denoiser without the spec's map (actions in [-1, 1])."""
    twin = make_consistency_actor(3, actor.module.action_dim, in_key="observation",
                                  hidden_dim=32)
    twin.module.denoiser = actor.module.denoiser
    return twin


def test_pendulum_spec_reaches_its_bounds_and_a_unit_spec_changes_nothing() -> None:
    torch.manual_seed(0)
    actor = make_consistency_actor(3, 1, in_key="observation", spec=PENDULUM, hidden_dim=32)
    with torch.no_grad():  # push the last layer so the denoiser's output saturates at +-1
        actor.module.denoiser.network.mlp[-1].bias.fill_(0.0)
        actor.module.denoiser.network.mlp[-1].weight.mul_(200.0)
    actions = _actions(actor, _obs(256))
    assert actions.abs().max() > 1.5  # today's actor stops at 1: half of Pendulum's range
    assert bool(((actions >= -2) & (actions <= 2)).all())
    unit = make_consistency_actor(3, 1, in_key="observation", hidden_dim=32,
                                  spec=Bounded(-1.0, 1.0, shape=(1,)))
    assert not unit.module.bounded  # [-1, 1]: no map, the same tensors as without a spec
    plain = _unbounded_twin(unit)
    torch.manual_seed(2)
    first = _actions(unit, _obs())
    torch.manual_seed(2)
    assert torch.equal(first, _actions(plain, _obs()))


def test_spec_bounds_follow_the_module_and_are_not_optimised() -> None:
    actor = make_consistency_actor(3, 1, in_key="observation", spec=PENDULUM, hidden_dim=16)
    actor.double()
    assert actor.module.low.dtype == torch.float64
    assert _actions_dtype(actor) == torch.float64
    tensors = TensorDict.from_module(actor).values(True, True)
    assert all(isinstance(t, nn.Parameter) and t.requires_grad for t in tensors)
    assert "low" not in actor.state_dict() and "module.low" not in actor.state_dict()


def _actions_dtype(actor) -> torch.dtype:
    td = TensorDict({"observation": torch.randn(2, 3, dtype=torch.float64)}, [2])
    with torch.no_grad():
        return actor(td)["action"].dtype


@pytest.mark.parametrize("spec, match", [
    (Unbounded(shape=(1,)), "Bounded"),
    (Categorical(3), "Bounded"),
    (Bounded(-2.0, 2.0, shape=(2,)), "action_dim=1"),
    (Bounded(-float("inf"), 2.0, shape=(1,)), "infinite"),
    (Composite(other=PENDULUM), "without 'action'"),
])
def test_unsupported_specs_are_refused_with_the_reason(spec, match) -> None:
    with pytest.raises(ValueError, match=match):
        make_consistency_actor(3, 1, in_key="observation", spec=spec, hidden_dim=16)


def test_a_composite_spec_is_read_at_the_action_key() -> None:
    actor = make_consistency_actor(3, 1, in_key="observation", hidden_dim=16,
                                   spec=Composite(action=PENDULUM))
    assert actor.module.bounded and float(actor.module.high) == 2.0


def test_regularizer_reads_replayed_actions_in_the_unit_box() -> None:
    """With a spec, L_c sees replayed env actions mapped back to [-1, 1]."""
    torch.manual_seed(0)
    bounded = make_consistency_actor(3, 1, in_key="observation", spec=PENDULUM, hidden_dim=16)
    plain = _unbounded_twin(bounded)
    batch = _obs(32).set("action", torch.rand(32, 1) * 2 - 1)
    scaled = batch.clone().set("action", 2 * batch["action"])
    torch.manual_seed(3)
    expected = ConsistencyRegularizer(plain)(batch)
    torch.manual_seed(3)
    torch.testing.assert_close(ConsistencyRegularizer(bounded)(scaled), expected)


# -- item 8: DETERMINISTIC ---------------------------------------------------------------
def test_deterministic_mode_is_zero_noise_by_default_and_repeatable() -> None:
    torch.manual_seed(0)
    actor = make_consistency_actor(3, 1, in_key="observation", spec=PENDULUM, hidden_dim=32)
    td = _obs()
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        first, second = _actions(actor, td), _actions(actor, td)
    assert torch.equal(first, second)  # today's actor samples here: they differ
    policy = actor.module
    with torch.no_grad():
        zero = policy.from_unit(sample_zero_noise(policy.denoiser, td["observation"], 1))
    assert torch.equal(first, zero)
    with set_exploration_type(ExplorationType.RANDOM):
        assert not torch.equal(_actions(actor, td), _actions(actor, td))
    assert not torch.equal(_actions(actor, td), _actions(actor, td))  # no mode: samples


def test_sample_mode_ignores_deterministic() -> None:
    actor = make_consistency_actor(3, 1, in_key="observation", hidden_dim=32,
                                   deterministic="sample")
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        assert not torch.equal(_actions(actor, _obs()), _actions(actor, _obs()))
    assert set_deterministic_mode(actor, "zero_noise") == 1
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        assert torch.equal(_actions(actor, _obs()), _actions(actor, _obs()))
    with pytest.raises(ValueError, match="zero_noise"):
        make_consistency_actor(3, 1, hidden_dim=8, deterministic="mean")


def test_q_selected_policy_acts_the_zero_noise_action_when_deterministic() -> None:
    torch.manual_seed(0)
    encoder = TensorDictModule(nn.Identity(), ["observation"], ["features"])
    actor = make_consistency_actor(5, 2, hidden_dim=32)
    loss = CP3ERLoss(encoder, actor, MoGCritic(5, 2, feature_dim=8, hidden_dim=32))
    selector = QSelectedPolicy(loss, num_candidates=8)
    features = torch.randn(4, 5)
    with set_exploration_type(ExplorationType.DETERMINISTIC), torch.no_grad():
        assert torch.equal(selector(features), loss.policy(features))
        assert torch.equal(selector(features), selector(features))


def test_the_agent_keeps_sampling_at_evaluation_unless_configured(tmp_path: Path) -> None:
    """agent.eval_noise: sample (the reference's evaluation) by default, zero_noise on
    request; an unknown value is refused naming the key and the choices."""
    env = make_env("cartpole_balance", "state", seed=0)
    try:
        cfg = tiny_cfg(tmp_path)
        assert cfg.agent.eval_noise == "sample"
        assert build_agent(cfg, env).loss.policy.deterministic == "sample"
        cfg = tiny_cfg(tmp_path, "agent.eval_noise=zero_noise")
        assert build_agent(cfg, env).loss.policy.deterministic == "zero_noise"
        assert tiny_cfg(tmp_path, "agent=cp3er_stable").agent.eval_noise == "sample"
    finally:
        env.close()
    with pytest.raises(ConfigCompositionException) as error:
        tiny_cfg(tmp_path, "agent.eval_noise=zero")
    assert "eval_noise" in str(error.value.__cause__) and "zero_noise" in str(
        error.value.__cause__)


def test_cp3er_eval_chooses_the_evaluation_noise(finished_run: Path, tmp_path: Path,
                                                 capsys, monkeypatch) -> None:
    """A checkpoint written before agent.eval_noise existed evaluates as before (sample);
    --eval-noise zero_noise re-evaluates it with the repeatable action."""
    state = load_checkpoint(finished_run)
    del state["config"]["agent"]["eval_noise"]
    old = tmp_path / "old.pt"
    atomic_torch_save(state, old)
    acted = []
    run_episodes = evaluate.run_episodes

    def recording(env, policy, *args, **kwargs):
        acted.extend(m.deterministic for m in policy.modules() if hasattr(m, "deterministic"))
        return run_episodes(env, policy, *args, **kwargs)

    monkeypatch.setattr(evaluate, "run_episodes", recording)
    for options, mode in (([], "sample"), (["--eval-noise", "zero_noise"], "zero_noise")):
        assert evaluate.main([str(old), "--episodes", "1", "--no-progress", *options]) == 0
        assert json.loads(capsys.readouterr().out)["eval_noise"] == mode
        assert acted.pop() == mode


# -- item 10: lazy first layer, no buffer among the optimised tensors --------------------
def test_time_embedding_frequencies_are_a_constant_not_module_state() -> None:
    embed = SinusoidalTimeEmbedding(16)
    assert not list(embed.buffers()) and "freqs" not in embed.state_dict()
    reference = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(8) / 7)
    torch.testing.assert_close(embed.freqs, reference)
    embed.double()
    assert embed(torch.tensor([1.0], dtype=torch.float64)).dtype == torch.float64
    embed.to("meta")  # follows the module to a device, as a buffer would
    assert embed.freqs.device.type == "meta"
    actor = make_consistency_actor(3, 1, in_key="observation", hidden_dim=16)
    loss = TD3Loss(actor, _qvalue(), action_spec=PENDULUM)
    # TorchRL's recipe builds the actor's optimiser from these: Parameters only (today
    # the embedding's frequencies are among them)
    tensors = list(loss.actor_network_params.values(True, True))
    assert tensors and all(isinstance(t, nn.Parameter) for t in tensors)


def test_lazy_first_layer_reads_the_observation_size() -> None:
    torch.manual_seed(0)
    actor = make_consistency_actor(None, 1, in_key="observation", spec=PENDULUM,
                                   hidden_dim=32)
    with pytest.raises(ValueError, match="lazy"):
        ema_target(actor.module.denoiser)
    actions = _actions(actor, _obs(8, dim=5))
    assert actions.shape == (8, 1)
    network = actor.module.denoiser.network
    assert type(network.cond_layer) is nn.Linear and network.cond_layer.in_features == 5
    # initialised as the eager first layer: one Linear over [x, t_emb, cond] (bound 1/sqrt 22)
    bound = 1 / (1 + 16 + 5) ** 0.5
    for weight in (network.cond_layer.weight, network.input_layer.weight,
                   network.input_layer.bias):
        assert float(weight.detach().abs().max()) <= bound
    assert float(network.input_layer.weight.detach().abs().max()) > 0.8 * bound
    trunk = make_consistency_actor(None, 1, in_key="observation", hidden_dim=16, trunk_dim=8)
    assert _actions(trunk, _obs(4, dim=7)).shape == (4, 1)
    ema_target(actor.module.denoiser)  # initialised now


def test_standalone_default_width_is_for_states_and_the_agent_passes_its_own(
        tmp_path: Path) -> None:
    actor = make_consistency_actor(3, 1, in_key="observation")
    assert actor.module.denoiser.network.input_layer.out_features == 256
    env = make_env("cartpole_balance", "state", seed=0)
    try:
        agent = build_agent(tiny_cfg(tmp_path, "hidden_dim=48"), env)
    finally:
        env.close()
    assert agent.loss.policy.denoiser.network.input_layer.out_features == 48


# -- items 9 and 11: the LossModule in TorchRL's TD3 recipe on Pendulum-v1 ---------------
class _Q(nn.Module):
    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.net = MLP(in_features=4, out_features=1, num_cells=[hidden, hidden])

    def forward(self, observation: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([observation, action], -1))


def _qvalue(hidden: int = 64) -> ValueOperator:
    return ValueOperator(_Q(hidden), in_keys=["observation", "action"])


def _loss_sum(out: TensorDict) -> torch.Tensor:
    return sum(value for key, value in out.items() if key.startswith("loss_"))


def test_loss_consistency_reaches_the_actor_only() -> None:
    torch.manual_seed(0)
    actor = make_consistency_actor(3, 1, in_key="observation", spec=PENDULUM, hidden_dim=32)
    td3 = TD3Loss(actor, _qvalue(32), action_spec=PENDULUM)
    loss = ConsistencyRegularizedLoss(td3, weight=0.5)
    batch = _obs(16).update({
        "action": torch.rand(16, 1) * 4 - 2,
        "next": {"observation": torch.randn(16, 3), "reward": torch.randn(16, 1),
                 "done": torch.zeros(16, 1, dtype=torch.bool),
                 "terminated": torch.zeros(16, 1, dtype=torch.bool)}})
    out = loss(batch)
    assert {"loss_actor", "loss_qvalue", "loss_consistency", "consistency_loss"} <= set(
        out.keys())
    torch.testing.assert_close(out["loss_consistency"], 0.5 * out["consistency_loss"])
    out["loss_consistency"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for name, p in actor.named_parameters() if "time_embed" not in name)
    assert all(p.grad is None or not p.grad.any()
               for p in td3.qvalue_network_params.values(True, True))
    assert loss.deterministic_sampling_mode == td3.deterministic_sampling_mode == (
        ExplorationType.RANDOM)  # the actor trains on its samples, not D(0, sigma_max)


def test_td3_recipe_on_pendulum_with_the_consistency_actor() -> None:
    """TorchRL's TD3 shape, the actor swapped: it collects in Pendulum's [-2, 2], trains
    through the sum of the loss_* entries, and acts repeatably when DETERMINISTIC."""
    from torchrl.collectors import Collector
    from torchrl.envs.libs.gym import GymEnv

    torch.manual_seed(0)
    env = GymEnv("Pendulum-v1")
    env.set_seed(0)
    actor = make_consistency_actor(None, 1, in_key="observation", spec=env.action_spec,
                                   hidden_dim=64)
    actor(env.reset())  # materialise the lazy first layer before the loss copies it
    td3 = TD3Loss(actor, _qvalue(), action_spec=env.action_spec)
    td3.make_value_estimator(gamma=0.99)
    loss = ConsistencyRegularizedLoss(td3, weight=0.05)
    updater = SoftUpdate(td3, tau=0.01)
    optimizer = torch.optim.Adam(loss.parameters(), lr=1e-3)
    initial = {name: p.detach().clone() for name, p in loss.named_parameters()}
    buffer = ReplayBuffer(storage=LazyTensorStorage(4000), batch_size=128)
    collector = Collector(env, actor, frames_per_batch=200, total_frames=3000,
                          init_random_frames=400, auto_register_policy_transforms=False)
    policy_actions = []
    for index, batch in enumerate(collector):
        buffer.extend(batch.reshape(-1))
        if index >= 2:  # past the random frames: the actor's own actions
            policy_actions.append(batch["action"])
        if len(buffer) < 400:
            continue
        for _ in range(50):
            out = loss(buffer.sample())
            optimizer.zero_grad()
            _loss_sum(out).backward()
            optimizer.step()
            updater.step()
    collector.shutdown()
    actions = torch.cat(policy_actions)
    assert bool(((actions >= -2) & (actions <= 2)).all())
    assert actions.abs().max() > 1.0  # beyond the [-1, 1] of an actor without the spec
    changed = [name for name, p in loss.named_parameters()
               if not torch.equal(p.detach(), initial[name])]
    assert any("actor" in name for name in changed) and any("qvalue" in name for name in changed)
    assert torch.isfinite(out["loss_qvalue"]) and torch.isfinite(out["loss_consistency"])
    observation = env.reset()
    with set_exploration_type(ExplorationType.DETERMINISTIC):
        assert torch.equal(_actions(actor, observation), _actions(actor, observation))
        set_deterministic_mode(actor, "sample")
        assert not torch.equal(_actions(actor, observation), _actions(actor, observation))
    env.close()
