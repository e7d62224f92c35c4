/* Fused decode-step glue for bf16 on CPU: what costs ~50 small PyTorch ops per layer (each a
 * few microseconds of dispatch at decode shapes) done in 4 calls. Every function has a plain
 * PyTorch twin in splitserve/model/llama.py and attention/backends.py; tests compare them.
 *
 *   ss_add_rmsnorm       h += delta (bf16, rounded like torch), out = w * bf16(rmsnorm(h))
 *   ss_rope_write_kv     rotate-half RoPE on q and k inside the fused qkv rows, in place, and
 *                        copy k and v into their cache slots
 *   ss_silu_mul          out = bf16(silu(gate)) * up  for gate_up rows [gate | up]
 *   ss_decode_attention  one query token per sequence over its paged K/V (no gather copy),
 *                        GQA, fp32 softmax; parallel over (sequence, kv head)
 *
 * Built with gemv.c's flags (-O3 -march=native -fopenmp); loops are written to auto-vectorise.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define SS_OPS_SIMD 1
#endif

static inline float bf(uint16_t v) {
    union { uint32_t u; float f; } c = {.u = (uint32_t)v << 16};
    return c.f;
}

/* sum_i a[i] b[i] in 16 independent lanes: a plain `s += a*b` is a serial chain gcc may not
 * reorder (no -ffast-math), ~4 cycles per element; lanes let it vectorise. */
static inline float dot(const float *a, const float *b, int64_t n) {
    float lane[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) lane[j] += a[i + j] * b[i + j];
    float s = 0.f;
    for (; i < n; i++) s += a[i] * b[i];
    for (int j = 0; j < 16; j++) s += lane[j];
    return s;
}

static inline uint16_t tobf(float f) { /* round to nearest even, NaN stays NaN */
    union { float f; uint32_t u; } c = {.f = f};
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((c.u >> 16) | 0x40);
    c.u += 0x7fffu + ((c.u >> 16) & 1u);
    return (uint16_t)(c.u >> 16);
}

void ss_add_rmsnorm(uint16_t *h, const uint16_t *delta, const uint16_t *w, uint16_t *out,
                    int64_t T, int64_t H, float eps) {
    float buf[H];
    for (int64_t t = 0; t < T; t++) {
        uint16_t *ht = h + t * H;
        float ss = 0.f;
        if (delta) {
            const uint16_t *dt = delta + t * H;
            for (int64_t i = 0; i < H; i++) {
                uint16_t s = tobf(bf(ht[i]) + bf(dt[i]));
                ht[i] = s;
                buf[i] = bf(s);
            }
        } else {
            for (int64_t i = 0; i < H; i++) buf[i] = bf(ht[i]);
        }
        ss = dot(buf, buf, H);
        float r = 1.0f / sqrtf(ss / (float)H + eps);
        uint16_t *ot = out + t * H;
        for (int64_t i = 0; i < H; i++) ot[i] = tobf(bf(w[i]) * bf(tobf(buf[i] * r)));
    }
}

/* qkv: [T, (hq + 2 hkv) * D] bf16; cos/sin: [max_pos, D] fp32; caches: [slots, hkv, D] bf16 */
void ss_rope_write_kv(uint16_t *qkv, const int64_t *pos, const float *cos_t, const float *sin_t,
                      uint16_t *k_cache, uint16_t *v_cache, const int64_t *slots, int64_t T,
                      int64_t hq, int64_t hkv, int64_t D) {
    const int64_t row = (hq + 2 * hkv) * D, half = D / 2;
    for (int64_t t = 0; t < T; t++) {
        uint16_t *r = qkv + t * row;
        /* torch rounds cos/sin to bf16 first (tables(...).to(dtype)), then x*cos + rot*sin */
        float c[D], s[D];
        for (int64_t i = 0; i < D; i++) {
            c[i] = bf(tobf(cos_t[pos[t] * D + i]));
            s[i] = bf(tobf(sin_t[pos[t] * D + i]));
        }
        for (int64_t hd = 0; hd < hq + hkv; hd++) {
            uint16_t *x = r + hd * D;
            float x1[D / 2 + 1], x2[D / 2 + 1];
            for (int64_t i = 0; i < half; i++) { x1[i] = bf(x[i]); x2[i] = bf(x[i + half]); }
            for (int64_t i = 0; i < half; i++) {
                /* bf16 rounding after each product and the sum, as torch does elementwise */
                float a = bf(tobf(x1[i] * c[i])), b = bf(tobf(-x2[i] * s[i]));
                float a2 = bf(tobf(x2[i] * c[i + half])), b2 = bf(tobf(x1[i] * s[i + half]));
                x[i] = tobf(a + b);
                x[i + half] = tobf(a2 + b2);
            }
        }
        int64_t slot = slots[t];
        memcpy(k_cache + slot * hkv * D, r + hq * D, (size_t)(hkv * D) * 2);
        memcpy(v_cache + slot * hkv * D, r + (hq + hkv) * D, (size_t)(hkv * D) * 2);
    }
}


#ifdef SS_OPS_SIMD
static inline __m512 ld16(const uint16_t *p) { /* 16 bf16 -> 16 fp32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* e^x for 16 floats: 2^(x log2 e) = 2^n * 2^f, n = round, |f| <= 1/2, 2^f by its degree-6
 * Taylor polynomial (relative error < 2e-7), 2^n by scalef (saturates to 0 / inf, NaN stays). */
static inline __m512 exp16(__m512 x) {
    __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.6931471805599453f));
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* 16 vectors -> one vector of their 16 horizontal sums (lane t = sum of v[t]): a transpose-add
 * tree, ~30 shuffles and adds instead of 16 full horizontal reductions. */
static inline __m512 hsum16(const __m512 *v) {
    __m512 w[8], x[4];
    for (int k = 0; k < 8; k++) /* per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] */
        w[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]),
                             _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
    for (int k = 0; k < 4; k++) { /* per 128-bit lane: [a, b, c, d] lane sums */
        __m512d a = _mm512_castps_pd(w[2 * k]), b = _mm512_castps_pd(w[2 * k + 1]);
        x[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    __m512 z0 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], 0x88), _mm512_shuffle_f32x4(x[0], x[1], 0xDD));
    __m512 z1 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], 0x88), _mm512_shuffle_f32x4(x[2], x[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(z0, z1, 0x88), _mm512_shuffle_f32x4(z0, z1, 0xDD));
}

/* One (sequence, kv head): rep query heads x L keys, D = 16 * NV (NV <= 8), rep <= 8.
 * q (scaled, fp32) and the output accumulators stay in registers across the token loop. */
static void attn_group_simd(const float *qf, const uint16_t *k_cache, const uint16_t *v_cache,
                            const int64_t *bt, int64_t L, int64_t bs, int64_t hkv, int64_t g,
                            int64_t D, int64_t rep, float *scores, int64_t sstride, float *outf) {
    const int NV = (int)(D / 16);
    float mx[8], sum[8];
    for (int r = 0; r < rep; r++) mx[r] = -INFINITY;
    int64_t t = 0;
    float kf[16 * 128];
    for (; t + 16 <= L; t += 16) { /* 16 keys at a time: scores land as one vector per head */
        for (int u = 0; u < 16; u++) {
            const uint16_t *k = k_cache + ((bt[(t + u) / bs] * bs + (t + u) % bs) * hkv + g) * D;
            /* K/V rows of one head are 2*hkv*D bytes apart and usually in DRAM (the weights
             * stream evicts them): ask for the next 16 keys' lines now */
            if (t + 16 + u < L) {
                const char *nk = (const char *)(k_cache + ((bt[(t + 16 + u) / bs] * bs + (t + 16 + u) % bs) * hkv + g) * D);
                for (int64_t c = 0; c < 2 * D; c += 64) _mm_prefetch(nk + c, _MM_HINT_T0);
            }
            for (int j = 0; j < NV; j++) _mm512_storeu_ps(kf + u * D + 16 * j, ld16(k + 16 * j));
        }
        for (int r = 0; r < rep; r++) {
            __m512 a[16];
            for (int u = 0; u < 16; u++) {
                a[u] = _mm512_mul_ps(_mm512_loadu_ps(kf + u * D), _mm512_loadu_ps(qf + r * D));
                for (int j = 1; j < NV; j++)
                    a[u] = _mm512_fmadd_ps(_mm512_loadu_ps(kf + u * D + 16 * j),
                                           _mm512_loadu_ps(qf + r * D + 16 * j), a[u]);
            }
            __m512 sv = hsum16(a);
            _mm512_storeu_ps(scores + r * sstride + t, sv);
            float m = _mm512_reduce_max_ps(sv);
            mx[r] = m > mx[r] ? m : mx[r];
        }
    }
    for (; t < L; t++) {
        const uint16_t *k = k_cache + ((bt[t / bs] * bs + t % bs) * hkv + g) * D;
        __m512 kv[8];
        for (int j = 0; j < NV; j++) kv[j] = ld16(k + 16 * j);
        for (int r = 0; r < rep; r++) {
            __m512 a = _mm512_mul_ps(kv[0], _mm512_loadu_ps(qf + r * D));
            for (int j = 1; j < NV; j++) a = _mm512_fmadd_ps(kv[j], _mm512_loadu_ps(qf + r * D + 16 * j), a);
            float s = _mm512_reduce_add_ps(a);
            scores[r * sstride + t] = s;
            mx[r] = s > mx[r] ? s : mx[r];
        }
    }
    for (int r = 0; r < rep; r++) {
        float *sc = scores + r * sstride;
        __m512 m = _mm512_set1_ps(mx[r]), zv = _mm512_setzero_ps();
        int64_t u = 0;
        for (; u + 16 <= L; u += 16) {
            __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sc + u), m));
            _mm512_storeu_ps(sc + u, e);
            zv = _mm512_add_ps(zv, e);
        }
        float z = _mm512_reduce_add_ps(zv);
        for (; u < L; u++) {
            float e = expf(sc[u] - mx[r]);
            sc[u] = e;
            z += e;
        }
        sum[r] = z;
    }
    __m512 acc[8][8];
    for (int r = 0; r < rep; r++)
        for (int j = 0; j < NV; j++) acc[r][j] = _mm512_setzero_ps();
    for (int64_t t = 0; t < L; t++) {
        const uint16_t *v = v_cache + ((bt[t / bs] * bs + t % bs) * hkv + g) * D;
        if (t + 8 < L) {
            const char *nv = (const char *)(v_cache + ((bt[(t + 8) / bs] * bs + (t + 8) % bs) * hkv + g) * D);
            for (int64_t c = 0; c < 2 * D; c += 64) _mm_prefetch(nv + c, _MM_HINT_T0);
        }
        __m512 vv[8];
        for (int j = 0; j < NV; j++) vv[j] = ld16(v + 16 * j);
        for (int r = 0; r < rep; r++) {
            __m512 p = _mm512_set1_ps(scores[r * sstride + t]);
            for (int j = 0; j < NV; j++) acc[r][j] = _mm512_fmadd_ps(p, vv[j], acc[r][j]);
        }
    }
    for (int r = 0; r < rep; r++) {
        __m512 inv = _mm512_set1_ps(1.0f / sum[r]);
        for (int j = 0; j < NV; j++) _mm512_storeu_ps(outf + r * D + 16 * j, _mm512_mul_ps(acc[r][j], inv));
    }
}
#endif

/* q: [B, hq, D] bf16 (row stride q_stride elements); caches: [num_blocks, bs, hkv, D] bf16;
 * block_tables: [B, max_blocks] int64; lens: [B] int64 (context incl. the new token);
 * out: [B, hq, D] bf16. */
void ss_decode_attention(const uint16_t *q, int64_t q_stride, const uint16_t *k_cache,
                         const uint16_t *v_cache, const int64_t *block_tables, int64_t max_blocks,
                         const int64_t *lens, uint16_t *out, int64_t B, int64_t hq, int64_t hkv,
                         int64_t D, int64_t bs, float scale, int nthreads) {
    const int64_t rep = hq / hkv;
    int64_t max_len = 0;
    for (int64_t b = 0; b < B; b++) max_len = lens[b] > max_len ? lens[b] : max_len;
    if (nthreads < 1) nthreads = 1;
    if (B * hkv < nthreads) nthreads = (int)(B * hkv);
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        float *scores = malloc(sizeof(float) * (size_t)(rep * max_len + 1));
        float *acc = malloc(sizeof(float) * (size_t)(rep * D));
        float *qf = malloc(sizeof(float) * (size_t)(rep * D));
#pragma omp for schedule(dynamic, 1)
        for (int64_t bg = 0; bg < B * hkv; bg++) {
            const int64_t b = bg / hkv, g = bg % hkv, L = lens[b];
            const int64_t *bt = block_tables + b * max_blocks;
            for (int64_t r = 0; r < rep; r++)
                for (int64_t i = 0; i < D; i++)
                    qf[r * D + i] = bf(q[b * q_stride + (g * rep + r) * D + i]) * scale;
#ifdef SS_OPS_SIMD
            if (D % 16 == 0 && D <= 128 && rep <= 8) {
                attn_group_simd(qf, k_cache, v_cache, bt, L, bs, hkv, g, D, rep, scores, max_len, acc);
                for (int64_t r = 0; r < rep; r++) {
                    uint16_t *o = out + (b * hq + g * rep + r) * D;
                    for (int64_t i = 0; i < D; i++) o[i] = tobf(acc[r * D + i]);
                }
                continue;
            }
#endif
            float mx[rep];
            for (int64_t r = 0; r < rep; r++) mx[r] = -INFINITY;
            for (int64_t t = 0; t < L; t++) {
                const uint16_t *k = k_cache + ((bt[t / bs] * bs + t % bs) * hkv + g) * D;
                float kf[D];
                for (int64_t i = 0; i < D; i++) kf[i] = bf(k[i]);
                for (int64_t r = 0; r < rep; r++) {
                    float s = dot(qf + r * D, kf, D);
                    scores[r * max_len + t] = s;
                    mx[r] = s > mx[r] ? s : mx[r];
                }
            }
            float sum[rep];
            for (int64_t r = 0; r < rep; r++) {
                sum[r] = 0.f;
                for (int64_t t = 0; t < L; t++) {
                    float e = expf(scores[r * max_len + t] - mx[r]);
                    scores[r * max_len + t] = e;
                    sum[r] += e;
                }
            }
            memset(acc, 0, sizeof(float) * (size_t)(rep * D));
            for (int64_t t = 0; t < L; t++) {
                const uint16_t *v = v_cache + ((bt[t / bs] * bs + t % bs) * hkv + g) * D;
                float vf[D];
                for (int64_t i = 0; i < D; i++) vf[i] = bf(v[i]);
                for (int64_t r = 0; r < rep; r++) {
                    float p = scores[r * max_len + t];
                    for (int64_t i = 0; i < D; i++) acc[r * D + i] += p * vf[i];
                }
            }
            for (int64_t r = 0; r < rep; r++) {
                float inv = 1.0f / sum[r];
                uint16_t *o = out + (b * hq + g * rep + r) * D;
                for (int64_t i = 0; i < D; i++) o[i] = tobf(acc[r * D + i] * inv);
            }
        }
        free(scores);
        free(acc);
        free(qf);
    }
}

void ss_silu_mul(const uint16_t *gu, uint16_t *out, int64_t T, int64_t I) {
    for (int64_t t = 0; t < T; t++) {
        const uint16_t *g = gu + t * 2 * I, *u = g + I;
        uint16_t *o = out + t * I;
        int64_t i = 0;
#if defined(SS_OPS_SIMD) && defined(__AVX512BF16__)
        for (; i + 16 <= I; i += 16) { /* same roundings as the scalar loop below */
            __m512 x = ld16(g + i), one = _mm512_set1_ps(1.0f);
            __m512 sx = _mm512_div_ps(x, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), x))));
            __m512 prod = _mm512_mul_ps(_mm512_cvtpbh_ps(_mm512_cvtneps_pbh(sx)), ld16(u + i));
            _mm256_storeu_si256((__m256i *)(o + i), (__m256i)_mm512_cvtneps_pbh(prod));
        }
#endif
        for (; i < I; i++) {
            float x = bf(g[i]);
            float sx = bf(tobf(x / (1.0f + expf(-x))));
            o[i] = tobf(sx * bf(u[i]));
        }
    }
}
