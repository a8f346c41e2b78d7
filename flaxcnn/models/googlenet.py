"""GoogLeNet (d2l 7.4): the `Inception` block and the network, for 96x96 input."""

from functools import partial

import flax.linen as nn
import jax.numpy as jnp

from flaxcnn.models.layers import (
    Conv,
    Dense,
    Dtype,
    ModuleDef,
    Sequential,
    check_input,
    flatten,
    run_layers,
)
from flaxcnn.ops import concat_channels, global_avg_pool, max_pool


class Inception(nn.Module):
    """Four parallel paths whose outputs are concatenated on the channel axis.

    `c1`..`c4` are the output channels of each path; `c2` and `c3` are pairs (1x1 reduction, then
    the 3x3 or 5x5 convolution).
    """

    c1: int
    c2: tuple[int, int]
    c3: tuple[int, int]
    c4: int
    conv: ModuleDef = Conv

    @nn.compact
    def __call__(self, x):
        conv = self.conv
        # Path 1: a single 1x1 convolution.
        p1 = conv(self.c1, 1, name="p1_1")(x, relu=True)
        # Path 2: 1x1 convolution, then 3x3 convolution.
        p2 = conv(self.c2[0], 1, name="p2_1")(x, relu=True)
        p2 = conv(self.c2[1], 3, padding=1, name="p2_2")(p2, relu=True)
        # Path 3: 1x1 convolution, then 5x5 convolution.
        p3 = conv(self.c3[0], 1, name="p3_1")(x, relu=True)
        p3 = conv(self.c3[1], 5, padding=2, name="p3_2")(p3, relu=True)
        # Path 4: 3x3 max-pool, then 1x1 convolution.
        p4 = max_pool(x, kernel_size=3, strides=1, padding=1)
        p4 = conv(self.c4, 1, name="p4_2")(p4, relu=True)
        return concat_channels((p1, p2, p3, p4))


class GoogLeNet(nn.Module):
    num_classes: int = 10
    dtype: Dtype = jnp.float32

    min_side = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_input(x, self.min_side, "GoogLeNet")
        conv = partial(Conv, dtype=self.dtype, parent=None)
        inception = partial(Inception, conv=partial(Conv, dtype=self.dtype), parent=None)
        pool = partial(max_pool, kernel_size=3, strides=2, padding=1)
        b1 = Sequential([conv(64, 7, strides=2, padding=3), nn.relu, pool])
        b2 = Sequential([
            conv(64, 1), nn.relu,
            conv(192, 3, padding=1), nn.relu,
            pool,
        ])
        b3 = nn.Sequential([
            inception(64, (96, 128), (16, 32), 32),
            inception(128, (128, 192), (32, 96), 64),
            pool,
        ])
        b4 = nn.Sequential([
            inception(192, (96, 208), (16, 48), 64),
            inception(160, (112, 224), (24, 64), 64),
            inception(128, (128, 256), (24, 64), 64),
            inception(112, (144, 288), (32, 64), 64),
            inception(256, (160, 320), (32, 128), 128),
            pool,
        ])
        b5 = nn.Sequential([
            inception(256, (160, 320), (32, 128), 128),
            inception(384, (192, 384), (48, 128), 128),
            global_avg_pool, flatten,
        ])
        layers = [
            ("Sequential", b1), ("Sequential", b2), ("Sequential", b3), ("Sequential", b4),
            ("Sequential", b5),
            ("Linear", Dense(self.num_classes, dtype=self.dtype)),
        ]
        return run_layers(self, layers, x).astype(jnp.float32)
