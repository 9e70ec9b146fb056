"""`ptlab kernel` and `ptlab fidelity`: the live kernel's MADV_COLLAPSE in ptlab's schema.

The probe runs for real on the local kernel (about four seconds, both phases); it is skipped,
with the host's own reason, only where the kernel cannot collapse.  Timing relations are what
the benchmark reports; the tests check structure, counts and the refusals.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path

import numpy as np
import pytest
import typer
from ptlab.cli import commands_kernel
from ptlab.core.analysis.results import ResultFileError, read_run, write_run
from ptlab.core.machine.errors import ConfigError
from ptlab.core.probe import kernel_probe as kp

# --------------------------------------------------------------------------------------------
# helpers


def _app() -> typer.Typer:
    app = typer.Typer(pretty_exceptions_enable=False)

    @app.callback()
    def _root() -> None:
        """ptlab (test app)."""

    commands_kernel.register(app)
    return app


def _invoke(*args: str) -> None:
    _app()(args=list(args), standalone_mode=False)


def synthetic_sim(path: Path, *, strategy: str = "pmd-clear", seed: int = 1, order: int = 9,
                  host: dict | None = None) -> Path:
    """A simulated pmd-clear run, built by hand: collapses of ~4 ms every ~8 ms; same-VMA
    faults that start inside a collapse wait for its end, other-VMA faults do not; mmap()
    during a collapse waits for it too (all about 20x slower than the kernel)."""
    rng = np.random.default_rng(seed)
    n_coll = 200
    c_start = np.arange(n_coll, dtype=np.int64) * 8_000_000 + rng.integers(0, 1_000_000, n_coll)
    c_lat = rng.integers(3_500_000, 4_500_000, n_coll).astype(np.int64)
    c_end = c_start + c_lat
    horizon = int(c_end[-1])

    def events(n: int, base_ns: int, waits: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        t = np.sort(rng.integers(0, horizon, n)).astype(np.int64)
        i = np.searchsorted(c_start, t, side="right") - 1
        during = (i >= 0) & (t < c_end[np.maximum(i, 0)])
        lat = rng.integers(base_ns, base_ns * 3, n).astype(np.int64)
        if waits:
            lat[during] += (c_end[i[during]] - t[during])
        return t, lat, during

    cols: dict[str, list] = {k: [] for k in (
        "cpu", "role", "op", "t_start_ns", "latency_ns", "sleep_ns", "result", "order", "vma",
        "during_collapse")}

    def add(role: str, op: str, vma: int, cpu: int, t, lat, during, result: str = "", order_: int = 0,
            sleep=None) -> None:
        n = len(t)
        cols["cpu"] += [cpu] * n
        cols["role"] += [role] * n
        cols["op"] += [op] * n
        cols["t_start_ns"] += list(t)
        cols["latency_ns"] += list(lat)
        cols["sleep_ns"] += list(sleep if sleep is not None else np.zeros(n, dtype=np.int64))
        cols["result"] += [result] * n
        cols["order"] += [order_] * n
        cols["vma"] += [vma] * n
        cols["during_collapse"] += list(during)

    add("khugepaged", "collapse", 0, 0, c_start, c_lat, np.zeros(n_coll, bool), "SCAN_SUCCEED", order)
    t, lat, d = events(20_000, 25_000, waits=True)
    add("app", "fault", 0, 1, t, lat, d, sleep=np.where(d, lat - 25_000, 0))
    t, lat, d = events(20_000, 25_000, waits=False)
    add("app", "fault", 1, 1, t, lat, d)
    t, lat, d = events(3_000, 40_000, waits=True)
    add("mmap", "mmap", -1, 1, t, lat, d)
    n = len(cols["cpu"])
    meta = {"kind": "sim", "run_id": f"sim-{strategy}", "params": {"strategy": strategy},
            "host": host or {}, "calibration": {}, "violations": [], "summary": {}}
    return write_run(path, {"run_id": [f"sim-{strategy}"] * n, "strategy": [strategy] * n, **cols}, meta)


# --------------------------------------------------------------------------------------------
# the probe on this kernel


@pytest.fixture(scope="module")
def kernel_run(tmp_path_factory: pytest.TempPathFactory) -> kp.KernelRun:
    try:
        host = kp.check_host()
    except ConfigError as e:
        pytest.skip(f"this kernel cannot collapse: {e}")
    thp_before = kp.thp_settings()
    out = tmp_path_factory.mktemp("kernel")
    config = kp.ProbeConfig(duration_s=1.5, warmup_s=0.2, ranges=4)
    seen: list[tuple[str, float, float]] = []
    run = kp.run_probe(config, out, host_check=host,
                       progress=lambda phase, elapsed, total: seen.append((phase, elapsed, total)))
    assert kp.thp_settings() == thp_before, "the probe must not change /sys"
    assert {p for p, _, _ in seen} == {"baseline", "loaded"}
    assert seen[-1][1] == seen[-1][2]  # the last report says the phase is complete
    return run


def test_probe_writes_one_file_per_phase_with_every_role(kernel_run: kp.KernelRun) -> None:
    loaded, baseline = read_run(kernel_run.loaded), read_run(kernel_run.baseline)
    for run, phase in ((loaded, "loaded"), (baseline, "baseline")):
        assert run.meta["kind"] == "kernel"
        assert run.meta["params"]["phase"] == phase
        assert run.meta["params"]["loaded"] is (phase == "loaded")
        assert run.meta["params"]["files"] == {p: Path(kernel_run.files[p]).name for p in kp.PHASES}
        host = run.meta["host"]
        assert host["thp"]["enabled"] in ("always", "madvise")
        assert "max_ptes_none" in host["thp"]["khugepaged"] and host["thp"]["mthp"]
        assert host["kernel_release"]
        assert set(run.table.column("strategy").to_pylist()) == {kp.STRATEGY}
        t = run.table.column("t_start_ns").to_numpy()
        assert (t >= 0).all() and (np.diff(t) >= 0).all()

    pin_ok = loaded.meta["params"]["pin_source"]["enabled"]
    roles = set(loaded.table.column("role").to_pylist())
    expected = {"khugepaged", "app", "mmap"} | ({"gup-fast"} if pin_ok else set())
    assert roles == expected, loaded.meta["params"]["pin_source"]["how"]
    assert set(baseline.table.column("role").to_pylist()) == expected - {"khugepaged"}

    ev = kp.Events.from_table(loaded.table)
    n_coll = int(ev.select(op="collapse").sum())
    assert n_coll > 0
    summary = loaded.meta["summary"]["collapse"]
    assert summary["count"] == n_coll
    assert sum(summary["results"].values()) == n_coll
    assert set(summary["results"]) <= {kp.SUCCEED} | set(errno.errorcode.values())
    assert summary["succeeded"] > 0, f"no collapse succeeded: {summary['results']}"
    assert set(ev.order[ev.select(op="collapse")]) == {9}
    assert set(ev.vma[ev.select(op="fault")]) == {kp.VMA_COLLAPSING, kp.VMA_OTHER}
    assert ev.select(op="fault", during=True).any() and ev.select(op="fault", during=False).any()
    assert not kp.Events.from_table(baseline.table).during.any(), "no collapse runs in the baseline"


# --------------------------------------------------------------------------------------------
# pieces


def test_collapse_mask_marks_events_that_start_inside_a_collapse() -> None:
    starts = np.array([100, 10], dtype=np.int64)  # unsorted on purpose
    lats = np.array([50, 20], dtype=np.int64)  # [10, 30) and [100, 150)
    t = np.array([-5, 10, 29, 30, 99, 100, 149, 150, 1000], dtype=np.int64)
    got = kp.collapse_mask(t, starts, lats).tolist()
    assert got == [False, True, True, False, False, True, True, False, False]
    assert kp.collapse_mask(t, starts[:0], lats[:0]).tolist() == [False] * len(t)


@pytest.mark.parametrize(
    ("cores", "expected"),
    [
        ([0, 1], {"collapser": 0, "fault-same": 1, "fault-other": 1, "mmap": 1, "pin": 1}),
        ([0, 1, 2], {"collapser": 0, "fault-same": 1, "fault-other": 2, "mmap": 1, "pin": 2}),
        (list(range(8)), {"collapser": 0, "fault-same": 1, "fault-other": 2, "mmap": 3, "pin": 4}),
        ([3], {"collapser": 3, "fault-same": 3, "fault-other": 3, "mmap": 3, "pin": 3}),
    ],
)
def test_placement_keeps_the_collapser_core_to_itself(cores: list[int], expected: dict[str, int]) -> None:
    assert kp.placement(cores, [k.name for k in kp.THREADS]) == expected


def test_events_to_columns_maps_ops_roles_and_results() -> None:
    rec = np.zeros(4, dtype=kp.EVENT_DTYPE)
    rec["t"] = [-10, 0, 5, 40]
    rec["lat"] = [30, 20, 100, 5]
    rec["op"] = [0, 0, 0, 0]
    rec["err"] = [0, 0, errno.EAGAIN, 0]
    rec["aux"] = [0, 1, 2, 3]
    faults = np.zeros(3, dtype=kp.EVENT_DTYPE)
    faults["t"] = [1, 30, 200]
    faults["lat"] = [1, 1, 1]
    faults["op"] = 1
    faults["aux"] = [7, 8, 9]
    faults["flags"] = [kp.FLAG_VOLUNTARY, kp.FLAG_INVOLUNTARY, 0]
    faults["sleep"] = [1, 0, 0]
    raw = {"threads": [
        {"kind": "collapser", "cpu": 0, "pinned": True, "events": rec.tobytes(), "n": 4, "overflow": 0},
        {"kind": "fault-other", "cpu": 1, "pinned": False, "events": faults.tobytes(), "n": 3, "overflow": 0},
    ]}
    cols = kp.events_to_columns(raw, "r")
    assert list(cols["t_start_ns"]) == [0, 1, 5, 30, 40, 200]  # warm-up dropped, start order
    assert list(cols["op"]) == ["collapse", "fault", "collapse", "fault", "collapse", "fault"]
    assert list(cols["result"]) == ["SCAN_SUCCEED", "", "EAGAIN", "", "SCAN_SUCCEED", ""]
    assert list(cols["role"]) == ["khugepaged", "app", "khugepaged", "app", "khugepaged", "app"]
    assert list(cols["vma"]) == [0, 1, 0, 1, 0, 1]
    assert list(cols["cpu"]) == [0, -1, 0, -1, 0, -1]
    # fault at 1 is inside [0, 20); at 30 inside [5, 105); at 200 in none
    assert list(cols["during_collapse"]) == [False, True, False, True, False, False]
    assert list(cols["waited_on"]) == ["", "sleep", "", "preempted", "", ""]
    assert list(cols["addr"]) == [kp.PMD_SIZE, 7 * 4096, 2 * kp.PMD_SIZE, 8 * 4096, 3 * kp.PMD_SIZE,
                                  9 * 4096]


# --------------------------------------------------------------------------------------------
# graceful limits: one clear line (ConfigError -> exit 2), nothing changed


def _thp_dir(tmp_path: Path, enabled: str) -> Path:
    d = tmp_path / "transparent_hugepage"
    (d / "khugepaged").mkdir(parents=True)
    (d / "enabled").write_text(enabled + "\n")
    (d / "defrag").write_text("always defer defer+madvise [madvise] never\n")
    (d / "hpage_pmd_size").write_text(f"{kp.PMD_SIZE}\n")
    (d / "khugepaged" / "max_ptes_none").write_text("511\n")
    return d


def _ok_check() -> dict[str, int]:
    return {"hugepage_errno": 0, "collapse_errno": 0, "tries": 1, "thp_disable": 0}


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"system": "Darwin"}, "this host runs Darwin"),
        ({"release": "5.15.0-91-generic"}, "has no MADV_COLLAPSE (it came in Linux 6.1)"),
        ({"release": "6.0.19"}, "has no MADV_COLLAPSE"),
    ],
)
def test_check_host_refuses_hosts_without_madv_collapse(tmp_path: Path, kwargs, needle: str) -> None:
    thp = _thp_dir(tmp_path, "always [madvise] never")
    with pytest.raises(ConfigError, match=re.escape(needle)):
        kp.check_host(thp_dir=thp, collapse_check=_ok_check, **kwargs)


def test_check_host_refuses_thp_never_and_says_sys_is_not_changed(tmp_path: Path) -> None:
    thp = _thp_dir(tmp_path, "always madvise [never]")
    with pytest.raises(ConfigError) as e:
        kp.check_host(system="Linux", release="6.18.0", thp_dir=thp, collapse_check=_ok_check)
    msg = str(e.value)
    assert "'never'" in msg and "never changes /sys" in msg and "\n" not in msg
    assert (thp / "enabled").read_text() == "always madvise [never]\n"


def test_check_host_refuses_kernel_without_thp(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no transparent hugepages"):
        kp.check_host(system="Linux", release="6.18.0", thp_dir=tmp_path / "absent",
                      collapse_check=_ok_check)


@pytest.mark.parametrize(
    ("check", "needle"),
    [
        ({"collapse_errno": errno.EINVAL}, "does not support MADV_COLLAPSE"),
        ({"collapse_errno": errno.EINVAL, "thp_disable": 1}, "PR_SET_THP_DISABLE"),
        ({"hugepage_errno": errno.EINVAL}, "MADV_HUGEPAGE) fails"),
    ],
)
def test_check_host_refuses_what_the_kernel_refuses(tmp_path: Path, check, needle: str) -> None:
    thp = _thp_dir(tmp_path, "[always] madvise never")
    with pytest.raises(ConfigError, match=re.escape(needle)):
        kp.check_host(system="Linux", release="6.18.0", thp_dir=thp,
                      collapse_check=lambda: {**_ok_check(), **check})


def test_check_host_accepts_transient_collapse_failures(tmp_path: Path) -> None:
    thp = _thp_dir(tmp_path, "always [madvise] never")
    got = kp.check_host(system="Linux", release="6.18.0", thp_dir=thp,
                        collapse_check=lambda: {**_ok_check(), "collapse_errno": errno.EAGAIN})
    assert got["thp"]["enabled"] == "madvise" and got["collapse_check"]["collapse_errno"] == errno.EAGAIN


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--duration", "0"], "--duration must be"),
        (["--ranges", "0"], "--ranges must be"),
        (["--zap-pages", "3"], "--zap-pages must divide 512"),
        (["--gap-us", "-1"], "--gap-us must be"),
    ],
)
def test_kernel_command_rejects_bad_options(args: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        _invoke("kernel", *args)


def test_kernel_command_refuses_unwritable_out_before_measuring(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(kp, "check_host", lambda **_: {"thp": {"enabled": "madvise", "defrag": "madvise",
                                                              "khugepaged": {}}})
    monkeypatch.setattr(kp, "_run_phase", lambda *a, **k: pytest.fail("measured before checking --out"))
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot write results to"):
        _invoke("kernel", "--out", str(blocker / "sub"), "--duration", "1")


def test_main_turns_a_refusal_into_one_line_and_exit_2(monkeypatch, capsys) -> None:
    from ptlab.cli import main as cli_main

    monkeypatch.setattr(cli_main, "app", _app())
    monkeypatch.setattr(cli_main, "_register", lambda: None)
    monkeypatch.setattr(kp, "check_host", lambda **_: (_ for _ in ()).throw(
        ConfigError("kernel 5.10 has no MADV_COLLAPSE (it came in Linux 6.1); run ptlab kernel on a newer kernel")))
    assert cli_main.main(["kernel", "--duration", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ptlab: error: kernel 5.10 has no MADV_COLLAPSE") and err.count("\n") == 1


# --------------------------------------------------------------------------------------------
# fidelity


def test_fidelity_sets_the_kernel_beside_a_simulated_run(kernel_run: kp.KernelRun, tmp_path: Path,
                                                         capsys) -> None:
    sim = synthetic_sim(tmp_path / "sim.arrow")
    report = kp.fidelity([sim, kernel_run.loaded])  # order free; the baseline is found beside
    assert report.baseline_file == kernel_run.baseline
    rows = {r.metric: r for r in report.rows}
    assert rows["collapses"].sim == 200 and rows["collapses"].kernel > 0
    assert report.sim_collapse_p50_us == pytest.approx(4000, rel=0.1)
    same_during = rows["same-VMA fault, during collapse p99"]
    assert same_during.sim > 1000  # the synthetic run waits for the collapse
    assert rows["same-VMA fault, no collapse p50"].kernel_idle is not None
    ratio = rows["same-VMA fault during÷no collapse p99"]
    assert ratio.unit == "×" and ratio.sim > 10 and ratio.sim_p is not None and ratio.sim_p < 0.05
    assert rows["other-VMA fault during÷no collapse p50"].sim == pytest.approx(1.0, abs=0.1)
    assert rows["same-VMA fault asleep per collapse"].sim > 0
    assert rows["other-VMA fault asleep per collapse"].sim == 0
    assert set(report.headline()) == {"collapse p50", "same-VMA fault p50, no collapse"}
    assert report.dilation(rows["collapse p50 (SCAN_SUCCEED)"]) > 1
    assert report.relation(same_during) is not None

    _invoke("fidelity", str(kernel_run.loaded), str(sim), "--format", "md")
    md = capsys.readouterr().out
    assert "| metric | kernel idle | kernel |" in md
    assert "| same-VMA fault, during collapse p99.9 (µs) |" in md
    assert md.count("\n|") >= len(report.rows) + 1
    assert "dilation (sim ÷ kernel): collapse p50 ×" in md
    _invoke("fidelity", str(kernel_run.loaded), str(kernel_run.baseline), str(sim))
    assert "sim/kernel" in capsys.readouterr().out


def test_fidelity_refuses_the_wrong_files(kernel_run: kp.KernelRun, tmp_path: Path) -> None:
    sim = synthetic_sim(tmp_path / "sim.arrow")
    other = synthetic_sim(tmp_path / "ptl.arrow", strategy="ptl-hold")
    cases = [
        ([sim, tmp_path / "sim2.arrow"], ResultFileError, "no such file"),
        ([kernel_run.loaded, kernel_run.baseline], ConfigError, "needs a simulated result"),
        ([sim, synthetic_sim(tmp_path / "sim3.arrow")], ConfigError, "needs a kernel result"),
        ([kernel_run.baseline, sim], ConfigError, "is a baseline"),
        ([kernel_run.loaded, other], ConfigError, "has no pmd-clear events"),
        ([kernel_run.loaded, sim, other], ConfigError, "give one simulated result file"),
    ]
    for paths, exc, needle in cases:
        with pytest.raises(exc, match=needle):
            kp.fidelity(paths)
    with pytest.raises(ConfigError, match="needs a kernel result file and a simulated"):
        _invoke("fidelity", str(sim))


def test_fidelity_notes_another_order_and_another_host(kernel_run: kp.KernelRun, tmp_path: Path) -> None:
    sim = synthetic_sim(tmp_path / "sim-o4.arrow", order=4, host={"cpu_model": "Some Other CPU"})
    notes = kp.fidelity([kernel_run.loaded, sim]).notes
    assert any("order(s) [4]" in n for n in notes)
    assert any("another host" in n and "Some Other CPU" in n for n in notes)
