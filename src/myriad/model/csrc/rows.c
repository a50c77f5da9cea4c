/* Rows between tokens and the experts' row buffer, each direction in one pass (fp32, OpenMP).
 *
 * Assignment a = t*K + k (token t's k-th expert) lives in buffer row slot[a]; a slot >= rows
 * marks an assignment the capacity limit dropped. PyTorch needs an index_copy_, index_select,
 * multiply and add per k, each a pass over memory, plus a (T, K, D) temporary for the combine's
 * backward. Every output row is written by one thread and summed in order k = 0..K-1.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

/* buf[slot[t*K+k]] = x[t] for every kept assignment. */
void myriad_dispatch_rows(int threads, int64_t T, int64_t K, int64_t D, const float *x,
                          const int64_t *slot, int64_t rows, float *buf) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < T; t++)
        for (int64_t k = 0; k < K; k++) {
            const int64_t s = slot[t * K + k];
            if (s < rows) memcpy(buf + s * D, x + t * D, (size_t)D * sizeof(float));
        }
}

/* out[t] = sum over kept k of w[t*K+k] * buf[slot[t*K+k]] (w NULL: weights of 1), 0 if none. */
void myriad_gather_rows(int threads, int64_t T, int64_t K, int64_t D, const float *buf,
                        const int64_t *slot, int64_t rows, const float *w, float *out) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        float *o = out + t * D;
        int first = 1;
        for (int64_t k = 0; k < K; k++) {
            const int64_t s = slot[t * K + k];
            if (s >= rows) continue;
            const float *r = buf + s * D, wk = w ? w[t * K + k] : 1.0f;
            if (first)
                for (int64_t j = 0; j < D; j++) o[j] = wk * r[j];
            else
                for (int64_t j = 0; j < D; j++) o[j] += wk * r[j];
            first = 0;
        }
        if (first) memset(o, 0, (size_t)D * sizeof(float));
    }
}

static inline float dot(const float *x, const float *y, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + j), _mm256_loadu_ps(y + j), acc);
    float lanes[8], sum = 0.0f;
    _mm256_storeu_ps(lanes, acc);
    for (int i = 0; i < 8; i++) sum += lanes[i];
    for (; j < n; j++) sum += x[j] * y[j];
    return sum;
}

/* The combine's backward: d_buf[slot] = w[t*K+k] * dy[t] and dw[t*K+k] = buf[slot] . dy[t]
 * for kept assignments (dw NULL: not wanted); dw of a dropped one is 0. */
void myriad_combine_backward(int threads, int64_t T, int64_t K, int64_t D, const float *buf,
                             const int64_t *slot, int64_t rows, const float *w, const float *dy,
                             float *d_buf, float *dw) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *g = dy + t * D;
        for (int64_t k = 0; k < K; k++) {
            const int64_t a = t * K + k, s = slot[a];
            if (s >= rows) {
                if (dw) dw[a] = 0.0f;
                continue;
            }
            if (dw) dw[a] = dot(buf + s * D, g, D);
            float *d = d_buf + s * D;
            const float wk = w[a];
            for (int64_t j = 0; j < D; j++) d[j] = wk * g[j];
        }
    }
}
