"""benchmarks/bench_vs_torch.py end to end, on the smallest network: each framework in a worker
process of its own, both trained from the same ported weights on the same batch."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_vs_torch_runs_each_framework_in_its_own_worker(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_vs_torch.py"), "--networks",
           "lenet_bn", "--torch-modes", "eager", "--rounds", "3", "--processes", "2",
           "--iters", "1", "--no-memory", "--out-dir", str(tmp_path), "--name", "smoke"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
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
        # the second pair's one round is the pooled list's last sample
        assert math.isclose(result["by_process"][1][kind]["jax"],
                            result["batch"] / samples["jax"][2])
    assert result["compile_s"]["jax_train"] > 0
    assert result["flops_per_example"]["train"] > 0
    # Both sides trained (a warm-up and a timed sample): finite losses came back.
    assert set(result["final_loss"]) == {"jax", "eager"}
    assert all(math.isfinite(v) for v in result["final_loss"].values())
    md = (tmp_path / "smoke.md").read_text()
    assert "worker process" in md and "For each network 2 such pairs of fresh processes" in md
    assert "## By pair of worker processes" in md
    assert (tmp_path / "smoke.png").stat().st_size > 0


def test_bench_vs_torch_refuses_more_pairs_than_rounds(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_vs_torch import main

    with pytest.raises(SystemExit) as e:
        main(["--rounds", "2", "--processes", "3"])
    assert e.value.code == 2
    assert "--processes must be between 1 and --rounds (2), not 3" in capsys.readouterr().err


def test_paired_ratios_pair_each_round():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_vs_torch import paired_ratios

    # seconds per sample; round 2 is a slow phase of the host for both runners
    samples = {"jax": [1.0, 2.0, 1.0], "eager": [1.1, 2.2, 0.9], "compile": [5.0, 5.0, 5.0]}
    p = paired_ratios(samples, "eager")
    assert math.isclose(p["median"], 1.1) and math.isclose(p["max"], 1.1)
    assert math.isclose(p["min"], 0.9)
    assert (p["rounds_at_least_1"], p["n"]) == (2, 3)
