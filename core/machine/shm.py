"""Shared-memory segments of one simulated machine, under one run namespace.

Every segment of a run is named ``/ptlab.<creator pid>.<token>.<segment>``: the creator's pid
lets a later start-up sweep tell a dead run's leftovers from a live run's segments, and the
token keeps two runs of one process apart.  The creator unlinks everything in ``close()``
(called from ``finally`` and from signal handlers); attaching processes only unmap.

Each process maps a segment at its own address, so the machine stores offsets, never pointers.
A segment is exposed three ways: the raw ``mmap``, a ``Region`` (atomic words, futexes,
spinlocks from the C extension) and numpy views made on demand for vectorised range work.
Views must be dropped before the mmap can close (``BufferError`` otherwise), so every view is
created through ``Segment.view`` and released in ``Segment.close``.
"""

from __future__ import annotations

import mmap
import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import posix_ipc
from ptlab.core.machine._prims import Region

PREFIX = "ptlab."
SHM_DIR = Path("/dev/shm")


class Segment:
    """One named shared-memory segment, mapped in this process."""

    def __init__(self, name: str, size: int, create: bool) -> None:
        self.name = name
        self.size = size
        flags = posix_ipc.O_CREX if create else 0
        shm = posix_ipc.SharedMemory("/" + name, flags, mode=0o600, size=size if create else 0)
        try:
            if not create and shm.size < size:
                raise ValueError(f"segment {name} is {shm.size} bytes, expected {size}")
            self.mmap = mmap.mmap(shm.fd, size)
        finally:
            shm.close_fd()
        self.region = Region(self.mmap)
        self._views: list[np.ndarray] = []

    def view(self, dtype: type | str, offset: int = 0, count: int = -1) -> np.ndarray:
        """A numpy view of ``count`` items of ``dtype`` from byte ``offset`` (all when -1)."""
        v = np.frombuffer(self.mmap, dtype=dtype, count=count, offset=offset)
        self._views.append(v)
        return v

    def close(self) -> None:
        self._views.clear()
        self.region.close()
        try:
            self.mmap.close()
        except BufferError:
            # A view escaped: leave the mapping to the process's exit; the name is unlinked anyway.
            pass


class Namespace:
    """All segments of one machine.  ``Namespace.create`` makes them, ``attach`` maps them in
    another process by name, ``close`` unmaps and (for the creator) unlinks."""

    def __init__(self, prefix: str, sizes: Mapping[str, int], create: bool) -> None:
        self.prefix = prefix
        self.sizes = dict(sizes)
        self.creator = create
        self.segments: dict[str, Segment] = {}
        try:
            for seg, size in self.sizes.items():
                self.segments[seg] = Segment(f"{prefix}.{seg}", size, create)
        except BaseException:
            self.close()
            raise

    @classmethod
    def create(cls, sizes: Mapping[str, int], token: str | None = None) -> Namespace:
        sweep_stale()
        prefix = f"{PREFIX}{os.getpid()}.{token or secrets.token_hex(4)}"
        return cls(prefix, sizes, create=True)

    @classmethod
    def attach(cls, prefix: str, sizes: Mapping[str, int]) -> Namespace:
        return cls(prefix, sizes, create=False)

    def __getitem__(self, seg: str) -> Segment:
        return self.segments[seg]

    def close(self) -> None:
        for seg in self.segments.values():
            seg.close()
        if self.creator:
            unlink_prefix(self.prefix, self.sizes)
        self.segments.clear()

    def __enter__(self) -> Namespace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def unlink_prefix(prefix: str, names: Iterable[str] | None = None) -> int:
    """Unlink every segment of a run; returns how many were removed."""
    removed = 0
    if names is None:
        names = [p.name[len(prefix) + 1 :] for p in _entries() if p.name.startswith(prefix + ".")]
    for seg in names:
        try:
            posix_ipc.unlink_shared_memory(f"/{prefix}.{seg}")
            removed += 1
        except posix_ipc.ExistentialError:
            pass
    return removed


def _entries() -> list[Path]:
    try:
        return [p for p in SHM_DIR.iterdir() if p.name.startswith(PREFIX)]
    except FileNotFoundError:
        return []


def pid_alive(pid: int) -> bool:
    """Whether a process exists (a zombie counts as alive until reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(only_dead: bool = True) -> list[str]:
    """Unlink segments of runs whose creator process is gone; returns the names removed."""
    removed = []
    for p in _entries():
        parts = p.name.split(".")
        try:
            pid = int(parts[1])
        except (IndexError, ValueError):
            continue
        if only_dead and pid_alive(pid):
            continue
        try:
            posix_ipc.unlink_shared_memory("/" + p.name)
            removed.append(p.name)
        except posix_ipc.ExistentialError:
            pass
    return removed
