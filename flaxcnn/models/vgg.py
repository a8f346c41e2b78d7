"""VGG (d2l 7.2): `vgg_block`, VGG-11 and the trained small VGG (channels divided by 4)."""

from functools import partial

import flax.linen as nn
import jax.numpy as jnp

from flaxcnn.models.layers import (
    Conv,
    Dense,
    Dtype,
    Sequential,
    check_input,
    flatten,
    run_layers,
)
from flaxcnn.ops import max_pool

# VGG-11: (number of convolutions, output channels) per block.
conv_arch = ((1, 64), (1, 128), (2, 256), (2, 512), (2, 512))


def vgg_block(num_convs: int, out_channels: int, conv=Conv):
    """`num_convs` 3x3 convolutions with ReLU, then a 2x2 max-pool that halves the side."""
    conv = partial(conv, parent=None)
    layers = []
    for _ in range(num_convs):
        layers += [conv(out_channels, 3, padding=1), nn.relu]
    layers.append(partial(max_pool, kernel_size=2, strides=2))
    return Sequential(layers)


class VGG(nn.Module):
    conv_arch: tuple = conv_arch
    num_classes: int = 10
    dropout_rate: float = 0.5
    dtype: Dtype = jnp.float32

    @property
    def min_side(self):
        return 2 ** len(self.conv_arch)

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_input(x, self.min_side, "VGG")
        conv = partial(Conv, dtype=self.dtype)
        dense = partial(Dense, dtype=self.dtype)
        dropout = partial(nn.Dropout, self.dropout_rate, deterministic=not train)
        layers = [("Sequential", vgg_block(n, c, conv)) for n, c in self.conv_arch]
        layers += [
            ("Flatten", flatten),
            # The fully connected part keeps the 4096 width even when the channels shrink.
            ("Linear", dense(4096)), ("ReLU", nn.relu), ("Dropout", dropout()),
            ("Linear", dense(4096)), ("ReLU", nn.relu), ("Dropout", dropout()),
            ("Linear", dense(self.num_classes)),
        ]
        return run_layers(self, layers, x).astype(jnp.float32)


def small_conv_arch(ratio: int = 4):
    """The book trains VGG-11 with every block's channels divided by `ratio`."""
    return tuple((n, c // ratio) for n, c in conv_arch)
