"""flaxcnn.svm.SVC against scikit-learn's SVC (libsvm) on Fashion-MNIST, on this CPU.

Same data (the first N training images in the networks' order, pixels / 255 in [0, 1], the full
10,000-image test set), same kernel, C and gamma ('scale' = 1 / (784 * X.var()) of the training
subset, computed identically by both), same stopping tolerance (1e-3), both one-vs-one.

    python benchmarks/bench_svm.py --sizes 10000 60000          # both implementations
    python benchmarks/bench_svm.py --sizes 10000 --impl jax     # only ours
    python benchmarks/bench_svm.py --sizes 10000 --impl jax-ovr # ours, one-vs-rest

Each (implementation, size) result is merged into benchmarks/results/svm_cpu.json, and the table
benchmarks/results/svm_cpu.md is rewritten from all results there, so slow runs (scikit-learn
at 60,000 images takes tens of minutes) can be made separately.

Measured per run: fit wall time (ours includes jit compilation; ours again in the same process,
compiled; and ours in two fresh processes sharing a new persistent compilation cache, the second
loading what the first compiled), prediction of the 10,000 test
images, test accuracy, support vectors, the dual objective of every binary problem recomputed
in float64 from the returned coefficients (the same function for both), and the agreement of
the two implementations' test predictions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RESULTS = os.path.join(ROOT, "benchmarks", "results")
IMPLS = ("jax", "sklearn", "jax-ovr")


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "CPU family", "Model", "CPU(s)",
                               "Thread(s) per core", "L3 cache"):
                info[key.strip()] = value.strip()
        with open("/proc/meminfo") as f:
            info["MemTotal"] = f.readline().split(":")[1].strip()
    except OSError:
        pass
    import jax
    import sklearn

    info["jax"] = jax.__version__
    info["sklearn"] = sklearn.__version__
    info["numpy"] = np.__version__
    info["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "")
    info["FLAXCNN_NO_XLA_DEFAULTS"] = os.environ.get("FLAXCNN_NO_XLA_DEFAULTS", "")
    return info


def load(size):
    from flaxcnn import svm

    xtr, ytr = svm.load_fashion_mnist("train")
    xte, yte = svm.load_fashion_mnist("test")
    xtr, ytr = xtr[:size], np.asarray(ytr[:size], np.int64)
    return svm._as_features(xtr), ytr, svm._as_features(xte), np.asarray(yte, np.int64)


def pair_coefs(support, dual_coef, y, classes):
    """[(sample indices, y alpha)] per one-vs-one problem, read from libsvm's layout."""
    k = len(classes)
    cls = np.searchsorted(classes, y[support])
    out = []
    for a in range(k):
        for b in range(a + 1, k):
            ia, ib = cls == a, cls == b
            idx = np.concatenate([support[ia], support[ib]])
            coef = np.concatenate([dual_coef[b - 1, ia], dual_coef[a, ib]])
            keep = coef != 0
            out.append((idx[keep], coef[keep]))
    return out


def dual_objectives(x, pairs, gamma):
    """1/2 c^T K c - sum |c| per problem, in float64 (RBF kernel)."""
    out = []
    for idx, coef in pairs:
        sv = x[idx].astype(np.float64)
        sq = (sv * sv).sum(1)
        k = np.exp(-gamma * np.maximum(sq[:, None] + sq[None, :] - 2 * sv @ sv.T, 0))
        out.append(float(0.5 * coef @ k @ coef - np.abs(coef).sum()))
    return out


def kkt_violations(x, y, pairs, gamma, c, classes):
    """The maximal KKT violation of every one-vs-one problem, from its coefficients: the
    gradient of all the problem's points recomputed in float64, max_{I_up} -yG - min_{I_low} -yG.
    """
    out = []
    n = 0
    for a in range(len(classes)):
        for b in range(a + 1, len(classes)):
            idx, coef = pairs[n]
            n += 1
            pts = np.flatnonzero((y == classes[a]) | (y == classes[b]))
            yb = np.where(y[pts] == classes[a], 1.0, -1.0)
            xp, sv = x[pts].astype(np.float64), x[idx].astype(np.float64)
            sqp, sqs = (xp**2).sum(1), (sv**2).sum(1)
            k = np.exp(-gamma * np.maximum(sqp[:, None] + sqs[None, :] - 2 * (xp @ sv.T), 0))
            grad = yb * (k @ coef) - 1.0
            alpha = np.zeros(len(pts))
            alpha[np.searchsorted(pts, idx)] = np.abs(coef)
            f = -yb * grad
            up = np.where(yb > 0, alpha < c, alpha > 0)
            low = np.where(yb > 0, alpha > 0, alpha < c)
            out.append(float(f[up].max() - f[low].min()))
    return out


def bench(impl, size, args) -> dict:
    from flaxcnn import svm

    xtr, ytr, xte, yte = load(size)
    gamma = svm.parse_gamma(args.gamma)
    print(f"[{impl} @ {size}] fitting ...", flush=True)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    c0 = time.process_time()
    if impl == "sklearn":
        from sklearn.svm import SVC

        model = SVC(kernel=args.kernel, C=args.C, gamma=gamma, tol=args.tol,
                    cache_size=args.sklearn_cache)
        model.fit(xtr.astype(np.float64), ytr)
    else:
        model = svm.SVC(kernel=args.kernel, C=args.C, gamma=gamma, tol=args.tol,
                        multiclass="ovr" if impl == "jax-ovr" else "ovo",
                        cache_size=args.cache, working_set_size=args.q, verbose=args.verbose)
        model.fit(xtr, ytr)
    fit_s = time.perf_counter() - t0
    fit_cpu = time.process_time() - c0
    warm = None
    if impl != "sklearn" and not args.no_warm:  # again, compiled: what a second fit costs
        t0 = time.perf_counter()
        c0 = time.process_time()
        model.fit(xtr, ytr)
        warm = (time.perf_counter() - t0, time.process_time() - c0)
        print(f"  warm fit {warm[0]:.1f} s (cpu {warm[1]:.1f} s)", flush=True)
    cached = None
    if impl == "jax" and not args.no_cache_run:
        cached = cached_fits(size, args)
        print(f"  fresh processes: fit {cached[0]['fit_s']:.1f} s with an empty compilation"
              f" cache, {cached[1]['fit_s']:.1f} s with it warm", flush=True)
    t0 = time.perf_counter()
    pred = model.predict(xte.astype(np.float64) if impl == "sklearn" else xte)
    predict_s = time.perf_counter() - t0
    load1 = os.getloadavg()[0]
    test_acc = float(np.mean(pred == yte))
    res = {
        "impl": impl,
        "train_size": size,
        "kernel": args.kernel,
        "C": args.C,
        "gamma": float(model._gamma),
        "tol": args.tol,
        "fit_s": fit_s,
        "fit_cpu_s": fit_cpu,
        "warm_fit_s": warm[0] if warm else None,
        "warm_fit_cpu_s": warm[1] if warm else None,
        "fresh_process_fits": cached,
        "predict_s": predict_s,
        "test_acc": test_acc,
        "n_support": int(len(model.support_)),
        "loadavg_before_after": [load0, load1],
        "pred": "".join(map(str, pred.tolist())),
        "when": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    if impl == "sklearn":
        res["cache_size_mb"] = args.sklearn_cache
    else:
        res["cache_size_mb"] = args.cache
        res["working_set_size"] = int(model.working_set_size_)
        res["outer_iterations"] = int(model.n_iter_.sum())
        res["max_kkt_violation"] = float(model.kkt_violation_.max())
    if impl != "jax-ovr" and not args.no_objectives:
        t0 = time.perf_counter()
        pairs = pair_coefs(model.support_, model.dual_coef_, ytr, np.unique(ytr))
        res["dual_objectives"] = dual_objectives(xtr, pairs, float(model._gamma))
        res["kkt_violations"] = kkt_violations(
            xtr, ytr, pairs, float(model._gamma), args.C, np.unique(ytr)
        )
        print(f"  dual objectives and KKT violations in {time.perf_counter() - t0:.1f} s"
              f" (max violation {max(res['kkt_violations']):.2e})", flush=True)
    print(f"[{impl} @ {size}] fit {fit_s:.1f} s (cpu {fit_cpu:.1f} s), predict {predict_s:.1f} s,"
          f" test acc {test_acc:.4f}, {res['n_support']} SV", flush=True)
    return res


def cached_fits(size, args) -> list[dict]:
    """Our fit in two fresh processes sharing a new persistent compilation cache: the first
    compiles and writes it, the second loads the compiled programs (what a second
    `train.py --model svm` costs). Each process times its fit alone, after loading the data."""
    out = []
    with tempfile.TemporaryDirectory() as d:
        for _ in range(2):
            cmd = [sys.executable, os.path.abspath(__file__), "--child-fit", str(size),
                   "--cache-dir", d, "--kernel", args.kernel, "--C", str(args.C), "--gamma",
                   args.gamma, "--tol", str(args.tol), "--cache", str(args.cache), "--q",
                   str(args.q)]
            r = subprocess.run(cmd, capture_output=True, text=True, check=True)
            out.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return out


def child_fit(args):
    """One fit in this process with the compilation cache in args.cache_dir; prints JSON."""
    from flaxcnn import compilation_cache, svm

    compilation_cache.enable(args.cache_dir)
    xtr, ytr, _, _ = load(args.child_fit)
    model = svm.SVC(kernel=args.kernel, C=args.C, gamma=svm.parse_gamma(args.gamma),
                    tol=args.tol, cache_size=args.cache, working_set_size=args.q)
    t0 = time.perf_counter()
    model.fit(xtr, ytr)
    fit_s = time.perf_counter() - t0
    print(json.dumps({"fit_s": fit_s, "cache_hits": compilation_cache.counts()["hits"],
                      "n_support": int(len(model.support_))}))


def load_results(out: str) -> dict:
    try:
        with open(out + ".json") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {"results": {}}


def table(doc) -> str:
    res = doc["results"]
    m = doc.get("machine", {})
    lines = [
        "# SVM on Fashion-MNIST: flaxcnn.svm (JAX) vs scikit-learn SVC (libsvm), CPU",
        "",
        f"Machine: {m.get('Model name', '?')} (KVM guest, CPU family {m.get('CPU family', '?')} "
        f"model {m.get('Model', '?')}), "
        f"{m.get('CPU(s)', '?')} cores, {m.get('MemTotal', '?')} RAM. Wall times move with "
        "other processes' load: each run's load average and CPU seconds are listed below "
        "(libsvm uses one core, ours both). "
        f"jax {m.get('jax', '?')}, scikit-learn {m.get('sklearn', '?')}, "
        f"XLA_FLAGS='{m.get('XLA_FLAGS', '')}', "
        f"FLAXCNN_NO_XLA_DEFAULTS='{m.get('FLAXCNN_NO_XLA_DEFAULTS', '')}'.",
        "",
        "Same data (first N training images in the networks' order, pixels in [0, 1]; the 10,000 "
        "test images), RBF kernel, C=10, gamma='scale', tol=1e-3, one-vs-one (45 problems). "
        "Fit time includes our jit compilation; 'fit, compiled' is a second fit in the same "
        "process (speed-ups in brackets use it). Dual objective: sum over the 45 problems of "
        "1/2 c'Kc - sum|c|, recomputed in float64 from each model's coefficients (lower is "
        "better).",
        "",
        "'fit, cache warm' is our fit in a fresh process that loads the compiled solver from "
        "the compilation cache's directory, filled by an earlier process (flaxcnn.compilation_"
        "cache, on by default in train.py; since 2026-11-30 15:00 UTC without tracing it first, "
        "`persistent_jit`); speed-ups after a slash use it.",
        "",
        "| train images | implementation | fit (s) | fit, cache warm (s) | fit, compiled (s) "
        "| predict 10k (s) "
        "| test acc | support vectors | dual objective | fit speed-up | fit+predict speed-up "
        "| same test predictions |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    sizes = sorted({r["train_size"] for r in res.values()})
    for size in sizes:
        ref = res.get(f"sklearn@{size}")
        for impl in ("sklearn", "jax", "jax-ovr"):
            r = res.get(f"{impl}@{size}")
            if r is None:
                continue
            name = {"sklearn": "scikit-learn SVC", "jax": "flaxcnn.svm.SVC",
                    "jax-ovr": "flaxcnn.svm.SVC one-vs-rest"}[impl]
            obj = f"{sum(r['dual_objectives']):.1f}" if "dual_objectives" in r else "-"
            warm = r.get("warm_fit_s")
            fresh = r.get("fresh_process_fits")
            cached = fresh[1]["fit_s"] if fresh else None
            if ref is not None and impl != "sklearn":
                sp = f"{ref['fit_s'] / r['fit_s']:.1f}x"
                sp2 = f"{(ref['fit_s'] + ref['predict_s']) / (r['fit_s'] + r['predict_s']):.1f}x"
                both = ref["fit_s"] + ref["predict_s"]
                if cached:
                    sp += f" / {ref['fit_s'] / cached:.1f}x"
                    sp2 += f" / {both / (cached + r['predict_s']):.1f}x"
                if warm:
                    sp += f" ({ref['fit_s'] / warm:.1f}x)"
                    sp2 += f" ({both / (warm + r['predict_s']):.1f}x)"
                same = np.mean(np.frombuffer(r["pred"].encode(), np.uint8)
                               == np.frombuffer(ref["pred"].encode(), np.uint8))
                same = f"{same:.4f}"
            else:
                sp = sp2 = same = "-"
            lines.append(
                f"| {size} | {name} | {r['fit_s']:.1f} | {f'{cached:.1f}' if cached else '-'} | "
                f"{f'{warm:.1f}' if warm else '-'} | "
                f"{r['predict_s']:.1f} | "
                f"{r['test_acc']:.4f} | {r['n_support']} | {obj} | {sp} | {sp2} | {same} |"
            )
    lines += ["", "Per run (from the JSON):", ""]
    for key in sorted(res, key=lambda k: (res[k]["train_size"], k)):
        r = res[key]
        extra = ""
        if "outer_iterations" in r:
            extra = (f", working set {r['working_set_size']}, {r['outer_iterations']} outer "
                     f"iterations, max KKT violation (solver's float64 check) "
                     f"{r['max_kkt_violation']:.4g}")
        if "dual_objectives" in r and f"sklearn@{r['train_size']}" in res and key.startswith(
            "jax@"
        ):
            ref = res[f"sklearn@{r['train_size']}"].get("dual_objectives")
            if ref:
                rel = np.max(np.abs(np.subtract(r["dual_objectives"], ref)) / np.abs(ref))
                extra += f", per-problem dual objectives within {rel:.1e} (relative) of libsvm's"
        if "kkt_violations" in r:
            extra += (f", KKT violation recomputed in float64 from the returned coefficients: "
                      f"max {max(r['kkt_violations']):.4g} over the 45 problems")
        if r.get("fresh_process_fits"):
            a, b = r["fresh_process_fits"]
            extra += (f", fresh processes: fit {a['fit_s']:.2f} s with an empty compilation "
                      f"cache, {b['fit_s']:.2f} s with it warm ({b['cache_hits']} programs "
                      "loaded)")
        lines.append(
            f"- {key}: fit {r['fit_s']:.1f} s wall / {r['fit_cpu_s']:.1f} s CPU, cache "
            f"{r['cache_size_mb']} MB, load average {r['loadavg_before_after'][0]:.1f} -> "
            f"{r['loadavg_before_after'][1]:.1f}, {r['when']}{extra}"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10000, 60000])
    p.add_argument("--impl", nargs="+", default=["jax", "sklearn"], choices=IMPLS)
    p.add_argument("--kernel", default="rbf")
    p.add_argument("--C", type=float, default=10.0)
    p.add_argument("--gamma", default="scale")
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--cache", type=float, default=1024, help="our kernel-row cache, MB")
    p.add_argument("--q", type=int, default=512, help="our working-set size")
    p.add_argument("--sklearn-cache", type=float, default=2000, help="libsvm's cache, MB")
    p.add_argument("--no-objectives", action="store_true")
    p.add_argument("--no-warm", action="store_true", help="skip our second (compiled) fit")
    p.add_argument("--no-cache-run", action="store_true",
                   help="skip our fits in two fresh processes sharing a compilation cache")
    p.add_argument("--child-fit", type=int, help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", help=argparse.SUPPRESS)
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--dry", action="store_true", help="only rewrite the table from the JSON")
    p.add_argument("--project-xla-defaults", action="store_true",
                   help="keep flaxcnn's XLA:CPU defaults (YNNPACK for dots and reductions, not "
                        "convolutions; tuned for the networks). Without it they are opted out of "
                        "(FLAXCNN_NO_XLA_DEFAULTS=1) and XLA's own defaults apply; the SVM has "
                        "no convolutions, so both compile the same programs")
    p.add_argument("--name", default="svm_cpu",
                   help="results file stem in benchmarks/results (default: svm_cpu, the Zen 4 "
                   "machine's; another CPU deserves its own, e.g. svm_cpu-amd-epyc-f26m2-2t)")
    args = p.parse_args(argv)
    out = os.path.join(RESULTS, args.name)
    if not args.project_xla_defaults:
        os.environ.setdefault("FLAXCNN_NO_XLA_DEFAULTS", "1")
    if args.child_fit:
        return child_fit(args)
    doc = load_results(out)
    if not args.dry:
        for size in args.sizes:
            for impl in args.impl:
                doc["results"][f"{impl}@{size}"] = bench(impl, size, args)
                doc["machine"] = machine()  # after flaxcnn's import set its XLA_FLAGS
                with open(out + ".json", "w") as f:
                    json.dump(doc, f, indent=1)
                with open(out + ".md", "w") as f:
                    f.write(table(doc))
    with open(out + ".md", "w") as f:
        f.write(table(doc))
    print(table(doc))


if __name__ == "__main__":
    main()
