"""Test-only: a "strategy" that takes the PTL and then takes it again (the recursive locking
lockdep warns about), so it spins for ever holding it — to prove that the watchdog turns a
deadlock into a failed run with a dump naming the lock and its holder.  (A path that merely
returned holding the PTL would be caught at once as a ``lock_leak`` after the collapse.)
Selected with ``--inject-bug test-ptl-leak --unsafe``; not listed by ``ptlab strategies``."""

from __future__ import annotations

from ptlab.core.kernel.khugepaged import Collapse

NAME = "test-ptl-leak"


def collapse(c: Collapse) -> str:
    result = c.check_pmd_still_valid()
    if result != "SCAN_SUCCEED":
        return result
    c.m.ptl(c.t).lock(c.cpu)  # never unlocked
    c.m.ptl(c.t).lock(c.cpu)  # spins on itself until the run is stopped
    return "SCAN_SUCCEED"
