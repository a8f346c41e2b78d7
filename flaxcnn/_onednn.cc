// oneDNN convolutions as XLA FFI custom calls, for flaxcnn on a CPU (flaxcnn/onednn.py builds
// and loads this file; benchmarks/xla_cpu_study.md has the evidence).
//
// jaxlib's XLA:CPU runs convolutions through Eigen, 1.2-1.7x slower than oneDNN on these
// networks' layers, and computes kernel gradients on transposed copies of both operands. oneDNN
// reads the NHWC activations and HWIO kernels in place; only the kernel is reordered into its
// blocked layout (and the kernel gradient back). float32 only.
//
// Four handlers: y = conv(x, w); y = relu(conv(x, w) + b), the bias and ReLU applied as oneDNN
// writes the output (post-ops: one pass over the output fewer than XLA adding them after; a NaN
// before the ReLU comes out 0, see ForwardBiasRelu); dx = conv_backward_data(dy, w);
// dw = conv_backward_weights(x, dy). Attributes: strides, padding (top, bottom, left, right) and
// `xla_pool`. Primitives are created once per shape and kept (primitive creation JIT-compiles
// kernels).
//
// Threads: with `xla_pool` (flaxcnn's default) a call splits its batch over XLA's own intra-op
// thread pool, each part run by oneDNN on one thread; otherwise oneDNN runs the call on its own
// threads (OpenMP in Debian's build). The two runtimes on the same cores got in each other's way:
// each one's threads spin for a while after their work, while the other's want the core
// (LeNet-BN's inference 1.22x, DenseNet's 1.16x with the split; benchmarks/xla_cpu_study.md).

#include <oneapi/dnnl/dnnl.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <functional>
#include <new>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if DNNL_CPU_THREADING_RUNTIME == DNNL_RUNTIME_OMP
#include <omp.h>  // (no OpenMP library linked: omp_* come from the one oneDNN was built with)
#endif

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

enum Pass { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };
// What a forward pass applies as it writes its output.
enum Post { kNone = 0, kBiasRelu = 1 };

// Shapes in oneDNN's logical order: src (N, C, H, W), weights (O, I, KH, KW), dst (N, O, OH, OW).
struct Key {
  int pass;
  std::array<int64_t, 4> src, weights, dst;
  std::array<int64_t, 6> geometry;  // stride h, w; pad top, bottom, left, right
  bool one_thread = false;          // created for (and run on) one thread
  int post = kNone;
  bool operator<(const Key& o) const {
    return std::tie(pass, src, weights, dst, geometry, one_thread, post) <
           std::tie(o.pass, o.src, o.weights, o.dst, o.geometry, o.one_thread, o.post);
  }
};

struct Conv {
  memory::desc src, dst, plain_weights, weights;  // weights: the primitive's own layout
  memory::desc bias;                              // kBiasRelu: (O)
  memory::desc scratchpad, reorder_scratchpad;
  dnnl::primitive primitive;
  dnnl::reorder weights_reorder;  // plain -> primitive's layout, or back for kBackwardWeights
  bool reordered = false;
};

// Scratch memory owned by the calling thread, grown as needed and kept. XLA may run two
// convolutions at once (GoogLeNet's branches), and oneDNN's own ("library") scratchpad is one
// buffer shared by all primitives unless oneDNN was built with DNNL_ENABLE_CONCURRENT_EXEC, so
// every primitive takes a user scratchpad, from here. XLA's threads live as long as the process.
class ThreadBuffer {
 public:
  ThreadBuffer() = default;
  ThreadBuffer(ThreadBuffer&& o) noexcept : data_(o.data_), size_(o.size_) {
    o.data_ = nullptr;
    o.size_ = 0;
  }
  ThreadBuffer(const ThreadBuffer&) = delete;
  ThreadBuffer& operator=(const ThreadBuffer&) = delete;
  ~ThreadBuffer() { std::free(data_); }
  void* Get(size_t size) {
    if (size > size_) {
      std::free(data_);
      size_ = (size + 4095) / 4096 * 4096;
      data_ = std::aligned_alloc(4096, size_);
      if (data_ == nullptr) {
        size_ = 0;
        throw std::bad_alloc();
      }
    }
    return data_;
  }

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

thread_local ThreadBuffer weights_buffer, scratchpad_buffer, reorder_scratchpad_buffer;
thread_local std::vector<ThreadBuffer> partial_buffers;  // kernel gradients of the batch's parts

// Whether a call can run oneDNN on one thread: with OpenMP, by setting the calling thread's
// team size; a sequential build always does. Other runtimes (TBB, a threadpool) keep their own
// threads, and no batch is split.
constexpr bool kCanRunOnOneThread = DNNL_CPU_THREADING_RUNTIME == DNNL_RUNTIME_OMP ||
                                    DNNL_CPU_THREADING_RUNTIME == DNNL_RUNTIME_SEQ;

// While in scope, oneDNN's work on this thread runs on this thread alone.
class OneThread {
 public:
  OneThread() {
#if DNNL_CPU_THREADING_RUNTIME == DNNL_RUNTIME_OMP
    saved_ = omp_get_max_threads();
    omp_set_num_threads(1);
#endif
  }
  ~OneThread() {
#if DNNL_CPU_THREADING_RUNTIME == DNNL_RUNTIME_OMP
    omp_set_num_threads(saved_);
#endif
  }
  OneThread(const OneThread&) = delete;
  OneThread& operator=(const OneThread&) = delete;

 private:
  int saved_ = 1;
};

// fn(0), ..., fn(parts - 1), on the calling thread and XLA's pool. Each participant takes the
// next part not yet taken, so the caller does every part nobody else has started (the pool may
// be busy with the step's other work, or be this very thread): no waiting on a queued task.
struct Work {
  std::atomic<int> next{0}, done{0};
  int parts = 0;
  std::function<void(int)> fn;  // called only while ParallelFor waits
  std::mutex mu;
  std::string error;
};

void TakeParts(Work* w) {
  for (int i; (i = w->next.fetch_add(1)) < w->parts;) {
    try {
      w->fn(i);
    } catch (const std::exception& e) {
      std::lock_guard<std::mutex> lock(w->mu);
      w->error = e.what();
    } catch (...) {
      std::lock_guard<std::mutex> lock(w->mu);
      w->error = "unknown error";
    }
    w->done.fetch_add(1, std::memory_order_release);
  }
}

void ParallelFor(ffi::ThreadPool* pool, int parts, std::function<void(int)> fn) {
  if (parts == 1) return fn(0);  // (pool may be null)
  auto w = std::make_shared<Work>();  // a helper may start after this returns: it takes nothing
  w->parts = parts;
  w->fn = std::move(fn);
  for (int t = 1; t < parts; ++t) pool->Schedule([w]() { TakeParts(w.get()); });
  TakeParts(w.get());
  while (w->done.load(std::memory_order_acquire) < parts) std::this_thread::yield();
  if (!w->error.empty()) throw std::runtime_error(w->error);
}

// The forward pass's descriptor (for the backward passes: their hint), with weights `any`; with
// `bias_relu`, the bias and a ReLU post-op.
dnnl::convolution_forward::primitive_desc ForwardDesc(const Conv& c, const memory::desc& any,
                                                      const memory::dims& strides,
                                                      const memory::dims& pad_l,
                                                      const memory::dims& pad_r, bool bias_relu) {
  using fwd = dnnl::convolution_forward;
  auto& eng = Engine();
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto algo = dnnl::algorithm::convolution_direct;
  auto prop = bias_relu ? dnnl::prop_kind::forward_inference : dnnl::prop_kind::forward_training;
  if (bias_relu) {
    dnnl::post_ops ops;
#if DNNL_VERSION_MAJOR >= 3
    ops.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
#else
    ops.append_eltwise(1.f, dnnl::algorithm::eltwise_relu, 0.f, 0.f);
#endif
    attr.set_post_ops(ops);
  }
#if DNNL_VERSION_MAJOR >= 3  // oneDNN 3 dropped the operation descriptors
  if (bias_relu) {
    return fwd::primitive_desc(eng, prop, algo, c.src, any, c.bias, c.dst, strides, pad_l, pad_r,
                               attr);
  }
  return fwd::primitive_desc(eng, prop, algo, c.src, any, c.dst, strides, pad_l, pad_r, attr);
#else
  if (bias_relu) {
    return fwd::primitive_desc(
        fwd::desc(prop, algo, c.src, any, c.bias, c.dst, strides, pad_l, pad_r), attr, eng);
  }
  return fwd::primitive_desc(fwd::desc(prop, algo, c.src, any, c.dst, strides, pad_l, pad_r),
                             attr, eng);
#endif
}

std::shared_ptr<Conv> MakeConv(const Key& k) {
  auto dims = [](const std::array<int64_t, 4>& a) { return memory::dims(a.begin(), a.end()); };
  auto c = std::make_shared<Conv>();
  c->src = memory::desc(dims(k.src), memory::data_type::f32, tag::nhwc);
  c->dst = memory::desc(dims(k.dst), memory::data_type::f32, tag::nhwc);
  c->plain_weights = memory::desc(dims(k.weights), memory::data_type::f32, tag::hwio);
  memory::desc any(dims(k.weights), memory::data_type::f32, tag::any);
  memory::dims strides{k.geometry[0], k.geometry[1]};
  memory::dims pad_l{k.geometry[2], k.geometry[4]}, pad_r{k.geometry[3], k.geometry[5]};
  auto& eng = Engine();
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  auto algo = dnnl::algorithm::convolution_direct;
  if (k.post == kBiasRelu) c->bias = memory::desc({k.weights[0]}, memory::data_type::f32, tag::x);
  auto fwd = ForwardDesc(*c, any, strides, pad_l, pad_r, k.post == kBiasRelu);
  if (k.pass == kForward) {
    c->weights = fwd.weights_desc();
    c->scratchpad = fwd.scratchpad_desc();
    c->primitive = dnnl::convolution_forward(fwd);
  } else if (k.pass == kBackwardData) {
#if DNNL_VERSION_MAJOR >= 3
    dnnl::convolution_backward_data::primitive_desc bwd(eng, algo, c->src, any, c->dst, strides,
                                                        pad_l, pad_r, fwd, attr);
#else
    dnnl::convolution_backward_data::primitive_desc bwd(
        dnnl::convolution_backward_data::desc(algo, c->src, any, c->dst, strides, pad_l, pad_r),
        attr, eng, fwd);
#endif
    c->weights = bwd.weights_desc();
    c->scratchpad = bwd.scratchpad_desc();
    c->primitive = dnnl::convolution_backward_data(bwd);
  } else {
#if DNNL_VERSION_MAJOR >= 3
    dnnl::convolution_backward_weights::primitive_desc bwd(eng, algo, c->src, any, c->dst,
                                                           strides, pad_l, pad_r, fwd, attr);
#else
    dnnl::convolution_backward_weights::primitive_desc bwd(
        dnnl::convolution_backward_weights::desc(algo, c->src, any, c->dst, strides, pad_l,
                                                 pad_r),
        attr, eng, fwd);
#endif
    c->weights = bwd.diff_weights_desc();
    c->scratchpad = bwd.scratchpad_desc();
    c->primitive = dnnl::convolution_backward_weights(bwd);
  }
  c->reordered = c->weights != c->plain_weights;
  if (c->reordered) {
    auto pd = k.pass == kBackwardWeights
                  ? dnnl::reorder::primitive_desc(eng, c->weights, eng, c->plain_weights, attr)
                  : dnnl::reorder::primitive_desc(eng, c->plain_weights, eng, c->weights, attr);
    c->reorder_scratchpad = pd.scratchpad_desc();
    c->weights_reorder = dnnl::reorder(pd);
  }
  return c;
}

std::shared_ptr<Conv> GetConv(const Key& k) {
  static std::mutex mu;
  static std::map<Key, std::shared_ptr<Conv>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(k);
  if (it != cache.end()) return it->second;
  auto c = MakeConv(k);
  cache.emplace(k, c);
  return c;
}

// NHWC dims (n, h, w, c) -> oneDNN's (n, c, h, w); HWIO (kh, kw, i, o) -> (o, i, kh, kw).
std::array<int64_t, 4> Nchw(ffi::Span<const int64_t> d) { return {d[0], d[3], d[1], d[2]}; }
std::array<int64_t, 4> Oihw(ffi::Span<const int64_t> d) { return {d[3], d[2], d[0], d[1]}; }

// The call as `parts` equal slices of the batch (NHWC: contiguous), one per participant of
// ParallelFor, each by a primitive created for one thread; one part: the whole batch, by a
// primitive on oneDNN's own threads. The weights are reordered once, by the caller; the kernel
// gradient is the sum of the parts' own, added in part order whichever thread ran which part
// (deterministic).
void Execute(ffi::ThreadPool* pool, int parts, int pass, float* src, float* weights, float* dst,
             ffi::Span<const int64_t> src_d, ffi::Span<const int64_t> weights_d,
             ffi::Span<const int64_t> dst_d, const std::array<int64_t, 6>& geometry,
             float* bias, int post) {
  const bool one_thread = parts > 1;
  auto sd = Nchw(src_d), dd = Nchw(dst_d);
  sd[0] = dd[0] = src_d[0] / parts;
  std::optional<OneThread> one;  // the weights' reorders below, and the primitives' creation
  if (one_thread) one.emplace();
  auto c = GetConv(Key{pass, sd, Oihw(weights_d), dd, geometry, one_thread, post});
  const int64_t src_step = sd[0] * sd[1] * sd[2] * sd[3], dst_step = dd[0] * dd[1] * dd[2] * dd[3];
  auto& eng = Engine();
  memory m_plain(c->plain_weights, eng, weights);
  auto reorder = [&](memory& from, memory& to) {
    dnnl::stream stream(eng);
    memory m(c->reorder_scratchpad, eng,
             reorder_scratchpad_buffer.Get(c->reorder_scratchpad.get_size()));
    c->weights_reorder.execute(
        stream, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}, {DNNL_ARG_SCRATCHPAD, m}});
    stream.wait();
  };
  auto run_part = [&](int p, memory& m_weights) {
    std::optional<OneThread> one_here;
    if (one_thread) one_here.emplace();
    dnnl::stream stream(eng);
    memory m_src(c->src, eng, src + p * src_step), m_dst(c->dst, eng, dst + p * dst_step);
    memory m_scratch(c->scratchpad, eng, scratchpad_buffer.Get(c->scratchpad.get_size()));
    if (post != kNone) {
      memory m_bias(c->bias, eng, bias);
      c->primitive.execute(stream, {{DNNL_ARG_SRC, m_src},
                                    {DNNL_ARG_WEIGHTS, m_weights},
                                    {DNNL_ARG_BIAS, m_bias},
                                    {DNNL_ARG_DST, m_dst},
                                    {DNNL_ARG_SCRATCHPAD, m_scratch}});
    } else if (pass == kForward) {
      c->primitive.execute(stream, {{DNNL_ARG_SRC, m_src},
                                    {DNNL_ARG_WEIGHTS, m_weights},
                                    {DNNL_ARG_DST, m_dst},
                                    {DNNL_ARG_SCRATCHPAD, m_scratch}});
    } else if (pass == kBackwardData) {
      c->primitive.execute(stream, {{DNNL_ARG_DIFF_DST, m_dst},
                                    {DNNL_ARG_WEIGHTS, m_weights},
                                    {DNNL_ARG_DIFF_SRC, m_src},
                                    {DNNL_ARG_SCRATCHPAD, m_scratch}});
    } else {
      c->primitive.execute(stream, {{DNNL_ARG_SRC, m_src},
                                    {DNNL_ARG_DIFF_DST, m_dst},
                                    {DNNL_ARG_DIFF_WEIGHTS, m_weights},
                                    {DNNL_ARG_SCRATCHPAD, m_scratch}});
    }
    stream.wait();
  };
  if (pass != kBackwardWeights) {
    memory m_weights = c->reordered
                           ? memory(c->weights, eng, weights_buffer.Get(c->weights.get_size()))
                           : m_plain;
    if (c->reordered) reorder(m_plain, m_weights);
    ParallelFor(pool, parts, [&](int p) { run_part(p, m_weights); });
    return;
  }
  // Kernel gradient: part 0 into the result (or, if reordered, the first partial buffer).
  const size_t bytes = c->weights.get_size();
  if (partial_buffers.size() < static_cast<size_t>(parts)) partial_buffers.resize(parts);
  std::vector<memory> out;
  for (int p = 0; p < parts; ++p) {
    float* data = (p == 0 && !c->reordered) ? weights
                                            : static_cast<float*>(partial_buffers[p].Get(bytes));
    out.emplace_back(c->weights, eng, data);
  }
  ParallelFor(pool, parts, [&](int p) { run_part(p, out[p]); });
  const size_t count = bytes / sizeof(float);
  const size_t chunk = (count + parts - 1) / parts;
  ParallelFor(pool, parts, [&](int q) {
    float* sum = static_cast<float*>(out[0].get_data_handle());
    for (int p = 1; p < parts; ++p) {
      const float* add = static_cast<const float*>(out[p].get_data_handle());
      for (size_t i = q * chunk, end = std::min(count, i + chunk); i < end; ++i) sum[i] += add[i];
    }
  });
  if (c->reordered) reorder(out[0], m_plain);
}

std::atomic<int64_t> split_calls{0};  // FlaxcnnOnednnSplitCalls

// How many parts a call's batch is split into over XLA's pool (1: oneDNN's own threads). Not
// where the weights outnumber the input's values (ResNet-18's 256- and 512-channel layers on 6x6
// and 3x3 maps): there one thread's reorder of the weights, and the sum of the parts' kernel
// gradients, cost more than the split gains (those layers ran 1.1-1.6x slower split).
int Parts(ffi::ThreadPool* pool, ffi::Span<const int64_t> src_d,
          ffi::Span<const int64_t> weights_d) {
  if (pool == nullptr || !kCanRunOnOneThread) return 1;
  const int64_t n = src_d[0];
  const int64_t src_count = n * src_d[1] * src_d[2] * src_d[3];
  const int64_t weights_count = weights_d[0] * weights_d[1] * weights_d[2] * weights_d[3];
  if (weights_count > src_count) return 1;
  // Equal parts only, so that every part shares one primitive and one weights layout: the most
  // that divide the batch, up to one per thread (a batch of 32 on 12 threads: 8 parts of 4).
  int64_t parts = std::min<int64_t>(pool->num_threads(), n);
  while (parts > 1 && n % parts != 0) --parts;
  return static_cast<int>(std::max<int64_t>(parts, 1));
}

ffi::Error Run(ffi::ThreadPool* pool, int pass, float* src, float* weights, float* dst,
               ffi::Span<const int64_t> src_d, ffi::Span<const int64_t> weights_d,
               ffi::Span<const int64_t> dst_d, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
               int64_t pl, int64_t pr, float* bias = nullptr, int post = kNone) {
  if (src_d.size() != 4 || weights_d.size() != 4 || dst_d.size() != 4) {
    return ffi::Error::InvalidArgument("flaxcnn oneDNN convolution: operands must be 4-D");
  }
  try {
    int parts = Parts(pool, src_d, weights_d);
    if (parts > 1) split_calls.fetch_add(1, std::memory_order_relaxed);
    Execute(pool, parts, pass, src, weights, dst, src_d, weights_d, dst_d,
            {sh, sw, pt, pb, pl, pr}, bias, post);
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("flaxcnn oneDNN convolution: ") + e.what());
  } catch (const std::bad_alloc&) {
    return ffi::Error::Internal("flaxcnn oneDNN convolution: out of memory");
  } catch (const std::exception& e) {  // nothing may cross the FFI boundary
    return ffi::Error::Internal(std::string("flaxcnn oneDNN convolution: ") + e.what());
  }
  return ffi::Error::Success();
}

// `xla_pool`: split the batch over XLA's thread pool (see the top of this file), or not (0).
ffi::ThreadPool* Pool(ffi::ThreadPool& pool, int64_t xla_pool) {
  return xla_pool ? &pool : nullptr;
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt,
                   int64_t pb, int64_t pl, int64_t pr, int64_t xla_pool) {
  return Run(Pool(pool, xla_pool), kForward, x.typed_data(), w.typed_data(), y->typed_data(),
             x.dimensions(), w.dimensions(), y->dimensions(), sh, sw, pt, pb, pl, pr);
}

// Whether none of the n floats is Inf or NaN (all exponent bits set).
bool AllFinite(const float* p, size_t n) {
  uint32_t top = 0;
  for (size_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, p + i, sizeof bits);
    top = std::max(top, bits & 0x7f800000u);
  }
  return top != 0x7f800000u;
}

ffi::Error ForwardBiasRelu(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                           ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> y, int64_t sh,
                           int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr,
                           int64_t xla_pool, int64_t check_finite) {
  if (b.dimensions().size() != 1 || w.dimensions().size() != 4 ||
      b.dimensions()[0] != w.dimensions()[3]) {
    return ffi::Error::InvalidArgument(
        "flaxcnn oneDNN convolution: the bias must have one value per output channel");
  }
  float* bias = b.typed_data();
  const int64_t channels = b.dimensions()[0];
  // oneDNN's ReLU turns NaN into 0, where jax.nn.relu (and PyTorch's) keeps it. With
  // `check_finite` (training) and an Inf or NaN among the parameters (a diverged layer), the
  // plain convolution, then the bias and a ReLU that keeps NaN, so that the divergence reaches
  // the loss as it did unfused.
  const bool fused = !check_finite || (AllFinite(w.typed_data(), w.element_count()) &&
                                       AllFinite(bias, channels));
  ffi::Error error =
      Run(Pool(pool, xla_pool), kForward, x.typed_data(), w.typed_data(), y->typed_data(),
          x.dimensions(), w.dimensions(), y->dimensions(), sh, sw, pt, pb, pl, pr,
          fused ? bias : nullptr, fused ? kBiasRelu : kNone);
  if (fused || error.failure()) return error;
  float* out = y->typed_data();
  for (size_t i = 0, n = y->element_count(); i < n; ++i) {
    const float v = out[i] + bias[i % channels];
    out[i] = (v > 0.f || v != v) ? v : 0.f;
  }
  return ffi::Error::Success();
}

ffi::Error BackwardData(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw, int64_t pt,
                        int64_t pb, int64_t pl, int64_t pr, int64_t xla_pool) {
  return Run(Pool(pool, xla_pool), kBackwardData, dx->typed_data(), w.typed_data(),
             dy.typed_data(), dx->dimensions(), w.dimensions(), dy.dimensions(), sh, sw, pt, pb,
             pl, pr);
}

ffi::Error BackwardWeights(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw, int64_t sh,
                           int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr,
                           int64_t xla_pool) {
  return Run(Pool(pool, xla_pool), kBackwardWeights, x.typed_data(), dw->typed_data(),
             dy.typed_data(), x.dimensions(), dw->dimensions(), dy.dimensions(), sh, sw, pt, pb,
             pl, pr);
}

// The result and the geometry's attributes, after a binding's arguments.
template <typename B>
auto WithGeometry(B args) {
  return std::move(args)
      .template Ret<ffi::Buffer<ffi::F32>>()
      .template Attr<int64_t>("sh")
      .template Attr<int64_t>("sw")
      .template Attr<int64_t>("pt")
      .template Attr<int64_t>("pb")
      .template Attr<int64_t>("pl")
      .template Attr<int64_t>("pr")
      .template Attr<int64_t>("xla_pool");
}

auto Binding() {  // (x, w) -> y; (dy, w) -> dx; (x, dy) -> dw
  return WithGeometry(ffi::Ffi::Bind()
                          .Ctx<ffi::ThreadPool>()
                          .Arg<ffi::Buffer<ffi::F32>>()
                          .Arg<ffi::Buffer<ffi::F32>>());
}

auto BiasBinding() {  // (x, w, b) -> y
  return WithGeometry(ffi::Ffi::Bind()
                          .Ctx<ffi::ThreadPool>()
                          .Arg<ffi::Buffer<ffi::F32>>()
                          .Arg<ffi::Buffer<ffi::F32>>()
                          .Arg<ffi::Buffer<ffi::F32>>())
      .Attr<int64_t>("check_finite");
}

// ------------------------------------------------------------------------------------------
// Max pooling for training (flaxcnn.ops.max_pool on a CPU): PyTorch's semantics, not oneDNN's
// (whose pooling does not let a NaN replace the maximum). The forward pass writes each output's
// maximum and the window offset it came from (int8, row-major in the window); the backward pass
// reads them back in one pass over the input gradient. XLA's ops for the same (ops.py: k*k
// compares and selects, then k*k masked, shifted sums) read and write the maps several times, and
// at batch 128 GoogLeNet's max-pools took ~15% of its training step (benchmarks/xla_cpu_study.md).
//
// The argmax is PyTorch's: the window's first element (row-major, padding skipped) unless a
// later one is strictly greater or NaN. Each input element gathers its gradient from the
// outputs whose window it lies in, in output order, the order in which PyTorch's kernel adds
// them, so the sums are bit for bit PyTorch's. NHWC, float32; the channels run innermost, eight
// at a time where the CPU has AVX2.

struct PoolShape {
  int64_t n, h, w, c, ho, wo, kh, kw, sh, sw, ph, pw;
};

#define FLAXCNN_INLINE __attribute__((always_inline)) inline

// The real elements (padding skipped) of output (r, ow)'s window, row-major: where each is in
// x (`at`) and its offset in the window. Returns how many; r counts the n * ho output rows.
FLAXCNN_INLINE int64_t WindowOf(const float* x, const PoolShape& s, int64_t r, int64_t ow,
                                const float** at, int32_t* offset) {
  const int64_t n = r / s.ho, i0 = (r % s.ho) * s.sh - s.ph, j0 = ow * s.sw - s.pw;
  int64_t m = 0;
  for (int64_t di = std::max<int64_t>(0, -i0); di < std::min(s.kh, s.h - i0); ++di) {
    for (int64_t dj = std::max<int64_t>(0, -j0); dj < std::min(s.kw, s.w - j0); ++dj, ++m) {
      at[m] = x + ((n * s.h + i0 + di) * s.w + j0 + dj) * s.c;
      offset[m] = static_cast<int32_t>(di * s.kw + dj);
    }
  }
  return m;
}

// The outputs whose windows hold input element (r, j), in output order: where each is in the
// output (`from`, an element index) and the element's offset in its window. Returns how many;
// r counts the n * h input rows.
FLAXCNN_INLINE int64_t OutputsOf(const PoolShape& s, int64_t r, int64_t j, int64_t* from,
                                 int32_t* offset) {
  // output o's window holds t where o * st - p <= t <= o * st - p + k - 1
  auto first = [](int64_t t, int64_t k, int64_t st, int64_t p) {
    const int64_t a = t + p - k + 1;
    return a <= 0 ? int64_t{0} : (a + st - 1) / st;
  };
  const int64_t n = r / s.h, i = r % s.h;
  const int64_t oh1 = std::min(s.ho - 1, (i + s.ph) / s.sh);
  const int64_t ow1 = std::min(s.wo - 1, (j + s.pw) / s.sw);
  int64_t m = 0;
  for (int64_t oh = first(i, s.kh, s.sh, s.ph); oh <= oh1; ++oh) {
    for (int64_t ow = first(j, s.kw, s.sw, s.pw); ow <= ow1; ++ow, ++m) {
      from[m] = ((n * s.ho + oh) * s.wo + ow) * s.c;
      offset[m] = static_cast<int32_t>((i + s.ph - oh * s.sh) * s.kw + (j + s.pw - ow * s.sw));
    }
  }
  return m;
}

// Channel q of one output: the maximum over its window's m elements and the maximum's offset.
FLAXCNN_INLINE void MaxAt(const float* const* at, const int32_t* offset, int64_t m, int64_t q,
                          float* yo, int8_t* io) {
  float best = at[0][q];
  int32_t arg = offset[0];
  for (int64_t t = 1; t < m; ++t) {
    const float v = at[t][q];
    if (v > best || v != v) best = v, arg = offset[t];
  }
  yo[q] = best;
  io[q] = static_cast<int8_t>(arg);
}

// Channel q of one input element: the sum of the gradients of the outputs whose maximum it is.
FLAXCNN_INLINE float GatherAt(const float* g, const int8_t* idx, const int64_t* from,
                              const int32_t* offset, int64_t m, int64_t q) {
  float sum = 0.f;
  for (int64_t t = 0; t < m; ++t) sum += idx[from[t] + q] == offset[t] ? g[from[t] + q] : 0.f;
  return sum;
}

// Channels [0, q) of one output (`MaxAt`'s arguments), or of one input element (`GatherAt`'s
// and its output d), several at a time; return q, the channels from which the rows' loops go on
// one at a time. `NoBlocks`: none (a CPU without AVX2).
using MaxBlocks = int64_t (*)(const float* const* at, const int32_t* offset, int64_t m,
                              int64_t c, float* yo, int8_t* io);
using GatherBlocks = int64_t (*)(const float* g, const int8_t* idx, const int64_t* from,
                                 const int32_t* offset, int64_t m, int64_t c, float* d);

int64_t NoMaxBlocks(const float* const*, const int32_t*, int64_t, int64_t, float*, int8_t*) {
  return 0;
}
int64_t NoGatherBlocks(const float*, const int8_t*, const int64_t*, const int32_t*, int64_t,
                       int64_t, float*) {
  return 0;
}

// Output rows [r0, r1) of the n * ho.
void MaxPoolForwardRows(const float* x, float* y, int8_t* idx, const PoolShape& s, int64_t r0,
                        int64_t r1, MaxBlocks blocks) {
  std::vector<const float*> at(s.kh * s.kw);
  std::vector<int32_t> offset(s.kh * s.kw);
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t ow = 0; ow < s.wo; ++ow) {
      const int64_t m = WindowOf(x, s, r, ow, at.data(), offset.data()), o = (r * s.wo + ow) * s.c;
      for (int64_t q = blocks(at.data(), offset.data(), m, s.c, y + o, idx + o); q < s.c; ++q) {
        MaxAt(at.data(), offset.data(), m, q, y + o, idx + o);
      }
    }
  }
}

// Input rows [r0, r1) of the n * h: each element's gradient, gathered from its windows.
void MaxPoolBackwardRows(const float* g, const int8_t* idx, float* dx, const PoolShape& s,
                         int64_t r0, int64_t r1, GatherBlocks blocks) {
  std::vector<int64_t> from(s.kh * s.kw);
  std::vector<int32_t> offset(s.kh * s.kw);
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t j = 0; j < s.w; ++j) {
      const int64_t m = OutputsOf(s, r, j, from.data(), offset.data());
      float* d = dx + (r * s.w + j) * s.c;
      for (int64_t q = blocks(g, idx, from.data(), offset.data(), m, s.c, d); q < s.c; ++q) {
        d[q] = GatherAt(g, idx, from.data(), offset.data(), m, q);
      }
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FLAXCNN_AVX2 1

// Eight channels at a time in AVX2's registers: a block's maxima, offsets or sums stay in
// registers while the window is read, and are written once.
__attribute__((target("avx2"))) int64_t MaxBlocksAvx2(const float* const* at,
                                                      const int32_t* offset, int64_t m,
                                                      int64_t c, float* yo, int8_t* io) {
  int64_t q = 0;
  for (; q + 8 <= c; q += 8) {
    __m256 best = _mm256_loadu_ps(at[0] + q);
    __m256 arg = _mm256_castsi256_ps(_mm256_set1_epi32(offset[0]));
    for (int64_t t = 1; t < m; ++t) {
      const __m256 v = _mm256_loadu_ps(at[t] + q);
      const __m256 take = _mm256_or_ps(_mm256_cmp_ps(v, best, _CMP_GT_OQ),
                                       _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      best = _mm256_blendv_ps(best, v, take);
      arg = _mm256_blendv_ps(arg, _mm256_castsi256_ps(_mm256_set1_epi32(offset[t])), take);
    }
    _mm256_storeu_ps(yo + q, best);
    const __m256i a = _mm256_castps_si256(arg);  // 8 int32 -> 8 int8
    const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(a),
                                          _mm256_extracti128_si256(a, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(io + q), _mm_packs_epi16(words, words));
  }
  return q;
}

__attribute__((target("avx2"))) int64_t GatherBlocksAvx2(const float* g, const int8_t* idx,
                                                         const int64_t* from,
                                                         const int32_t* offset, int64_t m,
                                                         int64_t c, float* d) {
  int64_t q = 0;
  for (; q + 8 <= c; q += 8) {
    __m256 sum = _mm256_setzero_ps();
    for (int64_t t = 0; t < m; ++t) {
      const __m256i arg = _mm256_cvtepi8_epi32(
          _mm_loadl_epi64(reinterpret_cast<const __m128i*>(idx + from[t] + q)));
      const __m256i mine = _mm256_cmpeq_epi32(arg, _mm256_set1_epi32(offset[t]));
      sum = _mm256_add_ps(sum, _mm256_and_ps(_mm256_castsi256_ps(mine),
                                             _mm256_loadu_ps(g + from[t] + q)));
    }
    _mm256_storeu_ps(d + q, sum);
  }
  return q;
}
#else
constexpr MaxBlocks MaxBlocksAvx2 = NoMaxBlocks;  // (never chosen: UseAvx2 is false)
constexpr GatherBlocks GatherBlocksAvx2 = NoGatherBlocks;
#endif

// Whether the AVX2 loops run: where the CPU has AVX2, unless `simd` is 0 (tests of the others).
bool UseAvx2(int64_t simd) {
#ifdef FLAXCNN_AVX2
  static const bool avx2 = __builtin_cpu_supports("avx2");
  return avx2 && simd != 0;
#else
  return false;
#endif
}

// rows(r0, r1) over [0, rows), in one contiguous part per thread of XLA's pool.
void SplitRows(ffi::ThreadPool* pool, int64_t rows, const std::function<void(int64_t, int64_t)>& fn) {
  const int parts = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>(pool->num_threads(), rows)));
  ParallelFor(pool, parts, [&](int p) { fn(rows * p / parts, rows * (p + 1) / parts); });
}

std::optional<PoolShape> MakePoolShape(ffi::Span<const int64_t> in, ffi::Span<const int64_t> out,
                                       int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
                                       int64_t pw) {
  if (in.size() != 4 || out.size() != 4 || in[0] != out[0] || in[3] != out[3]) return {};
  PoolShape s{in[0], in[1], in[2], in[3], out[1], out[2], kh, kw, sh, sw, ph, pw};
  // every window holds an input element (2p <= k); the offsets fit an int8
  if (kh < 1 || kw < 1 || sh < 1 || sw < 1 || ph < 0 || pw < 0 || 2 * ph > kh || 2 * pw > kw ||
      kh * kw > 127 || s.ho != (s.h + 2 * ph - kh) / sh + 1 || s.wo != (s.w + 2 * pw - kw) / sw + 1 ||
      s.ho < 1 || s.wo < 1) {
    return {};
  }
  return s;
}

ffi::Error MaxPoolForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                          ffi::ResultBuffer<ffi::F32> y, ffi::ResultBuffer<ffi::S8> idx,
                          int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                          int64_t simd) {
  auto s = MakePoolShape(x.dimensions(), y->dimensions(), kh, kw, sh, sw, ph, pw);
  if (!s) return ffi::Error::InvalidArgument("flaxcnn max-pool: inconsistent shapes or window");
  try {
    SplitRows(&pool, s->n * s->ho, [&](int64_t r0, int64_t r1) {
      MaxPoolForwardRows(x.typed_data(), y->typed_data(), idx->typed_data(), *s, r0, r1,
                         UseAvx2(simd) ? MaxBlocksAvx2 : NoMaxBlocks);
    });
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("flaxcnn max-pool: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error MaxPoolBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::S8> idx,
                           ffi::ResultBuffer<ffi::F32> dx, int64_t kh, int64_t kw, int64_t sh,
                           int64_t sw, int64_t ph, int64_t pw, int64_t simd) {
  auto s = MakePoolShape(dx->dimensions(), g.dimensions(), kh, kw, sh, sw, ph, pw);
  if (!s || idx.element_count() != g.element_count()) {
    return ffi::Error::InvalidArgument("flaxcnn max-pool: inconsistent shapes or window");
  }
  try {
    SplitRows(&pool, s->n * s->h, [&](int64_t r0, int64_t r1) {
      MaxPoolBackwardRows(g.typed_data(), idx.typed_data(), dx->typed_data(), *s, r0, r1,
                          UseAvx2(simd) ? GatherBlocksAvx2 : NoGatherBlocks);
    });
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("flaxcnn max-pool: ") + e.what());
  }
  return ffi::Error::Success();
}

// Concatenation on the last axis (flaxcnn.ops.concat_channels on a CPU): each output row (one
// pixel's channels) copied operand by operand, the rows split over XLA's pool. XLA:CPU's own
// concatenation on the minor axis picks each element's operand in its loop, at about half a
// single thread's memcpy bandwidth (benchmarks/xla_cpu_study.md, "The Zen 4, session 30").
ffi::Error ConcatChannels(ffi::ThreadPool pool, ffi::RemainingArgs args,
                          ffi::ResultBuffer<ffi::F32> out) {
  const auto od = out->dimensions();
  if (od.size() == 0) return ffi::Error::InvalidArgument("flaxcnn concat: a scalar output");
  const int64_t c = od.back(), rows = c ? out->element_count() / c : 0;
  std::vector<const float*> src;
  std::vector<int64_t> width;
  int64_t total = 0;
  for (size_t i = 0; i < args.size(); ++i) {
    auto b = args.get<ffi::Buffer<ffi::F32>>(i);
    if (b.has_error()) return b.error();
    const auto d = b->dimensions();
    if (d.size() != od.size() || !std::equal(d.begin(), d.end() - 1, od.begin())) {
      return ffi::Error::InvalidArgument("flaxcnn concat: operands differ beyond the last axis");
    }
    src.push_back(b->typed_data());
    width.push_back(d.back());
    total += d.back();
  }
  if (total != c) return ffi::Error::InvalidArgument("flaxcnn concat: widths do not add up");
  if (rows == 0) return ffi::Error::Success();
  float* dst = out->typed_data();
  try {
    SplitRows(&pool, rows, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        float* o = dst + r * c;
        for (size_t i = 0; i < src.size(); ++i) {
          std::memcpy(o, src[i] + r * width[i], width[i] * sizeof(float));
          o += width[i];
        }
      }
    });
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("flaxcnn concat: ") + e.what());
  }
  return ffi::Error::Success();
}

template <typename B>
auto WithWindow(B args) {
  return std::move(args)
      .template Attr<int64_t>("kh")
      .template Attr<int64_t>("kw")
      .template Attr<int64_t>("sh")
      .template Attr<int64_t>("sw")
      .template Attr<int64_t>("ph")
      .template Attr<int64_t>("pw")
      .template Attr<int64_t>("simd");
}

}  // namespace

// How many calls so far split their batch over XLA's pool (onednn.split_calls).
extern "C" __attribute__((visibility("default"))) int64_t FlaxcnnOnednnSplitCalls() {
  return split_calls.load(std::memory_order_relaxed);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxcnnConvForward, Forward, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxcnnConvForwardBiasRelu, ForwardBiasRelu, BiasBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxcnnConvBackwardData, BackwardData, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxcnnConvBackwardWeights, BackwardWeights, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxcnnMaxPoolForward, MaxPoolForward,
                              WithWindow(ffi::Ffi::Bind()
                                             .Ctx<ffi::ThreadPool>()
                                             .Arg<ffi::Buffer<ffi::F32>>()
                                             .Ret<ffi::Buffer<ffi::F32>>()
                                             .Ret<ffi::Buffer<ffi::S8>>()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxcnnConcatChannels, ConcatChannels,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxcnnMaxPoolBackward, MaxPoolBackward,
                              WithWindow(ffi::Ffi::Bind()
                                             .Ctx<ffi::ThreadPool>()
                                             .Arg<ffi::Buffer<ffi::F32>>()
                                             .Arg<ffi::Buffer<ffi::S8>>()
                                             .Ret<ffi::Buffer<ffi::F32>>()));
