"""What several test files share."""

import jax
import jax.numpy as jnp
import numpy as np


def random_variables(model, shape, seed=0):
    """Random variables of `model`'s structure for an input of `shape`, without running (and
    compiling) its init: GoogLeNet's compiled initialisation alone took 20 s here, and a test
    of layers or paths needs any values of the right shapes, not the book's."""
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    rng = np.random.default_rng(seed)

    def fill(path, a):
        name = path[-1].key
        if name in ("scale", "gamma", "var", "moving_var"):
            v = rng.uniform(0.5, 1.5, a.shape)
        elif name in ("mean", "moving_mean"):
            v = 0.1 * rng.standard_normal(a.shape)
        else:
            v = rng.uniform(-1, 1, a.shape) / np.sqrt(np.prod(a.shape[:-1]) or 1)
        return jnp.asarray(v, a.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)
