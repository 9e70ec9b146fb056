"""Host fingerprint: what machine a result came from, and whether two results may be compared.

Spin times, wake-up latencies and copy speeds depend on the CPU, on how many cores there are
and on the kernel's scheduler, so every result file records the host it ran on (pyperf's
``_CHECKED_METADATA`` does the same for benchmarks).  Comparing runs from hosts that differ in
a *critical* key -- CPU model, number of cores, kernel release -- mixes the machine's effect
into the strategy's, so ``ptlab compare`` refuses it unless forced.

A fingerprint is a plain ``dict`` (it is stored as JSON in the file metadata):

  hostname, cpu_model, cores (logical CPUs online), cores_usable (in this process's affinity
  mask), machine (``x86_64``, ``aarch64``), kernel_release (``uname -r``), kernel_version
  (``uname -v``), os, python, python_impl, packages {ray, numpy, pyarrow, scipy, ptlab},
  git_revision and git_dirty (None when the project is not a git checkout or git is missing).

The run code adds ``simulated_cpus``, ``oversubscription`` (simulated CPUs per usable core)
and ``node_id`` (the Ray node that ran it) -- pass them to :func:`fingerprint`.
"""

from __future__ import annotations

import functools
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from ptlab.core.machine.errors import ConfigError

# Keys whose difference makes two results incomparable (pyperf: _CHECKED_METADATA).
CRITICAL_KEYS: tuple[str, ...] = ("cpu_model", "cores", "kernel_release")

# Packages whose versions go into every fingerprint.  Looked up in the installed
# distributions' metadata, never imported (importing ray alone takes a second).
PACKAGES: tuple[str, ...] = ("ray", "numpy", "pyarrow", "scipy", "ptlab")

_PROJECT_DIR = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    """The CPU model string from /proc/cpuinfo (x86 ``model name``; arm64 ``CPU part`` etc.),
    falling back to ``platform.processor()`` or the machine type."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    for key in ("model name", "hardware", "processor name", "cpu model", "uarch"):
        if fields.get(key):
            return fields[key]
    if fields.get("cpu implementer") and fields.get("cpu part"):
        return f"arm implementer {fields['cpu implementer']} part {fields['cpu part']}"
    return platform.processor() or platform.machine() or "unknown"


def _package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(_PROJECT_DIR), *args],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None  # git missing, not a checkout, or hung: the fingerprint just says None
    return out.stdout.strip()


def git_revision() -> tuple[str | None, bool | None]:
    """(commit hash, working tree has uncommitted changes to tracked files); (None, None)
    when the project is not a git checkout or git is not installed.  Never raises."""
    rev = _git("rev-parse", "HEAD")
    if not rev:
        return None, None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return rev, (bool(status) if status is not None else None)


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@functools.lru_cache(maxsize=1)
def _static_fingerprint() -> dict[str, Any]:
    rev, dirty = git_revision()
    return {
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cores": os.cpu_count() or 1,
        "cores_usable": _usable_cores(),
        "machine": platform.machine(),
        "kernel_release": platform.release(),
        "kernel_version": platform.version(),
        "os": platform.system(),
        "python": platform.python_version(),
        "python_impl": sys.implementation.name,
        "packages": _package_versions(),
        "git_revision": rev,
        "git_dirty": dirty,
    }


def fingerprint(*, simulated_cpus: int | None = None, node_id: str | None = None) -> dict[str, Any]:
    """This host's fingerprint (a fresh dict, JSON-serialisable).

    With ``simulated_cpus`` it also records ``oversubscription``: simulated CPUs per usable
    core (above 1.0 spinning CPUs get preempted while holding locks, which inflates spin
    times).  The static part is computed once per process.
    """
    fp = dict(_static_fingerprint())
    fp["packages"] = dict(fp["packages"])
    if simulated_cpus is not None:
        fp["simulated_cpus"] = int(simulated_cpus)
        fp["oversubscription"] = round(simulated_cpus / max(1, fp["cores_usable"]), 3)
    if node_id is not None:
        fp["node_id"] = node_id
    return fp


@dataclass(frozen=True)
class HostMismatch:
    """One critical key that differs between two fingerprints."""

    key: str
    left: Any
    right: Any
    left_source: str = ""
    right_source: str = ""

    def __str__(self) -> str:
        ls = f" in {self.left_source}" if self.left_source else ""
        rs = f" in {self.right_source}" if self.right_source else ""
        return f"{self.key} differs ({self.left!r}{ls} vs {self.right!r}{rs})"


def incompatibilities(
    a: Mapping[str, Any], b: Mapping[str, Any], *, keys: Sequence[str] = CRITICAL_KEYS
) -> list[HostMismatch]:
    """The critical keys whose values differ between fingerprints ``a`` and ``b``.

    A key missing from either fingerprint (a file written before the key existed) is not
    counted as a difference: nothing is known about it.
    """
    out = []
    for key in keys:
        if key in a and key in b and a[key] is not None and b[key] is not None and a[key] != b[key]:
            out.append(HostMismatch(key, a[key], b[key]))
    return out


class IncompatibleHostsError(ConfigError):
    """Results from hosts that differ in a critical key were about to be compared."""

    def __init__(self, mismatches: Sequence[HostMismatch]) -> None:
        self.mismatches = tuple(mismatches)
        first = self.mismatches[0]
        more = f" (and {len(self.mismatches) - 1} more)" if len(self.mismatches) > 1 else ""
        super().__init__(
            f"results come from incompatible hosts: {first}{more}; timings from different "
            f"machines are not comparable -- pass --force to compare them anyway"
        )


def check_compatible(
    hosts: Sequence[tuple[str, Mapping[str, Any]]], *, force: bool = False
) -> list[HostMismatch]:
    """Check that every fingerprint is compatible with the first one.

    ``hosts`` is a list of (source label, fingerprint), e.g. (file name, meta["host"]).
    Returns the mismatches (one per key and differing pair of values).  Raises
    IncompatibleHostsError if there are any and ``force`` is False.
    """
    if not hosts:
        return []
    ref_src, ref = hosts[0]
    seen: set[tuple[str, str, str]] = set()
    found: list[HostMismatch] = []
    for src, fp in hosts[1:]:
        for m in incompatibilities(ref, fp):
            sig = (m.key, repr(m.left), repr(m.right))
            if sig in seen:
                continue
            seen.add(sig)
            found.append(HostMismatch(m.key, m.left, m.right, ref_src, src))
    if found and not force:
        raise IncompatibleHostsError(found)
    return found
