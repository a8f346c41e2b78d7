// oneDNN convolutions as XLA FFI custom calls, for flaxcnn on a CPU (flaxcnn/onednn.py builds
// and loads this file; benchmarks/xla_cpu_study.md has the evidence).
//
// jaxlib's XLA:CPU runs convolutions through Eigen, 1.2-1.7x slower than oneDNN on these
// networks' layers, and computes kernel gradients on transposed copies of both operands. oneDNN
// reads the NHWC activations and HWIO kernels in place; only the kernel is reordered into its
// blocked layout (and the kernel gradient back). float32 only; the bias stays in JAX.
//
// Three handlers, one per pass: y = conv(x, w); dx = conv_backward_data(dy, w);
// dw = conv_backward_weights(x, dy). Attributes: strides and padding (top, bottom, left, right).
// Primitives are created once per shape and kept (primitive creation JIT-compiles kernels).

#include <oneapi/dnnl/dnnl.hpp>

#include <array>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <new>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

enum Pass { kForward = 0, kBackwardData = 1, kBackwardWeights = 2 };

// Shapes in oneDNN's logical order: src (N, C, H, W), weights (O, I, KH, KW), dst (N, O, OH, OW).
struct Key {
  int pass;
  std::array<int64_t, 4> src, weights, dst;
  std::array<int64_t, 6> geometry;  // stride h, w; pad top, bottom, left, right
  bool operator<(const Key& o) const {
    return std::tie(pass, src, weights, dst, geometry) <
           std::tie(o.pass, o.src, o.weights, o.dst, o.geometry);
  }
};

struct Conv {
  memory::desc src, dst, plain_weights, weights;  // weights: the primitive's own layout
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
#if DNNL_VERSION_MAJOR >= 3  // oneDNN 3 dropped the operation descriptors
  dnnl::convolution_forward::primitive_desc fwd(eng, dnnl::prop_kind::forward_training, algo,
                                                c->src, any, c->dst, strides, pad_l, pad_r,
                                                attr);
#else
  dnnl::convolution_forward::primitive_desc fwd(
      dnnl::convolution_forward::desc(dnnl::prop_kind::forward_training, algo, c->src, any,
                                      c->dst, strides, pad_l, pad_r),
      attr, eng);
#endif
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

ffi::Error Run(int pass, float* src, float* weights, float* dst, ffi::Span<const int64_t> src_d,
               ffi::Span<const int64_t> weights_d, ffi::Span<const int64_t> dst_d, int64_t sh,
               int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  if (src_d.size() != 4 || weights_d.size() != 4 || dst_d.size() != 4) {
    return ffi::Error::InvalidArgument("flaxcnn oneDNN convolution: operands must be 4-D");
  }
  try {
    Key key{pass, Nchw(src_d), Oihw(weights_d), Nchw(dst_d), {sh, sw, pt, pb, pl, pr}};
    auto c = GetConv(key);
    auto& eng = Engine();
    dnnl::stream stream(eng);
    memory m_src(c->src, eng, src), m_dst(c->dst, eng, dst);
    memory m_plain(c->plain_weights, eng, weights);
    memory m_weights = c->reordered
                           ? memory(c->weights, eng, weights_buffer.Get(c->weights.get_size()))
                           : m_plain;
    memory m_scratch(c->scratchpad, eng, scratchpad_buffer.Get(c->scratchpad.get_size()));
    auto reorder = [&](memory& from, memory& to) {
      memory m(c->reorder_scratchpad, eng,
               reorder_scratchpad_buffer.Get(c->reorder_scratchpad.get_size()));
      c->weights_reorder.execute(
          stream, {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}, {DNNL_ARG_SCRATCHPAD, m}});
    };
    if (pass == kForward) {
      if (c->reordered) reorder(m_plain, m_weights);
      c->primitive.execute(stream, {{DNNL_ARG_SRC, m_src},
                                    {DNNL_ARG_WEIGHTS, m_weights},
                                    {DNNL_ARG_DST, m_dst},
                                    {DNNL_ARG_SCRATCHPAD, m_scratch}});
    } else if (pass == kBackwardData) {
      if (c->reordered) reorder(m_plain, m_weights);
      c->primitive.execute(stream, {{DNNL_ARG_DIFF_DST, m_dst},
                                    {DNNL_ARG_WEIGHTS, m_weights},
                                    {DNNL_ARG_DIFF_SRC, m_src},
                                    {DNNL_ARG_SCRATCHPAD, m_scratch}});
    } else {
      c->primitive.execute(stream, {{DNNL_ARG_SRC, m_src},
                                    {DNNL_ARG_DIFF_DST, m_dst},
                                    {DNNL_ARG_DIFF_WEIGHTS, m_weights},
                                    {DNNL_ARG_SCRATCHPAD, m_scratch}});
      if (c->reordered) reorder(m_weights, m_plain);
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("flaxcnn oneDNN convolution: ") + e.what());
  } catch (const std::bad_alloc&) {
    return ffi::Error::Internal("flaxcnn oneDNN convolution: out of memory");
  } catch (const std::exception& e) {  // nothing may cross the FFI boundary
    return ffi::Error::Internal(std::string("flaxcnn oneDNN convolution: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt,
                   int64_t pb, int64_t pl, int64_t pr) {
  return Run(kForward, x.typed_data(), w.typed_data(), y->typed_data(), x.dimensions(),
             w.dimensions(), y->dimensions(), sh, sw, pt, pb, pl, pr);
}

ffi::Error BackwardData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw, int64_t pt,
                        int64_t pb, int64_t pl, int64_t pr) {
  return Run(kBackwardData, dx->typed_data(), w.typed_data(), dy.typed_data(), dx->dimensions(),
             w.dimensions(), dy.dimensions(), sh, sw, pt, pb, pl, pr);
}

ffi::Error BackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                           ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw, int64_t pt,
                           int64_t pb, int64_t pl, int64_t pr) {
  return Run(kBackwardWeights, x.typed_data(), dw->typed_data(), dy.typed_data(), x.dimensions(),
             dw->dimensions(), dy.dimensions(), sh, sw, pt, pb, pl, pr);
}

auto Binding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int64_t>("sh")
      .Attr<int64_t>("sw")
      .Attr<int64_t>("pt")
      .Attr<int64_t>("pb")
      .Attr<int64_t>("pl")
      .Attr<int64_t>("pr");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxcnnConvForward, Forward, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxcnnConvBackwardData, BackwardData, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(FlaxcnnConvBackwardWeights, BackwardWeights, Binding());
