"""Throughput of the input pipeline alone: uint8 split on the device → shuffled float batches.

For each (side, batch size) of the book's recipes: the training set is put on the device once,
each epoch's order comes from `data.epoch_order`, and every step runs the jitted
`data.gather_batch` (gather the batch's uint8 images, scale to [0, 1], resize bilinearly to the
network's side), the same function the trainer calls inside its step. Compilation is excluded;
each batch is waited for (`block_until_ready`), so the figure is a lower bound.

    .venv/bin/python benchmarks/bench_data.py    # writes benchmarks/results/data_<backend>.*
"""

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import harness
import jax
import jax.numpy as jnp
import numpy as np

from flaxcnn import data


def training_results() -> Path:
    """The training throughput to compare with: the latest JAX-vs-PyTorch run
    (benchmarks/bench_vs_torch.py) on this CPU model at this process's thread count."""
    return harness.RESULTS / f"{harness.cpu_device_kind(len(os.sched_getaffinity(0)))}.json"


def training_reference(side):
    """(network, JAX training examples/s) of the fastest network at `side`, or None."""
    try:
        results = json.loads(training_results().read_text())["results"]
    except (OSError, KeyError, ValueError):
        return None
    rates = [(r["train"]["jax"]["median"], r["network"]) for r in results if r["side"] == side]
    return (max(rates)[1], round(max(rates)[0], 1)) if rates else None
CONFIGS = [(28, 256), (96, 128), (96, 256), (224, 128)]


def bench(images, labels, side, batch_size, method, steps, repeats, seed=0):
    gather = jax.jit(data.gather_batch, static_argnames=("side", "dtype", "method"))
    order_fn = jax.jit(data.epoch_order, static_argnames="n")
    n = images.shape[0]
    full, _ = data.train_batches(order_fn(seed, 0, n=n), batch_size)
    gather(images, labels, full[0], side=side, method=method)[0].block_until_ready()  # compile
    rates, order_ms = [], []
    for epoch in range(1, repeats + 1):
        t = time.perf_counter()
        full, _ = data.train_batches(order_fn(seed, epoch, n=n), batch_size)
        full.block_until_ready()
        order_ms.append((time.perf_counter() - t) * 1e3)
        count = min(steps, full.shape[0])
        t = time.perf_counter()
        for i in range(count):
            x, y = gather(images, labels, full[i], side=side, method=method)
            x.block_until_ready()
        rates.append(count * batch_size / (time.perf_counter() - t))
    assert x.shape == (batch_size, side, side, 1) and x.dtype == jnp.float32
    return {
        "examples_per_s": statistics.median(rates),
        "ms_per_batch": batch_size / statistics.median(rates) * 1e3,
        "epoch_order_ms": statistics.median(order_ms),
        "steps": count,
        "repeats": repeats,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="batches timed per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="results basename (default data_<backend>)")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()

    backend = jax.default_backend()
    t = time.perf_counter()
    images, labels = data.load_split("train", data_dir=args.data_dir)
    load_s = time.perf_counter() - t
    images, labels = data.to_device(images, labels)
    device = str(jax.devices()[0].device_kind)
    print(f"{backend} ({device}); load_split('train') {load_s:.2f} s")

    rows = []
    for side, batch_size in CONFIGS:
        row = {"side": side, "batch_size": batch_size}
        for method in data.RESIZE_METHODS:
            steps = args.steps * (4 if side == 28 else 1)
            r = bench(images, labels, side, batch_size, method, steps, args.repeats)
            row[method] = r
            rate = r["examples_per_s"]
            print(f"side {side:3d} batch {batch_size:3d} {method:6s} {rate:12,.0f} ex/s")
        reference = training_reference(side) if backend == "cpu" else None
        if reference:
            net, ref = reference
            row["reference"] = {"network": net, "train_examples_per_s": ref}
            row["ratio"] = row["pil"]["examples_per_s"] / ref
        rows.append(row)

    out = Path(__file__).parent / "results" / (args.out or f"data_{backend}")
    out.parent.mkdir(exist_ok=True)
    meta = {
        "backend": backend,
        "device": device,
        "jax": jax.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_split_train_s": round(load_s, 3),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")

    lines = [
        f"Input pipeline alone on {backend} ({device}, {meta['cpus']} cores),"
        f" jax {jax.__version__}:"
        " uint8 training set on the device → `epoch_order` → jitted `gather_batch` (gather,"
        " /255, bilinear resize), each batch waited for; median of"
        f" {args.repeats} epochs, compilation excluded; load average during the run"
        f" {meta['load_average_1min']} (1-min average; the benchmark's own threads count).",
        "",
    ]
    if backend == "cpu" and all("reference" in r for r in rows):
        lines += [
            "| side | batch | pipeline ex/s (book-exact `pil`) | pipeline ex/s (`linear`) "
            "| fastest network at this side, training ex/s | pipeline / training |",
            "|---|---|---|---|---|---|",
        ]
        for r in rows:
            ref = r["reference"]
            lines.append(
                f"| {r['side']} | {r['batch_size']} | {r['pil']['examples_per_s']:,.0f} "
                f"| {r['linear']['examples_per_s']:,.0f} "
                f"| {ref['network']} ≈ {ref['train_examples_per_s']:,} | {r['ratio']:,.0f}× |"
            )
        lines += [
            "",
            f"Training throughputs: flaxcnn's training step in {training_results().name} "
            "(`python benchmarks/bench_vs_torch.py`, same CPU).",
        ]
    else:
        lines += [
            "| side | batch | pipeline ex/s (book-exact `pil`) | pipeline ex/s (`linear`) |",
            "|---|---|---|---|",
        ]
        for r in rows:
            lines.append(
                f"| {r['side']} | {r['batch_size']} | {r['pil']['examples_per_s']:,.0f} "
                f"| {r['linear']['examples_per_s']:,.0f} |"
            )
    order_ms = max(r["pil"]["epoch_order_ms"] for r in rows)
    lines.append(f"Shuffling an epoch (`epoch_order` + `train_batches`): ≤ {order_ms:.1f} ms.")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}.md and {out}.json")


if __name__ == "__main__":
    np.set_printoptions(linewidth=120)
    main()
