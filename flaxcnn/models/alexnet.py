"""AlexNet (d2l 7.1), for 1-channel 224x224 Fashion-MNIST."""

from functools import partial

import flax.linen as nn
import jax.numpy as jnp

from flaxcnn.models.layers import Conv, Dense, Dtype, check_input, flatten, run_layers
from flaxcnn.ops import max_pool


class AlexNet(nn.Module):
    num_classes: int = 10
    dropout_rate: float = 0.5
    dtype: Dtype = jnp.float32

    min_side = 65

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_input(x, self.min_side, "AlexNet")
        conv = partial(Conv, dtype=self.dtype)
        dense = partial(Dense, dtype=self.dtype)
        dropout = partial(nn.Dropout, self.dropout_rate, deterministic=not train)
        pool = partial(max_pool, kernel_size=3, strides=2)
        layers = [
            # A large 11x11 window to capture objects, stride 4 to shrink the output quickly.
            ("Conv2d", conv(96, 11, strides=4, padding=1)), ("ReLU", nn.relu),
            ("MaxPool2d", pool),
            ("Conv2d", conv(256, 5, padding=2)), ("ReLU", nn.relu),
            ("MaxPool2d", pool),
            ("Conv2d", conv(384, 3, padding=1)), ("ReLU", nn.relu),
            ("Conv2d", conv(384, 3, padding=1)), ("ReLU", nn.relu),
            ("Conv2d", conv(256, 3, padding=1)), ("ReLU", nn.relu),
            ("MaxPool2d", pool),
            ("Flatten", flatten),
            ("Linear", dense(4096)), ("ReLU", nn.relu), ("Dropout", dropout()),
            ("Linear", dense(4096)), ("ReLU", nn.relu), ("Dropout", dropout()),
            ("Linear", dense(self.num_classes)),
        ]
        return run_layers(self, layers, x).astype(jnp.float32)
