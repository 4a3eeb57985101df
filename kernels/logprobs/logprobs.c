/* Scoring rows of logits (log probabilities of chosen tokens, their ranks and each row's
 * top k), one read of a row for the maximum, the rank count and the top k, one more (the
 * row is then in cache) for the sum of exponentials: torch's logsumexp, topk and a
 * compare-and-count are three to four passes and a [M, V] temporary.
 *
 * Semantics (kernels/logprobs/reference.py computes the same with torch ops):
 *   lse        = max + log(sum_v exp(x[v] - max))
 *   target_lp  = x[target] - lse;  rank = 1 + #{v: x[v] > x[target]}
 *   top        = the k largest x, largest first (ties: lower index first), minus lse
 *   a row holding NaN or +inf gets target_lp = NaN.
 * exp is a degree-6 polynomial on [-ln2/2, ln2/2] after range reduction (relative error
 * under 2e-7); arguments below -87.3 give 0. Rows are independent; large calls split rows
 * over OpenMP threads.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define PARALLEL_MIN_VALUES (1 << 18) /* below this, one thread: a fork costs more than the work */
#define MAX_TOP 64

static inline __m256 exp_ps(__m256 x) {
    const __m256 low = _mm256_set1_ps(-87.3f);
    const __m256 underflow = _mm256_cmp_ps(x, low, _CMP_LT_OQ);
    x = _mm256_max_ps(x, low);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  /* x - n ln2, in two parts */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(scale)));
}

/* insert (value, index) into the sorted top list of `count` (< k or replacing the last) */
static inline void top_insert(float *values, int64_t *ids, int64_t *count, int64_t k, float value, int64_t index) {
    int64_t at = *count < k ? (*count)++ : k - 1;
    while (at > 0 && values[at - 1] < value) {  /* strict: an equal earlier one stays ahead */
        values[at] = values[at - 1];
        ids[at] = ids[at - 1];
        at--;
    }
    values[at] = value;
    ids[at] = index;
}

static void score_row(const float *x, int64_t vocab, int64_t target, int64_t k, float *target_lp, int64_t *rank,
                      int64_t *top_ids, float *top_lp) {
    const float chosen = x[target];
    const __m256 chosen8 = _mm256_set1_ps(chosen);
    __m256 max8 = _mm256_set1_ps(-INFINITY);
    __m256 bad8 = _mm256_setzero_ps();  /* lanes that saw NaN */
    int64_t above = 0, count = 0;
    float values[MAX_TOP], threshold = -INFINITY;
    int64_t ids[MAX_TOP];
    int64_t v = 0;
    for (; v + 8 <= vocab; v += 8) {
        const __m256 x8 = _mm256_loadu_ps(x + v);
        max8 = _mm256_max_ps(max8, x8);
        bad8 = _mm256_or_ps(bad8, _mm256_cmp_ps(x8, x8, _CMP_UNORD_Q));
        above += __builtin_popcount(_mm256_movemask_ps(_mm256_cmp_ps(x8, chosen8, _CMP_GT_OQ)));
        if (k) {
            int mask = _mm256_movemask_ps(_mm256_cmp_ps(x8, _mm256_set1_ps(threshold), _CMP_GT_OQ));
            if (count < k) mask = 0xFF & ~_mm256_movemask_ps(_mm256_cmp_ps(x8, x8, _CMP_UNORD_Q));
            while (mask) {
                const int lane = __builtin_ctz(mask);
                mask &= mask - 1;
                if (count < k || x[v + lane] > threshold) {
                    top_insert(values, ids, &count, k, x[v + lane], v + lane);
                    if (count == k) threshold = values[k - 1];
                }
            }
        }
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, max8);
    float max = -INFINITY;
    for (int i = 0; i < 8; i++) max = lanes[i] > max ? lanes[i] : max;
    int bad = _mm256_movemask_ps(bad8) != 0;
    for (; v < vocab; v++) {
        const float value = x[v];
        if (value != value) { bad = 1; continue; }
        max = value > max ? value : max;
        above += value > chosen;
        if (k && (count < k || value > threshold)) {
            top_insert(values, ids, &count, k, value, v);
            if (count == k) threshold = values[k - 1];
        }
    }
    float lse = NAN;
    if (!bad && isfinite(max)) {
        const __m256 shift = _mm256_set1_ps(max);
        __m256d low = _mm256_setzero_pd(), high = _mm256_setzero_pd();  /* double sums: no drift over the row */
        for (v = 0; v + 8 <= vocab; v += 8) {
            const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(x + v), shift));
            low = _mm256_add_pd(low, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
            high = _mm256_add_pd(high, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
        }
        double halves[4];
        _mm256_storeu_pd(halves, _mm256_add_pd(low, high));
        double sum = halves[0] + halves[1] + halves[2] + halves[3];
        for (; v < vocab; v++) sum += expf(x[v] - max);
        lse = max + (float)log(sum);
    }
    *target_lp = chosen - lse;
    *rank = above + 1;
    for (int64_t i = 0; i < k; i++) {
        top_ids[i] = i < count ? ids[i] : 0;
        top_lp[i] = i < count ? values[i] - lse : NAN;
    }
}

/* logits: rows x vocab float32 (row stride `stride`); targets: rows int64; outputs as in
 * the semantics, top_ids / top_lp rows of k */
void score_rows(const float *logits, int64_t rows, int64_t vocab, int64_t stride, const int64_t *targets, int64_t k,
                float *target_lp, int64_t *rank, int64_t *top_ids, float *top_lp) {
#pragma omp parallel for schedule(static) if (rows * vocab >= PARALLEL_MIN_VALUES)
    for (int64_t m = 0; m < rows; m++)
        score_row(logits + m * stride, vocab, targets[m], k, target_lp + m, rank + m, top_ids + m * k, top_lp + m * k);
}

int logprobs_version(void) { return 1; }
