"""Shared test fixtures: /dev/shm must be left as found; one embedded Ray per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHM = Path("/dev/shm")


def _ours(pid: int) -> bool:
    """A segment is this session's when its creator is this process, a descendant of it, or
    already gone (a leak); live processes of other sessions on the host are not ours."""
    me = os.getpid()
    while pid > 1:
        if pid == me:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return True
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return False


def _ptlab_shm() -> set[str]:
    if not SHM.exists():
        return set()
    out = set()
    for p in SHM.iterdir():
        if "ptlab" not in p.name:
            continue
        parts = p.name.split(".")
        pid = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else -1
        if pid < 0 or _ours(pid):
            out.add(p.name)
    return out


@pytest.fixture(autouse=True)
def shm_clean():
    """Every test leaves /dev/shm as it found it (no ptlab segment or semaphore leaks)."""
    before = _ptlab_shm()
    yield
    leaked = _ptlab_shm() - before
    assert not leaked, f"test left shared memory behind: {sorted(leaked)}"


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray instance for the whole session, bound to a loopback address."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=max(2, os.cpu_count() or 2),
            object_store_memory=256 * 1024 * 1024,
            include_dashboard=False,
            _node_ip_address=os.environ.get("PTLAB_TEST_RAY_IP", "127.0.0.2"),
            log_to_driver=False,
        )
    yield ray
    ray.shutdown()
