// The SVM solver's inner loop (flaxcnn.svm._inner_smo) as an XLA FFI custom call for the CPU
// (flaxcnn/native.py builds and loads this file).
//
// libsvm's SMO on a working set of q variables (64-512) takes thousands of steps, each a few
// passes over q numbers. Compiled by XLA, a step is ~16 small kernels launched one after another
// (2.2-3.3 us a step at q = 128-256), and on Fashion-MNIST's 10,000-image fit these steps were a
// third of the solver's time. Here a step costs a few hundred nanoseconds. The arithmetic is the
// same, in float32 (see _inner_smo_xla in svm.py, which stays the definition and the path on
// other platforms), up to rounding: XLA may fuse a multiply and an add into one FMA, this file
// (built without -march) never does, so a near-tie can pick another variable.

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

struct Violation {
  int64_t i;   // the I_up variable with the largest f (0 when I_up is empty, as jnp.argmax)
  float m;     // its f, or -inf
  float low;   // the smallest f over I_low, or +inf
};

// I_up: a can move in the direction of y; I_low: against it (svm._sets), among valid ones.
inline bool Up(float a, float y, float c, bool valid) {
  return valid && (y > 0 ? a < c : a > 0);
}
inline bool Low(float a, float y, float c, bool valid) {
  return valid && (y > 0 ? a > 0 : a < c);
}

Violation Violating(int64_t q, const float* a, const float* f, const float* y, const float* c,
                    const bool* valid) {
  Violation v{0, -kInf, kInf};
  for (int64_t k = 0; k < q; ++k) {
    float fu = Up(a[k], y[k], c[k], valid[k]) ? f[k] : -kInf;
    if (fu > v.m) {  // the first of equal maxima, as jnp.argmax
      v.m = fu;
      v.i = k;
    }
    if (Low(a[k], y[k], c[k], valid[k]) && f[k] < v.low) v.low = f[k];
  }
  return v;
}

ffi::Error InnerSmo(ffi::Buffer<ffi::F32> kbb, ffi::Buffer<ffi::F32> alpha0,
                    ffi::Buffer<ffi::F32> f0, ffi::Buffer<ffi::F32> y_buf,
                    ffi::Buffer<ffi::F32> c_buf, ffi::Buffer<ffi::PRED> valid_buf,
                    ffi::Buffer<ffi::F32> tol_buf, ffi::Buffer<ffi::S32> max_inner_buf,
                    float tau, float local_factor, ffi::ResultBuffer<ffi::F32> alpha_out,
                    ffi::ResultBuffer<ffi::S32> iterations) {
  const int64_t q = alpha0.element_count();
  if (kbb.element_count() != q * q || f0.element_count() != q || y_buf.element_count() != q ||
      c_buf.element_count() != q || valid_buf.element_count() != q) {
    return ffi::Error::InvalidArgument("flaxcnn_svm_inner_smo: inconsistent shapes");
  }
  const float* K = kbb.typed_data();
  const float* y = y_buf.typed_data();
  const float* c = c_buf.typed_data();
  const bool* valid = valid_buf.typed_data();
  const float tol = *tol_buf.typed_data();
  const int32_t max_inner = *max_inner_buf.typed_data();
  float* a = alpha_out->typed_data();
  std::vector<float> f_vec(f0.typed_data(), f0.typed_data() + q), diag(q);
  float* f = f_vec.data();
  for (int64_t k = 0; k < q; ++k) {
    a[k] = alpha0.typed_data()[k];
    diag[k] = K[k * q + k];
  }

  Violation v = Violating(q, a, f, y, c, valid);
  const float local_tol = std::fmax(tol, local_factor * (v.m - v.low));
  int32_t it = 0;
  while (it < max_inner) {
    if (it > 0) v = Violating(q, a, f, y, c, valid);
    if (v.m - v.low < local_tol) break;
    const int64_t i = v.i;
    const float* ki = K + i * q;
    auto curvature = [&](int64_t k) {  // of the direction (i, k), tau where not positive
      const float curv = (diag[i] + diag[k]) - 2.0f * ki[k];
      return curv > 0 ? curv : tau;
    };
    // the second variable: the largest decrease of the objective (second-order selection);
    // with no candidate, the first (jnp.argmax of all -inf)
    int64_t j = 0;
    float best = -kInf;
    for (int64_t k = 0; k < q; ++k) {
      const float bk = v.m - f[k];
      const float score =
          (Low(a[k], y[k], c[k], valid[k]) && bk > 0) ? bk * bk / curvature(k) : -kInf;
      if (score > best) {
        best = score;
        j = k;
      }
    }
    const float a_j = curvature(j), b_j = v.m - f[j];
    const float* kj = K + j * q;
    const float ai = a[i], aj = a[j];
    const float lim_i = y[i] > 0 ? c[i] - ai : ai;
    const float lim_j = y[j] > 0 ? aj : c[j] - aj;
    float lam = std::fmin(std::fmin(b_j / a_j, lim_i), lim_j);
    lam = std::fmax(lam, 0.0f);
    // land exactly on a bound when the step is clipped by it
    const float new_ai = lam >= lim_i ? (y[i] > 0 ? c[i] : 0.0f) : ai + y[i] * lam;
    const float new_aj = lam >= lim_j ? (y[j] > 0 ? 0.0f : c[j]) : aj - y[j] * lam;
    a[i] = new_ai;
    a[j] = new_aj;
    for (int64_t k = 0; k < q; ++k) f[k] = f[k] - lam * (ki[k] - kj[k]);
    ++it;
  }
  *iterations->typed_data() = it;
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxcnnSvmInnerSmo, InnerSmo,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // kbb [q, q]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // alpha [q]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // f [q]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // y [q]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // c [q]
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // valid [q]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // tol []
                                  .Arg<ffi::Buffer<ffi::S32>>()   // max_inner []
                                  .Attr<float>("tau")
                                  .Attr<float>("local_factor")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // alpha [q]
                                  .Ret<ffi::Buffer<ffi::S32>>()); // iterations []
