"""train.py and flaxcnn.trainer: every network learns, runs resume bit-identically, a diverging
loss stops the run, and bad flags fail before anything compiles."""

import json
import os
import signal
import subprocess
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxcnn import data, models, recipes, trainer, training
from flaxcnn.checkpoint import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The smallest side at which each network's architecture is intact and cheap on a CPU.
SMALL_SIDE = {
    "alexnet": 65, "vgg": 32, "vgg11": 32, "nin": 67, "googlenet": 32, "lenet_bn_scratch": 28,
    "lenet_bn": 28, "resnet18": 32, "densenet": 32,
}


@pytest.fixture(scope="module")
def small_batch():
    images, labels = data.load_split("train")
    return images[:32], labels[:32].astype(np.int32)


# GoogLeNet and DenseNet take 30-65 s here: marked slow, so that they start first.
@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n in ("googlenet", "densenet") else n
    for n in models.names()
])
def test_every_network_learns(name, small_batch):
    """A few SGD steps at the book's learning rate on one real batch lower its loss (dropout
    off, so that the loss of the same batch is comparable from step to step)."""
    images, labels = small_batch
    side = SMALL_SIDE[name]
    fields = {"dropout_rate": 0.0} if name in ("alexnet", "vgg", "vgg11", "nin") else {}
    model = models.create(name, **fields)
    lr = recipes.get(name).lr
    state = training.create_train_state(model, jax.random.key(0), side, training.sgd(lr))
    x, y = data.to_float(jnp.asarray(images), side), jnp.asarray(labels)
    step = jax.jit(training.train_step, donate_argnums=0)
    losses = []
    for _ in range(6):
        state, m = step(state, x, y)
        losses.append(float(m["loss"]) / int(m["count"]))
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0], losses


def _run(args, **kw):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--no-progress", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)


# Evaluation settings do not touch the parameters; precise BN is off to save its compilation.
# 36,000 images make an epoch of 141 steps, about a second here: the kill and the interrupt,
# sent 0.4 s after epoch 1's metrics, must land inside epoch 2 (with 12,000 images, about
# 0.35 s an epoch, the interrupted run once finished before the signal).
RUN = ["--model", "lenet_bn", "--train-size", "36000", "--test-size", "1000", "--epochs", "2",
       "--precise-bn", "0"]


def _final_params(workdir):
    cfg = trainer.Config(model="lenet_bn").resolved()
    model = trainer.build_model(cfg)
    template = training.create_train_state(model, jax.random.key(0), 28, training.sgd(1.0))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    state, meta = ckpt.restore(template)
    ckpt.close()
    return jax.device_get({"params": state.params, "bn": state.batch_stats}), meta


def _wait_for_epoch(proc, workdir, epoch, timeout=300):
    path = os.path.join(workdir, "metrics.jsonl")
    t0 = time.time()
    while time.time() - t0 < timeout:
        if os.path.exists(path):
            with open(path) as f:
                if sum(1 for _ in f) >= epoch:
                    return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise TimeoutError


@pytest.mark.slow
def test_killed_and_interrupted_runs_resume_bit_identically(tmp_path):
    straight = tmp_path / "straight"
    r = _run([*RUN, "--workdir", str(straight)])
    assert r.returncode == 0, r.stderr
    expected, meta = _final_params(straight)
    assert meta["epoch"] == 2

    # SIGKILL in the middle of epoch 2: the epoch-1 checkpoint survives; resume redoes epoch 2.
    killed = tmp_path / "killed"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--no-progress", *RUN,
           "--workdir", str(killed)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_epoch(proc, killed, 1)
    time.sleep(0.4)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.kill()
    proc.communicate()
    r = _run([*RUN, "--workdir", str(killed), "--resume"])
    assert r.returncode == 0, r.stderr
    assert "resumed from step" in r.stdout

    # SIGINT mid-epoch: a checkpoint of the exact batch is written; resume continues from it.
    interrupted = tmp_path / "interrupted"
    cmd[-1] = str(interrupted)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_epoch(proc, interrupted, 1)
    time.sleep(0.4)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "continue with --resume" in err
    _, meta = _final_params(interrupted)
    assert meta["epoch"] == 1 and 0 < meta["next_batch"], meta
    r = _run([*RUN, "--workdir", str(interrupted), "--resume"])
    assert r.returncode == 0, r.stderr

    for workdir in (killed, interrupted):
        got, meta = _final_params(workdir)
        assert meta["epoch"] == 2
        jax.tree_util.tree_map(np.testing.assert_array_equal, got, expected)
        with open(workdir / "metrics.jsonl") as f:
            assert [json.loads(line)["epoch"] for line in f] == [1, 2]
    assert (straight / "curves.png").stat().st_size > 0


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    """A loss that turns NaN in epoch 2 stops the run naming the epoch and step; the epoch-1
    checkpoint is still the latest and restores to finite parameters."""
    real_step = trainer.train_step
    poison_at = 5  # global step index; 4 steps per epoch below, so epoch 2's second batch

    def poisoned(state, x, y):
        new, m = real_step(state, x, y)
        return new, {**m, "loss": jnp.where(state.step >= poison_at, jnp.nan, m["loss"])}

    monkeypatch.setattr(trainer, "train_step", poisoned)
    cfg = trainer.Config(model="lenet_bn", train_size=1024, test_size=256, epochs=3,
                         workdir=str(tmp_path), progress=False, precise_bn=0)
    with pytest.raises(trainer.NonFiniteLoss, match="epoch 2, step 6 "):
        trainer.fit(cfg, log=lambda *a: None)
    state, meta = _final_params(tmp_path)
    assert meta["epoch"] == 1 and int(jax.device_get(state["params"]["Dense_0"]["bias"]).size)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(state))


@pytest.mark.parametrize("args, message", [
    (["--model", "lenet"], "invalid choice"),
    (["--lr", "0"], "--lr must be a positive number"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--model", "densenet", "--side", "20"], "needs at least 29"),
    (["--model", "alexnet", "--side", "64"], "needs at least 65"),
    (["--workdir", "/proc/flaxcnn"], "not writable"),
])
def test_usage_errors_before_compiling(args, message):
    t0 = time.time()
    r = _run(args)
    assert r.returncode == 2, r
    assert message in r.stderr
    assert "compiled in" not in r.stdout
    assert time.time() - t0 < 60


@pytest.mark.slow
def test_resume_needs_a_checkpoint_and_a_fresh_run_needs_an_empty_workdir(tmp_path):
    r = _run(["--workdir", str(tmp_path), "--resume"])
    assert r.returncode == 2 and "no checkpoint" in r.stderr
    cfg = dict(model="lenet_bn", train_size=512, test_size=256, epochs=1,
               workdir=str(tmp_path), progress=False, precise_bn=0)
    report = trainer.fit(trainer.Config(**cfg), log=lambda *a: None)
    assert 0.0 <= report["test_acc"] <= 1.0
    with pytest.raises(trainer.UsageError, match="earlier run"):
        trainer.fit(trainer.Config(**cfg), log=lambda *a: None)
    with pytest.raises(trainer.UsageError, match="different configuration"):
        trainer.fit(trainer.Config(**{**cfg, "lr": 0.5}, resume=True), log=lambda *a: None)


@pytest.mark.slow
def test_precise_bn_statistics_are_the_batch_statistics(small_batch):
    """`batch_statistics` returns each BatchNorm layer's mean and biased variance of the batch,
    for the built-in layer (mean/var) and the scratch one (moving_mean/moving_var)."""
    images, labels = small_batch
    x = data.to_float(jnp.asarray(images), 28)
    for name, mean_key, var_key, bn in (("lenet_bn", "mean", "var", "BatchNorm_0"),
                                        ("lenet_bn_scratch", "moving_mean", "moving_var",
                                         "BatchNorm_0")):
        model = models.create(name)
        state = training.create_train_state(model, jax.random.key(1), 28, training.sgd(1.0))
        stats = training.batch_statistics(state, x)
        _, inter = jax.jit(partial(model.apply, train=True,
                                   mutable=["batch_stats", "intermediates"]))(
            {"params": state.params, "batch_stats": state.batch_stats}, x)
        conv = inter["intermediates"]["00:Conv2d:Conv_0"][0]
        np.testing.assert_allclose(stats[bn][mean_key], conv.mean((0, 1, 2)), rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(stats[bn][var_key], conv.var((0, 1, 2)), rtol=1e-4,
                                   atol=1e-6)


@pytest.mark.slow
def test_compilation_cache_reloads_the_same_programs(tmp_path):
    """A second run loads its compiled steps from the persistent cache and trains
    bit-identically; `--compilation-cache off` writes nothing."""
    cache = tmp_path / "cache"
    run = ["--model", "lenet_bn", "--train-size", "2560", "--test-size", "512", "--epochs", "1",
           "--precise-bn", "0", "--compilation-cache", str(cache)]
    reports = []
    own = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}  # flaxcnn's limits
    for name in ("first", "second"):
        r = _run([*run, "--workdir", str(tmp_path / name)], env=own)
        assert r.returncode == 0, r.stderr
        with open(tmp_path / name / "report.json") as f:
            reports.append(json.load(f))
    assert reports[0]["compile_cache_hits"] == 0
    assert any(cache.iterdir())
    assert reports[1]["compile_cache_hits"] >= 2  # the train and eval steps
    assert "programs loaded from the compilation cache" in r.stdout
    assert "kept mapped" not in r.stdout  # LeNet's 10 ms steps stay asynchronous (cpu.py)
    for key in ("loss", "train_acc", "test_acc", "clean_train_acc"):
        assert reports[1][key] == reports[0][key], key
    first, _ = _final_params(tmp_path / "first")
    second, _ = _final_params(tmp_path / "second")
    jax.tree_util.tree_map(np.testing.assert_array_equal, second, first)

    # off wins over a cache configured for JAX, and over FLAXCNN_COMPILATION_CACHE=on
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg"), "FLAXCNN_COMPILATION_CACHE": "on",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax")}
    r = _run([*run[:-1], "off", "--no-checkpoint", "--workdir", str(tmp_path / "w-off")],
             env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "compilation cache" not in r.stdout
    # (the oneDNN library may be built under xdg/flaxcnn/onednn: not a compilation cache)
    assert not list((tmp_path / "xdg" / "flaxcnn").glob("xla-*"))
    assert not (tmp_path / "jax").exists() and not (tmp_path / "off").exists()


def test_compilation_cache_directory_choice(tmp_path, monkeypatch):
    from flaxcnn import compilation_cache as cc

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(cc.ENV, raising=False)
    default = cc.default_directory()
    assert default.startswith(str(tmp_path / "flaxcnn" / "xla-"))
    assert default == cc.default_directory()  # the same machine, the same folder
    for off in ("off", "0", "none", ""):
        monkeypatch.setenv(cc.ENV, off)
        assert cc.default_directory() is None
    for on in ("on", "1", "yes"):
        monkeypatch.setenv(cc.ENV, on)
        assert cc.default_directory() == default
    monkeypatch.setenv(cc.ENV, "~/somewhere")
    assert cc.default_directory() == os.path.expanduser("~/somewhere")


def test_compilation_cache_enable(tmp_path):
    """In fresh processes: a directory that cannot be written warns and leaves the cache off; a
    directory given to JAX is used by "auto" (keeping its limits) but not over an explicit one
    or FLAXCNN_COMPILATION_CACHE; "off" turns any cache off."""
    (tmp_path / "file").write_text("not a directory")
    own, ours = str(tmp_path / "own"), str(tmp_path / "ours")
    script = (
        "import sys, warnings, jax\n"
        "from flaxcnn import compilation_cache as cc\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    got = cc.enable(sys.argv[1])\n"
        "print(got, [str(x.message) for x in w])\n"
        "print(jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache,"
        " jax.config.jax_compilation_cache_max_size)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}

    def enable(arg, **extra):
        r = subprocess.run([sys.executable, "-c", script, arg], capture_output=True, text=True,
                           cwd=ROOT, timeout=120, env={**env, **extra})
        assert r.returncode == 0, r.stderr
        return r.stdout.splitlines()

    out = enable(str(tmp_path / "file" / "sub"))
    assert out[0].startswith("None ") and "no compilation cache: " in out[0], out
    assert out[1].split()[1] == "False"
    out = enable("auto", JAX_COMPILATION_CACHE_DIR=own, FLAXCNN_COMPILATION_CACHE="on")
    assert out == [f"{own} []", f"{own} True -1"]  # the user's cache, the user's limits
    out = enable("auto", JAX_COMPILATION_CACHE_DIR=own, FLAXCNN_COMPILATION_CACHE=ours)
    assert out == [f"{ours} []", f"{ours} True {2 << 30}"]
    out = enable(ours, JAX_COMPILATION_CACHE_DIR=own)
    assert out[0] == f"{ours} []"
    out = enable("off", JAX_COMPILATION_CACHE_DIR=own)
    assert out[0] == "None []" and out[1].split()[1] == "False"
    assert not (tmp_path / "own").exists()


def test_persistent_jit_loads_compiled_programs_by_their_key(tmp_path):
    """In fresh processes sharing a cache: the second loads both programs without compiling;
    a changed trace setting compiles a new one instead of running a stale program; a damaged
    file warns and is compiled again; with no cache enabled nothing is written."""
    script = (
        "import json, sys, warnings, jax, jax.numpy as jnp\n"
        "from flaxcnn import compilation_cache as cc\n"
        "cc.enable(sys.argv[1])\n"
        "SCALE = float(sys.argv[2])\n"
        "f = cc.persistent_jit(lambda x, *, n: x * SCALE + n, static_argnames='n',\n"
        "                      trace_state=lambda: (SCALE,))\n"
        "compiles, jax_hits = [], []\n"
        "jax.monitoring.register_event_listener(  # JAX's own cache (jnp.arange's program)\n"
        "    lambda e, **k: jax_hits.append(e) if e == '/jax/compilation_cache/cache_hits'"
        " else None)\n"
        "jax.monitoring.register_event_duration_secs_listener(\n"
        "    lambda e, d, **k: compiles.append(e) if e.endswith('backend_compile_duration')"
        " and 'lambda' in k.get('fun_name', '') else None)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    out = [f(jnp.arange(3.0), n=n).tolist() for n in (1, 2, 1)]\n"
        "ours = [str(x.message) for x in w if 'compiled' in str(x.message)"
        " or 'cannot load' in str(x.message)]\n"
        "hits = cc.counts()['hits'] - len(jax_hits)  # persistent_jit's\n"
        "print(json.dumps({'out': out, 'hits': hits, 'compiles': len(compiles),\n"
        "                  'warnings': ours}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}

    def run(cache, scale):
        r = subprocess.run([sys.executable, "-c", script, cache, scale], capture_output=True,
                           text=True, cwd=ROOT, timeout=120, env=env)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.splitlines()[-1])

    cache = tmp_path / "cache"
    executables = cache / "executables"
    first = run(str(cache), "2")
    assert first["out"] == [[1, 3, 5], [2, 4, 6], [1, 3, 5]]
    assert first["hits"] == 0 and first["compiles"] == 2
    assert len(list(executables.iterdir())) == 2
    second = run(str(cache), "2")
    assert second == {**first, "hits": 2, "compiles": 0}
    third = run(str(cache), "3")  # the same shapes, another trace-time setting
    assert third["out"] == [[1, 4, 7], [2, 5, 8], [1, 4, 7]] and third["compiles"] == 2
    assert len(list(executables.iterdir())) == 4
    for p in executables.iterdir():
        p.write_bytes(b"damaged")
    fourth = run(str(cache), "3")
    assert fourth["out"] == third["out"] and fourth["hits"] == 0
    assert len(fourth["warnings"]) == 2 and "recompiling: cannot load" in fourth["warnings"][0]
    # Programs JAX served from its own cache (compiles over MIN_COMPILE_SECONDS, on a slow
    # machine) are not kept: their files are removed, and the next run must still run.
    kept = sum(p.read_bytes() != b"damaged" for p in executables.iterdir())
    fifth = run(str(cache), "3")
    assert fifth["out"] == third["out"]
    assert fifth["hits"] == kept  # whole files replaced the damaged ones
    off = run("off", "2")
    assert off["out"] == first["out"] and off["compiles"] == 2


def test_persistent_jit_retraces_a_changed_setting_in_process():
    """trace_state() is part of the jax.jit function's own key: a setting changed in-process is
    traced anew, without clear_cache (and so never written to disk under a stale trace)."""
    from flaxcnn import compilation_cache as cc

    scale = [2.0]
    f = cc.persistent_jit(lambda x: x * scale[0], trace_state=lambda: (scale[0],))
    assert float(f(jnp.float32(1.0))) == 2.0
    scale[0] = 3.0
    assert float(f(jnp.float32(1.0))) == 3.0
    assert float(jax.jit(lambda x: f(x) + 1)(jnp.float32(1.0))) == 4.0  # inside another jit
