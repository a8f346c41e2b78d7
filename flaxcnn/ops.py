"""Pooling with PyTorch's semantics on NHWC arrays.

PyTorch pools default their stride to the kernel size and pad max-pools with -inf; Flax's
defaults differ (stride 1), so every call here writes the stride and padding out.
"""

import jax.numpy as jnp
from jax import lax


def _pairs(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def max_pool(x, kernel_size, strides, padding=0):
    """`nn.MaxPool2d(kernel_size, stride=strides, padding=padding)` on NHWC input."""
    (kh, kw), (sh, sw), (ph, pw) = _pairs(kernel_size), _pairs(strides), _pairs(padding)
    return lax.reduce_window(
        x, -jnp.inf, lax.max, (1, kh, kw, 1), (1, sh, sw, 1),
        ((0, 0), (ph, ph), (pw, pw), (0, 0)),
    )


def avg_pool(x, kernel_size, strides, padding=0):
    """`nn.AvgPool2d(kernel_size, stride=strides, padding=padding)` (count_include_pad=True)."""
    (kh, kw), (sh, sw), (ph, pw) = _pairs(kernel_size), _pairs(strides), _pairs(padding)
    summed = lax.reduce_window(
        x, 0.0, lax.add, (1, kh, kw, 1), (1, sh, sw, 1),
        ((0, 0), (ph, ph), (pw, pw), (0, 0)),
    )
    return summed / (kh * kw)


def global_avg_pool(x):
    """`nn.AdaptiveAvgPool2d((1, 1))`: the mean of each channel, keeping (N, 1, 1, C)."""
    return jnp.mean(x, axis=(1, 2), keepdims=True)
