/*
 * Decode attention over dpinfer's paged KV pool (page size 1), fp32, on CPU.
 *
 * Built once per machine by cpu_kernel.py with the system C compiler and called through
 * ctypes. One call computes a whole layer's decode attention: for every request, its one
 * new query (every head) against every token of its KV, reading each token's key and value
 * in place from the pool through the request's row of the request->slot table. No gather
 * copies, no per-request dispatch: that is what the torch path costs on small models.
 *
 * Layouts (all contiguous):
 *   q     [num_reqs, num_heads, head_dim]      the new tokens' queries (rotary applied)
 *   k, v  [num_slots + 1, num_kv_heads, head_dim]   one layer of the pool
 *   table [*, table_stride]                    slot of token t of a request: table[row][t]
 *   rows, lens [num_reqs]                      each request's table row and KV length
 *   out   [num_reqs, num_heads, head_dim]
 *
 * Grouped-query attention: query head h reads KV head h / (num_heads / num_kv_heads).
 * Softmax is exact (max-subtracted, fp32 accumulation), as in scaled_dot_product_attention.
 * Returns 0, or -1 when a request's score buffer could not be allocated (out is then
 * incomplete and the caller raises).
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Widest head the vector path takes (head_dim <= 8 * MAX_CHUNKS); wider ones go scalar. */
#define MAX_CHUNKS 32


/* Eight floats; loads and stores through memcpy are unaligned-safe and compile to one
 * vector move (two on 128-bit machines). */
typedef float v8 __attribute__((vector_size(32)));

static inline v8 load8(const float *p)
{
    v8 x;
    memcpy(&x, p, sizeof x);
    return x;
}

static inline float hsum8(v8 x)
{
    return ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7]));
}

/* Tokens ahead whose key or value rows are fetched early: a request's slots are scattered
 * through the pool (its decode tokens one per step), beyond the hardware prefetcher. */
#define PREFETCH 8

static inline void prefetch_row(const float *row, int64_t head_dim)
{
    for (int64_t at = 0; at < head_dim; at += 16) /* one 64-byte line per 16 floats */
        __builtin_prefetch(row + at);
}

typedef int32_t v8i __attribute__((vector_size(32)));

/* exp(x) for x <= 0 (scores minus their maximum), eight at a time: x = n ln2 + r with
 * |r| <= ln2 / 2, exp(r) by Cephes' degree-7 polynomial (relative error about 1e-7, as
 * libm's expf), times 2^n built from its exponent bits. Below -87 it returns exp(-87). */
static inline v8 exp8_nonpositive(v8 x)
{
    const v8i low = x < -87.0f; /* lanes: -1 where true */
    x = (v8)(((v8i)x & ~low) | ((v8i)(x - x - 87.0f) & low));
    const v8 y = x * 1.44269504088896341f + 0.5f;
    const v8 t = __builtin_convertvector(__builtin_convertvector(y, v8i), v8); /* toward 0 */
    const v8 n = t + __builtin_convertvector(t > y, v8);                        /* floor */
    const v8 r = x - n * 0.693359375f + n * 2.12194440e-4f;
    v8 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const v8 e = p * r * r + r + 1.0f;
    const v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
    return e * (v8)bits;
}

/* The same for one float (the last few scores of a request). */
static inline float exp_nonpositive(float x)
{
    v8 in = {x};
    return exp8_nonpositive(in)[0];
}

/* Softmax weights of ``s[0:len]`` in place (unnormalised); returns their sum. */
static inline float softmax_unnormalised(float *s, int64_t len)
{
    float top = s[0];
    for (int64_t i = 1; i < len; ++i)
        top = s[i] > top ? s[i] : top;
    v8 sum8 = {0};
    int64_t i = 0;
    for (; i + 8 <= len; i += 8) {
        const v8 e = exp8_nonpositive(load8(s + i) - top);
        memcpy(s + i, &e, sizeof e);
        sum8 += e;
    }
    float sum = hsum8(sum8);
    for (; i < len; ++i) {
        s[i] = exp_nonpositive(s[i] - top);
        sum += s[i];
    }
    return sum;
}

/* One query head of one request against its ``len`` tokens, ``head_dim`` a multiple of 8
 * (a constant where inlined for the common sizes, so the accumulators live in registers).
 * Scores go to ``s``; the head's output to ``oh``. */
static inline __attribute__((always_inline)) void
attend_head(const float *restrict qh, const float *restrict kh, const float *restrict vh,
            const int64_t *restrict slots, int64_t len, int64_t slot_elems, int64_t head_dim,
            float scale, float *restrict oh, float *restrict s)
{
    const int64_t chunks = head_dim / 8;
    /* Scores four tokens at a time: four independent dot products keep the FMA units busy. */
    int64_t j = 0;
    for (; j + 4 <= len; j += 4) {
        const float *k0 = kh + slots[j] * slot_elems, *k1 = kh + slots[j + 1] * slot_elems;
        const float *k2 = kh + slots[j + 2] * slot_elems, *k3 = kh + slots[j + 3] * slot_elems;
        if (j + PREFETCH + 4 <= len)
            for (int64_t t = j + PREFETCH; t < j + PREFETCH + 4; ++t)
                prefetch_row(kh + slots[t] * slot_elems, head_dim);
        v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        for (int64_t c = 0; c < chunks; ++c) {
            const v8 qv = load8(qh + 8 * c);
            a0 += qv * load8(k0 + 8 * c);
            a1 += qv * load8(k1 + 8 * c);
            a2 += qv * load8(k2 + 8 * c);
            a3 += qv * load8(k3 + 8 * c);
        }
        s[j] = hsum8(a0) * scale;
        s[j + 1] = hsum8(a1) * scale;
        s[j + 2] = hsum8(a2) * scale;
        s[j + 3] = hsum8(a3) * scale;
    }
    for (; j < len; ++j) {
        const float *kr = kh + slots[j] * slot_elems;
        v8 a = {0};
        for (int64_t c = 0; c < chunks; ++c)
            a += load8(qh + 8 * c) * load8(kr + 8 * c);
        s[j] = hsum8(a) * scale;
    }

    const float sum = softmax_unnormalised(s, len);

    /* Values: the head's output accumulates in registers while the tokens stream by. */
    v8 acc[MAX_CHUNKS] = {{0}};
    for (int64_t i = 0; i < len; ++i) {
        const float *vr = vh + slots[i] * slot_elems;
        if (i + PREFETCH < len)
            prefetch_row(vh + slots[i + PREFETCH] * slot_elems, head_dim);
        const float p = s[i];
        for (int64_t c = 0; c < chunks; ++c)
            acc[c] += p * load8(vr + 8 * c);
    }
    const float inv = 1.0f / sum;
    for (int64_t c = 0; c < chunks; ++c) {
        const v8 o = acc[c] * inv;
        memcpy(oh + 8 * c, &o, sizeof o);
    }
}

/* The same for any ``head_dim``, one float at a time. */
static void attend_head_scalar(const float *qh, const float *kh, const float *vh,
                               const int64_t *slots, int64_t len, int64_t slot_elems,
                               int64_t head_dim, float scale, float *oh, float *s)
{
    for (int64_t j = 0; j < len; ++j) {
        const float *kr = kh + slots[j] * slot_elems;
        float acc = 0.0f;
        for (int64_t d = 0; d < head_dim; ++d)
            acc += qh[d] * kr[d];
        s[j] = acc * scale;
    }
    const float sum = softmax_unnormalised(s, len);
    for (int64_t d = 0; d < head_dim; ++d)
        oh[d] = 0.0f;
    for (int64_t j = 0; j < len; ++j) {
        const float *vr = vh + slots[j] * slot_elems;
        for (int64_t d = 0; d < head_dim; ++d)
            oh[d] += s[j] * vr[d];
    }
    for (int64_t d = 0; d < head_dim; ++d)
        oh[d] /= sum;
}

/* One request, every query head (query head h reads KV head h / group). A KV head's rows
 * are read once per query head of its group; the later reads come from cache. */
static void attend_request(const float *qb, const float *k, const float *v, const int64_t *slots,
                           int64_t len, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                           float scale, float *ob, float *s)
{
    const int64_t group = num_heads / num_kv_heads;
    const int64_t slot_elems = num_kv_heads * head_dim;
    for (int64_t h = 0; h < num_heads; ++h) {
        const float *qh = qb + h * head_dim, *kh = k + (h / group) * head_dim;
        const float *vh = v + (h / group) * head_dim;
        float *oh = ob + h * head_dim;
        if (head_dim == 64)
            attend_head(qh, kh, vh, slots, len, slot_elems, 64, scale, oh, s);
        else if (head_dim == 128)
            attend_head(qh, kh, vh, slots, len, slot_elems, 128, scale, oh, s);
        else if (head_dim % 8 == 0 && head_dim <= 8 * MAX_CHUNKS)
            attend_head(qh, kh, vh, slots, len, slot_elems, head_dim, scale, oh, s);
        else
            attend_head_scalar(qh, kh, vh, slots, len, slot_elems, head_dim, scale, oh, s);
    }
}

int dpinfer_decode_attention_f32(const float *q, const float *k, const float *v,
                                 const int64_t *table, int64_t table_stride, const int64_t *rows,
                                 const int64_t *lens, int64_t num_reqs, int64_t num_heads,
                                 int64_t num_kv_heads, int64_t head_dim, float scale, float *out,
                                 int num_threads)
{
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) if (num_threads > 1) \
    reduction(| : failed)
    for (int64_t b = 0; b < num_reqs; ++b) {
        const int64_t len = lens[b];
        float *scores = malloc(sizeof(float) * (size_t)(len > 0 ? len : 1));
        if (scores == NULL || len <= 0) {
            failed |= 1;
            free(scores);
            continue;
        }
        attend_request(q + b * num_heads * head_dim, k, v, table + rows[b] * table_stride, len,
                       num_heads, num_kv_heads, head_dim, scale, out + b * num_heads * head_dim,
                       scores);
        free(scores);
    }
    return failed ? -1 : 0;
}
