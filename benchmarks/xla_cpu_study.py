"""XLA:CPU settings for these networks, A/B/A/B in one process: the evidence for flaxcnn.cpu.

Every configuration is the same jitted `flaxcnn.training.train_step`, compiled with its own XLA
compile options (so all variants live in one process and their timings interleave), with either
flaxcnn.ops' pooling ("pool": max of strided slices, custom gradients) or XLA's own
(`reduce_window`, differentiated by XLA: select-and-scatter for the max-pool).
The process starts with FLAXCNN_NO_XLA_DEFAULTS=1, so "xla" below is XLA's own default and every
other row says exactly what it changes. Step-structure variants (no donation, K steps per call
with `lax.scan`) run with the chosen defaults.

    python benchmarks/xla_cpu_study.py --networks alexnet googlenet --batch 16 --rounds 5
    python benchmarks/xla_cpu_study.py --list
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ["FLAXCNN_NO_XLA_DEFAULTS"] = "1"  # measure from XLA's own defaults

import harness  # noqa: E402

YNN = "xla_cpu_experimental_ynn_fusion_type"
LIB = "LIBRARY_FUSION_TYPE_"
OFF = {YNN: ""}
RED = {YNN: f"{LIB}INDIVIDUAL_DOT,{LIB}REDUCE"}  # the chosen default (flaxcnn.cpu)
# XLA's default list, written out (the flag's help text says it is empty; the HLO says this).
YNN_ALL = {YNN: f"{LIB}INDIVIDUAL_DOT,{LIB}INDIVIDUAL_CONVOLUTION,{LIB}REDUCE"}
# The default plus oneDNN's custom calls, or plus XNNPACK's convolution fusions.
ONEDNN_CC = {**RED, "xla_cpu_use_onednn": True, "xla_cpu_experimental_onednn_custom_call": True}
XNN_CONV = {**RED, "xla_cpu_experimental_xnn_fusion_type": LIB + "INDIVIDUAL_CONVOLUTION"}

# name -> (XLA compile options, custom pool gradient?, step kind)
CONFIGS = {
    "xla": ({}, False, "step"),
    "xla+pool": ({}, True, "step"),
    "ynn-off": (OFF, False, "step"),
    "ynn-off+pool": (OFF, True, "step"),
    "ynn-dot-only+pool": ({YNN: LIB + "INDIVIDUAL_DOT"}, True, "step"),
    "ynn-conv-only+pool": ({YNN: LIB + "INDIVIDUAL_CONVOLUTION"}, True, "step"),
    "ynn-eltwise-only+pool": ({YNN: LIB + "ELTWISE"}, True, "step"),
    "ynn-reduce-only": ({YNN: LIB + "REDUCE"}, False, "step"),
    "ynn-reduce-only+pool": ({YNN: LIB + "REDUCE"}, True, "step"),
    "ynn-reduce+dot+pool": ({YNN: f"{LIB}REDUCE,{LIB}INDIVIDUAL_DOT"}, True, "step"),
    "ynn-reduce+eltwise+pool": ({YNN: f"{LIB}REDUCE,{LIB}ELTWISE"}, True, "step"),
    "ynn-off+onednn-dot+pool": (
        {**OFF, "xla_cpu_use_onednn": True,
         "xla_cpu_experimental_onednn_fusion_type": LIB + "DOT"}, True, "step"),
    # Variations around the chosen default ("R": YNNPACK for dots and reductions only, and
    # flaxcnn's pooling).
    "R+pool (default)": (RED, True, "step"),
    "R (XLA's pooling)": (RED, False, "step"),
    "R+ynn-dot-fusions+pool": ({YNN: f"{LIB}INDIVIDUAL_DOT,{LIB}DOT,{LIB}REDUCE"}, True, "step"),
    "R+onednn-dot+pool": (
        {**RED, "xla_cpu_use_onednn": True,
         "xla_cpu_experimental_onednn_fusion_type": LIB + "DOT"}, True, "step"),
    "R+onednn-custom-calls+pool": (ONEDNN_CC, True, "step"),
    "R+xnn-conv+pool": (XNN_CONV, True, "step"),
    "R+vec512+pool": ({**RED, "xla_cpu_prefer_vector_width": 512}, True, "step"),
    "R+no-concurrency-sched+pool": (
        {**RED, "xla_cpu_enable_concurrency_optimized_scheduler": False}, True, "step"),
    "R+no-fusion-emitters+pool": ({**RED, "xla_cpu_use_fusion_emitters": False}, True, "step"),
    "R+single-thread-eigen+pool": ({**RED, "xla_cpu_multi_thread_eigen": False}, True, "step"),
    "R+pool, no donation": (RED, True, "nodonate"),
    "R+pool, scan K steps": (RED, True, "scan"),
    "R+pool+dot1x1": (RED, True, "step", "dot1x1"),
    "R+pool+dw1x1": (RED, True, "step", "dw1x1"),
    "R+pool+conv1x1": (RED, True, "step", "conv1x1"),
    "R+pool+bnvjp": (RED, True, "step", "bnvjp"),
    "R+pool+flaxbn": (RED, True, "step", "flaxbn"),
    "R+pool+conv1ch": (RED, True, "step", "conv1ch"),
    "R+pool+xlaconv": (RED, True, "step", "xlaconv"),
    "R+pool+dnnl6": (RED, True, "step", "dnnl6"),
    "R+pool+dnnl12": (RED, True, "step", "dnnl12"),
    "R+pool+dnnl24": (RED, True, "step", "dnnl24"),
    "R+pool+xlastem": (RED, True, "step", "xlastem"),
    "infer: R+pool+xlastem": (RED, True, "infer", "xlastem"),
    "infer: R+pool+xlaconv": (RED, True, "infer", "xlaconv"),
    "R+pool+poolfuse": (RED, True, "step", "poolfuse"),
    "R+pool+xlamaxpool": (RED, True, "step", "xlamaxpool"),
    "R+pool+convfew": (RED, True, "step", "convfew"),
    "R+pool+conv1ch-fused": (RED, True, "step", "conv1ch-fused"),
    "R+pool+convswap": (RED, True, "step", "convswap"),
    "R+pool+convfew+conv1ch-fused": (RED, True, "step", "convfew", "conv1ch-fused"),
    "R+ynn-conv+pool+dot1x1": (YNN_ALL, True, "step", "dot1x1"),
    # Inference (eval mode, jitted model.apply), for the conv backend question.
    "infer: R+pool": (RED, True, "infer"),
    "infer: R+pool+dot1x1": (RED, True, "infer", "dot1x1"),
    "infer: R+pool+conv1ch": (RED, True, "infer", "conv1ch"),
    "infer: R+pool+poolfuse": (RED, True, "infer", "poolfuse"),
    "infer: R+pool+convswap": (RED, True, "infer", "convswap"),
    "infer: xla": ({}, False, "infer"),
    "infer: onednn-custom-calls+R+pool": (ONEDNN_CC, True, "infer"),
    "infer: xnn-conv+R+pool": (XNN_CONV, True, "infer"),
    "infer: ynn-conv+R+pool": (YNN_ALL, True, "infer"),
    "infer: ynn-conv+R+pool+dot1x1": (YNN_ALL, True, "infer", "dot1x1"),
    # Dots on XLA's own (Eigen) GEMMs: the Intel Xeon's question (2026-12-01)
    "infer: ynn-reduce-only+pool": ({YNN: LIB + "REDUCE"}, True, "infer"),
}
DEFAULT_CONFIGS = ["xla", "xla+pool", "ynn-off", "ynn-off+pool", "ynn-reduce+dot+pool"]


def _reduce_avg(x, window, strides, padding):
    from jax import lax

    (kh, kw), (sh, sw), (ph, pw) = window, strides, padding
    return lax.reduce_window(x, 0.0, lax.add, (1, kh, kw, 1), (1, sh, sw, 1),
                             ((0, 0), (ph, ph), (pw, pw), (0, 0))) / (kh * kw)


def _flax_batch_norm(train, dtype):
    """`resnet.batch_norm_layer` as it was: flax.linen.BatchNorm with PyTorch's settings (the
    "flaxbn" variant)."""
    import flax.linen as nn

    return partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                   dtype=dtype, use_fast_variance=False)


def build(name, batch, side, config, k_scan):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from flaxcnn import models, ops, recipes, training
    from flaxcnn.models import densenet, layers, resnet

    opts, custom_pool, kind, *extra = CONFIGS[config]
    model = models.create(name)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((batch, side, side, 1), np.float32))
    y = jnp.asarray(rng.integers(0, 10, batch).astype(np.int32))
    if kind == "scan":
        xs, ys = jnp.stack([x] * k_scan), jnp.stack([y] * k_scan)

        def many(state, xs, ys):
            return jax.lax.scan(lambda s, b: training.train_step(s, *b), state, (xs, ys))

        fn, args, steps = jax.jit(many, donate_argnums=0), (xs, ys), k_scan
    elif kind == "infer":
        def infer(state, x):
            v = {"params": state.params}
            if state.batch_stats:
                v["batch_stats"] = state.batch_stats
            return state, model.apply(v, x, train=False)

        fn, args, steps = jax.jit(infer), (x,), 1
    else:
        fn = jax.jit(training.train_step, donate_argnums=() if kind == "nodonate" else 0)
        args, steps = (x, y), 1
    xla_conv = ops.conv_nhwc

    def xla_stride1(x, kernel, padding):
        return xla_conv(x, kernel, 1, padding)

    # ops attributes each variant replaces while the step is traced (restored afterwards)
    patches = {}
    if not custom_pool:
        # XLA's own pooling: reduce_window, differentiated by XLA (select-and-scatter for max).
        patches.update(_max_pool=ops._reduce_max, _avg_pool=_reduce_avg)
    variants = {
        # 1x1 convolutions as (N*H*W, C) @ (C, O) matrix products
        "dot1x1": {"conv_nhwc": partial(harness.dot_1x1, xla_conv)},
        # only their kernel gradient as a matrix product (ops.conv_1x1), whatever the map size
        "dw1x1": {"layers._LARGE_1X1": 1},
        # XLA's convolutions (and the ops paths) instead of oneDNN's custom calls
        "xlaconv": {"layers._ONEDNN": False},
        "dnnl6": {"layers._ONEDNN_MIN_SIDE": 6},
        "dnnl12": {"layers._ONEDNN_MIN_SIDE": 12},
        "dnnl24": {"layers._ONEDNN_MIN_SIDE": 24},
        # the strided one-channel stems back to XLA's convolution
        "xlastem": {"layers._ONEDNN_STEMS": False},
        # the CPU convolution paths undone, each back to XLA's convolution or fusion
        "conv1ch": {"conv_one_channel": xla_stride1},
        "convfew": {"conv_few_channels": xla_stride1},
        "convswap": {"conv_small_input": xla_stride1},
        "conv1x1": {"conv_1x1": lambda x, kernel: xla_conv(x, kernel, 1, 0)},
        "conv1ch-fused": {"_one_channel_output": lambda y: y},
        "poolfuse": {"_pool_input": lambda x: x},
        # the training max-pools on XLA's ops (ops._max_pool_bwd_xla), not flaxcnn's kernels
        "xlamaxpool": {"_NATIVE_MAX_POOL": False},
        # BatchNorm2d's training pass differentiated by JAX, as flax.linen.BatchNorm's is
        "bnvjp": {"batch_norm": ops.batch_norm_autodiff},
        # flax.linen.BatchNorm itself in ResNet and DenseNet (the previous default)
        "flaxbn": {f"{m}.batch_norm_layer": _flax_batch_norm for m in ("resnet", "densenet")},
    }
    for v in extra:
        patches.update(variants[v])
    def target(key):  # "name": an attribute of flaxcnn.ops; "layers.name" (also "resnet.",
        # "densenet."): of that flaxcnn.models module
        module, _, name = key.rpartition(".")
        return {"": ops, "layers": layers, "resnet": resnet, "densenet": densenet}[module], name

    saved = {k: getattr(*target(k)) for k in patches}
    for k, f in patches.items():
        setattr(*target(k), f)
    try:  # the state too is made under the patches (flaxbn names its variables otherwise)
        state = training.create_train_state(model, jax.random.key(0), side,
                                            training.sgd(recipes.get(name).lr))
        t = time.perf_counter()
        compiled = fn.lower(state, *args).compile(opts)
        compile_s = time.perf_counter() - t
        flops = harness.model_flops(fn, state, *args)
    finally:
        for k, f in saved.items():
            setattr(*target(k), f)
    holder = {"state": state, "cpu": []}

    def run(iters):
        def sample():
            c, t = time.process_time(), time.perf_counter()
            s = holder["state"]
            for _ in range(max(1, iters // steps)):
                s, m = compiled(s, *args)
            jax.block_until_ready((s, m))
            holder["state"] = s
            n = max(1, iters // steps) * steps
            # CPU seconds of the whole process per step: robust to other processes' load
            # (they delay us but do not add to our CPU time), unlike wall time.
            holder["cpu"].append((time.process_time() - c) / n)
            return (time.perf_counter() - t) / n
        return sample

    return run, {"compile_s": compile_s, "flops_per_step": flops,
                 "cpu": holder["cpu"]}


def report(rows) -> str:
    """Network x configuration: median ex/s, its ratio to the first configuration, and the
    ratio of CPU time per step (less sensitive to other processes' load)."""
    nets = list(dict.fromkeys(r["network"] for r in rows))
    configs = list(dict.fromkeys(r["config"] for r in rows))
    out = ["| configuration | " + " | ".join(
        f"{n} @{next(r['side'] for r in rows if r['network'] == n)}" for n in nets) + " |",
        "|---|" + "---|" * len(nets)]
    by = {(r["network"], r["config"]): r for r in rows}
    for c in configs:
        cells = []
        for n in nets:
            r, b = by.get((n, c)), by.get((n, configs[0]))
            if r is None or b is None:
                cells.append("")
                continue
            cpu = statistics.median(r["cpu_s_per_step"]) if r.get("cpu_s_per_step") else None
            cpu_b = statistics.median(b["cpu_s_per_step"]) if b.get("cpu_s_per_step") else None
            med, base = r["ex_per_s"]["median"], b["ex_per_s"]["median"]
            cell = f"{med:.1f} (×{med / base:.2f}"
            if cpu and cpu_b:
                cell += f"; CPU ×{cpu_b / cpu:.2f}"
            cells.append(cell + ")")
        out.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--networks", nargs="+", default=["alexnet", "googlenet", "resnet18"])
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lenet-batch", type=int, default=256)
    p.add_argument("--side", type=int, help="default: the book's side for each network")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=2, help="steps per timed sample")
    p.add_argument("--scan-k", type=int, default=4)
    p.add_argument("--threads", type=int)
    p.add_argument("--out", help="JSON file to append results to")
    p.add_argument("--list", action="store_true")
    p.add_argument("--report", metavar="JSON", help="print a markdown table of a results file")
    args = p.parse_args(argv)
    if args.report:
        data = json.loads(Path(args.report).read_text())
        # a list of rows (--out), or results/xla_cpu_study.json: {"runs": {name: rows}}
        runs = data["runs"] if isinstance(data, dict) else {args.report: data}
        for name, rows in runs.items():
            print(f"{name}:\n")
            for part in ([r for r in rows if r["kind"] != "infer"],
                         [r for r in rows if r["kind"] == "infer"]):
                if part:
                    print(report(part) + "\n")
        return 0
    if args.list:
        for k, (o, pool, kind, *extra) in CONFIGS.items():
            print(f"{k:40s} pool={'custom' if pool else 's&s'} {kind} {extra} {o}")
        return 0
    threads = harness.set_threads(args.threads)
    import flaxcnn  # noqa: F401
    from flaxcnn import recipes

    results = []
    for name in args.networks:
        side = args.side or recipes.get(name).side
        batch = args.lenet_batch if name.startswith("lenet") else args.batch
        print(f"{name} @{side} batch {batch}, load {harness.load_average()}", flush=True)
        runners, meta = {}, {}
        for c in args.configs:
            run, meta[c] = build(name, batch, side, c, args.scan_k)
            runners[c] = run(args.iters)
            print(f"  compiled {c}: {meta[c]['compile_s']:.1f} s", flush=True)
        samples = harness.interleave(runners, args.rounds, warmup=1)
        base = best = base_cpu = None
        for c in args.configs:
            s = harness.summarize(samples[c], batch)
            base = base or s["median"]
            fpe = (meta[c]["flops_per_step"] or 0) / batch / (
                args.scan_k if CONFIGS[c][2] == "scan" else 1)
            best = best or s["max"]
            cpu_ms = 1e3 * statistics.median(meta[c]["cpu"][1:] or meta[c]["cpu"])
            base_cpu = base_cpu or cpu_ms
            print(f"  {c:40s} {s['median']:8.1f} ex/s [{s['min']:.1f}-{s['max']:.1f}]"
                  f"  median x{s['median'] / base:.2f}, best x{s['max'] / best:.2f};"
                  f" CPU {cpu_ms:7.1f} ms/step x{base_cpu / cpu_ms:.2f}"
                  f"  {fpe * s['median'] / 1e9:6.1f} GFLOP/s", flush=True)
            results.append({"network": name, "side": side, "batch": batch, "config": c,
                            "options": {k: str(v) for k, v in CONFIGS[c][0].items()},
                            "custom_pool": CONFIGS[c][1], "kind": CONFIGS[c][2],
                            "model_variant": list(CONFIGS[c][3:]),
                            "ex_per_s": s, "compile_s": meta[c]["compile_s"],
                            "cpu_s_per_step": meta[c]["cpu"][1:],
                            "flops_per_example": fpe,
                            "load": harness.load_average(), "threads": threads})
    if args.out:
        path = Path(args.out)
        old = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(old + results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
