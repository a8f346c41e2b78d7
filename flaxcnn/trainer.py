"""The book's `train_ch6` for JAX: epochs of jitted steps over device-resident Fashion-MNIST.

`fit(Config(...))` is what `train.py` runs. It keeps both splits on the device as uint8, draws
each epoch's order from (seed, epoch), resizes batches inside the jitted step, accumulates the
metrics on the device, evaluates every test example once, and checkpoints with orbax at every
epoch end and on SIGINT/SIGTERM, so that `resume=True` continues bit-identically.

Data parallelism is `jax.jit` over a one-axis `Mesh` named `data`: the train state is replicated,
each batch's indices are sharded along `data`, and XLA partitions the step (GSPMD). Every
reduction over the batch spans the whole global batch, so BatchNorm normalises with the global
batch's statistics: PyTorch's `SyncBatchNorm`, not plain DDP's per-GPU statistics; the results
equal one device's up to float rounding. The same program runs over the devices of several
processes after `flaxcnn.distributed.initialize`; then only process 0 writes logs, metrics,
plots and the report, and every process takes part in each checkpoint.
"""

import dataclasses
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flaxcnn import compilation_cache, data, models, recipes
from flaxcnn.checkpoint import Checkpointer
from flaxcnn.training import (
    add_metrics,
    batch_statistics,
    create_train_state,
    eval_step,
    sgd,
    train_step,
    zero_metrics,
)


class UsageError(ValueError):
    """A configuration that cannot run; reported before anything compiles."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or Inf; the last checkpoint on disk is the last good state."""


class Interrupted(RuntimeError):
    """SIGINT or SIGTERM arrived; a checkpoint of the exact position was saved."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


@dataclass
class Config:
    model: str = "lenet_bn"
    # None means the book's recipe for `model` (flaxcnn.recipes).
    lr: float | None = None
    epochs: int | None = None
    batch_size: int | None = None
    side: int | None = None
    seed: int = 0
    momentum: float = 0.0
    weight_decay: float = 0.0
    workdir: str | None = None
    resume: bool = False
    checkpoint: bool = True
    # Use only the first N examples of each split (for quick runs and tests); None means all.
    train_size: int | None = None
    test_size: int | None = None
    data_dir: str | None = None
    manual_dir: str | None = None
    dtype: str = "float32"
    devices: int | None = None
    progress: bool = True
    # Evaluate with BatchNorm statistics re-estimated over this many training batches with the
    # current weights ("precise BN"); 0 evaluates with the moving averages only, as the book.
    precise_bn: int = 20
    model_fields: dict = dataclasses.field(default_factory=dict)

    def resolved(self) -> "Config":
        """A copy with the recipe's values filled in, validated; raises UsageError."""
        if self.model not in models.names():
            raise UsageError(
                f"unknown model {self.model!r}; choose from {', '.join(models.names())}"
            )
        recipe = recipes.get(self.model)
        cfg = dataclasses.replace(
            self,
            lr=recipe.lr if self.lr is None else self.lr,
            epochs=recipe.epochs if self.epochs is None else self.epochs,
            batch_size=recipe.batch_size if self.batch_size is None else self.batch_size,
            side=recipe.side if self.side is None else self.side,
            workdir=self.workdir or os.path.join("runs", self.model),
        )
        if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
            raise UsageError(f"--lr must be a positive number, got {cfg.lr}")
        for name in ("epochs", "batch_size", "side"):
            if getattr(cfg, name) <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be positive, got "
                                 f"{getattr(cfg, name)}")
        if cfg.momentum < 0 or cfg.weight_decay < 0:
            raise UsageError("--momentum and --weight-decay must be non-negative")
        for name in ("train_size", "test_size"):
            if getattr(cfg, name) is not None and getattr(cfg, name) <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be positive")
        if cfg.precise_bn < 0:
            raise UsageError(f"--precise-bn must be >= 0, got {cfg.precise_bn}")
        if cfg.dtype not in ("float32", "bfloat16"):
            raise UsageError(f"--dtype must be float32 or bfloat16, got {cfg.dtype!r}")
        min_side = build_model(cfg).min_side
        if cfg.side < min_side:
            raise UsageError(
                f"--side {cfg.side} is too small for {cfg.model}: it needs at least {min_side}"
            )
        return cfg


def build_model(cfg: Config):
    return models.create(cfg.model, dtype=jnp.dtype(cfg.dtype), **cfg.model_fields)


def check_workdir(workdir: str):
    """Fails now, not after an epoch of training, if results cannot be written."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"work directory {workdir!r} is not writable: {e}") from None


def device_label(device) -> str:
    return f"{device.platform}:{device.id}"


def select_devices(n: int | None) -> list:
    """The first `n` devices of every process (all of them for None or 0), process by process.

    With one process these are its first `n` devices; with several, `--devices N` means N
    devices of each process, and the mesh spans N x processes devices.
    """
    by_process: dict[int, list] = {}
    for d in jax.devices():
        by_process.setdefault(d.process_index, []).append(d)
    available = min(len(ds) for ds in by_process.values())
    per = available if n in (None, 0) else n
    if per > available:
        where = " to each process" if len(by_process) > 1 else ""
        raise UsageError(f"--devices {n}: only {available} devices are visible{where}")
    return [d for p in sorted(by_process) for d in by_process[p][:per]]


def host(tree):
    """Host (numpy) copies of replicated arrays, also when other processes hold replicas too
    (`jax.device_get` needs fully addressable arrays; a replicated one is whole on every device,
    so this process's first shard is the value)."""

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_data(0))
        return np.asarray(jax.device_get(x))

    return jax.tree_util.tree_map(get, tree)


# ----------------------------------------------------------------------------------------------
# The jitted functions: one train step on device-resident data, one eval step.


def _data_train_step(state, acc, images, labels, idx, *, side, batch_sharding=None):
    """Gathers the batch `idx` from the device-resident split, resizes it, trains one step and
    adds its metrics to `acc`; `acc["bad_step"]` keeps the first step whose loss was not
    finite (-1 while all were).

    `batch_sharding` pins the batch to the devices along `data`: each device gathers and
    resizes only its own examples from its replica of the split."""
    x, y = data.to_float(images[idx], side), labels[idx]
    if batch_sharding is not None:
        x = jax.lax.with_sharding_constraint(x, batch_sharding)
        y = jax.lax.with_sharding_constraint(y, batch_sharding)
    state, m = train_step(state, x, y)
    bad = ~jnp.isfinite(m["loss"])
    first_bad = jnp.where((acc["bad_step"] < 0) & bad, state.step - 1, acc["bad_step"])
    acc = {**add_metrics({k: acc[k] for k in m}, m), "bad_step": first_bad}
    return state, acc


def _data_eval_step(state, acc, images, labels, idx, mask, *, side, batch_sharding=None):
    x, y = data.to_float(images[idx], side), labels[idx]
    if batch_sharding is not None:
        x = jax.lax.with_sharding_constraint(x, batch_sharding)
        y = jax.lax.with_sharding_constraint(y, batch_sharding)
    return add_metrics(acc, eval_step(state, x, y, mask))


def _data_bn_stats(state, acc, images, idx, *, side, batch_sharding=None):
    x = data.to_float(images[idx], side)
    if batch_sharding is not None:
        x = jax.lax.with_sharding_constraint(x, batch_sharding)
    return jax.tree_util.tree_map(jnp.add, acc, batch_statistics(state, x))


def _train_acc():
    return {**zero_metrics(), "bad_step": jnp.asarray(-1, jnp.int32)}


# ----------------------------------------------------------------------------------------------


class _SignalGuard:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _progress(total, initial, desc, enabled):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="batch", dynamic_ncols=True,
                leave=False, file=sys.stderr)


def _agreed_signal(signum):
    """The signal any process has received (None if none): every process must stop and save
    at the same step, or the checkpoint's collective writes would wait for each other."""
    if jax.process_count() == 1:
        return signum
    from jax.experimental import multihost_utils

    got = np.asarray(multihost_utils.process_allgather(np.int32(signum or 0))).ravel()
    received = [int(s) for s in got if s]
    return received[0] if received else None


def _metrics_host(acc):
    acc = host(acc)
    n = max(int(acc["count"]), 1)
    return float(acc["loss"]) / n, float(acc["correct"]) / n, int(acc["count"])


class Run:
    """Everything one `fit` needs, built once: mesh, data on device, compiled steps."""

    def __init__(self, cfg: Config, log=print):
        self.cfg = cfg
        self.log = log
        self.model = build_model(cfg)
        self.devices = select_devices(cfg.devices)
        n = len(self.devices)
        if cfg.batch_size % n:
            raise UsageError(f"--batch-size {cfg.batch_size} (the global batch) must be a "
                             f"multiple of the {n} devices")
        self.mesh = jax.sharding.Mesh(np.array(self.devices), ("data",))
        self.replicated = NamedSharding(self.mesh, P())
        self.batch_sharded = NamedSharding(self.mesh, P("data"))
        self.is_main = jax.process_index() == 0
        self.processes = jax.process_count()

    def put(self, tree):
        """Replicated global arrays from host values every process holds alike."""
        return jax.tree_util.tree_map(lambda x: self._global(np.asarray(x)), tree)

    def init_state(self, tx):
        """The initial train state, created replicated by one jitted computation (every process
        computes the same values from the seed; nothing crosses the network)."""
        cfg = self.cfg
        make = jax.jit(lambda: create_train_state(self.model, jax.random.key(cfg.seed),
                                                  cfg.side, tx),
                       out_shardings=self.replicated)
        return make()

    def label(self) -> str:
        label = device_label(self.devices[0])
        if len(self.devices) > 1:
            label += f" (x{len(self.devices)}"
            label += f", {self.processes} processes)" if self.processes > 1 else ")"
        if self.devices[0].platform == "cpu":  # the step's convolution kernels and pages
            from flaxcnn import cpu, onednn

            label += (" (oneDNN convolutions" if onednn.available()
                      else f" (XLA's convolutions: {onednn.reason().splitlines()[0][:120]}")
            pages = cpu.huge_page_malloc()  # see cpu.reexec_with_huge_pages, dispatch_inline
            kept = (cpu.keeps_step_memory() and len(self.devices) == 1
                    and not jax.config.read("jax_cpu_enable_async_dispatch"))
            label += ("; no huge pages: " + pages if pages not in ("active", "thp-always")
                      else "; huge pages") + (", step memory kept mapped)" if kept else ")")
        return label

    # -- data ------------------------------------------------------------------------------
    def load_data(self):
        cfg = self.cfg
        t0 = time.perf_counter()
        splits = {}
        for split, size in (("train", cfg.train_size), ("test", cfg.test_size)):
            images, labels = data.load_split(split, data_dir=cfg.data_dir,
                                             manual_dir=cfg.manual_dir)
            if size is not None:
                images, labels = images[:size], labels[:size]
            splits[split] = (images, labels)
        self.set_data(splits["train"], splits["test"])
        self.data_seconds = time.perf_counter() - t0

    def set_data(self, train, test):
        """Puts (uint8 images [N, H, W, 1], labels [N]) host arrays, the same in every process,
        on every device of the mesh (benchmarks pass synthetic ones)."""
        self.train_images, self.train_labels = (self._global(np.asarray(train[0], np.uint8)),
                                                self._global(np.asarray(train[1], np.int32)))
        self.test_images, self.test_labels = (self._global(np.asarray(test[0], np.uint8)),
                                              self._global(np.asarray(test[1], np.int32)))
        self.data_seconds = 0.0

    def _global(self, host, sharding=None):
        """A global array from a host array every process holds in full; each process
        transfers only the shards its own devices need."""
        sharding = sharding or self.replicated
        return jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])

    # -- compilation -----------------------------------------------------------------------
    def compile(self, state):
        """Compiles the train step for the full and the last partial batch and the eval step,
        ahead of time, so that compile time is measured apart from training time."""
        cfg = self.cfg
        t0 = time.perf_counter()
        cache_start = compilation_cache.counts()
        n_train = self.train_labels.shape[0]
        n_dev = len(self.devices)
        self.train_bs = min(cfg.batch_size, n_train - n_train % n_dev) or n_dev
        rest = n_train % self.train_bs
        # With several devices the last batch must split evenly: its last few examples (fewer
        # than the device count) are left out of that epoch.
        self.rest_bs = rest - rest % n_dev
        self.eval_bs = cfg.batch_size
        shardings = dict(
            in_shardings=(self.replicated, self.replicated, self.replicated, self.replicated,
                          self.batch_sharded),
            out_shardings=(self.replicated, self.replicated),
        )
        constraint = self.batch_sharded if n_dev > 1 else None
        acc = self._abstract(jax.eval_shape(_train_acc))

        def jit_train(bs):
            f = jax.jit(lambda s, a, im, lb, idx: _data_train_step(
                            s, a, im, lb, idx, side=cfg.side, batch_sharding=constraint),
                        donate_argnums=(0, 1), **shardings)
            idx = jax.ShapeDtypeStruct((bs,), jnp.int32, sharding=self.batch_sharded)
            return f.lower(state, acc, self.train_images, self.train_labels, idx).compile()

        self.train_full = jit_train(self.train_bs)
        self.train_rest = jit_train(self.rest_bs) if self.rest_bs else None
        self._eval_jit = jax.jit(
            lambda s, a, im, lb, idx, m: _data_eval_step(s, a, im, lb, idx, m, side=cfg.side,
                                                         batch_sharding=constraint),
            donate_argnums=(1,),
            in_shardings=(self.replicated,) * 4 + (self.batch_sharded,) * 2,
            out_shardings=self.replicated,
        )
        self._eval_compiled = {}
        self._eval_for(state, self.test_images, self.test_labels)
        self.bn_stats_step = None
        if cfg.precise_bn and jax.tree_util.tree_leaves(state.batch_stats):
            idx = jax.ShapeDtypeStruct((self.train_bs,), jnp.int32, sharding=self.batch_sharded)
            stats = self._abstract(jax.eval_shape(lambda: state.batch_stats))
            self.bn_stats_step = jax.jit(
                lambda s, a, im, idx: _data_bn_stats(s, a, im, idx, side=cfg.side,
                                                     batch_sharding=constraint),
                donate_argnums=(1,),
                in_shardings=(self.replicated,) * 3 + (self.batch_sharded,),
                out_shardings=self.replicated,
            ).lower(state, stats, self.train_images, idx).compile()
        self.compile_seconds = time.perf_counter() - t0
        self.cache = compilation_cache.since(cache_start)

    def _abstract(self, shapes):
        return jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.replicated), shapes)

    # -- evaluation ------------------------------------------------------------------------
    def _eval_for(self, state, images, labels):
        """The eval step compiled for a split's shape (the test split's is built up front)."""
        key = images.shape
        if key not in self._eval_compiled:
            idx = jax.ShapeDtypeStruct((self.eval_bs,), jnp.int32, sharding=self.batch_sharded)
            mask = jax.ShapeDtypeStruct((self.eval_bs,), jnp.bool_, sharding=self.batch_sharded)
            acc = self._abstract(jax.eval_shape(zero_metrics))
            self._eval_compiled[key] = self._eval_jit.lower(
                state, acc, images, labels, idx, mask).compile()
        return self._eval_compiled[key]

    def evaluate(self, state, images, labels):
        """Eval-mode (loss, accuracy, count) over every example exactly once: the batches are
        padded to a multiple of the device count and the padding is masked out."""
        idx, mask = data.eval_batches(labels.shape[0], self.eval_bs)
        idx, mask = np.asarray(idx, np.int32), np.asarray(mask, bool)
        step = self._eval_for(state, images, labels)
        acc = self.put(zero_metrics())
        for i in range(idx.shape[0]):
            acc = step(state, acc, images, labels, self._global(idx[i], self.batch_sharded),
                       self._global(mask[i], self.batch_sharded))
        return _metrics_host(acc)

    def precise_bn(self, state, batches):
        """`state` with each BatchNorm layer's statistics averaged over `batches` (index arrays
        of the training split) with the current weights: precise BN (Wu & Johnson, 2021).

        The moving averages that training keeps mix statistics of weights that kept changing;
        at the book's lr (1.0 for LeNet) they lag so much that test accuracy jumps by several
        points from epoch to epoch. Training itself is unchanged: only evaluation uses these."""
        if self.bn_stats_step is None or not batches:
            return state
        acc = self.put(jax.tree_util.tree_map(jnp.zeros_like, state.batch_stats))
        for idx in batches:
            acc = self.bn_stats_step(state, acc, self.train_images,
                                     self._global(idx, self.batch_sharded))
        return state.replace(
            batch_stats=jax.tree_util.tree_map(lambda v: v / len(batches), acc))


def fit(cfg: Config, log=print) -> dict:
    """Trains `cfg.model` as the book's `train_ch6` does and returns the final report.

    Raises UsageError for a bad configuration (before compiling), NonFiniteLoss when the loss
    diverges, and Interrupted after saving a checkpoint when SIGINT/SIGTERM arrives.
    """
    cfg = cfg.resolved()
    run = Run(cfg, log)
    is_main = run.is_main
    if not is_main:  # one log for the whole run: process 0's
        def log(*args, **kwargs):
            return None
    if is_main:
        check_workdir(cfg.workdir)
    t_start = time.perf_counter()
    run.load_data()
    tx = sgd(cfg.lr, cfg.momentum, cfg.weight_decay)
    state = run.init_state(tx)
    ckpt = Checkpointer(os.path.join(cfg.workdir, "checkpoints")) if cfg.checkpoint else None

    start_epoch, start_batch, history, resumed_acc, train_seconds = 0, 0, [], None, 0.0
    metrics_path = os.path.join(cfg.workdir, "metrics.jsonl")
    if not cfg.resume and ckpt is not None and ckpt.latest_step() is not None:
        raise UsageError(
            f"{cfg.workdir} holds checkpoints of an earlier run: continue it with --resume, or "
            "choose another --workdir"
        )
    if not cfg.resume and is_main and os.path.exists(metrics_path):
        os.remove(metrics_path)
    if cfg.resume:
        if ckpt is None or ckpt.latest_step() is None:
            raise UsageError(f"--resume: no checkpoint in {cfg.workdir}/checkpoints")
        state, meta = ckpt.restore(state)
        if meta["config"] != _config_fingerprint(cfg):
            raise UsageError(
                "--resume: the checkpoint was made with a different configuration "
                f"({meta['config']}) than this run ({_config_fingerprint(cfg)})"
            )
        start_epoch, start_batch = meta["epoch"], meta["next_batch"]
        history, resumed_acc = meta["history"], meta.get("acc")
        train_seconds = meta.get("train_seconds", 0.0)
        if is_main:  # the checkpoint's history is the truth; drop lines written after it
            with open(metrics_path, "w") as f:
                for h in history:
                    f.write(json.dumps({k: v for k, v in h.items() if k != "curve"}) + "\n")
        log(f"resumed from step {int(host(state.step))}: epoch {start_epoch + 1}, batch "
            f"{start_batch}")

    run.compile(state)
    n_train = int(run.train_labels.shape[0])
    device = run.label()
    log(f"{cfg.model}: {n_train} training examples, side {cfg.side}, batch {run.train_bs}, "
        f"lr {cfg.lr}, {cfg.epochs} epochs on {device}; compiled in {run.compile_seconds:.1f} s"
        + (f" ({cached})" if (cached := compilation_cache.summary(run.cache)) else ""))

    curve = []  # (epoch fraction, loss, train acc) points, as the book's Animator draws them
    for h in history:
        curve.extend(h.get("curve", []))

    with _SignalGuard() as guard:
        for epoch in range(start_epoch, cfg.epochs):
            order = np.asarray(data.epoch_order(cfg.seed, epoch, n_train))
            full, rest = data.train_batches(order, run.train_bs)
            batches = [np.asarray(b, np.int32) for b in np.asarray(full)]
            if run.train_rest is not None and rest is not None:
                batches.append(np.asarray(rest, np.int32)[: run.rest_bs])
            nb = len(batches)
            first = start_batch if epoch == start_epoch else 0
            acc = host(_train_acc())
            if first and resumed_acc is not None:
                acc = {k: np.asarray(v, acc[k].dtype) for k, v in resumed_acc.items()}
            acc = run.put(acc)
            bar = _progress(nb, first, f"epoch {epoch + 1}/{cfg.epochs}",
                            cfg.progress and is_main)
            marks = {max(1, (nb * j) // 5) for j in range(1, 6)}
            epoch_curve = []
            t0 = time.perf_counter()
            for i in range(first, nb):
                step_fn = run.train_full if batches[i].shape[0] == run.train_bs else run.train_rest
                state, acc = step_fn(state, acc, run.train_images, run.train_labels,
                                     run._global(batches[i], run.batch_sharded))
                if bar is not None:
                    bar.update(1)
                # One process checks for a signal after every step; several agree on one at
                # the marks (a collective), so that all of them stop at the same step.
                signum = guard.signum if run.processes == 1 else None
                if i + 1 in marks or signum is not None:
                    if run.processes > 1:
                        signum = _agreed_signal(guard.signum)
                    loss, tacc, _ = _metrics_host(acc)
                    bad = int(host(acc["bad_step"]))
                    if bad >= 0:
                        if bar is not None:
                            bar.close()
                        raise NonFiniteLoss(
                            f"loss is not finite at epoch {epoch + 1}, step {bad + 1} (batch "
                            f"{bad - epoch * nb + 1} of {nb}); the last good checkpoint in "
                            f"{cfg.workdir}/checkpoints is untouched"
                        )
                    epoch_curve.append((epoch + (i + 1) / nb, loss, tacc))
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{tacc:.3f}")
                if signum is not None:
                    jax.block_until_ready(state)
                    train_seconds += time.perf_counter() - t0
                    if bar is not None:
                        bar.close()
                    if ckpt is not None:
                        ckpt.save(state, _meta(cfg, epoch, i + 1, history, acc,
                                               train_seconds))
                        ckpt.wait()
                    name = signal.Signals(signum).name
                    raise Interrupted(
                        signum,
                        f"{name}: saved a checkpoint at epoch {epoch + 1}, batch {i + 1} of {nb}"
                        f" in {cfg.workdir}/checkpoints; continue with --resume",
                    )
            jax.block_until_ready(state)
            epoch_seconds = time.perf_counter() - t0
            train_seconds += epoch_seconds
            if bar is not None:
                bar.close()
            loss, tacc, count = _metrics_host(acc)
            if not math.isfinite(loss):
                raise NonFiniteLoss(f"loss is not finite at epoch {epoch + 1}")
            _, test_acc, test_count = run.evaluate(state, run.test_images, run.test_labels)
            # The book evaluates with the moving averages; when BN statistics are re-estimated
            # both are reported, the re-estimated one as "test acc".
            test_acc_moving = None
            bn_batches = [b for b in batches[: cfg.precise_bn] if b.shape[0] == run.train_bs]
            eval_state = run.precise_bn(state, bn_batches)
            if eval_state is not state:
                test_acc_moving = test_acc
                _, test_acc, _ = run.evaluate(eval_state, run.test_images, run.test_labels)
            trained = count - (int(resumed_acc["count"]) if first and resumed_acc else 0)
            record = {
                "epoch": epoch + 1,
                "step": int(host(state.step)),
                "loss": loss,
                "train_acc": tacc,
                "test_acc": test_acc,
                "test_acc_moving_bn": test_acc_moving,
                "test_examples": test_count,
                "examples_per_sec": trained / epoch_seconds if epoch_seconds else 0.0,
                "epoch_seconds": epoch_seconds,
                "curve": epoch_curve,
            }
            history.append(record)
            curve.extend(epoch_curve)
            if ckpt is not None:  # written in the background while the plot is drawn
                ckpt.save(state, _meta(cfg, epoch + 1, 0, history, None, train_seconds))
            if is_main:
                _plot(os.path.join(cfg.workdir, "curves.png"), cfg.model, curve, history)
            if ckpt is not None:
                # An epoch's line in metrics.jsonl promises its checkpoint is on disk, so a
                # run killed after the line resumes after that epoch.
                ckpt.wait()
            if is_main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps({k: v for k, v in record.items() if k != "curve"}) + "\n")
                moving = ("" if test_acc_moving is None
                          else f" (moving-average BN {test_acc_moving:.3f})")
                log(f"epoch {epoch + 1}/{cfg.epochs}: loss {loss:.3f}, train acc {tacc:.3f}, "
                    f"test acc {test_acc:.3f}{moving}, {record['examples_per_sec']:.1f} "
                    f"examples/sec on {device}")
            resumed_acc = None

    if ckpt is not None:
        ckpt.wait()
        ckpt.close()
    last = history[-1]
    n_bn = min(cfg.precise_bn, n_train // run.train_bs)
    order = np.asarray(data.epoch_order(cfg.seed, cfg.epochs, n_train))
    eval_state = run.precise_bn(
        state, [order[i * run.train_bs:(i + 1) * run.train_bs].astype(np.int32)
                for i in range(n_bn)])
    _, clean_train_acc, _ = run.evaluate(eval_state, run.train_images, run.train_labels)
    per_epoch = (n_train // run.train_bs) * run.train_bs + run.rest_bs
    report = {
        "model": cfg.model,
        "loss": last["loss"],
        "train_acc": last["train_acc"],
        "test_acc": last["test_acc"],
        "test_acc_moving_bn": last.get("test_acc_moving_bn"),
        "clean_train_acc": clean_train_acc,
        "examples_per_sec": per_epoch * cfg.epochs / train_seconds if train_seconds else 0.0,
        "device": device,
        "devices": len(run.devices),
        "processes": run.processes,
        "test_examples": last.get("test_examples"),
        "train_seconds": train_seconds,
        "compile_seconds": run.compile_seconds,
        "compile_cache_hits": run.cache["hits"],
        "data_seconds": run.data_seconds,
        "wall_seconds": time.perf_counter() - t_start,
        "epochs": cfg.epochs,
        "config": _config_fingerprint(cfg),
        "state": state,
    }
    if is_main:
        moving = report["test_acc_moving_bn"]
        log(f"loss {report['loss']:.3f}, train acc {report['train_acc']:.3f}, "
            f"test acc {report['test_acc']:.3f}"
            + ("" if moving is None else f" (with the moving-average BN statistics: {moving:.3f})"))
        log(f"{report['examples_per_sec']:.1f} examples/sec on {device}")
        log(f"clean train acc (eval mode) {clean_train_acc:.3f}; training {train_seconds:.1f} s, "
            f"compile {run.compile_seconds:.1f} s, data {run.data_seconds:.1f} s, wall "
            f"{report['wall_seconds']:.1f} s")
        with open(os.path.join(cfg.workdir, "report.json"), "w") as f:
            json.dump({k: v for k, v in report.items() if k != "state"}, f, indent=1)
    return report


def _config_fingerprint(cfg: Config) -> dict:
    """What must not change across --resume for the result to be the same run."""
    # The number of epochs may change: a finished run can be resumed to train longer.
    keys = ("model", "lr", "batch_size", "side", "seed", "momentum", "weight_decay",
            "train_size", "test_size", "dtype")
    return {k: getattr(cfg, k) for k in keys}


def _meta(cfg, epoch, next_batch, history, acc, train_seconds):
    meta = {
        "config": _config_fingerprint(cfg),
        "epoch": epoch,
        "next_batch": next_batch,
        "history": history,
        "train_seconds": train_seconds,
    }
    if acc is not None:
        acc = host(acc)
        meta["acc"] = {k: float(v) if k == "loss" else int(v) for k, v in acc.items()}
    return meta


def _plot(path, title, curve, history):
    """Train loss and accuracy through each epoch and test accuracy per epoch, as the book's
    Animator draws them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    if curve:
        xs, losses, accs = zip(*curve, strict=True)
        ax.plot(xs, losses, "-", label="train loss")
        ax.plot(xs, accs, "m--", label="train acc")
    ax.plot([h["epoch"] for h in history], [h["test_acc"] for h in history], "g-.",
            marker="o", label="test acc")
    ax.set_xlabel("epoch")
    ax.set_xlim(0, max(1, len(history)))
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
