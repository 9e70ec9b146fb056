"""The kernel cost table: what one kernel step costs, in ns, for the virtual clock.

The deterministic backend runs kernel paths step by step; on the virtual clock each step is
charged what it costs a real kernel, not what it costs Python.  Those prices live here, as
*data*: a table of named entries, each ``{ns, source, kind}``, written by
``ptlab calibrate --kernel`` (core/analysis/calibrate.py measures, this module holds and checks) and
embedded in every virtual-time result file (``CostTable.to_dict()``), so a result always says
which prices made it.

  kind ``measured``  timed on this host by a C loop of ptlab.core.probe._kprobe (the method is in
                     the source text, with the statistic used)
  kind ``cited``     a published figure (the source names the message or file), for what user
                     space cannot time: INVLPG, a page allocation
  kind ``derived``   arithmetic over other entries and measurements, spelled out in the source
                     (the host's median fault minus the clear and the allocation, ...)

``load_costs(None)`` is the committed default, core/analysis/costs_default.json, made by running
``ptlab calibrate --kernel`` on the development VM (2-vCPU AMD EPYC KVM guest, Linux 6.18);
``load_costs(path)`` reads a table written on another host.  Validation is strict, in the
spirit of pyperf's ``Run``: every entry of ENTRIES present, no unknown one, ns finite and > 0,
a non-empty source, a known kind -- else CostTableError, one line naming the file and the
entry.

Format history (``cost_format``): 1 -- first version.
"""

from __future__ import annotations

import datetime as _dt
import difflib
import json
import math
import os
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ptlab.core.machine.errors import ConfigError

COST_FORMAT = 1
KINDS: tuple[str, ...] = ("measured", "cited", "derived")
DEFAULT_PATH = Path(__file__).resolve().parent / "costs_default.json"
DEFAULT_DIR = Path("results") / "costs"

# Every entry the virtual clock may charge: name -> what one unit of it is.  The names are the
# contract with the simulator (core/backends/scheduled.py, core/machine/cpu.py charge them); keep them stable.
ENTRIES: dict[str, str] = {
    "load_hit": "a load or store that hits the CPU's own cache line (L1)",
    "atomic": "an uncontended atomic read-modify-write (lock-prefixed) on a line the CPU owns",
    "line_transfer": "a cache line moving from one CPU to another (one way)",
    "copy_page": "copy one 4 KiB page (copy_mc_user_highpage / copy_page)",
    "zero_page": "clear one 4 KiB page (clear_page, folio_zero_user per page)",
    "tlb_walk": "a TLB miss whose page walk hits the caches",
    "tlb_flush_local": "invalidate one range in the local TLB (INVLPG-like)",
    "ipi_round_trip": "send a flush IPI to one other CPU and wait for its handler (smp_call_function_many, wait=1)",
    "ipi_per_target": "extra per additional IPI target",
    "futex_wake_to_run": "wake a sleeper on another core until it runs",
    "context_switch": "switch out a sleeping task and in the woken one, on one core",
    "futex_syscall": "one futex() system call that neither sleeps nor wakes anybody",
    "fault_entry": "exception entry + exit + handle_mm_fault's fixed path of an anonymous write fault (no clear, no allocation)",
    "alloc_page": "an order-0 page allocation (__folio_alloc from the per-CPU lists)",
    "alloc_large_per_page": "extra per additional 4 KiB page of a large folio allocation",
    "mmap_body": "one mmap() + munmap() pair of a small anonymous region, without its page faults",
    "lru_drain": "lru_add_drain_all() as madvise_collapse() runs it (plus the madvise call itself)",
    "collapse_fixed": "the fixed work of one collapse besides the drain, the allocation, the IPIs, the copies and the per-page work",
    "collapse_per_page": "per base page of the collapsed range beyond its copy: isolate, lock, check, unmap and free the old page",
    "rwsem_op": "one uncontended down + up of an rwsem",
}

# What a simulator needs when no host can time it, or when a measurement fails: cited figures.
# name -> (ns, source).  The ns of a cycle count is at 2.6 GHz (the development VM's TSC).
CITED: dict[str, tuple[float, str]] = {
    "tlb_flush_local": (
        100.0,
        "cited: arch/x86/mm/tlb.c, tlb_single_page_flush_ceiling comment from a5102476a24b "
        "(Dave Hansen, 'x86/mm: Set TLB flush tunable to sane value (33)'): 'Each single flush "
        "is about 100 ns'; Ingo Molnar measured __flush_tlb_one() at 260 cycles "
        "(<20150608195237.GA15429@gmail.com>)",
    ),
    "ipi_per_target": (
        200.0,
        "cited (weak): kernel-brief.md §7, unseel.com/cs/tlb-shootdown: IPI shootdown ~1 µs "
        "base + ~200 ns per additional target (64 cores ~14 µs)",
    ),
    "ipi_round_trip": (
        2000.0,
        "cited (weak): kernel-brief.md §7, IPI round trip '~1-3 µs' (newsletter.onedfrk.com, "
        "unseel.com); used because membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) could not be "
        "measured here",
    ),
    "alloc_page": (
        88.0,
        "cited: page_bench01 single_page_alloc_free (alloc_page + __free_page), 228-238 TSC "
        "cycles (Jesper Brouer, quoted by Mel Gorman <20160411180703.GA27534@suse.de>) and "
        "115 cycles on an i7-11850H (Marcelo Tosatti <20230515180138.617500477@redhat.com>); "
        "the upper figure, 230 cycles at 2.6 GHz, charged for the allocation (memcg charge "
        "not included)",
    ),
    "alloc_large_per_page": (
        15.0,
        "cited: page_bench01 order-3 alloc_pages + __free_pages 417-611 TSC cycles against "
        "228-238 for order 0 (Jesper Brouer, quoted by Mel Gorman "
        "<20160411180703.GA27534@suse.de>): about (500-231)/7 = 38 cycles per extra 4 KiB, "
        "15 ns at 2.6 GHz",
    ),
    "tlb_walk": (
        10.0,
        "cited (weak): a 4 KiB-stride walk over 256 MiB costs ~10 ns more per access than a "
        "512 B stride (notes.elimelt.com/operating-systems/benchmarks/tlb.html); '20-50 "
        "cycles for a cached page walk' (newsletter.onedfrk.com)",
    ),
    "line_transfer": (
        61.0,
        "cited: kernel-brief.md §7, spinlock-word ping-pong on a 2-vCPU VM, ~61 ns one way "
        "(used because fewer than two usable cores were available)",
    ),
}


class CostTableError(ConfigError):
    """A cost table file that cannot be used: one line naming the file and what is wrong."""


@dataclass(frozen=True)
class CostEntry:
    """One price: ``ns`` virtual nanoseconds per unit, where the number comes from (``source``)
    and how it was obtained (``kind``: measured, cited or derived)."""

    ns: float
    source: str
    kind: str

    def to_dict(self) -> dict[str, Any]:
        return {"ns": self.ns, "source": self.source, "kind": self.kind}


@dataclass(frozen=True)
class CostTable:
    """The whole table: ``entries`` (every name of ENTRIES) and ``meta`` (host fingerprint,
    date, ptlab version, the raw inputs of the derived entries, where it was read from)."""

    entries: Mapping[str, CostEntry]
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_entries({k: e.to_dict() for k, e in self.entries.items()}, "cost table")

    def __getitem__(self, name: str) -> CostEntry:
        try:
            return self.entries[name]
        except KeyError:
            raise KeyError(f"no cost entry {name!r}{_suggest(name, ENTRIES)}") from None

    def ns(self, name: str) -> float:
        """The price of one unit of ``name`` in ns (KeyError for an unknown name)."""
        return self[name].ns

    def as_ns(self) -> dict[str, float]:
        """name -> ns, in ENTRIES order: what the virtual clock's cost model takes."""
        return {k: self.entries[k].ns for k in ENTRIES}

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, as written to a cost file and embedded in a result file's metadata."""
        meta = {k: v for k, v in self.meta.items() if k != "path"}
        return {
            "cost_format": COST_FORMAT,
            "meta": meta,
            "entries": {k: self.entries[k].to_dict() for k in ENTRIES},
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "cost table") -> CostTable:
        """Build and validate a table from its JSON form.  Raises CostTableError naming
        ``where`` and the first problem found."""
        if not isinstance(data, Mapping):
            raise CostTableError(f"{where}: expected a JSON object with 'entries', got {type(data).__name__}")
        fmt = data.get("cost_format")
        if fmt != COST_FORMAT:
            raise CostTableError(
                f"{where}: cost_format {fmt!r} is not supported (this ptlab reads {COST_FORMAT}); "
                f"write the table again with `ptlab calibrate --kernel`"
            )
        unknown_top = set(data) - {"cost_format", "meta", "entries"}
        if unknown_top:
            raise CostTableError(f"{where}: unknown top-level key {sorted(unknown_top)[0]!r} "
                                 f"(expected cost_format, meta, entries)")
        meta = data.get("meta", {})
        if not isinstance(meta, Mapping):
            raise CostTableError(f"{where}: 'meta' must be an object")
        raw = data.get("entries")
        if not isinstance(raw, Mapping):
            raise CostTableError(f"{where}: 'entries' must be an object of name -> {{ns, source, kind}}")
        _check_entries(raw, where)
        entries = {k: CostEntry(float(raw[k]["ns"]), str(raw[k]["source"]), str(raw[k]["kind"])) for k in ENTRIES}
        return cls(entries=entries, meta=dict(meta))


def _suggest(name: str, choices: Mapping[str, Any]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_entries(raw: Mapping[str, Any], where: str) -> None:
    """Every entry of ENTRIES present and well formed, no other.  Raises CostTableError."""
    for name in raw:
        if name not in ENTRIES:
            raise CostTableError(f"{where}: unknown entry {name!r}{_suggest(str(name), ENTRIES)}; "
                                 f"the entries are: {', '.join(ENTRIES)}")
    missing = [k for k in ENTRIES if k not in raw]
    if missing:
        raise CostTableError(f"{where}: missing entr{'y' if len(missing) == 1 else 'ies'} "
                             f"{', '.join(missing)}")
    for name in ENTRIES:
        e = raw[name]
        if not isinstance(e, Mapping):
            raise CostTableError(f"{where}: entry {name!r} must be an object {{ns, source, kind}}")
        extra = set(e) - {"ns", "source", "kind"}
        if extra:
            raise CostTableError(f"{where}: entry {name!r} has unknown field {sorted(extra)[0]!r} "
                                 f"(fields: ns, source, kind)")
        ns = e.get("ns")
        if isinstance(ns, bool) or not isinstance(ns, (int, float)) or not math.isfinite(ns):
            raise CostTableError(f"{where}: entry {name!r}: ns must be a finite number of ns (got {ns!r})")
        if ns <= 0:
            raise CostTableError(f"{where}: entry {name!r}: ns must be positive (got {ns!r})")
        src = e.get("source")
        if not isinstance(src, str) or not src.strip():
            raise CostTableError(f"{where}: entry {name!r} has no source: say where the number comes from")
        if e.get("kind") not in KINDS:
            raise CostTableError(f"{where}: entry {name!r}: kind must be one of {', '.join(KINDS)} "
                                 f"(got {e.get('kind')!r})")


def load_costs(path: str | os.PathLike[str] | None = None) -> CostTable:
    """Read and validate a cost table.  ``None``: the committed default,
    core/analysis/costs_default.json.  Raises CostTableError (a ConfigError: one line, exit code 2)
    when the file is missing, is not JSON, or fails validation."""
    p = DEFAULT_PATH if path is None else Path(path)
    if not p.exists():
        raise CostTableError(f"{p}: no such cost table; write one with `ptlab calibrate --kernel --out {p}`")
    if p.is_dir():
        raise CostTableError(f"{p}: is a directory, expected a cost table (.json)")
    try:
        data = json.loads(p.read_text())
    except UnicodeDecodeError:
        raise CostTableError(f"{p}: not a cost table (not UTF-8 text)") from None
    except json.JSONDecodeError as e:
        raise CostTableError(f"{p}: not JSON (line {e.lineno} column {e.colno}: {e.msg})") from None
    except OSError as e:
        raise CostTableError(f"{p}: cannot read ({e.strerror or e})") from None
    table = CostTable.from_dict(data, str(p))
    return CostTable(entries=table.entries, meta={**table.meta, "path": str(p)})


def default_out() -> Path:
    """Where `ptlab calibrate --kernel` writes without --out: results/costs/<hostname>.json."""
    host = socket.gethostname() or "host"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in host)
    return DEFAULT_DIR / f"{safe}.json"


def resolve_out(out: str | os.PathLike[str] | None) -> Path:
    """The file a table goes to: ``out`` itself, ``out/<hostname>.json`` when ``out`` is an
    existing directory, or default_out().  Checks that its directory can be created and
    written before anything is measured; raises ConfigError naming --out."""
    path = default_out() if out is None else Path(out)
    if path.is_dir():
        path = path / default_out().name
    if path.suffix != ".json":
        raise ConfigError(f"--out {path}: a cost table is a JSON file; give FILE.json or a directory")
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"cannot write to --out {path}: {e.strerror or e}; choose another file") from None
    return path


def write_costs(table: CostTable, path: str | os.PathLike[str]) -> Path:
    """Write ``table`` as JSON to ``path`` atomically (temp file, fsync, rename); returns the
    path.  Raises ConfigError when it cannot be written."""
    path = Path(path)
    text = json.dumps(table.to_dict(), indent=2, sort_keys=False, default=str) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    except OSError as e:
        raise ConfigError(f"cannot write the cost table to {path}: {e.strerror or e}") from None
    return path


def table_meta(extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Metadata for a freshly measured table: host fingerprint, UTC date, ptlab version, the
    host's load average while it was measured, plus ``extra``."""
    from importlib import metadata

    try:
        from ptlab.core.analysis.host import fingerprint

        host: dict[str, Any] = dict(fingerprint())
    except Exception:  # the table is still useful without it
        host = {}
    try:
        version = metadata.version("ptlab")
    except metadata.PackageNotFoundError:
        version = None
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    meta: dict[str, Any] = {
        "kind": "costs",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "ptlab_version": version,
        "host": host,
        "loadavg_after": load,
    }
    meta.update(extra or {})
    return meta
