/* The small per-layer operations around the projections, one call each instead of a
 * chain of torch ops: residual add + RMSNorm, and rotary embedding of q and k in place.
 *
 * Semantics (kernels/layer_ops.py's torch versions compute the same, op by op; for bf16
 * every op's result is rounded to bf16 where torch's bf16 op rounds it):
 *   add_rms_norm: residual[t] = round(residual[t] + delta[t])          (delta may be NULL)
 *                 r = 1 / sqrt(mean(float(residual[t])^2) + eps)
 *                 out[t] = round(weight * round(residual[t] * r))
 *   rotary:       for x in q heads and k heads of row t, i < D/2:
 *                 x1' = round(round(x1 * cos[t,i]) - round(x2 * sin[t,i]))
 *                 x2' = round(round(x2 * cos[t,i+D/2]) + round(x1 * sin[t,i+D/2]))
 * Rows are independent; large calls split rows over OpenMP threads.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

static inline float bf16_to_f32(uint16_t v) {
    union { uint32_t u; float f; } bits = {(uint32_t)v << 16};
    return bits.f;
}

static inline uint16_t f32_to_bf16(float value) {
    union { float f; uint32_t u; } bits = {value};
    return (uint16_t)((bits.u + 0x7FFF + ((bits.u >> 16) & 1)) >> 16);
}

static inline float rnd(float value, int bf16) { return bf16 ? bf16_to_f32(f32_to_bf16(value)) : value; }

static inline float load(const void *base, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

static inline void store(void *base, int64_t i, float value, int bf16) {
    if (bf16) ((uint16_t *)base)[i] = f32_to_bf16(value);
    else ((float *)base)[i] = value;
}

#define PARALLEL_MIN_VALUES (1 << 16) /* below this, one thread: a fork costs more than the work */

static void add_rms_norm_rows(int bf16, void *residual, const void *delta, const void *weight, void *out,
                              int64_t rows, int64_t hidden, float eps) {
#pragma omp parallel for schedule(static) if (rows * hidden >= PARALLEL_MIN_VALUES)
    for (int64_t t = 0; t < rows; t++) {
        const int64_t base = t * hidden;
        float squares = 0.0f;
        if (delta != NULL) {
            for (int64_t i = 0; i < hidden; i++) {
                const float value = rnd(load(residual, base + i, bf16) + load(delta, base + i, bf16), bf16);
                store(residual, base + i, value, bf16);
                squares += value * value;
            }
        } else {
            for (int64_t i = 0; i < hidden; i++) {
                const float value = load(residual, base + i, bf16);
                squares += value * value;
            }
        }
        const float scale = 1.0f / sqrtf(squares / (float)hidden + eps);
        for (int64_t i = 0; i < hidden; i++) {
            const float normed = rnd(load(residual, base + i, bf16) * scale, bf16);
            store(out, base + i, load(weight, i, bf16) * normed, bf16);
        }
    }
}

void layer_add_rms_norm(int64_t bf16, void *residual, const void *delta, const void *weight, void *out,
                        int64_t rows, int64_t hidden, float eps) {
    add_rms_norm_rows((int)bf16, residual, delta, weight, out, rows, hidden, eps);
}

static inline void rotate_head(void *x, int64_t at, const void *cos, const void *sin, int64_t trig, int64_t half,
                               int bf16) {
    for (int64_t i = 0; i < half; i++) {
        const float x1 = load(x, at + i, bf16), x2 = load(x, at + i + half, bf16);
        const float c1 = load(cos, trig + i, bf16), s1 = load(sin, trig + i, bf16);
        const float c2 = load(cos, trig + i + half, bf16), s2 = load(sin, trig + i + half, bf16);
        store(x, at + i, rnd(x1 * c1, bf16) - rnd(x2 * s1, bf16), bf16);
        store(x, at + i + half, rnd(x2 * c2, bf16) + rnd(x1 * s2, bf16), bf16);
    }
}

/* q: rows of q_stride values holding q_heads heads of head_dim from its start; k alike */
void layer_rotary(int64_t bf16, void *q, int64_t q_stride, int64_t q_heads, void *k, int64_t k_stride,
                  int64_t k_heads, const void *cos, const void *sin, int64_t rows, int64_t head_dim) {
    const int64_t half = head_dim / 2;
#pragma omp parallel for schedule(static) if (rows * (q_heads + k_heads) * head_dim >= PARALLEL_MIN_VALUES)
    for (int64_t t = 0; t < rows; t++) {
        for (int64_t h = 0; h < q_heads; h++)
            rotate_head(q, t * q_stride + h * head_dim, cos, sin, t * head_dim, half, (int)bf16);
        for (int64_t h = 0; h < k_heads; h++)
            rotate_head(k, t * k_stride + h * head_dim, cos, sin, t * head_dim, half, (int)bf16);
    }
}

int layer_ops_version(void) { return 1; }
