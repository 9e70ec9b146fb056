/*
 * ptlab.core.machine._prims — the real primitives the simulated machine is built from.
 *
 * Every word is addressed as (Region, byte offset): each process maps a shared-memory segment
 * at its own address, so offsets, never pointers, are what the machine stores.  A Region wraps a
 * writable buffer (an mmap of a POSIX shm segment) and offers, per call:
 *
 *   load32/load64           __atomic_load_n, ACQUIRE
 *   store32/store64         __atomic_store_n, RELEASE
 *   cas32/cas64             strong compare-exchange, ACQ_REL on success, ACQUIRE on failure
 *   xchg32/xchg64           exchange, ACQ_REL                  (ptep_get_and_clear)
 *   fetch_add32/64, fetch_or64, fetch_and64                      (refcounts, cpumasks)
 *   futex_wait/futex_wake   non-private futex ops on a 32-bit word, GIL released while asleep
 *   spin_lock/spin_trylock/spin_unlock   test-and-test-and-set; the spin loop returns to the
 *                           caller when an IPI is pending so that it can be serviced
 *   copy/fill64/find_not64  memcpy between frames, poisoning and poison checks
 *   copy_pages, fetch_add32_each, get_and_clear64   a batch of page copies/clears, of atomic
 *                           adds, of exchanges with 0 (the same
 *                           operations in the same order as the per-page calls they batch)
 *   tlb_xchg64              a store through a CPU's TLB entry: the lookup, a load64, a store64
 *
 * Buddy and the lock base types below run a whole allocator or lock operation in one call.
 *
 * A bad offset (negative, past the end) raises IndexError and a misaligned one ValueError: a
 * simulated kernel bug must show up as an oracle report, never as a segfault of the host.
 *
 * The module also holds the C reference loops that `ptlab calibrate` sets beside each Python
 * primitive, so every result file can say how much slower than C each step ran.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <errno.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#define cpu_relax() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define cpu_relax() __asm__ __volatile__("yield" ::: "memory")
#else
#define cpu_relax() __asm__ __volatile__("" ::: "memory")
#endif

static inline int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static long sys_futex(uint32_t *uaddr, int op, uint32_t val, const struct timespec *ts)
{
    return syscall(SYS_futex, uaddr, op, val, ts, NULL, 0);
}

/* ------------------------------------------------------------------------------------------ */
/* Region                                                                                      */

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    char *base;       /* NULL once closed */
    Py_ssize_t size;
} RegionObject;

static PyTypeObject RegionType;

static int Region_init(RegionObject *self, PyObject *args, PyObject *kwds)
{
    PyObject *obj;
    static char *kwlist[] = {"buffer", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O", kwlist, &obj))
        return -1;
    if (self->base) {
        PyErr_SetString(PyExc_RuntimeError, "Region already initialised");
        return -1;
    }
    if (PyObject_GetBuffer(obj, &self->view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    self->base = (char *)self->view.buf;
    self->size = self->view.len;
    return 0;
}

static void Region_dealloc(RegionObject *self)
{
    if (self->base) {
        PyBuffer_Release(&self->view);
        self->base = NULL;
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Region_close(RegionObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->base) {
        PyBuffer_Release(&self->view);
        self->base = NULL;
        self->size = 0;
    }
    Py_RETURN_NONE;
}

static PyObject *Region_get_size(RegionObject *self, void *closure)
{
    return PyLong_FromSsize_t(self->size);
}

static PyObject *Region_get_closed(RegionObject *self, void *closure)
{
    return PyBool_FromLong(self->base == NULL);
}

/* Resolve (offset, width) to an address, or set an exception and return NULL. */
static inline void *word_at(RegionObject *self, PyObject *off_obj, Py_ssize_t width)
{
    if (!self->base) {
        PyErr_SetString(PyExc_ValueError, "region is closed");
        return NULL;
    }
    Py_ssize_t off = PyLong_AsSsize_t(off_obj);
    if (off == -1 && PyErr_Occurred())
        return NULL;
    if (off < 0 || off > self->size - width) {
        PyErr_Format(PyExc_IndexError, "offset %zd out of range for a %zd-byte word in a region of %zd bytes",
                     off, width, self->size);
        return NULL;
    }
    if (off & (width - 1)) {
        PyErr_Format(PyExc_ValueError, "offset %zd is not %zd-byte aligned", off, width);
        return NULL;
    }
    return self->base + off;
}

static inline void *range_at(RegionObject *self, Py_ssize_t off, Py_ssize_t len, Py_ssize_t align)
{
    if (!self->base) {
        PyErr_SetString(PyExc_ValueError, "region is closed");
        return NULL;
    }
    if (off < 0 || len < 0 || off > self->size || len > self->size - off) {
        PyErr_Format(PyExc_IndexError, "range [%zd, %zd) out of range for a region of %zd bytes", off,
                     off + len, self->size);
        return NULL;
    }
    if (off & (align - 1)) {
        PyErr_Format(PyExc_ValueError, "offset %zd is not %zd-byte aligned", off, align);
        return NULL;
    }
    return self->base + off;
}

#define CHECK_NARGS(n, name)                                                          \
    if (nargs != (n)) {                                                               \
        PyErr_Format(PyExc_TypeError, name "() takes %d arguments (%zd given)", (n), nargs); \
        return NULL;                                                                  \
    }

static inline int get_i64(PyObject *o, int64_t *out)
{
    long long v = PyLong_AsLongLong(o);
    if (v == -1 && PyErr_Occurred())
        return -1;
    *out = (int64_t)v;
    return 0;
}

static PyObject *R_load32(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS(1, "load32");
    int32_t *p = word_at(self, args[0], 4);
    if (!p)
        return NULL;
    return PyLong_FromLong(__atomic_load_n(p, __ATOMIC_ACQUIRE));
}

static PyObject *R_load64(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS(1, "load64");
    int64_t *p = word_at(self, args[0], 8);
    if (!p)
        return NULL;
    return PyLong_FromLongLong(__atomic_load_n(p, __ATOMIC_ACQUIRE));
}

static PyObject *R_store32(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS(2, "store32");
    int32_t *p = word_at(self, args[0], 4);
    int64_t v;
    if (!p || get_i64(args[1], &v))
        return NULL;
    __atomic_store_n(p, (int32_t)v, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

static PyObject *R_store64(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS(2, "store64");
    int64_t *p = word_at(self, args[0], 8);
    int64_t v;
    if (!p || get_i64(args[1], &v))
        return NULL;
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

static PyObject *R_cas32(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS(3, "cas32");
    int32_t *p = word_at(self, args[0], 4);
    int64_t o, n;
    if (!p || get_i64(args[1], &o) || get_i64(args[2], &n))
        return NULL;
    int32_t expected = (int32_t)o;
    int ok = __atomic_compare_exchange_n(p, &expected, (int32_t)n, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    return PyBool_FromLong(ok);
}

static PyObject *R_cas64(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS(3, "cas64");
    int64_t *p = word_at(self, args[0], 8);
    int64_t o, n;
    if (!p || get_i64(args[1], &o) || get_i64(args[2], &n))
        return NULL;
    int ok = __atomic_compare_exchange_n(p, &o, n, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    return PyBool_FromLong(ok);
}

static PyObject *R_xchg32(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS(2, "xchg32");
    int32_t *p = word_at(self, args[0], 4);
    int64_t v;
    if (!p || get_i64(args[1], &v))
        return NULL;
    return PyLong_FromLong(__atomic_exchange_n(p, (int32_t)v, __ATOMIC_ACQ_REL));
}

static PyObject *R_xchg64(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS(2, "xchg64");
    int64_t *p = word_at(self, args[0], 8);
    int64_t v;
    if (!p || get_i64(args[1], &v))
        return NULL;
    return PyLong_FromLongLong(__atomic_exchange_n(p, v, __ATOMIC_ACQ_REL));
}

static PyObject *R_fetch_add32(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS(2, "fetch_add32");
    int32_t *p = word_at(self, args[0], 4);
    int64_t v;
    if (!p || get_i64(args[1], &v))
        return NULL;
    return PyLong_FromLong(__atomic_fetch_add(p, (int32_t)v, __ATOMIC_ACQ_REL));
}

static PyObject *R_fetch_add64(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS(2, "fetch_add64");
    int64_t *p = word_at(self, args[0], 8);
    int64_t v;
    if (!p || get_i64(args[1], &v))
        return NULL;
    return PyLong_FromLongLong(__atomic_fetch_add(p, v, __ATOMIC_ACQ_REL));
}

static PyObject *R_fetch_or64(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS(2, "fetch_or64");
    int64_t *p = word_at(self, args[0], 8);
    int64_t v;
    if (!p || get_i64(args[1], &v))
        return NULL;
    return PyLong_FromLongLong(__atomic_fetch_or(p, v, __ATOMIC_ACQ_REL));
}

static PyObject *R_fetch_and64(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS(2, "fetch_and64");
    int64_t *p = word_at(self, args[0], 8);
    int64_t v;
    if (!p || get_i64(args[1], &v))
        return NULL;
    return PyLong_FromLongLong(__atomic_fetch_and(p, v, __ATOMIC_ACQ_REL));
}

/* futex_wait(off, expected, timeout_ns) -> 0 woken (or spurious), 1 value differed, 2 timed out.
 * timeout_ns < 0 waits forever.  The GIL is released for the sleep. */
static PyObject *R_futex_wait(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS(3, "futex_wait");
    uint32_t *p = word_at(self, args[0], 4);
    int64_t expected, timeout_ns;
    if (!p || get_i64(args[1], &expected) || get_i64(args[2], &timeout_ns))
        return NULL;
    struct timespec ts, *tsp = NULL;
    if (timeout_ns >= 0) {
        ts.tv_sec = timeout_ns / 1000000000LL;
        ts.tv_nsec = timeout_ns % 1000000000LL;
        tsp = &ts;
    }
    long r;
    int err;
    Py_BEGIN_ALLOW_THREADS
    r = sys_futex(p, FUTEX_WAIT, (uint32_t)expected, tsp);
    err = errno;
    Py_END_ALLOW_THREADS
    if (r == 0)
        return PyLong_FromLong(0);
    if (err == EAGAIN)
        return PyLong_FromLong(1);
    if (err == ETIMEDOUT)
        return PyLong_FromLong(2);
    if (err == EINTR) {
        if (PyErr_CheckSignals() < 0)
            return NULL;
        return PyLong_FromLong(0);
    }
    errno = err;
    return PyErr_SetFromErrno(PyExc_OSError);
}

static PyObject *R_futex_wake(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS(2, "futex_wake");
    uint32_t *p = word_at(self, args[0], 4);
    int64_t n;
    if (!p || get_i64(args[1], &n))
        return NULL;
    if (n > INT32_MAX)
        n = INT32_MAX;
    long r = sys_futex(p, FUTEX_WAKE, (uint32_t)n, NULL);
    if (r < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(r);
}

static int64_t spin_acquire(int32_t *lock, int32_t me, int32_t *ipi, int64_t budget);

/* spin_lock(off, me, ipi_off, budget_ns) on a 32-bit lock word (0 = free, else owner id).
 * Returns ns spun (>= 0, 0 when the first try won) once acquired.  Returns -(1 + ns spun) without
 * the lock when the 32-bit word at ipi_off turns non-zero (an IPI to service: interrupts are on
 * while spin_lock spins) or when budget_ns has passed (so the caller can check that the owner is
 * still alive and that the watchdog has not fired).  ipi_off < 0 disables the IPI check. */
static PyObject *R_spin_lock(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS(4, "spin_lock");
    int32_t *lock = word_at(self, args[0], 4);
    int64_t me, ipi_off, budget;
    if (!lock || get_i64(args[1], &me) || get_i64(args[2], &ipi_off) || get_i64(args[3], &budget))
        return NULL;
    int32_t *ipi = NULL;
    if (ipi_off >= 0) {
        PyObject *o = PyLong_FromLongLong(ipi_off);
        ipi = word_at(self, o, 4);
        Py_DECREF(o);
        if (!ipi)
            return NULL;
    }
    int32_t zero = 0;
    if (__atomic_compare_exchange_n(lock, &zero, (int32_t)me, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
        return PyLong_FromLong(0);
    int64_t spun = spin_acquire(lock, (int32_t)me, ipi, budget);
    return PyLong_FromLongLong(spun);
}

static PyObject *R_spin_trylock(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS(2, "spin_trylock");
    int32_t *lock = word_at(self, args[0], 4);
    int64_t me;
    if (!lock || get_i64(args[1], &me))
        return NULL;
    int32_t zero = 0;
    int ok = __atomic_compare_exchange_n(lock, &zero, (int32_t)me, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED);
    return PyBool_FromLong(ok);
}

static PyObject *R_spin_unlock(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS(1, "spin_unlock");
    int32_t *lock = word_at(self, args[0], 4);
    if (!lock)
        return NULL;
    __atomic_store_n(lock, 0, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

/* copy(dst_off, src_off, nbytes): memcpy inside the region (frames are one region). */
static PyObject *R_copy(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS(3, "copy");
    int64_t d, s, n;
    if (get_i64(args[0], &d) || get_i64(args[1], &s) || get_i64(args[2], &n))
        return NULL;
    char *dp = range_at(self, d, n, 1);
    if (!dp)
        return NULL;
    char *sp = range_at(self, s, n, 1);
    if (!sp)
        return NULL;
    if (n >= 65536) {
        Py_BEGIN_ALLOW_THREADS
        memmove(dp, sp, n);
        Py_END_ALLOW_THREADS
    } else {
        memmove(dp, sp, n);
    }
    Py_RETURN_NONE;
}

/* fill64(off, nwords, pattern): store pattern into nwords consecutive 64-bit words. */
static PyObject *R_fill64(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS(3, "fill64");
    int64_t off, n, pat;
    if (get_i64(args[0], &off) || get_i64(args[1], &n) || get_i64(args[2], &pat))
        return NULL;
    if (n < 0 || n > (INT64_MAX / 8)) {
        PyErr_SetString(PyExc_ValueError, "bad word count");
        return NULL;
    }
    int64_t *p = range_at(self, off, n * 8, 8);
    if (!p)
        return NULL;
    unsigned char c = (unsigned char)pat;
    if (pat == (int64_t)(0x0101010101010101ULL * c)) /* 0, the free poison: one byte repeated */
        memset(p, c, n * 8);
    else
        for (int64_t i = 0; i < n; i++)
            p[i] = pat;
    __atomic_thread_fence(__ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

/* find_not64(off, nwords, pattern) -> index of the first word != pattern, or -1. */
static PyObject *R_find_not64(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS(3, "find_not64");
    int64_t off, n, pat;
    if (get_i64(args[0], &off) || get_i64(args[1], &n) || get_i64(args[2], &pat))
        return NULL;
    if (n < 0 || n > (INT64_MAX / 8)) {
        PyErr_SetString(PyExc_ValueError, "bad word count");
        return NULL;
    }
    int64_t *p = range_at(self, off, n * 8, 8);
    if (!p)
        return NULL;
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    /* every word equals the pattern iff the first does and each equals the next: one memcmp()
     * of the range with itself shifted by a word; the scan below finds the word that differs */
    if (n == 0 || (p[0] == pat && memcmp(p, p + 1, (n - 1) * 8) == 0))
        return PyLong_FromLong(-1);
    for (int64_t i = 0; i < n; i++)
        if (p[i] != pat)
            return PyLong_FromLongLong(i);
    return PyLong_FromLong(-1);
}


/* An int64 C-contiguous buffer (a numpy int64 array) as (pointer, count); release with PyBuffer_Release. */
static int i64_buffer(PyObject *o, Py_buffer *view, const char *what)
{
    if (PyObject_GetBuffer(o, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return -1;
    if (view->itemsize != 8 || !view->format || (strcmp(view->format, "q") && strcmp(view->format, "l") &&
                                                 strcmp(view->format, "<q") && strcmp(view->format, "<l") &&
                                                 strcmp(view->format, "=q") && strcmp(view->format, "=l"))) {
        PyErr_Format(PyExc_TypeError, "%s must be an int64 array", what);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* copy_pages(dst_off, srcs, page_size): page j of the destination range (dst_off + j * page_size)
 * gets a memcpy of the page at byte offset srcs[j], or is cleared when srcs[j] < 0 -- in order,
 * exactly as len(srcs) calls of copy(dst, src, page_size) / fill64(dst, page_size / 8, 0) would
 * (the scheduled backend's SchedRegion runs it as those calls).  srcs: an int64 array. */
static PyObject *R_copy_pages(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS(3, "copy_pages");
    int64_t d, ps;
    if (get_i64(args[0], &d) || get_i64(args[2], &ps))
        return NULL;
    if (ps <= 0 || ps % 8) {
        PyErr_SetString(PyExc_ValueError, "page_size must be a positive multiple of 8");
        return NULL;
    }
    Py_buffer v;
    if (i64_buffer(args[1], &v, "srcs") < 0)
        return NULL;
    const int64_t *srcs = v.buf;
    Py_ssize_t n = v.len / 8;
    if (!range_at(self, d, n * ps, 8)) {
        PyBuffer_Release(&v);
        return NULL;
    }
    for (Py_ssize_t j = 0; j < n; j++) {
        if (srcs[j] >= 0 && !range_at(self, srcs[j], ps, 1)) {
            PyBuffer_Release(&v);
            return NULL;
        }
    }
    char *base = self->base;
    int release = n * ps >= (1 << 20); /* a 16-page batch (64 KiB, a few us) keeps the GIL: handing it
                                          * over per batch costs more than the copy */
    PyThreadState *ts = release ? PyEval_SaveThread() : NULL;
    for (Py_ssize_t j = 0; j < n; j++) {
        char *dp = base + d + j * ps;
        if (srcs[j] < 0)
            memset(dp, 0, ps);
        else
            memmove(dp, base + srcs[j], ps);
    }
    __atomic_thread_fence(__ATOMIC_RELEASE);
    if (release)
        PyEval_RestoreThread(ts);
    PyBuffer_Release(&v);
    Py_RETURN_NONE;
}

/* fetch_add32_each(offs, deltas): fetch_add32(offs[i], deltas[i]) for every i, in order (the
 * rmap and refcount updates over a batch of folios).  Two int64 arrays of one length; the
 * scheduled backend's SchedRegion runs it as that many fetch_add32 calls. */
static PyObject *R_fetch_add32_each(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS(2, "fetch_add32_each");
    Py_buffer vo, vd;
    if (i64_buffer(args[0], &vo, "offs") < 0)
        return NULL;
    if (i64_buffer(args[1], &vd, "deltas") < 0) {
        PyBuffer_Release(&vo);
        return NULL;
    }
    PyObject *res = NULL;
    const int64_t *offs = vo.buf, *ds = vd.buf;
    Py_ssize_t n = vo.len / 8;
    if (vd.len != vo.len) {
        PyErr_SetString(PyExc_ValueError, "offs and deltas differ in length");
        goto out;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (!range_at(self, offs[i], 4, 4))
            goto out;
    for (Py_ssize_t i = 0; i < n; i++)
        __atomic_fetch_add((int32_t *)(self->base + offs[i]), (int32_t)ds[i], __ATOMIC_ACQ_REL);
    res = Py_NewRef(Py_None);
out:
    PyBuffer_Release(&vo);
    PyBuffer_Release(&vd);
    return res;
}


/* get_and_clear64(off, out): out[j] = xchg64(off + 8 * j, 0) for every j of the int64 array out,
 * in order (ptep_get_and_clear() over a range of PTEs); the scheduled backend's SchedRegion runs
 * it as that many xchg64 calls. */
static PyObject *R_get_and_clear64(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS(2, "get_and_clear64");
    int64_t off;
    if (get_i64(args[0], &off))
        return NULL;
    Py_buffer v;
    if (PyObject_GetBuffer(args[1], &v, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) < 0)
        return NULL;
    if (v.itemsize != 8 || !v.format || !strchr("qlQL", v.format[strlen(v.format) - 1])) {
        PyErr_SetString(PyExc_TypeError, "out must be a writable int64 array");
        PyBuffer_Release(&v);
        return NULL;
    }
    Py_ssize_t n = v.len / 8;
    int64_t *p = range_at(self, off, n * 8, 8);
    if (!p) {
        PyBuffer_Release(&v);
        return NULL;
    }
    int64_t *out = v.buf;
    for (Py_ssize_t j = 0; j < n; j++)
        out[j] = __atomic_exchange_n(p + j, 0, __ATOMIC_ACQ_REL);
    PyBuffer_Release(&v);
    Py_RETURN_NONE;
}

/* tlb_xchg64(tlb, vpn, page_size, word_off, new) -> (pfn, old) or None: the MMU's store through a
 * TLB hit.  tlb is a CPU's TLB (a dict vpn -> pfn << 1 | writable); on a hit on a writable entry,
 * the word at pfn * page_size + word_off is loaded (acquire) and then stored (release), as a
 * load64 and a store64 would; on a miss or a read-only entry nothing is touched and the caller
 * walks the page table (the scheduled backend's SchedRegion runs it as that load64 and store64). */
static PyObject *R_tlb_xchg64(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS(5, "tlb_xchg64");
    if (!PyDict_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "tlb_xchg64: the TLB must be a dict");
        return NULL;
    }
    PyObject *e = PyDict_GetItemWithError(args[0], args[1]);
    if (!e) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_NONE;
    }
    int64_t ev, ps, woff, nv;
    if (get_i64(e, &ev) || get_i64(args[2], &ps) || get_i64(args[3], &woff) || get_i64(args[4], &nv))
        return NULL;
    if (!(ev & 1))
        Py_RETURN_NONE;
    int64_t *p = range_at(self, (ev >> 1) * ps + woff, 8, 8);
    if (!p)
        return NULL;
    int64_t old = __atomic_load_n(p, __ATOMIC_ACQUIRE);
    __atomic_store_n(p, nv, __ATOMIC_RELEASE);
    return Py_BuildValue("(LL)", (long long)(ev >> 1), (long long)old);
}

/* put_row(row, v0, ..., vk): store k+1 int64 values at row * (k+1) * 8 (an event-buffer row).
 * Plain stores: event buffers are private to their process. */
static PyObject *R_put_row(RegionObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 2 || nargs > 17) {
        PyErr_SetString(PyExc_TypeError, "put_row(row, v0, ...) takes 1 to 16 values");
        return NULL;
    }
    Py_ssize_t row = PyLong_AsSsize_t(args[0]);
    if (row == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t k = nargs - 1;
    if (row < 0 || row > self->size / (k * 8) - 1) {
        PyErr_Format(PyExc_IndexError, "event row %zd out of range", row);
        return NULL;
    }
    int64_t *p = (int64_t *)(self->base + row * k * 8);
    for (Py_ssize_t i = 0; i < k; i++) {
        if (get_i64(args[i + 1], &p[i]))
            return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *Region_repr(RegionObject *self)
{
    if (!self->base)
        return PyUnicode_FromString("<Region closed>");
    return PyUnicode_FromFormat("<Region %zd bytes>", self->size);
}

static PyMethodDef Region_methods[] = {
    {"load32", (PyCFunction)(void (*)(void))R_load32, METH_FASTCALL, "load32(off) -> int (acquire)"},
    {"load64", (PyCFunction)(void (*)(void))R_load64, METH_FASTCALL, "load64(off) -> int (acquire)"},
    {"store32", (PyCFunction)(void (*)(void))R_store32, METH_FASTCALL, "store32(off, v) (release)"},
    {"store64", (PyCFunction)(void (*)(void))R_store64, METH_FASTCALL, "store64(off, v) (release)"},
    {"cas32", (PyCFunction)(void (*)(void))R_cas32, METH_FASTCALL, "cas32(off, old, new) -> bool"},
    {"cas64", (PyCFunction)(void (*)(void))R_cas64, METH_FASTCALL, "cas64(off, old, new) -> bool"},
    {"xchg32", (PyCFunction)(void (*)(void))R_xchg32, METH_FASTCALL, "xchg32(off, v) -> old"},
    {"xchg64", (PyCFunction)(void (*)(void))R_xchg64, METH_FASTCALL, "xchg64(off, v) -> old"},
    {"fetch_add32", (PyCFunction)(void (*)(void))R_fetch_add32, METH_FASTCALL, "fetch_add32(off, d) -> old"},
    {"fetch_add64", (PyCFunction)(void (*)(void))R_fetch_add64, METH_FASTCALL, "fetch_add64(off, d) -> old"},
    {"fetch_or64", (PyCFunction)(void (*)(void))R_fetch_or64, METH_FASTCALL, "fetch_or64(off, bits) -> old"},
    {"fetch_and64", (PyCFunction)(void (*)(void))R_fetch_and64, METH_FASTCALL, "fetch_and64(off, mask) -> old"},
    {"futex_wait", (PyCFunction)(void (*)(void))R_futex_wait, METH_FASTCALL,
     "futex_wait(off, expected, timeout_ns) -> 0 woken, 1 value differed, 2 timed out"},
    {"futex_wake", (PyCFunction)(void (*)(void))R_futex_wake, METH_FASTCALL, "futex_wake(off, n) -> woken"},
    {"spin_lock", (PyCFunction)(void (*)(void))R_spin_lock, METH_FASTCALL,
     "spin_lock(off, me, ipi_off, budget_ns) -> spin ns >= 0 when acquired, -(1+ns) when interrupted"},
    {"spin_trylock", (PyCFunction)(void (*)(void))R_spin_trylock, METH_FASTCALL, "spin_trylock(off, me) -> bool"},
    {"spin_unlock", (PyCFunction)(void (*)(void))R_spin_unlock, METH_FASTCALL, "spin_unlock(off)"},
    {"copy", (PyCFunction)(void (*)(void))R_copy, METH_FASTCALL, "copy(dst_off, src_off, nbytes)"},
    {"fill64", (PyCFunction)(void (*)(void))R_fill64, METH_FASTCALL, "fill64(off, nwords, pattern)"},
    {"find_not64", (PyCFunction)(void (*)(void))R_find_not64, METH_FASTCALL,
     "find_not64(off, nwords, pattern) -> first differing index or -1"},
    {"copy_pages", (PyCFunction)(void (*)(void))R_copy_pages, METH_FASTCALL,
     "copy_pages(dst_off, srcs, page_size): page j <- srcs[j] (memcpy), or cleared when srcs[j] < 0"},
    {"fetch_add32_each", (PyCFunction)(void (*)(void))R_fetch_add32_each, METH_FASTCALL,
     "fetch_add32_each(offs, deltas): fetch_add32(offs[i], deltas[i]) in order"},
    {"get_and_clear64", (PyCFunction)(void (*)(void))R_get_and_clear64, METH_FASTCALL,
     "get_and_clear64(off, out): out[j] = xchg64(off + 8j, 0), in order"},
    {"put_row", (PyCFunction)(void (*)(void))R_put_row, METH_FASTCALL, "put_row(row, v0, ..., vk): store an event row"},
    {"tlb_xchg64", (PyCFunction)(void (*)(void))R_tlb_xchg64, METH_FASTCALL,
     "tlb_xchg64(tlb, vpn, page_size, word_off, new) -> (pfn, old) on a writable TLB hit, else None"},
    {"close", (PyCFunction)Region_close, METH_NOARGS, "release the buffer"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Region_getset[] = {
    {"size", (getter)Region_get_size, NULL, "size in bytes", NULL},
    {"closed", (getter)Region_get_closed, NULL, "True once close() ran", NULL},
    {NULL},
};

static PyTypeObject RegionType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ptlab.core.machine._prims.Region",
    .tp_basicsize = sizeof(RegionObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Region(buffer): atomic words, futexes and spinlocks over a writable shared buffer",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Region_init,
    .tp_dealloc = (destructor)Region_dealloc,
    .tp_methods = Region_methods,
    .tp_getset = Region_getset,
    .tp_repr = (reprfunc)Region_repr,
};

/* ------------------------------------------------------------------------------------------ */
/* Locks in one C call: CpuBase, SpinLockBase, RwSemBase, FolioLocksBase, VmaLockBase         */
/*
 * core/machine/locks.py's SpinLock, RwSem and FolioLocks subclass these.  Each lock operation is
 * one call: on the uncontended path the whole operation (the atomic, the owner tag, the readers
 * mask, the "last reader -> wake?" decision) runs here, on the process backend's real Region,
 * for a CPU whose context is a CpuBase (core/machine/cpu.py CpuContext).  A contended spin also
 * spins here (the IPI check inside the loop, as Region.spin_lock) and, when it wins without an
 * interruption, does its accounting here too.  Everything else calls back into Python:
 *   - a sleep or an interrupted spin: the subclass's slow path (_slow, _wait, _folio_lock_slow),
 *   - a release with sleepers: its wake (_wake_sleepers, _wake_waiters, _wake_writer: the lost wake-up
 *     check's "wake done" marks and the wake mutants live there),
 *   - any other region (the scheduled backend's SchedRegion, which makes every word operation a
 *     scheduling point) or CPU object: the subclass's _py_<op>, the same operation written with
 *     Region calls, so the deterministic backend's schedule space is the one it always had.
 * The C fast path and _py_<op> are the same sequence of word operations (tests/test_locks.py
 * checks they leave the same words behind).
 */

typedef struct {
    PyObject_HEAD
    int id;
    int owner_tag;
    Py_ssize_t ipi_flag_off;
    long long spin_ns;
    long long sleep_ns;
    long long wait_max;
    PyObject *wait_kind;
} CpuBaseObject;

static PyTypeObject CpuBaseType;

static void CpuBase_dealloc(CpuBaseObject *self)
{
    Py_CLEAR(self->wait_kind);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef CpuBase_members[] = {
    {"id", T_INT, offsetof(CpuBaseObject, id), 0, "CPU number"},
    {"owner_tag", T_INT, offsetof(CpuBaseObject, owner_tag), 0, "what a lock word holds while this CPU owns it (id + 1)"},
    {"ipi_flag_off", T_PYSSIZET, offsetof(CpuBaseObject, ipi_flag_off), 0, "ctl offset of this CPU's IPI flag (-1: none)"},
    {"spin_ns", T_LONGLONG, offsetof(CpuBaseObject, spin_ns), 0, "ns spent spinning so far"},
    {"sleep_ns", T_LONGLONG, offsetof(CpuBaseObject, sleep_ns), 0, "ns spent asleep so far"},
    {"wait_max", T_LONGLONG, offsetof(CpuBaseObject, wait_max), 0, "longest wait of the current operation (ns)"},
    {"wait_kind", T_OBJECT, offsetof(CpuBaseObject, wait_kind), 0, "what that wait was on"},
    {NULL},
};

static PyTypeObject CpuBaseType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ptlab.core.machine._prims.CpuBase",
    .tp_basicsize = sizeof(CpuBaseObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "The fields of a simulated CPU that the C lock paths read and account into",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)CpuBase_dealloc,
    .tp_members = CpuBase_members,
};

static PyObject *s_lock_py, *s_unlock_py, *s_trylock_py, *s_slow, *s_down_read_py, *s_up_read_py,
    *s_down_write_py, *s_up_write_py, *s_down_read_trylock_py, *s_down_write_trylock_py, *s_wait,
    *s_wake_sleepers, *s_folio_trylock_py, *s_folio_lock_py, *s_folio_unlock_py, *s_folio_lock_slow,
    *s_wake_waiters, *s_empty, *s_folio_trylock_many_py, *s_folio_unlock_many_py;
static PyObject *small_zero;

/* The fast path applies: a live real Region and a CpuBase CPU.  Returns the region's memory. */
static inline char *fast_base(PyObject *r, PyObject *cpu)
{
    if (!Py_IS_TYPE(r, &RegionType) || !PyObject_TypeCheck(cpu, &CpuBaseType))
        return NULL;
    return ((RegionObject *)r)->base;
}

/* The word at off, aligned to width, with span bytes (the word and what follows it) in range. */
static inline void *fast_at(PyObject *r, Py_ssize_t off, Py_ssize_t width, Py_ssize_t span)
{
    RegionObject *reg = (RegionObject *)r;
    if (off < 0 || off > reg->size - span || (off & (width - 1))) {
        PyErr_Format(PyExc_IndexError, "lock word at %zd out of range or misaligned", off);
        return NULL;
    }
    return reg->base + off;
}

static inline void *fast_at4(PyObject *r, Py_ssize_t off, Py_ssize_t width)
{
    return fast_at(r, off, width, width);
}

static inline void account_wait(CpuBaseObject *cpu, int64_t ns, PyObject *kind, int spin)
{
    if (spin)
        cpu->spin_ns += ns;
    else
        cpu->sleep_ns += ns;
    if (ns > cpu->wait_max) {
        cpu->wait_max = ns;
        Py_INCREF(kind);
        Py_XSETREF(cpu->wait_kind, kind);
    }
}

/* The spin loop of spin_lock (see R_spin_lock): ns spun (>= 1) once acquired, -(1 + ns) when
 * interrupted by a pending IPI or the budget. */
static int64_t spin_acquire(int32_t *lock, int32_t me, int32_t *ipi, int64_t budget)
{
    int64_t t0 = mono_ns(), now;
    unsigned iter = 0;
    for (;;) {
        if (__atomic_load_n(lock, __ATOMIC_RELAXED) == 0) {
            int32_t zero = 0;
            if (__atomic_compare_exchange_n(lock, &zero, me, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
                now = mono_ns();
                return now - t0 > 0 ? now - t0 : 1;
            }
        }
        if (ipi && __atomic_load_n(ipi, __ATOMIC_ACQUIRE) != 0)
            return -1 - (mono_ns() - t0);
        cpu_relax();
        if ((++iter & 255) == 0) {
            now = mono_ns();
            if (now - t0 >= budget)
                return -1 - (now - t0);
        }
    }
}

#define LOCK_BUDGET_NS 20000000LL /* core/machine/locks.py BUDGET_NS */

typedef struct {
    PyObject_HEAD
    PyObject *r;
    Py_ssize_t off;
    PyObject *name;
    PyObject *kind;
    int lock_id;
} SpinLockObject;

static int SpinLock_init(SpinLockObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"region", "off", "name", "kind", "lock_id", NULL};
    PyObject *r, *name, *kind;
    Py_ssize_t off;
    int lock_id;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OnUUi", kwlist, &r, &off, &name, &kind, &lock_id))
        return -1;
    Py_INCREF(r);
    Py_XSETREF(self->r, r);
    Py_INCREF(name);
    Py_XSETREF(self->name, name);
    Py_INCREF(kind);
    Py_XSETREF(self->kind, kind);
    self->off = off;
    self->lock_id = lock_id;
    return 0;
}

static void SpinLock_dealloc(SpinLockObject *self)
{
    Py_CLEAR(self->r);
    Py_CLEAR(self->name);
    Py_CLEAR(self->kind);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* lock(cpu) -> ns spun (0 uncontended) */
static PyObject *SpinLock_lock(SpinLockObject *self, PyObject *cpu)
{
    if (!fast_base(self->r, cpu))
        return PyObject_CallMethodOneArg((PyObject *)self, s_lock_py, cpu);
    int32_t *lock = fast_at(self->r, self->off, 8, 32); /* word, acquisitions, contended, spin_ns */
    if (!lock)
        return NULL;
    CpuBaseObject *c = (CpuBaseObject *)cpu;
    int32_t zero = 0;
    if (__atomic_compare_exchange_n(lock, &zero, c->owner_tag, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
        return Py_NewRef(small_zero);
    int32_t *ipi = NULL;
    if (c->ipi_flag_off >= 0 && !(ipi = fast_at4(self->r, c->ipi_flag_off, 4)))
        return NULL;
    int64_t spun = spin_acquire(lock, c->owner_tag, ipi, LOCK_BUDGET_NS);
    if (spun < 0) {
        /* interrupted: the IPI, the owner check and the stop check are Python's */
        PyObject *rv = PyLong_FromLongLong(spun);
        if (!rv)
            return NULL;
        PyObject *res = PyObject_CallMethodObjArgs((PyObject *)self, s_slow, cpu, rv, NULL);
        Py_DECREF(rv);
        return res;
    }
    /* won after spinning: the lock's own counters and the CPU's accounting (as _slow does) */
    __atomic_fetch_add((int64_t *)((char *)lock + 16), 1, __ATOMIC_ACQ_REL);
    __atomic_fetch_add((int64_t *)((char *)lock + 24), spun, __ATOMIC_ACQ_REL);
    account_wait(c, spun, self->kind, 1);
    return PyLong_FromLongLong(spun);
}

static PyObject *SpinLock_unlock(SpinLockObject *self, PyObject *cpu)
{
    if (!fast_base(self->r, cpu))
        return PyObject_CallMethodOneArg((PyObject *)self, s_unlock_py, cpu);
    int32_t *lock = fast_at4(self->r, self->off, 4);
    if (!lock)
        return NULL;
    __atomic_store_n(lock, 0, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

static PyObject *SpinLock_trylock(SpinLockObject *self, PyObject *cpu)
{
    if (!fast_base(self->r, cpu))
        return PyObject_CallMethodOneArg((PyObject *)self, s_trylock_py, cpu);
    int32_t *lock = fast_at4(self->r, self->off, 4);
    if (!lock)
        return NULL;
    int32_t zero = 0;
    int ok = __atomic_compare_exchange_n(lock, &zero, ((CpuBaseObject *)cpu)->owner_tag, 0, __ATOMIC_ACQUIRE,
                                         __ATOMIC_RELAXED);
    return PyBool_FromLong(ok);
}

static PyMethodDef SpinLock_methods[] = {
    {"lock", (PyCFunction)SpinLock_lock, METH_O, "lock(cpu) -> ns spun (0 when uncontended)"},
    {"unlock", (PyCFunction)SpinLock_unlock, METH_O, "unlock(cpu)"},
    {"trylock", (PyCFunction)SpinLock_trylock, METH_O, "trylock(cpu) -> bool"},
    {NULL},
};

static PyMemberDef SpinLock_members[] = {
    {"r", T_OBJECT, offsetof(SpinLockObject, r), READONLY, "the region of the lock word"},
    {"off", T_PYSSIZET, offsetof(SpinLockObject, off), READONLY, "offset of the lock word"},
    {"name", T_OBJECT, offsetof(SpinLockObject, name), READONLY, "e.g. ptl[3]"},
    {"kind", T_OBJECT, offsetof(SpinLockObject, kind), READONLY, "the waited_on class: ptl, pmd_lock, zone"},
    {"lock_id", T_INT, offsetof(SpinLockObject, lock_id), READONLY, "what CPU_WAITING holds while waiting"},
    {NULL},
};

static PyTypeObject SpinLockType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ptlab.core.machine._prims.SpinLockBase",
    .tp_basicsize = sizeof(SpinLockObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "SpinLockBase(region, off, name, kind, lock_id): spin_lock/spin_unlock in one call",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)SpinLock_init,
    .tp_dealloc = (destructor)SpinLock_dealloc,
    .tp_methods = SpinLock_methods,
    .tp_members = SpinLock_members,
};

/* rwsem state word (core/machine/locks.py) */
#define RWSEM_READER_MASK 0xFFFFFFFFLL
#define RWSEM_WRITER (1LL << 32)

typedef struct {
    PyObject_HEAD
    PyObject *r;
    Py_ssize_t off;
    PyObject *name;
    int lock_id;
} RwSemObject;

static int RwSem_init(RwSemObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"region", "off", "name", "lock_id", NULL};
    PyObject *r, *name;
    Py_ssize_t off;
    int lock_id;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OnUi", kwlist, &r, &off, &name, &lock_id))
        return -1;
    Py_INCREF(r);
    Py_XSETREF(self->r, r);
    Py_INCREF(name);
    Py_XSETREF(self->name, name);
    self->off = off;
    self->lock_id = lock_id;
    return 0;
}

static void RwSem_dealloc(RwSemObject *self)
{
    Py_CLEAR(self->r);
    Py_CLEAR(self->name);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* 1 taken, 0 not, -1 error */
static int rwsem_read_trylock(RwSemObject *self, CpuBaseObject *c)
{
    int64_t *s = fast_at(self->r, self->off, 8, 64);
    if (!s)
        return -1;
    int64_t v = __atomic_load_n(s, __ATOMIC_ACQUIRE);
    if ((v & RWSEM_WRITER) || (v >> 40) != 0)
        return 0;
    if (!__atomic_compare_exchange_n(s, &v, v + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        return 0;
    if (c->id < 63) /* the readers mask (for the lock dump) covers CPUs 0..62 */
        __atomic_fetch_or(s + 3, (int64_t)1 << c->id, __ATOMIC_ACQ_REL);
    return 1;
}

static int rwsem_write_trylock(RwSemObject *self, CpuBaseObject *c)
{
    int64_t *s = fast_at(self->r, self->off, 8, 64);
    if (!s)
        return -1;
    int64_t v = __atomic_load_n(s, __ATOMIC_ACQUIRE);
    if (v & (RWSEM_READER_MASK | RWSEM_WRITER))
        return 0;
    if (!__atomic_compare_exchange_n(s, &v, v | RWSEM_WRITER, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        return 0;
    __atomic_store_n((int32_t *)((char *)s + 16), c->owner_tag, __ATOMIC_RELEASE);
    return 1;
}

/* rwsem_wake(): bump the sequence; with sleepers, Python wakes them and publishes "wake done" */
static PyObject *rwsem_wake(RwSemObject *self, PyObject *cpu, int64_t *s)
{
    int64_t seq = (int64_t)__atomic_fetch_add((int32_t *)((char *)s + 8), 1, __ATOMIC_ACQ_REL) + 1;
    if (__atomic_load_n((int32_t *)((char *)s + 12), __ATOMIC_ACQUIRE)) {
        PyObject *sq = PyLong_FromLongLong(seq);
        if (!sq)
            return NULL;
        PyObject *res = PyObject_CallMethodObjArgs((PyObject *)self, s_wake_sleepers, cpu, sq, NULL);
        Py_DECREF(sq);
        return res;
    }
    Py_RETURN_NONE;
}

static PyObject *RwSem_down_read_trylock(RwSemObject *self, PyObject *cpu)
{
    if (!fast_base(self->r, cpu))
        return PyObject_CallMethodOneArg((PyObject *)self, s_down_read_trylock_py, cpu);
    int ok = rwsem_read_trylock(self, (CpuBaseObject *)cpu);
    return ok < 0 ? NULL : PyBool_FromLong(ok);
}

static PyObject *RwSem_down_write_trylock(RwSemObject *self, PyObject *cpu)
{
    if (!fast_base(self->r, cpu))
        return PyObject_CallMethodOneArg((PyObject *)self, s_down_write_trylock_py, cpu);
    int ok = rwsem_write_trylock(self, (CpuBaseObject *)cpu);
    return ok < 0 ? NULL : PyBool_FromLong(ok);
}

/* down_read(cpu) -> ns slept (0 uncontended) */
static PyObject *RwSem_down_read(RwSemObject *self, PyObject *cpu)
{
    if (!fast_base(self->r, cpu))
        return PyObject_CallMethodOneArg((PyObject *)self, s_down_read_py, cpu);
    int ok = rwsem_read_trylock(self, (CpuBaseObject *)cpu);
    if (ok < 0)
        return NULL;
    if (ok)
        return Py_NewRef(small_zero);
    return PyObject_CallMethodObjArgs((PyObject *)self, s_wait, cpu, Py_False, NULL);
}

static PyObject *RwSem_down_write(RwSemObject *self, PyObject *cpu)
{
    if (!fast_base(self->r, cpu))
        return PyObject_CallMethodOneArg((PyObject *)self, s_down_write_py, cpu);
    int ok = rwsem_write_trylock(self, (CpuBaseObject *)cpu);
    if (ok < 0)
        return NULL;
    if (ok)
        return Py_NewRef(small_zero);
    return PyObject_CallMethodObjArgs((PyObject *)self, s_wait, cpu, Py_True, NULL);
}

static PyObject *RwSem_up_read(RwSemObject *self, PyObject *cpu)
{
    if (!fast_base(self->r, cpu))
        return PyObject_CallMethodOneArg((PyObject *)self, s_up_read_py, cpu);
    int64_t *s = fast_at(self->r, self->off, 8, 64);
    if (!s)
        return NULL;
    CpuBaseObject *c = (CpuBaseObject *)cpu;
    if (c->id < 63)
        __atomic_fetch_and(s + 3, ~((int64_t)1 << c->id), __ATOMIC_ACQ_REL);
    int64_t old = __atomic_fetch_add(s, -1, __ATOMIC_ACQ_REL);
    if ((old & RWSEM_READER_MASK) == 1)
        return rwsem_wake(self, cpu, s);
    Py_RETURN_NONE;
}

static PyObject *RwSem_up_write(RwSemObject *self, PyObject *cpu)
{
    if (!fast_base(self->r, cpu))
        return PyObject_CallMethodOneArg((PyObject *)self, s_up_write_py, cpu);
    int64_t *s = fast_at(self->r, self->off, 8, 64);
    if (!s)
        return NULL;
    __atomic_store_n((int32_t *)((char *)s + 16), 0, __ATOMIC_RELEASE);
    __atomic_fetch_add(s, -RWSEM_WRITER, __ATOMIC_ACQ_REL);
    return rwsem_wake(self, cpu, s);
}

static PyMethodDef RwSem_methods[] = {
    {"down_read_trylock", (PyCFunction)RwSem_down_read_trylock, METH_O, "down_read_trylock(cpu) -> bool"},
    {"down_write_trylock", (PyCFunction)RwSem_down_write_trylock, METH_O, "down_write_trylock(cpu) -> bool"},
    {"down_read", (PyCFunction)RwSem_down_read, METH_O, "down_read(cpu) -> ns slept"},
    {"down_write", (PyCFunction)RwSem_down_write, METH_O, "down_write(cpu) -> ns slept"},
    {"up_read", (PyCFunction)RwSem_up_read, METH_O, "up_read(cpu)"},
    {"up_write", (PyCFunction)RwSem_up_write, METH_O, "up_write(cpu)"},
    {NULL},
};

static PyMemberDef RwSem_members[] = {
    {"r", T_OBJECT, offsetof(RwSemObject, r), READONLY, "the region of the rwsem"},
    {"off", T_PYSSIZET, offsetof(RwSemObject, off), READONLY, "offset of the state word"},
    {"name", T_OBJECT, offsetof(RwSemObject, name), READONLY, "mmap_lock, anon_vma"},
    {"lock_id", T_INT, offsetof(RwSemObject, lock_id), READONLY, "what CPU_WAITING holds while waiting"},
    {NULL},
};

static PyTypeObject RwSemType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ptlab.core.machine._prims.RwSemBase",
    .tp_basicsize = sizeof(RwSemObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "RwSemBase(region, off, name, lock_id): the rwsem fast paths in one call each",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)RwSem_init,
    .tp_dealloc = (destructor)RwSem_dealloc,
    .tp_methods = RwSem_methods,
    .tp_members = RwSem_members,
};

typedef struct {
    PyObject_HEAD
    PyObject *r;
    Py_ssize_t flags, owner, waiters, wake, wake_done, wake_t;
    int pg_locked;
} FolioLocksObject;

static int FolioLocks_init(FolioLocksObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"region", "flags_base", "owner_base", "waiters_base", "wake_base", "wake_done_base",
                             "wake_t_base", "pg_locked", NULL};
    PyObject *r;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Onnnnnni", kwlist, &r, &self->flags, &self->owner, &self->waiters,
                                     &self->wake, &self->wake_done, &self->wake_t, &self->pg_locked))
        return -1;
    Py_INCREF(r);
    Py_XSETREF(self->r, r);
    return 0;
}

static void FolioLocks_dealloc(FolioLocksObject *self)
{
    Py_CLEAR(self->r);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static inline int folio_args(PyObject *const *args, Py_ssize_t nargs, const char *name, Py_ssize_t *pfn)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "%s(cpu, pfn) takes 2 arguments (%zd given)", name, nargs);
        return -1;
    }
    *pfn = PyLong_AsSsize_t(args[1]);
    if (*pfn == -1 && PyErr_Occurred())
        return -1;
    return 0;
}

/* 1 taken, 0 not, -1 error */
static int folio_trylock_fast(FolioLocksObject *self, CpuBaseObject *c, Py_ssize_t pfn)
{
    int32_t *f = fast_at4(self->r, self->flags + pfn * 4, 4);
    int32_t *o = fast_at4(self->r, self->owner + pfn * 4, 4);
    if (!f || !o)
        return -1;
    for (;;) {
        int32_t v = __atomic_load_n(f, __ATOMIC_ACQUIRE);
        if (v & self->pg_locked)
            return 0;
        if (__atomic_compare_exchange_n(f, &v, v | self->pg_locked, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            __atomic_store_n(o, c->owner_tag, __ATOMIC_RELEASE);
            return 1;
        }
    }
}

static PyObject *FolioLocks_folio_trylock(FolioLocksObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t pfn;
    if (folio_args(args, nargs, "folio_trylock", &pfn))
        return NULL;
    if (!fast_base(self->r, args[0]))
        return PyObject_VectorcallMethod(s_folio_trylock_py, (PyObject *[]){(PyObject *)self, args[0], args[1]}, 3, NULL);
    int ok = folio_trylock_fast(self, (CpuBaseObject *)args[0], pfn);
    return ok < 0 ? NULL : PyBool_FromLong(ok);
}

/* folio_lock(cpu, pfn) -> ns slept (0 uncontended) */
static PyObject *FolioLocks_folio_lock(FolioLocksObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t pfn;
    if (folio_args(args, nargs, "folio_lock", &pfn))
        return NULL;
    if (!fast_base(self->r, args[0]))
        return PyObject_VectorcallMethod(s_folio_lock_py, (PyObject *[]){(PyObject *)self, args[0], args[1]}, 3, NULL);
    int ok = folio_trylock_fast(self, (CpuBaseObject *)args[0], pfn);
    if (ok < 0)
        return NULL;
    if (ok)
        return Py_NewRef(small_zero);
    return PyObject_VectorcallMethod(s_folio_lock_slow, (PyObject *[]){(PyObject *)self, args[0], args[1]}, 3, NULL);
}

static PyObject *FolioLocks_folio_unlock(FolioLocksObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    Py_ssize_t pfn;
    if (folio_args(args, nargs, "folio_unlock", &pfn))
        return NULL;
    if (!fast_base(self->r, args[0]))
        return PyObject_VectorcallMethod(s_folio_unlock_py, (PyObject *[]){(PyObject *)self, args[0], args[1]}, 3, NULL);
    int32_t *f = fast_at4(self->r, self->flags + pfn * 4, 4);
    int32_t *o = fast_at4(self->r, self->owner + pfn * 4, 4);
    int32_t *wk = fast_at4(self->r, self->wake + pfn * 4, 4);
    int32_t *wt = fast_at4(self->r, self->waiters + pfn * 4, 4);
    if (!f || !o || !wk || !wt)
        return NULL;
    __atomic_store_n(o, 0, __ATOMIC_RELEASE);
    int32_t v = __atomic_load_n(f, __ATOMIC_ACQUIRE);
    while (!__atomic_compare_exchange_n(f, &v, v & ~self->pg_locked, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        ;
    int64_t seq = (int64_t)__atomic_fetch_add(wk, 1, __ATOMIC_ACQ_REL) + 1;
    if (__atomic_load_n(wt, __ATOMIC_ACQUIRE)) {
        PyObject *sq = PyLong_FromLongLong(seq);
        if (!sq)
            return NULL;
        PyObject *res = PyObject_VectorcallMethod(
            s_wake_waiters, (PyObject *[]){(PyObject *)self, args[0], args[1], sq}, 4, NULL);
        Py_DECREF(sq);
        return res;
    }
    Py_RETURN_NONE;
}

/* folio_trylock_many(cpu, pfns) -> k: folio_trylock() of each pfn in turn (a sequence of ints),
 * stopping at the first that is locked already: pfns[:k] are now ours.  Other regions: the
 * subclass's _py_folio_trylock_many (the same trylocks, one by one). */
static PyObject *FolioLocks_folio_trylock_many(FolioLocksObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS(2, "folio_trylock_many");
    if (!fast_base(self->r, args[0]))
        return PyObject_VectorcallMethod(s_folio_trylock_many_py, (PyObject *[]){(PyObject *)self, args[0], args[1]}, 3,
                                         NULL);
    PyObject *seq = PySequence_Fast(args[1], "pfns must be a sequence");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), k;
    for (k = 0; k < n; k++) {
        Py_ssize_t pfn = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(seq, k));
        if (pfn == -1 && PyErr_Occurred())
            goto fail;
        int ok = folio_trylock_fast(self, (CpuBaseObject *)args[0], pfn);
        if (ok < 0)
            goto fail;
        if (!ok)
            break;
    }
    Py_DECREF(seq);
    return PyLong_FromSsize_t(k);
fail:
    Py_DECREF(seq);
    return NULL;
}

/* folio_unlock_many(cpu, pfns): folio_unlock() of each pfn in turn, waking each one's waiters
 * (through _wake_waiters, as folio_unlock does) before the next is unlocked. */
static PyObject *FolioLocks_folio_unlock_many(FolioLocksObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS(2, "folio_unlock_many");
    if (!fast_base(self->r, args[0]))
        return PyObject_VectorcallMethod(s_folio_unlock_many_py, (PyObject *[]){(PyObject *)self, args[0], args[1]}, 3,
                                         NULL);
    PyObject *seq = PySequence_Fast(args[1], "pfns must be a sequence");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *res = FolioLocks_folio_unlock(self, (PyObject *[]){args[0], PySequence_Fast_GET_ITEM(seq, k)}, 2);
        if (!res) {
            Py_DECREF(seq);
            return NULL;
        }
        Py_DECREF(res);
    }
    Py_DECREF(seq);
    Py_RETURN_NONE;
}

static PyMethodDef FolioLocks_methods[] = {
    {"folio_trylock_many", (PyCFunction)(void (*)(void))FolioLocks_folio_trylock_many, METH_FASTCALL,
     "folio_trylock_many(cpu, pfns) -> how many were locked, in order, before one was not"},
    {"folio_unlock_many", (PyCFunction)(void (*)(void))FolioLocks_folio_unlock_many, METH_FASTCALL,
     "folio_unlock_many(cpu, pfns): folio_unlock of each in turn"},
    {"folio_trylock", (PyCFunction)(void (*)(void))FolioLocks_folio_trylock, METH_FASTCALL,
     "folio_trylock(cpu, pfn) -> bool"},
    {"folio_lock", (PyCFunction)(void (*)(void))FolioLocks_folio_lock, METH_FASTCALL,
     "folio_lock(cpu, pfn) -> ns slept"},
    {"folio_unlock", (PyCFunction)(void (*)(void))FolioLocks_folio_unlock, METH_FASTCALL, "folio_unlock(cpu, pfn)"},
    {NULL},
};

static PyMemberDef FolioLocks_members[] = {
    {"r", T_OBJECT, offsetof(FolioLocksObject, r), READONLY, "the folio region"},
    {"flags", T_PYSSIZET, offsetof(FolioLocksObject, flags), READONLY, "offset of flags[] (the futex words)"},
    {"owner", T_PYSSIZET, offsetof(FolioLocksObject, owner), READONLY, "offset of lock_owner[]"},
    {"waiters", T_PYSSIZET, offsetof(FolioLocksObject, waiters), READONLY, "offset of waiters[]"},
    {"wake", T_PYSSIZET, offsetof(FolioLocksObject, wake), READONLY, "offset of wake_seq[]"},
    {"wake_done", T_PYSSIZET, offsetof(FolioLocksObject, wake_done), READONLY, "offset of wake_done[]"},
    {"wake_t", T_PYSSIZET, offsetof(FolioLocksObject, wake_t), READONLY, "offset of wake_t[]"},
    {"pg_locked", T_INT, offsetof(FolioLocksObject, pg_locked), READONLY, "the PG_locked bit"},
    {NULL},
};

static PyTypeObject FolioLocksType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ptlab.core.machine._prims.FolioLocksBase",
    .tp_basicsize = sizeof(FolioLocksObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "FolioLocksBase(region, flags_base, ..., pg_locked): folio_trylock/lock/unlock in one call",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)FolioLocks_init,
    .tp_dealloc = (destructor)FolioLocks_dealloc,
    .tp_methods = FolioLocks_methods,
    .tp_members = FolioLocks_members,
};

/* Per-VMA lock (core/machine/locks.py VmaLock; the VMA struct of core/machine/layout.py). */
#define VMA_LOCK_SEQ 24
#define VMA_READERS 32
#define VMA_WWAIT 36

typedef struct {
    PyObject_HEAD
    PyObject *r;
    Py_ssize_t off, seq_off;
    PyObject *name;
    int lock_id;
} VmaLockObject;

static PyObject *s_vma_start_read_py, *s_vma_end_read_py, *s_wake_writer;

static int VmaLock_init(VmaLockObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"region", "vma_off", "mm_lock_seq_off", "name", "lock_id", NULL};
    PyObject *r, *name;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OnnUi", kwlist, &r, &self->off, &self->seq_off, &name, &self->lock_id))
        return -1;
    Py_INCREF(r);
    Py_XSETREF(self->r, r);
    Py_INCREF(name);
    Py_XSETREF(self->name, name);
    return 0;
}

static void VmaLock_dealloc(VmaLockObject *self)
{
    Py_CLEAR(self->r);
    Py_CLEAR(self->name);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* vma_end_read on the fast path; the last reader with a writer waiting wakes it in Python */
static PyObject *vma_end_read_fast(VmaLockObject *self, PyObject *cpu, char *v)
{
    if (__atomic_fetch_add((int32_t *)(v + VMA_READERS), -1, __ATOMIC_ACQ_REL) == 1 &&
        __atomic_load_n((int32_t *)(v + VMA_WWAIT), __ATOMIC_ACQUIRE))
        return PyObject_CallMethodOneArg((PyObject *)self, s_wake_writer, cpu);
    Py_RETURN_NONE;
}

static PyObject *VmaLock_vma_start_read(VmaLockObject *self, PyObject *cpu)
{
    if (!fast_base(self->r, cpu))
        return PyObject_CallMethodOneArg((PyObject *)self, s_vma_start_read_py, cpu);
    char *v = fast_at(self->r, self->off, 8, 64);
    int64_t *mm = fast_at4(self->r, self->seq_off, 8);
    if (!v || !mm)
        return NULL;
    int64_t *seq = (int64_t *)(v + VMA_LOCK_SEQ);
    if (__atomic_load_n(seq, __ATOMIC_ACQUIRE) == __atomic_load_n(mm, __ATOMIC_ACQUIRE))
        Py_RETURN_FALSE; /* write-locked */
    __atomic_fetch_add((int32_t *)(v + VMA_READERS), 1, __ATOMIC_ACQ_REL);
    /* re-check after publishing ourselves: pairs with vma_start_write's xchg then readers read */
    if (__atomic_load_n(seq, __ATOMIC_ACQUIRE) == __atomic_load_n(mm, __ATOMIC_ACQUIRE)) {
        PyObject *res = vma_end_read_fast(self, cpu, v);
        if (!res)
            return NULL;
        Py_DECREF(res);
        Py_RETURN_FALSE;
    }
    Py_RETURN_TRUE;
}

static PyObject *VmaLock_vma_end_read(VmaLockObject *self, PyObject *cpu)
{
    if (!fast_base(self->r, cpu))
        return PyObject_CallMethodOneArg((PyObject *)self, s_vma_end_read_py, cpu);
    char *v = fast_at(self->r, self->off, 8, 64);
    if (!v)
        return NULL;
    return vma_end_read_fast(self, cpu, v);
}

static PyMethodDef VmaLock_methods[] = {
    {"vma_start_read", (PyCFunction)VmaLock_vma_start_read, METH_O, "vma_start_read(cpu) -> bool"},
    {"vma_end_read", (PyCFunction)VmaLock_vma_end_read, METH_O, "vma_end_read(cpu)"},
    {NULL},
};

static PyMemberDef VmaLock_members[] = {
    {"r", T_OBJECT, offsetof(VmaLockObject, r), READONLY, "the ctl region"},
    {"off", T_PYSSIZET, offsetof(VmaLockObject, off), READONLY, "offset of the VMA struct"},
    {"seq_off", T_PYSSIZET, offsetof(VmaLockObject, seq_off), READONLY, "offset of mm_lock_seq"},
    {"name", T_OBJECT, offsetof(VmaLockObject, name), READONLY, "vma_lock[i]"},
    {"lock_id", T_INT, offsetof(VmaLockObject, lock_id), READONLY, "what CPU_WAITING holds while waiting"},
    {NULL},
};

static PyTypeObject VmaLockType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ptlab.core.machine._prims.VmaLockBase",
    .tp_basicsize = sizeof(VmaLockObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "VmaLockBase(region, vma_off, mm_lock_seq_off, name, lock_id): vma_start_read/vma_end_read in one call",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)VmaLock_init,
    .tp_dealloc = (destructor)VmaLock_dealloc,
    .tp_methods = VmaLock_methods,
    .tp_members = VmaLock_members,
};

static PyTypeObject BuddyType; /* below: the allocator's list work */

static int init_lock_types(PyObject *m)
{
#define INTERN(var, s)                                     \
    if (!(var = PyUnicode_InternFromString(s)))           \
        return -1;
    INTERN(s_lock_py, "_py_lock");
    INTERN(s_unlock_py, "_py_unlock");
    INTERN(s_trylock_py, "_py_trylock");
    INTERN(s_slow, "_slow");
    INTERN(s_down_read_py, "_py_down_read");
    INTERN(s_up_read_py, "_py_up_read");
    INTERN(s_down_write_py, "_py_down_write");
    INTERN(s_up_write_py, "_py_up_write");
    INTERN(s_down_read_trylock_py, "_py_down_read_trylock");
    INTERN(s_down_write_trylock_py, "_py_down_write_trylock");
    INTERN(s_wait, "_wait");
    INTERN(s_wake_sleepers, "_wake_sleepers");
    INTERN(s_folio_trylock_py, "_py_folio_trylock");
    INTERN(s_folio_lock_py, "_py_folio_lock");
    INTERN(s_folio_unlock_py, "_py_folio_unlock");
    INTERN(s_folio_lock_slow, "_folio_lock_slow");
    INTERN(s_wake_waiters, "_wake_waiters");
    INTERN(s_folio_trylock_many_py, "_py_folio_trylock_many");
    INTERN(s_folio_unlock_many_py, "_py_folio_unlock_many");
    INTERN(s_empty, "");
    INTERN(s_vma_start_read_py, "_py_vma_start_read");
    INTERN(s_vma_end_read_py, "_py_vma_end_read");
    INTERN(s_wake_writer, "_wake_writer");
#undef INTERN
    if (!(small_zero = PyLong_FromLong(0)))
        return -1;
    PyTypeObject *types[] = {&CpuBaseType, &SpinLockType, &RwSemType, &FolioLocksType, &VmaLockType, &BuddyType};
    const char *names[] = {"CpuBase", "SpinLockBase", "RwSemBase", "FolioLocksBase", "VmaLockBase", "Buddy"};
    for (int i = 0; i < 6; i++) {
        if (PyType_Ready(types[i]) < 0)
            return -1;
        Py_INCREF(types[i]);
        if (PyModule_AddObject(m, names[i], (PyObject *)types[i]) < 0) {
            Py_DECREF(types[i]);
            return -1;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Buddy: the page allocator's free lists in one call per operation (core/machine/mm.py)       */
/*
 * Machine's allocator (alloc_folio, free_folio, folios_put) keeps the buddy free lists in plain
 * words of the folio segment (order, flags, next_free, prev_free, refcount) and the list heads and
 * the free count in ctl.  On the process backend, where all three segments are real Regions,
 * Machine hands the list work to a Buddy: the very steps of its Python methods (_buddy_add,
 * _buddy_del, the merge loop of free_folio, the split loop of alloc_folio, the checks of
 * free_folio and __folio_alloc's preparation), word for word and in the same order, with the
 * same acquire loads and release stores, in C.  Locking stays the caller's: zone->lock is taken
 * in Python around every list operation (mutant-alloc-no-zone-lock still skips it).  Anything
 * unusual -- a free list that fails __list_del_entry_valid(), a folio freed twice, locked or
 * mapped, a refcount underflow -- is handed back to the Python path, which records it.  On any
 * other region (the scheduled backend's) Machine runs its Python methods: the schedule space is
 * unchanged (tests/test_fastpaths.py holds the two to the same words).
 */

enum { BF_HEAD, BF_ORDER, BF_FLAGS, BF_NEXT, BF_PREV, BF_REF, BF_MAP, BF_PIN, BF_OWNER, BF_NFIELDS };

typedef struct {
    PyObject_HEAD
    PyObject *ctl, *folio, *frames;
    Py_ssize_t f[BF_NFIELDS];
    Py_ssize_t free_heads, nr_free;
    int64_t nr_frames, page_size;
    int max_order;
    int32_t pg_buddy, pg_locked, new_flags;
    int64_t poison;
    char *poison_page; /* one page of the poison pattern: memcmp() checks a page against it */
} BuddyObject;

static int Buddy_init(BuddyObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"ctl", "folio", "frames", "fields", "free_heads", "nr_free", "nr_frames", "max_order",
                             "page_size", "pg_buddy", "pg_locked", "new_flags", "poison", NULL};
    PyObject *ctl, *folio, *frames, *fields;
    long long nr_frames, page_size, poison;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O!O!OnnLiLiiiL", kwlist, &RegionType, &ctl, &RegionType, &folio,
                                     &RegionType, &frames, &fields, &self->free_heads, &self->nr_free, &nr_frames,
                                     &self->max_order, &page_size, &self->pg_buddy, &self->pg_locked, &self->new_flags,
                                     &poison))
        return -1;
    PyObject *seq = PySequence_Fast(fields, "fields must be a sequence of offsets");
    if (!seq)
        return -1;
    if (PySequence_Fast_GET_SIZE(seq) != BF_NFIELDS) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "fields: %d offsets (head, order, flags, next_free, prev_free, refcount, "
                                       "mapcount, pincount, lock_owner)", BF_NFIELDS);
        return -1;
    }
    for (int i = 0; i < BF_NFIELDS; i++) {
        self->f[i] = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(seq, i));
        if (self->f[i] == -1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return -1;
        }
    }
    Py_DECREF(seq);
    self->nr_frames = nr_frames;
    self->page_size = page_size;
    self->poison = poison;
    RegionObject *rc = (RegionObject *)ctl, *rf = (RegionObject *)folio, *rp = (RegionObject *)frames;
    int bad = nr_frames <= 0 || page_size <= 0 || page_size % 8 || self->max_order < 0 || self->max_order > 30 ||
              !rc->base || !rf->base || !rp->base || self->free_heads < 0 || self->free_heads % 4 ||
              self->free_heads + 4 * (self->max_order + 1) > rc->size || self->nr_free < 0 || self->nr_free % 4 ||
              self->nr_free + 4 > rc->size || nr_frames * page_size > rp->size;
    for (int i = 0; i < BF_NFIELDS && !bad; i++)
        bad = self->f[i] < 0 || self->f[i] % 4 || self->f[i] + 4 * nr_frames > rf->size;
    if (bad) {
        PyErr_SetString(PyExc_ValueError, "Buddy: a field, a list head or the frames lie outside their regions");
        return -1;
    }
    char *pp = PyMem_Malloc(page_size);
    if (!pp) {
        PyErr_NoMemory();
        return -1;
    }
    for (int64_t i = 0; i < page_size / 8; i++)
        memcpy(pp + 8 * i, &self->poison, 8);
    PyMem_Free(self->poison_page);
    self->poison_page = pp;
    Py_INCREF(ctl);
    Py_XSETREF(self->ctl, ctl);
    Py_INCREF(folio);
    Py_XSETREF(self->folio, folio);
    Py_INCREF(frames);
    Py_XSETREF(self->frames, frames);
    return 0;
}

static void Buddy_dealloc(BuddyObject *self)
{
    PyMem_Free(self->poison_page);
    self->poison_page = NULL;
    Py_CLEAR(self->ctl);
    Py_CLEAR(self->folio);
    Py_CLEAR(self->frames);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The regions may have been closed since: every call checks them first. */
static inline int buddy_live(BuddyObject *b)
{
    if (!((RegionObject *)b->ctl)->base || !((RegionObject *)b->folio)->base || !((RegionObject *)b->frames)->base) {
        PyErr_SetString(PyExc_ValueError, "region is closed");
        return 0;
    }
    return 1;
}

static inline int32_t *bf(BuddyObject *b, int field, int64_t pfn)
{
    return (int32_t *)(((RegionObject *)b->folio)->base + b->f[field] + pfn * 4);
}

static inline int32_t *bhead(BuddyObject *b, int order)
{
    return (int32_t *)(((RegionObject *)b->ctl)->base + b->free_heads + 4 * order);
}

#define LD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define ST(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)

static inline int pfn_ok(BuddyObject *b, int64_t pfn)
{
    if (pfn < 0 || pfn >= b->nr_frames) {
        PyErr_Format(PyExc_IndexError, "pfn %lld outside the %lld frames", (long long)pfn, (long long)b->nr_frames);
        return 0;
    }
    return 1;
}

/* Poison nf pages from p on (free_pages_prepare()'s page poisoning): a memset when the pattern
 * is one byte repeated (POISON_FREE is 0x6b...), else word by word. */
static void buddy_poison(BuddyObject *b, int64_t *p, int64_t nf)
{
    unsigned char c = (unsigned char)b->poison;
    if (b->poison == (int64_t)(0x0101010101010101ULL * c))
        memset(p, c, nf * b->page_size);
    else
        for (int64_t w = 0, nw = nf * (b->page_size / 8); w < nw; w++)
            p[w] = b->poison;
    __atomic_thread_fence(__ATOMIC_RELEASE);
}

/* The first word of nf pages from p on that does not hold the poison, or -1: a memcmp() of each
 * page with a poisoned one, then the word within the page that differs. */
static int64_t buddy_find_unpoisoned(BuddyObject *b, const int64_t *p, int64_t nf)
{
    int64_t wpp = b->page_size / 8;
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    for (int64_t j = 0; j < nf; j++) {
        const int64_t *q = p + j * wpp;
        if (memcmp(q, b->poison_page, b->page_size) == 0)
            continue;
        for (int64_t i = 0; i < wpp; i++)
            if (q[i] != b->poison)
                return j * wpp + i;
    }
    return -1;
}

/* Machine._buddy_add */
static int buddy_add(BuddyObject *b, int64_t pfn, int order)
{
    if (!pfn_ok(b, pfn))
        return -1;
    ST(bf(b, BF_ORDER, pfn), order);
    ST(bf(b, BF_FLAGS, pfn), b->pg_buddy);
    ST(bf(b, BF_REF, pfn), 0);
    int32_t first = LD(bhead(b, order));
    ST(bf(b, BF_NEXT, pfn), first);
    ST(bf(b, BF_PREV, pfn), -1);
    if (first >= 0) {
        if (!pfn_ok(b, first))
            return -1;
        ST(bf(b, BF_PREV, first), (int32_t)pfn);
    }
    ST(bhead(b, order), (int32_t)pfn);
    return 0;
}

/* Machine._buddy_del */
static int buddy_del(BuddyObject *b, int64_t pfn, int order)
{
    int32_t nxt = LD(bf(b, BF_NEXT, pfn)), prv = LD(bf(b, BF_PREV, pfn));
    if (prv >= 0) {
        if (!pfn_ok(b, prv))
            return -1;
        ST(bf(b, BF_NEXT, prv), nxt);
    } else {
        ST(bhead(b, order), nxt);
    }
    if (nxt >= 0) {
        if (!pfn_ok(b, nxt))
            return -1;
        ST(bf(b, BF_PREV, nxt), prv);
    }
    ST(bf(b, BF_NEXT, pfn), -1);
    ST(bf(b, BF_PREV, pfn), -1);
    ST(bf(b, BF_FLAGS, pfn), 0);
    return 0;
}

/* free_folio()'s part under zone->lock (__free_one_page): merge with free buddies, add the block,
 * count the frames free.  Returns the frames freed, -1 on error. */
static int64_t buddy_free_one(BuddyObject *b, int64_t head)
{
    if (!pfn_ok(b, head))
        return -1;
    int order = LD(bf(b, BF_ORDER, head));
    if (order < 0 || order > b->max_order) {
        PyErr_Format(PyExc_ValueError, "folio %lld has order %d", (long long)head, order);
        return -1;
    }
    int64_t pfn = head;
    int o = order;
    while (o < b->max_order) {
        int64_t buddy = pfn ^ ((int64_t)1 << o);
        if (buddy + ((int64_t)1 << o) > b->nr_frames)
            break;
        if (!(LD(bf(b, BF_FLAGS, buddy)) & b->pg_buddy && LD(bf(b, BF_ORDER, buddy)) == o))
            break;
        if (buddy_del(b, buddy, o) < 0)
            return -1;
        pfn = pfn < buddy ? pfn : buddy;
        o++;
    }
    if (buddy_add(b, pfn, o) < 0)
        return -1;
    int64_t n = (int64_t)1 << order;
    __atomic_fetch_add((int32_t *)(((RegionObject *)b->ctl)->base + b->nr_free), (int32_t)n, __ATOMIC_ACQ_REL);
    return n;
}

/* alloc(order) -> the head pfn taken off the free lists (split down to order, the upper halves
 * given back), -1 when no block is large enough, -2 when the block at the head of its list fails
 * __list_del_entry_valid() (nothing changed: the caller's Python path records it).  The caller
 * holds zone->lock. */
static PyObject *Buddy_alloc(BuddyObject *b, PyObject *arg)
{
    long order = PyLong_AsLong(arg);
    if (order == -1 && PyErr_Occurred())
        return NULL;
    if (order < 0 || order > b->max_order)
        return PyErr_Format(PyExc_ValueError, "order %ld out of range", order);
    if (!buddy_live(b))
        return NULL;
    int o = (int)order;
    while (o <= b->max_order && LD(bhead(b, o)) < 0)
        o++;
    if (o > b->max_order)
        return PyLong_FromLong(-1);
    int64_t pfn = LD(bhead(b, o));
    /* Machine._list_del_entry_valid */
    int ok = pfn >= 0 && pfn < b->nr_frames && LD(bf(b, BF_FLAGS, pfn)) & b->pg_buddy && LD(bf(b, BF_ORDER, pfn)) == o;
    if (ok) {
        int32_t prv = LD(bf(b, BF_PREV, pfn));
        if (prv >= 0 && prv >= b->nr_frames)
            ok = 0;
        else
            ok = (prv < 0 ? LD(bhead(b, o)) : LD(bf(b, BF_NEXT, prv))) == pfn;
    }
    if (!ok)
        return PyLong_FromLong(-2);
    if (buddy_del(b, pfn, o) < 0)
        return NULL;
    while (o > order) {
        o--;
        if (buddy_add(b, pfn + ((int64_t)1 << o), o) < 0)
            return NULL;
    }
    __atomic_fetch_add((int32_t *)(((RegionObject *)b->ctl)->base + b->nr_free), -(int32_t)(1 << order),
                       __ATOMIC_ACQ_REL);
    return PyLong_FromLongLong(pfn);
}

/* prep_new(pfn, order, zero) -> index of the first word of the new folio's frames that lost its
 * free poison, or -1: alloc_folio()'s steps after the lists (head of every frame, order, counts,
 * flags, refcount 1; the poison check; the clearing when zero). */
static PyObject *Buddy_prep_new(BuddyObject *b, PyObject *const *args, Py_ssize_t nargs)
{
    CHECK_NARGS(3, "prep_new");
    int64_t pfn, order;
    if (get_i64(args[0], &pfn) || get_i64(args[1], &order))
        return NULL;
    int zero = PyObject_IsTrue(args[2]);
    if (zero < 0 || !buddy_live(b))
        return NULL;
    if (order < 0 || order > b->max_order || !pfn_ok(b, pfn) || pfn + ((int64_t)1 << order) > b->nr_frames)
        return PyErr_Format(PyExc_ValueError, "folio %lld of order %lld outside the frames", (long long)pfn,
                            (long long)order);
    int64_t n = (int64_t)1 << order;
    for (int64_t j = 0; j < n; j++)
        ST(bf(b, BF_HEAD, pfn + j), (int32_t)pfn);
    ST(bf(b, BF_ORDER, pfn), (int32_t)order);
    ST(bf(b, BF_MAP, pfn), 0);
    ST(bf(b, BF_PIN, pfn), 0);
    ST(bf(b, BF_OWNER, pfn), 0);
    ST(bf(b, BF_FLAGS, pfn), b->new_flags);
    ST(bf(b, BF_REF, pfn), 1);
    int64_t *p = (int64_t *)(((RegionObject *)b->frames)->base + pfn * b->page_size);
    int64_t nw = n * (b->page_size / 8), bad = buddy_find_unpoisoned(b, p, n);
    if (zero) {
        memset(p, 0, nw * 8);
        __atomic_thread_fence(__ATOMIC_RELEASE);
    }
    return PyLong_FromLongLong(bad);
}

/* A sequence of pfns (a list, or any sequence of ints) as a C array; PyMem_Free it. */
static int64_t *pfn_list(PyObject *o, Py_ssize_t *n)
{
    PyObject *seq = PySequence_Fast(o, "expected a sequence of pfns");
    if (!seq)
        return NULL;
    *n = PySequence_Fast_GET_SIZE(seq);
    int64_t *out = PyMem_Malloc((*n ? *n : 1) * sizeof(int64_t));
    if (!out) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < *n; i++) {
        long long v = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq, i));
        if (v == -1 && PyErr_Occurred()) {
            PyMem_Free(out);
            Py_DECREF(seq);
            return NULL;
        }
        out[i] = v;
    }
    Py_DECREF(seq);
    return out;
}

/* put(heads) -> (freeable, underflows): folio_put() of each folio in turn (an atomic decrement of
 * its refcount); the heads whose count reached 0, and (head, count) for each that went below. */
static PyObject *Buddy_put(BuddyObject *b, PyObject *arg)
{
    Py_ssize_t n;
    if (!buddy_live(b))
        return NULL;
    int64_t *h = pfn_list(arg, &n);
    if (!h)
        return NULL;
    PyObject *zero = PyList_New(0), *under = PyList_New(0), *res = NULL;
    if (!zero || !under)
        goto out;
    for (Py_ssize_t i = 0; i < n; i++)
        if (!pfn_ok(b, h[i]))
            goto out;
    for (Py_ssize_t i = 0; i < n; i++) {
        int32_t left = __atomic_fetch_add(bf(b, BF_REF, h[i]), -1, __ATOMIC_ACQ_REL) - 1;
        PyObject *item = left == 0 ? PyLong_FromLongLong(h[i]) : left < 0 ? Py_BuildValue("(Li)", (long long)h[i], left) : NULL;
        if (left > 0)
            continue;
        if (!item || PyList_Append(left == 0 ? zero : under, item) < 0) {
            Py_XDECREF(item);
            goto out;
        }
        Py_DECREF(item);
    }
    res = PyTuple_Pack(2, zero, under);
out:
    Py_XDECREF(zero);
    Py_XDECREF(under);
    PyMem_Free(h);
    return res;
}

/* free_prepare(heads) -> k: free_folio()'s steps before zone->lock (free_pages_prepare()) for
 * heads[0], heads[1], ... : poison every frame, mark it no folio's (head -1) -- stopping at the
 * first folio that is free already, locked or still mapped (k is its index; len(heads) when none
 * is): the caller frees that one through the Python path, which records it. */
static PyObject *Buddy_free_prepare(BuddyObject *b, PyObject *arg)
{
    Py_ssize_t n, i;
    if (!buddy_live(b))
        return NULL;
    int64_t *h = pfn_list(arg, &n);
    if (!h)
        return NULL;
    char *frames = ((RegionObject *)b->frames)->base;
    for (i = 0; i < n; i++) {
        int64_t head = h[i];
        if (!pfn_ok(b, head)) {
            PyMem_Free(h);
            return NULL;
        }
        int order = LD(bf(b, BF_ORDER, head));
        int32_t flags = LD(bf(b, BF_FLAGS, head));
        if (flags & (b->pg_buddy | b->pg_locked) || LD(bf(b, BF_MAP, head)) != 0 || order < 0 ||
            order > b->max_order || head + ((int64_t)1 << order) > b->nr_frames)
            break;
        int64_t nf = (int64_t)1 << order;
        buddy_poison(b, (int64_t *)(frames + head * b->page_size), nf);
        for (int64_t j = 0; j < nf; j++)
            ST(bf(b, BF_HEAD, head + j), -1);
    }
    PyMem_Free(h);
    return PyLong_FromSsize_t(i);
}

/* free(heads) -> frames freed: free_folio()'s part under zone->lock for each prepared folio in
 * turn (free_pcppages_bulk(): one zone->lock hold for the batch).  The caller holds zone->lock. */
static PyObject *Buddy_free(BuddyObject *b, PyObject *arg)
{
    Py_ssize_t n;
    if (!buddy_live(b))
        return NULL;
    int64_t *h = pfn_list(arg, &n);
    if (!h)
        return NULL;
    int64_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t got = buddy_free_one(b, h[i]);
        if (got < 0) {
            PyMem_Free(h);
            return NULL;
        }
        total += got;
    }
    PyMem_Free(h);
    return PyLong_FromLongLong(total);
}

#undef LD
#undef ST

static PyMethodDef Buddy_methods[] = {
    {"alloc", (PyCFunction)Buddy_alloc, METH_O, "alloc(order) -> head pfn, -1 (no block), -2 (list check failed)"},
    {"prep_new", (PyCFunction)(void (*)(void))Buddy_prep_new, METH_FASTCALL,
     "prep_new(pfn, order, zero) -> first word that lost its poison, or -1"},
    {"put", (PyCFunction)Buddy_put, METH_O, "put(heads) -> (heads at refcount 0, [(head, count < 0)])"},
    {"free_prepare", (PyCFunction)Buddy_free_prepare, METH_O, "free_prepare(heads) -> how many were prepared"},
    {"free", (PyCFunction)Buddy_free, METH_O, "free(heads) -> frames freed (caller holds zone->lock)"},
    {NULL},
};

static PyTypeObject BuddyType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "ptlab.core.machine._prims.Buddy",
    .tp_basicsize = sizeof(BuddyObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Buddy(ctl, folio, frames, fields, ...): the page allocator's list work in one call",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Buddy_init,
    .tp_dealloc = (destructor)Buddy_dealloc,
    .tp_methods = Buddy_methods,
};

/* ------------------------------------------------------------------------------------------ */
/* Module functions: the clock and the C reference loops for calibrate                       */

static PyObject *M_now_ns(PyObject *mod, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromLongLong(mono_ns());
}

static RegionObject *as_region(PyObject *o)
{
    if (!PyObject_TypeCheck(o, &RegionType)) {
        PyErr_SetString(PyExc_TypeError, "expected a Region");
        return NULL;
    }
    RegionObject *r = (RegionObject *)o;
    if (!r->base) {
        PyErr_SetString(PyExc_ValueError, "region is closed");
        return NULL;
    }
    return r;
}

/* ref_loop(region, kind, off, n) -> mean ns per operation of a C loop.
 * kind: "cas64", "fetch_add64", "load64", "store64", "spin_lock_unlock". */
static PyObject *M_ref_loop(PyObject *mod, PyObject *args)
{
    PyObject *reg_obj;
    const char *kind;
    Py_ssize_t off, n;
    if (!PyArg_ParseTuple(args, "Osnn", &reg_obj, &kind, &off, &n))
        return NULL;
    RegionObject *r = as_region(reg_obj);
    if (!r)
        return NULL;
    if (n <= 0) {
        PyErr_SetString(PyExc_ValueError, "n must be positive");
        return NULL;
    }
    int64_t *p = range_at(r, off, 8, 8);
    if (!p)
        return NULL;
    int64_t t0, t1;
    volatile int64_t sink = 0;
    if (!strcmp(kind, "cas64")) {
        t0 = mono_ns();
        for (Py_ssize_t i = 0; i < n; i++) {
            int64_t o = __atomic_load_n(p, __ATOMIC_RELAXED);
            __atomic_compare_exchange_n(p, &o, o + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
        }
        t1 = mono_ns();
    } else if (!strcmp(kind, "fetch_add64")) {
        t0 = mono_ns();
        for (Py_ssize_t i = 0; i < n; i++)
            __atomic_fetch_add(p, 1, __ATOMIC_ACQ_REL);
        t1 = mono_ns();
    } else if (!strcmp(kind, "load64")) {
        t0 = mono_ns();
        for (Py_ssize_t i = 0; i < n; i++)
            sink += __atomic_load_n(p, __ATOMIC_ACQUIRE);
        t1 = mono_ns();
    } else if (!strcmp(kind, "store64")) {
        t0 = mono_ns();
        for (Py_ssize_t i = 0; i < n; i++)
            __atomic_store_n(p, i, __ATOMIC_RELEASE);
        t1 = mono_ns();
    } else if (!strcmp(kind, "spin_lock_unlock")) {
        int32_t *l = (int32_t *)p;
        t0 = mono_ns();
        for (Py_ssize_t i = 0; i < n; i++) {
            int32_t z = 0;
            while (!__atomic_compare_exchange_n(l, &z, 1, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
                z = 0;
                cpu_relax();
            }
            __atomic_store_n(l, 0, __ATOMIC_RELEASE);
        }
        t1 = mono_ns();
    } else {
        PyErr_Format(PyExc_ValueError, "unknown reference loop %s", kind);
        return NULL;
    }
    (void)sink;
    return PyFloat_FromDouble((double)(t1 - t0) / (double)n);
}

/* ref_spin_contended(region, lock_off, counter_off, n) -> mean ns per locked increment; two
 * processes call it at once on the same words for the contended reference. */
static PyObject *M_ref_spin_contended(PyObject *mod, PyObject *args)
{
    PyObject *reg_obj;
    Py_ssize_t loff, coff, n;
    if (!PyArg_ParseTuple(args, "Onnn", &reg_obj, &loff, &coff, &n))
        return NULL;
    RegionObject *r = as_region(reg_obj);
    if (!r)
        return NULL;
    int32_t *l = range_at(r, loff, 4, 4);
    if (!l)
        return NULL;
    int64_t *c = range_at(r, coff, 8, 8);
    if (!c)
        return NULL;
    int64_t t0, t1;
    Py_BEGIN_ALLOW_THREADS
    t0 = mono_ns();
    for (Py_ssize_t i = 0; i < n; i++) {
        int32_t z = 0;
        while (!__atomic_compare_exchange_n(l, &z, 1, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
            do
                cpu_relax();
            while (__atomic_load_n(l, __ATOMIC_RELAXED));
            z = 0;
        }
        *c = *c + 1;
        __atomic_store_n(l, 0, __ATOMIC_RELEASE);
    }
    t1 = mono_ns();
    Py_END_ALLOW_THREADS
    return PyFloat_FromDouble((double)(t1 - t0) / (double)(n > 0 ? n : 1));
}

/* ref_copy(region, dst_off, src_off, nbytes, iters) -> mean ns per memcpy. */
static PyObject *M_ref_copy(PyObject *mod, PyObject *args)
{
    PyObject *reg_obj;
    Py_ssize_t d, s, nb, iters;
    if (!PyArg_ParseTuple(args, "Onnnn", &reg_obj, &d, &s, &nb, &iters))
        return NULL;
    RegionObject *r = as_region(reg_obj);
    if (!r)
        return NULL;
    char *dp = range_at(r, d, nb, 1), *sp;
    if (!dp)
        return NULL;
    sp = range_at(r, s, nb, 1);
    if (!sp)
        return NULL;
    if (iters <= 0)
        iters = 1;
    int64_t t0 = mono_ns();
    for (Py_ssize_t i = 0; i < iters; i++) {
        memcpy(dp, sp, nb);
        __asm__ __volatile__("" ::: "memory");
    }
    int64_t t1 = mono_ns();
    return PyFloat_FromDouble((double)(t1 - t0) / (double)iters);
}

/* ref_futex_wake_to_run(n) -> list of n wake-to-run latencies (ns), measured between two
 * pthreads on a private word: the waker stamps the clock and FUTEX_WAKEs, the sleeper reads the
 * clock when it runs again.  The same measurement as calibrate's two-process Python version. */
struct pingpong {
    uint32_t word;
    int64_t stamp;
    int64_t *samples;
    Py_ssize_t n;
    int sleeper_cpu; /* < 0: wherever the scheduler puts it */
};

static int pin_thread(pthread_t th, int cpu)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return pthread_setaffinity_np(th, sizeof(set), &set);
}

static void *pingpong_sleeper(void *arg)
{
    struct pingpong *pp = arg;
    if (pp->sleeper_cpu >= 0)
        pin_thread(pthread_self(), pp->sleeper_cpu); /* checked by the creator before the start */
    for (Py_ssize_t i = 0; i < pp->n; i++) {
        /* odd: the sleeper's turn to wait; the waker sets it even and wakes. */
        __atomic_store_n(&pp->word, 1, __ATOMIC_RELEASE);
        while (__atomic_load_n(&pp->word, __ATOMIC_ACQUIRE) == 1)
            sys_futex(&pp->word, FUTEX_WAIT_PRIVATE, 1, NULL);
        int64_t now = mono_ns();
        pp->samples[i] = now - __atomic_load_n(&pp->stamp, __ATOMIC_ACQUIRE);
        /* wait until the waker has seen us run before the next round */
        __atomic_store_n(&pp->word, 3, __ATOMIC_RELEASE);
        sys_futex(&pp->word, FUTEX_WAKE_PRIVATE, 1, NULL);
    }
    return NULL;
}

/* ref_futex_wake_to_run(n, waker_cpu=-1, sleeper_cpu=-1): a cpu >= 0 pins that thread to that
 * host core for the measurement (the caller's affinity is restored afterwards), so the
 * reference can be taken with the same placement as the Python processes it is set beside. */
static PyObject *M_ref_futex_wake_to_run(PyObject *mod, PyObject *args)
{
    Py_ssize_t n;
    int waker_cpu = -1, sleeper_cpu = -1;
    if (!PyArg_ParseTuple(args, "n|ii", &n, &waker_cpu, &sleeper_cpu))
        return NULL;
    if (n <= 0) {
        PyErr_SetString(PyExc_ValueError, "n must be positive");
        return NULL;
    }
    if (waker_cpu >= CPU_SETSIZE || sleeper_cpu >= CPU_SETSIZE) {
        PyErr_SetString(PyExc_ValueError, "cpu number out of range");
        return NULL;
    }
    cpu_set_t saved;
    int pinned = 0;
    if (waker_cpu >= 0 || sleeper_cpu >= 0) {
        /* check both cores exist and are allowed before starting anything */
        int e = pthread_getaffinity_np(pthread_self(), sizeof(saved), &saved);
        if (e != 0) {
            errno = e;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        int probe[2] = {sleeper_cpu, waker_cpu};
        for (int k = 0; k < 2; k++) {
            if (probe[k] < 0)
                continue;
            e = pin_thread(pthread_self(), probe[k]);
            pthread_setaffinity_np(pthread_self(), sizeof(saved), &saved);
            if (e != 0) {
                PyErr_Format(PyExc_ValueError, "cannot run on host core %d: %s", probe[k], strerror(e));
                return NULL;
            }
        }
        if (waker_cpu >= 0) {
            pin_thread(pthread_self(), waker_cpu);
            pinned = 1;
        }
    }
    struct pingpong pp = {.word = 0, .stamp = 0, .n = n, .sleeper_cpu = sleeper_cpu};
    pp.samples = PyMem_Calloc(n, sizeof(int64_t));
    if (!pp.samples) {
        if (pinned)
            pthread_setaffinity_np(pthread_self(), sizeof(saved), &saved);
        return PyErr_NoMemory();
    }
    pthread_t th;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    if (pthread_create(&th, NULL, pingpong_sleeper, &pp) != 0) {
        err = 1;
    } else {
        for (Py_ssize_t i = 0; i < n; i++) {
            while (__atomic_load_n(&pp.word, __ATOMIC_ACQUIRE) != 1)
                cpu_relax();
            /* let the sleeper actually go to sleep */
            struct timespec d = {0, 20000};
            nanosleep(&d, NULL);
            __atomic_store_n(&pp.stamp, mono_ns(), __ATOMIC_RELEASE);
            __atomic_store_n(&pp.word, 2, __ATOMIC_RELEASE);
            sys_futex(&pp.word, FUTEX_WAKE_PRIVATE, 1, NULL);
            while (__atomic_load_n(&pp.word, __ATOMIC_ACQUIRE) == 2)
                sys_futex(&pp.word, FUTEX_WAIT_PRIVATE, 2, NULL);
        }
        pthread_join(th, NULL);
    }
    Py_END_ALLOW_THREADS
    if (pinned)
        pthread_setaffinity_np(pthread_self(), sizeof(saved), &saved);
    if (err) {
        PyMem_Free(pp.samples);
        PyErr_SetString(PyExc_OSError, "pthread_create failed");
        return NULL;
    }
    PyObject *lst = PyList_New(n);
    if (!lst) {
        PyMem_Free(pp.samples);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        PyList_SET_ITEM(lst, i, PyLong_FromLongLong(pp.samples[i]));
    PyMem_Free(pp.samples);
    return lst;
}

static PyMethodDef module_methods[] = {
    {"now_ns", M_now_ns, METH_NOARGS, "CLOCK_MONOTONIC in ns"},
    {"ref_loop", M_ref_loop, METH_VARARGS, "ref_loop(region, kind, off, n) -> mean ns per op"},
    {"ref_spin_contended", M_ref_spin_contended, METH_VARARGS,
     "ref_spin_contended(region, lock_off, counter_off, n) -> mean ns per locked increment"},
    {"ref_copy", M_ref_copy, METH_VARARGS, "ref_copy(region, dst, src, nbytes, iters) -> mean ns"},
    {"ref_futex_wake_to_run", M_ref_futex_wake_to_run, METH_VARARGS,
     "ref_futex_wake_to_run(n, waker_cpu=-1, sleeper_cpu=-1) -> list of wake-to-run ns between two threads"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef prims_module = {
    PyModuleDef_HEAD_INIT, "_prims", "Atomic words, futexes, spinlocks and reference loops over shared memory.", -1,
    module_methods,
};

PyMODINIT_FUNC PyInit__prims(void)
{
    if (PyType_Ready(&RegionType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&prims_module);
    if (!m)
        return NULL;
    Py_INCREF(&RegionType);
    if (PyModule_AddObject(m, "Region", (PyObject *)&RegionType) < 0) {
        Py_DECREF(&RegionType);
        Py_DECREF(m);
        return NULL;
    }
    if (init_lock_types(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
