"""The layers every network shares: PyTorch's Conv2d and Linear with the book's initialisation,
and its BatchNorm2d.

`train_ch6` re-initialises every Conv2d and Linear weight with Xavier-uniform and leaves biases at
PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)). Flax's bias initialisers see only the
bias's shape, not fan_in, so these two layers create their own parameters (named `kernel` and
`bias`, as `nn.Conv` and `nn.Dense` name them). `BatchNorm2d` is `flax.linen.BatchNorm` with
PyTorch's settings and the same variables, faster to differentiate on a CPU.

Layers that a block function puts inside an `nn.Sequential` are made with `parent=None`, so that
the `Sequential` adopts them as its own children rather than the enclosing network.
"""

import itertools
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxcnn import onednn, ops

Dtype = Any
ModuleDef = Any
xavier_uniform = nn.initializers.xavier_uniform()


def torch_bias_init(fan_in: int):
    """PyTorch's default bias initialisation for Conv2d and Linear: U(-1/sqrt(fan_in), ...)."""
    bound = 1.0 / fan_in**0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Conv(nn.Module):
    """`nn.Conv2d(in, features, kernel_size, stride=strides, padding=padding)` on NHWC input."""

    features: int
    kernel_size: int
    strides: int = 1
    padding: int = 0
    dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x, relu: bool = False):
        """`relu=True`: `nn.relu` of the output, in one call; where oneDNN runs the layer, it
        applies the bias and ReLU as it writes the output (`onednn.conv_relu`)."""
        k, p = self.kernel_size, self.padding
        fan_in = x.shape[-1] * k * k
        kernel = self.param("kernel", xavier_uniform, (k, k, x.shape[-1], self.features))
        bias = self.param("bias", torch_bias_init(fan_in), (self.features,))
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        conv = partial(ops.conv_nhwc, strides=self.strides, padding=p, precision=self.precision)
        cpu_conv = _cpu_convolution(x, k, self.strides, p, self.features)
        fused = relu and _ONEDNN_RELU and _cpu_conv_relu(cpu_conv)
        # Chosen when the step is compiled: other platforms keep XLA's convolution.
        if fused:
            return jax.lax.platform_dependent(
                x, kernel, bias, cpu=fused, default=lambda x, k, b: nn.relu(conv(x, k) + b))
        if cpu_conv is not None:
            y = jax.lax.platform_dependent(x, kernel, cpu=cpu_conv, default=conv) + bias
        else:
            y = conv(x, kernel) + bias
        return nn.relu(y) if relu else y


def _calls(layers, fuse: bool = True):
    """(index, callable) for each step through `layers`: a `Conv` followed by `nn.relu` as one
    `relu=True` call (where `fuse`), every other layer on its own."""
    i = 0
    while i < len(layers):
        if (fuse and i + 1 < len(layers) and isinstance(layers[i], Conv)
                and layers[i + 1] in (nn.relu, jax.nn.relu)):
            yield i, partial(layers[i], relu=True)
            i += 2
        else:
            yield i, layers[i]
            i += 1


class Sequential(nn.Sequential):
    """`nn.Sequential` (the same name, so the same parameter paths), except that a `Conv`
    followed by `nn.relu` runs as one call, `conv(x, relu=True)`: on a CPU, oneDNN then applies
    the bias and ReLU as it writes the convolution's output (NiN's, VGG's and AlexNet's blocks;
    benchmarks/xla_cpu_study.md)."""

    @nn.compact
    def __call__(self, *args, **kwargs):
        if not self.layers:
            raise ValueError(f"Empty Sequential module {self.name}.")
        out = None
        for i, layer in _calls(self.layers):
            if i == 0:
                out = layer(*args, **kwargs)
            elif isinstance(out, tuple):
                out = layer(*out)
            elif isinstance(out, dict):
                out = layer(**out)
            else:
                out = layer(out)
        return out


# 1x1 convolutions on maps of at least this many positions take `ops.conv_1x1`: NiN's (54x54,
# 26x26) gain; GoogLeNet's and DenseNet's (24x24 and less) did not (xla_cpu_study.md)
_LARGE_1X1 = 26 * 26


# oneDNN's convolutions (flaxcnn/onednn.py) for every float32 layer with more than one input
# channel, and for the strided one-channel stems, when they are built; False keeps XLA's (and
# the ops paths below) everywhere. GoogLeNet's Inception blocks included: until 2026-12-03 they
# trained on XLA's convolutions, which XLA runs branch beside branch; since the max-pool kernels
# those were level with oneDNN's at batch 32 and 0.89x of their speed at the book's 128.
# _ONEDNN_MIN_SIDE: only on maps at least this large (1: all; the study's dnnl6/dnnl12 runs).
# _ONEDNN_STEMS: the strided stems on one channel (AlexNet's and NiN's 11x11/4, the 7x7/2 of
# GoogLeNet, ResNet and DenseNet), where XLA's convolution is 1.6-2.7x slower than oneDNN's.
_ONEDNN = True
_ONEDNN_MIN_SIDE = 1
_ONEDNN_STEMS = True
# _ONEDNN_RELU: `Conv(...)(x, relu=True)` on oneDNN's convolution applies the bias and ReLU
# inside it (`onednn.conv_relu`); False: XLA adds them after, as for `relu=False`.
_ONEDNN_RELU = True


# Stride-1, padded layers with at least _TAPS_MIN_FEATURES outputs on maps of at most
# _TAPS_MAX_SIDE take `ops.conv_taps`, one matrix product per kernel tap over the outputs it
# reaches inside the image: on a 3x3 map, 32 of a 3x3 kernel's 81 multiplies per position pair
# are with the padding. ResNet-18's 512 -> 512 layers forward in 5.3 ms at batch 32 against
# oneDNN 2.6's 7.8 and XLA's 8.2 (PyTorch's oneDNN 3.12: 5.9), and ResNet-18 trains and infers
# 1.05x faster (paired, batch 32 and 128). GoogLeNet's last 3x3 layers (-> 320, -> 384): its
# inference 1.004-1.032x faster in three paired runs, training level. With fewer outputs
# (GoogLeNet's 5x5 -> 128, DenseNet's -> 32) or on 6x6 maps oneDNN's is faster
# (benchmarks/xla_cpu_study.md, "The Zen 4, session 29"). _TAPS_MAX_SIDE = 0: none.
_TAPS_MAX_SIDE = 3
_TAPS_MIN_FEATURES = 320

# One-channel, stride-1 layers (item 3 of the study's defaults) with fewer outputs than this take
# oneDNN's convolution where it is available: LeNet's 1 -> 6, whose k*k multiply-adds keep 6
# channels in 16-float vector lanes (inference 1.09-1.15x, paired in one process; training the
# same). VGG's 1 -> 16 keeps the multiply-adds (oneDNN's was 0.95x in inference).
_ONE_CHANNEL_MIN_FEATURES = 16


def _onednn_conv(x, kernel, relu_bias=None, *, strides, padding):
    """oneDNN's convolution; given `relu_bias`, relu(convolution + relu_bias)."""
    st = ops._pairs(strides)
    pd = tuple((p, p) for p in ops._pairs(padding))
    if relu_bias is None:
        return onednn.conv(x, kernel, st, pd)
    return onednn.conv_relu(x, kernel, relu_bias, st, pd)


def _cpu_conv_relu(cpu_conv):
    """(x, kernel, bias) -> relu(convolution + bias) in one oneDNN call, for a layer whose CPU
    choice (`_cpu_convolution`'s) is oneDNN's convolution; else None."""
    return cpu_conv if getattr(cpu_conv, "func", None) is _onednn_conv else None


def _cpu_convolution(x, k: int, strides: int, padding: int, features: int | None = None):
    """The convolutions XLA:CPU handles badly, and what flaxcnn runs instead on a CPU (ops.py,
    onednn.py; the evidence in benchmarks/xla_cpu_study.md), or None for XLA's own."""
    if x.dtype != jnp.float32:
        return None
    # (only where the CPU is JAX's default backend: elsewhere the CPU branch is never lowered,
    # and building the library there would be wasted)
    dnnl = (min(x.shape[1:3]) >= _ONEDNN_MIN_SIDE and _ONEDNN
            and jax.default_backend() == "cpu" and onednn.available())
    return _cpu_choice(x, k, strides, padding, dnnl, features)


def _cpu_choice(x, k, strides, padding, dnnl, features):
    """`_cpu_convolution`'s choice for one layer, `dnnl`: whether oneDNN may take it."""
    c, side = x.shape[-1], min(x.shape[1:3])
    if (strides == 1 and padding > 0 and side <= _TAPS_MAX_SIDE and features is not None
            and features >= _TAPS_MIN_FEATURES):
        return partial(ops.conv_taps, padding=padding)
    if c == 1 and k <= 5 and strides == 1:  # LeNet's and VGG's first layers: one input channel
        if features is not None and features < _ONE_CHANNEL_MIN_FEATURES and dnnl:
            return partial(_onednn_conv, strides=strides, padding=padding)  # LeNet's
        return partial(ops.conv_one_channel, padding=padding)
    if (c > 1 or (strides != 1 and _ONEDNN_STEMS)) and dnnl:
        return partial(_onednn_conv, strides=strides, padding=padding)
    if strides != 1:
        return None
    if side < k and 0 < padding < k:  # GoogLeNet's 5x5 branches on 3x3 maps: operands swapped
        return partial(ops.conv_small_input, padding=padding)
    if k == 1 and padding == 0 and x.shape[1] * x.shape[2] >= _LARGE_1X1:  # NiN's 1x1 layers
        return ops.conv_1x1
    if 1 < c <= 8:  # LeNet's second layer: a slow input gradient for few channels
        return partial(ops.conv_few_channels, padding=padding)
    return None


class BatchNorm2d(nn.Module):
    """`nn.BatchNorm2d`: `flax.linen.BatchNorm(momentum=0.9, epsilon=1e-5,
    use_fast_variance=False)` (PyTorch's settings, two-pass variance) with the same parameters
    (`scale`, `bias`) and statistics (`mean`, biased `var`, in `batch_stats`), normalising over
    every axis but the last.

    Why not Flax's own: XLA:CPU differentiates its two-pass statistics slowly. On a CPU the
    training pass is `ops.batch_norm`, whose backward pass is written out (DenseNet trains
    1.03-1.04x faster, ResNet-18 the same); other platforms differentiate the same operations
    (`ops.batch_norm_autodiff`), chosen when the step is compiled. Statistics and the
    normalisation are float32 whatever `dtype` (the output's), as Flax computes them.

    `x` may also be a list of arrays that stand for their concatenation on the last axis
    (DenseNet's feature maps); the result is then a list too (`concat_relu` joins it). In
    training each part is normalised on its own statistics, which equal the concatenation's,
    and XLA computes those of a part that several layers normalise once (`DenseBlock`). In
    evaluation the parts are concatenated first, one pass as for an array, unless `eval_parts`
    (for parts that are pooled before they are joined: DenseNet's transitions)."""

    use_running_average: bool = False
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    eval_parts: bool = False  # a list's parts each on its own in evaluation too

    @nn.compact
    def __call__(self, x):
        parts = x if isinstance(x, list) else [x]
        c = sum(p.shape[-1] for p in parts)
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        parts = [p.astype(jnp.promote_types(p.dtype, jnp.float32)) for p in parts]
        dtype = self.dtype or parts[0].dtype
        if self.use_running_average and self.eval_parts and len(parts) > 1:
            ends = itertools.accumulate(p.shape[-1] for p in parts)
            return [ops.normalize(p, *(v[e - p.shape[-1]:e] for v in (
                ra_mean.value, ra_var.value, scale, bias)), self.epsilon).astype(dtype)
                for p, e in zip(parts, ends, strict=True)]
        if self.use_running_average:
            # XLA:CPU does not fuse per-part passes into a concatenation: one pass over it
            whole = ops.concat_channels(parts)
            y = ops.normalize(whole, ra_mean.value, ra_var.value, scale, bias, self.epsilon)
            return [y.astype(dtype)] if isinstance(x, list) else y.astype(dtype)
        ys, means, variances = [], [], []
        start = 0
        for part in parts:
            end = start + part.shape[-1]
            part_scale, part_bias = ((scale, bias) if len(parts) == 1
                                     else (scale[start:end], bias[start:end]))
            y, mean, var = jax.lax.platform_dependent(
                part, part_scale, part_bias, cpu=partial(ops.batch_norm, epsilon=self.epsilon),
                default=partial(ops.batch_norm_autodiff, epsilon=self.epsilon),
            )
            ys.append(y.astype(dtype))
            means.append(mean)
            variances.append(var)
            start = end
        if not self.is_initializing():
            mean, var = (jax.lax.stop_gradient(v[0] if len(v) == 1 else jnp.concatenate(v))
                         for v in (means, variances))
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return ys if isinstance(x, list) else ys[0]


def concat_relu(x):
    """`nn.relu` of an array, or of the concatenation (last axis) of a list of them, as
    `BatchNorm2d` returns for DenseNet's feature maps."""
    if isinstance(x, list):
        x = [nn.relu(p) for p in x]
        return ops.concat_channels(x)
    return nn.relu(x)


def relu_parts(x):
    """`nn.relu` of an array, or of each array of a list (a list still)."""
    return [nn.relu(p) for p in x] if isinstance(x, list) else nn.relu(x)


def module_class(module: ModuleDef):
    """The class a `ModuleDef` makes: the module class itself, or that of a (nested)
    `functools.partial` of one."""
    while isinstance(module, partial):
        module = module.func
    return module


def takes_parts(norm: ModuleDef) -> bool:
    """Whether `norm` is `BatchNorm2d`, which accepts a list of feature maps for their
    concatenation."""
    cls = module_class(norm)
    return isinstance(cls, type) and issubclass(cls, BatchNorm2d)


class Dense(nn.Module):
    """`nn.Linear(in, features)`; the kernel is stored (in, out), the transpose of PyTorch's."""

    features: int
    dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        fan_in = x.shape[-1]
        kernel = self.param("kernel", xavier_uniform, (fan_in, self.features))
        bias = self.param("bias", torch_bias_init(fan_in), (self.features,))
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return jnp.dot(x, kernel, precision=self.precision) + bias


def flatten(x):
    """`nn.Flatten()`; NHWC order, so a ported first Linear needs its rows permuted."""
    return x.reshape(x.shape[0], -1)


def check_input(x, min_side: int, network: str):
    """Rejects what the book's network could not take, before anything is traced further."""
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 4:
        raise ValueError(
            f"{network} expects NHWC input of rank 4 (N, H, W, 1), got shape {shape}"
        )
    if shape[-1] != 1:
        raise ValueError(
            f"{network} expects 1 input channel (NHWC, Fashion-MNIST), got shape {shape} "
            f"with {shape[-1]} channels"
        )
    if min(shape[1], shape[2]) < min_side:
        raise ValueError(
            f"{network} needs input sides of at least {min_side} pixels, got "
            f"{shape[1]}x{shape[2]}"
        )


def run_layers(module: nn.Module, layers: Sequence[tuple[str, Callable]], x):
    """Applies `layers` in order, as the book's `nn.Sequential` does (and as `Sequential`, a
    `Conv` followed by `nn.relu` in one call).

    Each output is sown into `intermediates` under `NN:BookName:module_name`, so that `summary`
    can print the book's `for layer in net: print(layer.__class__.__name__, X.shape)`; while
    they are recorded, every layer runs on its own.
    """
    record = module.is_mutable_collection("intermediates")
    for i, call in _calls([layer for _, layer in layers], fuse=not record):
        x = call(x)
        if record:
            book_name, layer = layers[i]
            owner = layer.name if isinstance(layer, nn.Module) else ""
            module.sow("intermediates", f"{i:02d}:{book_name}:{owner}", x)
    return x
