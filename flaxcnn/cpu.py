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
with glibc's `glibc.malloc.hugetlb=1` tunable where it helps (see there).
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
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_page_malloc(environ=None) -> str:
    """Whether glibc's malloc backs its large blocks with transparent huge pages here:
    "active" (GLIBC_TUNABLES has `glibc.malloc.hugetlb=1` or 2), "user-set" (another value),
    "missing" (it could, and `reexec_with_huge_pages` would set it), "thp-always" (the kernel
    gives every large mapping huge pages already), "opted-out", or why it cannot
    ("not-glibc", "old-glibc", "no-thp")."""
    environ = os.environ if environ is None else environ
    for tunable in environ.get("GLIBC_TUNABLES", "").split(":"):
        name, _, value = tunable.partition("=")
        if name == "glibc.malloc.hugetlb":  # the user's, or ours after the restart
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


def reexec_with_huge_pages(environ=None) -> None:
    """Restarts this Python process with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` when
    `huge_page_malloc` says "missing"; returns (doing nothing) otherwise.

    XLA:CPU allocates a step's temporaries as one block (DenseNet's training step at batch 32:
    238 MiB), which glibc maps afresh for every step and unmaps after it: 61,000 page faults
    and 0.11 s of system time per DenseNet step on a 2-core EPYC, a fifth of its CPU time.
    With huge pages the step takes 660 faults and trains 1.23x as fast. glibc reads the
    tunable only when a process starts, so the CLIs (train.py, the benchmarks) call this first
    thing. Opt out with FLAXCNN_NO_HUGE_PAGES=1 (benchmarks/malloc_study.py has the evidence)."""
    environ = os.environ if environ is None else environ
    if huge_page_malloc(environ) != "missing":
        return
    tunables = environ.get("GLIBC_TUNABLES", "")
    environ["GLIBC_TUNABLES"] = f"{tunables}:{HUGE_PAGE_TUNABLE}" if tunables else HUGE_PAGE_TUNABLE
    sys.stdout.flush()
    sys.stderr.flush()
    # the same command line, interpreter options included
    os.execve(sys.executable, sys.orig_argv, environ)
