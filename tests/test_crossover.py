"""`ptlab crossover`: the preset expands to valid virtual cells; the per-cell metrics are right
on hand-made events and agree with a real virtual run's result file; the winner map picks the
lowest value, its margin and the ties the seed-to-seed noise allows; the table round-trips;
bad input is one line; an end-to-end run on the embedded Ray writes the table and figures."""

from __future__ import annotations

import math
import re
import sys

import numpy as np
import pytest
from ptlab.cli.main import main
from ptlab.core.analysis import crossover as X
from ptlab.core.machine.config import RunConfig
from ptlab.core.machine.errors import ConfigError

HINT = re.compile(r"\(see `ptlab crossover --help`\)$")


# ------------------------------------------------------------------------------------ the grid
def test_reference_preset_expands_to_every_cell_once_and_each_is_a_valid_virtual_config():
    p = X.PRESETS["reference"]
    configs = p.configs()
    seed0 = [c for c in configs if c.seed == p.seed and c.cpus["khugepaged"] == 1]
    keys = [(c.ptl, c.strategy, c.vma_stability, c.order, c.cpus["app"]) for c in seed0]
    assert len(keys) == len(set(keys)) == 2 * 5 * 4 * 4  # ptl x variant x order x app CPUs
    assert {(s, v) for _, s, v, _, _ in keys} == set(X.VARIANTS)
    assert {o for *_, o, _ in keys} == {2, 4, 6, 8} and {a for *_, a in keys} == {1, 4, 16, 64}
    for c in configs:
        assert isinstance(c, RunConfig) and RunConfig.from_dict(c.to_dict()) == c  # validates
        assert c.backend == "virtual" and c.warmup_s == 0 and c.quiesce_s == 0
        assert c.cpus["mmap"] == 1 and c.cpus["khugepaged"] in (0, 1) and c.think_ns > 0
        assert c.duration_s == pytest.approx(p.duration_s * max(1, 8 / c.cpus["app"]))
    # every (ptl, app CPUs, seed) that has collapse cells has its no-khugepaged baseline
    need = {(c.ptl, c.cpus["app"], c.seed) for c in configs if c.cpus["khugepaged"]}
    have = {(c.ptl, c.cpus["app"], c.seed) for c in configs if not c.cpus["khugepaged"]}
    assert need == have
    # the noise repeats: split PTL, every variant, another seed
    noise = [c for c in configs if c.seed != p.seed and c.cpus["khugepaged"]]
    assert noise and {c.ptl for c in noise} == {"split"}
    assert len(noise) == len(p.noise_orders) * len(p.noise_apps) * len(X.VARIANTS) * len(p.noise_seeds)


def test_preset_axes_can_be_replaced_and_noise_follows_them():
    p = X.preset("reference", orders=[2, 8], apps=[4], ptls=["mm"], duration_s=0.001)
    configs = p.configs()
    assert {c.order for c in configs if c.cpus["khugepaged"]} == {2, 8}
    assert {c.cpus["app"] for c in configs} == {4} and {c.ptl for c in configs} == {"mm"}
    assert not [c for c in configs if c.seed != p.seed]  # no split cells: no noise repeats
    real = p.real_configs([2, 8], 3.0)
    assert {(c.strategy, c.order) for c in real if c.cpus["khugepaged"]} == {(s, o) for s in X.STRATEGIES for o in (2, 8)}
    assert all(c.backend == "process" and c.cpus["app"] == 1 and c.duration_s == 3.0 for c in real)
    assert [c.cpus["khugepaged"] for c in real].count(0) == 1


@pytest.mark.parametrize("kw,flag", [
    ({"orders": [9]}, "--order 9"), ({"orders": [1]}, "--order 1"), ({"apps": [0]}, "--app 0"),
    ({"apps": [125]}, "--app 125"), ({"ptls": ["both"]}, "--ptl 'both'"),
    ({"duration_s": 0.0}, "--duration"), ({"duration_s": math.inf}, "--duration"),
])
def test_preset_refuses_bad_axes_naming_the_flag(kw, flag):
    with pytest.raises(ConfigError, match=re.escape(flag)):
        X.preset("reference", **kw)
    with pytest.raises(ConfigError, match="--preset 'big'"):
        X.preset("big")


# ------------------------------------------------------------------------------- the metrics
def _events(rows: list[tuple[str, str, int, int, int, int, str, bool]]) -> dict:
    """Columns from (role, op, vma, latency, spin, sleep, result, during) tuples."""
    cols = {k: [] for k in ("role", "op", "vma", "latency_ns", "spin_ns", "sleep_ns", "result", "during_collapse")}
    for role, op, vma, lat, spin, sleep, result, during in rows:
        for k, v in zip(cols, (role, op, vma, lat, spin, sleep, result, during)):
            cols[k].append(v)
    return {"columns": cols}


def _synthetic(khugepaged: int = 1, warmup: float = 0.0, duration: float = 0.5, spin_scale: float = 1.0):
    ev = [("khugepaged", "collapse", 0, 100, 0, 0, "SCAN_SUCCEED", True),
          ("khugepaged", "collapse", 0, 300, 0, 0, "SCAN_SUCCEED", True),
          ("khugepaged", "collapse", 0, 50, 0, 0, "SCAN_PAGE_LOCK", True)][: 3 * khugepaged]
    ev += [("app", "fault", 0, lat, 10, 0, "ok", lat > 90) for lat in range(1, 101)]  # p50 50.5, p99 99.01
    ev += [("app", "fault", 1, 10_000, 7, 0, "ok", False)] * 5  # the other VMA: not in the stall
    ev += [("app", "access", 0, 1_000_000, 0, 0, "ok", False)]  # an access is not a fault
    ev += [("app", "zap", 0, 2_000, 40, 0, "ok", False)] * 2
    ev += [("mmap", op, -1, lat, 3, 1, "ok", False) for op, lat in (("mmap", 10), ("mprotect", 20), ("munmap", 30), ("mmap", 40))]
    ev += [("vma-change", "mprotect", 0, 99_999, 0, 0, "ok", False)]  # not the mmap CPU's
    roles = ["app", "app", "mmap"] + ["khugepaged"] * khugepaged
    spins = [1000, 3000, 500, 4000][: len(roles)]
    meta = {
        "params": {"strategy": "ptl-hold", "vma_stability": "vma-lock", "order": 4, "ptl": "mm", "seed": 3,
                   "backend": "virtual", "duration_s": duration, "warmup_s": warmup,
                   "cpus": {"app": 2, "mmap": 1, "khugepaged": khugepaged}},
        "summary": {"duration_s": duration, "violations": 0},
        "roles": roles,
        "cpu_stats": {f"cpu{i}": {"spin_ns": int(s * spin_scale), "sleep_ns": 100, "sleeps": 1} for i, s in enumerate(spins)},
        "speed": {"wall_s": 2.0, "virtual_ns_per_wall_s": 250_000_000},
    }
    return _events(ev), meta


def test_cell_metrics_on_hand_made_events():
    cols, meta = _synthetic()
    m = X.cell_metrics(cols, meta)
    assert (m["strategy"], m["vma_stability"], m["variant"], m["ptl"], m["order"], m["app_cpus"], m["seed"]) == \
        ("ptl-hold", "vma-lock", "ptl-hold/vma-lock", "mm", 4, 2, 3)
    assert (m["collapses"], m["collapses_ok"]) == (3, 2)
    assert m["collapse_per_s"] == pytest.approx(4.0)  # 2 successful in 0.5 s
    assert m["collapse_p50_ns"] == pytest.approx(200)  # successful ones only
    assert m["spin_total_ns"] == 8500 and m["spin_per_collapse_ns"] == pytest.approx(4250)  # every CPU's spin / 2
    assert m["spin_app_per_collapse_ns"] == pytest.approx(2000)
    assert m["spin_mmap_per_collapse_ns"] == pytest.approx(250)
    assert m["spin_khugepaged_per_collapse_ns"] == pytest.approx(2000)
    assert m["sleep_per_collapse_ns"] == pytest.approx(200) and m["sleeps_per_collapse"] == pytest.approx(2)
    # fault stall: the collapsing VMA's faults only (not the other VMA's, not accesses)
    assert m["faults"] == 100 and m["fault_p50_ns"] == pytest.approx(50.5) and m["fault_p99_ns"] == pytest.approx(99.01)
    assert m["faults_during"] == 10 and m["fault_during_p99_ns"] == pytest.approx(np.percentile(range(91, 101), 99))
    assert m["other_faults"] == 5 and m["other_fault_p99_ns"] == 10_000
    # mmap() stall: the mmap CPU's mmap/mprotect/munmap, pooled
    assert m["mmap_ops"] == 4 and m["mmap_p50_ns"] == pytest.approx(25) and m["mmap_p99_ns"] == pytest.approx(np.percentile([10, 20, 30, 40], 99))
    assert (m["fault_n"], m["fault_spin_ns"], m["zap_n"], m["zap_spin_ns"], m["mmapop_n"], m["mmapop_sleep_ns"]) == (105, 1035, 2, 80, 4, 4)
    assert m["khugepaged_spin_ns"] == 4000
    assert m["virtual_ns_per_wall_s"] == 250_000_000 and m["wall_s"] == 2.0
    assert math.isnan(m["added_spin_per_collapse_ns"])  # until add_baseline


def test_cell_metrics_without_data_are_nan_and_a_warmup_scales_the_cpu_totals():
    cols, meta = _synthetic(khugepaged=0)
    m = X.cell_metrics(cols, meta)
    assert m["strategy"] == X.BASELINE and m["variant"] == X.BASELINE and m["order"] == 0
    assert m["collapses_ok"] == 0 and math.isnan(m["spin_per_collapse_ns"]) and math.isnan(m["collapse_p50_ns"])
    # cpu_stats cover warm-up + duration, the events only the duration: scale the totals
    cols, meta = _synthetic(warmup=0.5, duration=0.5)
    assert X.cell_metrics(cols, meta)["spin_total_ns"] == pytest.approx(8500 / 2)


def test_added_spin_subtracts_the_baseline_per_second_of_the_cell():
    cell = X.cell_metrics(*_synthetic())  # 8500 ns of spin in 0.5 s, 2 collapses
    base = X.cell_metrics(*_synthetic(khugepaged=0, duration=0.25))  # 4500 ns in 0.25 s
    rows = X.add_baseline([cell, base])
    got = next(r for r in rows if r["strategy"] == "ptl-hold")
    assert got["added_spin_per_collapse_ns"] == pytest.approx((8500 - 4500 * 2) / 2)  # -250: can be negative
    assert got["added_sleep_per_collapse_ns"] == pytest.approx((400 - 300 * 2) / 2)
    # another seed's baseline is used only when the cell's own seed has none
    other = dict(base, seed=9, spin_total_ns=0.0)
    assert next(r for r in X.add_baseline([cell, base, other]) if r["strategy"] == "ptl-hold")["added_spin_per_collapse_ns"] == pytest.approx(-250)
    assert next(r for r in X.add_baseline([cell, other]) if r["strategy"] == "ptl-hold")["added_spin_per_collapse_ns"] == pytest.approx(8500 / 2)
    # a different CPU count or PTL mode is no baseline
    assert math.isnan(X.add_baseline([cell, dict(base, app_cpus=4)])[0]["added_spin_per_collapse_ns"])
    assert math.isnan(X.add_baseline([cell, dict(base, ptl="split")])[0]["added_spin_per_collapse_ns"])


def test_metrics_of_a_real_virtual_run_agree_with_its_result_file(tmp_path):
    from ptlab.cluster.cell import run_cell
    from ptlab.core.analysis.results import read_run

    p = X.preset("quick")
    config = p.base_config("ptl-hold", "mmap-lock", 2, 2, "split", 0, duration_s=0.002)
    path = run_cell(config, tmp_path)
    m = X.metrics_from_file(path)
    r = read_run(path)
    df = r.table.select(["op", "vma", "result", "latency_ns"]).to_pandas()
    ok = int(((df.op == "collapse") & (df.result == "SCAN_SUCCEED")).sum())
    assert m["collapses_ok"] == ok == r.meta["summary"]["collapses"].get("SCAN_SUCCEED", 0) > 0
    faults = df[(df.op == "fault") & (df.vma == 0)]
    assert m["faults"] == len(faults) > 0
    assert m["fault_p99_ns"] == pytest.approx(np.percentile(faults.latency_ns, 99))
    assert m["spin_total_ns"] == sum(s["spin_ns"] for s in r.meta["cpu_stats"].values())
    assert m["spin_per_collapse_ns"] == pytest.approx(m["spin_total_ns"] / ok)
    assert m["mmap_ops"] == int(df.op.isin(["mmap", "mprotect", "munmap"]).sum()) > 0
    assert m["violations"] == 0 and m["virtual_ns_per_wall_s"] > 0
    assert (m["strategy"], m["order"], m["app_cpus"], m["backend"]) == ("ptl-hold", 2, 2, "virtual")
    assert m["costs_sha"] == X.digest(r.meta["costs"]["charged"])
    # the same in memory as from the file
    again = run_cell(config, None)
    mem = X.cell_metrics(again, again["meta"])
    for k in ("collapses_ok", "faults", "fault_p99_ns", "spin_total_ns", "mmap_p99_ns"):
        assert mem[k] == pytest.approx(m[k]), k  # deterministic: the same config, the same numbers


# ----------------------------------------------------------------------------------- the map
def _row(strategy, stability, order, app, ptl="split", seed=0, **metrics):
    r = {"backend": "virtual", "strategy": strategy, "vma_stability": stability,
         "variant": X.variant_name(strategy, stability), "ptl": ptl, "order": order, "app_cpus": app, "seed": seed}
    r.update({k: 0 if k in X.INT_COLUMNS else "" if k.endswith("_sha") else math.nan for k in X.METRIC_COLUMNS})
    r.update(metrics)
    return r


def _grid():
    rows = []
    for o in (2, 8):
        for a in (1, 16):
            # ptl-hold burns the most CPU at order 8 / 16 CPUs; migration-entry sleeps
            big = o == 8 and a == 16
            rows += [
                _row("pmd-clear", "mmap-lock", o, a, fault_p99_ns=400.0 if big else 30.0, added_spin_per_collapse_ns=-50_000.0 if big else 9_000.0),
                _row("ptl-hold", "mmap-lock", o, a, fault_p99_ns=100.0 if big else 20.0, added_spin_per_collapse_ns=200_000.0 if big else 10_000.0),
                _row("migration-entry", "mmap-lock", o, a, fault_p99_ns=120.0 if big else 21.0, added_spin_per_collapse_ns=1_000.0 if big else 10_500.0),
            ]
    return rows


def test_winner_map_picks_the_lowest_and_the_margin_to_the_runner_up():
    p = X.winner_map(_grid(), "fault_p99_ns", "split", "mmap-lock")
    assert (p.orders, p.apps) == ((2, 8), (1, 16))
    c = p.cell(8, 16)
    assert (c.winner, c.runner_up) == ("ptl-hold", "migration-entry")
    assert c.margin == pytest.approx(1.2) and c.diff == pytest.approx(20) and not c.tie
    assert c.values == {"pmd-clear": 400.0, "ptl-hold": 100.0, "migration-entry": 120.0}
    assert X.margin_label(c, "fault_p99_ns") == "×1.20"
    c = p.cell(2, 1)
    assert c.winner == "ptl-hold" and c.margin == pytest.approx(21 / 20)
    # the panel for vma-lock has only pmd-clear here: no contest, no winner
    with pytest.raises(ConfigError):
        X.winner_map(_grid(), "fault_p99_ns", "split", "vma-lock")
    only_a = [r for r in _grid() if r["strategy"] == "pmd-clear"] + [_row("ptl-hold", "vma-lock", 2, 1)]
    q = X.winner_map(only_a, "fault_p99_ns", "split", "vma-lock")
    assert q.cell(2, 1).winner == "" and X.margin_label(q.cell(2, 1), "fault_p99_ns") == "n/a"


def test_a_margin_inside_the_seed_to_seed_noise_is_a_tie():
    rows = _grid()
    # seed 1 of (order 8, 16 CPUs): ptl-hold's p99 moves 100 -> 125 (x1.25), pmd-clear 400 -> 410
    rows += [_row("ptl-hold", "mmap-lock", 8, 16, seed=1, fault_p99_ns=125.0, added_spin_per_collapse_ns=230_000.0),
             _row("pmd-clear", "mmap-lock", 8, 16, seed=1, fault_p99_ns=410.0, added_spin_per_collapse_ns=-40_000.0)]
    bands = X.noise_bands(rows)
    assert bands["fault_p99_ns"] == {("ptl-hold/mmap-lock", 16): pytest.approx(1.25), ("pmd-clear", 16): pytest.approx(1.025)}
    assert bands["added_spin_per_collapse_ns"][("ptl-hold/mmap-lock", 16)] == pytest.approx(30_000)  # additive: a difference
    p = X.winner_map(rows, "fault_p99_ns", "split", "mmap-lock", bands=bands["fault_p99_ns"])
    assert p.cell(8, 16).tie and X.margin_label(p.cell(8, 16), "fault_p99_ns") == "≈"  # x1.2 < ptl-hold's x1.25
    assert p.cell(2, 1).tie  # a CPU count without repeats takes its nearest neighbour's band
    assert p.bands == {1: pytest.approx(1.25), 16: pytest.approx(1.25)}
    # the same cell without the noise measurement is a win (the check fires only with the band)
    assert not X.winner_map(rows, "fault_p99_ns", "split", "mmap-lock").cell(8, 16).tie
    # an additive metric whose winner is negative: the difference, not a ratio
    s = X.winner_map(rows, "added_spin_per_collapse_ns", "split", "mmap-lock", bands=bands["added_spin_per_collapse_ns"])
    c = s.cell(8, 16)
    assert (c.winner, c.runner_up, c.tie) == ("pmd-clear", "migration-entry", False)
    assert c.diff == pytest.approx(51_000) and X.margin_label(c, s.metric) == "Δ51µs"
    assert s.cell(2, 1).tie  # 1000 ns apart, inside the 30 µs band
    assert X.win_counts(s)["pmd-clear"] == 1


def test_a_noisy_bystander_does_not_make_a_tie_of_two_steady_strategies():
    rows = _grid()
    rows += [_row("ptl-hold", "mmap-lock", 8, 16, seed=1, fault_p99_ns=101.0),
             _row("migration-entry", "mmap-lock", 8, 16, seed=1, fault_p99_ns=121.0),
             _row("pmd-clear", "mmap-lock", 8, 16, seed=1, fault_p99_ns=4000.0)]  # x10 from seed to seed
    bands = X.noise_bands(rows)["fault_p99_ns"]
    p = X.winner_map(rows, "fault_p99_ns", "split", "mmap-lock", bands=bands)
    assert not p.cell(8, 16).tie  # ptl-hold vs migration-entry: x1.2 against their own x1.01
    assert p.bands[16] == pytest.approx(10)  # the widest band of the column, for the legend


def test_noise_band_of_a_cpu_count_not_repeated_comes_from_its_nearest_neighbours():
    bands = {("ptl-hold", 1): 3.0, ("ptl-hold", 16): 1.5, ("ptl-hold", 64): 1.1, ("pmd-clear", 16): 9.0}
    assert X.band_for(bands, "fault_p99_ns", "ptl-hold", 16) == 1.5
    assert X.band_for(bands, "fault_p99_ns", "ptl-hold", 4) == 3.0  # between 1 and 16: the larger
    assert X.band_for(bands, "fault_p99_ns", "ptl-hold", 48) == 1.1  # nearer 64 than 16 (log scale)
    assert X.band_for(bands, "fault_p99_ns", "ptl-hold", 32) == 1.5  # as near to both: the larger
    assert X.band_for(bands, "fault_p99_ns", "migration-entry/vma-lock", 16) == 9.0  # never repeated
    assert X.band_for({}, "fault_p99_ns", "ptl-hold", 4) == 1.0
    assert X.band_for({}, "added_spin_per_collapse_ns", "ptl-hold", 4) == 0.0


def test_cells_from_different_cost_tables_or_model_sources_are_flagged():
    rows = [_row("ptl-hold", "mmap-lock", 2, 1, costs_sha="aaa", model_sha="m1"),
            _row("pmd-clear", "mmap-lock", 2, 1, costs_sha="aaa", model_sha="m1")]
    assert X.mixed_inputs(rows) == []
    rows.append(_row("migration-entry", "mmap-lock", 2, 1, costs_sha="bbb", model_sha="m1"))
    (problem,) = X.mixed_inputs(rows)
    assert "2 different cost tables" in problem and "aaa (2 cells)" in problem
    rows.append(_row("migration-entry", "vma-lock", 2, 1, costs_sha="aaa", model_sha="m2"))
    assert len(X.mixed_inputs(rows)) == 2
    assert len(X.source_fingerprint()) == 12 and X.source_fingerprint() == X.source_fingerprint()


def test_map_text_and_table_round_trip(tmp_path):
    rows = _grid()
    rows[0]["collapses_ok"] = 7
    path = X.write_metrics(rows, tmp_path / "m.csv")
    back = X.read_metrics(path)
    assert len(back) == len(rows)
    key = lambda r: (r["strategy"], r["order"], r["app_cpus"])  # noqa: E731
    for a, b in zip(sorted(rows, key=key), sorted(back, key=key)):
        for k in X.COLUMNS:
            if isinstance(a[k], float) and math.isnan(a[k]):
                assert math.isnan(b[k]), k
            else:
                assert b[k] == pytest.approx(a[k]) if isinstance(a[k], float) else b[k] == a[k], k
    panels = X.all_panels(back)
    assert [(p.metric, p.contenders, p.ptl, p.stability) for p in panels] == [(m, c, "split", "mmap-lock") for m, c in X.MAP_ROWS]
    text = X.map_text(panels)
    assert text.isascii() and "B x1.20" in text and "A d51us" in text
    # the spin-against-sleep row leaves pmd-clear out: at (order 8, 16 CPUs) C beats B x200
    bc = panels[1]
    assert bc.title == "CPU burned, B vs C" and bc.cell(8, 16).winner == "migration-entry"
    assert bc.cell(8, 16).margin == pytest.approx(200) and "CPU burned, B vs C: PTL split" in text
    with pytest.raises(ConfigError, match="not a crossover metrics table"):
        (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
        X.read_metrics(tmp_path / "bad.csv")


def test_figures_are_drawn(tmp_path):
    rows = _grid()
    out = X.plot_map(X.all_panels(rows), tmp_path / "crossover.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    real = [dict(r, backend="process", spin_per_collapse_ns=5e6) for r in rows if r["app_cpus"] == 1]
    virt = [dict(r, spin_per_collapse_ns=2e4) for r in rows]
    out = X.plot_real(virt, real, tmp_path / "crossover-real.png")
    assert out.stat().st_size > 10_000
    with pytest.raises(ConfigError):
        X.plot_real(virt, [], tmp_path / "x.png")


# ------------------------------------------------------------------------------- the command
BAD = [
    (["--order", "9"], "--order 9"),
    (["--order", "x"], "--order: 'x'"),
    (["--preset", "huge"], "--preset 'huge'"),
    (["--app", "0"], "--app 0"),
    (["--ptl", "both"], "--ptl 'both'"),
    (["--duration", "0"], "--duration"),
    (["--duration", "nan"], "--duration"),
    (["--jobs", "-1"], "--jobs"),
    (["--real-duration", "0"], "--real-duration"),
    (["--from", "/nonexistent-ptlab"], "no crossover table here"),
    (["--from", "/tmp", "--order", "2"], "--from DIR reuses DIR's virtual cells"),
]


@pytest.mark.parametrize("argv,needle", BAD, ids=lambda a: " ".join(a) if isinstance(a, list) else "")
def test_bad_input_is_one_line(argv, needle, capsys, tmp_path):
    import ray

    rc = main(["crossover", *argv, "--out", str(tmp_path / "out"), "--figures", str(tmp_path / "fig")])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert needle in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("ptlab: error: ") and HINT.search(err), err
    assert not (tmp_path / "out").exists() and not ray.is_initialized()


def test_out_naming_a_file_is_one_line(capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    assert main(["crossover", "--out", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--out {f} is a file, not a directory" in err and len(err.splitlines()) == 1


def test_from_redraws_the_map_and_figures(capsys, tmp_path):
    X.write_metrics(_grid(), tmp_path / "metrics.csv")
    assert main(["crossover", "--from", str(tmp_path), "--figures", str(tmp_path / "fig")]) == 0
    out = capsys.readouterr().out
    assert "fault stall: PTL split, B/C with mmap-lock" in out and "B x1.20" in out
    assert (tmp_path / "map.txt").read_text().startswith("A = pmd-clear")
    assert (tmp_path / "fig" / "crossover.png").exists() and not (tmp_path / "fig" / "crossover-real.png").exists()


def test_end_to_end_on_the_embedded_ray(capsys, tmp_path, monkeypatch):
    """Six tiny virtual cells (five variants and the baseline) fanned out as Ray tasks; the
    table, the map, the manifest and the figure come out, with nothing left in /dev/shm."""
    import ray

    rc = main(["crossover", "--preset", "quick", "--order", "2", "--app", "1", "--duration", "0.0005",
               "--out", str(tmp_path / "x"), "--figures", str(tmp_path / "fig"), "--no-progress",
               "--keep-events", str(tmp_path / "ev")])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    rows = X.read_metrics(tmp_path / "x" / "metrics.csv")
    assert sorted(r["variant"] for r in rows) == sorted([X.BASELINE] + [X.variant_name(*v) for v in X.VARIANTS])
    assert all(r["collapses_ok"] > 0 for r in rows if r["strategy"] != X.BASELINE)
    assert all(math.isfinite(r["added_spin_per_collapse_ns"]) for r in rows if r["strategy"] != X.BASELINE)
    assert len(list((tmp_path / "ev").glob("*.arrow"))) == 6
    import json

    doc = json.loads((tmp_path / "x" / "crossover.json").read_text())
    assert doc["cells"] == 6 and doc["costs"]["charged"] and doc["speed"][0]["app_cpus"] == 1
    assert {r["costs_sha"] for r in rows} == {doc["costs"]["sha"]} and len({r["model_sha"] for r in rows}) == 1
    assert (tmp_path / "fig" / "crossover.png").exists()
    assert "CPU burned: PTL split" in cap.out
    assert not ray.is_initialized()  # the command shut down the Ray it started


def test_a_sweep_whose_cells_all_fail_stops_early_and_keeps_the_old_table(capsys, tmp_path, monkeypatch):
    """A broken tree or install fails every cell the same way: the sweep stops after a few,
    says why in one line (exit 3), and the complete table already in --out stays."""
    from ptlab.cli import commands_crossover

    def broken(params, keep):  # defined here, so Ray ships it by value to the workers
        raise RuntimeError("boom: the model cannot be imported")

    monkeypatch.setattr(commands_crossover, "_virtual_cell", broken)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "metrics.csv").write_text("the old, complete table\n")
    rc = main(["crossover", "--preset", "quick", "--out", str(tmp_path / "x"),
               "--figures", str(tmp_path / "fig"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 3
    assert len(err) == 1 and "the first 4 cells failed" in err[0] and "boom" in err[0], err
    assert (tmp_path / "x" / "metrics.csv").read_text() == "the old, complete table\n"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
