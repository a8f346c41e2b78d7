"""Test-wide settings."""

import atexit
import os
import shutil
import tempfile

# One persistent compilation cache for the whole run, shared by pytest-xdist's workers (which
# inherit this environment) and by the train.py and benchmark processes the tests start: a
# program that several tests or processes compile is compiled once, then loaded. A fresh
# directory each run, removed at the end, so no run depends on an earlier one; the tests of the
# cache itself give their own directories. Set FLAXCNN_COMPILATION_CACHE yourself to keep a
# cache across runs (a directory) or to compile everything from scratch (off).
_OWN_CACHE = None
if "FLAXCNN_COMPILATION_CACHE" not in os.environ:
    _OWN_CACHE = tempfile.mkdtemp(prefix="flaxcnn-tests-xla-")
    os.environ["FLAXCNN_COMPILATION_CACHE"] = _OWN_CACHE
    atexit.register(shutil.rmtree, _OWN_CACHE, ignore_errors=True)
_cache = os.environ["FLAXCNN_COMPILATION_CACHE"]
if _cache.strip().lower() not in ("off", "0", "none", "false", "no", ""):
    # the tests' own processes too (JAX reads these when it is imported, after this file)
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.expanduser(_cache))
    # a size limit turns on JAX's file lock, which the concurrent processes need
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


def pytest_collection_modifyitems(items):
    """Tests marked slow first (a stable sort): pytest-xdist hands tests out in this order, so
    the long ones run while the short ones fill the gaps, instead of one ending the run alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
