// The SVM solver's inner loop (flaxcnn.svm._inner_smo) as an XLA FFI custom call for the CPU
// (flaxcnn/native.py builds and loads this file), and, built with FLAXCNN_SVM_SOLVE against
// oneDNN, the whole solver (svm._solve; the second half of this file).
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

// libsvm's SMO on a working set of q variables: updates a (from alpha0) in place and returns
// the number of steps taken. K: [q, q]; f0: the starting f = -y G of the working set.
int32_t SmoLoop(int64_t q, const float* K, const float* alpha0, const float* f0, const float* y,
                const float* c, const bool* valid, float tol, int32_t max_inner, float tau,
                float local_factor, float* a, std::vector<float>& f_vec,
                std::vector<float>& diag) {
  f_vec.assign(f0, f0 + q);
  diag.resize(q);
  float* f = f_vec.data();
  for (int64_t k = 0; k < q; ++k) {
    a[k] = alpha0[k];
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
  return it;
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
  std::vector<float> f, diag;
  *iterations->typed_data() = SmoLoop(
      q, kbb.typed_data(), alpha0.typed_data(), f0.typed_data(), y_buf.typed_data(),
      c_buf.typed_data(), valid_buf.typed_data(), *tol_buf.typed_data(),
      *max_inner_buf.typed_data(), tau, local_factor, alpha_out->typed_data(), f, diag);
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

#ifdef FLAXCNN_SVM_SOLVE
// ------------------------------------------------------------------------------------------
// The whole solver (svm._solve's outer loop) as one custom call, built against oneDNN
// (flaxcnn/native.py compiles this file a second time with FLAXCNN_SVM_SOLVE defined).
//
// Compiled by XLA, the outer step is ~120 fused kernels; compiling them is most of a cold
// 10,000-image fit (0.7-0.8 s of 1.4 s). Here it is C++, and its matrix products are oneDNN's,
// which packs the problem's points once per call (YNNPACK packed them at every product). The
// steps are svm._solve's (the definition, and the path on other platforms), in float32, up to
// rounding: sums run in another order and exp/tanh are oneDNN's.

#include <oneapi/dnnl/dnnl.hpp>

#include <algorithm>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#if DNNL_CPU_THREADING_RUNTIME == DNNL_RUNTIME_OMP
#include <omp.h>
#endif

#define FLAXCNN_HOT __attribute__((target_clones("avx512f", "avx2", "default"), optimize("O3")))

namespace {

using dnnl::memory;
using dt = memory::data_type;

enum Kernel { kLinear = 0, kPoly = 1, kRbf = 2, kSigmoid = 3 };  // svm.KERNELS

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// C[M, N] = A[M, K] B[N, K]^T, A and B row-major; B either as it lies or packed into the
// primitive's own layout (the problem's points, packed once per call).
struct Gemm {
  dnnl::matmul primitive;
  memory::desc a, b, b_plain, c, scratchpad;
  dnnl::reorder pack;  // b_plain -> b (packed only)
};

struct Eltwise {
  dnnl::eltwise_forward primitive;
  memory::desc md, scratchpad;
};

std::mutex cache_mutex;

// oneDNN's matrix products fix their thread count when created: it is part of their keys
int Threads() {
#if DNNL_CPU_THREADING_RUNTIME == DNNL_RUNTIME_OMP
  return omp_get_max_threads();
#else
  return 0;
#endif
}

template <typename T, typename K, typename F>
std::shared_ptr<T> Cached(std::map<K, std::shared_ptr<T>>& cache, const K& key, F make) {
  std::lock_guard<std::mutex> lock(cache_mutex);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  auto made = make();
  cache.emplace(key, made);
  return made;
}

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

std::shared_ptr<Gemm> GetGemm(int64_t m, int64_t n, int64_t k, dt type, bool packed) {
  static std::map<std::tuple<int64_t, int64_t, int64_t, int, bool, int>, std::shared_ptr<Gemm>>
      cache;
  return Cached(cache, std::make_tuple(m, n, k, static_cast<int>(type), packed, Threads()), [&] {
    auto g = std::make_shared<Gemm>();
    auto& eng = Engine();
    g->a = memory::desc({m, k}, type, memory::dims{k, 1});
    g->b_plain = memory::desc({k, n}, type, memory::dims{1, k});  // B^T of row-major [n, k]
    g->c = memory::desc({m, n}, dt::f32, memory::dims{n, 1});
    memory::desc b_any = packed ? memory::desc({k, n}, type, memory::format_tag::any) : g->b_plain;
    auto attr = UserScratchpad();
#if DNNL_VERSION_MAJOR >= 3
    dnnl::matmul::primitive_desc pd(eng, g->a, b_any, g->c, attr);
#else
    dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(g->a, b_any, g->c), attr, eng);
#endif
    g->b = pd.weights_desc();
    g->scratchpad = pd.scratchpad_desc();
    g->primitive = dnnl::matmul(pd);
    if (packed)
      g->pack = dnnl::reorder(memory(g->b_plain, eng, nullptr), memory(g->b, eng, nullptr));
    return g;
  });
}

std::shared_ptr<Eltwise> GetEltwise(int64_t m, int64_t n, dnnl::algorithm algo) {
  static std::map<std::tuple<int64_t, int64_t, int, int>, std::shared_ptr<Eltwise>> cache;
  return Cached(cache, std::make_tuple(m, n, static_cast<int>(algo), Threads()), [&] {
    auto e = std::make_shared<Eltwise>();
    auto& eng = Engine();
    e->md = memory::desc({m, n}, dt::f32, memory::dims{n, 1});
    auto attr = UserScratchpad();
#if DNNL_VERSION_MAJOR >= 3
    dnnl::eltwise_forward::primitive_desc pd(eng, dnnl::prop_kind::forward_inference, algo, e->md,
                                             e->md, 0.f, 0.f, attr);
#else
    dnnl::eltwise_forward::primitive_desc pd(
        dnnl::eltwise_forward::desc(dnnl::prop_kind::forward_inference, algo, e->md, 0.f, 0.f),
        attr, eng);
#endif
    e->scratchpad = pd.scratchpad_desc();
    e->primitive = dnnl::eltwise_forward(pd);
    return e;
  });
}

// Per-thread memory, grown as needed and kept (two problems are solved side by side).
struct Scratch {
  std::vector<char> a, packed, packed_tail, pad;
  std::vector<float> block, knew, v, a_ws, f_ws, y_ws, c_ws, a_new, smo_f, smo_diag, coef;
  std::vector<int32_t> pts, order, slots, todo, victims, mark, cand;
  std::vector<char> xs, keep, x_local;
  std::vector<float> sq_local;
};
thread_local Scratch scratch;

// The per-thread buffers are kept from call to call (45 problems of the same size), except
// large ones: a thread that solved a 60,000-point problem does not keep its copies.
void ReleaseLarge() {
  constexpr size_t kKeep = size_t{64} << 20;
  for (auto* v : {&scratch.x_local, &scratch.packed, &scratch.packed_tail, &scratch.pad})
    if (v->capacity() > kKeep) std::vector<char>().swap(*v);
}

void* Pad(size_t size) {
  if (scratch.pad.size() < size) scratch.pad.resize(size);
  return scratch.pad.data();
}

FLAXCNN_HOT void Axpy(int64_t n, float a, const float* x, float* y) {
  for (int64_t j = 0; j < n; ++j) y[j] += a * x[j];
}

// -gamma * max(|a|^2 + |b|^2 - 2 a.b, 0) for one row, from a.b (svm._kernel_block's order)
FLAXCNN_HOT void RbfExponent(int64_t n, float sqa, const float* sqb, float gamma, float* row) {
  const float g = -gamma;
  for (int64_t j = 0; j < n; ++j) {
    const float d2 = (sqa + sqb[j]) - 2.0f * row[j];
    row[j] = g * (d2 > 0.0f ? d2 : 0.0f);
  }
}

FLAXCNN_HOT void Affine(int64_t n, float a, float b, float* row) {
  for (int64_t j = 0; j < n; ++j) row[j] = a * row[j] + b;
}

float IntegerPow(float x, int degree) {  // lax.integer_pow: repeated squaring
  float acc = 1.0f;
  for (int e = degree; e > 0; e >>= 1, x *= x)
    if (e & 1) acc *= x;
  return acc;
}

struct Solver {
  // the problem
  int64_t n, m, q, h, d, rows;
  bool full;
  dt type;
  size_t esize;
  const char* x;
  const float* sq;
  const int32_t* pidx;
  const float* y;
  const float* c;
  int kernel, degree;
  float gamma, coef0, tau, local_factor;
  int64_t chunk, tail, block;
  bool speculate;
  // the state (in place)
  float *alpha, *f, *kbb, *cache;
  int32_t *ws, *slot_of, *owner, *stamp;
  bool* valid;
  dnnl::stream stream{Engine()};
  std::shared_ptr<Gemm> g_chunk, g_tail, g_block;
  void *packed_chunk_data = nullptr, *packed_tail_data = nullptr;  // the points, packed (Pack)

  const char* Row(int64_t p) const { return x + p * d * esize; }

  void Run(const dnnl::primitive& p, std::unordered_map<int, memory> args,
           const memory::desc& scratchpad) {
    args.insert({DNNL_ARG_SCRATCHPAD, memory(scratchpad, Engine(), Pad(scratchpad.get_size()))});
    p.execute(stream, args);
  }

  // Pack all points as the row products' B operand, once per call.
  void Pack() {
    auto& eng = Engine();
    g_chunk = GetGemm(chunk, n, d, type, true);
    g_tail = tail < chunk ? GetGemm(tail, n, d, type, true) : g_chunk;
    scratch.packed.resize(g_chunk->b.get_size());
    memory plain(g_chunk->b_plain, eng, const_cast<char*>(x));
    memory packed(g_chunk->b, eng, scratch.packed.data());
    g_chunk->pack.execute(stream, plain, packed);
    packed_chunk_data = packed_tail_data = scratch.packed.data();
    if (!(g_tail->b == g_chunk->b)) {  // the tail-row product wants its own layout
      scratch.packed_tail.resize(g_tail->b.get_size());
      memory packed_tail(g_tail->b, eng, scratch.packed_tail.data());
      g_tail->pack.execute(stream, plain, packed_tail);
      packed_tail_data = scratch.packed_tail.data();
    }
    stream.wait();
  }

  // The kernel function applied to a [mm, nn] block of dot products in place; sqa: [mm].
  void Finish(float* blk, int64_t mm, int64_t nn, const float* sqa, const float* sqb) {
    if (kernel == kLinear) return;
    if (kernel == kRbf) {
      for (int64_t r = 0; r < mm; ++r) RbfExponent(nn, sqa[r], sqb, gamma, blk + r * nn);
    } else {
      for (int64_t r = 0; r < mm; ++r) Affine(nn, gamma, coef0, blk + r * nn);
    }
    if (kernel == kPoly) {
      for (int64_t i = 0; i < mm * nn; ++i) blk[i] = IntegerPow(blk[i], degree);
      return;
    }
    auto e = GetEltwise(mm, nn, kernel == kRbf ? dnnl::algorithm::eltwise_exp
                                               : dnnl::algorithm::eltwise_tanh);
    memory mem(e->md, Engine(), blk);
    Run(e->primitive, {{DNNL_ARG_SRC, mem}, {DNNL_ARG_DST, mem}}, e->scratchpad);
  }

  // K(x[p_r], b-points) for the first `active` of mm points p (the rest repeat p[0]): gathers
  // the rows, one product, the kernel function. Returns the [mm, nn] block.
  float* Block(const Gemm& g, const int32_t* p, int64_t active, int64_t mm, int64_t nn,
               void* b_data, const float* sqb) {
    const size_t row_bytes = d * esize;
    if (scratch.a.size() < mm * row_bytes) scratch.a.resize(mm * row_bytes);
    std::vector<float> sqa(mm);
    for (int64_t r = 0; r < mm; ++r) {
      const int64_t pt = p[r < active ? r : 0];
      std::memcpy(scratch.a.data() + r * row_bytes, Row(pt), row_bytes);
      sqa[r] = sq[pt];
    }
    if (scratch.block.size() < static_cast<size_t>(mm * nn)) scratch.block.resize(mm * nn);
    float* out = scratch.block.data();
    auto& eng = Engine();
    Run(g.primitive,
        {{DNNL_ARG_SRC, memory(g.a, eng, scratch.a.data())},
         {DNNL_ARG_WEIGHTS, memory(g.b, eng, b_data)},
         {DNNL_ARG_DST, memory(g.c, eng, out)}},
        g.scratchpad);
    Finish(out, mm, nn, sqa.data(), sqb);
    stream.wait();
    return out;
  }

  float Violation() const {  // max f over I_up - min f over I_low, all variables
    float hi = -kInf, lo = kInf;
    for (int64_t t = 0; t < m; ++t) {
      if (Up(alpha[t], y[t], c[t], true) && f[t] > hi) hi = f[t];
      if (Low(alpha[t], y[t], c[t], true) && f[t] < lo) lo = f[t];
    }
    return hi - lo;
  }

  // k most violating variables outside `excluded`: k/2 from the top of I_up by f, then the
  // bottom of I_low (svm._select; lax.top_k's order: larger first, then lower index). One pass
  // each, keeping the best so far in order: few candidates beat the worst kept one.
  void Select(std::vector<char>& excluded, int32_t* out, bool* ok, int64_t k) {
    const int64_t k_up = k / 2;
    auto& best = scratch.cand;
    auto pick = [&](bool up, int64_t count, int32_t* o, bool* v) {
      best.clear();
      if (count == 0) return;
      auto key = [&](int32_t t) { return up ? f[t] : -f[t]; };
      for (int64_t t = 0; t < m; ++t) {
        if (excluded[t] || !(up ? Up(alpha[t], y[t], c[t], true) : Low(alpha[t], y[t], c[t], true)))
          continue;
        const float kt = key(static_cast<int32_t>(t));
        const int64_t size = best.size();
        if (size == count && !(kt > key(best.back()))) continue;  // ties: the lower index stays
        int64_t pos = size == count ? size - 1 : size;
        if (size < count) best.push_back(0);
        while (pos > 0 && kt > key(best[pos - 1])) {
          best[pos] = best[pos - 1];
          --pos;
        }
        best[pos] = static_cast<int32_t>(t);
      }
      const int64_t take = best.size();
      for (int64_t r = 0; r < count; ++r) {
        o[r] = r < take ? best[r] : 0;
        v[r] = r < take;
        if (r < take) excluded[best[r]] = 1;
      }
    };
    pick(true, k_up, out, ok);
    pick(false, k - k_up, out + k_up, ok + k_up);
  }

  // K(new half of the working set, working set) [h, q] into knew (svm._new_block).
  void NewBlock(const int32_t* pts, float* knew) {
    std::vector<int32_t> todo;
    for (int64_t r = 0; r < h; ++r) {
      const int32_t slot = slot_of[pts[h + r]];
      float* out = knew + r * q;
      if (slot >= 0) {
        const float* row = cache + static_cast<int64_t>(slot) * n;
        for (int64_t k = 0; k < q; ++k) out[k] = row[pts[k]];
      } else {
        std::fill(out, out + q, 0.0f);
        if (valid[h + r]) todo.push_back(static_cast<int32_t>(r));
      }
    }
    if (todo.empty()) return;
    std::vector<float> sqs(q);
    auto& xs = scratch.xs;  // the working set's points, gathered
    const size_t row_bytes = d * esize;
    xs.resize(q * row_bytes);
    for (int64_t k = 0; k < q; ++k) {
      std::memcpy(xs.data() + k * row_bytes, Row(pts[k]), row_bytes);
      sqs[k] = sq[pts[k]];
    }
    if (!g_block) g_block = GetGemm(block, q, d, type, false);
    const Gemm* g = g_block.get();
    std::vector<int32_t> p(block);
    for (size_t b = 0; b < todo.size(); b += block) {
      const int64_t active = std::min<int64_t>(block, todo.size() - b);
      for (int64_t r = 0; r < active; ++r) p[r] = pts[h + todo[b + r]];
      const float* blk = Block(*g, p.data(), active, block, q, xs.data(), sqs.data());
      for (int64_t r = 0; r < active; ++r)
        std::memcpy(knew + todo[b + r] * q, blk + r * q, q * sizeof(float));
    }
  }

  // Makes the rows of the points pts[k] (want[k]) resident (svm._fetch); slots[k] their cache
  // slots (0 for the others). Returns the number of rows computed.
  int64_t Fetch(const int32_t* pts, const bool* want, int32_t it, int32_t* slots) {
    auto& mark = scratch.mark;  // a point's first wanted position (-1: none), reset below
    if (mark.size() < static_cast<size_t>(n)) mark.assign(n, -1);
    auto& todo = scratch.todo;
    todo.clear();
    for (int64_t k = 0; k < q; ++k) {
      if (!want[k] || mark[pts[k]] >= 0) continue;
      mark[pts[k]] = static_cast<int32_t>(k);
      if (slot_of[pts[k]] < 0) todo.push_back(pts[k]);
    }
    for (int64_t k = 0; k < q; ++k) mark[pts[k]] = -1;
    const int64_t n_need = todo.size();
    auto& victims = scratch.victims;
    if (!full && n_need > 0) {
      // keep the wanted rows already cached; evict the least recently used others (rows >= 2q
      // leaves at least q of them)
      auto& keep = scratch.keep;
      keep.assign(rows, 0);
      for (int64_t k = 0; k < q; ++k) {
        if (want[k] && slot_of[pts[k]] >= 0) {
          stamp[slot_of[pts[k]]] = it;
          keep[slot_of[pts[k]]] = 1;
        }
      }
      auto& cand = scratch.cand;
      cand.clear();
      for (int64_t s = 0; s < rows; ++s)
        if (!keep[s]) cand.push_back(static_cast<int32_t>(s));
      auto older = [&](int32_t a, int32_t b) {
        return stamp[a] < stamp[b] || (stamp[a] == stamp[b] && a < b);
      };
      std::nth_element(cand.begin(), cand.begin() + n_need, cand.end(), older);
      std::sort(cand.begin(), cand.begin() + n_need, older);
      victims.assign(cand.begin(), cand.begin() + n_need);
    }
    // whole `chunk`-row blocks, then `tail`-row ones (svm._fetch)
    const int64_t whole = tail < chunk ? n_need / chunk * chunk : n_need;
    for (int64_t b = 0; b < n_need;) {
      const bool big = b < whole;
      const Gemm& g = big ? *g_chunk : *g_tail;
      const int64_t size = big ? chunk : tail;
      const int64_t active = std::min(size, n_need - b);
      const float* blk = Block(g, todo.data() + b, active, size, n,
                               big ? packed_chunk_data : packed_tail_data, sq);
      for (int64_t r = 0; r < active; ++r) {
        const int32_t p = todo[b + r];
        const int32_t v = full ? p : victims[b + r];
        if (!full) {
          if (owner[v] >= 0) slot_of[owner[v]] = -1;
          owner[v] = p;
        }
        slot_of[p] = v;
        std::memcpy(cache + static_cast<int64_t>(v) * n, blk + r * n, n * sizeof(float));
      }
      b += size;
    }
    for (int64_t k = 0; k < q; ++k) {
      slots[k] = want[k] ? slot_of[pts[k]] : 0;
      if (!full && want[k]) stamp[slots[k]] = it;
    }
    return n_need;
  }

  // One outer step (svm._solve's body). Returns (inner iterations, rows computed).
  std::pair<int64_t, int64_t> Step(int32_t it, float tol, int32_t max_inner) {
    // the new working set: the newer half of the old one, then h new variables
    std::vector<char> excluded(m, 0);
    for (int64_t k = 0; k < q; ++k)
      if (valid[k]) excluded[ws[k]] = 1;
    std::vector<int32_t> new_ws(h);
    std::unique_ptr<bool[]> new_valid(new bool[h]);
    Select(excluded, new_ws.data(), new_valid.get(), h);
    for (int64_t k = 0; k < h; ++k) {
      ws[k] = ws[h + k];
      valid[k] = valid[h + k];
      ws[h + k] = new_ws[k];
      valid[h + k] = new_valid[k];
    }
    auto& pts = scratch.pts;
    pts.resize(q);
    for (int64_t k = 0; k < q; ++k) pts[k] = pidx[ws[k]];
    // the kernel among the working set: the kept block moves up-left, the new rows below
    auto& knew = scratch.knew;
    knew.resize(h * q);
    NewBlock(pts.data(), knew.data());
    for (int64_t r = 0; r < h; ++r) {  // (rows h..q-1 are read, rows 0..h-1 written)
      std::memcpy(kbb + r * q, kbb + (h + r) * q + h, h * sizeof(float));
      for (int64_t s = 0; s < h; ++s) kbb[r * q + h + s] = knew[s * q + r];
    }
    std::memcpy(kbb + h * q, knew.data(), h * q * sizeof(float));
    for (int64_t r = 0; r < q; ++r)
      for (int64_t s = 0; s < q; ++s)
        if (!(valid[r] && valid[s])) kbb[r * q + s] = 0.0f;
    // the sub-problem
    auto &a_ws = scratch.a_ws, &f_ws = scratch.f_ws, &y_ws = scratch.y_ws, &c_ws = scratch.c_ws,
         &a_new = scratch.a_new;
    a_ws.resize(q), f_ws.resize(q), y_ws.resize(q), c_ws.resize(q), a_new.resize(q);
    for (int64_t k = 0; k < q; ++k) {
      a_ws[k] = alpha[ws[k]];
      f_ws[k] = f[ws[k]];
      y_ws[k] = y[ws[k]];
      c_ws[k] = c[ws[k]];
    }
    const int32_t n_in = SmoLoop(q, kbb, a_ws.data(), f_ws.data(), y_ws.data(), c_ws.data(), valid,
                                 tol, max_inner, tau, local_factor, a_new.data(), scratch.smo_f,
                                 scratch.smo_diag);
    // the variables that moved, then the spare rows of the last row block (svm._speculative)
    std::unique_ptr<bool[]> changed(new bool[q]), want(new bool[q]);
    auto& coef = scratch.coef;
    coef.resize(q);
    int64_t n_changed = 0, n_uncached_changed = 0;
    for (int64_t k = 0; k < q; ++k) {
      const float delta = valid[k] ? a_new[k] - a_ws[k] : 0.0f;
      if (valid[k]) alpha[ws[k]] = a_new[k];
      changed[k] = delta != 0;
      want[k] = changed[k];
      coef[k] = y_ws[k] * delta;
      n_changed += changed[k];
      n_uncached_changed += changed[k] && slot_of[pts[k]] < 0;
    }
    if (speculate && full) {
      int64_t spare;
      if (tail < chunk) {
        const int64_t r = n_uncached_changed % chunk;
        spare = std::min((tail - r % tail) % tail, chunk - r);
      } else {
        spare = (chunk - n_uncached_changed % chunk) % chunk;
      }
      for (int64_t k = q - 1; k >= 0 && spare > 0; --k) {  // newer half first
        if (valid[k] && !changed[k] && slot_of[pts[k]] < 0) {
          want[k] = true;
          --spare;
        }
      }
    }
    // the changed variables first (the gradient reads the first n_changed), then the rest
    auto& order = scratch.order;
    order.clear();
    for (int pass = 0; pass < 3; ++pass)
      for (int64_t k = 0; k < q; ++k)
        if ((pass == 0 && changed[k]) || (pass == 1 && want[k] && !changed[k]) ||
            (pass == 2 && !want[k]))
          order.push_back(static_cast<int32_t>(k));
    std::vector<int32_t> pts_o(q);
    auto& slots = scratch.slots;
    slots.resize(q);
    std::unique_ptr<bool[]> want_o(new bool[q]);
    for (int64_t k = 0; k < q; ++k) {
      pts_o[k] = pts[order[k]];
      want_o[k] = want[order[k]];
    }
    const int64_t n_new = Fetch(pts_o.data(), want_o.get(), it, slots.data());
    // f -= sum_s y_s da_s K(., x_s) over the variables that moved
    auto& v = scratch.v;
    v.assign(n, 0.0f);
    for (int64_t k = 0; k < n_changed; ++k)
      Axpy(n, coef[order[k]], cache + static_cast<int64_t>(slots[k]) * n, v.data());
    for (int64_t t = 0; t < m; ++t) f[t] -= v[pidx[t]];
    return {n_in, n_new};
  }
};

template <typename T>
ffi::Error CheckCount(const T& buf, int64_t count, const char* what) {
  if (buf.element_count() != count)
    return ffi::Error::InvalidArgument(std::string("flaxcnn_svm_solve: wrong size of ") + what);
  return ffi::Error::Success();
}

ffi::Error Solve(ffi::Buffer<ffi::S32>, ffi::Buffer<ffi::S32>, ffi::Buffer<ffi::S32>,
                 ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::S32>,
                 ffi::Buffer<ffi::PRED>, ffi::Buffer<ffi::F32>, ffi::Buffer<ffi::F32>,
                 ffi::Buffer<ffi::S32>, ffi::Buffer<ffi::S32>, ffi::Buffer<ffi::S32>,
                 ffi::AnyBuffer x_buf, ffi::Buffer<ffi::F32> sq_buf,
                 ffi::Buffer<ffi::S32> points_buf, ffi::Buffer<ffi::S32> pidx_buf,
                 ffi::Buffer<ffi::F32> y_buf, ffi::Buffer<ffi::F32> c_buf,
                 ffi::Buffer<ffi::F32> tol_buf, ffi::Buffer<ffi::S32> max_outer_buf,
                 ffi::Buffer<ffi::F32> gamma_buf, ffi::Buffer<ffi::F32> coef0_buf,
                 ffi::Buffer<ffi::S32> max_inner_buf, ffi::Buffer<ffi::S32> threads_buf,
                 int32_t kernel, int32_t degree, int32_t chunk, int32_t tail, int32_t block,
                 int32_t speculate, float tau, float local_factor,
                 ffi::ResultBuffer<ffi::S32> it_out, ffi::ResultBuffer<ffi::S32> n_inner_out,
                 ffi::ResultBuffer<ffi::S32> n_rows_out, ffi::ResultBuffer<ffi::F32> alpha_out,
                 ffi::ResultBuffer<ffi::F32> f_out, ffi::ResultBuffer<ffi::S32> ws_out,
                 ffi::ResultBuffer<ffi::PRED> valid_out, ffi::ResultBuffer<ffi::F32> kbb_out,
                 ffi::ResultBuffer<ffi::F32> cache_out, ffi::ResultBuffer<ffi::S32> slot_of_out,
                 ffi::ResultBuffer<ffi::S32> owner_out, ffi::ResultBuffer<ffi::S32> stamp_out,
                 ffi::ResultBuffer<ffi::F32> gap_out) {
#if DNNL_CPU_THREADING_RUNTIME == DNNL_RUNTIME_OMP
  // oneDNN's threads for this call (two problems solved side by side take one core each)
  const int saved_threads = omp_get_max_threads();
  omp_set_num_threads(std::max(1, *threads_buf.typed_data()));
#endif
  ffi::Error result = ffi::Error::Success();
  try {
    result = [&]() -> ffi::Error {
      // the state's outputs alias its inputs (svm._solve_native): work on them in place
      Solver s;
      const auto x_dims = x_buf.dimensions();
      if (x_dims.size() != 2)
        return ffi::Error::InvalidArgument("flaxcnn_svm_solve: x must be 2-D");
      if (x_buf.element_type() == ffi::DataType::BF16) {
        s.type = dt::bf16;
      } else if (x_buf.element_type() == ffi::DataType::F32) {
        s.type = dt::f32;
      } else {
        return ffi::Error::InvalidArgument("flaxcnn_svm_solve: x must be float32 or bfloat16");
      }
      const int64_t n_all = x_dims[0];
      s.n = points_buf.element_count();
      s.d = x_dims[1];
      s.esize = s.type == dt::bf16 ? 2 : 4;
      s.m = alpha_out->element_count();
      s.q = ws_out->element_count();
      s.h = s.q / 2;
      s.rows = cache_out->dimensions()[0];
      s.full = s.rows >= s.n;
      for (auto e : {CheckCount(sq_buf, n_all, "sq"), CheckCount(pidx_buf, s.m, "pidx"),
                     CheckCount(y_buf, s.m, "y"), CheckCount(c_buf, s.m, "c"),
                     CheckCount(*f_out, s.m, "f"), CheckCount(*valid_out, s.q, "valid"),
                     CheckCount(*kbb_out, s.q * s.q, "kbb"),
                     CheckCount(*cache_out, s.rows * s.n, "cache"),
                     CheckCount(*slot_of_out, s.n, "slot_of"),
                     CheckCount(*owner_out, s.full ? owner_out->element_count() : s.rows, "owner"),
                     CheckCount(*stamp_out, s.full ? stamp_out->element_count() : s.rows,
                                "stamp")}) {
        if (e.failure()) return e;
      }
      if (s.q % 2 || chunk < 1 || tail < 1 || block < 1 || (!s.full && s.rows < 2 * s.q))
        return ffi::Error::InvalidArgument("flaxcnn_svm_solve: bad working set or block sizes");
      s.pidx = pidx_buf.typed_data();
      // the problem's points, gathered (the products' operand is packed from them)
      const int32_t* points = points_buf.typed_data();
      const size_t row_bytes = s.d * s.esize;
      scratch.x_local.resize(s.n * row_bytes);
      scratch.sq_local.resize(s.n);
      for (int64_t t = 0; t < s.m; ++t) {
        if (s.pidx[t] < 0 || s.pidx[t] >= s.n)
          return ffi::Error::InvalidArgument("flaxcnn_svm_solve: a variable's point out of range");
      }
      for (int64_t i = 0; i < s.n; ++i) {
        if (points[i] < 0 || points[i] >= n_all)
          return ffi::Error::InvalidArgument("flaxcnn_svm_solve: a point index out of range");
        std::memcpy(scratch.x_local.data() + i * row_bytes,
                    static_cast<const char*>(x_buf.untyped_data()) + points[i] * row_bytes,
                    row_bytes);
        scratch.sq_local[i] = sq_buf.typed_data()[points[i]];
      }
      s.x = scratch.x_local.data();
      s.sq = scratch.sq_local.data();
      s.y = y_buf.typed_data();
      s.c = c_buf.typed_data();
      s.kernel = kernel;
      s.degree = degree;
      s.gamma = *gamma_buf.typed_data();
      s.coef0 = *coef0_buf.typed_data();
      s.tau = tau;
      s.local_factor = local_factor;
      s.chunk = chunk;
      s.tail = tail;
      s.block = block;
      s.speculate = speculate != 0;
      s.alpha = alpha_out->typed_data();
      s.f = f_out->typed_data();
      s.kbb = kbb_out->typed_data();
      s.cache = cache_out->typed_data();
      s.ws = ws_out->typed_data();
      s.valid = valid_out->typed_data();
      s.slot_of = slot_of_out->typed_data();
      s.owner = owner_out->typed_data();
      s.stamp = stamp_out->typed_data();
      const float tol = *tol_buf.typed_data();
      const int32_t max_outer = *max_outer_buf.typed_data();
      const int32_t max_inner = *max_inner_buf.typed_data();
      int32_t& it = *it_out->typed_data();
      int32_t& n_inner = *n_inner_out->typed_data();
      int32_t& n_rows = *n_rows_out->typed_data();
      s.Pack();
      float gap = s.Violation();
      auto wrapping_add = [](int32_t a, int64_t b) {  // as XLA's int32 counters
        return static_cast<int32_t>(static_cast<uint32_t>(a) + static_cast<uint32_t>(b));
      };
      while (gap > tol && it < max_outer) {
        auto [n_in, n_new] = s.Step(it, tol, max_inner);
        ++it;
        n_inner = wrapping_add(n_inner, n_in);
        n_rows = wrapping_add(n_rows, n_new);
        gap = s.Violation();
      }
      *gap_out->typed_data() = gap;
      return ffi::Error::Success();
    }();
  } catch (const std::exception& e) {  // (oneDNN's errors, std::bad_alloc)
    result = ffi::Error::Internal(std::string("flaxcnn_svm_solve: ") + e.what());
  }
#if DNNL_CPU_THREADING_RUNTIME == DNNL_RUNTIME_OMP
  omp_set_num_threads(saved_threads);
#endif
  ReleaseLarge();
  return result;
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxcnnSvmSolve, Solve,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::S32>>()   // it []
                                  .Arg<ffi::Buffer<ffi::S32>>()   // n_inner []
                                  .Arg<ffi::Buffer<ffi::S32>>()   // n_rows []
                                  .Arg<ffi::Buffer<ffi::F32>>()   // alpha [m]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // f [m]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // ws [q]
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // valid [q]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // kbb [q, q]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // cache [rows, n]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // slot_of [n]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // owner [rows or 1]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // stamp [rows or 1]
                                  .Arg<ffi::AnyBuffer>()          // x_all [N, d] f32 or bf16
                                  .Arg<ffi::Buffer<ffi::F32>>()   // sq_all [N]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // points [n] (into x_all)
                                  .Arg<ffi::Buffer<ffi::S32>>()   // pidx [m]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // y [m]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // c [m]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // tol []
                                  .Arg<ffi::Buffer<ffi::S32>>()   // max_outer []
                                  .Arg<ffi::Buffer<ffi::F32>>()   // gamma []
                                  .Arg<ffi::Buffer<ffi::F32>>()   // coef0 []
                                  .Arg<ffi::Buffer<ffi::S32>>()   // max_inner []
                                  .Arg<ffi::Buffer<ffi::S32>>()   // threads []
                                  .Attr<int32_t>("kernel")
                                  .Attr<int32_t>("degree")
                                  .Attr<int32_t>("chunk")
                                  .Attr<int32_t>("tail")
                                  .Attr<int32_t>("block")
                                  .Attr<int32_t>("speculate")
                                  .Attr<float>("tau")
                                  .Attr<float>("local_factor")
                                  .Ret<ffi::Buffer<ffi::S32>>()   // it
                                  .Ret<ffi::Buffer<ffi::S32>>()   // n_inner
                                  .Ret<ffi::Buffer<ffi::S32>>()   // n_rows
                                  .Ret<ffi::Buffer<ffi::F32>>()   // alpha
                                  .Ret<ffi::Buffer<ffi::F32>>()   // f
                                  .Ret<ffi::Buffer<ffi::S32>>()   // ws
                                  .Ret<ffi::Buffer<ffi::PRED>>()  // valid
                                  .Ret<ffi::Buffer<ffi::F32>>()   // kbb
                                  .Ret<ffi::Buffer<ffi::F32>>()   // cache
                                  .Ret<ffi::Buffer<ffi::S32>>()   // slot_of
                                  .Ret<ffi::Buffer<ffi::S32>>()   // owner
                                  .Ret<ffi::Buffer<ffi::S32>>()   // stamp
                                  .Ret<ffi::Buffer<ffi::F32>>()); // gap []
#endif  // FLAXCNN_SVM_SOLVE
