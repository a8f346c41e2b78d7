"""`flaxcnn.cpu`: the XLA:CPU defaults are merged flag by flag and never override the user."""

import json
import os
import subprocess
import sys
from contextlib import nullcontext

import pytest

from flaxcnn import cpu

YNN = "xla_cpu_experimental_ynn_fusion_type"

PROBE = """
import json, os, sys
import flaxcnn
from flaxcnn import cpu
out = {"status": cpu.STATUS, "flags": os.environ.get("XLA_FLAGS", "")}
if "--compile" in sys.argv:
    import jax, jax.numpy as jnp
    from jax import lax
    def f(x, w):
        return jnp.sum(lax.conv_general_dilated(x, w, (1, 1), "SAME",
                       dimension_numbers=("NHWC", "HWIO", "NHWC")) ** 2)
    x, w = jnp.ones((2, 16, 16, 32)), jnp.ones((3, 3, 32, 64))
    text = jax.jit(jax.grad(f, argnums=1)).lower(x, w).compile().as_text()
    comp, where = None, []
    for line in text.splitlines():
        if line and not line.startswith(" ") and "{" in line:
            comp = line.split()[0]
        if " convolution(" in line:
            where.append(comp)
    # XLA's own convolutions sit in the entry computation; YNNPACK's inside fusions.
    out["conv_fused"] = any(c != "ENTRY" for c in where)
print(json.dumps(out))
"""


def probe(env_update, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", cpu.OPT_OUT_ENV)}
    env.update(env_update)
    env["JAX_PLATFORMS"] = "cpu"
    res = subprocess.run(
        [sys.executable, "-c", PROBE, *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_merge_keeps_user_flags():
    defaults = {"a": "", "b": "1"}
    assert cpu.merge_flags("", defaults) == "--a= --b=1"
    assert cpu.merge_flags("--a=dot --c", defaults) == "--a=dot --c --b=1"
    assert cpu.merge_flags("--b=0 --a", defaults) == "--b=0 --a"
    assert cpu.user_flag_names("--x=1 --y --z='a b'") == {"x", "y", "z"}


def test_defaults_applied_when_unset():
    out = probe({})
    assert out["status"] == "applied"
    assert f"--{YNN}={cpu.DEFAULT_XLA_FLAGS[YNN]}" in out["flags"].split()


def test_user_flag_preserved_and_others_merged():
    out = probe({"XLA_FLAGS": f"--{YNN}=dot --xla_cpu_use_thunk_runtime=true"})
    assert out["status"] == "already-set"
    assert out["flags"] == f"--{YNN}=dot --xla_cpu_use_thunk_runtime=true"
    other = probe({"XLA_FLAGS": "--xla_dump_hlo_as_text"})
    assert other["status"] == "applied"
    assert other["flags"].split()[0] == "--xla_dump_hlo_as_text"
    assert f"--{YNN}={cpu.DEFAULT_XLA_FLAGS[YNN]}" in other["flags"].split()


def test_opt_out():
    out = probe({cpu.OPT_OUT_ENV: "1"})
    assert out["status"] == "opted-out"
    assert out["flags"] == ""
    assert probe({cpu.OPT_OUT_ENV: "0"})["status"] == "applied"


def test_too_late_changes_nothing():
    environ = {"XLA_FLAGS": ""}
    import jax

    jax.devices()  # the backend now exists
    on_cpu = jax.default_backend() == "cpu"
    expect = pytest.warns(RuntimeWarning, match="imported after JAX") if on_cpu else nullcontext()
    with expect:
        assert cpu.apply_defaults(environ) == "too-late"
    assert environ == {"XLA_FLAGS": ""}


@pytest.mark.parametrize("opt_out", [False, True])
def test_defaults_reach_the_compiler(opt_out):
    out = probe({cpu.OPT_OUT_ENV: "1"} if opt_out else {}, "--compile")
    # With the defaults, convolutions are XLA's own, not YNNPACK fusions.
    assert out["conv_fused"] == opt_out
