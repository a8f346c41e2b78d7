"""`flaxcnn.ops` against PyTorch's pooling, values and gradients, ties included."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import abstract_variables

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


@partial(jax.jit, static_argnums=(0, 2, 3, 4, 6))
def pool_and_grad(pool, x, k, s, p, g, path=None):
    """pool(x, k, s, p) and the gradient of sum(out * g), jitted as the networks run it (op by
    op, the pools' window terms took 5-7x as long to compile). `path` only keys the cache: the
    implementation the trace took (`max_pool_path`)."""
    y, vjp = jax.vjp(lambda x: pool(x, k, s, p), x)
    return y, vjp(g)[0]


def jax_pool(x, k, s, p, g):
    return tuple(np.asarray(a) for a in pool_and_grad(ops.max_pool, x, k, s, p, g))


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


def test_max_pool_padding_fuses_into_the_pooling():
    """An Inception block's pool branch: the max-pool's input is also read by another layer.
    Sliced from one padded copy, XLA:CPU made that copy a kernel of its own (GoogLeNet's eval
    step: 11 of them); padded term by term (`ops._window_terms`) it fuses into the pooling."""

    def branches(x, k1, k2):
        return (ops.conv_nhwc(x, k1, 1, 0),
                ops.conv_nhwc(ops.max_pool(x, 3, 1, 1), k2, 1, 0))

    args = (jnp.zeros((2, 12, 12, 16)), jnp.zeros((1, 1, 16, 8)), jnp.zeros((1, 1, 16, 8)))
    hlo = jax.jit(branches).lower(*args).compile().as_text()
    entry = hlo[hlo.index("ENTRY"):]
    kernels = [line.split("=")[0].strip() for line in entry.splitlines()[1:] if "fusion(" in line]
    assert kernels == ["%pad_maximum_fusion"], kernels


def test_all_minus_inf_window_goes_to_first_real_position():
    # PyTorch never picks a padded position: a window of -inf routes to its first real element.
    x = np.full((1, 4, 4, 1), -np.inf, np.float32)
    x[0, 3, 3, 0] = 1.0
    g = np.arange(1, 5, dtype=np.float32).reshape(1, 2, 2, 1)
    y_t, dx_t = torch_pool(x, 3, 2, 1, g)
    y_j, dx_j = jax_pool(jnp.asarray(x), 3, 2, 1, jnp.asarray(g))
    np.testing.assert_array_equal(y_j, y_t)
    np.testing.assert_array_equal(dx_j, dx_t)


def test_no_window_loses_its_gradient_under_jit():
    """BatchNorm + ReLU + max-pool as DenseNet's stem has them, jitted. XLA fuses the
    BatchNorm into both the forward pooling and the backward pass, and the two fusions round
    differently; a backward that matched elements against the forward's maximum lost the
    gradient of ~1000 windows here. d sum(pool) / d bias counts, per channel, the windows whose
    chosen element is positive, which is exactly the number of positive outputs."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.random((2, 96, 96, 1)).astype(np.float32))
    k = jnp.asarray(rng.standard_normal((7, 7, 1, 64)).astype(np.float32) * 0.2)

    def stem(scale, bias):
        h = jax.lax.conv_general_dilated(x, k, (2, 2), ((3, 3), (3, 3)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        m = h.mean((0, 1, 2))
        v = (h * h).mean((0, 1, 2)) - m * m
        return ops.max_pool(jax.nn.relu((h - m) * jax.lax.rsqrt(v + 1e-5) * scale + bias), 3, 2, 1)

    def grad_and_count(scale, bias):
        p, vjp = jax.vjp(stem, scale, bias)
        return vjp(jnp.ones_like(p))[1], jnp.sum(p > 0, axis=(0, 1, 2))

    grad, count = jax.jit(grad_and_count)(jnp.linspace(0.5, 1.5, 64), jnp.zeros(64))
    np.testing.assert_array_equal(grad, count)


def test_nan_goes_where_torch_puts_it():
    # PyTorch: a NaN replaces the running maximum (so the *last* NaN of a window wins).
    x = inputs("relu", (1, 7, 7, 2), 5)
    x[0, 1, 1, 0] = x[0, 2, 2, 0] = x[0, 4, 5, 1] = np.nan
    g = np.random.default_rng(6).standard_normal((1, 3, 3, 2)).astype(np.float32)
    y_t, dx_t = torch_pool(x, 3, 2, 0, g)
    y_j, dx_j = jax_pool(jnp.asarray(x), 3, 2, 0, jnp.asarray(g))
    np.testing.assert_array_equal(y_j, y_t)  # NaN where PyTorch has NaN
    np.testing.assert_allclose(dx_j, dx_t, rtol=1e-6, atol=1e-6)


def test_grad_of_jit_and_vmap():
    x = jnp.asarray(inputs("relu", (2, 12, 12, 3), 7))

    def loss(x):
        return jnp.sum(ops.max_pool(x, 3, 2, 1) ** 2)

    eager = jax.grad(loss)(x)
    np.testing.assert_allclose(jax.grad(jax.jit(loss))(x), eager, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(jax.grad(loss))(x), eager, rtol=1e-6)
    # vmap over an extra leading axis equals a loop over it (jitted: op by op, the batched
    # window terms took 3 s to compile).
    xs = jnp.stack([x, 2 * x + 1])
    batched = jax.jit(jax.vmap(jax.grad(loss)))(xs)
    np.testing.assert_allclose(batched[0], eager, rtol=1e-6)
    np.testing.assert_allclose(batched[1], jax.grad(loss)(2 * x + 1), rtol=1e-6)
    np.testing.assert_array_equal(
        jax.jit(jax.vmap(lambda x: ops.max_pool(x, 3, 2, 1)))(xs)[1], ops.max_pool(xs[1], 3, 2, 1))


@pytest.fixture
def max_pool_path(request, monkeypatch):
    """Which implementation `ops.max_pool`'s gradient takes: "kernels" (flaxcnn's CPU kernels,
    the default on a CPU; "kernels-plain" without their AVX2 loops) or "xla" (XLA's ops, the
    default elsewhere)."""
    from flaxcnn import onednn

    path = request.param
    if path.startswith("kernels") and not onednn.available():
        pytest.fail(f"flaxcnn's CPU kernels are not built here: {onednn.reason()}")
    monkeypatch.setattr(ops, "_NATIVE_MAX_POOL", path != "xla")
    monkeypatch.setattr(onednn, "MAX_POOL_SIMD", path != "kernels-plain")
    return path


@pytest.mark.parametrize("max_pool_path", ["kernels", "kernels-plain", "xla"], indirect=True)
@pytest.mark.parametrize("ksp", POOLS + [(2, 1, 0), (5, 2, 2)], ids=str)
def test_max_pool_paths_match_torch(max_pool_path, ksp):
    """Every path, on channel counts that fill the kernels' 8-lane blocks and leave some over
    (19 = 2 * 8 + 3), with ties, zero windows and NaNs. The kernels add each element's routed
    gradients in PyTorch's order, so their gradient is PyTorch's bit for bit."""
    k, s, p = ksp
    for c in (8, 19):
        x = inputs("blocks", (2, 13, 12, c), c)
        x[0, 5, 6, 1] = x[0, 6, 6, 1] = x[1, 12, 11, c - 1] = x[1, 0, 0, 9 % c] = np.nan
        n, h, w = x.shape[:3]
        g = np.random.default_rng(c).standard_normal(
            (n, (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1, c)).astype(np.float32)
        y_t, dx_t = torch_pool(x, k, s, p, g)
        y_j, dx_j = (np.asarray(a) for a in pool_and_grad(
            ops.max_pool, jnp.asarray(x), k, s, p, jnp.asarray(g), max_pool_path))
        np.testing.assert_array_equal(y_j, y_t)
        if max_pool_path == "xla":  # the routed gradients summed in another order
            np.testing.assert_allclose(dx_j, dx_t, rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_array_equal(dx_j, dx_t)


@pytest.mark.parametrize("max_pool_path", ["kernels", "xla"], indirect=True)
def test_max_pool_path_in_the_compiled_step(max_pool_path):
    """On a CPU the differentiated max-pool is flaxcnn's two kernels (the argmax kept from the
    forward pass); XLA's ops otherwise. Not differentiated, it stays XLA's, which fuses the
    pooling into its producer."""
    x = jnp.zeros((2, 12, 12, 16))
    grad = jax.jit(jax.grad(lambda x: jnp.sum(ops.max_pool(x, 3, 2, 1))))
    hlo = grad.lower(x).as_text()
    kernels = ("flaxcnn_max_pool_forward" in hlo, "flaxcnn_max_pool_backward" in hlo)
    assert kernels == ((True, True) if max_pool_path == "kernels" else (False, False))
    assert "flaxcnn_max_pool" not in jax.jit(lambda x: ops.max_pool(x, 3, 2, 1)).lower(x).as_text()
    # cpu_kernels=False (ResNet's and DenseNet's stems): XLA's ops, fused with BatchNorm + ReLU
    opted_out = jax.jit(jax.grad(lambda x: jnp.sum(ops.max_pool(x, 3, 2, 1, cpu_kernels=False))))
    assert "flaxcnn_max_pool" not in opted_out.lower(x).as_text()


@pytest.mark.parametrize("max_pool_path", ["kernels"], indirect=True)
def test_max_pool_kernels_only_on_cpu(max_pool_path):
    """Lowered for a GPU or a TPU (an exported program, from this CPU host), the max-pool's
    gradient is XLA's ops: the kernels are chosen by `platform_dependent`, on a CPU only."""
    from jax import export

    targets = ("flaxcnn_max_pool_forward", "flaxcnn_max_pool_backward")
    grad = jax.jit(jax.grad(lambda x: jnp.sum(ops.max_pool(x, 3, 2, 1) ** 2)))
    x = jnp.zeros((2, 12, 12, 16))
    checks = [export.DisabledSafetyCheck.custom_call(t) for t in targets]
    for platform in ("cpu", "cuda", "tpu"):
        text = export.export(grad, platforms=[platform], disabled_checks=checks)(
            x).mlir_module()
        assert all((t in text) == (platform == "cpu") for t in targets), platform


def test_max_pool_tuple_arguments_and_errors():
    x = jnp.asarray(inputs("random", (1, 8, 9, 2), 0))
    np.testing.assert_array_equal(ops.max_pool(x, (3, 3), (2, 2), (1, 1)), ops.max_pool(x, 3, 2, 1))
    with pytest.raises(ValueError, match="half the kernel"):
        ops.max_pool(x, 2, 2, 2)
    with pytest.raises(TypeError, match="floating"):
        ops.max_pool(jnp.zeros((1, 4, 4, 1), jnp.int32), 2, 2)


@pytest.mark.parametrize("native", [True, False], ids=["kernel", "xla"])
def test_concat_channels_is_jnp_concatenate(native, monkeypatch):
    """`ops.concat_channels`: `jnp.concatenate` on the last axis, bit for bit, with its slices
    as the gradient; on a CPU, for float32, flaxcnn's kernel (`onednn.concat_channels`) where
    it is built, XLA's concatenation otherwise (`_NATIVE_CONCAT = False`, other dtypes)."""
    from flaxcnn import onednn

    if native and not onednn.available():
        pytest.fail(f"flaxcnn's CPU kernels are not built here: {onednn.reason()}")
    monkeypatch.setattr(ops, "_NATIVE_CONCAT", native)
    rng = np.random.default_rng(0)
    for shapes in ([(2, 5, 4, 3), (2, 5, 4, 32), (2, 5, 4, 1)], [(7, 2), (7, 9)],
                   [(3, 3, 3, 64)] * 5, [(0, 4, 2), (0, 4, 3)]):
        xs = [jnp.asarray(rng.standard_normal(sh), jnp.float32) for sh in shapes]
        g = jnp.asarray(rng.standard_normal((*shapes[0][:-1], sum(sh[-1] for sh in shapes))),
                        jnp.float32)

        def loss(*xs, g=g):
            return jnp.vdot(ops.concat_channels(xs), g)

        f = jax.jit(lambda *xs: ops.concat_channels(xs))
        np.testing.assert_array_equal(f(*xs), jnp.concatenate(xs, axis=-1))
        grads = jax.jit(jax.grad(loss, argnums=tuple(range(len(xs)))))(*xs)
        ends = np.cumsum([sh[-1] for sh in shapes])
        for gx, sh, e in zip(grads, shapes, ends, strict=True):
            np.testing.assert_array_equal(gx, g[..., e - sh[-1]:e])
        assert ("flaxcnn_concat_channels" in f.lower(*xs).as_text()) == native
    x16 = jnp.ones((2, 3, 4), jnp.bfloat16)
    both = jax.jit(lambda a, b: ops.concat_channels((a, b)))
    assert both(x16, x16).dtype == jnp.bfloat16
    assert "flaxcnn_concat_channels" not in both.lower(x16, x16).as_text()
    assert ops.concat_channels([xs[0]]) is xs[0]


def test_concat_channels_kernel_only_on_cpu_and_checks_shapes():
    """Lowered for a GPU or a TPU, the concatenation is XLA's (`platform_dependent`); the kernel
    refuses operands that differ beyond the last axis."""
    from jax import export

    from flaxcnn import onednn

    f = jax.jit(lambda a, b: ops.concat_channels((a, b)))
    a, b = jnp.zeros((2, 4, 3)), jnp.zeros((2, 4, 5))
    check = [export.DisabledSafetyCheck.custom_call("flaxcnn_concat_channels")]
    for platform in ("cpu", "cuda", "tpu"):
        text = export.export(f, platforms=[platform], disabled_checks=check)(a, b).mlir_module()
        assert ("flaxcnn_concat_channels" in text) == (platform == "cpu"), platform
    if not onednn.available():
        pytest.fail(f"flaxcnn's CPU kernels are not built here: {onednn.reason()}")
    out = jax.ShapeDtypeStruct((2, 4, 8), jnp.float32)
    bad = jax.ffi.ffi_call("flaxcnn_concat_channels", out, vmap_method="sequential")
    with pytest.raises(Exception, match="operands differ beyond the last axis"):
        jax.block_until_ready(bad(a, jnp.zeros((2, 3, 5))))
    with pytest.raises(Exception, match="widths do not add up"):
        jax.block_until_ready(bad(a, jnp.zeros((2, 4, 4))))


@pytest.mark.parametrize("ksp", [(2, 2, 0), (3, 3, 1), (3, 2, 1), (2, 1, 0)], ids=str)
@pytest.mark.parametrize("shape", [(2, 24, 24, 6), (2, 9, 8, 3), (3, 7, 7, 2)], ids=str)
def test_avg_pool_matches_torch(ksp, shape):
    k, s, p = ksp
    x = inputs("random", shape, 1)
    xt = torch.tensor(x).permute(0, 3, 1, 2).contiguous(
        memory_format=torch.channels_last).requires_grad_(True)
    yt = F.avg_pool2d(xt, k, s, p)
    gt = torch.randn(yt.shape, generator=torch.Generator().manual_seed(2))
    yt.backward(gt)
    y, dx = pool_and_grad(ops.avg_pool, jnp.asarray(x), k, s, p,
                          jnp.asarray(gt.permute(0, 2, 3, 1).numpy()))
    y_ref, dx_ref = yt.detach().permute(0, 2, 3, 1).numpy(), xt.grad.permute(0, 2, 3, 1).numpy()
    if (k, s, p) == (2, 2, 0):
        # The networks' pool (LeNet, DenseNet): same additions in the same order, bit for bit.
        np.testing.assert_array_equal(y, y_ref)
        np.testing.assert_array_equal(dx, dx_ref)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-6, atol=1e-6)


def test_global_avg_pool():
    x = inputs("random", (2, 9, 8, 3), 1)
    np.testing.assert_allclose(
        ops.global_avg_pool(jnp.asarray(x))[:, 0, 0], x.mean(axis=(1, 2)), rtol=1e-6)


def conv_grads(conv, x, w, g):
    """(dx, dw) of <conv(x, w), g>, jitted."""
    return jax.jit(jax.grad(lambda x, w: jnp.vdot(conv(x, w), g), (0, 1)))(x, w)


def against_xla(conv, seed, x_shape, w_shape, padding):
    """conv(x, w) and its (dx, dw), then XLA's stride-1 convolution's, on random x, w (scaled
    by 0.3) and output gradient: (got, ref, grads, ref_grads), all jitted."""
    kx, kw, kg = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, x_shape)
    w = jax.random.normal(kw, w_shape) * 0.3
    xla = partial(ops.conv_nhwc, strides=1, padding=padding)
    ref = xla(x, w)
    g = jax.random.normal(kg, ref.shape)
    return jax.jit(conv)(x, w), ref, conv_grads(conv, x, w, g), conv_grads(xla, x, w, g)


@pytest.mark.parametrize("k,p,side", [(5, 2, 28), (3, 1, 33), (5, 0, 14), (1, 0, 7)])
def test_conv_one_channel_matches_xla_convolution(k, p, side):
    """Values within float32 rounding of XLA's convolution; gradients are the convolution's."""
    got, ref, (dx, dw), (rx, rw) = against_xla(
        partial(ops.conv_one_channel, padding=p), k * 100 + side, (3, side, side, 1),
        (k, k, 1, 4), p)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, rx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, rw, rtol=1e-5, atol=1e-4)


def test_conv_one_channel_rejects_several_channels():
    with pytest.raises(ValueError, match="one input channel"):
        ops.conv_one_channel(jnp.zeros((1, 8, 8, 2)), jnp.zeros((3, 3, 2, 4)), 1)


@pytest.mark.parametrize("c,k,p,hw", [(6, 5, 0, (12, 12)), (6, 5, 2, (12, 12)),
                                      (2, 3, 1, (9, 7)), (8, 1, 0, (5, 6))])
def test_conv_few_channels_matches_xla_convolution(c, k, p, hw):
    """The forward pass is XLA's convolution; the input gradient (a product and k*k shifted
    adds) is within float32 rounding of XLA's, the kernel gradient is XLA's."""
    got, ref, (dx, dw), (rx, rw) = against_xla(
        partial(ops.conv_few_channels, padding=p), c * 100 + k, (3, *hw, c), (k, k, c, 16), p)
    np.testing.assert_array_equal(got, ref)
    assert dx.shape == rx.shape
    np.testing.assert_allclose(dx, rx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, rw, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape,k,p", [((4, 3, 3, 8), 5, 2), ((2, 3, 4, 6), 5, 1),
                                     ((2, 2, 2, 3), 3, 1)])
def test_conv_small_input_matches_xla_convolution(shape, k, p):
    """An image smaller than the kernel, on a padded copy: values and both gradients within
    float32 rounding of XLA's convolution (kernel gradient: XLA's, on the padded copy)."""
    got, ref, (dx, dw), (rx, rw) = against_xla(
        partial(ops.conv_small_input, padding=p), k * 10 + p, shape, (k, k, shape[-1], 7), p)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, rx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, rw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,k,p,taps", [
    ((2, 3, 3, 16), 3, 1, 9), ((2, 3, 4, 6), 5, 2, 25), ((2, 1, 1, 8), 3, 1, 1),
    ((3, 2, 5, 4), 3, 2, 9), ((2, 6, 5, 5), 3, 1, 9), ((2, 4, 4, 3), 1, 1, 1)])
def test_conv_taps_matches_xla_convolution(shape, k, p, taps):
    """One matrix product per tap that reaches the image (a 1x1 map: the centre only), over
    its outputs alone: values and both gradients within float32 rounding of XLA's convolution,
    outputs no tap reaches (padding 2 on a 3x3 kernel) zero."""
    conv = partial(ops.conv_taps, padding=p)
    got, ref, (dx, dw), (rx, rw) = against_xla(conv, k * 10 + p, shape, (k, k, shape[-1], 7), p)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, rx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, rw, rtol=1e-5, atol=1e-5)
    jaxpr = str(jax.make_jaxpr(conv)(jnp.zeros(shape), jnp.zeros((k, k, shape[-1], 7))))
    assert jaxpr.count("dot_general") == taps and "conv_general_dilated" not in jaxpr


def test_many_channel_layers_on_small_maps_take_conv_taps_on_cpu():
    """A padded 3x3 layer with 320 outputs or more on a 3x3 map (ResNet-18's 512 -> 512,
    GoogLeNet's last -> 320 and -> 384) is `conv_taps` on a CPU, with oneDNN or without, its
    bias and ReLU added after; other platforms keep XLA's convolution. 6x6 maps and fewer
    outputs keep the CPU's other choices."""
    import flax.linen as nn

    from flaxcnn.models import layers

    for side, features, taps in ((3, 512, True), (3, 320, True), (3, 128, False),
                                 (6, 512, False)):
        x = jax.random.normal(jax.random.key(0), (2, side, side, 8))
        conv = layers.Conv(features, 3, padding=1)
        v = conv.init(jax.random.key(1), x)
        fused = jax.jit(lambda v, x, conv=conv: conv.apply(v, x, relu=True))
        if taps:
            convs = exported_counts(fused, (v, x), "stablehlo.convolution")
            assert convs == {"cpu": 0, "cuda": 1, "tpu": 1}
            hlo = fused.lower(v, x).compile().as_text()
            assert "custom_call_target" not in hlo and "convolution(" not in hlo
            np.testing.assert_allclose(fused(v, x), nn.relu(conv.apply(v, x)), rtol=0, atol=1e-6)
            np.testing.assert_allclose(
                conv.apply(v, x), ops.conv_nhwc(x, v["params"]["kernel"], 1, 1)
                + v["params"]["bias"], rtol=1e-5, atol=1e-5)
        else:
            hlo = fused.lower(v, x).compile().as_text()
            assert hlo.count(" dot(") == 0, (side, features)


@pytest.mark.parametrize("shape,o", [((2, 27, 26, 16), 24), ((3, 5, 4, 7), 5)])
def test_conv_1x1_matches_xla_convolution(shape, o):
    """Forward pass and input gradient are XLA's convolution; the kernel gradient (one matrix
    product over N*H*W) is within float32 rounding of XLA's."""
    got, ref, (dx, dw), (rx, rw) = against_xla(ops.conv_1x1, o, shape, (1, 1, shape[-1], o), 0)
    np.testing.assert_array_equal(got, ref)
    np.testing.assert_array_equal(dx, rx)
    np.testing.assert_allclose(dw, rw, rtol=1e-5, atol=1e-4)


def exported_counts(fn, args, op):
    """How often `op` occurs in fn's exported program for each of cpu, cuda and tpu (the
    CPU-only paths are chosen by `platform_dependent` when a program is lowered)."""
    from jax import export

    return {p: export.export(fn, platforms=[p])(*args).mlir_module().count(op)
            for p in ("cpu", "cuda", "tpu")}


@pytest.fixture
def xla_convolutions(monkeypatch):
    """The models as they compile without oneDNN (not built, or FLAXCNN_NO_ONEDNN): XLA's
    convolutions and the ops paths for the layers it handles badly, the max-pools on XLA's ops
    (their kernels are in the same library)."""
    from flaxcnn.models import layers

    monkeypatch.setattr(layers, "_ONEDNN", False)
    monkeypatch.setattr(ops, "_NATIVE_MAX_POOL", False)


def test_nin_1x1_kernel_gradients_only_on_cpu(xla_convolutions):
    """NiN's 1x1 layers on 54x54 and 26x26 maps (4 of its 8): on a CPU their kernel gradients
    are matrix products, elsewhere convolutions; smaller maps keep XLA's on every platform."""
    from flaxcnn import models

    model = models.create("nin", dropout_rate=0.0)
    variables = abstract_variables(model, (1, 224, 224, 1))
    grad = jax.jit(jax.grad(lambda p, x: model.apply({"params": p}, x, train=True).sum()))
    x = jnp.zeros((1, 224, 224, 1))
    convs = exported_counts(grad, (variables["params"], x), "stablehlo.convolution")
    # 12 layers: forward, input gradient (not the first layer's), kernel gradient each
    assert convs == {"cpu": 12 + 11 + 12 - 4, "cuda": 35, "tpu": 35}


def test_googlenet_convolutions_keep_their_operands_on_cpu(xla_convolutions):
    """GoogLeNet's 5x5 convolutions on 3x3 maps: without conv_small_input, XLA:CPU swaps
    image and kernel (dim_labels 01fb_o01i->f01b) and runs them 10x slower. The first block
    of its last stage, differentiated as it trains at 96x96, where its maps are 3x3 (the whole
    training step took a minute to compile here)."""
    from flaxcnn.models.googlenet import Inception
    from flaxcnn.models.layers import Conv

    block = Inception(256, (160, 320), (32, 128), 128, conv=Conv)
    x = jnp.zeros((2, 3, 3, 832))
    params = abstract_variables(block, x.shape)
    grad = jax.jit(jax.grad(lambda p, x: block.apply(p, x).sum(), (0, 1)))
    hlo = grad.lower(params, x).compile().as_text()
    assert "convolution(" in hlo and "01fb_o01i" not in hlo


def test_few_channel_input_gradient_only_on_cpu(xla_convolutions):
    """LeNet's gradient on a CPU: no convolution for the first layer's forward pass
    (conv_one_channel) nor for the second layer's input gradient (conv_few_channels)."""
    from flaxcnn import models

    model = models.create("lenet_bn")
    variables = abstract_variables(model, (1, 28, 28, 1))

    def loss(params, batch_stats, x):
        v = {"params": params, "batch_stats": batch_stats}
        return model.apply(v, x, train=True, mutable=["batch_stats"])[0].sum()

    grad = jax.jit(jax.grad(loss))
    x = jnp.zeros((2, 28, 28, 1))
    convs = exported_counts(grad, (variables["params"], variables["batch_stats"], x),
                            "stablehlo.convolution")
    # cpu: the kernel gradients of both layers and the second's forward pass; elsewhere also
    # the first's forward pass and the second's input gradient.
    assert convs == {"cpu": 3, "cuda": 5, "tpu": 5}


def test_one_channel_convolution_only_on_cpu(xla_convolutions):
    """LeNet's first layer is k*k multiply-adds on a CPU; a GPU or TPU keeps its convolution."""
    from flaxcnn import models

    model = models.create("lenet_bn")
    variables = abstract_variables(model, (1, 28, 28, 1))
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    x = jnp.zeros((2, 28, 28, 1))
    convs = exported_counts(apply, (variables, x), "stablehlo.convolution")
    assert convs == {"cpu": 1, "cuda": 2, "tpu": 2}


@pytest.mark.parametrize("shape", [(7, 5), (3, 6, 5, 4)])
def test_batch_norm_vjp_matches_autodiff(shape):
    """`ops.batch_norm`'s written-out backward pass equals autodiff of the same operations,
    including cotangents for the returned mean and variance (off-centre data)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(2.0 + rng.standard_normal(shape), jnp.float32)
    c = shape[-1]
    scale = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(c), jnp.float32)
    cts = (jnp.asarray(rng.standard_normal(shape), jnp.float32),
           jnp.asarray(rng.standard_normal(c), jnp.float32),
           jnp.asarray(rng.standard_normal(c), jnp.float32))
    outs, grads = [], []
    for f in (ops.batch_norm, ops.batch_norm_autodiff):
        out, vjp = jax.vjp(lambda x, s, b, f=f: f(x, s, b, 1e-5), x, scale, bias)
        outs.append(out)
        grads.append(jax.jit(vjp)(cts))
    for a, b in zip(outs[0], outs[1], strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(grads[0], grads[1], strict=True):
        assert np.abs(a - b).max() <= 2e-6 * np.abs(b).max()


def test_batch_norm_backward_only_on_cpu():
    """`models.BatchNorm2d` differentiates through `ops.batch_norm` on a CPU (two reductions
    forward, two backward); a GPU or TPU program differentiates the operations themselves."""
    from flaxcnn import models

    bn = models.BatchNorm2d()
    x = jax.random.normal(jax.random.key(0), (4, 5, 5, 3))
    variables = bn.init(jax.random.key(1), x)

    def loss(params, x):
        y, upd = bn.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y)), upd

    grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
    reductions = exported_counts(grad, (variables["params"], x), "stablehlo.reduce")
    assert reductions == {"cpu": 4, "cuda": 10, "tpu": 10}
