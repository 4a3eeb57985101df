/* NF4 dequantization for the CPU (bitsandbytes layout: blocksize 64, two codes per byte,
 * the first value of a pair in the high nibble), vectorized with AVX2 and parallel over
 * blocks with OpenMP.
 *
 * Semantics (what the pure-torch reference and bitsandbytes' own kernel compute):
 *   out[i] = NF4_CODE[code(i)] * absmax[i / 64]              (float32, exact product)
 *   out_bf16[i] = round_to_nearest_even_bf16(that product)
 *
 * Built at first use by kernels/nf4_native.py and linked against the OpenMP runtime that
 * torch has already loaded (same soname), so the process never holds two of them.
 */
#include <immintrin.h>
#include <stdint.h>

static const float NF4_CODE[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

/* 16 codes (8 packed bytes) -> 16 floats, scaled */
static inline void decode16(const uint8_t *src, __m256 lut_lo, __m256 lut_hi, __m256 scale,
                            __m256 *first, __m256 *second) {
    __m128i bytes = _mm_loadl_epi64((const __m128i *)src);
    __m128i mask = _mm_set1_epi8(0x0F);
    __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    __m128i lo = _mm_and_si128(bytes, mask);
    __m128i codes = _mm_unpacklo_epi8(hi, lo); /* hi0 lo0 hi1 lo1 ... : element order */
    __m256i idx0 = _mm256_cvtepu8_epi32(codes);
    __m256i idx1 = _mm256_cvtepu8_epi32(_mm_srli_si128(codes, 8));
    __m256 v0 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lut_lo, idx0), _mm256_permutevar8x32_ps(lut_hi, idx0),
                                 _mm256_castsi256_ps(_mm256_slli_epi32(idx0, 28)));
    __m256 v1 = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lut_lo, idx1), _mm256_permutevar8x32_ps(lut_hi, idx1),
                                 _mm256_castsi256_ps(_mm256_slli_epi32(idx1, 28)));
    *first = _mm256_mul_ps(v0, scale);
    *second = _mm256_mul_ps(v1, scale);
}

/* 8 floats -> 8 bf16, round to nearest even (inputs are finite) */
static inline __m128i to_bf16(__m256 values) {
    __m256i bits = _mm256_castps_si256(values);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    bits = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
    bits = _mm256_srli_epi32(bits, 16);
    __m256i packed = _mm256_packus_epi32(bits, bits); /* per lane: 4 values twice */
    packed = _mm256_permute4x64_epi64(packed, 0x08); /* lanes' first halves together */
    return _mm256_castsi256_si128(packed);
}

static inline float scalar_code(const uint8_t *packed, int64_t i) {
    uint8_t byte = packed[i >> 1];
    return NF4_CODE[(i & 1) ? (byte & 0x0F) : (byte >> 4)];
}

static inline uint16_t scalar_bf16(float value) {
    union { float f; uint32_t u; } bits = {value};
    uint32_t rounded = bits.u + 0x7FFF + ((bits.u >> 16) & 1);
    return (uint16_t)(rounded >> 16);
}

/* n values into out (float32, or bf16 when `bf16`); n need not be a multiple of 64 (the
 * tail block is done value by value). The `bf16` test is the same for every block, so the
 * branch predictor never misses it. */
static inline void dequantize(const uint8_t *packed, const float *absmax, void *out, int64_t n, int bf16) {
    const int64_t blocks = n / 64;
    const __m256 lut_lo = _mm256_loadu_ps(NF4_CODE), lut_hi = _mm256_loadu_ps(NF4_CODE + 8);
#pragma omp parallel for schedule(static) if (blocks >= 256)
    for (int64_t b = 0; b < blocks; b++) {
        const __m256 scale = _mm256_set1_ps(absmax[b]);
        const uint8_t *src = packed + b * 32;
        for (int j = 0; j < 4; j++) {
            __m256 first, second;
            decode16(src + 8 * j, lut_lo, lut_hi, scale, &first, &second);
            const int64_t at = b * 64 + 16 * j;
            if (bf16) {
                _mm_storeu_si128((__m128i *)((uint16_t *)out + at), to_bf16(first));
                _mm_storeu_si128((__m128i *)((uint16_t *)out + at + 8), to_bf16(second));
            } else {
                _mm256_storeu_ps((float *)out + at, first);
                _mm256_storeu_ps((float *)out + at + 8, second);
            }
        }
    }
    for (int64_t i = blocks * 64; i < n; i++) {
        const float value = scalar_code(packed, i) * absmax[i / 64];
        if (bf16) ((uint16_t *)out)[i] = scalar_bf16(value);
        else ((float *)out)[i] = value;
    }
}

void nf4_dequantize_f32(const uint8_t *packed, const float *absmax, float *out, int64_t n) {
    dequantize(packed, absmax, out, n, 0);
}

void nf4_dequantize_bf16(const uint8_t *packed, const float *absmax, uint16_t *out, int64_t n) {
    dequantize(packed, absmax, out, n, 1);
}

int nf4_kernel_version(void) { return 1; }
