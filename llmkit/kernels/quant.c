/* llmkit's CPU matmul kernels for quantized weights: y (M, N) = x (M, K) @ W^T, W in int4 or int8.

   Built on first use by llmkit/kernels/__init__.py (cc -O3 -march=native -fopenmp -shared) and called
   through ctypes; no PyTorch headers, so the build takes about a second.

   The course's idea, as llama.cpp does it (ggml's vec_dot_q4_1_q8_1 / vec_dot_q8_0_q8_0): the activations
   are quantized to int8 in blocks of 32 (one float scale per block, max|x| / 127), so a block's dot
   product is an integer dot product (AVX2: 32 multiply-adds in one `maddubs`), scaled once per block:

     int4, group of row n:  w_k = (q_k - 8) * s + z = q_k * s + m,  m = z - 8 s   (q in 0..15)
       sum_k w_k x_k  ~=  s * dx * sum_k q_k xq_k  +  m * sum_k x_k               (x_k ~= dx * xq_k)
     int8, row n:           w_k = q_k * s_n                                        (q in -127..127)
       sum_k w_k x_k  ~=  s_n * sum_blocks dx * sum_k q_k xq_k

   Layouts:
     int4: qw (N, K/2) uint8, one row of W contiguous, 16 bytes per block of 32 weights; a block's own
           bytes are GGUF Q4_0/Q4_1's (byte j holds q[j] in its low nibble and q[j + 16] in its high one).
           Each full quad of blocks 4c .. 4c+3 (64 bytes) interleaves its blocks' bytes 4 at a time: bytes
           [16g + 4i, 16g + 4i + 4) are bytes [4g, 4g + 4) of block 4c + i (`q4_byte`, pack_q4 in
           llmkit/kernels/__init__.py). A 32-byte load then holds 8 weights of each of the 4 blocks in each
           nibble, every 4 adjacent bytes one block's, which is what a multiply-add of 4 products into an
           int32 lane sums (AVX2's pmaddubsw + pmaddwd, AVX-512 VNNI's vpdpbusd): the 4 nibble vectors of a
           quad add up as integers, lane 4 L + i holding block i's, before one conversion to float (with one
           scale per block per lane, no shuffle). The last G % 4 blocks keep the GGUF order.
           sz: bfloat16 bits, scale s and zero z of each group of gs = 32 << gshift inputs; rb = 0: (K/gs,
           N, 2), the layout llmkit's Int4Linear keeps for every kernel; rb > 0: rows in blocks of rb (the
           last one may be narrower), each block (K/gs, its rows, 2), one after the other.
           Decode reads a row's pairs from one stretch of memory then, not from K/gs lines N * 4 bytes apart
           (1536 x 576, one thread per half: ~10 % faster; 576 x 1536: ~15 %).
     int8: qw (N, K) int8, s (N,) float32.
   K must be a multiple of 32. Work is split over output rows with OpenMP (PyTorch's own runtime: the
   library links the libgomp already loaded by torch, so torch.set_num_threads applies here too).
*/
#define _POSIX_C_SOURCE 200112L /* posix_memalign */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LLMKIT_AVX2 1
#endif

#define QK 32
#ifndef MT
#define MT 4 /* rows of x per pass over a row of W */
#endif
#ifndef MBX
#define MBX 32 /* rows of x per pass over the weights (a multiple of MT) */
#endif

static inline float bf16_lo(uint32_t v) { /* the scale: low half of a (s, z) pair */
    uint32_t bits = v << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float bf16_hi(uint32_t v) { /* the zero: high half */
    uint32_t bits = v & 0xffff0000u;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Where the nibble of weight k (0..31) of block b of a row of int4 W sits (layout in the header): its byte
   (the nibble is the high one when k >= 16). */
static inline int64_t q4_byte(int64_t b, int k, int64_t G) {
    const int j = k & 15;  /* the block's own byte j (GGUF order) */
    if (b < (G & ~(int64_t)3))  /* in a quad: 4-byte words interleaved over its 4 blocks */
        return (b & ~(int64_t)3) * 16 + ((j >> 2) * 4 + (b & 3)) * 4 + (j & 3);
    return b * 16 + j;
}

/* Where value k (0..31) of block b sits in a row of x quantized with pairs != 0 (its high part; the low one
   K further): under its weight's nibble when the weights are loaded 64 bytes a quad, 32 a pair. */
static inline int64_t q4_xat(int64_t b, int k, int64_t G) {
    if (b < (G & ~(int64_t)3))  /* a quad: the low-nibble half, then the high one, each interleaved */
        return (b & ~(int64_t)3) * QK + (k >> 4) * 64 + (((k & 15) >> 2) * 4 + (b & 3)) * 4 + (k & 3);
    if ((b ^ 1) < G)  /* a last pair */
        return (b & ~(int64_t)1) * QK + (b & 1) * 16 + (k >> 4) * 32 + (k & 15);
    return b * QK + k;
}

/* x (M, K) float32 -> xq int8, xd (M, K/32) block scales, xs (M, K/32) block sums of the rounded x.

   fine = 0: ggml's Q8_1: per block of 32, d = max|x| / 127 and xq = round(x / d); row r at xq + r * K.
   fine = 1: two int8 parts, x ~= d * (xq + xl / 128) with xl = round((x - d xq) * 128 / d) in -64..64: the
   rounding error falls from d / 2 to d / 256 for one more integer dot product per block (x then carries 15
   bits, more than bfloat16's 8). Row r at xq + r * 2K: the K high parts, then the K low parts; xd holds
   d / 128, the scale of the combined integer 128 xq + xl.

   xs is the sum of the rounded x, not of x (ggml's Q8_1 does the same). Why: with e = x^ - x the rounding
   error, the int4 kernel's error is then s sum (q - 8) e + z sum e (the weights' centred values and their
   zero, both small), while the exact sum leaves s sum q e = s sum (q - 8) e + 8 s sum e, whose 8 s is half a
   group's range: on SmolLM2 that doubled each matmul's error (French perplexity 45.1 instead of 44.4).

   pairs != 0 stores a row in the int4 weights' order (`q4_xat`): value k of a block sits where its weight's
   nibble comes out of a load. A full quad of blocks (4c .. 4c+3, 128 values): the first 16 values of each
   block, then the last 16, each 64-byte half interleaving the 4 blocks 4 values at a time, as the weights'
   bytes (the low nibbles of a quad's 64 bytes, then the high ones). A last pair of blocks (2p, 2p+1):
   [first 16 of 2p, first 16 of 2p+1, last 16 of 2p, last 16 of 2p+1], as one 32-byte load of their
   weights yields its low and high nibbles. A last single block stays in order. */
static void quantize_rows(const float *x, int64_t M, int64_t K, int pairs, int fine, int8_t *xq, float *xd,
                          float *xs) {
    const int64_t G = K / QK, ldx = fine ? 2 * K : K;
#pragma omp parallel for schedule(static) if (M * G >= 256)
    for (int64_t i = 0; i < M * G; i++) {
        const float *v = x + i * QK;
        const int64_t r = i / G, g = i % G;
        int8_t hi[QK], lo[QK];
        float d;
        int32_t qsum = 0, lsum = 0;
#ifdef __AVX512F__
        {  /* the scalar steps below, 16 lanes at a time: the same float operations, the same bits */
            const __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            d = amax / 127.0f;
            const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
            const __m512 vid = _mm512_set1_ps(id), vd = _mm512_set1_ps(d), k128 = _mm512_set1_ps(128.0f);
            const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, vid)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, vid));
            _mm_storeu_si128((__m128i *)hi, _mm512_cvtepi32_epi8(q0));
            _mm_storeu_si128((__m128i *)(hi + 16), _mm512_cvtepi32_epi8(q1));
            qsum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
            if (fine) {
                const __m512 e0 = _mm512_sub_ps(v0, _mm512_mul_ps(vd, _mm512_cvtepi32_ps(q0)));
                const __m512 e1 = _mm512_sub_ps(v1, _mm512_mul_ps(vd, _mm512_cvtepi32_ps(q1)));
                const __m512i l0 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_mul_ps(e0, vid), k128));
                const __m512i l1 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_mul_ps(e1, vid), k128));
                _mm_storeu_si128((__m128i *)lo, _mm512_cvtepi32_epi8(l0));
                _mm_storeu_si128((__m128i *)(lo + 16), _mm512_cvtepi32_epi8(l1));
                lsum = _mm512_reduce_add_epi32(_mm512_add_epi32(l0, l1));
            }
        }
#elif defined(LLMKIT_AVX2)
        {  /* the same in 8 lanes */
            __m256 v8[4];
            __m256 mx = _mm256_setzero_ps();
            const __m256 sign = _mm256_set1_ps(-0.0f);
            for (int c = 0; c < 4; c++) {
                v8[c] = _mm256_loadu_ps(v + 8 * c);
                mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v8[c]));
            }
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
            d = amax / 127.0f;
            const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
            const __m256 vid = _mm256_set1_ps(id), vd = _mm256_set1_ps(d), k128 = _mm256_set1_ps(128.0f);
            const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
            __m256i q[4], l[4], qs = _mm256_setzero_si256(), ls = _mm256_setzero_si256();
            for (int c = 0; c < 4; c++) {
                q[c] = _mm256_cvtps_epi32(_mm256_mul_ps(v8[c], vid));
                qs = _mm256_add_epi32(qs, q[c]);
                if (fine) {
                    const __m256 e = _mm256_sub_ps(v8[c], _mm256_mul_ps(vd, _mm256_cvtepi32_ps(q[c])));
                    l[c] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_mul_ps(e, vid), k128));
                    ls = _mm256_add_epi32(ls, l[c]);
                }
            }
            /* int32 -> int8 (no saturation: |values| <= 127), back in order across the 128-bit lanes */
            _mm256_storeu_si256((__m256i *)hi, _mm256_permutevar8x32_epi32(
                _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3])), order));
            __m128i t = _mm_add_epi32(_mm256_castsi256_si128(qs), _mm256_extracti128_si256(qs, 1));
            t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
            qsum = _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1)));
            if (fine) {
                _mm256_storeu_si256((__m256i *)lo, _mm256_permutevar8x32_epi32(
                    _mm256_packs_epi16(_mm256_packs_epi32(l[0], l[1]), _mm256_packs_epi32(l[2], l[3])), order));
                t = _mm_add_epi32(_mm256_castsi256_si128(ls), _mm256_extracti128_si256(ls, 1));
                t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
                lsum = _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1)));
            }
        }
#else
        float amax = 0.0f;
        for (int j = 0; j < QK; j++) {
            float a = fabsf(v[j]);
            amax = a > amax ? a : amax;
        }
        d = amax / 127.0f;
        const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
        for (int j = 0; j < QK; j++) {
            hi[j] = (int8_t)lrintf(v[j] * id);
            qsum += hi[j];
            if (fine) {
                lo[j] = (int8_t)lrintf((v[j] - d * (float)hi[j]) * id * 128.0f);
                lsum += lo[j];
            }
        }
#endif
        for (int part = 0; part <= fine; part++) {
            const int8_t *src = part ? lo : hi;
            int8_t *row = xq + r * ldx + part * K;
            if (pairs) {  /* 4 values at a time: they stay together in every layout */
                for (int k = 0; k < QK; k += 4) memcpy(row + q4_xat(g, k, G), src + k, 4);
            } else {
                memcpy(row + g * QK, src, QK);
            }
        }
        xd[i] = fine ? d / 128.0f : d;
        xs[i] = fine ? d / 128.0f * (float)(128 * qsum + lsum) : d * (float)qsum;
    }
}

#ifdef LLMKIT_AVX2
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float hsum4(__m128 s) {
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* Where row n's (s, z) pairs start in sz32 (laid out with rb, see the header), and in *ld the step from one
   group's pair to the next; the rows of a block sit side by side, so rows n .. n + 3 of a block share ld. */
static inline const uint32_t *sz_row(const uint32_t *sz32, int64_t n, int64_t N, int64_t groups, int64_t rb,
                                     int64_t *ld) {
    if (!rb) {
        *ld = N;
        return sz32 + n;
    }
    const int64_t q = n / rb * rb;
    *ld = N - q < rb ? N - q : rb;
    return sz32 + q * groups + (n - q);
}

#ifdef LLMKIT_AVX2
/* sum over a block of int8 w (|w| as u, w itself for the sign) times int8 x at xv: 8 x int32 */
static inline __m256i sdot(__m256i u, __m256i w, const int8_t *xv, __m256i ones) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)xv), w)),
                             ones);
}

/* the combined integer 128 * hi + lo of the two parts (fine), else hi alone */
static inline __m256i join(__m256i hi, __m256i lo, int fine) {
    return fine ? _mm256_add_epi32(_mm256_slli_epi32(hi, 7), lo) : hi;
}
#endif

#ifdef LLMKIT_AVX2
/* the scales s and m = z - 8 s of 4 (s, z) pairs (the bfloat16 halves of each 32-bit lane of p) */
static inline void q4_sm(__m128i p, __m128 *s4, __m128 *m4) {
    *s4 = _mm_castsi128_ps(_mm_slli_epi32(p, 16));
    *m4 = _mm_fnmadd_ps(_mm_set1_ps(8.0f), *s4, _mm_castsi128_ps(_mm_and_si128(p, _mm_set1_epi32((int)0xffff0000u))));
}

/* the low and high nibbles of 32 bytes of int4 weights (2 blocks) */
static inline void q4_nibbles(const uint8_t *w, __m256i *l, __m256i *h) {
    const __m256i low = _mm256_set1_epi8(0x0f), v = _mm256_loadu_si256((const __m256i *)w);
    *l = _mm256_and_si256(v, low);
    *h = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
}

/* 2 blocks of int4 (low nibbles l, high nibbles h) times int8 x at xv (pair order): 16 x int16, each the sum
   of 4 products; lanes 0-7 the first block's, 8-15 the second's (a madd by ones then gives 8 x int32) */
static inline __m256i dot2_16(__m256i l, __m256i h, const int8_t *xv) {
    return _mm256_add_epi16(_mm256_maddubs_epi16(l, _mm256_loadu_si256((const __m256i *)xv)),
                            _mm256_maddubs_epi16(h, _mm256_loadu_si256((const __m256i *)(xv + 32))));
}

/* acc + 2 blocks (nibbles l, h) . one row of x at xv, each block's 4 lanes times its s dx (sc: 4 blocks' s dx;
   idx picks the block of each lane within a 128-bit half: an in-lane permute of sc in both halves is cheaper
   than a cross-lane one, ~3 % of a decode matmul).
   fine: each int32 lane is 128 (a + b) + (c + d), a, b the high parts' int16 sums and c, d the low parts',
   computed as 128 a + 128 b + (c + d): a madd by 128 instead of a madd by 1 and a shift, the same integer. */
static inline __m256 q4_acc2(__m256i l, __m256i h, const int8_t *xv, int64_t K, int fine, __m128 sc, __m256i idx,
                             __m256 acc) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i p;
    if (fine)
        p = _mm256_add_epi32(_mm256_madd_epi16(dot2_16(l, h, xv), _mm256_set1_epi16(128)),
                             _mm256_madd_epi16(dot2_16(l, h, xv + K), ones));
    else
        p = _mm256_madd_epi16(dot2_16(l, h, xv), ones);
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_permutevar_ps(_mm256_set_m128(sc, sc), idx), acc);
}
#endif

#if defined(LLMKIT_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define LLMKIT_VNNI512 1
#endif

#ifdef LLMKIT_AVX2
/* The nibbles of a quad of blocks of one row of int4 W (64 bytes, the quad layout), unpacked once for every
   row of x it meets; q4_dot4 multiplies them. AVX-512 VNNI: the low and high nibbles of one 64-byte load;
   AVX2: those of two 32-byte loads. */
#ifdef LLMKIT_VNNI512
typedef struct { __m512i l, h; } q4_nib4;
static inline q4_nib4 q4_unpack4(const uint8_t *w) {
    const __m512i low = _mm512_set1_epi8(0x0f), v = _mm512_loadu_si512((const void *)w);
    return (q4_nib4){_mm512_and_si512(v, low), _mm512_and_si512(_mm512_srli_epi16(v, 4), low)};
}
#else
typedef struct { __m256i l0, l1, h0, h1; } q4_nib4;
static inline q4_nib4 q4_unpack4(const uint8_t *w) {
    q4_nib4 n;
    q4_nibbles(w, &n.l0, &n.h0);
    q4_nibbles(w + 32, &n.l1, &n.h1);
    return n;
}
#endif

/* A quad of blocks (nibbles n) times one row of x at xv (quad order; its low parts K further when fine), as
   exact integers: lane 4 L + i (L = 0, 1) holds the 16 products of block i that sit in 128-bit lane L of the
   4 nibble vectors, summed (fine: 128 hi + lo, the combined integer of quantize_rows). Integers add exactly
   in any order, so both builds give the same lanes: AVX2 adds the int16 sums of 4 pmaddubsw (|.| <= 4 x 15 x
   127 < 2^15) and widens once; AVX-512 VNNI adds 4 products per lane with vpdpbusd, and its 512-bit lanes
   j and j + 8 (the two 32-byte halves of the quad) are the AVX2 lane j's two parts. */
static inline __m256i q4_dot4(q4_nib4 n, const int8_t *xv, int64_t K, int fine) {
#ifdef LLMKIT_VNNI512
    const __m512i zero = _mm512_setzero_si512();
    __m512i q = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, n.l, _mm512_loadu_si512((const void *)xv)), n.h,
                                    _mm512_loadu_si512((const void *)(xv + 64)));
    if (fine)
        q = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_slli_epi32(q, 7), n.l, _mm512_loadu_si512((const void *)(xv + K))),
                                n.h, _mm512_loadu_si512((const void *)(xv + K + 64)));
    return _mm256_add_epi32(_mm512_castsi512_si256(q), _mm512_extracti64x4_epi64(q, 1));
#else
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i part[2];
    for (int p = 0; p <= fine; p++) {
        const int8_t *v = xv + p * K;
        part[p] = _mm256_add_epi16(
            _mm256_add_epi16(_mm256_maddubs_epi16(n.l0, _mm256_loadu_si256((const __m256i *)v)),
                             _mm256_maddubs_epi16(n.l1, _mm256_loadu_si256((const __m256i *)(v + 32)))),
            _mm256_add_epi16(_mm256_maddubs_epi16(n.h0, _mm256_loadu_si256((const __m256i *)(v + 64))),
                             _mm256_maddubs_epi16(n.h1, _mm256_loadu_si256((const __m256i *)(v + 96)))));
    }
    if (!fine)
        return _mm256_madd_epi16(part[0], ones);
    return _mm256_add_epi32(_mm256_madd_epi16(part[0], _mm256_set1_epi16(128)), _mm256_madd_epi16(part[1], ones));
#endif
}

/* acc + a quad's products (p, q4_dot4's lanes) times their blocks' s dx (sc: the quad's 4, one per block,
   the same in both 128-bit halves: no shuffle) */
static inline __m256 q4_acc4(__m256i p, __m128 sc, __m256 acc) {
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set_m128(sc, sc), acc);
}

/* The end of one row of int4 W against one row of x: blocks b.. (a last one, if G is odd) into the
   accumulator acc (and t), then the sum. Shared by both int4 kernels, so they add in the same order. */
static inline float q4_finish(const uint8_t *w, const uint32_t *szn, int64_t N, int gshift, int64_t G, int64_t b,
                              const int8_t *xrow, const float *xdr, const float *xsr, int64_t K, int fine,
                              __m256 acc, __m128 t4) {
    const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    float t = 0.0f;
    for (; b < G; b++) {
        const uint32_t v = szn[(b >> gshift) * N];
        const float s = bf16_lo(v), m = bf16_hi(v) - 8.0f * s;
        const __m128i h = _mm_loadu_si128((const __m128i *)(w + b * 16));
        const __m256i wq = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(h, 4), h), low);
        __m256i p = _mm256_setzero_si256();
        for (int part = 0; part <= fine; part++) {
            const int8_t *row = xrow + part * K;
            const __m256i xv = _mm256_set_m128i(_mm_loadu_si128((const __m128i *)(row + q4_xat(b, 16, G))),
                                                _mm_loadu_si128((const __m128i *)(row + q4_xat(b, 0, G))));
            const __m256i pp = _mm256_madd_epi16(_mm256_maddubs_epi16(wq, xv), ones);
            p = part ? _mm256_add_epi32(_mm256_slli_epi32(p, 7), pp) : pp;
        }
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(s * xdr[b]), acc);
        t += m * xsr[b];
    }
    return hsum8(acc) + hsum4(t4) + t;
}
#endif

/* One row of int4 W (its bytes w; the (s, z) pair of its group j at szn[j * N]) against mt <= MT rows of x
   (quantized with pairs != 0; row r at xq + r * ldx, its low parts K further when fine). Each weight byte is
   unpacked once for all the rows, and every row is summed in the same order whatever mt is: a sequence's
   results do not depend on the batch. */
static inline __attribute__((always_inline)) void q4_rows(
    const uint8_t *w, const uint32_t *szn, int64_t N, int gshift, int64_t G, const int8_t *xq, const float *xd,
    const float *xs, int64_t K, const int mt, const int fine, float *out) {
    const int64_t ldx = fine ? 2 * K : K;
    int64_t b = 0;
#ifdef LLMKIT_AVX2
    const __m256i i01 = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    __m256 acc[MT];
    __m128 t4[MT];
    for (int r = 0; r < mt; r++) {
        acc[r] = _mm256_setzero_ps();
        t4[r] = _mm_setzero_ps();
    }
    for (; b + 4 <= G; b += 4) {  /* a quad of blocks: 64 bytes of weights */
        const __m128i p = _mm_setr_epi32((int)szn[(b >> gshift) * N], (int)szn[((b + 1) >> gshift) * N],
                                         (int)szn[((b + 2) >> gshift) * N], (int)szn[((b + 3) >> gshift) * N]);
        __m128 s4, m4;
        q4_sm(p, &s4, &m4);
        const q4_nib4 nb = q4_unpack4(w + b * 16);
        for (int r = 0; r < mt; r++) {
            t4[r] = _mm_fmadd_ps(m4, _mm_loadu_ps(xs + r * G + b), t4[r]);
            acc[r] = q4_acc4(q4_dot4(nb, xq + r * ldx + b * QK, K, fine), _mm_mul_ps(s4, _mm_loadu_ps(xd + r * G + b)),
                             acc[r]);
        }
    }
    if (b + 2 <= G) {  /* a last pair of blocks (lanes 2-3 of t4 get 0 x 0) */
        const __m128i p = _mm_setr_epi32((int)szn[(b >> gshift) * N], (int)szn[((b + 1) >> gshift) * N], 0, 0);
        __m128 s4, m4;
        __m256i l0, h0;
        q4_sm(p, &s4, &m4);
        q4_nibbles(w + b * 16, &l0, &h0);
        for (int r = 0; r < mt; r++) {
            t4[r] = _mm_fmadd_ps(m4, _mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(xs + r * G + b))), t4[r]);
            const __m128 sc = _mm_mul_ps(s4, _mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(xd + r * G + b))));
            acc[r] = q4_acc2(l0, h0, xq + r * ldx + b * QK, K, fine, sc, i01, acc[r]);
        }
        b += 2;
    }
    for (int r = 0; r < mt; r++)
        out[r] = q4_finish(w, szn, N, gshift, G, b, xq + r * ldx, xd + r * G, xs + r * G, K, fine, acc[r], t4[r]);
#else
    float total[MT], t[MT];
    for (int r = 0; r < mt; r++) total[r] = t[r] = 0.0f;
    for (; b < G; b++) {
        const uint32_t v = szn[(b >> gshift) * N];
        const float s = bf16_lo(v), m = bf16_hi(v) - 8.0f * s;
        for (int r = 0; r < mt; r++) {
            int32_t acc = 0;
            for (int part = 0; part <= fine; part++) {
                const int8_t *row = xq + r * ldx + part * K;
                int32_t a = 0;
                for (int k = 0; k < QK; k++) {
                    const uint8_t byte = w[q4_byte(b, k, G)];
                    a += (k < 16 ? byte & 15 : byte >> 4) * row[q4_xat(b, k, G)];
                }
                acc = part ? 128 * acc + a : a;
            }
            total[r] += s * xd[r * G + b] * (float)acc;
            t[r] += m * xs[r * G + b];
        }
    }
    for (int r = 0; r < mt; r++) out[r] = total[r] + t[r];
#endif
}

#ifdef LLMKIT_AVX2
#ifndef NR1
#define NR1 2 /* rows of W per pass in decode (one row of x) */
#endif
/* q4_rows with mt = 1 for nr <= NR1 adjacent rows of W (row i's bytes at w + i * K/2, its pairs at szn + i):
   the same operations per row in the same order (the same bits), with the x loads and the (s, z) loads
   shared: one load per block brings the pairs of all nr rows. With vout (G even: no block left for
   q4_finish), row i's acc and t4 go to vout[i], tout[i] instead, for q4_sum8. */
static inline __attribute__((always_inline)) void q4_rows1(
    const uint8_t *w, const uint32_t *szn, int64_t N, int gshift, int64_t G, const int8_t *xq, const float *xd,
    const float *xs, int64_t K, const int nr, const int fine, float *out, __m256 *vout, __m128 *tout) {
    const __m256i i01 = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    __m256 acc[NR1];
    __m128 t4[NR1];
    for (int i = 0; i < nr; i++) {
        acc[i] = _mm256_setzero_ps();
        t4[i] = _mm_setzero_ps();
    }
    int64_t b = 0;
    for (; b + 4 <= G; b += 4) {
        __m128i P[NR1];  /* row i's pairs of blocks b .. b + 3 */
        if (nr == 2) {
            const __m128i v0 = _mm_loadl_epi64((const __m128i *)(szn + (b >> gshift) * N));
            const __m128i v1 = _mm_loadl_epi64((const __m128i *)(szn + ((b + 1) >> gshift) * N));
            const __m128i v2 = _mm_loadl_epi64((const __m128i *)(szn + ((b + 2) >> gshift) * N));
            const __m128i v3 = _mm_loadl_epi64((const __m128i *)(szn + ((b + 3) >> gshift) * N));
            const __m128i u01 = _mm_unpacklo_epi32(v0, v1), u23 = _mm_unpacklo_epi32(v2, v3);
            P[0] = _mm_unpacklo_epi64(u01, u23);
            P[1] = _mm_unpackhi_epi64(u01, u23);
        } else {
            for (int i = 0; i < nr; i++)
                P[i] = _mm_setr_epi32((int)szn[(b >> gshift) * N + i], (int)szn[((b + 1) >> gshift) * N + i],
                                      (int)szn[((b + 2) >> gshift) * N + i], (int)szn[((b + 3) >> gshift) * N + i]);
        }
        const __m128 xd4 = _mm_loadu_ps(xd + b), xs4 = _mm_loadu_ps(xs + b);
        const int8_t *xv = xq + b * QK;
        for (int i = 0; i < nr; i++) {
            __m128 s4, m4;
            q4_sm(P[i], &s4, &m4);
            t4[i] = _mm_fmadd_ps(m4, xs4, t4[i]);
            acc[i] = q4_acc4(q4_dot4(q4_unpack4(w + i * (K / 2) + b * 16), xv, K, fine), _mm_mul_ps(s4, xd4), acc[i]);
        }
    }
    if (b + 2 <= G) {
        const __m128 xd2 = _mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(xd + b)));
        const __m128 xs2 = _mm_castsi128_ps(_mm_loadl_epi64((const __m128i *)(xs + b)));
        const int8_t *xv = xq + b * QK;
        for (int i = 0; i < nr; i++) {
            const __m128i p = _mm_setr_epi32((int)szn[(b >> gshift) * N + i], (int)szn[((b + 1) >> gshift) * N + i], 0, 0);
            __m128 s4, m4;
            __m256i l0, h0;
            q4_sm(p, &s4, &m4);
            q4_nibbles(w + i * (K / 2) + b * 16, &l0, &h0);
            t4[i] = _mm_fmadd_ps(m4, xs2, t4[i]);
            acc[i] = q4_acc2(l0, h0, xv, K, fine, _mm_mul_ps(s4, xd2), i01, acc[i]);
        }
        b += 2;
    }
    if (vout) {
        for (int i = 0; i < nr; i++) {
            vout[i] = acc[i];
            tout[i] = t4[i];
        }
        return;
    }
    for (int i = 0; i < nr; i++)
        out[i] = q4_finish(w + i * (K / 2), szn + i, N, gshift, G, b, xq, xd, xs, K, fine, acc[i], t4[i]);
}

/* q4_finish's sum for 8 rows with no block left: out[r] = hsum8(v[r]) + hsum4(t[r]) + 0.0f, every addition
   the one hsum8 and hsum4 make (lanes j + 4 onto j, then 0 + 2 and 1 + 3, then those two), so the bits are
   q4_finish's, done for the 8 rows at once on transposed vectors (lane r = row r). One row's horizontal
   sums form a chain of dependent additions; 8 rows side by side make K = 576 decode rows ~12 % faster. */
static inline void q4_sum8(const __m256 *v, const __m128 *t, float *out) {
    __m128 a0, a1, a2, a3, b0, b1, b2, b3, c0 = t[0], c1 = t[1], c2 = t[2], c3 = t[3], d0 = t[4], d1 = t[5],
           d2 = t[6], d3 = t[7];
    __m128 s[8];
    for (int r = 0; r < 8; r++) s[r] = _mm_add_ps(_mm256_castps256_ps128(v[r]), _mm256_extractf128_ps(v[r], 1));
    a0 = s[0], a1 = s[1], a2 = s[2], a3 = s[3], b0 = s[4], b1 = s[5], b2 = s[6], b3 = s[7];
    _MM_TRANSPOSE4_PS(a0, a1, a2, a3);  /* a_j: lane r = row r's s_j, rows 0-3; b_j rows 4-7 */
    _MM_TRANSPOSE4_PS(b0, b1, b2, b3);
    _MM_TRANSPOSE4_PS(c0, c1, c2, c3);  /* the same for t4 */
    _MM_TRANSPOSE4_PS(d0, d1, d2, d3);
    const __m256 h = _mm256_add_ps(_mm256_add_ps(_mm256_set_m128(b0, a0), _mm256_set_m128(b2, a2)),
                                   _mm256_add_ps(_mm256_set_m128(b1, a1), _mm256_set_m128(b3, a3)));
    const __m256 g = _mm256_add_ps(_mm256_add_ps(_mm256_set_m128(d0, c0), _mm256_set_m128(d2, c2)),
                                   _mm256_add_ps(_mm256_set_m128(d1, c1), _mm256_set_m128(d3, c3)));
    _mm256_storeu_ps(out, _mm256_add_ps(_mm256_add_ps(h, g), _mm256_setzero_ps()));
}
#endif

/* One row of int8 W (scale s) against mt rows of x (row r at xq + r * ldx, its low parts K further when fine). */
static inline __attribute__((always_inline)) void q8_dotm(const int8_t *w, float s, int64_t G, const int8_t *xq,
                                                          const float *xd, int64_t K, int mt, const int fine,
                                                          float *out) {
    const int64_t ldx = fine ? 2 * K : K;
#ifdef LLMKIT_AVX2
    __m256 acc0[MT], acc1[MT];
    for (int r = 0; r < mt; r++) acc0[r] = acc1[r] = _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1);
    int64_t b = 0;
    for (; b + 2 <= G; b += 2) {
        const __m256i w0 = _mm256_loadu_si256((const __m256i *)(w + b * QK));
        const __m256i w1 = _mm256_loadu_si256((const __m256i *)(w + b * QK + QK));
        const __m256i u0 = _mm256_sign_epi8(w0, w0), u1 = _mm256_sign_epi8(w1, w1);  /* |w| as u8 */
        for (int r = 0; r < mt; r++) {
            const int8_t *xv = xq + r * ldx + b * QK;
            const __m256i p0 = join(sdot(u0, w0, xv, ones), fine ? sdot(u0, w0, xv + K, ones) : u0, fine);
            const __m256i p1 = join(sdot(u1, w1, xv + QK, ones), fine ? sdot(u1, w1, xv + QK + K, ones) : u1, fine);
            acc0[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(xd[r * G + b]), acc0[r]);
            acc1[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(xd[r * G + b + 1]), acc1[r]);
        }
    }
    if (b < G) {
        const __m256i w0 = _mm256_loadu_si256((const __m256i *)(w + b * QK));
        const __m256i u0 = _mm256_sign_epi8(w0, w0);
        for (int r = 0; r < mt; r++) {
            const int8_t *xv = xq + r * ldx + b * QK;
            const __m256i p0 = join(sdot(u0, w0, xv, ones), fine ? sdot(u0, w0, xv + K, ones) : u0, fine);
            acc0[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(xd[r * G + b]), acc0[r]);
        }
    }
    for (int r = 0; r < mt; r++) out[r] = s * hsum8(_mm256_add_ps(acc0[r], acc1[r]));
#else
    for (int r = 0; r < mt; r++) {
        float total = 0.0f;
        for (int64_t b = 0; b < G; b++) {
            int32_t t = 0;
            for (int part = 0; part <= fine; part++) {
                int32_t a = 0;
                for (int j = 0; j < QK; j++) a += w[b * QK + j] * xq[r * ldx + part * K + b * QK + j];
                t = part ? 128 * t + a : a;
            }
            total += xd[r * G + b] * (float)t;
        }
        out[r] = s * total;
    }
#endif
}

/* n bytes aligned to a cache line (64-byte AVX-512 loads of a row never straddle two lines); free() it */
static void *scratch(int64_t n) {
    void *p = NULL;
    return posix_memalign(&p, 64, (size_t)((n + 63) & ~(int64_t)63)) ? NULL : p;
}

#ifndef PF_ROWS
#define PF_ROWS 6 /* decode: rows of W read ahead by software prefetch */
#endif
#ifndef PF_MIN_K
#define PF_MIN_K 1024 /* decode: int4 rows are prefetched when K is at least this */
#endif
#ifndef PF_HEAD
#define PF_HEAD 8 /* decode of the int8 head: rows read ahead */
#endif

/* Ask for the cache lines of [p, p + n) now: decode reads each row of W once, and with long rows the
   hardware prefetcher alone leaves the core waiting on memory between them. Measured cold on Zen 3, two
   threads: int4 K = 1024, 1536, 2048 are 35-40 % faster with it, K = 4608 7 %; at K = 768 it changes
   nothing and at K = 576 it costs 5 % (the hardware prefetcher keeps up; the instructions remain), hence
   PF_MIN_K. The int8 head (K = 576 bytes a row too, but 49k rows) is ~10 % faster with it. The values read
   do not change, so neither do the results. */
static inline __attribute__((always_inline)) void prefetch(const void *p, int64_t n) {
    for (int64_t o = 0; o < n; o += 64) __builtin_prefetch((const char *)p + o, 0, 3);
}

#ifdef LLMKIT_AVX2
/* Decode's prefetch for the NR1 rows of W from row n + PF_ROWS on (long rows only, see PF_MIN_K): their bytes
   and, when the pairs are laid out in blocks of rb rows, the block of pairs they start. Always inlined: as
   a function of its own, GCC finds it has no effect (a prefetch changes no value) and drops its calls. */
static inline __attribute__((always_inline)) void q4_prefetch_rows(const uint8_t *qw, const uint32_t *sz32, int64_t N, int64_t K, int64_t groups,
                                    int64_t rb, int64_t n) {
    const int64_t ahead = n + PF_ROWS;
    if (K < PF_MIN_K || ahead + NR1 > N)
        return;
    prefetch(qw + ahead * (K / 2), NR1 * (K / 2));
    if (rb && ahead % rb < NR1) {
        const int64_t q = ahead - ahead % rb, ldp = N - q < rb ? N - q : rb;
        prefetch(sz32 + q * groups, ldp * groups * 4);
    }
}
#endif

/* y (N,) = W x for one row of x quantized with pairs == 1 (decode): this thread's share of the rows of W, as
   a work-sharing loop to call inside a parallel region. AVX2: NR1 rows of W at a time (q4_rows1); when the
   blocks of a row pair up (G even), rows in chunks of 8 whose sums q4_sum8 finishes together, then the
   last N % 8 rows as before. The same bits either way. */
static void q4_decode_rows(const int8_t *xq, const float *xd, const float *xs, int64_t K, const uint8_t *qw,
                           const uint32_t *sz32, int64_t N, int gs, int64_t rb, int fine, float *y) {
    const int64_t G = K / QK, groups = G >> gs;
#ifdef LLMKIT_AVX2
    const int64_t C8 = (G & 1) == 0 && NR1 == 2 ? N / 8 : 0;
#pragma omp for schedule(static) nowait
    for (int64_t c = 0; c < C8; c++) {
        __m256 v[8];
        __m128 t4[8];
        for (int k = 0; k < 4; k++) {
            const int64_t n = 8 * c + 2 * k;
            q4_prefetch_rows(qw, sz32, N, K, groups, rb, n);
            int64_t ld;
            const uint32_t *szn = sz_row(sz32, n, N, groups, rb, &ld);
            if (fine)
                q4_rows1(qw + n * (K / 2), szn, ld, gs, G, xq, xd, xs, K, 2, 1, NULL, v + 2 * k, t4 + 2 * k);
            else
                q4_rows1(qw + n * (K / 2), szn, ld, gs, G, xq, xd, xs, K, 2, 0, NULL, v + 2 * k, t4 + 2 * k);
        }
        q4_sum8(v, t4, y + 8 * c);
    }
    const int64_t N0 = 8 * C8, P = (N - N0) / NR1;  /* then NR1 rows at a time, then the rest one by one */
#pragma omp for schedule(static)
    for (int64_t t = 0; t < P + (N - N0) % NR1; t++) {
        const int64_t n = N0 + (t < P ? t * NR1 : P * NR1 + (t - P));
        const int nr = t < P ? NR1 : 1;
        const uint8_t *wn = qw + n * (K / 2);
        q4_prefetch_rows(qw, sz32, N, K, groups, rb, n);
        int64_t ld;  /* n is even: a pair's rows are in one block of rb (a multiple of 2, or 0) */
        const uint32_t *szn = sz_row(sz32, n, N, groups, rb, &ld);
        if (nr == NR1 && fine)
            q4_rows1(wn, szn, ld, gs, G, xq, xd, xs, K, NR1, 1, y + n, NULL, NULL);
        else if (nr == NR1)
            q4_rows1(wn, szn, ld, gs, G, xq, xd, xs, K, NR1, 0, y + n, NULL, NULL);
        else
            q4_rows(wn, szn, ld, gs, G, xq, xd, xs, K, 1, fine, y + n);
    }
#else
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        int64_t ld;
        const uint32_t *szn = sz_row(sz32, n, N, groups, rb, &ld);
        q4_rows(qw + n * (K / 2), szn, ld, gs, G, xq, xd, xs, K, 1, fine, y + n);
    }
#endif
}

/* y (M, N) = x (M, K) @ W^T for int4 W (layout above), groups of 32 << gshift inputs, (s, z) pairs laid out
   with rb (0, or an even rb: 4, kernels.RB); fine: two-part activations (see quantize_rows).
   Returns 0, or -1 if memory for the quantized activations ran out. */
int llmkit_q4_mm(const float *x, int64_t M, int64_t K, const uint8_t *qw, const uint16_t *sz, int64_t N,
                 int64_t gshift, int64_t fine, float *y, int64_t rb) {
    const int64_t G = K / QK, ldx = fine ? 2 * K : K;
    int8_t *xq = scratch(M * ldx + 2 * M * G * (int64_t)sizeof(float));
    if (!xq) return -1;
    float *xd = (float *)(xq + M * ldx), *xs = xd + M * G;
    const uint32_t *sz32 = (const uint32_t *)sz;  /* (s, z) pairs */
    const int gs = (int)gshift;
    quantize_rows(x, M, K, 1, (int)fine, xq, xd, xs);
    if (M == 1) {  /* decode */
#pragma omp parallel
        q4_decode_rows(xq, xd, xs, K, qw, sz32, N, gs, rb, (int)fine, y);
    } else {  /* x in blocks of MBX rows (their int8 copy stays in L1/L2), each against this thread's rows of W */
#pragma omp parallel
        for (int64_t b0 = 0; b0 < M; b0 += MBX) {
            const int64_t b1 = b0 + MBX < M ? b0 + MBX : M;
#pragma omp for schedule(static)
            for (int64_t n = 0; n < N; n++) {
                float out[MT];
                int64_t ld;
                const uint32_t *szn = sz_row(sz32, n, N, G >> gs, rb, &ld);
                for (int64_t m0 = b0; m0 < b1; m0 += MT) {
                    const int mt = (int)(b1 - m0 < MT ? b1 - m0 : MT);
                    const int8_t *xr = xq + m0 * ldx;
                    if (mt == MT && fine)  /* the common cases with mt known at compile time (registers) */
                        q4_rows(qw + n * (K / 2), szn, ld, gs, G, xr, xd + m0 * G, xs + m0 * G, K, MT, 1, out);
                    else if (mt == MT)
                        q4_rows(qw + n * (K / 2), szn, ld, gs, G, xr, xd + m0 * G, xs + m0 * G, K, MT, 0, out);
                    else
                        q4_rows(qw + n * (K / 2), szn, ld, gs, G, xr, xd + m0 * G, xs + m0 * G, K, mt, (int)fine, out);
                    for (int r = 0; r < mt; r++) y[(m0 + r) * N + n] = out[r];
                }
            }
        }
    }
    free(xq);
    return 0;
}

/* y (M, N) = x (M, K) @ W^T for int8 W with one float scale per row; fine as above. */
int llmkit_q8_mm(const float *x, int64_t M, int64_t K, const int8_t *qw, const float *s, int64_t N, int64_t fine,
                 float *y) {
    const int64_t G = K / QK, ldx = fine ? 2 * K : K;
    int8_t *xq = scratch(M * ldx + 2 * M * G * (int64_t)sizeof(float));
    if (!xq) return -1;
    float *xd = (float *)(xq + M * ldx), *xs = xd + M * G;
    quantize_rows(x, M, K, 0, (int)fine, xq, xd, xs);
    if (M == 1) {  /* decode (the vocabulary head): mt = 1 known at compile time */
#pragma omp parallel for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            if (n + PF_HEAD < N) prefetch(qw + (n + PF_HEAD) * K, K);
            if (fine)
                q8_dotm(qw + n * K, s[n], G, xq, xd, K, 1, 1, y + n);
            else
                q8_dotm(qw + n * K, s[n], G, xq, xd, K, 1, 0, y + n);
        }
        free(xq);
        return 0;
    }
#pragma omp parallel
    for (int64_t b0 = 0; b0 < M; b0 += MBX) {  /* x in blocks of MBX rows, as llmkit_q4_mm */
        const int64_t b1 = b0 + MBX < M ? b0 + MBX : M;
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            float out[MT];
            for (int64_t m0 = b0; m0 < b1; m0 += MT) {
                const int mt = (int)(b1 - m0 < MT ? b1 - m0 : MT);
                const int8_t *xr = xq + m0 * ldx;
                if (mt == MT && fine)
                    q8_dotm(qw + n * K, s[n], G, xr, xd + m0 * G, K, MT, 1, out);
                else if (mt == MT)
                    q8_dotm(qw + n * K, s[n], G, xr, xd + m0 * G, K, MT, 0, out);
                else
                    q8_dotm(qw + n * K, s[n], G, xr, xd + m0 * G, K, mt, (int)fine, out);
                for (int r = 0; r < mt; r++) y[(m0 + r) * N + n] = out[r];
            }
        }
    }
    free(xq);
    return 0;
}

/* The instruction set this build uses: 1 = AVX2 + FMA, 0 = portable C. */
int llmkit_simd(void) {
#ifdef LLMKIT_AVX2
    return 1;
#else
    return 0;
#endif
}
