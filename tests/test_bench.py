"""`ptlab bench`: every step of the targets table is measured, with its target, the host kernel's
figure and the dilation (simulation ÷ kernel); `--json` keeps the numbers with the build that
made them.  No wall-clock assertion: targets are printed, never asserted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from ptlab.cli.main import main
from ptlab.core.analysis import bench
from ptlab.core.analysis.costs import load_costs
from ptlab.core.kernel.strategies import STRATEGIES
from ptlab.core.machine.build import build_info
from ptlab.core.machine.config import PTE_LEVEL_ONLY

STEPS = (
    ["access_tlb_hit", "access_recorded", "fault_anon"]
    + [f"collapse_{s}_o{k}" for s in STRATEGIES for k in (4, 9) if not (k == 9 and s in PTE_LEVEL_ONLY)]
    + ["spin_lock_unlock"]
)


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    return bench.run_bench(scale=0.05)


def dilation_errors(rows: list[dict[str, Any]]) -> list[str]:
    """Rows whose dilation is not their median over their kernel figure (to one decimal)."""
    bad = []
    for r in rows:
        if r["kernel_us"] is None:
            if r["dilation"] is not None:
                bad.append(f"{r['step']}: a dilation without a kernel figure")
            continue
        if r["median_us"] is None or r["dilation"] != round(r["median_us"] / r["kernel_us"], 1):
            bad.append(f"{r['step']}: dilation {r['dilation']} != {r['median_us']} / {r['kernel_us']}")
    return bad


def test_every_step_is_measured_with_its_target(rows):
    assert [r["step"] for r in rows] == STEPS
    for r in rows:
        assert r["n"] > 0 and r["median_us"] > 0 and r["p99_us"] >= r["median_us"], r
        assert r["target_us"] == bench.target_us(r["step"])
        assert r["ok"] == (None if r["target_us"] is None else r["median_us"] <= r["target_us"])
    targets = {r["step"]: r["target_us"] for r in rows}
    assert targets["access_tlb_hit"] == 0.25 and targets["fault_anon"] == 4.0
    assert targets["collapse_pmd-clear_o9"] == 600.0 and targets["spin_lock_unlock"] == 0.06
    assert all(targets[f"collapse_{s}_o4"] == 40.0 for s in STRATEGIES)


def test_dilation_is_simulation_over_kernel(rows):
    table = load_costs(None)
    kr = {"fault_p50_ns": 1500.0, "fault_from": "x-baseline.arrow", "collapse_p50_ns": 200_000.0}
    out = [dict(r) for r in rows]
    bench.add_kernel_columns(out, bench.kernel_figures(table, kr))
    assert all(r["kernel_us"] is not None for r in out), [r["step"] for r in out if r["kernel_us"] is None]
    assert dilation_errors(out) == []
    by = {r["step"]: r for r in out}
    # a `ptlab kernel` result given is what the fault and order-9 rows are held against
    assert by["fault_anon"]["kernel_us"] == 1.5 and "ptlab kernel" in by["fault_anon"]["kernel_from"]
    assert by["collapse_pmd-clear_o9"]["kernel_us"] == 200.0
    assert by["spin_lock_unlock"]["kernel_us"] == round(table.ns("atomic") / 1000, 6)
    assert by["access_tlb_hit"]["kernel_us"] == round(table.ns("load_hit") / 1000, 6)
    assert all("derived" in by[f"collapse_{s}_o4"]["kernel_from"] for s in STRATEGIES)
    # without one, the run the cost table was made from
    alone = bench.kernel_figures(table)
    assert alone["fault_anon"][0] * 1000 == table.meta["kernel_result"]["fault_p50_ns"]
    assert "costs_default.json" in alone["fault_anon"][1]


def test_the_dilation_check_fires_on_a_wrong_column(rows):
    out = [dict(r) for r in rows]
    bench.add_kernel_columns(out, bench.kernel_figures(load_costs(None)))
    out[2] = {**out[2], "dilation": out[2]["dilation"] * 2 + 1}  # kernel ÷ sim, or any other slip
    assert dilation_errors(out) == [f"{out[2]['step']}: dilation {out[2]['dilation']} != {out[2]['median_us']} / {out[2]['kernel_us']}"]


def test_cli_bench_writes_json_with_the_build(tmp_path: Path, monkeypatch, capsys):
    real = bench.run_bench
    monkeypatch.setattr(bench, "run_bench", lambda progress=None: real(progress, scale=0.05))
    f = tmp_path / "bench.json"
    assert main(["bench", "--json", str(f)]) == 0
    out = capsys.readouterr().out
    assert "dilation" in out and build_info().describe() in out
    doc = json.loads(f.read_text())
    assert doc["bench_format"] == bench.BENCH_FORMAT
    assert doc["build"]["build"] == build_info().build in ("compiled", "pure", "mixed")
    assert [r["step"] for r in doc["rows"]] == STEPS
    assert dilation_errors(doc["rows"]) == []


@pytest.mark.parametrize("args, flag", [
    (["--json", "{tmp}"], "--json"),
    (["--json", "{tmp}/no/such/dir/b.json"], "--json"),
    (["--costs", "{tmp}/none.json"], "none.json"),
    (["--kernel-result", "{tmp}/none.arrow"], "--kernel-result"),
])
def test_cli_bench_bad_input_is_one_line(tmp_path: Path, monkeypatch, capsys, args, flag):
    monkeypatch.setattr(bench, "run_bench", lambda progress=None: pytest.fail("measured despite bad input"))
    assert main(["bench", *(a.format(tmp=tmp_path) for a in args)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err and "Traceback" not in err, err
