"""The primitives themselves: atomic words across processes, futex handoffs, bounds checks,
segment lifetime, and `ptlab calibrate`.

Each multi-process test has a negative control or a bound that makes a broken primitive fail
(lost updates, a timed-out wait), never hang: waits carry timeouts and children are killed in
``finally``.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np
import posix_ipc
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from _procs import SPAWN, Lab, flag
from hypothesis import given, settings
from hypothesis import strategies as st
from ptlab.core.machine import _prims
from ptlab.core.machine._prims import Region, now_ns
from ptlab.core.machine.errors import ConfigError
from ptlab.core.machine.layout import STOP
from ptlab.core.machine.shm import SHM_DIR, Namespace, sweep_stale

N_INCREMENTS = 100_000
COUNTER = 5  # flag words used by the counter test
GO = 6


# ---- bounds: a bad offset raises, never segfaults ----------------------------------------------
@pytest.fixture
def region():
    buf = mmap.mmap(-1, 4096)
    r = Region(buf)
    yield r
    r.close()
    buf.close()


WORD_OPS = {
    "load32": (4, lambda r, o: r.load32(o)),
    "store32": (4, lambda r, o: r.store32(o, 1)),
    "cas32": (4, lambda r, o: r.cas32(o, 0, 0)),
    "xchg32": (4, lambda r, o: r.xchg32(o, 0)),
    "fetch_add32": (4, lambda r, o: r.fetch_add32(o, 0)),
    "futex_wait": (4, lambda r, o: r.futex_wait(o, 12345, 0)),
    "futex_wake": (4, lambda r, o: r.futex_wake(o, 1)),
    "spin_trylock": (4, lambda r, o: r.spin_trylock(o, 1) and r.spin_unlock(o)),
    "spin_lock": (4, lambda r, o: r.spin_lock(o, 1, -1, 1000) >= 0 and r.spin_unlock(o)),
    "spin_unlock": (4, lambda r, o: r.spin_unlock(o)),
    "load64": (8, lambda r, o: r.load64(o)),
    "store64": (8, lambda r, o: r.store64(o, 0)),
    "cas64": (8, lambda r, o: r.cas64(o, 0, 0)),
    "xchg64": (8, lambda r, o: r.xchg64(o, 0)),
    "fetch_add64": (8, lambda r, o: r.fetch_add64(o, 0)),
    "fetch_or64": (8, lambda r, o: r.fetch_or64(o, 0)),
    "fetch_and64": (8, lambda r, o: r.fetch_and64(o, -1)),
    "fill64": (8, lambda r, o: r.fill64(o, 1, 0)),
    "find_not64": (8, lambda r, o: r.find_not64(o, 1, 0)),
}


@pytest.mark.parametrize("name", sorted(WORD_OPS))
def test_bad_offsets_raise(region, name):
    width, op = WORD_OPS[name]
    size = region.size
    for off in (-width, -1, size, size - width + 1, size + 4096, 2**40, 2**62):
        with pytest.raises(IndexError):
            op(region, off)
    for off in range(1, width):
        with pytest.raises(ValueError, match="aligned"):
            op(region, off)
    with pytest.raises(OverflowError):
        op(region, 2**64)
    op(region, 0)
    op(region, size - width)


@settings(max_examples=300, deadline=None)
@given(off=st.integers(-(2**63), 2**63 - 1), name=st.sampled_from(sorted(WORD_OPS)))
def test_any_offset_either_works_or_raises(name, off):
    buf = mmap.mmap(-1, 4096)
    r = Region(buf)
    try:
        width, op = WORD_OPS[name]
        if off < 0 or off > 4096 - width:
            with pytest.raises(IndexError):
                op(r, off)
        elif off % width:
            with pytest.raises(ValueError):
                op(r, off)
        else:
            op(r, off)
    finally:
        r.close()
        buf.close()


def test_bad_ranges_raise(region):
    size = region.size
    with pytest.raises(IndexError):
        region.copy(0, size - 8, 16)  # source runs past the end
    with pytest.raises(IndexError):
        region.copy(size - 8, 0, 16)  # destination runs past the end
    with pytest.raises(IndexError):
        region.copy(0, 8, -1)
    with pytest.raises(IndexError):
        region.fill64(8, size // 8, 0)
    with pytest.raises(ValueError):
        region.fill64(0, -1, 0)
    with pytest.raises(ValueError):
        region.find_not64(4, 1, 0)
    with pytest.raises(IndexError):
        region.put_row(4096 // 16, 1, 2)
    with pytest.raises(IndexError):
        region.put_row(-1, 1, 2)
    with pytest.raises(IndexError):
        region.spin_lock(0, 1, size, 1000)  # the IPI word is checked too
    with pytest.raises(IndexError):
        _prims.ref_loop(region, "cas64", size, 10)
    with pytest.raises(ValueError):
        _prims.ref_loop(region, "cas64", 4, 10)
    with pytest.raises(ValueError):
        _prims.ref_loop(region, "no-such-loop", 0, 10)
    with pytest.raises(IndexError):
        _prims.ref_copy(region, 0, 8, size, 1)
    with pytest.raises(IndexError):
        _prims.ref_spin_contended(region, size, 0, 1)
    region.copy(8, 0, 16)  # overlapping is fine (memmove)


def test_closed_region_raises():
    buf = mmap.mmap(-1, 4096)
    r = Region(buf)
    r.close()
    assert r.closed
    for call in (lambda: r.load64(0), lambda: r.store32(0, 1), lambda: r.copy(0, 8, 8),
                 lambda: r.futex_wake(0, 1), lambda: _prims.ref_loop(r, "load64", 0, 1)):
        with pytest.raises(ValueError, match="closed"):
            call()
    buf.close()  # the buffer was released by close(): no BufferError


def test_read_only_buffer_refused():
    with pytest.raises((TypeError, BufferError)):
        Region(b"\0" * 64)


def test_atomics_semantics(region):
    assert region.cas64(8, 0, 5) is True
    assert region.cas64(8, 0, 6) is False
    assert region.load64(8) == 5
    assert region.fetch_add64(8, 3) == 5
    assert region.xchg64(8, -1) == 8
    assert region.fetch_and64(8, 0xF0) == -1
    assert region.fetch_or64(8, 1) == 0xF0
    assert region.load64(8) == 0xF1
    region.store32(16, -7)
    assert region.load32(16) == -7
    assert region.fetch_add32(16, 7) == -7
    assert region.futex_wait(16, 1, 1_000_000) == 1  # value differs: no sleep
    t0 = now_ns()
    assert region.futex_wait(16, 0, 5_000_000) == 2  # nobody wakes: times out (a lost wake-up shows)
    assert now_ns() - t0 >= 4_000_000


# ---- a plain counter under the spinlock, across two processes -----------------------------------
def _count(m, cpu, aux, use_lock, n):
    lock = m.ptl(0)
    word = flag(COUNTER)
    aux.fetch_add64(flag(GO), 1)
    while aux.load64(flag(GO)) < 2:  # start together, or the two loops may not overlap
        pass
    load, store = aux.load64, aux.store64
    if use_lock:
        for _ in range(n):
            lock.lock(cpu)
            store(word, load(word) + 1)  # load + store: only the lock makes this exact
            lock.unlock(cpu)
    else:
        for _ in range(n):
            store(word, load(word) + 1)


def _run_counter(use_lock: bool, cores: list[int]) -> int:
    with Lab(nr_cpus=3) as lab:
        lab.start(_count, 1, use_lock, N_INCREMENTS, pin=cores[0])
        lab.start(_count, 2, use_lock, N_INCREMENTS, pin=cores[1])
        lab.join(timeout=60)
        if use_lock:
            assert lab.m.ptl(0).owner() == -1
        return lab.aux.load64(flag(COUNTER))


@pytest.mark.timeout(120)
def test_spinlock_makes_a_plain_counter_exact_and_without_it_updates_are_lost():
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs two cores for the two incrementing processes to overlap")
    assert _run_counter(True, cores) == 2 * N_INCREMENTS
    # negative control: the same loop without the lock loses updates, so the test can fail.
    # On a busy host one process may be descheduled for its whole loop: try a few times.
    totals = []
    for _ in range(5):
        totals.append(_run_counter(False, cores))
        if totals[-1] < 2 * N_INCREMENTS:
            break
    assert totals[-1] < 2 * N_INCREMENTS, f"no update was lost without the lock in {len(totals)} runs"


# ---- futex handoffs across two processes --------------------------------------------------------
HANDOFFS = 10_000
TURN = 7  # futex word (the low half of a flag line)
TIMEOUTS = 8


def _pong(m, cpu, aux, n):
    """Odd turns are mine: wait for an odd value, make it even, wake the other side."""
    word = flag(TURN)
    for i in range(n):
        want = 2 * i + 1
        while (v := aux.load32(word)) != want:
            if aux.futex_wait(word, v, 2_000_000_000) == 2:
                aux.fetch_add64(flag(TIMEOUTS), 1)  # slept 2 s although the other side moved
                if m.ctl.load32(STOP):
                    return
        aux.store32(word, want + 1)
        aux.futex_wake(word, 1)


@pytest.mark.timeout(120)
def test_futex_handoffs_lose_no_wakeup():
    with Lab(nr_cpus=2, limit_s=60) as lab:
        aux, word = lab.aux, flag(TURN)
        lab.start(_pong, 1, HANDOFFS)
        timeouts = 0
        for i in range(HANDOFFS):
            aux.store32(word, 2 * i + 1)
            aux.futex_wake(word, 1)
            want = 2 * i + 2
            while (v := aux.load32(word)) != want:
                if aux.futex_wait(word, v, 2_000_000_000) == 2:
                    timeouts += 1
                    assert lab.procs[0].is_alive(), f"the other process died at handoff {i}"
        lab.join()
        assert aux.load32(word) == 2 * HANDOFFS
        assert timeouts == 0 and aux.load64(flag(TIMEOUTS)) == 0, "a wake-up was lost (a wait timed out)"


# ---- segment lifetime ------------------------------------------------------------------------
def _exit_now() -> None:
    pass


def test_sweep_stale_removes_a_dead_runs_segments_only():
    p = SPAWN.Process(target=_exit_now)
    p.start()
    p.join(30)
    dead = p.pid
    assert p.exitcode == 0
    stale = f"/ptlab.{dead}.deadbeef.ctl"
    shm = posix_ipc.SharedMemory(stale, posix_ipc.O_CREX, size=4096)
    shm.close_fd()
    live = Namespace.create({"ctl": 4096})  # create() sweeps first: the stale one goes here
    try:
        assert not (SHM_DIR / stale[1:]).exists()
        shm = posix_ipc.SharedMemory(stale, posix_ipc.O_CREX, size=4096)
        shm.close_fd()
        removed = sweep_stale()
        assert stale[1:] in removed
        assert not (SHM_DIR / stale[1:]).exists()
        assert (SHM_DIR / f"{live.prefix}.ctl").exists(), "a live run's segment was swept"
    finally:
        live.close()
        try:
            posix_ipc.unlink_shared_memory(stale)
        except posix_ipc.ExistentialError:
            pass


def _entries(prefix: str) -> list[str]:
    return [p.name for p in SHM_DIR.iterdir() if p.name.startswith(prefix + ".")]


def test_namespace_unlinks_everything_after_an_exception():
    with pytest.raises(RuntimeError, match="boom"):
        with Namespace.create({"a": 4096, "b": 8192}) as ns:
            prefix = ns.prefix
            assert sorted(_entries(prefix)) == [f"{prefix}.a", f"{prefix}.b"]
            ns["a"].view(np.int64)  # an escaped view must not keep the name alive
            raise RuntimeError("boom")
    assert _entries(prefix) == []


def test_namespace_cleans_up_when_creation_fails_halfway():
    before = {p.name for p in SHM_DIR.iterdir()}
    with pytest.raises((ValueError, posix_ipc.Error, OSError)):
        Namespace.create({"a": 4096, "b": -1})  # the second segment cannot be made
    assert {p.name for p in SHM_DIR.iterdir() if p.name.startswith("ptlab.")} <= before


def test_attach_to_missing_namespace_raises():
    with pytest.raises(posix_ipc.ExistentialError):
        Namespace.attach(f"ptlab.{os.getpid()}.nosuchrun", {"ctl": 4096})


# ---- calibrate -----------------------------------------------------------------------------------
def test_quick_calibration_is_quick_and_complete():
    from ptlab.core.analysis.calibrate import quick_calibration

    rows = quick_calibration()  # its speed is `ptlab calibrate`'s business, not a test's
    by = {r["primitive"]: r for r in rows}
    for name in ("cas64", "spin_lock_unlock", "copy_4k", "copy_2m", "load64", "folio_lock_unlock"):
        assert name in by
    for r in rows:
        assert set(r) == {"primitive", "unit", "median", "p99", "reference_median", "ratio"}
        assert r["median"] > 0 and r["p99"] >= r["median"] * 0.999
        if r["reference_median"] is None:
            assert r["ratio"] is None
        else:
            assert r["ratio"] == pytest.approx(r["median"] / r["reference_median"])
    assert by["rwsem_read_pair"]["reference_median"] is None


@pytest.mark.timeout(120)
def test_calibration_child_measurements_run_and_clean_up():
    """The multi-process measurements, small: they finish, give sane rows, leave no segment."""
    from ptlab.core.analysis import calibrate as cal

    with cal._lab(3) as lab:
        prefixes = (lab.m.prefix, lab.scratch.prefix)
        cont = cal._spin_contended(lab, batches=3, n=300, ref_n=3000)
        cores = sorted(os.sched_getaffinity(0))
        fut = cal._futex_wake_to_run(lab, "futex_wake_to_run", cores[0], cores[-1], n=200)
        tlb1 = cal._tlb_flush(lab, 1, n=100)
        tlb2 = cal._tlb_flush(lab, 2, n=100)
    for r in (cont, fut):
        assert r["median"] > 0 and r["reference_median"] and r["reference_median"] > 0
    assert 0 < tlb1["median"] < 10_000_000 and 0 < tlb2["median"] < 10_000_000
    for prefix in prefixes:
        assert _entries(prefix) == []


def test_write_calibration_round_trip(tmp_path):
    from ptlab.core.analysis.calibrate import read_calibration, write_calibration

    rows = [
        {"primitive": "cas64", "unit": "ns/op", "median": 20.0, "p99": 25.0, "reference_median": 5.0, "ratio": 4.0},
        {"primitive": "tlb_flush_1", "unit": "ns", "median": 2000.0, "p99": 3000.0, "reference_median": None, "ratio": None},
    ]
    path = write_calibration(rows, tmp_path / "new" / "dir")
    assert path == tmp_path / "new" / "dir" / "calibration.arrow"
    assert [p.name for p in path.parent.iterdir()] == ["calibration.arrow"]  # no temp file left
    with pa.memory_map(str(path)) as src:
        table = ipc.open_file(src).read_all()
    assert table.schema.field("primitive").type == pa.string()
    assert table.schema.field("median").type == pa.float64()
    assert table.schema.field("reference_median").nullable
    assert table.schema.field("ratio").nullable
    assert b"ptlab" in table.schema.metadata
    assert read_calibration(path) == rows


def test_cli_calibrate_quick_writes_the_file(tmp_path):
    import typer
    from ptlab.cli.commands_calibrate import register
    from typer.testing import CliRunner

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # two commands, so `calibrate` is a sub-command
    res = CliRunner().invoke(app, ["calibrate", "--quick", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "cas64" in res.output and "copy_2m" in res.output
    assert (tmp_path / "calibration.arrow").exists()


@pytest.mark.parametrize("bad", ["file", "under-file"])
def test_cli_calibrate_unwritable_out_is_a_config_error(tmp_path, bad, monkeypatch):
    import typer
    from ptlab.cli.commands_calibrate import register

    f = tmp_path / "f.txt"
    f.write_text("x")
    out = f if bad == "file" else f / "sub"
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)
    import ptlab.core.analysis.calibrate as cal

    measured: list[str] = []  # the --out check must come before anything is measured
    monkeypatch.setattr(cal, "run_calibration", lambda **kw: measured.append("full") or [])
    monkeypatch.setattr(cal, "quick_calibration", lambda **kw: measured.append("quick") or [])
    with pytest.raises(ConfigError, match="--out"):
        app(args=["calibrate", "--out", str(out)], standalone_mode=False)
    assert measured == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]
    assert Path(f).read_text() == "x"


def test_futex_reference_pins_its_threads_and_restores_affinity():
    cores = sorted(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    samples = _prims.ref_futex_wake_to_run(20, cores[0], cores[-1])
    assert len(samples) == 20 and all(s > 0 for s in samples)
    assert os.sched_getaffinity(0) == before
    with pytest.raises(ValueError, match="host core"):
        _prims.ref_futex_wake_to_run(5, max(cores) + 1000, cores[0])
    assert os.sched_getaffinity(0) == before
    assert len(_prims.ref_futex_wake_to_run(5)) == 5  # the one-argument form is unchanged
