"""ptlab sweep: the grid, placement on a cluster, node loss, Ctrl-C, resume, bad input.

Cells run ``ptlab.cluster.drycell.dry_cell`` (sleeps for the cell's duration, writes a valid
result file recording its Ray node), so the tests exercise the sweep and not the simulator.
Single-node tests share the session's embedded Ray (``ray_local``); the two-node cluster and
the Ctrl-C test run in subprocesses with their own Ray, so nothing clashes with the session's.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from ptlab.cluster.drycell import dry_cell
from ptlab.cluster.grid import SweepSpec, cell_id, expand, load_toml, repeat_seed
from ptlab.cluster.shmclean import sweep_shm
from ptlab.cluster.sweep import run_sweep
from ptlab.core.analysis.results import read_run
from ptlab.core.machine.config import RunConfig
from ptlab.core.machine.errors import ConfigError

TESTS = Path(__file__).resolve().parent
PY = sys.executable
ONE_CPU = ({"app": 1, "khugepaged": 0},)
FAST = {"duration_s": 0.5, "warmup_s": 0.0}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["RAY_AUTH_MODE"] = "disabled"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    """``ptlab sweep …`` in-process, through ptlab's entry point (only for inputs rejected
    before Ray starts, or with Ray replaced)."""
    from ptlab.cli.main import main

    rc = main(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


# --- the grid --------------------------------------------------------------------------------


def test_grid_is_the_product_with_stable_ids_and_distinct_repeat_seeds():
    spec = SweepSpec(
        strategies=("pmd-clear", "ptl-hold"), orders=(4, 5),
        cpus=({"app": 1, "khugepaged": 1}, {"app": 2, "khugepaged": 1}),
        flush=("ipi", "broadcast"), seeds=(7,), repeats=3, base=FAST,
    )  # fmt: skip
    cells = expand(spec)
    assert len(cells) == 2 * 2 * 2 * 2 * 3
    assert [c.cell_id for c in cells] == [c.cell_id for c in expand(spec)]  # deterministic
    assert len({c.cell_id for c in cells}) == len(cells)
    seeds = sorted({c.config.seed for c in cells})
    assert seeds == sorted({repeat_seed(7, r) for r in range(3)}) and seeds.count(7) == 1
    assert len(seeds) == 3
    # a zero-CPU role does not change a cell's identity; the repeat number does
    a = RunConfig(cpus={"app": 1, "gup-fast": 0, "khugepaged": 1})
    b = RunConfig(cpus={"app": 1, "khugepaged": 1})
    assert cell_id(a, 0) == cell_id(b, 0) != cell_id(a, 1)
    # listing a value twice does not run it twice
    assert len(expand(SweepSpec(orders=(4, 4), strategies=("ptl-hold",)))) == 1


def test_toml_grid(tmp_path):
    f = tmp_path / "sweep.toml"
    f.write_text(
        'strategies = ["ptl-hold", "migration-entry"]\n'
        "orders = [4, 5]\n"
        "repeats = 2\n"
        "[cpus]\n"
        "app = [1, 2]\n"
        "khugepaged = [1]\n"
        "[run]\n"
        "duration_s = 1.5\n"
        "nr_pmds = 2\n"
    )
    spec = load_toml(f)
    cells = expand(spec)
    assert len(cells) == 2 * 2 * 2 * 2
    assert {c.config.duration_s for c in cells} == {1.5}
    assert {c.config.nr_pmds for c in cells} == {2}
    assert {c.config.nr_cpus for c in cells} == {2, 3}
    with pytest.raises(ConfigError, match="is an axis"):
        expand(SweepSpec(base={"order": 4}))


@pytest.mark.parametrize(
    "args, toml, message",
    [
        (["--strategy", "pmd-clear,thp-magic"], None, "unknown strategy 'thp-magic'"),
        (["--order", "4,12"], None, "--order 12 is out of range"),
        (["--order", "1"], None, "--order 1 is out of range"),
        (["--config", "{dir}/sweep.toml"], "orders = [4, 9\n", "TOML syntax error"),
        (["--config", "{dir}/missing.toml"], None, "no such sweep file"),
        (["--config", "{dir}/sweep.toml"], "order = [4]\n", "did you mean 'orders'"),
        (["--app", "0", "--khugepaged", "0"], None, "at least one simulated CPU"),
        (["--repeats", "0"], None, "--repeats must be at least 1"),
        (["--resume", "{dir}/nothing-here"], None, "no sweep here"),
    ],
)
def test_bad_grid_is_one_line_exit_2(tmp_path, args, toml, message, capsys, monkeypatch):
    from ptlab.cluster import sweep as sweep_mod

    started = []
    monkeypatch.setattr(sweep_mod, "connect", lambda *a, **k: started.append(1) or False)
    if toml is not None:
        (tmp_path / "sweep.toml").write_text(toml)
    args = [a.format(dir=tmp_path) for a in args]
    if "--resume" not in args:
        args += ["--out", str(tmp_path / "out")]
    code, out, err = _cli(["sweep", *args], capsys)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ptlab: error: "), err
    assert message in lines[0]
    assert lines[0].endswith("(see `ptlab sweep --help`)"), lines[0]
    assert "Traceback" not in out + err
    assert not (tmp_path / "out").exists()  # refused before anything was written
    assert not started  # and before Ray was started


# --- shared memory clean-up -----------------------------------------------------------------


def test_shm_cleanup_removes_dead_and_sweep_entries_only(tmp_path):
    dead = subprocess.Popen([PY, "-c", "pass"])
    dead.wait()
    me = os.getpid()
    names = {
        f"ptlab.{dead.pid}.aaaa.frames": True,  # creator dead
        f"sem.ptlab.{dead.pid}.aaaa.zone": True,
        f"ptlab.{me}.0123456789abcdef.frames": True,  # a run of this sweep (token = run id)
        f"ptlab.{me}.bbbb.frames": False,  # a live run of someone else
        "ptlab-notes.txt": False,  # not a segment name
        "other.123.x": False,
    }
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    removed = sweep_shm(tokens=["0123456789abcdef"], shm_dir=tmp_path)
    assert set(removed) == {n for n, gone in names.items() if gone}
    assert {p.name for p in tmp_path.iterdir()} == {n for n, gone in names.items() if not gone}


# --- one node (the session's embedded Ray) ---------------------------------------------------


def _merged(out: Path):
    return (
        ds.dataset(out / "merged", format="parquet", partitioning="hive")
        .to_table()
        .unify_dictionaries()
    )


def test_sweep_writes_cells_merged_and_manifest(ray_local, tmp_path):
    spec = SweepSpec(strategies=("pmd-clear", "ptl-hold"), orders=(4, 5), cpus=ONE_CPU, base=FAST)
    seen = []
    report = run_sweep(spec, tmp_path / "s", cell_fn=dry_cell, on_progress=seen.append)
    assert report.status == "complete" and report.done == report.total == 4
    node = ray_local.get_runtime_context().get_node_id()
    cells = sorted((tmp_path / "s" / "cells").glob("*.arrow"))
    assert [f.stem for f in cells] == sorted(c.cell_id for c in expand(spec))
    for f in cells:
        r = read_run(f)
        assert r.meta["host"]["node_id"] == node and r.meta["run_id"] == f.stem
    table = _merged(tmp_path / "s")
    assert table.num_rows == 4 * 50
    per = {(r["strategy"], r["cell_order"]): r["count"] for r in
           table.group_by(["strategy", "cell_order"]).aggregate([([], "count_all")])
           .rename_columns(["strategy", "cell_order", "count"]).to_pylist()}  # fmt: skip
    assert per == {
        ("pmd-clear", 4): 50,
        ("pmd-clear", 5): 50,
        ("ptl-hold", 4): 50,
        ("ptl-hold", 5): 50,
    }
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert {c["status"] for c in manifest["cells"].values()} == {"done"}
    assert all(c["node_id"] == node and c["attempts"] == 1 for c in manifest["cells"].values())
    # the overhead is what the cell's round trip took beyond its own run (no time limit here:
    # a loaded machine may take longer, but the bookkeeping must add up)
    for c in manifest["cells"].values():
        assert 0 < c["overhead_s"] <= c["gathered_at"] - c["submitted_at"]
        assert c["run_s"] + c["overhead_s"] == pytest.approx(c["gathered_at"] - c["submitted_at"], abs=1e-3)
    # the live view got per-node counts and an estimate
    assert seen[-1].done == 4 and seen[-1].nodes[0].done == 4
    assert any(p.eta_s is not None and p.running for p in seen)


def test_failed_and_crashed_cells_are_retried(ray_local, tmp_path):
    spec = SweepSpec(strategies=("pmd-clear", "ptl-hold"), orders=(4,), cpus=ONE_CPU, base=FAST)
    fn = functools.partial(dry_cell, fail_once_dir=str(tmp_path / "fail"), sleep_s=0.1)
    report = run_sweep(spec, tmp_path / "a", cell_fn=fn)
    assert report.status == "complete"
    assert [[h["result"] for h in c.history] for c in report.cells] == [["failed", "done"]] * 2
    fn = functools.partial(dry_cell, crash_once_dir=str(tmp_path / "crash"), sleep_s=0.1)
    report = run_sweep(spec, tmp_path / "b", cell_fn=fn)
    assert report.status == "complete" and all(c.attempts == 2 for c in report.cells)
    # without a second try, the failure is final and says why
    fn = functools.partial(dry_cell, fail_once_dir=str(tmp_path / "fail2"), sleep_s=0.1)
    report = run_sweep(spec, tmp_path / "c", cell_fn=fn, max_attempts=1)
    assert report.status == "failed" and report.failed == 2
    assert all("injected failure" in c.error for c in report.cells)
    assert not list((tmp_path / "c" / "cells").glob("*.arrow"))


def _bad_config_cell(config, out_dir, *, run_id=None, placement_group=None):
    raise ConfigError("this cell cannot run here")


def test_configuration_error_in_a_cell_is_not_retried(ray_local, tmp_path):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests
    spec = SweepSpec(strategies=("ptl-hold",), orders=(4,), cpus=ONE_CPU, base=FAST)
    report = run_sweep(spec, tmp_path / "x", cell_fn=_bad_config_cell)
    (cell,) = report.cells
    assert report.status == "failed" and cell.attempts == 1
    assert cell.error == "ConfigError: this cell cannot run here"


def test_resume_runs_only_missing_cells(ray_local, tmp_path):
    small = SweepSpec(strategies=("pmd-clear",), orders=(4, 5), cpus=ONE_CPU, base=FAST)
    out = tmp_path / "r"
    first = run_sweep(small, out, cell_fn=dry_cell)
    stamps = {f.name: f.stat().st_mtime_ns for f in (out / "cells").glob("*.arrow")}
    with pytest.raises(ConfigError, match="--resume"):
        run_sweep(small, out, cell_fn=dry_cell)  # a second sweep into the same directory
    bigger = small.replace(strategies=["pmd-clear", "migration-entry"])
    report = run_sweep(bigger, out, cell_fn=dry_cell, resume=True)
    assert report.status == "complete" and report.skipped == first.done == 2 and report.done == 4
    after = {f.name: f.stat().st_mtime_ns for f in (out / "cells").glob("*.arrow")}
    assert all(after[name] == t for name, t in stamps.items())  # finished cells untouched
    assert len(after) == 4
    assert _merged(out).num_rows == 4 * 50
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sweep_id"] == first.sweep_id
    assert all(c["attempts"] == 1 for c in manifest["cells"].values())


def test_cell_that_fits_no_node_is_refused(ray_local, tmp_path):
    spec = SweepSpec(strategies=("ptl-hold",), orders=(4,), cpus=({"app": 40, "khugepaged": 1},), base=FAST)
    with pytest.raises(ConfigError, match="needs 41 CPUs on one node"):
        run_sweep(spec, tmp_path / "x", cell_fn=dry_cell)


# --- two nodes, node loss (own process, own cluster) ----------------------------------------


def test_two_node_cluster_spread_and_node_loss(tmp_path):
    proc = subprocess.run(
        [PY, str(TESTS / "sweep_cluster_driver.py"), str(tmp_path)],
        capture_output=True, text=True, env=_env(), timeout=150,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    head, second = r["head"], r["second"]

    spread = r["spread"]
    assert spread["status"] == "complete" and spread["done"] == spread["total"] == 4
    nodes = {v["node"] for v in spread["results"].values()}
    assert nodes == {head, second}, "cells must land on both nodes"
    for cid, v in spread["results"].items():
        assert v["actors"] == [v["node"]], "a cell's CPU actors run on the cell's node"
        assert spread["manifest_nodes"][cid] == v["node"]

    loss = r["node_loss"]
    assert loss["removed"], "the second node was never removed mid-cell"
    assert loss["removed"]["second_done"] >= 1
    assert loss["status"] == "complete" and loss["done"] == loss["total"] == 6
    # nothing lost, nothing doubled: every cell once in cells/ and once in merged/
    assert sorted(loss["results"]) == sorted(loss["grid"])
    assert loss["merged"] == {cid: [1, 50] for cid in loss["grid"]}
    rerun = [cid for cid, h in loss["history"].items() if h[0]["result"] == "node lost"]
    assert rerun, "the cell running on the removed node was not rerun"
    for cid in rerun:
        assert loss["history"][cid][-1]["result"] == "done"
        assert loss["results"][cid]["node"] == head  # rerun elsewhere
    # the lost node is one line, with the number of its cells run again elsewhere
    assert loss["lost_lines"] == [f"node {r['second_ip']} lost: {len(rerun)} cell"
                                  f"{'s' if len(rerun) != 1 else ''} rerun elsewhere"]
    assert "(raylet)" not in proc.stdout  # Ray's own notices stay in its log directory
    # cells the second node finished before it died are kept, not rerun
    kept = [
        cid
        for cid, h in loss["history"].items()
        if h == [{"attempt": 1, "node_id": second, "result": "done"}]
    ]
    assert kept and all(loss["results"][cid]["node"] == second for cid in kept)


# --- Ctrl-C, then resume (own process, embedded Ray) -----------------------------------------


def _shm_of(tokens: set[str], min_age_s: float = 0.0, max_age_s: float = 1e9) -> list[str]:
    """ptlab entries in /dev/shm whose name contains one of ``tokens``, by age (seconds)."""
    now = time.time()
    out = []
    for p in Path("/dev/shm").iterdir():
        if p.name.startswith("ptlab.") and any(t in p.name for t in tokens):
            try:
                age = now - p.stat().st_mtime
            except FileNotFoundError:
                continue
            if min_age_s <= age <= max_age_s:
                out.append(p.name)
    return out


def test_ctrl_c_keeps_finished_cells_cleans_shm_and_resume_finishes(tmp_path):
    out = tmp_path / "sweep"
    args = [PY, str(TESTS / "sweep_cli.py"), "sweep", "--dry-run", "--no-progress",
            "-s", "pmd-clear,ptl-hold,migration-entry", "--order", "4,5", "--app", "1",
            "--khugepaged", "0", "--duration", "2", "--warmup", "0", "--out", str(out)]  # fmt: skip
    ids = _all_ids()
    # its own session, as a terminal's Ctrl-C reaches the whole foreground process group
    # SIGINT back to its default in the child: a suite started in the background inherits it
    # ignored, and the sweep would never see its Ctrl-C
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(), start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            done = list((out / "cells").glob("*.arrow")) if (out / "cells").exists() else []
            # two cells kept, and a cell well into its 2 s with its shared memory
            if len(done) >= 2 and _shm_of({f".{c}." for c in ids}, 0.2, 1.0):
                break
            time.sleep(0.1)
        else:
            pytest.fail("the sweep did not get going")
        # what a cell killed without its clean-up (SIGKILL, a lost worker) leaves behind: a
        # segment of the sweep's.  (An interrupted cell removes its own: Ray 2.60 cancels a
        # task with KeyboardInterrupt, so its `finally` runs.)  The sweep must remove it.
        left = [c for c in ids if c not in {f.stem for f in done}][-1]
        planted = Path("/dev/shm") / f"ptlab.{os.getpid()}.{left}.frames"
        planted.write_bytes(b"\0" * 64)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, stderr[-2000:]
    assert "--resume" in stderr and "Traceback" not in stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "partial"
    done_ids = {cid for cid, c in manifest["cells"].items() if c["status"] == "done"}
    assert len(done_ids) >= 2 and len(done_ids) < 6
    assert {f.stem for f in (out / "cells").glob("*.arrow")} == done_ids
    assert {c["status"] for c in manifest["cells"].values()} <= {"done", "pending", "cancelled"}
    assert not _shm_of({f".{c}." for c in manifest["cells"]}), (
        "interrupted cells left shared memory"
    )
    assert planted.name in [n for removed in manifest["shm_cleanup"].values() for n in removed], (
        f"the clean-up did not remove {planted.name}: {manifest['shm_cleanup']}")
    assert not planted.exists()
    stamps = {f.name: f.stat().st_mtime_ns for f in (out / "cells").glob("*.arrow")}

    proc = subprocess.run([PY, str(TESTS / "sweep_cli.py"), "sweep", "--dry-run", "--no-progress",
                           "--resume", str(out)],
                          capture_output=True, text=True, env=_env(), timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"({len(done_ids)} from before)" in proc.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["done"] == 6
    assert all(
        f.stat().st_mtime_ns == stamps[f.name]
        for f in (out / "cells").glob("*.arrow")
        if f.name in stamps
    )
    assert _merged(out).num_rows == 6 * 50


def _all_ids() -> list[str]:
    spec = SweepSpec(strategies=("pmd-clear", "ptl-hold", "migration-entry"), orders=(4, 5),
                     cpus=ONE_CPU, base={"duration_s": 2.0, "warmup_s": 0.0})  # fmt: skip
    return [c.cell_id for c in expand(spec)]


# --- real cells: the simulator itself through placement groups on two nodes --------------------


def test_real_cells_on_a_two_node_cluster(tmp_path):
    """Not dry cells: four short real runs (app + khugepaged) through STRICT_PACK placement
    groups on a two-node loopback cluster.  Both nodes run cells; each cell is a real,
    clean simulation that recorded faults and collapses; the merged Parquet dataset holds
    each run once."""
    proc = subprocess.run([PY, str(TESTS / "sweep_real_driver.py"), str(tmp_path)],
                          capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["status"] == "complete" and r["done"] == r["total"] == 4, r
    assert set(r["manifest_nodes"].values()) == set(r["nodes"]), "cells must run on both nodes"
    for cid, c in r["cells"].items():
        assert c["kind"] == "sim" and c["simulated_cpus"] == 2
        assert c["node"] == r["manifest_nodes"][cid]
        assert c["faults"] > 0 and c["collapses"] > 0, c
        assert c["violations"] == 0, c
        assert 0.5 < c["duration_s"] <= 2.0, c
    assert r["merged"] == sorted(r["cells"])
    assert all(p.endswith(".parquet") for p in r["parts"]) and len(r["parts"]) == 4


# --- exit codes and the report lines of `ptlab sweep` (Ray replaced) ----------------------------


def _report(tmp_path, **kw):
    from ptlab.cluster.sweep import LostNode, SweepReport

    base = dict(sweep_id="s", out_dir=tmp_path, status="complete", total=4, done=4, failed=0,
                skipped=0, elapsed_s=1.0, manifest=tmp_path / "manifest.json",
                merged_dir=tmp_path / "merged", nodes_used=("n1",), cells=(), violations=0,
                lost_nodes=(LostNode("n2", "127.0.0.103", 2),))
    base.update(kw)
    return SweepReport(**base)


@pytest.mark.parametrize("kw, rc, needle", [
    ({}, 0, None),
    ({"violations": 1}, 1, "1 of 4 cells found correctness violations"),
    ({"failed": 1, "done": 3, "status": "failed"}, 3, "1 of 4 cells failed"),
    ({"failed": 1, "done": 3, "violations": 2, "status": "failed"}, 3, "1 of 4 cells failed"),
])
def test_sweep_exit_codes_and_lost_node_line(tmp_path, monkeypatch, capsys, kw, rc, needle):
    """0 every cell clean, 1 a cell's run found a violation, 3 a cell failed; a lost node is
    one line."""
    from ptlab.cluster import sweep as sweep_mod
    from ptlab.cluster.sweep import CellRecord

    cells = ()
    if kw.get("failed"):
        cells = (CellRecord(cell_id="c1", label="ptl-hold order=4", params={}, repeat=0, base_seed=0,
                            nr_cpus=1, status="failed", error="RunFailed: simulated CPU 0 (app) died"),)
    monkeypatch.setattr(sweep_mod, "connect", lambda address=None, **k: False)
    monkeypatch.setattr(sweep_mod, "run_sweep", lambda *a, **k: _report(tmp_path, cells=cells, **kw))
    code, out, err = _cli(["sweep", "--dry-run", "--no-progress", "-s", "pmd-clear", "--app", "1",
                           "--khugepaged", "0", "--out", str(tmp_path / "s")], capsys)
    assert code == rc, err
    assert "ptlab: node 127.0.0.103 lost: 2 cells rerun elsewhere" in err.splitlines()
    assert "sweep s: 4/4 cells done" in out or kw.get("failed")
    if needle:
        assert needle in err
