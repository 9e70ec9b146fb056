# Cython declarations for mm.py (pure-Python mode: this file augments the .py, which stays the
# only source; PTLAB_PURE=1 runs the .py untouched).  Compiled, Machine is an extension type:
# its fields sit in the object, and the accessors the fault and access paths call on every step
# (core/kernel/paths.pxd types its machine as Machine) are C calls with C integer arguments.
# A field not declared here still works (the instance keeps a __dict__), only slower.
cimport cython

cdef class Machine:
    cdef dict __dict__
    cdef public object config, ns, L, ctl, pt, folio, frames, ptes, pmds, f, off, _rf, _buddy
    cdef public object mmap_lock, anon_vma, page_table_lock, pmd_lock, zone_lock, _ptls, vma_locks, folio_locks
    cdef public object _vma_offs, _o_head, _o_order, _o_flags, _o_next, _o_prev, _o_ref, _o_map
    cdef public long long page_size, words_per_page, zero_pfn, _tables_base, _epochs_base, _nr_frames

    cpdef object vma_flags(self, int i)
    cpdef int find_vma(self, long long vpn) except? -2
    cpdef object ptl(self, long long table)
    cpdef object pmdp_get(self, long long pmd_index)
    cpdef object ptep_get(self, long long table, long long index)
    cpdef object set_pte_at(self, long long table, long long index, object val)
    cpdef object ptep_cmpxchg(self, long long table, long long index, object old, object new)
    cpdef long long epoch(self, long long vpn) except? -1
    cpdef object folio_head(self, long long pfn)
    cpdef object folio_add_new_anon_rmap(self, long long head, long long nr)
    cpdef bint is_zero_pfn(self, long long pfn) noexcept
    cpdef object set_ptes(self, long long table, long long index, object values)
    @cython.locals(pfn=cython.longlong, n=cython.longlong, bad=cython.longlong)
    cpdef long long alloc_folio(self, object cpu, int order, bint zero=*) except? -2
    cpdef object folio_put(self, object cpu, long long head, long long refs=*)
