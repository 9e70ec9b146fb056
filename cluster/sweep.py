"""Sweeps over a Ray cluster: place each cell on one node, survive node loss, gather results.

One cell is one run (a RunConfig and a repeat number, see ``grid.py``).  Its simulated machine
lives in shared memory, which does not cross hosts, so everything of a cell stays on one node:

  * the driver creates a STRICT_PACK placement group of ``nr_cpus`` bundles of ``{"CPU": 1}``
    for the cell, so Ray reserves one core per simulated CPU on a single node — and a node
    runs only as many cells at once as its cores hold (no oversubscription, no spinning CPU
    preempted by another cell's);
  * the cell function (``run_cell``) runs as a Ray task in bundle 0 of that group with no
    CPU of its own, so the machine it creates in shared memory is on the node where the
    group's CPU actors will run; the task passes the group to ``run_cell`` for the actors;
  * the task returns the bytes of the cell's Arrow file; the driver checks them (a readable
    result with a good checksum), writes them atomically to ``cells/<cell_id>.arrow`` and adds
    the cell to the merged dataset (``merged/strategy=<s>/part-<cell_id>.parquet``,
    hive-partitioned Parquet, which DuckDB, Spark and polars scan natively).

Fault tolerance.  Ray retries nothing (``max_retries=0``); the driver does, so it can tell a
lost node from a failing cell.  A cell whose node dies (or whose worker crashes, or whose run
raises RunFailed) goes back to the head of the queue and is placed anew wherever cores are
free; a node loss does not count against ``max_attempts``.  A configuration error is final.
Nothing is ever merged twice: a cell's files are named by its id, which is a hash of its
parameters and repeat, and a cell is written only once, when its result arrives.  The same ids
make ``resume`` work: a cell whose file exists is done.

Interruption.  Ctrl-C cancels the running cells (force: their processes are killed), keeps
every finished cell, marks the sweep ``partial`` in the manifest and removes ptlab shared
memory on every alive node whose creator died or which belongs to the sweep (see
``shmclean.py``).  ``run_sweep`` then raises :class:`SweepInterrupted`.

The driver loop is single-threaded: it waits on the cell tasks with a short timeout, polls the
placement of queued groups and the node table, and hands a :class:`Progress` snapshot to an
optional callback (the CLI's live view).  The manifest (``manifest.json``) is rewritten
atomically at most once a second and at the end.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
from ptlab.cluster.grid import Cell, SweepSpec, cpus_label, expand
from ptlab.cluster.shmclean import sweep_shm
from ptlab.core.analysis.results import (
    METADATA_KEY,
    ResultFileError,
    RunResult,
    atomic_write_bytes,
    read_run,
    write_table,
)
from ptlab.core.machine.config import RunConfig
from ptlab.core.machine.errors import ConfigError, PtlabError

MANIFEST = "manifest.json"
CELLS_DIR = "cells"
MERGED_DIR = "merged"
MANIFEST_FORMAT = 1

# Cell statuses in the manifest.
PENDING, RUNNING, DONE, FAILED, CANCELLED = "pending", "running", "done", "failed", "cancelled"

CellFn = Callable[..., Path]

log = logging.getLogger(__name__)


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep, after the clean-up: carries the report of the partial sweep."""

    def __init__(self, report: SweepReport) -> None:
        super().__init__(f"sweep {report.sweep_id} interrupted")
        self.report = report


@dataclass
class CellRecord:
    """The driver's record of one cell (one entry of the manifest).  Times are Unix seconds;
    ``started_at``/``ended_at`` come from the worker's clock, the rest from the driver's."""

    cell_id: str
    label: str
    params: dict[str, Any]
    repeat: int
    base_seed: int
    nr_cpus: int
    status: str = PENDING
    attempts: int = 0
    node_id: str = ""
    node_ip: str = ""
    pid: int = 0
    submitted_at: float = 0.0
    placed_at: float = 0.0
    started_at: float = 0.0
    ended_at: float = 0.0
    gathered_at: float = 0.0
    run_s: float = 0.0  # the cell function's own run time
    # submitted → gathered, minus run_s: placement, task start, result transfer and write (the
    # cell is submitted when the driver expects free cores for it, so queueing is not in it)
    overhead_s: float = 0.0
    error: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)
    file: str = ""
    part: str = ""
    violations: int = 0  # the oracle's findings in the cell's result (summary.violations)

    @classmethod
    def for_cell(cls, cell: Cell) -> CellRecord:
        return cls(
            cell_id=cell.cell_id,
            label=cell.label(),
            params=cell.config.to_dict(),
            repeat=cell.repeat,
            base_seed=cell.base_seed,
            nr_cpus=cell.config.nr_cpus,
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CellRecord:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def expected_s(self) -> float:
        """Seconds the cell function should take (warm-up + duration)."""
        return float(self.params.get("warmup_s", 0.0)) + float(self.params.get("duration_s", 0.0))


@dataclass(frozen=True)
class NodeProgress:
    node_id: str
    ip: str
    cpus: int
    alive: bool
    running: int
    done: int
    failed: int


@dataclass(frozen=True)
class Progress:
    """A snapshot for progress views.  ``eta_s`` is None until it can be estimated."""

    sweep_id: str
    total: int
    done: int
    running: int
    pending: int
    failed: int
    skipped: int  # done before this invocation (resume)
    nodes: tuple[NodeProgress, ...]
    elapsed_s: float
    eta_s: float | None
    retries: int


@dataclass(frozen=True)
class LostNode:
    """A node that died during the sweep, and how many cell attempts it took down with it
    (each was rerun elsewhere, or failed if no attempts were left)."""

    node_id: str
    ip: str
    cells_rerun: int

    def line(self) -> str:
        n = self.cells_rerun
        what = f"{n} cell{'s' if n != 1 else ''} rerun elsewhere" if n else "no cell was running there"
        return f"node {self.ip or self.node_id[:12]} lost: {what}"


@dataclass(frozen=True)
class SweepReport:
    """What a sweep left behind.  ``status``: complete | partial | failed.  ``violations``:
    cells whose run found a correctness violation; ``lost_nodes``: nodes that died."""

    sweep_id: str
    out_dir: Path
    status: str
    total: int
    done: int
    failed: int
    skipped: int
    elapsed_s: float
    manifest: Path
    merged_dir: Path
    nodes_used: tuple[str, ...]
    cells: tuple[CellRecord, ...]
    violations: int = 0
    lost_nodes: tuple[LostNode, ...] = ()


# --- Ray connection ------------------------------------------------------------------------


def connect(
    address: str | None = None,
    *,
    node_ip: str | None = None,
    num_cpus: int | None = None,
    object_store_mb: int = 512,
) -> bool:
    """Join the Ray cluster at ``address`` (``auto`` or ``host:port``) or, without one, start an
    embedded Ray bound to ``node_ip`` (a loopback address: nothing leaves the machine; default
    ``$PTLAB_RAY_IP``, else ``$PTLAB_TEST_RAY_IP``, else 127.0.0.2) with ``num_cpus`` (default:
    all cores) and an object store of ``object_store_mb`` MiB.

    Returns True when this call started or joined Ray (the caller should ``ray.shutdown()``),
    False when Ray was already initialised.  Raises ConfigError when the cluster cannot be
    reached.
    """
    import ray

    if ray.is_initialized():
        return False
    node_ip = (node_ip or os.environ.get("PTLAB_RAY_IP") or os.environ.get("PTLAB_TEST_RAY_IP")
               or "127.0.0.2")
    try:
        if address:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        else:
            # an embedded cluster on loopback: every Ray process of it inherits this
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
            ray.init(
                address="local",
                _node_ip_address=node_ip,
                num_cpus=num_cpus or os.cpu_count() or 1,
                object_store_memory=object_store_mb * 2**20,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=logging.WARNING,
            )
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = f"the Ray cluster at {address!r}" if address else "an embedded Ray"
        hint = (
            "; is the cluster up (ray up / ray start --head), and is RAY_AUTH_MODE the same as "
            "the cluster's? Drop --address to run on this machine alone"
            if address
            else ""
        )
        raise ConfigError(f"cannot start or reach {where}: {first}{hint}") from None
    _ray_prints_to_log()
    return True


def _ray_prints_to_log() -> None:
    """Ray prints the errors it hears from the cluster ("(raylet) A worker died or was killed
    ...": ten lines each, node-death notices) on the driver's *stdout*, where ptlab's results
    go.  Send them to ``ptlab-driver-<pid>.log`` in Ray's session log directory instead (a
    private Ray function is replaced; if it is not there, nothing changes).  ptlab reports a
    dead CPU or a lost node itself, in one line."""
    try:
        import ray._private.worker as rw

        node = rw._global_node
        logs = node.get_logs_dir_path() if node is not None else tempfile.gettempdir()
        path = os.path.join(logs, f"ptlab-driver-{os.getpid()}.log")
        if not callable(getattr(rw, "print_to_stdstream", None)):
            return
    except Exception:
        return

    def to_log(data: Any, ignore_prefix: bool = False) -> None:
        try:
            with open(path, "a") as f:
                for line in data.get("lines", []):
                    f.write(f"({data.get('pid', 'ray')}) {line}\n")
        except OSError:
            pass

    rw.print_to_stdstream = to_log


# --- the cell task -------------------------------------------------------------------------


def _default_cell_fn() -> CellFn:
    from ptlab.cluster.cell import run_cell  # imported on the worker, only when needed

    return run_cell


def _run_cell_task(
    cell_fn: CellFn | None, params: dict[str, Any], cell_id: str, pg: Any
) -> tuple[dict[str, Any], bytes]:
    """Body of the cell task (runs on the cell's node): run the cell into a private temp dir
    and return (info, the result file's bytes)."""
    import ray

    fn = cell_fn or _default_cell_fn()
    config = RunConfig.from_dict(params)
    info: dict[str, Any] = {
        "node_id": ray.get_runtime_context().get_node_id(),
        "pid": os.getpid(),
    }
    with tempfile.TemporaryDirectory(prefix=f"ptlab-cell-{cell_id}-") as tmp:
        info["started_at"] = time.time()
        path = fn(config, Path(tmp), run_id=cell_id, placement_group=pg)
        info["ended_at"] = time.time()
        data = Path(path).read_bytes()
    return info, data


_cell_task_remote: Any = None


def _cell_task() -> Any:
    global _cell_task_remote
    if _cell_task_remote is None:
        import ray

        _cell_task_remote = ray.remote(num_cpus=0, max_retries=0, retry_exceptions=False)(
            _run_cell_task
        )
    return _cell_task_remote


def _shm_task() -> Any:
    import ray

    return ray.remote(num_cpus=0, max_retries=0)(_node_shm_cleanup)


def _node_shm_cleanup(tokens: list[str]) -> list[str]:
    return sweep_shm(tokens=tokens)


# --- the driver ----------------------------------------------------------------------------


def run_sweep(
    grid: SweepSpec | Sequence[Cell],
    out_dir: str | os.PathLike[str],
    *,
    cell_fn: CellFn | None = None,
    resume: bool = False,
    max_attempts: int = 3,
    sweep_id: str | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    node_wait_s: float = 0.0,
    window: float = 1.0,
    poll_s: float = 0.2,
    embedded: bool = False,
) -> SweepReport:
    """Run every cell of ``grid`` on the Ray cluster this process is connected to (an embedded
    one is started if Ray is not initialised) and gather the results under ``out_dir``.

    ``cell_fn(config, out_dir, *, run_id, placement_group) -> Path`` runs one cell (default:
    ``ptlab.cluster.cell.run_cell``, imported on the worker).  ``resume`` continues the sweep
    in ``out_dir``, skipping cells whose result file is there.  ``max_attempts`` bounds the
    tries of a failing cell (node loss not counted).  ``node_wait_s``: how long a cell that
    fits no alive node may wait for one (autoscaling) before it fails.  ``window``: cells in
    flight, in CPUs, as a multiple of the alive CPUs; above 1, placement groups wait in Ray's
    queue, whose retry back-off (up to 1 s) then adds to every cell's start.  ``embedded``: the driver shares the host with the only node (also clean up
    this host's shared memory from the driver).

    Returns the SweepReport.  Raises ConfigError for a bad grid, a cell no node can hold, or
    an ``out_dir`` that holds another sweep (without ``resume``); SweepInterrupted (a
    KeyboardInterrupt) after cleaning up when interrupted; ResultFileError when ``out_dir``
    cannot be written.
    """
    import ray

    cells = expand(grid) if isinstance(grid, SweepSpec) else list(grid)
    spec = grid if isinstance(grid, SweepSpec) else None
    if not cells:
        raise ConfigError("the sweep has no cells")
    if max_attempts < 1:
        raise ConfigError(f"--max-attempts must be at least 1 (got {max_attempts})")
    if not ray.is_initialized():
        embedded = connect(None) or embedded
    driver = _Driver(
        cells=cells,
        spec=spec,
        out_dir=Path(out_dir),
        cell_fn=cell_fn,
        resume=resume,
        max_attempts=max_attempts,
        sweep_id=sweep_id,
        on_progress=on_progress,
        node_wait_s=node_wait_s,
        window=window,
        poll_s=poll_s,
        embedded=embedded,
    )
    return driver.run()


def default_sweep_id(cells: Iterable[Cell]) -> str:
    """``YYYYmmdd-HHMMSS-<6 hex of the cell ids>`` (local time)."""
    h = hashlib.sha256("".join(sorted(c.cell_id for c in cells)).encode()).hexdigest()[:6]
    return f"{datetime.now():%Y%m%d-%H%M%S}-{h}"


def load_manifest(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of the sweep in ``out_dir``.  Raises ConfigError when there is none or it
    is unreadable."""
    path = Path(out_dir) / MANIFEST
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{out_dir}: no sweep here (no {MANIFEST}); check the directory given to --resume"
        ) from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable sweep manifest ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("cells"), dict):
        raise ConfigError(f"{path}: not a ptlab sweep manifest")
    return doc


@dataclass
class _Flight:
    record: CellRecord
    pg: Any
    placed: bool = False


class _Driver:
    def __init__(
        self,
        *,
        cells: list[Cell],
        spec: SweepSpec | None,
        out_dir: Path,
        cell_fn: CellFn | None,
        resume: bool,
        max_attempts: int,
        sweep_id: str | None,
        on_progress: Callable[[Progress], None] | None,
        node_wait_s: float,
        window: float,
        poll_s: float,
        embedded: bool,
    ) -> None:
        self.cells = cells
        self.spec = spec
        self.out_dir = out_dir
        self.cell_fn = cell_fn
        self.max_attempts = max_attempts
        self.on_progress = on_progress
        self.node_wait_s = node_wait_s
        self.window = window
        self.poll_s = poll_s
        self.embedded = embedded

        self.records: dict[str, CellRecord] = {}
        self.previous: dict[str, Any] = {}
        self.created_at = time.time()
        if resume:
            self.previous = load_manifest(out_dir)
            self.sweep_id = sweep_id or str(self.previous.get("sweep_id") or out_dir.name)
            self.created_at = float(self.previous.get("created_at") or self.created_at)
            for cid, d in self.previous["cells"].items():
                self.records[cid] = CellRecord.from_dict(d)
            if spec is None and self.previous.get("spec"):
                self.spec = SweepSpec.from_dict(self.previous["spec"])
        else:
            if (out_dir / MANIFEST).exists():
                raise ConfigError(
                    f"{out_dir} already holds a sweep; continue it with --resume {out_dir} "
                    "or choose another --out"
                )
            self.sweep_id = sweep_id or default_sweep_id(cells)
        self.grid_ids = [c.cell_id for c in cells]
        for c in cells:
            rec = self.records.get(c.cell_id)
            if rec is None:
                self.records[c.cell_id] = CellRecord.for_cell(c)
        self.queue: collections.deque[CellRecord] = collections.deque()
        self.flights: dict[Any, _Flight] = {}
        # placement groups whose cell finished, by size, with their node: reused for the next
        # cell of that size (no new placement); dropped when their node dies
        self.pool: dict[int, list[tuple[Any, str]]] = collections.defaultdict(list)
        self.nodes: dict[str, dict[str, Any]] = {}
        self.skipped = 0
        self.retries = 0
        self._tries: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        self.t0 = time.time()
        self._last_manifest = 0.0
        self._last_nodes = 0.0
        self._dirty = True
        self._shm_removed: dict[str, list[str]] = {}
        self._seen_alive: set[str] = set()  # nodes alive at some point of this invocation

    # -- setup --

    def _prepare(self) -> None:
        """Mark cells whose result file exists done; queue the others."""
        for cid in self.grid_ids:
            rec = self.records[cid]
            path = self._cell_path(cid)
            if path.exists():
                try:
                    result = read_run(path)
                except ResultFileError:
                    path.unlink(missing_ok=True)
                else:
                    if rec.status != DONE:
                        rec.status = DONE
                        rec.file = str(path.relative_to(self.out_dir))
                    rec.violations = int((result.meta.get("summary") or {}).get("violations")
                                         or len(result.meta.get("violations") or []))
                    if not rec.part or not (self.out_dir / rec.part).exists():
                        self._write_part(rec, result.table)
                    self.skipped += 1
                    continue
            rec.status = PENDING
            rec.error = ""
            self.queue.append(rec)

    def _check_fit(self) -> None:
        biggest = max((n["cpus"] for n in self.nodes.values() if n["alive"]), default=0)
        need = max((r.nr_cpus for r in self.queue), default=0)
        if need > biggest and self.node_wait_s <= 0:
            raise ConfigError(
                f"a cell needs {need} CPUs on one node but the largest node has {biggest}; "
                "lower the CPU counts per role or add bigger nodes"
            )

    # -- main --

    def run(self) -> SweepReport:
        self._prepare()
        self._refresh_nodes()
        self._check_fit()
        try:
            (self.out_dir / CELLS_DIR).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ResultFileError(f"cannot write results to {self.out_dir}: {e.strerror}") from None
        self._write_manifest("running")
        interrupted = False
        try:
            self._loop()
        except KeyboardInterrupt:
            interrupted = True
        finally:
            status = self._finish(interrupted)
        report = self._report(status)
        if interrupted:
            raise SweepInterrupted(report)
        return report

    def _loop(self) -> None:
        import ray

        while self.queue or self.flights:
            self._fill()
            refs = list(self.flights)
            if refs:
                ready, _ = ray.wait(refs, num_returns=1, timeout=self.poll_s)
                if ready:
                    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                for ref in ready:
                    self._collect(ref)
            else:
                time.sleep(self.poll_s)
            self._poll_placements()
            now = time.time()
            if now - self._last_nodes >= 1.0:
                self._refresh_nodes()
                self._release_pool(dead_only=True)
                self._fail_unplaceable()
            self._publish()
            if self._dirty and now - self._last_manifest >= 1.0:
                self._write_manifest("running")

    def _window_cpus(self) -> float:
        alive = sum(n["cpus"] for n in self.nodes.values() if n["alive"])
        return max(1.0, self.window * alive)

    def _fill(self) -> None:
        """Start queued cells: in an idle placement group of the right size when there is one
        (no placement at all), else in a new group while the window allows."""
        while self.queue:
            rec = self.queue[0]
            idle = self.pool.get(rec.nr_cpus)
            if idle:
                self.queue.popleft()
                self._submit(rec, idle.pop()[0])
                continue
            if self.flights or self._pooled_cpus():
                if self._reserved_cpus() + rec.nr_cpus > self._window_cpus():
                    if not self._pooled_cpus():
                        return
                    self._release_one()  # an idle group of another size frees its cores
                    continue
            self.queue.popleft()
            self._submit(rec, None)
        if not self.queue:
            self._release_pool()

    def _pooled_cpus(self) -> int:
        return sum(n * len(pgs) for n, pgs in self.pool.items())

    def _reserved_cpus(self) -> int:
        return sum(f.record.nr_cpus for f in self.flights.values()) + self._pooled_cpus()

    def _release_one(self) -> None:
        for pgs in self.pool.values():
            if pgs:
                self._remove_pg(pgs.pop()[0])
                return

    def _release_pool(self, dead_only: bool = False) -> None:
        for pgs in self.pool.values():
            keep = []
            for pg, node_id in pgs:
                if dead_only and self.nodes.get(node_id, {}).get("alive", True):
                    keep.append((pg, node_id))
                else:
                    self._remove_pg(pg)
            pgs[:] = keep

    def _submit(self, rec: CellRecord, pg: Any) -> None:
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        rec.attempts += 1
        rec.status = PENDING
        rec.node_id = rec.node_ip = ""
        rec.submitted_at = time.time()
        rec.placed_at = 0.0
        if pg is None:
            # one core per simulated CPU, all on one node: shared memory does not cross hosts
            pg = placement_group(
                [{"CPU": 1}] * rec.nr_cpus,
                strategy="STRICT_PACK",
                name=f"ptlab-{rec.cell_id}-{rec.attempts}",
            )
        strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
        ref = (
            _cell_task()
            .options(scheduling_strategy=strategy, name=f"ptlab-cell-{rec.cell_id}")
            .remote(self.cell_fn, rec.params, rec.cell_id, pg)
        )
        self.flights[ref] = _Flight(rec, pg)
        self._dirty = True

    def _poll_placements(self) -> None:
        from ray.util.placement_group import placement_group_table

        for flight in self.flights.values():
            if flight.placed:
                continue
            try:
                table = placement_group_table(flight.pg)
            except Exception:  # the GCS is briefly unavailable: try again next round
                return
            if table.get("state") == "CREATED":
                node = table.get("bundles_to_node_id", {}).get(0, "")
                self._mark_running(flight, node, time.time())

    def _mark_running(self, flight: _Flight, node_id: str, at: float) -> None:
        flight.placed = True
        rec = flight.record
        rec.status = RUNNING
        rec.placed_at = at
        rec.node_id = node_id
        rec.node_ip = self.nodes.get(node_id, {}).get("ip", "")
        self._dirty = True

    def _collect(self, ref: Any) -> None:
        import ray

        flight = self.flights.pop(ref)
        rec = flight.record
        try:
            info, data = ray.get(ref)
        except KeyboardInterrupt:
            self._remove_pg(flight.pg)
            raise
        except Exception as e:
            # the group may sit on a dead node or hold a crashed cell's actors: never reuse it
            self._remove_pg(flight.pg)
            self._attempt_failed(rec, e)
            return
        # the cores are free again: start the next cell in them before writing this result
        self.pool[rec.nr_cpus].append((flight.pg, info["node_id"]))
        self._fill()
        if not flight.placed or rec.placed_at > info["started_at"]:
            # placement is polled: the cell's own start time bounds it more tightly
            self._mark_running(flight, info["node_id"], info["started_at"])
        rec.node_id = info["node_id"]
        rec.node_ip = self.nodes.get(rec.node_id, {}).get("ip", rec.node_ip)
        rec.pid = int(info.get("pid", 0))
        rec.started_at = float(info["started_at"])
        rec.ended_at = float(info["ended_at"])
        rec.run_s = rec.ended_at - rec.started_at
        try:
            result = self._store(rec, data)
        except _BadResult as e:
            self._attempt_failed(rec, e)
            return
        table = result.table
        rec.violations = int((result.meta.get("summary") or {}).get("violations")
                             or len(result.meta.get("violations") or []))
        rec.gathered_at = time.time()
        rec.overhead_s = max(0.0, (rec.gathered_at - rec.submitted_at) - rec.run_s)
        rec.status = DONE
        rec.error = ""
        rec.history.append({"attempt": rec.attempts, "node_id": rec.node_id, "result": DONE})
        self._write_part(rec, table)
        self._dirty = True

    def _store(self, rec: CellRecord, data: bytes) -> RunResult:
        """Write the cell's file atomically, after checking that the bytes are a readable
        result with a good checksum (a bad result is a failed attempt, never a file under the
        final name)."""
        path = self._cell_path(rec.cell_id)

        def check(tmp: Path) -> RunResult:
            try:
                return read_run(tmp)
            except ResultFileError as e:
                raise _BadResult(f"the cell returned an unreadable result: {e}") from None

        result = _atomic_bytes(path, data, check=check)
        rec.file = str(path.relative_to(self.out_dir))
        return result

    def _write_part(self, rec: CellRecord, table: pa.Table) -> None:
        """The cell's events in the merged dataset: hive-partitioned Parquet (DuckDB, Spark,
        polars and pyarrow.dataset scan it natively), with the cell's grid coordinates."""
        strategy = str(rec.params.get("strategy", "unknown"))
        part = self.out_dir / MERGED_DIR / f"strategy={strategy}" / f"part-{rec.cell_id}.parquet"
        write_table(_with_cell_columns(table, rec), part)
        with contextlib.suppress(OSError):
            os.chmod(part, _FILE_MODE)
        rec.part = str(part.relative_to(self.out_dir))

    def _attempt_failed(self, rec: CellRecord, e: BaseException) -> None:
        import ray.exceptions as rex

        message = _one_line(e)
        node_lost = isinstance(e, (rex.NodeDiedError, rex.ObjectLostError)) or (
            bool(rec.node_id) and not self.nodes.get(rec.node_id, {}).get("alive", True)
        )
        final = isinstance(e, PtlabError) and e.exit_code == 2  # bad configuration: no retry
        rec.history.append(
            {"attempt": rec.attempts, "node_id": rec.node_id, "result": "node lost" if node_lost else "failed",
             "error": message, "at": round(time.time(), 3)}
        )  # fmt: skip
        # attempts of this invocation only: a resumed sweep gives failed cells a fresh budget
        tries = self._tries[rec.cell_id]
        tries["failed" if not node_lost else "lost"] += 1
        if not final and tries["failed"] < self.max_attempts and tries["lost"] < 20:
            self.retries += 1
            rec.status = PENDING
            rec.error = message
            self.queue.appendleft(rec)
        else:
            rec.status = FAILED
            rec.error = message
        self._dirty = True

    def _refresh_nodes(self) -> None:
        import ray

        self._last_nodes = time.time()
        try:
            nodes = ray.nodes()
        except Exception:
            return
        for n in nodes:
            nid = n.get("NodeID", "")
            self.nodes[nid] = {
                "ip": n.get("NodeManagerAddress", ""),
                "cpus": int((n.get("Resources") or {}).get("CPU", 0)),
                "alive": bool(n.get("Alive")),
            }
            if n.get("Alive"):
                self._seen_alive.add(nid)

    def _fail_unplaceable(self) -> None:
        """Cells that fit no alive node fail once ``node_wait_s`` has passed."""
        if time.time() - self.t0 < self.node_wait_s:
            return
        biggest = max((n["cpus"] for n in self.nodes.values() if n["alive"]), default=0)
        import ray

        for ref, flight in list(self.flights.items()):
            rec = flight.record
            if flight.placed or rec.nr_cpus <= biggest:
                continue
            self.flights.pop(ref)
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
            self._remove_pg(flight.pg)
            rec.status = FAILED
            rec.error = f"no alive node has {rec.nr_cpus} CPUs (largest: {biggest})"
        for rec in list(self.queue):
            if rec.nr_cpus > biggest:
                self.queue.remove(rec)
                rec.status = FAILED
                rec.error = f"no alive node has {rec.nr_cpus} CPUs (largest: {biggest})"

    @staticmethod
    def _remove_pg(pg: Any) -> None:
        from ray.util.placement_group import remove_placement_group

        with contextlib.suppress(Exception):
            remove_placement_group(pg)

    # -- the end --

    def _finish(self, interrupted: bool) -> str:
        """Cancel what runs, clean shared memory on every node, write the final manifest."""
        import ray

        try:
            if self.flights:
                refs = list(self.flights)
                for ref in refs:
                    with contextlib.suppress(Exception):
                        ray.cancel(ref, force=True)
                # wait until the killed cell processes are gone, so their pids read as dead
                with contextlib.suppress(Exception):
                    ray.wait(refs, num_returns=len(refs), timeout=15)
                for flight in self.flights.values():
                    self._remove_pg(flight.pg)
                    if flight.record.status != DONE:
                        flight.record.status = CANCELLED
                        flight.record.error = "cancelled (sweep interrupted)"
                self.flights.clear()
            self._release_pool()
            self._clean_shm()
        except KeyboardInterrupt:
            log.warning("clean-up abandoned by a second interrupt")
        grid = [self.records[c] for c in self.grid_ids]
        for r in grid:
            if r.status == RUNNING:  # interrupted between its end and its gathering
                r.status = CANCELLED
        if all(r.status == DONE for r in grid):
            status = "complete"
        elif interrupted or any(r.status in (PENDING, RUNNING, CANCELLED) for r in grid):
            status = "partial"
        else:
            status = "failed"
        self._write_manifest(status)
        self._publish()
        return status

    def _lost_nodes(self, grid: list[CellRecord]) -> tuple[LostNode, ...]:
        """Nodes that were alive during this sweep and are dead now, with the attempts they
        took down (history entries "node lost" of this invocation)."""
        taken: collections.Counter[str] = collections.Counter()
        for r in grid:
            for h in r.history:
                if h.get("result") == "node lost" and h.get("at", self.t0) >= self.t0:
                    taken[h.get("node_id", "")] += 1
        out = []
        for nid in sorted(self._seen_alive):
            n = self.nodes.get(nid, {})
            if not n.get("alive", True):
                out.append(LostNode(nid, n.get("ip", ""), taken.get(nid, 0)))
        return tuple(out)

    def _clean_shm(self) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        tokens = sorted(self.records)
        self._refresh_nodes()
        task = _shm_task()
        refs = {}
        for nid, n in self.nodes.items():
            if not n["alive"]:
                continue
            strategy = NodeAffinitySchedulingStrategy(nid, soft=False)
            refs[nid] = task.options(scheduling_strategy=strategy).remote(tokens)
        for nid, ref in refs.items():
            try:
                self._shm_removed[nid] = ray.get(ref, timeout=30)
            except KeyboardInterrupt:
                raise
            except Exception as e:
                self._shm_removed[nid] = [f"(clean-up failed: {_one_line(e)})"]
        if self.embedded:
            self._shm_removed.setdefault("driver", []).extend(sweep_shm(tokens=tokens))

    # -- output --

    def _cell_path(self, cid: str) -> Path:
        return self.out_dir / CELLS_DIR / f"{cid}.arrow"

    def _counts(self) -> dict[str, int]:
        c = collections.Counter(self.records[cid].status for cid in self.grid_ids)
        return {s: c.get(s, 0) for s in (DONE, RUNNING, PENDING, FAILED, CANCELLED)}

    def _write_manifest(self, status: str) -> None:
        self._last_manifest = time.time()
        self._dirty = False
        grid = set(self.grid_ids)
        doc = {
            "format": MANIFEST_FORMAT,
            "sweep_id": self.sweep_id,
            "status": status,
            "created_at": self.created_at,
            "updated_at": time.time(),
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "elapsed_s": round(time.time() - self.t0, 3),
            "spec": self.spec.to_dict() if self.spec else self.previous.get("spec"),
            "grid": self.grid_ids,
            "counts": self._counts(),
            "skipped": self.skipped,
            "nodes": self.nodes,
            "cells": {cid: asdict(r) | {"in_grid": cid in grid} for cid, r in self.records.items()},
            "shm_cleanup": self._shm_removed,
        }
        text = json.dumps(doc, indent=1, sort_keys=False)
        _atomic_bytes(self.out_dir / MANIFEST, text.encode())

    def _publish(self) -> None:
        if self.on_progress is None:
            return
        self.on_progress(self._progress())

    def _progress(self) -> Progress:
        grid = [self.records[c] for c in self.grid_ids]
        per: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        for r in grid:
            if r.node_id and r.status in (RUNNING, DONE, FAILED):
                per[r.node_id][r.status] += 1
        nodes = []
        for nid, n in sorted(self.nodes.items(), key=lambda kv: (kv[1]["ip"], kv[0])):
            c = per.get(nid, collections.Counter())
            if not n["alive"] and not c:
                continue
            nodes.append(
                NodeProgress(nid, n["ip"], n["cpus"], n["alive"], c[RUNNING], c[DONE], c[FAILED])
            )
        counts = self._counts()
        return Progress(
            sweep_id=self.sweep_id,
            total=len(grid),
            done=counts[DONE],
            running=counts[RUNNING],
            pending=counts[PENDING],
            failed=counts[FAILED],
            skipped=self.skipped,
            nodes=tuple(nodes),
            elapsed_s=time.time() - self.t0,
            eta_s=self._eta(grid),
            retries=self.retries,
        )

    def _eta(self, grid: list[CellRecord]) -> float | None:
        """Remaining CPU-seconds over the alive CPUs.  A cell costs its expected run time
        scaled by what finished cells took, plus their mean overhead (1 s until known)."""
        alive = sum(n["cpus"] for n in self.nodes.values() if n["alive"])
        if not alive:
            return None
        finished = [r for r in grid if r.status == DONE and r.gathered_at and r.run_s > 0]
        finished = [r for r in finished if r.gathered_at >= self.t0]
        if finished:
            scale = sum(r.run_s for r in finished) / max(1e-9, sum(r.expected_s for r in finished))
            overhead = sum(r.overhead_s for r in finished) / len(finished)
        else:
            scale, overhead = 1.0, 1.0
        now = time.time()
        work = 0.0
        longest = 0.0
        for r in grid:
            cost = r.expected_s * scale + overhead
            if r.status == PENDING:
                work += cost * r.nr_cpus
            elif r.status == RUNNING:
                left = max(0.0, cost - (now - r.placed_at)) if r.placed_at else cost
                work += left * r.nr_cpus
                longest = max(longest, left)
        return max(work / alive, longest)

    def _report(self, status: str) -> SweepReport:
        counts = self._counts()
        grid = [self.records[c] for c in self.grid_ids]
        used = sorted({r.node_id for r in grid if r.status == DONE and r.node_id})
        return SweepReport(
            violations=sum(1 for r in grid if r.status == DONE and r.violations),
            lost_nodes=self._lost_nodes(grid),
            sweep_id=self.sweep_id,
            out_dir=self.out_dir,
            status=status,
            total=len(grid),
            done=counts[DONE],
            failed=counts[FAILED],
            skipped=self.skipped,
            elapsed_s=time.time() - self.t0,
            manifest=self.out_dir / MANIFEST,
            merged_dir=self.out_dir / MERGED_DIR,
            nodes_used=tuple(used),
            cells=tuple(grid),
        )


class _BadResult(Exception):
    pass


def _one_line(e: BaseException) -> str:
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        e = cause
    text = str(e).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = lines[-1] if len(lines) > 1 else (lines[0] if lines else "")
    name = type(e).__name__
    if line and not line.startswith(name):
        line = f"{name}: {line}"
    return (line or name)[:400]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def _atomic_bytes(path: Path, data: bytes, check: Callable[[Path], Any] | None = None) -> Any:
    """Write ``data`` so that ``path`` appears whole or not at all, readable by others (the
    results are for sharing); ``check(temp_path)`` runs before the rename."""
    try:
        return atomic_write_bytes(path, data, check=check, mode=_FILE_MODE)
    except OSError as e:
        raise ResultFileError(f"cannot write {path}: {e.strerror}") from None


# Columns the merged dataset adds to every event: the cell's grid coordinates, so a query can
# group by any axis without joining the manifest.  (``strategy`` comes from the partition.)
CELL_COLUMNS = ("cell_id", "cell_repeat", "cell_seed", "cell_order", "cell_cpus",
                "cell_workload", "cell_flush", "cell_ptl", "cell_vma_locks", "cell_node")  # fmt: skip


def _with_cell_columns(table: pa.Table, rec: CellRecord) -> pa.Table:
    n = table.num_rows
    p = rec.params

    def const(value: Any, type_: pa.DataType) -> pa.Array:
        if pa.types.is_dictionary(type_):
            indices = pa.array([0] * n, pa.int32()) if n else pa.array([], pa.int32())
            return pa.DictionaryArray.from_arrays(indices, pa.array([str(value)], pa.string()))
        return pa.array([value] * n, type_)

    dict_t = pa.dictionary(pa.int32(), pa.string())
    columns = {
        "cell_id": const(rec.cell_id, dict_t),
        "cell_repeat": const(rec.repeat, pa.int32()),
        "cell_seed": const(int(p.get("seed", 0)), pa.int64()),
        "cell_order": const(int(p.get("order", 0)), pa.int8()),
        "cell_cpus": const(cpus_label(p.get("cpus", {})), dict_t),
        "cell_workload": const(p.get("workload", ""), dict_t),
        "cell_flush": const(p.get("flush", ""), dict_t),
        "cell_ptl": const(p.get("ptl", ""), dict_t),
        "cell_vma_locks": const(bool(p.get("vma_locks", True)), pa.bool_()),
        "cell_node": const(rec.node_id, dict_t),
    }
    out = table.drop_columns([c for c in ("strategy", *CELL_COLUMNS) if c in table.column_names])
    for name, arr in columns.items():
        out = out.append_column(name, arr)
    meta = dict(table.schema.metadata or {})
    return out.replace_schema_metadata({METADATA_KEY: meta.get(METADATA_KEY, b"{}")})
