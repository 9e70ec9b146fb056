"""Result files: round trip through pyarrow, pandas, polars and DuckDB; atomic writes; refusal
of corrupt and newer files; many files, merged and hive-partitioned directories; host
fingerprints.

``make_run`` writes a synthetic result file with the shape a real run has (test_compare and
test_plots use it too).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
from ptlab.core.analysis import host as hostmod
from ptlab.core.analysis import results
from ptlab.core.analysis.results import (
    EVENT_SCHEMA,
    SCHEMA_VERSION,
    ResultFileError,
    concat_events,
    find_result_files,
    read_events,
    read_meta,
    read_run,
    read_runs,
    write_merged,
    write_run,
    write_table,
)

REPO = Path(__file__).resolve().parent.parent

TEST_HOST: dict[str, Any] = {
    "hostname": "testhost", "cpu_model": "Test CPU 9000", "cores": 2, "cores_usable": 2,
    "kernel_release": "6.1.0-test", "python": "3.11.0",
    "packages": {"ray": "2.40.0", "numpy": "2.0.0", "pyarrow": "26.0.0"},
    "git_revision": "0" * 40, "git_dirty": False, "simulated_cpus": 2, "oversubscription": 1.0,
    "node_id": "node-0",
}

# what a faulting CPU waits on, and how, under each strategy (DESIGN.md table)
_WAIT = {
    "pmd-clear": ("mmap_lock", "sleep"),
    "ptl-hold": ("ptl", "spin"),
    "migration-entry": ("migration", "sleep"),
}


def make_run(
    path: Path,
    strategy: str = "pmd-clear",
    *,
    seed: int = 0,
    fault_scale: float = 1.0,
    n_faults: int = 2000,
    n_mmap: int = 200,
    n_collapses: int | None = None,
    duration_s: float = 2.0,
    host: dict[str, Any] | None = None,
    kind: str = "sim",
    run_id: str | None = None,
    ops: tuple[str, ...] = ("access", "fault", "mmap", "collapse"),
    violations: list[dict[str, Any]] | None = None,
    params: dict[str, Any] | None = None,
    meta_extra: dict[str, Any] | None = None,
) -> Path:
    """Write a synthetic result file (``params`` override the run parameters).  Fault latency
    is lognormal with median 5 µs times ``fault_scale``; a quarter of the faults start during a collapse and wait (spin or sleep
    by strategy); mmap() median 20 µs; collapses ~25/s, 80% SCAN_SUCCEED."""
    rng = np.random.default_rng(seed)
    dur_ns = int(duration_s * 1e9)
    cols: dict[str, list[Any]] = {k: [] for k in (
        "cpu", "role", "op", "t_start_ns", "latency_ns", "spin_ns", "sleep_ns", "waited_on",
        "result", "order", "vma", "addr", "during_collapse", "lock_ns", "unmap_ns", "flush_ns",
        "refcheck_ns", "copy_ns", "install_ns")}
    lock, how = _WAIT.get(strategy, ("mmap_lock", "sleep"))

    def add(n: int, role: str, op: str, cpu: int, lat: np.ndarray, **extra: Any) -> None:
        cols["cpu"] += [cpu] * n
        cols["role"] += [role] * n
        cols["op"] += [op] * n
        cols["t_start_ns"] += np.sort(rng.integers(0, dur_ns, n)).tolist()
        cols["latency_ns"] += lat.astype(np.int64).tolist()
        for k in ("spin_ns", "sleep_ns", "lock_ns", "unmap_ns", "flush_ns", "refcheck_ns",
                  "copy_ns", "install_ns"):
            cols[k] += list(extra.get(k, np.zeros(n, dtype=np.int64)))
        cols["waited_on"] += list(extra.get("waited_on", [""] * n))
        cols["result"] += list(extra.get("result", ["ok"] * n))
        cols["order"] += [extra.get("order", 0)] * n
        cols["vma"] += list(extra.get("vma", [0] * n))
        cols["addr"] += rng.integers(0, 1 << 21, n).tolist()
        cols["during_collapse"] += list(extra.get("during", [False] * n))

    if "access" in ops:
        n = n_faults * 5
        add(n, "app", "access", 0, rng.lognormal(np.log(300), 0.3, n))
    if "fault" in ops:
        lat = rng.lognormal(np.log(5000 * fault_scale), 0.5, n_faults)
        during = rng.random(n_faults) < 0.25
        wait = np.where(during, (lat * 0.6).astype(np.int64), 0)
        add(n_faults, "app", "fault", 0, lat,
            spin_ns=wait if how == "spin" else np.zeros(n_faults, dtype=np.int64),
            sleep_ns=wait if how == "sleep" else np.zeros(n_faults, dtype=np.int64),
            waited_on=np.where(during, lock, "").tolist(), during=during.tolist())
    if "mmap" in ops and n_mmap:
        lat = rng.lognormal(np.log(20_000), 0.4, n_mmap)
        during = rng.random(n_mmap) < 0.25
        sleep = np.where(during & (strategy == "pmd-clear"), lat.astype(np.int64) // 2, 0)
        add(n_mmap, "mmap", "mmap", 1, lat, sleep_ns=sleep,
            waited_on=np.where(sleep > 0, "mmap_lock", "").tolist(), during=during.tolist(),
            vma=[3] * n_mmap)
    if "collapse" in ops:
        n = n_collapses if n_collapses is not None else int(25 * duration_s)
        phases = {k: rng.integers(lo, hi, n) for k, (lo, hi) in {
            "lock_ns": (1_000, 20_000), "unmap_ns": (5_000, 10_000), "flush_ns": (10_000, 30_000),
            "refcheck_ns": (500, 1_000), "copy_ns": (40_000, 80_000), "install_ns": (5_000, 9_000),
        }.items()}
        lat = sum(phases.values()).astype(np.float64) if n else np.zeros(0)
        res = rng.choice(["SCAN_SUCCEED"] * 8 + ["SCAN_PAGE_COUNT", "SCAN_EXCEED_NONE_PTE"], n)
        add(n, "khugepaged", "collapse", 2, lat, result=res.tolist(), order=9, **phases)
    rid = run_id or f"{strategy}-{seed}-{path.stem}"
    meta = {
        "run_id": rid, "kind": kind,
        "params": {"strategy": strategy, "order": 9, "duration_s": duration_s,
                   "cpus": {"app": 1, "mmap": 1, "khugepaged": 1}, "workload": "random",
                   "seed": seed, "flush": "ipi", "ptl": "split", "vma_locks": True,
                   "inject_bugs": [], "unsafe": False, "chaos": False, "page_size": 4096,
                   **(params or {})},
        "host": dict(host if host is not None else TEST_HOST),
        "calibration": [
            {"primitive": "cas", "unit": "ns", "median": 30.0, "p99": 45.0, "reference_median": 5.0, "ratio": 6.0},
            {"primitive": "spin_lock", "unit": "ns", "median": 58.0, "p99": 90.0, "reference_median": 5.6, "ratio": 10.4},
        ],
        "violations": violations or [],
        "summary": {"events": len(cols["cpu"])},
        **(meta_extra or {}),
    }
    n = len(cols["cpu"])
    cols["run_id"] = [rid] * n
    cols["strategy"] = [strategy] * n
    return write_run(path, cols, meta)


@pytest.fixture
def run_file(tmp_path: Path) -> Path:
    return make_run(tmp_path / "run.arrow", "ptl-hold", seed=1)


# --- reading with every tool ----------------------------------------------------------------


def test_pyarrow_reads_and_queries(run_file: Path) -> None:
    table = ipc.open_file(run_file).read_all()
    assert table.schema.remove_metadata() == EVENT_SCHEMA
    meta = json.loads(table.schema.metadata[b"ptlab"])
    assert meta["schema_version"] == SCHEMA_VERSION and meta["params"]["strategy"] == "ptl-hold"
    by_op = table.group_by("op").aggregate([("latency_ns", "count")]).to_pylist()
    counts = {r["op"]: r["latency_ns_count"] for r in by_op}
    assert counts["fault"] == 2000 and counts["access"] == 10000 and counts["collapse"] == 50


def test_pandas_reads_and_queries(run_file: Path) -> None:
    import pandas as pd

    df = pd.read_feather(run_file)
    assert isinstance(df["op"].dtype, pd.CategoricalDtype)
    med = df[df.op == "fault"].groupby("during_collapse")["spin_ns"].median()
    assert med[False] == 0 and med[True] > 0  # ptl-hold: faults during a collapse spin
    df2 = ipc.open_file(run_file).read_pandas()
    assert len(df2) == len(df)


def test_polars_reads_and_queries(run_file: Path) -> None:
    import polars as pl

    df = pl.read_ipc(run_file)
    out = (df.filter(pl.col("role") == "khugepaged")
             .group_by("result").agg(pl.len().alias("n")).sort("n", descending=True))
    assert out["result"][0] == "SCAN_SUCCEED"
    assert out["n"].sum() == 50


def test_duckdb_reads_and_queries(run_file: Path) -> None:
    import duckdb

    events = ipc.open_file(run_file).read_all()  # noqa: F841 (DuckDB finds it by name)
    rows = duckdb.sql(
        "SELECT op, count(*) AS n, quantile_cont(latency_ns, 0.5) / 1e3 AS median_us "
        "FROM events GROUP BY op ORDER BY op"
    ).fetchall()
    by_op = {op: (n, med) for op, n, med in rows}
    assert by_op["fault"][0] == 2000
    assert 3 < by_op["fault"][1] < 8  # lognormal median 5 µs


def test_schema_doc_snippets_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ```python block of results/SCHEMA.md runs against real files."""
    text = (REPO / "results" / "SCHEMA.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 4
    make_run(tmp_path / "run.arrow", "pmd-clear", seed=2)
    runs = [read_run(make_run(tmp_path / "src" / f"{s}.arrow", s, seed=i))
            for i, s in enumerate(("pmd-clear", "ptl-hold"))]
    write_merged(runs, tmp_path / "sweep" / "merged")
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "SCHEMA.md", "exec"), {})


def test_read_meta_and_run_properties(run_file: Path) -> None:
    meta = read_meta(run_file)
    assert meta["host"]["cpu_model"] == "Test CPU 9000"
    r = read_run(run_file)
    assert r.strategy == "ptl-hold" and r.kind == "sim" and r.duration_s == 2.0
    assert r.run_id == meta["run_id"]


# --- atomic writes ------------------------------------------------------------------------------


def _dir_names(d: Path) -> set[str]:
    return {p.name for p in d.iterdir()}


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(results.os, "fsync", boom)
    with pytest.raises(OSError):
        make_run(tmp_path / "a.arrow")
    assert _dir_names(tmp_path) == set()


def test_interrupted_write_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_run(tmp_path / "a.arrow", seed=3)
    before = path.read_bytes()
    real_new_file = ipc.new_file

    class Interrupting:
        def __init__(self, sink: Any, schema: pa.Schema, **kw: Any) -> None:
            self.w = real_new_file(sink, schema, **kw)

        def __enter__(self) -> Interrupting:
            return self

        def __exit__(self, *exc: Any) -> None:
            pass

        def write_table(self, table: pa.Table) -> None:
            self.w.write_table(table.slice(0, 10))  # half the work done, then ^C
            raise KeyboardInterrupt

    monkeypatch.setattr(results.ipc, "new_file", Interrupting)
    with pytest.raises(KeyboardInterrupt):
        make_run(tmp_path / "a.arrow", seed=4)
    assert _dir_names(tmp_path) == {"a.arrow"}
    assert path.read_bytes() == before


def test_unwritable_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ResultFileError, match="cannot write"):
        make_run(blocker / "sub" / "a.arrow")


# --- refusing bad files -------------------------------------------------------------------------


def test_newer_schema_refused(run_file: Path, tmp_path: Path) -> None:
    table = read_run(run_file).table
    meta = json.loads(table.schema.metadata[b"ptlab"])
    meta["schema_version"] = SCHEMA_VERSION + 1
    newer = write_table(table.replace_schema_metadata({b"ptlab": json.dumps(meta)}), tmp_path / "new.arrow")
    with pytest.raises(ResultFileError) as e:
        read_run(newer)
    msg = str(e.value)
    assert "newer ptlab" in msg and "upgrade" in msg and "\n" not in msg
    with pytest.raises(ResultFileError, match="newer"):
        read_meta(newer)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_file_refused(run_file: Path, tmp_path: Path, damage: str) -> None:
    bad = tmp_path / "bad.arrow"
    data = run_file.read_bytes()
    bad.write_bytes({"garbage": os.urandom(4096), "truncated": data[: len(data) // 2], "empty": b""}[damage])
    with pytest.raises(ResultFileError, match="not a ptlab Arrow file") as e:
        read_run(bad)
    assert "\n" not in str(e.value)


def test_foreign_arrow_file_refused(tmp_path: Path) -> None:
    p = write_table(pa.table({"x": [1, 2]}), tmp_path / "foreign.arrow")
    with pytest.raises(ResultFileError, match="without ptlab metadata"):
        read_run(p)


def test_missing_inputs(tmp_path: Path) -> None:
    with pytest.raises(ResultFileError, match="no such file"):
        read_run(tmp_path / "nope.arrow")
    with pytest.raises(ResultFileError, match="no such file"):
        read_runs([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(ResultFileError, match="holds no result files"):
        read_runs([tmp_path / "empty"])
    with pytest.raises(ResultFileError, match="is a directory"):
        read_run(tmp_path / "empty")


def test_old_file_without_optional_columns_still_reads(tmp_path: Path) -> None:
    """Columns a reader can default (phases, vma, addr, during_collapse) may be absent."""
    keep = ["run_id", "strategy", "cpu", "role", "op", "t_start_ns", "latency_ns", "waited_on", "result", "order"]
    full = read_run(make_run(tmp_path / "full.arrow", seed=5)).table
    old = full.select(keep)
    old = old.replace_schema_metadata(full.schema.metadata)
    r = read_run(write_table(old, tmp_path / "old.arrow"))
    assert r.table.schema.remove_metadata() == EVENT_SCHEMA
    assert pc.sum(r.table.column("copy_ns")).as_py() == 0
    assert pc.min(r.table.column("vma")).as_py() == -1


# --- many files ---------------------------------------------------------------------------------


def test_find_result_files_recurses_and_skips_temp_files(tmp_path: Path) -> None:
    a = make_run(tmp_path / "d" / "a.arrow", seed=1)
    b = make_run(tmp_path / "d" / "sub" / "b.arrow", seed=2)
    (tmp_path / "d" / ".b.arrow.x1y2.tmp").write_bytes(b"partial")
    (tmp_path / "d" / ".hidden.arrow").write_bytes(b"partial")
    assert find_result_files([tmp_path / "d", a]) == [a, b]


def test_concat_unifies_differing_dictionaries(tmp_path: Path) -> None:
    import pandas as pd

    r1 = read_run(make_run(tmp_path / "a.arrow", "pmd-clear", seed=1, ops=("fault",)))
    r2 = read_run(make_run(tmp_path / "b.arrow", "ptl-hold", seed=2, ops=("collapse", "mmap")))
    events = concat_events([r1, r2])
    assert events.num_rows == r1.table.num_rows + r2.table.num_rows
    assert events.column("op").num_chunks == 1
    assert set(events.column("op").chunk(0).dictionary.to_pylist()) == {"fault", "collapse", "mmap"}
    df = events.to_pandas()
    assert isinstance(df["strategy"].dtype, pd.CategoricalDtype)
    assert df.groupby("strategy", observed=True).size().to_dict() == {
        "pmd-clear": r1.table.num_rows, "ptl-hold": r2.table.num_rows}
    assert read_events([tmp_path]).num_rows == events.num_rows


def test_merged_hive_directory_round_trip(tmp_path: Path) -> None:
    import duckdb

    src = [read_run(make_run(tmp_path / "src" / f"{s}-{i}.arrow", s, seed=10 * k + i))
           for k, s in enumerate(("pmd-clear", "ptl-hold")) for i in range(2)]
    written = write_merged(src, tmp_path / "merged")
    assert sorted(p.parent.name for p in written) == ["strategy=pmd-clear", "strategy=ptl-hold"]
    assert all(p.suffix == ".parquet" for p in written)
    assert "strategy" not in pq.read_schema(written[0]).names
    back = read_runs([tmp_path / "merged"])
    assert sorted((r.run_id, r.strategy, r.table.num_rows) for r in back) == sorted(
        (r.run_id, r.strategy, r.table.num_rows) for r in src)
    by_id = {r.run_id: r for r in src}
    assert all(r.params == by_id[r.run_id].params and r.host == by_id[r.run_id].host for r in back)
    dataset = ds.dataset(tmp_path / "merged", format="parquet", partitioning="hive")  # noqa: F841
    n = duckdb.sql("SELECT strategy, count(*) FROM dataset GROUP BY ALL ORDER BY 1").fetchall()
    assert [s for s, _ in n] == ["pmd-clear", "ptl-hold"]
    # and DuckDB reads the directory itself, no Python objects in between
    glob = str(tmp_path / "merged" / "*" / "*.parquet")
    n2 = duckdb.sql(f"SELECT strategy, count(*) FROM read_parquet('{glob}', hive_partitioning = true) "
                    "GROUP BY ALL ORDER BY 1").fetchall()
    assert n2 == n


def test_pyarrow_dataset_written_directory(tmp_path: Path) -> None:
    """A directory written by pyarrow.dataset.write_dataset (partition column dropped, one
    metadata block for many runs) carries no checksum of its own content: refused, saying
    so.  Sealed again by ptlab's writer (which computes the checksum), it reads, each run with
    its own id and strategy."""
    src = [read_run(make_run(tmp_path / "src" / f"{s}.arrow", s, seed=i))
           for i, s in enumerate(("pmd-clear", "migration-entry"))]
    merged = concat_events(src).replace_schema_metadata(src[0].table.schema.metadata)
    ds.write_dataset(merged, tmp_path / "out", format="arrow", partitioning=["strategy"],
                     partitioning_flavor="hive")
    with pytest.raises(ResultFileError, match="no content checksum.*rewritten by another tool"):
        read_runs([tmp_path / "out"])
    for f in (tmp_path / "out").rglob("*.arrow"):
        write_table(ipc.open_file(f).read_all(), f)  # seal: ptlab's writer adds the checksum
    back = {r.run_id: r for r in read_runs([tmp_path / "out"])}
    assert set(back) == {r.run_id for r in src}
    for r in src:
        assert back[r.run_id].strategy == r.strategy
        assert back[r.run_id].table.num_rows == r.table.num_rows
    assert all(r.meta.get("derived_meta") for r in back.values() if r.strategy != "pmd-clear")


# --- host fingerprint ---------------------------------------------------------------------------


def test_fingerprint_has_the_keys() -> None:
    fp = hostmod.fingerprint(simulated_cpus=4, node_id="n1")
    for k in ("hostname", "cpu_model", "cores", "kernel_release", "python", "packages",
              "git_revision", "oversubscription", "simulated_cpus", "node_id"):
        assert k in fp
    assert set(fp["packages"]) >= {"ray", "numpy", "pyarrow"}
    assert fp["oversubscription"] == pytest.approx(4 / fp["cores_usable"], rel=1e-2)
    json.dumps(fp)


def test_fingerprint_without_git(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_git(*a: Any, **k: Any) -> Any:
        raise FileNotFoundError("git")

    monkeypatch.setattr(hostmod.subprocess, "run", no_git)
    assert hostmod.git_revision() == (None, None)


def test_host_compatibility() -> None:
    other = dict(TEST_HOST, hostname="elsewhere", python="3.12.0", node_id="node-1")
    assert hostmod.incompatibilities(TEST_HOST, other) == []
    diff = hostmod.incompatibilities(TEST_HOST, dict(TEST_HOST, cores=64, kernel_release="6.9"))
    assert [m.key for m in diff] == ["cores", "kernel_release"]
    old = {k: v for k, v in TEST_HOST.items() if k != "kernel_release"}
    assert hostmod.incompatibilities(TEST_HOST, dict(old, kernel_release=None)) == []
    with pytest.raises(hostmod.IncompatibleHostsError, match="cpu_model differs.*--force"):
        hostmod.check_compatible([("a", TEST_HOST), ("b", dict(TEST_HOST, cpu_model="Other"))])
    found = hostmod.check_compatible([("a", TEST_HOST), ("b", dict(TEST_HOST, cores=8))], force=True)
    assert len(found) == 1 and "a" in str(found[0]) and "b" in str(found[0])


def test_git_revision_of_this_checkout() -> None:
    if subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    rev, dirty = hostmod.git_revision()
    assert rev and len(rev) == 40 and dirty in (True, False)


def test_sweep_layout_with_cell_columns(tmp_path: Path) -> None:
    """A sweep's layout: cells/<id>.arrow plus merged/strategy=X/part-<id>.arrow, one run per
    part, the strategy column left out and cell_* columns added.  Reading the whole sweep
    directory gives each run once per file; the extra columns survive."""
    from ptlab.core.analysis.compare import compare_paths

    for i, s in enumerate(("pmd-clear", "ptl-hold")):
        cell = read_run(make_run(tmp_path / "sweep" / "cells" / f"c{i}.arrow", s, seed=i))
        part = cell.table.drop_columns(["strategy"])
        part = part.append_column("cell_id", pa.array([f"c{i}"] * part.num_rows).dictionary_encode())
        part = part.append_column("cell_order", pa.array([9] * part.num_rows, pa.int8()))
        write_table(part, tmp_path / "sweep" / "merged" / f"strategy={s}" / f"part-c{i}.arrow")
    merged = read_runs([tmp_path / "sweep" / "merged"])
    assert sorted(r.strategy for r in merged) == ["pmd-clear", "ptl-hold"]
    assert all(r.table.column_names[-2:] == ["cell_id", "cell_order"] for r in merged)
    events = read_events([tmp_path / "sweep" / "merged", tmp_path / "sweep" / "cells" / "c0.arrow"])
    assert events.column("cell_id").null_count == merged[0].table.num_rows  # c0 from cells/
    cmp = compare_paths([tmp_path / "sweep"])
    assert cmp.runs.num_rows == 2
    assert any("each run counted once" in n for n in cmp.notes)


# --- file modes, checksums, Parquet -------------------------------------------------------------


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_files_are_written_0644(tmp_path: Path, umask_022: None) -> None:
    """Result files are readable by the other users of a shared machine, like the sweep's
    (mkstemp's 0600 would hide them); the umask still applies."""
    f = make_run(tmp_path / "a.arrow")
    assert f.stat().st_mode & 0o777 == 0o644
    p = results.export_parquet(f, tmp_path / "a.parquet")
    assert p.stat().st_mode & 0o777 == 0o644
    old = os.umask(0o077)
    try:
        assert make_run(tmp_path / "b.arrow").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def _flip(data: bytes, i: int) -> bytes:
    return data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1:]


def _same(a: results.RunResult, b: results.RunResult) -> bool:
    return a.meta == b.meta and a.table.equals(b.table)


@pytest.mark.parametrize("suffix", [".arrow", ".parquet"])
def test_a_flipped_byte_is_an_error_never_a_changed_number(tmp_path: Path, suffix: str) -> None:
    """Flip one byte anywhere (500 positions spread over the whole file): reading either
    raises ResultFileError or gives exactly the original events and metadata (a flip in
    padding or in unused bytes)."""
    src = make_run(tmp_path / "src.arrow", "ptl-hold", seed=5, n_faults=300, n_mmap=30)
    if suffix == ".parquet":
        src = results.export_parquet(src, tmp_path / "src.parquet")
    good = read_run(src)
    data = src.read_bytes()
    bad = tmp_path / f"bad{suffix}"
    refused = silent = 0
    positions = range(0, len(data), max(1, len(data) // 500))
    for i in positions:
        bad.write_bytes(_flip(data, i))
        try:
            r = read_run(bad)
        except ResultFileError as e:
            assert "\n" not in str(e)
            refused += 1
            continue
        assert _same(r, good), f"byte {i} of {len(data)}: a changed file read as valid"
        silent += 1
    assert refused > len(positions) // 2, (refused, silent)


def _rewrite_without_sealing(table: pa.Table, path: Path) -> Path:
    """Write ``table`` with its metadata as is (checksum included): a file changed after
    ptlab wrote it, with nothing else noticing."""
    with open(path, "wb") as f, ipc.new_file(f, table.schema) as w:
        w.write_table(table)
    return path


def test_checksum_catches_a_changed_latency_and_a_changed_metadata_value(tmp_path: Path) -> None:
    src = make_run(tmp_path / "a.arrow", "ptl-hold", seed=7)
    raw = ipc.open_file(src).read_all()
    assert raw.schema.metadata[results.CHECKSUM_KEY].startswith(b"sha256:")
    # one latency one nanosecond longer, everything else (the stored checksum too) unchanged
    lat = raw.column("latency_ns").to_numpy().copy()
    lat[123] += 1
    changed = raw.set_column(raw.schema.get_field_index("latency_ns"), "latency_ns", pa.array(lat))
    bad = _rewrite_without_sealing(changed, tmp_path / "lat.arrow")
    with pytest.raises(ResultFileError, match="checksum mismatch"):
        read_run(bad)
    # a metadata value that still parses (the duration, which every rate divides by)
    meta = raw.schema.metadata[results.METADATA_KEY]
    assert b'"duration_s": 2.0' in meta
    edited = raw.replace_schema_metadata({**raw.schema.metadata,
                                          results.METADATA_KEY: meta.replace(b'"duration_s": 2.0', b'"duration_s": 3.0')})
    with pytest.raises(ResultFileError, match="checksum mismatch"):
        read_run(_rewrite_without_sealing(edited, tmp_path / "meta.arrow"))
    # the checksum itself gone: refused too (a version-2 file always has one)
    stripped = raw.replace_schema_metadata({results.METADATA_KEY: meta})
    with pytest.raises(ResultFileError, match="no content checksum"):
        read_run(_rewrite_without_sealing(stripped, tmp_path / "none.arrow"))
    with pytest.raises(ResultFileError, match="checksum"):
        read_meta(bad)  # every reader checks


def test_without_the_check_a_changed_latency_reads_silently(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The variant that shows the check above is what fires: with verification switched off,
    the same edited file reads and reports the changed latency as if measured."""
    src = make_run(tmp_path / "a.arrow", "ptl-hold", seed=7)
    raw = ipc.open_file(src).read_all()
    lat = raw.column("latency_ns").to_numpy().copy()
    lat[123] += 1_000_000
    changed = raw.set_column(raw.schema.get_field_index("latency_ns"), "latency_ns", pa.array(lat))
    bad = _rewrite_without_sealing(changed, tmp_path / "lat.arrow")
    monkeypatch.setattr(results, "verify_checksum", lambda *a, **k: None)
    r = read_run(bad)
    assert r.table.column("latency_ns")[123].as_py() == lat[123]


def test_checksum_does_not_depend_on_chunks_dictionaries_or_format(tmp_path: Path) -> None:
    t = read_run(make_run(tmp_path / "a.arrow", seed=3)).table
    t = t.replace_schema_metadata({results.METADATA_KEY: b'{"x": 1}'})
    base = results.content_checksum(t)
    rechunked = pa.Table.from_batches(t.to_batches(max_chunksize=777))
    assert results.content_checksum(rechunked) == base
    # the same strings under another dictionary order (as Parquet hands them back)
    op = t.column("op").cast(pa.string())
    reordered = pa.DictionaryArray.from_arrays(
        pa.array([sorted(set(op.to_pylist()), reverse=True).index(v) for v in op.to_pylist()], pa.int32()),
        pa.array(sorted(set(op.to_pylist()), reverse=True)))
    t2 = t.set_column(t.schema.get_field_index("op"), "op", reordered)
    assert results.content_checksum(t2) == base
    # but one value more or less is another sum
    assert results.content_checksum(t.slice(1)) != base


def test_export_parquet_reads_back_the_same_and_duckdb_scans_it(tmp_path: Path) -> None:
    import duckdb

    src = make_run(tmp_path / "run.arrow", "ptl-hold", seed=9)
    p = results.export_parquet(src, tmp_path / "run.parquet")
    a, b = read_run(src), read_run(p)
    assert a.table.equals(b.table) and a.meta == b.meta
    rows = duckdb.sql(f"""SELECT op, "order", count(*) AS n FROM read_parquet('{p}')
                          GROUP BY ALL ORDER BY n DESC""").fetchall()
    assert rows[0] == ("access", 0, 10_000) and ("collapse", 9, 50) in rows
    assert find_result_files([tmp_path]) == [src, p]


def test_sample_factor_and_measured_duration(tmp_path: Path) -> None:
    r = read_run(make_run(tmp_path / "a.arrow", meta_extra={"access_sample": 8,
                                                            "summary": {"duration_s": 1.5}}))
    assert r.sample_factor("access") == 8 and r.sample_factor("fault") == 1
    assert r.duration_s == 1.5  # measured, not the nominal params.duration_s (2.0)
    assert read_run(make_run(tmp_path / "b.arrow")).sample_factor("access") == 1


def test_version_1_files_without_checksum_still_read(tmp_path: Path) -> None:
    t = read_run(make_run(tmp_path / "a.arrow", seed=2)).table
    meta = json.loads(t.schema.metadata[b"ptlab"])
    meta["schema_version"] = 1
    old = _rewrite_without_sealing(t.replace_schema_metadata({b"ptlab": json.dumps(meta).encode()}),
                                   tmp_path / "v1.arrow")
    r = read_run(old)
    assert r.meta["schema_version"] == SCHEMA_VERSION and r.table.num_rows == t.num_rows


# --- results/SCHEMA.md against the code, both ways ----------------------------------------------


def _doc_names(heading: str) -> set[str]:
    """Backticked names in the first column of the table under ``### heading`` of SCHEMA.md."""
    text = (REPO / "results" / "SCHEMA.md").read_text()
    m = re.search(rf"^#+ {re.escape(heading)}\n(.*?)(?=^#+ |\Z)", text, re.S | re.M)
    assert m, f"results/SCHEMA.md has no section '{heading}'"
    names = set()
    for line in m.group(1).splitlines():
        cell = re.match(r"\|\s*((?:`[^`]+`(?:,\s*)?)+)\s*\|", line)
        if cell:
            names.update(re.findall(r"`([^`]+)`", cell.group(1)))
    return names


def _both_ways(documented: set[str], in_code: set[str], what: str, where: str) -> None:
    missing, stale = sorted(in_code - documented), sorted(documented - in_code)
    assert not missing, (f"results/SCHEMA.md does not document these {what} that {where} has: "
                         f"{missing} -- add a row for each")
    assert not stale, (f"results/SCHEMA.md documents {what} that {where} does not have: {stale} "
                       "-- remove them or fix their spelling")


def test_schema_doc_lists_every_op_role_result_and_wait() -> None:
    from ptlab.core.machine import events

    _both_ways(_doc_names("Ops"), set(events.OPS), "ops", "core/machine/events.py OPS")
    _both_ways(_doc_names("Roles"), set(events.ROLES), "roles", "core/machine/events.py ROLES")
    _both_ways(_doc_names("Result codes"), set(events.RESULTS), "result codes", "core/machine/events.py RESULTS")
    _both_ways(_doc_names("Waited on"), set(events.WAITED) - {""}, "waited_on values",
               "core/machine/events.py WAITED")


def test_schema_doc_lists_every_metadata_key_and_parameter() -> None:
    import dataclasses

    from ptlab.core.machine.config import RunConfig

    _both_ways(_doc_names("Metadata"), set(results.METADATA_KEYS), "metadata keys",
               "core/analysis/results.py METADATA_KEYS")
    _both_ways(_doc_names("Run parameters"), {f.name for f in dataclasses.fields(RunConfig)},
               "run parameters", "core/machine/config.py RunConfig")
    _both_ways({c for c in _doc_names("Event columns")}, set(EVENT_SCHEMA.names), "event columns",
               "core/analysis/results.py EVENT_SCHEMA")


def test_schema_doc_check_can_fail() -> None:
    """The comparison above fires, either way round."""
    with pytest.raises(AssertionError, match=r"does not document.*'scan'"):
        _both_ways({"access"}, {"access", "scan"}, "ops", "OPS")
    with pytest.raises(AssertionError, match=r"does not have.*'bogus'"):
        _both_ways({"access", "bogus"}, {"access"}, "ops", "OPS")


def test_workload_names_agree() -> None:
    from ptlab.core.machine.config import WORKLOADS
    from ptlab.workloads.patterns import Workload

    assert set(WORKLOADS) == {w.value for w in Workload}


@pytest.mark.usefixtures("ray_local")
def test_a_real_run_writes_only_documented_metadata(tmp_path: Path, umask_022: None) -> None:
    """A short real run (two CPU processes): its metadata keys and summary keys are all
    documented; it stores the measured duration and the absolute start time; its file is
    0644 and carries a checksum."""
    import time as _time

    from ptlab.cluster.cell import run_cell
    from ptlab.core.machine.config import RunConfig

    before = _time.time()
    f = run_cell(RunConfig(strategy="pmd-clear", order=4, duration_s=0.5, warmup_s=0.1,
                           cpus={"app": 1, "khugepaged": 1}), tmp_path)
    r = read_run(f)
    undocumented = set(r.meta) - set(results.METADATA_KEYS)
    assert not undocumented, f"a run writes metadata keys that SCHEMA.md does not document: {undocumented}"
    summary_doc = _doc_names("Summary")
    assert set(r.meta["summary"]) <= summary_doc, set(r.meta["summary"]) - summary_doc
    assert 0.3 < r.meta["summary"]["duration_s"] <= 0.5 + 0.5
    assert r.duration_s == r.meta["summary"]["duration_s"]
    assert before < r.meta["t0_unix_ns"] / 1e9 < _time.time()
    assert r.meta["started_at"].endswith("+00:00")
    assert f.stat().st_mode & 0o777 == 0o644
    assert ipc.open_file(f).schema.metadata[results.CHECKSUM_KEY].startswith(b"sha256:")


def test_readme_reading_results_snippet_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """README's "Reading the results" example -- DuckDB on a sweep's Parquet dataset, with
    "order" quoted -- runs as printed, against files laid out as ptlab writes them."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Reading the results", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    make_run(tmp_path / "results" / "runs" / "ptl-hold-o4.arrow", "ptl-hold", seed=1)
    runs = [read_run(make_run(tmp_path / "src" / f"{s}.arrow", s, seed=i, params={"order": 4}))
            for i, s in enumerate(("pmd-clear", "ptl-hold", "migration-entry"))]
    write_merged(runs, tmp_path / "results" / "sweeps" / "big" / "merged")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "ptl-hold" in out and "migration-entry" in out and "collapse" in out
