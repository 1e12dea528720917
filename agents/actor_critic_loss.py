"""What the CP3ER and DrQ-v2 objectives share: one TorchRL ``LossModule`` base.

Both read the same replay batch (n-step reward and discount already folded in by
``cp3er.replay``), encode observations with the same DrQ-v2 encoder after the same
random-shift augmentation, train the encoder through the critic loss only, keep a
Polyak target copy of the critic (``convert_to_functional(..., create_target_params=True)``,
moved by TorchRL's ``SoftUpdate``) and update critic first, actor second (DrQ-v2
``update``). Subclasses implement :meth:`critic_loss` and :meth:`actor_loss`.
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
        encoder: ``TensorDictModule`` ``observation -> features`` (its keys set the
            ``observation`` and ``features`` tensor keys).
        actor: ``TensorDictModule`` ``features -> action``.
        critic: ``nn.Module`` ``(features, action) -> ...``, made functional with target
            parameters.
        augmentation: applied to observations before encoding (``RandomShift`` for pixels).
    """

    @dataclass
    class _AcceptedKeys:
        """Keys read from the replay batch; change them with :meth:`set_keys`."""

        observation: NestedKey = "pixels"
        action: NestedKey = "action"
        reward: NestedKey = "reward"
        discount: NestedKey = "discount"
        features: NestedKey = "features"

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
        self.set_keys(observation=encoder.in_keys[0], features=encoder.out_keys[0])

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

    def actor_features(self, tensordict: TensorDictBase) -> torch.Tensor:
        """Detached features for the actor step: those :meth:`critic_loss` stored in the
        batch, or a fresh no-grad encoding when the actor loss runs alone."""
        features = tensordict.get(self.tensor_keys.features, None)
        if features is None:
            with torch.no_grad():
                features = self._encode(tensordict[self.tensor_keys.observation])
        return features.detach()

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

    def critic_loss(self, tensordict: TensorDictBase) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def actor_loss(self, tensordict: TensorDictBase) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    @property
    def update_order(self) -> tuple[str, ...]:
        """Names ``x`` of the ``x_loss`` methods, in the order of an update's steps."""
        return ("critic", "actor")

    def step_losses(self, tensordict: TensorDictBase):
        """``(name, loss, metadata)`` of each step of :attr:`update_order`, computed lazily:
        step ``name``'s optimisers must step before the next loss is computed."""
        for name in self.update_order:
            loss, metadata = getattr(self, f"{name}_loss")(tensordict)
            yield name, loss, metadata

    @dispatch
    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """Every loss (critic first, then the others on its detached features) and metrics."""
        out = {}
        for name, loss, metadata in self.step_losses(tensordict.copy()):
            out.update({f"loss_{name}": loss, **metadata})
        return TensorDict(out, batch_size=[])
