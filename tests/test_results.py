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
import pytest
from ptlab.core import host as hostmod
from ptlab.core import results
from ptlab.core.results import (
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
    assert "strategy" not in ipc.open_file(written[0]).schema.names
    back = read_runs([tmp_path / "merged"])
    assert sorted((r.run_id, r.strategy, r.table.num_rows) for r in back) == sorted(
        (r.run_id, r.strategy, r.table.num_rows) for r in src)
    by_id = {r.run_id: r for r in src}
    assert all(r.params == by_id[r.run_id].params and r.host == by_id[r.run_id].host for r in back)
    dataset = ds.dataset(tmp_path / "merged", format="arrow", partitioning="hive")  # noqa: F841
    n = duckdb.sql("SELECT strategy, count(*) FROM dataset GROUP BY ALL ORDER BY 1").fetchall()
    assert [s for s, _ in n] == ["pmd-clear", "ptl-hold"]


def test_pyarrow_dataset_written_directory(tmp_path: Path) -> None:
    """A directory written by pyarrow.dataset.write_dataset (partition column dropped, one
    metadata block for many runs) still reads, each run with its own id and strategy."""
    src = [read_run(make_run(tmp_path / "src" / f"{s}.arrow", s, seed=i))
           for i, s in enumerate(("pmd-clear", "migration-entry"))]
    merged = concat_events(src).replace_schema_metadata(src[0].table.schema.metadata)
    ds.write_dataset(merged, tmp_path / "out", format="arrow", partitioning=["strategy"],
                     partitioning_flavor="hive")
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
    from ptlab.core.compare import compare_paths

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
