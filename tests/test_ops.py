"""`flaxcnn.ops` against PyTorch's pooling, values and gradients, ties included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxcnn import ops

torch = pytest.importorskip("torch")
F = torch.nn.functional

# (kernel, stride, padding) of every max-pool the networks use, and a few more.
POOLS = [(3, 2, 0), (2, 2, 0), (3, 1, 1), (3, 2, 1)]
EXTRA_POOLS = [(2, 1, 0), (3, 3, 0), (2, 2, 1), (5, 2, 2), (4, 3, 1)]
SHAPES = [(2, 9, 9, 3), (3, 12, 11, 5), (1, 7, 13, 2)]


def torch_pool(x, k, s, p, g):
    """PyTorch's (channels_last) max_pool2d output and the gradient of sum(out * g)."""
    xt = torch.tensor(np.asarray(x)).permute(0, 3, 1, 2).contiguous(
        memory_format=torch.channels_last).requires_grad_(True)
    y = F.max_pool2d(xt, k, s, p)
    y.backward(torch.tensor(np.asarray(g)).permute(0, 3, 1, 2))
    return (y.detach().permute(0, 2, 3, 1).numpy(), xt.grad.permute(0, 2, 3, 1).numpy())


def jax_pool(x, k, s, p, g):
    y, vjp = jax.vjp(lambda x: ops.max_pool(x, k, s, p), x)
    (dx,) = vjp(g)
    return np.asarray(y), np.asarray(dx)


def inputs(kind, shape, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    if kind == "relu":  # many ties at zero, including whole windows
        x = np.maximum(x, 0)
    elif kind == "zeros":  # every window all zeros
        x = np.zeros(shape, np.float32)
    elif kind == "blocks":  # zero regions, repeated maxima and integer-valued ties
        x = np.round(np.maximum(x, 0) * 1.5)
        x[:, : shape[1] // 2, : shape[2] // 2] = 0
    return x


def check(k, s, p, shape, kind, seed=0):
    x = inputs(kind, shape, seed)
    n, h, w, c = shape
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    if ho < 1 or wo < 1:
        pytest.skip("window larger than the padded input")
    g = np.random.default_rng(seed + 1).standard_normal((n, ho, wo, c)).astype(np.float32)
    y_t, dx_t = torch_pool(x, k, s, p, g)
    y_j, dx_j = jax_pool(jnp.asarray(x), k, s, p, jnp.asarray(g))
    np.testing.assert_array_equal(y_j, y_t)
    # Each routed gradient is one value of g or a sum of a few: equal up to summation order.
    np.testing.assert_allclose(dx_j, dx_t, rtol=1e-6, atol=1e-6)
    if kind != "random":
        # The gradient's total is g's total: nothing is duplicated onto tied positions.
        np.testing.assert_allclose(dx_j.sum(), g.sum(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["random", "relu", "zeros", "blocks"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("ksp", POOLS, ids=str)
def test_max_pool_matches_torch(ksp, shape, kind):
    check(*ksp, shape, kind)


@pytest.mark.parametrize("ksp", EXTRA_POOLS, ids=str)
@pytest.mark.parametrize("kind", ["random", "relu"])
def test_max_pool_other_windows(ksp, kind):
    check(*ksp, (2, 11, 10, 3), kind, seed=3)


@pytest.mark.parametrize("ksp", POOLS, ids=str)
def test_max_pool_network_shapes(ksp):
    # Odd and even sides as the networks see them (AlexNet 54/26/12, GoogLeNet 24/12/6/3).
    for side in (54, 13, 24, 3):
        if side + 2 * ksp[2] >= ksp[0]:
            check(*ksp, (2, side, side, 4), "relu", seed=side)


def test_all_minus_inf_window_goes_to_first_real_position():
    # PyTorch never picks a padded position: a window of -inf routes to its first real element.
    x = np.full((1, 4, 4, 1), -np.inf, np.float32)
    x[0, 3, 3, 0] = 1.0
    g = np.arange(1, 5, dtype=np.float32).reshape(1, 2, 2, 1)
    y_t, dx_t = torch_pool(x, 3, 2, 1, g)
    y_j, dx_j = jax_pool(jnp.asarray(x), 3, 2, 1, jnp.asarray(g))
    np.testing.assert_array_equal(y_j, y_t)
    np.testing.assert_array_equal(dx_j, dx_t)


def test_grad_of_jit_and_vmap():
    x = jnp.asarray(inputs("relu", (2, 12, 12, 3), 7))

    def loss(x):
        return jnp.sum(ops.max_pool(x, 3, 2, 1) ** 2)

    eager = jax.grad(loss)(x)
    np.testing.assert_allclose(jax.grad(jax.jit(loss))(x), eager, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(jax.grad(loss))(x), eager, rtol=1e-6)
    # vmap over an extra leading axis equals a loop over it.
    xs = jnp.stack([x, 2 * x + 1])
    batched = jax.vmap(jax.grad(loss))(xs)
    np.testing.assert_allclose(batched[0], eager, rtol=1e-6)
    np.testing.assert_allclose(batched[1], jax.grad(loss)(2 * x + 1), rtol=1e-6)
    np.testing.assert_array_equal(
        jax.vmap(lambda x: ops.max_pool(x, 3, 2, 1))(xs)[1], ops.max_pool(xs[1], 3, 2, 1))


def test_max_pool_tuple_arguments_and_errors():
    x = jnp.asarray(inputs("random", (1, 8, 9, 2), 0))
    np.testing.assert_array_equal(ops.max_pool(x, (3, 3), (2, 2), (1, 1)), ops.max_pool(x, 3, 2, 1))
    with pytest.raises(ValueError, match="half the kernel"):
        ops.max_pool(x, 2, 2, 2)
    with pytest.raises(TypeError, match="floating"):
        ops.max_pool(jnp.zeros((1, 4, 4, 1), jnp.int32), 2, 2)


@pytest.mark.parametrize("ksp", [(2, 2, 0), (3, 3, 1)], ids=str)
def test_avg_pool_matches_torch(ksp):
    k, s, p = ksp
    x = inputs("random", (2, 9, 8, 3), 1)
    yt = F.avg_pool2d(torch.tensor(x).permute(0, 3, 1, 2), k, s, p).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ops.avg_pool(jnp.asarray(x), k, s, p), yt, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        ops.global_avg_pool(jnp.asarray(x))[:, 0, 0], x.mean(axis=(1, 2)), rtol=1e-6)
