/* The C kernel of Nero(fused=True) against a plain SGD loop, per row width, with no Python in the way.
 *
 *     cc -O3 -march=native -fopenmp asv_bench/kernel_widths.c -o /tmp/kernel_widths -ldl
 *     /tmp/kernel_widths $(python -c 'import nero_torch._native as n; print(n.library()._name)') 2048x512 512x2048
 *
 * Arguments: a build of adapters/nero_torch/_native.c (the one nero_torch loads, or one built with other flags,
 * e.g. -march=haswell for an AVX2 machine), then ROWSxCOLS float32 shapes; THREADS=n in the environment (default 1)
 * and ROUNDS=n (default 21). For each shape it times, in interleaved rounds, the SGD loop w -= lr*g (compiled with
 * this file's flags, on as many threads: the bandwidth floor), the two-pass step (nero_check, then nero_step), the
 * one-pass step (nero_step alone) and the check alone, and prints each one's median time and its ratio to the SGD
 * loop of the same round (median, lowest and highest), and the ratio of the fastest rounds (the least disturbed by
 * other work). With one thread the clock is the thread's CPU time, so that a machine shared with other work does
 * not count the time this program waits for a core; with more, the wall clock.
 */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

typedef int (*check_fn)(int64_t, const int64_t *, const int64_t *, const int64_t *, const int64_t *, const double *,
                        int);
typedef int64_t (*step_fn)(int64_t, const int64_t *, const int64_t *, const int64_t *, const int64_t *,
                           const int64_t *, const int64_t *, const int64_t *, const int64_t *, const double *,
                           const double *, int);

static int threads = 1;
static int64_t n, k;
static float *w, *g, *v, sigma = 1.0f, step_count = 5.0f;
static check_fn check;
static step_fn step;

static double now(void) {
    struct timespec t;
    clock_gettime(threads == 1 ? CLOCK_THREAD_CPUTIME_ID : CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static void run(int what) {
    const int64_t p = (intptr_t)w, d = (intptr_t)g, s = (intptr_t)v, sg = (intptr_t)&sigma, st = (intptr_t)&step_count;
    const int64_t flags = 3; /* centre and normalise */
    const double lr = 0.01, beta = 0.999;
    if (what == 0) {
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && n * k > 65536)
        for (int64_t i = 0; i < n * k; ++i) w[i] -= 1e-3f * g[i];
    } else if (what == 3) {
        check(1, &d, &s, &n, &k, &beta, threads);
    } else {
        if (what == 1) check(1, &d, &s, &n, &k, &beta, threads);
        step(1, &p, &d, &s, &sg, &st, &n, &k, &flags, &lr, &beta, threads);
    }
}

static int by_value(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s KERNEL.so ROWSxCOLS...\n", argv[0]);
        return 2;
    }
    void *lib = dlopen(argv[1], RTLD_NOW);
    if (!lib || !(check = (check_fn)dlsym(lib, "nero_check_f32")) || !(step = (step_fn)dlsym(lib, "nero_step_f32"))) {
        fprintf(stderr, "%s: not a build of _native.c (%s)\n", argv[1], dlerror());
        return 1;
    }
    threads = getenv("THREADS") ? atoi(getenv("THREADS")) : 1;
    const int rounds = getenv("ROUNDS") ? atoi(getenv("ROUNDS")) : 21;
    const char *names[] = {"sgd loop", "two-pass", "one-pass", "check"};
    printf("%s, %d thread(s), %s clock, median of %d rounds\n", argv[1], threads, threads == 1 ? "thread" : "wall",
           rounds);
    for (int a = 2; a < argc; ++a) {
        if (sscanf(argv[a], "%ldx%ld", &n, &k) != 2) {
            fprintf(stderr, "%s: not ROWSxCOLS\n", argv[a]);
            return 2;
        }
        w = aligned_alloc(64, (n * k * 4 + 63) / 64 * 64);
        g = aligned_alloc(64, (n * k * 4 + 63) / 64 * 64);
        v = calloc(n, sizeof(float));
        uint32_t r = 1;
        for (int64_t i = 0; i < n * k; ++i) { /* rows of spread ~0.1, gradients ~1e-3 */
            r = r * 1664525u + 1013904223u;
            w[i] = ((r >> 8) / 16777216.0f - 0.5f) * 0.1f;
            r = r * 1664525u + 1013904223u;
            g[i] = ((r >> 8) / 16777216.0f - 0.5f) * 1e-3f;
        }
        double t = now();
        run(0);
        t = now() - t;
        const int reps = t > 0.01 ? 1 : t < 5e-6 ? 2000 : (int)(0.01 / t);
        double *seconds = calloc((size_t)rounds * 4, sizeof(double)), *sorted = calloc(rounds, sizeof(double));
        for (int round = 0; round < rounds; ++round)
            for (int what = 0; what < 4; ++what) {
                t = now();
                for (int i = 0; i < reps; ++i) run(what);
                seconds[round * 4 + what] = (now() - t) / reps;
            }
        printf("%ldx%ld float32\n", n, k);
        for (int what = 0; what < 4; ++what) {
            for (int round = 0; round < rounds; ++round) sorted[round] = seconds[round * 4 + what];
            qsort(sorted, rounds, sizeof(double), by_value);
            const double median = sorted[rounds / 2], fastest = sorted[0];
            double fastest_sgd = seconds[0];
            for (int round = 1; round < rounds; ++round)
                if (seconds[round * 4] < fastest_sgd) fastest_sgd = seconds[round * 4];
            for (int round = 0; round < rounds; ++round) sorted[round] = seconds[round * 4 + what] / seconds[round * 4];
            qsort(sorted, rounds, sizeof(double), by_value);
            printf("  %-9s %9.4f ms  %6.3f ns/element  %5.2fx the SGD loop [%.2f-%.2f, fastest %.2f]\n", names[what],
                   median * 1e3, median * 1e9 / (double)(n * k), sorted[rounds / 2], sorted[0], sorted[rounds - 1],
                   fastest / fastest_sgd);
        }
        free(w), free(g), free(v), free(seconds), free(sorted);
    }
    return 0;
}
