"""Weights between PyTorch modules and Flax linen modules: `torch_to_flax`, `flax_to_torch`.

    net = flaxcnn.torch_ref.create("alexnet")                 # or any PyTorch module
    model = flaxcnn.models.create("alexnet")                  # or any Flax module
    variables = torch_to_flax(net, model, (1, 224, 224, 1))   # NHWC sample input or its shape
    logits = model.apply(variables, x_nhwc, train=False)      # == net(x_nchw) in eval mode

    variables = state_dict_to_flax(torch.load("alexnet.pt"), "alexnet")   # a saved state_dict
    torch.save(flax_to_state_dict(variables, "alexnet"), "alexnet.pt")    # and back

How layers are matched. Neither side's names say which layer is which (PyTorch's `3.weight`,
Flax's `Conv_1/kernel`), so both modules are run once on a dummy batch and their layers are
paired in the order they are *called*: PyTorch through forward hooks on every module that holds
parameters or buffers, Flax through `flax.linen.intercept_methods` on every module that owns
variables directly (no arrays are computed on the Flax side: it runs under `jax.eval_shape`).
Call order is what both sides share: PyTorch's registration order is not it (the book's
`Residual` registers conv3 before bn1), nor is Flax's dict order (which `jax.tree_util` sorts).
The i-th PyTorch layer must then have the i-th Flax layer's kind, and every converted array the
Flax variable's shape; anything else raises `PortingError` naming both layers.

Kinds and conversions (PyTorch → Flax):
- `nn.Conv2d` → a Flax module with a 4-D `kernel` (and `bias`): OIHW → HWIO, `transpose(2,3,1,0)`.
- `nn.Linear` → a 2-D `kernel` (and `bias`): `weight.T`, stored (in, out). When the Linear's
  input is the flattening of a (C, H, W) activation (the last 4-D output of any PyTorch module
  before it has C·H·W values, and no other Linear came in between), its input rows are permuted
  from PyTorch's (C, H, W) flatten order to the (H, W, C) order of a Flax model that flattens
  NHWC with `x.reshape(N, -1)`.
- `nn.BatchNorm1d/2d` or the book's scratch `BatchNorm` (`gamma`, `beta`, `moving_mean`,
  `moving_var`, any shape with C values) → `flax.linen.BatchNorm` (params scale/bias,
  batch_stats mean/var) or `flaxcnn.models.BatchNorm` (params gamma/beta, batch_stats
  moving_mean/moving_var), all of shape (C,). `num_batches_tracked` is not ported.

Running variance. `nn.BatchNorm*` tracks the *unbiased* batch variance (times m/(m-1), m = the
number of values per channel: N for (N, C) input, N·H·W for (N, C, H, W)); `flax.linen.BatchNorm`
and both scratch layers track the biased one. Ported statistics are copied as they are (so a
ported PyTorch model evaluates identically); to compare statistics after training steps use
`torch_running_var` / `torch_batch_stats`, derived in `torch_running_var`'s docstring.

torch is imported inside the functions that need it; this module imports without it.
"""

import inspect
import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "LayerPair", "PortingError", "flax_running_var", "flax_to_state_dict", "flax_to_torch",
    "match_layers", "state_dict_to_flax", "torch_batch_stats", "torch_grads_to_flax",
    "torch_running_var", "torch_to_flax",
]


class PortingError(ValueError):
    """The two modules' layers do not correspond (count, kind or shape)."""


# Flax leaf variable names per kind: params, then batch_stats.
_FLAX_NORM_NAMES = {
    "linen": ("scale", "bias", "mean", "var"),
    "scratch": ("gamma", "beta", "moving_mean", "moving_var"),
}
# PyTorch tensor names per norm flavour: weight, bias, running mean, running var.
_TORCH_NORM_NAMES = {
    "builtin": ("weight", "bias", "running_mean", "running_var"),
    "scratch": ("gamma", "beta", "moving_mean", "moving_var"),
}


@dataclass(frozen=True)
class LayerPair:
    """One PyTorch layer and the Flax layer it corresponds to."""

    index: int
    torch_name: str  # qualified name in the PyTorch module ("" for the module itself)
    torch_module: Any
    flax_path: tuple  # path of the Flax module in the variables tree
    kind: str  # "conv", "linear" or "norm"
    # conv/linear: ("kernel", "bias"); norm: the Flax names of weight, bias, mean, var.
    flax_names: tuple
    # norm only: the PyTorch names of weight, bias, mean, var.
    torch_names: tuple = ()
    # linear only: (C, H, W) when the input is a flattened (C, H, W) activation.
    flatten_chw: tuple | None = None
    # norm only: values per channel per example (H*W for 4-D input, 1 for 2-D).
    count_per_example: int = 1
    # norm only: True when the PyTorch layer's running variance is the unbiased one.
    torch_unbiased_var: bool = False

    def describe(self):
        return (
            f"layer {self.index} ({self.kind}): PyTorch {self.torch_name or '<root>'!r} "
            f"({type(self.torch_module).__name__}) <-> Flax {'/'.join(self.flax_path) or '<root>'}"
        )


# --- tracing -----------------------------------------------------------------------------------

def _shape_of(x):
    if hasattr(x, "shape"):
        return tuple(x.shape)
    return tuple(int(d) for d in x)


def _torch_input_shape(flax_shape):
    # NHWC -> NCHW; other ranks are the same on both sides.
    if len(flax_shape) == 4:
        n, h, w, c = flax_shape
        return (n, c, h, w)
    return tuple(flax_shape)


def _own_tensors(module):
    names = [n for n, _ in module.named_parameters(recurse=False)]
    names += [n for n, _ in module.named_buffers(recurse=False) if n != "num_batches_tracked"]
    return names


def _torch_kind(module, names):
    import torch

    if isinstance(module, torch.nn.Conv2d):
        return "conv", ()
    if isinstance(module, torch.nn.Linear):
        return "linear", ()
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        return "norm", _TORCH_NORM_NAMES["builtin"]
    if set(names) <= set(_TORCH_NORM_NAMES["scratch"]) and {"gamma", "beta"} & set(names):
        return "norm", _TORCH_NORM_NAMES["scratch"]
    raise PortingError(
        f"cannot port PyTorch module {type(module).__name__} with tensors {names}: only Conv2d, "
        "Linear, BatchNorm1d/2d and the book's scratch BatchNorm are supported"
    )


def _trace_torch(torch_module, flax_shape):
    """PyTorch layers that hold tensors, in first-call order, with what the pairing needs."""
    import torch

    names = {m: n for n, m in torch_module.named_modules()}
    layers, seen = [], set()
    state = {"spatial": None}  # the last 4-D output of any module, without N

    def pre_hook(module, args):
        if module in seen:
            return
        seen.add(module)
        x = args[0] if args else None
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else None
        kind, torch_names = _torch_kind(module, _own_tensors(module))
        info = {"module": module, "name": names[module], "kind": kind,
                "torch_names": torch_names, "flatten_chw": None, "count": 1}
        if kind == "linear" and shape is not None and len(shape) == 2:
            chw = state["spatial"]
            if chw is not None and math.prod(chw) == shape[1]:
                info["flatten_chw"] = chw
            state["spatial"] = None
        if kind == "norm" and shape is not None:
            info["count"] = math.prod(shape[2:])
        layers.append(info)

    def post_hook(module, args, output):
        if isinstance(output, torch.Tensor) and output.ndim == 4:
            state["spatial"] = tuple(output.shape[1:])

    holders = [m for m in torch_module.modules() if _own_tensors(m)]
    handles = [m.register_forward_pre_hook(pre_hook) for m in holders]
    handles += [m.register_forward_hook(post_hook) for m in torch_module.modules()]
    was_training = torch_module.training
    param = next(iter(torch_module.parameters()), None)
    device = param.device if param is not None else "cpu"
    dtype = param.dtype if param is not None else torch.float32
    try:
        torch_module.eval()
        with torch.no_grad():
            torch_module(torch.zeros(_torch_input_shape((1, *flax_shape[1:])), device=device,
                                     dtype=dtype))
    finally:
        torch_module.train(was_training)
        for h in handles:
            h.remove()
    missed = [names[m] for m in holders if m not in seen]
    if missed:
        raise PortingError(f"PyTorch modules hold tensors but were not called: {missed}")
    return layers


def _subtree(tree, path):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return {}
        tree = tree[key]
    return tree if isinstance(tree, dict) else {}


def _own_leaves(variables, path):
    """{collection: {name: leaf}} for the variables the module at `path` owns directly."""
    own = {}
    for col, tree in variables.items():
        leaves = {k: v for k, v in _subtree(tree, path).items() if not isinstance(v, dict)}
        if leaves:
            own[col] = leaves
    return own


def _all_owner_paths(tree, path=()):
    owners = set()
    if any(not isinstance(v, dict) for v in tree.values()):
        owners.add(path)
    for k, v in tree.items():
        if isinstance(v, dict):
            owners |= _all_owner_paths(v, (*path, k))
    return owners


def _default_kwargs(flax_model, init_kwargs):
    if init_kwargs is not None:
        return dict(init_kwargs)
    try:
        params = inspect.signature(flax_model.__call__).parameters
    except (TypeError, ValueError):
        return {}
    return {"train": False} if "train" in params else {}


def _trace_flax(flax_model, flax_shape, init_kwargs):
    """Flax modules that own variables, in first-call order, and the abstract variables."""
    import flax.linen as nn

    order = []

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "setup":
            path = tuple(context.module.path)
            if path not in order:
                order.append(path)
        return next_fun(*args, **kwargs)

    kwargs = _default_kwargs(flax_model, init_kwargs)

    def init(x):
        with nn.intercept_methods(interceptor):
            return flax_model.init(jax.random.key(0), x, **kwargs)

    x = jax.ShapeDtypeStruct((1, *flax_shape[1:]), jnp.float32)
    variables = jax.eval_shape(init, x)
    variables = jax.tree_util.tree_map(lambda a: a, dict(variables))  # plain nested dicts
    owners = set()
    for tree in variables.values():
        owners |= _all_owner_paths(tree)
    layers = [p for p in order if p in owners]
    missed = owners - set(layers)
    if missed:
        raise PortingError(f"Flax modules own variables but were not called: {sorted(missed)}")
    return layers, variables


def _flax_kind(path, own):
    params = own.get("params", {})
    stats = own.get("batch_stats", {})
    kernel = params.get("kernel")
    if kernel is not None and set(params) <= {"kernel", "bias"} and not stats:
        if kernel.ndim == 4:
            return "conv", ("kernel", "bias")
        if kernel.ndim == 2:
            return "linear", ("kernel", "bias")
    for names in _FLAX_NORM_NAMES.values():
        if (set(params) <= set(names[:2]) and set(stats) <= set(names[2:])
                and (params or stats)):
            return "norm", names
    raise PortingError(
        f"cannot port Flax module {'/'.join(path)} with variables "
        f"{ {c: sorted(v) for c, v in own.items()} }: expected a conv or dense kernel/bias or a "
        "batch norm (scale/bias + mean/var, or gamma/beta + moving_mean/moving_var)"
    )


def match_layers(torch_module, flax_model, x, init_kwargs=None):
    """Pairs the PyTorch and Flax layers; returns (pairs, abstract Flax variables).

    `x`: a Flax-side (NHWC) sample input or its shape; only its non-batch dimensions matter
    (both sides are traced with batch 1). `init_kwargs` are passed to `flax_model.init`
    (default `train=False` when `__call__` takes `train`).
    """
    import torch

    flax_shape = _shape_of(x)
    torch_layers = _trace_torch(torch_module, flax_shape)
    flax_layers, variables = _trace_flax(flax_model, flax_shape, init_kwargs)
    if len(torch_layers) != len(flax_layers):
        t = [f"{d['name']} ({type(d['module']).__name__})" for d in torch_layers]
        f = ["/".join(p) for p in flax_layers]
        raise PortingError(
            f"PyTorch has {len(torch_layers)} layers with tensors, Flax {len(flax_layers)}:\n"
            f"  PyTorch: {t}\n  Flax: {f}"
        )
    pairs = []
    for i, (t, path) in enumerate(zip(torch_layers, flax_layers, strict=True)):
        kind, flax_names = _flax_kind(path, _own_leaves(variables, path))
        pair = LayerPair(
            index=i, torch_name=t["name"], torch_module=t["module"], flax_path=path,
            kind=kind, flax_names=flax_names, torch_names=t["torch_names"],
            flatten_chw=t["flatten_chw"], count_per_example=t["count"],
            torch_unbiased_var=isinstance(t["module"], torch.nn.modules.batchnorm._BatchNorm),
        )
        if kind != t["kind"]:
            raise PortingError(
                f"layer {i}: PyTorch {t['name']!r} ({type(t['module']).__name__}) is a "
                f"{t['kind']} layer but Flax {'/'.join(path)} is a {kind} layer"
            )
        pairs.append(pair)
    return pairs, variables


# --- conversions -------------------------------------------------------------------------------

def _linear_to_flax(w, chw):
    # w: (out, in) in PyTorch's flatten order; returns (in, out) in (H, W, C) order.
    if chw is not None:
        c, h, wd = chw
        w = w.reshape(w.shape[0], c, h, wd).transpose(0, 2, 3, 1).reshape(w.shape[0], -1)
    return w.T


def _linear_to_torch(k, chw):
    w = k.T
    if chw is not None:
        c, h, wd = chw
        w = w.reshape(w.shape[0], h, wd, c).transpose(0, 3, 1, 2).reshape(w.shape[0], -1)
    return w


def _torch_tensors(pair, grads):
    """{role: numpy array} of the PyTorch layer; roles: weight, bias, mean, var."""
    import torch

    m = pair.torch_module
    if pair.kind == "norm":
        tn = pair.torch_names
        named = {"weight": tn[0], "bias": tn[1], "mean": tn[2], "var": tn[3]}
    else:
        named = {"weight": "weight", "bias": "bias"}
    out = {}
    for role, name in named.items():
        t = getattr(m, name, None)
        if t is None:
            continue
        if grads:
            if not isinstance(t, torch.nn.Parameter):
                continue
            if t.grad is None:
                raise PortingError(f"{pair.describe()}: {name} has no .grad; run backward first")
            t = t.grad
        # A copy: jnp.asarray may alias NumPy memory, and PyTorch updates its tensors in place
        # (running statistics in every training forward, weights in every optimizer step).
        out[role] = t.detach().cpu().numpy().copy()
    return out


def _to_flax_arrays(pair, tensors):
    """{(collection, name): array} in Flax layout."""
    out = {}
    if pair.kind == "conv":
        if "weight" in tensors:
            out["params", "kernel"] = tensors["weight"].transpose(2, 3, 1, 0)
        if "bias" in tensors:
            out["params", "bias"] = tensors["bias"]
    elif pair.kind == "linear":
        if "weight" in tensors:
            out["params", "kernel"] = _linear_to_flax(tensors["weight"], pair.flatten_chw)
        if "bias" in tensors:
            out["params", "bias"] = tensors["bias"]
    else:
        scale, bias, mean, var = pair.flax_names
        roles = {"weight": ("params", scale), "bias": ("params", bias),
                 "mean": ("batch_stats", mean), "var": ("batch_stats", var)}
        for role, key in roles.items():
            if role in tensors:
                out[key] = tensors[role].reshape(-1)
    return out


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _build(pairs, abstract, grads):
    result = {}
    for pair in pairs:
        arrays = _to_flax_arrays(pair, _torch_tensors(pair, grads))
        own = _own_leaves(abstract, pair.flax_path)
        expected = {(c, n) for c, leaves in own.items() for n in leaves}
        if grads:
            expected = {k for k in expected if k[0] == "params"}
        if set(arrays) != expected:
            raise PortingError(
                f"{pair.describe()}: PyTorch gives {sorted(arrays)}, Flax expects "
                f"{sorted(expected)}"
            )
        for (col, name), a in arrays.items():
            spec = own[col][name]
            if tuple(a.shape) != tuple(spec.shape):
                raise PortingError(
                    f"{pair.describe()}: {col}/{name} converts to shape {tuple(a.shape)}, "
                    f"Flax expects {tuple(spec.shape)}"
                )
            _set(result, (col, *pair.flax_path, name), jnp.asarray(a, dtype=spec.dtype))
    return result


def torch_to_flax(torch_module, flax_model, x, *, pairs=None, init_kwargs=None):
    """The Flax `variables` (params and batch_stats) holding `torch_module`'s weights.

    `x`: an NHWC sample input of `flax_model` or its shape. `pairs`: the first result of an
    earlier `match_layers` call, to skip tracing again.
    """
    if pairs is None:
        pairs, abstract = match_layers(torch_module, flax_model, x, init_kwargs)
    else:
        _, abstract = _trace_flax(flax_model, _shape_of(x), init_kwargs)
    return _build(pairs, abstract, grads=False)


def torch_grads_to_flax(torch_module, flax_model, x, *, pairs=None, init_kwargs=None):
    """`{"params": ...}` holding the `.grad` of every PyTorch parameter in Flax layout (the
    Linear after a flatten permuted like its weight), to compare with `jax.grad`'s result."""
    if pairs is None:
        pairs, abstract = match_layers(torch_module, flax_model, x, init_kwargs)
    else:
        _, abstract = _trace_flax(flax_model, _shape_of(x), init_kwargs)
    return _build(pairs, abstract, grads=True)


def flax_to_torch(variables, torch_module, flax_model, x, *, pairs=None, init_kwargs=None):
    """Copies Flax `variables` into `torch_module`'s parameters and buffers, in place.

    Collections missing from `variables` (e.g. no `batch_stats`) leave those tensors as they
    are. Returns `torch_module`.
    """
    import torch

    if pairs is None:
        pairs, _ = match_layers(torch_module, flax_model, x, init_kwargs)
    variables = {c: dict(v) for c, v in variables.items()}

    def get(col, pair, name):
        leaves = _subtree(variables.get(col, {}), pair.flax_path)
        return None if name not in leaves else np.asarray(leaves[name])

    with torch.no_grad():
        for pair in pairs:
            m = pair.torch_module
            if pair.kind in ("conv", "linear"):
                k, b = get("params", pair, "kernel"), get("params", pair, "bias")
                if k is None:
                    raise PortingError(f"{pair.describe()}: no params/kernel in variables")
                if pair.kind == "conv":
                    w = k.transpose(3, 2, 0, 1)
                else:
                    w = _linear_to_torch(k, pair.flatten_chw)
                targets = [(m.weight, w), (getattr(m, "bias", None), b)]
            else:
                scale, bias, mean, var = pair.flax_names
                tn = pair.torch_names
                targets = [
                    (getattr(m, tn[0], None), get("params", pair, scale)),
                    (getattr(m, tn[1], None), get("params", pair, bias)),
                    (getattr(m, tn[2], None), get("batch_stats", pair, mean)),
                    (getattr(m, tn[3], None), get("batch_stats", pair, var)),
                ]
            for tensor, value in targets:
                if tensor is None or value is None:
                    continue
                if value.size != tensor.numel():
                    raise PortingError(
                        f"{pair.describe()}: Flax array of shape {value.shape} does not fit "
                        f"PyTorch tensor of shape {tuple(tensor.shape)}"
                    )
                tensor.copy_(torch.from_numpy(np.array(value)).reshape(tensor.shape))
    return torch_module


# --- state_dicts of the book's networks -------------------------------------------------------

def state_dict_to_flax(state_dict, name, side=None, *, strict=True):
    """Flax variables for `flaxcnn.models.create(name)` from a `state_dict` of the book's
    PyTorch network `name` (`flaxcnn.torch_ref.create(name, side)`; `side` defaults to the
    book's). A `state_dict` has no call order, so it is loaded into that network first
    (`strict` as in `load_state_dict`; the book's own scratch BatchNorm kept its moving
    statistics outside the `state_dict`, pass `strict=False` for those)."""
    from flaxcnn import models, torch_ref

    side = side or torch_ref.book_side(name)
    net = torch_ref.create(name, side, init=False)
    net.load_state_dict(state_dict, strict=strict)
    return torch_to_flax(net, models.create(name), (1, side, side, 1))


def flax_to_state_dict(variables, name, side=None):
    """The `state_dict` of the book's PyTorch network `name` holding Flax `variables`."""
    from flaxcnn import models, torch_ref

    side = side or torch_ref.book_side(name)
    net = torch_ref.create(name, side, init=False)
    flax_to_torch(variables, net, models.create(name), (1, side, side, 1))
    return net.state_dict()


# --- running variance: biased (Flax, scratch) vs unbiased (PyTorch nn.BatchNorm*) --------------

def torch_running_var(biased_running_var, count, *, steps=1, momentum=0.9, initial=1.0):
    """The running variance `nn.BatchNorm*` holds where Flax holds `biased_running_var`.

    Both start from `initial` (1) and see the same batches, each with `count` values per channel
    (m = N for (N, C) input, N·H·W for images). With s_k the biased batch variance, decay μ
    (`momentum` in Flax's sense, 0.9; PyTorch's `momentum=0.1` is 1 - μ) and c = m/(m-1):

        Flax:    v_k = μ·v_{k-1} + (1-μ)·s_k
        PyTorch: t_k = μ·t_{k-1} + (1-μ)·c·s_k

    so t_k - c·v_k = μ·(t_{k-1} - c·v_{k-1}), and t_k = c·v_k + μ^k·(1 - c)·initial.
    After one step from 1: t = 0.9 + 0.1·c·s while v = 0.9 + 0.1·s.
    """
    c = count / (count - 1)
    return c * biased_running_var + momentum**steps * (1.0 - c) * initial


def flax_running_var(unbiased_running_var, count, *, steps=1, momentum=0.9, initial=1.0):
    """The inverse of `torch_running_var`."""
    c = count / (count - 1)
    return (unbiased_running_var - momentum**steps * (1.0 - c) * initial) / c


def torch_batch_stats(batch_stats, pairs, batch_size, *, steps=1, momentum=0.9, initial=1.0):
    """Flax `batch_stats` after `steps` training steps of `batch_size` examples, with the
    variance of every layer that PyTorch's `nn.BatchNorm*` pairs with converted to what
    PyTorch holds (`torch_running_var`); layers paired with the scratch BatchNorm, which
    tracks the biased variance like Flax, are left as they are. Compare the result with
    `torch_to_flax(...)["batch_stats"]` of the PyTorch model trained the same way."""
    out = jax.tree_util.tree_map(lambda a: a, batch_stats)
    for pair in pairs:
        if pair.kind != "norm" or not pair.torch_unbiased_var:
            continue
        var_name = pair.flax_names[3]
        leaves = _subtree(out, pair.flax_path)
        if var_name not in leaves:
            continue
        count = batch_size * pair.count_per_example
        leaves[var_name] = torch_running_var(
            leaves[var_name], count, steps=steps, momentum=momentum, initial=initial
        )
    return out
