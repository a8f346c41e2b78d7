"""flaxcnn's C++ custom calls for XLA:CPU: compiled once per machine, loaded and registered.

Two libraries: oneDNN's convolutions (`onednn.py`, `_onednn.cc`) and the SVM solver's inner
loop (`_svm.cc`, below). Each is compiled on first use into `~/.cache/flaxcnn/<name>` (or
`$FLAXCNN_CACHE_DIR/<name>`) under a name that hashes everything it depends on, so an edit, a
new jaxlib or another compiler builds it again. Both are optional: without a C++ compiler
(or with their opt-out variable set) XLA's own code runs instead, slower on a CPU.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import jax

FLAGS = ("-O2", "-std=c++17", "-shared", "-fPIC")


def cache_dir(name: str) -> Path:
    root = os.environ.get("FLAXCNN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "flaxcnn")
    return Path(root) / name


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def compile_library(name: str, source: Path, command: Callable[[str], list[str]],
                    depends: Iterable[bytes], what: str, force: bool = False) -> Path:
    """`command(out)` (a compiler command line writing the library to `out`), run once: the
    library, `lib<name>-<hash>.so` in `cache_dir(name)`, is named by a hash of the source, the
    compiler, jax's version (the FFI headers) and `depends`. Returns its path; raises
    RuntimeError with the compiler's message."""
    probe = command("OUT")
    digest = hashlib.sha256(source.read_bytes())
    # (not the paths, which differ between checkouts and venvs: what they hold is in `depends`)
    digest.update(" ".join([jax.__version__, jax.lib.__version__, probe[0], *FLAGS]).encode())
    for d in depends:
        digest.update(d)
    target = cache_dir(name) / f"libflaxcnn_{name}-{digest.hexdigest()[:16]}.so"
    if target.exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: concurrent builds (pytest workers) never load a
    # half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        print(f"flaxcnn: compiling {what} into {target.parent} (once)", file=sys.stderr,
              flush=True)
        proc = subprocess.run(command(tmp), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {source.name} failed:\n{proc.stderr[-4000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def register(build: Callable[..., Path], targets: dict[str, str]) -> str:
    """Load the library `build()` gives (rebuilt if a cached one no longer loads) and register
    its handlers (custom-call target -> symbol) for the CPU. Returns what was loaded."""
    try:
        lib = ctypes.CDLL(str(build()))
    except OSError:  # a cached library that no longer loads (a shared library replaced)
        lib = ctypes.CDLL(str(build(force=True)))
    for name, symbol in targets.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform="cpu")
    return f"loaded {lib._name}"


# ------------------------------------------------------------------------------------------
# The SVM solver's inner loop (_svm.cc)
# ------------------------------------------------------------------------------------------

SVM_OPT_OUT_ENV = "FLAXCNN_NO_NATIVE_SVM"
SVM_SOURCE = Path(__file__).with_name("_svm.cc")
SVM_TARGETS = {"flaxcnn_svm_inner_smo": "FlaxcnnSvmInnerSmo"}


def build_svm(force: bool = False) -> Path:
    """Compile `_svm.cc` once (`force`: again); it needs only a C++ compiler and jaxlib."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX)")
    return compile_library(
        "svm", SVM_SOURCE,
        lambda out: [cxx, *FLAGS, "-isystem", jax.ffi.include_dir(), str(SVM_SOURCE), "-o", out],
        (), "the SVM solver's inner loop", force)


_lock = threading.Lock()
_svm: tuple[bool, str] | None = None


def svm_available() -> bool:
    """Whether the SVM's inner loop is built and registered (builds it on first call, on a CPU
    backend only); `svm_reason()` says why not."""
    global _svm
    with _lock:
        if _svm is None:
            if os.environ.get(SVM_OPT_OUT_ENV, "") not in ("", "0"):
                _svm = False, f"{SVM_OPT_OUT_ENV} is set"
            else:
                try:
                    _svm = True, register(build_svm, SVM_TARGETS)
                except Exception as e:  # whatever it is, XLA's loop still works
                    _svm = False, f"{type(e).__name__}: {e}"
        return _svm[0]


def svm_reason() -> str:
    svm_available()
    return _svm[1]


if __name__ == "__main__":  # what .ci/setup runs: build now, say whether it worked, never fail
    print(f"SVM inner loop: {svm_reason()}" if svm_available()
          else f"SVM inner loop not available, XLA's is used: {svm_reason()}")
