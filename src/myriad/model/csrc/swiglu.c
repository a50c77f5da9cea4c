/* The expert SwiGLU's elementwise part in one pass each way (fp32, AVX2/FMA, OpenMP).
 *
 * h holds each row's gate g (columns 0..f-1) and up u (f..2f-1). Forward writes the sigmoid
 * s = 1/(1+exp(-g)) (kept for the backward instead of silu(g), so the backward needs no exp) and
 * act = g*s*u. Backward, from dact: d_up = dact*g*s and d_gate = dact*u*s*(1 + g*(1-s)). PyTorch
 * runs these as two and three separate passes over memory.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

/* exp(x) to about 2 ulp (Cephes' expf: x = n ln2 + r, a degree-5 polynomial in r, times 2^n). */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x); /* ln2 in two parts */
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

static inline __m256 sigmoid8(__m256 g) {
    const __m256 one = _mm256_set1_ps(1.0f);
    return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
}

void myriad_swiglu_forward(int threads, int64_t rows, int64_t f, const float *h, int64_t h_rs,
                           float *sig, float *act) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *g = h + r * h_rs, *u = g + f;
        float *s = sig + r * f, *a = act + r * f;
        int64_t j = 0;
        for (; j + 8 <= f; j += 8) {
            const __m256 gv = _mm256_loadu_ps(g + j), sv = sigmoid8(gv);
            _mm256_storeu_ps(s + j, sv);
            _mm256_storeu_ps(a + j, _mm256_mul_ps(_mm256_mul_ps(gv, sv), _mm256_loadu_ps(u + j)));
        }
        for (; j < f; j++) {
            s[j] = 1.0f / (1.0f + expf(-g[j]));
            a[j] = g[j] * s[j] * u[j];
        }
    }
}

void myriad_swiglu_backward(int threads, int64_t rows, int64_t f, const float *h, int64_t h_rs,
                            const float *sig, const float *dact, int64_t dact_rs, float *dh) {
    const __m256 one = _mm256_set1_ps(1.0f);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *g = h + r * h_rs, *u = g + f, *s = sig + r * f, *d = dact + r * dact_rs;
        float *dg = dh + r * 2 * f, *du = dg + f;
        int64_t j = 0;
        for (; j + 8 <= f; j += 8) {
            const __m256 gv = _mm256_loadu_ps(g + j), sv = _mm256_loadu_ps(s + j);
            const __m256 dv = _mm256_loadu_ps(d + j), uv = _mm256_loadu_ps(u + j);
            _mm256_storeu_ps(du + j, _mm256_mul_ps(dv, _mm256_mul_ps(gv, sv)));
            const __m256 slope = _mm256_fmadd_ps(gv, _mm256_sub_ps(one, sv), one); /* 1+g(1-s) */
            _mm256_storeu_ps(dg + j, _mm256_mul_ps(_mm256_mul_ps(dv, uv), _mm256_mul_ps(sv, slope)));
        }
        for (; j < f; j++) {
            du[j] = d[j] * (g[j] * s[j]);
            dg[j] = (d[j] * u[j]) * (s[j] * (1.0f + g[j] * (1.0f - s[j])));
        }
    }
}
