# Cython declarations for layout.py (pure-Python mode: this file augments the .py, which stays
# the only source; PTLAB_PURE=1 runs the .py untouched).  Compiled, the entry helpers the fault
# and access paths use on every step are C functions (core/kernel/paths.pxd cimports them);
# entries are 64-bit words, as in the page tables.
cimport cython

cpdef long long pte_mk(long long pfn, bint write=*, bint dirty=*, bint young=*) except? -1
cpdef bint is_migration_entry(long long pte) noexcept
cpdef long long pmd_mk_table(long long table) except? -1
cpdef bint pmd_trans_huge(long long pmd) noexcept
