"""JAX / best torch per network across several bench_vs_torch.py runs: one run's ratio moves by
about ±0.1 with the host (benchmarks/xla_cpu_study.md), so the issue's "at least 1.0x" is read
better from several runs, on several CPUs, than from the latest alone.

    python benchmarks/summarize_runs.py                  # every CPU run of three pairs or more
    python benchmarks/summarize_runs.py benchmarks/results/cpu-amd-epyc-f26m2-2t*.json

By default it takes the results files in benchmarks/results whose networks ran in at least
`--min-pairs` pairs of fresh worker processes (the method since commit 958cfac), and prints, per
network, the geometric mean of the ratios, their range, and in how many runs JAX was at least as
fast; the same for the fraction of the GEMM peak in training. Runs at different batches are
kept apart (a row per network and batch).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# (row kind, the key of bench_vs_torch's per-network summary)
KEYS = (("train", "train_jax_over_torch_best"), ("inference", "inference_jax_over_torch_best"),
        ("peak", "train_fraction_of_gemm_peak"))


def load_runs(paths, min_pairs: int) -> list[tuple[str, dict]]:
    """(file stem, report) for each bench_vs_torch results file whose every network ran in at
    least `min_pairs` pairs of worker processes; others are skipped. Raises ValueError for a
    file that is not such a report."""
    runs = []
    for path in paths:
        path = Path(path)
        try:
            report = json.loads(path.read_text())
            results, summary = report["results"], report["summary"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a bench_vs_torch.py results file ({e})") from e
        if summary and results and all(len(r.get("by_process", ())) >= min_pairs
                                       for r in results):
            runs.append((path.stem, report))
    return runs


def _batches(report) -> dict:
    """{network: the batch it ran at} in one results file (None where not recorded)."""
    return {r["network"]: r.get("batch") for r in report["results"] if "network" in r}


def summarize(runs) -> dict:
    """{row: {kind: (geometric mean, min, max, runs >= 1, runs)}} over the runs that have the
    row's network at the row's batch, kind in train / inference / peak (the fraction of the GEMM
    peak in training). A row is the network's name; where the runs hold a network at more than
    one batch (`bench_vs_torch.py --batch 128`, the book's), one row per batch, "name, batch B":
    the ratios of different batches are not pooled."""
    groups: dict[tuple, list] = {}  # (network, batch) -> the summaries of the runs that have it
    for _, report in runs:
        batches = _batches(report)
        for net, summary in report["summary"].items():
            groups.setdefault((net, batches.get(net)), []).append(summary)
    order = [net for net, _ in groups]  # first seen first; a network's batches ascending
    out: dict[str, dict] = {}
    for (net, batch), summaries in sorted(
            groups.items(), key=lambda g: (order.index(g[0][0]), g[0][1] or 0)):
        row = {}
        for kind, key in KEYS:
            vals = [summary[key] for summary in summaries if summary.get(key)]
            if vals:
                row[kind] = (statistics.geometric_mean(vals), min(vals), max(vals),
                             sum(v >= 1 for v in vals), len(vals))
        out[net if order.count(net) == 1 else f"{net}, batch {batch}"] = row
    return out


def markdown(runs, table) -> str:
    lines = ["Runs: " + "; ".join(
        f"`{stem}` ({report.get('date', '?')}, commit "
        f"{report.get('machine', {}).get('git_commit', '?')})" for stem, report in runs), "",
        "| network | JAX / best torch, training: geometric mean [min-max], runs >= 1 "
        "| inference | % of the GEMM peak in training: geometric mean [min-max] |",
        "|---|---|---|---|"]
    for net, row in table.items():
        cells = []
        for kind, _ in KEYS:
            if kind not in row:
                cells.append("-")
                continue
            g, lo, hi, ok, n = row[kind]
            cells.append(f"{g:.3f} [{lo:.2f}-{hi:.2f}], {ok}/{n}" if kind != "peak"
                         else f"{100 * g:.0f}% [{100 * lo:.0f}-{100 * hi:.0f}%]")
        lines.append(f"| {net} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*",
                   help="results files (default: benchmarks/results/cpu-*.json)")
    p.add_argument("--min-pairs", type=int, default=3,
                   help="skip runs whose networks ran in fewer pairs of worker processes")
    args = p.parse_args(argv)
    paths = args.files or sorted(RESULTS.glob("cpu-*.json"))
    try:
        runs = load_runs(paths, args.min_pairs)
    except ValueError as e:
        print(f"summarize_runs: {e}", file=sys.stderr)
        return 2
    if not runs:
        print(f"summarize_runs: no run among {len(paths)} file(s) has {args.min_pairs} or more "
              "pairs of worker processes per network", file=sys.stderr)
        return 1
    print(markdown(runs, summarize(runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
