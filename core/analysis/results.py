"""Result files: one Arrow IPC file per run, one row per event, self-describing.

Every file carries, in its schema metadata under the key ``ptlab`` (JSON), the schema version,
the run's parameters, the host fingerprint, the calibration table and the oracle's violations,
so a file read years later still says what produced it (pyperf keeps its format the same way).

Schema history (bump SCHEMA_VERSION and add a line for every change; readers accept every
version listed here and refuse newer ones with a message that says to upgrade):
  1  first format: event columns below; metadata keys schema_version, run_id, kind, params,
     host, calibration, violations, summary; optional ``runs`` (a list of per-run metadata)
     in a merged file that holds the events of several runs.
  2  a content checksum (schema metadata key ``ptlab_checksum``) that every reader checks;
     ``summary.duration_s`` is the measured duration; ``started_at`` / ``t0_unix_ns`` give
     the absolute start time; ``addr`` is a byte address in simulated runs too (version 1
     stored their virtual page number; the upgrade multiplies by ``params.page_size``);
     files are written 0644 (umask permitting); a sweep's merged dataset is Parquet.
     Version-1 files (no checksum) still read.

Content checksum.  ``write_table`` stores ``sha256:<hex>`` under the schema metadata key
``ptlab_checksum``: SHA-256 over the exact bytes of the ``ptlab`` metadata and over every
column's values in a canonical form that does not depend on how the file is chunked or
dictionary-encoded (so the same events read from Arrow IPC or from Parquet give the same
sum).  ``read_run`` recomputes it and refuses a file whose sum differs: a flipped byte is an
error, never a silently changed latency.

When a version 2 appears, add its upgrade from 1 to ``_UPGRADES`` (a function that turns a
version-1 table and metadata into version-2 ones), so every reader sees the newest layout.

Beyond one file: :func:`find_result_files` expands files and directories (recursively, also
a sweep's hive-partitioned ``merged/strategy=X/*.parquet``), :func:`read_runs` reads them into
one :class:`RunResult` per run, :func:`concat_events` pools their events into one table with
unified dictionaries, and :func:`write_merged` writes such a partitioned directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

SCHEMA_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
METADATA_KEY = b"ptlab"
CHECKSUM_KEY = b"ptlab_checksum"
CHECKSUM_SINCE = 2  # files of this schema version and newer must carry a checksum

# Top-level keys of the ``ptlab`` metadata that ptlab writes (results/SCHEMA.md documents each
# one; tests/test_results.py holds the document, this tuple and a real run's metadata against
# each other).
METADATA_KEYS = (
    "schema_version", "run_id", "kind", "started_at", "t0_unix_ns", "params", "host",
    "calibration", "violations", "summary", "roles", "cpu_stats", "access_sample",
    "quiescent_checks", "stopped", "runs", "clock", "costs", "speed", "schedule", "build", "placement",
)

# Event columns, in file order.  Strings are dictionary-encoded (few distinct values).
# Units: every *_ns column is nanoseconds of wall-clock time; t_start_ns is relative to the
# run's start gate (warm-up events are dropped before writing).
EVENT_FIELDS: tuple[pa.Field, ...] = (
    pa.field("run_id", pa.dictionary(pa.int32(), pa.string())),
    pa.field("strategy", pa.dictionary(pa.int32(), pa.string())),
    pa.field("cpu", pa.int16()),
    pa.field("role", pa.dictionary(pa.int32(), pa.string())),
    pa.field("op", pa.dictionary(pa.int32(), pa.string())),
    pa.field("t_start_ns", pa.int64()),
    pa.field("latency_ns", pa.int64()),
    pa.field("spin_ns", pa.int64()),
    pa.field("sleep_ns", pa.int64()),
    pa.field("waited_on", pa.dictionary(pa.int32(), pa.string())),
    pa.field("result", pa.dictionary(pa.int32(), pa.string())),
    pa.field("order", pa.int8()),
    pa.field("vma", pa.int16()),
    pa.field("addr", pa.int64()),
    pa.field("during_collapse", pa.bool_()),
    pa.field("lock_ns", pa.int64()),
    pa.field("unmap_ns", pa.int64()),
    pa.field("flush_ns", pa.int64()),
    pa.field("refcheck_ns", pa.int64()),
    pa.field("copy_ns", pa.int64()),
    pa.field("install_ns", pa.int64()),
)
EVENT_SCHEMA = pa.schema(list(EVENT_FIELDS))
STRING_COLUMNS = tuple(f.name for f in EVENT_FIELDS if pa.types.is_dictionary(f.type))
PHASE_COLUMNS = ("lock_ns", "unmap_ns", "flush_ns", "refcheck_ns", "copy_ns", "install_ns")
# File name endings taken as result files when a directory is given (Parquet: a sweep's
# merged dataset and `ptlab export --parquet`).
ARROW_SUFFIXES = (".arrow", ".ipc", ".feather")
PARQUET_SUFFIXES = (".parquet",)
RESULT_SUFFIXES = ARROW_SUFFIXES + PARQUET_SUFFIXES


class ResultFileError(Exception):
    """A result file is missing, unreadable, corrupt or from a newer ptlab."""


@dataclass(frozen=True)
class RunResult:
    """One result file: its events and its metadata (the decoded ``ptlab`` JSON)."""

    path: Path
    table: pa.Table
    meta: dict[str, Any]

    @property
    def run_id(self) -> str:
        return str(self.meta.get("run_id", self.path.stem))

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.meta.get("params") or {})

    @property
    def host(self) -> dict[str, Any]:
        return dict(self.meta.get("host") or {})

    @property
    def kind(self) -> str:
        return str(self.meta.get("kind", "sim"))

    @property
    def strategy(self) -> str:
        """The strategy from the parameters, else the (single) value of the strategy column."""
        s = self.params.get("strategy")
        if s:
            return str(s)
        values = pc.unique(self.table.column("strategy").cast(pa.string())).to_pylist()
        return str(values[0]) if values else "unknown"

    def sample_factor(self, op: str) -> int:
        """How many events of ``op`` each recorded row stands for: TLB-hit accesses are
        recorded one in ``access_sample`` (metadata), every other op is recorded in full."""
        if op != "access":
            return 1
        f = self.meta.get("access_sample", 1)
        return int(f) if isinstance(f, int) and not isinstance(f, bool) and f > 0 else 1

    @property
    def duration_s(self) -> float:
        """Measured run time in seconds: ``summary.duration_s`` if recorded, else the
        ``duration_s`` parameter, else the span of the events (0.0 for an empty run)."""
        for src in (self.meta.get("summary") or {}, self.params):
            d = src.get("duration_s")
            if isinstance(d, (int, float)) and d > 0:
                return float(d)
        if self.table.num_rows == 0:
            return 0.0
        t0 = pc.min(self.table.column("t_start_ns")).as_py()
        t1 = pc.max(pc.add(self.table.column("t_start_ns"), self.table.column("latency_ns"))).as_py()
        return max(0.0, (t1 - t0) / 1e9)


def build_table(columns: Mapping[str, Any], meta: Mapping[str, Any]) -> pa.Table:
    """Build the event table from plain columns (lists or numpy arrays of equal length).

    Missing phase columns default to 0, missing ``vma`` to -1, ``addr`` to -1,
    ``during_collapse`` to False; string columns take Python strings.  Raises ValueError on
    unknown columns or unequal lengths.
    """
    unknown = set(columns) - {f.name for f in EVENT_FIELDS}
    if unknown:
        raise ValueError(f"unknown event columns: {sorted(unknown)}")
    lengths = {len(v) for v in columns.values()}
    if len(lengths) > 1:
        raise ValueError(f"event columns have different lengths: {sorted(lengths)}")
    n = lengths.pop() if lengths else 0
    defaults = {"vma": -1, "addr": -1, "during_collapse": False, "waited_on": "", "result": ""}
    arrays = []
    for f in EVENT_FIELDS:
        if f.name in columns:
            values = columns[f.name]
        elif f.name in defaults:
            values = [defaults[f.name]] * n
        elif f.name in PHASE_COLUMNS or f.name in ("spin_ns", "sleep_ns"):
            values = np.zeros(n, dtype=np.int64)
        else:
            raise ValueError(f"event column {f.name!r} is required")
        if pa.types.is_dictionary(f.type):
            arr = pa.array(list(values) if not isinstance(values, list) else values, pa.string())
            arrays.append(arr.dictionary_encode().cast(f.type))
        else:
            arrays.append(pa.array(np.asarray(values), type=f.type))
    if "build" not in meta:  # which build of the hot paths wrote it (core/machine/build.py)
        from ptlab.core.machine.build import build_info

        meta = {**meta, "build": build_info().build}
    schema = EVENT_SCHEMA.with_metadata({METADATA_KEY: encode_meta(meta)})
    return pa.Table.from_arrays(arrays, schema=schema)


def encode_meta(meta: Mapping[str, Any]) -> bytes:
    m = dict(meta)
    m["schema_version"] = SCHEMA_VERSION
    return json.dumps(m, sort_keys=True, default=_json_default).encode()


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot store {type(o).__name__} in result metadata")


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike[str],
    *,
    before_rename: Callable[[Path], None] | None = None,
    mode: int | None = None,
) -> Iterator[Any]:
    """Open ``path`` for writing (binary) so that it appears whole or not at all.

    Writes go to a hidden temp file in the same directory, which is fsynced, checked by
    ``before_rename(temp_path)`` if given, chmod'ed to ``mode`` (default: 0666 less the
    umask, as ``open()`` would create it -- mkstemp's 0600 would hide results from the other
    users of a shared machine), and renamed over ``path`` when the block ends normally; it is
    removed if anything raises (even KeyboardInterrupt).  Raises ResultFileError when the
    directory cannot be created or written.
    """
    path = Path(path)
    if mode is None:
        mode = default_file_mode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise ResultFileError(f"cannot write to {path.parent}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename(Path(tmp))
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(
    path: str | os.PathLike[str],
    data: bytes,
    *,
    check: Callable[[Path], Any] | None = None,
    mode: int | None = None,
) -> Any:
    """Write ``data`` to ``path`` atomically (see atomic_output).  ``check(temp_path)`` runs
    before the rename; its result is returned (else the path), and if it raises nothing is
    renamed."""
    out: list[Any] = [Path(path)]

    def before(tmp: Path) -> None:
        if check is not None:
            out[0] = check(tmp)

    with atomic_output(path, before_rename=before, mode=mode) as f:
        f.write(data)
    return out[0]


def default_file_mode() -> int:
    """0666 less this process's umask: the mode ``open()`` gives a new file (0644 usually)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def write_table(table: pa.Table, path: str | os.PathLike[str]) -> Path:
    """Write atomically: a temp file in the same directory, fsync, then rename.

    ``*.parquet`` is written as Parquet, anything else as an Arrow IPC file.  A table with
    ``ptlab`` metadata gets its content checksum (``ptlab_checksum``, see the module
    docstring) computed here, over exactly what is written.  An interrupted write never
    leaves a half file under the final name.  Raises ResultFileError when the directory cannot
    be created or written.
    """
    path = Path(path)
    meta = dict(table.schema.metadata or {})
    if METADATA_KEY in meta:
        meta.pop(CHECKSUM_KEY, None)
        table = table.replace_schema_metadata(meta)
        meta[CHECKSUM_KEY] = content_checksum(table).encode()
        table = table.replace_schema_metadata(meta)
    with atomic_output(path) as f:
        if path.suffix in PARQUET_SUFFIXES:
            import pyarrow.parquet as pq

            # the Arrow schema (dictionaries, int8/int16, the metadata) is stored with it
            pq.write_table(table, f, compression="zstd")
        else:
            # zstd-compressed record batches: pyarrow, polars and DuckDB read them transparently
            with ipc.new_file(f, table.schema, options=ipc.IpcWriteOptions(compression="zstd")) as w:
                w.write_table(table)
    return path


def content_checksum(table: pa.Table) -> str:
    """``sha256:<hex>`` over the table's ``ptlab`` metadata bytes and its column values.

    The values are hashed in a canonical form: each column as one array whatever its chunks;
    a dictionary-encoded column as the sorted list of the strings it uses and each row's rank
    in that list (so the dictionary's order, unused entries and the file format do not
    matter); other columns as their values' bytes and, when there are nulls, the null mask.
    Any other ``schema metadata`` key (the checksum itself, pandas' or Parquet's) is left out.
    """
    h = hashlib.sha256(b"ptlab-checksum-1\0")
    raw = (table.schema.metadata or {}).get(METADATA_KEY, b"")
    h.update(len(raw).to_bytes(8, "little") + raw)
    for f, col in zip(table.schema, table.columns, strict=True):
        h.update(f"{f.name}\0{f.type}\0{len(col)}\0".encode())
        if pa.types.is_dictionary(f.type):
            _hash_dictionary_column(h, col)
            continue
        arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
        if arr.null_count:
            h.update(b"nulls\0" + arr.is_null().to_numpy(zero_copy_only=False).tobytes())
            arr = arr.fill_null(pa.scalar(0, arr.type) if not pa.types.is_boolean(arr.type) else False)
        if pa.types.is_primitive(arr.type) or pa.types.is_boolean(arr.type):
            h.update(arr.to_numpy(zero_copy_only=False).tobytes())
        else:  # strings, lists, ...: rare extra columns; slower but canonical
            h.update(json.dumps(arr.to_pylist(), default=str).encode())
    return "sha256:" + h.hexdigest()


def _hash_dictionary_column(h: Any, col: pa.ChunkedArray) -> None:
    dicts = [ch.dictionary.to_pylist() for ch in col.chunks]
    values = sorted({str(v) for d in dicts for v in d if v is not None})
    pos = {v: i + 1 for i, v in enumerate(values)}  # 0: null
    parts = []
    for ch, d in zip(col.chunks, dicts, strict=True):
        perm = np.array([pos[str(v)] if v is not None else 0 for v in d] + [0], dtype=np.int32)
        idx = ch.indices.fill_null(len(d)) if ch.null_count else ch.indices
        parts.append(perm[idx.to_numpy(zero_copy_only=False)])
    codes = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    used = np.bincount(codes, minlength=len(values) + 1) > 0
    rank = (np.cumsum(used) - 1).astype(np.int32)
    names = ["\x00null" if i == 0 else values[i - 1] for i in np.flatnonzero(used)]
    h.update(json.dumps(names).encode() + b"\0")
    h.update(rank[codes].tobytes())


def verify_checksum(path: Path, table: pa.Table, version: int) -> None:
    """Raise ResultFileError unless ``table`` (as read from ``path``) has the checksum it was
    written with.  Files of schema versions before CHECKSUM_SINCE carry none."""
    stored = (table.schema.metadata or {}).get(CHECKSUM_KEY)
    if stored is None:
        if version >= CHECKSUM_SINCE:
            raise ResultFileError(f"{path}: has no content checksum (schema {version} files carry "
                                  f"one); the file was rewritten by another tool or damaged")
        return
    if stored.decode(errors="replace") != content_checksum(table):
        raise ResultFileError(
            f"{path}: content checksum mismatch: the file changed after ptlab wrote it (a "
            f"damaged disk or copy, or an edit); its numbers cannot be trusted"
        )


def write_run(path: str | os.PathLike[str], columns: Mapping[str, Any], meta: Mapping[str, Any]) -> Path:
    """build_table + write_table."""
    return write_table(build_table(columns, meta), path)


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The decoded ``ptlab`` metadata of a result file.  Reads and checks the whole file (its
    checksum covers the metadata and the events together).  Raises ResultFileError like
    read_run."""
    return read_run(path).meta


def _read_raw(path: Path) -> pa.Table:
    """The table exactly as stored (Arrow IPC file or Parquet), before any upgrade."""
    try:
        if path.suffix in PARQUET_SUFFIXES:
            import pyarrow.parquet as pq

            # ParquetFile, not pq.read_table: that would add hive columns from the path
            return pq.ParquetFile(str(path)).read()
        with pa.memory_map(str(path), "r") as src:
            return ipc.open_file(src).read_all()
    except (pa.ArrowException, OSError, ValueError) as e:
        what = "Parquet" if path.suffix in PARQUET_SUFFIXES else "Arrow"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ResultFileError(f"{path}: not a ptlab {what} file ({first})") from None


def read_run(path: str | os.PathLike[str]) -> RunResult:
    """Read one result file (Arrow IPC or Parquet).  Raises ResultFileError with a one-line
    reason on any problem, including a content checksum that does not match.

    The table always has the current EVENT_SCHEMA columns and types: older files are upgraded,
    and a column a file leaves out because its directory names it (``strategy=X/``, as
    pyarrow.dataset writes hive partitions) is filled from the directory name.
    """
    path = Path(path)
    _check_exists(path)
    table = _read_raw(path)
    meta = _decode_meta(path, table.schema)
    version = meta["schema_version"]
    try:
        verify_checksum(path, table, version)
    except ResultFileError:
        raise
    except Exception as e:  # a damaged file can decode to anything (indices out of range, ...)
        raise ResultFileError(f"{path}: damaged: its content checksum cannot be computed "
                              f"({type(e).__name__}: {e})") from None
    table = table.replace_schema_metadata(
        {k: v for k, v in (table.schema.metadata or {}).items() if k != CHECKSUM_KEY})
    for v in range(version, SCHEMA_VERSION):
        table, meta = _UPGRADES[v](table, meta)
    table = _normalize(path, table, _hive_keys(path))
    return RunResult(path=path, table=table, meta=meta)


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise ResultFileError(f"{path}: no such file")
    if path.is_dir():
        raise ResultFileError(f"{path}: is a directory, expected a result file (.arrow)")


def _decode_meta(path: Path, schema: pa.Schema) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ResultFileError(f"{path}: Arrow file without ptlab metadata")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise ResultFileError(f"{path}: corrupt ptlab metadata") from None
    if not isinstance(meta, dict):
        raise ResultFileError(f"{path}: corrupt ptlab metadata (not a JSON object)")
    version = meta.get("schema_version")
    if not isinstance(version, int):
        raise ResultFileError(f"{path}: metadata has no schema_version")
    if version > SCHEMA_VERSION:
        raise ResultFileError(
            f"{path}: written by a newer ptlab (schema {version}, this one reads up to "
            f"{SCHEMA_VERSION}); upgrade ptlab to read it"
        )
    if version not in SUPPORTED_VERSIONS:
        raise ResultFileError(f"{path}: schema version {version} is not readable by this ptlab")
    return meta


def _upgrade_1(table: pa.Table, meta: dict[str, Any]) -> tuple[pa.Table, dict[str, Any]]:
    """1 -> 2: version 1 carries no checksum, no measured duration (the readers fall back to
    ``params.duration_s``) and no absolute start time; its simulated runs (``kind: sim``)
    stored ``addr`` as a virtual page number, version 2 as a byte address like kernel runs."""
    page = (meta.get("params") or {}).get("page_size")
    if meta.get("kind", "sim") == "sim" and isinstance(page, int) and "addr" in table.column_names:
        addr = table.column("addr")
        scaled = pc.if_else(pc.greater_equal(addr, 0), pc.multiply(addr, page), addr)
        table = table.set_column(table.column_names.index("addr"), "addr", scaled)
    return table, {**meta, "schema_version": 2}


# version -> function upgrading (table, meta) of that version to version + 1.
_UPGRADES: dict[int, Callable[[pa.Table, dict[str, Any]], tuple[pa.Table, dict[str, Any]]]] = {
    1: _upgrade_1,
}


def _hive_keys(path: Path) -> dict[str, str]:
    """``key=value`` directory names above ``path`` (nearest wins), as hive partitioning."""
    keys: dict[str, str] = {}
    for part in reversed(path.parent.parts):
        k, sep, v = part.partition("=")
        if sep and k and k not in keys:
            keys[k] = v
    return keys


def _normalize(path: Path, table: pa.Table, hive: Mapping[str, str]) -> pa.Table:
    """Bring a table to EVENT_SCHEMA: fill partition columns and defaults, cast types.
    Extra columns (e.g. a sweep's ``cell_*`` grid coordinates) are kept after the event
    columns."""
    n = table.num_rows
    defaults: dict[str, Any] = {"vma": -1, "addr": -1, "during_collapse": False, "waited_on": "",
                                "result": ""}
    defaults.update({c: 0 for c in PHASE_COLUMNS + ("spin_ns", "sleep_ns")})
    arrays = []
    for f in EVENT_FIELDS:
        if f.name in table.column_names:
            col = table.column(f.name)
            if col.type != f.type:
                try:
                    if pa.types.is_dictionary(f.type):
                        col = col.cast(pa.string()).dictionary_encode().cast(f.type)
                    else:
                        col = col.cast(f.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    raise ResultFileError(
                        f"{path}: column {f.name!r} has type {col.type}, expected {f.type}"
                    ) from None
        elif f.name in hive:
            col = pa.array([hive[f.name]] * n, pa.string()).dictionary_encode().cast(f.type)
        elif f.name in defaults:
            col = pa.array([defaults[f.name]] * n, pa.string() if f.name in STRING_COLUMNS else None)
            col = col.dictionary_encode().cast(f.type) if f.name in STRING_COLUMNS else col.cast(f.type)
        else:
            raise ResultFileError(f"{path}: required event column {f.name!r} is missing")
        arrays.append(col)
    fields = list(EVENT_FIELDS)
    for f in table.schema:
        if f.name not in EVENT_SCHEMA.names:
            fields.append(f)
            arrays.append(table.column(f.name))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=table.schema.metadata))


def find_result_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand files and directories into a sorted, de-duplicated list of result files.

    A directory is searched recursively for ``*.arrow``, ``*.ipc``, ``*.feather`` and
    ``*.parquet`` (hidden files, such as the temp files of a write in progress, are skipped).  Raises
    ResultFileError for a path that does not exist or a directory with no result files.
    """
    out: list[Path] = []
    seen: set[Path] = set()
    given = list(paths)
    if not given:
        raise ResultFileError("no result files given; pass .arrow files or directories holding them")
    for p in map(Path, given):
        if not p.exists():
            raise ResultFileError(f"{p}: no such file or directory")
        if p.is_dir():
            found = sorted(
                q for q in p.rglob("*")
                if q.is_file() and q.suffix in RESULT_SUFFIXES
                and not any(part.startswith(".") for part in q.relative_to(p).parts)
                and q.name != "calibration.arrow"  # ptlab calibrate's table, not a run
            )
            if not found:
                raise ResultFileError(
                    f"{p}: directory holds no result files (*.arrow); give the directory a run "
                    f"or sweep wrote into"
                )
        else:
            found = [p]
        for q in found:
            key = q.resolve()
            if key not in seen:
                seen.add(key)
                out.append(q)
    return out


def split_runs(result: RunResult) -> list[RunResult]:
    """The runs inside one file: itself for a single-run file; one RunResult per run id for a
    merged file (metadata from its ``runs`` list; if that is missing every run gets the file's
    metadata with its own run_id and strategy, marked ``meta["derived_meta"] = True``)."""
    ids = pc.unique(result.table.column("run_id").cast(pa.string())).to_pylist()
    runs_meta = result.meta.get("runs")
    if not runs_meta and (not ids or ids == [result.meta.get("run_id")]):
        return [result]
    by_id = {str(m.get("run_id")): m for m in (runs_meta or []) if isinstance(m, dict)}
    top = {k: v for k, v in result.meta.items() if k != "runs"}
    out = []
    run_col = result.table.column("run_id").cast(pa.string())
    for rid in ids:
        events = result.table.filter(pc.equal(run_col, rid))
        if rid in by_id:
            meta = {**top, **by_id[rid]}
        else:
            meta = json.loads(json.dumps(top))
            meta["run_id"] = rid
            strategies = pc.unique(events.column("strategy").cast(pa.string())).to_pylist()
            if len(strategies) == 1:
                meta.setdefault("params", {})["strategy"] = strategies[0]
            meta["derived_meta"] = True
        out.append(RunResult(path=result.path, table=events, meta=meta))
    return out


def read_runs(paths: Iterable[str | os.PathLike[str]]) -> list[RunResult]:
    """Read every result file under ``paths`` (see find_result_files) into one RunResult per
    run (see split_runs).  Raises ResultFileError on the first bad file."""
    runs: list[RunResult] = []
    for p in find_result_files(paths):
        runs.extend(split_runs(read_run(p)))
    return runs


def concat_events(runs: Sequence[RunResult]) -> pa.Table:
    """All events of ``runs`` in one table with unified dictionaries (files write their own
    dictionaries; this makes them one, so pandas gets one Categorical per column).  Extra
    columns that only some runs have are null for the others.  The schema carries no ptlab
    metadata: it describes many runs."""
    if not runs:
        return EVENT_SCHEMA.empty_table()
    tables = [r.table.replace_schema_metadata(None) for r in runs]
    return pa.concat_tables(tables, promote_options="default").unify_dictionaries().combine_chunks()


def read_events(paths: Iterable[str | os.PathLike[str]]) -> pa.Table:
    """concat_events(read_runs(paths)): every event under ``paths`` in one table."""
    return concat_events(read_runs(paths))


def write_merged(runs: Sequence[RunResult], base_dir: str | os.PathLike[str]) -> list[Path]:
    """Write runs as a hive-partitioned Parquet dataset: ``base_dir/strategy=X/part-0.parquet``.

    Each file holds the events of every run of one strategy, without the ``strategy`` column
    (the directory names it, as pyarrow.dataset, DuckDB, Spark and polars expect), and the
    per-run metadata in the ``runs`` list of its ``ptlab`` metadata.  Read it back with
    read_runs(base_dir), ``pyarrow.dataset.dataset(base_dir, format="parquet",
    partitioning="hive")`` or DuckDB's ``read_parquet('base_dir/*/*.parquet',
    hive_partitioning = true)``.  Each file is written atomically.  Returns the files written.
    """
    by_strategy: dict[str, list[RunResult]] = {}
    for r in runs:
        by_strategy.setdefault(r.strategy, []).append(r)
    written = []
    for strategy, group in sorted(by_strategy.items()):
        events = concat_events(group).drop_columns(["strategy"])
        first = group[0].meta
        meta = {
            "run_id": f"merged-{strategy}",
            "kind": first.get("kind", "sim"),
            "params": {"strategy": strategy},
            "host": first.get("host", {}),
            "calibration": [],
            "violations": [],
            "summary": {"runs": len(group)},
            "runs": [{k: v for k, v in r.meta.items() if k not in ("runs", "derived_meta")}
                     for r in group],
        }
        table = events.replace_schema_metadata({METADATA_KEY: encode_meta(meta)})
        written.append(write_table(table, Path(base_dir) / f"strategy={strategy}" / "part-0.parquet"))
    return written


def export_parquet(src: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Write the result file ``src`` (checked on reading) as Parquet at ``dest``: the same
    events and metadata, a fresh checksum.  DuckDB, Spark and polars read Parquet natively.
    Raises ResultFileError."""
    run = read_run(src)
    table = run.table.replace_schema_metadata({METADATA_KEY: encode_meta(run.meta)})
    return write_table(table, dest)
