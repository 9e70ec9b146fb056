"""The kernel cost table: the committed default, validation, `ptlab calibrate --kernel`.

No timing assertions: measured numbers depend on the host and its load.  What is checked is
that every entry exists with a source, that a bad table is refused with one clear line, and
that the derived entries add back up to the kernel latencies they were derived from.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ptlab.cli.main import main
from ptlab.core.analysis import costs
from ptlab.core.analysis.costs import (
    ENTRIES,
    KINDS,
    CostTable,
    CostTableError,
    load_costs,
    write_costs,
)
from ptlab.core.analysis.results import write_run
from ptlab.core.machine.errors import ConfigError
from ptlab.core.probe import kernel_costs as cal

# --------------------------------------------------------------------------------------------
# the committed default


def test_default_table_has_every_entry_with_a_source() -> None:
    table = load_costs(None)
    assert list(table.entries) == list(ENTRIES)
    for name, e in table.entries.items():
        assert e.ns > 0 and math.isfinite(e.ns), name
        assert e.kind in KINDS, name
        assert e.source.strip(), name
        assert e.source.startswith(e.kind), f"{name}: the source should open with how it was obtained"
    # what a result file embeds says where and when the prices were taken
    d = table.to_dict()
    assert d["cost_format"] == costs.COST_FORMAT
    assert d["meta"]["host"]["cpu_model"] and d["meta"]["date"] and d["meta"]["ptlab_version"]
    assert "path" not in d["meta"]  # where it was read from is not part of the table
    # the entries the issue names as measured are measured on the default host
    for name in ("atomic", "line_transfer", "copy_page", "zero_page", "futex_wake_to_run",
                 "context_switch", "mmap_body", "ipi_round_trip"):
        assert table[name].kind == "measured", name
    assert table.as_ns()["copy_page"] == table.ns("copy_page")


def test_table_round_trips_through_its_json(tmp_path: Path) -> None:
    table = load_costs(None)
    again = CostTable.from_dict(json.loads(json.dumps(table.to_dict())))
    assert again.to_dict() == table.to_dict()
    path = write_costs(table, tmp_path / "t.json")
    assert load_costs(path).to_dict() == table.to_dict()
    assert load_costs(path).meta["path"] == str(path)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temp file left"


def test_unknown_entry_name_is_a_key_error_with_a_suggestion() -> None:
    with pytest.raises(KeyError, match="did you mean 'copy_page'"):
        load_costs(None)["copy_pages"]


# --------------------------------------------------------------------------------------------
# validation: each check, and a table that trips it


def _mutate(fn) -> dict[str, Any]:
    d = copy.deepcopy(load_costs(None).to_dict())
    fn(d)
    return d


BAD = [
    ("missing entry", lambda d: d["entries"].pop("lru_drain"), "missing entry lru_drain"),
    ("two missing", lambda d: [d["entries"].pop(k) for k in ("atomic", "load_hit")], "missing entries load_hit, atomic"),
    ("unknown entry", lambda d: d["entries"].__setitem__("copy_pgae", {"ns": 1.0, "source": "x", "kind": "cited"}),
     "unknown entry 'copy_pgae' \\(did you mean 'copy_page'\\?\\)"),
    ("zero ns", lambda d: d["entries"]["atomic"].__setitem__("ns", 0), "'atomic': ns must be positive"),
    ("negative ns", lambda d: d["entries"]["atomic"].__setitem__("ns", -3.5), "'atomic': ns must be positive"),
    ("NaN ns", lambda d: d["entries"]["atomic"].__setitem__("ns", float("nan")), "'atomic': ns must be a finite number"),
    ("string ns", lambda d: d["entries"]["atomic"].__setitem__("ns", "5"), "'atomic': ns must be a finite number"),
    ("bool ns", lambda d: d["entries"]["atomic"].__setitem__("ns", True), "'atomic': ns must be a finite number"),
    ("no source", lambda d: d["entries"]["tlb_walk"].__setitem__("source", "  "), "'tlb_walk' has no source"),
    ("bad kind", lambda d: d["entries"]["tlb_walk"].__setitem__("kind", "guessed"), "'tlb_walk': kind must be one of measured, cited, derived"),
    ("extra field", lambda d: d["entries"]["tlb_walk"].__setitem__("unit", "ns"), "'tlb_walk' has unknown field 'unit'"),
    ("entry not an object", lambda d: d["entries"].__setitem__("tlb_walk", 5), "'tlb_walk' must be an object"),
    ("format", lambda d: d.__setitem__("cost_format", 99), "cost_format 99 is not supported"),
    ("top-level key", lambda d: d.__setitem__("costs", {}), "unknown top-level key 'costs'"),
    ("entries not an object", lambda d: d.__setitem__("entries", []), "'entries' must be an object"),
]


@pytest.mark.parametrize("what,mutate,needle", BAD, ids=[b[0] for b in BAD])
def test_a_bad_table_is_one_clear_error(tmp_path: Path, what: str, mutate, needle: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_mutate(mutate)))  # NaN is written as NaN, which json reads back
    with pytest.raises(CostTableError, match=needle) as e:
        load_costs(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(path)), msg
    assert isinstance(e.value, ConfigError)  # the CLI turns it into one line, exit code 2


def test_the_unmutated_table_passes_the_same_checks(tmp_path: Path) -> None:
    """The control of the test above: the same file, unchanged, loads."""
    path = tmp_path / "good.json"
    path.write_text(json.dumps(_mutate(lambda d: None)))
    assert list(load_costs(path).entries) == list(ENTRIES)


@pytest.mark.parametrize("content,needle", [
    (None, "no such cost table; write one with `ptlab calibrate --kernel"),
    ("{ not json", "not JSON \\(line 1 column 3"),
    ("[1, 2]", "expected a JSON object"),
    (b"\xff\xfe\x00", "not UTF-8 text"),
])
def test_unreadable_files_are_one_clear_error(tmp_path: Path, content, needle: str) -> None:
    path = tmp_path / "t.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(CostTableError, match=needle) as e:
        load_costs(path)
    assert "\n" not in str(e.value)
    with pytest.raises(CostTableError, match="is a directory"):
        load_costs(tmp_path)


def test_a_table_object_is_validated_on_construction() -> None:
    entries = dict(load_costs(None).entries)
    entries.pop("rwsem_op")
    with pytest.raises(CostTableError, match="missing entry rwsem_op"):
        CostTable(entries=entries)


# --------------------------------------------------------------------------------------------
# a `ptlab kernel` run, built by hand


def _kernel_pair(tmp: Path, *, fault_ns: int = 2_000, collapse_ns: int = 40_000_000) -> tuple[Path, Path]:
    """A baseline and a loaded kernel file of one run, with known medians: same-VMA faults of
    fault_ns in the baseline (the loaded phase's are 10x slower, so using them shows), and
    successful collapses of collapse_ns (plus failed ones of 1 ns that must be ignored)."""
    run_id = "kernel-test-0000"
    files = {"baseline": f"{run_id}-baseline.arrow", "loaded": f"{run_id}-loaded.arrow"}
    out = {}
    for phase in ("baseline", "loaded"):
        rows: list[tuple[str, str, int, int, str, bool]] = []
        f = fault_ns if phase == "baseline" else 10 * fault_ns
        rows += [("app", "fault", 0, f + (i % 3 - 1) * 100, "", False) for i in range(301)]
        rows += [("app", "fault", 1, 99_999, "", False) for _ in range(50)]  # other VMA: ignored
        if phase == "loaded":
            rows += [("khugepaged", "collapse", 0, collapse_ns + (i % 3 - 1) * 1000, "SCAN_SUCCEED", False)
                     for i in range(31)]
            rows += [("khugepaged", "collapse", 0, 1, "EAGAIN", False) for _ in range(40)]
        n = len(rows)
        cols = {
            "run_id": [f"{run_id}-{phase}"] * n, "strategy": ["kernel-madv-collapse"] * n,
            "cpu": [0] * n, "role": [r[0] for r in rows], "op": [r[1] for r in rows],
            "vma": [r[2] for r in rows], "t_start_ns": list(range(n)),
            "latency_ns": [r[3] for r in rows], "sleep_ns": [0] * n, "result": [r[4] for r in rows],
            "order": [9 if r[1] == "collapse" else 0 for r in rows],
            "during_collapse": [r[5] for r in rows],
        }
        meta = {"kind": "kernel", "run_id": f"{run_id}-{phase}",
                "params": {"phase": phase, "loaded": phase == "loaded", "files": files},
                "host": {}, "calibration": {}, "violations": [], "summary": {}}
        out[phase] = write_run(tmp / files[phase], cols, meta)
    return out["baseline"], out["loaded"]


def test_kernel_result_gives_the_baseline_fault_and_the_loaded_collapse(tmp_path: Path) -> None:
    base, loaded = _kernel_pair(tmp_path)
    for given in (base, loaded):  # either file of the run; the other is found beside it
        k = cal.kernel_result_latencies(given)
        assert k["fault_p50_ns"] == 2_000 and k["fault_n"] == 301
        assert k["collapse_p50_ns"] == 40_000_000 and k["collapse_n"] == 31
    base.unlink()  # without the baseline: the loaded phase's faults outside a collapse
    assert cal.kernel_result_latencies(loaded)["fault_p50_ns"] == 20_000


def test_kernel_result_refuses_the_wrong_files(tmp_path: Path) -> None:
    base, loaded = _kernel_pair(tmp_path)
    loaded.unlink()
    with pytest.raises(ConfigError, match="loaded phase .* is neither given nor beside it"):
        cal.kernel_result_latencies(base)
    sim = tmp_path / "sim.arrow"
    write_run(sim, {"run_id": ["s"], "strategy": ["pmd-clear"], "cpu": [0], "role": ["app"],
                    "op": ["fault"], "vma": [0], "t_start_ns": [0], "latency_ns": [1],
                    "result": [""], "order": [0], "during_collapse": [False]},
              {"kind": "sim", "run_id": "s", "params": {}, "host": {}, "calibration": {},
               "violations": [], "summary": {}})
    with pytest.raises(ConfigError, match="not a `ptlab kernel` result \\(kind 'sim'\\)"):
        cal.kernel_result_latencies(sim)
    junk = tmp_path / "junk.arrow"
    junk.write_text("nope")
    with pytest.raises(ConfigError, match="--kernel-result: .*junk.arrow"):
        cal.kernel_result_latencies(junk)


# --------------------------------------------------------------------------------------------
# measuring: `ptlab calibrate --kernel --quick` (short, real, no timing assertions)


def _collapse_total(t: CostTable) -> float:
    """What the table charges an order-9 collapse of 512 present pages, in the parts the
    derivation took out of the kernel's median (see kernel_costs)."""
    online = os.cpu_count() or 1
    ipis = 2 * t.ns("ipi_round_trip") + max(0, online - 2) * t.ns("ipi_per_target") if online > 1 else 0.0
    return (t.ns("collapse_fixed") + 512 * (t.ns("copy_page") + t.ns("collapse_per_page"))
            + t.ns("lru_drain") + t.ns("alloc_page") + 511 * t.ns("alloc_large_per_page") + ipis)


def _fault_total(t: CostTable) -> float:
    return t.ns("fault_entry") + t.ns("zero_page") + t.ns("alloc_page")


@pytest.fixture(scope="module")
def anchored(tmp_path_factory: pytest.TempPathFactory) -> tuple[CostTable, dict[str, Any]]:
    base, _ = _kernel_pair(tmp_path_factory.mktemp("kernel"), fault_ns=50_000, collapse_ns=40_000_000)
    anchor = cal.kernel_result_latencies(base)
    return cal.kernel_costs(quick=True, anchor=anchor), anchor


def test_anchored_table_adds_back_up_to_the_kernels_fault_and_collapse(anchored) -> None:
    table, anchor = anchored
    assert table.meta["kernel_result"]["collapse_p50_ns"] == anchor["collapse_p50_ns"]
    for name in ("fault_entry", "collapse_fixed", "collapse_per_page"):
        assert table[name].kind == "derived" and "CLAMPED" not in table[name].source, table[name].source
        assert "host kernel's median" in table[name].source
    assert _fault_total(table) == pytest.approx(anchor["fault_p50_ns"], rel=1e-9)
    assert _collapse_total(table) == pytest.approx(anchor["collapse_p50_ns"], rel=1e-9)


def test_the_sum_check_fires_on_a_table_that_does_not_add_up(anchored) -> None:
    """The control of the test above: one part changed, the sums no longer match."""
    table, anchor = anchored
    d = table.to_dict()
    d["entries"]["lru_drain"]["ns"] += 1000.0
    d["entries"]["zero_page"]["ns"] *= 2
    off = CostTable.from_dict(d)
    assert _collapse_total(off) != pytest.approx(anchor["collapse_p50_ns"], rel=1e-9)
    assert _fault_total(off) != pytest.approx(anchor["fault_p50_ns"], rel=1e-9)


def test_calibrate_kernel_quick_writes_a_valid_table(tmp_path: Path, capsys) -> None:
    out = tmp_path / "sub" / "costs.json"
    assert main(["calibrate", "--kernel", "--quick", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text.replace("\n", "")
    table = load_costs(out)  # validated: every entry, positive, with a source
    assert table.meta["method"] == "quick" and table.meta["kernel_result"] is None
    assert table.meta["host"]["cores"] >= 1 and table.meta["date"]
    kinds = {e.kind for e in table.entries.values()}
    assert "measured" in kinds and "cited" in kinds
    for name in ("load_hit", "atomic", "copy_page", "zero_page", "futex_wake_to_run",
                 "context_switch", "mmap_body", "futex_syscall", "rwsem_op"):
        assert table[name].kind == "measured", name
    for name in ("tlb_flush_local", "ipi_per_target", "alloc_page"):
        assert table[name].kind == "cited", name
    # unanchored: the fault is this host's own minimal loop
    assert table["fault_entry"].ns + table.ns("zero_page") + table.ns("alloc_page") == pytest.approx(
        table.meta["inputs"]["fault_p50_ns"], rel=1e-9) or "CLAMPED" in table["fault_entry"].source
    # a directory as --out: <dir>/<hostname>.json
    assert main(["calibrate", "--kernel", "--quick", "--out", str(tmp_path)]) == 0
    assert (tmp_path / costs.default_out().name).exists()


@pytest.mark.parametrize("args,needle", [
    (["--kernel-result", "x.arrow"], "--kernel-result needs --kernel"),
    (["--kernel", "--out", "t.txt"], "--out t.txt: a cost table is a JSON file"),
    (["--kernel", "--kernel-result", "/nonexistent/k.arrow"], "--kernel-result /nonexistent/k.arrow: no such file"),
    (["--kernel", "--repeat", "0"], "--repeat must be at least 1 (got 0)"),
    (["--repeat", "2"], "--repeat needs --kernel"),
])
def test_calibrate_kernel_bad_input_is_one_line_and_exit_2(tmp_path: Path, monkeypatch, capsys,
                                                           args: list[str], needle: str) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cal, "kernel_costs", lambda *a, **k: pytest.fail("measured despite bad input"))
    assert main(["calibrate", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_calibrate_kernel_refuses_an_unwritable_out_before_measuring(tmp_path: Path, monkeypatch, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(cal, "kernel_costs", lambda *a, **k: pytest.fail("measured despite bad --out"))
    assert main(["calibrate", "--kernel", "--out", str(blocker / "t.json")]) == 2
    assert "cannot write to --out" in capsys.readouterr().err


def test_lower_quartile_and_median_helpers() -> None:
    assert cal._q25([1.0, 2.0, 3.0, 4.0, 5.0]) == 2.0
    assert cal._p50(np.array([5, 1, 3])) == 3.0


def test_repeat_keeps_each_measurements_least_disturbed_pass() -> None:
    """--repeat: times take the minimum over the passes (interference only adds time), the LRU
    drain the median (a starved load makes it faster, not slower)."""
    one = cal._measure_raw(True, lambda msg, frac: None, 0.0, 1.0)
    quiet, noisy, other = copy.deepcopy(one), copy.deepcopy(one), copy.deepcopy(one)
    noisy["line"], noisy["fault"] = 4 * one["line"] if one["line"] else None, 10 * one["fault"]
    noisy["collapse"] = {k: 3 * v for k, v in one["collapse"].items()}
    quiet["drain"], noisy["drain"], other["drain"] = 1_000.0, 100.0, 30_000.0
    merged = cal._merge_raw([noisy, quiet, other])
    assert merged["line"] == one["line"] and merged["fault"] == one["fault"]
    assert merged["collapse"] == one["collapse"]
    assert merged["drain"] == 1_000.0  # the median pass, not the starved one
    # the control: a single noisy pass is what the table would otherwise get
    assert cal._merge_raw([noisy])["fault"] == 10 * one["fault"]
    table_rows = cal._derive(merged, None, 3).rows
    assert set(table_rows) == set(ENTRIES)
    assert "the least of 3 passes" in table_rows["atomic"][1]
