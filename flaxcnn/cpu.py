"""Default XLA:CPU settings for these networks, applied when `flaxcnn` is imported.

XLA reads `XLA_FLAGS` once, when JAX creates its first backend, so the defaults are merged into
the environment variable at import time, before anything is compiled. They are merged flag by
flag: a flag the user already put in `XLA_FLAGS` is never overridden, whatever its value. Only
`xla_cpu_*` flags are set, which no other backend reads, so a GPU run compiles exactly as before
(its host-side CPU computations get the same defaults).

Opt out with `FLAXCNN_NO_XLA_DEFAULTS=1` (any non-empty value other than `0`), or set the flag
yourself. The evidence for each default is in `benchmarks/xla_cpu_study.md`.

If JAX's backend already exists when `flaxcnn` is first imported, the defaults cannot take effect
any more; `apply_defaults` then changes nothing and says so in `STATUS` (and in a warning when
the backend is a CPU and the defaults are missing).

`reexec_with_huge_pages`, which train.py and the benchmarks call first, restarts the process
with glibc tunables that give XLA's per-step temporaries huge pages and keep them mapped from
one step to the next; `dispatch_inline` then has JAX run CPU computations on the calling
thread, whose heap can keep them (see there).
"""

from __future__ import annotations

import os
import shlex
import sys
import warnings

OPT_OUT_ENV = "FLAXCNN_NO_XLA_DEFAULTS"

# name -> value ("" means `--name=`). Keep in sync with benchmarks/xla_cpu_study.md.
DEFAULT_XLA_FLAGS: dict[str, str] = {
    # YNNPACK for dots and reductions, not for convolutions: XLA's default list minus
    # INDIVIDUAL_CONVOLUTION. YNNPACK's convolution backward passes are 3-8x slower than XLA's
    # Eigen ones on these shapes; without YNNPACK at all, BatchNorm's per-channel reductions fall
    # back to XLA's slow column reductions. Same float32 math either way. With flaxcnn's pooling
    # this is the best setting measured (within noise) for all seven networks, 1.2-2.0x XLA's
    # default in training (benchmarks/xla_cpu_study.md).
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
}

# What the last `apply_defaults` did: "applied", "already-set", "opted-out", "too-late",
# "flagfile" or "not-run".
STATUS = "not-run"


def _flag_name(token: str) -> str | None:
    if not token.startswith("-"):
        return None
    return token.lstrip("-").split("=", 1)[0]


def _tokens(xla_flags: str) -> list[str]:
    try:
        return shlex.split(xla_flags)
    except ValueError:
        return xla_flags.split()


def user_flag_names(xla_flags: str) -> set[str]:
    """The flag names in an `XLA_FLAGS` string (`--name=value` or `--name` tokens)."""
    return {name for name in map(_flag_name, _tokens(xla_flags)) if name}


def flag_value(xla_flags: str, name: str) -> str | None:
    """The value an `XLA_FLAGS` string gives flag `name` (its last occurrence, as XLA reads
    it; "" for a bare `--name`), or None when it does not name it."""
    value = None
    for token in _tokens(xla_flags):
        if _flag_name(token) == name:
            value = token.partition("=")[2]
    return value


def merge_flags(xla_flags: str, defaults: dict[str, str] | None = None) -> str:
    """`xla_flags` with every default whose flag it does not already name appended."""
    defaults = DEFAULT_XLA_FLAGS if defaults is None else defaults
    present = user_flag_names(xla_flags)
    extra = [f"--{name}={value}" for name, value in defaults.items() if name not in present]
    return " ".join([xla_flags.strip(), *extra]).strip()


def _opted_out(environ, name: str = OPT_OUT_ENV) -> bool:
    value = environ.get(name, "").strip().lower()
    return value not in ("", "0", "false", "no")


def _backend_initialised() -> bool:
    bridge = sys.modules.get("jax._src.xla_bridge")
    return bool(bridge is not None and bridge.backends_are_initialized())


def apply_defaults(environ=None) -> str:
    """Merges `DEFAULT_XLA_FLAGS` into `XLA_FLAGS` if JAX has not started yet; returns STATUS."""
    global STATUS
    environ = os.environ if environ is None else environ
    current = environ.get("XLA_FLAGS", "")
    if _opted_out(environ):
        STATUS = "opted-out"
    elif "flagfile" in user_flag_names(current):
        # Flags from a file are invisible here; adding ours could override them.
        STATUS = "flagfile"
    elif all(name in user_flag_names(current) for name in DEFAULT_XLA_FLAGS):
        STATUS = "already-set"
    elif _backend_initialised():
        STATUS = "too-late"
        _warn_too_late()
    else:
        environ["XLA_FLAGS"] = merge_flags(current)
        STATUS = "applied"
    return STATUS


def _warn_too_late():
    import jax

    if jax.default_backend() == "cpu":
        flags = " ".join(f"--{k}={v}" for k, v in DEFAULT_XLA_FLAGS.items())
        warnings.warn(
            "flaxcnn was imported after JAX created its backend, so its XLA:CPU defaults "
            f"({flags}) are not in effect and training runs several times slower. Import flaxcnn "
            f"before running JAX code, or set XLA_FLAGS='{flags}' yourself.",
            RuntimeWarning, stacklevel=3,
        )


def active_flags() -> dict[str, str]:
    """The flags in `XLA_FLAGS` now, as name -> value (for reports)."""
    out = {}
    for token in shlex.split(os.environ.get("XLA_FLAGS", "")):
        name = _flag_name(token)
        if name:
            out[name] = token.split("=", 1)[1] if "=" in token else "true"
    return out


HUGE_PAGES_OPT_OUT_ENV = "FLAXCNN_NO_HUGE_PAGES"
HUGE_PAGE_TUNABLE = "glibc.malloc.hugetlb=1"
# No block mapped on its own (the main heap grows instead) and no trimming of the main heap:
# memory a step frees stays mapped for the next step. Added with the huge pages.
KEEP_MAPPED_TUNABLES = ("glibc.malloc.mmap_max=0", "glibc.malloc.trim_threshold=68719476736")
ASYNC_DISPATCH_ENV = "JAX_CPU_ENABLE_ASYNC_DISPATCH"
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def _tunables(environ) -> dict[str, str]:
    return dict(t.partition("=")[::2] for t in environ.get("GLIBC_TUNABLES", "").split(":") if t)


def huge_page_malloc(environ=None) -> str:
    """Whether glibc's malloc backs its large blocks with transparent huge pages here:
    "active" (GLIBC_TUNABLES has `glibc.malloc.hugetlb=1` or 2), "user-set" (another value),
    "missing" (it could, and `reexec_with_huge_pages` would set it), "thp-always" (the kernel
    gives every large mapping huge pages already), "opted-out", or why it cannot
    ("not-glibc", "old-glibc", "no-thp")."""
    environ = os.environ if environ is None else environ
    value = _tunables(environ).get("glibc.malloc.hugetlb")
    if value is not None:  # the user's, or ours after the restart
        return "active" if value in ("1", "2") else "user-set"
    if _opted_out(environ, HUGE_PAGES_OPT_OUT_ENV):
        return "opted-out"
    try:
        libc, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
    except (AttributeError, ValueError, OSError):
        libc = version = ""
    if sys.platform != "linux" or libc != "glibc":
        return "not-glibc"
    if tuple(int(v) for v in version.split(".")[:2]) < (2, 35):  # the tunable's first release
        return "old-glibc"
    try:
        with open(_THP_SETTING) as f:
            setting = f.read()
    except OSError:
        return "no-thp"
    if "[always]" in setting:
        return "thp-always"
    return "missing" if "[madvise]" in setting else "no-thp"


def keeps_step_memory(environ=None) -> bool:
    """Whether glibc here keeps what a step frees mapped for the next (`KEEP_MAPPED_TUNABLES`,
    ours after the restart or the user's)."""
    t = _tunables(os.environ if environ is None else environ)
    return t.get("glibc.malloc.mmap_max") == "0" and "glibc.malloc.trim_threshold" in t


def reexec_with_huge_pages(environ=None) -> None:
    """Restarts this Python process with glibc tunables for XLA's per-step temporaries when
    `huge_page_malloc` says "missing" (once: the restarted process finds them set).

    XLA:CPU allocates a step's temporaries as one block (DenseNet's training step at batch 32:
    238 MiB), which glibc maps afresh for every step and unmaps after it: 61,000 page faults
    and 0.11 s of system time per DenseNet step on a 2-core EPYC, a fifth of its CPU time.
    With huge pages (`glibc.malloc.hugetlb=1`) the step takes 660 faults and trains 1.23x as
    fast. Those 2 MiB faults still cost most after a pause: in a virtual machine the freed
    memory goes back to the host, and the first step after a pause of a few seconds spent
    0.5-1 s more in the kernel (NiN). So `KEEP_MAPPED_TUNABLES` are added too: glibc grows and
    keeps its main heap instead of mapping large blocks, as PyTorch's allocator keeps its
    memory. Only the main heap holds a block that size (a thread's arena stops at 64 MiB and
    maps larger blocks whatever the settings), which is why `dispatch_inline` goes with them.

    glibc reads the tunables only when a process starts, so the CLIs (train.py, the
    benchmarks) call this first thing. The user's own tunables are kept, each of ours added
    only where the user did not set it. A user who sets `glibc.malloc.hugetlb` (or a kernel
    that gives every mapping huge pages) means no restart, so none of ours: set the others
    too (README). The settings reach every child process (PyTorch's benchmark worker too) and
    hold for any backend; memory a step frees is not given back to the system. Opt out with
    FLAXCNN_NO_HUGE_PAGES=1 (benchmarks/malloc_study.py and benchmarks/xla_cpu_study.md have
    the evidence)."""
    environ = os.environ if environ is None else environ
    if huge_page_malloc(environ) != "missing":
        return
    have = _tunables(environ)
    ours = [t for t in (HUGE_PAGE_TUNABLE, *KEEP_MAPPED_TUNABLES)
            if t.partition("=")[0] not in have]
    environ["GLIBC_TUNABLES"] = ":".join(filter(None, [environ.get("GLIBC_TUNABLES", ""), *ours]))
    sys.stdout.flush()
    sys.stderr.flush()
    # the same command line, interpreter options included
    os.execve(sys.executable, sys.orig_argv, environ)


def dispatch_inline(environ=None) -> bool:
    """Has JAX run each CPU computation on the thread that calls it
    (`jax_cpu_enable_async_dispatch=False`) where glibc keeps step memory mapped
    (`keeps_step_memory`), so that a step's temporaries come from the main heap and stay
    there: a step's page faults fall from 300-1,200 to 0-200. Call before JAX creates its CPU
    backend; returns whether it took effect. Not when the user set
    $JAX_CPU_ENABLE_ASYNC_DISPATCH. JAX keeps computations sharded over several CPU devices
    asynchronous whatever this says.

    The price is the overlap of Python with the running step, so `dispatch_inline_for` asks
    for it only for the 96- and 224-pixel networks, whose steps take 100 ms and more:
    LeNet-BN's 10 ms steps trained about 4% slower inline. In the benchmark's interleaved
    samples the six larger networks trained 1.15-1.38x as fast, back to back 0.96-1.12x
    (benchmarks/xla_cpu_study.md).
    """
    environ = os.environ if environ is None else environ
    if not keeps_step_memory(environ) or ASYNC_DISPATCH_ENV in environ:
        return False
    if _backend_initialised():
        warnings.warn("JAX's backend already exists: its CPU computations stay asynchronous "
                      "(call flaxcnn.cpu.dispatch_inline before using JAX)", RuntimeWarning,
                      stacklevel=2)
        return False
    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True


INLINE_MIN_SIDE = 96


def dispatch_inline_for(sides) -> bool:
    """`dispatch_inline` when any of these input sides is at least `INLINE_MIN_SIDE` (steps of
    100 ms and more, temporaries above a thread's 64 MiB); LeNet's 28-pixel steps keep the
    overlap. What train.py and bench_vs_torch's JAX worker call."""
    return any(side >= INLINE_MIN_SIDE for side in sides) and dispatch_inline()
