# Cython's view of the C base type core/machine/_prims.c defines for the CPU context: its
# fields, laid out as CpuBaseObject is (the struct below must stay identical to it; Cython checks
# the object size when the compiled cpu module is imported).  Used by cpu.pxd only: _prims itself
# is plain C.
cdef extern from *:
    """
    typedef struct {
        PyObject_HEAD
        int id;
        int owner_tag;
        Py_ssize_t ipi_flag_off;
        long long spin_ns;
        long long sleep_ns;
        long long wait_max;
        PyObject *wait_kind;
    } ptlab_CpuBaseObject;
    """
    ctypedef class ptlab.core.machine._prims.CpuBase [object ptlab_CpuBaseObject]:
        cdef int id
        cdef int owner_tag
        cdef Py_ssize_t ipi_flag_off
        cdef long long spin_ns
        cdef long long sleep_ns
        cdef long long wait_max
        # wait_kind is left to its member descriptor: the C type starts it NULL, which Cython's
        # object fields do not allow
