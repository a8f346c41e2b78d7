"""One convolution layer of the book's networks, forward and forward+backward, several ways on
XLA:CPU: XLA's convolution (`ops.conv_nhwc`), im2col (k*k strided slices concatenated, one
GEMM; autodiff gives the gradients), for one input channel `ops.conv_one_channel`, and for a
few input channels `ops.conv_few_channels` (input gradient as a GEMM and a col2im), for 1x1
layers `ops.conv_1x1` (kernel gradient as one GEMM over N*H*W), and for 3x3 layers of stride 1
Winograd's F(2x2, 3x3) (`winograd_3x3`).

The evidence behind flaxcnn's convolution choices (benchmarks/xla_cpu_study.md): im2col loses
to XLA's convolution at every shape here; k*k multiply-adds win for small one-channel kernels;
the GEMM input gradient wins for LeNet's unpadded second layer only; an image smaller than the
kernel needs the padded copy (XLA:CPU swaps image and kernel otherwise); Winograd loses
forward+backward on every 3x3 layer here (its tile transforms are memory-bound).

    python benchmarks/conv_study.py                 # all shapes
    python benchmarks/conv_study.py resnet lenet    # shapes whose name contains a word
"""

from __future__ import annotations

import argparse
import sys
import time

# name: (batch, side, in channels, out channels, kernel, stride, padding)
SHAPES = {
    "alexnet conv1 11x11/4, 1->96 @224": (32, 224, 1, 96, 11, 4, 1),
    "alexnet conv2 5x5, 96->256 @26": (32, 26, 96, 256, 5, 1, 2),
    "alexnet conv3 3x3, 256->384 @12": (32, 12, 256, 384, 3, 1, 1),
    "vgg conv1 3x3, 1->16 @224": (32, 224, 1, 16, 3, 1, 1),
    "vgg conv2 3x3, 16->32 @112": (32, 112, 16, 32, 3, 1, 1),
    "vgg 3x3, 64 @56": (32, 56, 64, 64, 3, 1, 1),
    "vgg 3x3, 128 @28": (32, 28, 128, 128, 3, 1, 1),
    "resnet stem 7x7/2, 1->64 @96": (32, 96, 1, 64, 7, 2, 3),
    "resnet 3x3, 64 @24": (32, 24, 64, 64, 3, 1, 1),
    "resnet 3x3, 128 @12": (32, 12, 128, 128, 3, 1, 1),
    "resnet 3x3, 256 @6": (32, 6, 256, 256, 3, 1, 1),
    "resnet 3x3, 512 @3": (32, 3, 512, 512, 3, 1, 1),
    "googlenet 3x3, 96->128 @12": (32, 12, 96, 128, 3, 1, 1),
    "googlenet 5x5, 16->32 @12": (32, 12, 16, 32, 5, 1, 2),
    "lenet conv1 5x5, 1->6 @28": (256, 28, 1, 6, 5, 1, 2),
    "lenet conv2 5x5, 6->16 @14": (256, 14, 6, 16, 5, 1, 0),
    "lenet_bn conv1 5x5, 1->6 @28, unpadded": (256, 28, 1, 6, 5, 1, 0),
    "lenet_bn conv2 5x5, 6->16 @12": (256, 12, 6, 16, 5, 1, 0),
    "lenet_bn conv2 padded by 2": (256, 12, 6, 16, 5, 1, 2),
    "16->16 5x5 @12": (256, 12, 16, 16, 5, 1, 0),
    "googlenet 5x5, 48->128 @3": (32, 3, 48, 128, 5, 1, 2),
    "nin 1x1, 96 @54": (32, 54, 96, 96, 1, 1, 0),
    "nin 1x1, 256 @26": (32, 26, 256, 256, 1, 1, 0),
    "nin 1x1, 384 @12": (32, 12, 384, 384, 1, 1, 0),
    "googlenet 1x1, 64 @24": (32, 24, 64, 64, 1, 1, 0),
    "googlenet 1x1, 480->192 @6": (32, 6, 480, 192, 1, 1, 0),
}


def im2col(x, w, s, p):
    import jax.numpy as jnp
    from jax import lax

    k = w.shape[0]
    n, h, wd, c = x.shape
    ho, wo = (h + 2 * p - k) // s + 1, (wd + 2 * p - k) // s + 1
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    cols = [lax.slice(xp, (0, i, j, 0), (n, i + s * (ho - 1) + 1, j + s * (wo - 1) + 1, c),
                      (1, s, s, 1)) for i in range(k) for j in range(k)]
    return jnp.dot(jnp.concatenate(cols, axis=-1), w.reshape(k * k * c, -1))


# Winograd F(2x2, 3x3) (Lavin & Gray 2016): Y = A' [(G g G') * (B' d B)] A per 4x4 input tile d
_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))
_AT = ((1, 1, 1, 0), (0, 1, -1, -1))


def _mix(parts, matrix):
    """[sum_a m[k][a] parts[a] for each row k], skipping zero coefficients."""
    out = []
    for row in matrix:
        terms = [p if m == 1 else -p if m == -1 else m * p for m, p in zip(row, parts, strict=True)
                 if m]
        total = terms[0]
        for t in terms[1:]:
            total = total + t
        out.append(total)
    return out


def winograd_3x3(x, w, p):
    """A 3x3 stride-1 convolution as 16 GEMMs with 1/2.25 of the direct method's multiplies,
    between an input transform of overlapping 4x4 tiles (taken as 2x2 blocks of the padded
    input, so all slices are contiguous) and a 2x2 output transform; autodiff gives the
    gradients through the same transforms."""
    import jax.numpy as jnp
    import numpy as np

    n, h, wd, c = x.shape
    o = w.shape[-1]
    ho, wo = h + 2 * p - 2, wd + 2 * p - 2
    th, tw = -(-ho // 2), -(-wo // 2)
    xp = jnp.pad(x, ((0, 0), (p, 2 * th + 2 - h - p), (p, 2 * tw + 2 - wd - p), (0, 0)))
    blocks = xp.reshape(n, th + 1, 2, tw + 1, 2, c)
    rows = _mix([blocks[:, a // 2 : a // 2 + th, a % 2] for a in range(4)], _BT)
    v = [t.reshape(n * th * tw, c) for r in rows
         for t in _mix([r[:, :, b // 2 : b // 2 + tw, b % 2] for b in range(4)], _BT)]
    g = np.asarray(_G, np.float32)
    u = jnp.einsum("ka,abio,lb->klio", g, w, g).reshape(16, c, o)
    m = [jnp.dot(v[k], u[k]) for k in range(16)]  # [tiles, o] each
    t = [_mix([m[4 * k + l] for k in range(4)], _AT) for l in range(4)]  # t[l][r]
    y = [_mix([t[l][r] for l in range(4)], _AT) for r in range(2)]  # y[r][s]: (2i+r, 2j+s)
    y = jnp.stack([jnp.stack(r, axis=0) for r in y], axis=0)  # [2, 2, tiles, o]
    y = y.reshape(2, 2, n, th, tw, o).transpose(2, 3, 0, 4, 1, 5)
    return y.reshape(n, 2 * th, 2 * tw, o)[:, :ho, :wo]


def median_ms(f, *a, n=7):
    import jax

    jax.block_until_ready(f(*a))
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(f(*a))
        ts.append(time.perf_counter() - t)
    return sorted(ts)[n // 2] * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("select", nargs="*", help="words; shapes whose name contains one")
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp

    import flaxcnn  # noqa: F401 - XLA:CPU defaults
    from flaxcnn import ops

    print("| layer (batch) | XLA conv fwd / fwd+bwd ms | im2col fwd / fwd+bwd ms "
          "| k*k multiply-adds fwd / fwd+bwd ms | GEMM input gradient fwd / fwd+bwd ms "
          "| padded copy fwd / fwd+bwd ms | 1x1 kernel-gradient GEMM fwd / fwd+bwd ms "
          "| Winograd F(2x2, 3x3) fwd / fwd+bwd ms |\n|---|---|---|---|---|---|---|---|")
    for name, (n, h, c, o, k, s, pad) in SHAPES.items():
        if args.select and not any(w in name for w in args.select):
            continue
        x = jax.random.normal(jax.random.key(0), (n, h, h, c))
        w = jax.random.normal(jax.random.key(1), (k, k, c, o)) * 0.05
        impls = {"xla": lambda x, w, s=s, pad=pad: ops.conv_nhwc(x, w, s, pad),
                 "im2col": lambda x, w, s=s, pad=pad: im2col(x, w, s, pad)}
        if c == 1 and s == 1:
            impls["shift"] = lambda x, w, pad=pad: ops.conv_one_channel(x, w, pad)
        if 1 < c <= 16 and s == 1:
            impls["few"] = lambda x, w, pad=pad: ops.conv_few_channels(x, w, pad)
        if h < k and 0 < pad < k and s == 1:
            impls["small"] = lambda x, w, pad=pad: ops.conv_small_input(x, w, pad)
        if k == 1 and s == 1 and pad == 0:
            impls["1x1"] = ops.conv_1x1
        if k == 3 and s == 1 and c > 1:
            impls["winograd"] = lambda x, w, pad=pad: winograd_3x3(x, w, pad)
            ref, got = jax.jit(impls["xla"])(x, w), jax.jit(impls["winograd"])(x, w)
            err = float(jnp.abs(got - ref).max() / jnp.abs(ref).max())
            assert err < 1e-5, f"Winograd differs from XLA's convolution by {err:.1e} on {name}"
        # The first layer's input needs no gradient; the others' do.
        argnums = (1,) if c == 1 else (0, 1)
        cells = {}
        for key, f in impls.items():
            fwd = jax.jit(f)
            grad = jax.jit(jax.grad(lambda x, w, f=f: jnp.sum(jnp.sin(f(x, w))), argnums))
            cells[key] = f"{median_ms(fwd, x, w):.1f} / {median_ms(grad, x, w):.1f}"
        print(f"| {name} ({n}) | {cells['xla']} | {cells['im2col']} | "
              f"{cells.get('shift', '-')} | {cells.get('few', '-')} | {cells.get('small', '-')} | "
              f"{cells.get('1x1', '-')} | {cells.get('winograd', '-')} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
