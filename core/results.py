"""Result files: one Arrow IPC file per run, one row per event, self-describing.

Every file carries, in its schema metadata under the key ``ptlab`` (JSON), the schema version,
the run's parameters, the host fingerprint, the calibration table and the oracle's violations,
so a file read years later still says what produced it (pyperf keeps its format the same way).

Schema history (bump SCHEMA_VERSION and add a line for every change; readers accept every
version listed here and refuse newer ones with a message that says to upgrade):
  1  first format: event columns below; metadata keys schema_version, run_id, kind, params,
     host, calibration, violations, summary.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

SCHEMA_VERSION = 1
SUPPORTED_VERSIONS = (1,)
METADATA_KEY = b"ptlab"

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


class ResultFileError(Exception):
    """A result file is missing, unreadable, corrupt or from a newer ptlab."""


@dataclass(frozen=True)
class RunResult:
    """One result file: its events and its metadata (the decoded ``ptlab`` JSON)."""

    path: Path
    table: pa.Table
    meta: dict[str, Any]


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


def write_table(table: pa.Table, path: str | os.PathLike[str]) -> Path:
    """Write atomically: a temp file in the same directory, fsync, then rename.

    An interrupted write never leaves a half file under the final name.  Raises
    ResultFileError when the directory cannot be created or written.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise ResultFileError(f"cannot write results to {path.parent}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            with ipc.new_file(f, table.schema) as w:
                w.write_table(table)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def write_run(path: str | os.PathLike[str], columns: Mapping[str, Any], meta: Mapping[str, Any]) -> Path:
    """build_table + write_table."""
    return write_table(build_table(columns, meta), path)


def read_run(path: str | os.PathLike[str]) -> RunResult:
    """Read one result file.  Raises ResultFileError with a one-line reason on any problem."""
    path = Path(path)
    if not path.exists():
        raise ResultFileError(f"{path}: no such file")
    try:
        with pa.memory_map(str(path), "r") as src:
            table = ipc.open_file(src).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        raise ResultFileError(f"{path}: not a ptlab Arrow file ({str(e).splitlines()[0]})") from None
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise ResultFileError(f"{path}: Arrow file without ptlab metadata")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise ResultFileError(f"{path}: corrupt ptlab metadata") from None
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
    return RunResult(path=path, table=table, meta=meta)
