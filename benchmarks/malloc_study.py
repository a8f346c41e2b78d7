"""glibc's malloc with huge pages (`flaxcnn.cpu.reexec_with_huge_pages`) against its defaults.

glibc reads the tunable when a process starts, so each sample is a fresh process: with
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` and without, alternating, `--rounds` of each. A child
compiles the training step, runs two warm-up steps, then `--steps` timed ones, and reports the
median examples/s, minor page faults and system/user CPU seconds per step, and its peak RSS.

    python benchmarks/malloc_study.py                      # the seven networks
    python benchmarks/malloc_study.py --networks densenet --rounds 3 --steps 10

Writes benchmarks/results/malloc_study_<device kind>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path

import harness

NETWORKS = ["alexnet", "vgg", "nin", "googlenet", "lenet_bn", "resnet18", "densenet"]
MODES = {"huge pages": True, "glibc defaults": False}


def child(network: str, batch: int, steps: int) -> dict:
    import jax
    import jax.numpy as jnp

    from flaxcnn import cpu, models, recipes, training

    side = recipes.get(network).side
    model = models.create(network)
    opt = training.sgd(recipes.get(network).lr)
    state = jax.jit(lambda k: training.create_train_state(model, k, side, opt))(
        jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (batch, side, side, 1))
    y = jnp.zeros(batch, jnp.int32)
    step = jax.jit(training.train_step, donate_argnums=0).lower(state, x, y).compile()
    for _ in range(2):
        state, m = step(state, x, y)
    jax.block_until_ready(m)
    r0, times = resource.getrusage(resource.RUSAGE_SELF), []
    for _ in range(steps):
        t = time.perf_counter()
        state, m = step(state, x, y)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return {"ex_per_s": batch / statistics.median(times),
            "minflt_per_step": (r1.ru_minflt - r0.ru_minflt) / steps,
            "sys_s_per_step": (r1.ru_stime - r0.ru_stime) / steps,
            "user_s_per_step": (r1.ru_utime - r0.ru_utime) / steps,
            "peak_rss_mib": harness.hwm_mib(), "huge_pages": cpu.huge_page_malloc()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--networks", nargs="+", default=NETWORKS, choices=NETWORKS)
    p.add_argument("--batch", type=int, help="default: 32, LeNet-BN 256 (as bench_vs_torch)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--out-dir", default=str(harness.RESULTS))
    p.add_argument("--child", nargs=3, metavar=("NETWORK", "BATCH", "STEPS"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        net, batch, steps = args.child
        print(json.dumps(child(net, int(batch), int(steps))))
        return
    from flaxcnn import cpu

    if cpu.huge_page_malloc() == "thp-always":
        sys.exit("the kernel gives every large mapping huge pages here: nothing to compare")
    info = harness.machine_info(os.cpu_count() or 1)
    info["device_kind"] = harness.cpu_device_kind(os.cpu_count())
    info["date"] = time.strftime("%Y-%m-%d %H:%M %Z")
    rows = []
    for net in args.networks:
        batch = args.batch or (256 if net == "lenet_bn" else 32)
        samples = {m: [] for m in MODES}
        for r in range(args.rounds):
            for mode in (list(MODES) if r % 2 == 0 else list(MODES)[::-1]):
                # (the child's harness would restart it with huge pages unless opted out)
                os.environ.pop("GLIBC_TUNABLES", None)
                os.environ.pop(cpu.HUGE_PAGES_OPT_OUT_ENV, None)
                if MODES[mode]:
                    os.environ["GLIBC_TUNABLES"] = cpu.HUGE_PAGE_TUNABLE
                else:
                    os.environ[cpu.HUGE_PAGES_OPT_OUT_ENV] = "1"
                steps = args.steps * (10 if net == "lenet_bn" else 1)  # its steps take ~10 ms
                out = harness.run_child([__file__, "--child", net, str(batch), str(steps)])
                if "error" in out:
                    sys.exit(f"{net} ({mode}): {out['error']}")
                samples[mode].append(out)
                print(f"{net} {mode}: {out['ex_per_s']:.1f} ex/s, "
                      f"{out['minflt_per_step']:.0f} faults/step, "
                      f"sys {out['sys_s_per_step'] * 1e3:.0f} ms/step", flush=True)
        for mode, outs in samples.items():
            rows.append({"network": net, "batch": batch, "mode": mode, "samples": outs, **{
                k: statistics.median(o[k] for o in outs)
                for k in ("ex_per_s", "minflt_per_step", "sys_s_per_step", "user_s_per_step",
                          "peak_rss_mib")}})
    command = "python benchmarks/malloc_study.py " + shlex.join(argv or sys.argv[1:])
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"malloc_study_{info['device_kind']}"
    stem.with_suffix(".json").write_text(json.dumps(
        {"machine": info, "command": command.strip(), "rows": rows}, indent=1))
    md = [f"# glibc malloc with huge pages against its defaults, {info['device_kind']}",
          "", f"Machine: {info['cpu']}. jax {info['jax']}. Commit {info['git_commit']}. "
          f"Date: {info['date']}. Command: `{command.strip()}`. Medians of {args.rounds} fresh "
          f"processes each ({args.steps} timed training steps per process, LeNet-BN "
          f"{10 * args.steps}).", "",
          "| network | batch | ex/s: huge pages / defaults | speed-up | minor faults per step | "
          "system CPU ms per step | peak RSS MiB |", "|---|---|---|---|---|---|---|"]
    for net in args.networks:
        a, b = (next(r for r in rows if r["network"] == net and r["mode"] == m) for m in MODES)
        md.append(f"| {net} | {a['batch']} | {a['ex_per_s']:.1f} / {b['ex_per_s']:.1f} | "
                  f"{a['ex_per_s'] / b['ex_per_s']:.2f}x | {a['minflt_per_step']:.0f} / "
                  f"{b['minflt_per_step']:.0f} | {a['sys_s_per_step'] * 1e3:.0f} / "
                  f"{b['sys_s_per_step'] * 1e3:.0f} | {a['peak_rss_mib']:.0f} / "
                  f"{b['peak_rss_mib']:.0f} |")
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
