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
    relu_parts,
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
    the same. `keep_parts`: the block returns that list, for a transition block that pools each
    map before joining them (`transition_block`), rather than the maps' concatenation."""

    num_convs: int
    num_channels: int
    conv: ModuleDef = Conv
    norm: ModuleDef = BatchNorm2d
    keep_parts: bool = False

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
        return features if self.keep_parts else concat_channels(features)


class PooledConv(Conv):
    """A `Conv` on its input average-pooled 2x2 with stride 2: the transition block's
    convolution and pool in the other order. A 1x1 convolution (bias included) and an average
    pool are linear maps on different axes, so they commute: the same function, with the
    convolution's products on a quarter of the positions. Given a list of maps (a `DenseBlock`'s
    with `keep_parts`), each is pooled before they are joined: a quarter of the concatenation."""

    def __call__(self, x, relu: bool = False):
        parts = x if isinstance(x, list) else [x]
        x = concat_channels([avg_pool(p, kernel_size=2, strides=2) for p in parts])
        return super().__call__(x, relu)


# DenseNet's dense blocks hand their transition blocks the list of feature maps (`keep_parts`),
# and those normalise, ReLU and pool each map before joining them, in evaluation too
# (`BatchNorm2d(eval_parts=True)`): training 1.08-1.10x faster on a CPU at batch 32 and 128,
# inference 1.01-1.02x, paired (benchmarks/xla_cpu_study.md, "The Zen 4, session 31"). The
# arms `block-concat` and `eval-concat` set these False: the block's maps concatenated at its
# end, as before 2026-12-03 evening; the transition's BatchNorm on their concatenation in
# evaluation.
_TRANSITION_PARTS = True
_TRANSITION_EVAL_PARTS = True


def transition_block(num_channels, conv=Conv, norm=BatchNorm2d, pool_first=True):
    """A 1x1 convolution to `num_channels` and a stride-2 average pool: keeps the model small.

    `pool_first` (with `Conv`): the pool runs before the convolution (`PooledConv`, same
    variables), which makes DenseNet's training step about 1.08x and its inference 1.05-1.10x
    faster on a CPU (benchmarks/xla_cpu_study.md); False keeps the book's order and rounding.
    There the block also takes a `DenseBlock`'s list of feature maps (`keep_parts`) and pools
    each before joining them."""
    if pool_first and module_class(conv) is Conv:
        pooled = partial(PooledConv, *conv.args, **conv.keywords) if isinstance(
            conv, partial) else PooledConv
        bn = (norm(parent=None, eval_parts=_TRANSITION_EVAL_PARTS) if takes_parts(norm)
              else norm(parent=None))
        return nn.Sequential([bn, relu_parts, pooled(num_channels, 1, parent=None)])
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
            # (a list of feature maps for a transition that pools each: transition_block)
            keep = (i != len(blocks) - 1 and self.pool_first and takes_parts(norm)
                    and _TRANSITION_PARTS)
            layers.append(("DenseBlock", DenseBlock(num_convs, self.growth_rate, conv, norm,
                                                    keep_parts=keep)))
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
