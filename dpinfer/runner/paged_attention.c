/*
 * Decode attention over dpinfer's paged KV pool (page size 1), on CPU: the pool in fp32 or
 * bfloat16, queries, softmax and output in fp32.
 *
 * Built once per machine by cpu_kernel.py with the system C compiler and called through
 * ctypes. One call computes a whole layer's decode attention: for every request, its one
 * new query (every head) against every token of its KV, reading each token's key and value
 * in place from the pool through the request's row of the request->slot table. No gather
 * copies, no per-request dispatch: that is what the torch path costs on small models.
 *
 * Layouts (all contiguous):
 *   q     [num_reqs, num_heads, head_dim]      the new tokens' queries (rotary applied)
 *   k, v  [num_slots + 1, num_kv_heads, head_dim]   one layer of the pool (fp32 or bf16)
 *   table [*, table_stride]                    slot of token t of a request: table[row][t]
 *   rows, lens [num_reqs]                      each request's table row and KV length
 *   out   [num_reqs, num_heads, head_dim]
 *
 * Grouped-query attention: query head h reads KV head h / (num_heads / num_kv_heads).
 * Softmax is exact (max-subtracted, fp32 accumulation), as in scaled_dot_product_attention.
 * Returns 0, or -1 when a request's work buffer could not be allocated (out is then
 * incomplete and the caller raises).
 *
 * Where the time goes: a decode step reads every running request's whole KV, so the
 * kernel is bound by memory bandwidth once the pool outgrows the caches; it reads the
 * pool in slot order (token-major, every head of a row at once) and prefetches the rows
 * of a request's scattered decode tokens ahead of use.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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

/* Key and value elements are fp32, or bfloat16 (``bf16``, a constant in every inlined copy):
 * the upper half of an fp32, so widening one is a 16-bit shift. Offsets count elements. */
typedef uint16_t v8h __attribute__((vector_size(16)));
typedef uint32_t v8u __attribute__((vector_size(32)));

static inline __attribute__((always_inline)) v8 load_kv8(const void *base, int64_t at, int bf16)
{
    if (bf16) {
        v8h x;
        memcpy(&x, (const uint16_t *)base + at, sizeof x);
        return (v8)(__builtin_convertvector(x, v8u) << 16);
    }
    return load8((const float *)base + at);
}

static inline __attribute__((always_inline)) float load_kv(const void *base, int64_t at, int bf16)
{
    if (bf16) {
        const uint32_t bits = (uint32_t)((const uint16_t *)base)[at] << 16;
        float f;
        memcpy(&f, &bits, sizeof f);
        return f;
    }
    return ((const float *)base)[at];
}

static inline __attribute__((always_inline)) void prefetch_kv(const void *base, int64_t at,
                                                              int64_t elems, int bf16)
{
    const char *row = (const char *)base + at * (bf16 ? 2 : 4);
    for (int64_t off = 0; off < elems * (bf16 ? 2 : 4); off += 64) /* one line at a time */
        __builtin_prefetch(row + off);
}

/* The element offset of token ``j``'s row, the row ``PREFETCH`` tokens ahead fetched early. */
static inline __attribute__((always_inline)) int64_t row_at(const void *base,
                                                            const int64_t *slots, int64_t j,
                                                            int64_t len, int64_t slot_elems,
                                                            int bf16)
{
    if (j + PREFETCH < len)
        prefetch_kv(base, slots[j + PREFETCH] * slot_elems, slot_elems, bf16);
    return slots[j] * slot_elems;
}

/* One request, every query head, ``head_dim`` a multiple of 8 (a constant where inlined
 * for the common sizes). Token-major: each token's key row (every KV head) is read once,
 * for every query head, then its value row likewise, so the pool streams through memory
 * in slot order; query head h reads KV head h / group. ``s`` holds ``num_heads * len``
 * scores, ``acc`` ``num_heads * head_dim`` partial outputs. */
static inline __attribute__((always_inline)) void
attend_vector(const float *restrict qb, const void *k, const void *v,
              const int64_t *restrict slots, int64_t len, int64_t num_heads, int64_t num_kv_heads,
              int64_t head_dim, float scale, float *restrict ob, float *restrict s,
              float *restrict acc, int bf16)
{
    const int64_t group = num_heads / num_kv_heads, chunks = head_dim / 8;
    const int64_t slot_elems = num_kv_heads * head_dim;
    for (int64_t j = 0; j < len; ++j) {
        const int64_t row = row_at(k, slots, j, len, slot_elems, bf16);
        for (int64_t h = 0; h < num_heads; ++h) {
            const int64_t kh = row + (h / group) * head_dim;
            const float *qh = qb + h * head_dim;
            v8 a = {0}, b = {0}; /* two chains: half the latency of one */
            int64_t c = 0;
            for (; c + 2 <= chunks; c += 2) {
                a += load8(qh + 8 * c) * load_kv8(k, kh + 8 * c, bf16);
                b += load8(qh + 8 * c + 8) * load_kv8(k, kh + 8 * c + 8, bf16);
            }
            if (c < chunks)
                a += load8(qh + 8 * c) * load_kv8(k, kh + 8 * c, bf16);
            s[h * len + j] = hsum8(a + b) * scale;
        }
    }
    for (int64_t h = 0; h < num_heads; ++h)
        acc[h] = 1.0f / softmax_unnormalised(s + h * len, len);
    float *out = acc + num_heads; /* [num_heads, head_dim] */
    memset(out, 0, sizeof(float) * (size_t)(num_heads * head_dim));
    for (int64_t j = 0; j < len; ++j) {
        const int64_t row = row_at(v, slots, j, len, slot_elems, bf16);
        for (int64_t h = 0; h < num_heads; ++h) {
            const int64_t vh = row + (h / group) * head_dim;
            float *oh = out + h * head_dim;
            const float p = s[h * len + j];
            for (int64_t c = 0; c < chunks; ++c) {
                const v8 o = load8(oh + 8 * c) + p * load_kv8(v, vh + 8 * c, bf16);
                memcpy(oh + 8 * c, &o, sizeof o);
            }
        }
    }
    for (int64_t h = 0; h < num_heads; ++h)
        for (int64_t c = 0; c < chunks; ++c) {
            const v8 o = load8(out + h * head_dim + 8 * c) * acc[h];
            memcpy(ob + h * head_dim + 8 * c, &o, sizeof o);
        }
}

/* The same for any ``head_dim``, one query head, one float at a time. */
static inline __attribute__((always_inline)) void
attend_head_scalar(const float *qh, const void *k, const void *v, int64_t head_off,
                   const int64_t *slots, int64_t len, int64_t slot_elems, int64_t head_dim,
                   float scale, float *oh, float *s, int bf16)
{
    for (int64_t j = 0; j < len; ++j) {
        const int64_t kr = slots[j] * slot_elems + head_off;
        float acc = 0.0f;
        for (int64_t d = 0; d < head_dim; ++d)
            acc += qh[d] * load_kv(k, kr + d, bf16);
        s[j] = acc * scale;
    }
    const float sum = softmax_unnormalised(s, len);
    for (int64_t d = 0; d < head_dim; ++d)
        oh[d] = 0.0f;
    for (int64_t j = 0; j < len; ++j) {
        const int64_t vr = slots[j] * slot_elems + head_off;
        for (int64_t d = 0; d < head_dim; ++d)
            oh[d] += s[j] * load_kv(v, vr + d, bf16);
    }
    for (int64_t d = 0; d < head_dim; ++d)
        oh[d] /= sum;
}

/* One request: the vector path (unrolled for head sizes 64 and 128), else one float at a
 * time, one query head after another. ``work`` holds ``workspace_floats`` floats. */
static inline __attribute__((always_inline)) void
attend_request(const float *qb, const void *k, const void *v, const int64_t *slots, int64_t len,
               int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float scale, float *ob,
               float *work, int bf16)
{
    float *s = work, *acc = work + num_heads * len;
    if (head_dim == 64)
        attend_vector(qb, k, v, slots, len, num_heads, num_kv_heads, 64, scale, ob, s, acc, bf16);
    else if (head_dim == 128)
        attend_vector(qb, k, v, slots, len, num_heads, num_kv_heads, 128, scale, ob, s, acc, bf16);
    else if (head_dim % 8 == 0)
        attend_vector(qb, k, v, slots, len, num_heads, num_kv_heads, head_dim, scale, ob, s, acc,
                      bf16);
    else {
        const int64_t group = num_heads / num_kv_heads, slot_elems = num_kv_heads * head_dim;
        for (int64_t h = 0; h < num_heads; ++h)
            attend_head_scalar(qb + h * head_dim, k, v, (h / group) * head_dim, slots, len,
                               slot_elems, head_dim, scale, ob + h * head_dim, s, bf16);
    }
}

/* The two element types as separate functions, so each inlined copy knows its own. */
static void attend_request_f32(const float *qb, const void *k, const void *v, const int64_t *slots,
                               int64_t len, int64_t num_heads, int64_t num_kv_heads,
                               int64_t head_dim, float scale, float *ob, float *work)
{
    attend_request(qb, k, v, slots, len, num_heads, num_kv_heads, head_dim, scale, ob, work, 0);
}

static void attend_request_bf16(const float *qb, const void *k, const void *v,
                                const int64_t *slots, int64_t len, int64_t num_heads,
                                int64_t num_kv_heads, int64_t head_dim, float scale, float *ob,
                                float *work)
{
    attend_request(qb, k, v, slots, len, num_heads, num_kv_heads, head_dim, scale, ob, work, 1);
}

static size_t workspace_floats(int64_t len, int64_t num_heads, int64_t head_dim)
{
    return (size_t)(num_heads * len + num_heads + num_heads * head_dim);
}

/* The entry point: ``kv_bf16`` nonzero when ``k`` and ``v`` hold bfloat16, else fp32
 * (queries and output are fp32 either way). */
int dpinfer_decode_attention(const float *q, const void *k, const void *v, const int64_t *table,
                             int64_t table_stride, const int64_t *rows, const int64_t *lens,
                             int64_t num_reqs, int64_t num_heads, int64_t num_kv_heads,
                             int64_t head_dim, float scale, float *out, int num_threads,
                             int kv_bf16)
{
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads) if (num_threads > 1) \
    reduction(| : failed)
    for (int64_t b = 0; b < num_reqs; ++b) {
        const int64_t len = lens[b];
        float *work = len > 0 ? malloc(sizeof(float) * workspace_floats(len, num_heads, head_dim)) : NULL;
        if (work == NULL) {
            failed |= 1;
            continue;
        }
        (kv_bf16 ? attend_request_bf16 : attend_request_f32)(
            q + b * num_heads * head_dim, k, v, table + rows[b] * table_stride, len, num_heads,
            num_kv_heads, head_dim, scale, out + b * num_heads * head_dim, work);
        free(work);
    }
    return failed ? -1 : 0;
}
