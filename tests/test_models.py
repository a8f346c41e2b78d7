"""The Flax networks against the book's PyTorch code (`flaxcnn.torch_ref`, torch 2.13 on CPU).

For every network, with PyTorch's weights ported by `flaxcnn.porting`:
- eval-mode logits, train-mode logits (batch statistics; dropout 0 on both sides), the BatchNorm
  running statistics after one training forward, and the gradient of the mean cross-entropy for
  every parameter equal PyTorch's;
- trainable parameter counts equal the reference table, and every top-level layer's output
  shape (and parameter count) equals the book's print-out;
- wrong input (rank, channels, a side under `min_side`) raises ValueError, and `min_side` is
  exactly the smallest side the book's PyTorch network runs at.
Plus the scratch BatchNorm against `flax.linen.BatchNorm`, PyTorch's unbiased running variance,
and the porting module itself.

Error measure: relative = max|a - b| / max|b|, b = PyTorch, over a whole array (per parameter for
gradients), all in float32. Tolerances: 1e-5 for logits and statistics, 1e-4 for gradients.
Measured: logits and statistics 1e-7..5e-6, gradients 1e-6..3e-5, also for the sigmoid/BN
LeNets; PyTorch's own float32 gradients differ from its float64 ones by 1e-5 at batch 4, which
is the floor. Gradients that vanish in exact arithmetic (a bias feeding a training-mode
BatchNorm, which subtracts the batch mean; see `vanishing`) are float32 noise on both sides, so
for them the test is that both are negligible against the network's largest gradient.
"""

import math
import re
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import abstract_variables, random_variables

from flaxcnn import models

torch = pytest.importorskip("torch")
torch_ref = pytest.importorskip("flaxcnn.torch_ref")
porting = pytest.importorskip("flaxcnn.porting")

NAMES = models.names()
LOGITS_RTOL = 1e-5
STATS_RTOL = 1e-5
GRAD_RTOL = 1e-4
# A vanishing gradient must be below this fraction of the network's largest gradient, on both
# sides (measured: at most 7e-5; a wrong one is of the order of the others).
VANISHING_ATOL = 1e-3

# The reference table (PyTorch's trainable parameter counts). vgg11, the full-width VGG-11, is
# not in it: its count is PyTorch's for the book's `vgg(conv_arch)` on 1 channel.
PARAM_COUNTS = {
    "alexnet": 46_764_746,
    "vgg": 43_093_322,
    "vgg11": 128_806_154,
    "nin": 1_992_166,
    "googlenet": 5_977_530,
    "lenet_bn_scratch": 44_878,
    "lenet_bn": 44_878,
    "resnet18": 11_178_378,
    "densenet": 758_226,
}

# (network, side, batch) for the numeric comparisons: the book's sides, except the full VGG-11
# (the same layers at 32, where its head takes 512 inputs instead of 25088).
NUMERIC_CASES = {
    "alexnet": (224, 2),
    "vgg": (224, 2),
    "vgg11": (32, 2),
    "nin": (224, 2),
    "googlenet": (96, 2),
    "lenet_bn_scratch": (28, 4),
    "lenet_bn": (28, 4),
    "resnet18": (96, 2),
    "densenet": (96, 2),
}


def _rows(*spec):
    """[(layer class, NCHW shape without the batch)] from "Name:C,H,W" strings."""
    out = []
    for s in spec:
        name, dims = s.split(":")
        out.append((name, tuple(int(d) for d in dims.split(","))))
    return out


_FC_HEAD = ("Linear:4096", "ReLU:4096", "Dropout:4096", "Linear:4096", "ReLU:4096",
            "Dropout:4096", "Linear:10")
_LENET = _rows(
    "Conv2d:6,24,24", "BN:6,24,24", "Sigmoid:6,24,24", "AvgPool2d:6,12,12",
    "Conv2d:16,8,8", "BN:16,8,8", "Sigmoid:16,8,8", "AvgPool2d:16,4,4", "Flatten:256",
    "Linear:120", "BN1:120", "Sigmoid:120", "Linear:84", "BN1:84", "Sigmoid:84", "Linear:10",
)


def _lenet(bn2d, bn1d):
    return [({"BN": bn2d, "BN1": bn1d}.get(n, n), s) for n, s in _LENET]


# The book's `for layer in net: X = layer(X); print(layer.__class__.__name__, X.shape)`.
BOOK_SHAPES = {
    ("alexnet", 224): _rows(
        "Conv2d:96,54,54", "ReLU:96,54,54", "MaxPool2d:96,26,26",
        "Conv2d:256,26,26", "ReLU:256,26,26", "MaxPool2d:256,12,12",
        "Conv2d:384,12,12", "ReLU:384,12,12", "Conv2d:384,12,12", "ReLU:384,12,12",
        "Conv2d:256,12,12", "ReLU:256,12,12", "MaxPool2d:256,5,5", "Flatten:6400", *_FC_HEAD,
    ),
    ("vgg", 224): _rows(
        "Sequential:16,112,112", "Sequential:32,56,56", "Sequential:64,28,28",
        "Sequential:128,14,14", "Sequential:128,7,7", "Flatten:6272", *_FC_HEAD,
    ),
    ("vgg11", 224): _rows(
        "Sequential:64,112,112", "Sequential:128,56,56", "Sequential:256,28,28",
        "Sequential:512,14,14", "Sequential:512,7,7", "Flatten:25088", *_FC_HEAD,
    ),
    ("nin", 224): _rows(
        "Sequential:96,54,54", "MaxPool2d:96,26,26", "Sequential:256,26,26",
        "MaxPool2d:256,12,12", "Sequential:384,12,12", "MaxPool2d:384,5,5", "Dropout:384,5,5",
        "Sequential:10,5,5", "AdaptiveAvgPool2d:10,1,1", "Flatten:10",
    ),
    ("googlenet", 96): _rows(
        "Sequential:64,24,24", "Sequential:192,12,12", "Sequential:480,6,6",
        "Sequential:832,3,3", "Sequential:1024", "Linear:10",
    ),
    ("lenet_bn_scratch", 28): _lenet("BatchNorm", "BatchNorm"),
    ("lenet_bn", 28): _lenet("BatchNorm2d", "BatchNorm1d"),
    ("resnet18", 96): _rows(
        "Sequential:64,24,24", "Sequential:64,24,24", "Sequential:128,12,12",
        "Sequential:256,6,6", "Sequential:512,3,3", "AdaptiveAvgPool2d:512,1,1",
        "Flatten:512", "Linear:10",
    ),
    # The book prints ResNet at 224.
    ("resnet18", 224): _rows(
        "Sequential:64,56,56", "Sequential:64,56,56", "Sequential:128,28,28",
        "Sequential:256,14,14", "Sequential:512,7,7", "AdaptiveAvgPool2d:512,1,1",
        "Flatten:512", "Linear:10",
    ),
    ("densenet", 96): _rows(
        "Sequential:64,24,24", "DenseBlock:192,24,24", "Sequential:96,12,12",
        "DenseBlock:224,12,12", "Sequential:112,6,6", "DenseBlock:240,6,6",
        "Sequential:120,3,3", "DenseBlock:248,3,3", "BatchNorm2d:248,3,3", "ReLU:248,3,3",
        "AdaptiveAvgPool2d:248,1,1", "Flatten:248", "Linear:10",
    ),
}


@pytest.fixture(scope="module", autouse=True)
def _cpu_float32():
    """Two torch threads (a shared 2-core machine), float32 on both sides."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    x64 = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", False)
    yield
    jax.config.update("jax_enable_x64", x64)
    torch.set_num_threads(threads)


def rel_err(a, b):
    """max|a - b| / max|b| (b the reference), in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / np.abs(b).max())


def nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def flax_model(name, **fields):
    cls = models.create(name)
    if "dropout_rate" in getattr(cls, "__dataclass_fields__", {}):
        fields.setdefault("dropout_rate", 0.0)
    return models.create(name, **fields)


def flat(tree):
    return {tuple(k.key for k in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def vanishing(name, params):
    """The parameter paths whose gradients are zero in exact arithmetic at the book's
    initialisation.

    - The bias of a Conv2d/Linear whose every consumer is a training-mode BatchNorm: the batch
      mean absorbs it (LeNets: all but the last Linear; ResNet: the stem conv and each
      Residual's conv1/conv2, not the 1x1 shortcut conv3, which is added to the BN output;
      DenseNet: every conv, since concatenated channels only ever meet BatchNorms).
    - DenseNet's stem BN scale: with beta = 0, relu(gamma * x) = gamma * relu(x), max-pooled
      per channel, and each channel then only meets BatchNorms, which undo the scale (up to eps).
    """
    paths = flat(params)
    out = set()
    for p in paths:
        kernel = paths.get((*p[:-1], "kernel"))
        if name.startswith("lenet") and p in {
                ("Conv_0", "bias"), ("Conv_1", "bias"), ("Dense_0", "bias"), ("Dense_1", "bias")}:
            out.add(p)
        if name == "resnet18" and p[-1] == "bias" and (
                p == ("Sequential_0", "layers_0", "bias") or p[-2] in ("conv1", "conv2")):
            out.add(p)
        if name == "densenet" and p[-1] == "bias" and kernel is not None and kernel.ndim == 4:
            out.add(p)
    if name == "densenet":
        out.add(("Sequential_0", "layers_1", "scale"))
    assert out <= set(paths)
    return out


# --- shapes, counts, input checks (abstract evaluation only: free) ----------------------------

def test_same_names():
    assert torch_ref.names() == NAMES
    assert set(PARAM_COUNTS) == set(NAMES) == set(NUMERIC_CASES)


@pytest.mark.parametrize("name", NAMES)
def test_param_counts(name):
    side = torch_ref.book_side(name)
    model = models.create(name)
    variables = abstract_variables(model, (1, side, side, 1))
    assert models.count_params(variables["params"]) == PARAM_COUNTS[name]
    with torch.device("meta"):
        net = torch_ref.create(name, init=False)
    assert sum(p.numel() for p in net.parameters() if p.requires_grad) == PARAM_COUNTS[name]


@pytest.mark.parametrize("name,side", sorted(BOOK_SHAPES))
def test_layer_shapes(name, side):
    """Every top-level layer: class name, output shape and parameters, Flax and PyTorch."""
    expected = BOOK_SHAPES[name, side]
    rows = models.summary(models.create(name), side)
    as_nchw = [
        (layer, tuple(s[1:]) if len(s) != 4 else (s[3], s[1], s[2])) for layer, s, _ in rows
    ]
    assert as_nchw == expected
    assert [(layer, s[1:]) for layer, s in torch_ref.summary(name, side)] == expected
    with torch.device("meta"):
        net = torch_ref.create(name, side, init=False)
    assert [n for *_, n in rows] == [sum(p.numel() for p in layer.parameters()) for layer in net]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_min_side(name):
    """`min_side` runs (no zero-sized layer on the way), one pixel less raises ValueError, and
    both agree with the book's PyTorch network."""
    model = models.create(name)
    side = model.min_side
    rows = models.summary(model, side)
    assert all(all(d > 0 for d in shape) for _, shape, _ in rows), rows
    assert rows[-1][1] == (1, 10)
    with pytest.raises(ValueError, match=rf"at least {side} pixels, got {side - 1}x{side - 1}"):
        models.summary(model, side - 1)
    assert torch_ref.summary(name, side)[-1][1] == (1, 10)
    if side > 1:
        with pytest.raises(RuntimeError):
            torch_ref.summary(name, side - 1)


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_raises(name):
    model = models.create(name)
    side = torch_ref.book_side(name)

    init = partial(abstract_variables, model)

    with pytest.raises(ValueError, match=r"rank 4 \(N, H, W, 1\), got shape \(28, 28, 1\)"):
        init((28, 28, 1))
    with pytest.raises(ValueError, match=r"rank 4"):
        init((1, 1, side, side, 1))
    with pytest.raises(ValueError, match=r"1 input channel .* with 3 channels"):
        init((1, side, side, 3))
    with pytest.raises(ValueError, match=r"1 input channel"):  # NCHW by mistake
        init((2, 1, side, side))


# --- numeric equivalence with PyTorch ----------------------------------------------------------

@pytest.fixture(scope="module", params=NAMES)
def case(request):
    """One network at its NUMERIC_CASES side: PyTorch's and Flax's eval logits, train logits,
    gradients and statistics after one training step from the same (ported) weights."""
    name = request.param
    side, batch = NUMERIC_CASES[name]
    torch.manual_seed(0)
    net = torch_ref.create(name, side, dropout_rate=0.0)
    model = flax_model(name)
    shape = (batch, side, side, 1)
    pairs, _ = porting.match_layers(net, model, shape)
    variables = porting.torch_to_flax(net, model, shape, pairs=pairs)
    x = torch.rand(batch, 1, side, side)
    y = torch.randint(0, 10, (batch,))
    xj, yj = jnp.asarray(nhwc(x)), jnp.asarray(y.numpy())

    net.eval()
    with torch.no_grad():  # the scratch BatchNorm's eval mode (torch.is_grad_enabled)
        torch_eval = net(x).numpy()
    flax_eval = jax.jit(partial(model.apply, train=False))(variables, xj)

    net.train()
    out = net(x)
    torch.nn.functional.cross_entropy(out, y).backward()
    torch_grads = porting.torch_grads_to_flax(net, model, shape, pairs=pairs)["params"]
    torch_stats = porting.torch_to_flax(net, model, shape, pairs=pairs).get("batch_stats", {})

    state = {k: v for k, v in variables.items() if k != "params"}

    def loss(params):
        logits, updates = model.apply(
            {"params": params, **state}, xj, train=True, mutable=["batch_stats"]
        )
        ce = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(batch), yj])
        return ce, (logits, updates.get("batch_stats", {}))

    (_, (flax_train, flax_stats)), flax_grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        variables["params"]
    )
    return dict(
        name=name, batch=batch, pairs=pairs, torch_eval=torch_eval, flax_eval=flax_eval,
        torch_train=out.detach().numpy(), flax_train=flax_train,
        torch_grads=torch_grads, flax_grads=flax_grads,
        torch_stats=torch_stats, flax_stats=flax_stats,
    )


def test_eval_logits(case):
    assert rel_err(case["flax_eval"], case["torch_eval"]) < LOGITS_RTOL


def test_train_logits(case):
    assert rel_err(case["flax_train"], case["torch_train"]) < LOGITS_RTOL
    # Training mode is not eval mode for the BatchNorm networks: the test sees the difference.
    if case["torch_stats"]:
        assert rel_err(case["torch_train"], case["torch_eval"]) > 1e-2


def test_batch_stats(case):
    """Running statistics after one training forward. PyTorch's nn.BatchNorm* tracks the
    unbiased batch variance, Flax (and both scratch layers) the biased one: the Flax variance is
    converted with `porting.torch_batch_stats` (t = c*v + 0.9*(1 - c), c = m/(m-1),
    m = values per channel) before comparing; the means need no conversion."""
    torch_stats, flax_stats = flat(case["torch_stats"]), flat(case["flax_stats"])
    assert set(torch_stats) == set(flax_stats)
    if not torch_stats:  # no BatchNorm in this network
        return
    converted = flat(porting.torch_batch_stats(case["flax_stats"], case["pairs"], case["batch"]))
    errors = {p: rel_err(converted[p], torch_stats[p]) for p in torch_stats}
    assert max(errors.values()) < STATS_RTOL, errors
    raw = max(rel_err(flax_stats[p], torch_stats[p]) for p in torch_stats)
    if case["name"] == "lenet_bn_scratch":
        assert raw < STATS_RTOL  # the book's layer tracks the biased variance, as Flax does
    else:
        assert raw > 1e-3  # without the conversion the variances differ


def test_gradients(case):
    torch_grads, flax_grads = flat(case["torch_grads"]), flat(case["flax_grads"])
    assert set(torch_grads) == set(flax_grads)
    zero = vanishing(case["name"], case["flax_grads"])
    largest = max(np.abs(np.asarray(g)).max() for g in torch_grads.values())
    errors = {}
    for p, g in flax_grads.items():
        if p in zero:
            for side in (g, torch_grads[p]):
                assert np.abs(np.asarray(side)).max() < VANISHING_ATOL * largest, p
        else:
            errors[p] = rel_err(g, torch_grads[p])
    worst = max(errors, key=errors.get)
    assert errors[worst] < GRAD_RTOL, (worst, errors[worst])


# --- BatchNorm: the scratch layer, flax.linen.BatchNorm and PyTorch's running variance ---------

@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 5, 7)])
def test_scratch_batch_norm_matches_linen(shape):
    """Same outputs in both modes and the same statistics, over three training steps on
    off-centre data (where a one-pass variance would lose digits)."""
    c = shape[-1]
    scratch = models.BatchNorm(c, num_dims=len(shape))
    linen = nn.BatchNorm(momentum=0.9, epsilon=1e-5, use_fast_variance=False)
    rng = np.random.default_rng(0)
    xs = [jnp.asarray(3.0 + 0.5 * rng.standard_normal(shape), jnp.float32) for _ in range(3)]
    vs = scratch.init(jax.random.key(0), xs[0])
    vl = linen.init(jax.random.key(0), xs[0], use_running_average=True)
    gamma = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
    beta = jnp.asarray(rng.standard_normal(c), jnp.float32)
    vs["params"] = {"gamma": gamma, "beta": beta}
    vl["params"] = {"scale": gamma, "bias": beta}
    for x in xs:
        ys, us = scratch.apply(vs, x, mutable=["batch_stats"])
        yl, ul = linen.apply(vl, x, use_running_average=False, mutable=["batch_stats"])
        assert rel_err(ys, yl) < 1e-6
        vs = {**vs, **us}
        vl = {**vl, **ul}
        assert rel_err(vs["batch_stats"]["moving_mean"], vl["batch_stats"]["mean"]) < 1e-6
        assert rel_err(vs["batch_stats"]["moving_var"], vl["batch_stats"]["var"]) < 1e-6
    eval_scratch = models.BatchNorm(c, num_dims=len(shape), use_running_average=True)
    assert rel_err(eval_scratch.apply(vs, xs[0]),
                   linen.apply(vl, xs[0], use_running_average=True)) < 1e-6
    axes = tuple(range(len(shape) - 1))
    assert np.allclose(ys.mean(axes), beta, atol=1e-5)  # normalised on batch statistics


@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 5, 7)])
def test_batch_norm2d_is_linen_batch_norm(shape):
    """`models.BatchNorm2d` (ResNet's and DenseNet's) is `flax.linen.BatchNorm` with PyTorch's
    settings: the same variables, outputs, running statistics over three steps and gradients
    (its CPU backward pass is written out), in both modes; on bfloat16 input both compute in
    float32 and `dtype` sets the output's."""
    c = shape[-1]
    ours = models.BatchNorm2d()
    linen = nn.BatchNorm(momentum=0.9, epsilon=1e-5, use_fast_variance=False)
    rng = np.random.default_rng(0)
    xs = [jnp.asarray(3.0 + 0.5 * rng.standard_normal(shape), jnp.float32) for _ in range(3)]
    vo = ours.init(jax.random.key(0), xs[0])
    vl = linen.init(jax.random.key(0), xs[0], use_running_average=True)
    assert jax.tree_util.tree_structure(vo) == jax.tree_util.tree_structure(vl)
    assert all(map(np.array_equal, jax.tree_util.tree_leaves(vo), jax.tree_util.tree_leaves(vl)))
    params = {"scale": jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32),
              "bias": jnp.asarray(rng.standard_normal(c), jnp.float32)}
    vo, vl = {**vo, "params": params}, {**vl, "params": params}
    g = jnp.asarray(rng.standard_normal(shape), jnp.float32)

    def step(apply, variables, x):
        def loss(params, x):
            y, upd = apply({**variables, "params": params}, x)
            return jnp.vdot(y, g), (y, upd["batch_stats"])

        return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(variables["params"], x)

    for x in xs:
        (gpo, gxo), (yo, so) = step(partial(ours.apply, mutable=["batch_stats"]), vo, x)
        (gpl, gxl), (yl, sl) = step(partial(linen.apply, use_running_average=False,
                                            mutable=["batch_stats"]), vl, x)
        assert rel_err(yo, yl) < 1e-6
        assert rel_err(so["mean"], sl["mean"]) < 1e-6 and rel_err(so["var"], sl["var"]) < 1e-6
        assert rel_err(gxo, gxl) < 1e-5
        assert rel_err(gpo["scale"], gpl["scale"]) < 1e-5
        assert rel_err(gpo["bias"], gpl["bias"]) < 1e-6
        vo, vl = {**vo, "batch_stats": so}, {**vl, "batch_stats": sl}
    evaluate = models.BatchNorm2d(use_running_average=True)
    assert rel_err(evaluate.apply(vo, xs[0]),
                   linen.apply(vl, xs[0], use_running_average=True)) < 1e-6
    x16 = xs[0].astype(jnp.bfloat16)  # float32 arithmetic on bfloat16 input, as Flax's
    for dtype in (jnp.bfloat16, None):
        yo, so = models.BatchNorm2d(dtype=dtype).apply(vo, x16, mutable=["batch_stats"])
        yl, sl = nn.BatchNorm(momentum=0.9, epsilon=1e-5, use_fast_variance=False,
                              dtype=dtype).apply(vl, x16, use_running_average=False,
                                                 mutable=["batch_stats"])
        assert yo.dtype == yl.dtype == (dtype or jnp.float32)
        assert rel_err(yo, yl) < 1e-6
        assert so["batch_stats"]["var"].dtype == jnp.float32
        assert rel_err(so["batch_stats"]["var"], sl["batch_stats"]["var"]) < 1e-6


def test_lenet_scratch_and_builtin_agree():
    """The two LeNets with the same weights: same logits, statistics and gradients."""
    x = jax.random.uniform(jax.random.key(1), (4, 28, 28, 1))
    builtin, scratch = models.create("lenet_bn"), models.create("lenet_bn_scratch")
    vb = random_variables(builtin, x.shape)
    rename = {"scale": "gamma", "bias": "beta", "mean": "moving_mean", "var": "moving_var"}
    vs = jax.tree_util.tree_map(lambda a: a, vb)
    for col in ("params", "batch_stats"):
        for layer, leaves in vs[col].items():
            if layer.startswith("BatchNorm"):
                vs[col][layer] = {rename[k]: v for k, v in leaves.items()}
    assert jax.tree_util.tree_structure(vs) == jax.tree_util.tree_structure(
        jax.eval_shape(lambda x: scratch.init(jax.random.key(0), x), x))

    def run(model, variables):
        def loss(params):
            logits, upd = model.apply({**variables, "params": params}, x, train=True,
                                      mutable=["batch_stats"])
            return jnp.sin(logits).sum(), (logits, upd["batch_stats"])

        step = jax.jit(jax.value_and_grad(loss, has_aux=True))
        (_, (logits, stats)), grads = step(variables["params"])
        return logits, stats, grads, jax.jit(partial(model.apply, train=False))(variables, x)

    def renamed(tree):
        return {(*p[:-1], rename.get(p[-1], p[-1]) if p[0].startswith("BatchNorm") else p[-1]): v
                for p, v in flat(tree).items()}

    lb, sb, gb, eb = run(builtin, vb)
    ls, ss, gs, es = run(scratch, vs)
    assert rel_err(ls, lb) < 1e-5 and rel_err(es, eb) < 1e-5
    ss, gs = flat(ss), flat(gs)
    for p, v in renamed(sb).items():
        assert rel_err(ss[p], v) < 1e-5, p
    zero = vanishing("lenet_bn", vs["params"])
    for p, v in renamed(gb).items():
        if p not in zero:
            assert rel_err(gs[p], v) < 1e-4, p


def test_batch_norm2d_on_parts_is_on_their_concatenation():
    """A list of feature maps stands for their concatenation (DenseNet's blocks): the same
    variables, outputs (joined by `concat_relu`), running statistics and gradients, in both
    modes; an array still gives an array."""
    from flaxcnn.models.layers import concat_relu

    rng = np.random.default_rng(0)
    parts = [jnp.asarray(1.0 + rng.standard_normal((3, 4, 4, c)), jnp.float32) for c in (5, 2, 3)]
    whole = jnp.concatenate(parts, axis=-1)
    bn = models.BatchNorm2d()
    variables = bn.init(jax.random.key(0), whole)
    assert jax.tree_util.tree_map(jnp.shape, bn.init(jax.random.key(0), parts)) == (
        jax.tree_util.tree_map(jnp.shape, variables))
    variables = {**variables, "params": {
        "scale": jnp.asarray(rng.uniform(0.5, 1.5, 10), jnp.float32),
        "bias": jnp.asarray(rng.standard_normal(10), jnp.float32)}}
    g = jnp.asarray(rng.standard_normal(whole.shape), jnp.float32)

    def loss(params, x):
        y, upd = bn.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return jnp.vdot(concat_relu(y), g), (concat_relu(y), upd["batch_stats"])

    grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
    (gp_whole, gx_whole), (y_whole, s_whole) = grad(variables["params"], whole)
    (gp_parts, gx_parts), (y_parts, s_parts) = grad(variables["params"], parts)
    assert isinstance(gx_parts, list) and [p.shape for p in gx_parts] == [p.shape for p in parts]
    assert rel_err(y_parts, y_whole) < 1e-6
    for k in ("mean", "var"):
        assert rel_err(s_parts[k], s_whole[k]) < 1e-6
    assert rel_err(jnp.concatenate(gx_parts, axis=-1), gx_whole) < 1e-5
    for k in ("scale", "bias"):
        assert rel_err(gp_parts[k], gp_whole[k]) < 1e-5
    evaluate = models.BatchNorm2d(use_running_average=True)
    out = evaluate.apply({**variables, "batch_stats": s_whole}, parts)
    assert isinstance(out, list) and len(out) == 1
    assert rel_err(out[0], evaluate.apply({**variables, "batch_stats": s_whole}, whole)) < 1e-6
    each = models.BatchNorm2d(use_running_average=True, eval_parts=True).apply(
        {**variables, "batch_stats": s_whole}, parts)
    assert [p.shape for p in each] == [p.shape for p in parts]
    assert rel_err(jnp.concatenate(each, axis=-1), out[0]) < 1e-6


def test_dense_block_reduces_over_each_map_not_their_concatenations(monkeypatch):
    """With `BatchNorm2d`, `DenseBlock` gives its conv blocks the list of feature maps: the same
    outputs, statistics and gradients as concatenating first (the book's order), while no
    reduction of the compiled training pass spans a concatenation (XLA merges the identical
    statistics of a map that several layers normalise)."""
    from flaxcnn.models import densenet

    block = models.DenseBlock(3, 4)
    x = jax.random.uniform(jax.random.key(1), (2, 6, 6, 5))
    variables = block.init(jax.random.key(0), x)

    def train(params, x):
        y, upd = block.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return jnp.sum(y * jnp.arange(y.shape[-1])), (y, upd["batch_stats"])

    def run():
        f = jax.jit(jax.grad(train, argnums=(0, 1), has_aux=True))
        reduced = {int(n) for n in re.findall(r"f32\[(\d+)\]\{0\} reduce\(",
                                               f.lower(variables["params"], x).compile().as_text())}
        return f(variables["params"], x), reduced

    (grads, (y, stats)), reduced = run()
    monkeypatch.setattr(densenet, "takes_parts", lambda norm: False)
    (book_grads, (book_y, book_stats)), book_reduced = run()
    assert reduced == {5, 4}  # the input's channels, a conv block's (and its bias gradient's)
    assert book_reduced == {5, 9, 13, 4}
    assert rel_err(y, book_y) < 1e-6
    assert rel_err(grads[1], book_grads[1]) < 1e-5
    for got, want in ((stats, book_stats), (grads[0], book_grads[0])):
        for path, leaf in flat(want).items():
            assert rel_err(flat(got)[path], leaf) < 1e-5, path


def test_transition_block_pools_before_its_convolution(monkeypatch):
    """`transition_block` pools before its 1x1 convolution (`PooledConv`): the same variables,
    outputs, statistics and gradients as the book's order, for a quarter of the convolution's
    products; DenseNet passes its `pool_first` on."""
    from flaxcnn.models import densenet, layers

    monkeypatch.setattr(layers, "_ONEDNN", False)  # XLA's convolutions: FLOPs it can count

    class Wrap(nn.Module):
        pool_first: bool

        @nn.compact
        def __call__(self, x):
            return models.transition_block(10, pool_first=self.pool_first)(x)

    x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 23))
    variables = Wrap(True).init(jax.random.key(0), x)
    assert jax.tree_util.tree_map(jnp.shape, Wrap(False).init(jax.random.key(0), x)) == (
        jax.tree_util.tree_map(jnp.shape, variables))
    runs = {}
    for pool_first in (True, False):
        def loss(params, x, pool_first=pool_first):
            y, upd = Wrap(pool_first).apply({**variables, "params": params}, x,
                                            mutable=["batch_stats"])
            return jnp.sum(y * jnp.arange(10)), (y, upd["batch_stats"])

        f = jax.jit(partial(loss, x=x))
        flops = f.lower(variables["params"]).compile().cost_analysis()["flops"]
        runs[pool_first] = flops, jax.grad(loss, has_aux=True)(variables["params"], x)
    (flops, (grads, (y, stats))), (book_flops, (book_grads, (book_y, book_stats))) = (
        runs[True], runs[False])
    # 3/4 of the convolution's 2 N H W C K, less the pool's extra sums over 23 channels, not 10
    assert book_flops - flops > 0.6 * 2 * x.size * 10
    assert rel_err(y, book_y) < 1e-6
    for got, want in ((stats, book_stats), (grads, book_grads)):
        for path, leaf in flat(want).items():
            assert rel_err(flat(got)[path], leaf) < 1e-5, path

    def convs(model):
        seen = set()

        def record(f, args, kwargs, context):
            seen.add(type(context.module))
            return f(*args, **kwargs)

        with nn.intercept_methods(record):
            jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
        return seen

    assert densenet.PooledConv in convs(models.create("densenet"))
    assert densenet.PooledConv not in convs(models.create("densenet", pool_first=False))


def test_densenet_joins_a_blocks_maps_after_its_transition_pools_them(monkeypatch):
    """DenseNet's dense blocks hand their transitions the list of feature maps, which are
    normalised, ReLU-ed and pooled one by one and joined at a quarter of the size: no
    concatenation of a block's full output before the last block, in training or evaluation;
    the same logits, statistics and gradients as joining them at the block's end."""
    from flaxcnn import ops
    from flaxcnn.models import densenet

    model = models.create("densenet", num_convs_in_dense_blocks=(2, 2, 1), growth_rate=8)
    x = jax.random.uniform(jax.random.key(1), (4, 32, 32, 1))
    variables = model.init(jax.random.key(0), x)
    y = jnp.array([3, 7, 0, 9])

    def loss(params, train):
        logits, upd = model.apply({**variables, "params": params}, x, train=train,
                                  mutable=["batch_stats"])
        return jnp.sum(jax.nn.log_softmax(logits)[jnp.arange(4), y]), (logits, upd)

    def run():
        joined = []

        def record(concat):
            def recording(xs):
                out = concat(xs)
                joined.append(out.shape)
                return out
            return recording

        with monkeypatch.context() as m:
            m.setattr(ops, "concat_channels", record(ops.concat_channels))
            m.setattr(densenet, "concat_channels", record(densenet.concat_channels))
            train = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)(
                variables["params"], True)
            evaluate = jax.jit(loss, static_argnums=1)(variables["params"], False)[1][0]
        return train, evaluate, joined

    (grads, (logits, upd)), eval_logits, joined = run()
    monkeypatch.setattr(densenet, "_TRANSITION_PARTS", False)
    monkeypatch.setattr(densenet, "_TRANSITION_EVAL_PARTS", False)
    (book_grads, (book_logits, book_upd)), book_eval_logits, book_joined = run()
    # the first block's 64 + 2 * 8 channels on 8x8 maps (32x32 input): joined at 4x4 only
    assert (4, 8, 8, 80) in book_joined and (4, 8, 8, 80) not in joined
    assert (4, 4, 4, 80) in joined
    # (each map's statistics reduced on its own: a different order of float32 sums)
    assert rel_err(logits, book_logits) < 1e-5
    assert rel_err(eval_logits, book_eval_logits) < 1e-6
    for path, leaf in flat(book_upd).items():
        assert rel_err(flat(upd)[path], leaf) < 1e-5, path
    # against the largest gradient: a convolution's bias before BatchNorm has none
    largest = max(np.abs(np.asarray(g)).max() for g in flat(book_grads).values())
    for path, leaf in flat(book_grads).items():
        assert np.abs(np.asarray(flat(grads)[path]) - leaf).max() < GRAD_RTOL * largest, path


@pytest.mark.parametrize("shape", [(5, 3), (2, 3, 4, 4)])
@pytest.mark.parametrize("steps", [1, 3])
def test_running_var_conversion(shape, steps):
    """PyTorch's nn.BatchNorm keeps the unbiased variance, the book's scratch layer (as Flax)
    the biased one; `porting.torch_running_var` maps one to the other exactly:
    after one step from 1, torch = 0.9 + 0.1*var*m/(m-1) while flax = 0.9 + 0.1*var."""
    c = shape[1]
    builtin = (torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d)(c)
    scratch = torch_ref.BatchNorm(c, num_dims=len(shape))
    torch.manual_seed(0)
    xs = [torch.randn(shape) * 2 + 1 for _ in range(steps)]
    for x in xs:
        builtin(x)
        scratch(x)
    m = math.prod(shape) // c
    biased = scratch.moving_var.reshape(-1).numpy()
    unbiased = builtin.running_var.numpy()
    assert rel_err(scratch.moving_mean.reshape(-1), builtin.running_mean) < 1e-6
    assert rel_err(porting.torch_running_var(biased, m, steps=steps), unbiased) < 1e-6
    assert rel_err(porting.flax_running_var(unbiased, m, steps=steps), biased) < 1e-6
    assert rel_err(biased, unbiased) > 1e-3
    if steps == 1:
        dims = (0,) if len(shape) == 2 else (0, 2, 3)
        var = xs[0].var(dim=dims, unbiased=False).numpy()
        assert rel_err(unbiased, 0.9 + 0.1 * var * m / (m - 1)) < 1e-6
        assert rel_err(biased, 0.9 + 0.1 * var) < 1e-6


# --- the porting module ------------------------------------------------------------------------

def test_book_blocks():
    """The book's block examples: shapes and values (ported weights, training mode)."""
    conv = partial(models.Conv)
    norm = partial(nn.BatchNorm, use_running_average=False, momentum=0.9, epsilon=1e-5,
                   use_fast_variance=False)

    class Wrap(nn.Module):
        block: nn.Module

        @nn.compact
        def __call__(self, x):
            return self.block(x)

    blocks = [
        (torch_ref.Residual(3, 3), models.Residual(3, conv=conv, norm=norm), (4, 3, 6, 6),
         (4, 3, 6, 6)),
        (torch_ref.Residual(3, 6, use_1x1conv=True, strides=2),
         models.Residual(6, True, 2, conv=conv, norm=norm), (4, 3, 6, 6), (4, 6, 3, 3)),
        (torch_ref.DenseBlock(2, 3, 10), models.DenseBlock(2, 10, conv=conv, norm=norm),
         (4, 3, 8, 8), (4, 23, 8, 8)),
        (torch_ref.transition_block(23, 10), models.transition_block(10, conv, norm),
         (4, 23, 8, 8), (4, 10, 4, 4)),
        (torch_ref.Inception(192, 64, (96, 128), (16, 32), 32),
         models.Inception(64, (96, 128), (16, 32), 32), (2, 192, 6, 6), (2, 256, 6, 6)),
    ]
    torch.manual_seed(0)
    for tblock, fblock, in_shape, out_shape in blocks:
        x = torch.rand(in_shape)
        flax_block = Wrap(fblock)
        variables = porting.torch_to_flax(tblock, flax_block, nhwc(x).shape)
        out = tblock(x)
        assert tuple(out.shape) == out_shape
        y, _ = jax.jit(partial(flax_block.apply, mutable=["batch_stats"]))(
            variables, jnp.asarray(nhwc(x)))
        assert rel_err(y, nhwc(out)) < 1e-5


def test_flatten_permutation():
    """The first Linear after a flatten gets its rows permuted from (C,H,W) to (H,W,C) order;
    the Linear after it does not."""
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(3 * 4 * 5, 7), torch.nn.Linear(7, 2))

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(models.Conv(3, 3)(x)).reshape(x.shape[0], -1)
            return models.Dense(2)(models.Dense(7)(x))

    x = torch.rand(2, 1, 6, 7)
    pairs, _ = porting.match_layers(net, Model(), nhwc(x).shape)
    assert [p.flatten_chw for p in pairs] == [None, (3, 4, 5), None]
    variables = porting.torch_to_flax(net, Model(), nhwc(x).shape, pairs=pairs)
    with torch.no_grad():
        assert rel_err(Model().apply(variables, jnp.asarray(nhwc(x))), net(x).numpy()) < 1e-6


@pytest.mark.parametrize("name", ["lenet_bn", "lenet_bn_scratch", "resnet18"])
def test_flax_to_torch_round_trip(name):
    """Flax variables (random, statistics included) into PyTorch and back: identical arrays,
    equal eval logits."""
    side = 28 if name.startswith("lenet") else 32
    model = models.create(name)
    x = jax.random.uniform(jax.random.key(1), (2, side, side, 1))
    variables = random_variables(model, x.shape)
    net = torch_ref.create(name, side)
    porting.flax_to_torch(variables, net, model, x.shape)
    back = porting.torch_to_flax(net, model, x.shape)
    assert jax.tree_util.tree_all(
        jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(a, b)), back, variables))
    net.eval()
    with torch.no_grad():
        expected = net(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())).numpy()
    assert rel_err(jax.jit(model.apply)(variables, x), expected) < 1e-5


def test_state_dict_round_trip():
    """A state_dict of the book's network to Flax variables and back, unchanged."""
    torch.manual_seed(0)
    net = torch_ref.create("lenet_bn")
    net.train()
    net(torch.rand(4, 1, 28, 28))  # non-trivial running statistics
    state = net.state_dict()
    variables = porting.state_dict_to_flax(state, "lenet_bn")
    assert np.array_equal(variables["params"]["Dense_0"]["kernel"][:, 0],
                          state["9.weight"][0].reshape(16, 4, 4).permute(1, 2, 0).reshape(-1))
    assert np.array_equal(variables["batch_stats"]["BatchNorm_3"]["var"], state["13.running_var"])
    back = porting.flax_to_state_dict(variables, "lenet_bn")
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state if "num_batches" not in k)


def test_ported_arrays_do_not_alias_torch():
    """PyTorch updates weights and statistics in place; the ported arrays must not follow."""
    net = torch_ref.create("lenet_bn")
    model = models.create("lenet_bn")
    variables = porting.torch_to_flax(net, model, (1, 28, 28, 1))
    before = jax.tree_util.tree_map(np.array, variables)
    net.train()
    net(torch.rand(4, 1, 28, 28)).sum().backward()
    with torch.no_grad():
        for p in net.parameters():
            p -= p.grad
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda a, b: bool(np.array_equal(a, b)), variables, before))


def test_mismatches_raise():
    with torch.device("meta"):
        alexnet = torch_ref.create("alexnet", init=False)
    with pytest.raises(porting.PortingError, match=r"PyTorch has 8 layers .* Flax 12"):
        porting.match_layers(alexnet, models.create("nin"), (1, 224, 224, 1))
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))

    class ConvModel(nn.Module):
        @nn.compact
        def __call__(self, x):
            return models.Conv(3, 4)(x)

    with pytest.raises(porting.PortingError, match=re.escape(
            "layer 0: PyTorch '1' (Linear) is a linear layer but Flax Conv_0 is a conv layer")):
        porting.match_layers(net, ConvModel(), (1, 4, 4, 1))

    class DenseModel(nn.Module):
        @nn.compact
        def __call__(self, x):
            return models.Dense(3)(x.reshape(x.shape[0], -1)[:, :8])

    with pytest.raises(porting.PortingError, match=r"converts to shape \(16, 3\), Flax expects "
                                                   r"\(8, 3\)"):
        porting.torch_to_flax(net, DenseModel(), (1, 4, 4, 1))
