"""flaxcnn: the d2l book's modern convolutional networks in JAX/Flax, exact to the PyTorch code."""

# Fast XLA:CPU defaults, merged into XLA_FLAGS before JAX starts (flaxcnn/cpu.py; opt out with
# FLAXCNN_NO_XLA_DEFAULTS=1). Must run before anything creates a JAX backend.
from flaxcnn import cpu as _cpu

_cpu.apply_defaults()

__version__ = "0.1.0"
