"""Batch normalisation (d2l 7.5): the notes' from-scratch `batch_norm` and `BatchNorm`, and LeNet
with either it or `flax.linen.BatchNorm`.

Running statistics live in the `batch_stats` collection. Both layers track the *biased* batch
variance, as the book's scratch layer does; PyTorch's built-in `nn.BatchNorm2d` tracks the
unbiased one (times m/(m-1), m = the number of values per channel), which `flaxcnn.porting`
accounts for when comparing.
"""

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxcnn.models.layers import Conv, Dense, Dtype, check_input, flatten, run_layers
from flaxcnn.ops import avg_pool


def batch_norm(X, gamma, beta, moving_mean, moving_var, eps, momentum, train):
    """The book's `batch_norm`, with `train` in place of `torch.is_grad_enabled()`.

    Returns (Y, moving_mean, moving_var). Statistics are per channel: over (N,) for dense input
    (N, C) and over (N, H, W) for NHWC input (d2l's JAX version wrongly reduces over (0, 2, 3)).
    """
    if not train:
        # Prediction mode: the moving statistics, not those of the batch.
        X_hat = (X - moving_mean) / jnp.sqrt(moving_var + eps)
    else:
        if X.ndim not in (2, 4):
            raise ValueError(f"batch_norm takes (N, C) or (N, H, W, C) input, got {X.shape}")
        axes = (0,) if X.ndim == 2 else (0, 1, 2)
        mean = X.mean(axis=axes)
        var = ((X - mean) ** 2).mean(axis=axes)
        X_hat = (X - mean) / jnp.sqrt(var + eps)
        # The update is bookkeeping, not part of the function being differentiated.
        mean, var = jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)
        moving_mean = momentum * moving_mean + (1.0 - momentum) * mean
        moving_var = momentum * moving_var + (1.0 - momentum) * var
    Y = gamma * X_hat + beta
    return Y, moving_mean, moving_var


class BatchNorm(nn.Module):
    """The book's `BatchNorm(num_features, num_dims)` layer.

    `use_running_average` has `flax.linen.BatchNorm`'s meaning, so a network can take either
    layer through the same `functools.partial`. Statistics are computed in float32.
    """

    num_features: int
    num_dims: int
    use_running_average: bool = False
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, X):
        if X.ndim != self.num_dims or X.shape[-1] != self.num_features:
            raise ValueError(
                f"BatchNorm({self.num_features}, num_dims={self.num_dims}) got input of shape "
                f"{X.shape}"
            )
        shape = (self.num_features,)
        gamma = self.param("gamma", nn.initializers.ones, shape)
        beta = self.param("beta", nn.initializers.zeros, shape)
        moving_mean = self.variable("batch_stats", "moving_mean", jnp.zeros, shape)
        moving_var = self.variable("batch_stats", "moving_var", jnp.ones, shape)
        train = not self.use_running_average
        Y, mean, var = batch_norm(
            X.astype(jnp.float32), gamma, beta, moving_mean.value, moving_var.value,
            eps=self.epsilon, momentum=self.momentum, train=train,
        )
        # Leave the statistics untouched while `init` runs, as flax.linen.BatchNorm does.
        if train and not self.is_initializing():
            moving_mean.value, moving_var.value = mean, var
        return Y.astype(self.dtype)


class LeNet(nn.Module):
    """LeNet with batch normalisation after every convolution and hidden dense layer.

    `norm` is "scratch" for the notes' `BatchNorm` or "builtin" for `flax.linen.BatchNorm`
    (PyTorch's `nn.BatchNorm2d`/`nn.BatchNorm1d` in the book).
    """

    norm: str = "builtin"
    num_classes: int = 10
    dtype: Dtype = jnp.float32

    min_side = 16

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_input(x, self.min_side, "LeNet")
        conv = partial(Conv, dtype=self.dtype)
        dense = partial(Dense, dtype=self.dtype)
        if self.norm == "scratch":
            bn = partial(BatchNorm, use_running_average=not train, dtype=self.dtype)
            bn2d, bn1d = partial(bn, num_dims=4), partial(bn, num_dims=2)
            names = ("BatchNorm", "BatchNorm")
        elif self.norm == "builtin":
            bn = partial(
                nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                dtype=self.dtype, use_fast_variance=False,  # two-pass variance, as PyTorch
            )
            bn2d = bn1d = lambda num_features: bn()  # noqa: E731 - features are inferred
            names = ("BatchNorm2d", "BatchNorm1d")
        else:
            raise ValueError(f"LeNet norm must be 'scratch' or 'builtin', got {self.norm!r}")
        pool = partial(avg_pool, kernel_size=2, strides=2)
        layers = [
            ("Conv2d", conv(6, 5)), (names[0], bn2d(6)), ("Sigmoid", nn.sigmoid),
            ("AvgPool2d", pool),
            ("Conv2d", conv(16, 5)), (names[0], bn2d(16)), ("Sigmoid", nn.sigmoid),
            ("AvgPool2d", pool),
            ("Flatten", flatten),
            ("Linear", dense(120)), (names[1], bn1d(120)), ("Sigmoid", nn.sigmoid),
            ("Linear", dense(84)), (names[1], bn1d(84)), ("Sigmoid", nn.sigmoid),
            ("Linear", dense(self.num_classes)),
        ]
        return run_layers(self, layers, x).astype(jnp.float32)
