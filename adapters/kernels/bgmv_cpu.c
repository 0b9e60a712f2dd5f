/* Batched LoRA for CPU: one call applies shrink + expand for every row of a batch, each row with its own adapter
 * slot (punica's BGMV, written for a CPU core). Built by adapters/kernel_build.py and loaded by
 * adapters/native_lora.py (plain C, no Python or torch headers, so it compiles in about a second), which checks
 * lf_abi_version() and lf_layout() (end of this file) before the first call; see bgmv_cpu.h for the layout.
 *
 * For rows t = 0..n-1 (rows[t] = the row of x/y, slots[t] = its adapter slot, sorted so equal slots are adjacent):
 *     h          = x[row] @ At[slot]                    At: [in, R] row-major, R = k * r
 *     y_j[row]  += h[j*r : (j+1)*r] @ Bt_j[slot]        Bt_j: [r, out_j] row-major, j = 0..k-1
 * Both halves are the same small product out[u] (+)= in[u] @ W for a run of up to TILE rows u that share a slot:
 * the accumulators for a block of output columns of every row of the run stay in registers while the loop walks
 * W's rows, so each weight is loaded once per run, not once per row. Rows not listed (slot 0 = no adapter) are not touched.
 *
 * With OpenMP (-fopenmp: the same libgomp PyTorch loads, so the same thread pool) a call with enough work splits its
 * rows across threads.
 *
 *     cc -O3 -march=native -fopenmp -pthread -shared -fPIC -o bgmv_cpu.so bgmv_cpu.c side_worker.c
 */
#include "bgmv_cpu.h"

#include <stddef.h>
#include <stdio.h>
#include <string.h>
#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 2 /* distinct slots whose weights are being fetched while one computes */
#endif
#ifndef PREFETCH_HINT
#define PREFETCH_HINT 3
#endif
#define MAX_THREADS 256
#ifndef PARALLEL_MIN_MACS
#define PARALLEL_MIN_MACS (256 * 1024) /* below this much work per call, one thread (waking others costs more) */
#endif

typedef float v8 __attribute__((vector_size(32), aligned(4))); /* 8 floats, unaligned loads and stores */

/* Columns c..c+8*NV of out[u] (+)= in[u] @ w for u < M: the M*NV accumulators stay in registers (M and NV are
 * compile-time constants, so the loops unroll) while the loop walks w's rows; each weight is loaded once for the
 * whole run of rows. */
#define DEFINE_BLOCK(M, NV)                                                                                     \
    static inline void block_##M##_##NV(const float *const *in, int64_t depth, const float *w,                \
                                        int64_t w_stride, float *const *out, int64_t c, int accumulate) {     \
        v8 acc[M][NV];                                                                                          \
        const float *x[M];                                                                                      \
        for (int u = 0; u < M; u++) {                                                                           \
            x[u] = in[u];                                                                                       \
            for (int v = 0; v < NV; v++) acc[u][v] = (v8){0};                                                   \
        }                                                                                                       \
        for (int64_t i = 0; i < depth; i++) {                                                                   \
            const float *wi = w + i * w_stride + c;                                                             \
            v8 wv[NV];                                                                                          \
            for (int v = 0; v < NV; v++) wv[v] = *(const v8 *)(wi + 8 * v);                                     \
            for (int u = 0; u < M; u++) {                                                                       \
                const float s = x[u][i];                                                                        \
                for (int v = 0; v < NV; v++) acc[u][v] += s * wv[v];                                            \
            }                                                                                                   \
        }                                                                                                       \
        for (int u = 0; u < M; u++)                                                                             \
            for (int v = 0; v < NV; v++)                                                                        \
                *(v8 *)(out[u] + c + 8 * v) = accumulate ? *(v8 *)(out[u] + c + 8 * v) + acc[u][v] : acc[u][v];  \
    }
#define DEFINE_BLOCKS(M) DEFINE_BLOCK(M, 1) DEFINE_BLOCK(M, 2) DEFINE_BLOCK(M, 4)
DEFINE_BLOCKS(1)
DEFINE_BLOCKS(2)
DEFINE_BLOCKS(3)
DEFINE_BLOCKS(4)

typedef void (*block_fn)(const float *const *, int64_t, const float *, int64_t, float *const *, int64_t, int);
static const block_fn BLOCKS[TILE + 1][3] = {
    {0, 0, 0},
    {block_1_1, block_1_2, block_1_4},
    {block_2_1, block_2_2, block_2_4},
    {block_3_1, block_3_2, block_3_4},
    {block_4_1, block_4_2, block_4_4},
};

/* out[u][c] = (accumulate ? out[u][c] : 0) + sum_i in[u][i] * w[i * w_stride + c], for u < m, c < cols: the sum is
 * formed from zero and then added (y + delta, PEFT's order; the side thread's scratch-then-add gives the same bits).
 * Blocks of 32 columns for runs of 1-2 rows, 16 for longer runs (enough independent accumulators to hide the
 * FMA latency, few enough to stay in the 16 vector registers), then 8, then single columns. */
static inline void small_gemm(int64_t m, const float *const *in, int64_t depth, const float *w, int64_t w_stride,
                              int64_t cols, float *const *out, int accumulate) {
    int64_t c = 0;
    if (m <= 2)
        for (; c + 32 <= cols; c += 32) BLOCKS[m][2](in, depth, w, w_stride, out, c, accumulate);
    for (; c + 16 <= cols; c += 16) BLOCKS[m][1](in, depth, w, w_stride, out, c, accumulate);
    for (; c + 8 <= cols; c += 8) BLOCKS[m][0](in, depth, w, w_stride, out, c, accumulate);
    for (; c < cols; c++) {
        for (int64_t u = 0; u < m; u++) {
            float acc = 0.0f;
            for (int64_t i = 0; i < depth; i++) acc += in[u][i] * w[i * w_stride + c];
            out[u][c] = accumulate ? out[u][c] + acc : acc;
        }
    }
}

/* Ask for a [rows, cols] block (row stride `stride`) to be brought into cache, one request per 64-byte line. */
static inline void prefetch_matrix(const float *w, int64_t rows, int64_t stride, int64_t cols) {
    for (int64_t i = 0; i < rows; i++)
        for (int64_t c = 0; c < cols; c += 16) __builtin_prefetch(w + i * stride + c, 0, PREFETCH_HINT);
}

void prefetch_slot(int64_t slot, const float *a, int64_t a_slot_stride, int64_t in_features,
                                 int64_t a_row_stride, int64_t big_r, const lf_output *outputs, int64_t k, int64_t r) {
    prefetch_matrix(a + slot * a_slot_stride, in_features, a_row_stride, big_r);
    for (int64_t j = 0; j < k; j++)
        prefetch_matrix(outputs[j].b + slot * outputs[j].b_slot_stride, r, outputs[j].b_row_stride, outputs[j].out);
}

static inline int64_t next_slot_start(const int64_t *slots, int64_t n, int64_t i) {
    const int64_t s = slots[i];
    while (i < n && slots[i] == s) i++;
    return i;
}

/* Rows t = 0..n-1 of one call (rows/slots already offset to a thread's share), on one thread. */
void bgmv_rows(const float *x, int64_t x_row_stride, int64_t in_features, const int64_t *rows,
                      const int64_t *slots, int64_t n, const float *a, int64_t a_slot_stride, int64_t a_row_stride,
                      int64_t big_r, const lf_output *outputs, int64_t k, int64_t r, int store) {
    float h[TILE][MAX_R];
    const float *xs[TILE];
    float *hs[TILE];
    const float *hj[TILE];
    float *ys[TILE];
    /* Weights are read once per slot and do not stay in cache between calls (a step reads every adapter of every
     * layer), so the next PREFETCH_AHEAD slots' weights are requested before they are needed. */
    int64_t ahead = 0;
    for (int q = 0; q < PREFETCH_AHEAD && ahead < n; q++) {
        prefetch_slot(slots[ahead], a, a_slot_stride, in_features, a_row_stride, big_r, outputs, k, r);
        ahead = next_slot_start(slots, n, ahead);
    }
    for (int64_t t = 0; t < n;) {
        const int64_t slot = slots[t];
        int64_t m = 1;
        while (m < TILE && t + m < n && slots[t + m] == slot) m++;
        if ((t == 0 || slots[t - 1] != slot) && ahead < n) {
            prefetch_slot(slots[ahead], a, a_slot_stride, in_features, a_row_stride, big_r, outputs, k, r);
            ahead = next_slot_start(slots, n, ahead);
        }
        for (int64_t u = 0; u < m; u++) {
            xs[u] = x + rows[t + u] * x_row_stride;
            hs[u] = h[u];
        }
        small_gemm(m, xs, in_features, a + slot * a_slot_stride, a_row_stride, big_r, hs, 0);
        for (int64_t j = 0; j < k; j++) {
            const lf_output *o = &outputs[j];
            for (int64_t u = 0; u < m; u++) {
                hj[u] = h[u] + j * r;
                ys[u] = o->y + rows[t + u] * o->y_row_stride;
            }
            small_gemm(m, hj, r, o->b + slot * o->b_slot_stride, o->b_row_stride, o->out, ys, !store);
        }
        t += m;
    }
}

#ifdef _OPENMP
/* Where a thread's share may start: at or after `target`, on a tile boundary of the single-thread tiling (runs are
 * tiled from their first row), so every row is computed exactly as on one thread. */
static int64_t aligned_start(const int64_t *slots, int64_t n, int64_t target) {
    if (target <= 0) return 0;
    if (target >= n) return n;
    int64_t run_start = target;
    while (run_start > 0 && slots[run_start - 1] == slots[target]) run_start--;
    int64_t p = run_start + (target - run_start + TILE - 1) / TILE * TILE;
    int64_t run_end = target;
    while (run_end < n && slots[run_end] == slots[target]) run_end++;
    return p < run_end ? p : run_end;
}
#endif

/* `threads` > 1 (the caller passes PyTorch's thread count) splits the rows into about equal shares, one per
 * thread, when the call has enough work to pay for waking them. Shares start on the one-thread tiling's tile
 * boundaries, so the result is bitwise the same for any thread count; each row is written by one thread. Built
 * without OpenMP, it always runs on the calling thread. */
int lf_bgmv_f32(const float *x, int64_t x_row_stride, int64_t in_features, const int64_t *rows,
                const int64_t *slots, int64_t n, const float *a, int64_t a_slot_stride, int64_t a_row_stride,
                int64_t big_r, const lf_output *outputs, int64_t k, int64_t r, int64_t threads) {
    if (big_r > MAX_R || k > MAX_OUTPUTS || k * r > big_r) return -1;
#ifdef _OPENMP
    int64_t out_total = 0;
    for (int64_t j = 0; j < k; j++) out_total += outputs[j].out;
    const int64_t work = n * (in_features * big_r + r * out_total);
    if (threads > n / TILE) threads = n / TILE;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if (threads > 1 && work >= PARALLEL_MIN_MACS) {
        int64_t start[MAX_THREADS + 1];
        for (int64_t part = 0; part < threads; part++) start[part] = aligned_start(slots, n, n * part / threads);
        start[threads] = n;
#pragma omp parallel for num_threads((int)threads) schedule(static, 1)
        for (int64_t part = 0; part < threads; part++) {
            const int64_t lo = start[part], hi = start[part + 1];
            if (lo < hi)
                bgmv_rows(x, x_row_stride, in_features, rows + lo, slots + lo, hi - lo, a, a_slot_stride,
                          a_row_stride, big_r, outputs, k, r, 0);
        }
        return 0;
    }
#else
    (void)threads;
#endif
    bgmv_rows(x, x_row_stride, in_features, rows, slots, n, a, a_slot_stride, a_row_stride, big_r, outputs, k, r, 0);
    return 0;
}

/* The call with its arguments in one struct (lf_call, bgmv_cpu.h). */
int lf_bgmv_f32_call(const lf_call *c) {
    return lf_bgmv_f32(c->x, c->x_row_stride, c->in_features, c->rows, c->slots, c->n, c->a, c->a_slot_stride,
                       c->a_row_stride, c->big_r, c->outputs, c->k, c->r, c->threads);
}

/* The ABI (bgmv_cpu.h): what adapters/native_lora.py compares with its ctypes mirror before the first call. */
int64_t lf_abi_version(void) { return LF_ABI_VERSION; }

typedef struct {
    const char *name;
    size_t value;
} abi_entry;
#define SIZE(T) {#T, sizeof(T)}
#define FIELD(T, f) {#T "." #f, offsetof(T, f)}
static const abi_entry ABI[] = {
    SIZE(lf_output), FIELD(lf_output, y), FIELD(lf_output, y_row_stride), FIELD(lf_output, b),
    FIELD(lf_output, b_slot_stride), FIELD(lf_output, b_row_stride), FIELD(lf_output, out),
    SIZE(lf_call), FIELD(lf_call, x), FIELD(lf_call, x_row_stride), FIELD(lf_call, in_features), FIELD(lf_call, rows),
    FIELD(lf_call, slots), FIELD(lf_call, n), FIELD(lf_call, a), FIELD(lf_call, a_slot_stride),
    FIELD(lf_call, a_row_stride), FIELD(lf_call, big_r), FIELD(lf_call, k), FIELD(lf_call, r), FIELD(lf_call, threads),
    FIELD(lf_call, outputs),
    SIZE(lf_side_call), FIELD(lf_side_call, call), FIELD(lf_side_call, target), FIELD(lf_side_call, target_row_stride),
    {"MAX_OUTPUTS", MAX_OUTPUTS}, {"MAX_R", MAX_R},
};

/* "name=value name=value ..." (sizes and offsets in bytes) into buf; returns the length the whole text needs. */
int64_t lf_layout(char *buf, int64_t size) {
    int64_t used = 0;
    for (size_t i = 0; i < sizeof ABI / sizeof ABI[0]; i++) {
        const int64_t room = used < size ? size - used : 0;
        used += snprintf(room ? buf + used : NULL, (size_t)room, "%s%s=%zu", i ? " " : "", ABI[i].name, ABI[i].value);
    }
    return used;
}
