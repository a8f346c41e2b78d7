"""Residual networks (d2l 7.6): `Residual`, `resnet_block` and ResNet-18."""

from functools import partial

import flax.linen as nn
import jax.numpy as jnp

from flaxcnn.models.layers import (
    BatchNorm2d,
    Conv,
    Dense,
    Dtype,
    ModuleDef,
    check_input,
    flatten,
    run_layers,
)
from flaxcnn.ops import global_avg_pool, max_pool


class Residual(nn.Module):
    """Two 3x3 convolutions with batch norm, added to the input (through a strided 1x1
    convolution when the shape changes), then ReLU."""

    num_channels: int
    use_1x1conv: bool = False
    strides: int = 1
    conv: ModuleDef = Conv
    norm: ModuleDef = BatchNorm2d

    @nn.compact
    def __call__(self, X):
        conv, norm = self.conv, self.norm
        Y = conv(self.num_channels, 3, strides=self.strides, padding=1, name="conv1")(X)
        Y = nn.relu(norm(name="bn1")(Y))
        Y = norm(name="bn2")(conv(self.num_channels, 3, padding=1, name="conv2")(Y))
        if self.use_1x1conv:
            X = conv(self.num_channels, 1, strides=self.strides, name="conv3")(X)
        Y += X
        return nn.relu(Y)


def resnet_block(num_channels, num_residuals, first_block=False, conv=Conv, norm=BatchNorm2d):
    """`num_residuals` residual blocks; all but the first stage halve the side and change the
    channel count in their first block."""
    blk = []
    for i in range(num_residuals):
        if i == 0 and not first_block:
            blk.append(Residual(num_channels, True, 2, conv, norm, parent=None))
        else:
            blk.append(Residual(num_channels, conv=conv, norm=norm, parent=None))
    return nn.Sequential(blk)


def stem(conv, norm):
    """The 7x7 stride-2 convolution and 3x3 stride-2 max-pool that ResNet and DenseNet share.
    The pool keeps XLA's ops on a CPU, which fuse the BatchNorm and ReLU into it
    (`ops.max_pool`'s cpu_kernels)."""
    return nn.Sequential([
        conv(64, 7, strides=2, padding=3, parent=None), norm(parent=None), nn.relu,
        partial(max_pool, kernel_size=3, strides=2, padding=1, cpu_kernels=False),
    ])


def batch_norm_layer(train: bool, dtype: Dtype):
    """`nn.BatchNorm2d` in training or evaluation mode (`layers.BatchNorm2d`: PyTorch's momentum
    and epsilon, two-pass variance)."""
    return partial(BatchNorm2d, use_running_average=not train, dtype=dtype)


class ResNet18(nn.Module):
    num_classes: int = 10
    dtype: Dtype = jnp.float32

    min_side = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_input(x, self.min_side, "ResNet-18")
        conv = partial(Conv, dtype=self.dtype)
        norm = batch_norm_layer(train, self.dtype)
        block = partial(resnet_block, conv=conv, norm=norm)
        layers = [
            ("Sequential", stem(conv, norm)),
            ("Sequential", block(64, 2, first_block=True)),
            ("Sequential", block(128, 2)),
            ("Sequential", block(256, 2)),
            ("Sequential", block(512, 2)),
            ("AdaptiveAvgPool2d", global_avg_pool),
            ("Flatten", flatten),
            ("Linear", Dense(self.num_classes, dtype=self.dtype)),
        ]
        return run_layers(self, layers, x).astype(jnp.float32)
