"""JAX's persistent compilation cache for flaxcnn's command lines.

A second `python train.py` with the same model, shapes and flags loads its compiled programs
from disk instead of compiling them again (LeNet-BN's step: 2.0 s to compile, 0.4 s to load; the
SVM's solver: about 0.9 s). The programs are the same, so the results are bit-identical.

`train.py` enables it unless `--compilation-cache off`; library code leaves JAX's setting alone
unless it calls `enable`. Where it goes, the first of:

* an explicit directory (`--compilation-cache DIR`, `enable(DIR)`); `off` disables the cache,
  even one configured for JAX;
* `FLAXCNN_COMPILATION_CACHE=DIR` (or `off`; `on` means the default below);
* a directory the user already gave JAX (`JAX_COMPILATION_CACHE_DIR`,
  `jax.config.update("jax_compilation_cache_dir", ...)`);
* `$XDG_CACHE_HOME/flaxcnn/xla-<machine>` (default `~/.cache/flaxcnn/...`), kept to 2 GiB
  (least recently used programs go first) unless `JAX_COMPILATION_CACHE_MAX_SIZE` says otherwise.

`<machine>` names the CPU (model and instruction-set flags): XLA:CPU's native code is only valid
on CPUs with the instruction set it was compiled for. Recent JAX puts the CPU's target options
in its cache key; the separate folders keep machines that share a home directory apart with
any version.
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading
import warnings

ENV = "FLAXCNN_COMPILATION_CACHE"
OFF = ("off", "0", "none", "false", "no", "")
ON = ("on", "1", "true", "yes", "auto", "default")
MAX_BYTES = 2 << 30
# programs that compile faster than this are not written (JAX's default is 1 s, which would
# leave out most of the eval and SVM programs; loading one costs a few milliseconds)
MIN_COMPILE_SECONDS = 0.05

_lock = threading.Lock()
_counts = {"hits": 0, "requests": 0}
_listening = False


def _machine_tag() -> str:
    """A short hash of this CPU's model and instruction-set flags (or of the platform)."""
    text = platform.machine() + platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part"):
                    text += line
                if not line.strip():  # the first processor is enough
                    break
    except OSError:
        pass
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def default_directory() -> str | None:
    """The directory `enable("auto")` uses when JAX has none: FLAXCNN_COMPILATION_CACHE, else a
    per-CPU folder under the user's cache directory; None when the variable says off."""
    value = os.environ.get(ENV)
    if value is not None and value.strip().lower() not in ON:
        return None if value.strip().lower() in OFF else os.path.expanduser(value)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "flaxcnn", f"xla-{_machine_tag()}")


def _on_event(event: str, **kwargs) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        with _lock:
            _counts["hits"] += 1
    elif event == "/jax/compilation_cache/compile_requests_use_cache":
        with _lock:
            _counts["requests"] += 1


def counts() -> dict:
    """{'hits', 'requests'}: programs loaded from the cache, and programs looked up in it, since
    `enable` (requests also count the programs compiled afterwards, written to the cache or, when
    they compiled in under MIN_COMPILE_SECONDS, not)."""
    with _lock:
        return dict(_counts)


def since(start: dict) -> dict:
    """`counts()` minus an earlier `counts()`: what the work between them looked up and loaded."""
    now = counts()
    return {k: now[k] - start[k] for k in now}


def summary(delta: dict) -> str:
    """'H of R programs loaded from the compilation cache' for a `since` delta, '' when nothing
    was looked up (no cache)."""
    if not delta["requests"]:
        return ""
    return f"{delta['hits']} of {delta['requests']} programs loaded from the compilation cache"


def enable(directory: str | None = "auto") -> str | None:
    """Turn JAX's persistent compilation cache on; returns the directory in use, or None.

    directory: a path, "off" (or None) to turn any cache off, or "auto" (see the module's
    docstring for the order). Programs compiled before the call are not cached. A directory that
    cannot be created or written gives a warning and no cache."""
    global _listening
    import jax

    if directory is not None and directory.strip().lower() in ON:
        # FLAXCNN_COMPILATION_CACHE (a path or off) before a directory configured for JAX
        ours_set = os.environ.get(ENV, "on").strip().lower() not in ON
        jax_own = None if ours_set else jax.config.jax_compilation_cache_dir
        directory = jax_own or default_directory()
    if directory is None or directory.strip().lower() in OFF:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    directory = os.path.abspath(os.path.expanduser(directory))
    jax_own = jax.config.jax_compilation_cache_dir
    ours = not jax_own or directory != os.path.abspath(os.path.expanduser(jax_own))
    if ours:
        try:
            os.makedirs(directory, exist_ok=True)
            if not os.access(directory, os.W_OK | os.X_OK):
                raise PermissionError(f"{directory} is not writable")
        except OSError as e:
            warnings.warn(f"no compilation cache: {e}", stacklevel=2)
            jax.config.update("jax_enable_compilation_cache", False)
            return None
        jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_enable_compilation_cache", True)
    if ours:  # a cache the user configured for JAX keeps the user's limits
        if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
            jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
        if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
            jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    if not _listening:
        jax.monitoring.register_event_listener(_on_event)
        _listening = True
    return directory
