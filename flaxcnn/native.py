"""flaxcnn's C++ custom calls for XLA:CPU: compiled once per machine, loaded and registered.

Three libraries: oneDNN's convolutions (`onednn.py`, `_onednn.cc`), the SVM solver's inner
loop (`_svm.cc`, below) and, from the same file built against oneDNN, the whole SVM solver.
Each is compiled on first use into `~/.cache/flaxcnn/<name>` (or `$FLAXCNN_CACHE_DIR/<name>`)
under a name that hashes everything it depends on, so an edit, a new jaxlib or another compiler
builds it again. All are optional: without a C++ compiler or oneDNN (or with their opt-out
variable set) XLA's own code runs instead, slower on a CPU.
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


def compile_library(name: str, source: Path, cxx: str, *, includes: Iterable[str] = (),
                    libs: Iterable[str] = (), depends: Iterable[bytes] = (), what: str,
                    force: bool = False) -> Path:
    """Compile `source` with `cxx` against jaxlib's FFI headers (plus `includes`, linking
    `libs`), once: the library, `libflaxcnn_<name>-<hash>.so` in `cache_dir(name)`, is named by
    a hash of the source, the compiler, jax's version (the FFI headers) and `depends`. Returns
    its path; raises RuntimeError with the compiler's message."""
    digest = hashlib.sha256(source.read_bytes())
    # (not the paths, which differ between checkouts and venvs: what they hold is in `depends`)
    digest.update(" ".join([jax.__version__, jax.lib.__version__, cxx, *FLAGS]).encode())
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
        cmd = [cxx, *FLAGS, "-isystem", jax.ffi.include_dir(), *includes, str(source), "-o", tmp,
               *libs]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {source.name} failed:\n{proc.stderr[-4000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


class Library:
    """A library of CPU custom calls: `build()` (its path; rebuilt with `build(force=True)` if a
    cached one no longer loads), loaded and its handlers (custom-call target -> symbol)
    registered once per process, whichever thread asks first, unless `opt_out_env` is set (any
    non-empty value but `0`). Any failure leaves it unavailable, saying why."""

    def __init__(self, build: Callable[..., Path], targets: dict[str, str], opt_out_env: str):
        self.build, self.targets, self.opt_out_env = build, targets, opt_out_env
        self._lock = threading.Lock()
        self._state: tuple[bool, str] | None = None
        self.lib: ctypes.CDLL | None = None  # once loaded

    def _load(self) -> tuple[bool, str]:
        with self._lock:
            if self._state is None:
                self._state = self._load_locked()
            return self._state

    def _load_locked(self) -> tuple[bool, str]:
        if os.environ.get(self.opt_out_env, "") not in ("", "0"):
            return False, f"{self.opt_out_env} is set"
        try:
            try:
                lib = ctypes.CDLL(str(self.build()))
            except OSError:  # a cached library that no longer loads (a shared library replaced)
                lib = ctypes.CDLL(str(self.build(force=True)))
            for name, symbol in self.targets.items():
                jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)),
                                            platform="cpu")
        except Exception as e:  # whatever it is, XLA's own code still runs
            return False, str(e)
        self.lib = lib
        return True, f"loaded {lib._name}"

    def available(self) -> bool:
        """Whether the library is built and registered (builds it on the first call)."""
        return self._load()[0]

    def reason(self) -> str:
        """Why `available()` is what it is."""
        return self._load()[1]


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
    return compile_library("svm", SVM_SOURCE, cxx, what="the SVM solver's inner loop",
                           force=force)


_svm = Library(build_svm, SVM_TARGETS, SVM_OPT_OUT_ENV)
# whether the SVM's inner loop is built and registered (builds it on first call; svm.py asks on
# a CPU backend only), and why not
svm_available, svm_reason = _svm.available, _svm.reason

SVM_SOLVE_TARGETS = {"flaxcnn_svm_solve": "FlaxcnnSvmSolve"}


def build_svm_solve(force: bool = False) -> Path:
    """Compile `_svm.cc` with its whole solver (FLAXCNN_SVM_SOLVE), against oneDNN, once."""
    from flaxcnn import onednn  # (it imports this module)

    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX)")
    includes, libs, depends = onednn.build_flags()
    # no OpenMP library of its own: omp_* come from the one oneDNN was built with, if any
    return compile_library("svm_solve", SVM_SOURCE, cxx,
                           includes=["-DFLAXCNN_SVM_SOLVE", *includes], libs=libs,
                           depends=depends, what="the SVM solver", force=force)


_svm_solve = Library(build_svm_solve, SVM_SOLVE_TARGETS, SVM_OPT_OUT_ENV)
# the same for the whole solver (svm._solve's outer loop, its products on oneDNN)
svm_solve_available, svm_solve_reason = _svm_solve.available, _svm_solve.reason


if __name__ == "__main__":  # what .ci/setup runs: build now, say whether it worked, never fail
    print(f"SVM inner loop: {svm_reason()}" if svm_available()
          else f"SVM inner loop not available, XLA's is used: {svm_reason()}")
    print(f"SVM solver: {svm_solve_reason()}" if svm_solve_available()
          else f"SVM solver not available, XLA's is used: {svm_solve_reason()}")
