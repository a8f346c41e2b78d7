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
# The off/on words and the limits are flaxcnn.compilation_cache's (OFF, ON, MAX_BYTES,
# MIN_COMPILE_SECONDS), written out: importing flaxcnn here would put its XLA_FLAGS defaults into
# the environment of every process the tests start.
if "FLAXCNN_COMPILATION_CACHE" not in os.environ:
    _own = os.environ["FLAXCNN_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="flaxcnn-tests-xla-")
    atexit.register(shutil.rmtree, _own, ignore_errors=True)
_cache = os.environ["FLAXCNN_COMPILATION_CACHE"].strip()
if _cache.lower() in ("off", "0", "none", "false", "no", ""):
    os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
elif _cache.lower() not in ("on", "1", "true", "yes", "auto", "default"):  # a directory
    _cache = os.environ["FLAXCNN_COMPILATION_CACHE"] = os.path.abspath(os.path.expanduser(_cache))
    # the tests' own processes too (JAX reads these when it is imported, after this file), with
    # flaxcnn's limits (compilation_cache.enable); a size limit also turns on the file lock that
    # concurrent processes need
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(2 << 30)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.05"

def pytest_collection_modifyitems(items):
    """Tests marked slow first (a stable sort): pytest-xdist hands tests out in this order, so
    the long ones run while the short ones fill the gaps, instead of one ending the run alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
