"""Soft-margin kernel support vector machines in JAX: C-SVC and epsilon-SVR.

The classical method AlexNet displaced, kept as the baseline the networks are measured against.

Problem (libsvm's form, Chang & Lin 2011). Both machines solve the dual

    min_a  1/2 a^T Q a + p^T a    s.t.  0 <= a_t <= C,  sum_t y_t a_t = 0,

with ``Q_ts = y_t y_s K(x_t, x_s)`` and the kernels

    linear   K = x . x'
    poly     K = (gamma x . x' + coef0) ** degree
    rbf      K = exp(-gamma |x - x'|^2)
    sigmoid  K = tanh(gamma x . x' + coef0)

* C-SVC: one variable per example, ``y_t = +-1``, ``p = -1``. The decision function is
  ``f(x) = sum_t y_t a_t K(x_t, x) - rho``.
* epsilon-SVR: two variables per example (``a_t`` with ``y = +1, p = eps - z_t`` and ``a*_t`` with
  ``y = -1, p = eps + z_t``); ``f(x) = sum_t (a_t - a*_t) K(x_t, x) - rho``.

Solver. Sequential minimal optimisation with large working sets, as ThunderSVM does it
(Wen et al. 2018), jit-compiled end to end (one `lax.while_loop` per binary problem; on a CPU
the same loop is one C++ custom call, `_solve_native`, whose products are oneDNN's: XLA:CPU
took 0.7-0.8 s to compile the loop's ~120 kernels, half of a cold 10,000-image fit):

1. keep the gradient ``G = Q a + p`` of all variables (as ``f = -y G``);
2. every outer step keeps the newer half of a working set of ``q`` variables (512 for
   Fashion-MNIST's 12,000-image pairs; smaller for small problems) and adds the ``q/2`` most
   violating variables not in it (the top of ``I_up`` by ``f`` and the bottom of ``I_low``);
3. the ``[q, q]`` kernel among the working set is carried over from the previous step except
   for the new half's ``[q/2, q]`` block (read from cached rows, else one small matrix product);
4. the sub-problem is solved by libsvm's SMO (maximal violating ``i``, second-order ``j``) in an
   inner `lax.while_loop`, until its own violation is below ``max(tol, 0.1 * its initial one)``;
5. ``f`` of all variables is updated with the full kernel rows of the variables that moved: a
   row is computed (in blocks of 64 rows, the last ones of 16: one [rows, d] x [d, n] matrix
   product each, ``|x|^2 + |x'|^2 - 2 x . x'`` for the RBF kernel) the first time its variable
   moves and kept in a row cache (all rows when they fit in ``cache_size`` MB, else least
   recently used out). Variables that enter the working set but stay at 0, most of them, cost
   no row of their own; they only fill a block's spare rows (`_speculative`). The n x n matrix is
   never formed, so all 60,000 Fashion-MNIST images fit in memory (one-vs-one pairs of 12,000
   images: 600 MB of cached rows at most, per concurrent problem);
6. stop when the maximal KKT violation ``max_{I_up} f - min_{I_low} f`` is below ``tol``
   (libsvm's criterion and default, ``tol = 1e-3``).

The arithmetic is float32 (matrix products are what the CPU does fastest); ``rho``, the dual
objective and the bookkeeping are float64 on the host, computed from the solver's float32
gradient as libsvm does from its double one. Two cares keep float32 honest about ``tol``: at
convergence the gradient is recomputed from the coefficients, summed in float64 (the
incremental float32 updates drift by up to ~1e-3 on Fashion-MNIST's largest problems, where
terms of +-5,000 cancel), and the solver resumes from it while that violation exceeds ``tol``
(up to 3 times); and on 8-bit images (values k/255, as Fashion-MNIST) the RBF kernel is
computed from the integers k - 128, whose dot products float32 gets exactly, removing the
cancellation error of ``|x|^2 + |x'|^2 - 2 x . x'`` (1e-5 of a kernel value otherwise, 4e-7
so). Those integers are kept in bfloat16, which holds them exactly: the products are the same
to the bit, and XLA:CPU's YNNPACK computes them 1.3-1.9x as fast as float32 ones (`_dot`), as
oneDNN does on CPUs with bfloat16 instructions (`_grid_dtype`).

Binary problems run side by side on `n_jobs` threads (default: one per core), which keeps both
cores busy while one problem is in its sequential inner loop.

Multiclass: one-vs-one (libsvm's and scikit-learn's choice, the default here): k(k-1)/2 binary
problems, each on the examples of two classes only. A kernel SVM's training cost grows faster
than linearly with the number of examples, so 45 problems on 2/10 of Fashion-MNIST each are
cheaper than 10 problems on all of it (`multiclass="ovr"`, also available; each of its
problems holds every training point, so at 60,000 images its kernel rows no longer fit a cache
and its support vectors are more numerous); see benchmarks/results/svm_cpu.md for the
measurement at 10,000 images. Votes decide, ties go to the lower class, as in libsvm.

Attributes follow scikit-learn (`support_`, `support_vectors_`, `n_support_`, `dual_coef_`,
`intercept_`, `classes_`, `n_iter_`, including the one-vs-one layout of `dual_coef_` and the sign
flip of binary problems), plus `dual_objective_`, `kkt_violation_`, `n_kernel_rows_` per
binary problem.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import gzip
import math
import numbers
import os
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from flaxcnn import compilation_cache, cpu, native

KERNELS = ("linear", "poly", "rbf", "sigmoid")
MULTICLASS = ("ovo", "ovr")
_TAU = 1e-12  # libsvm's TAU: a non-positive curvature is replaced by it
# an inner solve stops when its violation is below max(tol, _LOCAL_FACTOR * its initial one)
_LOCAL_FACTOR = 0.1
_TAIL = 16  # kernel rows are computed `chunk` at a time, the last few _TAIL at a time
# fill the spare rows of the last row block (`_speculative`); read when `_solve` is traced, so
# switching it (only to compare) needs `_solve.clear_cache()`
_SPECULATE = True
_GEMV = 64  # gradient updates read the changed kernel rows _GEMV at a time
_BLOCK = 32  # uncached kernel rows among the working set are computed _BLOCK at a time
# on a CPU, the inner SMO loop in C++ (native.py, _svm.cc) when it builds; False: XLA's always
_NATIVE_INNER = True
# on a CPU, the whole solver in C++ with oneDNN's products (_svm.cc) when it builds; False: XLA's
_NATIVE_OUTER = True
_REFRESHES = 3  # times the solver resumes after a float64 gradient showed it had not converged
# LLVM at -O1 for the solver's own code: compiles ~30% faster than the default, runs as fast
# (its time goes to matrix products, which are library calls, and to small loops)
_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}
_HOST_GRADIENT = 5e6  # float64 gradients of at most this many multiply-adds: on the host
_ROWS = 1024  # host passes over the points go this many rows at a time (temporaries in cache)
_BUCKET_STEPS = 8  # sizes are padded up to one of 8 steps per power of two (<= 12.5% padding)


def _trace_settings() -> tuple:
    """The settings above that the compiled solver reads when traced (its programs on disk are
    found by them too: compilation_cache.persistent_jit)."""
    outer = _native_outer()  # (then the inner loop is the C++ solver's own: no other library)
    return (_TAU, _LOCAL_FACTOR, _TAIL, _SPECULATE, _GEMV, _BLOCK,
            not outer and _native_inner(), outer)


def _native_inner() -> bool:
    """Whether `_inner_smo` runs the C++ loop (CPU backend, built; it is never built elsewhere)."""
    return _NATIVE_INNER and jax.default_backend() == "cpu" and native.svm_available()


def _native_outer() -> bool:
    """Whether `_solve` runs as one C++ call (`_solve_native`: CPU backend, built with oneDNN)."""
    return _NATIVE_OUTER and jax.default_backend() == "cpu" and native.svm_solve_available()


class NotFittedError(ValueError, AttributeError):
    """The estimator is used before `fit`."""


class ConvergenceWarning(UserWarning):
    """The solver stopped at `max_iter` before the KKT conditions held to `tol`."""


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


def _dot(a, b):
    """a @ b.T in float32 ([na, d] x [nb, d] -> [na, nb]), contracting the last axes as they
    lie: `jnp.dot(a, b.T)` on bfloat16 makes XLA:CPU transpose b at every call (2.8x slower).
    bfloat16 operands (integer points, see `_integer_grid`) have exact products, summed in
    float32 as the float32 ones are."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(
        a, b, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )


def _kernel_block(xa, xb, sqa, sqb, gamma, coef0, *, kernel: str, degree: int):
    """K(xa, xb) as a [len(xa), len(xb)] float32 block: one matrix product plus elementwise."""
    dot = _dot(xa, xb)
    if kernel == "linear":
        return dot
    if kernel == "poly":
        return lax.integer_pow(gamma * dot + coef0, degree)
    if kernel == "rbf":
        d2 = jnp.maximum(sqa[:, None] + sqb[None, :] - 2.0 * dot, 0.0)
        return jnp.exp(-gamma * d2)
    if kernel == "sigmoid":
        return jnp.tanh(gamma * dot + coef0)
    raise ValueError(f"unknown kernel {kernel!r}")


def kernel_matrix(xa, xb, kernel="rbf", gamma=1.0, coef0=0.0, degree=3):
    """K(xa, xb) in float32 (a convenience for tests and inspection; not used when training)."""
    _check_kernel(kernel, degree)
    xa = jnp.asarray(xa, jnp.float32)
    xb = jnp.asarray(xb, jnp.float32)
    return _kernel_block(
        xa, xb, jnp.sum(xa * xa, 1), jnp.sum(xb * xb, 1), jnp.float32(gamma), jnp.float32(coef0),
        kernel=kernel, degree=int(degree),
    )


# --------------------------------------------------------------------------------------------
# The solver (jit-compiled)
# --------------------------------------------------------------------------------------------


def _sets(alpha, y, c):
    """Masks of I_up (a can move in the direction of y) and I_low (against y)."""
    pos = y > 0
    below = alpha < c
    above = alpha > 0
    return jnp.where(pos, below, above), jnp.where(pos, above, below)


def _violation(f, alpha, y, c):
    up, low = _sets(alpha, y, c)
    return jnp.max(jnp.where(up, f, -jnp.inf)) - jnp.min(jnp.where(low, f, jnp.inf))


def _select(f, alpha, y, c, exclude, k: int):
    """k new working-set variables: k/2 from the top of I_up by f, the rest from the bottom of
    I_low, none from `exclude`. Returns (indices, valid); invalid slots (too few candidates)
    must not be used."""
    up, low = _sets(alpha, y, c)
    k_up = k // 2
    s_up = jnp.where(up & ~exclude, f, -jnp.inf)
    v_up, i_up = lax.top_k(s_up, k_up)
    ok_up = v_up > -jnp.inf
    taken = exclude.at[i_up].max(ok_up)
    s_low = jnp.where(low & ~taken, -f, -jnp.inf)
    v_low, i_low = lax.top_k(s_low, k - k_up)
    ok_low = v_low > -jnp.inf
    return jnp.concatenate([i_up, i_low]), jnp.concatenate([ok_up, ok_low])


def _inner_smo(kbb, alpha, f, y, c, valid, tol, max_inner):
    """libsvm's SMO on the working set: returns the new alphas and the number of iterations.

    kbb: [q, q] kernel among the working set; alpha, f, y, c, valid: [q]. The direction moving
    a_i by +y_i l and a_j by -y_j l keeps sum y a fixed and changes f by -l (K_i - K_j).

    On a CPU the same loop runs in C++ (`_inner_smo_native`): XLA launches each step's ~16
    small kernels one by one, a third of the 10,000-image fit's time.
    """
    if _native_inner():
        return lax.platform_dependent(
            kbb, alpha, f, y, c, valid, tol, cpu=partial(_inner_smo_native, max_inner=max_inner),
            default=partial(_inner_smo_xla, max_inner=max_inner),
        )
    return _inner_smo_xla(kbb, alpha, f, y, c, valid, tol, max_inner)


def _inner_smo_native(kbb, alpha, f, y, c, valid, tol, max_inner):
    """`_inner_smo_xla` as one custom call (flaxcnn/_svm.cc): the same steps, up to rounding."""
    f32 = jnp.float32
    out = (jax.ShapeDtypeStruct(alpha.shape, f32), jax.ShapeDtypeStruct((), jnp.int32))
    call = jax.ffi.ffi_call("flaxcnn_svm_inner_smo", out, vmap_method="sequential")
    return call(
        kbb.astype(f32), alpha.astype(f32), f.astype(f32), y.astype(f32), c.astype(f32),
        valid.astype(bool), jnp.asarray(tol, f32), jnp.int32(max_inner),
        tau=np.float32(_TAU), local_factor=np.float32(_LOCAL_FACTOR),
    )


def _inner_smo_xla(kbb, alpha, f, y, c, valid, tol, max_inner):
    """The definition of `_inner_smo`, compiled by XLA (every platform but the CPU's)."""
    diag = jnp.diagonal(kbb)

    def viol(alpha, f):
        up, low = _sets(alpha, y, c)
        up &= valid
        low &= valid
        fu = jnp.where(up, f, -jnp.inf)
        i = jnp.argmax(fu)
        return i, fu[i], jnp.min(jnp.where(low, f, jnp.inf)), low

    _, m0, lo0, _ = viol(alpha, f)
    local_tol = jnp.maximum(tol, _LOCAL_FACTOR * (m0 - lo0))

    def cond(s):
        it, _, _, done = s
        return (~done) & (it < max_inner)

    def body(s):
        it, alpha, f, _ = s
        i, m, lo, low = viol(alpha, f)
        done = (m - lo) < local_tol
        ki = kbb[i]
        a = diag[i] + diag - 2.0 * ki
        a = jnp.where(a > 0, a, _TAU)
        b = m - f
        cand = low & (b > 0)
        j = jnp.argmax(jnp.where(cand, b * b / a, -jnp.inf))
        kj = kbb[j]
        yi, yj, ai, aj, ci, cj = y[i], y[j], alpha[i], alpha[j], c[i], c[j]
        lim_i = jnp.where(yi > 0, ci - ai, ai)
        lim_j = jnp.where(yj > 0, aj, cj - aj)
        lam = jnp.minimum(jnp.minimum(b[j] / a[j], lim_i), lim_j)
        lam = jnp.where(done, 0.0, jnp.maximum(lam, 0.0))
        # land exactly on a bound when the step is clipped by it
        new_ai = jnp.where(lam >= lim_i, jnp.where(yi > 0, ci, 0.0), ai + yi * lam)
        new_aj = jnp.where(lam >= lim_j, jnp.where(yj > 0, 0.0, cj), aj - yj * lam)
        new_ai = jnp.where(done, ai, new_ai)
        new_aj = jnp.where(done, aj, new_aj)
        alpha = alpha.at[i].set(new_ai).at[j].set(new_aj)
        f = f - lam * (ki - kj)
        return it + (~done).astype(jnp.int32), alpha, f, done

    it, alpha, f, _ = lax.while_loop(cond, body, (jnp.int32(0), alpha, f, jnp.bool_(False)))
    return alpha, it


def _fetch(cache, slot_of, owner, stamp, it, pts, want, x, sq, gamma, coef0, *, kernel, degree,
           chunk):
    """Make the kernel rows of the points pts[want] resident in the cache.

    cache: [rows, n]; slot_of: [n] the cache slot of each point (-1: none); owner, stamp: [rows]
    the point in each slot and when it was last used (unused when rows >= n: then the slot of
    point i is i, and rows are never evicted). Missing rows are computed `chunk` at a time (the
    last few `_TAIL` at a time), each chunk one [chunk, d] x [d, n] matrix product plus
    elementwise work. Returns the cache state, the slot of each wanted point (0 for the others)
    and the number of rows computed."""
    rows, n = cache.shape
    full = rows >= n
    k = pts.shape[0]
    # a point may be wanted twice (epsilon-SVR): compute its row once
    first = jnp.full(n, k, jnp.int32).at[jnp.where(want, pts, n)].min(
        jnp.arange(k, dtype=jnp.int32), mode="drop"
    )
    need = want & (slot_of[pts] < 0) & (first[pts] == jnp.arange(k))
    n_need = jnp.sum(need.astype(jnp.int32))
    k_pad = -(-k // chunk) * chunk + _TAIL  # slices of either size stay inside
    todo_pts = jnp.zeros(k_pad, jnp.int32).at[:k].set(pts[jnp.argsort(~need, stable=True)])
    if full:
        victims = todo_pts
    else:
        # keep the wanted rows already cached, evict the least recently used others (rows >= 2k
        # leaves at least k candidates)
        cached = want & (slot_of[pts] >= 0)
        keep = jnp.where(cached, slot_of[pts], rows)
        stamp = stamp.at[keep].set(it, mode="drop")
        key = (-stamp).at[keep].set(jnp.iinfo(jnp.int32).min, mode="drop")
        _, victims = lax.top_k(key, k)
        victims = jnp.full(k_pad, rows, jnp.int32).at[:k].set(victims.astype(jnp.int32))

    def compute(start, size, cache, slot_of, owner):
        active = start + jnp.arange(size) < n_need
        p_b = lax.dynamic_slice(todo_pts, (start,), (size,))
        v_b = lax.dynamic_slice(victims, (start,), (size,))
        v_w = jnp.where(active, v_b, rows)
        block = _kernel_block(x[p_b], x, sq[p_b], sq, gamma, coef0, kernel=kernel, degree=degree)
        cache = cache.at[v_w].set(block, mode="drop")
        if not full:
            old = owner.at[v_w].get(mode="fill", fill_value=-1)
            slot_of = slot_of.at[jnp.where(old >= 0, old, n)].set(-1, mode="drop")
            owner = owner.at[v_w].set(p_b, mode="drop")
        slot_of = slot_of.at[jnp.where(active, p_b, n)].set(v_b, mode="drop")
        return cache, slot_of, owner

    def loop(size, start, stop, carry):
        def body(s):
            b, *carry = s
            return (b + size, *compute(b, size, *carry))

        return lax.while_loop(lambda s: s[0] < stop, body, (start, *carry))

    if _TAIL < chunk:  # whole chunks, then the rest in small ones
        b, *carry = loop(chunk, jnp.int32(0), n_need // chunk * chunk, (cache, slot_of, owner))
        _, *carry = loop(_TAIL, b, n_need, carry)
    else:
        _, *carry = loop(chunk, jnp.int32(0), n_need, (cache, slot_of, owner))
    cache, slot_of, owner = carry
    slots = jnp.where(want, slot_of[pts], 0)
    if not full:
        stamp = stamp.at[jnp.where(want, slots, rows)].set(it, mode="drop")
    return cache, slot_of, owner, stamp, slots, n_need


def _gradient_change(cache, slots, coef, n_changed):
    """sum_s coef_s cache[slots_s] over the first n_changed entries, _GEMV rows at a time."""
    q = coef.shape[0]
    q_pad = -(-q // _GEMV) * _GEMV
    coef = jnp.zeros(q_pad, jnp.float32).at[:q].set(coef)
    slots = jnp.zeros(q_pad, jnp.int32).at[:q].set(slots)

    def body(s):
        b, v = s
        cb = lax.dynamic_slice(coef, (b,), (_GEMV,))
        kr = cache[lax.dynamic_slice(slots, (b,), (_GEMV,))]
        kr = jnp.where((cb != 0)[:, None], kr, 0.0)
        return b + _GEMV, v + jnp.dot(cb, kr, precision=lax.Precision.HIGHEST)

    _, v = lax.while_loop(
        lambda s: s[0] < n_changed, body, (jnp.int32(0), jnp.zeros(cache.shape[1], jnp.float32))
    )
    return v


def _new_block(cache, slot_of, pts, valid, x, sq, kern):
    """K(new half of the working set, working set): [q/2, q]. Read from the cached rows where
    they exist; the others computed _BLOCK rows at a time."""
    q = pts.shape[0]
    h = q // 2
    new = pts[h:]
    slot = slot_of[new]
    cached = slot >= 0
    k = jnp.where(cached[:, None], cache[jnp.maximum(slot, 0)[:, None], pts[None, :]], 0.0)
    todo = valid[h:] & ~cached
    n_todo = jnp.sum(todo.astype(jnp.int32))
    order = jnp.argsort(~todo, stable=True)
    h_pad = -(-h // _BLOCK) * _BLOCK
    rows = jnp.full(h_pad, h, jnp.int32).at[:h].set(order.astype(jnp.int32))
    xs, sqs = x[pts], sq[pts]

    def body(s):
        b, k = s
        r = lax.dynamic_slice(rows, (b,), (_BLOCK,))
        p = new[jnp.minimum(r, h - 1)]
        blk = kern(x[p], xs, sq[p], sqs)
        return b + _BLOCK, k.at[r].set(blk, mode="drop")

    _, k = lax.while_loop(lambda s: s[0] < n_todo, body, (jnp.int32(0), k))
    return k


def _speculative(changed, valid, cached, chunk):
    """Working-set variables whose rows fill the last row block the changed ones start
    (`_fetch`: whole `chunk`-row blocks, then `_TAIL`-row ones).

    A block's product costs much the same however few of its rows are used (YNNPACK packs the
    [n, d] operand at every product), so its spare rows go to uncached members of the working
    set that did not move, the newer half (the last q/2, which stay for the next step) first:
    rows nearly for free that a later step may not have to compute. (In epsilon-SVR a point's
    two variables count twice: at worst a spare row is lost.)"""
    n_need = jnp.sum((changed & ~cached).astype(jnp.int32))
    if _TAIL < chunk:
        r = n_need % chunk
        spare = jnp.minimum((-r) % _TAIL, chunk - r)  # never past the next whole chunk
    else:
        spare = (-n_need) % chunk
    cand = valid & ~changed & ~cached
    rank = jnp.cumsum(cand[::-1].astype(jnp.int32))[::-1]  # from the end: newer half first
    return cand & (rank <= spare)


# The solver's state, a tuple of device arrays (positions below).
IT, N_INNER, N_ROWS, ALPHA, F, WS, VALID, KBB, CACHE, SLOT_OF, OWNER, STAMP, GAP = range(13)


def _init_state(cache, m, q, *also):
    """alpha = 0, an empty working set, the kernel-row cache (see `_fetch`); f is `_solve`'s
    argument. Made on the host: a compiled program for it would cost ~60 ms of a cold fit.
    `also`: host arrays sent to the device in the same transfer (each `device_put` call costs
    ~0.15 ms, and a fit solves 45 problems); returns (state, *also on the device)."""
    rows, n = cache.shape
    small = 1 if rows >= n else rows
    i32, f32 = np.int32, np.float32
    state, *also = jax.device_put(((
        i32(0), i32(0), i32(0), np.zeros(m, f32), np.zeros(m, f32), np.zeros(q, i32),
        np.zeros(q, bool), np.zeros((q, q), f32), None, np.full(n, -1, i32),
        np.full(small, -1, i32), np.full(small, -1, i32), f32(np.inf),
    ), *also))
    state = (*state[:CACHE], cache, *state[CACHE + 1 :])
    return (state, *also) if also else state


@partial(
    compilation_cache.persistent_jit, static_argnames=("kernel", "degree", "max_inner", "chunk"),
    donate_argnums=(0,), compiler_options=_COMPILER_OPTIONS, trace_state=_trace_settings,
)
def _solve(
    state, f, x_all, sq_all, points, pidx, y, c, gamma, coef0, tol, max_outer, threads, *,
    kernel, degree, max_inner, chunk,
):
    """Outer steps until the maximal KKT violation (from f) is below tol.

    f: [m] -y G to start from (it replaces the state's: a restart from a float64 gradient costs
    no second compiled program). Works on the points x_all[points] ([n, d]; sq_all: squared
    norms). pidx: [m] the point (0..n-1) of each variable; y, c: [m] sign and upper bound
    (c = 0 marks padding).

    Each outer step: keep the newer half of the working set, add the q/2 most violating
    variables not in it (as ThunderSVM), compute the kernel between the new ones and the
    working set ([q/2, q]; the rest of the [q, q] block is carried over), solve the sub-problem,
    and update all gradients with the full kernel rows of the variables that changed, computed
    when they are not cached yet. Variables that enter the working set but do not move cost no
    full row of their own; they only fill the spare rows of the last row block
    (`_speculative`, when every row fits in the cache). The state (with its cache) is donated
    and returned.

    On a CPU the loop is one C++ call (`_solve_native`; `threads`: the cores it may use).
    Compiled by XLA it is ~120 kernels, whose compilation was half of a cold 10,000-image fit."""
    if _native_outer():  # (it gathers the points itself: no XLA kernel to compile)
        return _solve_native(
            state, f, x_all, sq_all, points, pidx, y, c, gamma, coef0, tol, max_outer, threads,
            kernel=kernel, degree=degree, max_inner=max_inner, chunk=chunk,
        )
    x, sq = x_all[points], sq_all[points]
    m = y.shape[0]
    q = state[WS].shape[0]
    h = q // 2
    kern = partial(_kernel_block, gamma=gamma, coef0=coef0, kernel=kernel, degree=degree)
    state = (*state[:F], f, *state[F + 1 : GAP], _violation(f, state[ALPHA], y, c))

    def cond(s):
        return (s[GAP] > tol) & (s[IT] < max_outer)

    def body(s):
        it, n_inner, n_rows, alpha, f, ws, valid, kbb, cache, slot_of, owner, stamp, _ = s
        # the new working set: the newer half of the old one, then q/2 new variables
        exclude = jnp.zeros(m, bool).at[ws].max(valid)
        new, new_valid = _select(f, alpha, y, c, exclude, h)
        ws = jnp.concatenate([ws[h:], new])
        valid = jnp.concatenate([valid[h:], new_valid])
        pts = pidx[ws]
        k_new = _new_block(cache, slot_of, pts, valid, x, sq, kern)  # [h, q]
        kbb = jnp.concatenate(
            [jnp.concatenate([kbb[h:, h:], k_new[:, :h].T], axis=1), k_new], axis=0
        )
        kbb = jnp.where(valid[:, None] & valid[None, :], kbb, 0.0)
        # the sub-problem
        a_old = alpha[ws]
        a_new, n_in = _inner_smo(kbb, a_old, f[ws], y[ws], c[ws], valid, tol, max_inner)
        delta = jnp.where(valid, a_new - a_old, 0.0)
        alpha = alpha.at[jnp.where(valid, ws, m)].set(a_new, mode="drop")
        # the gradients: f -= sum_s y_s da_s K(., x_s) over the variables that moved
        changed = delta != 0
        n_changed = jnp.sum(changed.astype(jnp.int32))
        want = changed
        if _SPECULATE and cache.shape[0] >= cache.shape[1]:
            want = changed | _speculative(changed, valid, slot_of[pts] >= 0, chunk)
        # the changed variables first (the gradient update reads n_changed of them), then the rest
        order = jnp.argsort(jnp.where(changed, 0, jnp.where(want, 1, 2)), stable=True)
        cache, slot_of, owner, stamp, slots, n_new = _fetch(
            cache, slot_of, owner, stamp, it, pts[order], want[order], x, sq, gamma, coef0,
            kernel=kernel, degree=degree, chunk=chunk,
        )
        v = _gradient_change(cache, slots, (y[ws] * delta)[order], n_changed)
        f = f - v[pidx]
        return (
            it + 1, n_inner + n_in, n_rows + n_new, alpha, f, ws, valid, kbb, cache, slot_of,
            owner, stamp, _violation(f, alpha, y, c),
        )

    return lax.while_loop(cond, body, state)


def _solve_native(state, f, x_all, sq_all, points, pidx, y, c, gamma, coef0, tol, max_outer,
                  threads, *, kernel, degree, max_inner, chunk):
    """`_solve`'s loop as one custom call (flaxcnn/_svm.cc): the same steps up to rounding, the
    state updated in place (its outputs alias its inputs)."""
    f32, i32 = jnp.float32, jnp.int32
    if x_all.dtype == jnp.bfloat16 and not _cpu_bf16():  # (exact: the points are integers)
        x_all = x_all.astype(f32)  # oneDNN 2 has no bfloat16 products without AVX-512
    st = (*state[:F], f.astype(f32), *state[F + 1 : GAP])
    out = (*(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in st), jax.ShapeDtypeStruct((), f32))
    call = jax.ffi.ffi_call(
        "flaxcnn_svm_solve", out, input_output_aliases={i: i for i in range(GAP)},
    )
    return call(
        *st, x_all, sq_all.astype(f32), points.astype(i32), pidx.astype(i32), y.astype(f32),
        c.astype(f32),
        jnp.asarray(tol, f32), jnp.asarray(max_outer, i32), jnp.asarray(gamma, f32),
        jnp.asarray(coef0, f32), i32(max_inner), jnp.asarray(threads, i32),
        kernel=np.int32(KERNELS.index(kernel)), degree=np.int32(degree), chunk=np.int32(chunk),
        tail=np.int32(_TAIL), block=np.int32(_BLOCK), speculate=np.int32(_SPECULATE),
        tau=np.float32(_TAU), local_factor=np.float32(_LOCAL_FACTOR),
    )


@partial(
    compilation_cache.persistent_jit, static_argnames=("kernel", "degree", "chunk"),
    donate_argnums=(0,), compiler_options=_COMPILER_OPTIONS, trace_state=_trace_settings,
)
def _rows(state, x_all, sq_all, points, pts, want, gamma, coef0, *, kernel, degree, chunk):
    """The kernel rows [k, n] of the points pts[want] (zeros for the others), from the cache or
    computed into it. Returns (state, rows)."""
    x, sq = x_all[points], sq_all[points]
    s = list(state)
    s[CACHE], s[SLOT_OF], s[OWNER], s[STAMP], slots, n_new = _fetch(
        s[CACHE], s[SLOT_OF], s[OWNER], s[STAMP], s[IT], pts, want, x, sq, gamma, coef0,
        kernel=kernel, degree=degree, chunk=chunk,
    )
    s[N_ROWS] = s[N_ROWS] + n_new
    return tuple(s), jnp.where(want[:, None], s[CACHE][slots], 0.0)


def _bucket(n: int, minimum: int = 64) -> int:
    """n rounded up to one of `_BUCKET_STEPS` sizes per power of two (compiled shapes)."""
    if n <= minimum:
        return minimum
    step = max(1 << (n.bit_length() - 1) >> int(math.log2(_BUCKET_STEPS)), 1)
    return -(-n // step) * step


def _working_set_size(m: int, q: int) -> int:
    """The even working-set size for m variables: q, or less for small problems (at most the
    power of two <= m / 12, at least 64). On Fashion-MNIST's one-vs-one pairs, fits interleaved
    (README): 2,000 images 128 (1.10x faster than 256), 6,000 256 (512 as fast or slower),
    12,000 512 (faster than 256). A larger set means fewer outer steps, but each step computes
    the kernel between its new half and the whole set."""
    q = max(int(q), 4)
    q -= q % 2
    return min(q, max(64, 1 << (max(m // 12, 1).bit_length() - 1)))


class _Problem:
    """One binary dual problem on host arrays, solved by `_solve`."""

    @staticmethod
    def solve(
        x_host, x_all, sq_all, points, y, p, c, pidx, *, kernel, gamma, coef0, degree, tol,
        max_iter, q, max_inner, cache_size, chunk, workspace=None, pad_to=0, threads=1,
    ):
        """x_host: all points (float32, host); x_all, sq_all: the same (float32, or bfloat16
        for integer points) and their float32 squared norms on the device; points: [n] the
        problem's points among them; y, p, c: [m] float64; pidx: [m] int, the point (0..n-1)
        of each variable.

        workspace: a dict holding the kernel-row buffer between calls (reused when the next
        problem has the same shape), or None. pad_to: pad to the size of a problem this large
        (so that problems of similar sizes share one compiled solver). threads: the CPU cores
        its matrix products may use (the C++ solver's; XLA's share one pool).
        Returns a dict with alpha (float64 [m]), grad, rho, obj, iterations, violation."""
        n = len(points)
        m = y.shape[0]
        n_pad, m_pad = _bucket(max(n, pad_to)), _bucket(max(m, pad_to))
        pts = np.zeros(n_pad, np.int32)  # padding: point 0, never used (its variables have C=0)
        pts[:n] = points
        pid = np.zeros(m_pad, np.int32)
        pid[:m] = pidx
        yp = np.ones(m_pad, np.float32)
        yp[:m] = y
        pp = np.zeros(m_pad, np.float32)
        pp[:m] = p
        cp = np.zeros(m_pad, np.float32)  # padding: C = 0, never in I_up or I_low
        cp[:m] = c
        qq = _working_set_size(max(m, pad_to), q)
        chunk = max(1, min(int(chunk), qq // 2))
        # the cache: all rows if they fit in cache_size MB, else as many as fit (>= 2 q)
        rows = min(n_pad, max(int(cache_size * 2**20) // (4 * n_pad), 1))
        if rows < n_pad:
            rows = max(rows, 2 * qq)
        cache = workspace.pop((rows, n_pad), None) if workspace is not None else None
        if cache is None:
            cache = _zeros((rows, n_pad))
        f = -yp * pp  # -y G at alpha = 0
        state, points_d, pid_d, yj, cj, f_d = _init_state(cache, m_pad, qq, pts, pid, yp, cp, f)
        dev = dict(
            x_all=x_all, sq_all=sq_all, points=points_d, gamma=np.float32(gamma),
            coef0=np.float32(coef0), kernel=kernel, degree=int(degree),
        )
        limit = np.int32(max_iter if max_iter > 0 else np.iinfo(np.int32).max)
        for r in range(_REFRESHES + 1):
            state = _solve(
                state, f_d, pidx=pid_d, y=yj, c=cj, tol=np.float32(tol), max_outer=limit,
                threads=np.int32(threads), max_inner=int(max_inner), chunk=chunk, **dev,
            )
            alpha = np.asarray(state[ALPHA], np.float64)[:m]
            # the gradient again from alpha, summed in float64 (the solver's float32 one drifts
            # by up to ~1e-3 on Fashion-MNIST's largest problems)
            state, grad = _gradient64(
                state, alpha, y, p, pidx, n, chunk, dev, 512 if rows >= n_pad else rows // 2,
                x_host, points, (kernel, gamma, coef0, int(degree)),
            )
            gap = _violation64(alpha, grad, y, c)
            if gap <= tol or int(state[IT]) >= max_iter > 0 or r == _REFRESHES:
                break
            f = f.copy()  # the padding keeps its value
            f[:m] = -y * grad
            f_d = jax.device_put(f)
        if workspace is not None:
            workspace.clear()  # keep one buffer at most
            workspace[(rows, n_pad)] = state[CACHE]
        return {
            "alpha": alpha,
            "grad": grad,
            "rho": _rho(alpha, grad, y, c),
            "obj": 0.5 * float(alpha @ (grad + p)),
            "outer": int(state[IT]),
            "inner": int(state[N_INNER]),
            "kernel_rows": int(state[N_ROWS]),
            "cache_rows": rows,
            "violation": gap,
            "converged": bool(gap <= tol),
            "refreshes": r,
            "q": qq,
        }


def _gradient64(state, alpha, y, p, pidx, n, chunk, dev, block, x_host, points, kp):
    """G = Q alpha + p in float64 from the float32 kernel rows of the points with a nonzero
    coefficient ([block, n] at a time, from the cache or computed); small problems compute
    the kernel in float64 on the host (x_host[points]: the problem's points, gathered only
    then; kp: kernel, gamma, coef0, degree). Returns (state, G)."""
    coef = np.bincount(pidx, weights=y * alpha, minlength=n)  # per point: sum of y a
    nz = np.flatnonzero(coef)
    v = np.zeros(n)
    if len(nz) * n * x_host.shape[1] <= _HOST_GRADIENT:
        x = x_host[points]
        k = _kernel64(x[nz], x, *kp)
        return state, y * (coef[nz] @ k)[pidx] + p
    # With every row in its own slot (the slot of point i is i) and the cache in host memory,
    # the rows are read where they lie (no compiled gather, and no compilation of `_rows`):
    # every point with a nonzero coefficient has moved, so its row is cached.
    cache, host = state[CACHE], None
    if cache.shape[0] >= cache.shape[1] and _host_memory(cache) and (
        np.asarray(state[SLOT_OF])[nz] == nz
    ).all():
        host = np.asarray(cache)  # a view, dropped before the cache is donated again
    for start in range(0, len(nz), block):
        part = nz[start : start + block]
        if host is not None:
            rows = host[part, :n]
        else:
            pts = np.zeros(block, np.int32)
            pts[: len(part)] = part
            want = np.arange(block) < len(part)
            state, rows = _rows(
                state, pts=jax.device_put(pts), want=jax.device_put(want), chunk=chunk, **dev
            )
            rows = np.asarray(rows)[: len(part), :n]
        # einsum sums in float64 without a float64 copy of the rows, and without waking
        # OpenBLAS's threads, whose spinning slows the other job's solver (a 7x faster sum)
        v += np.einsum("i,ij->j", coef[part], rows, dtype=np.float64)
    return state, y * v[pidx] + p


def _host_memory(a) -> bool:
    """Whether the device array lives in host memory (a CPU device), where numpy reads it
    without a transfer."""
    return all(d.platform == "cpu" for d in a.devices())


def _kernel64(a, b, kernel, gamma, coef0, degree):
    """K(a, b) in float64 with numpy (the solver's kernels)."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    dot = a @ b.T
    if kernel == "linear":
        return dot
    if kernel == "poly":
        return (gamma * dot + coef0) ** degree
    if kernel == "rbf":
        d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * dot
        return np.exp(-gamma * np.maximum(d2, 0))
    return np.tanh(gamma * dot + coef0)


def _violation64(alpha, grad, y, c):
    f = -y * grad
    up = np.where(y > 0, alpha < c, alpha > 0)
    low = np.where(y > 0, alpha > 0, alpha < c)
    if not up.any() or not low.any():
        return 0.0
    return float(f[up].max() - f[low].min())


def _rho(alpha, grad, y, c):
    """libsvm's calculate_rho: the mean of y G over free variables, else the feasible midpoint."""
    yg = y * grad
    at_up = alpha >= c
    at_low = alpha <= 0
    free = ~at_up & ~at_low
    if free.any():
        return float(yg[free].mean())
    # bounded variables bracket rho: ub from those that may move up, lb from the others
    ub_mask = (at_up & (y < 0)) | (at_low & (y > 0))
    lb_mask = (at_up & (y > 0)) | (at_low & (y < 0))
    ub = yg[ub_mask].min() if ub_mask.any() else np.inf
    lb = yg[lb_mask].max() if lb_mask.any() else -np.inf
    return float((ub + lb) / 2)


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _check_kernel(kernel, degree):
    if not isinstance(kernel, str) or kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
    if kernel == "poly" and (
        isinstance(degree, bool) or not isinstance(degree, numbers.Integral) or degree < 1
    ):
        raise ValueError(f"degree must be an integer >= 1 for the poly kernel, not {degree!r}")


def _check_x(x, name="X", n_features=None) -> np.ndarray:
    """X as a C-contiguous float32 [n, d] array (the solver's precision), after checking that it
    is a non-empty 2-D array of finite real numbers (also after the conversion)."""
    try:
        arr = np.asarray(x)
    except Exception as e:  # ragged lists and the like
        raise ValueError(f"{name} must be a 2-D array of numbers: {e}") from e
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{name} must hold numbers, not {arr.dtype}")
    if np.iscomplexobj(arr):
        raise ValueError(f"{name} must be real, not complex")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n_samples, n_features], got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    if n_features is not None and arr.shape[1] != n_features:
        raise ValueError(
            f"{name} has {arr.shape[1]} features, but the model was fitted with {n_features}"
        )
    x32 = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(x32).all():
        bad = ~np.isfinite(x32)
        r, col = np.argwhere(bad)[0]
        v = arr[r, col]
        kind = "NaN" if np.isnan(v) else "Inf" if np.isinf(v) else f"{v!r}, too large for float32"
        raise ValueError(
            f"{name} contains NaN or Inf ({int(bad.sum())} entries; first: {kind} at row {r},"
            f" column {col})"
        )
    return x32


def _variance(x, block=_ROWS) -> float:
    """x.var() over all entries, accumulated in float64 block by block (scikit-learn's
    gamma='scale' uses X.var())."""
    n = x.size
    mean = sum(float(x[i : i + block].sum(dtype=np.float64)) for i in range(0, len(x), block)) / n
    ss = 0.0
    for i in range(0, len(x), block):
        d = x[i : i + block].astype(np.float64) - mean
        ss += float(np.einsum("ij,ij->", d, d))
    return ss / n


def _to_device(x32, dtype=jnp.float32):
    """The points (as dtype) and their squared norms (summed in float64, stored in float32) as
    device arrays. Computed on the host: eager device operations would each compile a program
    (~0.1 s of a cold fit)."""
    sq = np.einsum("ij,ij->i", x32, x32, dtype=np.float64).astype(np.float32)
    return jax.device_put(x32.astype(dtype, copy=False)), jax.device_put(sq)


@contextlib.contextmanager
def _gc_paused():
    """Python's cyclic garbage collector off while a problem is solved: tracing the solver
    allocates many small objects, and the collections they trigger cost 0.03-0.05 s of its
    0.1-0.15 s (the solve itself allocates little). Left off if the caller turned it off; with
    jobs on several threads, the first to finish turns it back on (only delaying collection)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _zeros(shape):
    """float32 zeros on the device. Up to 64 MiB copied from the host: `jnp.zeros` would compile
    a program (~40 ms of a cold fit); larger ones filled by it, faster than the copy (0.12
    against 0.4 s for 600 MB)."""
    if math.prod(shape) * 4 <= 64 * 2**20:
        return jax.device_put(np.zeros(shape, np.float32))
    return jnp.zeros(shape, jnp.float32)


def _ynn_dots(xla_flags: str) -> bool:
    """Whether these XLA flags leave XLA:CPU's matrix products to YNNPACK: yes unless the last
    `--xla_cpu_experimental_ynn_fusion_type` names a list without a DOT type, or removes one
    (`-TYPE`) from XLA's default list (which has it) without adding one back (`+TYPE`)."""
    value = cpu.flag_value(xla_flags, "xla_cpu_experimental_ynn_fusion_type")
    if value is None:
        return True
    items = [i.strip() for i in value.split(",") if i.strip()]
    edits = bool(items) and all(i[0] in "+-" for i in items)
    dots = edits  # an edit list starts from XLA's default, an explicit list from nothing
    for item in items:
        if "DOT" in item:
            dots = not item.startswith("-")
    return dots


def _grid_dtype(solver=True):
    """The dtype of integer points (`_integer_grid`) on the device: bfloat16, which holds them
    exactly and which YNNPACK multiplies 1.3-1.9x as fast as float32 (README), unless XLA:CPU's
    flags (as `XLA_FLAGS` says) leave YNNPACK out of matrix products: XLA's own bfloat16
    products are then up to 1.35x slower than its float32 ones. The C++ solver's products
    (`solver`) are oneDNN's: bfloat16 where the CPU has bfloat16 instructions."""
    if jax.default_backend() != "cpu":
        return jnp.bfloat16
    if solver and _native_outer():
        return jnp.bfloat16 if _cpu_bf16() else jnp.float32
    return jnp.bfloat16 if _ynn_dots(os.environ.get("XLA_FLAGS", "")) else jnp.float32


def _cores() -> int:
    """The CPU cores this process may run on (its affinity, as OpenMP counts them)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@functools.cache
def _cpu_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX; Linux's flags):
    elsewhere oneDNN's bfloat16 products are emulated, slower than its float32 ones."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _integer_grid(x):
    """(scale, offset) when x = (k + offset) / scale with integers |k| <= 128 (scale 255: 8-bit
    images in [0, 1], like Fashion-MNIST; or scale 1), else None.

    On such data the RBF kernel is computed from the integers k: their products, norms and
    dot products are integers below 2**24, which float32 matrix products get exactly, so the
    squared distance |x - x'|^2 = (|k|^2 + |k'|^2 - 2 k.k') / scale^2 carries no cancellation
    error (the float32 formula on x itself loses up to ~1e-5 of each kernel value to it)."""
    return _grid_points(x)[0]


def _grid_points(x):
    """(`_integer_grid`'s grid, x's integers k on it as float32), or (None, None)."""
    if len(x) == 0 or x.shape[1] * 128**2 >= 2**24:
        return None, None
    for scale in (255.0, 1.0):
        rounded = _rounded(x, scale)
        if rounded is not None and rounded[2] - rounded[1] <= 255:
            k, lo, hi = rounded
            offset = float(np.floor((lo + hi + 1) / 2))
            k -= np.float32(offset)
            return (scale, offset), k
    return None, None


def _on_grid(x, grid):
    """x as the float32 integers k of `_integer_grid`'s grid, or None when x is not on it."""
    scale, offset = grid
    rounded = _rounded(x, scale)
    if rounded is None:
        return None
    k, lo, hi = rounded
    if k.size and max(offset - lo, hi - offset) > 128:
        return None
    k -= np.float32(offset)
    return k


def _rounded(x, scale):
    """(rint(x * scale) as float32, its min, its max), or None when an entry of x * scale is
    more than 1e-3 from an integer. One pass, _ROWS rows at a time (whole-array temporaries
    cost ~50 ms of a 10,000-image fit)."""
    k = np.empty(x.shape, np.float32)
    lo, hi = np.inf, -np.inf
    for i in range(0, len(x), _ROWS):
        s = x[i : i + _ROWS] * np.float32(scale)
        kb = np.rint(s, out=k[i : i + _ROWS])
        if np.abs(s - kb).max() > 1e-3:
            return None
        lo, hi = min(lo, float(kb.min())), max(hi, float(kb.max()))
    return k, lo, hi


def _check_labels(y, n) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"y must be 1-D, got shape {arr.shape}")
    if arr.shape[0] != n:
        raise ValueError(f"X has {n} samples but y has {arr.shape[0]}")
    if np.issubdtype(arr.dtype, np.integer):
        return arr.astype(np.int64)
    if arr.dtype == bool:
        return arr.astype(np.int64)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ValueError("class labels must be integers; y contains NaN or Inf")
        frac = arr != np.round(arr)
        if frac.any():
            raise ValueError(
                "class labels must be integers; y contains non-integer values such as "
                f"{arr[frac][0].item()!r} (for real-valued targets use SVR)"
            )
        return arr.astype(np.int64)
    raise ValueError(f"class labels must be integers, not {arr.dtype} (e.g. {arr.flat[0]!r})")


def _check_targets(y, n) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"y must be 1-D, got shape {arr.shape}")
    if arr.shape[0] != n:
        raise ValueError(f"X has {n} samples but y has {arr.shape[0]}")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise ValueError(f"regression targets must be real numbers, not {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError("y contains NaN or Inf")
    return arr


def _positive(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a positive number, not {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be > 0 (and finite), got {value!r}")
    return float(value)


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, not {value!r}")
    return int(value)


def _real(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, not {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------
# Estimators
# --------------------------------------------------------------------------------------------


class _BaseSVM:
    _fitted_attr = "support_"

    def __init__(
        self, kernel="rbf", C=1.0, gamma="scale", degree=3, coef0=0.0, tol=1e-3, max_iter=-1,
        working_set_size=512, max_inner=None, cache_size=1024, chunk=64, n_jobs=None,
        verbose=False,
    ):
        self.kernel = kernel
        self.C = C
        self.gamma = gamma
        self.degree = degree
        self.coef0 = coef0
        self.tol = tol
        self.max_iter = max_iter
        self.working_set_size = working_set_size
        self.max_inner = max_inner
        self.cache_size = cache_size
        self.chunk = chunk
        self.n_jobs = n_jobs
        self.verbose = verbose

    # -- parameters -----------------------------------------------------------------------

    def get_params(self, deep=True):
        import inspect

        names = [
            p for p in inspect.signature(type(self).__init__).parameters if p != "self"
        ]
        return {k: getattr(self, k) for k in names}

    def set_params(self, **params):
        for k, v in params.items():
            if k not in self.get_params():
                raise ValueError(f"unknown parameter {k!r} for {type(self).__name__}")
            setattr(self, k, v)
        return self

    def _validate(self, x, raw=None):
        """Checks the parameters; x: float32 data, raw: the data as given (for gamma='scale',
        computed in float64 from the caller's values, as scikit-learn)."""
        _check_kernel(self.kernel, self.degree)
        c = _positive("C", self.C)
        tol = _positive("tol", self.tol)
        if isinstance(self.gamma, str):
            if self.gamma == "scale":
                var = _variance(x if raw is None else np.asarray(raw))
                gamma = 1.0 / (x.shape[1] * var) if var > 0 else 1.0
            elif self.gamma == "auto":
                gamma = 1.0 / x.shape[1]
            else:
                raise ValueError(
                    f"gamma must be 'scale', 'auto' or a number > 0, not {self.gamma!r}"
                )
        else:
            gamma = _positive("gamma", self.gamma)
        coef0 = _real("coef0", self.coef0)
        if isinstance(self.max_iter, bool) or not isinstance(self.max_iter, numbers.Integral):
            raise ValueError(f"max_iter must be an integer (-1: no limit), not {self.max_iter!r}")
        q = self.working_set_size
        if isinstance(q, bool) or not isinstance(q, numbers.Integral) or q < 4:
            raise ValueError(f"working_set_size must be an integer >= 4, not {q!r}")
        max_inner = self.max_inner
        if max_inner is None:
            max_inner = 100 * int(q)
        elif isinstance(max_inner, bool) or not isinstance(max_inner, numbers.Integral) or (
            max_inner < 1
        ):
            raise ValueError(f"max_inner must be an integer >= 1, not {max_inner!r}")
        self._gamma = gamma
        return dict(
            kernel=self.kernel, gamma=gamma, coef0=coef0, degree=int(self.degree), tol=tol,
            max_iter=int(self.max_iter), q=int(q), max_inner=int(max_inner),
            cache_size=_positive("cache_size", self.cache_size),
            chunk=_positive_int("chunk", self.chunk),
        ), c

    def _n_jobs(self, problems):
        """Threads solving binary problems side by side: n_jobs, or the number of CPU cores."""
        jobs = self.n_jobs
        if jobs is None:
            jobs = _cores()
        if isinstance(jobs, bool) or not isinstance(jobs, numbers.Integral) or jobs < 1:
            raise ValueError(f"n_jobs must be an integer >= 1 or None, not {self.n_jobs!r}")
        return max(1, min(int(jobs), problems))

    def _check_fitted(self):
        if not hasattr(self, self._fitted_attr):
            raise NotFittedError(
                f"this {type(self).__name__} is not fitted yet; call fit(X, y) first"
            )

    def _solve(self, xd, points, y, p, c, pidx, opts, what, workspace=None, pad_to=0, jobs=1):
        """xd: all points on the host, on the device, and their squared norms on the device.
        jobs: how many problems are solved side by side (they share the cores)."""
        t = time.perf_counter()
        threads = max(1, _cores() // jobs)
        with _gc_paused():
            res = _Problem.solve(
                *xd, points, y, p, c, pidx, workspace=workspace, pad_to=pad_to,
                threads=threads, **opts
            )
        if not res["converged"]:
            why = (f"after max_iter={opts['max_iter']} outer iterations"
                   if opts["max_iter"] > 0 and res["outer"] >= opts["max_iter"]
                   else f"after {res['refreshes']} restarts from a float64 gradient")
            warnings.warn(
                f"{what}: the solver stopped {why} with a KKT violation of"
                f" {res['violation']:.3g} > tol={opts['tol']:g}",
                ConvergenceWarning, stacklevel=3,
            )
        if self.verbose:
            print(
                f"  {what}: {len(y)} variables, {int((res['alpha'] > 0).sum())} SV,"
                f" obj {res['obj']:.6g}, {res['outer']} outer / {res['inner']} inner iterations"
                f" (q={res['q']}), {res['kernel_rows']} kernel rows,"
                f" violation {res['violation']:.2e},"
                f" {time.perf_counter() - t:.2f} s", flush=True,
            )
        return res

    def _device_points(self, x32, opts):
        """The training points (host array, device arrays with their squared norms), as
        integers when the RBF kernel can use them (`_integer_grid`), with gamma scaled to
        match."""
        self._grid, k = _grid_points(x32) if opts["kernel"] == "rbf" else (None, None)
        if self._grid is None:
            return (x32, *_to_device(x32)), opts
        scale = self._grid[0]
        return (k, *_to_device(k, _grid_dtype())), {**opts, "gamma": opts["gamma"] / scale**2}

    def _decision_raw(self, x):
        """sum_s coef_s K(sv_s, x) - rho for each column of the internal coefficient matrix."""
        self._check_fitted()
        x = _check_x(x, "X", self.shape_fit_[1])
        sv, gamma, dtype = self.support_vectors_, self._gamma, jnp.float32
        if self._grid is not None:  # the training data's integer grid, if x lies on it too
            k = _on_grid(x, self._grid)
            if k is not None:
                x, sv = k, _on_grid(sv, self._grid)
                gamma, dtype = gamma / self._grid[0] ** 2, _grid_dtype(solver=False)
        return _decision(
            x, sv, self._coef_matrix, self._rho, kernel=self.kernel, gamma=gamma,
            coef0=float(self.coef0), degree=int(self.degree), dtype=dtype,
        )


@partial(
    compilation_cache.persistent_jit, static_argnames=("kernel", "degree", "dtype"),
    compiler_options=_COMPILER_OPTIONS,
)
def _decision_chunk(z, sv, sq_sv, coef, gamma, coef0, *, kernel, degree, dtype):
    """z: float32 points; sv: the support vectors as dtype."""
    k = _kernel_block(
        z.astype(dtype), sv, jnp.sum(z * z, 1), sq_sv, gamma, coef0, kernel=kernel,
        degree=degree,
    )
    return jnp.dot(k, coef, precision=lax.Precision.HIGHEST)


def _decision(x, sv, coef, rho, *, kernel, gamma, coef0, degree, chunk=1024, dtype=jnp.float32):
    """[n, k] decision values: K(x, sv) @ coef - rho, computed in row chunks of one shape.
    dtype: the points' dtype in the matrix products (bfloat16 only for integers it holds)."""
    n_sv = sv.shape[0]
    s_pad = _bucket(max(n_sv, 1))
    svp = np.zeros((s_pad, sv.shape[1]), np.float32)
    svp[:n_sv] = sv
    cp = np.zeros((s_pad, coef.shape[1]), np.float32)
    cp[:n_sv] = coef
    cj = jax.device_put(cp)
    svj, sq = _to_device(svp, dtype)
    n = x.shape[0]
    chunk = min(chunk, _bucket(n, 8))
    out = []
    for start in range(0, n, chunk):
        z = np.zeros((chunk, x.shape[1]), np.float32)
        part = x[start : start + chunk]
        z[: len(part)] = part
        d = _decision_chunk(
            jax.device_put(z), svj, sq, cj, np.float32(gamma), np.float32(coef0),
            kernel=kernel, degree=degree, dtype=dtype,
        )
        out.append(np.asarray(d, np.float64)[: len(part)])
    return np.concatenate(out) - np.asarray(rho, np.float64)[None, :]


class SVC(_BaseSVM):
    """C-support vector classification (libsvm's C-SVC) with a jit-compiled SMO solver.

    Parameters follow scikit-learn's `sklearn.svm.SVC`: kernel ("linear", "poly", "rbf",
    "sigmoid"), C > 0, gamma ("scale" = 1 / (n_features * X.var()), "auto" = 1 / n_features, or
    a number > 0), degree, coef0, tol (the maximal KKT violation at which to stop, 1e-3),
    max_iter (outer iterations per binary problem, -1 for no limit), decision_function_shape
    ("ovr" or "ovo", the shape of `decision_function` for one-vs-one models, as scikit-learn).
    Own parameters: multiclass ("ovo" trains k(k-1)/2 pairwise problems, "ovr" k
    one-against-the-rest problems), working_set_size (q, at most 512; smaller problems use
    less), max_inner (SMO iterations per sub-problem, 100 q), cache_size (MB of kernel rows per
    problem being solved, 1024), chunk (rows per matrix product, 64), n_jobs (binary problems
    solved side by side, default one per CPU core), verbose (a line per binary problem).

    Inputs are converted to float32; X must be finite, y integers (or integral floats).
    """

    def __init__(
        self, kernel="rbf", C=1.0, gamma="scale", degree=3, coef0=0.0, tol=1e-3, max_iter=-1,
        decision_function_shape="ovr", multiclass="ovo", working_set_size=512, max_inner=None,
        cache_size=1024, chunk=64, n_jobs=None, verbose=False,
    ):
        super().__init__(kernel, C, gamma, degree, coef0, tol, max_iter, working_set_size,
                         max_inner, cache_size, chunk, n_jobs, verbose)
        self.decision_function_shape = decision_function_shape
        self.multiclass = multiclass

    def fit(self, X, y):
        x = _check_x(X)
        labels = _check_labels(y, x.shape[0])
        opts, c = self._validate(x, X)
        if self.multiclass not in MULTICLASS:
            raise ValueError(f"multiclass must be 'ovo' or 'ovr', not {self.multiclass!r}")
        if self.decision_function_shape not in ("ovr", "ovo"):
            raise ValueError(
                f"decision_function_shape must be 'ovr' or 'ovo', not "
                f"{self.decision_function_shape!r}"
            )
        classes, yi = np.unique(labels, return_inverse=True)
        if len(classes) < 2:
            raise ValueError(f"need samples of at least 2 classes; y has only {classes.tolist()}")
        k = len(classes)
        x32 = x
        xd, opts = self._device_points(x32, opts)
        ovo = self.multiclass == "ovo" or k == 2
        t0 = time.perf_counter()
        problems = []  # (sample indices, +-1 labels) per binary problem
        if ovo:
            for a in range(k):
                for b in range(a + 1, k):
                    idx = np.concatenate([np.flatnonzero(yi == a), np.flatnonzero(yi == b)])
                    problems.append((idx, np.where(yi[idx] == a, 1.0, -1.0)))
        else:
            for a in range(k):
                idx = np.arange(len(yi))
                problems.append((idx, np.where(yi == a, 1.0, -1.0)))
        pad_to = max(len(idx) for idx, _ in problems)  # one shape: one compilation
        local = threading.local()  # per thread: the kernel-row buffer, reused problem to problem

        jobs = self._n_jobs(len(problems) - 1)

        def solve(n):
            idx, yb = problems[n]
            if not hasattr(local, "workspace"):
                local.workspace = {}
            m = len(idx)
            res = self._solve(
                xd, idx, yb, -np.ones(m), np.full(m, c), np.arange(m), opts,
                _problem_name(classes, k, n, ovo), local.workspace, pad_to, 1 if n == 0 else jobs,
            )
            res["idx"], res["y"] = idx, yb
            return res

        results = [solve(0)]  # alone: it compiles the solver
        if jobs > 1:
            with ThreadPoolExecutor(jobs) as pool:
                results += list(pool.map(solve, range(1, len(problems))))
        else:
            results += [solve(n) for n in range(1, len(problems))]
        self.fit_time_ = time.perf_counter() - t0

        # support vectors: samples with a nonzero coefficient in any problem, grouped by class
        nonzero = np.zeros(len(yi), bool)
        for r in results:
            nonzero[r["idx"][r["alpha"] > 0]] = True
        order = np.argsort(yi, kind="stable")
        support = order[nonzero[order]]
        pos = np.full(len(yi), -1)
        pos[support] = np.arange(len(support))
        coef = np.zeros((len(support), len(results)))  # column per problem: y a
        for n, r in enumerate(results):
            sel = r["alpha"] > 0
            coef[pos[r["idx"][sel]], n] = (r["y"] * r["alpha"])[sel]
        self.classes_ = classes
        self.shape_fit_ = x.shape
        self.support_ = support.astype(np.int32)
        self.support_vectors_ = x32[support]
        self.n_support_ = np.bincount(yi[support], minlength=k).astype(np.int32)
        self._coef_matrix = coef
        self._rho = np.array([r["rho"] for r in results])
        self._ovo = ovo
        self.n_iter_ = np.array([r["outer"] for r in results], np.int32)
        self.n_inner_iter_ = np.array([r["inner"] for r in results], np.int64)
        self.n_kernel_rows_ = np.array([r["kernel_rows"] for r in results], np.int64)
        self.working_set_size_ = results[0]["q"]
        self.dual_objective_ = np.array([r["obj"] for r in results])
        self.kkt_violation_ = np.array([r["violation"] for r in results])
        self.fit_status_ = int(not all(r["converged"] for r in results))
        self.hinge_loss_ = _hinge(results)
        self._set_public_coef(yi)
        return self

    def _set_public_coef(self, yi):
        """scikit-learn's dual_coef_ / intercept_ layout (libsvm's for one-vs-one)."""
        k = len(self.classes_)
        coef, rho = self._coef_matrix, self._rho
        if not self._ovo:
            self.dual_coef_ = coef.T.copy()
            self.intercept_ = -rho
        elif k == 2:  # scikit-learn flips the binary problem: positive means classes_[1]
            self.dual_coef_ = -coef.T.copy()
            self.intercept_ = rho.copy()
        else:
            cls = yi[self.support_]
            dual = np.zeros((k - 1, len(self.support_)))
            n = 0
            for a in range(k):
                for b in range(a + 1, k):
                    ia, ib = cls == a, cls == b
                    dual[b - 1, ia] = coef[ia, n]
                    dual[a, ib] = coef[ib, n]
                    n += 1
            self.dual_coef_ = dual
            self.intercept_ = -rho

    def _ovo_decision(self, X):
        """[n, k(k-1)/2] libsvm decision values (positive: the first class of the pair)."""
        return self._decision_raw(X)

    def decision_function(self, X):
        """Binary: [n], positive for classes_[1]. One-vs-one: [n, k] votes plus scaled
        confidences (decision_function_shape="ovr", as scikit-learn) or [n, k(k-1)/2] pairwise
        values ("ovo"). One-vs-rest: [n, k]."""
        dec = self._decision_raw(X)
        k = len(self.classes_)
        if not self._ovo:
            return dec
        if k == 2:
            return -dec[:, 0]
        if self.decision_function_shape == "ovo":
            return dec
        return _ovr_from_ovo(dec, k)

    def predict(self, X):
        dec = self._decision_raw(X)
        k = len(self.classes_)
        if not self._ovo:
            return self.classes_[np.argmax(dec, axis=1)]
        votes = np.zeros((dec.shape[0], k), np.int64)
        n = 0
        for a in range(k):
            for b in range(a + 1, k):
                pos = dec[:, n] > 0
                votes[pos, a] += 1
                votes[~pos, b] += 1
                n += 1
        return self.classes_[np.argmax(votes, axis=1)]  # ties: the lower class, as libsvm

    def score(self, X, y):
        return float(np.mean(self.predict(X) == np.asarray(y)))


def _problem_name(classes, k, n, ovo):
    if not ovo:
        return f"class {classes[n]} vs rest"
    for a in range(k):
        for b in range(a + 1, k):
            if n == 0:
                return f"classes {classes[a]} vs {classes[b]}"
            n -= 1
    raise AssertionError


def _ovr_from_ovo(dec, k):
    """scikit-learn's _ovr_decision_function: votes + confidences / (3 (|confidences| + 1))."""
    votes = np.zeros((dec.shape[0], k))
    conf = np.zeros((dec.shape[0], k))
    n = 0
    for a in range(k):
        for b in range(a + 1, k):
            conf[:, a] += dec[:, n]
            conf[:, b] -= dec[:, n]
            votes[dec[:, n] > 0, a] += 1
            votes[dec[:, n] <= 0, b] += 1
            n += 1
    return votes + conf / (3 * (np.abs(conf) + 1))


def _hinge(results):
    """Mean hinge loss max(0, 1 - y f(x)) over the training points of all binary problems,
    from the solver's gradients: y f(x) = 1 - y (f_t + rho) with f = -y G."""
    total, count = 0.0, 0
    for r in results:
        f = -r["y"] * r["grad"]
        total += np.maximum(0.0, r["y"] * (f + r["rho"])).sum()
        count += len(f)
    return total / max(count, 1)


class SVR(_BaseSVM):
    """epsilon-support vector regression (libsvm's epsilon-SVR) with the same solver.

    Parameters as `SVC` plus epsilon >= 0, the half-width of the insensitive tube.
    """

    def __init__(
        self, kernel="rbf", C=1.0, epsilon=0.1, gamma="scale", degree=3, coef0=0.0, tol=1e-3,
        max_iter=-1, working_set_size=512, max_inner=None, cache_size=1024, chunk=64,
        verbose=False,
    ):
        super().__init__(kernel, C, gamma, degree, coef0, tol, max_iter, working_set_size,
                         max_inner, cache_size, chunk, 1, verbose)
        self.epsilon = epsilon

    def fit(self, X, y):
        x = _check_x(X)
        z = _check_targets(y, x.shape[0])
        opts, c = self._validate(x, X)
        eps = _real("epsilon", self.epsilon)
        if eps < 0:
            raise ValueError(f"epsilon must be >= 0, got {eps!r}")
        n = x.shape[0]
        x32 = x
        t0 = time.perf_counter()
        yv = np.concatenate([np.ones(n), -np.ones(n)])
        pv = np.concatenate([eps - z, eps + z])
        xd, opts = self._device_points(x32, opts)
        res = self._solve(
            xd, np.arange(n), yv, pv, np.full(2 * n, c),
            np.concatenate([np.arange(n)] * 2), opts, "SVR",
        )
        self.fit_time_ = time.perf_counter() - t0
        beta = res["alpha"][:n] - res["alpha"][n:]
        support = np.flatnonzero(beta != 0)
        self.shape_fit_ = x.shape
        self.support_ = support.astype(np.int32)
        self.support_vectors_ = x32[support]
        self.n_support_ = np.array([len(support)], np.int32)
        self.dual_coef_ = beta[support][None, :]
        self.intercept_ = np.array([-res["rho"]])
        self._coef_matrix = self.dual_coef_.T
        self._rho = np.array([res["rho"]])
        self.n_iter_ = np.array([res["outer"]], np.int32)
        self.n_inner_iter_ = np.array([res["inner"]], np.int64)
        self.n_kernel_rows_ = np.array([res["kernel_rows"]], np.int64)
        self.working_set_size_ = res["q"]
        self.dual_objective_ = np.array([res["obj"]])
        self.kkt_violation_ = np.array([res["violation"]])
        self.fit_status_ = int(not res["converged"])
        self.alpha_ = res["alpha"]
        return self

    def decision_function(self, X):
        return self._decision_raw(X)[:, 0]

    def predict(self, X):
        return self.decision_function(X)

    def score(self, X, y):
        """R^2, as scikit-learn's regressors."""
        z = _check_targets(y, len(np.asarray(X)))
        pred = self.predict(X)
        ss_res = float(((z - pred) ** 2).sum())
        ss_tot = float(((z - z.mean()) ** 2).sum())
        return 1.0 - ss_res / ss_tot if ss_tot > 0 else 0.0


# --------------------------------------------------------------------------------------------
# Fashion-MNIST: train.py --model svm
# --------------------------------------------------------------------------------------------


def parse_gamma(value):
    """'scale', 'auto', or a number > 0 (also as a string, as given on a command line)."""
    if isinstance(value, str) and value not in ("scale", "auto"):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(
                f"gamma must be 'scale', 'auto' or a number > 0, not {value!r}"
            ) from None
    if not isinstance(value, str):
        _positive("gamma", value)
    return value


def _read_idx(directory, split):
    """Fashion-MNIST straight from the upstream gzip IDX files (used without tfds)."""
    prefix = {"train": "train", "test": "t10k"}[split]
    with gzip.open(os.path.join(directory, f"{prefix}-images-idx3-ubyte.gz")) as f:
        raw = f.read()
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28, 1)
    with gzip.open(os.path.join(directory, f"{prefix}-labels-idx1-ubyte.gz")) as f:
        raw = f.read()
    labels = np.frombuffer(raw, np.uint8, offset=8).astype(np.int32)
    return images, labels


def load_fashion_mnist(split, data_dir=None, manual_dir=None):
    """(uint8 [N, 28, 28, 1], int32 [N]) through `flaxcnn.data.load_split`, the networks' data
    in the networks' order; straight from the IDX files if tensorflow-datasets is missing."""
    try:
        from flaxcnn import data
    except ImportError:  # pragma: no cover - data.py needs nothing exotic
        data = None
    if data is not None:
        try:
            return data.load_split(split, data_dir=data_dir, manual_dir=manual_dir)
        except data.DataError as e:
            if "tensorflow-datasets is not installed" not in str(e):
                raise
    directory = manual_dir or os.environ.get("FASHION_MNIST_DIR") or (
        "/usr/share/datasets/fashion-mnist"
    )
    return _read_idx(directory, split)


def _as_features(images):
    """uint8 images -> float32 [N, H*W*C] pixels in [0, 1] (what the benchmark uses)."""
    images = np.asarray(images)
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


_RUN_ARGS = (
    "kernel", "C", "gamma", "degree", "coef0", "train_size", "test_size", "seed", "data_dir",
    "manual_dir", "tol", "multiclass", "cache_size", "working_set_size", "verbose",
)


def run(args=None, /, **kwargs) -> dict:
    """Train and evaluate an SVC on Fashion-MNIST; what `train.py --model svm` runs.

    run(kernel="rbf", C=10.0, gamma="scale", degree=3, coef0=0.0, train_size=None,
        test_size=None, seed=0, data_dir=None, manual_dir=None, tol=1e-3, multiclass="ovo",
        cache_size=1024, working_set_size=512, verbose=False, log=print)

    `args` may be an argparse Namespace or a dict holding any of these names (keyword arguments
    win; a Namespace's ``fashion_mnist_dir`` is taken as manual_dir). gamma may be a string
    ("scale", "auto", "0.01"). train_size / test_size take the first N images, as the networks
    do. The SVM is deterministic: seed is recorded, nothing depends on it.

    Prints the networks' summary lines (`loss ..., train acc ..., test acc ...` with the mean
    hinge loss of the binary problems as the loss, and `... examples/sec on <device>` for
    fitting) and returns a dict with the numbers.
    """
    opts = {
        "kernel": "rbf", "C": 10.0, "gamma": "scale", "degree": 3, "coef0": 0.0,
        "train_size": None, "test_size": None, "seed": 0, "data_dir": None, "manual_dir": None,
        "tol": 1e-3, "multiclass": "ovo", "cache_size": 1024, "working_set_size": 512,
        "verbose": False,
    }
    if args is not None:
        src = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
        if src.get("fashion_mnist_dir") is not None and src.get("manual_dir") is None:
            src["manual_dir"] = src["fashion_mnist_dir"]
        opts.update({k: src[k] for k in _RUN_ARGS if src.get(k) is not None})
    log = kwargs.pop("log", print)
    unknown = set(kwargs) - set(_RUN_ARGS)
    if unknown:
        raise TypeError(f"run() got unknown arguments {sorted(unknown)}")
    opts.update(kwargs)
    gamma = parse_gamma(opts["gamma"])
    _check_kernel(opts["kernel"], opts["degree"])  # bad parameters fail before the data loads
    _positive("C", opts["C"])
    _real("coef0", opts["coef0"])
    if opts["multiclass"] not in MULTICLASS:
        raise ValueError(f"multiclass must be 'ovo' or 'ovr', not {opts['multiclass']!r}")
    for name in ("train_size", "test_size"):
        v = opts[name]
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1):
            raise ValueError(f"{name} must be a positive integer, not {v!r}")
    model = SVC(
        kernel=opts["kernel"], C=opts["C"], gamma=gamma, degree=opts["degree"],
        coef0=opts["coef0"], tol=opts["tol"], multiclass=opts["multiclass"],
        cache_size=opts["cache_size"], working_set_size=opts["working_set_size"],
        verbose=opts["verbose"],
    )
    t0 = time.perf_counter()
    splits = {}
    for split in ("train", "test"):
        images, labels = load_fashion_mnist(split, opts["data_dir"], opts["manual_dir"])
        size = opts[f"{split}_size"]
        if size is not None:
            images, labels = images[:size], labels[:size]
        splits[split] = (_as_features(images), np.asarray(labels))
    data_seconds = time.perf_counter() - t0
    (xtr, ytr), (xte, yte) = splits["train"], splits["test"]
    device = f"{jax.devices()[0].platform}:{jax.devices()[0].id}"

    from flaxcnn import compilation_cache

    cache_start = compilation_cache.counts()
    t0 = time.perf_counter()
    model.fit(xtr, ytr)
    fit_seconds = time.perf_counter() - t0
    cache = compilation_cache.since(cache_start)
    t0 = time.perf_counter()
    test_acc = float(np.mean(model.predict(xte) == yte))
    predict_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    train_acc = float(np.mean(model.predict(xtr) == ytr))
    train_predict_seconds = time.perf_counter() - t0

    g = model._gamma
    what = f"gamma={opts['gamma']} ({g:.4g})" if isinstance(gamma, str) else f"gamma={g:g}"
    report = {
        "model": "svm",
        "kernel": opts["kernel"],
        "C": float(opts["C"]),
        "gamma": g,
        "gamma_arg": opts["gamma"],
        "degree": opts["degree"],
        "coef0": opts["coef0"],
        "multiclass": opts["multiclass"],
        "tol": opts["tol"],
        "seed": opts["seed"],
        "train_examples": len(ytr),
        "test_examples": len(yte),
        "loss": float(model.hinge_loss_),
        "hinge_loss": float(model.hinge_loss_),
        "dual_objective": float(model.dual_objective_.sum()),
        "train_acc": train_acc,
        "test_acc": test_acc,
        "fit_seconds": fit_seconds,
        "predict_seconds": predict_seconds,
        "train_predict_seconds": train_predict_seconds,
        "data_seconds": data_seconds,
        "compile_cache_hits": cache["hits"],
        "n_support": int(len(model.support_)),
        "binary_problems": len(model.n_iter_),
        "outer_iterations": int(model.n_iter_.sum()),
        "converged": model.fit_status_ == 0,
        "examples_per_sec": len(ytr) / fit_seconds if fit_seconds else 0.0,
        "device": device,
    }
    log(f"svm: {opts['kernel']} kernel, C={opts['C']:g}, {what}, {opts['multiclass']}, "
        f"{len(ytr)} training / {len(yte)} test images")
    log(f"loss {report['loss']:.3f}, train acc {train_acc:.3f}, test acc {test_acc:.3f}")
    log(f"{report['examples_per_sec']:.1f} examples/sec on {device}")
    log(f"fit {fit_seconds:.1f} s ({report['binary_problems']} binary problems,"
        f" {report['n_support']} support vectors, dual objective {report['dual_objective']:.6g},"
        f" loss = mean hinge loss"
        + (f"; {cached}" if (cached := compilation_cache.summary(cache)) else "")
        + f"), predict {predict_seconds:.1f} s test /"
        f" {train_predict_seconds:.1f} s train, data {data_seconds:.1f} s")
    return report
