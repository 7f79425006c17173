/* y = x @ W^T + b for a few rows of x: the shape of every linear layer while decoding.
 *
 * x is (M, K) and W is (N, K), both float32 and row-major (nn.Linear's layout), b is (N) or
 * NULL, y is (M, N). Made for small M (decoding, short prefills): each block of four rows of W
 * is read from memory once and used for every row of x while it sits in L1, so for a few rows
 * the cost stays close to one pass over W. MKL's gemv runs such shapes on one core and its
 * small-M sgemm is slower still (see medgpt/kernels/__init__.py); here OpenMP splits the rows
 * of W between threads.
 *
 * The loops only: ops.cpp checks the tensors and includes this; built at run time by
 * medgpt/kernels with -O3 -mavx2 -mfma -fopenmp. */
#pragma once
#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* R rows of W (R <= 4) against MB rows of x (MB <= 3): R * MB dot products of length K.
 * Both are compile-time constants at each call site, so the loops unroll into registers. */
static inline __attribute__((always_inline)) void
tile(const float *x, const float *w, const float *b, float *y, int64_t K, int64_t N, int R,
     int MB, int prefetch) {
    __m256 acc[4][3];
    for (int r = 0; r < R; r++)
        for (int m = 0; m < MB; m++) acc[r][m] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 wv[4];
        for (int r = 0; r < R; r++) {
            wv[r] = _mm256_loadu_ps(w + r * K + k);
            /* The next block's rows, one cache line per row every other step, so their trip
             * from memory overlaps this block's arithmetic. Measured: ~10% faster with 4-8
             * rows of x, slower with 16 or more (the extra loads then cost more than they
             * hide), so rows() turns it off there. A prefetch past the end does not fault. */
            if (prefetch && (k & 15) == 0)
                _mm_prefetch((const char *)(w + (R + r) * K + k), _MM_HINT_T0);
        }
        for (int m = 0; m < MB; m++) {
            __m256 xv = _mm256_loadu_ps(x + m * K + k);
            for (int r = 0; r < R; r++) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);
        }
    }
    for (int m = 0; m < MB; m++) {
        for (int r = 0; r < R; r++) {
            float s = hsum(acc[r][m]);
            for (int64_t kk = k; kk < K; kk++) s += w[r * K + kk] * x[m * K + kk];
            y[m * N + r] = b != NULL ? s + b[r] : s;
        }
    }
}

static inline __attribute__((always_inline)) void
rows_of(const float *x, const float *w, const float *b, float *y, int64_t M, int64_t K, int64_t N,
        int R, int prefetch) {
    int64_t m = 0;
    for (; m + 3 <= M; m += 3) tile(x + m * K, w, b, y + m * N, K, N, R, 3, prefetch);
    if (M - m == 2) tile(x + m * K, w, b, y + m * N, K, N, R, 2, prefetch);
    else if (M - m == 1) tile(x + m * K, w, b, y + m * N, K, N, R, 1, prefetch);
}

/* Every row of x against R rows of W. The prefetch flag is a constant in each branch, so the
 * loop without it is compiled as if it did not exist (a run-time flag slowed it by 30%). */
static inline __attribute__((always_inline)) void
rows(const float *x, const float *w, const float *b, float *y, int64_t M, int64_t K, int64_t N,
     int R) {
    if (M <= 8) rows_of(x, w, b, y, M, K, N, R, 1);
    else rows_of(x, w, b, y, M, K, N, R, 0);
}

static void medgpt_small_linear(const float *x, const float *w, const float *b, float *y,
                         int64_t M, int64_t K, int64_t N, int threads) {
    int64_t blocks = N / 4;
    /* Dynamic: a server's other processes (its HTTP proxy, the event loop) share these cores,
     * and with a static split the whole call waits for whichever thread they preempted. */
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads)
    for (int64_t i = 0; i < blocks; i++)
        rows(x, w + 4 * i * K, b != NULL ? b + 4 * i : NULL, y + 4 * i, M, K, N, 4);
    for (int64_t n = blocks * 4; n < N; n++)
        rows(x, w + n * K, b != NULL ? b + n : NULL, y + n, M, K, N, 1);
}
