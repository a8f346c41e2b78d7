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


# ---------------------------------------------------------------- glibc huge pages (restart)

HUGE_PROBE = """
import json, os
import numpy as np
from flaxcnn import cpu
before = os.environ.get("FLAXCNN_PROBE_RUNS", "")
os.environ["FLAXCNN_PROBE_RUNS"] = before + "x"  # counts the runs of this code
cpu.reexec_with_huge_pages()
a = np.ones(64 << 18, np.float32)  # 64 MiB: mapped on its own, or (mmap_max=0) heap
eligible = None
with open("/proc/self/smaps") as f:
    inside = False
    for line in f:
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo <= a.ctypes.data < hi
        elif inside and head == "THPeligible:":
            eligible = int(line.split()[1])
print(json.dumps({"runs": os.environ["FLAXCNN_PROBE_RUNS"], "eligible": eligible,
                  "tunables": os.environ.get("GLIBC_TUNABLES", ""),
                  "status": cpu.huge_page_malloc()}))
"""


def restart_probe(code, env_update):
    """Runs `code` in a fresh CPU-only Python started without any of the restart's settings
    (plus `env_update`) and returns the JSON it prints last."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", cpu.HUGE_PAGES_OPT_OUT_ENV, cpu.ASYNC_DISPATCH_ENV,
                        "FLAXCNN_PROBE_RUNS")}
    env.update(env_update, JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def huge_probe(env_update):
    return restart_probe(HUGE_PROBE, env_update)


def here():
    """What `huge_page_malloc` says for a process started without any of the settings."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", cpu.HUGE_PAGES_OPT_OUT_ENV)}
    return cpu.huge_page_malloc(env)


def test_huge_page_status_reads_the_environment():
    assert cpu.huge_page_malloc({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}) == "active"
    assert cpu.huge_page_malloc({"GLIBC_TUNABLES": "a.b=1:glibc.malloc.hugetlb=2"}) == "active"
    assert cpu.huge_page_malloc({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) == "user-set"
    assert cpu.huge_page_malloc({cpu.HUGE_PAGES_OPT_OUT_ENV: "1"}) == "opted-out"
    assert cpu.huge_page_malloc({cpu.HUGE_PAGES_OPT_OUT_ENV: "0"}) == here()


def test_restart_gives_large_blocks_huge_pages():
    status = here()
    out = huge_probe({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=2048"})
    if status == "missing":  # this machine's case: the kernel's THP setting is "madvise"
        assert out["runs"] == "xx"  # the code ran twice: once before the restart, once after
        # the user's own tunables kept, the huge pages added
        assert out["tunables"] == ":".join(["glibc.rtld.optional_static_tls=2048",
                                            cpu.HUGE_PAGE_TUNABLE, *cpu.KEEP_MAPPED_TUNABLES])
        assert out["status"] == "active"
        assert out["eligible"] == 1
    else:  # nothing to gain (or possible) here: no restart
        assert out["runs"] == "x"


def test_no_restart_when_opted_out_or_already_set():
    out = huge_probe({cpu.HUGE_PAGES_OPT_OUT_ENV: "1"})
    assert (out["runs"], out["tunables"]) == ("x", "")
    if here() == "missing":
        assert out["eligible"] == 0  # glibc's default: small pages
    out = huge_probe({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert (out["runs"], out["tunables"]) == ("x", "glibc.malloc.hugetlb=0")


def test_tunables_the_user_set_are_kept():
    assert not cpu.keeps_step_memory({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    assert cpu.keeps_step_memory({"GLIBC_TUNABLES": ":".join(cpu.KEEP_MAPPED_TUNABLES)})
    assert not cpu.dispatch_inline({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    if here() != "missing":
        return  # no restart here: test_restart_gives_large_blocks_huge_pages checks that
    out = huge_probe({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000"})
    assert out["tunables"] == ":".join(["glibc.malloc.trim_threshold=1000",
                                        cpu.HUGE_PAGE_TUNABLE, "glibc.malloc.mmap_max=0"])


STEP_MEMORY_PROBE = """
import json, os, resource
from flaxcnn import cpu
cpu.reexec_with_huge_pages()
small = cpu.dispatch_inline_for([28])  # LeNet alone: asynchronous
inline = cpu.dispatch_inline_for([28, 96])
import jax, jax.numpy as jnp
x = jnp.arange(1 << 24, dtype=jnp.float32).reshape(4096, 4096)
f = jax.jit(lambda x: jnp.cumsum(jnp.sin(x), axis=0)[::8].sum())  # 128 MiB of temporaries
for _ in range(2):
    f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    f(x).block_until_ready()
print(json.dumps({"faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5,
                  "async": jax.config.read("jax_cpu_enable_async_dispatch"),
                  "small": small, "inline": inline,
                  "temp_mib": f.lower(x).compile().memory_analysis().temp_size_in_bytes / 2**20}))
"""


def step_memory_probe(env_update):
    return restart_probe(STEP_MEMORY_PROBE, env_update)


def test_step_memory_stays_mapped_between_calls():
    """The restart's tunables and `dispatch_inline` keep a computation's temporaries mapped
    from one call to the next: few page faults per call, against glibc's defaults (a fresh
    mapping per call) and against the same tunables with asynchronous dispatch (the runtime
    thread's arena maps the block afresh)."""
    if here() != "missing":
        return  # nothing is changed on this machine (test_restart... checks that)
    kept = step_memory_probe({})
    assert kept["temp_mib"] > 64 and kept["async"] is False
    assert (kept["small"], kept["inline"]) == (False, True)
    default = step_memory_probe({cpu.HUGE_PAGES_OPT_OUT_ENV: "1"})
    assert default["async"] is True
    threaded = step_memory_probe({cpu.ASYNC_DISPATCH_ENV: "true"})
    assert threaded["async"] is True and threaded["inline"] is False
    assert kept["faults"] * 20 < default["faults"], (kept, default)
    assert kept["faults"] * 2 < threaded["faults"], (kept, threaded)
