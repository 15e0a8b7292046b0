// Per-neuron gradient sums for nero_optax's fused step, as an XLA FFI custom call on CPU (nero_optax._native builds
// and registers this file).
//
// For a neuron tensor viewed as (fan_in, neurons) ("neurons last", Flax's kernels) or (neurons, fan_in) ("neurons
// first", torch's layout), one read of the gradient g and the weights w gives, per neuron, sum(w), |w|^2, sum(g),
// |g|^2 and <w, g>: the five sums the step needs before it writes (nero_core's row_factors turns them into the
// write's factors; the rest of the step is an XLA fusion). XLA on CPU would read w and g three times each for them,
// one reduction at a time.
//
// Large tensors are shared with XLA's intra-op thread pool. Every neuron's sums are taken in an order fixed by the
// shape alone (rows in sequence; columns in fixed blocks of rows whose partial sums are added in block order), so
// results do not depend on the number of threads.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kSums = 5;  // per neuron, in this order: sum(w), |w|^2, sum(g), |g|^2, <w, g>; each a run of n values

// Rows [i0, i1) of a (fan_in, n) tensor ("neurons last"), summed down each column into the kSums runs of `out`, R
// rows per sweep along the row (each column's rows are added in order, whatever R).
template <typename T, int R>
void column_sweeps(const T* g, const T* w, int64_t i0, int64_t i1, int64_t n, T* out) {
  std::memset(out, 0, kSums * n * sizeof(T));
  T *sw = out, *sww = out + n, *sg = out + 2 * n, *sgg = out + 3 * n, *swg = out + 4 * n;
  int64_t i = i0;
  for (; i + R <= i1; i += R) {
    const T* gr = g + i * n;
    const T* wr = w + i * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      T a = sw[j], b = sww[j], c = sg[j], d = sgg[j], e = swg[j];
      for (int r = 0; r < R; ++r) {
        const T x = gr[r * n + j], y = wr[r * n + j];
        a += y;
        b += y * y;
        c += x;
        d += x * x;
        e += y * x;
      }
      sw[j] = a;
      sww[j] = b;
      sg[j] = c;
      sgg[j] = d;
      swg[j] = e;
    }
  }
  for (; i < i1; ++i) {
    const T* gi = g + i * n;
    const T* wi = w + i * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const T x = gi[j], y = wi[j];
      sw[j] += y;
      sww[j] += y * y;
      sg[j] += x;
      sgg[j] += x * x;
      swg[j] += y * x;
    }
  }
}

// One row per sweep reads memory as a row sum does (two streams, the cheapest for the memory system), but loads and
// stores the running sums for every row: the better choice while they stay in L1 (rows up to 2 KB, five running
// sums of 10 KB; with three, measured on 2048x512 float32, 2 threads from DRAM: 7.2 ms against 12.0 for four rows per
// sweep and 6.9 for SGD's step). Wider rows take four per sweep (512x2048: 11.4 ms against 14.1 for one).
template <typename T>
void column_sums(const T* g, const T* w, int64_t i0, int64_t i1, int64_t n, T* out) {
  if (n * static_cast<int64_t>(sizeof(T)) <= 2048)
    column_sweeps<T, 1>(g, w, i0, i1, n, out);
  else
    column_sweeps<T, 4>(g, w, i0, i1, n, out);
}

// Rows [r0, r1) of a (n, fan_in) tensor, into the kSums runs of `out` (n each).
template <typename T>
void neurons_first(const T* g, const T* w, int64_t fan_in, int64_t n, int64_t r0, int64_t r1, T* out) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* gr = g + r * fan_in;
    const T* wr = w + r * fan_in;
    T a = 0, b = 0, c = 0, d = 0, e = 0;
#pragma omp simd reduction(+ : a, b, c, d, e)
    for (int64_t i = 0; i < fan_in; ++i) {
      const T x = gr[i], y = wr[i];
      a += y;
      b += y * y;
      c += x;
      d += x * x;
      e += y * x;
    }
    out[r] = a;
    out[n + r] = b;
    out[2 * n + r] = c;
    out[3 * n + r] = d;
    out[4 * n + r] = e;
  }
}

// Runs work(k) for k in [0, parts) on up to `threads` threads: XLA's intra-op thread pool and the calling thread
// (threads <= 1: the caller alone, in order). The caller takes parts
// itself until none is left and then waits only for parts already running, so it never waits on a task the pool
// has not started (the pool's threads may all be busy, or be callers like this one); a task that starts late finds
// nothing left and returns, holding only the shared counters.
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t threads, int64_t parts, const F& work) {
  const int64_t helpers = std::min({threads, pool.num_threads(), parts}) - 1;
  if (helpers <= 0) {
    for (int64_t k = 0; k < parts; ++k) work(k);
    return;
  }
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto shared = std::make_shared<Shared>();
  const F* f = &work;  // valid while the caller waits; late tasks never call it
  auto run = [shared, f, parts]() {
    for (int64_t k; (k = shared->next.fetch_add(1)) < parts;) {
      (*f)(k);
      if (shared->done.fetch_add(1) + 1 == parts) {
        std::lock_guard<std::mutex> lock(shared->mu);
        shared->cv.notify_all();
      }
    }
  };
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(decltype(run)(run));
  run();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->done.load() == parts; });
}

constexpr int64_t kParallelElements = int64_t{1} << 16;  // smaller tensors: one thread (a task costs microseconds)

constexpr int64_t kBlockRows = 128;  // neurons last: rows per partial sum (fixed, so results do not depend on threads)

template <typename T>
void sums(ffi::ThreadPool& pool, const ffi::AnyBuffer& g, const ffi::AnyBuffer& w, bool last, T* out) {
  const auto dims = g.dimensions();
  const int64_t n = last ? dims[dims.size() - 1] : dims[0];
  const int64_t fan_in = n ? static_cast<int64_t>(g.element_count()) / n : 0;
  const T* gd = static_cast<const T*>(g.untyped_data());
  const T* wd = static_cast<const T*>(w.untyped_data());
  const int64_t threads = static_cast<int64_t>(g.element_count()) >= kParallelElements ? pool.num_threads() : 1;
  if (!last) {  // row sums: runs of rows, eight per thread, so a helper that starts late leaves little to wait for
    const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(8 * threads, n));
    parallel_for(pool, threads, parts, [&](int64_t k) {
      neurons_first(gd, wd, fan_in, n, n * k / parts, n * (k + 1) / parts, out);
    });
    return;
  }
  // Column sums: each block of kBlockRows rows sums into its own partial (a block per part, so a helper that starts
  // late leaves the caller little to wait for), and the partials are added in block order.
  const int64_t blocks = std::max<int64_t>(1, (fan_in + kBlockRows - 1) / kBlockRows);
  if (blocks == 1) {
    column_sums(gd, wd, 0, fan_in, n, out);
    return;
  }
  // Kept between calls, per calling thread, so a step allocates nothing: 5/128 of the largest such tensor's size.
  thread_local std::vector<T> scratch;  // (a thread_local is named, not captured: lambdas below use `partial`)
  if (scratch.size() < static_cast<size_t>(blocks * kSums * n)) scratch.resize(blocks * kSums * n);
  T* const partial = scratch.data();
  parallel_for(pool, threads, blocks, [&](int64_t b) {
    column_sums(gd, wd, b * kBlockRows, std::min(fan_in, (b + 1) * kBlockRows), n, partial + b * kSums * n);
  });
  std::memcpy(out, partial, kSums * n * sizeof(T));
  for (int64_t b = 1; b < blocks; ++b) {
    const T* p = partial + b * kSums * n;
#pragma omp simd
    for (int64_t j = 0; j < kSums * n; ++j) out[j] += p[j];
  }
}

ffi::Error NeroSumsImpl(ffi::ThreadPool pool, ffi::AnyBuffer g, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> out,
                        int64_t neurons_last) {
  if (g.element_type() != w.element_type() || g.element_type() != out->element_type() ||
      g.element_count() != w.element_count() || g.dimensions().size() < 1) {
    return ffi::Error::InvalidArgument("nero_sums: g, w and the output must share a dtype, g and w a shape");
  }
  switch (g.element_type()) {
    case ffi::DataType::F32:
      sums<float>(pool, g, w, neurons_last != 0, static_cast<float*>(out->untyped_data()));
      return ffi::Error::Success();
    case ffi::DataType::F64:
      sums<double>(pool, g, w, neurons_last != 0, static_cast<double*>(out->untyped_data()));
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument("nero_sums: float32 or float64 only");
  }
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NeroSums, NeroSumsImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("neurons_last"));
