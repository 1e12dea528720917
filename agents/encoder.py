"""Observation encoders: the DrQ-v2 pixel encoder and a vector-state encoder.

Both expose ``repr_dim`` (the size of the feature vector they emit) and accept any
number of leading batch dimensions, so agents can be built from env specs without
caring which observation type they read.

References:
    Yarats, Fergus, Lazaric, Pinto (2021), "Mastering Visual Continuous Control:
    Improved Data-Augmented Reinforcement Learning" (DrQ-v2), arXiv 2107.09645.
    CP3ER (arXiv 2410.00051) reuses this encoder unchanged and trains it through
    the critic loss only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchrl.modules import ConvNet

__all__ = ["PixelEncoder", "StateEncoder", "conv_output_size", "weight_init"]


def weight_init(module: nn.Module) -> None:
    """DrQ-v2 initialisation, for use with ``module.apply(weight_init)``.

    Linear: orthogonal weights; Conv2d / ConvTranspose2d: orthogonal weights with
    the ReLU gain (sqrt 2); all biases zero. Other modules are left untouched.
    (DrQ-v2, ``utils.weight_init``.)
    """
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
    """DrQ-v2 convolutional encoder (Yarats et al. 2021).

    ``Conv(3x3, 32, stride 2)`` then 3 x ``Conv(3x3, 32, stride 1)``, a ReLU after
    each, no padding, and the output flattened in (channel, height, width) order,
    exactly like DrQ-v2's ``h.view(h.shape[0], -1)``. Pixels are scaled as
    ``x / 255 - 0.5`` first. For 9x84x84 frame stacks that gives 32x35x35 = 39,200
    features and 30,368 parameters. The conv stack is TorchRL's ``ConvNet`` (the
    same layers, in the same order, plus a ``SquashDims`` flatten), re-initialised
    with :func:`weight_init`.

    Args:
        obs_shape: ``(channels, height, width)`` of one observation, e.g. ``(9, 84, 84)``.
        num_filters: channels of every conv layer (32 in DrQ-v2).
        channels_last: keep the conv weights and activations in channels-last memory
            format. Inputs in any memory format are accepted either way (an HWC frame
            permuted to CHW already is channels-last); this only changes the layout
            the convolutions run in. Outputs are identical up to float rounding.

    Shapes:
        input ``[*batch, C, H, W]``, uint8 pixels in [0, 255] or floats on that scale;
        output ``[*batch, repr_dim]`` float32 (the conv weights' dtype).

    Examples:
        >>> enc = PixelEncoder((9, 84, 84))
        >>> enc(torch.zeros(2, 9, 84, 84, dtype=torch.uint8)).shape
        torch.Size([2, 39200])
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
    """Encoder for vector observations, the counterpart of :class:`PixelEncoder`.

    Identity by default (DrQ-v2 / CP3ER state-based runs feed the raw state to the
    actor and critic trunks); with ``hidden_dims`` it is an MLP of
    ``Linear + activation`` layers initialised with :func:`weight_init`.

    Args:
        obs_dim: size of the observation vector.
        hidden_dims: widths of the MLP layers; empty for the identity.
        activation_class: activation after every MLP layer.

    Shapes:
        input ``[*batch, obs_dim]`` (any dtype); output ``[*batch, repr_dim]`` float.
    """

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
