"""oneDNN's convolutions as XLA:CPU custom calls (flaxcnn/onednn.py, flaxcnn/_onednn.cc).

.ci/setup installs oneDNN (Debian's libdnnl-dev) and builds them, so here they must be
available: a machine without them fails loudly rather than skipping.
"""

import os
import re
import subprocess
import sys
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_variables
from jax import lax

from flaxcnn import onednn
from flaxcnn.models import googlenet, layers


def test_available():
    assert onednn.available(), onednn.reason()


def xla_conv(x, kernel, strides, padding):
    return lax.conv_general_dilated(x, kernel, strides, padding,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


# (batch, height, width, in, out, kernel, strides, padding): the networks' kinds of layer
# (strided stems, 1x1 shortcuts, kernels larger than the map) and odd, asymmetric cases.
GEOMETRIES = [
    (2, 9, 9, 3, 5, (3, 3), (1, 1), ((1, 1), (1, 1))),
    (2, 12, 10, 8, 4, (5, 5), (1, 1), ((2, 2), (2, 2))),
    (2, 11, 11, 16, 8, (1, 1), (2, 2), ((0, 0), (0, 0))),
    (1, 23, 23, 4, 6, (7, 7), (2, 2), ((3, 3), (3, 3))),
    (1, 25, 21, 2, 3, (11, 11), (4, 4), ((1, 1), (1, 1))),
    (2, 27, 27, 1, 4, (11, 11), (4, 4), ((1, 1), (1, 1))),  # a one-channel stem
    (3, 3, 3, 6, 7, (5, 5), (1, 1), ((2, 2), (2, 2))),
    (2, 8, 7, 5, 3, (3, 2), (2, 1), ((0, 2), (1, 0))),
    (2, 12, 12, 16, 16, (3, 3), (1, 1), ((1, 1), (1, 1))),  # weights in a blocked layout
    (4, 10, 10, 8, 8, (3, 3), (1, 1), ((1, 1), (1, 1))),
]


def _splits(x, kernel, xla_pool):
    """Whether `_onednn.cc` splits this call over XLA's pool (one thread per core it may use)."""
    n, threads = x.shape[0], len(os.sched_getaffinity(0))
    return (xla_pool and kernel.size <= x.size
            and any(n % d == 0 for d in range(2, min(threads, n) + 1)))


@pytest.mark.parametrize("xla_pool", [True, False], ids=["xla-pool", "openmp"])
@pytest.mark.parametrize("case", range(len(GEOMETRIES)), ids=lambda i: str(GEOMETRIES[i]))
def test_conv_and_gradients_equal_xla(case, xla_pool, monkeypatch):
    """Output, input gradient and kernel gradient within float32 rounding of XLA's convolution
    (sums in another order), whether a call splits its batch over XLA's thread pool or runs on
    oneDNN's own threads. The split is taken exactly where `_onednn.cc` says: on two or more
    cores (the most equal parts, up to one per core), with no more weights than input values;
    its kernel gradient, a sum of the parts', comes out the same on every run."""
    monkeypatch.setattr(onednn, "XLA_POOL", xla_pool)
    n, h, w, c, o, k, strides, padding = GEOMETRIES[case]
    kx, kk, kg = jax.random.split(jax.random.key(case), 3)
    x = jax.random.normal(kx, (n, h, w, c))
    kernel = jax.random.normal(kk, (*k, c, o))
    ours = jax.jit(partial(onednn.conv, strides=strides, padding=padding))
    assert f"xla_pool = {int(xla_pool)} : i64" in ours.lower(x, kernel).as_text()
    ref = partial(xla_conv, strides=strides, padding=padding)
    before = onednn.split_calls()
    y, vjp = jax.vjp(ours, x, kernel)
    got = jax.block_until_ready((y, *vjp(g := jax.random.normal(kg, y.shape))))
    assert onednn.split_calls() - before == (3 if _splits(x, kernel, xla_pool) else 0)
    y_ref, vjp_ref = jax.vjp(ref, x, kernel)
    assert y.shape == y_ref.shape
    for a, want in zip(got, (y_ref, *vjp_ref(g)), strict=True):
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(a, want, atol=2e-6 * scale, rtol=0)
    again = jax.vjp(ours, x, kernel)[1](g)
    for a, b in zip(got[1:], again, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("xla_pool", [True, False], ids=["xla-pool", "openmp"])
@pytest.mark.parametrize("case", range(len(GEOMETRIES)), ids=lambda i: str(GEOMETRIES[i]))
def test_conv_relu_and_gradients_equal_xla(case, xla_pool, monkeypatch):
    """`conv_relu` (the bias and ReLU as oneDNN's post-ops) against XLA's convolution, bias and
    ReLU: output and the three gradients within float32 rounding, split or not."""
    monkeypatch.setattr(onednn, "XLA_POOL", xla_pool)
    n, h, w, c, o, k, strides, padding = GEOMETRIES[case]
    kx, kk, kb, kg = jax.random.split(jax.random.key(case), 4)
    x = jax.random.normal(kx, (n, h, w, c))
    kernel = jax.random.normal(kk, (*k, c, o))
    bias = jax.random.normal(kb, (o,))
    ours = jax.jit(partial(onednn.conv_relu, strides=strides, padding=padding))
    before = onednn.split_calls()
    y, vjp = jax.vjp(ours, x, kernel, bias)
    got = jax.block_until_ready((y, *vjp(g := jax.random.normal(kg, y.shape))))
    assert onednn.split_calls() - before == (3 if _splits(x, kernel, xla_pool) else 0)
    y_ref, vjp_ref = jax.vjp(lambda x, k, b: jax.nn.relu(xla_conv(x, k, strides, padding) + b),
                             x, kernel, bias)
    assert 0 < float(jnp.mean(y_ref == 0)) < 1  # both sides of the ReLU are exercised
    for a, want in zip(got, (y_ref, *vjp_ref(g)), strict=True):
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(a, want, atol=2e-6 * scale, rtol=0)


def test_conv_relu_keeps_nan_from_its_parameters_when_differentiated():
    """oneDNN's ReLU gives 0 for NaN. Differentiated (training), an Inf or NaN in the kernel or
    bias gives what XLA's ReLU after the convolution gives, NaN where it is, so a diverged layer
    shows in the loss; in inference, and for a NaN in the input, the NaN comes out 0."""
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 4))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 4, 8))
    bias = jnp.zeros(8)
    ours = partial(onednn.conv_relu, strides=(1, 1), padding=((1, 1), (1, 1)))

    def unfused(x, k, b):
        return jax.nn.relu(onednn.conv(x, k, (1, 1), ((1, 1), (1, 1))) + b)

    for k, b in ((kernel.at[0, 0, 0, 3].set(jnp.nan), bias), (kernel, bias.at[5].set(jnp.nan)),
                 (kernel.at[1, 1, 2, 0].set(jnp.inf), bias), (kernel, bias.at[2].set(-jnp.inf))):
        trained = jax.vjp(ours, x, k, b)[0]
        np.testing.assert_array_equal(trained, unfused(x, k, b))  # NaN where unfused has NaN
        assert not jnp.isnan(ours(x, k, b)).any()
    assert jnp.isnan(unfused(x, kernel.at[0, 0, 0, 3].set(jnp.nan), bias)).any()
    nan_input = x.at[0, 2, 2, 1].set(jnp.nan)
    assert not jnp.isnan(jax.vjp(ours, nan_input, kernel, bias)[0]).any()
    assert jnp.isnan(unfused(nan_input, kernel, bias)).any()


def test_sequential_is_nn_sequential():
    """`layers.Sequential` names, passes arguments and rejects an empty list as `nn.Sequential`
    does, fusing only a `Conv` followed by `nn.relu`."""
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    parts = lambda: [layers.Conv(4, 3, padding=1), nn.relu, layers.Conv(5, 1), jnp.tanh]  # noqa: E731
    ours, theirs = layers.Sequential(parts()), nn.Sequential(parts())
    v = ours.init(jax.random.key(1), x)
    assert jax.tree.structure(v) == jax.tree.structure(theirs.init(jax.random.key(1), x))
    np.testing.assert_allclose(ours.apply(v, x), theirs.apply(v, x), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="Empty Sequential"):
        layers.Sequential([]).init(jax.random.key(0), x)


def test_conv_relu_checks_its_bias():
    x, kernel = jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 4))
    with pytest.raises(ValueError, match="one value per output channel"):
        onednn.conv_relu(x, kernel, jnp.ones(3), (1, 1), ((1, 1), (1, 1)))


def test_conv_under_vmap_and_second_call_reuses_primitives():
    """vmap maps the custom calls one slice at a time; a second shape compiles its own
    primitives and the first keeps working."""
    x = jax.random.normal(jax.random.key(0), (3, 2, 6, 6, 4))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 4, 5))
    conv = partial(onednn.conv, strides=(1, 1), padding=((1, 1), (1, 1)))
    got = jax.vmap(conv, in_axes=(0, None))(x, kernel)
    want = jnp.stack([xla_conv(xi, kernel, (1, 1), ((1, 1), (1, 1))) for xi in x])
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(conv(x[0, :1], kernel), want[0, :1], atol=1e-5)
    np.testing.assert_allclose(jax.vmap(conv, in_axes=(0, None))(x, kernel), want, atol=1e-5)


def test_models_take_onednn_on_cpu_only():
    """ResNet-18's gradient: on a CPU every convolution but the small-map ones, the strided
    one-channel stem too, is a oneDNN custom call; CUDA and TPU programs keep XLA's
    convolutions and hold no custom call."""
    from jax import export

    from flaxcnn import models

    model = models.create("resnet18")
    variables = random_variables(model, (1, 32, 32, 1))

    def loss(params, x):
        v = {"params": params, "batch_stats": variables["batch_stats"]}
        return model.apply(v, x, train=True, mutable=["batch_stats"])[0].sum()

    checks = [export.DisabledSafetyCheck.custom_call(t) for t in onednn.TARGETS]
    args = (variables["params"], jnp.zeros((2, 32, 32, 1)))
    text = {p: export.export(jax.jit(jax.grad(loss)), platforms=[p], disabled_checks=checks)(
        *args).mlir_module() for p in ("cpu", "cuda", "tpu")}
    # 20 convolutions: the stem (forward, kernel gradient) and 16 others (three passes each);
    # the three stride-1 512 -> 512 layers, on 1x1 maps at this side, are matrix products
    # (`ops.conv_taps`, layers._TAPS_MAX_SIDE)
    assert text["cpu"].count("stablehlo.convolution") == 0
    counts = {"forward": 17, "forward_bias_relu": 0, "backward_data": 16, "backward_weights": 17}
    for t, count in counts.items():
        assert text["cpu"].count(f"custom_call @flaxcnn_onednn_conv_{t}(") == count, t
    for p in ("cuda", "tpu"):
        assert text[p].count("stablehlo.convolution") == 20 + 19 + 20
        assert "flaxcnn_onednn" not in text[p]


@pytest.mark.slow
def test_googlenet_runs_its_layers_on_onednn():
    """GoogLeNet on a CPU: 55 of its 57 layers on oneDNN, each with its ReLU inside the call, in
    training and in inference; the other two, the last block's 3x3 layers on 3x3 maps, are
    `ops.conv_taps`'s matrix products. Its Inception blocks trained on XLA's convolutions until
    2026-12-03 (0.89x of oneDNN's speed at batch 128; benchmarks/xla_cpu_study.md)."""
    from flaxcnn import models

    model = models.create("googlenet")
    x = jax.random.uniform(jax.random.key(1), (2, 96, 96, 1))
    variables = random_variables(model, x.shape)
    grad = jax.jit(jax.grad(lambda p, x: model.apply({"params": p}, x, train=True).sum()))
    hlo = grad.lower(variables["params"], x).compile().as_text()
    # (the stem reads the image: no input gradient)
    counts = {"forward": 0, "forward_bias_relu": 55, "backward_data": 54, "backward_weights": 55}
    for t, count in counts.items():
        assert hlo.count(f'custom_call_target="flaxcnn_onednn_conv_{t}"') == count, t
    assert "convolution(" not in hlo
    hlo = jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(
        variables, x).compile().as_text()
    assert hlo.count('custom_call_target="flaxcnn_onednn_conv_forward_bias_relu"') == 55
    assert "convolution(" not in hlo and hlo.count(" dot(") == 2 * 9 + 1  # and the linear layer


def test_one_channel_first_layers():
    """LeNet's first layer (1 -> 6) takes oneDNN's convolution; VGG's (1 -> 16) keeps the k*k
    multiply-adds (`layers._ONE_CHANNEL_MIN_FEATURES`)."""
    from flaxcnn import models

    # LeNet: both of its 2 layers; VGG: 7 of its 8, not the first (with their ReLUs)
    for name, side, expected in (("lenet_bn", 28, 2), ("vgg", 224, 7)):
        model = models.create(name)
        variables = random_variables(model, (1, side, side, 1))
        hlo = jax.jit(partial(model.apply, train=False)).lower(
            variables, jnp.zeros((2, side, side, 1))).compile().as_text()
        assert hlo.count('custom_call_target="flaxcnn_onednn_conv_forward') == expected, name


def _ynn_fusion_bodies(hlo: str) -> list[str]:
    """The fused computations of a compiled program's YNNPACK fusions."""
    names = re.findall(r'calls=(%[\w.]+),[^\n]*"__ynn_fusion"', hlo)
    return [re.search("\n" + re.escape(n) + r" .*?\n}", hlo, re.S).group(0) for n in names]


def test_small_map_layers_stay_separate_products():
    """ResNet-18 in eval mode: its last three layers (`ops.conv_taps` on 3x3 maps, nine matrix
    products each) reach the linear layer's product through elementwise work and the average
    pool only. YNNPACK's dot fusion grows its graph upward from a product; each of theirs stays
    a fusion of its own, as in the products alone (benchmarks/xla_cpu_study.md), and no
    convolution is left to XLA (until 2026-12-03 these layers forwarded in XLA's convolution,
    which the linear layer's fusion took into its graph, 1.10x slower)."""
    from flaxcnn import models

    model = models.create("resnet18")
    variables = random_variables(model, (1, 96, 96, 1))
    hlo = jax.jit(partial(model.apply, train=False)).lower(
        variables, jnp.zeros((2, 96, 96, 1))).compile().as_text()
    bodies = _ynn_fusion_bodies(hlo)
    assert bodies, "no YNNPACK fusion: the project's XLA flags are not in effect"
    # 3 * 9 taps and the linear layer, one product each (the others: YNNPACK's reductions)
    assert sorted(n for b in bodies if (n := b.count(" dot("))) == [1] * 28
    assert "convolution(" not in hlo


@pytest.mark.slow
def test_model_gradients_equal_with_and_without_onednn(monkeypatch):
    """DenseNet's loss and gradients (BatchNorm, concatenations, 1x1 and strided layers) are the
    same, within float32 rounding, with oneDNN's convolutions and with XLA's."""
    from flaxcnn import models
    from flaxcnn.models import layers

    model = models.create("densenet")
    x = jax.random.uniform(jax.random.key(1), (4, 32, 32, 1))
    variables = jax.jit(partial(model.init, train=False))(jax.random.key(0), x)

    def loss(params):
        v = {"params": params, "batch_stats": variables["batch_stats"]}
        return model.apply(v, x, train=True, mutable=["batch_stats"])[0].sum()

    got = jax.jit(jax.value_and_grad(loss))(variables["params"])
    monkeypatch.setattr(layers, "_ONEDNN", False)
    want = jax.jit(jax.value_and_grad(loss))(variables["params"])
    # Some leaves are zero up to rounding (a bias before BatchNorm): one scale for all. The
    # largest leaf is the stem's kernel gradient (61 here), whose entries sum 1024 products
    # each, in another order in oneDNN: where they cancel, up to 2e-3 apart. Against float64
    # (XLA's convolutions), the float32 gradients are 0.8e-5 (XLA) to 1.9e-5 (oneDNN) of that
    # scale off, so two float32 runs may be 3e-5 apart.
    scale = max(float(jnp.max(jnp.abs(r))) for r in jax.tree.leaves(want))
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, r, rtol=2e-4, atol=4e-5 * scale)


def test_opt_out_keeps_xla(tmp_path):
    """FLAXCNN_NO_ONEDNN: not available, says why, and the models still train on XLA's
    convolutions."""
    code = (
        "import jax, jax.numpy as jnp\n"
        "from flaxcnn import models, onednn, training\n"
        "assert not onednn.available() and 'FLAXCNN_NO_ONEDNN' in onednn.reason()\n"
        "m = models.create('lenet_bn')\n"
        "s = training.create_train_state(m, jax.random.key(0), 28, training.sgd(0.9))\n"
        "f = jax.jit(training.train_step)\n"
        "txt = f.lower(s, jnp.zeros((2, 28, 28, 1)), jnp.zeros(2, jnp.int32)).as_text()\n"
        "assert 'flaxcnn_onednn' not in txt\n"
        "print('ok')\n")
    env = dict(os.environ, FLAXCNN_NO_ONEDNN="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


def test_build_errors_name_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.delenv(onednn.PREFIX_ENV, raising=False)
    monkeypatch.setattr(onednn, "_HEADER_DIRS", (str(tmp_path),))
    with pytest.raises(RuntimeError, match="no oneDNN headers"):
        onednn.build()
    monkeypatch.setenv(onednn.PREFIX_ENV, str(tmp_path / "dnnl"))
    with pytest.raises(RuntimeError, match=f"no oneDNN headers under .*{tmp_path}/dnnl"):
        onednn.build()
    monkeypatch.setattr(onednn, "_compiler", lambda: None)
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        onednn.build()


def test_another_onednn_by_prefix(monkeypatch, tmp_path):
    """FLAXCNN_ONEDNN_PREFIX: compiled against that installation's headers and linked to its
    library by rpath, under a name of its own (here a prefix that mirrors the system's, its
    library in lib64/ as CMake installs it on some distributions)."""
    monkeypatch.delenv(onednn.PREFIX_ENV, raising=False)
    include = onednn._dnnl_include()
    lib = next(os.path.dirname(p) for p in ("/usr/lib/x86_64-linux-gnu/libdnnl.so",
                                            "/usr/lib/aarch64-linux-gnu/libdnnl.so",
                                            "/usr/lib/libdnnl.so") if os.path.exists(p))
    (tmp_path / "include").symlink_to(include)
    (tmp_path / "lib64").symlink_to(lib)
    monkeypatch.setenv("FLAXCNN_CACHE_DIR", str(tmp_path / "cache"))
    default = onednn.build()
    monkeypatch.setenv(onednn.PREFIX_ENV, str(tmp_path))
    built = onednn.build()
    assert built != default and built.parent == default.parent
    dynamic = subprocess.run(["readelf", "-d", str(built)], capture_output=True, text=True,
                             check=True).stdout
    assert f"[{tmp_path}/lib64]" in dynamic and "libdnnl.so" in dynamic
    assert f"[{tmp_path}/lib64]" not in subprocess.run(["readelf", "-d", str(default)],
                                                     capture_output=True, text=True).stdout


class _OneDNNInceptions(nn.Module):
    """Two small Inception blocks (their convolutions all oneDNN's, as GoogLeNet's), then a
    classifier."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(layers.Conv(32, 3, padding=1)(x))
        x = googlenet.Inception(16, (16, 32), (8, 16), 16)(x)
        x = googlenet.Inception(16, (16, 32), (8, 16), 16)(x)
        return layers.Dense(10)(x.mean(axis=(1, 2)))


def test_concurrent_convolutions_in_inception_blocks():
    """XLA:CPU runs independent custom calls at the same time (an Inception block's four
    branches), so each call uses its own thread's scratch memory. With oneDNN's shared
    scratchpad the second training step of GoogLeNet crashed (checked against
    that build; the test bites only where XLA overlaps the branches, as on this 2-core machine).
    Shared scratch memory would also make the steps nondeterministic: the same three steps from
    the same state, run twice, must give the same losses, and learn."""
    from flaxcnn import training

    model = _OneDNNInceptions()
    x = jax.random.uniform(jax.random.key(1), (16, 24, 24, 1))
    y = jnp.arange(16, dtype=jnp.int32) % 10
    step = jax.jit(training.train_step)
    init = jax.jit(lambda: training.create_train_state(model, jax.random.key(0), 24,
                                                       training.sgd(0.1)))
    hlo = step.lower(init(), x, y).compile().as_text()
    # six per block (the one-channel first layer is ops.conv_one_channel), with their ReLUs
    assert hlo.count("custom_call_target=\"flaxcnn_onednn_conv_forward_bias_relu\"") == 2 * 6

    def losses():
        state, out = init(), []
        for _ in range(3):
            state, m = step(state, x, y)
            out.append(float(m["loss"]))
        return out

    first = losses()
    assert losses() == first
    assert np.all(np.isfinite(first)) and first[-1] < first[0], first


@pytest.mark.slow
def test_conv_then_relu_runs_as_one_call(monkeypatch):
    """`layers.Sequential` and `run_layers` run a `Conv` followed by `nn.relu` as one oneDNN call
    (NiN's 12 layers, AlexNet's 5; at these small sides their 384-output layers would be
    `ops.conv_taps`, which the test turns off), with the parameter paths of `nn.Sequential`
    and, within float32 rounding, the logits and gradients of the layers run one by one. While
    intermediates are recorded (`models.summary`), each layer runs, and is recorded, alone."""
    from flaxcnn import models

    fused = 'custom_call_target="flaxcnn_onednn_conv_forward_bias_relu"'
    monkeypatch.setattr(layers, "_TAPS_MAX_SIDE", 0)
    for name, side, calls in (("nin", 67, 12), ("alexnet", 65, 5)):
        model = models.create(name)
        x = jax.random.uniform(jax.random.key(1), (2, side, side, 1))
        variables = random_variables(model, x.shape)
        if name == "nin":
            assert set(variables["params"]["Sequential_0"]) == {"layers_0", "layers_2",
                                                               "layers_4"}

        def run(model, variables, x):
            infer = jax.jit(lambda v, x: model.apply(v, x, train=False))
            grad = jax.jit(jax.grad(lambda p, x: model.apply({"params": p}, x).sum()))
            return (infer(variables, x), grad(variables["params"], x),
                    infer.lower(variables, x).compile().as_text())

        logits, grads, hlo = run(model, variables, x)
        assert hlo.count(fused) == calls, name
        monkeypatch.setattr(layers, "_ONEDNN_RELU", False)
        want, want_grads, hlo = run(model, variables, x)
        monkeypatch.setattr(layers, "_ONEDNN_RELU", True)
        assert fused not in hlo
        for a, b in zip(jax.tree.leaves((logits, grads)), jax.tree.leaves((want, want_grads)),
                        strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * float(jnp.max(jnp.abs(b))))

    _, recorded = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"])
                          )(variables, x)
    first = recorded["intermediates"]["00:Conv2d:Conv_0"][0]  # AlexNet's, before its ReLU
    assert float(first.min()) < 0
