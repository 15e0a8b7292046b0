/* Nero's steady-state step on CPU tensors, one row at a time (nero_torch._native builds and loads this file).
 *
 * Every tensor is a list of contiguous rows: neuron tensors (neuron axis 0) as (neurons, fan_in), bias-like
 * tensors as rows of length 1 (their v is per element, and they are never centred or normalised).
 *
 * Phase one reads each gradient once for the new v = beta*v + (1-beta)|g_row|^2 (summed in T, as the core rule does)
 * and reports whether every one is finite, so that a step with a NaN or Inf anywhere (or a square past the
 * state's dtype) can be skipped before anything is written. Phase two, per row: store v,
 * c = lr*sigma/sqrt(v/(1-beta^t)) (0 where v = 0),
 * y = w - c*g, then w <- (y - mean(y)) / |y - mean(y)| (as centre and normalise say), with the row's sums taken
 * on a first read of y and the write on a second read; a row is small enough to stay in cache between them, so
 * a step moves about as many bytes as SGD (read w and g, write w) plus one more read of g.
 */
#include <math.h>
#include <stdint.h>

#define CENTRE 1
#define NORMALISE 2

#define ROW_SUMS(NAME, T)                                                                                   \
    int NAME(int64_t count, const int64_t *g_ptrs, const int64_t *v_ptrs, const int64_t *rows,              \
             const int64_t *cols, const int64_t *offsets, const double *betas, double *v_new, int threads) {  \
        int finite = 1;                                                                                      \
        /* last tensor first: phase two starts with the first, whose gradient is then the likeliest cached */ \
        for (int64_t t = count - 1; t >= 0; --t) {                                                           \
            const T *g = (const T *)(intptr_t)g_ptrs[t];                                                     \
            const T *v = (const T *)(intptr_t)v_ptrs[t];                                                     \
            const int64_t n = rows[t], k = cols[t];                                                          \
            /* beta as the state's dtype holds it (as in the core rule: a Python float meets a T array) */   \
            const double beta = (double)(T)betas[t], decay = (double)(T)(1.0 - betas[t]);                   \
            double *out = v_new + offsets[t];                                                                \
            _Pragma("omp parallel for num_threads(threads) schedule(static) reduction(&& : finite) if(n * k > 65536)") \
            for (int64_t r = 0; r < n; ++r) {                                                                \
                const T *row = g + r * k;                                                                    \
                T s2 = 0; /* in T, as the core rule sums: the vector lanes keep partial sums */               \
                _Pragma("omp simd reduction(+ : s2)")                                                       \
                for (int64_t i = 0; i < k; ++i) s2 += row[i] * row[i];                                       \
                const T v_row = (T)(beta * (double)v[r] + decay * (double)s2);                               \
                out[r] = (double)v_row;                                                                      \
                finite = finite && isfinite(v_row);                                                          \
            }                                                                                                \
        }                                                                                                    \
        return finite;                                                                                       \
    }

#define APPLY(NAME, T)                                                                                      \
    void NAME(int64_t count, const int64_t *p_ptrs, const int64_t *g_ptrs, const int64_t *v_ptrs,          \
              const int64_t *sigma_ptrs, const int64_t *step_ptrs, const int64_t *rows, const int64_t *cols,  \
              const int64_t *flags, const int64_t *offsets, const double *v_new, const double *lrs,          \
              const double *betas, int threads) {                                                            \
        for (int64_t t = 0; t < count; ++t) {                                                                \
            T *p = (T *)(intptr_t)p_ptrs[t];                                                                 \
            const T *g = (const T *)(intptr_t)g_ptrs[t];                                                     \
            T *v = (T *)(intptr_t)v_ptrs[t];                                                                 \
            float *step = (float *)(intptr_t)step_ptrs[t];                                                   \
            const int64_t n = rows[t], k = cols[t];                                                          \
            const int centre = (flags[t] & CENTRE) != 0, normalise = (flags[t] & NORMALISE) != 0;           \
            const double beta = (double)(T)betas[t];                                                         \
            const double scale_lr = lrs[t] * (double)*(const T *)(intptr_t)sigma_ptrs[t];                   \
            const double correction = 1.0 - pow(beta, (double)*step + 1.0);                                  \
            const double *row_v = v_new + offsets[t];                                                       \
            _Pragma("omp parallel for num_threads(threads) schedule(static) if(n * k > 65536)")             \
            for (int64_t r = 0; r < n; ++r) {                                                                \
                T *w = p + r * k;                                                                            \
                const T *d = g + r * k;                                                                      \
                v[r] = (T)row_v[r];                                                                          \
                const double c = row_v[r] > 0 ? scale_lr / sqrt(row_v[r] / correction) : 0.0;                \
                const T step_size = (T)c;                                                                    \
                if (!centre && !normalise) {                                                                 \
                    _Pragma("omp simd")                                                                      \
                    for (int64_t i = 0; i < k; ++i) w[i] -= step_size * d[i];                                \
                    continue;                                                                                \
                }                                                                                            \
                T s1 = 0, s2 = 0;                                                                            \
                _Pragma("omp simd reduction(+ : s1, s2)")                                                   \
                for (int64_t i = 0; i < k; ++i) {                                                            \
                    const T y = w[i] - step_size * d[i];                                                     \
                    s1 += y;                                                                                 \
                    s2 += y * y;                                                                             \
                }                                                                                            \
                const double mean = centre ? (double)s1 / (double)k : 0.0;                                   \
                const double spread = (double)s2 - (double)s1 * mean; /* |y - mean|^2 */                     \
                const T shift = (T)mean;                                                                     \
                const T scale = (T)(!normalise ? 1.0 : spread > 0 ? 1.0 / sqrt(spread) : 0.0);             \
                _Pragma("omp simd")                                                                          \
                for (int64_t i = 0; i < k; ++i) w[i] = (w[i] - step_size * d[i] - shift) * scale;           \
            }                                                                                                \
            *step += 1.0f;                                                                                   \
        }                                                                                                    \
    }

ROW_SUMS(nero_row_sums_f32, float)
ROW_SUMS(nero_row_sums_f64, double)
APPLY(nero_apply_f32, float)
APPLY(nero_apply_f64, double)
