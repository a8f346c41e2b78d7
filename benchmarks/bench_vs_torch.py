"""JAX (flaxcnn) against PyTorch, network by network, in one run: fair, reproducible, honest.

For every network at the book's input side, on one identical batch, with identical initial
weights (PyTorch's, ported with `flaxcnn.porting`) and the same number of threads:

- training throughput (examples/s) of flaxcnn's jitted `training.train_step` (donated state) and
  of the book's PyTorch network in eager mode (NCHW), with channels_last, and with
  `torch.compile` (channels_last input) where it works;
- inference throughput in eval mode for the same four;
- all timed interleaved (A, B, C, D, B, C, D, A, ...) after warm-up; medians with min-max;
  JAX in one worker process and PyTorch's modes in another, the parent taking turns between
  them, the rounds shared by `--processes` such pairs started one after the other (a fresh
  process can keep a speed level for its life on a virtual machine; `--same-process` runs
  both in the parent instead);
- compile time (XLA's lower+compile; torch.compile's first call minus a steady call);
- peak memory of a training run of each, each in its own child process;
- FLOPs per example from XLA's cost analysis, and the achieved GFLOP/s as a fraction of this
  machine's GEMM peak (f32, or bf16 with `--dtype bfloat16`), measured (jnp.dot and torch.mm,
  the best of both) in the same run.

Writes benchmarks/results/<device kind>.{json,md,png}.

    python benchmarks/bench_vs_torch.py                         # all seven networks, CPU
    python benchmarks/bench_vs_torch.py --networks resnet18 --batch 16 --rounds 3
    python benchmarks/bench_vs_torch.py --device gpu            # on a CUDA machine
    python benchmarks/bench_vs_torch.py --device gpu --dtype bfloat16

`--dtype bfloat16` is mixed precision on both sides: flaxcnn's networks with `dtype=bfloat16`
(bfloat16 activations and matrix products, float32 parameters, BatchNorm statistics and loss,
as `train.py --dtype bfloat16`) against the same PyTorch networks under
`torch.autocast(dtype=torch.bfloat16)`; the GEMM peak is then bfloat16's.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402

NETWORKS = ["alexnet", "vgg", "nin", "googlenet", "lenet_bn", "resnet18", "densenet"]
TORCH_MODES = ["eager", "channels_last", "compile"]
MODE_LABEL = {"jax": "JAX (flaxcnn)", "eager": "torch eager", "channels_last": "torch CL",
              "compile": "torch.compile"}
# Batch per network on a CPU (the book's batches take minutes per step at 224 on 2 cores);
# on a GPU the book's own batch sizes are used.
CPU_BATCH = {"lenet_bn": 256, "lenet_bn_scratch": 256}
CPU_BATCH_DEFAULT = 32


def log(*a):
    print(*a, flush=True)


# ----------------------------------------------------------------------------- the batch

def make_batch(batch: int, side: int, seed: int = 0):
    """The first `batch` Fashion-MNIST training images at `side` (the book's resize) and their
    labels, as NHWC float32 numpy; random images in [0, 1) if the data set is not available."""
    import numpy as np

    try:
        from flaxcnn import data

        images, labels = data.load_split("train")
        x = np.asarray(data.to_float(images[:batch], side))
        return x, labels[:batch].astype(np.int32), "fashion-mnist train[:batch]"
    except Exception as e:  # noqa: BLE001 - the benchmark must run without the data set
        rng = np.random.default_rng(seed)
        x = rng.random((batch, side, side, 1), np.float32)
        y = rng.integers(0, 10, batch).astype(np.int32)
        return x, y, f"uniform random (data set unavailable: {type(e).__name__})"


# ----------------------------------------------------------------------------- JAX side

# Fields that make flaxcnn's network compute in the book's order, where its default does less
# work for the same function: the FLOPs PyTorch's code does, for its GFLOP/s.
BOOK_ORDER = {"densenet": {"pool_first": False}}
BOOK_ORDER_WHY = {"densenet": "its transition blocks pool before their 1x1 convolutions"}


class JaxSide:
    def __init__(self, name, side, torch_net, x, y, device, dtype="float32"):
        import jax
        import jax.numpy as jnp

        from flaxcnn import models, porting, recipes, training

        self.jax = jax
        model = models.create(name, dtype=jnp.dtype(dtype))
        state = training.create_train_state(model, jax.random.key(0), side,
                                            training.sgd(recipes.get(name).lr))
        variables = porting.torch_to_flax(torch_net, model, (1, side, side, 1))
        state = state.replace(params=variables["params"],
                              batch_stats=variables.get("batch_stats", state.batch_stats))
        dev = jax.devices()[0] if device == "cpu" else jax.devices("gpu")[0]
        self.x = jax.device_put(jnp.asarray(x), dev)
        self.y = jax.device_put(jnp.asarray(y), dev)
        self.state = jax.device_put(state, dev)
        # Its own copy: the train step donates (deletes) the state's buffers.
        self.eval_vars = jax.tree.map(lambda a: jnp.array(a, copy=True), jax.device_put(
            {k: v for k, v in variables.items() if k in ("params", "batch_stats")}, dev))

        t = time.perf_counter()
        self.train = jax.jit(training.train_step, donate_argnums=0).lower(
            self.state, self.x, self.y).compile()
        self.train_compile_s = time.perf_counter() - t
        t = time.perf_counter()
        def infer(v, x):
            return model.apply(v, x, train=False)

        self.infer = jax.jit(infer).lower(self.eval_vars, self.x).compile()
        self.infer_compile_s = time.perf_counter() - t
        self.train_flops = harness.model_flops(training.train_step, self.state, self.x, self.y)
        self.infer_flops = harness.model_flops(infer, self.eval_vars, self.x)
        self.book_train_flops, self.book_infer_flops = self.train_flops, self.infer_flops
        if name in BOOK_ORDER:
            book = models.create(name, dtype=jnp.dtype(dtype), **BOOK_ORDER[name])
            self.book_train_flops = harness.model_flops(
                training.train_step, self.state.replace(apply_fn=book.apply), self.x, self.y)
            self.book_infer_flops = harness.model_flops(
                lambda v, x: book.apply(v, x, train=False), self.eval_vars, self.x)
        self.train_memory_plan = harness.xla_memory(self.train)
        self.infer_memory_plan = harness.xla_memory(self.infer)

    def logits(self):
        return self.infer(self.eval_vars, self.x)

    def train_steps(self, n):
        t = time.perf_counter()
        s = self.state
        for _ in range(n):
            s, m = self.train(s, self.x, self.y)
        self.jax.block_until_ready((s, m))
        self.state = s
        self.last_loss = float(m["loss"]) / self.x.shape[0]
        return (time.perf_counter() - t) / n

    def infer_steps(self, n):
        t = time.perf_counter()
        for _ in range(n):
            out = self.infer(self.eval_vars, self.x)
        out.block_until_ready()
        return (time.perf_counter() - t) / n


# ----------------------------------------------------------------------------- PyTorch side

class TorchSide:
    """One PyTorch mode: its own copy of the network (same initial weights) and optimizer."""

    def __init__(self, mode, name, net, x, y, device, dtype="float32"):
        import contextlib

        import torch
        import torch.nn.functional as F

        from flaxcnn import recipes

        self.torch, self.F, self.mode = torch, F, mode
        self.dev = torch.device("cuda" if device == "gpu" else "cpu")
        self.autocast = (lambda: torch.autocast(self.dev.type, dtype=torch.bfloat16)) \
            if dtype == "bfloat16" else contextlib.nullcontext
        net = copy.deepcopy(net).to(self.dev)
        xt = torch.tensor(x).permute(0, 3, 1, 2).contiguous().to(self.dev)
        if mode in ("channels_last", "compile"):
            net = net.to(memory_format=torch.channels_last)
            xt = xt.contiguous(memory_format=torch.channels_last)
        self.net = net
        self.x, self.y = xt, torch.tensor(y, dtype=torch.long, device=self.dev)
        self.opt = torch.optim.SGD(net.parameters(), lr=recipes.get(name).lr)
        if mode == "compile":
            # Dynamo counts recompilations per code object across networks (train, eval and
            # no-grad variants of each); without a reset the fifth network hits its limit and
            # silently runs eager.
            torch._dynamo.reset()
        self.fn = torch.compile(net) if mode == "compile" else net
        self.train_compile_s = self.infer_compile_s = None
        self.error = None

    def _sync(self):
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize()

    def _train_step(self):
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            out = self.fn(self.x)
        loss = self.F.cross_entropy(out.float(), self.y)
        loss.backward()
        self.opt.step()
        return loss.detach(), (out.detach().argmax(1) == self.y).sum()

    def warm_up(self):
        """First calls (compilation for torch.compile), timed, then a steady call of each."""
        self.net.train()
        t = time.perf_counter()
        self._train_step()
        self._sync()
        first = time.perf_counter() - t
        steady = self.train_steps(1)
        if self.mode == "compile":
            self.train_compile_s = max(first - steady, 0.0)
        self.net.eval()
        t = time.perf_counter()
        with self.torch.inference_mode(), self.autocast():
            self.fn(self.x)
        self._sync()
        first = time.perf_counter() - t
        steady = self.infer_steps(1)
        if self.mode == "compile":
            self.infer_compile_s = max(first - steady, 0.0)

    def train_steps(self, n):
        self.net.train()
        t = time.perf_counter()
        for _ in range(n):
            loss, _ = self._train_step()
        self._sync()
        self.last_loss = float(loss)
        return (time.perf_counter() - t) / n

    def infer_steps(self, n):
        self.net.eval()
        t = time.perf_counter()
        with self.torch.inference_mode(), self.autocast():
            for _ in range(n):
                self.fn(self.x)
        self._sync()
        return (time.perf_counter() - t) / n



# ----------------------------------------------------------------------------- the runners

def build_sides(kind, name, side, net, x, y, device, dtype, modes=()):
    """`kind` "jax": flaxcnn's runner (weights ported from `net`), with its compile times,
    FLOPs and the port check; "torch": one runner per PyTorch mode that works here. Returns
    (runners by mode, facts for the results, errors by mode)."""
    import numpy as np
    import torch

    info, errors, sides = {}, {}, {}
    if kind == "jax":
        jx = JaxSide(name, side, net, x, y, device, dtype)
        # Same weights, same batch: eval-mode logits must agree before anything is trained.
        net.eval()
        with torch.no_grad():
            ref = net(torch.tensor(x).permute(0, 3, 1, 2)).numpy()
        info = {"port_diff": float(np.max(np.abs(np.asarray(jx.logits()) - ref))),
                "compile_s": {"jax_train": jx.train_compile_s,
                              "jax_inference": jx.infer_compile_s},
                "flops": {"train": jx.train_flops, "inference": jx.infer_flops},
                "book_flops": {"train": jx.book_train_flops, "inference": jx.book_infer_flops},
                "memory_plan": {"train": jx.train_memory_plan,
                                "inference": jx.infer_memory_plan}}
        return {"jax": jx}, info, errors
    info["compile_s"] = {}
    for mode in modes:
        try:
            s = TorchSide(mode, name, net, x, y, device, dtype)
            s.warm_up()
            sides[mode] = s
            if s.train_compile_s is not None:
                info["compile_s"].update(torch_compile_train=s.train_compile_s,
                                         torch_compile_inference=s.infer_compile_s)
        except Exception as e:  # noqa: BLE001 - torch.compile may not work on every machine
            errors[mode] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    return sides, info, errors


def setup_frameworks(device, threads):
    """What the parent and every worker do before building anything: flaxcnn's XLA:CPU
    defaults, one platform, the thread count on both sides, float32 matrix products on a GPU.
    Returns (jax, torch)."""
    import jax
    import torch

    import flaxcnn  # noqa: F401 - the XLA:CPU defaults, before JAX starts

    # Compile times are cold: no program loaded from a persistent cache an earlier run filled
    # (torch.compile's side: `fresh_inductor_cache`).
    jax.config.update("jax_enable_compilation_cache", False)
    if device == "cpu":
        jax.config.update("jax_platforms", "cpu")
        harness.set_torch_threads(threads)
    else:
        jax.config.update("jax_default_matmul_precision", "highest")  # f32, as torch below
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return jax, torch


def fresh_inductor_cache() -> str:
    """Point torch.compile's on-disk caches at a new directory for this run, for the workers to
    inherit; removed at exit. Inductor otherwise loads the kernels an earlier run compiled (its
    default, /tmp/torchinductor_$USER, outlives the run), and its "compile time" is a load:
    1.4-4.7 s here against 10-195 s cold. TMPDIR too, for the parts inductor keeps in the default
    directory whatever TORCHINDUCTOR_CACHE_DIR says (its precompiled header; pad_mm's choices
    on a GPU), and Triton's kernels go under it. The pairs after the first reuse this run's
    kernels; only the first pair's compile times are reported."""
    import atexit
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="bench-torchinductor-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.environ["TMPDIR"] = path
    os.environ.pop("TRITON_CACHE_DIR", None)
    return path


def the_network(name, batch, side):
    """The batch and the book's PyTorch network with its seeded initial weights: the same in
    the parent and in every worker."""
    import torch

    from flaxcnn import torch_ref

    x, y, data_src = make_batch(batch, side)
    torch.manual_seed(0)
    return x, y, data_src, torch_ref.create(name)


def worker_main(kind, name, batch, side, device, threads, dtype, modes):
    """A child holding one framework's runners for one network: it builds them, reports what
    `build_sides` found, then times samples on request (a line "train|infer MODE STEPS" on
    stdin, one JSON line back on stdout) until stdin closes."""
    out = os.fdopen(os.dup(1), "w", buffering=1)  # the protocol; stray prints go to stderr
    os.dup2(2, 1)
    try:
        if device == "cpu":
            harness.set_threads(threads)
        setup_frameworks(device, threads)
        x, y, data_src, net = the_network(name, batch, side)
        sides, info, errors = build_sides(kind, name, side, net, x, y, device, dtype, modes)
        del net
        out.write(json.dumps({"info": info, "errors": errors, "modes": list(sides),
                              "data": data_src}, default=float) + "\n")
    except Exception as e:  # noqa: BLE001 - reported to the parent, which stops
        out.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
        return 1
    for line in sys.stdin:
        op, mode, n = line.split()
        s = sides[mode]
        sec = s.train_steps(int(n)) if op == "train" else s.infer_steps(int(n))
        out.write(json.dumps({"s": sec, "loss": getattr(s, "last_loss", None)}) + "\n")
    return 0


class Worker:
    """The parent's handle on a `worker_main` child."""

    def __init__(self, cli):
        import subprocess

        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *cli],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.hello = self._read()

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker exited (status {self.proc.wait()}); "
                               "its stderr is above")
        msg = json.loads(line)
        if "error" in msg:
            raise RuntimeError(f"benchmark worker failed: {msg['error']}")
        return msg

    def call(self, op, mode, n):
        self.proc.stdin.write(f"{op} {mode} {n}\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        """Ends the child (its stdin closing stops its loop); safe after it died."""
        try:
            self.proc.stdin.close()
        except OSError:  # a broken pipe: the child is gone already
            pass
        try:
            self.proc.wait(timeout=60)
        except Exception:  # noqa: BLE001 - never leave it running
            self.proc.kill()
            self.proc.wait()


class Remote:
    """A runner living in a `Worker`: the same `train_steps`/`infer_steps` as a local one."""

    def __init__(self, worker, mode):
        self.worker, self.mode = worker, mode

    def _run(self, op, n):
        r = self.worker.call(op, self.mode, n)
        if r.get("loss") is not None:
            self.last_loss = r["loss"]
        return r["s"]

    def train_steps(self, n):
        return self._run("train", n)

    def infer_steps(self, n):
        return self._run("infer", n)


# ----------------------------------------------------------------------------- memory (child)

def memory_child(name, mode, batch, side, device, threads, dtype="float32"):
    """Peak resident memory of a training run of `mode`, in this (fresh) process: the kernel's
    peak-RSS counter is reset after warm-up (compilation) and read after a few steps; the RSS
    before the network was built is subtracted. On a GPU: the device allocator's peak."""
    harness.set_threads(threads)
    import numpy as np

    import flaxcnn  # noqa: F401

    if device == "cpu":
        harness.set_torch_threads(threads)
    rng = np.random.default_rng(0)
    x = rng.random((batch, side, side, 1), np.float32)
    y = rng.integers(0, 10, batch).astype(np.int32)
    import jax
    import torch

    from flaxcnn import torch_ref

    jax.config.update("jax_enable_compilation_cache", False)  # as setup_frameworks
    if device == "cpu":
        jax.numpy.zeros(1).block_until_ready()  # the backend's own memory is not the network's
    base = harness.rss_mib()
    torch.manual_seed(0)
    net = torch_ref.create(name)
    side_obj = JaxSide(name, side, net, x, y, device, dtype) if mode == "jax" else \
        TorchSide(mode, name, net, x, y, device, dtype)
    del net
    if mode != "jax":
        side_obj.warm_up()
    side_obj.train_steps(2)
    if device == "gpu":
        if mode == "jax":
            stats = jax.devices("gpu")[0].memory_stats() or {}
            return {"peak_mib": stats.get("peak_bytes_in_use", float("nan")) / 2**20}
        return {"peak_mib": torch.cuda.max_memory_allocated() / 2**20}
    harness.trim_heap()
    ok = harness.reset_hwm()
    side_obj.train_steps(3)
    # Without the reset (old kernels) the peak includes compilation.
    return {"peak_mib": harness.hwm_mib() - base, "hwm_reset": ok}


# ----------------------------------------------------------------------------- one network

def start_sides(name, batch, side, args, device, torch_modes):
    """Builds the runners of one network: in this process (`--same-process`), else in a pair of
    fresh workers, JAX in one and PyTorch's `torch_modes` in the other. Returns the runners,
    the workers to close, and what building them found."""
    if args.same_process:
        x, y, data, net = the_network(name, batch, side)
        sides, info, errors = build_sides("jax", name, side, net, x, y, device, args.dtype)
        more, tinfo, errors = build_sides("torch", name, side, net, x, y, device, args.dtype,
                                          torch_modes)
        sides.update(more)
        return sides, [], info, tinfo, errors, data
    # Each framework in a process of its own, as its users run it: neither runs beside the
    # other's allocator state, thread pools and caches (in one process both ran slower, by
    # different and varying amounts; README).
    common = [name, str(batch), str(side), "--device", device, "--threads",
              str(args.threads_used), "--dtype", args.dtype]
    workers = []
    try:
        workers.append(Worker(["--worker", "jax", *common]))
        if torch_modes:
            workers.append(Worker(["--worker", "torch", *common,
                                   "--torch-modes", *torch_modes]))
    except RuntimeError:
        for w in workers:
            w.close()
        raise
    info, data = workers[0].hello["info"], workers[0].hello["data"]
    tinfo, errors = {"compile_s": {}}, {}
    sides = {"jax": Remote(workers[0], "jax")}
    if len(workers) > 1:
        tinfo, errors = workers[1].hello["info"], workers[1].hello["errors"]
        sides.update({m: Remote(workers[1], m) for m in workers[1].hello["modes"]})
    return sides, workers, info, tinfo, errors, data


def first_pair(res, jx, info, tinfo, errors, data, args, batch):
    """Records what the first pair of workers found (compile times, the port check, FLOPs) and
    returns the steps per timed sample: about `--sample-s` seconds of the JAX step, the same
    for every runner and every pair."""
    res["data"] = data
    log(f"  JAX compile: train {info['compile_s']['jax_train']:.1f} s, "
        f"inference {info['compile_s']['jax_inference']:.1f} s")
    res["port_check_max_abs_logit_diff"] = info["port_diff"]
    log(f"  ported weights: max |logit diff| JAX vs torch, eval mode = {info['port_diff']:.2e}")
    if "torch_compile_train" in tinfo["compile_s"]:
        log(f"  torch.compile: train {tinfo['compile_s']['torch_compile_train']:.1f} s, "
            f"inference {tinfo['compile_s']['torch_compile_inference']:.1f} s")
    for mode, e in errors.items():
        log(f"  torch {mode} failed: {e}")
    res["errors"] = errors
    res["compile_s"] = {**info["compile_s"], **tinfo["compile_s"]}
    res["flops_per_example"] = {k: (info["flops"][k] or 0) / batch
                                for k in ("train", "inference")}
    res["book_flops_per_example"] = {k: (info["book_flops"][k] or 0) / batch
                                     for k in ("train", "inference")}
    res["xla_memory_plan_mib"] = {
        k: {kk: round(vv / 2**20, 1) for kk, vv in (info["memory_plan"][k] or {}).items()}
        for k in ("train", "inference")}
    jx.train_steps(1)
    t_step = min(jx.train_steps(1), jx.train_steps(1))
    iters = args.iters or max(1, min(100, math.ceil(args.sample_s / t_step)))
    t_inf = min(jx.infer_steps(1), jx.infer_steps(1))
    iters_inf = args.iters or max(1, min(300, math.ceil(args.sample_s / t_inf)))
    res["iters_per_sample"] = {"train": iters, "inference": iters_inf}
    res["load_before"] = harness.load_average()
    return iters, iters_inf


def bench_network(name, args, device):
    from flaxcnn import recipes

    side = args.side or recipes.get(name).side
    batch = args.batch or (recipes.get(name).batch_size if device == "gpu"
                           else CPU_BATCH.get(name, CPU_BATCH_DEFAULT))
    log(f"\n== {name} @{side}, batch {batch}, load {harness.load_average()}")
    res = {"network": name, "side": side, "batch": batch}

    # Each pair of workers is a fresh draw of the host's phases: on the 2-vCPU guests here,
    # fresh processes of the same code ran at one of two levels up to 1.3x apart, a process
    # mostly keeping its level, and JAX's and PyTorch's levels moving in opposite phases
    # (benchmarks/xla_cpu_study.md). So the rounds are spread over `--processes` pairs started
    # one after the other, and the samples pooled.
    procs = args.processes
    per_proc = [args.rounds // procs + (i < args.rounds % procs) for i in range(procs)]
    train = infer = None
    res["by_process"] = []
    torch_modes = args.torch_modes
    for p, rounds in enumerate(per_proc):
        sides, workers, info, tinfo, errors, data = start_sides(name, batch, side, args, device,
                                                                torch_modes)
        try:
            if p == 0:
                iters, iters_inf = first_pair(res, sides["jax"], info, tinfo, errors, data,
                                              args, batch)
                # later pairs run what worked here, so the pooled lists stay round-aligned
                torch_modes = [m for m in torch_modes if m not in errors]
            elif errors:
                raise RuntimeError(f"{name}: in pair {p + 1} of {procs}, torch "
                                   + "; ".join(f"{m} failed: {e}" for m, e in errors.items())
                                   + " (it had worked in pair 1)")
            # the rotation goes on across pairs: each runner leads some rounds
            done = sum(per_proc[:p])
            tr = harness.interleave({m: (lambda s=s, n=iters: s.train_steps(n))
                                     for m, s in sides.items()},
                                    rounds, warmup=1, log=log if args.verbose else None,
                                    start=done)
            inf = harness.interleave({m: (lambda s=s, n=iters_inf: s.infer_steps(n))
                                      for m, s in sides.items()},
                                     rounds, warmup=1, log=log if args.verbose else None,
                                     start=done)
            # the last pair's losses: its networks start from the same weights as the first's
            res["final_loss"] = {m: s.last_loss for m, s in sides.items()
                                 if hasattr(s, "last_loss")}
        finally:  # a worker left running would hold a CPU
            for w in workers:
                w.close()
        train = tr if train is None else {m: train[m] + tr[m] for m in train}
        infer = inf if infer is None else {m: infer[m] + inf[m] for m in infer}
        pair = {kind: {m: harness.summarize(v, batch)["median"] for m, v in smp.items()}
                for kind, smp in (("train", tr), ("inference", inf))}
        res["by_process"].append({"rounds": rounds, **pair})
        if procs > 1:
            log(f"  pair {p + 1}/{procs}, {rounds} rounds: " + "; ".join(
                f"{kind} " + ", ".join(f"{m} {v:.1f}" for m, v in pair[kind].items())
                for kind in ("train", "inference")))
    res["load_after"] = harness.load_average()
    res["train"] = {m: harness.summarize(v, batch) for m, v in train.items()}
    res["inference"] = {m: harness.summarize(v, batch) for m, v in infer.items()}
    # round by round, for the paired ratios (`derived`) and anyone re-analysing the run
    res["samples_s"] = {"train": train, "inference": infer}
    res["processes"] = ("one" if args.same_process else
                        f"one per framework, {procs} pair{'s' if procs > 1 else ''}")
    for kind in ("train", "inference"):
        line = ", ".join(f"{m} {r['median']:.1f}" for m, r in res[kind].items())
        log(f"  {kind} ex/s: {line}")

    if args.memory:
        res["peak_memory_mib"] = {}
        for mode in ["jax", *[m for m in args.torch_modes if m not in res["errors"]]]:
            out = harness.run_child(
                [str(Path(__file__).resolve()), "--memory-child", name, mode, str(batch),
                 str(side), "--device", device, "--threads", str(args.threads_used),
                 "--dtype", args.dtype],
                timeout=args.child_timeout)
            res["peak_memory_mib"][mode] = out.get("peak_mib")
            if "error" in out:
                res.setdefault("memory_errors", {})[mode] = out["error"]
        log("  peak memory MiB: " + ", ".join(
            f"{m} {v:.0f}" if v is not None else f"{m} ?"
            for m, v in res["peak_memory_mib"].items()))
    return res


# ----------------------------------------------------------------------------- report

def fmt_rate(r):
    if r is None:
        return "n/a"
    return f"{r['median']:.1f} ({r['min']:.1f}-{r['max']:.1f})"


def paired_ratios(samples: dict[str, list[float]], mode: str) -> dict:
    """JAX's speed over PyTorch `mode`'s within each round (samples in seconds, one per runner
    and round): the runners of a round ran back to back, so a slow phase of the host that
    spans the round cancels, which it does not in the ratio of the two medians."""
    ratios = sorted(t / j for j, t in zip(samples["jax"], samples[mode], strict=True))
    return {"median": statistics.median(ratios), "min": ratios[0], "max": ratios[-1],
            "rounds_at_least_1": sum(q >= 1.0 for q in ratios), "n": len(ratios)}


def fmt_paired(d):
    p = d.get("jax_over_torch_best_paired")
    if not p:
        return "n/a"
    return (f"{p['median']:.2f} [{p['min']:.2f}-{p['max']:.2f}], "
            f"{p['rounds_at_least_1']}/{p['n']}")


def derived(res, peak_gflops):
    """JAX / best PyTorch mode and GFLOP/s figures of one network's result."""
    out = {}
    for kind in ("train", "inference"):
        rates = res[kind]
        torch_best = max((m for m in rates if m != "jax"), key=lambda m: rates[m]["median"],
                         default=None)
        paired = (paired_ratios(res["samples_s"][kind], torch_best)
                  if torch_best and "samples_s" in res else None)
        fpe = res["flops_per_example"][kind]
        book_fpe = res.get("book_flops_per_example", res["flops_per_example"])[kind]
        gf = fpe * rates["jax"]["median"] / 1e9
        out[kind] = {
            "torch_best_mode": torch_best,
            "jax_over_torch_best": rates["jax"]["median"] / rates[torch_best]["median"]
            if torch_best else None,
            "jax_over_torch_best_paired": paired,
            "jax_gflops": gf,
            "jax_fraction_of_gemm_peak": gf / peak_gflops if peak_gflops else None,
            "torch_best_gflops": book_fpe * rates[torch_best]["median"] / 1e9
            if torch_best else None,
        }
    return out


def markdown(report) -> str:
    m = report["machine"]
    procs = report["args"].get("processes", 1)
    peak = report["gemm_peak_gflops"]
    lines = [
        f"# JAX (flaxcnn) vs PyTorch: {report['device_kind']}",
        "",
        f"Machine: {m['cpu']} ({m['cpus_used']} of {m['logical_cpus']} logical CPUs used, "
        f"{', '.join(m['isa'])}; "
        + (f"{m['hypervisor']} guest" if m.get("hypervisor") else "bare metal") + "), "
        f"{m['memory_gib']} GiB RAM; {m['os']}."
        if report["device"] == "cpu" else f"Machine: {report['device_kind']}.",
        f"Versions: Python {m['python']}, jax {m['jax']}, jaxlib {m['jaxlib']}, "
        f"flax {m['flax']}, optax {m['optax']}, torch {m.get('torch')}. "
        f"Threads: {m['cpus_used']} for both (torch.set_num_threads, CPU affinity for XLA).",
        f"XLA_FLAGS: `{m['XLA_FLAGS'] or '(none)'}`. Commit {m['git_commit']}"
        + (f" (+{m['git_dirty_files']} modified files)" if m["git_dirty_files"] else "") + ".",
        f"Date: {report['date']}"
        + (f" to {report['date_end']}" if "date_end" in report else "")
        + f". Command: `{report['command']}`",
        f"Load average (1/5/15 min) at start {report['load_start']}, at end {report['load_end']}.",
        "",
        f"{report['args'].get('dtype', 'float32')} GEMM peak measured in this run: "
        f"**{peak:.0f} GFLOP/s** (best of jnp.dot "
        f"{report['gemm']['jax_best']:.0f} and torch.mm {report['gemm']['torch_best']:.0f}, "
        "square matrices, at start and end)."
        + (" Mixed precision on both sides: bfloat16 activations and matrix products, float32 "
           "parameters (flaxcnn `dtype=bfloat16`; PyTorch `torch.autocast(dtype=torch.bfloat16)`)."
           if report["args"].get("dtype") == "bfloat16" else ""),
        "",
        "## Training (examples/s, median (min-max) of interleaved samples)",
        "",
        "| network | side | batch | JAX (flaxcnn) | torch eager | torch channels_last "
        "| torch.compile | JAX / best torch | per round: median [min-max], rounds >= 1 "
        "| GFLOP/example | JAX GFLOP/s | % GEMM peak "
        "| compile s (JAX / torch.compile) | peak MiB (JAX / eager / CL / compile) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def mem(r):
        pm = r.get("peak_memory_mib") or {}
        return " / ".join(f"{pm[k]:.0f}" if pm.get(k) is not None else "-"
                          for k in ("jax", "eager", "channels_last", "compile"))

    for r in report["results"]:
        d = r["derived"]["train"]
        c = r["compile_s"]
        tc = c.get("torch_compile_train")
        lines.append(
            f"| {r['network']} | {r['side']} | {r['batch']} | **{fmt_rate(r['train']['jax'])}** "
            f"| {fmt_rate(r['train'].get('eager'))} | {fmt_rate(r['train'].get('channels_last'))}"
            f" | {fmt_rate(r['train'].get('compile'))} | **{d['jax_over_torch_best']:.2f}×** "
            f"| {fmt_paired(d)} "
            f"| {r['flops_per_example']['train'] / 1e9:.3f} | {d['jax_gflops']:.1f} "
            f"| {100 * d['jax_fraction_of_gemm_peak']:.0f}% | {c['jax_train']:.1f} / "
            f"{f'{tc:.1f}' if tc is not None else 'n/a'} | {mem(r)} |")
    lines += [
        "",
        "## Inference, eval mode (examples/s)",
        "",
        "| network | batch | JAX (flaxcnn) | torch eager | torch channels_last | torch.compile "
        "| JAX / best torch | per round: median [min-max], rounds >= 1 "
        "| GFLOP/example | JAX GFLOP/s | % GEMM peak "
        "| compile s (JAX / torch.compile) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        d = r["derived"]["inference"]
        c = r["compile_s"]
        tc = c.get("torch_compile_inference")
        lines.append(
            f"| {r['network']} | {r['batch']} | **{fmt_rate(r['inference']['jax'])}** "
            f"| {fmt_rate(r['inference'].get('eager'))} "
            f"| {fmt_rate(r['inference'].get('channels_last'))} "
            f"| {fmt_rate(r['inference'].get('compile'))} | **{d['jax_over_torch_best']:.2f}×** "
            f"| {fmt_paired(d)} "
            f"| {r['flops_per_example']['inference'] / 1e9:.3f} | {d['jax_gflops']:.1f} "
            f"| {100 * d['jax_fraction_of_gemm_peak']:.0f}% | {c['jax_inference']:.1f} / "
            f"{f'{tc:.1f}' if tc is not None else 'n/a'} |")
    for r in report["results"]:
        book = r.get("book_flops_per_example")
        if book and book != r["flops_per_example"]:
            lines += ["", (
                f"{r['network']}: flaxcnn's program does "
                f"{r['flops_per_example']['train'] / 1e9:.3f} GFLOP per training example and "
                f"{r['flops_per_example']['inference'] / 1e9:.3f} per inference, the book's "
                f"order, which PyTorch runs, {book['train'] / 1e9:.3f} and "
                f"{book['inference'] / 1e9:.3f} (the same function: "
                f"{BOOK_ORDER_WHY.get(r['network'], 'bench_vs_torch.BOOK_ORDER')}). "
                "JAX's GFLOP/s and % of the peak count its own, PyTorch's the book's.")]
    if any(len(r.get("by_process", ())) > 1 for r in report["results"]):
        lines += [
            "",
            "## By pair of worker processes (JAX examples/s, and JAX / the best torch mode)",
            "",
            "| network | training, pair by pair | inference, pair by pair |",
            "|---|---|---|",
        ]
        for r in report["results"]:
            cells = []
            for kind in ("train", "inference"):
                best = r["derived"][kind]["torch_best_mode"]
                cells.append(", ".join(
                    f"{q[kind]['jax']:.1f} ({q[kind]['jax'] / q[kind][best]:.2f})" if best
                    else f"{q[kind]['jax']:.1f}" for q in r["by_process"]))
            lines.append(f"| {r['network']} | {cells[0]} | {cells[1]} |")
    errs = {r["network"]: r["errors"] for r in report["results"] if r.get("errors")}
    lines += [
        "",
        "How it was measured: identical initial weights (the PyTorch network's, ported; the "
        "max |logit difference| in eval mode is checked before timing, largest here "
        f"{max(r.get('port_check_max_abs_logit_diff', 0) for r in report['results']):.1e}), "
        "one identical batch (the first training images at the book's side), plain SGD at the "
        "book's learning rate, dropout active in training on both sides. JAX: "
        "`jax.jit(flaxcnn.training.train_step, donate_argnums=0)`; eval: `model.apply(..., "
        "train=False)` jitted. PyTorch: `zero_grad; cross_entropy(net(x), y).backward(); "
        "opt.step()`, eval under `inference_mode`; channels_last converts the network and the "
        "batch; torch.compile compiles the network (default inductor) on channels_last input, "
        "the optimizer step stays eager. "
        + ("JAX and PyTorch ran in this one process (`--same-process`). "
           if report["args"].get("same_process") else
           "JAX ran in one worker process, PyTorch's modes in another; the parent asked each "
           "for its samples in turn (one runs while the other waits). "
           + (f"For each network {procs} such pairs of fresh processes ran one after the "
              "other and shared the rounds, and their samples are pooled"
              + (": on a virtual machine the speed comes in phases of seconds to minutes, "
                 "and a process tends to keep the level it started at "
                 "(benchmarks/xla_cpu_study.md)" if m.get("hypervisor") else "")
              + "; compile times are the first pair's. " if procs > 1 else ""))
        + ("In each pair every runner warms up, then all runners take turns "
           if procs > 1 else "Every runner warms up, then all runners take turns ")
        + f"({report['args']['rounds']} rounds in all, the order rotating each round"
        + (" and on from pair to pair" if procs > 1 else "") + "), each sample "
        "lasting about "
        f"{report['args']['sample_s']} s. JAX / best torch: the ratio of the medians, against "
        "the PyTorch mode with the best median; per round: the same ratio within each round "
        "(the runners of a round ran back to back, so a slow phase of the host that spans "
        "the round cancels), and in how many rounds JAX was at least as fast. GFLOP/example "
        "is XLA's cost analysis of the step "
        "traced without oneDNN (XLA's convolutions and flaxcnn's other CPU paths), since it sees "
        "nothing inside oneDNN's custom calls (a "
        "multiply-add counts 2). Compile time: XLA's lower + compile; torch.compile's "
        "first call minus a steady-state call; both cold (no persistent cache from an earlier "
        "run: JAX's off, inductor's a new directory for the run). Peak memory: each "
        "framework/mode in a fresh process, the peak resident set during steady training "
        "steps minus the resident set "
        "before the network was built (on CPU the process's whole footprint: weights, "
        "gradients, activations, workspaces, allocator slack).",
    ]
    if errs:
        lines += ["", "Failures: " + "; ".join(f"{n}: {e}" for n, e in errs.items())]
    return "\n".join(lines) + "\n"


def plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    results = report["results"]
    modes = ["jax", *TORCH_MODES]
    colors = {"jax": "#1f77b4", "eager": "#bbbbbb", "channels_last": "#ff9f40",
              "compile": "#d62728"}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    for ax, kind in zip(axes, ("train", "inference"), strict=True):
        names = [r["network"] for r in results]
        xs = np.arange(len(names))
        w = 0.8 / len(modes)
        for i, m in enumerate(modes):
            vals, lo, hi = [], [], []
            for r in results:
                rates = r[kind]
                best = max(v["median"] for k, v in rates.items() if k != "jax")
                v = rates.get(m)
                vals.append(v["median"] / best if v else np.nan)
                lo.append((v["median"] - v["min"]) / best if v else 0)
                hi.append((v["max"] - v["median"]) / best if v else 0)
            bars = ax.bar(xs + (i - 1.5) * w, vals, w, yerr=[lo, hi], capsize=2,
                          color=colors[m], label=MODE_LABEL[m])
            if m == "jax":
                for b, v in zip(bars, vals, strict=True):
                    ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                                ha="center", va="bottom", fontsize=8, xytext=(0, 3),
                                textcoords="offset points")
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xticks(xs, names, rotation=20)
        ax.set_title(f"{'training step' if kind == 'train' else 'inference (eval mode)'}")
        ax.set_ylabel("throughput / best PyTorch mode")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"flaxcnn (JAX) vs PyTorch, {report['device_kind']} "
                 f"({report['machine']['cpus_used']} threads), medians with min-max")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--networks", nargs="+", default=NETWORKS)
    p.add_argument("--batch", type=int, help="one batch for every network (default: 32 on a "
                   "CPU, 256 for LeNet; the book's batch on a GPU)")
    p.add_argument("--side", type=int, help="input side (default: the book's per network)")
    p.add_argument("--threads", type=int, help="CPU threads for both (default: all usable)")
    p.add_argument("--rounds", type=int, default=9,
                   help="interleaved samples per runner, in all (shared by the --processes "
                   "pairs)")
    p.add_argument("--processes", type=int,
                   help="pairs of fresh worker processes per network, one after the other, "
                   "sharing the rounds (default: 3, at most --rounds; 1 with --same-process)")
    p.add_argument("--sample-s", type=float, default=1.5, help="target seconds per sample")
    p.add_argument("--iters", type=int, help="fixed steps per sample (overrides --sample-s)")
    p.add_argument("--torch-modes", nargs="+", default=TORCH_MODES, choices=TORCH_MODES)
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="bfloat16: mixed precision on both sides (see the module docstring)")
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--child-timeout", type=float, default=1200)
    p.add_argument("--out-dir", default=str(harness.RESULTS))
    p.add_argument("--name", help="results file stem (default: the device kind)")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--same-process", action="store_true",
                   help="run JAX and PyTorch in this one process (before 2026-11-30 the only "
                   "way; default: each in a worker process of its own)")
    p.add_argument("--memory-child", nargs=4, metavar=("NET", "MODE", "BATCH", "SIDE"),
                   help=argparse.SUPPRESS)
    p.add_argument("--worker", nargs=4, metavar=("KIND", "NET", "BATCH", "SIDE"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error(f"--rounds must be at least 1, not {args.rounds}")
    if args.processes is None:
        args.processes = 1 if args.same_process else min(3, args.rounds)
    elif args.same_process and args.processes != 1:
        p.error("--same-process runs one process: --processes must be 1 with it")
    elif not 1 <= args.processes <= args.rounds:
        p.error(f"--processes must be between 1 and --rounds ({args.rounds}), "
                f"not {args.processes}")
    if args.device == "gpu":
        # Two processes share the GPU: neither may take most of its memory up front.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

    if args.device == "cpu":
        args.threads_used = harness.set_threads(args.threads)
    else:
        args.threads_used = args.threads or len(os.sched_getaffinity(0))
    child = args.worker or args.memory_child  # (jax, NET, ...) or (NET, jax, ...) for JAX's
    if child and "jax" in child[:2]:  # timed worker and memory child alike, as train.py:
        from flaxcnn import cpu  # the larger networks' steps on this thread (flaxcnn/cpu.py)

        cpu.dispatch_inline_for([int(child[3])])
    if args.memory_child:
        net, mode, batch, side = args.memory_child
        print(json.dumps(memory_child(net, mode, int(batch), int(side), args.device,
                                      args.threads_used, args.dtype)))
        return 0
    if args.worker:
        kind, net, batch, side = args.worker
        return worker_main(kind, net, int(batch), int(side), args.device, args.threads_used,
                           args.dtype, args.torch_modes)

    fresh_inductor_cache()
    _, torch = setup_frameworks(args.device, args.threads_used)
    if args.device == "cpu":
        kind = harness.cpu_device_kind(args.threads_used)
    else:
        kind = "gpu-" + harness.slug(torch.cuda.get_device_name())
    if args.dtype != "float32":
        kind += "-bf16"
    report = {
        "device": args.device, "device_kind": kind,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "command": "python benchmarks/bench_vs_torch.py " + " ".join(
            shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)),
        "args": {k: v for k, v in vars(args).items() if k not in ("memory_child", "worker")},
        "load_start": harness.load_average(),
        "machine": harness.machine_info(args.threads_used),
    }
    tdev = "cuda" if args.device == "gpu" else "cpu"
    sizes = (2048, 4096, 8192) if args.device == "gpu" else (1024, 2048, 3072)
    gemm = {"jax": [harness.gemm_peak_jax(sizes, dtype=args.dtype)],
            "torch": [harness.gemm_peak_torch(sizes, device=tdev, dtype=args.dtype)]}
    log(f"GEMM {args.dtype} GFLOP/s: jax {gemm['jax'][0]['gflops']:.0f}, "
        f"torch {gemm['torch'][0]['gflops']:.0f}")

    results = []
    for name in args.networks:
        results.append(bench_network(name, args, args.device))
    gemm["jax"].append(harness.gemm_peak_jax(sizes, dtype=args.dtype))
    gemm["torch"].append(harness.gemm_peak_torch(sizes, device=tdev, dtype=args.dtype))
    report["load_end"] = harness.load_average()
    report["date_end"] = time.strftime("%Y-%m-%d %H:%M %Z")
    report["gemm"] = {
        "runs": gemm,
        "jax_best": max(g["gflops"] for g in gemm["jax"]),
        "torch_best": max(g["gflops"] for g in gemm["torch"]),
    }
    peak = max(report["gemm"]["jax_best"], report["gemm"]["torch_best"])
    report["gemm_peak_gflops"] = peak
    for r in results:
        r["derived"] = derived(r, peak)
    report["results"] = results
    report["summary"] = {
        r["network"]: {"train_jax_over_torch_best": r["derived"]["train"]["jax_over_torch_best"],
                       "inference_jax_over_torch_best":
                           r["derived"]["inference"]["jax_over_torch_best"],
                       **{f"{k}_jax_over_torch_best_paired_median":
                          (r["derived"][k]["jax_over_torch_best_paired"] or {}).get("median")
                          for k in ("train", "inference")},
                       "train_fraction_of_gemm_peak":
                           r["derived"]["train"]["jax_fraction_of_gemm_peak"]}
        for r in results}

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or kind
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / f"{stem}.md").write_text(markdown(report))
    plot(report, out / f"{stem}.png")
    log(f"\nwrote {out / stem}.json, .md, .png")
    geo = statistics.geometric_mean(
        [r["derived"]["train"]["jax_over_torch_best"] for r in results])
    log(f"training, JAX / best torch: geometric mean {geo:.2f}; " + ", ".join(
        f"{r['network']} {r['derived']['train']['jax_over_torch_best']:.2f}" for r in results))
    for kind in ("train", "inference"):
        log(f"{kind}, per round (median [min-max], rounds >= 1): " + "; ".join(
            f"{r['network']} {fmt_paired(r['derived'][kind])}" for r in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
