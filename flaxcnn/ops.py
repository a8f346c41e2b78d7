"""Pooling with PyTorch's semantics on NHWC arrays.

PyTorch pools default their stride to the kernel size and pad max-pools with -inf; Flax's
defaults differ (stride 1), so every call here writes the stride and padding out.

`max_pool` has its own gradient. XLA differentiates `reduce_window(max)` into a
select-and-scatter, which XLA:CPU runs 5-20x slower than PyTorch's channels-last kernel and which
dominated the 224-pixel networks and GoogLeNet (see benchmarks/xla_cpu_study.md). The custom
gradient recomputes the k*k shifted, strided slices of the padded input, compares each with the
pooled output and routes the incoming gradient to the *first* position of each window that holds
the maximum (row-major order within the window), which is exactly what PyTorch's kernels do: one
position per window gets the whole gradient, also when the window has ties (all-zero windows after
a ReLU are common). The routed gradients are put back by stride phase: for stride s the input
splits into s*s interleaved sub-grids, each of which receives a sum of shifted output-sized arrays,
so no scatter and no interior padding is needed.
"""

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax


def _pairs(v):
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(i) for i in v)


def _reduce_max(x, window, strides, padding):
    (kh, kw), (sh, sw), (ph, pw) = window, strides, padding
    return lax.reduce_window(
        x, -jnp.inf, lax.max, (1, kh, kw, 1), (1, sh, sw, 1),
        ((0, 0), (ph, ph), (pw, pw), (0, 0)),
    )


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, padding):
    return _reduce_max(x, window, strides, padding)


def _max_pool_fwd(x, window, strides, padding):
    y = _reduce_max(x, window, strides, padding)
    return y, (x, y)


def _place(c, low, size):
    """Pads (or crops) axes 1 and 2 of `c` to `size`, with `low` leading rows/columns."""
    (lh, lw), (nh, nw) = low, size
    zero = jnp.zeros((), c.dtype)
    return lax.pad(
        c, zero,
        ((0, 0, 0), (lh, nh - lh - c.shape[1], 0), (lw, nw - lw - c.shape[2], 0), (0, 0, 0)),
    )


def _max_pool_bwd(window, strides, padding, res, g):
    x, y = res
    (kh, kw), (sh, sw), (ph, pw) = window, strides, padding
    n, h, w, c = x.shape
    ho, wo = y.shape[1:3]
    # NaN padding never equals the maximum, so a padded position is never chosen, and a window
    # whose real values are all -inf routes its gradient to its first real position (PyTorch).
    xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)), constant_values=jnp.nan)
    hp, wp = h + 2 * ph, w + 2 * pw
    # The stride-phase grid: padded input row i = sh * a + r, a < A, r < sh.
    big_a, big_b = -(-hp // sh), -(-wp // sw)
    zero = jnp.zeros((), g.dtype)
    taken = None
    phases = {}
    for di in range(kh):
        for dj in range(kw):
            window_slice = lax.slice(
                xp, (0, di, dj, 0), (n, di + sh * (ho - 1) + 1, dj + sw * (wo - 1) + 1, c),
                (1, sh, sw, 1),
            )
            eq = window_slice == y
            # First match in row-major window order only: PyTorch's tie-breaking.
            hit = eq if taken is None else eq & ~taken
            taken = eq if taken is None else taken | eq
            routed = _place(jnp.where(hit, g, zero), (di // sh, dj // sw), (big_a, big_b))
            key = (di % sh, dj % sw)
            phases[key] = routed if key not in phases else phases[key] + routed
    grid = [
        [phases.get((r, q), jnp.zeros((n, big_a, big_b, c), g.dtype)) for q in range(sw)]
        for r in range(sh)
    ]
    if sh == 1 and sw == 1:
        dxp = grid[0][0]
    else:
        # (N, A, sh, B, sw, C) -> (N, A*sh, B*sw, C): interleave the phases.
        dxp = jnp.stack([jnp.stack(row, axis=3) for row in grid], axis=2)
        dxp = dxp.reshape(n, big_a * sh, big_b * sw, c)
    return (dxp[:, ph:ph + h, pw:pw + w, :],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x, kernel_size, strides, padding=0):
    """`nn.MaxPool2d(kernel_size, stride=strides, padding=padding)` on NHWC input.

    Values and gradients equal PyTorch's, ties included (see the module docstring). Supports
    `jax.grad`, `jax.vjp`, `jit` and `vmap`; forward-mode differentiation (`jax.jvp`) is not
    defined for the custom gradient.
    """
    window, strides, padding = _pairs(kernel_size), _pairs(strides), _pairs(padding)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"max_pool takes floating-point input, got {x.dtype}")
    if any(2 * p > k for p, k in zip(padding, window, strict=True)):
        raise ValueError(f"padding {padding} must be at most half the kernel size {window}")
    return _max_pool(x, window, strides, padding)


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
