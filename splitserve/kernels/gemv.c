/* Skinny GEMM for CPU decode: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), W bf16 or int8.
 *
 * Built at run time by splitserve/kernels/cpu.py (gcc -O3 -march=native -fopenmp -shared).
 * Decode is memory-bound: every step streams all weights once, so the layout is chosen for
 * the DRAM stream, not for the arithmetic. On Zen 4 a single ascending stream reaches the
 * read roofline, while even two interleaved row streams (rows n and n+1 side by side) fall
 * to a third of it. Row-major W read one row at a time is one stream too, but each line then
 * needs a full x vector and each row a horizontal sum: ~10% slower. So W is repacked once
 * into blocks of 16 output rows, each block one contiguous run in memory, and x is broadcast
 * instead of W being reduced horizontally:
 *
 *   bf16: W16[N/16][ceil(K/2)][16][2]   one 64-byte line = 16 rows x one k pair
 *   int8: W16[N/16][ceil(K/4)][16][4]   one 64-byte line = 16 rows x one k quad
 *
 * (rows past N and k past K are zero; cpu.py puts them in 2 MiB pages, see hugepages.py).
 * One line times a broadcast x pair (vdpbf16ps) or quad (vpdpbusd) adds one k step to all 16
 * outputs of the block, so the accumulator lanes are the outputs: no horizontal sums. Each
 * weight line is loaded once and used for up to 8 rows of x (an M tile); larger M (prefill)
 * runs every tile over an L2-sized chunk of blocks before the next chunk is read, which keeps
 * it compute-bound (~1 vdpbf16ps per cycle).
 *
 * int8 (weight-only, one scale per output row): to use the integer dot product, x is split
 * into 16-bit integers (not quantised to 8 bits). Per row of x, with a power-of-two
 * step s = 2^(e-15) where max|x| < 2^e, xi = rint(x / s) is a 16-bit integer (exact for every
 * bf16 element within 2^7 of the row's largest; smaller ones keep an absolute error below
 * s/2, i.e. 2^-16 of the row's range). xi = 256 h + l with h in [-128, 127], l in [0, 255]:
 *
 *   sum_k xi w = 256 (sum_k (h + 128) w - 128 wsum) + sum_k l w,   wsum[n] = sum_k w[n, k]
 *
 * both sums are exact int32 (vpdpbusd takes unsigned x bytes and signed w bytes), combined in
 * int64, then y = fp32(that) * s * scale[n] (+ bias). A row of x holding NaN or inf gives NaN.
 *
 * A portable scalar path over the same layouts is compiled when the CPU lacks AVX-512
 * BF16/VNNI; its int8 results are bit-identical (same integers), bf16 differs in rounding.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__) && defined(__AVX512BF16__)
#define SS_BF16_SIMD 1
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define SS_I8_SIMD 1
#endif
#if defined(SS_BF16_SIMD) || defined(SS_I8_SIMD)
#include <immintrin.h>
#endif

#define BLK 16 /* output rows per packed block */
#define MT 8   /* rows of x per tile */

/* Software prefetch distance in bytes for tiles of >= 5 rows of x. With few rows the core
 * asks for lines faster than DRAM delivers and the hardware prefetcher alone is best (a
 * prefetch there costs ~10%); from 5 rows on, the arithmetic per line is long enough that the
 * stream falls behind unless told where it goes (+35% at 8 rows, measured on Zen 4). */
#define PF_DIST 4096
#define PF_MIN_ROWS 5
/* Bytes of packed weight per chunk when M spans several tiles (fits L2 with room for x). */
#define CHUNK_BYTES (512 * 1024)

/* 1 when the AVX-512 path is compiled in, for each kernel (bit 0 bf16, bit 1 int8). */
int ss_simd_flags(void) {
    int f = 0;
#ifdef SS_BF16_SIMD
    f |= 1;
#endif
#ifdef SS_I8_SIMD
    f |= 2;
#endif
    return f;
}

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline int32_t load_i32(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Run fn over blocks [0, nblocks) split into one contiguous range per thread (one ascending
 * stream each, as the DRAM prefetchers want), with threads only where each gets some
 * microseconds of work: at least MIN_MACS_PER_THREAD multiply-adds (~10 us at M = 1).
 *
 * The team is torch's own OpenMP pool (see cpu.py). A work-claiming pthread pool that never
 * waits for a descheduled worker was tried: it shrugs off a busy core in a C benchmark, but
 * in the engine its threads compete with torch's spinning OpenMP workers and a decode step
 * got 25-40% slower than with the shared team. */
#define MIN_MACS_PER_THREAD (1 << 17)
typedef void (*range_fn)(const void *ctx, int64_t b0, int64_t b1);

static void run_blocks(int nthreads, int64_t nblocks, int64_t macs, range_fn fn,
                       const void *ctx) {
    if (nthreads > macs / MIN_MACS_PER_THREAD) nthreads = (int)(macs / MIN_MACS_PER_THREAD);
    if (nthreads > nblocks) nthreads = (int)nblocks;
#ifdef _OPENMP
    if (nthreads > 1) {
#pragma omp parallel num_threads(nthreads)
        {
            const int t = omp_get_thread_num(), nt = omp_get_num_threads();
            fn(ctx, nblocks * t / nt, nblocks * (t + 1) / nt);
        }
        return;
    }
#endif
    fn(ctx, 0, nblocks);
}

/* Blocks per chunk: with more than one M tile, a chunk of blocks small enough to stay in L2
 * is finished for every tile before the next chunk is read. */
static int64_t chunk_blocks(int64_t block_bytes, int64_t M) {
    if (M <= MT) return INT64_MAX / 2;
    int64_t cb = CHUNK_BYTES / block_bytes;
    return cb > 0 ? cb : 1;
}

/* ------------------------------------------------------------------ bf16 */

typedef struct {
    const uint16_t *x, *w;
    const float *bias;
    uint16_t *y;
    int64_t M, N, K;
} bf16_args;

#ifdef SS_BF16_SIMD
/* One 16-row block times rows [0, mt) of x. `mt` is a compile-time constant at every call
 * site (see the switch below), so the accumulator arrays live in registers. Two chains per
 * row when mt <= 4 hide the 6-cycle latency of vdpbf16ps. */
static inline __attribute__((always_inline)) void
bf16_tile(const bf16_args *a, const uint16_t *wb, const uint16_t *x, uint16_t *y, int64_t n0,
          const int mt, const int pf) {
    const int64_t K = a->K, kp2 = K / 2, nk = (K + 1) / 2;
    __m512 acc0[MT], acc1[MT];
#pragma GCC unroll 8
    for (int m = 0; m < mt; m++) acc0[m] = acc1[m] = _mm512_setzero_ps();
    int64_t p = 0;
    if (mt <= 4) {
        for (; p + 2 <= kp2; p += 2) {
            if (pf) {
                _mm_prefetch((const char *)(wb + p * 32) + pf, _MM_HINT_T0);
                _mm_prefetch((const char *)(wb + p * 32) + pf + 64, _MM_HINT_T0);
            }
            __m512bh w0 = (__m512bh)_mm512_loadu_si512(wb + p * 32);
            __m512bh w1 = (__m512bh)_mm512_loadu_si512(wb + p * 32 + 32);
#pragma GCC unroll 8
            for (int m = 0; m < mt; m++) {
                const uint16_t *xm = x + m * K + 2 * p;
                const __m512bh x0 = (__m512bh)_mm512_set1_epi32(load_i32(xm));
                const __m512bh x1 = (__m512bh)_mm512_set1_epi32(load_i32(xm + 2));
                acc0[m] = _mm512_dpbf16_ps(acc0[m], w0, x0);
                acc1[m] = _mm512_dpbf16_ps(acc1[m], w1, x1);
            }
        }
    }
    for (; p < kp2; p++) {
        if (pf) _mm_prefetch((const char *)(wb + p * 32) + pf, _MM_HINT_T0);
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(wb + p * 32);
#pragma GCC unroll 8
        for (int m = 0; m < mt; m++)
            acc0[m] = _mm512_dpbf16_ps(acc0[m], w0,
                                       (__m512bh)_mm512_set1_epi32(load_i32(x + m * K + 2 * p)));
    }
    if (nk > kp2) { /* odd K: last pair is (x[K-1], 0); never read x[K] */
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(wb + kp2 * 32);
#pragma GCC unroll 8
        for (int m = 0; m < mt; m++)
            acc0[m] = _mm512_dpbf16_ps(acc0[m], w0, (__m512bh)_mm512_set1_epi32(x[m * K + K - 1]));
    }
    const int64_t nv = a->N - n0 < BLK ? a->N - n0 : BLK;
    const __mmask16 mask = (__mmask16)((1u << nv) - 1u);
    __m512 b = a->bias ? _mm512_maskz_loadu_ps(mask, a->bias + n0) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int m = 0; m < mt; m++) {
        __m512 s = _mm512_add_ps(_mm512_add_ps(acc0[m], acc1[m]), b);
        _mm256_mask_storeu_epi16(y + m * a->N + n0, mask, (__m256i)_mm512_cvtneps_pbh(s));
    }
}
#endif

/* Packed block b times rows [m0, m0 + 8) of x (fewer at the end). */
static void bf16_block(const bf16_args *a, int64_t b, int64_t m0) {
    const int64_t K = a->K, nk = (K + 1) / 2, n0 = b * BLK;
    const uint16_t *wb = a->w + b * nk * BLK * 2, *x = a->x + m0 * K;
    uint16_t *y = a->y + m0 * a->N;
    const int64_t mt = a->M - m0 < MT ? a->M - m0 : MT;
#ifdef SS_BF16_SIMD
    const int pf = mt >= PF_MIN_ROWS ? PF_DIST : 0;
    switch (mt) {
    case 1: bf16_tile(a, wb, x, y, n0, 1, pf); break;
    case 2: bf16_tile(a, wb, x, y, n0, 2, pf); break;
    case 3: bf16_tile(a, wb, x, y, n0, 3, pf); break;
    case 4: bf16_tile(a, wb, x, y, n0, 4, pf); break;
    case 5: bf16_tile(a, wb, x, y, n0, 5, pf); break;
    case 6: bf16_tile(a, wb, x, y, n0, 6, pf); break;
    case 7: bf16_tile(a, wb, x, y, n0, 7, pf); break;
    default: bf16_tile(a, wb, x, y, n0, 8, pf); break;
    }
#else
    float acc[MT][BLK];
    memset(acc, 0, sizeof acc);
    for (int64_t p = 0; p < nk; p++) {
        const uint16_t *wl = wb + p * BLK * 2;
        for (int64_t m = 0; m < mt; m++) {
            float x0 = bf16_to_f32(x[m * K + 2 * p]);
            float x1 = 2 * p + 1 < K ? bf16_to_f32(x[m * K + 2 * p + 1]) : 0.0f;
            for (int r = 0; r < BLK; r++)
                acc[m][r] += x0 * bf16_to_f32(wl[2 * r]) + x1 * bf16_to_f32(wl[2 * r + 1]);
        }
    }
    for (int64_t m = 0; m < mt; m++)
        for (int64_t r = 0; r < BLK && n0 + r < a->N; r++)
            y[m * a->N + n0 + r] = f32_to_bf16(acc[m][r] + (a->bias ? a->bias[n0 + r] : 0.0f));
#endif
}

static void bf16_range(const void *ctx, int64_t b0, int64_t b1) {
    const bf16_args *a = (const bf16_args *)ctx;
    const int64_t cb = chunk_blocks((a->K + 1) / 2 * BLK * 2 * 2, a->M);
    for (int64_t c0 = b0; c0 < b1; c0 += cb) {
        const int64_t c1 = b1 - c0 > cb ? c0 + cb : b1;
        for (int64_t m0 = 0; m0 < a->M; m0 += MT)
            for (int64_t b = c0; b < c1; b++) bf16_block(a, b, m0);
    }
}

/* x [M, K] bf16, w packed as above, bias fp32 [N] or NULL, y [M, N] bf16. */
void ss_linear_bf16(const uint16_t *x, const uint16_t *w, const float *bias, uint16_t *y, int64_t M,
                    int64_t N, int64_t K, int nthreads) {
    bf16_args a = {x, w, bias, y, M, N, K};
    run_blocks(nthreads, (N + BLK - 1) / BLK, M * N * K, bf16_range, &a);
}

/* ------------------------------------------------------------------ int8 */

typedef struct {
    const uint8_t *xh, *xl; /* [M, kq*4]: h + 128 and l bytes of each row of x */
    const float *xs;        /* [M] step s of each row, NaN for a non-finite row */
    const int8_t *w;
    const float *scale, *bias;
    const int32_t *wsum;
    void *y;
    int y_f32;
    int64_t M, N, K;
} i8_args;

static inline void store_row(const i8_args *a, int64_t m, int64_t n, float v) {
    if (a->y_f32)
        ((float *)a->y)[m * a->N + n] = v;
    else
        ((uint16_t *)a->y)[m * a->N + n] = f32_to_bf16(v);
}

#ifdef SS_I8_SIMD
static inline __attribute__((always_inline)) void
i8_tile(const i8_args *a, const int8_t *wb, int64_t m0, int64_t n0, const int mt, const int pf) {
    const int64_t kq = (a->K + 3) / 4, ld = kq * 4;
    const uint8_t *xh = a->xh + m0 * ld, *xl = a->xl + m0 * ld;
    __m512i ah[MT], al[MT], bh[MT], bl[MT]; /* a, b: two chains (even/odd q) when mt <= 4 */
#pragma GCC unroll 8
    for (int m = 0; m < mt; m++) ah[m] = al[m] = bh[m] = bl[m] = _mm512_setzero_si512();
    int64_t q = 0;
    if (mt <= 4) {
        for (; q + 2 <= kq; q += 2) {
            if (pf) {
                _mm_prefetch((const char *)(wb + q * 64) + pf, _MM_HINT_T0);
                _mm_prefetch((const char *)(wb + q * 64) + pf + 64, _MM_HINT_T0);
            }
            __m512i w0 = _mm512_loadu_si512(wb + q * 64), w1 = _mm512_loadu_si512(wb + q * 64 + 64);
#pragma GCC unroll 8
            for (int m = 0; m < mt; m++) {
                const uint8_t *h = xh + m * ld + 4 * q, *l = xl + m * ld + 4 * q;
                ah[m] = _mm512_dpbusd_epi32(ah[m], _mm512_set1_epi32(load_i32(h)), w0);
                al[m] = _mm512_dpbusd_epi32(al[m], _mm512_set1_epi32(load_i32(l)), w0);
                bh[m] = _mm512_dpbusd_epi32(bh[m], _mm512_set1_epi32(load_i32(h + 4)), w1);
                bl[m] = _mm512_dpbusd_epi32(bl[m], _mm512_set1_epi32(load_i32(l + 4)), w1);
            }
        }
    }
    for (; q < kq; q++) {
        if (pf) _mm_prefetch((const char *)(wb + q * 64) + pf, _MM_HINT_T0);
        __m512i wl = _mm512_loadu_si512(wb + q * 64);
#pragma GCC unroll 8
        for (int m = 0; m < mt; m++) {
            const int64_t o = m * ld + 4 * q;
            ah[m] = _mm512_dpbusd_epi32(ah[m], _mm512_set1_epi32(load_i32(xh + o)), wl);
            al[m] = _mm512_dpbusd_epi32(al[m], _mm512_set1_epi32(load_i32(xl + o)), wl);
        }
    }
#pragma GCC unroll 8
    for (int m = 0; m < mt; m++) {
        ah[m] = _mm512_add_epi32(ah[m], bh[m]);
        al[m] = _mm512_add_epi32(al[m], bl[m]);
    }
    const int64_t nv = a->N - n0 < BLK ? a->N - n0 : BLK;
    const __mmask16 mask = (__mmask16)((1u << nv) - 1u);
    const __m512i c128 = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(mask, a->wsum + n0), 7);
    const __m512 sc = _mm512_maskz_loadu_ps(mask, a->scale + n0);
    const __m512 b = a->bias ? _mm512_maskz_loadu_ps(mask, a->bias + n0) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int m = 0; m < mt; m++) {
        __m512i h = _mm512_sub_epi32(ah[m], c128); /* sum h w, exact */
        __m512i lo = _mm512_add_epi64(
            _mm512_slli_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(h)), 8),
            _mm512_cvtepi32_epi64(_mm512_castsi512_si256(al[m])));
        __m512i hi = _mm512_add_epi64(
            _mm512_slli_epi64(_mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(h, 1)), 8),
            _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(al[m], 1)));
        __m512 v = _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtepi64_ps(lo)),
                                      _mm512_cvtepi64_ps(hi), 1);
        v = _mm512_fmadd_ps(v, _mm512_mul_ps(sc, _mm512_set1_ps(a->xs[m0 + m])), b);
        if (a->y_f32)
            _mm512_mask_storeu_ps((float *)a->y + (m0 + m) * a->N + n0, mask, v);
        else
            _mm256_mask_storeu_epi16((uint16_t *)a->y + (m0 + m) * a->N + n0, mask,
                                     (__m256i)_mm512_cvtneps_pbh(v));
    }
}
#endif

/* Packed block b times rows [m0, m0 + 8) of x (fewer at the end). */
static void i8_block(const i8_args *a, int64_t b, int64_t m0) {
    const int64_t kq = (a->K + 3) / 4, n0 = b * BLK;
    const int8_t *wb = a->w + b * kq * BLK * 4;
    const int64_t mt = a->M - m0 < MT ? a->M - m0 : MT;
#ifdef SS_I8_SIMD
    const int pf = mt >= PF_MIN_ROWS ? PF_DIST : 0;
    switch (mt) {
    case 1: i8_tile(a, wb, m0, n0, 1, pf); break;
    case 2: i8_tile(a, wb, m0, n0, 2, pf); break;
    case 3: i8_tile(a, wb, m0, n0, 3, pf); break;
    case 4: i8_tile(a, wb, m0, n0, 4, pf); break;
    case 5: i8_tile(a, wb, m0, n0, 5, pf); break;
    case 6: i8_tile(a, wb, m0, n0, 6, pf); break;
    case 7: i8_tile(a, wb, m0, n0, 7, pf); break;
    default: i8_tile(a, wb, m0, n0, 8, pf); break;
    }
#else
    const int64_t ld = kq * 4;
    for (int64_t m = m0; m < m0 + mt; m++) {
        const uint8_t *xh = a->xh + m * ld, *xl = a->xl + m * ld;
        for (int64_t r = 0; r < BLK && n0 + r < a->N; r++) {
            int32_t sh = 0, sl = 0;
            for (int64_t q = 0; q < kq; q++)
                for (int j = 0; j < 4; j++) {
                    int32_t wv = wb[q * 64 + r * 4 + j];
                    sh += xh[4 * q + j] * wv;
                    sl += xl[4 * q + j] * wv;
                }
            int64_t v = (int64_t)(sh - 128 * a->wsum[n0 + r]) * 256 + sl;
            /* fmaf: one rounding, as the SIMD path's fmadd (bit-identical results) */
            float f = fmaf((float)v, a->scale[n0 + r] * a->xs[m], a->bias ? a->bias[n0 + r] : 0.0f);
            store_row(a, m, n0 + r, f);
        }
    }
#endif
}

static void i8_range(const void *ctx, int64_t b0, int64_t b1) {
    const i8_args *a = (const i8_args *)ctx;
    const int64_t cb = chunk_blocks((a->K + 3) / 4 * BLK * 4, a->M);
    for (int64_t c0 = b0; c0 < b1; c0 += cb) {
        const int64_t c1 = b1 - c0 > cb ? c0 + cb : b1;
        for (int64_t m0 = 0; m0 < a->M; m0 += MT)
            for (int64_t b = c0; b < c1; b++) i8_block(a, b, m0);
    }
}

#ifdef SS_I8_SIMD
static inline __m512 load16(const void *x, int x_f32, int64_t k, __mmask16 mk) {
    if (x_f32) return _mm512_maskz_loadu_ps(mk, (const float *)x + k);
    const __m256i b = _mm256_maskz_loadu_epi16(mk, (const uint16_t *)x + k);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}
#endif

/* Split one row of x (n values, bf16 or fp32) into h + 128 and l bytes; returns the step s, or
 * NaN when the row holds NaN or inf. ld - n trailing bytes are zero (they meet zero weights). */
static float split_row(const void *x, int x_f32, int64_t n, int64_t ld, uint8_t *h, uint8_t *l) {
    float amax = 0.0f;
    int finite = 1;
    int64_t k = 0;
#ifdef SS_I8_SIMD
    __m512 vmax = _mm512_setzero_ps();
    __mmask16 bad = 0;
    for (; k < n; k += 16) {
        const __mmask16 mk = n - k >= 16 ? 0xffff : (__mmask16)((1u << (n - k)) - 1u);
        const __m512 av = _mm512_abs_ps(load16(x, x_f32, k, mk));
        bad |= _mm512_cmp_ps_mask(av, _mm512_set1_ps(3.4028235e38f), _CMP_NLE_UQ); /* NaN, inf */
        vmax = _mm512_max_ps(vmax, av);
    }
    amax = _mm512_reduce_max_ps(vmax);
    finite = bad == 0;
#else
    for (; k < n; k++) {
        float v = x_f32 ? ((const float *)x)[k] : bf16_to_f32(((const uint16_t *)x)[k]);
        float av = fabsf(v);
        if (!(av <= 3.4028235e38f)) finite = 0; /* NaN compares false, inf exceeds max */
        amax = av > amax ? av : amax;
    }
#endif
    memset(h + n, 0, (size_t)(ld - n));
    memset(l + n, 0, (size_t)(ld - n));
    if (!finite) {
        memset(h, 0, (size_t)n);
        memset(l, 0, (size_t)n);
        return NAN;
    }
    int e = 0;
    if (amax > 0.0f) frexpf(amax, &e); /* amax < 2^e */
    const float inv = ldexpf(1.0f, 15 - e);
    k = 0;
#ifdef SS_I8_SIMD
    for (; k < n; k += 16) { /* same arithmetic as the scalar loop: round to nearest even */
        const __mmask16 mk = n - k >= 16 ? 0xffff : (__mmask16)((1u << (n - k)) - 1u);
        const __m512 v = _mm512_mul_ps(load16(x, x_f32, k, mk), _mm512_set1_ps(inv));
        __m512i xi = _mm512_cvtps_epi32(v);
        xi = _mm512_max_epi32(_mm512_min_epi32(xi, _mm512_set1_epi32(32767)),
                              _mm512_set1_epi32(-32768));
        const __m512i hi = _mm512_add_epi32(_mm512_srai_epi32(xi, 8), _mm512_set1_epi32(128));
        _mm_mask_storeu_epi8(h + k, mk, _mm512_cvtepi32_epi8(hi));
        _mm_mask_storeu_epi8(l + k, mk, _mm512_cvtepi32_epi8(xi)); /* low byte = xi & 255 */
    }
#else
    for (; k < n; k++) {
        float v = x_f32 ? ((const float *)x)[k] : bf16_to_f32(((const uint16_t *)x)[k]);
        long xi = lrintf(v * inv); /* exact power-of-two scaling, then round to nearest */
        if (xi > 32767) xi = 32767;
        if (xi < -32768) xi = -32768;
        h[k] = (uint8_t)((xi >> 8) + 128);
        l[k] = (uint8_t)(xi & 255);
    }
#endif
    return ldexpf(1.0f, e - 15);
}

/* x [M, K] bf16 or fp32 (x_f32), w packed int8 as above, scale fp32 [N], wsum int32 [N]
 * (row sums of the int8 weight), bias fp32 [N] or NULL, y [M, N] in x's dtype. Returns 0, or
 * -1 when the scratch buffer cannot be allocated. */
int ss_linear_int8(const void *x, int x_f32, const int8_t *w, const float *scale,
                   const int32_t *wsum, const float *bias, void *y, int64_t M, int64_t N, int64_t K,
                   int nthreads) {
    const int64_t ld = (K + 3) / 4 * 4;
    const size_t need = (size_t)M * (size_t)ld * 2 + (size_t)M * sizeof(float);
    uint8_t stack_buf[16384] __attribute__((aligned(64)));
    uint8_t *buf = need <= sizeof stack_buf ? stack_buf : (uint8_t *)malloc(need);
    if (!buf) return -1;
    uint8_t *xh = buf, *xl = buf + M * ld;
    float *xs = (float *)(buf + 2 * M * ld);
    const size_t esz = x_f32 ? 4 : 2;
    for (int64_t m = 0; m < M; m++)
        xs[m] = split_row((const char *)x + (size_t)(m * K) * esz, x_f32, K, ld, xh + m * ld,
                          xl + m * ld);
    i8_args a = {xh, xl, xs, w, scale, bias, wsum, y, x_f32, M, N, K};
    run_blocks(nthreads, (N + BLK - 1) / BLK, M * N * K, i8_range, &a);
    if (buf != stack_buf) free(buf);
    return 0;
}
