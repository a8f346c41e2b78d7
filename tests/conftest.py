"""Test-wide settings."""

import os

# train.py's subprocesses compile from scratch unless a test asks for the persistent
# compilation cache (tests/test_train.py tests it in its own directory); set this variable
# yourself to share one cache across a local run.
os.environ.setdefault("FLAXCNN_COMPILATION_CACHE", "off")


def pytest_collection_modifyitems(items):
    """Tests marked slow first (a stable sort): pytest-xdist hands tests out in this order, so
    the long ones run while the short ones fill the gaps, instead of one ending the run alone."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
