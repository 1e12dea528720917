"""Observation encoders: the DrQ-v2 pixel encoder (Yarats et al. 2021, arXiv 2107.09645;
CP3ER reuses it unchanged) and a vector-state encoder. Both expose ``repr_dim`` and accept
any leading batch dimensions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrl.modules import ConvNet

__all__ = ["PixelEncoder", "StateEncoder", "conv_output_size", "weight_init"]


def weight_init(module: nn.Module) -> None:
    """DrQ-v2's ``utils.weight_init``: orthogonal weights (convs: ReLU gain), zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.orthogonal_(module.weight.data)
        if module.bias is not None:
            module.bias.data.fill_(0.0)
    elif isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.orthogonal_(module.weight.data, nn.init.calculate_gain("relu"))
        if module.bias is not None:
            module.bias.data.fill_(0.0)


def conv_output_size(size: int, kernel_size: int, stride: int, padding: int = 0) -> int:
    """Spatial output size of an (unpadded, undilated) convolution along one axis."""
    return (size + 2 * padding - kernel_size) // stride + 1


class PixelEncoder(nn.Module):
    """DrQ-v2 convolutional encoder: ``x / 255 - 0.5``, ``Conv(3x3, 32, stride 2)``, 3 x
    ``Conv(3x3, 32, stride 1)``, ReLUs, no padding, flattened in (C, H, W) order as DrQ-v2's
    ``h.view``. 9x84x84 stacks give 32x35x35 = 39,200 features (30,368 parameters).

    Args:
        obs_shape: ``(channels, height, width)`` of one observation.
        num_filters: channels of every conv layer (32 in DrQ-v2).
        channels_last: run the convolutions in channels-last memory format (inputs in any
            format; outputs equal up to float rounding).
    """

    def __init__(
        self,
        obs_shape: Sequence[int] = (9, 84, 84),
        num_filters: int = 32,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if len(obs_shape) != 3:
            raise ValueError(f"obs_shape must be (C, H, W), got {tuple(obs_shape)}")
        channels, height, width = (int(v) for v in obs_shape)
        self.obs_shape = (channels, height, width)
        self.channels_last = channels_last
        strides = [2, 1, 1, 1]
        self.convnet = ConvNet(
            in_features=channels,
            num_cells=[num_filters] * len(strides),
            kernel_sizes=3,
            strides=strides,
            activation_class=nn.ReLU,
            activation_kwargs={"inplace": True},  # same values, one tensor less per layer
        )
        for stride in strides:
            height = conv_output_size(height, 3, stride)
            width = conv_output_size(width, 3, stride)
        if height < 1 or width < 1:
            raise ValueError(f"obs_shape {tuple(obs_shape)} is too small for the encoder")
        self.out_shape = (num_filters, height, width)
        self.repr_dim = num_filters * height * width
        self.apply(weight_init)
        if channels_last:
            self.convnet.to(memory_format=torch.channels_last)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """Encode ``[*batch, C, H, W]`` pixels into ``[*batch, repr_dim]`` features."""
        batch = obs.shape[:-3]
        x = obs.reshape(-1, *obs.shape[-3:])
        x = x.to(self.convnet[0].weight.dtype).div(255.0).sub_(0.5)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.convnet(x).reshape(*batch, self.repr_dim)


class StateEncoder(nn.Module):
    """Encoder for vector observations: the identity by default (state runs feed the raw
    state to the trunks), an MLP of ``Linear + activation_class`` with ``hidden_dims``."""

    def __init__(
        self,
        obs_dim: int,
        hidden_dims: Sequence[int] = (),
        activation_class: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        self.obs_dim = int(obs_dim)
        layers: list[nn.Module] = []
        in_dim = self.obs_dim
        for width in hidden_dims:
            layers += [nn.Linear(in_dim, int(width)), activation_class()]
            in_dim = int(width)
        self.net = nn.Sequential(*layers)
        self.repr_dim = in_dim
        self.apply(weight_init)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """Encode ``[*batch, obs_dim]`` states into ``[*batch, repr_dim]`` features."""
        if not obs.is_floating_point():
            obs = obs.float()
        return self.net(obs)
