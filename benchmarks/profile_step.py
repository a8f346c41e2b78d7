"""Where a network's jitted training step spends its time, op by op, on this machine.

Traces a few steps with the JAX profiler (XLA:CPU thunks annotated with
`--xla_cpu_enable_xprof_traceme`) and sums the trace's events by HLO op name (numeric suffixes
dropped), per step. On XLA:CPU, convolutions and dots run on the intra-op thread pool and are
only partly attributed; the rest (elementwise fusions, transposes, reductions) is exact.

    python benchmarks/profile_step.py densenet --batch 32
    python benchmarks/profile_step.py lenet_bn --batch 256 --inference
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

FLAG = "--xla_cpu_enable_xprof_traceme=true"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("network")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--side", type=int, help="default: the book's")
    p.add_argument("--steps", type=int, default=3, help="traced steps")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--inference", action="store_true", help="eval-mode forward pass instead")
    args = p.parse_args(argv)
    if FLAG not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FLAG).strip()
    from flaxcnn import cpu, recipes

    # as train.py and bench_vs_torch run: glibc's huge pages kept mapped, steps dispatched
    # inline where that is faster (without them the profile shows page faults, not the step)
    cpu.reexec_with_huge_pages()
    side = args.side or recipes.get(args.network).side
    cpu.dispatch_inline_for([side])

    import jax
    import jax.numpy as jnp

    from flaxcnn import models, training

    model = models.create(args.network)
    state = training.create_train_state(model, jax.random.key(0), side, training.sgd(0.01))
    x = jax.random.uniform(jax.random.key(1), (args.batch, side, side, 1))
    y = jnp.zeros(args.batch, jnp.int32)
    if args.inference:
        v = {"params": state.params}
        if state.batch_stats:
            v["batch_stats"] = state.batch_stats
        f = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(v, x).compile()

        def step(s):
            return s, f(v, x)
    else:
        f = jax.jit(training.train_step, donate_argnums=0).lower(state, x, y).compile()

        def step(s):
            return f(s, x, y)

    for _ in range(3):
        state, out = step(state)
    jax.block_until_ready(out)
    t = time.perf_counter()
    for _ in range(args.steps):
        state, out = step(state)
    jax.block_until_ready(out)
    wall = (time.perf_counter() - t) / args.steps * 1e3

    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(args.steps):
                state, out = step(state)
            jax.block_until_ready(out)
        files = glob.glob(f"{d}/**/perfetto_trace.json.gz", recursive=True)
        if not files:
            sys.exit("no perfetto trace was written")
        events = json.load(gzip.open(files[0]))
    events = events["traceEvents"] if isinstance(events, dict) else events
    total, count = collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or "dur" not in e or name.startswith(("$", "end: ")):
            continue
        if any(s in name for s in ("Thunk", "Pjit", "PjRt", "ThreadPool", "Dispatch", "trace")):
            continue
        k = re.sub(r"\.\d+$", "", name)
        total[k] += e["dur"]
        count[k] += 1
    n = args.steps
    what = "inference" if args.inference else "training step"
    print(f"{args.network} @{side}, batch {args.batch}, {what}: {wall:.1f} ms per step "
          f"untraced; traced ops sum to {sum(total.values()) / n / 1e3:.1f} ms")
    print("| op (HLO name) | ms per step | per step |\n|---|---|---|")
    for k, v in total.most_common(args.top):
        print(f"| {k} | {v / n / 1e3:.2f} | {count[k] // n} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
