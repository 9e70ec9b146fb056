/*
 * ptlab.core._kprobe -- the live kernel's MADV_COLLAPSE, measured under concurrent load.
 *
 * The host kernel already runs strategy `pmd-clear`: madvise(MADV_COLLAPSE) goes through
 * madvise_collapse() -> collapse_huge_page(), which takes mmap_write_lock, vma_start_write()s
 * the VMA, clears and flushes the PMD, copies 512 pages into a new folio and installs it
 * (kernel-brief.md §1.3).  This module drives that path from C threads and times what the
 * rest of the process meets meanwhile, so `ptlab kernel` can set the kernel's numbers beside
 * the simulation's in one Arrow schema.
 *
 * One phase (run_phase) builds, in this process's mm:
 *   - the collapsing VMA: `ranges` PMD-aligned 2 MiB ranges, populated with small pages while
 *     MADV_NOHUGEPAGE, then MADV_HUGEPAGE (so every range starts as 512 PTE-mapped folios);
 *   - the other VMA: as large, MADV_NOHUGEPAGE, so it never merges with the first and its
 *     faults take only its own per-VMA lock;
 * and runs these threads, all released by one start gate, each pinned where placement says:
 *   collapser   (role khugepaged) MADV_COLLAPSE over the ranges in turn; after each call it
 *               re-splits the range -- MADV_DONTNEED one page (splits the PMD) and touches it
 *               again -- so the next pass always finds work.  Absent in the baseline phase.
 *   fault-same  (role app, vma 0) MADV_DONTNEED a random run of pages (timed: op zap), then
 *               time the touch of each (a fault).
 *   fault-other (role app, vma 1) the same in the other VMA.
 *   mmap        (role mmap) mmap() + touch + munmap() of a small anonymous mapping; mmap()
 *               and munmap() are timed (both take mmap_write_lock).
 *   pin         (role gup-fast) O_DIRECT pread() from a file into a random page of the
 *               collapsing VMA: the block layer pins the page (FOLL_PIN through
 *               pin_user_pages_fast) for the I/O, so a collapse meeting it fails the refcount
 *               check (SCAN_PAGE_COUNT -> EAGAIN).  Only when given a file descriptor.
 *
 * With idle_load the load threads run under SCHED_IDLE: every MADV_COLLAPSE waits in
 * lru_add_drain_all() for a kworker on each CPU with pages in its LRU batches, and busy loops
 * on that CPU would otherwise hold it off for a time slice (see core/kernel_probe.py).
 *
 * No Python runs in any timed loop: the GIL is released for the whole phase, every event goes
 * into a per-thread preallocated array of struct kp_event (32 bytes, layout fixed below), and
 * the arrays are handed back as bytes objects that numpy reads with a matching dtype.
 *
 * Timing: CLOCK_MONOTONIC around the timed call only.  Around it, getrusage(RUSAGE_THREAD) and
 * CLOCK_THREAD_CPUTIME_ID say whether the thread was switched out meanwhile: a voluntary
 * switch means it slept (e.g. on mmap_lock), and sleep_ns is then the wall time it did not run;
 * an involuntary one means it was preempted (runnable, waiting for its core).  These reads sit
 * outside the timed window, so they slow the loops a little but never the timed numbers.
 *
 * Times are relative to the phase start (gate opened + warm-up): warm-up events have
 * negative t_start and are dropped by the caller after it has used the collapse intervals.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25 /* include/uapi/asm-generic/mman-common.h, Linux >= 6.1 */
#endif

#define KP_PMD_SIZE (2UL << 20)
#define KP_PAGE_SIZE 4096UL
#define KP_PAGES_PER_PMD (KP_PMD_SIZE / KP_PAGE_SIZE)

/* Thread kinds, in the order of the placement and capacity sequences. */
enum kp_kind { KP_COLLAPSER, KP_FAULT_SAME, KP_FAULT_OTHER, KP_MMAP, KP_PIN, KP_NR_KINDS };
static const char *const kp_kind_names[KP_NR_KINDS] = {"collapser", "fault-same", "fault-other",
                                                       "mmap", "pin"};

/* Event op codes (Python maps them to the schema's op names). */
enum kp_op { KP_OP_COLLAPSE, KP_OP_FAULT, KP_OP_MMAP, KP_OP_MUNMAP, KP_OP_DMA, KP_OP_ZAP };

#define KP_FLAG_VOLUNTARY 1   /* switched out voluntarily (slept) during the timed call */
#define KP_FLAG_INVOLUNTARY 2 /* preempted during the timed call */

/* One event.  Keep in step with EVENT_DTYPE in core/kernel_probe.py. */
struct kp_event {
    int64_t t_start_ns; /* relative to the phase start */
    int64_t latency_ns;
    int64_t sleep_ns;   /* off-CPU time when the thread slept, else 0 */
    int32_t aux;        /* page index in the VMA (fault, pin) or range index (collapse) */
    int16_t err;        /* errno of the timed call, 0 on success */
    uint8_t op;
    uint8_t flags;
};
_Static_assert(sizeof(struct kp_event) == 32, "kp_event layout is shared with Python");

struct kp_phase;

struct kp_thread {
    struct kp_phase *ph;
    enum kp_kind kind;
    int cpu;         /* requested core, -1: not pinned */
    int pinned;      /* pthread_setaffinity_np succeeded */
    int idle;        /* runs under SCHED_IDLE */
    int started;
    pthread_t th;
    uint64_t rng;
    struct kp_event *ev;
    size_t cap, n, overflow;
};

struct kp_phase {
    char *coll;       /* the collapsing VMA, PMD-aligned */
    char *other;      /* the other VMA */
    size_t vma_len;   /* bytes in each */
    int ranges;
    int pin_fd;
    size_t pin_file_pages;
    size_t churn_len;
    size_t zap_pages; /* pages per MADV_DONTNEED in the fault threads; divides 512 */
    int idle_load;    /* load threads (all but the collapser) run under SCHED_IDLE */
    int64_t gap_ns;   /* idle time after each collapse */
    int64_t phase0;   /* CLOCK_MONOTONIC of the phase start */
    int stop;         /* set (release) by the controller; threads poll it (acquire) */
    /* The start gate: each thread pins itself, counts itself ready and waits for go (1: run,
     * -1: the phase was abandoned before it began). */
    pthread_mutex_t gate_lock;
    pthread_cond_t gate_cond;
    int ready, go;
    struct kp_thread t[KP_NR_KINDS];
};

/* Set by abort(): the controller ends the running phase early (Ctrl-C in Python). */
static int kp_abort_flag;

static inline int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline uint64_t xorshift64(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static inline int kp_stopped(struct kp_phase *ph)
{
    return __atomic_load_n(&ph->stop, __ATOMIC_ACQUIRE);
}

/* What the scheduler did to this thread: CPU time and context-switch counts. */
struct kp_sched {
    int64_t cpu_ns;
    long nvcsw, nivcsw;
};

static inline void kp_sched_read(struct kp_sched *s)
{
    struct rusage ru;
    struct timespec ts;
    getrusage(RUSAGE_THREAD, &ru);
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    s->cpu_ns = (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
    s->nvcsw = ru.ru_nvcsw;
    s->nivcsw = ru.ru_nivcsw;
}

static inline void kp_record(struct kp_thread *t, enum kp_op op, int64_t t0, int64_t t1,
                             const struct kp_sched *s0, const struct kp_sched *s1, int err,
                             int32_t aux)
{
    if (t->n == t->cap) {
        t->overflow++; /* the load goes on; only the record is lost, and counted */
        return;
    }
    struct kp_event *e = &t->ev[t->n++];
    e->t_start_ns = t0 - t->ph->phase0;
    e->latency_ns = t1 - t0;
    e->flags = (s1->nvcsw != s0->nvcsw ? KP_FLAG_VOLUNTARY : 0) |
               (s1->nivcsw != s0->nivcsw ? KP_FLAG_INVOLUNTARY : 0);
    int64_t off_cpu = (t1 - t0) - (s1->cpu_ns - s0->cpu_ns);
    e->sleep_ns = (e->flags & KP_FLAG_VOLUNTARY) && off_cpu > 0 ? off_cpu : 0;
    e->aux = aux;
    e->err = (int16_t)err;
    e->op = (uint8_t)op;
}

static inline void kp_touch(char *p, uint64_t v)
{
    *(volatile uint64_t *)p = v;
}

/* The collapser: madvise(MADV_COLLAPSE) over the ranges, round robin (khugepaged's role). */
static void kp_collapser(struct kp_thread *t)
{
    struct kp_phase *ph = t->ph;
    struct kp_sched s0, s1;
    uint64_t seq = 0;
    for (int r = 0; !kp_stopped(ph); r = (r + 1) % ph->ranges) {
        char *range = ph->coll + (size_t)r * KP_PMD_SIZE;
        kp_sched_read(&s0);
        int64_t t0 = mono_ns();
        int rc = madvise(range, KP_PMD_SIZE, MADV_COLLAPSE);
        int64_t t1 = mono_ns();
        int err = rc ? errno : 0;
        kp_sched_read(&s1);
        kp_record(t, KP_OP_COLLAPSE, t0, t1, &s0, &s1, err, r);
        /* Re-split: zapping one page of a PMD-mapped THP splits the PMD into a PTE table
         * (split_huge_pmd); touching it again refills the hole.  The next pass over this
         * range therefore has 512 PTEs to isolate and copy again. */
        char *page = range + (xorshift64(&t->rng) % KP_PAGES_PER_PMD) * KP_PAGE_SIZE;
        madvise(page, KP_PAGE_SIZE, MADV_DONTNEED);
        kp_touch(page, ++seq);
        if (ph->gap_ns > 0) {
            struct timespec d = {ph->gap_ns / 1000000000LL, ph->gap_ns % 1000000000LL};
            nanosleep(&d, NULL);
        }
    }
}

/* A fault thread: zap a random run of zap_pages pages, then time each write that faults one
 * back in.  The zap waits for the collapse's locks too (the VMA's lock, or mmap_lock for
 * read) and costs more than a fault, so with one page per zap the zap, not the fault, would
 * be what meets a collapse's vma_start_write(); zapping a run makes most of the thread's
 * time faults. */
static void kp_faulter(struct kp_thread *t, char *base)
{
    struct kp_phase *ph = t->ph;
    struct kp_sched s0, s1;
    size_t runs = ph->vma_len / KP_PAGE_SIZE / ph->zap_pages;
    uint64_t seq = 0;
    while (!kp_stopped(ph)) {
        size_t first = (xorshift64(&t->rng) % runs) * ph->zap_pages;
        kp_sched_read(&s0);
        int64_t z0 = mono_ns();
        int rc = madvise(base + first * KP_PAGE_SIZE, ph->zap_pages * KP_PAGE_SIZE, MADV_DONTNEED);
        int64_t z1 = mono_ns();
        int err = rc ? errno : 0;
        kp_sched_read(&s1);
        kp_record(t, KP_OP_ZAP, z0, z1, &s0, &s1, err, (int32_t)first);
        for (size_t pg = first; pg < first + ph->zap_pages && !kp_stopped(ph); pg++) {
            char *p = base + pg * KP_PAGE_SIZE;
            kp_sched_read(&s0);
            int64_t t0 = mono_ns();
            kp_touch(p, ++seq);
            int64_t t1 = mono_ns();
            kp_sched_read(&s1);
            kp_record(t, KP_OP_FAULT, t0, t1, &s0, &s1, 0, (int32_t)pg);
        }
    }
}

/* mmap()/munmap() churn on a small mapping of its own: both take mmap_write_lock. */
static void kp_mmapper(struct kp_thread *t)
{
    struct kp_phase *ph = t->ph;
    struct kp_sched s0, s1;
    uint64_t seq = 0;
    while (!kp_stopped(ph)) {
        kp_sched_read(&s0);
        int64_t t0 = mono_ns();
        char *p = mmap(NULL, ph->churn_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                       -1, 0);
        int64_t t1 = mono_ns();
        int err = p == MAP_FAILED ? errno : 0;
        kp_sched_read(&s1);
        kp_record(t, KP_OP_MMAP, t0, t1, &s0, &s1, err, -1);
        if (p == MAP_FAILED)
            continue;
        kp_touch(p, ++seq);
        kp_sched_read(&s0);
        t0 = mono_ns();
        int rc = munmap(p, ph->churn_len);
        t1 = mono_ns();
        err = rc ? errno : 0;
        kp_sched_read(&s1);
        kp_record(t, KP_OP_MUNMAP, t0, t1, &s0, &s1, err, -1);
    }
}

/* O_DIRECT reads into the collapsing VMA: each one pins its target page for the I/O. */
static void kp_pinner(struct kp_thread *t)
{
    struct kp_phase *ph = t->ph;
    struct kp_sched s0, s1;
    size_t npages = ph->vma_len / KP_PAGE_SIZE;
    while (!kp_stopped(ph)) {
        size_t pg = xorshift64(&t->rng) % npages;
        off_t off = (off_t)(xorshift64(&t->rng) % ph->pin_file_pages) * (off_t)KP_PAGE_SIZE;
        kp_sched_read(&s0);
        int64_t t0 = mono_ns();
        ssize_t got = pread(ph->pin_fd, ph->coll + pg * KP_PAGE_SIZE, KP_PAGE_SIZE, off);
        int64_t t1 = mono_ns();
        int err = got < 0 ? errno : (got == (ssize_t)KP_PAGE_SIZE ? 0 : EIO);
        kp_sched_read(&s1);
        kp_record(t, KP_OP_DMA, t0, t1, &s0, &s1, err, (int32_t)pg);
        if (err == EINVAL || err == EBADF)
            break; /* O_DIRECT refused after all: recorded once, no busy error loop */
    }
}

static void *kp_thread_main(void *arg)
{
    struct kp_thread *t = arg;
    struct kp_phase *ph = t->ph;
    char name[16];
    snprintf(name, sizeof(name), "kp-%s", kp_kind_names[t->kind]);
    pthread_setname_np(pthread_self(), name); /* shows in top, /proc/<pid>/task/<tid>/comm */
    if (ph->idle_load && t->kind != KP_COLLAPSER) {
        struct sched_param sp = {0};
        t->idle = pthread_setschedparam(pthread_self(), SCHED_IDLE, &sp) == 0;
    }
    if (t->cpu >= 0) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(t->cpu, &set);
        t->pinned = pthread_setaffinity_np(pthread_self(), sizeof(set), &set) == 0;
    }
    pthread_mutex_lock(&ph->gate_lock);
    ph->ready++;
    pthread_cond_broadcast(&ph->gate_cond);
    while (!ph->go)
        pthread_cond_wait(&ph->gate_cond, &ph->gate_lock);
    int go = ph->go;
    pthread_mutex_unlock(&ph->gate_lock);
    if (go < 0)
        return NULL;
    switch (t->kind) {
    case KP_COLLAPSER:
        kp_collapser(t);
        break;
    case KP_FAULT_SAME:
        kp_faulter(t, ph->coll);
        break;
    case KP_FAULT_OTHER:
        kp_faulter(t, ph->other);
        break;
    case KP_MMAP:
        kp_mmapper(t);
        break;
    case KP_PIN:
        kp_pinner(t);
        break;
    default:
        break;
    }
    return NULL;
}

/* A PMD-aligned anonymous VMA of `len` bytes (len a multiple of 2 MiB), populated with small
 * pages: MADV_NOHUGEPAGE while it is touched, so neither a THP fault nor an mTHP order can
 * give it large folios, whatever the sysfs settings.  NULL with errno set on failure. */
static char *kp_map_populated(size_t len)
{
    size_t span = len + KP_PMD_SIZE;
    char *raw = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED)
        return NULL;
    char *base = (char *)(((uintptr_t)raw + KP_PMD_SIZE - 1) & ~(KP_PMD_SIZE - 1));
    if (base > raw)
        munmap(raw, (size_t)(base - raw));
    size_t tail = (size_t)((raw + span) - (base + len));
    if (tail)
        munmap(base + len, tail);
    if (madvise(base, len, MADV_NOHUGEPAGE) != 0) {
        int e = errno;
        munmap(base, len);
        errno = e;
        return NULL;
    }
    for (size_t off = 0; off < len; off += KP_PAGE_SIZE)
        kp_touch(base + off, off);
    return base;
}

static struct kp_event *kp_alloc_events(size_t cap)
{
    if (cap == 0)
        return NULL;
    size_t len = cap * sizeof(struct kp_event);
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (p == MAP_FAILED)
        return NULL;
    /* Different VMA flags keep the mmap thread's churn mapping from merging into a buffer. */
    madvise(p, len, MADV_DONTDUMP);
    return p;
}

static void kp_phase_free(struct kp_phase *ph)
{
    for (int k = 0; k < KP_NR_KINDS; k++)
        if (ph->t[k].ev)
            munmap(ph->t[k].ev, ph->t[k].cap * sizeof(struct kp_event));
    if (ph->coll)
        munmap(ph->coll, ph->vma_len);
    if (ph->other)
        munmap(ph->other, ph->vma_len);
}

static int kp_seq_ints(PyObject *seq, const char *what, long out[KP_NR_KINDS])
{
    PyObject *fast = PySequence_Fast(seq, what);
    if (!fast)
        return -1;
    if (PySequence_Fast_GET_SIZE(fast) != KP_NR_KINDS) {
        PyErr_Format(PyExc_ValueError, "%s needs %d entries (collapser, fault-same, fault-other, "
                     "mmap, pin)", what, KP_NR_KINDS);
        Py_DECREF(fast);
        return -1;
    }
    for (int k = 0; k < KP_NR_KINDS; k++) {
        out[k] = PyLong_AsLong(PySequence_Fast_GET_ITEM(fast, k));
        if (out[k] == -1 && PyErr_Occurred()) {
            Py_DECREF(fast);
            return -1;
        }
    }
    Py_DECREF(fast);
    return 0;
}

PyDoc_STRVAR(run_phase_doc,
"run_phase(duration_ns, warmup_ns, ranges, collapse, pin_fd, pin_file_pages, placement,\n"
"          capacity, seed, gap_ns, churn_bytes, zap_pages, idle_load) -> dict\n\n"
"Run one phase of the probe with the GIL released and return its events.\n"
"placement: a core per thread kind (collapser, fault-same, fault-other, mmap, pin), -1 for\n"
"no pinning; capacity: events to preallocate per kind; idle_load: load threads under\n"
"SCHED_IDLE.  The collapser runs only when `collapse` is true, the pin thread only when\n"
"pin_fd >= 0.  Returns {'phase_ns', 'threads': [{'kind', 'cpu', 'pinned', 'sched_idle',\n"
"'events' (bytes of 32-byte records), 'n', 'overflow'}, ...]} for the threads that ran.\n"
"Raises OSError when the VMAs or buffers cannot be mapped.");

static PyObject *M_run_phase(PyObject *mod, PyObject *args)
{
    long long duration_ns, warmup_ns, gap_ns;
    int ranges, collapse, pin_fd, idle_load;
    Py_ssize_t pin_file_pages, churn_bytes, zap_pages;
    unsigned long long seed;
    PyObject *placement_obj, *capacity_obj;
    if (!PyArg_ParseTuple(args, "LLiiinOOKLnnp", &duration_ns, &warmup_ns, &ranges, &collapse,
                          &pin_fd, &pin_file_pages, &placement_obj, &capacity_obj, &seed, &gap_ns,
                          &churn_bytes, &zap_pages, &idle_load))
        return NULL;
    long placement[KP_NR_KINDS], capacity[KP_NR_KINDS];
    if (kp_seq_ints(placement_obj, "placement", placement) < 0 ||
        kp_seq_ints(capacity_obj, "capacity", capacity) < 0)
        return NULL;
    if (duration_ns <= 0 || warmup_ns < 0 || gap_ns < 0) {
        PyErr_SetString(PyExc_ValueError, "duration must be > 0 and warm-up, gap >= 0");
        return NULL;
    }
    if (ranges < 1 || ranges > 4096) {
        PyErr_SetString(PyExc_ValueError, "ranges must be in 1..4096");
        return NULL;
    }
    if (pin_fd >= 0 && pin_file_pages < 1) {
        PyErr_SetString(PyExc_ValueError, "the pin file needs at least one page");
        return NULL;
    }
    if (zap_pages < 1 || (Py_ssize_t)KP_PAGES_PER_PMD % zap_pages) {
        PyErr_SetString(PyExc_ValueError, "zap_pages must divide 512");
        return NULL;
    }
    if (churn_bytes < (Py_ssize_t)KP_PAGE_SIZE) {
        PyErr_SetString(PyExc_ValueError, "the churn mapping needs at least one page");
        return NULL;
    }

    struct kp_phase *ph = PyMem_Calloc(1, sizeof(*ph));
    if (!ph)
        return PyErr_NoMemory();
    ph->ranges = ranges;
    ph->vma_len = (size_t)ranges * KP_PMD_SIZE;
    ph->pin_fd = pin_fd;
    ph->pin_file_pages = (size_t)pin_file_pages;
    ph->churn_len = (size_t)churn_bytes;
    ph->zap_pages = (size_t)zap_pages;
    ph->idle_load = idle_load;
    ph->gap_ns = gap_ns;
    int active[KP_NR_KINDS] = {collapse != 0, 1, 1, 1, pin_fd >= 0};
    int err = 0;
    const char *what = NULL;

    Py_BEGIN_ALLOW_THREADS
    __atomic_store_n(&kp_abort_flag, 0, __ATOMIC_RELAXED);
    ph->coll = kp_map_populated(ph->vma_len);
    if (!ph->coll) {
        err = errno;
        what = "mapping the collapsing VMA";
    } else if (madvise(ph->coll, ph->vma_len, MADV_HUGEPAGE) != 0) {
        err = errno;
        what = "madvise(MADV_HUGEPAGE) on the collapsing VMA";
    } else if (!(ph->other = kp_map_populated(ph->vma_len))) {
        err = errno;
        what = "mapping the other VMA";
    }
    for (int k = 0; !err && k < KP_NR_KINDS; k++) {
        struct kp_thread *t = &ph->t[k];
        t->ph = ph;
        t->kind = (enum kp_kind)k;
        t->cpu = (int)placement[k];
        t->rng = (seed + 1) * 0x9E3779B97F4A7C15ULL + (uint64_t)k * 0xBF58476D1CE4E5B9ULL;
        if (!t->rng)
            t->rng = 1;
        if (!active[k])
            continue;
        t->cap = capacity[k] > 0 ? (size_t)capacity[k] : 0;
        if (t->cap && !(t->ev = kp_alloc_events(t->cap))) {
            err = errno;
            what = "allocating the event buffers";
        }
    }
    if (!err) {
        pthread_mutex_init(&ph->gate_lock, NULL);
        pthread_cond_init(&ph->gate_cond, NULL);
        int started = 0;
        for (int k = 0; !err && k < KP_NR_KINDS; k++) {
            if (!active[k])
                continue;
            int rc = pthread_create(&ph->t[k].th, NULL, kp_thread_main, &ph->t[k]);
            if (rc) {
                err = rc;
                what = "starting a probe thread";
            } else {
                ph->t[k].started = 1;
                started++;
            }
        }
        pthread_mutex_lock(&ph->gate_lock);
        while (!err && ph->ready < started)
            pthread_cond_wait(&ph->gate_cond, &ph->gate_lock);
        ph->phase0 = mono_ns() + warmup_ns;
        ph->go = err ? -1 : 1;
        pthread_cond_broadcast(&ph->gate_cond);
        pthread_mutex_unlock(&ph->gate_lock);
        if (!err) {
            int64_t end = ph->phase0 + duration_ns;
            for (int64_t now = mono_ns(); now < end; now = mono_ns()) {
                if (__atomic_load_n(&kp_abort_flag, __ATOMIC_RELAXED))
                    break;
                int64_t left = end - now, step = left < 10000000 ? left : 10000000;
                struct timespec d = {0, step};
                nanosleep(&d, NULL);
            }
        }
        __atomic_store_n(&ph->stop, 1, __ATOMIC_RELEASE);
        for (int k = 0; k < KP_NR_KINDS; k++)
            if (ph->t[k].started)
                pthread_join(ph->t[k].th, NULL);
        pthread_cond_destroy(&ph->gate_cond);
        pthread_mutex_destroy(&ph->gate_lock);
    }
    Py_END_ALLOW_THREADS

    PyObject *result = NULL, *threads = NULL;
    if (err) {
        PyObject *exc_args = Py_BuildValue("(is)", err, what);
        if (exc_args) {
            PyErr_SetObject(PyExc_OSError, exc_args); /* OSError(errno, what) */
            Py_DECREF(exc_args);
        }
        goto out;
    }
    threads = PyList_New(0);
    if (!threads)
        goto out;
    for (int k = 0; k < KP_NR_KINDS; k++) {
        struct kp_thread *t = &ph->t[k];
        if (!t->started)
            continue;
        PyObject *d = Py_BuildValue(
            "{s:s,s:i,s:O,s:O,s:y#,s:n,s:n}", "kind", kp_kind_names[k], "cpu", t->cpu,
            "pinned", t->pinned ? Py_True : Py_False, "sched_idle", t->idle ? Py_True : Py_False,
            "events", (const char *)t->ev, (Py_ssize_t)(t->n * sizeof(struct kp_event)), "n",
            (Py_ssize_t)t->n, "overflow", (Py_ssize_t)t->overflow);
        if (!d || PyList_Append(threads, d) < 0) {
            Py_XDECREF(d);
            goto out;
        }
        Py_DECREF(d);
    }
    result = Py_BuildValue("{s:L,s:O}", "phase_ns", (long long)duration_ns, "threads", threads);
out:
    Py_XDECREF(threads);
    kp_phase_free(ph);
    PyMem_Free(ph);
    return result;
}

PyDoc_STRVAR(collapse_check_doc,
"collapse_check(tries=3) -> dict\n\n"
"Try MADV_COLLAPSE once on a fresh 2 MiB range of small pages and report what the kernel\n"
"said: {'hugepage_errno': errno of MADV_HUGEPAGE (0 ok), 'collapse_errno': errno of the last\n"
"MADV_COLLAPSE (0 ok; EINVAL: the kernel has no MADV_COLLAPSE or refuses THP here),\n"
"'tries': calls made (EAGAIN is retried), 'thp_disable': prctl(PR_GET_THP_DISABLE)}.");

static PyObject *M_collapse_check(PyObject *mod, PyObject *args)
{
    int tries = 3;
    if (!PyArg_ParseTuple(args, "|i", &tries))
        return NULL;
    int hp_err = 0, coll_err = 0, made = 0, thp_disable = 0, map_err = 0;
    Py_BEGIN_ALLOW_THREADS
    thp_disable = prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0);
    char *base = kp_map_populated(KP_PMD_SIZE);
    if (!base) {
        map_err = errno;
    } else {
        if (madvise(base, KP_PMD_SIZE, MADV_HUGEPAGE) != 0)
            hp_err = errno;
        do {
            made++;
            coll_err = madvise(base, KP_PMD_SIZE, MADV_COLLAPSE) ? errno : 0;
        } while (coll_err == EAGAIN && made < tries);
        munmap(base, KP_PMD_SIZE);
    }
    Py_END_ALLOW_THREADS
    if (map_err) {
        errno = map_err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return Py_BuildValue("{s:i,s:i,s:i,s:i}", "hugepage_errno", hp_err, "collapse_errno",
                         coll_err, "tries", made, "thp_disable", thp_disable);
}

static PyObject *M_abort(PyObject *mod, PyObject *Py_UNUSED(ignored))
{
    __atomic_store_n(&kp_abort_flag, 1, __ATOMIC_RELAXED);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"run_phase", M_run_phase, METH_VARARGS, run_phase_doc},
    {"collapse_check", M_collapse_check, METH_VARARGS, collapse_check_doc},
    {"abort", M_abort, METH_NOARGS, "abort() -> None: end the running phase early"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef kprobe_module = {
    PyModuleDef_HEAD_INIT, "_kprobe",
    "The host kernel's MADV_COLLAPSE timed under concurrent faults, mmap() and GUP pins.", -1,
    module_methods,
};

PyMODINIT_FUNC PyInit__kprobe(void)
{
    PyObject *m = PyModule_Create(&kprobe_module);
    if (!m)
        return NULL;
    if (PyModule_AddIntConstant(m, "EVENT_SIZE", (long)sizeof(struct kp_event)) < 0 ||
        PyModule_AddIntConstant(m, "PMD_SIZE", (long)KP_PMD_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "PAGE_SIZE", (long)KP_PAGE_SIZE) < 0 ||
        PyModule_AddIntConstant(m, "MADV_COLLAPSE", MADV_COLLAPSE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
