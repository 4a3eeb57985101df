/* One projection (group) in one call: NF4 GEMM with every row's LoRA delta fused.
 *
 * Semantics (what kernels/nf4_lora.py's pure-torch reference computes):
 *   W[o, i]  = NF4_CODE[code(o*in + i)] * absmax[(o*in + i) / 64]   (bitsandbytes' values;
 *              rounded to bf16 when the compute dtype is bf16, as the dequantize kernel does)
 *   for each projection part p (output columns [col_start, col_end) of y):
 *     t_p[j, r] = pair_weight[j] * sum_i x[pair_row[j], i] * A_p[pair_slot[j], r, i]
 *   acc[t, o] = sum_i x[t, i] * W[o, i]
 *               + sum_{pairs j of row t in the part of o} sum_r t_p[j, r] * Bt_p[slot_j, r, o - col_start]
 *   y[t, o] = round(acc[t, o] * scale[row_slot[t], o] + bias[o])   (a row with row_slot[t] >= 0: DoRA)
 *   y[t, o] = round(acc[t, o] + bias[o])                           (every other row)
 * Every sum accumulates in float32; y is rounded to the compute dtype once, at the end.
 *
 * The packed weight (0.5 bytes per value) and its float32 block scales are read once per
 * call: each thread decodes a panel of 16 output rows into a buffer that stays in its
 * cache, multiplies every token row by it (register tiles of 4 outputs x up to 6 rows,
 * partial sums along the input dimension), then adds the LoRA expand for the panel's
 * columns (B kept transposed, so 16 outputs are one vector), multiplies the rows on a DoRA
 * adapter by their scale, adds the bias and stores the rows. The
 * LoRA shrink for every (part, pair) runs first in the same parallel region. Panels are
 * handed out dynamically, so a thread that the OS deschedules does not hold the others at
 * the end of the call for more than one panel.
 *
 * Instruction sets, chosen by the caller at run time from the CPU's flags:
 *   ISA_AVX2        8-wide FMA in float32 (bf16 inputs widened, products exact in fp32)
 *   ISA_AVX512      16-wide FMA in float32 (likewise)
 *   ISA_AVX512_BF16 as AVX512 for float32; for bf16 the panel stays bf16 and vdpbf16ps
 *                   multiplies 32 pairs per instruction, accumulating in float32
 *   ISA_AMX         as AVX512_BF16, but the bf16 panel is multiplied on AMX tiles: the
 *                   panel's 16 outputs x 32 inputs are tile A as they lie in the panel,
 *                   x is packed once per call into VNNI tiles of 16 rows (tile B), and
 *                   TDPBF16PS accumulates a 16 outputs x 16 rows float32 tile
 * Requirements (checked by the caller): in % 64 == 0, x/y/bias/A/Bt contiguous.
 */
#include <immintrin.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <stdlib.h>
#include <string.h>

#define ISA_AVX2 0
#define ISA_AVX512 1
#define ISA_AVX512_BF16 2
#define ISA_AMX 3

#define PANEL_ROWS 16 /* output rows decoded at once (one vector of outputs in the epilogue) */
#define MAX_PARTS 4

static const float NF4_CODE[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

typedef struct {
    int64_t num_pairs;
    const int32_t *pair_row;    /* [P] token row of each pair, pairs listed row by row */
    const int32_t *pair_slot;   /* [P] adapter slot */
    const float *pair_weight;   /* [P] mix weight */
    const int32_t *row_start;   /* [T+1] pairs of row t are row_start[t] : row_start[t+1] */
} lora_pairs;

typedef struct {
    int64_t col_start, col_end; /* the columns of y this projection writes */
    int64_t rank;               /* R of the slot buffers (padded rank) */
    const void *a;              /* [S, R, in] compute dtype */
    const void *bt;             /* [S, R, col_end - col_start] compute dtype (B transposed) */
    const int32_t *slot_rank;   /* [S] rows of A / Bt that hold the slot's adapter (the rest are
                                   zero and skipped); NULL = all R */
} lora_part;

/* ---------------------------------------------------------------- scalar helpers */

static inline float bf16_to_f32(uint16_t v) {
    union { uint32_t u; float f; } bits = {(uint32_t)v << 16};
    return bits.f;
}

static inline uint16_t f32_to_bf16(float value) {
    union { float f; uint32_t u; } bits = {value};
    return (uint16_t)((bits.u + 0x7FFF + ((bits.u >> 16) & 1)) >> 16);
}

static inline float round_bf16(float value) { return bf16_to_f32(f32_to_bf16(value)); }

/* Per-thread buffers, grown as needed and kept between calls (threads of the OpenMP pool
 * live as long as the process). */
static __thread float *tls_panel = NULL;
static __thread int64_t tls_panel_bytes = 0;
static __thread float *tls_tile = NULL;
static __thread int64_t tls_tile_bytes = 0;

static void *grow(float **buffer, int64_t *have, int64_t need) {
    if (need < 64) need = 64; /* never a zero-byte allocation (NULL) */
    if (*have < need) {
        free(*buffer);
        *buffer = aligned_alloc(64, (size_t)((need + 63) / 64 * 64));
        *have = *buffer ? need : 0;
    }
    return *buffer;
}

/* ================================================================ AVX2 (float32) */

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* one row of `in` NF4 values -> float32 (rounded to bf16 values when round16) */
static void decode_row_avx2(const uint8_t *packed, const float *absmax, int64_t in, float *out, int round16) {
    const __m256 lut_lo = _mm256_loadu_ps(NF4_CODE), lut_hi = _mm256_loadu_ps(NF4_CODE + 8);
    const __m128i mask = _mm_set1_epi8(0x0F);
    for (int64_t b = 0; b < in / 64; b++) {
        const __m256 scale = _mm256_set1_ps(absmax[b]);
        for (int j = 0; j < 4; j++) {
            __m128i bytes = _mm_loadl_epi64((const __m128i *)(packed + b * 32 + 8 * j));
            __m128i codes = _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask), _mm_and_si128(bytes, mask));
            for (int h = 0; h < 2; h++) {
                __m256i idx = _mm256_cvtepu8_epi32(h ? _mm_srli_si128(codes, 8) : codes);
                __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lut_lo, idx), _mm256_permutevar8x32_ps(lut_hi, idx),
                                            _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
                v = _mm256_mul_ps(v, scale);
                if (round16) {
                    __m256i bits = _mm256_castps_si256(v);
                    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
                    bits = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
                    v = _mm256_castsi256_ps(_mm256_and_si256(bits, _mm256_set1_epi32((int)0xFFFF0000)));
                }
                _mm256_storeu_ps(out + b * 64 + 16 * j + 8 * h, v);
            }
        }
    }
}

/* tile[t][0..4) = x[t] . panel[0..4) for t < NT; x rows float32 with stride in */
static inline __attribute__((always_inline)) void micro_avx2(const float *x, const float *panel, int64_t in,
                                                             int NT, float *tile, int64_t tile_stride) {
    __m256 acc[3][4];
    for (int t = 0; t < NT; t++)
        for (int o = 0; o < 4; o++) acc[t][o] = _mm256_setzero_ps();
    for (int64_t k = 0; k < in; k += 8) {
        __m256 w0 = _mm256_load_ps(panel + k), w1 = _mm256_load_ps(panel + in + k);
        __m256 w2 = _mm256_load_ps(panel + 2 * in + k), w3 = _mm256_load_ps(panel + 3 * in + k);
        for (int t = 0; t < NT; t++) {
            __m256 xv = _mm256_loadu_ps(x + t * in + k);
            acc[t][0] = _mm256_fmadd_ps(xv, w0, acc[t][0]);
            acc[t][1] = _mm256_fmadd_ps(xv, w1, acc[t][1]);
            acc[t][2] = _mm256_fmadd_ps(xv, w2, acc[t][2]);
            acc[t][3] = _mm256_fmadd_ps(xv, w3, acc[t][3]);
        }
    }
    for (int t = 0; t < NT; t++)
        for (int o = 0; o < 4; o++) tile[t * tile_stride + o] = hsum8(acc[t][o]);
}

static void panel_rows_avx2(const float *x, int64_t rows, const float *panel, int64_t in, float *tile) {
    for (int64_t t0 = 0; t0 < rows; t0 += 3) {
        int nt = rows - t0 < 3 ? (int)(rows - t0) : 3;
        for (int s = 0; s < PANEL_ROWS; s += 4) {
            float *dst = tile + t0 * PANEL_ROWS + s;
            const float *xs = x + t0 * in, *ps = panel + s * in;
            if (nt == 3) micro_avx2(xs, ps, in, 3, dst, PANEL_ROWS);
            else if (nt == 2) micro_avx2(xs, ps, in, 2, dst, PANEL_ROWS);
            else micro_avx2(xs, ps, in, 1, dst, PANEL_ROWS);
        }
    }
}

static float dot_avx2(const float *x, const void *a, int64_t n, int bf16) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t k = 0; k < n; k += 8) {
        __m256 av = bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(
                               _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)a + k))), 16))
                         : _mm256_loadu_ps((const float *)a + k);
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), av, acc);
    }
    return hsum8(acc);
}

/* ================================================================ AVX-512 */

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

/* the 16 NF4 values of one block, scaled: exactly bitsandbytes' code * absmax in float32 */
AVX512 static inline __m512 block_lut_avx512(float scale, int round16) {
    __m512 v = _mm512_mul_ps(_mm512_loadu_ps(NF4_CODE), _mm512_set1_ps(scale));
    if (round16) {
        __m512i bits = _mm512_castps_si512(v);
        __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
        bits = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
        v = _mm512_castsi512_ps(_mm512_and_si512(bits, _mm512_set1_epi32((int)0xFFFF0000)));
    }
    return v;
}

/* 16 packed bytes -> their 32 codes in element order (high nibble first) */
AVX512 static inline __m256i codes32(const uint8_t *src) {
    const __m128i mask = _mm_set1_epi8(0x0F);
    __m128i bytes = _mm_loadu_si128((const __m128i *)src);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask), lo = _mm_and_si128(bytes, mask);
    return _mm256_set_m128i(_mm_unpackhi_epi8(hi, lo), _mm_unpacklo_epi8(hi, lo));
}

AVX512 static void decode_row_f32_avx512(const uint8_t *packed, const float *absmax, int64_t in, float *out,
                                         int round16) {
    for (int64_t b = 0; b < in / 64; b++) {
        const __m512 lut = block_lut_avx512(absmax[b], round16);
        for (int h = 0; h < 2; h++) {
            __m256i codes = codes32(packed + b * 32 + 16 * h);
            __m512i idx0 = _mm512_cvtepu8_epi32(_mm256_castsi256_si128(codes));
            __m512i idx1 = _mm512_cvtepu8_epi32(_mm256_extracti128_si256(codes, 1));
            _mm512_store_ps(out + b * 64 + 32 * h, _mm512_permutexvar_ps(idx0, lut));
            _mm512_store_ps(out + b * 64 + 32 * h + 16, _mm512_permutexvar_ps(idx1, lut));
        }
    }
}

AVX512 static void decode_row_bf16_avx512(const uint8_t *packed, const float *absmax, int64_t in, uint16_t *out) {
    for (int64_t b = 0; b < in / 64; b++) {
        /* the block's 16 values rounded to bf16, as 16-bit words in both halves of a table */
        __m512i bits = _mm512_castps_si512(block_lut_avx512(absmax[b], 1));
        __m256i words = _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16));
        __m512i table = _mm512_broadcast_i64x4(words);
        for (int h = 0; h < 2; h++) {
            __m512i idx = _mm512_cvtepu8_epi16(codes32(packed + b * 32 + 16 * h));
            _mm512_store_si512((__m512i *)(out + b * 64 + 32 * h), _mm512_permutexvar_epi16(idx, table));
        }
    }
}

/* four 16-lane partial sums -> the four totals */
AVX512 static inline __m128 reduce4_avx512(__m512 a, __m512 b, __m512 c, __m512 d) {
    __m256 a8 = _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
    __m256 b8 = _mm256_add_ps(_mm512_castps512_ps256(b), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(b), 1)));
    __m256 c8 = _mm256_add_ps(_mm512_castps512_ps256(c), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(c), 1)));
    __m256 d8 = _mm256_add_ps(_mm512_castps512_ps256(d), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(d), 1)));
    __m256 ab = _mm256_hadd_ps(a8, b8), cd = _mm256_hadd_ps(c8, d8);
    __m256 abcd = _mm256_hadd_ps(ab, cd); /* per 128-bit lane: a b c d partials */
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

#define TILE_ROWS_512 6

AVX512 static inline __attribute__((always_inline)) void micro_f32_avx512(const float *x, const float *panel,
                                                                          int64_t in, int NT, float *tile) {
    __m512 acc[TILE_ROWS_512][4];
    for (int t = 0; t < NT; t++)
        for (int o = 0; o < 4; o++) acc[t][o] = _mm512_setzero_ps();
    for (int64_t k = 0; k < in; k += 16) {
        __m512 w0 = _mm512_load_ps(panel + k), w1 = _mm512_load_ps(panel + in + k);
        __m512 w2 = _mm512_load_ps(panel + 2 * in + k), w3 = _mm512_load_ps(panel + 3 * in + k);
        for (int t = 0; t < NT; t++) {
            __m512 xv = _mm512_loadu_ps(x + t * in + k);
            acc[t][0] = _mm512_fmadd_ps(xv, w0, acc[t][0]);
            acc[t][1] = _mm512_fmadd_ps(xv, w1, acc[t][1]);
            acc[t][2] = _mm512_fmadd_ps(xv, w2, acc[t][2]);
            acc[t][3] = _mm512_fmadd_ps(xv, w3, acc[t][3]);
        }
    }
    for (int t = 0; t < NT; t++)
        _mm_storeu_ps(tile + t * PANEL_ROWS, reduce4_avx512(acc[t][0], acc[t][1], acc[t][2], acc[t][3]));
}

AVX512BF16 static inline __attribute__((always_inline)) void micro_bf16_avx512(const uint16_t *x, const uint16_t *panel,
                                                                               int64_t in, int NT, float *tile) {
    __m512 acc[TILE_ROWS_512][4];
    for (int t = 0; t < NT; t++)
        for (int o = 0; o < 4; o++) acc[t][o] = _mm512_setzero_ps();
    for (int64_t k = 0; k < in; k += 32) {
        __m512bh w0 = (__m512bh)_mm512_load_si512((const void *)(panel + k));
        __m512bh w1 = (__m512bh)_mm512_load_si512((const void *)(panel + in + k));
        __m512bh w2 = (__m512bh)_mm512_load_si512((const void *)(panel + 2 * in + k));
        __m512bh w3 = (__m512bh)_mm512_load_si512((const void *)(panel + 3 * in + k));
        for (int t = 0; t < NT; t++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(x + t * in + k));
            acc[t][0] = _mm512_dpbf16_ps(acc[t][0], xv, w0);
            acc[t][1] = _mm512_dpbf16_ps(acc[t][1], xv, w1);
            acc[t][2] = _mm512_dpbf16_ps(acc[t][2], xv, w2);
            acc[t][3] = _mm512_dpbf16_ps(acc[t][3], xv, w3);
        }
    }
    for (int t = 0; t < NT; t++)
        _mm_storeu_ps(tile + t * PANEL_ROWS, reduce4_avx512(acc[t][0], acc[t][1], acc[t][2], acc[t][3]));
}

#define DISPATCH_NT(CALL)                      \
    switch (nt) {                              \
        case 6: CALL(6); break;                \
        case 5: CALL(5); break;                \
        case 4: CALL(4); break;                \
        case 3: CALL(3); break;                \
        case 2: CALL(2); break;                \
        default: CALL(1); break;               \
    }

AVX512 static void panel_rows_f32_avx512(const float *x, int64_t rows, const float *panel, int64_t in, float *tile) {
    for (int64_t t0 = 0; t0 < rows; t0 += TILE_ROWS_512) {
        int nt = rows - t0 < TILE_ROWS_512 ? (int)(rows - t0) : TILE_ROWS_512;
        for (int s = 0; s < PANEL_ROWS; s += 4) {
            const float *xs = x + t0 * in, *ps = panel + s * in;
            float *dst = tile + t0 * PANEL_ROWS + s;
#define CALL_F32(N) micro_f32_avx512(xs, ps, in, N, dst)
            DISPATCH_NT(CALL_F32)
        }
    }
}

AVX512BF16 static void panel_rows_bf16_avx512(const uint16_t *x, int64_t rows, const uint16_t *panel, int64_t in,
                                              float *tile) {
    for (int64_t t0 = 0; t0 < rows; t0 += TILE_ROWS_512) {
        int nt = rows - t0 < TILE_ROWS_512 ? (int)(rows - t0) : TILE_ROWS_512;
        for (int s = 0; s < PANEL_ROWS; s += 4) {
            const uint16_t *xs = x + t0 * in, *ps = panel + s * in;
            float *dst = tile + t0 * PANEL_ROWS + s;
#define CALL_BF16(N) micro_bf16_avx512(xs, ps, in, N, dst)
            DISPATCH_NT(CALL_BF16)
        }
    }
}

AVX512 static float dot_avx512(const float *x, const void *a, int64_t n, int bf16) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t k = 0; k < n; k += 16) {
        __m512 av = bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(
                               _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)a + k))), 16))
                         : _mm512_loadu_ps((const float *)a + k);
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), av, acc);
    }
    return _mm512_reduce_add_ps(acc);
}

AVX512BF16 static float dot_bf16_avx512(const uint16_t *x, const uint16_t *a, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t k = 0; k < n; k += 32)
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512((const void *)(x + k)),
                               (__m512bh)_mm512_loadu_si512((const void *)(a + k)));
    return _mm512_reduce_add_ps(acc);
}

/* ================================================================ AMX (bf16) */

#define AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16")))
#define AMX_TILE_ROWS 16 /* token rows per tile */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

static __thread int tls_tiles_configured = 0;

/* Linux hands out AMX state only to processes that ask (oneDNN asks too); 0 when granted */
int nf4_lora_amx_enable(void) { return (int)syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); }

AMX static void configure_tiles(void) {
    tile_config config = {0};
    config.palette_id = 1;
    for (int t = 0; t < 3; t++) { /* 0: C (16 outputs x 16 rows fp32), 1: A (16 outputs x 32 bf16), 2: B */
        config.rows[t] = 16;
        config.colsb[t] = 64;
    }
    _tile_loadconfig(&config);
    tls_tiles_configured = 1;
}

/* x [rows, in] bf16 -> VNNI tiles: for token tile u and input pair q, 16 dwords (one per
 * row of the tile, zero past the last row) holding x[16u + r][2q], x[16u + r][2q + 1] */
static void pack_x_vnni(const uint16_t *x, int64_t rows, int64_t in, uint32_t *packed) {
    const int64_t tiles = (rows + AMX_TILE_ROWS - 1) / AMX_TILE_ROWS, pairs = in / 2;
    for (int64_t u = 0; u < tiles; u++)
        for (int64_t r = 0; r < AMX_TILE_ROWS; r++) {
            const int64_t row = u * AMX_TILE_ROWS + r;
            const uint32_t *src = (const uint32_t *)(x + row * in);
            uint32_t *dst = packed + u * pairs * AMX_TILE_ROWS + r;
            for (int64_t q = 0; q < pairs; q++) dst[q * AMX_TILE_ROWS] = row < rows ? src[q] : 0;
        }
}

AMX static void panel_rows_amx(const uint32_t *x_vnni, int64_t rows, const uint16_t *panel, int64_t in, float *tile) {
    if (!tls_tiles_configured) configure_tiles();
    float out[PANEL_ROWS * AMX_TILE_ROWS] __attribute__((aligned(64))); /* [output][row] */
    const int64_t pairs = in / 2;
    for (int64_t u = 0; u * AMX_TILE_ROWS < rows; u++) {
        const uint32_t *b = x_vnni + u * pairs * AMX_TILE_ROWS;
        _tile_zero(0);
        for (int64_t k = 0; k < in; k += 32) {
            _tile_loadd(1, panel + k, in * 2);                       /* 16 outputs x 32 inputs */
            _tile_loadd(2, b + (k / 2) * AMX_TILE_ROWS, AMX_TILE_ROWS * 4); /* 16 pairs x 16 rows */
            _tile_dpbf16ps(0, 1, 2);
        }
        _tile_stored(0, out, AMX_TILE_ROWS * 4);
        const int64_t n = rows - u * AMX_TILE_ROWS < AMX_TILE_ROWS ? rows - u * AMX_TILE_ROWS : AMX_TILE_ROWS;
        for (int64_t r = 0; r < n; r++)
            for (int o = 0; o < PANEL_ROWS; o++) tile[(u * AMX_TILE_ROWS + r) * PANEL_ROWS + o] = out[o * AMX_TILE_ROWS + r];
    }
}

AMX static void release_tiles(void) {
    if (tls_tiles_configured) {
        _tile_release();
        tls_tiles_configured = 0;
    }
}

/* ================================================================ the call */

typedef struct {
    int isa, bf16;
    const void *x;       /* [T, in] compute dtype */
    const float *x32;    /* [T, in] float32 view of x (x itself, or its widened copy) */
    const uint32_t *x_vnni; /* AMX: x packed into VNNI tiles */
    int64_t rows, in, out;
    const uint8_t *packed;
    const float *absmax;
    const void *bias;
    void *y;
    int64_t n_parts;
    const lora_part *parts;
    const lora_pairs *const *pairs;
    float *shrunk;       /* per part: [P_p, R_p] float32 */
    int64_t shrunk_offset[MAX_PARTS];
    const float *scale;  /* DoRA: [S, out] float32, rows scale_stride apart (NULL: no row scaled) */
    int64_t scale_stride;
    const int32_t *row_slot; /* [T] the scale row of each token row, -1: not scaled */
} call_args;

static float shrink_one(const call_args *c, const lora_part *part, int64_t row, int64_t slot, int64_t r) {
    const int64_t in = c->in;
    const size_t elem = c->bf16 ? 2 : 4;
    const void *a = (const char *)part->a + ((slot * part->rank + r) * in) * elem;
    if (c->isa >= ISA_AVX512_BF16 && c->bf16)
        return dot_bf16_avx512((const uint16_t *)c->x + row * in, (const uint16_t *)a, in);
    if (c->isa >= ISA_AVX512) return dot_avx512(c->x32 + row * in, a, in, c->bf16);
    return dot_avx2(c->x32 + row * in, a, in, c->bf16);
}

/* dst[0..n) += s * b[0..n) for r ranks: dst[k] += sum_r t[r] * b[r * stride + k], n <= 16 */
static void expand_row_avx2(float *dst, const float *t, const void *b, int64_t stride, int64_t rank, int64_t n,
                            int bf16) {
    float acc[PANEL_ROWS];
    for (int64_t k = 0; k < n; k++) acc[k] = dst[k];
    for (int64_t r = 0; r < rank; r++) {
        const float s = t[r];
        if (s == 0.0f) continue; /* padded ranks */
        if (bf16) {
            const uint16_t *row = (const uint16_t *)b + r * stride;
            for (int64_t k = 0; k < n; k++) acc[k] += s * bf16_to_f32(row[k]);
        } else {
            const float *row = (const float *)b + r * stride;
            for (int64_t k = 0; k < n; k++) acc[k] += s * row[k];
        }
    }
    for (int64_t k = 0; k < n; k++) dst[k] = acc[k];
}

AVX512 static void expand_row_avx512(float *dst, const float *t, const void *b, int64_t stride, int64_t rank,
                                     int64_t n, int bf16) {
    const __mmask16 mask = (__mmask16)((1u << n) - 1);
    __m512 acc = _mm512_maskz_loadu_ps(mask, dst), acc2 = _mm512_setzero_ps();
    int64_t r = 0;
    for (; r + 1 < rank; r += 2) { /* two chains, one per rank parity */
        __m512 b0, b1;
        if (bf16) {
            const uint16_t *row = (const uint16_t *)b + r * stride;
            b0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, row)), 16));
            b1 = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, row + stride)), 16));
        } else {
            b0 = _mm512_maskz_loadu_ps(mask, (const float *)b + r * stride);
            b1 = _mm512_maskz_loadu_ps(mask, (const float *)b + (r + 1) * stride);
        }
        acc = _mm512_fmadd_ps(_mm512_set1_ps(t[r]), b0, acc);
        acc2 = _mm512_fmadd_ps(_mm512_set1_ps(t[r + 1]), b1, acc2);
    }
    if (r < rank) {
        __m512 b0 = bf16 ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                               _mm256_maskz_loadu_epi16(mask, (const uint16_t *)b + r * stride)), 16))
                         : _mm512_maskz_loadu_ps(mask, (const float *)b + r * stride);
        acc = _mm512_fmadd_ps(_mm512_set1_ps(t[r]), b0, acc);
    }
    _mm512_mask_storeu_ps(dst, mask, _mm512_add_ps(acc, acc2));
}

/* tile[t][c - o0] += every LoRA pair's expand over columns [o0, o0 + n) */
static void expand_into(const call_args *c, float *tile, int64_t o0, int64_t n) {
    for (int64_t p = 0; p < c->n_parts; p++) {
        const lora_part *part = &c->parts[p];
        const lora_pairs *pairs = c->pairs[p];
        if (pairs == NULL || pairs->num_pairs == 0) continue;
        const int64_t lo = o0 > part->col_start ? o0 : part->col_start;
        const int64_t hi = o0 + n < part->col_end ? o0 + n : part->col_end;
        if (lo >= hi) continue;
        const int64_t width = part->col_end - part->col_start, rank = part->rank;
        const size_t elem = c->bf16 ? 2 : 4;
        const float *shrunk = c->shrunk + c->shrunk_offset[p];
        for (int64_t t = 0; t < c->rows; t++) {
            float *dst = tile + t * PANEL_ROWS + (lo - o0);
            for (int32_t j = pairs->row_start[t]; j < pairs->row_start[t + 1]; j++) {
                const int64_t slot = pairs->pair_slot[j];
                const int64_t used = part->slot_rank != NULL ? part->slot_rank[slot] : rank;
                const void *b = (const char *)part->bt + ((slot * rank) * width + (lo - part->col_start)) * elem;
                if (c->isa >= ISA_AVX512) expand_row_avx512(dst, shrunk + (int64_t)j * rank, b, width, used, hi - lo, c->bf16);
                else expand_row_avx2(dst, shrunk + (int64_t)j * rank, b, width, used, hi - lo, c->bf16);
            }
        }
    }
}

static void run_panel(const call_args *c, int64_t o0) {
    const int64_t in = c->in, rows = c->rows;
    const int64_t n = c->out - o0 < PANEL_ROWS ? c->out - o0 : PANEL_ROWS;
    const int bf16_panel = c->isa >= ISA_AVX512_BF16 && c->bf16;
    const int64_t panel_bytes = PANEL_ROWS * in * (bf16_panel ? 2 : 4);
    void *panel = grow(&tls_panel, &tls_panel_bytes, panel_bytes);
    float *tile = grow(&tls_tile, &tls_tile_bytes, rows * PANEL_ROWS * 4);
    if (panel == NULL || tile == NULL) abort();
    if (n < PANEL_ROWS) /* a short last panel: its unused rows multiply as zeros */
        memset((char *)panel + n * in * (bf16_panel ? 2 : 4), 0, (PANEL_ROWS - n) * in * (bf16_panel ? 2 : 4));
    for (int64_t r = 0; r < n; r++) {
        const uint8_t *packed = c->packed + (o0 + r) * in / 2;
        const float *absmax = c->absmax + (o0 + r) * in / 64;
        if (bf16_panel) decode_row_bf16_avx512(packed, absmax, in, (uint16_t *)panel + r * in);
        else if (c->isa >= ISA_AVX512) decode_row_f32_avx512(packed, absmax, in, (float *)panel + r * in, c->bf16);
        else decode_row_avx2(packed, absmax, in, (float *)panel + r * in, c->bf16);
    }
    if (bf16_panel && c->isa == ISA_AMX) panel_rows_amx(c->x_vnni, rows, (const uint16_t *)panel, in, tile);
    else if (bf16_panel) panel_rows_bf16_avx512((const uint16_t *)c->x, rows, (const uint16_t *)panel, in, tile);
    else if (c->isa >= ISA_AVX512) panel_rows_f32_avx512(c->x32, rows, (const float *)panel, in, tile);
    else panel_rows_avx2(c->x32, rows, (const float *)panel, in, tile);
    expand_into(c, tile, o0, n);
    for (int64_t t = 0; t < rows; t++) {
        float *src = tile + t * PANEL_ROWS;
        if (c->row_slot != NULL && c->row_slot[t] >= 0) { /* DoRA: the scale before the bias */
            const float *scale = c->scale + c->row_slot[t] * c->scale_stride + o0;
            for (int64_t k = 0; k < n; k++) src[k] *= scale[k];
        }
        if (c->bf16) {
            uint16_t *dst = (uint16_t *)c->y + t * c->out + o0;
            const uint16_t *bias = c->bias ? (const uint16_t *)c->bias + o0 : NULL;
            for (int64_t k = 0; k < n; k++) dst[k] = f32_to_bf16(bias ? src[k] + bf16_to_f32(bias[k]) : src[k]);
        } else {
            float *dst = (float *)c->y + t * c->out + o0;
            const float *bias = c->bias ? (const float *)c->bias + o0 : NULL;
            for (int64_t k = 0; k < n; k++) dst[k] = bias ? src[k] + bias[k] : src[k];
        }
    }
}

/* Returns 0, or -1 for arguments it does not take (in % 64, too many parts). */
int nf4_lora_linear(int64_t isa, int64_t bf16, const void *x, int64_t rows, int64_t in, const uint8_t *packed,
                    const float *absmax, int64_t out, const void *bias, void *y, int64_t n_parts,
                    const lora_part *parts, const lora_pairs *const *pairs, float *shrunk, float *x32_scratch,
                    const float *scale, int64_t scale_stride, const int32_t *row_slot) {
    if (in % 64 != 0 || n_parts > MAX_PARTS || n_parts < 0 || rows < 0) return -1;
    if (row_slot != NULL && scale == NULL) return -1;
    call_args c = {.isa = (int)isa, .bf16 = (int)bf16, .x = x, .x32 = (const float *)x, .x_vnni = NULL,
                   .rows = rows, .in = in, .out = out, .packed = packed, .absmax = absmax, .bias = bias, .y = y,
                   .n_parts = n_parts, .parts = parts, .pairs = pairs, .shrunk = shrunk, .shrunk_offset = {0},
                   .scale = scale, .scale_stride = scale_stride, .row_slot = row_slot};
    if (isa == ISA_AMX && !bf16) c.isa = isa = ISA_AVX512; /* AMX multiplies bf16 only */
    const int widen = bf16 && isa < ISA_AVX512_BF16;
    if (widen) c.x32 = x32_scratch;
    if (isa == ISA_AMX) { /* x32_scratch holds ceil(rows / 16) * 16 * in / 2 dwords (the caller sizes it) */
        pack_x_vnni((const uint16_t *)x, rows, in, (uint32_t *)x32_scratch);
        c.x_vnni = (const uint32_t *)x32_scratch;
    }
    int64_t items = 0; /* (part, pair, r) shrink items */
    for (int64_t p = 0, offset = 0; p < n_parts; p++) {
        c.shrunk_offset[p] = offset;
        if (pairs[p] != NULL) {
            offset += pairs[p]->num_pairs * parts[p].rank;
            items += pairs[p]->num_pairs * parts[p].rank;
        }
    }
    const int64_t panels = (out + PANEL_ROWS - 1) / PANEL_ROWS;
    /* below ~1M multiply-adds a call takes microseconds: a second thread's wake-up costs more */
    const int parallel = panels >= 4 && rows * in * out >= (int64_t)1 << 20;
#pragma omp parallel if (parallel)
    {
        if (widen) {
#pragma omp for schedule(static)
            for (int64_t i = 0; i < rows * in; i++) x32_scratch[i] = bf16_to_f32(((const uint16_t *)x)[i]);
        }
        if (items) {
#pragma omp for schedule(dynamic, 8)
            for (int64_t item = 0; item < items; item++) {
                int64_t p = 0, rest = item;
                while (pairs[p] == NULL || rest >= pairs[p]->num_pairs * parts[p].rank) {
                    if (pairs[p] != NULL) rest -= pairs[p]->num_pairs * parts[p].rank;
                    p++;
                }
                const int64_t j = rest / parts[p].rank, r = rest % parts[p].rank;
                const int32_t slot = pairs[p]->pair_slot[j];
                if (parts[p].slot_rank != NULL && r >= parts[p].slot_rank[slot]) {
                    shrunk[c.shrunk_offset[p] + rest] = 0.0f; /* a padded rank: A's row is zero */
                    continue;
                }
                const float value = shrink_one(&c, &parts[p], pairs[p]->pair_row[j], slot, r);
                shrunk[c.shrunk_offset[p] + rest] = value * pairs[p]->pair_weight[j];
            }
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t panel = 0; panel < panels; panel++) run_panel(&c, panel * PANEL_ROWS);
        if (isa == ISA_AMX) release_tiles();
    }
    return 0;
}

int nf4_lora_kernel_version(void) { return 2; }
