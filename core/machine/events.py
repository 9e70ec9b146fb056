"""Per-CPU event recording: preallocated numpy rows, one C call per event, no Ray call.

A row is 8 int64: t_start_ns, latency_ns, spin_ns, sleep_ns, addr (vpn), packed codes, and two
spare words; collapse rows go to a second buffer with the six phase times.  The packed word
holds op, role, waited_on, result, vma, order and during_collapse as small codes; ``to_columns``
turns the rows into the result file's columns (core/analysis/results.py).

Accesses that hit the TLB are the most frequent event by far: they are timed every time but
recorded one in ``sample`` (the factor is stored in the run metadata), which keeps a 10 s run's
buffers small; every fault, GUP, mmap, zap and collapse is recorded.
"""

from __future__ import annotations

import numpy as np
from ptlab.core.machine._prims import Region

OPS = ("access", "fault", "gup_fast", "gup_slow", "mmap", "munmap", "mprotect", "zap", "collapse", "scan", "dma",
       "folio_referenced", "migrate", "smaps", "madv_cold", "madv_pageout")
ROLES = ("app", "gup-fast", "gup-slow", "mmap", "zap", "khugepaged", "rmap-walk", "pt-walk", "vma-change")
WAITED = ("", "ptl", "mmap_lock", "vma_lock", "migration", "folio_lock", "anon_vma", "zone", "tlb", "pmd_lock")
RESULTS = (
    "ok",
    "retry",
    "fallback",
    "segv",
    "thrown_away",
    "spurious",
    "fail",
    "SCAN_FAIL",
    "SCAN_SUCCEED",
    "SCAN_PMD_NULL",
    "SCAN_PMD_NONE",
    "SCAN_PMD_MAPPED",
    "SCAN_EXCEED_NONE_PTE",
    "SCAN_EXCEED_SWAP_PTE",
    "SCAN_EXCEED_SHARED_PTE",
    "SCAN_PTE_NON_PRESENT",
    "SCAN_PTE_UFFD_WP",
    "SCAN_PTE_MAPPED_HUGEPAGE",
    "SCAN_PAGE_RO",
    "SCAN_LACK_REFERENCED_PAGE",
    "SCAN_PAGE_NULL",
    "SCAN_SCAN_ABORT",
    "SCAN_PAGE_COUNT",
    "SCAN_PAGE_LRU",
    "SCAN_PAGE_LOCK",
    "SCAN_PAGE_ANON",
    "SCAN_PAGE_COMPOUND",
    "SCAN_ANY_PROCESS",
    "SCAN_VMA_NULL",
    "SCAN_VMA_CHECK",
    "SCAN_ADDRESS_RANGE",
    "SCAN_DEL_PAGE_LRU",
    "SCAN_ALLOC_HUGE_PAGE_FAIL",
    "SCAN_CGROUP_CHARGE_FAIL",
    "SCAN_TRUNCATED",
    "SCAN_PAGE_HAS_PRIVATE",
    "SCAN_STORE_FAILED",
    "SCAN_COPY_MC",
    "SCAN_PAGE_FILLED",
    # ptlab's own: the new folio went in, but entries MADV_DONTNEED zapped during the collapse
    # stay zapped (never resurrected), so it maps fewer than 2^order pages / none at all
    "SCAN_PTE_ZAPPED",
    "SCAN_RANGE_ZAPPED",
    # the walkers' (core/kernel/walkers.py): migrate_pages() return codes, folio_referenced() outcomes
    "MIGRATEPAGE_SUCCESS",
    "-EAGAIN",
    "-EBUSY",
    "-ENOMEM",
    "referenced",
    "unreferenced",
    "contended",
)
# the phases of a collapse, in order (a collapse row carries one time per phase)
PHASES = ("lock", "unmap", "flush", "refcheck", "copy", "install")
OP = {n: i for i, n in enumerate(OPS)}
ROLE = {n: i for i, n in enumerate(ROLES)}
WAIT = {n: i for i, n in enumerate(WAITED)}
RESULT = {n: i for i, n in enumerate(RESULTS)}

ROW = 8
CROW = 14  # collapse rows: ROW + lock, unmap, flush, refcheck, copy, install


def pack(op: int, role: int, waited: int, result: int, vma: int, order: int, during: bool) -> int:
    return op | role << 8 | waited << 16 | result << 24 | (vma + 1) << 40 | order << 48 | int(during) << 52


class Recorder:
    """Event buffers of one CPU.  Rows past the capacity are counted in ``dropped``."""

    def __init__(self, capacity: int, collapse_capacity: int) -> None:
        self.rows = np.zeros((max(1, capacity), ROW), dtype=np.int64)
        self.crows = np.zeros((max(1, collapse_capacity), CROW), dtype=np.int64)
        self._r = Region(self.rows)
        self._c = Region(self.crows)
        self.n = 0
        self.nc = 0
        self.dropped = 0
        self.cap = len(self.rows)
        self._put = self._r.put_row

    def put(self, t0: int, lat: int, spin: int, sleep: int, addr: int, packed: int) -> None:
        n = self.n
        if n < self.cap:
            self._put(n, t0, lat, spin, sleep, addr, packed, 0, 0)
            self.n = n + 1
        else:
            self.dropped += 1

    def put_collapse(self, t0: int, lat: int, spin: int, sleep: int, addr: int, packed: int, phases: list[int]) -> None:
        if self.nc < len(self.crows):
            self._c.put_row(self.nc, t0, lat, spin, sleep, addr, packed, 0, 0, *phases)
            self.nc += 1
        else:
            self.dropped += 1

    def export(self) -> tuple[np.ndarray, np.ndarray]:
        """The used rows (copies), for gathering by the driver."""
        return self.rows[: self.n].copy(), self.crows[: self.nc].copy()

    def close(self) -> None:
        self._r.close()
        self._c.close()


def to_columns(rows: np.ndarray, crows: np.ndarray, cpu: int, run_id: str, strategy: str, t_origin: int) -> dict[str, object]:
    """Decode one CPU's rows into result-file columns (t_start_ns made relative to t_origin)."""
    allrows = np.concatenate([rows, crows[:, :ROW]]) if len(crows) else rows
    n = len(allrows)
    packed = allrows[:, 5]
    phases = np.zeros((n, 6), dtype=np.int64)
    if len(crows):
        phases[len(rows) :] = crows[:, ROW:]
    cols: dict[str, object] = {
        "run_id": [run_id] * n,
        "strategy": [strategy] * n,
        "cpu": np.full(n, cpu, dtype=np.int16),
        "role": np.array(ROLES, dtype=object)[(packed >> 8) & 0xFF],
        "op": np.array(OPS, dtype=object)[packed & 0xFF],
        "t_start_ns": allrows[:, 0] - t_origin,
        "latency_ns": allrows[:, 1],
        "spin_ns": allrows[:, 2],
        "sleep_ns": allrows[:, 3],
        "waited_on": np.array(WAITED, dtype=object)[(packed >> 16) & 0xFF],
        "result": np.array(RESULTS, dtype=object)[(packed >> 24) & 0xFFFF],
        "order": ((packed >> 48) & 0xF).astype(np.int8),
        "vma": (((packed >> 40) & 0xFF) - 1).astype(np.int16),
        "addr": allrows[:, 4],
        "during_collapse": ((packed >> 52) & 1).astype(bool),
    }
    for i, name in enumerate(("lock_ns", "unmap_ns", "flush_ns", "refcheck_ns", "copy_ns", "install_ns")):
        cols[name] = phases[:, i]
    return cols
