"""Test-wide settings."""

import os

# train.py's subprocesses compile from scratch unless a test asks for the persistent
# compilation cache (tests/test_train.py tests it in its own directory); set this variable
# yourself to share one cache across a local run.
os.environ.setdefault("FLAXCNN_COMPILATION_CACHE", "off")
