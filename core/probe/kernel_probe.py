"""The live host kernel's MADV_COLLAPSE, measured under load and written in ptlab's schema.

Why: a simulator is only believed when it is held against the real thing, and the host kernel
already runs strategy ``pmd-clear``: ``madvise(MADV_COLLAPSE)`` (Linux >= 6.1) goes through
``madvise_collapse()`` -> ``collapse_huge_page()`` -- mmap_lock for write, ``vma_start_write``,
PMD cleared and flushed, 512 pages copied, new PMD installed (kernel-brief.md §1.3).  Per §1.7
a fault in the collapsing VMA then falls back from its per-VMA lock to ``mmap_read_lock`` and
sleeps for the whole copy, a fault in another VMA does not, and every mmap()/munmap() waits.
This module measures exactly those relations on the host so that ``ptlab fidelity`` can say
whether the simulation reproduces them, and by what dilation.

How (the timing loops are C threads in ``ptlab.core.probe._kprobe``; no Python runs in them):

  thread       role        op                vma  what it does
  collapser    khugepaged  collapse          0    MADV_COLLAPSE over N PMD-aligned 2 MiB ranges
                                                  in turn, re-splitting each range afterwards
  fault-same   app         zap, fault        0    MADV_DONTNEED a random run of pages (zap),
                                                  then time the touch that faults each back in
  fault-other  app         zap, fault        1    the same in a second VMA of the process
  mmap         mmap        mmap, munmap      -1   mmap()+touch+munmap() of a small mapping
  pin          gup-fast    dma               0    O_DIRECT read into a random page: the page is
                                                  pinned (FOLL_PIN) for the I/O, so a collapse
                                                  that meets it fails with EAGAIN

Two phases run back to back in one invocation, with identical load: ``baseline`` (collapser
idle: the thread is not started) and ``loaded`` (collapser running).  Each phase is written to
its own file, ``<run_id>-baseline.arrow`` and ``<run_id>-loaded.arrow``; each file's metadata
says which phase it holds (``params.phase``, ``params.loaded``) and names its sibling
(``params.files``), so ``fidelity`` given the loaded file finds the baseline by itself.

Columns (ptlab.core.analysis.results): strategy ``kernel-madv-collapse``; ``cpu`` the core the thread
was pinned to (-1 when not pinned); ``result`` ``SCAN_SUCCEED`` for a collapse that returned
0, else the errno name (``EAGAIN``: a pin, a locked or not-yet-LRU page; ``EBUSY``; ``ENOMEM``:
no huge page could be allocated; ``EINVAL``); other ops carry "" or their errno name;
``order`` 9 for collapses, 0 otherwise; ``addr`` the byte offset in its VMA;
``during_collapse`` whether the event *started* while a MADV_COLLAPSE call was in flight
(from the recorded collapse intervals, warm-up included).  ``sleep_ns`` is the time the thread
was off its CPU during the timed call when it switched out voluntarily (it blocked: on
mmap_lock, on I/O), and ``waited_on`` says ``sleep`` for those, ``preempted`` when the
scheduler took the core away (runnable, not blocked), "" otherwise.  ``spin_ns`` is 0: user
space cannot see the kernel's spinning.

Placement: with at least as many cores (in this process's affinity mask) as threads, each
thread is pinned to a core of its own.  With fewer, the collapser keeps the first core to
itself and the load threads share the others, round robin (on one core, all share it).  The
load threads must not share the collapser's core: a thread there runs only while the
collapser does not, so it would never be *in* a collapse and could never be stalled by one.
``params.pinning`` records the placement and the oversubscription (threads per core).

The load threads run under SCHED_IDLE (``idle_load``).  The reason is in the kernel: every
MADV_COLLAPSE starts with ``lru_add_drain_all()`` -- under mmap_read_lock, since madvise()
takes it for MADV_COLLAPSE -- which queues work on each CPU holding pages in its per-CPU LRU
batches (every CPU that just faulted) and sleeps until those kworkers have run.  Busy loops
at normal priority on the load core keep that kworker waiting for their time slice.  On the
2-core development VM, three 2 s runs each: at normal priority 25-650 collapses with medians
of 0.27-28 ms, and sampled kernel stacks (/proc/<tid>/stack) showed the collapser waiting in
``__flush_work`` under ``lru_add_drain_all`` most of the time -- the scheduler, not the
collapse; under SCHED_IDLE, which yields to the kworker at once, 2,000-2,200 collapses with
medians of 0.16-0.21 ms.  The drain remains part of every collapse time here (MADV_COLLAPSE
drains per call; khugepaged once per scan pass), and so do its rarer long waits.

Fault threads zap a run of ``zap_pages`` (64) pages with one MADV_DONTNEED and then time the
fault of each page.  With one page per zap, the zap -- which waits for the collapse's locks
too and costs more than a fault -- would be what meets the collapse's ``vma_start_write()``,
and the faults would rarely be; with 64, faults fill about nine tenths of the thread's time.  The
collapser idles ``gap_us`` (200 µs, about one collapse) after each call, so the loaded phase
also has time with no collapse in flight (its "no collapse" events).  Note that a fault
blocked by a collapse is one event however long it waits, while a free-running thread makes
hundreds of fast faults meanwhile: blocked faults are a small share of the events, and show
in p99/p99.9, not in the median.

Nothing under /sys is ever written: THP settings are read and recorded, never changed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno as errno_mod
import math
import mmap
import os
import platform
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from ptlab.core.analysis.compare import latency_quantiles_us
from ptlab.core.analysis.host import fingerprint, incompatibilities
from ptlab.core.analysis.results import RunResult, read_run, write_run
from ptlab.core.machine.errors import ConfigError

STRATEGY = "kernel-madv-collapse"
KIND = "kernel"
PHASES = ("baseline", "loaded")
THP_DIR = Path("/sys/kernel/mm/transparent_hugepage")
MIN_KERNEL = (6, 1)  # "mm/madvise: introduce MADV_COLLAPSE sync hugepage collapse"
PAGE_SIZE = 4096
PMD_SIZE = 2 << 20
HPAGE_PMD_ORDER = 9
VMA_COLLAPSING, VMA_OTHER = 0, 1
PIN_FILE_BYTES = 1 << 20
SUCCEED = "SCAN_SUCCEED"

# One C event record (struct kp_event in core/probe/_kprobe.c; 32 bytes).
EVENT_DTYPE = np.dtype(
    [("t", "<i8"), ("lat", "<i8"), ("sleep", "<i8"), ("aux", "<i4"), ("err", "<i2"),
     ("op", "u1"), ("flags", "u1")]
)
OPS = ("collapse", "fault", "mmap", "munmap", "dma", "zap")  # index = enum kp_op
FLAG_VOLUNTARY, FLAG_INVOLUNTARY = 1, 2


@dataclass(frozen=True)
class ThreadKind:
    """One probe thread: its schema role, the VMA it works on, and how many events per second
    of phase to preallocate room for (generous: untouched buffer pages cost nothing)."""

    name: str
    role: str
    vma: int
    events_per_s: int


THREADS: tuple[ThreadKind, ...] = (  # the order of enum kp_kind
    ThreadKind("collapser", "khugepaged", VMA_COLLAPSING, 20_000),
    ThreadKind("fault-same", "app", VMA_COLLAPSING, 400_000),
    ThreadKind("fault-other", "app", VMA_OTHER, 400_000),
    ThreadKind("mmap", "mmap", -1, 400_000),
    ThreadKind("pin", "gup-fast", VMA_COLLAPSING, 100_000),
)
_KIND_INDEX = {k.name: i for i, k in enumerate(THREADS)}


@dataclass(frozen=True)
class ProbeConfig:
    """Parameters of one ``ptlab kernel`` invocation.  Units: seconds for durations and
    warm-up, µs for the gap after each collapse, KiB for the churned mapping, 2 MiB ranges."""

    duration_s: float = 10.0
    ranges: int = 8
    pin: bool = True
    warmup_s: float = 0.5
    gap_us: int = 200
    churn_kib: int = 64
    zap_pages: int = 64  # pages per MADV_DONTNEED in the fault threads (see the header)
    idle_load: bool = True  # load threads run under SCHED_IDLE (see the header)
    seed: int = 0
    pin_dir: str | None = None  # where the O_DIRECT file goes; None: the temp directory

    def __post_init__(self) -> None:
        if not (isinstance(self.duration_s, (int, float)) and 0 < self.duration_s <= 3600):
            raise ConfigError(f"--duration must be in (0, 3600] seconds (got {self.duration_s})")
        if not 1 <= self.ranges <= 1024:
            raise ConfigError(f"--ranges must be in 1..1024 PMD ranges of 2 MiB (got {self.ranges})")
        if not 0 <= self.warmup_s <= 60:
            raise ConfigError(f"warm-up must be in 0..60 s (got {self.warmup_s})")
        if not 0 <= self.gap_us <= 1_000_000:
            raise ConfigError(f"--gap-us must be in 0..1000000 µs (got {self.gap_us})")
        if self.churn_kib < 4 or self.churn_kib % 4 or self.churn_kib > 1 << 20:
            raise ConfigError(
                f"the churned mapping must be a multiple of 4 KiB between 4 KiB and 1 GiB "
                f"(got {self.churn_kib} KiB)"
            )
        if self.zap_pages < 1 or 512 % self.zap_pages:
            raise ConfigError(f"--zap-pages must divide 512 (1, 2, 4, ..., 512; got {self.zap_pages})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class KernelRun:
    """What ``run_probe`` wrote: one file per phase, and per phase its summary and params."""

    run_id: str
    files: dict[str, Path]
    summaries: dict[str, dict[str, Any]]
    params: dict[str, dict[str, Any]]
    host: dict[str, Any]

    @property
    def baseline(self) -> Path:
        return self.files["baseline"]

    @property
    def loaded(self) -> Path:
        return self.files["loaded"]


# --------------------------------------------------------------------------------------------
# the host: what it is, and whether it can collapse


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _selected(text: str | None) -> str | None:
    """The bracketed choice of a sysfs selector ("always [madvise] never" -> "madvise")."""
    if text is None:
        return None
    if "[" in text and "]" in text:
        return text[text.index("[") + 1 : text.index("]")]
    return text


def thp_settings(thp_dir: Path = THP_DIR) -> dict[str, Any]:
    """The THP sysfs settings, read (never written): enabled, defrag, shmem_enabled,
    hpage_pmd_size (bytes), the khugepaged tunables, and each mTHP size's ``enabled``
    (None where the size directory has no ``enabled`` file)."""
    out: dict[str, Any] = {
        "enabled": _selected(_read_text(thp_dir / "enabled")),
        "defrag": _selected(_read_text(thp_dir / "defrag")),
        "shmem_enabled": _selected(_read_text(thp_dir / "shmem_enabled")),
    }
    pmd = _read_text(thp_dir / "hpage_pmd_size")
    out["hpage_pmd_size"] = int(pmd) if pmd and pmd.isdigit() else None
    khugepaged: dict[str, Any] = {}
    for name in ("max_ptes_none", "max_ptes_swap", "max_ptes_shared", "pages_to_scan",
                 "scan_sleep_millisecs", "alloc_sleep_millisecs", "defrag"):
        v = _read_text(thp_dir / "khugepaged" / name)
        khugepaged[name] = int(v) if v is not None and v.lstrip("-").isdigit() else v
    out["khugepaged"] = khugepaged
    mthp: dict[str, str | None] = {}
    if thp_dir.is_dir():
        sizes = [p for p in thp_dir.iterdir() if p.name.startswith("hugepages-")]
        for p in sorted(sizes, key=lambda p: int("".join(c for c in p.name if c.isdigit()) or 0)):
            mthp[p.name.removeprefix("hugepages-")] = _selected(_read_text(p / "enabled"))
    out["mthp"] = mthp
    return out


def _counters() -> dict[str, int]:
    """System-wide THP counters (/proc/vmstat and khugepaged's), to show per phase what the
    kernel did -- including background khugepaged collapses that the probe did not ask for."""
    out: dict[str, int] = {}
    try:
        for line in Path("/proc/vmstat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key in ("thp_collapse_alloc", "thp_collapse_alloc_failed", "thp_split_pmd",
                       "thp_deferred_split_page", "thp_fault_alloc"):
                out[key] = int(value)
    except OSError:
        pass
    for name in ("pages_collapsed", "full_scans"):
        v = _read_text(THP_DIR / "khugepaged" / name)
        if v is not None and v.isdigit():
            out[f"khugepaged_{name}"] = int(v)
    return out


def _kernel_version(release: str) -> tuple[int, int] | None:
    parts = release.split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return None


def check_host(
    *,
    system: str | None = None,
    release: str | None = None,
    thp_dir: Path = THP_DIR,
    collapse_check: Callable[[], Mapping[str, int]] | None = None,
) -> dict[str, Any]:
    """Refuse, with one line that says what to do, a host where MADV_COLLAPSE cannot be
    measured: not Linux, Linux older than 6.1, no THP, THP set to ``never``, pages other than
    4 KiB, THP disabled for this process by prctl, or a kernel that answers EINVAL to a
    MADV_COLLAPSE on a valid range.  Returns the THP settings and the check's result.

    The keyword arguments stand in for the host (tests).  Raises ConfigError.
    """
    system = platform.system() if system is None else system
    release = platform.release() if release is None else release
    if system != "Linux":
        raise ConfigError(
            f"ptlab kernel measures the Linux kernel's MADV_COLLAPSE and this host runs {system}; "
            f"run it on Linux {MIN_KERNEL[0]}.{MIN_KERNEL[1]} or newer"
        )
    version = _kernel_version(release)
    if version is not None and version < MIN_KERNEL:
        raise ConfigError(
            f"kernel {release} has no MADV_COLLAPSE (it came in Linux "
            f"{MIN_KERNEL[0]}.{MIN_KERNEL[1]}); run ptlab kernel on a newer kernel"
        )
    if not (thp_dir / "enabled").exists():
        raise ConfigError(
            f"kernel {release} has no transparent hugepages ({thp_dir}/enabled is missing: built "
            f"without CONFIG_TRANSPARENT_HUGEPAGE); nothing to collapse"
        )
    thp = thp_settings(thp_dir)
    if thp["enabled"] == "never":
        raise ConfigError(
            f"transparent hugepages are disabled ({thp_dir}/enabled is 'never') and ptlab never "
            f"changes /sys; as root run `echo madvise > {thp_dir}/enabled`, then try again"
        )
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else PAGE_SIZE
    if page != PAGE_SIZE or thp["hpage_pmd_size"] not in (None, PMD_SIZE):
        raise ConfigError(
            f"ptlab kernel needs 4 KiB pages and 2 MiB PMD hugepages; this kernel has {page}-byte "
            f"pages and {thp['hpage_pmd_size']}-byte PMD hugepages"
        )
    if collapse_check is None:
        from ptlab.core.probe import _kprobe

        collapse_check = _kprobe.collapse_check
    check = dict(collapse_check())
    if check.get("hugepage_errno"):
        name = errno_mod.errorcode.get(check["hugepage_errno"], str(check["hugepage_errno"]))
        raise ConfigError(f"madvise(MADV_HUGEPAGE) fails on this kernel ({name}); THP cannot be used here")
    if check.get("collapse_errno") == errno_mod.EINVAL and check.get("thp_disable"):
        raise ConfigError(
            "madvise(MADV_COLLAPSE) fails with EINVAL because THP is disabled for this process "
            "(prctl PR_SET_THP_DISABLE, inherited from its parent); start ptlab from a shell "
            "without it"
        )
    if check.get("collapse_errno") == errno_mod.EINVAL:
        raise ConfigError(
            f"madvise(MADV_COLLAPSE) on a valid 2 MiB range failed with EINVAL: kernel {release} "
            f"does not support MADV_COLLAPSE (Linux >= 6.1 with CONFIG_TRANSPARENT_HUGEPAGE)"
        )
    return {"thp": thp, "collapse_check": check, "page_size": page}


# --------------------------------------------------------------------------------------------
# placement and the pin source


def placement(cores: Sequence[int], kinds: Sequence[str]) -> dict[str, int]:
    """The core each probe thread is pinned to (see the module header); -1 when the process
    may run nowhere we know of.  ``kinds`` lists the threads, collapser first."""
    cores = list(cores)
    if not cores:
        return {k: -1 for k in kinds}
    if len(cores) >= len(kinds):
        return dict(zip(kinds, cores[: len(kinds)], strict=True))
    load = cores[1:] or cores[:1]
    return {k: cores[0] if i == 0 else load[(i - 1) % len(load)] for i, k in enumerate(kinds)}


def sim_placement(params: Mapping[str, Any], config: Any) -> str:
    """``--placement`` for a simulated run of ``config`` that puts each simulated CPU where the
    kernel run (its metadata ``params``) ran the thread of the same role: the collapser's core
    for khugepaged, fault-same's for the app CPUs of the collapsing VMA (even ids, as
    ``--workload refault`` assigns them), fault-other's for the odd ones, mmap's and pin's
    (gup-fast) for theirs, SCHED_IDLE where the thread was.  Raises ConfigError when the run
    has a role the kernel run had no thread for."""
    from ptlab.core.kernel.roles import assign_roles

    threads = params.get("threads") or {}
    if not threads:
        raise ConfigError("the kernel result records no thread placement (params.threads); make it again with `ptlab kernel`")
    items = []
    for i, role in enumerate(assign_roles(config)):
        kind = {"khugepaged": "collapser", "mmap": "mmap", "gup-fast": "pin"}.get(role)
        if role == "app":
            kind = "fault-other" if i % 2 else "fault-same"
        th = threads.get(kind or "")
        if th is None:
            raise ConfigError(f"--placement from a kernel run: CPU {i} runs {role}, and the kernel run had no such thread "
                              f"(it ran {', '.join(sorted(threads))}); give --placement CORE[:idle],... instead")
        if th.get("pinned") is False or int(th.get("cpu", -1)) < 0:
            raise ConfigError(f"--placement from a kernel run: its {kind} thread was not pinned to a core (it ran where "
                              f"the host's scheduler put it); give --placement CORE[:idle],... instead")
        core = int(th["cpu"])
        items.append(f"{core}:idle" if th.get("sched_idle") else str(core))
    return ",".join(items)


@dataclass(frozen=True)
class PinSource:
    """Where the pin thread reads from: an O_DIRECT file descriptor (-1: no pin thread)."""

    fd: int
    pages: int
    reason: str  # why pins are off, or how they are made
    directory: str | None = None
    fstype: str | None = None


def _fstype(path: str) -> str | None:
    """The file system type of the mount holding ``path`` (from /proc/self/mounts)."""
    real = os.path.realpath(path)
    best, best_type = "", None
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, best_type = mnt, parts[2]
    return best_type


@contextlib.contextmanager
def pin_source(enabled: bool, directory: str | None = None) -> Iterator[PinSource]:
    """An unlinked temporary file opened with O_DIRECT, checked with one real read.

    O_DIRECT reads go straight from the device into the user page, which the block layer pins
    (FOLL_PIN) for the I/O.  Where that is impossible -- pins disabled, a file system without
    O_DIRECT, tmpfs (whose O_DIRECT copies through the page cache and pins nothing) -- yields
    fd -1 and the reason; the probe then runs without a pin thread.  Leaves no file behind.
    """
    if not enabled:
        yield PinSource(-1, 0, "off (--no-pin)")
        return
    d = directory or tempfile.gettempdir()
    fstype = _fstype(d)
    if fstype in ("tmpfs", "ramfs", "devtmpfs", "hugetlbfs"):
        yield PinSource(-1, 0, f"skipped: {d} is {fstype}, where O_DIRECT copies through the "
                               f"page cache and pins nothing", d, fstype)
        return
    if not hasattr(os, "O_DIRECT"):
        yield PinSource(-1, 0, "skipped: this platform has no O_DIRECT", d, fstype)
        return
    fd = -1
    try:
        wfd, path = tempfile.mkstemp(prefix="ptlab-kernel-pin-", dir=d)
        try:
            os.write(wfd, os.urandom(PIN_FILE_BYTES))
            os.fsync(wfd)
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        finally:
            os.close(wfd)
            os.unlink(path)
        buf = mmap.mmap(-1, PAGE_SIZE)  # page-aligned, as O_DIRECT wants
        try:
            got = os.preadv(fd, [buf], 0)
        finally:
            buf.close()
        if got != PAGE_SIZE:
            raise OSError(errno_mod.EIO, f"short O_DIRECT read ({got} bytes)")
    except OSError as e:
        if fd >= 0:
            os.close(fd)
        yield PinSource(-1, 0, f"skipped: O_DIRECT reads from {d} ({fstype}) fail: "
                               f"{errno_mod.errorcode.get(e.errno or 0, e.errno)} {e.strerror}",
                        d, fstype)
        return
    try:
        yield PinSource(fd, PIN_FILE_BYTES // PAGE_SIZE,
                        f"O_DIRECT reads from an unlinked file in {d} ({fstype})", d, fstype)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# running the phases


ProgressFn = Callable[[str, float, float], None]  # (phase, elapsed s, total s)


def _run_phase(
    config: ProbeConfig, *, collapse: bool, pin: PinSource, where: Mapping[str, int],
    progress: ProgressFn | None, phase: str,
) -> dict[str, Any]:
    """One phase in the C extension, called from a worker thread (it releases the GIL) while
    this thread reports progress; Ctrl-C ends the phase early through _kprobe.abort()."""
    from ptlab.core.probe import _kprobe

    total = config.warmup_s + config.duration_s
    places = [where.get(k.name, -1) for k in THREADS]
    capacity = [int(k.events_per_s * total) + 1024 for k in THREADS]
    args = (
        int(config.duration_s * 1e9), int(config.warmup_s * 1e9), config.ranges, int(collapse),
        pin.fd, pin.pages, places, capacity, config.seed, config.gap_us * 1000,
        config.churn_kib * 1024, config.zap_pages, config.idle_load,
    )
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["result"] = _kprobe.run_phase(*args)
        except BaseException as e:  # handed to the calling thread
            box["error"] = e

    worker = threading.Thread(target=work, name=f"ptlab-kernel-{phase}", daemon=True)
    t0 = time.monotonic()
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.1)
            if progress:
                progress(phase, min(time.monotonic() - t0, total), total)
    except BaseException:
        _kprobe.abort()
        worker.join()
        raise
    if "error" in box:
        err = box["error"]
        if isinstance(err, OSError):
            raise ConfigError(f"the probe could not set up its memory: {err.strerror or err}") from None
        raise err
    if progress:
        progress(phase, total, total)
    return box["result"]


def _errno_names(err: np.ndarray, ok: str) -> np.ndarray:
    out = np.full(len(err), ok, dtype=object)
    for code in np.unique(err):
        if code:
            out[err == code] = errno_mod.errorcode.get(int(code), f"E{int(code)}")
    return out


def collapse_mask(t_start: np.ndarray, c_start: np.ndarray, c_latency: np.ndarray) -> np.ndarray:
    """For each start time, whether it falls inside one of the collapse intervals
    [c_start, c_start + c_latency).  The intervals come from one thread, so they are disjoint;
    they need not be sorted."""
    if len(c_start) == 0:
        return np.zeros(len(t_start), dtype=bool)
    order = np.argsort(c_start, kind="stable")
    starts, ends = c_start[order], c_start[order] + c_latency[order]
    i = np.searchsorted(starts, t_start, side="right") - 1
    valid = i >= 0
    out = np.zeros(len(t_start), dtype=bool)
    out[valid] = t_start[valid] < ends[i[valid]]
    return out


def events_to_columns(raw: Mapping[str, Any], run_id: str) -> dict[str, Any]:
    """The C phase result -> event columns for results.write_run (warm-up events dropped,
    rows in start order)."""
    decoded = []
    for th in raw["threads"]:
        ev = np.frombuffer(th["events"] or b"", dtype=EVENT_DTYPE)
        decoded.append((THREADS[_KIND_INDEX[th["kind"]]], th, ev))
    coll = [ev for kind, _, ev in decoded if kind.name == "collapser"]
    c_ev = coll[0] if coll else np.zeros(0, dtype=EVENT_DTYPE)

    parts: dict[str, list[np.ndarray]] = {k: [] for k in (
        "cpu", "role", "op", "t_start_ns", "latency_ns", "sleep_ns", "waited_on", "result",
        "order", "vma", "addr", "during_collapse")}
    for kind, th, ev in decoded:
        during = collapse_mask(ev["t"], c_ev["t"], c_ev["lat"]) if kind.name != "collapser" \
            else np.zeros(len(ev), dtype=bool)
        keep = ev["t"] >= 0
        ev, during = ev[keep], during[keep]
        n = len(ev)
        ops = np.asarray(OPS, dtype=object)[ev["op"]]
        is_collapse = ev["op"] == OPS.index("collapse")
        result = _errno_names(ev["err"], "")
        result[is_collapse & (ev["err"] == 0)] = SUCCEED
        waited = np.full(n, "", dtype=object)
        waited[(ev["flags"] & FLAG_INVOLUNTARY) != 0] = "preempted"
        waited[(ev["flags"] & FLAG_VOLUNTARY) != 0] = "sleep"
        addr = np.where(is_collapse, ev["aux"].astype(np.int64) * PMD_SIZE,
                        ev["aux"].astype(np.int64) * PAGE_SIZE)
        addr[ev["aux"] < 0] = -1
        parts["cpu"].append(np.full(n, th["cpu"] if th["pinned"] else -1, dtype=np.int16))
        parts["role"].append(np.full(n, kind.role, dtype=object))
        parts["op"].append(ops)
        parts["t_start_ns"].append(ev["t"])
        parts["latency_ns"].append(ev["lat"])
        parts["sleep_ns"].append(ev["sleep"])
        parts["waited_on"].append(waited)
        parts["result"].append(result)
        parts["order"].append(np.where(is_collapse, HPAGE_PMD_ORDER, 0).astype(np.int8))
        parts["vma"].append(np.full(n, kind.vma, dtype=np.int16))
        parts["addr"].append(addr)
        parts["during_collapse"].append(during)
    cols = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
    order = np.argsort(cols["t_start_ns"], kind="stable")
    cols = {k: v[order] for k, v in cols.items()}
    n = len(order)
    cols["run_id"] = np.full(n, run_id, dtype=object)
    cols["strategy"] = np.full(n, STRATEGY, dtype=object)
    cols["spin_ns"] = np.zeros(n, dtype=np.int64)
    return cols


def _writable_dir(out_dir: Path) -> None:
    """Fail before measuring when results cannot be written; creates only the directory."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise ConfigError(f"cannot write results to {out_dir}: {e.strerror}; choose another --out") from None


def run_probe(
    config: ProbeConfig,
    out_dir: str | os.PathLike[str] = "results",
    *,
    progress: ProgressFn | None = None,
    host_check: Mapping[str, Any] | None = None,
) -> KernelRun:
    """Measure the host kernel's MADV_COLLAPSE: the baseline phase (collapser idle), then the
    loaded phase, each written to ``out_dir/<run_id>-<phase>.arrow``.

    ``progress(phase, elapsed_s, total_s)`` is called about ten times a second.  Raises
    ConfigError when the host cannot collapse (see check_host) or ``out_dir`` is not writable.
    """
    host_info = dict(host_check) if host_check is not None else check_host()
    out = Path(out_dir)
    _writable_dir(out)
    run_id = f"kernel-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(2)}"
    files = {p: f"{run_id}-{p}.arrow" for p in PHASES}
    cores = sorted(os.sched_getaffinity(0))
    written: dict[str, Path] = {}
    summaries: dict[str, dict[str, Any]] = {}
    all_params: dict[str, dict[str, Any]] = {}
    with pin_source(config.pin, config.pin_dir) as pin:
        kinds = [k.name for k in THREADS if k.name != "pin" or pin.fd >= 0]
        where = placement(cores, kinds)
        host = fingerprint(simulated_cpus=len(kinds))
        host.update(host_info)
        for phase in PHASES:
            loaded = phase == "loaded"
            running = [k for k in kinds if loaded or k != "collapser"]
            before = _counters()
            raw = _run_phase(config, collapse=loaded, pin=pin, where=where, progress=progress,
                             phase=phase)
            after = _counters()
            cols = events_to_columns(raw, f"{run_id}-{phase}")
            summary = summarize_columns(cols, config.duration_s)
            summary["overflow"] = {t["kind"]: int(t["overflow"]) for t in raw["threads"] if t["overflow"]}
            summary["kernel_counters"] = {k: after[k] - before[k] for k in after if k in before}
            ran = {t["kind"]: t for t in raw["threads"]}
            params = {
                "strategy": STRATEGY,
                "phase": phase,
                "loaded": loaded,
                "collapser": "active" if loaded else "idle",
                **config.to_dict(),
                "vma_bytes": config.ranges * PMD_SIZE,
                "threads": {
                    k: {"role": THREADS[_KIND_INDEX[k]].role, "vma": THREADS[_KIND_INDEX[k]].vma,
                        "cpu": where[k], "pinned": bool(ran[k]["pinned"]),
                        "sched_idle": bool(ran[k]["sched_idle"])}
                    for k in running
                },
                "pinning": {
                    "cores": cores,
                    "placement": {k: where[k] for k in running},
                    "threads": len(running),
                    "oversubscription": round(len(running) / max(1, len(cores)), 3),
                    "policy": "one core each" if len(cores) >= len(kinds)
                    else "collapser on a core of its own, load threads share the others",
                },
                "pin_source": {"enabled": pin.fd >= 0, "how": pin.reason,
                               "directory": pin.directory, "fstype": pin.fstype},
                "group": run_id,
                "files": files,
            }
            meta = {
                "kind": KIND,
                "run_id": f"{run_id}-{phase}",
                "params": params,
                "host": host,
                "calibration": {},
                "violations": [],
                "summary": summary,
            }
            written[phase] = write_run(out / files[phase], cols, meta)
            summaries[phase], all_params[phase] = summary, params
    return KernelRun(run_id=run_id, files=written, summaries=summaries, params=all_params, host=host)


# --------------------------------------------------------------------------------------------
# statistics over result files (kernel or simulated)


@dataclass(frozen=True)
class Events:
    """Numpy views of the columns that the summaries need (strings decoded once)."""

    role: np.ndarray
    op: np.ndarray
    vma: np.ndarray
    during: np.ndarray
    latency_ns: np.ndarray
    sleep_ns: np.ndarray
    result: np.ndarray
    order: np.ndarray

    @classmethod
    def from_columns(cls, cols: Mapping[str, Any]) -> Events:
        return cls(
            role=np.asarray(cols["role"], dtype=object), op=np.asarray(cols["op"], dtype=object),
            vma=np.asarray(cols["vma"]), during=np.asarray(cols["during_collapse"], dtype=bool),
            latency_ns=np.asarray(cols["latency_ns"]), sleep_ns=np.asarray(cols["sleep_ns"]),
            result=np.asarray(cols["result"], dtype=object), order=np.asarray(cols["order"]),
        )

    @classmethod
    def from_table(cls, table: pa.Table, strategy: str | None = None) -> Events:
        if strategy is not None:
            strat = _strings(table, "strategy")
            table = table.filter(pa.array(strat == strategy))

        def num(name: str, fill: Any) -> np.ndarray:
            return pc.fill_null(table.column(name), fill).to_numpy()

        return cls(
            role=_strings(table, "role"), op=_strings(table, "op"), vma=num("vma", -1),
            during=num("during_collapse", False), latency_ns=num("latency_ns", 0),
            sleep_ns=num("sleep_ns", 0), result=_strings(table, "result"), order=num("order", 0),
        )

    def select(self, *, op: str, role: str | None = None, vma: str | None = None,
               during: bool | None = None) -> np.ndarray:
        """Mask of the events of ``op`` (and ``role``); vma "same" = 0, "other" = > 0;
        during: True/False restricts to events that started during / outside a collapse."""
        m = self.op == op
        if role is not None:
            m &= self.role == role
        if vma == "same":
            m &= self.vma == VMA_COLLAPSING
        elif vma == "other":
            m &= self.vma > VMA_COLLAPSING
        if during is not None:
            m &= self.during == during
        return m

    def lat(self, **sel: Any) -> np.ndarray:
        return self.latency_ns[self.select(**sel)]


def _strings(table: pa.Table, name: str) -> np.ndarray:
    """A dictionary-encoded string column as a numpy object array (decoded per dictionary
    entry, not per row)."""
    col = table.column(name)
    if col.num_chunks == 0:
        return np.zeros(0, dtype=object)
    arr = col.combine_chunks() if col.num_chunks > 1 else col.chunk(0)
    if pa.types.is_dictionary(arr.type):
        values = np.asarray(arr.dictionary.to_pylist() + [""], dtype=object)
        idx = arr.indices.fill_null(len(values) - 1).to_numpy(zero_copy_only=False)
        return values[idx]
    return np.asarray(arr.to_pylist(), dtype=object)


def sleep_per_collapse_us(ev: Events, sel: Mapping[str, Any]) -> float | None:
    """Time the selected events that started during a collapse spent asleep, summed and divided
    by the number of collapses, in µs.  Unlike a quantile over events it does not depend on how
    many events a thread makes per collapse (one blocked fault against hundreds of free ones in
    the kernel, a few in a slower simulation), so kernel and simulation compare directly."""
    n = int(ev.select(op="collapse").sum())
    if n == 0 or not ev.select(**sel).any():
        return None
    return float(ev.sleep_ns[ev.select(**sel, during=True)].sum()) / n / 1e3


def summarize(ev: Events, duration_s: float) -> dict[str, Any]:
    """Collapses (count, per second, success rate, result counts, p50/p99) and the latency of
    faults (same/other VMA), mmap() and pins, with and without a collapse in flight."""
    out: dict[str, Any] = {}
    c = ev.select(op="collapse")
    results, counts = np.unique(ev.result[c].astype(str), return_counts=True)
    ok = c & (ev.result == SUCCEED)
    out["collapse"] = {
        "count": int(c.sum()),
        "per_s": float(c.sum() / duration_s) if duration_s > 0 else None,
        "succeeded": int(ok.sum()),
        "success_rate": float(ok.sum() / c.sum()) if c.any() else None,
        "results": {str(r): int(n) for r, n in zip(results, counts, strict=True)},
        "succeeded_latency": latency_quantiles_us(ev.latency_ns[ok]),
        "latency": latency_quantiles_us(ev.latency_ns[c]),
    }
    rows: dict[str, dict[str, Any]] = {
        "fault_same": {"op": "fault", "vma": "same"}, "fault_other": {"op": "fault", "vma": "other"},
        "mmap": {"op": "mmap"}, "munmap": {"op": "munmap"}, "dma": {"op": "dma"},
    }
    for name, sel in rows.items():
        m = ev.select(**sel)
        if not m.any():
            continue
        out[name] = {
            "all": latency_quantiles_us(ev.latency_ns[m]),
            "no_collapse": latency_quantiles_us(ev.latency_ns[m & ~ev.during]),
            "during_collapse": latency_quantiles_us(ev.latency_ns[m & ev.during]),
            "asleep_per_collapse_us": sleep_per_collapse_us(ev, sel),
        }
    return out


def summarize_columns(cols: Mapping[str, Any], duration_s: float) -> dict[str, Any]:
    return summarize(Events.from_columns(cols), duration_s)


# --------------------------------------------------------------------------------------------
# fidelity: the kernel's relations beside the simulation's


SIM_STRATEGY = "pmd-clear"


@dataclass(frozen=True)
class FidelityRow:
    """One metric for the kernel and the simulation.  unit: "µs" (a latency; shown also
    relative to the run's median collapse), "×" (a ratio during/without collapse, with its
    Mann-Whitney p-values), "%" or "n"."""

    metric: str
    unit: str
    kernel: float | None
    sim: float | None
    kernel_idle: float | None = None
    kernel_p: float | None = None
    sim_p: float | None = None
    relative: bool = False  # also shown as a multiple of the median collapse


@dataclass(frozen=True)
class FidelityReport:
    kernel_file: Path
    baseline_file: Path | None
    sim_file: Path
    kernel_collapse_p50_us: float | None
    sim_collapse_p50_us: float | None
    rows: tuple[FidelityRow, ...]
    notes: tuple[str, ...]

    def row(self, metric: str) -> FidelityRow:
        return next(r for r in self.rows if r.metric == metric)

    def headline(self) -> dict[str, float | None]:
        """The dilation in two numbers: of the median collapse and of the median fault."""
        return {
            "collapse p50": self.dilation(self.row("collapse p50 (SCAN_SUCCEED)")),
            "same-VMA fault p50, no collapse": self.dilation(self.row("same-VMA fault, no collapse p50")),
        }

    def dilation(self, row: FidelityRow) -> float | None:
        """sim / kernel of a latency row: how much slower the simulation runs."""
        return _ratio(row.sim, row.kernel) if row.unit == "µs" else None

    def kernel_rel(self, row: FidelityRow) -> float | None:
        return _ratio(row.kernel, self.kernel_collapse_p50_us) if row.relative else None

    def sim_rel(self, row: FidelityRow) -> float | None:
        return _ratio(row.sim, self.sim_collapse_p50_us) if row.relative else None

    def relation(self, row: FidelityRow) -> float | None:
        """How well the simulation reproduces the kernel's relation (1.0: exactly): for a
        latency, its multiple of the median collapse, sim over kernel; for a ratio, sim over
        kernel."""
        if row.unit == "×":
            return _ratio(row.sim, row.kernel)
        if row.relative:
            return _ratio(self.sim_rel(row), self.kernel_rel(row))
        return None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not math.isfinite(a) or not math.isfinite(b) or b == 0:
        return None
    return a / b


def _mwu_p(a: np.ndarray, b: np.ndarray, cap: int = 50_000, seed: int = 0) -> float | None:
    """Two-sided Mann-Whitney U p-value on at most ``cap`` events per side (random subset)."""
    if len(a) < 2 or len(b) < 2:
        return None
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(seed)
    if len(a) > cap:
        a = rng.choice(a, cap, replace=False)
    if len(b) > cap:
        b = rng.choice(b, cap, replace=False)
    if np.all(a == a[0]) and np.all(b == a[0]):
        return 1.0
    return float(mannwhitneyu(a, b, alternative="two-sided").pvalue)


def _classify(paths: Sequence[Path]) -> tuple[RunResult, RunResult | None, RunResult]:
    runs = [read_run(p) for p in paths]
    kernel = [r for r in runs if r.meta.get("kind") == KIND]
    sims = [r for r in runs if r.meta.get("kind") != KIND]
    if not kernel:
        raise ConfigError(
            "fidelity needs a kernel result from `ptlab kernel` (its *-loaded.arrow file); none "
            "of the files given is one"
        )
    if not sims:
        raise ConfigError(
            "fidelity needs a simulated result from `ptlab run --strategy pmd-clear` beside the "
            "kernel's; all files given are kernel results"
        )
    if len(sims) > 1:
        raise ConfigError(
            f"give one simulated result file; got {len(sims)}: "
            + ", ".join(str(r.path) for r in sims)
        )
    loaded = [r for r in kernel if (r.meta.get("params") or {}).get("phase") == "loaded"]
    baseline = [r for r in kernel if (r.meta.get("params") or {}).get("phase") == "baseline"]
    if len(loaded) != 1 or len(baseline) > 1:
        if not loaded:
            raise ConfigError(
                f"{kernel[0].path} is a baseline (collapser idle) kernel result; give the "
                f"loaded phase file of the same run (…-loaded.arrow)"
            )
        raise ConfigError("give one kernel run: its -loaded.arrow file and at most its -baseline.arrow")
    base = baseline[0] if baseline else None
    if base is None:  # the sibling named in the loaded file's metadata, when it is there
        name = ((loaded[0].meta.get("params") or {}).get("files") or {}).get("baseline")
        sibling = loaded[0].path.parent / name if name else None
        if sibling is not None and sibling.exists():
            base = read_run(sibling)
    return loaded[0], base, sims[0]


def _placement_notes(kernel: RunResult, sim: RunResult) -> list[str]:
    """A note when a virtual-time run did not place its CPUs as the kernel ran its threads
    (which core, SCHED_IDLE): who runs during a collapse then differs by construction."""
    if sim.meta.get("clock") != "virtual":
        return []
    from ptlab.core.machine.config import RunConfig

    params = dict(sim.meta.get("params") or {})
    try:
        want = sim_placement(kernel.meta.get("params") or {}, RunConfig.from_dict(params))
    except (ConfigError, TypeError):
        return []
    have = params.get("placement") or ""
    if have == want:
        return []
    return [f"the virtual run places its CPUs as {have or 'one core each'!r}, the kernel ran its threads as {want!r} "
            f"(core[:idle] per CPU); run it with --placement {kernel.path} for the same shape"]


def fidelity(paths: Sequence[str | os.PathLike[str]]) -> FidelityReport:
    """Hold a kernel run (``ptlab kernel``) against a simulated pmd-clear run.

    ``paths``: the kernel run's loaded-phase file (its baseline file is optional: found beside
    it when not given) and one simulated result file, in any order.  Raises ConfigError (wrong
    or missing files, no pmd-clear events, no collapses) or ResultFileError (unreadable file).
    """
    kernel, base, sim = _classify([Path(p) for p in paths])
    sim_strats = set(_strings(sim.table, "strategy"))
    if SIM_STRATEGY not in sim_strats:
        raise ConfigError(
            f"{sim.path} has no {SIM_STRATEGY} events (strategies: {', '.join(sorted(sim_strats)) or 'none'}); "
            f"the kernel runs pmd-clear, so make the simulated run with `ptlab run --strategy pmd-clear`"
        )
    k = Events.from_table(kernel.table)
    s = Events.from_table(sim.table, SIM_STRATEGY)
    b = Events.from_table(base.table) if base is not None else None
    for name, ev, r in (("kernel", k, kernel), ("simulated", s, sim)):
        if not ev.select(op="collapse").any():
            raise ConfigError(f"the {name} run {r.path} made no collapses; nothing to hold the other against")
    notes: list[str] = []

    def collapse_q(ev: Events) -> dict[str, Any]:
        return latency_quantiles_us(ev.latency_ns[ev.select(op="collapse") & (ev.result == SUCCEED)])

    k_coll, s_coll = collapse_q(k), collapse_q(s)
    k_c50, s_c50 = k_coll["median_us"], s_coll["median_us"]
    if k_c50 is None or s_c50 is None:
        notes.append("a run has no successful collapse: relations to the collapse are left out")
    sim_orders = set(np.unique(s.order[s.select(op="collapse")]).tolist())
    if sim_orders - {HPAGE_PMD_ORDER}:
        notes.append(f"the simulated run collapsed order(s) {sorted(sim_orders)}; MADV_COLLAPSE "
                     f"collapses order {HPAGE_PMD_ORDER} only")
    notes += _placement_notes(kernel, sim)
    mismatches = incompatibilities(kernel.meta.get("host") or {}, sim.meta.get("host") or {})
    if mismatches:
        notes.append("the simulated run comes from another host (" + "; ".join(map(str, mismatches))
                     + "): its dilation mixes in the machine")

    rows: list[FidelityRow] = []

    def count_row(metric: str, fn: Callable[[Events], float | None], unit: str) -> None:
        rows.append(FidelityRow(metric, unit, fn(k), fn(s)))

    count_row("collapses", lambda ev: float(ev.select(op="collapse").sum()), "n")
    count_row("collapse success", lambda ev: 100.0 * float(
        (ev.result[ev.select(op="collapse")] == SUCCEED).mean()), "%")
    rows.append(FidelityRow("collapse p50 (SCAN_SUCCEED)", "µs", k_c50, s_c50))
    rows.append(FidelityRow("collapse p99 (SCAN_SUCCEED)", "µs", k_coll["p99_us"], s_coll["p99_us"],
                            relative=True))

    def latency_rows(label: str, sel: dict[str, Any], qs: Sequence[tuple[str, str]]) -> None:
        kq, sq = latency_quantiles_us(k.lat(**sel)), latency_quantiles_us(s.lat(**sel))
        # the baseline has no collapse at all: it stands beside the "no collapse" rows
        bq = (latency_quantiles_us(b.lat(**{key: v for key, v in sel.items() if key != "during"}))
              if b is not None and sel.get("during") is False else {})
        for qname, key in qs:
            rows.append(FidelityRow(f"{label} {qname}", "µs", kq[key], sq[key],
                                    kernel_idle=bq.get(key), relative=True))

    def ratio_rows(label: str, sel: dict[str, Any], qs: Sequence[tuple[str, str]]) -> None:
        kd, kn = k.lat(**sel, during=True), k.lat(**sel, during=False)
        sd, sn = s.lat(**sel, during=True), s.lat(**sel, during=False)
        kdq, knq, sdq, snq = (latency_quantiles_us(x) for x in (kd, kn, sd, sn))
        kp_, sp_ = _mwu_p(kd, kn), _mwu_p(sd, sn)
        for qname, key in qs:
            rows.append(FidelityRow(f"{label} {qname}", "×", _ratio(kdq[key], knq[key]),
                                    _ratio(sdq[key], snq[key]), kernel_p=kp_, sim_p=sp_))

    p3 = (("p50", "median_us"), ("p99", "p99_us"), ("p99.9", "p999_us"))
    p2 = p3[:2]
    same = {"op": "fault", "role": "app", "vma": "same"}
    other = {"op": "fault", "role": "app", "vma": "other"}
    mm = {"op": "mmap"}
    latency_rows("same-VMA fault, no collapse", {**same, "during": False}, p3)
    latency_rows("same-VMA fault, during collapse", {**same, "during": True}, p3)
    ratio_rows("same-VMA fault during÷no collapse", same, p2)

    def sleep_row(label: str, sel: dict[str, Any]) -> None:
        rows.append(FidelityRow(f"{label} asleep per collapse", "µs", sleep_per_collapse_us(k, sel),
                                sleep_per_collapse_us(s, sel), relative=True))

    sleep_row("same-VMA fault", same)
    latency_rows("other-VMA fault, no collapse", {**other, "during": False}, p2)
    latency_rows("other-VMA fault, during collapse", {**other, "during": True}, p2)
    ratio_rows("other-VMA fault during÷no collapse", other, p2)
    sleep_row("other-VMA fault", other)
    latency_rows("mmap, no collapse", {**mm, "during": False}, p2)
    latency_rows("mmap, during collapse", {**mm, "during": True}, p2)
    ratio_rows("mmap during÷no collapse", mm, p2)
    sleep_row("mmap", mm)
    return FidelityReport(
        kernel_file=kernel.path, baseline_file=base.path if base is not None else None,
        sim_file=sim.path, kernel_collapse_p50_us=k_c50, sim_collapse_p50_us=s_c50,
        rows=tuple(rows), notes=tuple(notes),
    )
