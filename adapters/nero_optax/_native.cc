// Per-neuron gradient sums for nero_optax's fused step, as an XLA FFI custom call on CPU (nero_optax._native builds
// and registers this file).
//
// For a neuron tensor viewed as (fan_in, neurons) ("neurons last", Flax's kernels) or (neurons, fan_in) ("neurons
// first", torch's layout), one read of the gradient g and the weights w gives, per neuron, sum(g), |g|^2 and
// <w, g>: the three sums the step needs before it writes (the rest of the step is an XLA fusion). XLA on CPU would
// read g three times and w once for them, one reduction at a time.
#include <cstdint>
#include <cstring>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

template <typename T>
void neurons_last(const T* g, const T* w, int64_t fan_in, int64_t n, T* sg, T* sgg, T* swg) {
  std::memset(sg, 0, n * sizeof(T));
  std::memset(sgg, 0, n * sizeof(T));
  std::memset(swg, 0, n * sizeof(T));
  int64_t i = 0;
  for (; i + 8 <= fan_in; i += 8) {  // eight rows per sweep: an eighth of the running sums' loads and stores
    const T* gr = g + i * n;
    const T* wr = w + i * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      T x[8], sa = 0, sb = 0, sc = 0;
      for (int r = 0; r < 8; ++r) x[r] = gr[r * n + j];
      for (int r = 0; r < 8; ++r) {
        sa += x[r];
        sb += x[r] * x[r];
        sc += wr[r * n + j] * x[r];
      }
      sg[j] += sa;
      sgg[j] += sb;
      swg[j] += sc;
    }
  }
  for (; i < fan_in; ++i) {
    const T* gi = g + i * n;
    const T* wi = w + i * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const T x = gi[j];
      sg[j] += x;
      sgg[j] += x * x;
      swg[j] += wi[j] * x;
    }
  }
}

template <typename T>
void neurons_first(const T* g, const T* w, int64_t n, int64_t fan_in, T* sg, T* sgg, T* swg) {
  for (int64_t r = 0; r < n; ++r) {
    const T* gr = g + r * fan_in;
    const T* wr = w + r * fan_in;
    T a = 0, b = 0, c = 0;
#pragma omp simd reduction(+ : a, b, c)
    for (int64_t i = 0; i < fan_in; ++i) {
      const T x = gr[i];
      a += x;
      b += x * x;
      c += wr[i] * x;
    }
    sg[r] = a;
    sgg[r] = b;
    swg[r] = c;
  }
}

template <typename T>
void sums(const ffi::AnyBuffer& g, const ffi::AnyBuffer& w, bool last, T* out) {
  const auto dims = g.dimensions();
  const int64_t n = last ? dims[dims.size() - 1] : dims[0];
  const int64_t fan_in = n ? static_cast<int64_t>(g.element_count()) / n : 0;
  const T* gd = static_cast<const T*>(g.untyped_data());
  const T* wd = static_cast<const T*>(w.untyped_data());
  if (last)
    neurons_last(gd, wd, fan_in, n, out, out + n, out + 2 * n);
  else
    neurons_first(gd, wd, n, fan_in, out, out + n, out + 2 * n);
}

ffi::Error NeroSumsImpl(ffi::AnyBuffer g, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> out, int64_t neurons_last) {
  if (g.element_type() != w.element_type() || g.element_type() != out->element_type() ||
      g.element_count() != w.element_count() || g.dimensions().size() < 1) {
    return ffi::Error::InvalidArgument("nero_sums: g, w and the output must share a dtype, g and w a shape");
  }
  switch (g.element_type()) {
    case ffi::DataType::F32:
      sums<float>(g, w, neurons_last != 0, static_cast<float*>(out->untyped_data()));
      return ffi::Error::Success();
    case ffi::DataType::F64:
      sums<double>(g, w, neurons_last != 0, static_cast<double*>(out->untyped_data()));
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("nero_sums: float32 or float64 only");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NeroSums, NeroSumsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("neurons_last"));
