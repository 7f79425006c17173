/* Attention for one decode step of a batch whose rows sit at different positions.
 *
 * qkv is (B, 3, H, D): each row's new query, key and value (c_attn's output, viewed). The
 * caches are (rows, H, T, D), row b of the batch in cache row b. Row b's key and value go to
 * position pos[b] of its cache row; its query then attends over positions 0..pos[b] of that
 * row alone. y is (B, H, D).
 *
 * PyTorch's scaled_dot_product_attention does the same with a (B, 1, 1, L) mask over the
 * longest row's L positions; on the CPU it copies each layer's (B, H, L, D) keys and values
 * to contiguous buffers first and runs small MKL products per head, ~0.6 ms a layer at 8
 * rows of GPT-2 124M here. This reads each (row, head)'s positions once, at memory speed,
 * and only the positions that row can see.
 *
 * Every (row, head) is computed by one thread in a fixed order, whatever B is and wherever
 * the other rows are: a request's numbers do not depend on its batch.
 *
 * The loops only: ops.cpp checks the tensors (positions included) and gives the scratch
 * buffer, then calls medgpt_decode_attention. */
#pragma once
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float dot(const float *a, const float *b, int64_t D) {
    __m256 acc = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 8 <= D; d += 8)
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc);
    float s = hsum8(acc);
    for (; d < D; d++) s += a[d] * b[d];
    return s;
}

/* scores holds at least n floats. */
static void one_head(const float *q, const float *K, const float *V, float *y, int64_t n,
                     int64_t D, float scale, float *scores) {
    float top = -INFINITY;
    for (int64_t j = 0; j < n; j++) {
        scores[j] = dot(q, K + j * D, D) * scale;
        if (scores[j] > top) top = scores[j];
    }
    float total = 0.0f;
    for (int64_t j = 0; j < n; j++) {
        scores[j] = expf(scores[j] - top);
        total += scores[j];
    }
    for (int64_t d = 0; d < D; d++) y[d] = 0.0f;
    for (int64_t j = 0; j < n; j++) {
        const float p = scores[j] / total;
        const float *v = V + j * D;
        int64_t d = 0;
        for (; d + 8 <= D; d += 8)
            _mm256_storeu_ps(y + d, _mm256_fmadd_ps(_mm256_set1_ps(p), _mm256_loadu_ps(v + d),
                                                    _mm256_loadu_ps(y + d)));
        for (; d < D; d++) y[d] += p * v[d];
    }
}

/* Every pos[b] in 0..T-1 (checked by the caller, before anything is written); scratch holds
 * B * H * T floats: one scores buffer per (row, head), T floats each, at most a few MB at a
 * full 1,024-position GPT-2 batch, and no thread needs to know which others run. */
static void medgpt_decode_attention(const float *qkv, float *k_cache, float *v_cache,
                                    const int64_t *pos, float *y, int64_t B, int64_t H,
                                    int64_t T, int64_t D, float scale, int threads,
                                    float *scratch) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t i = 0; i < B * H; i++) {
        const int64_t b = i / H, h = i % H, p = pos[b];
        const float *row = qkv + b * 3 * H * D + h * D;
        float *K = k_cache + (b * H + h) * T * D;
        float *V = v_cache + (b * H + h) * T * D;
        memcpy(K + p * D, row + H * D, sizeof(float) * (size_t)D);
        memcpy(V + p * D, row + 2 * H * D, sizeof(float) * (size_t)D);
        one_head(row, K, V, y + (b * H + h) * D, p + 1, D, scale, scratch + i * T);
    }
}
