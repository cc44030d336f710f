/* GIL-free page-cache reads for stagejax's weight prefetcher (stagejax/store/native_stream.py).
 *
 * Why C: a Python prefetch thread needs the GIL between its reads, and its hand-offs to the
 * executor (a condition variable under the GIL) are cross-core wake-ups on this 2-vCPU VM.
 * Measured (experiments/bench_overlap.py, atomic SmolLM2, 6 interleaved rounds in one process):
 * executor alone 37.0 ms/step, copies alone 46.5, one after the other 91.4; Python thread 68.5
 * (44% of the smaller side hidden), this reader 55.6 (74%). Here the reader loop and the waits
 * run without the GIL; Python only calls in (ctypes releases the GIL for the call).
 *
 * Reads go straight into the slab. Tried and removed: bouncing each read through a small
 * cache-resident buffer and non-temporal stores into the slab (so the executor would not read
 * lines modified in this core's cache): interleaved in one process it took 71.5 ms/step against
 * 55.9 ms for the plain pread (bench_overlap, atomic SmolLM2, 6 rounds).
 *
 * Protocol (all counters in one int64 control array shared with Python):
 *   units are numbered by a running count c (unit index c % n_units, slab c % n_slabs, with
 *   n_slabs = depth + 1). A reader (the background loop, or the consumer while it waits: shared
 *   reads) claims c with a compare-and-swap on STARTED when c - HANDED < depth (at most depth
 *   units in flight) and c - RELEASED <= depth (the slab's previous unit was released), reads
 *   the unit's arrays with pread into its slab, then publishes SLOT_DONE = c + 1 (release order,
 *   so a consumer that sees it sees the bytes).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdint.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

enum {
    STOP = 0,          /* set by Python: the background loop returns */
    STARTED = 1,       /* units claimed by a reader */
    HANDED = 2,        /* units the consumer has taken (written by Python) */
    RELEASED = 3,      /* units the consumer has given back (written by Python) */
    ERROR = 4,         /* 0, -errno of a failed pread, or 1: the file ended early */
    ERROR_READ = 5,    /* index into the reads table of the failure */
    STARTED_BYTES = 6, /* bytes of the claimed units */
    HANDED_BYTES = 7,  /* bytes of the handed units (written by Python) */
    MAX_UNITS = 8,     /* most units in flight seen at a claim */
    MAX_BYTES = 9,     /* most bytes in flight seen at a claim */
    HEADER = 16        /* then per slab: done count + 1, read start ns, read end ns */
};

typedef struct {
    const int64_t *reads;      /* [n_reads][3]: fd, bytes, offset in the slab */
    const int64_t *first;      /* [n_units + 1]: a unit's reads are first[u] .. first[u+1] */
    const int64_t *unit_bytes; /* [n_units] */
    char *const *slabs;        /* [n_slabs] */
    int64_t n_units, n_slabs, depth;
    int64_t *ctrl;
} Plan;

static int64_t load(const int64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static void put(int64_t *p, int64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t); /* time.perf_counter's clock on Linux */
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void raise_max(int64_t *p, int64_t v) {
    int64_t seen = load(p);
    while (v > seen && !__atomic_compare_exchange_n(p, &seen, v, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
    }
}

/* The next unit's count if the depth and the slabs allow a read now, else -1. */
static int64_t claim(const Plan *p) {
    int64_t *ctrl = p->ctrl;
    for (;;) {
        int64_t c = load(&ctrl[STARTED]);
        if (c - load(&ctrl[HANDED]) >= p->depth || c - load(&ctrl[RELEASED]) > p->depth) return -1;
        if (__atomic_compare_exchange_n(&ctrl[STARTED], &c, c + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            int64_t bytes = __atomic_add_fetch(&ctrl[STARTED_BYTES], p->unit_bytes[c % p->n_units], __ATOMIC_ACQ_REL);
            raise_max(&ctrl[MAX_UNITS], c + 1 - load(&ctrl[HANDED]));
            raise_max(&ctrl[MAX_BYTES], bytes - load(&ctrl[HANDED_BYTES]));
            return c;
        }
    }
}

static int fail(const Plan *p, int64_t read, int64_t code) {
    put(&p->ctrl[ERROR_READ], read);
    put(&p->ctrl[ERROR], code);
    return -1;
}

static int read_unit(const Plan *p, int64_t c) {
    int64_t u = c % p->n_units, s = c % p->n_slabs;
    int64_t *slot = &p->ctrl[HEADER + 3 * s];
    char *slab = p->slabs[s];
    slot[1] = now_ns();
    for (int64_t r = p->first[u]; r < p->first[u + 1]; r++) {
        const int64_t *read = &p->reads[3 * r];
        int64_t n = read[1], got = 0;
        while (got < n) { /* short reads: signals, reads over 2 GiB, a file shrunk under us */
            ssize_t more = pread((int)read[0], slab + read[2] + got, (size_t)(n - got), (off_t)got);
            if (more < 0) {
                if (errno == EINTR) continue;
                return fail(p, r, -errno);
            }
            if (more == 0) return fail(p, r, 1);
            got += more;
        }
    }
    slot[2] = now_ns();
    put(&slot[0], c + 1);
    return 0;
}

static void sleep_ns(long ns) {
    struct timespec t = {0, ns};
    nanosleep(&t, 0);
}

static void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* The background reader: claims and reads units until STOP or an error. When it may not read
 * (depth reached, slab lent) it spins briefly, then sleeps in short, then longer naps, so an
 * idle prefetcher costs little CPU. Returns 0, or -1 after an error (see ERROR). */
int64_t stagejax_stream(const Plan *p) {
    prctl(PR_SET_TIMERSLACK, 1000UL); /* 1 µs, not 50: naps end when asked */
    int64_t idle = 0;
    while (!load(&p->ctrl[STOP])) {
        if (load(&p->ctrl[ERROR])) return -1;
        int64_t c = claim(p);
        if (c < 0) {
            idle++;
            if (idle < 200) relax();
            else if (idle < 2200) sleep_ns(20000);
            else sleep_ns(200000);
            continue;
        }
        idle = 0;
        if (read_unit(p, c) < 0) return -1;
    }
    return 0;
}

/* The consumer's wait for unit `count`: returns how many units it read itself meanwhile (shared
 * reads, if `share`: rather than idle, read the next unclaimed unit), or -1 after an error. */
int64_t stagejax_wait(const Plan *p, int64_t count, int64_t share) {
    int64_t *done = &p->ctrl[HEADER + 3 * (count % p->n_slabs)];
    int64_t own = 0, idle = 0;
    while (load(done) != count + 1) {
        if (load(&p->ctrl[ERROR])) return -1;
        if (share) {
            int64_t c = claim(p);
            if (c >= 0) {
                if (read_unit(p, c) < 0) return -1;
                own++;
                continue;
            }
        }
        if (++idle < 2000) relax();
        else sched_yield();
    }
    return own;
}

/* A release-ordered store from Python (HANDED, RELEASED, HANDED_BYTES, STOP). */
void stagejax_put(const Plan *p, int64_t index, int64_t value) { put(&p->ctrl[index], value); }
