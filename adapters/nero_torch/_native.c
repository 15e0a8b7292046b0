/* Nero's steady-state step on CPU tensors, one row at a time (nero_torch._native builds and loads this file).
 *
 * Every tensor is a list of contiguous rows: neuron tensors (neuron axis 0) as (neurons, fan_in), bias-like
 * tensors as rows of length 1 (their v is per element, and they are never centred or normalised).
 *
 * Per row: v = beta*v + (1-beta)|g_row|^2 (in T, as the core rule computes it), c = lr*sigma/sqrt(v/(1-beta^t))
 * (0 where v = 0), y = w - c*g, then w <- (y - mean(y)) / |y - mean(y)| (as centre and normalise say; a zero row
 * stays zero). One read of the row gives its five sums sum(w), |w|^2, <w, g>, sum(g) and |g|^2, from which
 *     sum(y) = sum(w) - c sum(g),   |y - mean(y)|^2 = |w|^2 - 2c<w, g> + c^2|g|^2 - sum(y) mean(y);
 * where those terms cancel (a row far from balanced: near-constant, or with a large common offset), the centred
 * sums are taken from y itself, as the core rule does. A second read writes the row, and in the same loop takes
 * the next row's sums: the next row streams in from memory while this one is computed from cache, so the step
 * runs at the speed of memory rather than at the speed of the two passes one after the other.
 *
 * Two ways to run a step:
 * - two passes (nero_check_*, then nero_step_*): the first reads every gradient for the new v and reports
 *   whether all are finite, so that a step with a NaN or Inf anywhere (or a square past the state's dtype) is
 *   skipped whole before anything is written; the step moves the bytes of SGD (read w and g, write w) plus one
 *   more read of g.
 * - one pass (nero_step_* alone): a row whose new v is not finite keeps its weights and v, and the count of such
 *   rows is returned; the step moves the bytes of SGD.
 * Both sum |g_row|^2 in the same order, so the check sees the v that the step writes.
 */
#include <math.h>
#include <stdint.h>

/* The digest of this file, where the build passes it (setup.py, for the wheel's prebuilt kernel): nero_torch._native
 * loads no library built from another version of the source. */
#ifdef NERO_SOURCE_DIGEST
const char nero_source_digest[] = NERO_SOURCE_DIGEST;
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

/* The vectors' width: 256 bits wherever there is AVX. A vector type wider than the registers (64 bytes on AVX2)
 * makes GCC spill every accumulator to the stack at each add; and where AVX-512 is there too, 512-bit vectors
 * measured slower than 256-bit ones on this project's Xeon (as GCC's own vectoriser, which prefers 256 bits on
 * such CPUs, expects). */
#if defined(__AVX__)
#define VECTOR_BYTES 32
#else
#define VECTOR_BYTES 16
#endif

/* A vector's lanes summed as a tree: lane j gets lane j ^ d, for d = lanes/2, ..., 1 (a chain of adds, one lane at a
 * time, would make a narrow row wait on it). X<n>(d) are __builtin_shufflevector's indices for n lanes. */
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define X2(d) 0 ^ d, 1 ^ d
#define X4(d) X2(d), 2 ^ d, 3 ^ d
#define X8(d) X4(d), 4 ^ d, 5 ^ d, 6 ^ d, 7 ^ d
#define FOLD(a, n, d) a += __builtin_shufflevector(a, a, X##n(d))
#if VECTOR_BYTES == 32
#define FOLD_f32(a) FOLD(a, 8, 4); FOLD(a, 8, 2); FOLD(a, 8, 1)
#define FOLD_f64(a) FOLD(a, 4, 2); FOLD(a, 4, 1)
#else
#define FOLD_f32(a) FOLD(a, 4, 2); FOLD(a, 4, 1)
#define FOLD_f64(a) FOLD(a, 2, 1)
#endif
#endif
#endif
#ifndef FOLD_f32 /* an older compiler: the same tree, lane by lane */
#define FOLD_f32(a) FOLD_LANES(a)
#define FOLD_f64(a) FOLD_LANES(a)
#define FOLD_LANES(a)                                                                                               \
    for (int d = (int)(sizeof(a) / sizeof(a[0])) / 2; d > 0; d /= 2)                                                 \
        for (int j = 0; j < d; ++j) a[j] += a[j + d]
#endif

#define CENTRE 1
#define NORMALISE 2
/* Below this share of its terms' magnitude, |y - mean(y)|^2 from the old row's sums has lost too many bits. */
#define CANCELLATION 0.5
/* While a row is written and the next one summed, the next row's lines PREFETCH_AHEAD bytes ahead of the sums are
 * asked for: the hardware's own prefetcher, left alone, fell behind on rows streamed from memory (a step measured
 * at 1.2x SGD's time, 1.0x with this). */
#define CACHE_LINE 64
#define PREFETCH_AHEAD 2048
/* The check's read of the gradients alone asks for lines further ahead (it has no write to overlap): on the
 * GPT-2-like set at one thread, 11.4 ms with no prefetch (as torch's _foreach_norm of the same gradients), 9.3 ms
 * at 2048 bytes, 9.0 ms at 4096 and at 8192; a non-temporal hint doubled it. */
#define CHECK_AHEAD 4096
/* Tensors smaller than this are taken whole by one thread (and a step this small altogether by the caller's):
 * sharing them would cost more than it saves. */
#define PARALLEL_ELEMENTS 65536

/* Rows are written a block at a time, the next block's sums taken meanwhile: at least this many elements per
 * block where rows are narrow, so that the per-row maths of a block's rows overlap. */
#define BLOCK_ELEMENTS 1024
#define MAX_BLOCK_ROWS 32
static inline int64_t block_rows(int64_t k) {
    const int64_t rows = BLOCK_ELEMENTS / k;
    return rows < 1 ? 1 : rows > MAX_BLOCK_ROWS ? MAX_BLOCK_ROWS : rows;
}

/* One team of threads takes a whole pass over every tensor, without waiting for each other between tensors (rows
 * are independent): each thread takes a contiguous block of every large tensor's rows, and small tensors whole,
 * in turn. (A join per tensor would make each tensor wait for the slowest thread: on a machine shared with other
 * work, often one that waits for a core.) Where the tensors are small altogether, the caller's thread does it all. */
static int team(int64_t count, const int64_t *rows, const int64_t *cols, int threads) {
    int64_t size = 0;
    for (int64_t t = 0; t < count; ++t) size += rows[t] * cols[t];
    return threads > 1 && size > PARALLEL_ELEMENTS ? threads : 1;
}

/* The rows [r0, r1) of tensor t (n rows of k) that this thread of its team takes. */
static void my_rows(int64_t t, int64_t n, int64_t k, int64_t *r0, int64_t *r1) {
#ifdef _OPENMP
    const int part = omp_get_thread_num(), parts = omp_get_num_threads();
#else
    const int part = 0, parts = 1;
#endif
    if (n * k > PARALLEL_ELEMENTS) {
        *r0 = n * part / parts;
        *r1 = n * (part + 1) / parts;
    } else {
        *r0 = 0;
        *r1 = t % parts == part ? n : 0;
    }
}

#define ALWAYS_INLINE static inline __attribute__((always_inline))

#define KERNELS(SUF, T, SQRT)                                                                                       \
    typedef T vec_##SUF __attribute__((vector_size(VECTOR_BYTES), aligned(sizeof(T)), may_alias));                  \
    enum { LANES_##SUF = VECTOR_BYTES / sizeof(T) };                                                                \
    ALWAYS_INLINE vec_##SUF load_##SUF(const T *x) { return *(const vec_##SUF *)x; }                                \
    ALWAYS_INLINE T hsum_##SUF(vec_##SUF a) {                                                                       \
        FOLD_##SUF(a);                                                                                              \
        return a[0];                                                                                                \
    }                                                                                                               \
                                                                                                                    \
    /* A row's sums, first in vector accumulators: each takes two vectors per add, so that no add waits on the      \
       one before for long; with_w = 0 takes |g|^2 alone, in the same order. */                                     \
    typedef struct { T sw, ww, wg, sg, gg; } sums_##SUF;                                                            \
    typedef struct { vec_##SUF sw, ww, wg, sg, gg; } acc_##SUF;                                                     \
                                                                                                                    \
    ALWAYS_INLINE void add_two_##SUF(acc_##SUF *a, const T *w, const T *g, int with_w) {                            \
        const int64_t L = LANES_##SUF;                                                                              \
        const vec_##SUF g0 = load_##SUF(g), g1 = load_##SUF(g + L);                                                 \
        a->gg += g0 * g0 + g1 * g1;                                                                                 \
        if (with_w) {                                                                                               \
            const vec_##SUF w0 = load_##SUF(w), w1 = load_##SUF(w + L);                                             \
            a->sw += w0 + w1; a->ww += w0 * w0 + w1 * w1; a->wg += w0 * g0 + w1 * g1; a->sg += g0 + g1;             \
        }                                                                                                           \
    }                                                                                                               \
    ALWAYS_INLINE void add_one_##SUF(acc_##SUF *a, const T *w, const T *g, int with_w) {                            \
        const vec_##SUF g0 = load_##SUF(g);                                                                         \
        a->gg += g0 * g0;                                                                                           \
        if (with_w) {                                                                                               \
            const vec_##SUF w0 = load_##SUF(w);                                                                     \
            a->sw += w0; a->ww += w0 * w0; a->wg += w0 * g0; a->sg += g0;                                           \
        }                                                                                                           \
    }                                                                                                               \
    /* The accumulators' lanes summed, then the elements from i on (fewer than a vector's worth). */                \
    ALWAYS_INLINE sums_##SUF finish_##SUF(acc_##SUF a, const T *w, const T *g, int64_t i, int64_t k, int with_w) {  \
        sums_##SUF s = {0, 0, 0, 0, hsum_##SUF(a.gg)};                                                              \
        if (with_w) {                                                                                               \
            s.sw = hsum_##SUF(a.sw); s.ww = hsum_##SUF(a.ww); s.wg = hsum_##SUF(a.wg); s.sg = hsum_##SUF(a.sg);     \
        }                                                                                                           \
        for (; i < k; ++i) {                                                                                        \
            s.gg += g[i] * g[i];                                                                                    \
            if (with_w) { s.sw += w[i]; s.ww += w[i] * w[i]; s.wg += w[i] * g[i]; s.sg += g[i]; }                   \
        }                                                                                                           \
        return s;                                                                                                   \
    }                                                                                                               \
    ALWAYS_INLINE sums_##SUF row_sums_##SUF(const T *restrict w, const T *restrict g, int64_t k, int with_w) {      \
        const int64_t L = LANES_##SUF;                                                                              \
        acc_##SUF a = {{0}, {0}, {0}, {0}, {0}};                                                                    \
        int64_t i = 0;                                                                                              \
        for (; i + 2 * L <= k; i += 2 * L) add_two_##SUF(&a, w + i, g + i, with_w);                                 \
        if (i + L <= k) { add_one_##SUF(&a, w + i, g + i, with_w); i += L; }                                        \
        return finish_##SUF(a, w, g, i, k, with_w);                                                                 \
    }                                                                                                               \
    /* |g|^2 of a row as row_sums_* takes it (the same adds, in the same order), asking for the lines CHECK_AHEAD   \
       bytes ahead: a read-only stream left to the hardware's prefetcher ran at about half the bandwidth that       \
       SGD's read-and-write streams reach. */                                                                       \
    ALWAYS_INLINE T row_gg_##SUF(const T *restrict g, int64_t k) {                                                  \
        const int64_t L = LANES_##SUF;                                                                              \
        acc_##SUF a = {{0}, {0}, {0}, {0}, {0}};                                                                    \
        int64_t i = 0;                                                                                              \
        for (; i + 2 * L <= k; i += 2 * L) {                                                                        \
            __builtin_prefetch((const void *)((uintptr_t)(g + i) + CHECK_AHEAD), 0, 1);                             \
            add_two_##SUF(&a, 0, g + i, 0);                                                                         \
        }                                                                                                           \
        if (i + L <= k) { add_one_##SUF(&a, 0, g + i, 0); i += L; }                                                 \
        return finish_##SUF(a, 0, g, i, k, 0).gg;                                                                   \
    }                                                                                                               \
                                                                                                                    \
    /* How a row is written: w <- (w - c*g - shift) * scale (shift 0 and scale 1 leave w - c*g exactly). */         \
    typedef struct { T c, shift, scale; } terms_##SUF;                                                              \
    ALWAYS_INLINE vec_##SUF written_##SUF(terms_##SUF x, const T *w, const T *g) {                                  \
        return (load_##SUF(w) - x.c * load_##SUF(g) - x.shift) * x.scale;                                           \
    }                                                                                                               \
                                                                                                                    \
    /* Writes row w and returns the sums of the next row (w_next, g_next; none where they are NULL). */             \
    ALWAYS_INLINE sums_##SUF write_row_##SUF(terms_##SUF x, T *restrict w, const T *restrict g,                     \
                                             const T *restrict w_next, const T *restrict g_next, int64_t k,         \
                                             int with_w) {                                                          \
        const int64_t L = LANES_##SUF;                                                                              \
        acc_##SUF a = {{0}, {0}, {0}, {0}, {0}};                                                                    \
        int64_t i = 0;                                                                                              \
        for (; i + 2 * L <= k; i += 2 * L) {                                                                        \
            const vec_##SUF y0 = written_##SUF(x, w + i, g + i), y1 = written_##SUF(x, w + i + L, g + i + L);       \
            *(vec_##SUF *)(w + i) = y0;                                                                             \
            *(vec_##SUF *)(w + i + L) = y1;                                                                         \
            if (g_next) {                                                                                           \
                add_two_##SUF(&a, w_next + i, g_next + i, with_w);                                                  \
                if (i % (CACHE_LINE / sizeof(T)) == 0) { /* addresses as integers: they may pass the tensor's end */ \
                    __builtin_prefetch((const void *)((uintptr_t)(w_next + i) + PREFETCH_AHEAD), 1, 1);             \
                    __builtin_prefetch((const void *)((uintptr_t)(g_next + i) + PREFETCH_AHEAD), 0, 1);             \
                }                                                                                                   \
            }                                                                                                       \
        }                                                                                                           \
        if (i + L <= k) {                                                                                           \
            *(vec_##SUF *)(w + i) = written_##SUF(x, w + i, g + i);                                                 \
            if (g_next) add_one_##SUF(&a, w_next + i, g_next + i, with_w);                                          \
            i += L;                                                                                                 \
        }                                                                                                           \
        const int64_t tail = i;                                                                                     \
        for (; i < k; ++i) w[i] = (w[i] - x.c * g[i] - x.shift) * x.scale;                                         \
        sums_##SUF none = {0, 0, 0, 0, 0};                                                                          \
        return g_next ? finish_##SUF(a, w_next, g_next, tail, k, with_w) : none;                                    \
    }                                                                                                               \
                                                                                                                    \
    /* The new v: beta*v + (1 - beta)*gg in T, as the core rule's Python floats meet a T array. */                  \
    ALWAYS_INLINE T new_v_##SUF(T v, T gg, T beta, T decay) { return beta * v + decay * gg; }                       \
                                                                                                                    \
    /* c = lr*sigma / sqrt(v / (1 - beta^t)), 0 where v = 0 (once per row, so in double). */                        \
    ALWAYS_INLINE T step_size_##SUF(T v, double scale_lr, double correction) {                                      \
        return (T)(v > 0 ? scale_lr / sqrt((double)v / correction) : 0.0);                                         \
    }                                                                                                               \
                                                                                                                    \
    /* mean(y) and |y - mean(y)|^2 taken from y itself (y as the write computes it), for rows whose sums cancel:    \
       rare, so summed in double, leaving y's own rounding as the only error. */                                    \
    static void centred_sums_##SUF(const T *restrict w, const T *restrict g, int64_t k, T c, int centre,            \
                                   double *mean, double *spread) {                                                  \
        double s1 = 0, s2 = 0;                                                                                      \
        if (centre)                                                                                                 \
            for (int64_t i = 0; i < k; ++i) s1 += (T)(w[i] - c * g[i]);                                             \
        const T shift = (T)(s1 / (double)k);                                                                        \
        for (int64_t i = 0; i < k; ++i) {                                                                           \
            const double y = (T)(w[i] - c * g[i] - shift);                                                          \
            s2 += y * y;                                                                                            \
        }                                                                                                           \
        *mean = shift;                                                                                              \
        *spread = s2;                                                                                               \
    }                                                                                                               \
                                                                                                                    \
    /* c, shift and scale of a row from its sums (and from the row itself where they cancel). */                    \
    static terms_##SUF row_terms_##SUF(const T *w, const T *g, sums_##SUF s, T c, int64_t k, int centre,            \
                                       int normalise) {                                                             \
        const double cd = c, sy = s.sw - cd * s.sg, cgg = cd * s.gg;                                                \
        double mean = centre ? sy / (double)k : 0.0;                                                                \
        double spread = s.ww - 2.0 * cd * s.wg + cd * cgg - sy * mean;                                              \
        if (normalise && !(spread >= CANCELLATION * (s.ww + fabs(2.0 * cd * s.wg) + cd * cgg)))                     \
            centred_sums_##SUF(w, g, k, c, centre, &mean, &spread);                                                 \
        const terms_##SUF x = {c, (T)mean, (T)(normalise && spread > 0 ? 1.0 / sqrt(spread) : 1.0)};                \
        return x;                                                                                                   \
    }                                                                                                               \
                                                                                                                    \
    /* What the kernels read of tensor t (arrays a kernel does not take are NULL). */                               \
    typedef struct {                                                                                                \
        T *p, *v;                                                                                                   \
        const T *g;                                                                                                 \
        int64_t n, k;                                                                                               \
        int centre, normalise;                                                                                      \
        T beta, decay; /* T variables: GCC 12's OpenMP outlining dropped the rounding of (double)(T)x */            \
        double scale_lr, correction;                                                                                \
    } tensor_##SUF;                                                                                                 \
                                                                                                                    \
    static tensor_##SUF tensor_at_##SUF(int64_t t, const int64_t *p_ptrs, const int64_t *g_ptrs,                    \
                                        const int64_t *v_ptrs, const int64_t *sigma_ptrs,                           \
                                        const int64_t *step_ptrs, const int64_t *rows, const int64_t *cols,         \
                                        const int64_t *flags, const double *lrs, const double *betas) {             \
        tensor_##SUF x = {0};                                                                                       \
        x.g = (const T *)(intptr_t)g_ptrs[t];                                                                       \
        x.v = (T *)(intptr_t)v_ptrs[t];                                                                             \
        x.n = rows[t];                                                                                              \
        x.k = cols[t];                                                                                              \
        x.beta = (T)betas[t];                                                                                       \
        x.decay = (T)(1.0 - betas[t]);                                                                              \
        if (p_ptrs) {                                                                                               \
            x.p = (T *)(intptr_t)p_ptrs[t];                                                                         \
            x.centre = (flags[t] & CENTRE) != 0;                                                                    \
            x.normalise = (flags[t] & NORMALISE) != 0;                                                              \
            x.scale_lr = lrs[t] * (double)*(const T *)(intptr_t)sigma_ptrs[t];                                      \
            x.correction = 1.0 - pow(x.beta, (double)*(const float *)(intptr_t)step_ptrs[t] + 1.0);                 \
        }                                                                                                           \
        return x;                                                                                                   \
    }                                                                                                               \
                                                                                                                    \
    /* Rows [r0, r1) of a neuron tensor, a block of rows at a time: each block's rows are written while the next   \
       block's are summed (a block of narrow rows, so that one row's per-row maths need not wait on the last's).    \
       Returns how many rows kept their weights and v (new v not finite). */                                        \
    static int64_t update_rows_##SUF(const tensor_##SUF *x, int64_t r0, int64_t r1) {                               \
        const int64_t k = x->k, most = block_rows(k);                                                               \
        const int with_w = x->centre || x->normalise;                                                               \
        sums_##SUF sums[2][MAX_BLOCK_ROWS];                                                                         \
        terms_##SUF terms[MAX_BLOCK_ROWS];                                                                          \
        int taken[MAX_BLOCK_ROWS];                                                                                  \
        int64_t skipped = 0;                                                                                        \
        for (int64_t j = 0; j < most && r0 + j < r1; ++j)                                                           \
            sums[0][j] = row_sums_##SUF(x->p + (r0 + j) * k, x->g + (r0 + j) * k, k, with_w);                       \
        for (int64_t b = r0, now = 0; b < r1; b += most, now ^= 1) {                                                \
            const int64_t m = b + most <= r1 ? most : r1 - b, b_next = b + m;                                       \
            const int64_t m_next = b_next + most <= r1 ? most : r1 - b_next;                                        \
            for (int64_t j = 0; j < m; ++j) {                                                                       \
                const int64_t r = b + j;                                                                            \
                const sums_##SUF s = sums[now][j];                                                                  \
                const T v_row = new_v_##SUF(x->v[r], s.gg, x->beta, x->decay);                                      \
                taken[j] = isfinite(v_row);                                                                         \
                if (!taken[j]) {                                                                                    \
                    ++skipped;                                                                                      \
                    continue;                                                                                       \
                }                                                                                                   \
                x->v[r] = v_row;                                                                                    \
                const T c = step_size_##SUF(v_row, x->scale_lr, x->correction);                                     \
                terms[j] = with_w ? row_terms_##SUF(x->p + r * k, x->g + r * k, s, c, k, x->centre, x->normalise)  \
                                  : (terms_##SUF){c, 0, 1};                                                         \
            }                                                                                                       \
            for (int64_t j = 0; j < m; ++j) {                                                                       \
                T *w = x->p + (b + j) * k;                                                                          \
                const T *g = x->g + (b + j) * k;                                                                    \
                const T *w_next = j < m_next ? x->p + (b_next + j) * k : 0;                                         \
                const T *g_next = j < m_next ? x->g + (b_next + j) * k : 0;                                         \
                if (taken[j])                                                                                       \
                    sums[now ^ 1][j] = write_row_##SUF(terms[j], w, g, w_next, g_next, k, with_w);                  \
                else if (g_next)                                                                                    \
                    sums[now ^ 1][j] = row_sums_##SUF(w_next, g_next, k, with_w);                                   \
            }                                                                                                       \
        }                                                                                                           \
        return skipped;                                                                                             \
    }                                                                                                               \
                                                                                                                    \
    /* Elements [r0, r1) of a bias-like tensor, in vector lanes; returns how many kept their value and v. */         \
    static int64_t update_elements_##SUF(const tensor_##SUF *x, int64_t r0, int64_t r1) {                           \
        const T scale_lr = (T)x->scale_lr, correction = (T)x->correction, beta = x->beta, decay = x->decay;         \
        T *restrict p = x->p, *restrict v = x->v;                                                                   \
        const T *restrict g = x->g;                                                                                 \
        int64_t skipped = 0;                                                                                        \
        _Pragma("omp simd reduction(+ : skipped)")                                                                  \
        for (int64_t r = r0; r < r1; ++r) {                                                                         \
            const T d = g[r], v_row = new_v_##SUF(v[r], d * d, beta, decay);                                        \
            if (isfinite(v_row)) {                                                                                  \
                v[r] = v_row;                                                                                       \
                p[r] -= (v_row > 0 ? scale_lr / SQRT(v_row / correction) : (T)0) * d;                              \
            } else {                                                                                                \
                ++skipped;                                                                                          \
            }                                                                                                       \
        }                                                                                                           \
        return skipped;                                                                                             \
    }                                                                                                               \
                                                                                                                    \
    int nero_check_##SUF(int64_t count, const int64_t *g_ptrs, const int64_t *v_ptrs, const int64_t *rows,          \
                         const int64_t *cols, const double *betas, int threads) {                                   \
        int finite = 1;                                                                                             \
        const int parts = team(count, rows, cols, threads);                                                         \
        _Pragma("omp parallel num_threads(parts) reduction(&& : finite) if(parts > 1)")                             \
        {                                                                                                           \
            /* last tensor first: the pass that follows starts with the first, whose gradient is then the           \
               likeliest cached */                                                                                  \
            for (int64_t t = count - 1; t >= 0; --t) {                                                              \
                const tensor_##SUF x = tensor_at_##SUF(t, 0, g_ptrs, v_ptrs, 0, 0, rows, cols, 0, 0, betas);        \
                const int64_t k = x.k;                                                                              \
                int64_t r0, r1;                                                                                     \
                my_rows(t, x.n, k, &r0, &r1);                                                                       \
                if (k == 1) { /* bias-like */                                                                       \
                    _Pragma("omp simd reduction(&& : finite)")                                                      \
                    for (int64_t r = r0; r < r1; ++r)                                                               \
                        finite = finite && isfinite(new_v_##SUF(x.v[r], x.g[r] * x.g[r], x.beta, x.decay));         \
                } else {                                                                                            \
                    for (int64_t r = r0; r < r1; ++r)                                                               \
                        finite = finite && isfinite(new_v_##SUF(x.v[r], row_gg_##SUF(x.g + r * k, k), x.beta,       \
                                                                x.decay));                                          \
                }                                                                                                   \
            }                                                                                                       \
        }                                                                                                           \
        return finite;                                                                                              \
    }                                                                                                               \
                                                                                                                    \
    /* The step of every tensor; rows whose new v is not finite keep their weights and v (none, after a passing     \
       nero_check). Returns how many rows that was. */                                                              \
    int64_t nero_step_##SUF(int64_t count, const int64_t *p_ptrs, const int64_t *g_ptrs, const int64_t *v_ptrs,     \
                            const int64_t *sigma_ptrs, const int64_t *step_ptrs, const int64_t *rows,               \
                            const int64_t *cols, const int64_t *flags, const double *lrs, const double *betas,      \
                            int threads) {                                                                          \
        int64_t skipped = 0;                                                                                        \
        const int parts = team(count, rows, cols, threads);                                                         \
        _Pragma("omp parallel num_threads(parts) reduction(+ : skipped) if(parts > 1)")                             \
        for (int64_t t = 0; t < count; ++t) {                                                                       \
            const tensor_##SUF x = tensor_at_##SUF(t, p_ptrs, g_ptrs, v_ptrs, sigma_ptrs, step_ptrs, rows, cols,    \
                                                   flags, lrs, betas);                                              \
            int64_t r0, r1;                                                                                         \
            my_rows(t, x.n, x.k, &r0, &r1);                                                                         \
            if (x.k == 1 && !x.centre && !x.normalise)                                                              \
                skipped += update_elements_##SUF(&x, r0, r1);                                                       \
            else                                                                                                    \
                skipped += update_rows_##SUF(&x, r0, r1);                                                           \
        }                                                                                                           \
        for (int64_t t = 0; t < count; ++t) *(float *)(intptr_t)step_ptrs[t] += 1.0f;                               \
        return skipped;                                                                                             \
    }

KERNELS(f32, float, sqrtf)
KERNELS(f64, double, sqrt)
