"""JAX / best torch per network across several bench_vs_torch.py runs: one run's ratio moves by
about ±0.1 with the host (benchmarks/xla_cpu_study.md), so the issue's "at least 1.0x" is read
better from several runs, on several CPUs, than from the latest alone.

    python benchmarks/summarize_runs.py                  # every CPU run of three pairs or more
    python benchmarks/summarize_runs.py benchmarks/results/cpu-amd-epyc-f26m2-2t*.json

By default it takes the results files in benchmarks/results whose networks ran in at least
`--min-pairs` pairs of fresh worker processes (the method since commit 958cfac), and prints, per
network, the geometric mean of the ratios, their range, and in how many runs JAX was at least as
fast; the same for the fraction of the GEMM peak in training.
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


def summarize(runs) -> dict:
    """{network: {kind: (geometric mean, min, max, runs >= 1, runs)}} over the runs that have
    the network, kind in train / inference / peak (the fraction of the GEMM peak in training)."""
    out: dict[str, dict] = {}
    networks = []
    for _, report in runs:
        networks += [n for n in report["summary"] if n not in networks]
    for net in networks:
        row = {}
        for kind, key in KEYS:
            vals = [report["summary"][net][key] for _, report in runs
                    if report["summary"].get(net, {}).get(key)]
            if vals:
                row[kind] = (statistics.geometric_mean(vals), min(vals), max(vals),
                             sum(v >= 1 for v in vals), len(vals))
        out[net] = row
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
