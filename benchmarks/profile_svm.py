"""Where the compiled SVM fit spends its time: each part of the solver doubled in turn.

The solver is one jit-compiled while loop per binary problem, so a profiler sees mostly small
thunks. Instead each variant computes one part twice (the copy feeding the result through a
condition XLA cannot fold away), and the extra wall time is that part's cost:

    python benchmarks/profile_svm.py --size 10000          # single thread (n_jobs=1)

Variants: base; inner (the SMO sub-problem solver); kernel (every kernel-value computation:
rows for the gradient update and the working set's new block); new-block (only the latter).
Each runs in its own process (the patch must be in place before the solver is traced), with
YNNPACK defaults as benchmarks/bench_svm.py (FLAXCNN_NO_XLA_DEFAULTS=1), best of --repeats fits
after a compiling one. It profiles XLA's solver (`svm._NATIVE_OUTER = False`: the path on other
platforms); the CPU's C++ solver (flaxcnn/_svm.cc) is one custom call, for `perf` to see.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("base", "inner", "kernel", "new-block")


def _never(x):
    """A 0/1 float XLA cannot prove is 0: makes the doubled copy a data dependency."""
    import jax.numpy as jnp

    return jnp.where(jnp.sum(x) < -1e30, 1.0, 0.0)


def patch(variant):
    from flaxcnn import svm

    svm._NATIVE_OUTER = False  # XLA's solver, whose parts are traced functions

    if variant == "inner":
        inner = svm._inner_smo

        def twice(kbb, alpha, f, y, c, valid, tol, max_inner):
            a1, _ = inner(kbb, alpha, f, y, c, valid, tol, max_inner)
            return inner(kbb, alpha + _never(a1), f, y, c, valid, tol, max_inner)

        svm._inner_smo = twice
    elif variant == "kernel":
        block = svm._kernel_block

        def twice(xa, xb, sqa, sqb, gamma, coef0, *, kernel, degree):
            k1 = block(xa, xb, sqa, sqb, gamma, coef0, kernel=kernel, degree=degree)
            return block(xa + _never(k1), xb, sqa, sqb, gamma, coef0, kernel=kernel,
                         degree=degree)

        svm._kernel_block = twice
    elif variant == "new-block":
        new_block = svm._new_block

        def doubled(cache, slot_of, pts, valid, x, sq, kern):
            def k2(a, b, sa, sb):
                return kern(a + _never(kern(a, b, sa, sb)), b, sa, sb)

            return new_block(cache, slot_of, pts, valid, x, sq, k2)

        svm._new_block = doubled


def child(variant, size, repeats):
    import numpy as np

    sys.path.insert(0, ROOT)
    from flaxcnn import svm

    patch(variant)
    xtr, ytr = svm.load_fashion_mnist("train")
    x, y = svm._as_features(xtr[:size]), np.asarray(ytr[:size])
    svm.SVC(C=10, n_jobs=1).fit(x, y)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        m = svm.SVC(C=10, n_jobs=1).fit(x, y)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"variant": variant, "fit_s": min(times),
                      "outer": int(m.n_iter_.sum()), "inner": int(m.n_inner_iter_.sum()),
                      "rows": int(m.n_kernel_rows_.sum())}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=10000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.child, args.size, args.repeats)
    env = {**os.environ, "FLAXCNN_NO_XLA_DEFAULTS": "1"}
    rows = []
    for v in VARIANTS:
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", v, "--size",
                            str(args.size), "--repeats", str(args.repeats)],
                           capture_output=True, text=True, env=env, check=True)
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(f"{args.size} training images, one thread: {base['outer']} outer steps, "
          f"{base['inner']} inner SMO iterations, {base['rows']} kernel rows computed")
    print("| part doubled | fit (s) | the part's cost (s) |\n|---|---|---|")
    for r in rows:
        extra = "-" if r is base else f"{r['fit_s'] - base['fit_s']:.2f}"
        print(f"| {r['variant']} | {r['fit_s']:.2f} | {extra} |")


if __name__ == "__main__":
    main()
