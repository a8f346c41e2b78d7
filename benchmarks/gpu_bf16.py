"""bfloat16 against float32 training throughput of the book's networks on one accelerator.

For each network at its recipe's side and batch, the compiled training step of `train.py`
(`flaxcnn.trainer.Run`, via `bench_scaling.throughput`) is timed on synthetic uint8 images with
`--dtype float32` and `--dtype bfloat16` (bf16 compute, f32 parameters, BatchNorm statistics and
loss). Results are written after every row, so a run stopped by `--budget-s` keeps what it
measured. Meant for a GPU; it runs on a CPU too (slowly: use `--models lenet_bn`).

On NVIDIA GPUs XLA runs float32 convolutions and matrix products with TF32 tensor cores at
JAX's default precision; `--highest` adds float32 rows at `jax.default_matmul_precision
("highest")` (true f32 arithmetic) for reference.

    benchmarks/gpu_bf16.sh                               # on the GPU machine; see that file
    PYTHONPATH=. python3 benchmarks/gpu_bf16.py --out DIR [--models lenet_bn,resnet18]
"""

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import flaxcnn  # noqa: E402, F401  (XLA:CPU defaults before JAX starts)

MODELS = ["lenet_bn", "alexnet", "vgg", "nin", "googlenet", "resnet18", "densenet"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--steps", type=int, default=30, help="steps per timed window")
    p.add_argument("--repeats", type=int, default=3, help="timed windows (median taken)")
    p.add_argument("--highest", action="store_true",
                   help="also float32 at matmul precision 'highest' (no TF32)")
    p.add_argument("--budget-s", type=float, default=420,
                   help="start no new network after this many seconds")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args()

    import jax
    from bench_scaling import throughput

    t_start = time.perf_counter()
    devices = jax.devices()
    backend = jax.default_backend()
    machine = {
        "backend": backend, "device": devices[0].device_kind, "count": len(devices),
        "jax": jax.__version__, "python": platform.python_version(),
    }
    variants = [("float32", None), ("bfloat16", None)]
    if args.highest:
        variants.insert(1, ("float32", "highest"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, skipped = [], []

    def write():
        lines = [
            f"Training throughput, bfloat16 against float32, on one {machine['device']} "
            f"({backend}), jax {machine['jax']}: "
            f"`{' '.join(['benchmarks/gpu_bf16.py', *sys.argv[1:]])}`. Synthetic uint8 images "
            f"at each recipe's side and batch; median of {args.repeats} windows of "
            f"{args.steps} steps after warm-up, compilation excluded. float32 uses JAX's "
            "default precision (TF32 tensor cores on NVIDIA GPUs) unless marked 'highest'.",
            "",
            "| model | side | batch | float32 ex/s | bfloat16 ex/s | bf16 / f32 |"
            + (" f32 highest ex/s |" if args.highest else ""),
            "|---|---|---|---|---|---|" + ("---|" if args.highest else ""),
        ]
        by_model = {}
        for r in rows:
            by_model.setdefault(r["model"], {})[(r["dtype"], r["precision"])] = r
        for model, got in by_model.items():
            f32, bf16 = got.get(("float32", None)), got.get(("bfloat16", None))
            any_row = next(iter(got.values()))
            cells = [model, str(any_row["side"]), str(any_row["global_batch"])]
            cells += [f"{r['examples_per_s']:,.0f}" if r else "-" for r in (f32, bf16)]
            cells.append(f"{bf16['examples_per_s'] / f32['examples_per_s']:.2f}x"
                         if f32 and bf16 else "-")
            if args.highest:
                hi = got.get(("float32", "highest"))
                cells.append(f"{hi['examples_per_s']:,.0f}" if hi else "-")
            lines.append("| " + " | ".join(cells) + " |")
        if skipped:
            lines += ["", f"Not measured (time budget): {', '.join(skipped)}."]
        name = f"bf16_{backend}"
        (out / f"{name}.md").write_text("\n".join(lines) + "\n")
        (out / f"{name}.json").write_text(json.dumps(
            {"machine": machine, "rows": rows, "skipped": skipped, "argv": sys.argv[1:]},
            indent=1) + "\n")
        return lines

    for model in args.models.split(","):
        if time.perf_counter() - t_start > args.budget_s:
            skipped.append(model)
            continue
        for dtype, precision in variants:
            ctx = (jax.default_matmul_precision(precision) if precision
                   else contextlib.nullcontext())
            with ctx:
                r = throughput(model, dtype=dtype, steps=args.steps, repeats=args.repeats,
                               warmup=3)
            r["precision"] = precision
            rows.append(r)
            print(f"{model} {dtype}{' ' + precision if precision else ''}: "
                  f"{r['examples_per_s']:,.0f} ex/s, compile {r['compile_s']:.1f} s, "
                  f"loss finite {r['loss_finite']} "
                  f"({time.perf_counter() - t_start:.0f} s)", flush=True)
            write()
    print("\n".join(write()))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
