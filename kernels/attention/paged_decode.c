/* Paged decode attention on the CPU: one query per sequence over the keys and values its
 * block table points at, read in place from the block pool (nothing gathered or copied).
 *
 * Semantics (as loraquilt.kernels.paged_attention.paged_attention_reference for one query
 * per sequence at position lens[s] - 1):
 *   keys of sequence s: positions start..lens[s]-1, start = max(0, lens[s] - window) when
 *   window > 0 else 0; position p lives at pool row tables[s, p / block_size] * block_size
 *   + p % block_size.
 *   out[s, h] = sum_p softmax_p(scale * q[s, h] . K[p, h / G]) * V[p, h / G], G = H / KVH.
 * Dot products, softmax and sums in float32 (bf16 pools are widened on load).
 *
 * Layouts (all contiguous, row-major):
 *   q      [S, H, D] float32          out    [S, H, D] float32
 *   k, v   [num_blocks, block_size, KVH, D] float32 or bf16 (uint16 bits)
 *   tables [S, max_blocks] int64      lens   [S] int64, >= 1
 * Work: one task per sequence (its rows read whole, every head at once, a few positions
 * prefetched ahead), spread over the caller's OpenMP threads.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline __m256 load8_f32(const float *p) { return _mm256_loadu_ps(p); }

static inline __m256 load8_bf16(const uint16_t *p) {
    __m128i bits = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

static inline float scalar_f32(const float *p) { return *p; }

static inline float scalar_bf16(const uint16_t *p) {
    uint32_t bits = (uint32_t)*p << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* Pull one position's row (all kv heads) towards the cache ahead of its use: rows of
 * consecutive positions jump between far-apart blocks every block_size positions. */
static inline void prefetch_row(const void *row, int64_t bytes) {
    for (int64_t offset = 0; offset < bytes; offset += 64) _mm_prefetch((const char *)row + offset, _MM_HINT_T0);
}

/* Elements from the pool's start to position pos's row (all kv heads) in a sequence's table. */
static inline int64_t row_offset(const int64_t *table, int64_t pos, int64_t block_size, int64_t row) {
    return (table[pos / block_size] * block_size + pos % block_size) * row;
}

static inline float horizontal_sum(__m256 v) {
    __m128 low = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    low = _mm_hadd_ps(low, low);
    low = _mm_hadd_ps(low, low);
    return _mm_cvtss_f32(low);
}

#define AHEAD 4 /* positions prefetched ahead */

#define DEFINE_PAGED_DECODE(NAME, T, LOAD8, SCALAR)                                              \
    void NAME(const float *q, const T *k, const T *v, const int64_t *tables, int64_t max_blocks,  \
              const int64_t *lens, int64_t num_seqs, int64_t num_heads, int64_t kv_heads,         \
              int64_t head_dim, int64_t block_size, int64_t window, float scale, float *out) {    \
        const int64_t group = num_heads / kv_heads, vec_end = head_dim - head_dim % 8;            \
        const int64_t row = kv_heads * head_dim; /* one position's keys (or values) */            \
        _Pragma("omp parallel") {                                                                 \
            float *scores = NULL; /* [H, n] */                                                    \
            int64_t capacity = 0;                                                                 \
            float *acc = malloc(sizeof(float) * num_heads * head_dim); /* [H, D] */               \
            _Pragma("omp for schedule(dynamic, 2)")                                               \
            for (int64_t s = 0; s < num_seqs; s++) {                                              \
                const int64_t len = lens[s];                                                      \
                const int64_t start = (window > 0 && len > window) ? len - window : 0;            \
                const int64_t n = len - start;                                                    \
                if (n > capacity) {                                                               \
                    free(scores);                                                                 \
                    capacity = n;                                                                 \
                    scores = malloc(sizeof(float) * num_heads * capacity);                        \
                }                                                                                 \
                const float *qs = q + s * num_heads * head_dim;                                   \
                const int64_t *table = tables + s * max_blocks;                                   \
                for (int64_t i = 0; i < n; i++) { /* scores: every head against position i */    \
                    const int64_t pos = start + i;                                                \
                    const T *keys = k + row_offset(table, pos, block_size, row);                   \
                    if (i + AHEAD < n)                                                            \
                        prefetch_row(k + row_offset(table, pos + AHEAD, block_size, row), row * (int64_t)sizeof(T)); \
                    for (int64_t h = 0; h < num_heads; h++) {                                     \
                        const float *qh = qs + h * head_dim;                                      \
                        const T *key = keys + (h / group) * head_dim;                             \
                        __m256 sum8 = _mm256_setzero_ps();                                        \
                        for (int64_t d = 0; d < vec_end; d += 8)                                  \
                            sum8 = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d), LOAD8(key + d), sum8);\
                        float dot = horizontal_sum(sum8);                                         \
                        for (int64_t d = vec_end; d < head_dim; d++) dot += qh[d] * SCALAR(key + d);\
                        scores[h * n + i] = dot * scale;                                          \
                    }                                                                             \
                }                                                                                 \
                for (int64_t h = 0; h < num_heads; h++) { /* softmax per head */                 \
                    float *p = scores + h * n, high = p[0], total = 0.0f;                         \
                    for (int64_t i = 1; i < n; i++) high = p[i] > high ? p[i] : high;             \
                    for (int64_t i = 0; i < n; i++) {                                             \
                        p[i] = expf(p[i] - high);                                                 \
                        total += p[i];                                                            \
                    }                                                                             \
                    const float inverse = 1.0f / total;                                           \
                    for (int64_t i = 0; i < n; i++) p[i] *= inverse;                              \
                }                                                                                 \
                memset(acc, 0, sizeof(float) * num_heads * head_dim);                             \
                for (int64_t i = 0; i < n; i++) { /* acc[h] += p[h, i] * V[i, h / G] */          \
                    const int64_t pos = start + i;                                                \
                    const T *values = v + row_offset(table, pos, block_size, row);                 \
                    if (i + AHEAD < n)                                                            \
                        prefetch_row(v + row_offset(table, pos + AHEAD, block_size, row), row * (int64_t)sizeof(T)); \
                    for (int64_t h = 0; h < num_heads; h++) {                                     \
                        float *ah = acc + h * head_dim;                                           \
                        const T *value = values + (h / group) * head_dim;                         \
                        const float weight = scores[h * n + i];                                   \
                        const __m256 w8 = _mm256_set1_ps(weight);                                 \
                        for (int64_t d = 0; d < vec_end; d += 8)                                  \
                            _mm256_storeu_ps(ah + d, _mm256_fmadd_ps(w8, LOAD8(value + d),        \
                                                                     _mm256_loadu_ps(ah + d)));   \
                        for (int64_t d = vec_end; d < head_dim; d++) ah[d] += weight * SCALAR(value + d);\
                    }                                                                             \
                }                                                                                 \
                memcpy(out + s * num_heads * head_dim, acc, sizeof(float) * num_heads * head_dim); \
            }                                                                                     \
            free(scores);                                                                         \
            free(acc);                                                                            \
        }                                                                                         \
    }

DEFINE_PAGED_DECODE(paged_decode_f32, float, load8_f32, scalar_f32)
DEFINE_PAGED_DECODE(paged_decode_bf16, uint16_t, load8_bf16, scalar_bf16)
