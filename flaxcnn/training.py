"""The pure core of training: a train state, one jitted train step, one eval step.

Everything here takes and returns values; nothing reads globals or draws randomness without a
key. `flaxcnn.trainer` drives these functions over epochs; people who write their own loops can
use them directly:

    state = create_train_state(model, jax.random.key(0), side=28, tx=sgd(1.0))
    step = jax.jit(train_step, donate_argnums=0)
    state, metrics = step(state, x, y)
"""

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state


class TrainState(train_state.TrainState):
    """Flax's TrainState (step, params, tx, opt_state) plus BatchNorm statistics and a key.

    `rng` is a base key that never changes: the dropout key of a step is `fold_in(rng, step)`,
    so a run resumed from any step draws the same masks as one that never stopped.
    """

    batch_stats: Any
    rng: jax.Array


def sgd(lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
    """PyTorch's `torch.optim.SGD(lr, momentum, weight_decay)`; the book uses plain SGD.

    PyTorch adds `weight_decay * param` to the gradient before the momentum buffer, which is
    what `add_decayed_weights` followed by `sgd` does.
    """
    if lr <= 0:
        raise ValueError(f"learning rate must be positive, got {lr}")
    if momentum < 0 or weight_decay < 0:
        raise ValueError("momentum and weight decay must be non-negative")
    parts = [optax.add_decayed_weights(weight_decay)] if weight_decay else []
    parts.append(optax.sgd(lr, momentum=momentum or None))
    return optax.chain(*parts)


def create_train_state(model, key: jax.Array, side: int, tx) -> TrainState:
    """Initialises `model` for `side`x`side` one-channel input with the book's initialisation."""
    init_key, dropout_key = jax.random.split(key)
    x = jnp.zeros((1, side, side, 1), jnp.float32)
    variables = jax.jit(lambda k: model.init(k, x, train=False))(init_key)
    state = TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        tx=tx,
        rng=dropout_key,
    )
    # An array from the start, so a fresh state and a restored one have the same structure.
    return state.replace(step=jnp.zeros((), jnp.int32))


def _variables(state: TrainState, params):
    if state.batch_stats:
        return {"params": params, "batch_stats": state.batch_stats}
    return {"params": params}


def cross_entropy(logits, labels):
    """Per-example cross-entropy, computed in float32 whatever the compute dtype."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def train_step(state: TrainState, x, y):
    """Forward in training mode, mean cross-entropy, gradients, SGD update, new BN statistics.

    Returns the new state and this batch's metric *sums* (loss, correct, count), so that epoch
    totals weight every example equally, as the book's `Accumulator` does.
    """
    dropout_key = jax.random.fold_in(state.rng, state.step)

    def loss_fn(params):
        logits, updates = state.apply_fn(
            _variables(state, params), x, train=True, mutable=["batch_stats"],
            rngs={"dropout": dropout_key},
        )
        return cross_entropy(logits, y).mean(), (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(
        grads=grads, batch_stats=updates.get("batch_stats", state.batch_stats)
    )
    n = y.shape[0]
    metrics = {
        "loss": loss * n,
        "correct": jnp.sum(jnp.argmax(logits, -1) == y),
        "count": jnp.asarray(n, jnp.int32),
    }
    return state, metrics


def eval_step(state: TrainState, x, y, mask=None):
    """Eval-mode metric sums over the examples where `mask` is true (padding excluded)."""
    logits = state.apply_fn(_variables(state, state.params), x, train=False)
    mask = jnp.ones(y.shape, bool) if mask is None else mask.astype(bool)
    return {
        "loss": jnp.sum(jnp.where(mask, cross_entropy(logits, y), 0.0)),
        "correct": jnp.sum((jnp.argmax(logits, -1) == y) & mask),
        "count": jnp.sum(mask, dtype=jnp.int32),
    }


def zero_metrics():
    return {
        "loss": jnp.zeros((), jnp.float32),
        "correct": jnp.zeros((), jnp.int32),
        "count": jnp.zeros((), jnp.int32),
    }


def add_metrics(a, b):
    return jax.tree_util.tree_map(jnp.add, a, b)


def batch_statistics(state: TrainState, x, momentum: float = 0.9):
    """Every BatchNorm layer's statistics on batch `x` with the current weights.

    Running a training-mode forward from all-zero running statistics leaves `(1 - momentum)`
    times the batch statistics in each layer (momentum 0.9 for every BatchNorm here). Averaged
    over a few batches this is "precise BN" (Wu & Johnson, 2021): population statistics for the
    final weights, rather than a moving average over weights that kept changing.
    """
    zeros = jax.tree_util.tree_map(jnp.zeros_like, state.batch_stats)
    _, updates = state.apply_fn(
        {"params": state.params, "batch_stats": zeros}, x, train=True, mutable=["batch_stats"]
    )
    return jax.tree_util.tree_map(lambda v: v / (1.0 - momentum), updates["batch_stats"])
