"""Every convolution of the book's networks, alone: XLA:CPU's (as flaxcnn runs it) against
PyTorch's oneDNN, forward pass, input gradient and kernel gradient timed separately.

How much of the JAX/PyTorch gap in benchmarks/results/cpu-*.md is the convolution kernels
themselves? Each network's convolution layers are read from the Flax module (every
`models.Conv` call, with its input shape), and each distinct layer is timed: XLA's program is
the one flaxcnn compiles for it on a CPU (`layers._cpu_convolution`'s choice, else XLA's
convolution), PyTorch's is `conv2d`, `nn.grad.conv2d_input` and `nn.grad.conv2d_weight` on
channels_last tensors (oneDNN). Same shapes, same thread count, the two interleaved (A/B/A/B,
median of --rounds samples). Per network the layers' times are summed per training step
(forward + input gradient + kernel gradient; no input gradient for a layer reading the image)
and set against the step times in the latest bench_vs_torch results.

    python benchmarks/conv_vs_onednn.py                       # the seven networks
    python benchmarks/conv_vs_onednn.py --networks densenet --rounds 3

Writes benchmarks/results/conv_vs_onednn_<device kind>.{json,md}.
"""

from __future__ import annotations

import argparse
import collections
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import harness

NETWORKS = ["alexnet", "vgg", "nin", "googlenet", "lenet_bn", "resnet18", "densenet"]
PARTS = ("fwd", "dx", "dw")


def conv_layers(name: str, batch: int, side: int) -> collections.Counter:
    """(input shape, kernel, stride, padding, features) -> count, for every `models.Conv` call
    of the network (abstractly evaluated: nothing is computed)."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from flaxcnn import models

    model = models.create(name)
    seen = collections.Counter()

    calls = []  # the Conv calls in progress: [module, layer, counted]

    def record(next_fun, args, kwargs, context):
        m = context.module
        if not (isinstance(m, models.Conv) and context.method_name == "__call__"):
            return next_fun(*args, **kwargs)
        if calls and calls[-1][0] is m:  # a call that prepares Conv's (densenet.PooledConv)
            calls[-1][2] = False
        shape = getattr(args[0], "shape", None)  # (a PooledConv's list of maps: not counted)
        call = [m, (shape and tuple(shape), m.kernel_size, m.strides, m.padding, m.features),
                shape is not None]
        calls.append(call)
        try:
            return next_fun(*args, **kwargs)
        finally:
            calls.pop()
            if call[2]:
                seen[call[1]] += 1

    x = jnp.zeros((batch, side, side, 1), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    return seen


def _per_call(f, target_s: float) -> callable:
    """A runner for `harness.interleave`: calls f enough times to last about target_s and
    returns seconds per call."""
    f()
    t = time.perf_counter()
    f()
    reps = max(1, round(target_s / max(time.perf_counter() - t, 1e-6)))

    def run():
        t = time.perf_counter()
        for _ in range(reps):
            f()
        return (time.perf_counter() - t) / reps

    return run


def layer_runners(layer, target_s: float) -> dict:
    """'xla fwd', 'torch fwd', ... -> runner, for one layer."""
    import jax
    import torch
    from torch.nn import functional as F
    from torch.nn import grad as tgrad

    from flaxcnn import ops
    from flaxcnn.models import layers

    (n, h, w, c), k, s, p, o = layer
    x = jax.random.normal(jax.random.key(0), (n, h, w, c))
    kern = jax.random.normal(jax.random.key(1), (k, k, c, o)) * 0.05
    impl = layers._cpu_convolution(jax.ShapeDtypeStruct(x.shape, x.dtype), k, s, p,
                                   features=o)
    if impl is None:
        def impl(x, kern):
            return ops.conv_nhwc(x, kern, s, p)
    g = jax.random.normal(jax.random.key(2), jax.eval_shape(impl, x, kern).shape)
    fwd = jax.jit(impl)
    dx = jax.jit(lambda x, kern, g: jax.vjp(lambda x: impl(x, kern), x)[1](g)[0])
    dw = jax.jit(lambda x, kern, g: jax.vjp(lambda kern: impl(x, kern), kern)[1](g)[0])

    cl = torch.channels_last
    tx = torch.randn(n, c, h, w).contiguous(memory_format=cl)
    tw = (torch.randn(o, c, k, k) * 0.05).contiguous(memory_format=cl)
    tg = torch.randn(n, o, *g.shape[1:3]).contiguous(memory_format=cl)

    def no_grad(f):
        def run():
            with torch.no_grad():
                return f()
        return run

    funcs = {
        "xla fwd": lambda: fwd(x, kern).block_until_ready(),
        "torch fwd": no_grad(lambda: F.conv2d(tx, tw, stride=s, padding=p)),
        "xla dw": lambda: dw(x, kern, g).block_until_ready(),
        "torch dw": no_grad(lambda: tgrad.conv2d_weight(tx, tw.shape, tg, stride=s, padding=p)),
    }
    if c > 1:  # a layer reading the one-channel image needs no input gradient
        funcs["xla dx"] = lambda: dx(x, kern, g).block_until_ready()
        funcs["torch dx"] = no_grad(
            lambda: tgrad.conv2d_input(tx.shape, tw, tg, stride=s, padding=p))
    return {name: _per_call(f, target_s) for name, f in funcs.items()}


def gflop(layer) -> float:
    """Multiply-adds (x2) of the layer's forward pass; each gradient costs the same."""
    (n, h, w, c), k, s, p, o = layer
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    return 2 * n * ho * wo * k * k * c * o / 1e9


def layer_name(layer) -> str:
    (n, h, w, c), k, s, p, o = layer
    stride = f"/{s}" if s > 1 else ""
    return f"{k}x{k}{stride} {c}->{o} @{h}" + (f" pad {p}" if p else "")


def step_times(results_dir: Path, kind: str) -> dict:
    """network -> (batch, JAX ms, best torch ms, best torch mode) per training step, from the
    latest bench_vs_torch results for this device kind (if any)."""
    path = results_dir / f"{kind}.json"
    if not path.exists():
        return {}
    report = json.loads(path.read_text())
    out = {}
    for r in report.get("results", []):
        rates = {m: v["median"] for m, v in r.get("train", {}).items() if isinstance(v, dict)
                 and "median" in v}
        if "jax" not in rates or len(rates) < 2:
            continue
        best = max((m for m in rates if m != "jax"), key=rates.get)
        out[r["network"]] = {
            "batch": r["batch"], "jax_ms": 1e3 * r["batch"] / rates["jax"],
            "torch_ms": 1e3 * r["batch"] / rates[best], "torch_mode": best,
            "commit": report.get("machine", {}).get("git_commit"), "date": report.get("date"),
        }
    return out


def bench_network(name, batch, side, rounds, target_s, log):
    layers = conv_layers(name, batch, side)
    rows = []
    for layer, count in layers.items():
        runners = layer_runners(layer, target_s)
        samples = harness.interleave(runners, rounds, warmup=0)
        ms = {key: 1e3 * statistics.median(v) for key, v in samples.items()}
        spread = {key: [1e3 * min(v), 1e3 * max(v)] for key, v in samples.items()}
        row = {"layer": layer_name(layer), "shape": list(layer[0]), "kernel": layer[1],
               "stride": layer[2], "padding": layer[3], "features": layer[4], "count": count,
               "gflop": gflop(layer), "ms": ms, "ms_min_max": spread}
        rows.append(row)
        log(f"  {row['layer']} x{count}: " + ", ".join(
            f"{part} {ms['xla ' + part]:.2f}/{ms['torch ' + part]:.2f}"
            for part in PARTS if "xla " + part in ms) + " ms (XLA/oneDNN)")
    totals = {f"{fw} {part}": sum(r["count"] * r["ms"].get(f"{fw} {part}", 0.0) for r in rows)
              for fw in ("xla", "torch") for part in PARTS}
    for fw in ("xla", "torch"):
        totals[fw] = sum(totals[f"{fw} {part}"] for part in PARTS)
    return {"network": name, "batch": batch, "side": side, "layers": rows, "totals_ms": totals}


def markdown(report) -> str:
    lines = [
        f"# Convolutions alone: XLA:CPU (flaxcnn) against oneDNN (PyTorch), "
        f"{report['device_kind']}", "",
        f"Machine: {report['machine']['cpu']}, {report['machine']['cpus_used']} threads for both. "
        f"jax {report['machine']['jax']}, torch {report['machine'].get('torch')}. "
        f"XLA_FLAGS: `{report['machine']['XLA_FLAGS']}`. Commit {report['machine']['git_commit']}.",
        f"Date: {report['date']}. Command: `{report['command']}`. Load average at start "
        f"{report['load_start']}, at end {report['load_end']}.", "",
        "Every convolution layer of each network, timed alone (median of interleaved samples): "
        "XLA's program is the one flaxcnn compiles for the layer on a CPU, PyTorch's is oneDNN on "
        "channels_last tensors. fwd = forward pass, dx = input gradient (none for a layer "
        "reading the image), dw = kernel gradient. A step's convolutions: each layer's "
        "fwd + dx + dw times its count. Step times: the latest bench_vs_torch results "
        "(JAX's whole training step and PyTorch's best mode's).", "",
        "## Per network (ms per training step)", "",
        "| network | batch | XLA convolutions fwd / dx / dw = total | oneDNN fwd / dx / dw = "
        "total | oneDNN speed-up on the convolutions | JAX step (bench_vs_torch) | best torch "
        "step | JAX step less XLA's convolutions | torch step less oneDNN's |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        t = r["totals_ms"]
        st = r.get("step")
        cells = (f"{st['jax_ms']:.0f} | {st['torch_ms']:.0f} ({st['torch_mode']}) | "
                 f"{st['jax_ms'] - t['xla']:.0f} | {st['torch_ms'] - t['torch']:.0f}"
                 if st else "- | - | - | -")
        lines.append(
            f"| {r['network']} | {r['batch']} | {t['xla fwd']:.1f} / {t['xla dx']:.1f} / "
            f"{t['xla dw']:.1f} = **{t['xla']:.1f}** | {t['torch fwd']:.1f} / "
            f"{t['torch dx']:.1f} / {t['torch dw']:.1f} = **{t['torch']:.1f}** | "
            f"**{t['xla'] / t['torch']:.2f}x** | {cells} |")
    lines += ["", "## Per layer (ms per call, GFLOP/s in brackets)", ""]
    for r in report["results"]:
        lines += [f"### {r['network']} (batch {r['batch']}, side {r['side']})", "",
                  "| layer | count | GFLOP | XLA fwd | oneDNN fwd | XLA dx | oneDNN dx | XLA dw "
                  "| oneDNN dw |", "|---|---|---|---|---|---|---|---|---|"]
        for row in r["layers"]:
            cells = []
            for part in PARTS:
                for fw in ("xla", "torch"):
                    v = row["ms"].get(f"{fw} {part}")
                    cells.append("-" if v is None else f"{v:.2f} ({row['gflop'] / v * 1e3:.0f})")
            lines.append(f"| {row['layer']} | {row['count']} | {row['gflop']:.3f} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--networks", nargs="+", default=NETWORKS)
    p.add_argument("--batch", type=int, help="default: 32, LeNet-BN 256 (as bench_vs_torch)")
    p.add_argument("--threads", type=int, help="CPU threads for both (default: all usable)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved samples per measurement")
    p.add_argument("--sample-s", type=float, default=0.05, help="target seconds per sample")
    p.add_argument("--out-dir", default=str(harness.RESULTS))
    args = p.parse_args(argv)
    threads = harness.set_threads(args.threads)

    import jax

    import flaxcnn  # noqa: F401 - the XLA:CPU defaults, before JAX starts
    from flaxcnn import models, recipes

    jax.config.update("jax_platforms", "cpu")
    harness.set_torch_threads(threads)
    unknown = sorted(set(args.networks) - set(models.names()))
    if unknown:
        p.error(f"unknown network(s) {unknown}; known: {models.names()}")

    def log(msg):
        print(msg, flush=True)

    kind = harness.cpu_device_kind(threads)
    steps = step_times(Path(args.out_dir), kind)
    report = {
        "device_kind": kind, "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "command": "python benchmarks/conv_vs_onednn.py " + " ".join(
            shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "args": vars(args), "load_start": harness.load_average(),
        "machine": harness.machine_info(threads),
    }
    results = []
    for name in args.networks:
        batch = args.batch or (256 if name.startswith("lenet") else 32)
        side = recipes.get(name).side
        log(f"== {name} @{side}, batch {batch}, load {harness.load_average()}")
        r = bench_network(name, batch, side, args.rounds, args.sample_s, log)
        st = steps.get(name)
        if st and st["batch"] == batch:
            r["step"] = st
        t = r["totals_ms"]
        log(f"  convolutions per step: XLA {t['xla']:.1f} ms, oneDNN {t['torch']:.1f} ms "
            f"({t['xla'] / t['torch']:.2f}x)")
        results.append(r)
    report["load_end"] = harness.load_average()
    report["results"] = results
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"conv_vs_onednn_{kind}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{stem}.md").write_text(markdown(report) + "\n")
    log(f"wrote {out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
