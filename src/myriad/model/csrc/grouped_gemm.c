/* Many small fp32 matmuls of different sizes in one call: Myriad's CPU kernel for MoE experts.
 *
 * C_g = A_g @ B_g for every group g (an expert), each with its own m, n, k. MKL's batch GEMM
 * packs every B_g whole before it computes, so with few rows per expert the weights make an
 * extra round trip through memory (docs/moe.md). Here a work item is one group's block of
 * PANELS x 16 columns (WIDE_PANELS for a group with few rows whose row-major B rows fit in one
 * item, so the item reads one contiguous stretch of B: 1.3x faster at 8 rows, measured): its B
 * slice is packed once into a small per-thread buffer (read row by row, sequentially; transposed
 * on the fly for A @ W^T) and every block of up to 6 rows of A_g then runs a 6 x 16 AVX2/FMA
 * register kernel over it from cache. A group with at most DOT_ROWS rows whose B is a weight read
 * transposed (dgrad) skips the packing: each element of C is a dot product of an A row and a
 * weight row, both read front to back. Items are spread over the threads of the OpenMP runtime
 * PyTorch already runs, so no second thread pool competes for the cores.
 *
 * Element (i, p) of A_g is a[a_off[g] + i*a_rs + p*a_cs]; (p, j) of B_g is b[b_off[g] + p*b_rs
 * + j*b_cs] with b_cs == 1 or b_rs == 1; C_g is row-major with row stride c_rs and is written,
 * never read (k = 0 writes zeros). Each element of C is summed by one thread in an order fixed by
 * the group's shape and layout: results do not depend on the thread count.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ROWS 6    /* rows of A per register block: 12 accumulators of 8 floats */
#define PANELS 8  /* 16-column panels per work item */
#define WIDE_PANELS 16 /* per item of a group with at most WIDE_ROWS rows and row-major B */
#define WIDE_ROWS 48
#ifndef DEPTH
#define DEPTH 256 /* rows of B packed at a time: one panel, 16 KB, stays in L1 */
#endif

typedef struct {
    const float *a, *b;
    float *c;
    const int64_t *a_off, *b_off, *c_off, *m, *n, *k;
    int64_t a_rs, a_cs, b_rs, b_cs, c_rs;
} problem;

/* C (R x 16) = A (R x kk) @ P (kk x 16, packed: row p at P + 16p), or C += that if add. */
static inline __attribute__((always_inline)) void block(const int R, int64_t kk, const float *a,
        int64_t a_rs, int64_t a_cs, const float *pack, float *c, int64_t c_rs, int add) {
    __m256 acc[ROWS][2];
    const float *row[ROWS];
    for (int i = 0; i < R; i++) {
        acc[i][0] = _mm256_setzero_ps();
        acc[i][1] = _mm256_setzero_ps();
        row[i] = a + i * a_rs;
    }
    if (a_cs == 1) { /* the common case, kept separate so the compiler indexes by p directly */
        for (int64_t p = 0; p < kk; p++) {
            const __m256 b0 = _mm256_load_ps(pack + 16 * p), b1 = _mm256_load_ps(pack + 16 * p + 8);
            for (int i = 0; i < R; i++) {
                const __m256 x = _mm256_broadcast_ss(row[i] + p);
                acc[i][0] = _mm256_fmadd_ps(x, b0, acc[i][0]);
                acc[i][1] = _mm256_fmadd_ps(x, b1, acc[i][1]);
            }
        }
    } else {
        for (int64_t p = 0; p < kk; p++) {
            const __m256 b0 = _mm256_load_ps(pack + 16 * p), b1 = _mm256_load_ps(pack + 16 * p + 8);
            for (int i = 0; i < R; i++) {
                const __m256 x = _mm256_broadcast_ss(row[i] + p * a_cs);
                acc[i][0] = _mm256_fmadd_ps(x, b0, acc[i][0]);
                acc[i][1] = _mm256_fmadd_ps(x, b1, acc[i][1]);
            }
        }
    }
    for (int i = 0; i < R; i++) {
        if (add) {
            acc[i][0] = _mm256_add_ps(acc[i][0], _mm256_loadu_ps(c + i * c_rs));
            acc[i][1] = _mm256_add_ps(acc[i][1], _mm256_loadu_ps(c + i * c_rs + 8));
        }
        _mm256_storeu_ps(c + i * c_rs, acc[i][0]);
        _mm256_storeu_ps(c + i * c_rs + 8, acc[i][1]);
    }
}

/* The same with R a run-time value, dispatched to compile-time copies (registers, not memory). */
static void rows_block(int64_t R, int64_t kk, const float *a, int64_t a_rs, int64_t a_cs,
                       const float *pack, float *c, int64_t c_rs, int add) {
    switch (R) {
    case 6: block(6, kk, a, a_rs, a_cs, pack, c, c_rs, add); break;
    case 5: block(5, kk, a, a_rs, a_cs, pack, c, c_rs, add); break;
    case 4: block(4, kk, a, a_rs, a_cs, pack, c, c_rs, add); break;
    case 3: block(3, kk, a, a_rs, a_cs, pack, c, c_rs, add); break;
    case 2: block(2, kk, a, a_rs, a_cs, pack, c, c_rs, add); break;
    case 1: block(1, kk, a, a_rs, a_cs, pack, c, c_rs, add); break;
    default: break;
    }
}

/* In-register transpose of an 8 x 8 block. */
static inline void transpose8(__m256 r[8]) {
    __m256 t[8], s[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {
        s[4 * i + 0] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        s[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        s[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        s[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x20);
        r[i + 4] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x31);
    }
}

/* pack[(q*kk + p)*16 + j] = B[p, 16q + j] for the item's columns (zeros past ncols). */
static void pack_panels(const float *b, int64_t b_rs, int64_t b_cs, int64_t kk, int64_t ncols,
                        float *pack) {
    const int64_t full = ncols / 16, np = (ncols + 15) / 16;
    if (b_cs == 1) { /* B row-major: read each row's slice front to back */
        for (int64_t p = 0; p < kk; p++)
            for (int64_t q = 0; q < full; q++) {
                const float *src = b + p * b_rs + 16 * q;
                float *dst = pack + (q * kk + p) * 16;
                _mm256_store_ps(dst, _mm256_loadu_ps(src));
                _mm256_store_ps(dst + 8, _mm256_loadu_ps(src + 8));
            }
    } else { /* b_rs == 1: column j of B is contiguous (a weight read as W^T); 8 x 8 tiles */
        for (int64_t q = 0; q < full; q++)
            for (int64_t half = 0; half < 2; half++) {
                const float *col = b + (16 * q + 8 * half) * b_cs;
                float *dst = pack + q * kk * 16 + 8 * half;
                int64_t p = 0;
                for (; p + 8 <= kk; p += 8) {
                    __m256 r[8];
                    for (int j = 0; j < 8; j++) r[j] = _mm256_loadu_ps(col + j * b_cs + p);
                    transpose8(r);
                    for (int i = 0; i < 8; i++) _mm256_store_ps(dst + (p + i) * 16, r[i]);
                }
                for (; p < kk; p++)
                    for (int j = 0; j < 8; j++) dst[p * 16 + j] = col[j * b_cs + p];
            }
    }
    if (np > full) { /* a last panel narrower than 16 columns */
        const int64_t q = full, w = ncols - 16 * full;
        for (int64_t p = 0; p < kk; p++)
            for (int64_t j = 0; j < 16; j++)
                pack[(q * kk + p) * 16 + j] = j < w ? b[p * b_rs + (16 * q + j) * b_cs] : 0.0f;
    }
}

/* ---- few rows and B = W^T (a weight read transposed): dot products, W read front to back ---- */
#define DOT_ROWS 16  /* most rows of a group on this path: 0.65x the time at 8, ~0.9x at 16 */
#define DOT_COLS 256 /* columns of C (rows of W) per work item */

static inline __m256i tail_mask(int64_t w) { /* lanes below w set */
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)w), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* out[r] = A[r, 0:k] . w[0:k] for r < R: A's rows contiguous, R accumulators of 8 lanes. */
static inline __attribute__((always_inline)) void dots(const int R, int64_t k, const float *a,
        int64_t a_rs, const float *w, float *out) {
    __m256 acc[8];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    int64_t p = 0;
    for (; p + 8 <= k; p += 8) {
        const __m256 wv = _mm256_loadu_ps(w + p);
        for (int r = 0; r < R; r++)
            acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(a + r * a_rs + p), wv, acc[r]);
    }
    if (p < k) {
        const __m256i mask = tail_mask(k - p);
        const __m256 wv = _mm256_maskload_ps(w + p, mask);
        for (int r = 0; r < R; r++)
            acc[r] = _mm256_fmadd_ps(_mm256_maskload_ps(a + r * a_rs + p, mask), wv, acc[r]);
    }
    for (int r = 0; r < R; r++) out[r] = hsum(acc[r]);
}

/* The columns [n0, n0 + ncols) of C_g = A_g @ W_g^T, one W row (C column) at a time. With few
 * rows the packed path spends more time transposing W into cache than computing on it. */
static void dot_item(const problem *pr, int64_t g, int64_t n0, int64_t ncols) {
    const int64_t m = pr->m[g], k = pr->k[g], a_rs = pr->a_rs, b_cs = pr->b_cs, c_rs = pr->c_rs;
    const float *a = pr->a + pr->a_off[g], *w = pr->b + pr->b_off[g] + n0 * b_cs;
    float *c = pr->c + pr->c_off[g] + n0;
    const int64_t blocks = (m + 7) / 8, base = m / blocks, wider = m - base * blocks;
    for (int64_t j = 0; j < ncols; j++)
        for (int64_t b = 0, i = 0; b < blocks; b++) { /* rows split evenly, as in run_item */
            const int64_t R = base + (b < wider);
            float out[8];
            switch (R) {
#define DOTS(n) case n: dots(n, k, a + i * a_rs, a_rs, w + j * b_cs, out); break;
            DOTS(8) DOTS(7) DOTS(6) DOTS(5) DOTS(4) DOTS(3) DOTS(2) DOTS(1)
#undef DOTS
            default: break;
            }
            for (int64_t r = 0; r < R; r++) c[(i + r) * c_rs + j] = out[r];
            i += R;
        }
}

/* Whether group g takes dot_item: few rows, B = W^T with W's rows contiguous, A's rows too. */
static int dot_group(const problem *pr, int64_t g) {
    return pr->m[g] <= DOT_ROWS && pr->b_rs == 1 && pr->b_cs != 1 && pr->a_cs == 1;
}

/* 16-column panels per work item of group g. */
static int64_t item_panels(const problem *pr, int64_t g) {
    const int wide = pr->b_cs == 1 && pr->m[g] <= WIDE_ROWS && pr->n[g] <= WIDE_PANELS * 16;
    return wide ? WIDE_PANELS : PANELS;
}

static void run_item(const problem *pr, int64_t g, int64_t item, float *pack) {
    if (dot_group(pr, g)) {
        const int64_t n0 = item * DOT_COLS, left = pr->n[g] - n0;
        dot_item(pr, g, n0, left < DOT_COLS ? left : DOT_COLS);
        return;
    }
    const int64_t width = item_panels(pr, g) * 16, n0 = item * width, left = pr->n[g] - n0;
    const int64_t ncols = left < width ? left : width;
    const int64_t m = pr->m[g], k = pr->k[g];
    for (int64_t k0 = 0; k0 == 0 || k0 < k; k0 += DEPTH) { /* k = 0 still writes zeros */
        const int64_t kk = k - k0 < DEPTH ? k - k0 : DEPTH, add = k0 > 0;
        const float *a = pr->a + pr->a_off[g] + k0 * pr->a_cs;
        pack_panels(pr->b + pr->b_off[g] + k0 * pr->b_rs + n0 * pr->b_cs, pr->b_rs, pr->b_cs, kk,
                    ncols, pack);
        for (int64_t q = 0; 16 * q < ncols; q++) {
            float *c = pr->c + pr->c_off[g] + n0 + 16 * q;
            const int64_t cols = ncols - 16 * q < 16 ? ncols - 16 * q : 16;
            const float *panel = pack + q * kk * 16;
            /* rows split evenly into blocks of at most ROWS: 8 = 4 + 4, not 6 + 2 (a block
             * under 4 rows has too few accumulators to keep both FMA units busy) */
            const int64_t blocks = (m + ROWS - 1) / ROWS, base = m / blocks, wider = m - base * blocks;
            for (int64_t b = 0, i = 0; b < blocks; i += base + (b < wider), b++) {
                const int64_t R = base + (b < wider);
                const float *ai = a + i * pr->a_rs;
                float *ci = c + i * pr->c_rs;
                if (cols == 16) {
                    rows_block(R, kk, ai, pr->a_rs, pr->a_cs, panel, ci, pr->c_rs, add);
                    continue;
                }
                float part[ROWS * 16]; /* the last, narrower panel: through a 16-wide buffer */
                for (int64_t r = 0; r < R && add; r++)
                    memcpy(part + 16 * r, ci + r * pr->c_rs, (size_t)cols * sizeof(float));
                rows_block(R, kk, ai, pr->a_rs, pr->a_cs, panel, part, 16, add);
                for (int64_t r = 0; r < R; r++)
                    memcpy(ci + r * pr->c_rs, part + 16 * r, (size_t)cols * sizeof(float));
            }
        }
    }
}

/* Whether a (rows x cols) matrix at off with strides rs, cs reaches outside [0, span). */
static int outside(int64_t off, int64_t rows, int64_t cols, int64_t rs, int64_t cs, int64_t span) {
    return rows > 0 && cols > 0 && (off < 0 || off + (rows - 1) * rs + (cols - 1) * cs >= span);
}

/* Returns 0; -2, -3 or -4 when a group of A, B or C would reach outside the span elements that
 * lie from its pointer (checked for every group before anything runs); or -1 when the packing
 * buffers could not be allocated (C is then unspecified). */
int myriad_grouped_gemm(int threads, int64_t groups,
                        const float *a, const int64_t *a_off, int64_t a_rs, int64_t a_cs,
                        const float *b, const int64_t *b_off, int64_t b_rs, int64_t b_cs,
                        float *c, const int64_t *c_off, int64_t c_rs,
                        const int64_t *m, const int64_t *n, const int64_t *k,
                        int64_t a_span, int64_t b_span, int64_t c_span) {
    for (int64_t g = 0; g < groups; g++) {
        if (outside(a_off[g], m[g], k[g], a_rs, a_cs, a_span)) return -2;
        if (outside(b_off[g], k[g], n[g], b_rs, b_cs, b_span)) return -3;
        if (outside(c_off[g], m[g], n[g], c_rs, 1, c_span)) return -4;
    }
    const problem pr = {a, b, c, a_off, b_off, c_off, m, n, k, a_rs, a_cs, b_rs, b_cs, c_rs};
    int64_t *first = malloc((groups + 1) * sizeof(int64_t)); /* first item of each group */
    if (!first) return -1;
    first[0] = 0;
    for (int64_t g = 0; g < groups; g++) {
        const int64_t panels = m[g] > 0 ? (n[g] + 15) / 16 : 0, per_item = item_panels(&pr, g);
        if (dot_group(&pr, g))
            first[g + 1] = first[g] + (m[g] > 0 ? (n[g] + DOT_COLS - 1) / DOT_COLS : 0);
        else
            first[g + 1] = first[g] + (panels + per_item - 1) / per_item;
    }
    const int64_t items = first[groups];
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *pack = aligned_alloc(64, (size_t)(WIDE_PANELS * 16 * DEPTH) * sizeof(float));
        int64_t g = 0;
        /* dynamic, so busy experts do not hold one thread up; each thread's items rise. */
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < items; item++) {
            if (!pack) { failed = 1; continue; }
            while (first[g + 1] <= item) g++;
            run_item(&pr, g, item - first[g], pack);
        }
        free(pack);
    }
    free(first);
    return failed ? -1 : 0;
}
