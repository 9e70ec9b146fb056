/*
 * ptlab.core.probe._kprobe -- the live kernel's MADV_COLLAPSE, measured under concurrent load.
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
 * on that CPU would otherwise hold it off for a time slice (see core/probe/kernel_probe.py).
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

/* One event.  Keep in step with EVENT_DTYPE in core/probe/kernel_probe.py. */
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

/* ------------------------------------------------------------------------------------------ */
/* The kernel cost table (`ptlab calibrate --kernel`, core/analysis/costs.py).                          */
/*                                                                                            */
/* Small C loops that time what the virtual clock charges for one kernel step: a cache-hitting */
/* load, a locked RMW, a cache line moving between two cores, a 4 KiB copy and clear, a TLB    */
/* miss walk, an IPI round trip (membarrier), a futex wake-up, a context switch, an anonymous  */
/* fault, an mmap()+munmap() pair and MADV_COLLAPSE with and without work to do.  Each one     */
/* pins the calling thread where asked and restores its affinity before returning, releases   */
/* the GIL while it runs, and hands back raw samples (ns); core/analysis/calibrate.py takes medians.   */

#include <linux/futex.h>
#include <linux/membarrier.h>
#include <sys/syscall.h>

#define CS_LINE 64

struct cs_affinity {
    cpu_set_t saved;
    int pinned;
};

/* Pin the calling thread to `cpu` (< 0: leave it).  0, or an errno. */
static int cs_pin(struct cs_affinity *a, int cpu)
{
    a->pinned = 0;
    if (cpu < 0)
        return 0;
    if (cpu >= CPU_SETSIZE)
        return EINVAL;
    int e = pthread_getaffinity_np(pthread_self(), sizeof(a->saved), &a->saved);
    if (e)
        return e;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    e = pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
    if (e)
        return e;
    a->pinned = 1;
    return 0;
}

static void cs_unpin(struct cs_affinity *a)
{
    if (a->pinned)
        pthread_setaffinity_np(pthread_self(), sizeof(a->saved), &a->saved);
    a->pinned = 0;
}

static int cs_pin_thread(pthread_t th, int cpu)
{
    if (cpu < 0)
        return 0;
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return pthread_setaffinity_np(th, sizeof(set), &set);
}

static long cs_futex(uint32_t *uaddr, int op, uint32_t val)
{
    return syscall(SYS_futex, uaddr, op, val, NULL, NULL, 0);
}

static PyObject *cs_oserror(int err, const char *what)
{
    PyObject *exc_args = Py_BuildValue("(is)", err, what);
    if (exc_args) {
        PyErr_SetObject(PyExc_OSError, exc_args);
        Py_DECREF(exc_args);
    }
    return NULL;
}

/* A list of n int64 samples as Python ints. */
static PyObject *cs_list_i64(const int64_t *v, Py_ssize_t n)
{
    PyObject *lst = PyList_New(n);
    if (!lst)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *x = PyLong_FromLongLong(v[i]);
        if (!x) {
            Py_DECREF(lst);
            return NULL;
        }
        PyList_SET_ITEM(lst, i, x);
    }
    return lst;
}

static PyObject *cs_list_f64(const double *v, Py_ssize_t n)
{
    PyObject *lst = PyList_New(n);
    if (!lst)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *x = PyFloat_FromDouble(v[i]);
        if (!x) {
            Py_DECREF(lst);
            return NULL;
        }
        PyList_SET_ITEM(lst, i, x);
    }
    return lst;
}

/* A 2 MiB-aligned private anonymous mapping of len bytes (a multiple of 2 MiB), advised `advice`
 * (MADV_HUGEPAGE / MADV_NOHUGEPAGE; 0: none) and, if `touch`, populated by writing each page.
 * NULL with errno set on failure. */
static char *cs_map(size_t len, int advice, int touch)
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
    if (advice)
        madvise(base, len, advice); /* best effort: THP may be off; the caller checks vmstat */
    if (touch)
        for (size_t off = 0; off < len; off += KP_PAGE_SIZE)
            kp_touch(base + off, off | 1);
    return base;
}

PyDoc_STRVAR(cost_loop_doc,
"cost_loop(kind, batches, n, cpu=-1) -> list of floats\n\n"
"Time n back-to-back operations per batch on the calling thread (pinned to host core cpu when\n"
"cpu >= 0) and return each batch's mean ns per operation.  kind:\n"
"  'load_hit'    a dependent load from a line in L1 (p = *p: the load-to-use latency)\n"
"  'atomic'      an uncontended lock xadd on a private line (__atomic_fetch_add, seq_cst)\n"
"  'rwsem'       pthread_rwlock_rdlock + unlock, uncontended (the pair)\n"
"  'futex_wake'  futex(FUTEX_WAKE_PRIVATE) on a word nobody waits on (a bare syscall)");

static PyObject *M_cost_loop(PyObject *mod, PyObject *args)
{
    const char *kind;
    Py_ssize_t batches, n;
    int cpu = -1;
    if (!PyArg_ParseTuple(args, "snn|i", &kind, &batches, &n, &cpu))
        return NULL;
    if (batches <= 0 || n <= 0) {
        PyErr_SetString(PyExc_ValueError, "batches and n must be positive");
        return NULL;
    }
    int k;
    if (!strcmp(kind, "load_hit"))
        k = 0;
    else if (!strcmp(kind, "atomic"))
        k = 1;
    else if (!strcmp(kind, "rwsem"))
        k = 2;
    else if (!strcmp(kind, "futex_wake"))
        k = 3;
    else {
        PyErr_Format(PyExc_ValueError, "unknown cost loop %s (load_hit, atomic, rwsem, futex_wake)", kind);
        return NULL;
    }
    double *out = PyMem_Calloc((size_t)batches, sizeof(double));
    if (!out)
        return PyErr_NoMemory();
    struct cs_affinity aff;
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = cs_pin(&aff, cpu);
    if (!err) {
        /* the words live on lines of their own */
        static __thread void *cell[CS_LINE / sizeof(void *)] __attribute__((aligned(CS_LINE)));
        static __thread int64_t word[CS_LINE / 8] __attribute__((aligned(CS_LINE)));
        static __thread uint32_t fword[CS_LINE / 4] __attribute__((aligned(CS_LINE)));
        pthread_rwlock_t rw;
        pthread_rwlock_init(&rw, NULL);
        cell[0] = (void *)cell;
        for (Py_ssize_t b = -1; b < batches; b++) { /* batch -1 warms up */
            int64_t t0 = mono_ns();
            switch (k) {
            case 0: {
                void *p = cell[0];
                for (Py_ssize_t i = 0; i < n; i++)
                    p = *(void *volatile *)p;
                __asm__ __volatile__("" : : "r"(p) : "memory");
                break;
            }
            case 1:
                for (Py_ssize_t i = 0; i < n; i++)
                    __atomic_fetch_add(&word[0], 1, __ATOMIC_SEQ_CST);
                break;
            case 2:
                for (Py_ssize_t i = 0; i < n; i++) {
                    pthread_rwlock_rdlock(&rw);
                    pthread_rwlock_unlock(&rw);
                }
                break;
            default:
                for (Py_ssize_t i = 0; i < n; i++)
                    cs_futex(&fword[0], FUTEX_WAKE_PRIVATE, 1);
                break;
            }
            int64_t t1 = mono_ns();
            if (b >= 0)
                out[b] = (double)(t1 - t0) / (double)n;
        }
        pthread_rwlock_destroy(&rw);
        cs_unpin(&aff);
    }
    Py_END_ALLOW_THREADS
    if (err) {
        PyMem_Free(out);
        return cs_oserror(err, "cannot pin to the requested core");
    }
    PyObject *lst = cs_list_f64(out, batches);
    PyMem_Free(out);
    return lst;
}

/* One 4 KiB copy / clear with the instructions the kernel uses on x86 with ERMS:
 * copy_mc_enhanced_fast_string() (the collapse's copy_mc_user_highpage) is `rep movsb`,
 * clear_page_erms() (folio_zero_user, a fault's clear) is `rep stosb`.  Elsewhere: libc. */
static inline void cs_copy_page(char *dst, const char *src)
{
#if defined(__x86_64__)
    size_t n = KP_PAGE_SIZE;
    __asm__ __volatile__("rep movsb" : "+D"(dst), "+S"(src), "+c"(n) : : "memory");
#else
    memcpy(dst, src, KP_PAGE_SIZE);
    __asm__ __volatile__("" ::: "memory");
#endif
}

static inline void cs_clear_page(char *dst, int v)
{
#if defined(__x86_64__)
    size_t n = KP_PAGE_SIZE;
    __asm__ __volatile__("rep stosb" : "+D"(dst), "+c"(n) : "a"(v) : "memory");
#else
    memset(dst, v, KP_PAGE_SIZE);
    __asm__ __volatile__("" ::: "memory");
#endif
}

PyDoc_STRVAR(cost_copy_doc,
"cost_copy(kind, pool_bytes, run_bytes, runs, cpu=-1) -> list of floats\n\n"
"Copy ('copy') or clear ('zero') 4 KiB pages as the kernel does on x86 (rep movsb, rep stosb)\n"
"run_bytes page by page, 4 KiB per call, at rotating offsets of a pool_bytes pool (both\n"
"multiples of 2 MiB; the pools are populated first and asked for huge pages, as the kernel's\n"
"direct map has), and return each run's mean ns per 4 KiB.  A pool larger than the caches\n"
"times the streaming rate, a run_bytes pool (pool_bytes == run_bytes) small enough to stay in\n"
"cache times the warm rate.");

static PyObject *M_cost_copy(PyObject *mod, PyObject *args)
{
    const char *kind;
    Py_ssize_t pool, run, runs;
    int cpu = -1;
    if (!PyArg_ParseTuple(args, "snnn|i", &kind, &pool, &run, &runs, &cpu))
        return NULL;
    int copy = !strcmp(kind, "copy");
    if (!copy && strcmp(kind, "zero")) {
        PyErr_Format(PyExc_ValueError, "unknown copy kind %s (copy, zero)", kind);
        return NULL;
    }
    if (runs <= 0 || run <= 0 || pool < run || pool % (Py_ssize_t)KP_PMD_SIZE ||
        run % (Py_ssize_t)KP_PAGE_SIZE || pool % run) {
        PyErr_SetString(PyExc_ValueError, "need runs > 0, run_bytes a multiple of 4 KiB dividing "
                        "pool_bytes, pool_bytes a multiple of 2 MiB");
        return NULL;
    }
    double *out = PyMem_Calloc((size_t)runs, sizeof(double));
    if (!out)
        return PyErr_NoMemory();
    struct cs_affinity aff;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    char *src = NULL, *dst = NULL;
    err = cs_pin(&aff, cpu);
    if (!err) {
        dst = cs_map((size_t)pool, MADV_HUGEPAGE, 1);
        if (!dst)
            err = errno;
        if (!err && copy) {
            src = cs_map((size_t)pool, MADV_HUGEPAGE, 1);
            if (!src)
                err = errno;
        }
    }
    if (!err) {
        Py_ssize_t slots = pool / run, pages = run / (Py_ssize_t)KP_PAGE_SIZE;
        for (Py_ssize_t r = -2; r < runs; r++) { /* two warm-up runs */
            Py_ssize_t slot = (r + 2) % slots;
            char *d = dst + slot * run;
            int64_t t0 = mono_ns();
            if (copy) {
                char *s = src + slot * run;
                for (Py_ssize_t p = 0; p < pages; p++)
                    cs_copy_page(d + p * KP_PAGE_SIZE, s + p * KP_PAGE_SIZE);
            } else {
                for (Py_ssize_t p = 0; p < pages; p++)
                    cs_clear_page(d + p * KP_PAGE_SIZE, (int)(r & 0x7f));
            }
            int64_t t1 = mono_ns();
            if (r >= 0)
                out[r] = (double)(t1 - t0) / (double)pages;
        }
    }
    if (src)
        munmap(src, (size_t)pool);
    if (dst)
        munmap(dst, (size_t)pool);
    cs_unpin(&aff);
    Py_END_ALLOW_THREADS
    if (err) {
        PyMem_Free(out);
        return cs_oserror(err, "cost_copy: cannot map or pin");
    }
    PyObject *lst = cs_list_f64(out, runs);
    PyMem_Free(out);
    return lst;
}

/* ---- two threads: cache-line ping-pong, context switch, membarrier ---------------------- */

struct cs_pair {
    int64_t word __attribute__((aligned(CS_LINE))); /* the ping-pong line */
    uint32_t a __attribute__((aligned(CS_LINE)));   /* futex words, one line each */
    uint32_t b __attribute__((aligned(CS_LINE)));
    int stop __attribute__((aligned(CS_LINE)));
    int running;
    int cpu;
    int pin_err;
    Py_ssize_t n;
};

/* The peer of the ping-pong: waits for odd values and answers with the next even one. */
static void *cs_pong(void *arg)
{
    struct cs_pair *p = arg;
    p->pin_err = cs_pin_thread(pthread_self(), p->cpu);
    __atomic_store_n(&p->running, 1, __ATOMIC_RELEASE);
    for (Py_ssize_t i = 0; i < p->n; i++) {
        int64_t want = 2 * i + 1;
        while (__atomic_load_n(&p->word, __ATOMIC_ACQUIRE) != want)
            if (__atomic_load_n(&p->stop, __ATOMIC_RELAXED))
                return NULL;
        __atomic_store_n(&p->word, want + 1, __ATOMIC_RELEASE);
    }
    return NULL;
}

PyDoc_STRVAR(cost_line_transfer_doc,
"cost_line_transfer(batches, n, cpu_a, cpu_b) -> list of floats\n\n"
"Two threads, pinned to host cores cpu_a (the caller) and cpu_b, pass a counter on one cache\n"
"line back and forth (each spins on plain loads until it sees its turn, then stores the next\n"
"value), n round trips per batch; returns each batch's mean one-way time (round trip / 2, ns).");

static PyObject *M_cost_line_transfer(PyObject *mod, PyObject *args)
{
    Py_ssize_t batches, n;
    int cpu_a, cpu_b;
    if (!PyArg_ParseTuple(args, "nnii", &batches, &n, &cpu_a, &cpu_b))
        return NULL;
    if (batches <= 0 || n <= 0 || cpu_a < 0 || cpu_b < 0 || cpu_a == cpu_b) {
        PyErr_SetString(PyExc_ValueError, "need batches, n > 0 and two different cores");
        return NULL;
    }
    double *out = PyMem_Calloc((size_t)batches, sizeof(double));
    struct cs_pair *p = NULL;
    if (!out || posix_memalign((void **)&p, CS_LINE, sizeof(*p))) {
        PyMem_Free(out);
        return PyErr_NoMemory();
    }
    memset(p, 0, sizeof(*p));
    p->cpu = cpu_b;
    p->n = (batches + 1) * n;
    struct cs_affinity aff;
    int err;
    pthread_t th;
    Py_BEGIN_ALLOW_THREADS
    err = cs_pin(&aff, cpu_a);
    if (!err && pthread_create(&th, NULL, cs_pong, p) != 0)
        err = EAGAIN;
    if (!err) {
        while (!__atomic_load_n(&p->running, __ATOMIC_ACQUIRE))
            ;
        Py_ssize_t i = 0;
        for (Py_ssize_t b = -1; b < batches; b++) { /* batch -1 warms up */
            int64_t t0 = mono_ns();
            for (Py_ssize_t j = 0; j < n; j++, i++) {
                __atomic_store_n(&p->word, 2 * i + 1, __ATOMIC_RELEASE);
                while (__atomic_load_n(&p->word, __ATOMIC_ACQUIRE) != 2 * i + 2)
                    ;
            }
            int64_t t1 = mono_ns();
            if (b >= 0)
                out[b] = (double)(t1 - t0) / (2.0 * (double)n);
        }
        __atomic_store_n(&p->stop, 1, __ATOMIC_RELAXED);
        pthread_join(th, NULL);
        if (p->pin_err)
            err = p->pin_err;
    }
    cs_unpin(&aff);
    Py_END_ALLOW_THREADS
    free(p);
    if (err) {
        PyMem_Free(out);
        return cs_oserror(err, "cost_line_transfer: cannot start or pin the second thread");
    }
    PyObject *lst = cs_list_f64(out, batches);
    PyMem_Free(out);
    return lst;
}

/* The other side of the context-switch ping-pong: sleeps on a until woken, wakes b. */
static void *cs_switch_peer(void *arg)
{
    struct cs_pair *p = arg;
    p->pin_err = cs_pin_thread(pthread_self(), p->cpu);
    __atomic_store_n(&p->running, 1, __ATOMIC_RELEASE);
    for (Py_ssize_t i = 0; i < p->n; i++) {
        while (!__atomic_load_n(&p->a, __ATOMIC_ACQUIRE))
            cs_futex(&p->a, FUTEX_WAIT_PRIVATE, 0);
        __atomic_store_n(&p->a, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&p->b, 1, __ATOMIC_RELEASE);
        cs_futex(&p->b, FUTEX_WAKE_PRIVATE, 1);
    }
    return NULL;
}

PyDoc_STRVAR(cost_context_switch_doc,
"cost_context_switch(batches, n, cpu) -> list of floats\n\n"
"Two threads pinned to the same host core hand the core to each other n times per batch with\n"
"futex wait/wake (perf bench sched pipe's shape: each hand-over is a wake-up and a switch);\n"
"returns each batch's mean per hand-over (round trip / 2, ns).");

static PyObject *M_cost_context_switch(PyObject *mod, PyObject *args)
{
    Py_ssize_t batches, n;
    int cpu;
    if (!PyArg_ParseTuple(args, "nni", &batches, &n, &cpu))
        return NULL;
    if (batches <= 0 || n <= 0 || cpu < 0) {
        PyErr_SetString(PyExc_ValueError, "need batches, n > 0 and a core");
        return NULL;
    }
    double *out = PyMem_Calloc((size_t)batches, sizeof(double));
    struct cs_pair *p = NULL;
    if (!out || posix_memalign((void **)&p, CS_LINE, sizeof(*p))) {
        PyMem_Free(out);
        return PyErr_NoMemory();
    }
    memset(p, 0, sizeof(*p));
    p->cpu = cpu;
    p->n = (batches + 1) * n;
    struct cs_affinity aff;
    int err;
    pthread_t th;
    Py_BEGIN_ALLOW_THREADS
    err = cs_pin(&aff, cpu);
    if (!err && pthread_create(&th, NULL, cs_switch_peer, p) != 0)
        err = EAGAIN;
    if (!err) {
        for (Py_ssize_t b = -1; b < batches; b++) {
            int64_t t0 = mono_ns();
            for (Py_ssize_t j = 0; j < n; j++) {
                __atomic_store_n(&p->a, 1, __ATOMIC_RELEASE);
                cs_futex(&p->a, FUTEX_WAKE_PRIVATE, 1);
                while (!__atomic_load_n(&p->b, __ATOMIC_ACQUIRE))
                    cs_futex(&p->b, FUTEX_WAIT_PRIVATE, 0);
                __atomic_store_n(&p->b, 0, __ATOMIC_RELAXED);
            }
            int64_t t1 = mono_ns();
            if (b >= 0)
                out[b] = (double)(t1 - t0) / (2.0 * (double)n);
        }
        pthread_join(th, NULL);
        if (p->pin_err)
            err = p->pin_err;
    }
    cs_unpin(&aff);
    Py_END_ALLOW_THREADS
    free(p);
    if (err) {
        PyMem_Free(out);
        return cs_oserror(err, "cost_context_switch: cannot start or pin the second thread");
    }
    PyObject *lst = cs_list_f64(out, batches);
    PyMem_Free(out);
    return lst;
}

/* A thread of this mm that keeps running on its core (so membarrier must IPI that core). */
static void *cs_spinner(void *arg)
{
    struct cs_pair *p = arg;
    p->pin_err = cs_pin_thread(pthread_self(), p->cpu);
    __atomic_store_n(&p->running, 1, __ATOMIC_RELEASE);
    while (!__atomic_load_n(&p->stop, __ATOMIC_RELAXED))
        __asm__ __volatile__("" ::: "memory");
    return NULL;
}

/* A thread of this mm that sleeps until told to stop: with it, mm_users > 1, so membarrier()
 * takes its full path (runqueue scan, smp_call_function_many) instead of returning early. */
static void *cs_sleeper(void *arg)
{
    struct cs_pair *p = arg;
    while (!__atomic_load_n(&p->a, __ATOMIC_ACQUIRE))
        cs_futex(&p->a, FUTEX_WAIT_PRIVATE, 0);
    return NULL;
}

static int cs_membarrier(int cmd)
{
    return (int)syscall(__NR_membarrier, cmd, 0, 0);
}

/* The "Function call interrupts" count of host core `cpu` in /proc/interrupts (x86 CAL:,
 * arm64 IPI1:), or -1 when it cannot be read.  The column is found from the header's CPUn. */
static long long cs_fcall_irqs(int cpu)
{
    FILE *f = fopen("/proc/interrupts", "r");
    if (!f)
        return -1;
    char line[8192];
    long long res = -1;
    int col = -1;
    char *save = NULL;
    if (fgets(line, sizeof(line), f)) {
        int i = 0;
        for (char *tok = strtok_r(line, " \t\n", &save); tok; tok = strtok_r(NULL, " \t\n", &save), i++)
            if (!strncmp(tok, "CPU", 3) && atoi(tok + 3) == cpu)
                col = i;
    }
    while (col >= 0 && fgets(line, sizeof(line), f)) {
        if (!strstr(line, "Function call interrupts"))
            continue;
        char *tok = strtok_r(line, " \t\n", &save); /* the label */
        for (int i = 0; tok && i <= col; i++)
            tok = strtok_r(NULL, " \t\n", &save);
        if (tok)
            res = atoll(tok);
        break;
    }
    fclose(f);
    return res;
}

PyDoc_STRVAR(cost_membarrier_doc,
"cost_membarrier(n, cpu_self, cpu_other) -> dict\n\n"
"membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) timed n times from host core cpu_self, twice.\n"
"'alone': another thread of the process exists but sleeps, so the call takes its full path\n"
"(the runqueue scan) and IPIs nobody.  'target': a second thread busy-loops on cpu_other, so\n"
"the kernel IPIs that core and waits for the handler (smp_call_function_many(..., wait=1),\n"
"the shape of a TLB-flush IPI) -- whenever that thread is the one running there.  'ipis':\n"
"per target call, how many function-call interrupts cpu_other took meanwhile (read from\n"
"/proc/interrupts outside the timed window; empty when that file has no such line), so the\n"
"caller can keep the calls that did send an IPI.  Registers\n"
"MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED first.  Raises OSError(errno) when the kernel has\n"
"no membarrier or refuses it.");

static PyObject *M_cost_membarrier(PyObject *mod, PyObject *args)
{
    Py_ssize_t n;
    int cpu_self, cpu_other;
    if (!PyArg_ParseTuple(args, "nii", &n, &cpu_self, &cpu_other))
        return NULL;
    if (n <= 0 || cpu_self < 0 || cpu_other < 0 || cpu_self == cpu_other) {
        PyErr_SetString(PyExc_ValueError, "need n > 0 and two different cores");
        return NULL;
    }
    int64_t *alone = PyMem_Calloc((size_t)n, sizeof(int64_t));
    int64_t *target = PyMem_Calloc((size_t)n, sizeof(int64_t));
    int64_t *ipis = PyMem_Calloc((size_t)n, sizeof(int64_t));
    struct cs_pair *p = NULL;
    if (!alone || !target || !ipis || posix_memalign((void **)&p, CS_LINE, sizeof(*p))) {
        PyMem_Free(alone);
        PyMem_Free(target);
        PyMem_Free(ipis);
        return PyErr_NoMemory();
    }
    memset(p, 0, sizeof(*p));
    p->cpu = cpu_other;
    struct cs_affinity aff = {.pinned = 0};
    int err = 0, counted = cs_fcall_irqs(cpu_other) >= 0, sleeping = 0;
    const char *what = "membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED)";
    pthread_t th, sl;
    Py_BEGIN_ALLOW_THREADS
    if (cs_membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED) != 0)
        err = errno;
    if (!err && (err = cs_pin(&aff, cpu_self)) != 0)
        what = "cannot pin to the requested core";
    if (!err) {
        if (pthread_create(&sl, NULL, cs_sleeper, p) != 0) {
            err = EAGAIN;
            what = "cost_membarrier: cannot start the sleeping thread";
        } else {
            sleeping = 1;
        }
    }
    if (!err) {
        what = "membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)";
        for (Py_ssize_t i = -16; i < n && !err; i++) {
            int64_t t0 = mono_ns();
            if (cs_membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) != 0)
                err = errno;
            int64_t t1 = mono_ns();
            if (i >= 0)
                alone[i] = t1 - t0;
        }
        if (!err && pthread_create(&th, NULL, cs_spinner, p) != 0) {
            err = EAGAIN;
            what = "cost_membarrier: cannot start the second thread";
        } else if (!err) {
            while (!__atomic_load_n(&p->running, __ATOMIC_ACQUIRE))
                ;
            for (Py_ssize_t i = -16; i < n && !err; i++) {
                long long c0 = counted && i >= 0 ? cs_fcall_irqs(cpu_other) : 0;
                int64_t t0 = mono_ns();
                if (cs_membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) != 0)
                    err = errno;
                int64_t t1 = mono_ns();
                long long c1 = counted && i >= 0 ? cs_fcall_irqs(cpu_other) : 0;
                if (i >= 0) {
                    target[i] = t1 - t0;
                    ipis[i] = c1 - c0;
                }
            }
            __atomic_store_n(&p->stop, 1, __ATOMIC_RELAXED);
            pthread_join(th, NULL);
            if (!err && p->pin_err) {
                err = p->pin_err;
                what = "cost_membarrier: cannot pin the second thread";
            }
        }
    }
    if (sleeping) {
        __atomic_store_n(&p->a, 1, __ATOMIC_RELEASE);
        cs_futex(&p->a, FUTEX_WAKE_PRIVATE, 1);
        pthread_join(sl, NULL);
    }
    cs_unpin(&aff);
    Py_END_ALLOW_THREADS
    free(p);
    PyObject *res = NULL;
    if (err) {
        cs_oserror(err, what);
    } else {
        PyObject *a = cs_list_i64(alone, n), *t = cs_list_i64(target, n);
        PyObject *c = cs_list_i64(ipis, counted ? n : 0);
        if (a && t && c)
            res = Py_BuildValue("{s:O,s:O,s:O}", "alone", a, "target", t, "ipis", c);
        Py_XDECREF(a);
        Py_XDECREF(t);
        Py_XDECREF(c);
    }
    PyMem_Free(alone);
    PyMem_Free(target);
    PyMem_Free(ipis);
    return res;
}

/* ---- the kernel's own paths: faults, mmap, MADV_COLLAPSE, TLB walks ---------------------- */

PyDoc_STRVAR(cost_fault_doc,
"cost_fault(pages, rounds, cpu=-1) -> list of ints\n\n"
"The minimal anonymous fault loop: mmap `pages` small pages (MADV_NOHUGEPAGE), then `rounds`\n"
"times: touch each page (a write fault: do_anonymous_page allocates and zeroes a page; each\n"
"touch timed on its own) and MADV_DONTNEED them all.  Returns the pages * rounds fault times\n"
"(ns), the first round included.");

static PyObject *M_cost_fault(PyObject *mod, PyObject *args)
{
    Py_ssize_t pages, rounds;
    int cpu = -1;
    if (!PyArg_ParseTuple(args, "nn|i", &pages, &rounds, &cpu))
        return NULL;
    if (pages <= 0 || rounds <= 0 || pages > 512) {
        PyErr_SetString(PyExc_ValueError, "need 1..512 pages and rounds > 0");
        return NULL;
    }
    int64_t *out = PyMem_Calloc((size_t)(pages * rounds), sizeof(int64_t));
    if (!out)
        return PyErr_NoMemory();
    struct cs_affinity aff;
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = cs_pin(&aff, cpu);
    char *base = err ? NULL : cs_map(KP_PMD_SIZE, MADV_NOHUGEPAGE, 0);
    if (!err && !base)
        err = errno;
    if (!err) {
        size_t len = (size_t)pages * KP_PAGE_SIZE;
        for (Py_ssize_t r = 0; r < rounds; r++) {
            for (Py_ssize_t i = 0; i < pages; i++) {
                char *q = base + i * KP_PAGE_SIZE;
                int64_t t0 = mono_ns();
                kp_touch(q, (uint64_t)i);
                int64_t t1 = mono_ns();
                out[r * pages + i] = t1 - t0;
            }
            madvise(base, len, MADV_DONTNEED);
        }
        munmap(base, KP_PMD_SIZE);
    }
    cs_unpin(&aff);
    Py_END_ALLOW_THREADS
    PyObject *lst = err ? cs_oserror(err, "cost_fault: cannot map or pin") : cs_list_i64(out, pages * rounds);
    PyMem_Free(out);
    return lst;
}

PyDoc_STRVAR(cost_thp_fault_doc,
"cost_thp_fault(n, cpu=-1, batch=1) -> list of ints\n\n"
"n THP faults: `batch` fresh 2 MiB-aligned ranges advised MADV_HUGEPAGE are mapped at a time,\n"
"the first write to each timed (do_huge_pmd_anonymous_page allocates an order-9 folio and\n"
"clears 2 MiB, when THP allows; the caller checks /proc/vmstat thp_fault_alloc), then all are\n"
"unmapped.  batch=1 reuses one just-freed, cache-warm 2 MiB; a batch larger than the last-level\n"
"cache clears pages that are not in it.  Returns n times (ns).");

static PyObject *M_cost_thp_fault(PyObject *mod, PyObject *args)
{
    Py_ssize_t n, batch = 1;
    int cpu = -1;
    if (!PyArg_ParseTuple(args, "n|in", &n, &cpu, &batch))
        return NULL;
    if (n <= 0 || batch <= 0 || batch > 4096) {
        PyErr_SetString(PyExc_ValueError, "n must be positive, batch in 1..4096");
        return NULL;
    }
    int64_t *out = PyMem_Calloc((size_t)n, sizeof(int64_t));
    if (!out)
        return PyErr_NoMemory();
    struct cs_affinity aff;
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = cs_pin(&aff, cpu);
    for (Py_ssize_t i = 0; i < n && !err; i += batch) {
        Py_ssize_t m = n - i < batch ? n - i : batch;
        size_t len = (size_t)m * KP_PMD_SIZE;
        char *base = cs_map(len, MADV_HUGEPAGE, 0);
        if (!base) {
            err = errno;
            break;
        }
        for (Py_ssize_t j = 0; j < m; j++) {
            int64_t t0 = mono_ns();
            kp_touch(base + j * KP_PMD_SIZE, (uint64_t)(i + j));
            int64_t t1 = mono_ns();
            out[i + j] = t1 - t0;
        }
        munmap(base, len);
    }
    cs_unpin(&aff);
    Py_END_ALLOW_THREADS
    PyObject *lst = err ? cs_oserror(err, "cost_thp_fault: cannot map or pin") : cs_list_i64(out, n);
    PyMem_Free(out);
    return lst;
}

PyDoc_STRVAR(cost_mmap_doc,
"cost_mmap(n, nbytes, cpu=-1) -> list of ints\n\n"
"n times: mmap() an anonymous private region of nbytes and munmap() it untouched (no page\n"
"faults), timed as one pair.  Returns n pair times (ns).");

static PyObject *M_cost_mmap(PyObject *mod, PyObject *args)
{
    Py_ssize_t n, nbytes;
    int cpu = -1;
    if (!PyArg_ParseTuple(args, "nn|i", &n, &nbytes, &cpu))
        return NULL;
    if (n <= 0 || nbytes <= 0) {
        PyErr_SetString(PyExc_ValueError, "n and nbytes must be positive");
        return NULL;
    }
    int64_t *out = PyMem_Calloc((size_t)n, sizeof(int64_t));
    if (!out)
        return PyErr_NoMemory();
    struct cs_affinity aff;
    int err;
    Py_BEGIN_ALLOW_THREADS
    err = cs_pin(&aff, cpu);
    for (Py_ssize_t i = -16; i < n && !err; i++) {
        int64_t t0 = mono_ns();
        void *p = mmap(NULL, (size_t)nbytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) {
            err = errno;
            break;
        }
        munmap(p, (size_t)nbytes);
        int64_t t1 = mono_ns();
        if (i >= 0)
            out[i] = t1 - t0;
    }
    cs_unpin(&aff);
    Py_END_ALLOW_THREADS
    PyObject *lst = err ? cs_oserror(err, "cost_mmap: mmap failed") : cs_list_i64(out, n);
    PyMem_Free(out);
    return lst;
}

/* The load of cost_collapse: faults pages on another core, so that core always has pages in
 * its per-CPU LRU batches and lru_add_drain_all() must queue work there and wait for it. */
struct cs_load {
    int stop __attribute__((aligned(CS_LINE)));
    int running;
    int cpu, pinned, idle;
    char *base;
};

static void *cs_fault_load(void *arg)
{
    struct cs_load *l = arg;
    /* SCHED_IDLE as in the probe's load threads: the drain's kworker on this core runs at
     * once instead of waiting out the load's time slice (core/probe/kernel_probe.py explains). */
    l->pinned = cs_pin_thread(pthread_self(), l->cpu) == 0;
    __atomic_store_n(&l->running, 1, __ATOMIC_RELEASE); /* before SCHED_IDLE: a busy core may
                                                             not run an idle thread for long */
    struct sched_param sp = {0};
    l->idle = pthread_setschedparam(pthread_self(), SCHED_IDLE, &sp) == 0;
    uint64_t v = 0;
    while (!__atomic_load_n(&l->stop, __ATOMIC_RELAXED)) {
        for (size_t i = 0; i < 64; i++)
            kp_touch(l->base + i * KP_PAGE_SIZE, ++v);
        madvise(l->base, 64 * KP_PAGE_SIZE, MADV_DONTNEED);
    }
    return NULL;
}

PyDoc_STRVAR(cost_collapse_doc,
"cost_collapse(n, cpu_self=-1, cpu_load=-1, present=512) -> dict\n\n"
"n times, on host core cpu_self: a fresh 2 MiB range whose first `present` small pages are\n"
"populated (under MADV_NOHUGEPAGE, then MADV_HUGEPAGE; the rest stay pte_none, which\n"
"MADV_COLLAPSE accepts: it ignores max_ptes_none), MADV_COLLAPSE timed on it ('collapse':\n"
"drain + scan + collapse_huge_page: allocate, isolate, flush, copy the present pages and clear\n"
"the others, install), then MADV_COLLAPSE\n"
"timed again on the now PMD-mapped range ('drain': madvise_collapse() runs\n"
"lru_add_drain_all() and finds SCAN_PMD_MAPPED at once -- the drain and the call's fixed\n"
"cost), then munmap.  With cpu_load >= 0 a SCHED_IDLE thread faults pages on that core\n"
"meanwhile (as `ptlab kernel`'s load does), so the drain has a remote CPU to flush.\n"
"Returns {'collapse': [ns of the calls that succeeded], 'drain': [ns], 'errors': {errno: n},\n"
"'load_pinned': bool, 'load_idle': bool}.");

static PyObject *M_cost_collapse(PyObject *mod, PyObject *args)
{
    Py_ssize_t n, present = (Py_ssize_t)KP_PAGES_PER_PMD;
    int cpu_self = -1, cpu_load = -1;
    if (!PyArg_ParseTuple(args, "n|iin", &n, &cpu_self, &cpu_load, &present))
        return NULL;
    if (n <= 0 || present < 1 || present > (Py_ssize_t)KP_PAGES_PER_PMD) {
        PyErr_SetString(PyExc_ValueError, "n must be positive, present in 1..512");
        return NULL;
    }
    int64_t *coll = PyMem_Calloc((size_t)n, sizeof(int64_t));
    int64_t *drain = PyMem_Calloc((size_t)n, sizeof(int64_t));
    int *errs = PyMem_Calloc((size_t)n, sizeof(int));
    struct cs_load *l = NULL;
    if (!coll || !drain || !errs || posix_memalign((void **)&l, CS_LINE, sizeof(*l))) {
        PyMem_Free(coll);
        PyMem_Free(drain);
        PyMem_Free(errs);
        return PyErr_NoMemory();
    }
    memset(l, 0, sizeof(*l));
    l->cpu = cpu_load;
    struct cs_affinity aff;
    int err = 0, load = 0;
    Py_ssize_t nc = 0, nd = 0;
    const char *what = "cost_collapse: cannot pin";
    pthread_t th;
    Py_BEGIN_ALLOW_THREADS
    err = cs_pin(&aff, cpu_self);
    if (!err && cpu_load >= 0) {
        l->base = cs_map(KP_PMD_SIZE, MADV_NOHUGEPAGE, 0);
        if (!l->base) {
            err = errno;
            what = "cost_collapse: cannot map the load's pages";
        } else if (pthread_create(&th, NULL, cs_fault_load, l) != 0) {
            err = EAGAIN;
            what = "cost_collapse: cannot start the load thread";
        } else {
            load = 1;
            while (!__atomic_load_n(&l->running, __ATOMIC_ACQUIRE))
                ;
        }
    }
    for (Py_ssize_t i = 0; i < n && !err; i++) {
        char *base = cs_map(KP_PMD_SIZE, MADV_NOHUGEPAGE, 0);
        if (!base) {
            err = errno;
            what = "cost_collapse: cannot map a range";
            break;
        }
        for (Py_ssize_t pg = 0; pg < present; pg++)
            kp_touch(base + pg * KP_PAGE_SIZE, (uint64_t)pg | 1);
        madvise(base, KP_PMD_SIZE, MADV_HUGEPAGE);
        int64_t t0 = mono_ns();
        int rc = madvise(base, KP_PMD_SIZE, MADV_COLLAPSE);
        int64_t t1 = mono_ns();
        int e = rc ? errno : 0;
        if (e) {
            errs[i] = e;
        } else {
            coll[nc++] = t1 - t0;
            t0 = mono_ns();
            rc = madvise(base, KP_PMD_SIZE, MADV_COLLAPSE);
            t1 = mono_ns();
            if (rc == 0)
                drain[nd++] = t1 - t0;
        }
        munmap(base, KP_PMD_SIZE);
        if (e == EINVAL) /* no MADV_COLLAPSE here: no point going on */
            break;
    }
    if (load) {
        __atomic_store_n(&l->stop, 1, __ATOMIC_RELAXED);
        struct sched_param sp = {0};
        pthread_setschedparam(th, SCHED_OTHER, &sp); /* so that it gets to see the stop */
        pthread_join(th, NULL);
    }
    if (l->base)
        munmap(l->base, KP_PMD_SIZE);
    cs_unpin(&aff);
    Py_END_ALLOW_THREADS
    PyObject *res = NULL;
    if (err) {
        cs_oserror(err, what);
    } else {
        PyObject *c = cs_list_i64(coll, nc), *d = cs_list_i64(drain, nd), *ed = PyDict_New();
        int ok = c && d && ed;
        for (Py_ssize_t i = 0; ok && i < n; i++) {
            if (!errs[i])
                continue;
            PyObject *key = PyLong_FromLong(errs[i]);
            PyObject *old = key ? PyDict_GetItemWithError(ed, key) : NULL;
            long cnt = old ? PyLong_AsLong(old) + 1 : 1;
            PyObject *val = PyLong_FromLong(cnt);
            ok = key && val && !PyErr_Occurred() && PyDict_SetItem(ed, key, val) == 0;
            Py_XDECREF(key);
            Py_XDECREF(val);
        }
        if (ok)
            res = Py_BuildValue("{s:O,s:O,s:O,s:O,s:O}", "collapse", c, "drain", d, "errors", ed,
                                "load_pinned", (load && l->pinned) ? Py_True : Py_False,
                                "load_idle", (load && l->idle) ? Py_True : Py_False);
        Py_XDECREF(c);
        Py_XDECREF(d);
        Py_XDECREF(ed);
    }
    free(l);
    PyMem_Free(coll);
    PyMem_Free(drain);
    PyMem_Free(errs);
    return res;
}

PyDoc_STRVAR(cost_tlb_walk_doc,
"cost_tlb_walk(pages, batches, n, huge, cpu=-1) -> list of floats\n\n"
"A dependent pointer chase over one cache line in each of `pages` pages (a random cyclic\n"
"order; the line's offset in its page varies so the lines spread over the cache sets), in a\n"
"buffer mapped with small pages (huge=0: MADV_NOHUGEPAGE, so with pages beyond the STLB's\n"
"reach nearly every load misses the TLB) or with 2 MiB pages (huge=1: MADV_HUGEPAGE; the\n"
"caller checks thp_fault_alloc).  Same lines, same order in both, so the difference per load is\n"
"the page walk (its entries cached).  Returns each batch's mean ns per load.");

static PyObject *M_cost_tlb_walk(PyObject *mod, PyObject *args)
{
    Py_ssize_t pages, batches, n;
    int huge, cpu = -1;
    if (!PyArg_ParseTuple(args, "nnnp|i", &pages, &batches, &n, &huge, &cpu))
        return NULL;
    if (pages < 2 || pages % KP_PAGES_PER_PMD || batches <= 0 || n <= 0) {
        PyErr_SetString(PyExc_ValueError, "need pages a multiple of 512 and batches, n > 0");
        return NULL;
    }
    double *out = PyMem_Calloc((size_t)batches, sizeof(double));
    Py_ssize_t *order = PyMem_Calloc((size_t)pages, sizeof(Py_ssize_t));
    if (!out || !order) {
        PyMem_Free(out);
        PyMem_Free(order);
        return PyErr_NoMemory();
    }
    struct cs_affinity aff;
    int err;
    size_t len = (size_t)pages * KP_PAGE_SIZE;
    Py_BEGIN_ALLOW_THREADS
    err = cs_pin(&aff, cpu);
    char *buf = err ? NULL : cs_map(len, huge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE, 1);
    if (!err && !buf)
        err = errno;
    if (!err) {
        uint64_t rng = 0x9E3779B97F4A7C15ULL;
        for (Py_ssize_t i = 0; i < pages; i++)
            order[i] = i;
        for (Py_ssize_t i = pages - 1; i > 0; i--) { /* Fisher-Yates */
            Py_ssize_t j = (Py_ssize_t)(xorshift64(&rng) % (uint64_t)(i + 1));
            Py_ssize_t t = order[i];
            order[i] = order[j];
            order[j] = t;
        }
#define CS_SLOT(pg) (buf + (pg) * KP_PAGE_SIZE + ((pg) % (KP_PAGE_SIZE / CS_LINE)) * CS_LINE)
        for (Py_ssize_t i = 0; i < pages; i++)
            *(void **)CS_SLOT(order[i]) = CS_SLOT(order[(i + 1) % pages]);
        void *p = CS_SLOT(order[0]);
#undef CS_SLOT
        for (Py_ssize_t b = -1; b < batches; b++) {
            int64_t t0 = mono_ns();
            for (Py_ssize_t i = 0; i < n; i++)
                p = *(void *volatile *)p;
            int64_t t1 = mono_ns();
            if (b >= 0)
                out[b] = (double)(t1 - t0) / (double)n;
        }
        __asm__ __volatile__("" : : "r"(p) : "memory");
        munmap(buf, len);
    }
    cs_unpin(&aff);
    Py_END_ALLOW_THREADS
    PyMem_Free(order);
    PyObject *lst = err ? cs_oserror(err, "cost_tlb_walk: cannot map or pin") : cs_list_f64(out, batches);
    PyMem_Free(out);
    return lst;
}

static PyMethodDef module_methods[] = {
    {"run_phase", M_run_phase, METH_VARARGS, run_phase_doc},
    {"collapse_check", M_collapse_check, METH_VARARGS, collapse_check_doc},
    {"abort", M_abort, METH_NOARGS, "abort() -> None: end the running phase early"},
    {"cost_loop", M_cost_loop, METH_VARARGS, cost_loop_doc},
    {"cost_copy", M_cost_copy, METH_VARARGS, cost_copy_doc},
    {"cost_line_transfer", M_cost_line_transfer, METH_VARARGS, cost_line_transfer_doc},
    {"cost_context_switch", M_cost_context_switch, METH_VARARGS, cost_context_switch_doc},
    {"cost_membarrier", M_cost_membarrier, METH_VARARGS, cost_membarrier_doc},
    {"cost_fault", M_cost_fault, METH_VARARGS, cost_fault_doc},
    {"cost_thp_fault", M_cost_thp_fault, METH_VARARGS, cost_thp_fault_doc},
    {"cost_mmap", M_cost_mmap, METH_VARARGS, cost_mmap_doc},
    {"cost_collapse", M_cost_collapse, METH_VARARGS, cost_collapse_doc},
    {"cost_tlb_walk", M_cost_tlb_walk, METH_VARARGS, cost_tlb_walk_doc},
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
