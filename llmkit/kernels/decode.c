/* llmkit's native step: every layer of a Llama-shaped Transformer for new tokens (a decode token per row and
   its drafts, or a prefill chunk), in C.

   Built with quant.c (included below) by llmkit/kernels/__init__.py; driven by llmkit/generate/native.py,
   which fills the structs below with pointers to the model's own tensors (no copy) and checks that the model
   is one this step computes exactly as llmkit/model/transformer.py does (the readable reference):

     x = embedding (the caller)                                                  (B, d) float32, in place
     per layer:  h = rmsnorm(x) * w1
                 q | k | v = h @ Wqkv^T (+ b)                    one fused int4 matmul, or up to three
                 q, k = rope(q, k) at each row's position          (HF's rotate_half: pairs i, i + D/2)
                 cache[row, :, pos] = k, v
                 a = softmax(q . k_j * scale) v_j over j <= pos   (and pos - j < window on sliding layers)
                 x += a @ Wo^T (+ b)
                 h = rmsnorm(x) * w2
                 x += (silu(h @ Wg^T) * (h @ Wu^T)) @ Wd^T
     x = rmsnorm(x) * w_final
     logits = x @ Whead^T                                        (when the plan holds the head and logits
                                                                  are asked for; else PyTorch's, after)

   Why: in PyTorch eager mode a decode token of a small model is ~1,500 small operator calls, each a few
   microseconds of Python and dispatch; torch.compile cuts them to a few hundred kernels but its wrapper still
   costs milliseconds a token on a 2-core CPU. Here the only work besides the matmuls is a few microseconds of
   loops per layer. The matmuls are quant.c's (int4 / int8, activations quantized per block of 32) or a plain
   float32 one below, each split over output rows with OpenMP.

   Each row of the batch is computed alone (its own position and cache row, every sum in the same order), so a
   row's result does not depend on the batch. Keys and values are float32 or bfloat16, laid out as KVCache's
   (rows, n_kv_heads, slots, head_dim).

   With lk_model.prof set, each one-token step adds its seconds in the matmuls, in attention and in the rest
   (norms, RoPE, cache writes, SiLU, residuals) to prof[0..2], 1 to prof[3], and its seconds in the head to
   prof[4] (`llmkit bench decode`'s split of a token's time, measured inside the step). */
#define _POSIX_C_SOURCE 200112L /* clock_gettime, posix_memalign */
#include <time.h>
#include "quant.c"
#ifdef _OPENMP
#include <omp.h>
#endif

typedef struct {
    int64_t kind;   /* 0: float32 (N, K) row-major; 1: int4 (quant.c's layout); 2: int8 */
    int64_t n, k;   /* output and input features */
    int64_t gshift; /* int4: groups of 32 << gshift inputs */
    int64_t rb;     /* int4: how the (s, z) pairs are laid out (quant.c's llmkit_q4_mm) */
    const void *w;  /* weight, or qweight */
    const void *s;  /* int4: (K/gs, N, 2) bfloat16 scale and zero; int8: (N,) float32 scales */
    const float *bias; /* (N,) or NULL */
} lk_linear;

typedef struct {
    const float *norm1, *norm2; /* (d,) input_layernorm, post_attention_layernorm */
    lk_linear qkv[3];           /* their outputs side by side: q | k | v */
    int64_t n_qkv;              /* 1 (a fused group) or 3 */
    lk_linear o;
    lk_linear gu[2];            /* gate | up */
    int64_t n_gu;               /* 1 (fused) or 2 */
    lk_linear down;
    void *kc, *vc;              /* (rows, n_kv_heads, slots, head_dim): float32, or bfloat16 (kv_bf16) */
    int64_t window;             /* 0: full attention; else key j visible iff pos - j < window */
} lk_layer;

typedef struct {
    int64_t n_layers, d, n_heads, n_kv_heads, head_dim, d_ff, slots, fine;
    double eps, scale;
    const float *cos, *sin; /* (max positions, head_dim / 2) */
    const float *norm;      /* (d,) the final norm */
    const lk_layer *layers;
    int64_t kv_bf16;        /* the KV cache holds bfloat16 */
    double *prof;           /* NULL, or (5,): seconds in matmuls, attention, the rest; one-token steps;
                               seconds in the head */
    int64_t emb_kind;       /* the embedding table (llmkit_embed): 0 none (the caller looks up), 1 float32
                               (V, d), 2 int8 (V, d) + float16 scales (V, d/gs), 3 int4 (V, d/2) nibbles (even
                               index low) + bfloat16 (scale, zero) pairs (V, d/gs, 2) */
    int64_t emb_rows, emb_gs;
    const void *emb_w, *emb_s;
    lk_linear head;         /* the vocabulary head (int4 or int8), when head_on */
    int64_t head_on;
} lk_model;

static inline double lk_now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* prof[phase] += the time since *t; *t = now (only when profiling a one-token step) */
static inline void lap(double *prof, int phase, double *t) {
    if (!prof) return;
    const double now = lk_now();
    prof[phase] += now - *t;
    *t = now;
}

#ifdef __AVX512F__
/* rows m0 .. m0 + mt (mt <= 4) of x against row w of W: each dot product in 4 x 16 lanes (4 independent
   chains: K in steps of 64), then 16-lane steps into the first, then the scalar rest; the order does not
   depend on mt, so a row's result does not depend on the batch */
static inline __attribute__((always_inline)) void f32_rows(const float *x, int64_t K, const float *w, const int mt,
                                                           float *out, int64_t ldo) {
    __m512 acc[4][4];
    for (int r = 0; r < mt; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 64 <= K; j += 64)
        for (int c = 0; c < 4; c++) {
            const __m512 wv = _mm512_loadu_ps(w + j + 16 * c);
            for (int r = 0; r < mt; r++) acc[r][c] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * K + j + 16 * c), wv, acc[r][c]);
        }
    for (; j + 16 <= K; j += 16) {
        const __m512 wv = _mm512_loadu_ps(w + j);
        for (int r = 0; r < mt; r++) acc[r][0] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * K + j), wv, acc[r][0]);
    }
    for (int r = 0; r < mt; r++) {
        float t = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]),
                                                     _mm512_add_ps(acc[r][2], acc[r][3])));
        for (int64_t i = j; i < K; i++) t += x[r * K + i] * w[i];
        out[r * ldo] = t;
    }
}
#elif defined(LLMKIT_AVX2)
/* f32_rows in 8 lanes: 4 x 8-lane chains (K in steps of 32), then 8-lane steps into the first, the scalar
   rest; mt <= 2 (8 accumulators of the 16 registers) */
static inline __attribute__((always_inline)) void f32_rows(const float *x, int64_t K, const float *w, const int mt,
                                                           float *out, int64_t ldo) {
    __m256 acc[2][4];
    for (int r = 0; r < mt; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 32 <= K; j += 32)
        for (int c = 0; c < 4; c++) {
            const __m256 wv = _mm256_loadu_ps(w + j + 8 * c);
            for (int r = 0; r < mt; r++) acc[r][c] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * K + j + 8 * c), wv, acc[r][c]);
        }
    for (; j + 8 <= K; j += 8) {
        const __m256 wv = _mm256_loadu_ps(w + j);
        for (int r = 0; r < mt; r++) acc[r][0] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * K + j), wv, acc[r][0]);
    }
    for (int r = 0; r < mt; r++) {
        float t = hsum8(_mm256_add_ps(_mm256_add_ps(acc[r][0], acc[r][1]), _mm256_add_ps(acc[r][2], acc[r][3])));
        for (int64_t i = j; i < K; i++) t += x[r * K + i] * w[i];
        out[r * ldo] = t;
    }
}
#endif

/* y (M, N) = x (M, K) @ W^T for a float32 W, split over output rows. AVX-512: each row of W against 4 rows
   of x at a time (f32_rows); AVX2: 2 rows at a time; else each output a dot product in 8 lanes (vectorised
   by the compiler). */
static void f32_mm(const float *x, int64_t M, int64_t K, const float *w, int64_t N, float *y) {
#ifdef __AVX512F__
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) f32_rows(x + m * K, K, w + n * K, 4, y + m * N + n, N);
        for (; m < M; m++) f32_rows(x + m * K, K, w + n * K, 1, y + m * N + n, N);
    }
#elif defined(LLMKIT_AVX2)
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        int64_t m = 0;
        for (; m + 2 <= M; m += 2) f32_rows(x + m * K, K, w + n * K, 2, y + m * N + n, N);
        for (; m < M; m++) f32_rows(x + m * K, K, w + n * K, 1, y + m * N + n, N);
    }
#else
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const float *wr = w + n * K;
        for (int64_t m = 0; m < M; m++) {
            const float *xr = x + m * K;
            float acc[8] = {0};
            int64_t j = 0;
            for (; j + 8 <= K; j += 8)
                for (int l = 0; l < 8; l++) acc[l] += xr[j + l] * wr[j + l];
            float t = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
            for (; j < K; j++) t += xr[j] * wr[j];
            y[m * N + n] = t;
        }
    }
#endif
}

/* y (M, N) with rows ldy apart = x (M, K) @ W^T (+ bias). Returns 0, or -1 when memory ran out. */
static int linear(const lk_linear *L, const float *x, int64_t M, float *y, int64_t ldy, int64_t fine) {
    float *out = (M == 1 || ldy == L->n) ? y : malloc((size_t)(M * L->n) * sizeof(float));
    if (!out) return -1;
    int rc = 0;
    if (L->kind == 1)
        rc = llmkit_q4_mm(x, M, L->k, L->w, L->s, L->n, L->gshift, fine, out, L->rb);
    else if (L->kind == 2)
        rc = llmkit_q8_mm(x, M, L->k, L->w, L->s, L->n, fine, out);
    else
        f32_mm(x, M, L->k, L->w, L->n, out);
    if (out != y) {
        for (int64_t m = 0; m < M; m++) memcpy(y + m * ldy, out + m * L->n, (size_t)L->n * sizeof(float));
        free(out);
    }
    if (L->bias)
        for (int64_t m = 0; m < M; m++)
            for (int64_t n = 0; n < L->n; n++) y[m * ldy + n] += L->bias[n];
    return rc;
}

/* out (d,) = x * rsqrt(mean(x^2) + eps) * w, in float32 as F.rms_norm */
static void rmsnorm(const float *x, const float *w, int64_t d, float eps, float *out) {
    float ss = 0.0f;
    for (int64_t i = 0; i < d; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)d + eps);
    for (int64_t i = 0; i < d; i++) out[i] = x[i] * r * w[i];
}

/* rotate one head's vector v (D,) by position p: (v1 cos - v2 sin, v2 cos + v1 sin), halves of D */
static void rope(float *v, const float *c, const float *s, int64_t half) {
    for (int64_t i = 0; i < half; i++) {
        const float a = v[i], b = v[i + half];
        v[i] = a * c[i] - b * s[i];
        v[i + half] = b * c[i] + a * s[i];
    }
}

#ifdef __AVX512F__
/* e^x in 16 lanes: x = n ln 2 + r, e^r by Cephes's expf polynomial (|error| ~ 1 ulp), times 2^n (scalef) */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-103.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(y, r), r, r), _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(y, n);
}
#define AVX512_HEAD 128 /* the widest head the vector path keeps in registers */
#elif defined(LLMKIT_AVX2)
/* e^x in 8 lanes, exp16's polynomial; 2^n built in the exponent bits, so x is clamped at -87 (e^-87 ~ 2e-38,
   where exp16 goes on to 0: a softmax or a SiLU cannot tell) */
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(y, r), r, r), _mm256_set1_ps(1.0f));
    /* 2^n for n in -126..128: n + 127 in the exponent; 2^128 (x near 88.37) as 2 * 2^127 */
    const __m256i e = _mm256_cvtps_epi32(n);
    const __m256i lo = _mm256_min_epi32(e, _mm256_set1_epi32(127));
    y = _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(lo, _mm256_set1_epi32(127)), 23)));
    const __m256i extra = _mm256_sub_epi32(e, lo);  /* 0 or 1 */
    return _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(extra, _mm256_set1_epi32(127)), 23)));
}

#define AVX2_HEAD 128 /* the widest head the vector path keeps in registers */
#endif

/* element i of a KV cache of float32 or (bf16) bfloat16 values, as float32 (1, 8 or 16 of them) */
static inline float kvf(const void *c, int64_t i, const int bf16) {
    if (!bf16) return ((const float *)c)[i];
    const uint32_t u = (uint32_t)((const uint16_t *)c)[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
#ifdef __AVX512F__
static inline __m512 kv16(const void *c, int64_t i, const int bf16) {
    if (!bf16) return _mm512_loadu_ps((const float *)c + i);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)c + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#elif defined(LLMKIT_AVX2)
static inline __m256 kv8(const void *c, int64_t i, const int bf16) {
    if (!bf16) return _mm256_loadu_ps((const float *)c + i);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)c + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#endif

/* float32 -> bfloat16 bits, rounding to nearest even (PyTorch's .to(torch.bfloat16)) */
static inline uint16_t f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  /* NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* one query head (D,) against keys/values (slots, D) at j in [lo, p]: out (D,); sc: (p + 1) scratch.
   Two passes, as the course writes softmax: the scores and their max, then e^(s - max) and the weighted
   sum of the values. AVX-512 (heads of 16k <= 128 dims): the query and the output stay in registers.
   bf16: the cache holds bfloat16 keys and values (kv16 / kv8 / kvf widen them). */
static inline __attribute__((always_inline)) void attend(const float *q, const void *kc, const void *vc, int64_t lo,
                                                         int64_t p, int64_t D, float scale, float *sc, float *out,
                                                         const int bf16) {
#ifdef __AVX512F__
    if (D % 16 == 0 && D <= AVX512_HEAD) {
        const int64_t V = D / 16;
        __m512 qv[AVX512_HEAD / 16], o[AVX512_HEAD / 16];
        for (int64_t c = 0; c < V; c++) {
            qv[c] = _mm512_mul_ps(_mm512_loadu_ps(q + 16 * c), _mm512_set1_ps(scale));
            o[c] = _mm512_setzero_ps();
        }
        float mx = -INFINITY;
        for (int64_t j = lo; j <= p; j++) {
            __m512 acc = _mm512_mul_ps(qv[0], kv16(kc, j * D, bf16));
            for (int64_t c = 1; c < V; c++) acc = _mm512_fmadd_ps(qv[c], kv16(kc, j * D + 16 * c, bf16), acc);
            sc[j] = _mm512_reduce_add_ps(acc);
            mx = sc[j] > mx ? sc[j] : mx;
        }
        const __m512 m = _mm512_set1_ps(mx);
        __m512 tot = _mm512_setzero_ps();
        int64_t j = lo;
        for (; j + 16 <= p + 1; j += 16) {
            const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sc + j), m));
            _mm512_storeu_ps(sc + j, e);
            tot = _mm512_add_ps(tot, e);
        }
        if (j <= p) {
            const __mmask16 k = (__mmask16)((1u << (p + 1 - j)) - 1);
            const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sc + j), m));
            _mm512_mask_storeu_ps(sc + j, k, e);
            tot = _mm512_add_ps(tot, _mm512_maskz_mov_ps(k, e));
        }
        for (j = lo; j <= p; j++) {
            const __m512 a = _mm512_set1_ps(sc[j]);
            for (int64_t c = 0; c < V; c++) o[c] = _mm512_fmadd_ps(a, kv16(vc, j * D + 16 * c, bf16), o[c]);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(tot));
        for (int64_t c = 0; c < V; c++) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(o[c], inv));
        return;
    }
#elif defined(LLMKIT_AVX2)
    if (D % 8 == 0 && D <= AVX2_HEAD) {  /* as above in 8 lanes: the query in registers, then the output */
        const int64_t V = D / 8;
        __m256 qv[AVX2_HEAD / 8];
        for (int64_t c = 0; c < V; c++) qv[c] = _mm256_mul_ps(_mm256_loadu_ps(q + 8 * c), _mm256_set1_ps(scale));
        __m128 mx4 = _mm_set1_ps(-INFINITY);
        for (int64_t j = lo; j <= p; j += 4) {  /* 4 keys at a time, summed by one hadd tree (the last 1-3
                                                   keys too, beside zeros: a key's score is the same in either) */
            const int64_t n = p + 1 - j < 4 ? p + 1 - j : 4;
            __m256 a[4];
            for (int r = 0; r < 4; r++) a[r] = _mm256_setzero_ps();
            for (int r = 0; r < n; r++) {
                a[r] = _mm256_mul_ps(qv[0], kv8(kc, (j + r) * D, bf16));
                for (int64_t c = 1; c < V; c++) a[r] = _mm256_fmadd_ps(qv[c], kv8(kc, (j + r) * D + 8 * c, bf16), a[r]);
            }
            const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
            const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
            if (n == 4) {
                _mm_storeu_ps(sc + j, s4);
                mx4 = _mm_max_ps(mx4, s4);
            } else {
                float t4[4];
                _mm_storeu_ps(t4, s4);
                for (int r = 0; r < n; r++) {
                    sc[j + r] = t4[r];
                    mx4 = _mm_max_ps(mx4, _mm_set1_ps(t4[r]));
                }
            }
        }
        mx4 = _mm_max_ps(mx4, _mm_movehl_ps(mx4, mx4));
        const float mx = _mm_cvtss_f32(_mm_max_ss(mx4, _mm_movehdup_ps(mx4)));
        const __m256 m = _mm256_set1_ps(mx);
        __m256 tot = _mm256_setzero_ps();
        int64_t j = lo;
        for (; j + 8 <= p + 1; j += 8) {
            const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sc + j), m));
            _mm256_storeu_ps(sc + j, e);
            tot = _mm256_add_ps(tot, e);
        }
        float rest = 0.0f;
        if (j <= p) {
            float tail[8];
            for (int64_t i = 0; i < 8; i++) tail[i] = j + i <= p ? sc[j + i] : -INFINITY;
            _mm256_storeu_ps(tail, exp8(_mm256_sub_ps(_mm256_loadu_ps(tail), m)));
            for (int64_t i = 0; j + i <= p; i++) {
                sc[j + i] = tail[i];
                rest += tail[i];
            }
        }
        __m256 o[AVX2_HEAD / 8];
        for (int64_t c = 0; c < V; c++) o[c] = _mm256_setzero_ps();
        for (j = lo; j <= p; j++) {
            const __m256 a = _mm256_set1_ps(sc[j]);
            for (int64_t c = 0; c < V; c++) o[c] = _mm256_fmadd_ps(a, kv8(vc, j * D + 8 * c, bf16), o[c]);
        }
        const __m256 inv = _mm256_set1_ps(1.0f / (hsum8(tot) + rest));
        for (int64_t c = 0; c < V; c++) _mm256_storeu_ps(out + 8 * c, _mm256_mul_ps(o[c], inv));
        return;
    }
#endif
    float mx = -INFINITY;
    for (int64_t j = lo; j <= p; j++) {
        float acc[8] = {0};
        for (int64_t i = 0; i + 8 <= D; i += 8)
            for (int l = 0; l < 8; l++) acc[l] += q[i + l] * kvf(kc, j * D + i + l, bf16);
        float t = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        for (int64_t i = D & ~(int64_t)7; i < D; i++) t += q[i] * kvf(kc, j * D + i, bf16);
        sc[j] = t * scale;
        mx = sc[j] > mx ? sc[j] : mx;
    }
    float sum = 0.0f;
    for (int64_t j = lo; j <= p; j++) {
        sc[j] = expf(sc[j] - mx);
        sum += sc[j];
    }
    for (int64_t i = 0; i < D; i++) out[i] = 0.0f;
    for (int64_t j = lo; j <= p; j++) {
        const float a = sc[j] / sum;
        for (int64_t i = 0; i < D; i++) out[i] += a * kvf(vc, j * D + i, bf16);
    }
}

/* float16 bits -> float32 (exact; subnormals too) */
static inline float h2f(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    uint32_t u;
    if (e == 0) {
        const float f = (float)man * 0x1p-24f;  /* 0, or a subnormal: man * 2^-24 exactly */
        memcpy(&u, &f, 4);
        u |= sign;
    } else {
        u = sign | (e == 31 ? 0x7f800000u : (e + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* x (B, d) = the embeddings of ids (B,), the floats llmkit.quant's Int8Embedding / Int4Embedding (or a
   float32 nn.Embedding) give: q * s in float32; int4 (q - 8) * s, then + z (two roundings, as PyTorch's two
   ops: never one fused multiply-add). Returns 0, or -1 without a table or with an id out of range (the
   caller then looks up in PyTorch, which says what is wrong). */
int llmkit_embed(const lk_model *m, int64_t B, const int64_t *ids, float *x) {
    const int64_t d = m->d, gs = m->emb_gs;
    if (!m->emb_kind) return -1;
    for (int64_t b = 0; b < B; b++)
        if (ids[b] < 0 || ids[b] >= m->emb_rows) return -1;
    for (int64_t b = 0; b < B; b++) {
        const int64_t v = ids[b];
        float *out = x + b * d;
        if (m->emb_kind == 1) {
            memcpy(out, (const float *)m->emb_w + v * d, (size_t)d * sizeof(float));
        } else if (m->emb_kind == 2) {
            const int8_t *q = (const int8_t *)m->emb_w + v * d;
            const uint16_t *sc = (const uint16_t *)m->emb_s + v * (d / gs);
            for (int64_t i = 0; i < d; i++) out[i] = (float)q[i] * h2f(sc[i / gs]);
        } else {
            const uint8_t *q = (const uint8_t *)m->emb_w + v * (d / 2);
            const uint32_t *sz = (const uint32_t *)m->emb_s + v * (d / gs);  /* (s, z) pairs, as quant.c's */
            for (int64_t i = 0; i < d; i++) {
                const int nib = (i & 1) ? q[i / 2] >> 4 : q[i / 2] & 15;
                const float t = (float)(nib - 8) * bf16_lo(sz[i / gs]);  /* rounded here, as PyTorch's */
                out[i] = t + bf16_hi(sz[i / gs]);  /* multiply: a separate statement, never fused with the add */
            }
        }
    }
    return 0;
}

/* The decode step for B tokens: x (B, d) holds their embeddings and receives their final normed hidden
   states; rows (B,): each token's cache row; pos (B,): its position (< slots). Several tokens may share a
   cache row (a row's last token and its speculative drafts, at consecutive positions): every token's keys
   and values are written before any attends, and a token sees the slots up to its own position, so each
   is causal. logits: NULL, or (B, head.n) for the head's output (m->head_on). ids: NULL, or the B token ids,
   looked up first into x (llmkit_embed; one call from Python instead of two). Returns 0, -1 when memory ran
   out, -2 when the lookup could not be made (no table, an id out of range: nothing was written). */
int llmkit_decode(const lk_model *m, int64_t B, float *x, const int64_t *rows, const int64_t *pos,
                  float *logits, const int64_t *ids) {
    if (ids && llmkit_embed(m, B, ids, x)) return -2;
    const int64_t d = m->d, H = m->n_heads, Hkv = m->n_kv_heads, D = m->head_dim, F = m->d_ff;
    const int64_t QKV = (H + 2 * Hkv) * D, S = m->slots, half = D / 2, group = H / Hkv;
    const float eps = (float)m->eps, scale = (float)m->scale;
    int64_t maxp = 0;
    for (int64_t b = 0; b < B; b++) maxp = pos[b] > maxp ? pos[b] : maxp;
    const int64_t wide = (QKV > 2 * F ? QKV : 2 * F);
#ifdef _OPENMP
    const int64_t threads = omp_get_max_threads();
#else
    const int64_t threads = 1;
#endif
    float *buf = malloc((size_t)(B * d + B * wide + B * H * D + B * F + B * d + threads * (maxp + 1)) * sizeof(float));
    if (!buf) return -1;
    float *h = buf, *big = h + B * d, *att = big + B * wide, *act = att + B * H * D, *tmp = act + B * F;
    float *sc = tmp + B * d;
    int rc = 0;
    double *prof = B == 1 ? m->prof : NULL, t = prof ? lk_now() : 0.0;
    for (int64_t l = 0; l < m->n_layers && !rc; l++) {
        const lk_layer *L = m->layers + l;
        for (int64_t b = 0; b < B; b++) rmsnorm(x + b * d, L->norm1, d, eps, h + b * d);
        lap(prof, 2, &t);
        for (int64_t i = 0, at = 0; i < L->n_qkv; at += L->qkv[i].n, i++)
            rc |= linear(&L->qkv[i], h, B, big + at, QKV, m->fine);
        lap(prof, 0, &t);
        for (int64_t b = 0; b < B; b++) {  /* rope on q and k, then k and v into the cache */
            float *q = big + b * QKV, *k = q + H * D, *v = k + Hkv * D;
            const float *c = m->cos + pos[b] * half, *s = m->sin + pos[b] * half;
            for (int64_t i = 0; i < H + Hkv; i++) rope(q + i * D, c, s, half);
            for (int64_t g = 0; g < Hkv; g++) {
                const int64_t at = ((rows[b] * Hkv + g) * S + pos[b]) * D;
                if (m->kv_bf16) {
                    for (int64_t i = 0; i < D; i++) {
                        ((uint16_t *)L->kc)[at + i] = f2bf(k[g * D + i]);
                        ((uint16_t *)L->vc)[at + i] = f2bf(v[g * D + i]);
                    }
                } else {
                    memcpy((float *)L->kc + at, k + g * D, (size_t)D * sizeof(float));
                    memcpy((float *)L->vc + at, v + g * D, (size_t)D * sizeof(float));
                }
            }
        }
        lap(prof, 2, &t);
        /* several tokens: heads interleaved over the threads (a prefill's later tokens attend to more); one
           token: each thread a run of neighbouring heads, so fewer threads read each group's keys and values */
#pragma omp parallel for schedule(static, B > 1 ? 1 : (H + threads - 1) / threads)
        for (int64_t bh = 0; bh < B * H; bh++) {
            const int64_t b = bh / H, i = bh % H, g = i / group, p = pos[b];
            const int64_t lo = L->window && p - L->window + 1 > 0 ? p - L->window + 1 : 0;
            const int64_t base = (rows[b] * Hkv + g) * S * D;
#ifdef _OPENMP
            float *mine = sc + omp_get_thread_num() * (maxp + 1);
#else
            float *mine = sc;
#endif
            if (m->kv_bf16)
                attend(big + b * QKV + i * D, (const uint16_t *)L->kc + base, (const uint16_t *)L->vc + base, lo, p, D,
                       scale, mine, att + bh * D, 1);
            else
                attend(big + b * QKV + i * D, (const float *)L->kc + base, (const float *)L->vc + base, lo, p, D,
                       scale, mine, att + bh * D, 0);
        }
        lap(prof, 1, &t);
        rc |= linear(&L->o, att, B, tmp, d, m->fine);
        lap(prof, 0, &t);
        for (int64_t i = 0; i < B * d; i++) x[i] += tmp[i];
        for (int64_t b = 0; b < B; b++) rmsnorm(x + b * d, L->norm2, d, eps, h + b * d);
        lap(prof, 2, &t);
        for (int64_t i = 0, at = 0; i < L->n_gu; at += L->gu[i].n, i++)
            rc |= linear(&L->gu[i], h, B, big + at, 2 * F, m->fine);
        lap(prof, 0, &t);
#pragma omp parallel for schedule(static) if (B > 1)
        for (int64_t b = 0; b < B; b++) {  /* silu(gate) * up */
            const float *gate = big + b * 2 * F, *up = gate + F;
            float *a = act + b * F;
            int64_t i = 0;
#ifdef __AVX512F__
            for (; i + 16 <= F; i += 16) {
                const __m512 g = _mm512_loadu_ps(gate + i);
                const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
                _mm512_storeu_ps(a + i, _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)),
                                                      _mm512_loadu_ps(up + i)));
            }
#elif defined(LLMKIT_AVX2)
            for (; i + 8 <= F; i += 8) {
                const __m256 g = _mm256_loadu_ps(gate + i);
                const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
                _mm256_storeu_ps(a + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)),
                                                      _mm256_loadu_ps(up + i)));
            }
#endif
            for (; i < F; i++) a[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
        }
        lap(prof, 2, &t);
        rc |= linear(&L->down, act, B, tmp, d, m->fine);
        lap(prof, 0, &t);
        for (int64_t i = 0; i < B * d; i++) x[i] += tmp[i];
    }
    for (int64_t b = 0; b < B && !rc; b++) {
        rmsnorm(x + b * d, m->norm, d, eps, h);
        memcpy(x + b * d, h, (size_t)d * sizeof(float));
    }
    free(buf);
    lap(prof, 2, &t);
    if (logits && m->head_on && !rc) {
        rc = linear(&m->head, x, B, logits, m->head.n, m->fine);
        lap(prof, 4, &t);
    }
    if (prof) prof[3] += 1.0;
    return rc;
}
