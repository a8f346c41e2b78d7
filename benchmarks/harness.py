"""What the benchmarks share: threads, machine facts, GEMM peak, interleaved timing, memory.

Import order matters: call `set_threads` and import `flaxcnn` (which merges its XLA:CPU
defaults into XLA_FLAGS) before anything creates a JAX backend.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

if sys.argv and Path(sys.argv[0]).resolve().parent == ROOT / "benchmarks":
    # A benchmark script runs as train.py does: restarted once with glibc's huge pages for
    # XLA's per-step temporaries (flaxcnn/cpu.py), before anything else happens.
    from flaxcnn import cpu as _flaxcnn_cpu

    _flaxcnn_cpu.reexec_with_huge_pages()


# ----------------------------------------------------------------------------- threads

def set_threads(n: int | None) -> int:
    """Restricts this process to `n` cores (XLA sizes its thread pools from the affinity mask)
    and returns the thread count both frameworks will use. Call before JAX starts."""
    cpus = sorted(os.sched_getaffinity(0))
    if n is None or n >= len(cpus):
        return len(cpus)
    os.sched_setaffinity(0, cpus[:n])
    return n


def set_torch_threads(n: int):
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass


# ----------------------------------------------------------------------------- machine facts

def _lscpu() -> dict:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    info = {}
    for line in out.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            info[k.strip()] = v.strip()
    return info


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def machine_info(threads: int) -> dict:
    import flax
    import jax
    import jaxlib
    import optax

    info = _lscpu()
    mem_gib = None
    try:
        with open("/proc/meminfo") as f:
            mem_gib = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    cpu_flags = info.get("Flags", "").split()
    flags = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in cpu_flags]
    out = {
        "cpu": info.get("Model name", platform.processor()),
        "cpu_family_model": f"{info.get('CPU family', '?')}/{info.get('Model', '?')}",
        "logical_cpus": os.cpu_count(),
        "cpus_used": threads,
        "isa": flags,
        "hypervisor": info.get("Hypervisor vendor"),
        "memory_gib": mem_gib,
        "os": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "optax": optax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": [d.device_kind for d in jax.devices()],
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty_files": _git("status", "--porcelain", "--untracked-files=no").count("\n") + 1
        if _git("status", "--porcelain", "--untracked-files=no") else 0,
    }
    try:
        import torch

        out["torch"] = torch.__version__
        out["torch_threads"] = torch.get_num_threads()
        out["torch_mkldnn"] = bool(torch.backends.mkldnn.is_available())
    except ImportError:
        pass
    return out


def _git(*args) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def cpu_device_kind(threads: int) -> str:
    """The results files' name for this CPU at `threads` threads, e.g. cpu-amd-epyc-f26m2-2t.

    Cloud CPUs often share one model name across generations ("AMD EPYC" is Zen 4, family 25
    model 17, and Zen 5, family 26 model 2, on the machines this project ran on), and their
    speeds differ by 2x, so the family and model are part of the name."""
    info = _lscpu()
    fm = f"f{info['CPU family']}m{info['Model']}" if "CPU family" in info and "Model" in info \
        else ""
    name = info.get("Model name") or platform.processor() or "unknown CPU"
    # "Intel(R) Xeon(R) Processor @ 2.00GHz" -> intel-xeon-processor-2-00ghz
    name = re.sub(r"\((r|tm)\)", "", name, flags=re.IGNORECASE)
    return "-".join(p for p in ("cpu", slug(name), fm, f"{threads}t") if p)


def compiled_train_step(network: str, batch: int):
    """(step, state, x, y): `network`'s jitted training step (state donated) compiled for a
    random batch at the book's side and learning rate, as the step studies time it. Call after
    any `flaxcnn.cpu`/`flaxcnn.models.layers` setting the study makes."""
    import jax
    import jax.numpy as jnp

    from flaxcnn import models, recipes, training

    side = recipes.get(network).side
    model = models.create(network)
    opt = training.sgd(recipes.get(network).lr)
    state = jax.jit(lambda k: training.create_train_state(model, k, side, opt))(
        jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (batch, side, side, 1))
    y = jnp.zeros(batch, jnp.int32)
    step = jax.jit(training.train_step, donate_argnums=0).lower(state, x, y).compile()
    return step, state, x, y


def as_eval_step(step, state, x, y):
    """`compiled_train_step`'s result with `training.eval_step` (compiled) as its step, called
    the same way: (state, x, y) -> (state, metrics)."""
    import jax

    from flaxcnn import training

    ev = jax.jit(training.eval_step).lower(state, x, y).compile()
    return (lambda state, x, y: (state, ev(state, x, y))), state, x, y


# ----------------------------------------------------------------------------- timing

def dot_1x1(conv, x, kernel, strides, padding, precision=None):
    """`conv(x, kernel, strides, padding, precision)`, except that a 1x1, stride-1, unpadded
    convolution is computed as the (N*H*W, C) @ (C, O) matrix product it is (the studies'
    "dot1x1" variants)."""
    import jax.numpy as jnp

    if kernel.shape[:2] == (1, 1) and strides in (1, (1, 1)) and padding in (0, (0, 0)):
        y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel[0, 0], precision=precision)
        return y.reshape(*x.shape[:-1], kernel.shape[-1])
    return conv(x, kernel, strides, padding, precision)


def summarize(samples: list[float], scale: float = 1.0) -> dict:
    """Median and min-max of `scale / sample` (e.g. examples per second from seconds)."""
    rates = sorted(scale / s for s in samples)
    return {"median": statistics.median(rates), "min": rates[0], "max": rates[-1],
            "n": len(rates)}


def interleave(runners: dict, rounds: int, warmup: int = 1, log=None,
               start: int = 0) -> dict[str, list[float]]:
    """Runs every runner `warmup` times, then `rounds` rounds of A, B, C, ... (the order rotates
    each round so no runner always follows the same one; `start` rounds on, to go on from an
    earlier call). A runner is `f() -> seconds` for one timed sample. Returns name -> list of
    samples."""
    names = list(runners)
    for name in names:
        for _ in range(warmup):
            runners[name]()
    samples = {name: [] for name in names}
    for r in range(rounds):
        k = (start + r) % len(names)
        for name in names[k:] + names[:k]:
            samples[name].append(runners[name]())
        if log:
            log(f"  round {r + 1}/{rounds}: " + ", ".join(
                f"{n} {samples[n][-1] * 1e3:.0f} ms" for n in names))
    return samples


# ----------------------------------------------------------------------------- GEMM peak

def gemm_peak_jax(sizes=(1024, 2048, 3072), reps: int = 5, dtype: str = "float32") -> dict:
    """The best GFLOP/s of an n*n @ n*n jnp.dot over `sizes`, under the active XLA flags."""
    import jax
    import jax.numpy as jnp

    best = {}
    for n in sizes:
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
        b = jax.random.normal(jax.random.key(1), (n, n), jnp.dtype(dtype))
        f = jax.jit(lambda a, b: jnp.dot(a, b, precision="highest"))
        f(a, b).block_until_ready()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            f(a, b).block_until_ready()
            ts.append(time.perf_counter() - t)
        best[n] = 2 * n**3 / min(ts) / 1e9
    return {"gflops": max(best.values()), "by_size": best}


def gemm_peak_torch(sizes=(1024, 2048, 3072), reps: int = 5, device: str = "cpu",
                    dtype: str = "float32") -> dict:
    import torch

    best = {}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
        b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
        torch.mm(a, b)
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            torch.mm(a, b)
            if device != "cpu":
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t)
        best[n] = 2 * n**3 / min(ts) / 1e9
    return {"gflops": max(best.values()), "by_size": best}


# ----------------------------------------------------------------------------- XLA analyses

def xla_flops(compiled) -> float | None:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    f = (ca or {}).get("flops")
    return float(f) if f is not None else None


def model_flops(fn, *args) -> float | None:
    """FLOPs of `fn(*args)` as XLA's cost analysis counts them, traced afresh with XLA's own
    convolutions: the analysis sees no FLOPs inside oneDNN's custom calls (flaxcnn.onednn), so a
    program compiled with them would report almost none."""
    import jax

    from flaxcnn.models import layers

    fn = getattr(fn, "__wrapped__", fn)  # a jitted fn's trace cache holds the oneDNN trace
    saved, layers._ONEDNN = layers._ONEDNN, False
    try:  # and so would a second lowering of the same function object
        return xla_flops(jax.jit(lambda *a: fn(*a)).lower(*args))
    finally:
        layers._ONEDNN = saved


def xla_memory(compiled) -> dict:
    """XLA's buffer plan for one call (bytes): arguments, outputs, temporaries."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return {}
    if m is None:
        return {}
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes")
    return {k: int(getattr(m, k)) for k in keys if hasattr(m, k)}


# ----------------------------------------------------------------------------- resident memory

def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def trim_heap():
    """Returns freed heap memory to the OS (glibc), so compile-time garbage that the allocator
    kept does not count as the network's memory."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_hwm() -> bool:
    """Resets the kernel's peak-RSS counter (VmHWM) of this process (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_child(args: list[str], timeout: float = 1800) -> dict:
    """Runs this interpreter on `args`; the child's last stdout line is a JSON object."""
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                         timeout=timeout, cwd=ROOT)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        return {"error": (res.stderr or res.stdout).strip().splitlines()[-1:] or ["failed"]}
    return json.loads(lines[-1])
