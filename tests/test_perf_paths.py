"""The optimised paths compute what the straightforward ones do (same seeds, tolerances)."""

from __future__ import annotations

import copy
import platform

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torch import nn
from torch._dynamo.utils import counters

from agents.build import compile_networks
from agents.consistency_policy import CP3ERLoss, make_consistency_actor
from agents.critic import MoGCritic
from agents.encoder import PixelEncoder
from cp3er.consistency import ConditionalMLP, ProjectedCondition
from cp3er.perf import tune_allocator


def test_split_first_layer_is_the_concatenated_linear() -> None:
    torch.manual_seed(0)
    net = ConditionalMLP(action_dim=3, cond_dim=20, hidden_dim=32)
    single = nn.Linear(3 + 16 + 20, 32)
    with torch.no_grad():
        single.weight.copy_(torch.cat([net.input_layer.weight, net.cond_layer.weight], 1))
        single.bias.copy_(net.input_layer.bias)
    x, t, cond = torch.randn(5, 3), torch.randn(5), torch.randn(5, 20)
    reference = net.mlp(single(torch.cat([x, net.time_embed(t), cond], -1)))
    torch.testing.assert_close(net(x, t, cond), reference, rtol=1e-5, atol=1e-6)
    # the initialisation bound is the single layer's: 1/sqrt(39) for every block
    bound = 1 / 39**0.5
    assert net.input_layer.weight.abs().max() <= bound
    assert net.cond_layer.weight.abs().max() <= bound
    assert net.cond_layer.weight.abs().max() > 0.8 * bound


def test_projected_condition_gives_the_same_outputs_and_gradients() -> None:
    torch.manual_seed(0)
    net = ConditionalMLP(action_dim=2, cond_dim=12, hidden_dim=16)
    x, t, cond = torch.randn(4, 2), torch.randn(4), torch.randn(4, 12)
    projected = net.project(cond)
    assert isinstance(projected, ProjectedCondition) and projected.shape == cond.shape
    out_raw = net(x, t, cond) + net(x * 2, t + 1, cond)
    grads_raw = torch.autograd.grad(out_raw.sum(), list(net.parameters()))
    out_proj = net(x, t, projected) + net(x * 2, t + 1, projected)
    grads_proj = torch.autograd.grad(out_proj.sum(), list(net.parameters()))
    torch.testing.assert_close(out_proj, out_raw)
    for a, b in zip(grads_proj, grads_raw, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # another network (an EMA copy with other weights) re-projects: no stale mixing
    other = copy.deepcopy(net)
    with torch.no_grad():
        other.cond_layer.weight.mul_(2)
    torch.testing.assert_close(other(x, t, projected), other(x, t, cond))


def _cp3er_loss(share: bool) -> CP3ERLoss:
    torch.manual_seed(0)
    encoder = TensorDictModule(nn.Identity(), ["observation"], ["features"])
    actor = make_consistency_actor(10, 2, hidden_dim=32)
    critic = MoGCritic(10, 2, feature_dim=8, hidden_dim=32, init_scale=0.1)
    return CP3ERLoss(encoder, actor, critic, share_condition=share)


def test_shared_condition_actor_loss_equals_the_plain_one() -> None:
    gen = torch.Generator().manual_seed(3)
    batch = TensorDict({"observation": torch.randn(32, 10, generator=gen),
                        "action": torch.rand(32, 2, generator=gen) * 2 - 1}, [32])
    results = []
    for share in (False, True):
        loss = _cp3er_loss(share)
        torch.manual_seed(7)
        value, meta = loss.actor_loss(batch, batch["observation"])  # state encoder: identity
        grads = torch.autograd.grad(value, list(loss.actor.parameters()))
        results.append((value, meta, grads))
    (v0, m0, g0), (v1, m1, g1) = results
    torch.testing.assert_close(v1, v0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m1["consistency_loss"], m0["consistency_loss"])
    torch.testing.assert_close(m1["action_spread"], m0["action_spread"])
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_channels_last_encoder_matches_the_default_layout() -> None:
    torch.manual_seed(0)
    plain = PixelEncoder((9, 32, 32))
    fast = PixelEncoder((9, 32, 32), channels_last=True)
    fast.load_state_dict(plain.state_dict())
    pixels = torch.randint(0, 256, (4, 9, 32, 32), dtype=torch.uint8)
    out_plain, out_fast = plain(pixels), fast(pixels)
    torch.testing.assert_close(out_fast, out_plain, rtol=1e-5, atol=1e-5)
    g_plain = torch.autograd.grad(out_plain.square().sum(), list(plain.parameters()))
    g_fast = torch.autograd.grad(out_fast.square().sum(), list(fast.parameters()))
    for a, b in zip(g_fast, g_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_fused_adam_switch_builds_fused_optimisers_taking_the_same_steps() -> None:
    """``perf.fused_adam`` through the agent builder: every optimiser is fused, and 5
    updates of a state agent end at the same parameters as without the switch."""
    from hydra import compose, initialize_config_dir

    from agents.build import build_agent
    from cp3er.config_schema import CONFIG_DIR
    from envs import make_env

    env = make_env("cartpole_balance", "state", seed=0)
    params = []
    for fused in (False, True):
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
            cfg = compose(config_name="config", overrides=[
                "task=cartpole_balance", "obs=state", "hidden_dim=32", "batch_size=16",
                f"perf.fused_adam={str(fused).lower()}"])
        torch.manual_seed(0)
        agent = build_agent(cfg, env)
        assert all(bool(opt.defaults.get("fused")) is fused
                   for opt in agent.optimizers.values())
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            agent.update(_state_batch(env, 16, gen))
        params.append([p.detach().clone() for p in agent.loss.parameters()])
    env.close()
    for a, b in zip(params[1], params[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _state_batch(env, size: int, gen: torch.Generator) -> TensorDict:
    """A replay-shaped batch of random state transitions for ``env``."""
    obs_dim = env.observation_spec["observation"].shape[-1]
    act_dim = env.action_spec.shape[-1]
    obs = torch.randn(size, obs_dim, generator=gen)
    next_obs = obs + 0.1 * torch.randn(size, obs_dim, generator=gen)
    return TensorDict({"observation": obs,
                       "action": torch.rand(size, act_dim, generator=gen) * 2 - 1,
                       "next": {"observation": next_obs,
                                "reward": torch.rand(size, 1, generator=gen),
                                "discount": torch.full((size, 1), 0.97)}}, [size])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_tune_allocator_applies_on_glibc() -> None:
    assert tune_allocator() is True
    assert tune_allocator() is True  # idempotent


def test_compiled_networks_give_the_same_losses_gradients_and_state_dict() -> None:
    """``perf.compile``: same critic/actor losses and gradients as eager from the same
    seeds; parameter names (checkpoints) unchanged."""

    def build() -> CP3ERLoss:
        torch.manual_seed(0)
        encoder = TensorDictModule(PixelEncoder((9, 32, 32)), ["pixels"], ["features"])
        actor = make_consistency_actor(encoder.module.repr_dim, 2, hidden_dim=32)
        critic = MoGCritic(encoder.module.repr_dim, 2, feature_dim=8, hidden_dim=32,
                           init_scale=0.1)
        return CP3ERLoss(encoder, actor, critic)

    gen = torch.Generator().manual_seed(5)
    pixels = torch.randint(0, 256, (8, 9, 32, 32), dtype=torch.uint8, generator=gen)
    batch = TensorDict({"pixels": pixels, "action": torch.rand(8, 2, generator=gen) * 2 - 1,
                        "next": {"pixels": pixels.roll(1, 0), "reward": torch.rand(8, 1),
                                 "discount": torch.full((8, 1), 0.97)}}, [8])
    eager, compiled = build(), build()
    names = list(compiled.state_dict())
    compile_networks(compiled)
    assert list(compiled.state_dict()) == names
    with pytest.raises(ValueError, match=r"perf.compile_mode='fast'.*'reduce-overhead'"):
        compile_networks(build(), "fast")
    counters.clear()
    results = []
    for loss in (eager, compiled):
        torch.manual_seed(11)
        features, next_features = loss.encode_transition(batch)
        critic_value, _ = loss.critic_loss(batch, features, next_features)
        actor_value, _ = loss.actor_loss(batch, features)
        params = list(loss.parameters())
        grads = torch.autograd.grad(critic_value + actor_value, params, allow_unused=True)
        results.append((critic_value, actor_value, grads))
    assert counters["stats"]["unique_graphs"] >= 2  # the conv stack and the actor MLP ran compiled
    (c0, a0, g0), (c1, a1, g1) = results
    torch.testing.assert_close(c1, c0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a1, a0, rtol=1e-4, atol=1e-5)
    for x, y in zip(g1, g0, strict=True):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-5)
