"""Two of layer_choice_ab.py's arms in one process, timed in pairs: the paired speed ratio.

On a shared 2-core host whole steps move by +-20% from minute to minute, and fresh processes
per arm (layer_choice_ab.py) need many rounds to see a 5% difference. Here both arms' training
steps are compiled in one process and run alternately, A B, B A, A B, ...; each pair's ratio
of times cancels the host's slow phases, and the median of the pairs' ratios comes with a
bootstrap 95% interval. Arms that change the environment (onednn-prefix) or replace functions
(dot1x1) are for layer_choice_ab.py only.

    python benchmarks/paired_ab.py googlenet --batch 128 --arms default xla-max-pool --pairs 10
    python benchmarks/paired_ab.py resnet18 --arms default no-taps --eval --pairs 30 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import harness
import layer_choice_ab


def paired(network: str, arms: list[str], batch: int, pairs: int, steps: int, seed: int = 0,
           evaluate: bool = False):
    """Per pair, arm B's time over arm A's (> 1: A is faster), each arm `steps` steps (or, with
    `evaluate`, calls of `training.eval_step`)."""
    import jax

    runs = {}
    for arm in arms:
        restore = layer_choice_ab.apply_arm(arm)
        try:  # traced and compiled under the arm's settings
            run = harness.compiled_train_step(network, batch)
            runs[arm] = list(harness.as_eval_step(*run) if evaluate else run)
        finally:
            restore()

    def run(arm):
        step, state, x, y = runs[arm]
        t = time.perf_counter()
        for _ in range(steps):
            state, m = step(state, x, y)
        jax.block_until_ready(m)
        runs[arm][1] = state
        return time.perf_counter() - t

    for arm in arms * 2:  # warm-up
        run(arm)
    ratios = []
    for i in range(pairs):
        t = {arm: run(arm) for arm in (arms if i % 2 == 0 else arms[::-1])}
        ratios.append(t[arms[1]] / t[arms[0]])
    rng = random.Random(seed)
    boot = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(2000))
    return {"ratios": ratios, "median": statistics.median(ratios),
            "ci95": [boot[49], boot[1950]]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("networks", nargs="+")
    p.add_argument("--arms", nargs=2, default=["default", "xla-max-pool"],
                   metavar=("A", "B"))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--steps", type=int, default=1, help="steps per timed sample")
    p.add_argument("--eval", action="store_true", help="time eval_step, not train_step")
    p.add_argument("--out", help="JSON file for the results")
    args = p.parse_args(argv)
    from flaxcnn import cpu, recipes

    # as train.py and bench_vs_torch run, before anything starts JAX
    cpu.dispatch_inline_for([recipes.get(n).side for n in args.networks])
    usable = sorted(set(layer_choice_ab.ARMS) - {"dot1x1", "onednn-prefix"})
    bad = [a for a in args.arms if a not in usable]
    if bad:
        p.error(f"arms not available here: {bad} (choose from {usable})")
    out = {"machine": harness.machine_info(len(os.sched_getaffinity(0))),
           "command": " ".join(["python", *sys.argv]),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": {}}
    a, b = args.arms
    for net in args.networks:
        r = paired(net, args.arms, args.batch, args.pairs, args.steps, evaluate=args.eval)
        out["results"][net] = r
        what = "inference" if args.eval else "training"
        print(f"{net} batch {args.batch}, {what}: {a}'s speed / {b}'s, median of {args.pairs} "
              f"pairs: {r['median']:.3f} [95% {r['ci95'][0]:.3f}-{r['ci95'][1]:.3f}]", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
