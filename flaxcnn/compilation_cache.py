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

`persistent_jit` goes one step further for a function called once per process, such as the SVM's
solver: JAX's cache finds a program by its lowered HLO, so every process still traces and lowers
it first (0.25 s of a 0.7 s 10,000-image fit); `persistent_jit` finds the compiled program by its
Python-level key and loads it without tracing.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import platform
import threading
import warnings
from collections.abc import Callable

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
_enabled: str | None = None  # the directory the last `enable` turned on (persistent_jit's)


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
    global _listening, _enabled
    import jax

    _enabled = None
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
    _enabled = directory
    return directory


# `persistent_jit` executables: at most this many files are kept (least recently used go first)
MAX_EXECUTABLES = 256
# jax.config options that change what a function traces to
_TRACE_CONFIG = ("jax_enable_x64", "jax_default_matmul_precision", "jax_numpy_dtype_promotion",
                 "jax_numpy_rank_promotion", "jax_default_prng_impl", "jax_debug_nans",
                 "jax_debug_infs")


@functools.cache
def _process_environment() -> tuple:
    """The parts of a `persistent_jit` key fixed for the process (read once, not per call): the
    versions of jax, jaxlib and the backend, the CPU, the devices, and a hash of flaxcnn's own
    code (any edit makes every `persistent_jit` executable stale)."""
    import jax
    import jaxlib

    h = hashlib.sha256()
    root = os.path.dirname(os.path.abspath(__file__))
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if name.endswith((".py", ".cc")):
                with open(os.path.join(dirpath, name), "rb") as f:
                    h.update(name.encode() + b"\0" + f.read())
    backend = jax.devices()[0].client
    return (jax.__version__, jaxlib.__version__, backend.platform, backend.platform_version,
            _machine_tag(), tuple(str(d) for d in jax.devices()), h.hexdigest())


def _executables_directory() -> str | None:
    """Where `persistent_jit` keeps its programs: only once `enable` has turned a cache on in
    this process (a cache JAX was given some other way leaves it off), and while it stays on."""
    import jax

    directory = jax.config.jax_compilation_cache_dir
    if (_enabled is None or not jax.config.jax_enable_compilation_cache or not directory
            or os.path.abspath(os.path.expanduser(directory)) != _enabled
            or jax.config.jax_disable_jit):
        return None
    return os.path.join(_enabled, "executables")


_TRACE_STATE = "_flaxcnn_trace_state"


class _Persistent:
    """See `persistent_jit`."""

    def __init__(self, fun, trace_state: Callable[[], tuple], jit_kwargs: dict):
        import jax

        static = jit_kwargs.pop("static_argnames", ())
        self.static_argnames = (static,) if isinstance(static, str) else tuple(static)

        def traced(*args, **kwargs):  # trace_state() as a static argument: in JAX's keys too
            kwargs.pop(_TRACE_STATE)
            return fun(*args, **kwargs)

        for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
            setattr(traced, attr, getattr(fun, attr, None))
        self.jitted = jax.jit(traced, static_argnames=(*self.static_argnames, _TRACE_STATE),
                              **jit_kwargs)
        self.jit_kwargs = repr(sorted(jit_kwargs.items()))
        self.trace_state = trace_state
        self._loaded: dict = {}
        self._lock = threading.Lock()

    def clear_cache(self):
        """Forget this process's programs (both layers); the files stay."""
        self._loaded.clear()
        self.jitted.clear_cache()

    def _key(self, leaves, tree, kwargs, trace_state) -> tuple:
        import jax

        static = sorted((k, v) for k, v in kwargs.items() if k in self.static_argnames)
        avals = tuple(
            (str(jax.typeof(x)), str(x.sharding) if isinstance(x, jax.Array) else "")
            for x in leaves
        )
        environment = (
            *_process_environment(), os.environ.get("XLA_FLAGS", ""),
            tuple(str(getattr(jax.config, name, None)) for name in _TRACE_CONFIG),
            self.jitted.__module__, self.jitted.__qualname__, self.jit_kwargs,
        )
        return str(tree), avals, repr(static), repr(trace_state), environment

    def __call__(self, *args, **kwargs):
        import jax

        kwargs[_TRACE_STATE] = trace_state = self.trace_state()
        directory = _executables_directory()
        if directory is None:
            return self.jitted(*args, **kwargs)
        dynamic = {k: v for k, v in kwargs.items()
                   if k not in self.static_argnames and k != _TRACE_STATE}
        leaves, tree = jax.tree.flatten((args, dynamic))
        if any(isinstance(x, jax.core.Tracer) for x in leaves):  # inside a transformation
            return self.jitted(*args, **kwargs)
        try:
            key = self._key(leaves, tree, kwargs, trace_state)
        except TypeError:  # e.g. a static argument passed by position: JAX's own path
            return self.jitted(*args, **kwargs)
        compiled = self._loaded.get(key)
        if compiled is None:
            with self._lock:
                compiled = self._loaded.get(key) or self._load_or_compile(
                    directory, key, args, kwargs
                )
                self._loaded[key] = compiled
        return compiled(*args, **dynamic)

    def _load_or_compile(self, directory, key, args, kwargs):
        from jax.experimental import serialize_executable

        digest = hashlib.sha256(repr(key).encode()).hexdigest()[:32]
        path = os.path.join(directory, f"{self.jitted.__name__}-{digest}")
        try:
            with open(path, "rb") as f:
                compiled = serialize_executable.deserialize_and_load(*pickle.load(f))
        except FileNotFoundError:
            pass
        except Exception as e:  # a damaged or foreign file: compile again and replace it
            warnings.warn(f"recompiling: cannot load {path}: {e!r}", stacklevel=3)
        else:
            try:
                os.utime(path)  # least recently used goes first
            except OSError:  # a read-only cache, or evicted meanwhile: the program is loaded
                pass
            with _lock:
                _counts["hits"] += 1
                _counts["requests"] += 1
            return compiled
        hits = counts()["hits"]
        compiled = self.jitted.lower(*args, **kwargs).compile()  # JAX counts the request
        if counts()["hits"] != hits:  # (or another thread's hit meanwhile: no file either)
            # An executable JAX loaded from its own cache does not serialize whole on XLA:CPU
            # (the file loads, then fails to run: "Function ... not found"), so none is kept;
            # JAX's cache serves the next process. Seen where compiles take over
            # MIN_COMPILE_SECONDS, which is when JAX caches them.
            try:
                os.remove(path)  # a damaged file would only warn again
            except OSError:
                pass
            return compiled
        try:
            payload = pickle.dumps(serialize_executable.serialize(compiled))
            os.makedirs(directory, exist_ok=True)
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
            with open(tmp, "wb") as f:
                f.write(payload)
            os.replace(tmp, path)  # whole files only, whatever runs at the same time
            _evict(directory, MAX_EXECUTABLES)
        except Exception as e:  # the program still runs; only the next process compiles it
            warnings.warn(f"cannot keep the compiled {path}: {e!r}", stacklevel=3)
        return compiled


def _evict(directory: str, keep: int) -> None:
    entries = []
    for e in os.scandir(directory):
        if e.name.endswith(".tmp"):  # another process's file being written
            continue
        try:
            entries.append((e.stat().st_mtime, e.path))
        except OSError:
            pass
    for _, path in sorted(entries)[: max(len(entries) - keep, 0)]:
        try:
            os.remove(path)
        except OSError:
            pass


def persistent_jit(fun, *, trace_state: Callable[[], tuple] = tuple, **jit_kwargs):
    """`jax.jit(fun, **jit_kwargs)`, whose compiled programs are also kept on disk, once
    `enable` has turned the compilation cache on, in its directory (under `executables/`), and
    loaded by a later process without tracing or lowering. Without a cache, or inside another
    transformation, calls go to the `jax.jit` function. Static arguments must be passed by
    keyword; `trace_state()` (module settings `fun` reads when traced, hashable) is a static
    argument of the `jax.jit` function too, so a changed setting is traced anew in-process.

    A program on disk is found by the call's pytree structure, abstract values and shardings,
    its static arguments, `trace_state()`, the jit options, the versions of jax, jaxlib and the
    backend, the CPU (`_machine_tag`), the devices, XLA_FLAGS, the jax options that change
    tracing (`_TRACE_CONFIG`), and a hash of flaxcnn's sources: it is meant for flaxcnn's own
    functions, whose code that hash covers."""
    return _Persistent(fun, trace_state, dict(jit_kwargs))
