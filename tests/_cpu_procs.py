"""Find the simulated CPU processes of one particular run, from the run's own shared memory.

A run's segments are named ``ptlab.<creator pid>.<token>.<segment>``; every CPU writes its
pid into its slot (``CPU_PID``) and counts its operations (``CPU_PROGRESS``).  Reading them
from there names exactly the run's own actors -- never another test's or another user's
CpuActor on the same host.
"""

from __future__ import annotations

from pathlib import Path

from ptlab.core.machine.config import RunConfig
from ptlab.core.machine.layout import CPU_PID, CPU_PROGRESS
from ptlab.core.machine.mm import Machine
from ptlab.core.machine.shm import pid_alive

SHM = Path("/dev/shm")


def run_prefixes(creator_pid: int) -> list[str]:
    """``ptlab.<pid>.<token>`` of every machine the process ``creator_pid`` has in /dev/shm."""
    out = set()
    for p in SHM.iterdir():
        parts = p.name.split(".")
        if len(parts) >= 4 and parts[0] == "ptlab" and parts[1] == str(creator_pid):
            out.add(".".join(parts[:3]))
    return sorted(out)


def cpu_states(prefix: str, config: RunConfig) -> list[tuple[int, int]] | None:
    """(pid, operations done) of each simulated CPU of the machine ``prefix`` (built for
    ``config``), or None while it cannot be attached (being created or already gone)."""
    try:
        m = Machine.attach(config, prefix)
    except Exception:
        return None
    try:
        return [(m.ctl.load64(m.L.cpu(i) + CPU_PID), m.ctl.load64(m.L.cpu(i) + CPU_PROGRESS))
                for i in range(config.nr_cpus)]
    finally:
        m.close()


def is_cpu_actor(pid: int) -> bool:
    """The process is alive and is a Ray worker (a CpuActor runs in one)."""
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"ray" in cmd.lower() or b"CpuActor" in cmd


def alive(pid: int) -> bool:
    """pid_alive(), except that a zombie is not alive."""
    if not pid_alive(pid):
        return False
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
