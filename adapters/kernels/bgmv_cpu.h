/* The native CPU batched-LoRA kernel's shared declarations: the argument layout Python fills
 * (adapters/native_lora.py mirrors these structs with ctypes) and the row loop that bgmv_cpu.c implements and
 * side_worker.c runs on its worker thread. Built by adapters/kernel_build.py; the loader refuses a library whose
 * LF_ABI_VERSION or struct layout (lf_layout) differs from its mirror. */
#ifndef LORAFLEET_BGMV_CPU_H
#define LORAFLEET_BGMV_CPU_H

#include <stdint.h>

#define TILE 4
#define MAX_OUTPUTS 3
#define MAX_R 1024
/* Bump on any change to the structs below or to an exported function's signature: the ctypes loader refuses a
 * library whose version or layout (lf_layout) differs from the one it was written for. */
#define LF_ABI_VERSION 2

typedef struct {
    float *y;               /* [N, out] output rows, updated in place */
    int64_t y_row_stride;   /* elements between rows of y (columns contiguous) */
    const float *b;         /* slot 0's Bt */
    int64_t b_slot_stride;  /* elements between slots */
    int64_t b_row_stride;   /* elements between rows of one slot's Bt [r, out] */
    int64_t out;
} lf_output;

/* The same call with its arguments in one struct: Python keeps one per (rows, weights) pair, sets only the
 * activation pointers per call, and passes a single address (a 13-argument ctypes call costs several us). */
typedef struct {
    const float *x;
    int64_t x_row_stride;
    int64_t in_features;
    const int64_t *rows;
    const int64_t *slots;
    int64_t n;
    const float *a;
    int64_t a_slot_stride;
    int64_t a_row_stride;
    int64_t big_r;
    int64_t k;
    int64_t r;
    int64_t threads;
    lf_output outputs[MAX_OUTPUTS];
} lf_call;

/* A call whose expands store into scratch rows (call.outputs[j].y), and the outputs that lf_worker_finish adds
 * them to (side_worker.c). */
typedef struct {
    lf_call call;
    float *target[MAX_OUTPUTS];
    int64_t target_row_stride[MAX_OUTPUTS];
} lf_side_call;

/* The ABI the library was built with: LF_ABI_VERSION, and "name=size field@offset ...;" for every struct above plus
 * the constants Python relies on, written into buf (at most size bytes, NUL-terminated). Returns the length the
 * full text needs (like snprintf). */
int64_t lf_abi_version(void);
int64_t lf_layout(char *buf, int64_t size);

/* Rows t = 0..n-1 (rows[t] of x / y, adapter slots[t], sorted so equal slots are adjacent), on the calling thread:
 * y_j[row] (+)= (x[row] @ At[slot])[j-th rank block] @ Bt_j[slot]; `store`: write the delta instead of adding it. */
void bgmv_rows(const float *x, int64_t x_row_stride, int64_t in_features, const int64_t *rows, const int64_t *slots,
               int64_t n, const float *a, int64_t a_slot_stride, int64_t a_row_stride, int64_t big_r,
               const lf_output *outputs, int64_t k, int64_t r, int store);

/* Ask for one slot's weights (its At and every Bt_j) to be brought into cache. */
void prefetch_slot(int64_t slot, const float *a, int64_t a_slot_stride, int64_t in_features, int64_t a_row_stride,
                   int64_t big_r, const lf_output *outputs, int64_t k, int64_t r);

#endif
