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
 *
 * A bad offset (negative, past the end) raises IndexError and a misaligned one ValueError: a
 * simulated kernel bug must show up as an oracle report, never as a segfault of the host.
 *
 * The module also holds the C reference loops that `ptlab calibrate` sets beside each Python
 * primitive, so every result file can say how much slower than C each step ran.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
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
    int64_t t0 = mono_ns(), now = t0;
    unsigned iter = 0;
    for (;;) {
        if (__atomic_load_n(lock, __ATOMIC_RELAXED) == 0) {
            zero = 0;
            if (__atomic_compare_exchange_n(lock, &zero, (int32_t)me, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
                now = mono_ns();
                return PyLong_FromLongLong(now - t0 > 0 ? now - t0 : 1);
            }
        }
        if (ipi && __atomic_load_n(ipi, __ATOMIC_ACQUIRE) != 0)
            return PyLong_FromLongLong(-1 - (mono_ns() - t0));
        cpu_relax();
        if ((++iter & 255) == 0) {
            now = mono_ns();
            if (now - t0 >= budget)
                return PyLong_FromLongLong(-1 - (now - t0));
        }
    }
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
    for (int64_t i = 0; i < n; i++)
        if (p[i] != pat)
            return PyLong_FromLongLong(i);
    return PyLong_FromLong(-1);
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
    {"put_row", (PyCFunction)(void (*)(void))R_put_row, METH_FASTCALL, "put_row(row, v0, ..., vk): store an event row"},
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
    return m;
}
