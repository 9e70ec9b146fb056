# Cython declarations for paths.py (pure-Python mode: this file augments the .py, which stays
# the only source; PTLAB_PURE=1 runs the .py untouched).  Compiled, the TLB-hit access and the
# page fault call each other as C functions over typed machine and CPU objects (mm.pxd, cpu.pxd:
# their fields are C struct members), with C integers for page numbers, pfns, table and PMD
# indexes and epochs (all far below 2**62: layout.py bounds them).  Values read from the machine
# (PTEs, PMDs, frame words) stay Python ints, as in the .py.  A CPU argument must be a
# CpuContext (or a subclass: the scheduled and virtual backends' CPUs are).
cimport cython
from ptlab.core.machine.cpu cimport CpuContext
from ptlab.core.machine.layout cimport is_migration_entry, pmd_mk_table, pmd_trans_huge, pte_mk
from ptlab.core.machine.mm cimport Machine

cdef class Oracle:
    cdef public dict mine, seen, dma
    cdef public long long seq

@cython.locals(m=Machine, vma=cython.int)
cpdef int lock_vma_under_rcu(CpuContext cpu, long long vpn) except? -2

@cython.locals(m=Machine, i=cython.longlong, t=cython.longlong, idx=cython.longlong, pfn=cython.longlong)
cpdef long long hw_walk(CpuContext cpu, long long vpn, bint write) except? -2

@cython.locals(bcast=cython.bint)
cpdef long long translate(CpuContext cpu, long long vpn, bint write) except? -2

@cython.locals(m=Machine, epoch=cython.longlong, after=cython.longlong, pfn=cython.longlong)
cpdef bint access_store(CpuContext cpu, Oracle oracle, long long vpn) except? -1

@cython.locals(m=Machine, epoch=cython.longlong, after=cython.longlong, pfn=cython.longlong)
cpdef object access_load(CpuContext cpu, Oracle oracle, long long vpn, long long word)

cpdef bint zap_completed_since(long long epoch, long long since) noexcept

@cython.locals(m=Machine, vma=cython.int)
cpdef str handle_mm_fault(CpuContext cpu, long long vpn, bint write)

@cython.locals(m=Machine, i=cython.longlong, idx=cython.longlong, t=cython.longlong)
cpdef str __handle_mm_fault(CpuContext cpu, int vma, long long vpn, bint write)

@cython.locals(m=Machine, i=cython.longlong, idx=cython.longlong, order=cython.int, k=cython.int, nr=cython.longlong, first=cython.longlong, folio=cython.longlong, start=cython.longlong, j=cython.longlong, changed=cython.bint)
cpdef str do_anonymous_page(CpuContext cpu, int vma, long long vpn, bint write, long long t)
