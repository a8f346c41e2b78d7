"""flaxcnn.svm against scikit-learn's SVC / SVR (libsvm), on small problems.

Tolerances (both solvers stop at the same maximal KKT violation `TOL`; ours computes in float32,
libsvm in float64, and the two take different paths to the optimum, so they stop at slightly
different points of the same convex problem):

* dual objective: relative difference <= 1e-4;
* support set: identical, except points whose coefficient is below `SV_ALPHA_TOL * C` in the
  model that has them (an alpha that is 0 in one solution and ~tol in the other);
* decision values: |ours - libsvm's| <= 2e-3 * (1 + |libsvm's|); predictions equal wherever
  libsvm's decision value is farther than that from 0;
* KKT: the maximal violation max_{I_up} -yG - min_{I_low} -yG, recomputed in float64 from our
  coefficients, <= TOL + 2e-5 (the solver checks it in float64 too, from float32 kernel rows on
  larger problems); 0 <= alpha <= C exactly; |sum y alpha| <= 1e-5 C n.
"""

import gzip
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.compilation_cache.compilation_cache import reset_cache
from sklearn import svm as sk
from sklearn.datasets import make_classification, make_regression
from sklearn.metrics.pairwise import pairwise_kernels

from flaxcnn import native, svm

TOL = 1e-4
OBJ_RTOL = 1e-4
SV_ALPHA_TOL = 2e-3
DEC_TOL = 2e-3
KKT_SLACK = 2e-5

# kernel -> (parameters, data it is used with); sigmoid needs small gamma to stay well posed
KERNELS = {
    "linear": {},
    "poly": {"gamma": 0.1, "coef0": 1.0, "degree": 3},
    "rbf": {"gamma": "scale"},
    "sigmoid": {"gamma": 0.01, "coef0": -0.5},
}
N = 240


@pytest.fixture(scope="module")
def binary():
    x, y = make_classification(
        N, 8, n_informative=5, n_redundant=1, flip_y=0.05, class_sep=0.8, random_state=0
    )
    return x, y


def _balanced_classes(n_per_class, seed):
    x, y = make_classification(
        3 * n_per_class, 8, n_informative=5, n_redundant=0, n_classes=3, n_clusters_per_class=1,
        class_sep=0.9, weights=None, flip_y=0.0, random_state=seed,
    )
    return x, y


@pytest.fixture(scope="module")
def three_class():
    """120 per class: every one-vs-one problem has N = 240 points, like the binary ones (one
    compiled solver shared by the tests)."""
    return _balanced_classes(120, 1)


@pytest.fixture(scope="module")
def three_class_small():
    """80 per class: every one-vs-rest problem has N = 240 points."""
    return _balanced_classes(80, 3)


FASHION = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"


@pytest.fixture(scope="module")
def fashion_pair():
    """240 test images of T-shirt (0) and shirt (6), the hardest pair, pixels in [0, 1]."""
    if not os.path.exists(FASHION):
        pytest.skip("Fashion-MNIST IDX files not installed")
    with gzip.open(FASHION) as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 784)
    with gzip.open(FASHION.replace("images-idx3", "labels-idx1")) as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)
    idx = np.concatenate([np.flatnonzero(y == 0)[:120], np.flatnonzero(y == 6)[:120]])
    return x[idx].astype(np.float64) / 255, y[idx].astype(np.int64)


def _kparams(kernel, params, model):
    out = {"metric": kernel}
    if kernel != "linear":
        out["gamma"] = model._gamma
    if kernel in ("poly", "sigmoid"):
        out["coef0"] = params.get("coef0", 0.0)
    if kernel == "poly":
        out["degree"] = params.get("degree", 3)
    return out


def _dual_objective(coef, sv, kp):
    """1/2 c^T K c - sum |c| for a C-SVC with coefficients c = y alpha (float64)."""
    k = pairwise_kernels(sv, sv, **kp)
    return 0.5 * coef @ k @ coef - np.abs(coef).sum()


def _kkt_violation(x, yb, alpha, c, kp):
    """The maximal KKT violation of a C-SVC solution, recomputed in float64."""
    k = pairwise_kernels(x, x, **kp)
    grad = yb * (k @ (yb * alpha)) - 1.0
    f = -yb * grad
    up = np.where(yb > 0, alpha < c, alpha > 0)
    low = np.where(yb > 0, alpha > 0, alpha < c)
    return f[up].max() - f[low].min()


def _compare_support(ours_idx, ours_coef, ref_idx, ref_coef, c):
    """Support sets agree except for coefficients below SV_ALPHA_TOL * C."""
    ours = dict(zip(ours_idx.tolist(), np.abs(ours_coef).tolist(), strict=True))
    ref = dict(zip(ref_idx.tolist(), np.abs(ref_coef).tolist(), strict=True))
    for i in set(ours) ^ set(ref):
        a = ours.get(i, ref.get(i))
        assert a <= SV_ALPHA_TOL * c, f"sample {i} is a support vector in one model only (|a|={a})"


def _compare_decisions(ours, ref):
    np.testing.assert_array_less(np.abs(ours - ref), DEC_TOL * (1 + np.abs(ref)))


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_binary_matches_libsvm(kernel, binary):
    x, y = binary
    params = KERNELS[kernel]
    c = 2.0
    ref = sk.SVC(kernel=kernel, C=c, tol=TOL, **params).fit(x, y)
    ours = svm.SVC(kernel=kernel, C=c, tol=TOL, **params).fit(x, y)
    kp = _kparams(kernel, params, ours)
    assert ours._gamma == pytest.approx(ref._gamma, rel=1e-12)

    # dual objective: ours (from the solver's gradient, and recomputed) against libsvm's
    obj_ref = _dual_objective(ref.dual_coef_[0], ref.support_vectors_, kp)
    obj_ours = _dual_objective(ours.dual_coef_[0], x[ours.support_], kp)
    assert ours.dual_objective_[0] == pytest.approx(obj_ref, rel=OBJ_RTOL)
    assert obj_ours == pytest.approx(obj_ref, rel=OBJ_RTOL)

    # support vectors, coefficients, intercept: scikit-learn's layout and signs
    _compare_support(ours.support_, ours.dual_coef_[0], ref.support_, ref.dual_coef_[0], c)
    np.testing.assert_allclose(ours.support_vectors_, x[ours.support_], rtol=1e-6)
    assert ours.intercept_.shape == ref.intercept_.shape == (1,)
    assert abs(ours.intercept_[0] - ref.intercept_[0]) <= DEC_TOL * (1 + abs(ref.intercept_[0]))

    # decision function and predictions
    dec_ref = ref.decision_function(x)
    dec_ours = ours.decision_function(x)
    _compare_decisions(dec_ours, dec_ref)
    sure = np.abs(dec_ref) > DEC_TOL * (1 + np.abs(dec_ref))
    np.testing.assert_array_equal(ours.predict(x)[sure], ref.predict(x)[sure])

    # KKT conditions of our solution, in float64
    yb = np.where(y == ours.classes_[0], 1.0, -1.0)  # libsvm: +1 for the first class
    alpha = np.zeros(len(y))
    alpha[ours.support_] = np.abs(ours.dual_coef_[0])
    assert alpha.min() >= 0 and alpha.max() <= c
    assert abs(yb @ alpha) <= 1e-5 * c * len(y)
    assert _kkt_violation(x, yb, alpha, c, kp) <= TOL + KKT_SLACK
    assert ours.kkt_violation_[0] <= TOL


def test_fashion_pair_matches_libsvm(fashion_pair):
    """The benchmark's setting (RBF, C=10, gamma='scale', pixels in [0, 1]) on 240 images."""
    x, y = fashion_pair
    ref = sk.SVC(C=10, tol=TOL).fit(x, y)
    ours = svm.SVC(C=10, tol=TOL).fit(x, y)
    kp = _kparams("rbf", {}, ours)
    obj_ref = _dual_objective(ref.dual_coef_[0], ref.support_vectors_, kp)
    assert ours.dual_objective_[0] == pytest.approx(obj_ref, rel=OBJ_RTOL)
    _compare_support(ours.support_, ours.dual_coef_[0], ref.support_, ref.dual_coef_[0], 10)
    _compare_decisions(ours.decision_function(x), ref.decision_function(x))
    np.testing.assert_array_equal(ours.predict(x), ref.predict(x))
    yb = np.where(y == ours.classes_[0], 1.0, -1.0)
    alpha = np.zeros(len(y))
    alpha[ours.support_] = np.abs(ours.dual_coef_[0])
    assert _kkt_violation(x, yb, alpha, 10, kp) <= TOL + KKT_SLACK



def _sub_problem(rng, q, n_invalid):
    """A working set as `_solve` passes it: consistent gradients f = -y G, variables at both
    bounds and inside, and padding (invalid, C = 0) at the end."""
    x = rng.normal(size=(q, 20)).astype(np.float32)
    kbb = np.asarray(svm.kernel_matrix(x, x, "rbf", 0.05))
    y = np.where(rng.random(q) < 0.5, 1.0, -1.0).astype(np.float32)
    c = np.full(q, 10.0, np.float32)
    alpha = np.where(rng.random(q) < 0.2, c, rng.uniform(0, 10, q) * (rng.random(q) < 0.3))
    valid = np.arange(q) < q - n_invalid
    c[~valid], alpha[~valid] = 0.0, 0.0
    grad = (y[:, None] * y[None, :] * kbb) @ alpha - 1.0
    return kbb, alpha.astype(np.float32), (-y * grad).astype(np.float32), y, c, valid


def _gap(a, f, y, c, valid):
    """The largest KKT violation of a working set: max f over I_up minus min f over I_low."""
    up = valid & np.where(y > 0, a < c, a > 0)
    low = valid & np.where(y > 0, a > 0, a < c)
    return np.max(f[up], initial=-np.inf) - np.min(f[low], initial=np.inf)


def test_native_inner_loop_takes_the_xla_loops_steps():
    """On a CPU the inner SMO loop runs in C++ (flaxcnn/_svm.cc); it is built wherever a C++
    compiler is (.ci/setup installs g++). On sub-problems with bounded, free and invalid
    variables it stops where XLA's loop stops (the KKT gap below the local tolerance, or
    max_inner), after about as many steps (XLA may fuse multiply-adds, the C++ loop does not, so
    a near-tie may go the other way), at the same alphas within the tolerance."""
    assert native.svm_available(), native.svm_reason()
    assert svm._native_inner()
    xla = jax.jit(svm._inner_smo_xla, static_argnums=7)
    cpp = jax.jit(svm._inner_smo_native, static_argnums=7)
    rng = np.random.default_rng(0)
    tol = 1e-3
    for q, n_invalid, max_inner in ((64, 0, 10_000), (128, 9, 10_000), (128, 9, 7), (16, 16, 9)):
        kbb, alpha, f, y, c, valid = _sub_problem(rng, q, n_invalid)
        a_x, it_x = xla(kbb, alpha, f, y, c, valid, np.float32(tol), max_inner)
        a_c, it_c = cpp(kbb, alpha, f, y, c, valid, np.float32(tol), max_inner)
        a_c, it_c, it_x = np.asarray(a_c, np.float64), int(it_c), int(it_x)
        assert abs(it_c - it_x) <= 0.02 * it_x, (q, n_invalid, max_inner, it_c, it_x)
        np.testing.assert_allclose(a_c, np.asarray(a_x), atol=0.01)
        assert (a_c >= 0).all() and (a_c <= c).all() and (a_c[~valid] == 0).all()
        assert abs(y @ a_c - y @ alpha) < 1e-3  # pairs move along sum y a = const
        # f after the loop (f = -y G, G = Q a - 1), in float64: the stopping rule holds
        f_end = f - kbb.astype(np.float64) @ (y * (a_c - alpha))
        if n_invalid == q:
            assert it_c == 0 and (a_c == alpha).all()
        elif max_inner == 7:
            assert it_c == 7
        else:
            local_tol = max(tol, svm._LOCAL_FACTOR * _gap(alpha, f, y, c, valid))
            assert 0 < it_c < max_inner and _gap(a_c, f_end, y, c, valid) < local_tol + 1e-4


def test_fit_with_xla_inner_loop_matches(fashion_pair, monkeypatch):
    """XLA's solver with XLA's inner loop (the path on other platforms) fits what the C++ one
    fits."""
    x, y = fashion_pair
    cpp = svm.SVC(C=10, tol=TOL).fit(x, y)
    monkeypatch.setattr(svm, "_NATIVE_INNER", False)
    monkeypatch.setattr(svm, "_NATIVE_OUTER", False)
    svm._solve.clear_cache()
    try:
        assert not svm._native_inner() and not svm._native_outer()
        xla = svm.SVC(C=10, tol=TOL).fit(x, y)
    finally:
        svm._solve.clear_cache()
    assert xla.dual_objective_[0] == pytest.approx(cpp.dual_objective_[0], rel=OBJ_RTOL)
    _compare_decisions(xla.decision_function(x), cpp.decision_function(x))
    np.testing.assert_array_equal(xla.predict(x), cpp.predict(x))



@pytest.mark.parametrize(
    "case",
    ["linear", "poly", "rbf", "sigmoid", "fashion", "fashion-evicting", "svr", "svr-evicting"],
)
def test_native_solver_takes_the_xla_solvers_steps(case, binary, request, monkeypatch):
    """On a CPU the whole solver is one C++ call (`_solve_native`, flaxcnn/_svm.cc, built where
    oneDNN's headers are: .ci/setup installs them). It fits what XLA's `_solve` fits, for every
    kernel, with the row cache holding every row or evicting (q=16, 32 rows), and for SVR: the
    same objective and decisions within the tolerances, after about as many outer steps on
    Fashion-MNIST (the two sum in other orders and take exp from different libraries)."""
    assert native.svm_solve_available(), native.svm_solve_reason()
    assert svm._native_outer()
    if case in KERNELS:
        x, y = binary
        make = lambda: svm.SVC(kernel=case, C=1.0, tol=TOL, **KERNELS[case])  # noqa: E731
    elif case.startswith("svr"):  # two variables per point: a row wanted twice is made once
        rng = np.random.default_rng(0)
        x = rng.random((300, 784))
        y = np.sin(6 * x[:, :4].sum(1))
        small = dict(working_set_size=16, cache_size=1e-9) if case == "svr-evicting" else {}
        make = lambda: svm.SVR(C=10.0, epsilon=0.05, tol=TOL, **small)  # noqa: E731
    else:
        x, y = request.getfixturevalue("fashion_pair")
        small = dict(working_set_size=16, cache_size=1e-9) if case == "fashion-evicting" else {}
        make = lambda: svm.SVC(C=10, tol=TOL, **small)  # noqa: E731
    cpp = make().fit(x, y)
    monkeypatch.setattr(svm, "_NATIVE_OUTER", False)
    svm._solve.clear_cache()
    try:
        xla = make().fit(x, y)
    finally:
        svm._solve.clear_cache()
    assert cpp.dual_objective_[0] == pytest.approx(xla.dual_objective_[0], rel=OBJ_RTOL)
    assert cpp.kkt_violation_[0] <= TOL and xla.kkt_violation_[0] <= TOL
    _compare_decisions(cpp.decision_function(x), xla.decision_function(x))
    if case.startswith("fashion"):
        # (on the small synthetic problems the path is fragile: XLA's own two inner loops,
        # which differ by fused multiply-adds only, take 91 and 158 outer steps on the linear one)
        assert abs(int(cpp.n_iter_[0]) - int(xla.n_iter_[0])) <= 0.25 * xla.n_iter_[0] + 2
    if case.endswith("evicting"):
        assert cpp.n_kernel_rows_[0] > len(x)  # rows were evicted and computed again


def _solver_state(native_outer, monkeypatch, x, y, p, pidx, q, rows, max_outer, dtype, chunk):
    """`svm._solve` run for max_outer outer steps from alpha = 0, on XLA's loop or the C++ one:
    the state as numpy arrays."""
    monkeypatch.setattr(svm, "_NATIVE_OUTER", native_outer)
    svm._solve.clear_cache()
    n, m = len(x), len(y)
    x_all, sq_all = svm._to_device(x.astype(np.float32), dtype)
    state = svm._init_state(svm._zeros((rows, n)), m, q)
    out = svm._solve(
        state, jax.device_put((-y * p).astype(np.float32)), x_all=x_all, sq_all=sq_all,
        points=jax.device_put(np.arange(n, dtype=np.int32)),
        pidx=jax.device_put(pidx.astype(np.int32)), y=jax.device_put(y.astype(np.float32)),
        c=jax.device_put(np.full(m, 1.0, np.float32)), gamma=np.float32(0.05),
        coef0=np.float32(0.0), tol=np.float32(1e-3), max_outer=np.int32(max_outer),
        threads=np.int32(1), kernel="linear", degree=3, max_inner=10_000, chunk=chunk,
    )
    return [np.asarray(a) for a in out]


@pytest.mark.parametrize("case", ["full", "evicting", "svr-evicting", "bfloat16"])
def test_native_solver_state_matches_the_xla_solver_step_by_step(case, monkeypatch):
    """The C++ solver's state after 1, 2 and 12 outer steps is XLA's: the same working sets,
    kernel-row slots, LRU owners and stamps and row counts, exactly, and the same alphas,
    gradients and working-set kernel up to rounding. Small integer points and the linear kernel
    make every product exact, and f starts full of ties (f = y), which the selection must break
    as lax.top_k does (larger first, then the lower index)."""
    assert svm._native_outer()
    rng = np.random.default_rng(1)
    n = 192
    x = rng.integers(-3, 4, (n, 6)).astype(np.float64)
    label = np.where(x[:, 0] + x[:, 1] - x[:, 2] + rng.normal(0, 3.0, n) > 0, 1.0, -1.0)
    q, rows, y, p, pidx = 16, n, label, -np.ones(n), np.arange(n)
    if case.endswith("evicting"):
        rows = 32  # 2q: rows are evicted
    else:
        q = 64  # members that do not move: a row block's spare rows go to them
    # row blocks of 8 (below svm._TAIL) or 32 (whole blocks, then _TAIL-row ones): both ways of
    # counting a block's spare rows (they are filled with a full cache only)
    chunk = 32 if case == "bfloat16" else 8
    if case == "svr-evicting":  # two variables per point (epsilon-SVR's layout)
        z = x[:, 0] - 0.5 * x[:, 1] + rng.normal(0, 2.0, n)
        y = np.concatenate([np.ones(n), -np.ones(n)])
        p = np.concatenate([0.1 - z, 0.1 + z])
        pidx = np.concatenate([np.arange(n), np.arange(n)])
    dtype = jnp.bfloat16 if case == "bfloat16" else jnp.float32
    try:
        for steps in (1, 2, 12):
            cpp = _solver_state(True, monkeypatch, x, y, p, pidx, q, rows, steps, dtype, chunk)
            xla = _solver_state(False, monkeypatch, x, y, p, pidx, q, rows, steps, dtype, chunk)
            valid = xla[svm.VALID]
            for k in (svm.IT, svm.N_ROWS, svm.VALID, svm.SLOT_OF, svm.OWNER, svm.STAMP):
                np.testing.assert_array_equal(cpp[k], xla[k], err_msg=f"{case} {steps} {k}")
            np.testing.assert_array_equal(cpp[svm.WS][valid], xla[svm.WS][valid])
            for k in (svm.ALPHA, svm.F, svm.KBB, svm.GAP):
                np.testing.assert_allclose(cpp[k], xla[k], rtol=1e-5, atol=1e-5,
                                           err_msg=f"{case} {steps} {k}")
            assert int(cpp[svm.IT]) == steps and valid.any()  # (not converged yet)
            if case.endswith("evicting") and steps == 12:
                assert xla[svm.N_ROWS] > rows  # rows were evicted
    finally:
        svm._solve.clear_cache()


def test_native_inner_loop_opt_out():
    """FLAXCNN_NO_NATIVE_SVM=1: nothing is built or loaded, and the solver keeps XLA's loops."""
    import subprocess
    import sys

    code = (
        "import numpy as np\n"
        "from flaxcnn import native, svm\n"
        "assert not svm._native_inner() and 'FLAXCNN_NO_NATIVE_SVM' in native.svm_reason()\n"
        "assert not svm._native_outer() and 'FLAXCNN_NO_NATIVE_SVM' in native.svm_solve_reason()\n"
        "x = np.random.default_rng(0).normal(size=(80, 5))\n"
        "m = svm.SVC(kernel='linear').fit(x, (x[:, 0] > 0).astype(int))\n"
        "print((m.predict(x) == (x[:, 0] > 0)).mean())\n"
    )
    env = dict(os.environ, FLAXCNN_NO_NATIVE_SVM="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout) > 0.95


def test_small_working_set_and_cache_give_the_same_solution(fashion_pair):
    """Many outer iterations (q=16) with a cache of 24 rows (evictions) reach the same optimum."""
    x, y = fashion_pair
    full = svm.SVC(C=10, tol=TOL).fit(x, y)
    small = svm.SVC(C=10, tol=TOL, working_set_size=16, cache_size=1e-9).fit(x, y)
    assert small.n_iter_[0] > 10
    assert small.dual_objective_[0] == pytest.approx(full.dual_objective_[0], rel=OBJ_RTOL)
    _compare_decisions(small.decision_function(x), full.decision_function(x))


def test_cached_rows_read_on_the_host(fashion_pair, monkeypatch):
    """With every kernel row cached (the default at Fashion-MNIST's sizes), the float64
    gradient check reads the rows from the cache in host memory: `_rows` is neither compiled
    nor called, and the result is the one its device gather gives."""
    x, y = fashion_pair
    calls = []
    rows = svm._rows
    monkeypatch.setattr(svm, "_host_memory", lambda a: False)
    monkeypatch.setattr(svm, "_rows", lambda *a, **k: calls.append(1) or rows(*a, **k))
    via_device = svm.SVC(C=10, tol=TOL).fit(x, y)
    monkeypatch.undo()
    assert calls

    def no_rows(*a, **k):
        raise AssertionError("_rows called")

    monkeypatch.setattr(svm, "_rows", no_rows)
    on_host = svm.SVC(C=10, tol=TOL).fit(x, y)
    np.testing.assert_array_equal(on_host.dual_objective_, via_device.dual_objective_)
    np.testing.assert_array_equal(on_host.kkt_violation_, via_device.kkt_violation_)
    np.testing.assert_array_equal(on_host.dual_coef_, via_device.dual_coef_)


def test_cached_rows_read_on_the_host_for_svr(monkeypatch):
    """The same for epsilon-SVR, whose points carry two variables each."""
    rng = np.random.default_rng(0)
    x = rng.random((300, 784))
    z = np.sin(6 * x[:, :4].sum(1))
    kw = dict(kernel="rbf", C=10.0, epsilon=0.05, tol=TOL)
    calls = []
    rows = svm._rows
    monkeypatch.setattr(svm, "_host_memory", lambda a: False)
    monkeypatch.setattr(svm, "_rows", lambda *a, **k: calls.append(1) or rows(*a, **k))
    via_device = svm.SVR(**kw).fit(x, z)
    monkeypatch.undo()
    assert calls
    monkeypatch.setattr(svm, "_rows", lambda *a, **k: pytest.fail("_rows called"))
    on_host = svm.SVR(**kw).fit(x, z)
    np.testing.assert_array_equal(on_host.dual_coef_, via_device.dual_coef_)
    np.testing.assert_array_equal(on_host.intercept_, via_device.intercept_)


def test_multiclass_one_vs_one_layout(three_class):
    x, y = three_class
    c = 1.0
    ref = sk.SVC(C=c, tol=TOL).fit(x, y)
    ours = svm.SVC(C=c, tol=TOL).fit(x, y)
    np.testing.assert_array_equal(ours.classes_, ref.classes_)
    assert ours.dual_coef_.shape[0] == ref.dual_coef_.shape[0] == 2
    assert ours.intercept_.shape == ref.intercept_.shape == (3,)
    np.testing.assert_allclose(ours.intercept_, ref.intercept_, atol=DEC_TOL * 10)
    # per-pair coefficients, read out of the libsvm layout of both models
    kp = _kparams("rbf", {}, ours)
    assert ours.n_support_.sum() == len(ours.support_)
    ours_pairs, ref_pairs = _pairs(ours, y), _pairs(ref, y)
    for n, ((oi, oc), (ri, rc)) in enumerate(zip(ours_pairs, ref_pairs, strict=True)):
        _compare_support(oi, oc, ri, rc, c)
        obj_ref = _dual_objective(rc, x[ri], kp)
        assert ours.dual_objective_[n] == pytest.approx(obj_ref, rel=OBJ_RTOL)
    # support vectors grouped by class, as libsvm
    assert np.all(np.diff(y[ours.support_]) >= 0)
    # decision functions, both shapes, and predictions
    for shape in ("ovo", "ovr"):
        ref.set_params(decision_function_shape=shape)
        ours.set_params(decision_function_shape=shape)
        d_ref, d_ours = ref.decision_function(x), ours.decision_function(x)
        assert d_ours.shape == d_ref.shape
        _compare_decisions(d_ours, d_ref)
    np.testing.assert_array_equal(ours.predict(x), ref.predict(x))


def _pairs(model, y):
    """(sample indices, y alpha) per one-vs-one problem from a libsvm-layout model."""
    k = len(model.classes_)
    cls = np.searchsorted(model.classes_, y[model.support_])
    out = []
    for a in range(k):
        for b in range(a + 1, k):
            ia, ib = cls == a, cls == b
            idx = np.concatenate([model.support_[ia], model.support_[ib]])
            coef = np.concatenate([model.dual_coef_[b - 1, ia], model.dual_coef_[a, ib]])
            keep = coef != 0
            out.append((idx[keep], coef[keep]))
    return out


def test_one_vs_rest(three_class_small):
    from sklearn.multiclass import OneVsRestClassifier

    x, y = three_class_small
    ref = OneVsRestClassifier(sk.SVC(C=1.0, tol=TOL)).fit(x, y)
    ours = svm.SVC(C=1.0, tol=TOL, multiclass="ovr").fit(x, y)
    assert ours.dual_coef_.shape == (3, len(ours.support_))
    d_ref, d_ours = ref.decision_function(x), ours.decision_function(x)
    _compare_decisions(d_ours, d_ref)
    np.testing.assert_array_equal(ours.predict(x), ref.predict(x))


@pytest.mark.parametrize("kernel", ["linear", "rbf"])
def test_svr_matches_libsvm(kernel):
    x, z = make_regression(120, 8, n_informative=5, noise=10.0, random_state=2)
    z = z / z.std()
    params = KERNELS[kernel]
    c, eps = 3.0, 0.2
    ref = sk.SVR(kernel=kernel, C=c, epsilon=eps, tol=TOL, **params).fit(x, z)
    ours = svm.SVR(kernel=kernel, C=c, epsilon=eps, tol=TOL, **params).fit(x, z)
    kp = _kparams(kernel, params, ours)

    def objective(coef, sv):  # 1/2 b^T K b + eps sum |b| - z^T b, with b = a - a*
        k = pairwise_kernels(sv, sv, **kp)
        return 0.5 * coef @ k @ coef + eps * np.abs(coef).sum() - z[idx] @ coef

    idx = ref.support_
    obj_ref = objective(ref.dual_coef_[0], ref.support_vectors_)
    idx = ours.support_
    obj_ours = objective(ours.dual_coef_[0], x[ours.support_])
    assert ours.dual_objective_[0] == pytest.approx(obj_ref, rel=OBJ_RTOL)
    assert obj_ours == pytest.approx(obj_ref, rel=OBJ_RTOL)
    _compare_support(ours.support_, ours.dual_coef_[0], ref.support_, ref.dual_coef_[0], c)
    assert abs(ours.intercept_[0] - ref.intercept_[0]) <= DEC_TOL * (1 + abs(ref.intercept_[0]))
    _compare_decisions(ours.predict(x), ref.predict(x))
    assert ours.score(x, z) == pytest.approx(ref.score(x, z), abs=1e-4)
    # KKT of the 2n-variable problem, in float64
    k = pairwise_kernels(x, x, **kp)
    a, a_star = ours.alpha_[: len(z)], ours.alpha_[len(z) :]
    assert a.min() >= 0 and a_star.min() >= 0 and max(a.max(), a_star.max()) <= c
    assert abs(a.sum() - a_star.sum()) <= 1e-5 * c * len(z)
    beta = a - a_star
    yv = np.concatenate([np.ones(len(z)), -np.ones(len(z))])
    alpha = np.concatenate([a, a_star])
    grad = np.concatenate([k @ beta + eps - z, -(k @ beta) + eps + z])
    f = -yv * grad
    up = np.where(yv > 0, alpha < c, alpha > 0)
    low = np.where(yv > 0, alpha > 0, alpha < c)
    assert f[up].max() - f[low].min() <= TOL + KKT_SLACK


def test_gamma_scale_and_auto(binary):
    x, y = binary
    assert svm.SVC(gamma="scale").fit(x, y)._gamma == pytest.approx(1 / (8 * x.var()))
    assert svm.SVC(gamma="auto").fit(x, y)._gamma == pytest.approx(1 / 8)


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_bad_labels(binary):
    x, y = binary
    with pytest.raises(ValueError, match=r"labels must be integers.*such as \d\.5 "):
        svm.SVC().fit(x, y + 0.5)
    with pytest.raises(ValueError, match="labels must be integers"):
        svm.SVC().fit(x, np.array(["a", "b"] * (N // 2)))
    with pytest.raises(ValueError, match="labels must be integers.*NaN"):
        svm.SVC().fit(x, np.where(y == 0, np.nan, 1.0))
    with pytest.raises(ValueError, match="at least 2 classes"):
        svm.SVC().fit(x, np.zeros(N, int))
    with pytest.raises(ValueError, match="240 samples but y has 239"):
        svm.SVC().fit(x, y[:-1])
    # integral floats are integers
    svm.SVC(max_iter=1).set_params(kernel="linear")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", svm.ConvergenceWarning)
        assert svm.SVC(max_iter=1).fit(x, y.astype(float)).classes_.tolist() == [0, 1]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features(binary, bad):
    x, y = binary
    x = x.copy()
    x[3, 2] = bad
    with pytest.raises(ValueError, match="NaN or Inf.*row 3, column 2"):
        svm.SVC().fit(x, y)
    with pytest.raises(ValueError, match="NaN or Inf"):
        svm.SVR().fit(x, y.astype(float))
    model = svm.SVC(max_iter=1, kernel="linear")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", svm.ConvergenceWarning)
        model.fit(binary[0], y)
    with pytest.raises(ValueError, match="NaN or Inf"):
        model.predict(x)


@pytest.mark.parametrize("c", [0, -1.0, np.nan, "10"])
def test_bad_c(binary, c):
    with pytest.raises(ValueError, match="C must be"):
        svm.SVC(C=c).fit(*binary)
    with pytest.raises(ValueError, match="C must be"):
        svm.SVR(C=c).fit(binary[0], binary[1].astype(float))


def test_bad_parameters(binary):
    x, y = binary
    with pytest.raises(ValueError, match="unknown kernel 'gaussian'; choose one of linear"):
        svm.SVC(kernel="gaussian").fit(x, y)
    with pytest.raises(ValueError, match="unknown kernel"):
        svm.SVR(kernel="precomputed").fit(x, y.astype(float))
    with pytest.raises(ValueError, match="gamma must be"):
        svm.SVC(gamma="big").fit(x, y)
    with pytest.raises(ValueError, match="gamma must be"):
        svm.SVC(gamma=-1.0).fit(x, y)
    with pytest.raises(ValueError, match="degree must be an integer"):
        svm.SVC(kernel="poly", degree=2.5).fit(x, y)
    with pytest.raises(ValueError, match="epsilon must be >= 0"):
        svm.SVR(epsilon=-0.1).fit(x, y.astype(float))
    with pytest.raises(ValueError, match="multiclass must be"):
        svm.SVC(multiclass="all").fit(x, y)
    with pytest.raises(ValueError, match="2-D"):
        svm.SVC().fit(x[:, 0], y)
    with pytest.raises(ValueError, match="regression targets must be real"):
        svm.SVR().fit(x, np.array(["a"] * N))


def test_use_before_fit_and_wrong_width(binary):
    x, y = binary
    with pytest.raises(svm.NotFittedError, match="not fitted"):
        svm.SVC().predict(x)
    model = svm.SVC(kernel="linear", max_iter=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", svm.ConvergenceWarning)
        model.fit(x, y)
    with pytest.raises(ValueError, match="3 features, but the model was fitted with 8"):
        model.predict(x[:, :3])


def test_max_iter_warns(binary):
    with pytest.warns(svm.ConvergenceWarning, match="max_iter=1"):
        model = svm.SVC(kernel="linear", max_iter=1, C=100).fit(*binary)
    assert model.fit_status_ == 1


def test_run_reports_like_the_networks():
    """train.py --model svm: the networks' summary lines and a dict of results."""
    lines = []
    try:
        report = svm.run(train_size=300, test_size=200, gamma="scale", log=lines.append)
    except Exception as e:  # no Fashion-MNIST on this machine
        if "DataError" in type(e).__name__ or isinstance(e, FileNotFoundError):
            pytest.skip(f"Fashion-MNIST not available: {e}")
        raise
    assert lines[1].startswith("loss ") and ", train acc " in lines[1] and ", test acc " in lines[1]
    assert lines[2].endswith(f"examples/sec on {report['device']}")
    for key in ("loss", "train_acc", "test_acc", "fit_seconds", "predict_seconds", "n_support",
                "examples_per_sec", "dual_objective"):
        assert key in report
    assert report["train_examples"] == 300 and report["test_examples"] == 200
    assert report["test_acc"] > 0.6 and report["n_support"] > 0



def test_train_py_loads_the_compiled_solver_in_a_second_process(tmp_path):
    """`train.py --model svm` twice with one compilation cache: the second process loads the
    solver compiled by the first (compilation_cache.persistent_jit, no tracing) and fits the
    same machine."""
    import re
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "train.py", "--model", "svm", "--train-size", "400", "--test-size",
           "200", "--compilation-cache", str(tmp_path / "cache")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    outs = []
    for _ in range(2):
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=300, env=env)
        assert r.returncode == 0, r.stderr
        outs.append(r.stdout)
    assert len(list((tmp_path / "cache" / "executables").glob("_solve-*"))) == 1
    loaded = [re.search(r"(\d+) of (\d+) programs loaded", out) for out in outs]
    assert loaded[0] is None or loaded[0].group(1) == "0", outs[0]
    assert loaded[1] is not None and int(loaded[1].group(1)) >= 1, outs[1]
    for pattern in (r"loss .*", r"dual objective [^,]*"):  # losses, accuracies, objective
        first, second = (re.search(pattern, out).group(0) for out in outs)
        assert second == first


def test_run_rejects_bad_parameters_before_loading():
    with pytest.raises(ValueError, match="unknown kernel"):
        svm.run(kernel="gauss", data_dir="/nonexistent")
    with pytest.raises(ValueError, match="C must be"):
        svm.run(C=-1, data_dir="/nonexistent")
    with pytest.raises(ValueError, match="gamma must be"):
        svm.run(gamma="wide", data_dir="/nonexistent")
    with pytest.raises(ValueError, match="train_size must be"):
        svm.run(train_size=0, data_dir="/nonexistent")
    with pytest.raises(TypeError, match="unknown arguments"):
        svm.run(kernal="rbf")


def test_integer_grid_kernel_is_exact(fashion_pair):
    """8-bit images: the RBF kernel from the integer pixels has no cancellation error."""
    x, _ = fashion_pair
    grid = svm._integer_grid(x.astype(np.float32))
    assert grid == (255.0, 128.0)
    k = svm._on_grid(x.astype(np.float32), grid)
    assert np.abs(k).max() <= 128 and np.array_equal(k, np.rint(x * 255) - 128)
    gamma = 1 / (784 * x.var())
    exact = pairwise_kernels(x, x, metric="rbf", gamma=gamma)
    from_grid = np.asarray(svm.kernel_matrix(k, k, "rbf", gamma / 255**2), np.float64)
    assert np.abs(from_grid - exact).max() <= 1e-6
    assert svm._on_grid(x + 0.3 / 255, grid) is None  # off the grid
    assert svm._integer_grid(x.astype(np.float32) * 0.9) is None


def test_grid_points_in_bfloat16_give_the_float32_kernel_bit_for_bit():
    """Integers |k| <= 128 are exact in bfloat16, their products exact in float32, and 784 of
    them sum below 2**24: the bfloat16 products (`_dot`) equal the float32 ones exactly."""
    k = np.random.default_rng(0).integers(-128, 129, (200, 784)).astype(np.float32)
    k[0] = 128  # the extremes: the largest norm and dot product
    k[1] = -128
    sq = jnp.sum(jnp.asarray(k) ** 2, 1)
    f32 = svm._kernel_block(jnp.asarray(k), jnp.asarray(k), sq, sq, 1e-6, 0.0, kernel="rbf",
                            degree=3)
    kb = jnp.asarray(k, jnp.bfloat16)
    bf16 = svm._kernel_block(kb, kb, sq, sq, 1e-6, 0.0, kernel="rbf", degree=3)
    assert bf16.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(bf16), np.asarray(f32))
    dot = svm._dot(kb[:2], kb[:3])
    assert dot.shape == (2, 3) and float(dot[0, 1]) == -784 * 128**2


def test_fit_on_the_grid_is_the_same_in_bfloat16_and_float32(fashion_pair, monkeypatch):
    """The whole fit, solver trajectory included, is identical with either storage dtype."""
    x, y = fashion_pair
    monkeypatch.setattr(svm, "_grid_dtype", lambda solver=True: jnp.bfloat16)
    a = svm.SVC(C=10).fit(x, y)
    assert a._grid is not None
    monkeypatch.setattr(svm, "_grid_dtype", lambda solver=True: jnp.float32)
    b = svm.SVC(C=10).fit(x, y)
    np.testing.assert_array_equal(a.dual_coef_, b.dual_coef_)
    np.testing.assert_array_equal(a.n_iter_, b.n_iter_)
    np.testing.assert_array_equal(a.decision_function(x), b.decision_function(x))
    # a cache too small for all rows (recomputed rows, and float64 sums in other blocks): the
    # same coefficients; the intercept comes from a float64 gradient whose kernel rows `_rows`
    # computes (XLA's exp) where the C++ solver computed the others (oneDNN's), an ulp apart
    c = svm.SVC(C=10, cache_size=0.1).fit(x, y)
    assert (c.n_kernel_rows_ > a.n_kernel_rows_).any()
    np.testing.assert_array_equal(a.dual_coef_, c.dual_coef_)
    atol = 1e-6 if svm._native_outer() else 1e-12
    np.testing.assert_allclose(a.decision_function(x), c.decision_function(x), atol=atol)


def test_grid_dtype_follows_the_xla_flags(monkeypatch):
    """bfloat16 only where XLA:CPU's matrix products go through YNNPACK (fast in bfloat16)."""
    flag = "--xla_cpu_experimental_ynn_fusion_type"
    dot, conv = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT", "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
    cases = {
        "": True,
        "--xla_cpu_use_thunk_runtime=true": True,
        f"{flag}={dot},LIBRARY_FUSION_TYPE_REDUCE": True,  # flaxcnn's default
        f"{flag}=": False,
        f"{flag}=LIBRARY_FUSION_TYPE_REDUCE": False,
        f"{flag}=-{dot}": False,  # removed from XLA's default list
        f"{flag}=-{conv}": True,  # the default list less convolutions
        f"{flag}=+LIBRARY_FUSION_TYPE_REDUCE": True,
        f"{flag}=-{dot},+{dot}": True,
        f"{flag}= {flag}={dot}": True,  # the last one counts
        f"{flag}={dot} {flag}=": False,
    }
    for flags, dots in cases.items():
        assert svm._ynn_dots(flags) is dots, flags
    monkeypatch.setattr(svm, "_NATIVE_OUTER", False)  # XLA's solver: its products decide
    monkeypatch.setenv("XLA_FLAGS", f"{flag}=")
    expected = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    assert svm._grid_dtype() == expected
    monkeypatch.setenv("XLA_FLAGS", "")
    assert svm._grid_dtype() == jnp.bfloat16


def test_grid_dtype_of_the_native_solver(monkeypatch):
    """The C++ solver's products are oneDNN's: bfloat16 where the CPU has bfloat16 instructions
    (whatever XLA's flags), float32 elsewhere (oneDNN would emulate bfloat16)."""
    assert svm._native_outer()
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
    for has, dtype in ((True, jnp.bfloat16), (False, jnp.float32)):
        monkeypatch.setattr(svm, "_cpu_bf16", lambda has=has: has)
        assert svm._grid_dtype() == dtype
        assert svm._grid_dtype(solver=False) == jnp.float32  # XLA's products: the flags decide


def test_native_solver_given_bfloat16_points_on_a_cpu_without_bfloat16(fashion_pair, monkeypatch):
    """oneDNN 2 multiplies bfloat16 only with AVX-512: elsewhere `_solve_native` hands it the
    points in float32 (exact on the grid), and the fit is the same to the bit."""
    x, y = fashion_pair
    monkeypatch.setattr(svm, "_grid_dtype", lambda solver=True: jnp.bfloat16)
    a = svm.SVC(C=10).fit(x, y)
    monkeypatch.setattr(svm, "_cpu_bf16", lambda: False)
    svm._solve.clear_cache()  # (read when the solver is traced)
    try:
        b = svm.SVC(C=10).fit(x, y)
    finally:
        svm._solve.clear_cache()
    np.testing.assert_array_equal(a.dual_coef_, b.dual_coef_)
    np.testing.assert_array_equal(a.n_iter_, b.n_iter_)


def test_no_support_vectors_on_the_grid(fashion_pair):
    """Every target inside the epsilon tube: no support vectors, a constant prediction equal to
    libsvm's (the model's empty support-vector set is on the training data's grid)."""
    x, y = fashion_pair
    z = 0.01 * (y == 6)
    model = svm.SVR(kernel="rbf", C=1.0, epsilon=1.0).fit(x, z)
    assert model._grid is not None and model.support_vectors_.shape == (0, x.shape[1])
    ref = sk.SVR(kernel="rbf", C=1.0, epsilon=1.0).fit(x, z)
    assert len(ref.support_) == 0
    np.testing.assert_allclose(model.predict(x), ref.predict(x), atol=1e-9)


def test_predict_off_the_grid(fashion_pair):
    """A model trained on 8-bit images predicts other inputs through the plain float path."""
    x, y = fashion_pair
    model = svm.SVC(C=10).fit(x, y)
    assert model._grid is not None
    shifted = x + 1e-5  # off the grid: the float32 formula
    np.testing.assert_allclose(
        model.decision_function(shifted), model.decision_function(x), atol=1e-3
    )


@pytest.mark.parametrize("grid", [False, True])
def test_fit_compiles_the_solver_and_nothing_else(grid):
    """Eager JAX operations (`jnp.asarray`, `jnp.zeros`, `jnp.float32(...)`) each compile a
    program, 30-70 ms apiece in a cold fit: the fit prepares its arrays on the host, so the
    solver is its one compiled program and the decision function predict's (row caches up to
    64 MiB; larger ones are filled by `jnp.zeros`). A width no other test uses, so that nothing
    is compiled already, and no persistent compilation cache, whose hits are not compiles."""
    rng = np.random.default_rng(5)
    width = 13 if grid else 11
    x = rng.integers(0, 256, (150, width)) / 255 if grid else rng.random((150, width))
    y = rng.integers(0, 3, 150)
    compiled = []

    def listen(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(kw.get("fun_name"))

    cache_was = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    reset_cache()  # JAX decides whether to use the cache once per process, unless reset
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        model = svm.SVC(C=10).fit(x, y)
        fit = list(compiled)
        model.predict(x)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
        jax.config.update("jax_enable_compilation_cache", cache_was)
        reset_cache()
    assert (model._grid is not None) == grid
    assert fit == ["jit(_solve)"]
    assert compiled[len(fit):] == ["jit(_decision_chunk)"]


def test_speculative_rows_change_nothing_but_the_work(fashion_pair, monkeypatch):
    """The spare rows of a row block go to working-set members that did not move: more rows are
    computed, and the fit is the same to the bit (integer data)."""
    x, y = fashion_pair
    kw = dict(C=10, tol=TOL, working_set_size=64)
    svm._solve.clear_cache()  # the flag is read when the solver is traced
    on = svm.SVC(**kw).fit(x, y)
    monkeypatch.setattr(svm, "_SPECULATE", False)
    svm._solve.clear_cache()
    try:
        off = svm.SVC(**kw).fit(x, y)
    finally:
        svm._solve.clear_cache()
    assert on._grid is not None
    assert on.n_kernel_rows_.sum() > off.n_kernel_rows_.sum()
    np.testing.assert_array_equal(on.n_iter_, off.n_iter_)
    np.testing.assert_array_equal(on.dual_coef_, off.dual_coef_)
    np.testing.assert_array_equal(on.intercept_, off.intercept_)


def test_fit_restores_the_garbage_collector(binary, monkeypatch):
    """The collector is paused while a problem is solved (`_gc_paused`) and comes back as the
    caller had it: on, or off."""
    import gc

    x, y = binary
    during = []
    solve = svm._Problem.solve
    monkeypatch.setattr(
        svm._Problem, "solve", lambda *a, **k: during.append(gc.isenabled()) or solve(*a, **k)
    )
    assert gc.isenabled()
    svm.SVC(C=1.0).fit(x, y)
    assert during == [False] and gc.isenabled()
    gc.disable()
    try:
        svm.SVR(C=1.0).fit(x, y.astype(float))
        assert not gc.isenabled()
    finally:
        gc.enable()
