"""The book's networks by name: `create(name, **fields)`, `names()`, and `summary`."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from flaxcnn.models.alexnet import AlexNet
from flaxcnn.models.batch_norm import BatchNorm, LeNet, batch_norm
from flaxcnn.models.densenet import DenseBlock, DenseNet, conv_block, transition_block
from flaxcnn.models.googlenet import GoogLeNet, Inception
from flaxcnn.models.layers import BatchNorm2d, Conv, Dense, Sequential
from flaxcnn.models.nin import NiN, nin_block
from flaxcnn.models.resnet import Residual, ResNet18, resnet_block
from flaxcnn.models.vgg import VGG, conv_arch, small_conv_arch, vgg_block

__all__ = [
    "AlexNet", "BatchNorm", "BatchNorm2d", "Conv", "Dense", "DenseBlock", "DenseNet", "GoogLeNet",
    "Inception", "LeNet", "NiN", "ResNet18", "Residual", "Sequential", "VGG", "batch_norm",
    "conv_arch", "conv_block", "create", "names", "nin_block", "resnet_block", "small_conv_arch",
    "summary", "transition_block", "vgg_block",
]

_NETWORKS = {
    "alexnet": AlexNet,
    # The VGG the book trains: VGG-11 with every block's channels divided by 4.
    "vgg": partial(VGG, conv_arch=small_conv_arch(4)),
    "vgg11": VGG,
    "nin": NiN,
    "googlenet": GoogLeNet,
    "lenet_bn_scratch": partial(LeNet, norm="scratch"),
    "lenet_bn": partial(LeNet, norm="builtin"),
    "resnet18": ResNet18,
    "densenet": DenseNet,
}


def names() -> list[str]:
    return list(_NETWORKS)


def create(name: str, **fields):
    """The network `name` as a Flax module; `fields` override its defaults (e.g. dtype)."""
    try:
        factory = _NETWORKS[name]
    except KeyError:
        raise ValueError(f"unknown network {name!r}; known: {', '.join(_NETWORKS)}") from None
    return factory(**fields)


def count_params(tree) -> int:
    return int(sum(np.prod(np.shape(leaf)) for leaf in jax.tree_util.tree_leaves(tree)))


def summary(model, side: int, batch: int = 1):
    """The book's `for layer in net: X = layer(X); print(...)`, without running anything.

    Returns a list of (layer name, output shape, trainable parameter count) for every top-level
    layer, computed with `jax.eval_shape` so even 224-pixel networks cost nothing.
    """
    x = jax.ShapeDtypeStruct((batch, side, side, 1), jnp.float32)

    def run(x):
        variables = model.init(jax.random.key(0), x, train=False)
        _, state = model.apply(variables, x, train=False, mutable=["intermediates"])
        return variables["params"], state["intermediates"]

    params, intermediates = jax.eval_shape(run, x)
    rows = []
    for key in sorted(intermediates):
        _, book_name, owner = key.split(":")
        (out,) = intermediates[key]
        if isinstance(out, list):  # feature maps that stand for their concatenation (DenseNet)
            shape = (*out[0].shape[:-1], sum(p.shape[-1] for p in out))
        else:
            shape = tuple(out.shape)
        rows.append((book_name, shape, count_params(params.get(owner, {}))))
    return rows
