# Cython declarations for cpu.py (pure-Python mode: this file augments the .py, which stays the
# only source; PTLAB_PURE=1 runs the .py untouched).  Compiled, CpuContext is an extension type
# over _prims.CpuBase: the fields the access and fault paths read on every step sit in the
# object (core/kernel/paths.pxd types its CPU as CpuContext).  Subclasses (the scheduled and
# virtual backends' CPUs) and undeclared fields keep working: the instance has a __dict__.
cimport cython
from ptlab.core.machine._prims cimport CpuBase
from ptlab.core.machine.events cimport pack
from ptlab.core.machine.mm cimport Machine

cdef class CpuContext(CpuBase):
    cdef dict __dict__
    cdef public Machine m
    cdef public object role, config, strategy, bugs, stop_on, ctl, tlb, phase, violations, rng, rec, stats, hooks, now, on_step
    cdef public long long role_code, nr_cpus, base, tlb_entries, tlb_gen, local_gen, sample, _progress
    cdef public bint broadcast, kthread, irqs_off, chaos_on, wait_timed_out

    # the per-step methods of the access and fault paths: C calls from typed callers (a
    # subclass's Python override still wins: the scheduled and virtual backends' CPUs)
    cpdef interrupt_point(self)
    cpdef tlb_fill(self, long long vpn, long long pfn, bint write)
    cpdef bint collapsing(self) except -1
    cpdef progress(self)
    cpdef charge(self, str step, long long n=*)
    cpdef chaos(self, str point)
    cpdef tuple op_begin(self)
    @cython.locals(lat=cython.longlong, t0=cython.longlong, s0=cython.longlong, z0=cython.longlong)
    cpdef long long op_end(self, tuple begin, str op, str result, long long addr, long long vma=*, long long order=*, object during=*) except? -1
