/* The side thread: LoRA next to the base model's matmuls (adapters/lora_side_thread.py drives it).
 *
 * The base projections and the LoRA of the same input are independent until their sum, and on a CPU replica the
 * base's small matmuls leave a second core idle. lf_worker_start splits a call's rows into units (runs of up to
 * TILE rows on one slot: the one-thread tiling, so results do not depend on who computes what) and wakes a worker
 * thread, which claims units and computes their LoRA into scratch rows (the expands store rather than accumulate)
 * while the caller runs the base projections. lf_worker_finish then claims whatever units are left, waits for the
 * units in progress, and adds each scratch row to its output row: y = base + delta, the order PEFT adds them in.
 * Claims carry the call's generation, so a worker that wakes late can never take a unit of a later call, and the
 * caller never waits for the worker to wake. Between calls the worker spins for up to SPIN_NS, then sleeps.
 * Every field both threads touch is either atomic or handed over by an acquire/release pair (see lf_worker);
 * tests/test_native_sanitizers.py runs the race test under ThreadSanitizer. */
#include "bgmv_cpu.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

#define CLOSED 0xffffffffu /* the claim word's next unit while a call is being set up */

#ifndef SPIN_NS
#define SPIN_NS 2000000 /* 2 ms: longer than the gap between two calls of a running engine */
#endif

typedef struct {
    pthread_t thread;
    pthread_mutex_t mutex;
    pthread_cond_t wake;
    /* The caller writes job, units and n_units only when every unit of the last call is counted in `finished`
     * (which it reads with acquire), and after closing the claim word (next unit = CLOSED, a new generation), then
     * publishes them with the claim store that opens the call (release). The worker reads job and units only
     * after claiming a unit of their generation (acquire). n_units is read before claiming, possibly by a worker
     * still holding an older claim value while the caller writes it, so it is atomic, and sequentially consistent
     * with the close: a worker that sees the new n_units also sees the claim closed, and its old claim fails. */
    const lf_call *job;
    int64_t *units;              /* unit u = rows units[u] .. units[u + 1] - 1 of the job */
    _Atomic int64_t n_units;
    int64_t capacity;            /* (the caller's only) */
    atomic_uint_fast64_t claim;  /* generation << 32 | next unit (CLOSED while the caller sets a call up) */
    atomic_long finished;        /* units of the current generation computed */
    atomic_long submitted;       /* calls started (wakes the worker) */
    atomic_int stop, sleeping;
    int status;                  /* the last call's result: 0, or -1 if the kernel refused its shapes */
} lf_worker;

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* Claim and compute units of the current call until none is left (the worker and the caller both run this). */
static void work_units(lf_worker *w) {
    for (;;) {
        uint_fast64_t cur = atomic_load_explicit(&w->claim, memory_order_acquire);
        const int64_t u = (int64_t)(cur & 0xffffffffu);
        const int64_t n_units = atomic_load(&w->n_units);
        if (u >= n_units) return;  /* (a closed claim, or all units taken) */
        if (!atomic_compare_exchange_weak_explicit(&w->claim, &cur, cur + 1, memory_order_acq_rel,
                                                   memory_order_acquire))
            continue;
        /* claimed: the caller cannot move on to another call (or change job/units) until this unit is counted */
        const lf_call *c = w->job;
        const int64_t lo = w->units[u], hi = w->units[u + 1];
        if (u + 1 < n_units && c->slots[hi] != c->slots[lo])
            prefetch_slot(c->slots[hi], c->a, c->a_slot_stride, c->in_features, c->a_row_stride, c->big_r,
                          c->outputs, c->k, c->r);
        bgmv_rows(c->x, c->x_row_stride, c->in_features, c->rows + lo, c->slots + lo, hi - lo, c->a,
                  c->a_slot_stride, c->a_row_stride, c->big_r, c->outputs, c->k, c->r, 1);
        atomic_fetch_add_explicit(&w->finished, 1, memory_order_release);
    }
}

static void *worker_main(void *arg) {
    lf_worker *w = arg;
    long seen = 0;
    for (;;) {
        int64_t spin_until = 0;
        for (unsigned spins = 0; atomic_load_explicit(&w->submitted, memory_order_acquire) == seen; spins++) {
            if (atomic_load_explicit(&w->stop, memory_order_relaxed)) return NULL;
            cpu_relax();
            if ((spins & 255) != 0) continue;
            if (spin_until == 0) spin_until = now_ns() + SPIN_NS;
            if (now_ns() < spin_until) continue;
            /* sleeping is set before submitted is re-checked and read by the submitter after it bumps submitted
             * (both sequentially consistent), so either the submitter signals or this thread sees the call */
            pthread_mutex_lock(&w->mutex);
            atomic_store(&w->sleeping, 1);
            while (atomic_load(&w->submitted) == seen && !atomic_load(&w->stop))
                pthread_cond_wait(&w->wake, &w->mutex);
            atomic_store(&w->sleeping, 0);
            pthread_mutex_unlock(&w->mutex);
            spin_until = 0;
        }
        seen = atomic_load_explicit(&w->submitted, memory_order_acquire);
        work_units(w);
    }
}

lf_worker *lf_worker_new(void) {
    lf_worker *w = calloc(1, sizeof *w);
    if (!w) return NULL;
    pthread_mutex_init(&w->mutex, NULL);
    pthread_cond_init(&w->wake, NULL);
    if (pthread_create(&w->thread, NULL, worker_main, w) != 0) {
        free(w);
        return NULL;
    }
    return w;
}

/* Compute what is left of the call in flight, wait for the units in progress; the call's status. */
int lf_worker_wait(lf_worker *w) {
    work_units(w);
    const int64_t n_units = atomic_load_explicit(&w->n_units, memory_order_relaxed);  /* (this thread wrote it) */
    for (unsigned spins = 0; atomic_load_explicit(&w->finished, memory_order_acquire) < n_units; spins++) {
        cpu_relax();
        if ((spins & 4095) == 4095) sched_yield(); /* the worker was descheduled mid-unit: let it run */
    }
    return w->status;
}

/* Start `c` (an lf_side_call): the worker begins on its units at once. The caller keeps its x, rows, slots and
 * scratch alive until lf_worker_finish / lf_worker_wait, and must call one of them before the next start. */
int lf_worker_start(lf_worker *w, const lf_side_call *s) {
    const lf_call *c = &s->call;
    if (c->big_r > MAX_R || c->k > MAX_OUTPUTS || c->k * c->r > c->big_r || c->n < 0 || c->n >= (int64_t)CLOSED) {
        atomic_store(&w->n_units, 0);
        w->status = -1;
        return 0;
    }
    const uint_fast64_t generation = (atomic_load_explicit(&w->claim, memory_order_relaxed) >> 32) + 1;
    atomic_store(&w->claim, generation << 32 | CLOSED); /* from here on an older claim value cannot be claimed */
    if (c->n + 1 > w->capacity) {
        int64_t *units = realloc(w->units, (size_t)(c->n + 1) * 2 * sizeof *units);
        if (!units) return -2;
        w->units = units;
        w->capacity = (c->n + 1) * 2;
    }
    int64_t n_units = 0;
    for (int64_t t = 0; t < c->n;) {
        w->units[n_units++] = t;
        int64_t m = 1;
        while (m < TILE && t + m < c->n && c->slots[t + m] == c->slots[t]) m++;
        t += m;
    }
    w->units[n_units] = c->n;
    w->job = c;
    atomic_store(&w->n_units, n_units);
    w->status = 0;
    atomic_store_explicit(&w->finished, 0, memory_order_relaxed);
    /* opens the call: publishes job, units, n_units and finished = 0 to whoever claims one of its units (release;
     * seq_cst also orders it before the submitted/sleeping handshake below) */
    atomic_store(&w->claim, generation << 32);
    atomic_fetch_add(&w->submitted, 1);
    if (atomic_load(&w->sleeping)) { /* (the lock orders this signal after the worker's wait began) */
        pthread_mutex_lock(&w->mutex);
        pthread_cond_signal(&w->wake);
        pthread_mutex_unlock(&w->mutex);
    }
    return 0;
}

/* Finish `s`: compute what is left, wait, then target_j[row] += scratch_j[row] for each of its rows. */
int lf_worker_finish(lf_worker *w, const lf_side_call *s) {
    const int status = lf_worker_wait(w);
    if (status != 0) return status;
    const lf_call *c = &s->call;
    for (int64_t j = 0; j < c->k; j++) {
        const int64_t out = c->outputs[j].out;
        for (int64_t t = 0; t < c->n; t++) {
            const int64_t row = c->rows[t];
            float *restrict y = s->target[j] + row * s->target_row_stride[j];
            const float *restrict d = c->outputs[j].y + row * c->outputs[j].y_row_stride;
            for (int64_t i = 0; i < out; i++) y[i] += d[i];
        }
    }
    return 0;
}

void lf_worker_free(lf_worker *w) {
    if (!w) return;
    lf_worker_wait(w);
    pthread_mutex_lock(&w->mutex);
    atomic_store(&w->stop, 1);
    pthread_cond_signal(&w->wake);
    pthread_mutex_unlock(&w->mutex);
    pthread_join(w->thread, NULL);
    pthread_mutex_destroy(&w->mutex);
    pthread_cond_destroy(&w->wake);
    free(w->units);
    free(w);
}
