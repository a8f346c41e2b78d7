"""Network in network (d2l 7.3): `nin_block` and NiN."""

from functools import partial

import flax.linen as nn
import jax.numpy as jnp

from flaxcnn.models.layers import Conv, Dtype, Sequential, check_input, flatten, run_layers
from flaxcnn.ops import global_avg_pool, max_pool


def nin_block(out_channels: int, kernel_size: int, strides: int, padding: int, conv=Conv):
    """A convolution followed by two 1x1 convolutions: per-pixel fully connected layers."""
    conv = partial(conv, parent=None)
    return Sequential([
        conv(out_channels, kernel_size, strides=strides, padding=padding), nn.relu,
        conv(out_channels, 1), nn.relu,
        conv(out_channels, 1), nn.relu,
    ])


class NiN(nn.Module):
    num_classes: int = 10
    dropout_rate: float = 0.5
    dtype: Dtype = jnp.float32

    min_side = 67

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_input(x, self.min_side, "NiN")
        conv = partial(Conv, dtype=self.dtype)
        pool = partial(max_pool, kernel_size=3, strides=2)
        layers = [
            ("Sequential", nin_block(96, 11, 4, 0, conv)), ("MaxPool2d", pool),
            ("Sequential", nin_block(256, 5, 1, 2, conv)), ("MaxPool2d", pool),
            ("Sequential", nin_block(384, 3, 1, 1, conv)), ("MaxPool2d", pool),
            ("Dropout", nn.Dropout(self.dropout_rate, deterministic=not train)),
            # The last block has one channel per class; no fully connected layer at all.
            ("Sequential", nin_block(self.num_classes, 3, 1, 1, conv)),
            ("AdaptiveAvgPool2d", global_avg_pool),
            ("Flatten", flatten),
        ]
        return run_layers(self, layers, x).astype(jnp.float32)
