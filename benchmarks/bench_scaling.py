"""Data-parallel scaling of the training step: 1, 2 and 4 devices, and 2 processes.

Each configuration runs in its own interpreter, because the number of simulated CPU devices
(`--xla_force_host_platform_device_count`) is fixed when JAX starts. Every run trains the same
network at the same *global* batch with `flaxcnn.trainer.Run` (the mesh, shardings and compiled
step `train.py` uses) on synthetic uint8 images, which cost the step what real ones do: the
split lives on the device and the step is the same program. Compilation is excluded; each
timed window ends with `block_until_ready`; the figure is the median over `--repeats` windows.

On a CPU the simulated devices share the same cores, so this table shows the overhead of the
partitioned program and its collectives, not a speed-up; on several accelerators the same
command measures real scaling (`--devices-list`, no XLA flag needed).

    .venv/bin/python benchmarks/bench_scaling.py             # writes results/scaling_<backend>.*
    .venv/bin/python benchmarks/bench_scaling.py --model resnet18 --steps 3
"""

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def throughput(model="lenet_bn", batch_size=None, side=None, dtype="float32", devices=None,
               steps=20, repeats=3, warmup=2, train_size=None, seed=0):
    """Training examples per second of `trainer.Run`'s compiled step on synthetic data.

    Returns a dict (examples_per_s, ms_per_step, compile_s, devices, processes, ...). Must run
    after any `jax.distributed` initialisation; in several processes every one calls it.
    """
    import jax
    import numpy as np

    from flaxcnn import trainer

    cfg = trainer.Config(model=model, batch_size=batch_size, side=side, dtype=dtype,
                         devices=devices, checkpoint=False, progress=False,
                         workdir="/nonexistent").resolved()
    run = trainer.Run(cfg, log=lambda *a: None)
    bs = cfg.batch_size
    n = train_size or bs * 4
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, (n,), dtype=np.int32)
    run.set_data((images, labels), (images[:bs], labels[:bs]))
    state = run.init_state(trainer.sgd(cfg.lr))
    t0 = time.perf_counter()
    run.compile(state)
    compile_s = time.perf_counter() - t0
    order = np.arange(n, dtype=np.int32).reshape(-1, bs)
    batches = [run._global(order[i % len(order)], run.batch_sharded)
               for i in range(len(order))]
    acc = run.put(trainer.host(trainer._train_acc()))

    def window(count):
        nonlocal state, acc
        t = time.perf_counter()
        for i in range(count):
            state, acc = run.train_full(state, acc, run.train_images, run.train_labels,
                                        batches[i % len(batches)])
        jax.block_until_ready((state, acc))
        return time.perf_counter() - t

    window(warmup)
    times = [window(steps) for _ in range(repeats)]
    loss = float(trainer.host(acc["loss"])) / max(int(trainer.host(acc["count"])), 1)
    median = statistics.median(times)
    return {
        "model": model, "side": cfg.side, "global_batch": bs, "dtype": dtype,
        "devices": len(run.devices), "processes": run.processes,
        "per_device_batch": bs // len(run.devices), "device": run.label(),
        "examples_per_s": steps * bs / median, "ms_per_step": median / steps * 1e3,
        "compile_s": compile_s, "steps": steps, "repeats": repeats,
        "loss_finite": bool(np.isfinite(loss)),
    }


def _worker(args):
    from flaxcnn import distributed

    if args.coordinator:
        distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                               heartbeat_timeout=30)
    import jax

    result = throughput(args.model, args.batch_size, args.side, args.dtype, args.devices,
                        args.steps, args.repeats)
    if jax.process_index() == 0:
        print("RESULT" + json.dumps(result), flush=True)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, devices, processes=1):
    """One configuration in fresh interpreters; returns the result dict of process 0.

    Each process simulates `devices` CPU devices (the flag only concerns the CPU platform; on
    an accelerator the mesh takes the accelerator's devices)."""
    from flaxcnn import cpu

    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    name = "xla_force_host_platform_device_count"
    flags = " ".join(t for t in flags.split() if name not in t)
    env["XLA_FLAGS"] = cpu.merge_flags(flags, {name: str(devices)})
    base = [sys.executable, __file__, "--worker", "--model", args.model, "--dtype", args.dtype,
            "--steps", str(args.steps), "--repeats", str(args.repeats), "--devices",
            str(devices)]
    for name in ("batch_size", "side"):
        if getattr(args, name):
            base += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if processes == 1:
        cmds = [base]
    else:
        port = _free_port()
        cmds = [base + ["--coordinator", f"127.0.0.1:{port}", "--num-processes",
                        str(processes), "--process-id", str(i)] for i in range(processes)]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for c in cmds]
    outs = [p.communicate(timeout=3600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        if p.returncode:
            raise RuntimeError(f"{cmds[0]} failed:\n{err[-3000:]}")
    return json.loads(outs[0][0].split("RESULT", 1)[1])


def _machine():
    import jax  # the version only: starting a backend here would hold an accelerator

    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    cpu_name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu_name, "cores": os.cpu_count(),
            "jax": jax.__version__, "python": platform.python_version(), "load_avg_1m": load}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="lenet_bn")
    p.add_argument("--batch-size", type=int, help="global batch (default: the recipe's)")
    p.add_argument("--side", type=int)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--steps", type=int, default=20, help="steps per timed window")
    p.add_argument("--repeats", type=int, default=3, help="timed windows (median taken)")
    p.add_argument("--devices-list", default="1,2,4",
                   help="device counts of one process (simulated on a CPU)")
    p.add_argument("--no-processes", action="store_true",
                   help="skip the 2-process row (2 interpreters, 1 device each)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--devices", type=int, help=argparse.SUPPRESS)
    p.add_argument("--coordinator", help=argparse.SUPPRESS)
    p.add_argument("--num-processes", type=int, help=argparse.SUPPRESS)
    p.add_argument("--process-id", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    import flaxcnn  # noqa: F401  (XLA:CPU defaults before JAX starts)

    if args.worker:
        return _worker(args)

    machine = _machine()
    rows = []
    for n in (int(x) for x in args.devices_list.split(",")):
        print(f"{n} device(s) ...", flush=True)
        rows.append(_run(args, n))
    if not args.no_processes:
        print("2 processes x 1 device ...", flush=True)
        rows.append(_run(args, 1, processes=2))
    machine["load_avg_1m_after"] = os.getloadavg()[0]
    machine["backend"] = rows[0]["device"].split(":")[0]
    cpu_backend = machine["backend"] == "cpu"
    base = rows[0]["examples_per_s"]
    for r in rows:
        r["relative"] = r["examples_per_s"] / base

    kind = "simulated CPU devices" if cpu_backend else f"{machine['backend']} devices"
    lines = [
        f"Training-step throughput of `{args.model}` (side {rows[0]['side']}, global batch "
        f"{rows[0]['global_batch']}, {args.dtype}) data-parallel over {kind}, from "
        f"`{' '.join(['python benchmarks/bench_scaling.py', *sys.argv[1:]])}`.",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, backend {machine['backend']}, "
        f"jax {machine['jax']}, Python {machine['python']}; load average "
        f"{machine['load_avg_1m']:.1f} before and {machine['load_avg_1m_after']:.1f} after "
        "(the benchmark's own threads count). Median of "
        f"{args.repeats} windows of {args.steps} steps, compilation excluded.",
        "",
        "| devices | processes | per-device batch | examples/s | ms/step | vs 1 device | "
        "compile s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['devices']} | {r['processes']} | {r['per_device_batch']} | "
                     f"{r['examples_per_s']:,.0f} | {r['ms_per_step']:.1f} | "
                     f"{r['relative']:.2f}x | {r['compile_s']:.1f} |")
    if cpu_backend:
        lines += [
            "",
            "Informational only: simulated devices are slices of the same CPU, so N devices do "
            "the same arithmetic on the same cores plus the partitioning and the all-reduces "
            "of gradients and BatchNorm statistics (and, across processes, gloo over TCP). "
            "A speed-up needs real devices.",
        ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"scaling_{machine['backend']}"
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    (out / f"{name}.json").write_text(json.dumps({"machine": machine, "rows": rows,
                                                 "argv": sys.argv[1:]}, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
