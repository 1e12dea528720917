"""The ``LossModule`` base CP3ER and DrQ-v2 share: encoder, actor, critic and its Polyak
target (moved by TorchRL's ``SoftUpdate``). The encoder learns through the critic loss only;
critic step first, actor step second (DrQ-v2's ``update``; :meth:`agents.agent.Agent.update`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tensordict import TensorDict, TensorDictBase, TensorDictParams
from tensordict.nn import TensorDictModule, dispatch
from tensordict.utils import NestedKey
from torch import nn
from torchrl.objectives import LossModule


class EncoderActorCriticLoss(LossModule):
    """Base of the agents' losses: encoder + actor + critic with a target critic.

    Args:
        encoder: ``TensorDictModule`` ``observation -> features`` (its in_key sets the
            ``observation`` tensor key).
        actor: ``TensorDictModule`` ``features -> action``.
        critic: ``nn.Module`` ``(features, action) -> ...`` (given a target copy).
        augmentation: applied to observations before encoding (``RandomShift`` for pixels).
    """

    @dataclass
    class _AcceptedKeys:
        """Keys read from the replay batch; change them with :meth:`set_keys`."""

        observation: NestedKey = "pixels"
        action: NestedKey = "action"
        reward: NestedKey = "reward"
        discount: NestedKey = "discount"

    tensor_keys: _AcceptedKeys
    default_keys = _AcceptedKeys
    out_keys = ("loss_critic", "loss_actor")
    critic_params: TensorDictParams
    target_critic_params: TensorDictParams

    def __init__(
        self,
        encoder: TensorDictModule,
        actor: TensorDictModule,
        critic: nn.Module,
        *,
        augmentation: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.actor = actor
        self.convert_to_functional(critic, "critic", create_target_params=True)
        self.augmentation = augmentation
        self.set_keys(observation=encoder.in_keys[0])

    def _encode(self, observation: torch.Tensor) -> torch.Tensor:
        if self.augmentation is not None:
            observation = self.augmentation(observation)
        return self.encoder.module(observation)

    def encode_transition(self, tensordict: TensorDictBase) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features, next_features)``: the first with gradient (the encoder learns
        through the critic), the second without (DrQ-v2 ``update``)."""
        keys = self.tensor_keys
        features = self._encode(tensordict[keys.observation])
        with torch.no_grad():
            next_features = self._encode(tensordict[("next", keys.observation)])
        return features, next_features

    def td_target_inputs(self, tensordict: TensorDictBase) -> tuple[torch.Tensor, torch.Tensor]:
        """``(reward, discount)`` of the batch: n-step discounted reward, ``gamma^n`` times
        non-termination (terminations cut bootstrapping, truncations do not)."""
        keys = self.tensor_keys
        return tensordict[("next", keys.reward)], tensordict[("next", keys.discount)]

    def _forward_value_estimator_keys(self, **kwargs) -> None:  # no value estimator
        pass

    @property
    def in_keys(self) -> list[NestedKey]:
        keys = self.tensor_keys
        return [keys.observation, keys.action, ("next", keys.observation),
                ("next", keys.reward), ("next", keys.discount)]

    @property
    def teacher(self) -> nn.Module | None:
        """A module trained by its own :meth:`teacher_loss` step (CP3ER distillation's
        diffusion teacher), else ``None``."""
        return None

    def after_actor_step(self, metrics: dict[str, torch.Tensor]) -> None:
        """State moved after each actor step from its ``metrics`` (CP3ER: the EMA target,
        the adaptive lambda); none here."""

    def critic_loss(self, tensordict: TensorDictBase, features: torch.Tensor,
                    next_features: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """``(loss, metrics)`` of the critic on :meth:`encode_transition`'s features."""
        raise NotImplementedError

    def actor_loss(self, tensordict: TensorDictBase, features: torch.Tensor
                   ) -> tuple[torch.Tensor, dict]:
        """``(loss, metrics)`` of the actor on detached features and critic parameters."""
        raise NotImplementedError

    def teacher_loss(self, tensordict: TensorDictBase, features: torch.Tensor
                     ) -> tuple[torch.Tensor, dict]:
        raise ValueError(f"{type(self).__name__} has no teacher to train")

    @dispatch
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """Every loss and metric on one encoding of the batch, TorchRL-style; training steps
        them one by one instead (:meth:`agents.agent.Agent.update`: the actor sees the
        updated critic)."""
        features, next_features = self.encode_transition(tensordict)
        loss, metrics = self.critic_loss(tensordict, features, next_features)
        out = {"loss_critic": loss, **metrics}
        steps = ("actor",) if self.teacher is None else ("teacher", "actor")
        for name in steps:
            loss, metrics = getattr(self, f"{name}_loss")(tensordict, features.detach())
            out.update({f"loss_{name}": loss, **metrics})
        return TensorDict(out, batch_size=[])
