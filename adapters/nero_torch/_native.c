/* Nero's steady-state step on CPU tensors, one row at a time (nero_torch._native builds and loads this file).
 *
 * Every tensor is a list of contiguous rows: neuron tensors (neuron axis 0) as (neurons, fan_in), bias-like
 * tensors as rows of length 1 (their v is per element, and they are never centred or normalised).
 *
 * Per row: v = beta*v + (1-beta)|g_row|^2 (summed in T, as the core rule does), c = lr*sigma/sqrt(v/(1-beta^t))
 * (0 where v = 0), y = w - c*g, then w <- (y - mean(y)) / |y - mean(y)| (as centre and normalise say), with the
 * row's sums taken on a first read of y and the write on a second read; a row is small enough to stay in cache
 * between them.
 *
 * Two ways to run a step:
 * - two passes (nero_row_sums_*, then nero_apply_*): the first reads every gradient for the new v and reports
 *   whether all are finite, so that a step with a NaN or Inf anywhere (or a square past the state's dtype) is
 *   skipped whole before anything is written; the step moves the bytes of SGD (read w and g, write w) plus one
 *   more read of g.
 * - one pass (nero_step_*): each row's new v is taken from the gradient row just read, so the step moves the
 *   bytes of SGD; a row whose new v is not finite keeps its weights and v, and the count of such rows is returned.
 */
#include <math.h>
#include <stdint.h>

/* Row sums keep several vector accumulators (GCC/Clang vector extensions, split into the widest registers this
 * CPU has): with one, each add would wait on the last and a row would take longer than reading it. */
#define VEC(T, SUF, LANES)                                                                                          \
    typedef T vec_##SUF __attribute__((vector_size(LANES * sizeof(T)), aligned(sizeof(T)), may_alias));             \
    static inline T hsum_##SUF(vec_##SUF a) {                                                                       \
        T s = 0;                                                                                                    \
        for (int j = 0; j < LANES; ++j) s += a[j];                                                                  \
        return s;                                                                                                   \
    }
VEC(float, f32, 16)
VEC(double, f64, 8)
#define LANES_f32 16
#define LANES_f64 8

#define CENTRE 1
#define NORMALISE 2

/* One row's update from its new v (as a double holding the T value); writes v and the row. */
#define UPDATE_ROW(NAME, T, SUF)                                                                                    \
    static inline void NAME(T *w, const T *d, T *v, double v_row, int64_t k, double scale_lr,                       \
                            double correction, int centre, int normalise) {                                         \
        *v = (T)v_row;                                                                                              \
        const double c = v_row > 0 ? scale_lr / sqrt(v_row / correction) : 0.0;                                     \
        const T step_size = (T)c;                                                                                   \
        if (!centre && !normalise) {                                                                                \
            _Pragma("omp simd")                                                                                     \
            for (int64_t i = 0; i < k; ++i) w[i] -= step_size * d[i];                                               \
            return;                                                                                                 \
        }                                                                                                           \
        const int L = LANES_##SUF;                                                                                  \
        vec_##SUF a0 = {0}, a1 = {0}, b0 = {0}, b1 = {0};                                                           \
        int64_t i = 0;                                                                                              \
        for (; i + 2 * L <= k; i += 2 * L) {                                                                        \
            const vec_##SUF y0 = *(const vec_##SUF *)(w + i) - step_size * *(const vec_##SUF *)(d + i);             \
            const vec_##SUF y1 = *(const vec_##SUF *)(w + i + L) - step_size * *(const vec_##SUF *)(d + i + L);     \
            a0 += y0; a1 += y1; b0 += y0 * y0; b1 += y1 * y1;                                                       \
        }                                                                                                           \
        T s1 = hsum_##SUF(a0 + a1), s2 = hsum_##SUF(b0 + b1);                                                       \
        for (; i < k; ++i) {                                                                                        \
            const T y = w[i] - step_size * d[i];                                                                    \
            s1 += y;                                                                                                \
            s2 += y * y;                                                                                            \
        }                                                                                                           \
        const double mean = centre ? (double)s1 / (double)k : 0.0;                                                  \
        const double spread = (double)s2 - (double)s1 * mean; /* |y - mean|^2 */                                    \
        const T shift = (T)mean;                                                                                    \
        const T scale = (T)(!normalise ? 1.0 : spread > 0 ? 1.0 / sqrt(spread) : 0.0);                              \
        _Pragma("omp simd")                                                                                         \
        for (int64_t i = 0; i < k; ++i) w[i] = (w[i] - step_size * d[i] - shift) * scale;                           \
    }

/* One element of a bias-like tensor: what UPDATE_ROW does for a row of length 1, written for vector lanes. */
#define UPDATE_ELEMENT(NAME, T)                                                                                     \
    static inline void NAME(T *w, T d, T *v, double v_row, double scale_lr, double correction) {                    \
        *v = (T)v_row;                                                                                              \
        const T step_size = (T)(v_row > 0 ? scale_lr / sqrt(v_row / correction) : 0.0);                            \
        *w = *w - step_size * d;                                                                                    \
    }

/* The new v of a row: beta and 1 - beta as the state's dtype holds them (as in the core rule: a Python float
 * meets a T array), |g_row|^2 summed in T (in vector lanes, then across them). The callers keep beta and decay
 * in T variables: held as doubles initialised with (double)(T)x, GCC 12's OpenMP outlining dropped the rounding. */
#define NEW_V(NAME, T, SUF)                                                                                         \
    static inline T NAME(const T *d, int64_t k, T v, T beta, T decay) {                                             \
        const int L = LANES_##SUF;                                                                                  \
        vec_##SUF a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};                                                           \
        int64_t i = 0;                                                                                              \
        for (; i + 4 * L <= k; i += 4 * L) {                                                                        \
            const vec_##SUF x0 = *(const vec_##SUF *)(d + i), x1 = *(const vec_##SUF *)(d + i + L);                 \
            const vec_##SUF x2 = *(const vec_##SUF *)(d + i + 2 * L), x3 = *(const vec_##SUF *)(d + i + 3 * L);     \
            a0 += x0 * x0; a1 += x1 * x1; a2 += x2 * x2; a3 += x3 * x3;                                             \
        }                                                                                                           \
        for (; i + L <= k; i += L) { const vec_##SUF x0 = *(const vec_##SUF *)(d + i); a0 += x0 * x0; }             \
        T s2 = hsum_##SUF((a0 + a1) + (a2 + a3));                                                                   \
        for (; i < k; ++i) s2 += d[i] * d[i];                                                                       \
        return (T)((double)beta * (double)v + (double)decay * (double)s2);                                          \
    }

#define TENSOR_SETUP(T)                                                                                             \
    T *p = (T *)(intptr_t)p_ptrs[t];                                                                                \
    const T *g = (const T *)(intptr_t)g_ptrs[t];                                                                    \
    T *v = (T *)(intptr_t)v_ptrs[t];                                                                                \
    float *step = (float *)(intptr_t)step_ptrs[t];                                                                  \
    const int64_t n = rows[t], k = cols[t];                                                                         \
    const int centre = (flags[t] & CENTRE) != 0, normalise = (flags[t] & NORMALISE) != 0;                           \
    const T beta = (T)betas[t], decay = (T)(1.0 - betas[t]); /* T variables: see NEW_V */                           \
    const double scale_lr = lrs[t] * (double)*(const T *)(intptr_t)sigma_ptrs[t];                                   \
    const double correction = 1.0 - pow(beta, (double)*step + 1.0);                                                 \
    (void)decay;

#define KERNELS(SUF, T)                                                                                             \
    UPDATE_ROW(update_row_##SUF, T, SUF)                                                                            \
    UPDATE_ELEMENT(update_element_##SUF, T)                                                                         \
    NEW_V(new_v_##SUF, T, SUF)                                                                                      \
                                                                                                                    \
    int nero_row_sums_##SUF(int64_t count, const int64_t *g_ptrs, const int64_t *v_ptrs, const int64_t *rows,       \
                            const int64_t *cols, const int64_t *offsets, const double *betas, double *v_new,        \
                            int threads) {                                                                          \
        int finite = 1;                                                                                             \
        /* last tensor first: the pass that follows starts with the first, whose gradient is then the               \
           likeliest cached */                                                                                      \
        for (int64_t t = count - 1; t >= 0; --t) {                                                                  \
            const T *g = (const T *)(intptr_t)g_ptrs[t];                                                            \
            const T *v = (const T *)(intptr_t)v_ptrs[t];                                                            \
            const int64_t n = rows[t], k = cols[t];                                                                 \
            const T beta = (T)betas[t], decay = (T)(1.0 - betas[t]); /* T variables: see NEW_V */                   \
            double *out = v_new + offsets[t];                                                                       \
            _Pragma("omp parallel for num_threads(threads) schedule(static) reduction(&& : finite) if(n * k > 65536)") \
            for (int64_t r = 0; r < n; ++r) {                                                                       \
                const T v_row = new_v_##SUF(g + r * k, k, v[r], beta, decay);                                       \
                out[r] = (double)v_row;                                                                             \
                finite = finite && isfinite(v_row);                                                                 \
            }                                                                                                       \
        }                                                                                                           \
        return finite;                                                                                              \
    }                                                                                                               \
                                                                                                                    \
    void nero_apply_##SUF(int64_t count, const int64_t *p_ptrs, const int64_t *g_ptrs, const int64_t *v_ptrs,       \
                          const int64_t *sigma_ptrs, const int64_t *step_ptrs, const int64_t *rows,                 \
                          const int64_t *cols, const int64_t *flags, const int64_t *offsets,                        \
                          const double *v_new, const double *lrs, const double *betas, int threads) {               \
        for (int64_t t = 0; t < count; ++t) {                                                                       \
            TENSOR_SETUP(T)                                                                                         \
            const double *row_v = v_new + offsets[t];                                                               \
            if (k == 1 && !centre && !normalise) { /* bias-like: elementwise, in vector lanes */                    \
                _Pragma("omp simd")                                                                                 \
                for (int64_t r = 0; r < n; ++r)                                                                     \
                    update_element_##SUF(p + r, g[r], v + r, row_v[r], scale_lr, correction);                       \
            } else {                                                                                                \
                _Pragma("omp parallel for num_threads(threads) schedule(static) if(n * k > 65536)")                 \
                for (int64_t r = 0; r < n; ++r)                                                                     \
                    update_row_##SUF(p + r * k, g + r * k, v + r, row_v[r], k, scale_lr, correction, centre,        \
                                     normalise);                                                                    \
            }                                                                                                       \
            *step += 1.0f;                                                                                          \
        }                                                                                                           \
    }                                                                                                               \
                                                                                                                    \
    int64_t nero_step_##SUF(int64_t count, const int64_t *p_ptrs, const int64_t *g_ptrs, const int64_t *v_ptrs,     \
                            const int64_t *sigma_ptrs, const int64_t *step_ptrs, const int64_t *rows,               \
                            const int64_t *cols, const int64_t *flags, const double *lrs, const double *betas,      \
                            int threads) {                                                                          \
        int64_t skipped = 0;                                                                                        \
        for (int64_t t = 0; t < count; ++t) {                                                                       \
            TENSOR_SETUP(T)                                                                                         \
            if (k == 1 && !centre && !normalise) { /* bias-like: elementwise, in vector lanes */                    \
                _Pragma("omp simd reduction(+ : skipped)")                                                          \
                for (int64_t r = 0; r < n; ++r) {                                                                   \
                    const T v_row = (T)((double)beta * (double)v[r] + (double)decay * (double)(g[r] * g[r]));       \
                    if (isfinite(v_row))                                                                            \
                        update_element_##SUF(p + r, g[r], v + r, (double)v_row, scale_lr, correction);              \
                    else                                                                                            \
                        ++skipped;                                                                                  \
                }                                                                                                   \
                *step += 1.0f;                                                                                      \
                continue;                                                                                           \
            }                                                                                                       \
            _Pragma("omp parallel for num_threads(threads) schedule(static) reduction(+ : skipped) if(n * k > 65536)") \
            for (int64_t r = 0; r < n; ++r) {                                                                       \
                const T v_row = new_v_##SUF(g + r * k, k, v[r], beta, decay);                                       \
                if (!isfinite(v_row)) {                                                                             \
                    ++skipped;                                                                                      \
                    continue;                                                                                       \
                }                                                                                                   \
                update_row_##SUF(p + r * k, g + r * k, v + r, (double)v_row, k, scale_lr, correction, centre,       \
                                 normalise);                                                                        \
            }                                                                                                       \
            *step += 1.0f;                                                                                          \
        }                                                                                                           \
        return skipped;                                                                                             \
    }

KERNELS(f32, float)
KERNELS(f64, double)
