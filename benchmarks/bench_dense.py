"""AlexNet's classifier (6400 -> 4096 -> 4096 -> 10, batch 32) alone: forward and forward+gradient
in JAX under the active XLA flags, and in PyTorch, on the same 2 threads.

On the Intel Xeon the dense layers' YNNPACK products ran at a third of MKL's speed
(benchmarks/xla_cpu_study.md, "An Intel Xeon"). Compare the dots' libraries with
`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE` (Eigen's dots)
against the default:

    python benchmarks/bench_dense.py
    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE \\
        python benchmarks/bench_dense.py
"""

import os
import statistics
import time

import flaxcnn  # noqa: F401  (its XLA:CPU defaults, unless XLA_FLAGS names the flag)

THREADS = 2
SIZES = (6400, 4096, 4096, 10)
BATCH = 32


def median_ms(fn, reps: int = 9) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def jax_times() -> tuple[float, float]:
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    keys = jax.random.split(jax.random.key(0), len(SIZES))
    x = jax.random.normal(keys[0], (BATCH, SIZES[0]))
    pairs = zip(SIZES, SIZES[1:], strict=False)
    ws = [jax.random.normal(k, ab) * 0.01 for k, ab in zip(keys[1:], pairs, strict=True)]

    def loss(ws, x):
        for w in ws[:-1]:
            x = jax.nn.relu(x @ w)
        return (x @ ws[-1]).sum()

    fwd, grad = jax.jit(loss), jax.jit(jax.grad(loss))
    return (median_ms(lambda: jax.block_until_ready(fwd(ws, x))),
            median_ms(lambda: jax.block_until_ready(grad(ws, x))))


def torch_times() -> tuple[float, float]:
    import torch

    torch.set_num_threads(THREADS)
    layers = []
    for a, b in zip(SIZES, SIZES[1:], strict=False):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers[:-1])
    x = torch.randn(BATCH, SIZES[0])

    def fwd():
        with torch.inference_mode():
            net(x)

    def grad():
        net.zero_grad()
        net(x).sum().backward()

    return median_ms(fwd), median_ms(grad)


def main():
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:THREADS]))
    print(f"XLA_FLAGS: {os.environ.get('XLA_FLAGS', '')}")
    print("JAX:     forward {:.1f} ms, forward+gradient {:.1f} ms".format(*jax_times()))
    try:
        print("PyTorch: forward {:.1f} ms, forward+gradient {:.1f} ms".format(*torch_times()))
    except ImportError:
        print("PyTorch: not installed")


if __name__ == "__main__":
    main()
