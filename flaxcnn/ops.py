"""Pooling with PyTorch's semantics on NHWC arrays, and convolutions where XLA:CPU needs help.

PyTorch pools default their stride to the kernel size and pad max-pools with -inf; Flax's
defaults differ (stride 1), so every call here writes the stride and padding out.

`max_pool` and `avg_pool` have their own gradients. XLA differentiates `reduce_window(max)`
into a select-and-scatter, which XLA:CPU runs 5-20x slower than PyTorch's channels-last kernel
and which dominated the 224-pixel networks and GoogLeNet (see benchmarks/xla_cpu_study.md). The
custom gradient takes the k*k shifted, strided slices of the padded input, finds each window's
argmax the way PyTorch's kernels do (the first element in row-major order, replaced only by a
strictly greater one or a NaN), and routes the whole incoming gradient to that one element: ties
(all-zero windows after a ReLU are common) never split or duplicate the gradient. The routed
gradients are put back by stride phase: for stride s the input splits into s*s interleaved
sub-grids, each of which receives a sum of shifted output-sized arrays, so no scatter and no
interior padding is needed. `avg_pool` sums the same slices and spreads g / k^2 back the same way.

On a CPU, where flaxcnn's C++ kernels are built (`onednn.available()`), the differentiated
float32 max-pool takes them instead (`onednn.max_pool_with_argmax`, `onednn.max_pool_backward`):
the forward pass keeps each window's argmax (int8) and the backward pass reads it back, each in
one pass over memory, and adds the routed gradients in PyTorch's order (bit for bit its
gradient). XLA's ops above read and write the maps several times: at the book's batch (128) the
max-pools took ~15% of GoogLeNet's step (benchmarks/xla_cpu_study.md).
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def _pairs(v):
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(i) for i in v)


def _pad_hw(x, padding, value=0.0):
    """NHWC x padded by (ph, pw) on each side of H and W with `value`."""
    (ph, pw) = _pairs(padding)
    return jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)), constant_values=value)


def materialize(a):
    """`a`, computed once into its own buffer: a fusion barrier for XLA:CPU.

    XLA fuses cheap elementwise producers into every consumer, duplicating them. The argmax
    chain below (k*k compares and selects per window) would be recomputed by each of the k*k
    terms that read it, and the incoming gradient (in DenseNet, five BatchNorm backward passes
    summed) at each of the k*k places that read it: 5-10x slower pooling backward passes. XLA
    rarely duplicates a reduction into its consumers, so an OR over a size-2 axis of (a's bits,
    0) — a itself, bit for bit, NaN and -0.0 included — usually forces one materialised copy.
    Not always: XLA:CPU fused one (and its producers) into a 2x2 pool's gradient, which reads
    each element 4 times; where that happens a library call is the barrier (the identity
    product in `_conv_few_channels_bwd`). An OR,
    not a max: YNNPACK takes max and sum reductions when its REDUCE fusions are on, and runs
    these slowly. (`lax.optimization_barrier` does not help: XLA:CPU removes it before fusion.)
    """
    if jnp.issubdtype(a.dtype, jnp.floating):
        bits = lax.bitcast_convert_type(a, jnp.dtype(f"int{a.dtype.itemsize * 8}"))
        return lax.bitcast_convert_type(materialize(bits), a.dtype)
    zero = jnp.zeros((), a.dtype)
    return lax.reduce(jnp.stack([a, jnp.zeros_like(a)]), zero, lax.bitwise_or, (0,))


def _reduce_max(x, window, strides, padding, kernels=False):
    """XLA's own max-pool (`reduce_window`); its gradient is XLA's select-and-scatter. Kept for
    comparisons (benchmarks/xla_cpu_study.py; in `_max_pool`'s place, `kernels` unused)."""
    (kh, kw), (sh, sw), (ph, pw) = window, strides, padding
    return lax.reduce_window(
        x, -jnp.inf, lax.max, (1, kh, kw, 1), (1, sh, sw, 1),
        ((0, 0), (ph, ph), (pw, pw), (0, 0)),
    )


def _max_of_slices(x, window, strides, padding, separate=False):
    """The max-pool as an elementwise maximum of the window's k*k strided slices: the same
    values as `reduce_window` (a maximum is exact, NaN propagates), 2-3x faster on XLA:CPU.
    separate: pad each slice on its own (`_window_terms`)."""
    y = None
    for _, _, s in _window_terms(x, window, strides, padding, -jnp.inf, separate):
        y = s if y is None else jnp.maximum(y, s)
    return y


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool(x, window, strides, padding, kernels):
    # not differentiated (inference): each slice padded on its own, see `_window_terms`
    return _max_of_slices(x, window, strides, padding, separate=True)


# Differentiated float32 max-pools on a CPU take flaxcnn's own kernels where they are built
# (`onednn.max_pool_with_argmax`, `onednn.max_pool_backward`): the forward pass keeps each
# window's argmax, the backward pass reads it back in one pass. False: XLA's ops everywhere.
_NATIVE_MAX_POOL = True


def _max_pool_fwd(x, window, strides, padding, kernels):
    from flaxcnn import onednn  # (it imports this module)

    if not (_NATIVE_MAX_POOL and kernels and x.dtype == jnp.float32 and window[0] * window[1] <= 127
            and jax.default_backend() == "cpu" and onednn.available()):
        return _max_of_slices(x, window, strides, padding), x

    def xla(x):  # (off the CPU, where the argmax is never read and XLA drops it)
        y = _max_of_slices(x, window, strides, padding)
        return y, jnp.zeros(y.shape, jnp.int8)

    y, argmax = lax.platform_dependent(
        x, cpu=partial(onednn.max_pool_with_argmax, window=window, strides=strides,
                       padding=padding), default=xla)
    return y, (x, argmax)


def _out_hw(in_hw, window, strides, padding):
    return tuple((i + 2 * p - k) // st + 1
                 for i, k, st, p in zip(in_hw, window, strides, padding, strict=True))


def _window_slices(xp, window, strides, out_hw):
    """(di, dj, slice) for every offset of the window, row-major: slice[n, i, j, c] =
    xp[n, di + sh * i, dj + sw * j, c], the offset's element of every output position."""
    (kh, kw), (sh, sw), (ho, wo) = window, strides, out_hw
    n, c = xp.shape[0], xp.shape[3]
    for di in range(kh):
        for dj in range(kw):
            yield di, dj, lax.slice(
                xp, (0, di, dj, 0), (n, di + sh * (ho - 1) + 1, dj + sw * (wo - 1) + 1, c),
                (1, sh, sw, 1),
            )


def _valid_span(offset, pad, stride, n_out, size):
    """(lo, hi): the outputs i in [lo, hi) whose element offset - pad + stride * i of the
    window lies inside the input (0 <= . < size); lo == hi when none does."""
    first = offset - pad
    lo = min(max(0, -(first // stride)), n_out)
    hi = max(min(n_out, (size - 1 - first) // stride + 1), lo)
    return lo, hi


def _window_terms(x, window, strides, padding, fill, separate=False):
    """(di, dj, term) for every offset of the window, row-major: term[n, i, j, c] =
    x[n, di - ph + sh * i, dj - pw + sw * j, c], `fill` where that falls in the padding.

    separate=False: slices of one padded copy of x. separate=True: each term a slice of x
    padded on its own, which XLA:CPU fuses into the terms' consumer. In inference that is
    faster: the padded copy was a kernel of its own wherever another layer also reads x
    (GoogLeNet's eval step: 11 pads, 2.5 of 50 ms; inference 1.035-1.056x). In training it is
    slower (GoogLeNet 0.955x, forward and backward; 0.966x, forward only), so the training
    passes keep the copy (benchmarks/xla_cpu_study.md)."""
    ho, wo = _out_hw(x.shape[1:3], window, strides, padding)
    if not separate:
        yield from _window_slices(_pad_hw(x, padding, fill), window, strides, (ho, wo))
        return
    n, c = x.shape[0], x.shape[3]
    fill = jnp.asarray(fill, x.dtype)
    for di, dj, (ilo, ihi), (jlo, jhi), part in _valid_parts(x, window, strides, padding):
        if part is None:
            yield di, dj, jnp.full((n, ho, wo, c), fill)
        else:
            yield di, dj, lax.pad(part, fill, ((0, 0, 0), (ilo, ho - ihi, 0),
                                               (jlo, wo - jhi, 0), (0, 0, 0)))


def _valid_parts(x, window, strides, padding):
    """(di, dj, (ilo, ihi), (jlo, jhi), part) for every offset of the window, row-major: the
    outputs [ilo, ihi) x [jlo, jhi) whose element at that offset lies inside x, and those
    elements, part[n, i - ilo, j - jlo, c]; part is None where no output's does."""
    (kh, kw), (sh, sw), (ph, pw) = window, strides, padding
    (ho, wo), (h, w) = _out_hw(x.shape[1:3], window, strides, padding), x.shape[1:3]
    n, c = x.shape[0], x.shape[3]
    for di in range(kh):
        ilo, ihi = _valid_span(di, ph, sh, ho, h)
        for dj in range(kw):
            jlo, jhi = _valid_span(dj, pw, sw, wo, w)
            part = None
            if ilo < ihi and jlo < jhi:
                i0, j0 = di - ph + sh * ilo, dj - pw + sw * jlo
                part = lax.slice(
                    x, (0, i0, j0, 0),
                    (n, i0 + sh * (ihi - ilo - 1) + 1, j0 + sw * (jhi - jlo - 1) + 1, c),
                    (1, sh, sw, 1))
            yield di, dj, (ilo, ihi), (jlo, jhi), part


def _scatter_windows(routed, strides, padding, in_hw):
    """The input gradient from output-sized gradients routed to each window offset.

    `routed[(di, dj)]` is what each output position sends to its window's element (di, dj).
    For stride s the padded input splits into s*s interleaved phase grids; offset (di, dj) lands
    on phase (di % sh, dj % sw) shifted by (di // sh, dj // sw), so every phase is a sum of
    shifted output-sized arrays and the phases interleave with a stack and a reshape: no
    scatter, no interior padding.
    """
    (sh, sw), (ph, pw), (h, w) = strides, padding, in_hw
    some = next(iter(routed.values()))
    n, c, dtype = some.shape[0], some.shape[3], some.dtype
    big_a, big_b = -(-(h + 2 * ph) // sh), -(-(w + 2 * pw) // sw)
    zero = jnp.zeros((), dtype)
    phases = {}
    for (di, dj), r in routed.items():
        lh, lw = di // sh, dj // sw
        placed = lax.pad(r, zero, ((0, 0, 0), (lh, big_a - lh - r.shape[1], 0),
                                   (lw, big_b - lw - r.shape[2], 0), (0, 0, 0)))
        key = (di % sh, dj % sw)
        phases[key] = placed if key not in phases else phases[key] + placed
    grid = [[phases.get((r, q), jnp.zeros((n, big_a, big_b, c), dtype)) for q in range(sw)]
            for r in range(sh)]
    if sh == 1 and sw == 1:
        dxp = grid[0][0]
    else:
        # (N, A, sh, B, sw, C) -> (N, A*sh, B*sw, C): interleave the phases.
        dxp = jnp.stack([jnp.stack(row, axis=3) for row in grid], axis=2)
        dxp = dxp.reshape(n, big_a * sh, big_b * sw, c)
    return dxp[:, ph:ph + h, pw:pw + w, :]


def _valid_offsets(window, strides, padding, in_hw, out_hw):
    """Static (Ho, Wo) masks per window offset: is the element a real one (not padding), and
    is it the first real element of its window (row-major)?"""
    (kh, kw), (sh, sw), (ph, pw), (h, w), (ho, wo) = window, strides, padding, in_hw, out_hw
    rows = [(di + sh * np.arange(ho) - ph >= 0) & (di + sh * np.arange(ho) - ph < h)
            for di in range(kh)]
    cols = [(dj + sw * np.arange(wo) - pw >= 0) & (dj + sw * np.arange(wo) - pw < w)
            for dj in range(kw)]
    seen = np.zeros((ho, wo), bool)
    out = {}
    for di in range(kh):
        for dj in range(kw):
            valid = rows[di][:, None] & cols[dj][None, :]
            out[(di, dj)] = (valid, valid & ~seen)
            seen |= valid
    return out


def _max_pool_bwd(window, strides, padding, kernels, res, g):
    if not isinstance(res, tuple):
        return _max_pool_bwd_xla(window, strides, padding, res, g)
    from flaxcnn import onednn  # flaxcnn's kernels on a CPU (`_max_pool_fwd`)

    x, argmax = res
    return (lax.platform_dependent(
        g, argmax, x,
        cpu=lambda g, argmax, x: onednn.max_pool_backward(g, argmax, x.shape[1:3], window,
                                                          strides, padding),
        default=lambda g, argmax, x: _max_pool_bwd_xla(window, strides, padding, x, g)[0]),)


def _max_pool_bwd_xla(window, strides, padding, x, g):
    """Routes each output's gradient to its window's argmax, chosen as PyTorch's kernels do:
    the first real element (row-major) starts as the maximum and a later one replaces it only
    if strictly greater or NaN. The argmax is recomputed from `x` alone, never by comparing
    with the pooled output: XLA may fuse x's producer (BatchNorm + ReLU, say) separately into
    the forward pooling and into this backward pass, and two fusions can round differently, so
    an equality test against the forward's maximum could match nothing. Every window sends
    its whole gradient to exactly one element."""
    (kh, kw) = window
    out_hw = g.shape[1:3]
    masks = _valid_offsets(window, strides, padding, x.shape[1:3], out_hw)
    idx_dtype = jnp.int8 if kh * kw < 128 else jnp.int32
    best = idx = None
    for k, (di, dj, s) in enumerate(_window_terms(x, window, strides, padding, -jnp.inf)):
        valid, first = masks[(di, dj)]
        if best is None and first.all():
            best, idx = s, jnp.zeros(s.shape, idx_dtype)
            continue
        if best is None:
            best, idx = jnp.full(s.shape, -jnp.inf, s.dtype), jnp.zeros(s.shape, idx_dtype)
        take = (s > best) | jnp.isnan(s)
        if not valid.all():
            take = take & jnp.asarray(valid)[None, :, :, None]
        if first.any():
            take = take | jnp.asarray(first)[None, :, :, None]
        best = jnp.where(take, s, best)
        idx = jnp.where(take, jnp.asarray(k, idx_dtype), idx)
    # g too: it is read at up to k*k places, and XLA would otherwise recompute whatever
    # produced it (in DenseNet, five BatchNorm backward passes summed) at each of them.
    idx, g = materialize(idx), materialize(g)
    zero = jnp.zeros((), g.dtype)
    routed = {(di, dj): jnp.where(idx == di * kw + dj, g, zero)
              for di in range(kh) for dj in range(kw)}
    return (materialize(_scatter_windows(routed, strides, padding, x.shape[1:3])),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x, kernel_size, strides, padding=0, *, cpu_kernels=True):
    """`nn.MaxPool2d(kernel_size, stride=strides, padding=padding)` on NHWC input.

    Values and gradients equal PyTorch's, ties included (see the module docstring). Supports
    `jax.grad`, `jax.vjp`, `jit` and `vmap`; forward-mode differentiation (`jax.jvp`) is not
    defined for the custom gradient.

    cpu_kernels=False keeps XLA's ops on a CPU too: for a pool whose input is elementwise work
    XLA fuses into the pooling (BatchNorm and ReLU in ResNet's and DenseNet's stem), which the
    kernels would need written out first (paired: 0.97-0.99x of XLA's ops there).
    """
    window, strides, padding = _pairs(kernel_size), _pairs(strides), _pairs(padding)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"max_pool takes floating-point input, got {x.dtype}")
    if any(2 * p > k for p, k in zip(padding, window, strict=True)):
        raise ValueError(f"padding {padding} must be at most half the kernel size {window}")
    return _max_pool(x, window, strides, padding, bool(cpu_kernels))


def _pool_input(x):
    """The average pool's input, materialised once (`materialize`).

    Otherwise XLA fuses the input's producer into the pooling loop, which then runs it
    per window offset on strided slices with the channels innermost: LeNet's first
    convolution (multiply-adds, `conv_one_channel`), BatchNorm and sigmoid ran inside its 2x2
    pool at 19 ms of CPU per batch of 256 in inference, 6 ms with this copy. Max-pools keep
    the fusion: their producers (bias, ReLU) are cheap, and the copy cost AlexNet, VGG, NiN and
    GoogLeNet 3-9% in inference (benchmarks/xla_cpu_study.md)."""
    return materialize(x)


@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _avg_pool(x, window, strides, padding):
    (kh, kw) = window
    xp = _pad_hw(_pool_input(x), padding)
    total = None
    # Row-major window order, as PyTorch's kernel adds; then one division, as PyTorch does.
    for _, _, s in _window_slices(xp, window, strides, _out_hw(x.shape[1:3], window, strides,
                                                                padding)):
        total = s if total is None else total + s
    return total / (kh * kw)


def _avg_pool_fwd(x, window, strides, padding):
    return _avg_pool(x, window, strides, padding), x.shape[1:3]


def _avg_pool_bwd(window, strides, padding, in_hw, g):
    (kh, kw) = window
    share = materialize(g) / (kh * kw)  # read k*k times: computed once (see _max_pool_bwd)
    routed = {(di, dj): share for di in range(kh) for dj in range(kw)}
    return (materialize(_scatter_windows(routed, strides, padding, in_hw)),)


_avg_pool.defvjp(_avg_pool_fwd, _avg_pool_bwd)


def avg_pool(x, kernel_size, strides, padding=0):
    """`nn.AvgPool2d(kernel_size, stride=strides, padding=padding)` (count_include_pad=True).

    The sum of the window's strided slices (row-major, as PyTorch adds) divided by its size; the
    gradient spreads g / size over each window by stride phase, like `max_pool`'s (XLA's own
    gradient of `reduce_window(add)` is an interior pad and another reduce_window, slow on CPU).
    """
    window, strides, padding = _pairs(kernel_size), _pairs(strides), _pairs(padding)
    if any(2 * p > k for p, k in zip(padding, window, strict=True)):
        raise ValueError(f"padding {padding} must be at most half the kernel size {window}")
    return _avg_pool(x, window, strides, padding)


# Concatenations of float32 maps on the channel axis take flaxcnn's kernel on a CPU where it is
# built (`onednn.concat_channels`). False: XLA's everywhere.
_NATIVE_CONCAT = True


def concat_channels(xs):
    """`jnp.concatenate(xs, axis=-1)`, the book's `torch.cat(..., dim=1)` on NHWC maps
    (DenseNet's feature maps, GoogLeNet's branches). On a CPU, for float32, flaxcnn's kernel
    where it is built (`onednn.concat_channels`; XLA:CPU picks each element's operand in its
    loop, at half the speed); the gradient is the slices, as XLA's."""
    xs = list(xs)
    if len(xs) == 1:
        return xs[0]
    from flaxcnn import onednn  # (it imports this module)

    if not (_NATIVE_CONCAT and all(x.dtype == jnp.float32 for x in xs)
            and jax.default_backend() == "cpu" and onednn.available()):
        return jnp.concatenate(xs, axis=-1)
    return _concat_channels(tuple(x.shape[-1] for x in xs), *xs)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _concat_channels(widths, *xs):
    from flaxcnn import onednn

    return lax.platform_dependent(
        *xs, cpu=onednn.concat_channels, default=lambda *xs: jnp.concatenate(xs, axis=-1))


def _concat_channels_fwd(widths, *xs):
    return _concat_channels(widths, *xs), None


def _concat_channels_bwd(widths, _, g):
    ends = np.cumsum(widths)
    return tuple(g[..., e - w:e] for w, e in zip(widths, ends, strict=True))


_concat_channels.defvjp(_concat_channels_fwd, _concat_channels_bwd)


def global_avg_pool(x):
    """`nn.AdaptiveAvgPool2d((1, 1))`: the mean of each channel, keeping (N, 1, 1, C)."""
    return jnp.mean(x, axis=(1, 2), keepdims=True)


def conv_nhwc(x, kernel, strides, padding, precision=None):
    """`nn.Conv2d`'s convolution on NHWC input with an HWIO kernel: XLA's own."""
    (sh, sw), (ph, pw) = _pairs(strides), _pairs(padding)
    return lax.conv_general_dilated(
        x, kernel, (sh, sw), ((ph, ph), (pw, pw)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision,
    )


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_one_channel(x, kernel, padding):
    """A stride-1 convolution of a one-channel input (LeNet's and VGG's first layers) as k*k
    shifted multiply-adds, with XLA's convolution gradients.

    XLA:CPU runs a convolution with one input channel at a few GFLOP/s (LeNet's first layer at
    batch 256: 10 ms forward); the k*k broadcast multiply-adds are one elementwise loop (1.3 ms;
    benchmarks/conv_study.py).
    Differentiating that loop would give k*k reductions, so the gradients are the convolution's.
    Float32 sums in another order: within 1e-6 of `conv_nhwc`."""
    k_h, k_w, c, _ = kernel.shape
    if c != 1:
        raise ValueError(f"conv_one_channel needs one input channel, not {c}")
    ph, pw = _pairs(padding)
    n, h, w, _ = x.shape
    ho, wo = h + 2 * ph - k_h + 1, w + 2 * pw - k_w + 1
    xp = _pad_hw(x, padding)
    y = None
    for i in range(k_h):
        for j in range(k_w):
            term = xp[:, i : i + ho, j : j + wo, :] * kernel[i, j, 0]
            y = term if y is None else y + term
    return y


def _one_channel_output(y):
    """`conv_one_channel`'s output when differentiated, materialised: BatchNorm's statistics and
    its backward pass read it in five loops, and XLA fused the k*k multiply-adds into each
    (benchmarks/xla_cpu_study.md). Inference keeps the fusion into the next layer."""
    return materialize(y)


def _conv_one_channel_fwd(x, kernel, padding):
    return _one_channel_output(conv_one_channel(x, kernel, padding)), (x, kernel)


def _conv_one_channel_bwd(padding, res, g):
    x, kernel = res
    _, vjp = jax.vjp(lambda x, k: conv_nhwc(x, k, 1, padding), x, kernel)
    return vjp(g)


conv_one_channel.defvjp(_conv_one_channel_fwd, _conv_one_channel_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_few_channels(x, kernel, padding):
    """A stride-1 convolution of an input with a few channels (LeNet's second layer: 6), whose
    input gradient is one matrix product and a col2im sum.

    XLA:CPU computes the input gradient as a convolution with as many output channels as the
    input has (6), at about 35 GFLOP/s: 4.7 ms of LeNet's step at batch 256, 1.7 ms as
    g (N*Ho*Wo, O) @ kernel^T (O, k*k*C) and k*k shifted adds; the LeNet step trains 1.15x
    faster (benchmarks/xla_cpu_study.md). With 16 input channels, or LeNet's layer padded
    by 2, XLA's own is as fast or faster (benchmarks/conv_study.py). The forward pass and the
    kernel gradient are XLA's convolution."""
    return conv_nhwc(x, kernel, 1, padding)


def _conv_few_channels_fwd(x, kernel, padding):
    return conv_few_channels(x, kernel, padding), (x, kernel)


def _conv_few_channels_bwd(padding, res, g):
    x, kernel = res
    (ph, pw), (n, h, w, c), (k_h, k_w, _, o) = _pairs(padding), x.shape, kernel.shape
    _, ho, wo, _ = g.shape
    cols = jnp.dot(g.reshape(-1, o), kernel.reshape(-1, o).T).reshape(n, ho, wo, k_h, k_w, c)
    zero = jnp.zeros((), g.dtype)
    dxp = None
    for i in range(k_h):
        for j in range(k_w):
            # col2im: window offset (i, j) of output (a, b) is padded-input element (a+i, b+j)
            t = lax.pad(cols[:, :, :, i, j, :], zero,
                        ((0, 0, 0), (i, k_h - 1 - i, 0), (j, k_w - 1 - j, 0), (0, 0, 0)))
            dxp = t if dxp is None else dxp + t
    # A product with the identity, as a fusion barrier: XLA:CPU fused these k*k adds (and
    # `materialize`'s reduction) into the consumer, LeNet's 2x2 average-pool gradient, which
    # reads each element 4 times: 100 adds per element, 6 ms. A library dot is never fused.
    dxp = jnp.dot(dxp.reshape(-1, c), jnp.eye(c, dtype=dxp.dtype)).reshape(dxp.shape)
    _, vjp = jax.vjp(lambda k: conv_nhwc(x, k, 1, padding), kernel)
    return dxp[:, ph:ph + h, pw:pw + w, :], vjp(g)[0]


conv_few_channels.defvjp(_conv_few_channels_fwd, _conv_few_channels_bwd)


@jax.custom_vjp
def conv_1x1(x, kernel):
    """A 1x1, stride-1, unpadded convolution on a large map (NiN's 54x54 and 26x26 layers),
    whose kernel gradient is one matrix product X^T G over all N*H*W positions.

    XLA:CPU computes that kernel gradient as a convolution on transposed copies of both
    operands; as a product, NiN's first 1x1 layer at batch 32 takes 101 instead of 119 ms forward
    and backward (benchmarks/conv_study.py) and the NiN step trains 1.03-1.05x faster, while
    GoogLeNet's and DenseNet's 1x1 layers (at most 24x24) gained nothing
    (benchmarks/xla_cpu_study.md). The forward pass and the input gradient are XLA's
    convolution."""
    return conv_nhwc(x, kernel, 1, 0)


def _conv_1x1_fwd(x, kernel):
    return conv_1x1(x, kernel), (x, kernel)


def _conv_1x1_bwd(res, g):
    x, kernel = res
    _, vjp = jax.vjp(lambda x: conv_nhwc(x, kernel, 1, 0), x)
    dk = lax.dot_general(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]),
                         (((0,), (0,)), ((), ())))
    return vjp(g)[0], dk.reshape(kernel.shape)


conv_1x1.defvjp(_conv_1x1_fwd, _conv_1x1_bwd)


def _padded(x, padding):
    """x zero-padded (H and W) into its own buffer (`materialize`: see `conv_small_input`)."""
    return materialize(_pad_hw(x, padding))


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_small_input(x, kernel, padding):
    """A stride-1 convolution of an image smaller than its kernel (GoogLeNet's 5x5 branches on
    3x3 maps), on an explicitly padded copy.

    Given such a convolution, XLA:CPU swaps its operands (the image becomes the filter,
    `dim_labels=01fb_o01i->f01b`) and runs it at about 10 GFLOP/s: 8.3 ms forward and 14.7 ms
    forward+backward for GoogLeNet's [32, 3, 3, 48] * [5, 5, 48, 128], 1.1 and 2.8 ms on the
    padded copy (benchmarks/conv_study.py); GoogLeNet trains 1.08x faster. A pad alone is
    folded back into the convolution, hence the materialised copy; the input gradient, itself
    such a convolution (of the incoming gradient, padded by k-1-p, with the flipped kernel),
    gets the same treatment."""
    return conv_nhwc(_padded(x, padding), kernel, 1, 0)


def _conv_small_input_fwd(x, kernel, padding):
    xp = _padded(x, padding)
    return conv_nhwc(xp, kernel, 1, 0), (xp, kernel)


def _conv_small_input_bwd(padding, res, g):
    xp, kernel = res
    (k_h, k_w), (ph, pw) = kernel.shape[:2], _pairs(padding)
    flipped = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)  # HWIO of the transposed convolution
    dx = conv_nhwc(_padded(g, (k_h - 1 - ph, k_w - 1 - pw)), flipped, 1, 0)
    _, vjp = jax.vjp(lambda k: conv_nhwc(xp, k, 1, 0), kernel)
    return dx, vjp(g)[0]


conv_small_input.defvjp(_conv_small_input_fwd, _conv_small_input_bwd)


def conv_taps(x, kernel, padding):
    """A stride-1 convolution as one matrix product per kernel tap, each over only the outputs
    whose input under that tap lies inside the image: products with the zero padding are never
    computed.

    On a 3x3 map a padded 3x3 kernel does 49 of its 81 multiplies per position pair with real
    input. For ResNet-18's 512 -> 512 layers there, at batch 32, this form takes 5.3 ms forward
    against 7.8 in oneDNN 2.6, 8.2 in XLA's convolution and 5.9 in PyTorch's oneDNN 3.12, and
    18 ms forward and backward against 26 (benchmarks/xla_cpu_study.md). The gradients are
    autodiff's: the same products transposed, over the same regions."""
    window, padding = kernel.shape[:2], _pairs(padding)
    ho, wo = _out_hw(x.shape[1:3], window, (1, 1), padding)
    y = jnp.zeros((x.shape[0], ho, wo, kernel.shape[3]), jnp.result_type(x, kernel))
    for di, dj, (ilo, ihi), (jlo, jhi), part in _valid_parts(x, window, (1, 1), padding):
        if part is not None:
            y = y.at[:, ilo:ihi, jlo:jhi, :].add(jnp.dot(part, kernel[di, dj]))
    return y


def _batch_norm_stats(x):
    """Each channel's (last axis) mean and biased variance, two-pass: the variance of x - mean,
    as PyTorch and `flax.linen.BatchNorm(use_fast_variance=False)` compute it."""
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    return mean, jnp.mean(jnp.square(x - mean), axes)


def normalize(x, mean, var, scale, bias, epsilon):
    """(x - mean) * (rsqrt(var + epsilon) * scale) + bias, per channel (last axis):
    `flax.linen.BatchNorm`'s operations in its order, with batch or running statistics."""
    return (x - mean) * (lax.rsqrt(var + epsilon) * scale) + bias


def batch_norm_autodiff(x, scale, bias, epsilon):
    """Training-mode batch normalisation over every axis but the last: (`normalize` on the
    batch's statistics, mean, var). Differentiated by JAX (what `batch_norm` replaces on a
    CPU)."""
    mean, var = _batch_norm_stats(x)
    return normalize(x, mean, var, scale, bias, epsilon), mean, var


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm(x, scale, bias, epsilon):
    """`batch_norm_autodiff` with its backward pass written out: two reads of x and of the incoming
    gradient (one for the two per-channel sums, one for dx), where autodiff of the two-pass
    statistics exports eight reductions (XLA:CPU's compiled program keeps four). Alone, forward
    and backward: about 2x faster on DenseNet's layers; in the step, where XLA fuses much of
    autodiff's extra work into neighbouring passes, DenseNet trains 1.03-1.04x faster and
    ResNet-18 the same (benchmarks/xla_cpu_study.md). Float32 sums in another order: gradients
    within 2e-6 (relative) of autodiff's."""
    return batch_norm_autodiff(x, scale, bias, epsilon)


def _batch_norm_fwd(x, scale, bias, epsilon):
    y, mean, var = batch_norm_autodiff(x, scale, bias, epsilon)
    return (y, mean, var), (x, mean, lax.rsqrt(var + epsilon), scale)


def _batch_norm_bwd(epsilon, res, cts):
    x, mean, rstd, scale = res
    dy, dmean, dvar = cts  # zeros unless the statistics themselves are differentiated
    axes = tuple(range(x.ndim - 1))
    m = x.size // x.shape[-1]
    xc = x - mean
    sum_dy = jnp.sum(dy, axes)
    sum_dy_xc = jnp.sum(dy * xc, axes)
    k = scale * rstd
    # dx = k (dy - mean(dy) - x_hat mean(dy x_hat)) + dmean / m + dvar 2 (x - mean) / m,
    # as one multiply-add per element with per-channel coefficients
    a = 2.0 * dvar / m - k * rstd * rstd * sum_dy_xc / m
    b = dmean / m - k * sum_dy / m
    dx = k * dy + a * xc + b
    return dx.astype(x.dtype), (sum_dy_xc * rstd).astype(scale.dtype), sum_dy.astype(scale.dtype)


batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)
