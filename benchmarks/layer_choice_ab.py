"""Which layers take oneDNN's convolutions on this CPU: whole training steps, one fresh process
per arm and round, arms alternating (A, B, C, A, B, C, ...).

Fresh processes because in-process A/B runs (xla_cpu_study.py) of GoogLeNet moved by +-15%
from sample to sample here. Each arm sets some of `flaxcnn.models.layers`' switches before the
model is built:

    python benchmarks/layer_choice_ab.py --networks googlenet --rounds 3
    python benchmarks/layer_choice_ab.py --networks resnet18 densenet --arms default min12 xla
    python benchmarks/layer_choice_ab.py --networks resnet18 --arms default no-taps --eval
    python benchmarks/layer_choice_ab.py --arms default onednn-prefix --onednn-prefix /opt/dnnl
    python benchmarks/layer_choice_ab.py --networks lenet_bn densenet --arms default onednn-openmp
    python benchmarks/layer_choice_ab.py --networks nin --arms default relu-after --eval
    python benchmarks/layer_choice_ab.py --arms default xla-max-pool --batch 128

`--eval` times the eval-mode forward pass (`training.eval_step`) instead of the training step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import harness

# Each arm: the attributes it sets, of flaxcnn.models.layers ("name") or of another flaxcnn
# module ("module.name"), before the step is traced (`apply_arm`).
ARMS = {
    "default": {},
    "xla": {"_ONEDNN": False},  # XLA's convolutions (and the ops paths) everywhere
    "min12": {"_ONEDNN_MIN_SIDE": 12},  # oneDNN on maps of 12x12 and more only
    "min24": {"_ONEDNN_MIN_SIDE": 24},
    # oneDNN's convolutions for the many-channel layers on 3x3 maps too, not `ops.conv_taps`
    # (before 2026-12-03: XLA's forward pass for ResNet-18's 512 -> 512, oneDNN's gradients)
    "no-taps": {"_TAPS_MAX_SIDE": 0},
    # `ops.conv_taps` for 512 outputs and more only (ResNet-18's, not GoogLeNet's -> 320, -> 384)
    "taps-512": {"_TAPS_MIN_FEATURES": 512},
    # 1x1 stride-1 layers as matrix products (forward and both gradients; YNNPACK's GEMMs)
    "dot1x1": {},
    # the default choices with another oneDNN build (--onednn-prefix; onednn.PREFIX_ENV)
    "onednn-prefix": {},
    # oneDNN's calls on its own (OpenMP) threads, not split over XLA's pool
    "onednn-openmp": {"onednn.XLA_POOL": False},
    # each Conv's bias and ReLU added by XLA after oneDNN's convolution, not inside it (before
    # 2026-12-01; onednn.conv_relu)
    "relu-after": {"_ONEDNN_RELU": False},
    # the training max-pools on XLA's ops, not flaxcnn's kernels (before 2026-12-03)
    "xla-max-pool": {"ops._NATIVE_MAX_POOL": False},
    # DenseNet's blocks concatenate before each conv block, as the book writes them (before
    # 2026-12-03: no list of feature maps for BatchNorm2d)
    "concat-first": {"models.densenet.takes_parts": lambda norm: False},
    # DenseNet's transition blocks pool after their 1x1 convolution, in the book's order (before
    # 2026-12-03: no densenet.PooledConv)
    "pool-after": {"models.densenet.module_class": lambda conv: None},
    # channel concatenations on XLA's own, not flaxcnn's kernel (before 2026-12-03)
    "xla-concat": {"ops._NATIVE_CONCAT": False},
    # DenseNet's dense blocks concatenate their maps at their end, the transition normalising,
    # ReLU-ing and pooling the concatenation (before 2026-12-03, session 31)
    "block-concat": {"models.densenet._TRANSITION_PARTS": False},
    # the transitions' BatchNorm on the concatenation of the maps in evaluation (training as
    # the default)
    "eval-concat": {"models.densenet._TRANSITION_EVAL_PARTS": False},
}
_PREFIX = "FLAXCNN_AB_ONEDNN_PREFIX"  # --onednn-prefix, for the children of that arm


def apply_arm(arm: str):
    """Sets `arm`'s attributes (`ARMS`); returns a function that restores them."""
    import importlib

    saved = []
    for key, value in ARMS[arm].items():
        module, _, name = key.rpartition(".")
        target = importlib.import_module(f"flaxcnn.{module}" if module else "flaxcnn.models.layers")
        saved.append((target, name, getattr(target, name)))
        setattr(target, name, value)
    return lambda: [setattr(*s) for s in reversed(saved)]


def _dot_1x1(layers):
    """The dot1x1 arm: every float32 1x1, stride-1, unpadded layer as a matrix product
    (`harness.dot_1x1`), before the CPU paths (oneDNN's included) are considered."""
    from functools import partial

    import jax.numpy as jnp

    choose = layers._cpu_convolution

    def chosen(x, k, strides, padding, features=None):
        if k == 1 and strides == 1 and padding == 0 and x.dtype == jnp.float32:
            return partial(harness.dot_1x1, None, strides=1, padding=0)
        return choose(x, k, strides, padding, features)

    layers._cpu_convolution = chosen


def child(network: str, arm: str, batch: int, steps: int, samples: int, evaluate: bool) -> dict:
    from flaxcnn import cpu, onednn, recipes

    os.environ.pop(onednn.PREFIX_ENV, None)
    if arm == "onednn-prefix":
        os.environ[onednn.PREFIX_ENV] = os.environ[_PREFIX]

    cpu.dispatch_inline_for([recipes.get(network).side])  # as train.py and bench_vs_torch
    import jax

    from flaxcnn.models import layers

    apply_arm(arm)
    if arm == "dot1x1":
        _dot_1x1(layers)
    step, state, x, y = harness.compiled_train_step(network, batch)
    if evaluate:
        step, state, x, y = harness.as_eval_step(step, state, x, y)
    for _ in range(3):
        state, m = step(state, x, y)
    jax.block_until_ready(m)
    rates = []
    for _ in range(samples):
        t = time.perf_counter()
        for _ in range(steps):
            state, m = step(state, x, y)
        jax.block_until_ready(m)
        rates.append(batch * steps / (time.perf_counter() - t))
    return {"rates": rates}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--networks", nargs="+", default=["googlenet", "resnet18", "densenet"])
    p.add_argument("--arms", nargs="+", default=["default", "xla"],
                   choices=list(ARMS))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3, help="fresh processes per arm")
    p.add_argument("--steps", type=int, default=10, help="steps per timed sample")
    p.add_argument("--samples", type=int, default=3, help="timed samples per process")
    p.add_argument("--eval", action="store_true", help="time eval_step, not train_step")
    p.add_argument("--out", help="JSON file for the results")
    p.add_argument("--onednn-prefix", help="the oneDNN installation of the onednn-prefix arm")
    p.add_argument("--child", nargs=2, metavar=("NETWORK", "ARM"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.batch, args.steps, args.samples, args.eval)),
              flush=True)
        return 0
    if "onednn-prefix" in args.arms:
        if not args.onednn_prefix:
            p.error("the onednn-prefix arm needs --onednn-prefix")
        os.environ[_PREFIX] = os.path.abspath(args.onednn_prefix)
    info = harness.machine_info(len(os.sched_getaffinity(0)))
    out = {"machine": info, "command": " ".join(["python", *sys.argv]), "arms": ARMS,
           "onednn_prefix": args.onednn_prefix,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": {}}
    for net in args.networks:
        rates = {a: [] for a in args.arms}
        for r in range(args.rounds):
            for a in args.arms:
                res = harness.run_child([__file__, "--child", net, a, "--batch",
                                         str(args.batch), "--steps", str(args.steps),
                                         "--samples", str(args.samples),
                                         *(["--eval"] if args.eval else [])])
                if "error" in res:
                    sys.exit(f"{net} {a}: the child failed: {res['error']}")
                rates[a].append(statistics.median(res["rates"]))
                print(f"{net} round {r + 1} {a}: {rates[a][-1]:.1f} ex/s "
                      f"({', '.join(f'{x:.1f}' for x in res['rates'])})", flush=True)
        base = statistics.median(rates[args.arms[0]])
        for a in args.arms:
            m = statistics.median(rates[a])
            print(f"{net} {a}: median {m:.1f} ex/s [{min(rates[a]):.1f}-{max(rates[a]):.1f}], "
                  f"x{m / base:.2f} of {args.arms[0]}", flush=True)
        out["results"][net] = rates
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
