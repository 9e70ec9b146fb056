# Cython declarations for events.py (pure-Python mode: this file augments the .py, which stays
# the only source; PTLAB_PURE=1 runs the .py untouched).  Compiled, pack() is a C function with
# C integer fields (each far below its bit width; the code is a 53-bit word).  (Recorder as an
# extension type with a C put() measured no faster fault: it stays a plain class.)
cimport cython

cpdef long long pack(long long op, long long role, long long waited, long long result, long long vma, long long order, bint during) except? -1
