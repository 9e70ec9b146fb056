"""ptlab compare: statistics that find real differences and say "not significant" otherwise,
host checks, the three output formats, and the CLI's exit codes for good and bad input."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.ipc as ipc
import pytest
import typer
from ptlab.cli import main as cli_main
from ptlab.cli.commands_results import register
from ptlab.core.analysis.compare import (
    NOT_SIGNIFICANT,
    SIGNIFICANT,
    Comparison,
    bootstrap_median_ratio,
    compare_paths,
    harmonic_mean,
    latency_quantiles_us,
    render_markdown,
    render_text,
)
from ptlab.core.analysis.host import IncompatibleHostsError
from ptlab.core.analysis.results import write_run
from ptlab.core.machine.errors import ConfigError

sys.path.insert(0, str(Path(__file__).parent))
from test_results import TEST_HOST, make_run  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _ratio(cmp: Comparison, strategy: str, metric: str) -> dict[str, Any]:
    rows = [r for r in cmp.ratios.to_pylist() if r["strategy"] == strategy and r["metric"] == metric]
    assert len(rows) == 1, rows
    return rows[0]


@pytest.fixture(scope="module")
def three_x(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pmd-clear and migration-entry: same fault latency distribution; ptl-hold: 3x slower."""
    d = tmp_path_factory.mktemp("threex")
    for i in range(2):
        make_run(d / f"pmd-{i}.arrow", "pmd-clear", seed=100 + i)
        make_run(d / f"ptl-{i}.arrow", "ptl-hold", seed=200 + i, fault_scale=3.0)
        make_run(d / f"mig-{i}.arrow", "migration-entry", seed=300 + i)
    return d


# --- statistics ---------------------------------------------------------------------------------


def test_three_times_slower_is_significant(three_x: Path) -> None:
    cmp = compare_paths([three_x])
    assert cmp.baseline == "pmd-clear"
    assert cmp.strategies == ("pmd-clear", "ptl-hold", "migration-entry")
    r = _ratio(cmp, "ptl-hold", "latency:fault")
    assert r["verdict"] == SIGNIFICANT
    assert 2.7 < r["ratio"] < 3.3
    assert r["ci_low"] < r["ratio"] < r["ci_high"] and r["ci_low"] > 2.5 and r["ci_high"] < 3.5
    assert r["p_value"] < 1e-6


def test_same_distribution_is_not_significant(three_x: Path) -> None:
    cmp = compare_paths([three_x])
    r = _ratio(cmp, "migration-entry", "latency:fault")
    assert r["verdict"] == NOT_SIGNIFICANT
    assert r["ci_low"] <= 1.0 <= r["ci_high"]
    assert 0.9 < r["ratio"] < 1.1
    # and the other way round: against ptl-hold as baseline, pmd-clear is 3x faster
    back = compare_paths([three_x], baseline="ptl-hold")
    r = _ratio(back, "pmd-clear", "latency:fault")
    assert r["verdict"] == SIGNIFICANT and 0.3 < r["ratio"] < 0.37
    assert _ratio(back, "migration-entry", "latency:fault")["verdict"] == SIGNIFICANT


def test_latency_table(three_x: Path) -> None:
    cmp = compare_paths([three_x])
    rows = {(r["strategy"], r["op"]): r for r in cmp.latency.to_pylist()}
    fault = rows[("pmd-clear", "fault")]
    assert fault["count"] == 4000 and fault["runs"] == 2
    assert fault["median_us"] < fault["p90_us"] < fault["p99_us"] < fault["p999_us"] <= fault["max_us"]
    assert 4.5 < fault["median_us"] < 5.5
    mmap = rows[("pmd-clear", "mmap")]
    assert mmap["count"] == 400 and mmap["p99_us"] is not None and mmap["p999_us"] is None


def test_quantiles_need_enough_events() -> None:
    q = latency_quantiles_us(np.arange(1, 51, dtype=np.int64) * 1000)
    assert q["count"] == 50 and q["median_us"] == pytest.approx(25.5)
    assert q["p90_us"] is not None and q["p99_us"] is None and q["p999_us"] is None
    assert q["max_us"] == 50.0
    empty = latency_quantiles_us(np.zeros(0, dtype=np.int64))
    assert empty["count"] == 0 and empty["median_us"] is None


def test_harmonic_mean_of_rates() -> None:
    assert harmonic_mean([10.0, 30.0]) == pytest.approx(15.0)
    assert harmonic_mean([10.0, 0.0]) == 0.0
    assert math.isnan(harmonic_mean([]))


def test_rates_are_harmonic_means_over_repeats(tmp_path: Path) -> None:
    # 50 collapses in 5 s and in 1.666.. s: 10/s and 30/s -> harmonic mean 15/s (not 20)
    make_run(tmp_path / "a.arrow", "pmd-clear", seed=1, n_collapses=50, duration_s=5.0)
    make_run(tmp_path / "b.arrow", "pmd-clear", seed=2, n_collapses=50, duration_s=5 / 3)
    cmp = compare_paths([tmp_path])
    rates = {r["metric"]: r for r in cmp.rates.to_pylist()}
    assert rates["collapses_attempted/s"]["hmean_per_s"] == pytest.approx(15.0)
    assert rates["collapses_attempted/s"]["min_per_s"] == pytest.approx(10.0)
    assert rates["collapses_attempted/s"]["runs"] == 2
    ok = sum(r["count"] for r in cmp.results.to_pylist() if r["result"] == "SCAN_SUCCEED")
    assert 0 < rates["collapses_ok/s"]["hmean_per_s"] < 15.0 and ok > 50


def test_rate_ratio_needs_enough_repeats(tmp_path: Path) -> None:
    for i in range(4):
        make_run(tmp_path / f"a{i}.arrow", "pmd-clear", seed=i, n_collapses=40 + i, ops=("collapse",))
        make_run(tmp_path / f"b{i}.arrow", "ptl-hold", seed=10 + i, n_collapses=120 + i, ops=("collapse",))
    r = _ratio(compare_paths([tmp_path]), "ptl-hold", "rate:collapses_attempted/s")
    assert r["verdict"] == SIGNIFICANT and r["ratio"] == pytest.approx(3.0, rel=0.05)
    few = compare_paths(sorted(tmp_path.glob("a[01].arrow")) + sorted(tmp_path.glob("b[01].arrow")))
    assert _ratio(few, "ptl-hold", "rate:collapses_attempted/s")["verdict"].startswith("no test")


def test_waits_per_collapse_by_role(tmp_path: Path) -> None:
    """A hand-made run: 4 collapses; app faults during collapses spin 2 ms and 6 ms in all;
    an mmap() during a collapse sleeps 4 ms; waits outside a collapse do not count."""
    cols = {
        "run_id": ["w"] * 8, "strategy": ["ptl-hold"] * 8,
        "cpu": [0, 0, 0, 1, 1, 2, 2, 2], "role": ["app", "app", "app", "mmap", "mmap"] + ["khugepaged"] * 3,
        "op": ["fault", "fault", "fault", "mmap", "mmap", "collapse", "collapse", "collapse"],
        "t_start_ns": [0, 10, 20, 30, 40, 0, 10, 20],
        "latency_ns": [3_000_000, 5_000_000, 9_000_000, 5_000_000, 1_000, 1, 1, 1],
        "spin_ns": [2_000_000, 4_000_000, 8_000_000, 0, 0, 0, 0, 0],
        "sleep_ns": [0, 0, 0, 4_000_000, 0, 0, 0, 0],
        "waited_on": ["ptl", "ptl", "ptl", "mmap_lock", "", "", "", ""],
        "result": ["ok"] * 5 + ["SCAN_SUCCEED", "SCAN_PAGE_COUNT", "SCAN_SUCCEED"],
        "order": [0] * 5 + [9] * 3,
        "during_collapse": [True, True, False, True, False, False, False, False],
    }
    meta = {"run_id": "w", "kind": "sim", "params": {"strategy": "ptl-hold", "duration_s": 1.0},
            "host": TEST_HOST, "calibration": [], "violations": [], "summary": {}}
    write_run(tmp_path / "w.arrow", cols, meta)
    cmp = compare_paths([tmp_path / "w.arrow"])
    waits = {r["role"]: r for r in cmp.waits.to_pylist()}
    assert set(waits) == {"app", "mmap"}
    assert waits["app"]["collapses"] == 3
    assert waits["app"]["spin_ms_per_collapse"] == pytest.approx(6.0 / 3)
    assert waits["app"]["sleep_ms_per_collapse"] == 0.0
    assert waits["app"]["spin_ms_total"] == pytest.approx(14.0)
    assert waits["app"]["waited_on"] == "ptl" and waits["app"]["waits_during_collapse"] == 2
    assert waits["mmap"]["sleep_ms_per_collapse"] == pytest.approx(4.0 / 3)
    results = {r["result"]: r["count"] for r in cmp.results.to_pylist()}
    assert results == {"SCAN_SUCCEED": 2, "SCAN_PAGE_COUNT": 1}
    rates = {r["metric"]: r["hmean_per_s"] for r in cmp.rates.to_pylist()}
    assert rates["collapses_ok/s"] == 2.0 and rates["collapses_attempted/s"] == 3.0


def test_bootstrap_interval_covers_and_excludes() -> None:
    rng = np.random.default_rng(7)
    a = [rng.lognormal(np.log(100), 0.5, 3000) for _ in range(3)]
    b = [rng.lognormal(np.log(100), 0.5, 3000) for _ in range(3)]
    c = [x * 2 for x in b]
    lo, hi = bootstrap_median_ratio(a, b)
    assert lo < 1.0 < hi
    lo, hi = bootstrap_median_ratio(c, a)
    assert 1.8 < lo < 2.0 < hi < 2.2


def test_runs_with_other_parameters_are_not_pooled(tmp_path: Path) -> None:
    """Order 4 and order 9 runs of a strategy are two groups, each measured against the
    baseline run with the same order; seeds and durations do not split groups."""
    for i in range(2):
        make_run(tmp_path / f"p9-{i}.arrow", "pmd-clear", seed=i, duration_s=2.0 + i)
        make_run(tmp_path / f"t9-{i}.arrow", "ptl-hold", seed=10 + i, fault_scale=3.0)
    make_run(tmp_path / "p4.arrow", "pmd-clear", seed=20, params={"order": 4})
    make_run(tmp_path / "t4.arrow", "ptl-hold", seed=21, params={"order": 4})  # same as pmd-clear
    cmp = compare_paths([tmp_path])
    assert cmp.groups == ("pmd-clear [order=4]", "pmd-clear [order=9]", "ptl-hold [order=4]",
                          "ptl-hold [order=9]")
    assert [n for _, _, n in cmp.group_params] == [1, 2, 1, 2]
    by = {(r["config"], r["metric"]): r for r in cmp.ratios.to_pylist()}
    r9 = by[("order=9", "latency:fault")]
    assert r9["baseline"] == "pmd-clear [order=9]" and r9["verdict"] == SIGNIFICANT
    r4 = by[("order=4", "latency:fault")]
    assert r4["baseline"] == "pmd-clear [order=4]" and r4["verdict"] == NOT_SIGNIFICANT
    text = render_text(cmp)
    assert "Groups" in text and "ptl-hold#2 (vs pmd-clear#2)" in text
    # one baseline group for all, chosen by its label
    fixed = compare_paths([tmp_path], baseline="pmd-clear [order=4]")
    assert {r["baseline"] for r in fixed.ratios.to_pylist()} == {"pmd-clear [order=4]"}


def test_baseline_with_other_parameters_is_noted(tmp_path: Path) -> None:
    make_run(tmp_path / "p.arrow", "pmd-clear", seed=1)
    make_run(tmp_path / "t.arrow", "ptl-hold", seed=2, params={"order": 4})
    cmp = compare_paths([tmp_path])
    assert cmp.groups == ("pmd-clear", "ptl-hold")
    assert any("whose parameters differ (order: 4 vs 9)" in n for n in cmp.notes)


# --- hosts --------------------------------------------------------------------------------------


def test_incompatible_hosts_refused_and_forced(tmp_path: Path) -> None:
    make_run(tmp_path / "a.arrow", "pmd-clear", seed=1)
    make_run(tmp_path / "b.arrow", "ptl-hold", seed=2, host=dict(TEST_HOST, kernel_release="6.9.0"))
    with pytest.raises(IncompatibleHostsError) as e:
        compare_paths([tmp_path])
    msg = str(e.value)
    assert "kernel_release differs" in msg and "--force" in msg and "\n" not in msg
    cmp = compare_paths([tmp_path], force=True)
    assert any("kernel_release" in n for n in cmp.notes)


def test_compatible_hosts_may_differ_in_other_keys(tmp_path: Path) -> None:
    make_run(tmp_path / "a.arrow", "pmd-clear", seed=1)
    make_run(tmp_path / "b.arrow", "ptl-hold", seed=2, host=dict(TEST_HOST, hostname="other", node_id="n9"))
    assert compare_paths([tmp_path]).notes == ()


def test_unknown_baseline(three_x: Path) -> None:
    with pytest.raises(ConfigError, match="--baseline 'nope'.*choose one of: pmd-clear, ptl-hold"):
        compare_paths([three_x], baseline="nope")


def test_notes_for_oversubscription_violations_and_duplicates(tmp_path: Path) -> None:
    a = make_run(tmp_path / "a.arrow", "pmd-clear", seed=1, host=dict(TEST_HOST, oversubscription=2.0),
                 violations=[{"kind": "lost_write", "cpu": 1, "page": 7, "strategy": "pmd-clear",
                              "phase": "copy", "t_ns": 5, "detail": "x"}])
    cmp = compare_paths([tmp_path, a, tmp_path / "a.arrow"])
    assert cmp.runs.num_rows == 1
    assert any("oversubscription up to 2" in n for n in cmp.notes)
    assert any("1 of 1 runs have correctness violations" in n for n in cmp.notes)
    import shutil

    shutil.copy(a, tmp_path / "copy.arrow")
    assert any("counted once" in n for n in compare_paths([tmp_path]).notes)


# --- views --------------------------------------------------------------------------------------


def test_markdown_and_text(three_x: Path) -> None:
    cmp = compare_paths([three_x])
    md = render_markdown(cmp)
    assert "| ptl-hold | latency:fault |" in md and SIGNIFICANT in md and NOT_SIGNIFICANT in md
    assert "## mmap() latency (µs)" in md and "## Who waits for a collapse" in md
    text = render_text(cmp)
    assert "Against pmd-clear" in text and "collapses_ok/s" in text


def test_arrow_output(three_x: Path, tmp_path: Path) -> None:
    from ptlab.core.analysis.compare import write_comparison_arrow

    cmp = compare_paths([three_x])
    path = write_comparison_arrow(cmp, tmp_path / "cmp.arrow")
    t = ipc.open_file(path).read_all()
    meta = json.loads(t.schema.metadata[b"ptlab_compare"])
    assert meta["baseline"] == "pmd-clear" and len(meta["hosts"]) == 1
    rows = t.to_pylist()
    verdict = [r["text"] for r in rows if r["section"] == "ratios" and r["strategy"] == "ptl-hold"
               and r["key"] == "latency:fault" and r["stat"] == "verdict"]
    assert verdict == [SIGNIFICANT]
    p99 = [r["value"] for r in rows if r["section"] == "latency" and r["key"] == "fault" and r["stat"] == "p99_us"]
    assert len(p99) == 3


# --- CLI ----------------------------------------------------------------------------------------


def run_cli(monkeypatch: pytest.MonkeyPatch, *argv: Any) -> int:
    """ptlab.cli.main.main() with only this module's commands registered: the real error
    handling (one line on stderr, exit code) without depending on the other commands."""
    app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
    register(app)
    monkeypatch.setattr(cli_main, "app", app)
    monkeypatch.setattr(cli_main, "_register", lambda: None)
    return cli_main.main([str(a) for a in argv])


def _one_error_line(capsys: pytest.CaptureFixture[str], *needles: str) -> None:
    err = capsys.readouterr().err.strip()
    assert err.startswith("ptlab: error: ") and "\n" not in err and "Traceback" not in err, err
    assert re.search(r"\(see `ptlab( \w+)? --help`\)$", err), f"no usage hint at the end: {err}"
    for n in needles:
        assert n in err, err


def test_cli_compare_formats(three_x: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(monkeypatch, "compare", three_x) == 0
    out = capsys.readouterr().out
    assert "Against pmd-clear" in out and "significant" in out
    assert run_cli(monkeypatch, "compare", three_x, "--format", "md", "--baseline", "ptl-hold") == 0
    assert "Baseline: `ptl-hold`" in capsys.readouterr().out
    assert run_cli(monkeypatch, "compare", three_x, "-f", "md", "-o", tmp_path / "o" / "cmp.md") == 0
    assert (tmp_path / "o" / "cmp.md").read_text().startswith("# ptlab comparison")
    assert run_cli(monkeypatch, "compare", three_x, "-f", "arrow", "-o", tmp_path / "cmp.arrow") == 0
    assert ipc.open_file(tmp_path / "cmp.arrow").read_all().num_rows > 100
    assert run_cli(monkeypatch, "compare", three_x, "-o", tmp_path / "cmp.txt") == 0
    assert "Latency (µs)" in (tmp_path / "cmp.txt").read_text()


def test_cli_compare_bad_input(three_x: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    for cmd in ("compare", "plot", "show"):
        assert run_cli(monkeypatch, cmd) == 2
        _one_error_line(capsys, "no result file")

    assert run_cli(monkeypatch, "compare", tmp_path / "missing.arrow") == 2
    _one_error_line(capsys, "missing.arrow", "no such file")

    (tmp_path / "empty").mkdir()
    assert run_cli(monkeypatch, "compare", tmp_path / "empty") == 2
    _one_error_line(capsys, "holds no result files")

    bad = tmp_path / "bad.arrow"
    bad.write_bytes(b"ARROW1\x00\x00garbage" * 10)
    assert run_cli(monkeypatch, "compare", three_x, bad) == 2
    _one_error_line(capsys, "bad.arrow", "not a ptlab Arrow file")

    assert run_cli(monkeypatch, "compare", three_x, "--baseline", "nope") == 2
    _one_error_line(capsys, "--baseline")

    assert run_cli(monkeypatch, "compare", three_x, "--format", "arrow") == 2
    _one_error_line(capsys, "--out")

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert run_cli(monkeypatch, "compare", three_x, "-o", blocker / "x" / "cmp.md") == 2
    _one_error_line(capsys, "cannot write")

    # a comparison that fails (an unknown baseline) creates nothing under --out: the output
    # directory is made only once there is something to write into it
    out = tmp_path / "new-dir" / "sub" / "cmp.md"
    assert run_cli(monkeypatch, "compare", three_x, "--baseline", "nope", "-o", out) == 2
    _one_error_line(capsys, "--baseline")
    assert not (tmp_path / "new-dir").exists()
    assert run_cli(monkeypatch, "compare", three_x, "-o", out) == 0  # and the same path works
    assert out.exists()


def test_cli_unknown_choice_is_a_usage_error(three_x: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(monkeypatch, "compare", three_x, "--format", "pdf") == 2
    err = capsys.readouterr().err
    assert "pdf" in err and "Traceback" not in err


def test_cli_compare_newer_schema(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    from ptlab.core.analysis.results import SCHEMA_VERSION, read_run, write_table

    t = read_run(make_run(tmp_path / "src" / "a.arrow")).table
    meta = json.loads(t.schema.metadata[b"ptlab"])
    meta["schema_version"] = SCHEMA_VERSION + 1
    write_table(t.replace_schema_metadata({b"ptlab": json.dumps(meta)}), tmp_path / "new.arrow")
    assert run_cli(monkeypatch, "compare", tmp_path / "new.arrow") == 2
    _one_error_line(capsys, "newer ptlab", "upgrade")
    assert run_cli(monkeypatch, "show", tmp_path / "new.arrow") == 2
    _one_error_line(capsys, "newer ptlab")


def test_cli_incompatible_hosts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    make_run(tmp_path / "a.arrow", "pmd-clear", seed=1)
    make_run(tmp_path / "b.arrow", "ptl-hold", seed=2, host=dict(TEST_HOST, cpu_model="Other CPU"))
    assert run_cli(monkeypatch, "compare", tmp_path) == 2
    _one_error_line(capsys, "cpu_model differs", "--force")
    assert run_cli(monkeypatch, "compare", tmp_path, "--force") == 0
    assert "compared anyway" in capsys.readouterr().out


def test_cli_show(three_x: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                  capsys: pytest.CaptureFixture[str]) -> None:
    f = make_run(tmp_path / "v.arrow", "ptl-hold", seed=3,
                 violations=[{"kind": "lost_write", "cpu": 1, "page": 7, "strategy": "ptl-hold",
                              "phase": "copy", "t_ns": 5, "detail": "slot held 3, expected 4"}])
    assert run_cli(monkeypatch, "show", f) == 0
    out = capsys.readouterr().out
    for needle in ("Parameters", "Test CPU 9000", "SCAN_SUCCEED", "lost_write", "dilation", "khugepaged"):
        assert needle in out, needle
    assert run_cli(monkeypatch, "show", tmp_path / "nope.arrow") == 2
    _one_error_line(capsys, "no such file")
    assert run_cli(monkeypatch, "show", three_x) == 2
    _one_error_line(capsys, "is a directory")


@pytest.mark.skipif(importlib.util.find_spec("ptlab.cli.commands_run") is None,
                    reason="the ptlab entry point needs ptlab.cli.commands_run")
def test_installed_entry_point(three_x: Path, tmp_path: Path) -> None:
    exe = REPO / ".venv" / "bin" / "ptlab"
    if not exe.exists():
        pytest.skip("no .venv/bin/ptlab")
    ok = subprocess.run([str(exe), "compare", str(three_x), "--format", "md"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "| ptl-hold | latency:fault |" in ok.stdout
    bad = subprocess.run([str(exe), "compare", str(tmp_path / "nope.arrow")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("ptlab: error: ") and "Traceback" not in bad.stderr


# --- rates, numbers, formats ---------------------------------------------------------------------


def test_access_rate_counts_the_sampled_accesses(tmp_path: Path) -> None:
    """TLB-hit accesses are recorded one in access_sample: access/s scales the count back up
    (without it the rate is 8x low); other ops are recorded in full."""
    make_run(tmp_path / "a.arrow", "pmd-clear", seed=1, duration_s=2.0, n_faults=1000,
             meta_extra={"access_sample": 8})
    rates = {r["metric"]: r["hmean_per_s"] for r in compare_paths([tmp_path]).rates.to_pylist()}
    assert rates["access/s"] == pytest.approx(5 * 1000 * 8 / 2.0)
    assert rates["fault/s"] == pytest.approx(1000 / 2.0)


def test_rates_use_the_measured_duration(tmp_path: Path) -> None:
    make_run(tmp_path / "a.arrow", "pmd-clear", seed=1, duration_s=2.0, n_collapses=50,
             meta_extra={"summary": {"duration_s": 2.5}})
    rates = {r["metric"]: r["hmean_per_s"] for r in compare_paths([tmp_path]).rates.to_pylist()}
    assert rates["collapses_attempted/s"] == pytest.approx(50 / 2.5)


@pytest.mark.parametrize("value, text", [
    (None, "—"), (0, "0"), (5.123, "5.12"), (12.34, "12.3"), (123.4, "123"), (0.05123, "0.0512"),
    (999.6, "1,000"), (1234.5, "1,234"), (1_234_567.0, "1,234,567"), (-12.34, "-12.3"),
    (float("nan"), "—"), (float("inf"), "inf"),
])
def test_one_number_format(value: float | None, text: str) -> None:
    from ptlab.core.analysis.compare import fmt_num

    assert fmt_num(value) == text


def test_tables_use_the_number_format(three_x: Path) -> None:
    """Thousands separators and significant digits in every table (no 1.23e+03)."""
    text = render_text(compare_paths([three_x]))
    assert "e+0" not in text and "4,000" in text  # the fault count of 2 runs
    md = render_markdown(compare_paths([three_x]))
    assert "e+0" not in md
    # 2,000 faults in 2 s per run: 1,000/s, with its separator (the old rate format gave "1000")
    assert "| pmd-clear | fault/s | 2 | 1,000 | 1,000 | 1,000 |" in md, md


def test_mail_text_is_ascii_at_most_72_columns_side_by_side(three_x: Path) -> None:
    from ptlab.core.analysis.compare import render_mail_text

    text = render_mail_text(compare_paths([three_x]))
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 72, max(lines, key=len)
    text.encode("ascii")  # pastes into any mail client
    head = next(line for line in lines if "pmd-clear" in line and "ptl-hold" in line)
    assert head.index("pmd-clear") < head.index("ptl-hold") < head.index("migration-entry")
    fault = next(line for line in lines if line.strip().startswith("fault p50"))
    # ptl-hold is 3x slower and significant, migration-entry the same and not
    assert re.search(r"x(2\.9\d|3\.0\d)\*", fault), fault
    assert re.search(r"x(0\.9\d|1\.0\d)(\s|$)", fault), fault
    assert "significant" in text and "Mann-Whitney" in text


def test_mail_text_wraps_many_groups_and_long_names(tmp_path: Path) -> None:
    from ptlab.core.analysis.compare import render_mail_text

    for i, order in enumerate((2, 3, 4, 5, 6)):
        for s in ("pmd-clear", "migration-entry"):
            make_run(tmp_path / f"{s}-{order}.arrow", s, seed=i, params={"order": order})
    text = render_mail_text(compare_paths([tmp_path]))
    assert max(len(line) for line in text.splitlines()) <= 72
    for order in (2, 3, 4, 5, 6):
        assert f"migration-entry [order={order}]" in text  # the legend names every group whole


def test_json_has_stable_keys(three_x: Path) -> None:
    from ptlab.core.analysis.compare import LATENCY_SCHEMA, RATIOS_SCHEMA, render_json

    cmp = compare_paths([three_x])
    text = render_json(cmp)
    assert text == render_json(compare_paths([three_x]))  # the same files, the same bytes
    doc = json.loads(text)
    assert doc["format"] == "ptlab-compare" and doc["format_version"] == 1
    assert {"baseline", "groups", "notes", "hosts", "runs", "latency", "waits", "rates",
            "results", "ratios"} <= set(doc)
    assert all(set(r) == set(LATENCY_SCHEMA.names) for r in doc["latency"])
    assert all(set(r) == set(RATIOS_SCHEMA.names) for r in doc["ratios"])
    assert any(r["p999_us"] is None for r in doc["latency"])  # missing is null, never NaN
    assert "NaN" not in text


def test_csv_is_the_long_table(three_x: Path) -> None:
    from ptlab.core.analysis.compare import render_csv

    cmp = compare_paths([three_x])
    rows = list(csv.reader(io.StringIO(render_csv(cmp))))
    assert rows[0] == ["section", "strategy", "config", "key", "stat", "value", "text"]
    assert len(rows) - 1 == cmp.to_arrow().num_rows
    verdicts = [r[6] for r in rows if r[0] == "ratios" and r[1] == "ptl-hold"
                and r[3] == "latency:fault" and r[4] == "verdict"]
    assert verdicts == [SIGNIFICANT]


def test_arrow_output_has_a_format_version_and_dictionary_strings(three_x: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    from ptlab.core.analysis.compare import write_comparison_arrow

    t = ipc.open_file(write_comparison_arrow(compare_paths([three_x]), tmp_path / "c.arrow")).read_all()
    meta = json.loads(t.schema.metadata[b"ptlab_compare"])
    assert meta["format_version"] == 1
    for name in ("section", "strategy", "config", "key", "stat", "text"):
        assert pa.types.is_dictionary(t.schema.field(name).type), name
    assert t.schema.field("value").type == pa.float64()


def test_cli_compare_and_show_formats(three_x: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    for fmt in ("text", "json", "csv"):
        assert run_cli(monkeypatch, "compare", three_x, "--format", fmt) == 0
        out = capsys.readouterr().out
        assert out.strip()
    f = sorted(three_x.glob("ptl-*.arrow"))[0]
    assert run_cli(monkeypatch, "show", f, "--format", "json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["checksum"] == "ok" and doc["params"]["strategy"] == "ptl-hold"
    assert {r["op"] for r in doc["events"]} >= {"fault", "access", "collapse"}
    assert run_cli(monkeypatch, "show", f, "--format", "csv") == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows[0] == ["section", "key", "stat", "value"]
    assert ["events", "app/fault", "count", "2000"] in rows
    assert run_cli(monkeypatch, "show", f, "--format", "md") == 0
    assert "| app | fault | 2,000 |" in capsys.readouterr().out


# --- as a user meets it: pipes (subprocesses) ----------------------------------------------------

PTLAB = [sys.executable, "-m", "ptlab.cli.main"]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "COLUMNS": "80", "TERM": "xterm", **extra}


@pytest.mark.parametrize("cmd", [["show", "ptl-0.arrow"], ["compare", "."], ["compare", ".", "-f", "json"],
                                 ["show", "ptl-0.arrow", "-f", "csv"]])
def test_a_closed_pipe_exits_0_quietly(three_x: Path, cmd: list[str]) -> None:
    """``ptlab show X | head -1``: the reader is gone before ptlab writes (the read end is
    closed at once, so every write fails with EPIPE): exit 0, nothing on stderr."""
    import subprocess

    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run([*PTLAB, *cmd], cwd=three_x, stdout=w, stderr=subprocess.PIPE,
                              env=_env(), timeout=300)
    finally:
        os.close(w)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stderr == b""


def test_piped_tables_are_never_cut(tmp_path: Path) -> None:
    """Piped (not a terminal, COLUMNS=80), a table is as wide as its content: a long name or
    value appears whole, never cut with "…"."""
    import subprocess

    long_detail = "slot held 3, expected 4 " + "x" * 150 + " END-OF-DETAIL"
    f = make_run(tmp_path / "v.arrow", "migration-entry", seed=3,
                 params={"inject_bugs": ["migration-refcheck-before-unmap", "migration-no-refcheck"]},
                 violations=[{"kind": "lost_dma_write", "cpu": 1, "page": 7, "strategy": "migration-entry",
                              "phase": "copy", "t_ns": 5, "detail": long_detail}])
    make_run(tmp_path / "p.arrow", "pmd-clear", seed=4)
    out = subprocess.run([*PTLAB, "show", str(f)], capture_output=True, text=True, env=_env(),
                         timeout=300).stdout
    assert "…" not in out and long_detail in out
    assert "migration-refcheck-before-unmap, migration-no-refcheck" in out
    out = subprocess.run([*PTLAB, "compare", str(tmp_path)], capture_output=True, text=True,
                         env=_env(), timeout=300).stdout
    assert "…" not in out and "migration-entry" in out
    assert any(len(line) > 80 for line in out.splitlines())  # wider than the 80 columns


def test_cli_export_parquet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    f = make_run(tmp_path / "run.arrow", "ptl-hold", seed=2)
    assert run_cli(monkeypatch, "export", "--parquet", f) == 0
    assert (tmp_path / "run.parquet").exists()
    assert run_cli(monkeypatch, "export", f) == 2
    _one_error_line(capsys, "--parquet")
    assert run_cli(monkeypatch, "export", "--parquet", f, "--out", f) == 2
    _one_error_line(capsys, "is a file")
    assert run_cli(monkeypatch, "show", tmp_path / "run.parquet", "-f", "json") == 0
    assert json.loads(capsys.readouterr().out)["checksum"] == "ok"
