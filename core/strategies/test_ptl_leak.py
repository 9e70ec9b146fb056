"""Test-only: a "strategy" that takes the PTL and never releases it, to prove that the
watchdog turns a deadlock into a failed run with a dump naming the lock and its holder.
Selected with ``--inject-bug test-ptl-leak --unsafe``; not listed by ``ptlab strategies``."""

from __future__ import annotations

from ptlab.core.khugepaged import Collapse

NAME = "test-ptl-leak"


def collapse(c: Collapse) -> str:
    result = c.check_pmd_still_valid()
    if result != "SCAN_SUCCEED":
        return result
    c.m.ptl(c.t).lock(c.cpu)  # never unlocked
    return "SCAN_SUCCEED"
