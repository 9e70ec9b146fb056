"""Remove ptlab shared memory that nobody will unlink: one node's /dev/shm, run on that node.

A run's machine lives in POSIX shared memory segments named ``ptlab.<pid>.<token>.<segment>``
(``<pid>`` is the process that created the machine, ``<token>`` is unique per run); named
semaphores, where used, appear as ``sem.ptlab.…``.  The kernel never frees them on its own: a
segment outlives a creator that was SIGKILLed, and a sweep that is interrupted kills its cell
processes with SIGKILL.  So the sweep driver runs :func:`sweep_shm` on every alive node when it
ends (normally or by Ctrl-C).

An entry is removed when its creator pid is dead (no such process, or a zombie), or when it
belongs to the sweep: its token contains one of the sweep's run ids, or its pid is one of the
sweep's cell processes (given by the driver once those processes are known to be idle).  Live
runs of other users or other sweeps are never touched.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path

SHM_DIR = Path("/dev/shm")
PREFIX = "ptlab."


def pid_alive(pid: int) -> bool:
    """True when ``pid`` names a live (non-zombie) process on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # the state letter follows the ")" that closes the command name
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def parse_name(name: str) -> tuple[int, str] | None:
    """``ptlab.<pid>.<token>.<segment>`` (optionally behind ``sem.``) → (pid, token)."""
    base = name[4:] if name.startswith("sem.") else name
    if not base.startswith(PREFIX):
        return None
    parts = base.split(".")
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    return int(parts[1]), (parts[2] if len(parts) > 2 else "")


def sweep_shm(
    tokens: Collection[str] = (),
    pids: Collection[int] = (),
    shm_dir: str | os.PathLike[str] = SHM_DIR,
) -> list[str]:
    """Unlink stale ptlab entries in ``shm_dir``; returns the names removed (sorted).

    ``tokens``: run ids of the sweep (an entry whose token contains one is the sweep's);
    ``pids``: creator pids of the sweep's finished cells.  Never raises for a vanished entry.
    """
    shm_dir = Path(shm_dir)
    if not shm_dir.is_dir():
        return []
    token_set = {t for t in tokens if t}
    pid_set = set(pids)
    removed = []
    for entry in shm_dir.iterdir():
        parsed = parse_name(entry.name)
        if parsed is None:
            continue
        pid, token = parsed
        ours = pid in pid_set or any(t in token for t in token_set)
        if not ours and pid_alive(pid):
            continue
        try:
            entry.unlink()
        except FileNotFoundError:
            continue
        except OSError:
            continue  # not ours to remove (permissions): leave it, report nothing
        removed.append(entry.name)
    return sorted(removed)
