"""flaxcnn: the d2l book's modern convolutional networks in JAX/Flax, exact to the PyTorch code."""

__version__ = "0.1.0"
