"""XLA's per-step temporaries and glibc's malloc: flaxcnn's settings against the earlier ones.

Three modes, each sample a fresh process (glibc reads its tunables when a process starts),
alternating, `--rounds` of each:
- "kept mapped" (the default, `flaxcnn.cpu.reexec_with_huge_pages` and `dispatch_inline`):
  huge pages, glibc's main heap grown and kept instead of large blocks mapped on their own,
  and JAX running each CPU computation on the calling thread, which allocates from that heap;
- "huge pages" (the default before): `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` only;
- "glibc defaults" (`FLAXCNN_NO_HUGE_PAGES=1`).
A child compiles the training step, runs two warm-up steps, then `--steps` timed ones, and
reports the median examples/s, minor page faults and system/user CPU seconds per step, and
its peak RSS; then `--pauses` times it sleeps `--pause-s` seconds and times one step, the
first after the pause (what a benchmark's interleaved samples see).

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

from flaxcnn import cpu

NETWORKS = ["alexnet", "vgg", "nin", "googlenet", "lenet_bn", "resnet18", "densenet"]
MODES = {  # name -> the environment a child starts with (its harness restarts it if needed)
    "kept mapped": {},
    "huge pages": {"GLIBC_TUNABLES": cpu.HUGE_PAGE_TUNABLE, cpu.ASYNC_DISPATCH_ENV: "true"},
    "glibc defaults": {cpu.HUGE_PAGES_OPT_OUT_ENV: "1"},
}


def child(network: str, batch: int, steps: int, pauses: int, pause_s: float) -> dict:
    cpu.dispatch_inline()  # "kept mapped" only (it needs the tunables); every network inline
    import jax

    step, state, x, y = harness.compiled_train_step(network, batch)
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
    after = []
    for _ in range(pauses):
        time.sleep(pause_s)
        t = time.perf_counter()
        state, m = step(state, x, y)
        jax.block_until_ready(m)
        after.append(time.perf_counter() - t)
    return {"ex_per_s": batch / statistics.median(times),
            "after_pause_ex_per_s": batch / statistics.median(after) if after else None,
            "inline": not jax.config.read("jax_cpu_enable_async_dispatch"),
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
    p.add_argument("--pauses", type=int, default=3, help="steps timed after a pause")
    p.add_argument("--pause-s", type=float, default=3.0)
    p.add_argument("--out-dir", default=str(harness.RESULTS))
    p.add_argument("--child", nargs=3, metavar=("NETWORK", "BATCH", "STEPS"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        net, batch, steps = args.child
        print(json.dumps(child(net, int(batch), int(steps), args.pauses, args.pause_s)))
        return
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
                for name in ("GLIBC_TUNABLES", cpu.HUGE_PAGES_OPT_OUT_ENV, cpu.ASYNC_DISPATCH_ENV):
                    os.environ.pop(name, None)
                os.environ.update(MODES[mode])
                steps = args.steps * (10 if net == "lenet_bn" else 1)  # its steps take ~10 ms
                out = harness.run_child([__file__, "--child", net, str(batch), str(steps),
                                         "--pauses", str(args.pauses),
                                         "--pause-s", str(args.pause_s)])
                if "error" in out:
                    sys.exit(f"{net} ({mode}): {out['error']}")
                samples[mode].append(out)
                print(f"{net} {mode}: {out['ex_per_s']:.1f} ex/s, after a pause "
                      f"{out['after_pause_ex_per_s'] or float('nan'):.1f}, "
                      f"{out['minflt_per_step']:.0f} faults/step, "
                      f"sys {out['sys_s_per_step'] * 1e3:.0f} ms/step", flush=True)
        for mode, outs in samples.items():
            rows.append({"network": net, "batch": batch, "mode": mode, "samples": outs, **{
                k: statistics.median(o[k] for o in outs)
                for k in ("ex_per_s", "minflt_per_step", "sys_s_per_step", "user_s_per_step",
                          "peak_rss_mib")}, "after_pause_ex_per_s": statistics.median(
                              o["after_pause_ex_per_s"] for o in outs) if args.pauses else None})
    command = "python benchmarks/malloc_study.py " + shlex.join(argv or sys.argv[1:])
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"malloc_study_{info['device_kind']}"
    stem.with_suffix(".json").write_text(json.dumps(
        {"machine": info, "command": command.strip(), "rows": rows}, indent=1))
    names = " / ".join(MODES)
    md = [f"# XLA's per-step temporaries and glibc's malloc, {info['device_kind']}",
          "", f"Machine: {info['cpu']}. jax {info['jax']}. Commit {info['git_commit']}. "
          f"Date: {info['date']}. Command: `{command.strip()}`. Medians of {args.rounds} fresh "
          f"processes each ({args.steps} timed training steps per process, LeNet-BN "
          f"{10 * args.steps}; then {args.pauses} steps each after a {args.pause_s:g} s "
          f"pause). Modes: {names} (benchmarks/malloc_study.py).", "",
          f"| network | batch | ex/s: {names} | ex/s, first step after a pause | "
          "minor faults per step | system CPU ms per step | peak RSS MiB |",
          "|---|---|---|---|---|---|---|"]
    for net in args.networks:
        rs = [next(r for r in rows if r["network"] == net and r["mode"] == m) for m in MODES]

        def cells(key, fmt, scale=1.0, rs=rs):
            return " / ".join("-" if r[key] is None else format(r[key] * scale, fmt)
                              for r in rs)

        md.append(f"| {net} | {rs[0]['batch']} | {cells('ex_per_s', '.1f')} | "
                  f"{cells('after_pause_ex_per_s', '.1f')} | {cells('minflt_per_step', '.0f')} | "
                  f"{cells('sys_s_per_step', '.0f', 1e3)} | {cells('peak_rss_mib', '.0f')} |")
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
