"""oneDNN convolutions for XLA:CPU, as FFI custom calls (`_onednn.cc`).

jaxlib's XLA:CPU computes convolutions with Eigen kernels, 1.2-1.7x slower than oneDNN's on these
networks' layers, and its kernel gradients read transposed copies of both operands
(benchmarks/xla_cpu_study.md). This module compiles `_onednn.cc` against the system's oneDNN
(Debian: `apt-get install libdnnl-dev`) once per machine (native.py), into
`~/.cache/flaxcnn/onednn` (or `$FLAXCNN_CACHE_DIR/onednn`), loads it and registers four CPU
custom calls; `conv` is a differentiable convolution built on them, `conv_relu` the same with
its bias and ReLU applied inside oneDNN's forward pass. The same library holds two kernels of
flaxcnn's own for the max-pool's training passes (`max_pool_with_argmax`, `max_pool_backward`;
`ops.max_pool` takes them on a CPU).

`FLAXCNN_ONEDNN_PREFIX` names another oneDNN installation (its `include/` and `lib/`, e.g. one
built from source) to compile and link against instead of the system's.

It is optional. `available()` is False, and `reason()` says why, when there is no C++ compiler,
no oneDNN headers, or `FLAXCNN_NO_ONEDNN` is set (any non-empty value but `0`); the models then
keep XLA's convolution. Only float32 on the CPU takes this path.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from flaxcnn import native, ops

OPT_OUT_ENV = "FLAXCNN_NO_ONEDNN"
PREFIX_ENV = "FLAXCNN_ONEDNN_PREFIX"
SOURCE = Path(__file__).with_name("_onednn.cc")
TARGETS = {  # custom-call target -> handler symbol in _onednn.cc
    "flaxcnn_onednn_conv_forward": "FlaxcnnConvForward",
    "flaxcnn_onednn_conv_forward_bias_relu": "FlaxcnnConvForwardBiasRelu",
    "flaxcnn_onednn_conv_backward_data": "FlaxcnnConvBackwardData",
    "flaxcnn_onednn_conv_backward_weights": "FlaxcnnConvBackwardWeights",
    "flaxcnn_max_pool_forward": "FlaxcnnMaxPoolForward",
    "flaxcnn_max_pool_backward": "FlaxcnnMaxPoolBackward",
    "flaxcnn_concat_channels": "FlaxcnnConcatChannels",
}
_HEADER_DIRS = ("/usr/include", "/usr/local/include", sys.prefix + "/include")


def _compiler() -> str | None:
    return native.compiler()


def _prefix() -> str | None:
    return os.environ.get(PREFIX_ENV) or None


def _dnnl_include() -> str | None:
    prefix = _prefix()
    for d in (os.path.join(prefix, "include"),) if prefix else _HEADER_DIRS:
        if os.path.exists(os.path.join(d, "oneapi", "dnnl", "dnnl.hpp")):
            return d
    return None


def build_flags() -> tuple[list[str], list[str], list[bytes]]:
    """What compiling against oneDNN takes: (include flags, link flags, what the library's name
    hashes: the installed version and configuration headers, a prefix's path). Raises
    RuntimeError naming what is missing."""
    include, prefix = _dnnl_include(), _prefix()
    if include is None:
        where = f" under ${PREFIX_ENV}={prefix}" if prefix else ""
        raise RuntimeError(f"no oneDNN headers{where} (oneapi/dnnl/dnnl.hpp; Debian: libdnnl-dev)")
    libs = ["-ldnnl"]
    if prefix:  # linked by rpath, from lib/ or (CMake's GNUInstallDirs on some systems) lib64/
        lib = next((d for d in (os.path.join(prefix, s) for s in ("lib", "lib64"))
                    if glob.glob(os.path.join(d, "libdnnl.so*"))), os.path.join(prefix, "lib"))
        libs = ["-L", lib, f"-Wl,-rpath,{lib}", "-ldnnl"]
    headers = [os.path.join(include, "oneapi", "dnnl", h) for h in ("dnnl_version.h",
                                                                    "dnnl_config.h")]
    depends = [*(Path(h).read_bytes() for h in headers if os.path.exists(h)),
               (prefix or "").encode()]
    return ["-I", include], libs, depends


def build(force: bool = False) -> Path:
    """Compile `_onednn.cc` once (`force`: again) and return the library's path. Raises
    RuntimeError with the compiler's message, or naming what is missing."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX)")
    includes, libs, depends = build_flags()
    return native.compile_library("onednn", SOURCE, cxx, includes=includes, libs=libs,
                                  depends=depends, what="oneDNN's convolutions", force=force)


# `build`, looked up when first needed (tests replace it)
_library = native.Library(lambda force=False: build(force), TARGETS, OPT_OUT_ENV)


def available() -> bool:
    """Whether the oneDNN convolutions are built and registered (builds them on first call)."""
    return _library.available()


def reason() -> str:
    """Why `available()` is what it is."""
    return _library.reason()


# Whether a call splits its batch over XLA's own thread pool, oneDNN running each part on one
# thread (the default), or runs on oneDNN's own (OpenMP) threads: the two thread runtimes on the
# same cores slowed each other down (`_onednn.cc`; benchmarks/xla_cpu_study.md). Read when a
# step is traced.
XLA_POOL = True


def split_calls() -> int:
    """How many convolution calls of this process have split their batch over XLA's thread pool
    (`XLA_POOL`); calls whose batch has no divisor from 2 up to the pool's thread count (an odd
    batch on two threads), and layers with more weights than input values, run on oneDNN's own
    threads instead (`_onednn.cc`). For tests and diagnostics."""
    if not available():
        return 0
    fn = _library.lib.FlaxcnnOnednnSplitCalls
    fn.restype = ctypes.c_int64
    return fn()


def _require():
    if not available():
        raise RuntimeError(f"flaxcnn's oneDNN convolutions are not available: {reason()}")


def _int64s(**attrs):
    """FFI attributes, every one an int64 (the handlers' `Attr<int64_t>`)."""
    return {k: np.int64(v) for k, v in attrs.items()}


def _attrs(strides, padding, **more):
    (sh, sw), ((pt, pb), (pl, pr)) = strides, padding
    return _int64s(sh=sh, sw=sw, pt=pt, pb=pb, pl=pl, pr=pr, xla_pool=XLA_POOL, **more)


def _call(target, shape, *operands, strides, padding, **more):
    out = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.ffi.ffi_call(target, out, vmap_method="sequential")(
        *operands, **_attrs(strides, padding, **more))


def _out_shape(x_shape, k_shape, strides, padding):
    (n, h, w, _), (kh, kw, _, o) = x_shape, k_shape
    (sh, sw), ((pt, pb), (pl, pr)) = strides, padding
    return n, (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1, o


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(x, kernel, strides, padding):
    """`lax.conv_general_dilated(x, kernel, strides, padding, ("NHWC", "HWIO", "NHWC"))` for
    float32 on a CPU, by oneDNN, forward and backward. `strides` is (sh, sw), `padding`
    ((top, bottom), (left, right)). Raises RuntimeError where `available()` is False."""
    _require()
    return _call("flaxcnn_onednn_conv_forward",
                 _out_shape(x.shape, kernel.shape, strides, padding), x, kernel,
                 strides=strides, padding=padding)


def _conv_fwd(x, kernel, strides, padding):
    return conv(x, kernel, strides, padding), (x, kernel)


def _conv_bwd(strides, padding, res, g):
    x, kernel = res
    dx = _call("flaxcnn_onednn_conv_backward_data", x.shape, g, kernel,
               strides=strides, padding=padding)
    dk = _call("flaxcnn_onednn_conv_backward_weights", kernel.shape, x, g,
               strides=strides, padding=padding)
    return dx, dk


conv.defvjp(_conv_fwd, _conv_bwd)


def _conv_relu(x, kernel, bias, strides, padding, check_finite):
    _require()
    if bias.shape != kernel.shape[-1:]:
        raise ValueError(f"conv_relu: bias of shape {bias.shape} for a kernel of shape "
                         f"{kernel.shape} (one value per output channel)")
    return _call("flaxcnn_onednn_conv_forward_bias_relu",
                 _out_shape(x.shape, kernel.shape, strides, padding), x, kernel, bias,
                 strides=strides, padding=padding, check_finite=check_finite)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def conv_relu(x, kernel, bias, strides, padding):
    """`relu(conv(x, kernel, strides, padding) + bias)`, the bias and ReLU applied by oneDNN as it
    writes the convolution's output (post-ops), where XLA would read and write the output once
    more. The backward pass masks the gradient where the output is 0 (ReLU's derivative at 0 is
    0, as `jax.nn.relu`'s) and takes `conv`'s two gradients.

    One difference: oneDNN's ReLU gives 0 for NaN, where `jax.nn.relu` keeps NaN. So that a
    diverged layer still shows in the loss, the differentiated forward pass first checks the
    kernel and bias and, if either holds an Inf or NaN, adds the bias and applies a ReLU that
    keeps NaN itself (`_onednn.cc`). A NaN from the input still comes out 0, as it does in
    inference (no check there: scanning the weights costs about 1 ms in 8 MB)."""
    return _conv_relu(x, kernel, bias, strides, padding, check_finite=False)


def _conv_relu_fwd(x, kernel, bias, strides, padding):
    y = _conv_relu(x, kernel, bias, strides, padding, check_finite=True)
    return y, (x, kernel, y)


def _conv_relu_bwd(strides, padding, res, g):
    x, kernel, y = res
    g = jnp.where(y > 0, g, 0).astype(g.dtype)
    return *_conv_bwd(strides, padding, (x, kernel), g), g.sum((0, 1, 2))


conv_relu.defvjp(_conv_relu_fwd, _conv_relu_bwd)


# Whether the max-pool kernels take their AVX2 loops where the CPU has AVX2 (False: one channel
# at a time, as on a CPU without; for tests). Read when a step is traced.
MAX_POOL_SIMD = True


def _window_attrs(window, strides, padding):
    (kh, kw), (sh, sw), (ph, pw) = window, strides, padding
    return _int64s(kh=kh, kw=kw, sh=sh, sw=sw, ph=ph, pw=pw, simd=MAX_POOL_SIMD)


def max_pool_with_argmax(x, window, strides, padding):
    """The max-pool of float32 NHWC `x` (`ops.max_pool`'s values) and, for each output, the
    offset of its maximum in the window (int8, row-major), by `_onednn.cc`'s kernel (not
    oneDNN's: PyTorch's choice among ties and NaNs). `window`, `strides`, `padding`: (h, w)
    pairs, symmetric padding; at most 127 window elements. Not differentiable itself: the
    forward pass of `ops.max_pool`'s gradient on a CPU."""
    _require()
    n, c = x.shape[0], x.shape[3]
    ho, wo = ops._out_hw(x.shape[1:3], window, strides, padding)
    outs = (jax.ShapeDtypeStruct((n, ho, wo, c), jnp.float32),
            jax.ShapeDtypeStruct((n, ho, wo, c), jnp.int8))
    return jax.ffi.ffi_call("flaxcnn_max_pool_forward", outs, vmap_method="sequential")(
        x, **_window_attrs(window, strides, padding))


def max_pool_backward(g, argmax, in_hw, window, strides, padding):
    """The max-pool's input gradient from the outputs' gradient `g` and `max_pool_with_argmax`'s
    offsets: each output's gradient goes whole to its window's maximum, summed in PyTorch's
    order (bit for bit its channels-last kernel's)."""
    _require()
    n, c = g.shape[0], g.shape[3]
    out = jax.ShapeDtypeStruct((n, *in_hw, c), jnp.float32)
    return jax.ffi.ffi_call("flaxcnn_max_pool_backward", out, vmap_method="sequential")(
        g, argmax, **_window_attrs(window, strides, padding))


def concat_channels(*xs):
    """`jnp.concatenate(xs, axis=-1)` of float32 arrays by `_onednn.cc`'s kernel (each pixel's
    channels copied operand by operand): about twice as fast as XLA:CPU's own on DenseNet's and
    GoogLeNet's maps. Not differentiable itself (`ops.concat_channels` is)."""
    _require()
    out = jax.ShapeDtypeStruct((*xs[0].shape[:-1], sum(x.shape[-1] for x in xs)), jnp.float32)
    return jax.ffi.ffi_call("flaxcnn_concat_channels", out, vmap_method="sequential")(*xs)


if __name__ == "__main__":  # what .ci/setup runs: build now, say whether it worked, never fail
    print(f"oneDNN convolutions: {reason()}" if available()
          else f"oneDNN convolutions not available, XLA's are used: {reason()}")
