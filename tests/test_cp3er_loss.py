"""CP3ER LossModule: outputs, gradient isolation, target updates, terminal handling, seeds."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict
from tensordict.nn import TensorDictModule
from torchrl.objectives import SoftUpdate

from agents.augment import RandomShift
from agents.consistency_policy import CP3ERLoss, make_consistency_actor, make_denoiser, make_policy
from agents.critic import MoGCritic
from agents.encoder import PixelEncoder, StateEncoder
from cp3er.consistency import ConsistencyDistillationLoss

OBS_DIM, ACTION_DIM, BATCH = 6, 2, 16


def _state_loss(seed: int = 0, lambda_consistency: float = 0.05, distillation: bool = False):
    torch.manual_seed(seed)
    encoder = TensorDictModule(StateEncoder(OBS_DIM, hidden_dims=(16,)), ["observation"],
                               ["features"])
    actor = make_consistency_actor(16, ACTION_DIM, hidden_dim=32)
    critic = MoGCritic(16, ACTION_DIM, feature_dim=8, hidden_dim=32, init_scale=0.1)
    consistency_loss = None
    if distillation:
        teacher = make_denoiser(16, ACTION_DIM, hidden_dim=32)
        consistency_loss = ConsistencyDistillationLoss(teacher, solver="heun")
    loss = CP3ERLoss(encoder, actor, critic, lambda_consistency=lambda_consistency,
                     consistency_loss=consistency_loss)
    updater = SoftUpdate(loss, tau=0.1)
    return loss, updater


def _state_batch(seed: int = 1, discount: float = 0.97) -> TensorDict:
    gen = torch.Generator().manual_seed(seed)
    return TensorDict(
        {
            "observation": torch.randn(BATCH, OBS_DIM, generator=gen),
            "action": torch.rand(BATCH, ACTION_DIM, generator=gen) * 2 - 1,
            "next": {
                "observation": torch.randn(BATCH, OBS_DIM, generator=gen),
                "reward": torch.randn(BATCH, 1, generator=gen),
                "discount": torch.full((BATCH, 1), discount),
            },
        },
        [BATCH],
    )


def _grads(module: torch.nn.Module) -> list[torch.Tensor | None]:
    return [p.grad for p in module.parameters()]


def _nonzero(grads) -> bool:
    return any(g is not None and g.abs().sum() > 0 for g in grads)


def test_forward_keys_and_finite_scalars() -> None:
    loss, _ = _state_loss()
    out = loss(_state_batch())
    for key in ("loss_critic", "loss_actor", "q_mean", "target_mean", "critic_std", "actor_q",
                "consistency_loss", "action_spread", "action_bound_frac"):
        assert key in out.keys(), key
        assert out[key].shape == () and torch.isfinite(out[key])
    assert out["action_spread"] > 0  # a stochastic policy
    assert 0 <= out["action_bound_frac"] <= 1
    assert not out["q_mean"].requires_grad


def test_actor_loss_touches_only_the_actor() -> None:
    loss, _ = _state_loss()
    batch = _state_batch()
    features, _ = loss.encode_transition(batch)  # with gradient: the actor loss detaches
    loss_actor, _ = loss.actor_loss(batch, features)
    loss_actor.backward()
    assert _nonzero(_grads(loss.actor))
    assert not _nonzero(_grads(loss.encoder)), "actor loss must not train the encoder"
    assert all(p.grad is None for p in loss.critic_params.values(True, True))
    assert all(p.grad is None for p in loss.target_critic_params.values(True, True))


def test_critic_loss_touches_critic_and_encoder_not_actor() -> None:
    loss, _ = _state_loss()
    batch = _state_batch()
    loss_critic, _ = loss.critic_loss(batch, *loss.encode_transition(batch))
    loss_critic.backward()
    assert _nonzero([p.grad for p in loss.critic_params.values(True, True)])
    assert _nonzero(_grads(loss.encoder))
    assert not _nonzero(_grads(loss.actor))
    assert all(p.grad is None for p in loss.target_critic_params.values(True, True))


def test_pixel_encoder_gets_gradients_from_the_critic_only() -> None:
    torch.manual_seed(0)
    encoder = TensorDictModule(PixelEncoder((9, 84, 84)), ["pixels"], ["features"])
    actor = make_consistency_actor(encoder.module.repr_dim, ACTION_DIM, hidden_dim=32,
                                   trunk_dim=16)
    critic = MoGCritic(encoder.module.repr_dim, ACTION_DIM, feature_dim=8, hidden_dim=32)
    loss = CP3ERLoss(encoder, actor, critic, augmentation=RandomShift(4))
    pixels = torch.randint(0, 256, (4, 9, 84, 84), dtype=torch.uint8)
    batch = TensorDict({"pixels": pixels, "action": torch.rand(4, ACTION_DIM) * 2 - 1,
                        "next": {"pixels": pixels.flip(0), "reward": torch.ones(4, 1),
                                 "discount": torch.full((4, 1), 0.99)}}, [4])
    features, next_features = loss.encode_transition(batch)
    loss_actor, _ = loss.actor_loss(batch, features)
    loss_actor.backward(retain_graph=True)
    assert not _nonzero(_grads(encoder))
    loss_critic, _ = loss.critic_loss(batch, features, next_features)
    loss_critic.backward()
    assert _nonzero(_grads(encoder))
    policy = make_policy(encoder, actor)
    action = policy(TensorDict({"pixels": pixels}, [4]))["action"]
    assert action.shape == (4, ACTION_DIM) and action.abs().max() <= 1


def test_distillation_teacher_is_trained_by_its_own_loss_only() -> None:
    """With a distillation regulariser the actor loss reaches the actor only (the teacher's
    ODE step runs without gradient) and the teacher's denoising loss the teacher only."""
    loss, _ = _state_loss(distillation=True)
    batch = _state_batch()
    features, _ = loss.encode_transition(batch)
    loss_actor, _ = loss.actor_loss(batch, features)
    loss_actor.backward()
    assert _nonzero(_grads(loss.actor))
    assert all(p.grad is None for p in loss.teacher.parameters()), "actor loss reached teacher"
    assert not _nonzero(_grads(loss.encoder))
    assert all(p.grad is None for p in loss.critic_params.values(True, True))
    loss.zero_grad(set_to_none=True)
    loss_teacher, _ = loss.teacher_loss(batch, features)
    loss_teacher.backward()
    assert _nonzero(_grads(loss.teacher))
    assert all(p.grad is None for p in loss.actor.parameters())
    assert all(p.grad is None for p in loss.encoder.parameters())
    assert all(p.grad is None for p in loss.critic_params.values(True, True))
    out = loss(_state_batch())
    assert torch.isfinite(out["loss_teacher"]) and torch.isfinite(out["loss_actor"])
    plain, _ = _state_loss()
    assert plain.teacher is None and "loss_teacher" not in plain(_state_batch()).keys()
    with pytest.raises(ValueError, match="no teacher"):
        plain.teacher_loss(batch, features)


def test_target_moves_only_through_the_soft_update() -> None:
    loss, updater = _state_loss()
    target_before = loss.target_critic_params.clone()
    online_before = loss.critic_params.clone()
    optimizer = torch.optim.SGD(list(loss.critic_params.values(True, True)), lr=0.1)
    batch = _state_batch()
    loss_critic, _ = loss.critic_loss(batch, *loss.encode_transition(batch))
    loss_critic.backward()
    optimizer.step()
    assert (loss.target_critic_params == target_before).all(), "optimiser moved the target"
    assert not (loss.critic_params == online_before).all()
    updater.step()
    expected = target_before.apply(lambda t, o: 0.9 * t + 0.1 * o, loss.critic_params)
    torch.testing.assert_close(loss.target_critic_params.to_dict(), expected.to_dict())


def test_termination_cuts_bootstrapping_and_truncation_does_not() -> None:
    """discount = 0 (terminated): y = r exactly, whatever the target critic says;
    discount > 0 (time-limit truncation): y depends on the target critic."""
    loss, _ = _state_loss()
    terminal = _state_batch(discount=0.0)
    def critic_metrics(batch):
        return loss.critic_loss(batch, *loss.encode_transition(batch))[1]

    meta = critic_metrics(terminal)
    torch.testing.assert_close(meta["target_mean"], terminal["next", "reward"].mean())
    truncated = _state_batch(discount=0.97)
    before = critic_metrics(truncated)
    loss.target_critic_params.apply_(lambda p: p.data.add_(0.5))  # shift the target critic
    after_trunc = critic_metrics(truncated)
    after_term = critic_metrics(terminal)
    assert abs(float(after_trunc["target_mean"] - before["target_mean"])) > 1e-3
    torch.testing.assert_close(after_term["target_mean"], terminal["next", "reward"].mean())


def test_same_seed_same_losses_and_lambda_scales_consistency_term() -> None:
    batch = _state_batch()
    outs = []
    for _ in range(2):
        loss, _ = _state_loss(seed=3)
        torch.manual_seed(11)
        outs.append(loss(batch.clone()))
    torch.testing.assert_close(outs[0]["loss_critic"], outs[1]["loss_critic"])
    torch.testing.assert_close(outs[0]["loss_actor"], outs[1]["loss_actor"])
    # loss_actor = -Q + lambda * L_c: with the same draws, lambda=0 removes exactly that term
    loss0, _ = _state_loss(seed=3, lambda_consistency=0.0)
    torch.manual_seed(11)
    out0 = loss0(batch.clone())
    expected = out0["loss_actor"] + 0.05 * outs[0]["consistency_loss"]
    torch.testing.assert_close(outs[0]["loss_actor"], expected, rtol=1e-5, atol=1e-6)


def test_set_keys_renames_the_inputs() -> None:
    loss, _ = _state_loss()
    loss.set_keys(action="act")
    batch = _state_batch()
    batch.rename_key_("action", "act")
    out = loss(batch)
    assert torch.isfinite(out["loss_actor"])
    with pytest.raises(KeyError):
        loss(_state_batch())
