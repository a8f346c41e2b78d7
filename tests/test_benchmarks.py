"""benchmarks/bench_vs_torch.py end to end, on the smallest network: each framework in a worker
process of its own, both trained from the same ported weights on the same batch."""

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _benchmark_module(name):
    """A script of benchmarks/ imported as a module (they import each other from there)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.mark.slow
def test_bench_vs_torch_runs_each_framework_in_its_own_worker(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_vs_torch.py"), "--networks",
           "lenet_bn", "--torch-modes", "eager", "--rounds", "3", "--processes", "2",
           "--iters", "1", "--no-memory", "--out-dir", str(tmp_path), "--name", "smoke"]
    # A persistent compilation cache the user gave JAX (writing every program) stays unused:
    # the compile times are cold.
    jax_cache = tmp_path / "jax-cache"
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(jax_cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not jax_cache.exists() or not any(jax_cache.iterdir())
    report = json.loads((tmp_path / "smoke.json").read_text())
    (result,) = report["results"]
    assert result["processes"] == "one per framework, 2 pairs"
    # the rounds shared by two pairs of fresh workers, one after the other, samples pooled
    assert [q["rounds"] for q in result["by_process"]] == [2, 1]
    assert all(set(q[k]) == {"jax", "eager"} for q in result["by_process"]
               for k in ("train", "inference"))
    # JAX's eval-mode logits against those of the PyTorch network its weights came from
    assert result["port_check_max_abs_logit_diff"] < 1e-5
    for kind in ("train", "inference"):
        assert set(result[kind]) == {"jax", "eager"}
        assert all(r["median"] > 0 for r in result[kind].values())
        # one sample per runner and round, kept for the paired (round by round) ratio
        samples = result["samples_s"][kind]
        assert {m: len(v) for m, v in samples.items()} == {"jax": 3, "eager": 3}
        paired = result["derived"][kind]["jax_over_torch_best_paired"]
        assert paired["n"] == 3
        assert math.isclose(paired["median"], sorted(
            t / j for j, t in zip(samples["jax"], samples["eager"], strict=True))[1])
        # pooled in pair order, every mode alike: pair 1's two rounds, then pair 2's one
        for m in ("jax", "eager"):
            rates = [result["batch"] / s for s in samples[m]]
            assert math.isclose(result["by_process"][0][kind][m], (rates[0] + rates[1]) / 2)
            assert math.isclose(result["by_process"][1][kind][m], rates[2])
    assert result["compile_s"]["jax_train"] > 0
    assert result["flops_per_example"]["train"] > 0
    assert result["book_flops_per_example"] == result["flops_per_example"]  # LeNet: no BOOK_ORDER
    # Both sides trained (a warm-up and a timed sample): finite losses came back.
    assert set(result["final_loss"]) == {"jax", "eager"}
    assert all(math.isfinite(v) for v in result["final_loss"].values())
    md = (tmp_path / "smoke.md").read_text()
    assert "worker process" in md and "For each network 2 such pairs of fresh processes" in md
    assert "## By pair of worker processes" in md
    assert (tmp_path / "smoke.png").stat().st_size > 0


@pytest.mark.parametrize("argv, message", [
    (["--rounds", "2", "--processes", "3"],
     "--processes must be between 1 and --rounds (2), not 3"),
    (["--processes", "0"], "--processes must be between 1 and --rounds (9), not 0"),
    (["--same-process", "--processes", "2"], "--processes must be 1 with it"),
    (["--rounds", "0"], "--rounds must be at least 1, not 0"),
])
def test_bench_vs_torch_refuses_bad_pair_counts(argv, message, capsys):
    main = _benchmark_module("bench_vs_torch").main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


class _Runner:
    """A stand-in for a worker's runner: every sample takes `s` seconds."""

    def __init__(self, s):
        self.s = s

    def train_steps(self, n):
        return self.s

    def infer_steps(self, n):
        return self.s


def _fake_pairs(monkeypatch, pairs):
    """`bench_network` on stand-in workers: pair i has the runners (and errors) `pairs[i]`;
    returns the torch modes each pair was asked for."""
    bench_vs_torch = _benchmark_module("bench_vs_torch")

    asked = []
    info = {"compile_s": {"jax_train": 1.0, "jax_inference": 0.5}, "port_diff": 0.0,
            "flops": {"train": 64e9, "inference": 32e9},
            "book_flops": {"train": 64e9, "inference": 32e9},
            "memory_plan": {"train": None, "inference": None}}

    def start_sides(name, batch, side, args, device, torch_modes):
        sides, errors = pairs[len(asked)]
        asked.append(list(torch_modes))
        return ({m: _Runner(s) for m, s in sides.items()}, [], info, {"compile_s": {}},
                errors, "fake")

    monkeypatch.setattr(bench_vs_torch, "start_sides", start_sides)
    return bench_vs_torch, asked


def _args(**kw):
    import argparse

    return argparse.Namespace(**{"batch": 32, "side": 96, "rounds": 4, "processes": 2,
                                 "iters": 1, "sample_s": 1.0, "verbose": False, "memory": False,
                                 "torch_modes": ["eager", "compile"], "same_process": False,
                                 **kw})


def test_bench_network_pools_pairs_and_asks_later_pairs_for_what_worked(monkeypatch):
    ok = ({"jax": 0.1, "eager": 0.2}, {"compile": "RuntimeError: no compiler"})
    bench, asked = _fake_pairs(monkeypatch, [ok, ({"jax": 0.4, "eager": 0.2}, {})])
    res = bench.bench_network("resnet18", _args(), "cpu")
    assert asked == [["eager", "compile"], ["eager"]]
    assert res["errors"] == {"compile": "RuntimeError: no compiler"}
    assert res["samples_s"]["train"] == {"jax": [0.1, 0.1, 0.4, 0.4], "eager": [0.2] * 4}
    assert [q["train"]["jax"] for q in res["by_process"]] == [320.0, 80.0]
    assert res["train"]["jax"]["median"] == 200.0  # pooled: (320 + 80) / 2


def test_bench_network_stops_when_a_mode_fails_in_a_later_pair(monkeypatch):
    sides = {"jax": 0.1, "eager": 0.2, "compile": 0.3}
    bench, _ = _fake_pairs(monkeypatch, [(sides, {}), ({"jax": 0.1, "eager": 0.2},
                                                       {"compile": "RuntimeError: died"})])
    with pytest.raises(RuntimeError, match="in pair 2 of 2, torch compile failed: "
                                           "RuntimeError: died"):
        bench.bench_network("resnet18", _args(), "cpu")


def test_interleave_goes_on_rotating_from_start():
    harness = _benchmark_module("harness")

    order = []
    runners = {m: (lambda m=m: order.append(m) or 1.0) for m in "abc"}
    harness.interleave(runners, 2, warmup=0, start=2)
    assert order == ["c", "a", "b", "a", "b", "c"]


def test_markdown_of_a_one_pair_run_has_no_pair_table():
    markdown = _benchmark_module("bench_vs_torch").markdown

    old = json.loads((ROOT / "benchmarks" / "results"
                      / "cpu-amd-epyc-f25m17-2t-e9f403b.json").read_text())
    md = markdown(old)
    assert "JAX ran in one worker process" in md
    assert "By pair" not in md and "such pairs" not in md


def test_torch_gflops_count_the_books_order_where_flaxcnn_does_less():
    """Where flaxcnn computes the same function with fewer FLOPs (DenseNet's transitions),
    PyTorch's GFLOP/s count the book's FLOPs, JAX's its own, and the markdown says so."""
    bench = _benchmark_module("bench_vs_torch")
    report = json.loads((ROOT / "benchmarks" / "results"
                         / "cpu-amd-epyc-f25m17-2t-e9f403b.json").read_text())
    r = next(r for r in report["results"] if r["network"] == "densenet")
    r["book_flops_per_example"] = {k: 1.1 * v for k, v in r["flops_per_example"].items()}
    d = bench.derived(r, report["gemm_peak_gflops"])
    for kind in ("train", "inference"):
        rates = r[kind]
        best = d[kind]["torch_best_mode"]
        assert math.isclose(d[kind]["torch_best_gflops"],
                            r["book_flops_per_example"][kind] * rates[best]["median"] / 1e9)
        assert math.isclose(d[kind]["jax_gflops"],
                            r["flops_per_example"][kind] * rates["jax"]["median"] / 1e9)
    r["derived"] = d
    md = bench.markdown(report)
    assert md.count("flaxcnn's program does") == 1
    assert "densenet: flaxcnn's program does" in md and "pool before their 1x1" in md


def test_paired_ratios_pair_each_round():
    paired_ratios = _benchmark_module("bench_vs_torch").paired_ratios

    # seconds per sample; round 2 is a slow phase of the host for both runners
    samples = {"jax": [1.0, 2.0, 1.0], "eager": [1.1, 2.2, 0.9], "compile": [5.0, 5.0, 5.0]}
    p = paired_ratios(samples, "eager")
    assert math.isclose(p["median"], 1.1) and math.isclose(p["max"], 1.1)
    assert math.isclose(p["min"], 0.9)
    assert (p["rounds_at_least_1"], p["n"]) == (2, 3)


def _report(tmp_path, name, pairs, ratios, batch=32):
    """A results file as bench_vs_torch.py writes it, reduced to what summarize_runs reads."""
    report = {"date": "2026-12-02 12:50 UTC", "machine": {"git_commit": "abc1234"},
              "results": [{"network": n, "batch": batch, "by_process": [{}] * pairs}
                          for n in ratios],
              "summary": {n: {"train_jax_over_torch_best": t, "inference_jax_over_torch_best": i,
                              "train_fraction_of_gemm_peak": 0.5} for n, (t, i) in ratios.items()}}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(report))
    return path


def test_summarize_runs_pools_the_runs_of_several_pairs(tmp_path, capsys):
    summarize_runs = _benchmark_module("summarize_runs")
    a = _report(tmp_path, "a", 3, {"nin": (0.9, 1.2), "vgg": (1.1, 1.0)})
    b = _report(tmp_path, "b", 3, {"nin": (1.6, 1.2)})
    one_pair = _report(tmp_path, "c", 1, {"nin": (0.1, 0.1)})
    runs = summarize_runs.load_runs([a, b, one_pair], min_pairs=3)
    assert [stem for stem, _ in runs] == ["a", "b"]  # the one-pair run is left out
    table = summarize_runs.summarize(runs)
    geo, lo, hi, at_least_1, n = table["nin"]["train"]
    assert math.isclose(geo, 1.2) and (lo, hi, at_least_1, n) == (0.9, 1.6, 1, 2)
    assert table["vgg"]["inference"] == (1.0, 1.0, 1.0, 1, 1)
    assert summarize_runs.main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "| nin | 1.200 [0.90-1.60], 1/2 | 1.200 [1.20-1.20], 2/2 | 50% [50-50%] |" in out
    # no qualifying run, and a file that is not a report: clear errors, non-zero exits
    assert summarize_runs.main([str(one_pair)]) == 1
    assert "pairs of worker processes" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert summarize_runs.main([str(tmp_path / "bad.json")]) == 2
    assert "not a bench_vs_torch.py results file" in capsys.readouterr().err


def test_summarize_runs_keeps_batches_apart(tmp_path):
    """A run at the book's batch (--batch 128) is not pooled with the runs at 32: a row each."""
    summarize_runs = _benchmark_module("summarize_runs")
    a = _report(tmp_path, "a", 3, {"nin": (0.9, 1.2), "vgg": (1.1, 1.0)})
    b = _report(tmp_path, "b", 3, {"nin": (1.6, 1.2)})
    book = _report(tmp_path, "book", 3, {"nin": (2.0, 0.5)}, batch=128)
    table = summarize_runs.summarize(summarize_runs.load_runs([a, book, b], min_pairs=3))
    assert list(table) == ["nin, batch 32", "nin, batch 128", "vgg"]
    geo, lo, hi, at_least_1, n = table["nin, batch 32"]["train"]
    assert math.isclose(geo, 1.2) and (lo, hi, at_least_1, n) == (0.9, 1.6, 1, 2)
    geo, lo, hi, at_least_1, n = table["nin, batch 128"]["inference"]
    assert math.isclose(geo, 0.5) and (lo, hi, at_least_1, n) == (0.5, 0.5, 0, 1)


def test_paired_ab_times_two_arms_in_pairs_and_restores_them():
    from flaxcnn import ops

    layer_choice_ab = _benchmark_module("layer_choice_ab")
    restore = layer_choice_ab.apply_arm("xla-max-pool")
    assert ops._NATIVE_MAX_POOL is False
    restore()
    assert ops._NATIVE_MAX_POOL is True
    paired = _benchmark_module("paired_ab").paired
    r = paired("lenet_bn", ["default", "xla-max-pool"], batch=8, pairs=3, steps=1)
    assert len(r["ratios"]) == 3 and all(x > 0 for x in r["ratios"])
    assert r["ci95"][0] <= r["median"] <= r["ci95"][1]
    assert ops._NATIVE_MAX_POOL is True


def test_conv_vs_onednn_lists_each_convolution_once_at_its_input():
    """conv_vs_onednn.py's layers: DenseNet's 20 convolutions, the transitions' 1x1 layers once
    each, on the pooled maps `densenet.PooledConv` hands its convolution."""
    conv_layers = _benchmark_module("conv_vs_onednn").conv_layers

    layers = conv_layers("densenet", 2, 96)
    assert sum(layers.values()) == 20
    assert sorted(k[0] for k in layers if k[1] == 1) == [
        (2, 3, 3, 240), (2, 6, 6, 224), (2, 12, 12, 192)]
