"""What several test files share."""

import jax
import jax.numpy as jnp
import numpy as np


def abstract_variables(model, shape):
    """`model`'s variables for a float32 input of `shape`, as shapes and dtypes only: lowering,
    exporting or counting parameters needs no values, and computing them compiles the
    initialisation (GoogLeNet's alone took 21.5 s here)."""
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)


def random_variables(model, shape, seed=0):
    """Random variables of `model`'s structure for an input of `shape`, without running (and
    compiling) its init: a test of layers or paths needs any values of the right shapes, not
    the book's."""
    abstract = abstract_variables(model, shape)
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
