"""DenseNet (d2l 7.7): `conv_block`, `DenseBlock`, `transition_block` and the network."""

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
    concat_relu,
    flatten,
    module_class,
    run_layers,
    takes_parts,
)
from flaxcnn.models.resnet import batch_norm_layer, stem
from flaxcnn.ops import avg_pool, concat_channels, global_avg_pool


def conv_block(num_channels, conv=Conv, norm=BatchNorm2d):
    """The pre-activation order ResNet later adopted: BN, ReLU, 3x3 convolution. Given a list
    of feature maps (`DenseBlock`), `BatchNorm2d` normalises each and `concat_relu` joins them."""
    return nn.Sequential([
        norm(parent=None), concat_relu, conv(num_channels, 3, padding=1, parent=None),
    ])


class DenseBlock(nn.Module):
    """`num_convs` conv blocks, each one's output concatenated onto its input on the channel
    axis, so the block adds `num_convs * num_channels` channels.

    The book concatenates before each conv block (`X = torch.cat((X, Y), dim=1)`). With
    `BatchNorm2d` the block hands the conv blocks the list of feature maps instead: in training
    each map's batch statistics are then computed once, not by every later layer, and
    DenseNet trains 1.01-1.05x faster on a CPU (benchmarks/xla_cpu_study.md). The values are
    the same."""

    num_convs: int
    num_channels: int
    conv: ModuleDef = Conv
    norm: ModuleDef = BatchNorm2d

    @nn.compact
    def __call__(self, X):
        if not takes_parts(self.norm):
            for _ in range(self.num_convs):
                Y = conv_block(self.num_channels, self.conv, self.norm)(X)
                X = concat_channels((X, Y))
            return X
        features = [X]
        for _ in range(self.num_convs):
            features.append(conv_block(self.num_channels, self.conv, self.norm)(features))
        return concat_channels(features)


class PooledConv(Conv):
    """A `Conv` on its input average-pooled 2x2 with stride 2: the transition block's
    convolution and pool in the other order. A 1x1 convolution (bias included) and an average
    pool are linear maps on different axes, so they commute: the same function, with the
    convolution's products on a quarter of the positions."""

    def __call__(self, x, relu: bool = False):
        return super().__call__(avg_pool(x, kernel_size=2, strides=2), relu)


def transition_block(num_channels, conv=Conv, norm=BatchNorm2d, pool_first=True):
    """A 1x1 convolution to `num_channels` and a stride-2 average pool: keeps the model small.

    `pool_first` (with `Conv`): the pool runs before the convolution (`PooledConv`, same
    variables), which makes DenseNet's training step about 1.08x and its inference 1.05-1.10x
    faster on a CPU (benchmarks/xla_cpu_study.md); False keeps the book's order and rounding."""
    if pool_first and module_class(conv) is Conv:
        pooled = partial(PooledConv, *conv.args, **conv.keywords) if isinstance(
            conv, partial) else PooledConv
        return nn.Sequential([norm(parent=None), nn.relu, pooled(num_channels, 1, parent=None)])
    return nn.Sequential([
        norm(parent=None), nn.relu, conv(num_channels, 1, parent=None),
        partial(avg_pool, kernel_size=2, strides=2),
    ])


class DenseNet(nn.Module):
    num_convs_in_dense_blocks: tuple = (4, 4, 4, 4)
    growth_rate: int = 32
    num_classes: int = 10
    dtype: Dtype = jnp.float32
    pool_first: bool = True  # transition_block's: pool before its 1x1 convolution

    min_side = 29

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_input(x, self.min_side, "DenseNet")
        conv = partial(Conv, dtype=self.dtype)
        norm = batch_norm_layer(train, self.dtype)
        layers = [("Sequential", stem(conv, norm))]
        # num_channels: the current number of channels.
        num_channels = 64
        blocks = self.num_convs_in_dense_blocks
        for i, num_convs in enumerate(blocks):
            layers.append(("DenseBlock", DenseBlock(num_convs, self.growth_rate, conv, norm)))
            # The number of output channels of the previous dense block.
            num_channels += num_convs * self.growth_rate
            # A transition block that halves the channels between dense blocks.
            if i != len(blocks) - 1:
                num_channels //= 2
                layers.append(("Sequential", transition_block(num_channels, conv, norm,
                                                              self.pool_first)))
        layers += [
            ("BatchNorm2d", norm()), ("ReLU", nn.relu),
            ("AdaptiveAvgPool2d", global_avg_pool), ("Flatten", flatten),
            ("Linear", Dense(self.num_classes, dtype=self.dtype)),
        ]
        return run_layers(self, layers, x).astype(jnp.float32)
