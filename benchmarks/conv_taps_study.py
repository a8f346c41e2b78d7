"""Stride-1 padded convolutions on small maps, four ways, alone: XLA's convolution, flaxcnn's
oneDNN call (Debian's oneDNN 2.6), `ops.conv_taps` (one matrix product per kernel tap over the
outputs it reaches inside the image) and PyTorch's oneDNN (3.12 in torch 2.13, channels_last).

The evidence for `layers._TAPS_MAX_SIDE` and `_TAPS_MIN_FEATURES` (benchmarks/xla_cpu_study.md,
"The Zen 4, session 29"): on a 3x3 map a padded 3x3 kernel does 32 of its 81 multiplies per
position pair with the padding, which the taps skip. Forward (eval) and forward with both
gradients (train), medians of interleaved samples in one process, ms:

    python benchmarks/conv_taps_study.py
    python benchmarks/conv_taps_study.py --batch 128 --shapes "3 512 512 3"
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import harness  # (importing it restarts with the benchmarks' malloc settings, as train.py runs)

# side, in channels, out channels, kernel (padding kernel // 2, stride 1)
SHAPES = ["3 512 512 3", "3 192 384 3", "3 160 320 3", "3 256 32 3", "6 256 256 3",
          "3 48 128 5"]


def arms(padding):
    from flaxcnn import onednn, ops

    pd = ((padding, padding), (padding, padding))
    out = {"XLA": lambda x, k: ops.conv_nhwc(x, k, 1, padding)}
    if onednn.available():
        out["oneDNN 2.6"] = lambda x, k: onednn.conv(x, k, (1, 1), pd)
    out["conv_taps"] = lambda x, k: ops.conv_taps(x, k, padding)
    return out


def study(batch, side, c, o, k, train, rounds, calls):
    import jax
    import numpy as np
    import torch

    p = k // 2
    x = jax.random.normal(jax.random.key(0), (batch, side, side, c))
    w = jax.random.normal(jax.random.key(1), (k, k, c, o)) * (1 / (k * k * c)) ** 0.5
    g = jax.random.normal(jax.random.key(2), (batch, side, side, o))

    def differentiated(f):
        def step(x, w, g):
            y, vjp = jax.vjp(f, x, w)
            return y, vjp(g)
        return jax.jit(step)

    fns = {n: differentiated(f) if train else jax.jit(f) for n, f in arms(p).items()}
    args = (x, w, g) if train else (x, w)
    ref = fns["XLA"](*args)
    for n, f in fns.items():  # every arm computes the same thing
        for a, b in zip(jax.tree.leaves(f(*args)), jax.tree.leaves(ref), strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * float(np.abs(b).max()), err_msg=n)
    xt = torch.tensor(np.asarray(x)).permute(0, 3, 1, 2).contiguous(
        memory_format=torch.channels_last).requires_grad_(train)
    wt = torch.tensor(np.asarray(w)).permute(3, 2, 0, 1).contiguous(
        memory_format=torch.channels_last).requires_grad_(train)
    gt = torch.tensor(np.asarray(g)).permute(0, 3, 1, 2).contiguous(
        memory_format=torch.channels_last)

    def torch_call():
        if train:
            torch.conv2d(xt, wt, padding=p).backward(gt)
            xt.grad = wt.grad = None
        else:
            with torch.inference_mode():
                torch.conv2d(xt, wt, padding=p)

    def sample(run):  # one timed sample: ms per call over `calls` calls
        def timed():
            t = time.perf_counter()
            for _ in range(calls):
                run()
            return (time.perf_counter() - t) / calls * 1e3
        return timed

    runs = {n: sample(lambda f=f: jax.block_until_ready(f(*args))) for n, f in fns.items()}
    runs["PyTorch oneDNN"] = sample(torch_call)
    times = harness.interleave(runs, rounds)
    return {n: statistics.median(v) for n, v in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--shapes", nargs="+", default=SHAPES, help='"side in out kernel" each')
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--calls", type=int, default=5)
    args = p.parse_args(argv)
    harness.set_torch_threads(harness.set_threads(None))
    header = None
    for shape in args.shapes:
        side, c, o, k = map(int, shape.split())
        for train in (False, True):
            r = study(args.batch, side, c, o, k, train, args.rounds, args.calls)
            if header is None:
                header = list(r)
                print("| layer (batch) | pass | " + " | ".join(header) + " |")
                print("|---|---|" + "---|" * len(header))
            print(f"| {k}x{k} {c}->{o} @{side} ({args.batch}) | "
                  f"{'fwd+bwd' if train else 'fwd'} | "
                  + " | ".join(f"{r[n]:.2f}" for n in header) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
