"""The end-of-run (quiescent) half of the correctness oracle, and the watchdog's lock dump.

The per-access half lives in core/kernel/paths.py (lost writes, stale reads, wrong pages) and in the
GUP roles (lost DMA writes); allocation checks the free poison (use after free) and freeing
catches double frees.  Here, with every CPU stopped, the machine must satisfy:

  - every present PTE maps a live folio (not free), at the right place for its order;
  - every folio is mapped exactly mapcount times, and refcount == mapcount + pins
    (a pin counts 1024 on a small folio, 1 on a large one) — no reference leaked or lost;
  - no migration entry outlives its collapse;
  - every mapped folio is back on the LRU: no isolation (khugepaged's, a walker's) outlives its
    operation;
  - a PTE of the shared zero page maps no folio and is read-only, and the zero page holds zeroes;
  - free frames + allocated folios == all frames (nothing leaked), and every free frame still
    holds its poison (nothing wrote through a stale translation after the free).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
from ptlab.core.machine.layout import (
    _MIGRATION,
    _PRESENT,
    _WRITE,
    CPU_STATE,
    CPU_WAITING,
    GUP_PIN_COUNTING_BIAS,
    NAMED_LOCKS,
    PG_BUDDY,
    PG_ISOLATED,
    PG_LRU,
    POISON_FREE,
    POISON_PT,
    STATE_NAMES,
    pmd_trans_huge,
)
from ptlab.core.machine.locks import locks_held
from ptlab.core.machine.mm import MAX_VMAS, Machine


def _v(kind: str, page: int, detail: str, strategy: str) -> dict[str, Any]:
    return {"kind": kind, "cpu": -1, "role": "", "page": page, "strategy": strategy, "phase": "end", "t_ns": 0, "detail": detail}


def check_machine(m: Machine, limit: int = 50) -> list[dict[str, Any]]:
    """Check the quiescent invariants; returns violation records (at most ``limit``)."""
    strategy = m.config.strategy
    out: list[dict[str, Any]] = []
    f = m.f
    head_of, order_of, flags = f["head"], f["order"], f["flags"]
    mapped: Counter[int] = Counter()
    out += check_page_tables(m, strategy)
    out += [_v("lock_leak", -1, what, strategy) for what in locks_held(m)]  # nobody runs: none is held
    for i in range(m.L.nr_pmds):
        pmd = int(m.pmds[i])
        if not pmd & _PRESENT:
            continue
        base_vpn = i * 512
        if pmd_trans_huge(pmd):
            pfn = pmd >> 12
            if head_of[pfn] != pfn or flags[pfn] & PG_BUDDY:
                out.append(_v("bad_pmd", base_vpn, f"huge PMD {i} maps pfn {pfn}, not a live folio head", strategy))
            mapped[pfn] += 1
            continue
        t = pmd >> 12
        if not m.table_in_use(t):
            continue  # a PMD reaching a freed table: check_page_tables() reports it
        ptes = m.ptes[t * 512 : (t + 1) * 512]
        for j in np.nonzero(ptes)[0].tolist():
            pte = int(ptes[j])
            vpn = base_vpn + j
            if pte & _MIGRATION and not pte & _PRESENT:
                out.append(_v("migration_entry_leftover", vpn, f"PTE of page {vpn} is still a migration entry", strategy))
                continue
            pfn = pte >> 12
            if pfn == m.zero_pfn:  # the shared zero page maps no folio; it must stay read-only
                if pte & _WRITE:
                    out.append(_v("zero_page_writable", vpn, f"page {vpn} maps the zero page writable", strategy))
                continue
            head = int(head_of[pfn])
            if head < 0 or flags[head] & PG_BUDDY:
                out.append(_v("pte_maps_free_frame", vpn, f"page {vpn} maps pfn {pfn}, which is free", strategy))
                continue
            order = int(order_of[head])
            if order and (vpn - (pfn - head)) % (1 << order):
                out.append(_v("misplaced_folio", vpn, f"page {vpn} maps pfn {pfn} of an order-{order} folio out of place", strategy))
            mapped[head] += 1
        if len(out) >= limit:
            return out[:limit]
    heads = np.nonzero((head_of == np.arange(len(head_of))) & ((flags & PG_BUDDY) == 0))[0]
    allocated = 0
    for h in heads.tolist():
        order = int(order_of[h])
        allocated += 1 << order
        ref, mc, pins = int(f["refcount"][h]), int(f["mapcount"][h]), int(f["pincount"][h])
        bias = GUP_PIN_COUNTING_BIAS if order == 0 else 1
        if mapped[h] != mc:
            out.append(_v("mapcount_mismatch", h, f"folio {h} (order {order}) has mapcount {mc} but is mapped {mapped[h]} times", strategy))
        if ref != mc + bias * pins:
            out.append(_v("refcount_mismatch", h, f"folio {h} (order {order}) refcount {ref} != mapcount {mc} + pins {pins}", strategy))
        if mc == 0 and pins == 0:
            out.append(_v("leaked_folio", h, f"folio {h} (order {order}) is allocated but neither mapped nor pinned", strategy))
        elif mc and flags[h] & (PG_LRU | PG_ISOLATED) != PG_LRU:
            # every isolation (khugepaged's, a walker's) is undone by the end of its operation
            out.append(_v("folio_off_lru", h, f"folio {h} (order {order}) is mapped but off the LRU (flags {int(flags[h]):#x}): an isolation was never put back", strategy))
        if len(out) >= limit:
            return out[:limit]
    nr_free = m.nr_free()
    if nr_free + allocated + 1 != m.L.nr_frames:  # + 1: the zero page, never free, no folio
        out.append(_v("frame_accounting", -1, f"{nr_free} free + {allocated} allocated + the zero page != {m.L.nr_frames} frames", strategy))
    bad = m.frames.find_not64(m.zero_pfn * m.page_size, m.words_per_page, 0)
    if bad >= 0:
        out.append(_v("zero_page_written", -1, f"the shared zero page (pfn {m.zero_pfn}) was written (word {bad})", strategy))
    free_heads = np.nonzero(flags & PG_BUDDY)[0].tolist()
    wpp = m.words_per_page
    for h in free_heads:
        n = 1 << int(order_of[h])
        bad = m.frames.find_not64(h * m.page_size, n * wpp, POISON_FREE)
        if bad >= 0:
            page, word = h + bad // wpp, bad % wpp
            out.append(_v("use_after_free", page, f"free frame {page} was written after it was freed (word {word})", strategy))
            if len(out) >= limit:
                break
    return out[:limit]


def check_page_tables(m: Machine, strategy: str) -> list[dict[str, Any]]:
    """Page-table lifetime: every PTE table in use is reached exactly once — by a PMD or from
    the deposit behind a huge PMD — and every free table still holds its poison."""
    out: list[dict[str, Any]] = []
    L = m.L
    reached: Counter[int] = Counter()
    for i in range(L.nr_pmds):
        pmd = int(m.pmds[i])
        if pmd_trans_huge(pmd):
            reached[int(m.pt.load64(L.deposit(i)))] += 1
        elif pmd & _PRESENT:
            reached[pmd >> 12] += 1
    for t in range(L.nr_tables):
        used, n = m.table_in_use(t), reached[t]
        if used and n != 1:
            out.append(_v("pt_leak" if n == 0 else "pt_shared", -1, f"PTE table {t} is in use but reached {n} times", strategy))
        elif not used and n:
            out.append(_v("pt_use_after_free", -1, f"free PTE table {t} is still reached by {n} PMD(s)", strategy))
        elif not used and (m.ptes[t * 512 : (t + 1) * 512] != POISON_PT).any():
            out.append(_v("pt_use_after_free", -1, f"free PTE table {t} was written after pte_free", strategy))
    return out


def lock_name(m: Machine, lock_id: int) -> str:
    if lock_id < len(NAMED_LOCKS):
        return NAMED_LOCKS[lock_id]
    if lock_id < 1000:
        return f"ptl[{lock_id - len(NAMED_LOCKS)}]"
    if lock_id < 100_000:
        return f"vma_lock[{lock_id - 1000}]"
    return f"folio_lock[pfn {lock_id - 100_000}]"


def lock_dump(m: Machine, roles: list[str]) -> list[str]:
    """Every held lock with its holder, and every CPU with what it waits on (for the watchdog)."""
    lines = []
    for lock in (m.mmap_lock, m.anon_vma):
        st = lock.statistics()
        if st["writer"] >= 0 or st["readers"]:  # type: ignore[operator]
            lines.append(repr(lock))
    for lock in [m.page_table_lock, m.pmd_lock, m.zone_lock, *dict.fromkeys(m._ptls)]:
        o = lock.owner()
        if o >= 0:
            lines.append(f"{lock.name} held by CPU {o} ({roles[o] if o < len(roles) else '?'})")
    for i in range(MAX_VMAS):
        if m.vma_locks[i].write_locked() and m.vma_range(i)[2] & 1:
            lines.append(f"vma_lock[{i}] write-locked")
    for c in range(len(roles)):
        base = m.L.cpu(c)
        state = m.ctl.load32(base + CPU_STATE)
        waiting = m.ctl.load32(base + CPU_WAITING)
        what = STATE_NAMES.get(state, str(state))
        on = f" on {lock_name(m, waiting)}" if state in (1, 2) else ""
        lines.append(f"CPU {c} ({roles[c]}): {what}{on}")
    return lines


__all__ = ["check_machine", "lock_dump", "lock_name"]
