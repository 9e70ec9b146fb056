"""The scheduled backend: every simulated CPU a greenlet of one process, every shared-memory
operation a scheduling point chosen by a scheduler — so any interleaving replays bit for bit.

Same code, second backend.  The machine's four segments are wrapped (``SchedRegion``): each
load, store, CAS, fetch-op, xchg, futex wait/wake and spin-lock attempt of the kernel paths,
locks, strategies and oracle first asks the world which CPU runs next.  Nothing else changes:
the kernel paths never know which backend they are on (loom's idea; Shuttle's scheduler API).

Blocking, so that a scheduler never picks a CPU that cannot make progress (PCT needs this):
  - a futex wait blocks the task until a futex_wake on the same word;
  - a spin on a held lock blocks until the lock word, or this CPU's IPI flag, is written —
    ``spin_lock`` then returns as the C loop does (acquired, or interrupted by an IPI);
  - a polling loop (``cpu_relax()``: waiting for IPI acks, the broadcast ring, in-flight
    accesses) blocks until one of the words the CPU read since its last relax is written.
If every unfinished task is blocked, the run is a deadlock — a result, with the lock dump.

Time is virtual: each task has a clock that every operation advances by its cost (one unit per
operation by default; the cost table of the virtual-time model plugs in here), a waiter's clock
jumps to its waker's, ``cpu.delay(ns)`` and ``cpu.idle(ns)`` advance it.  Events carry these
clocks, so a scheduled run's result file reads like any other.

Schedulers (``Scheduler``: start + pick, a schedule is data):
  - ``random``: at each point keep the current CPU, or with probability ``p`` switch to a random
    runnable one (seeded);
  - ``pct``: probabilistic concurrency testing (Burckhardt et al., ASPLOS 2010): random distinct
    priorities, d-1 priority change points over the expected k steps; always the runnable CPU
    of highest priority.  Finds any bug of depth d with probability >= 1/(n k^(d-1));
  - ``replay``: the recorded choices of another run, exactly.
"""

from __future__ import annotations

import hashlib
import heapq
import random
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import greenlet
from ptlab.core.machine._prims import Region

RUNNABLE, BLOCKED, DONE = 0, 1, 2
READS_CAP = 64  # a relax after more distinct reads than this is not a polling loop: just yield

# operation kinds (for the trace and the cost table)
K_LOAD, K_STORE, K_RMW, K_FUTEX_WAIT, K_FUTEX_WAKE, K_SPIN, K_COPY, K_DELAY, K_OTHER = range(9)
KIND_NAMES = ("load", "store", "rmw", "futex_wait", "futex_wake", "spin", "copy", "delay", "other")


class Deadlock(Exception):
    """Every unfinished CPU is blocked."""


class BudgetExceeded(Exception):
    """The run took more scheduling steps than its budget."""


# ------------------------------------------------------------------------------------- schedulers
class Scheduler:
    """Start a new execution; pick the next CPU among the runnable ones."""

    name = "base"

    def start(self, nr_tasks: int) -> None:
        pass

    def pick(self, runnable: Sequence[int], current: int, step: int) -> int:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


class RandomScheduler(Scheduler):
    name = "random"

    def __init__(self, seed: int, p_switch: float = 0.1) -> None:
        self.seed = seed
        self.p = p_switch
        self.rng = random.Random(seed)

    def start(self, nr_tasks: int) -> None:
        self.rng = random.Random(self.seed)

    def pick(self, runnable: Sequence[int], current: int, step: int) -> int:
        if current in runnable and self.rng.random() >= self.p:
            return current
        return runnable[self.rng.randrange(len(runnable))]

    def describe(self) -> str:
        return f"random:seed={self.seed},p={self.p:g}"


class PctScheduler(Scheduler):
    """PCT with depth d over an expected k steps: d-1 change points uniformly in [1, k]."""

    name = "pct"

    def __init__(self, seed: int, depth: int = 3, k: int = 20_000) -> None:
        self.seed, self.depth, self.k = seed, depth, k
        self.prio: list[int] = []
        self.changes: list[int] = []

    def start(self, nr_tasks: int) -> None:
        rng = random.Random(self.seed)
        base = list(range(self.depth, self.depth + nr_tasks))
        rng.shuffle(base)
        self.prio = base
        self.changes = sorted(rng.sample(range(1, self.k + 1), min(self.depth - 1, self.k)))
        self._next = 0

    def pick(self, runnable: Sequence[int], current: int, step: int) -> int:
        while self._next < len(self.changes) and step >= self.changes[self._next]:
            if current >= 0:
                self.prio[current] = self.depth - 1 - self._next  # below every initial priority
            self._next += 1
        best = runnable[0]
        for t in runnable:
            if self.prio[t] > self.prio[best]:
                best = t
        return best

    def describe(self) -> str:
        return f"pct:seed={self.seed},d={self.depth},k={self.k}"


class ReplayScheduler(Scheduler):
    """The choices of a recorded run, made again at the same decision points."""

    name = "replay"

    def __init__(self, choices: Sequence[int]) -> None:
        self.choices = list(choices)
        self.i = 0

    def start(self, nr_tasks: int) -> None:
        self.i = 0

    def pick(self, runnable: Sequence[int], current: int, step: int) -> int:
        if self.i < len(self.choices):
            c = self.choices[self.i]
            self.i += 1
            if c not in runnable:
                raise RuntimeError(f"replay diverged at decision {self.i - 1}: CPU {c} is not runnable (runnable: {list(runnable)})")
            return c
        return current if current in runnable else runnable[0]

    def describe(self) -> str:
        return f"replay:{len(self.choices)} choices"


def make_scheduler(spec: str, seed: int, k: int = 20_000) -> Scheduler:
    """``random``, ``random:0.3`` (switch probability), ``pct``, ``pct:4`` (depth)."""
    name, _, arg = spec.partition(":")
    if name == "random":
        return RandomScheduler(seed, float(arg) if arg else 0.1)
    if name == "pct":
        return PctScheduler(seed, int(arg) if arg else 3, k)
    raise ValueError(f"unknown scheduler {spec!r}; choose random[:P] or pct[:DEPTH]")


# ------------------------------------------------------------------------------------- the world
@dataclass(eq=False)
class Task:
    id: int
    fn: Callable[[], Any]
    g: Any = None
    state: int = RUNNABLE
    clock: int = 0
    reads: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)  # word -> (width, value)
    watching: list[tuple[int, int]] = field(default_factory=list)
    futex: tuple[int, int] | None = None
    error: BaseException | None = None


class Costs:
    """A cost table as attributes (virtual ns per kernel step); see core/analysis/costs.py for where each
    number comes from."""

    def __init__(self, entries: dict[str, float]) -> None:
        self.entries = dict(entries)
        for k, v in entries.items():
            setattr(self, k, int(round(v)))

    def get(self, name: str, default: int = 0) -> int:
        return int(round(self.entries.get(name, default)))


class CostModel:
    """Charges each operation its kernel cost: a word access hits the CPU's cache unless the
    line was last written by another CPU (then a cache-line transfer; a write also invalidates
    the other copies: a MESI-like owner + sharers per line of ctl, pt and folio); an atomic pays
    the locked RMW on top; copies and clears cost per 4 KiB; freeing's poison fill is the
    model's own bookkeeping and costs nothing."""

    def __init__(self, table: Costs, free_words: set[tuple[int, int]] | None = None, free_ranges: list[tuple[int, int, int]] | None = None) -> None:
        self.table = table
        self.lines: dict[tuple[int, int], tuple[int, int]] = {}
        # the model's own bookkeeping (the oracle's epochs, event flags, lock statistics, owner
        # tags, the watchdog's state words): no kernel work, so no time and no cache traffic
        self.free_words = free_words or set()
        self.free_ranges = free_ranges or []
        t = table
        self.hit, self.atomic, self.xfer = t.load_hit, t.atomic, t.line_transfer
        self.copy, self.zero = t.copy_page, t.zero_page
        self.futex = t.get("futex_syscall", 150)

    def op(self, task: int, kind: int, rid: int, off: int, n: int) -> int:
        if kind == K_COPY:
            return (self.copy if rid == 3 and n >= 0 else self.zero) * max(1, abs(n)) // 4096
        if kind in (K_DELAY, K_OTHER):
            return 0
        if kind in (K_FUTEX_WAIT, K_FUTEX_WAKE):
            return self.futex
        if rid == 3:
            return self.hit  # the app's own data: the oracle's words are not shared lines
        if (rid, off) in self.free_words:
            return 0
        for r, lo, hi in self.free_ranges:
            if r == rid and lo <= off < hi:
                return 0
        line = (rid, off >> 6)
        st = self.lines.get(line)
        bit = 1 << task
        if kind == K_LOAD:
            if st is None:
                self.lines[line] = (-1, bit)
                return self.hit
            if st[1] & bit:
                return self.hit
            self.lines[line] = (st[0], st[1] | bit)
            return self.xfer
        base = self.hit if kind == K_STORE else self.atomic
        self.lines[line] = (task, bit)
        if st is None or st == (task, bit):
            return base
        return base + self.xfer


class World:
    """One scheduled execution: tasks, the scheduler's decisions, the trace.

    Two ways to pick the next CPU: a ``Scheduler`` (explore: any interleaving, decided at every
    point) or, with a ``cost`` model (virtual time), always the runnable CPU with the earliest
    clock — every simulated CPU is then a core of its own running in parallel in virtual time,
    and ``quantum_ns`` lets the current CPU run ahead of the next one by at most that much
    before it hands over (fewer switches, the order of events within a quantum kept)."""

    def __init__(self, scheduler: Scheduler | None = None, max_steps: int = 2_000_000, cost: Any = None, quantum_ns: int = 0) -> None:
        self.sched = scheduler
        self.max_steps = max_steps
        self.cost = cost  # a CostModel (virtual time) or None (one unit per operation)
        self.virtual = cost is not None
        self.quantum = quantum_ns
        self.tasks: list[Task] = []
        self.current: Task | None = None
        self.main: Any = None
        self.step = 0
        self.decisions = array("b")  # the chosen CPU at every point with more than one runnable
        self.trace = array("q")  # per step: task << 56 | kind << 48 | region << 40 | offset
        self.watch: dict[tuple[int, int], set[Task]] = {}
        self.futexes: dict[tuple[int, int], list[Task]] = {}
        self.spinq: dict[tuple[int, int], list[Task]] = {}  # queued spinlock waiters (virtual time)
        self.ready: list[tuple[int, int]] = []  # virtual time: heap of (clock, id), runnable, not current
        self.finished = False
        self.outcome = ""  # "done", "deadlock", "budget", "error"
        self.raw: dict[int, Region] = {}  # region id -> the unwrapped segment
        self.keep_trace = not self.virtual

    # -- setup --------------------------------------------------------------------------------
    def spawn(self, fn: Callable[[], Any]) -> Task:
        t = Task(len(self.tasks), fn)
        self.tasks.append(t)
        return t

    def region(self, name: str, region: Region) -> SchedRegion:
        rid = ("ctl", "pt", "folio", "frames").index(name)
        self.raw[rid] = region
        return SchedRegion(self, region, rid)

    def now(self) -> int:
        t = self.current
        return t.clock if t is not None else max((x.clock for x in self.tasks), default=0)

    # -- running ------------------------------------------------------------------------------
    def run(self) -> str:
        """Run every task to its end (or to a deadlock or the step budget).  Returns the outcome."""
        self.main = greenlet.getcurrent()
        if self.sched is not None:
            self.sched.start(len(self.tasks))
        for t in self.tasks:
            t.g = greenlet.greenlet(self._body(t), parent=self.main)
            if self.virtual:
                heapq.heappush(self.ready, (t.clock, t.id))
        try:
            while True:
                nxt = self._next(-1)
                if nxt < 0:
                    break
                self.current = self.tasks[nxt]
                self.current.g.switch()
                if self.outcome:
                    break
            if not self.outcome:
                left = [t for t in self.tasks if t.state != DONE]
                self.outcome = "deadlock" if left else "done"
        finally:
            self.current = None
            self.finished = True
        return self.outcome

    def _body(self, t: Task) -> Callable[[], None]:
        def body() -> None:
            try:
                t.fn()
            except greenlet.GreenletExit:
                raise
            except BudgetExceeded:
                self.outcome = "budget"
            except BaseException as e:  # reported by the driver
                t.error = e
                self.outcome = self.outcome or "error"
            finally:
                t.state = DONE
                self._unwatch(t)
            # returning hands control to the run loop, which picks the next task

        return body

    def abandon(self) -> None:
        """Drop the unfinished tasks without running their unwinding (the machine goes away)."""
        for t in self.tasks:
            if t.g is not None and not t.g.dead:
                try:
                    t.g.throw(greenlet.GreenletExit)
                except BaseException:  # noqa: BLE001 - anything their finally blocks raise
                    pass

    def _runnable(self) -> list[int]:
        return [t.id for t in self.tasks if t.state == RUNNABLE]

    def _next(self, current: int) -> int:
        """The next task to run (``current`` is runnable and may go on, or -1); -1 when none."""
        if self.virtual:
            if not self.ready:
                return current
            if current >= 0:
                heapq.heappush(self.ready, (self.tasks[current].clock, current))
            return heapq.heappop(self.ready)[1]
        runnable = self._runnable()
        if not runnable:
            return -1
        if len(runnable) == 1:
            return runnable[0]
        assert self.sched is not None
        c = self.sched.pick(runnable, current, self.step)
        self.decisions.append(c)
        return c

    # -- called from the tasks (wrappers, CPU hooks) -------------------------------------------
    def point(self, kind: int, rid: int, off: int, n: int = 0) -> None:
        """A scheduling point before a shared operation of the current task."""
        t = self.current
        if t is None or self.finished:
            return
        self.step += 1
        if self.virtual:
            t.clock += self.cost.op(t.id, kind, rid, off, n)
            ready = self.ready
            if ready and ready[0][0] + self.quantum < t.clock:
                self._switch(self.tasks[self._next(t.id)])
            return
        t.clock += 1
        if self.keep_trace:
            self.trace.append(t.id << 56 | kind << 48 | rid << 40 | (off & 0xFF_FFFF_FFFF))
        if self.step > self.max_steps:
            raise BudgetExceeded()
        nxt = self._next(t.id)
        if nxt != t.id:
            self._switch(self.tasks[nxt])

    def charge(self, ns: int) -> None:
        """Virtual time: the current task spends ns (a kernel step's own cost)."""
        t = self.current
        if t is not None:
            t.clock += ns

    def _switch(self, nxt: Task) -> None:
        self.current = nxt
        nxt.g.switch()
        # resumed
        if self.finished:
            raise greenlet.GreenletExit()

    def block(self) -> None:
        """The current task cannot go on until woken: run another one."""
        t = self.current
        assert t is not None
        t.state = BLOCKED
        nxt = self._next(-1)
        if nxt >= 0:
            self._switch(self.tasks[nxt])
        else:
            self.main.switch()  # every task blocked: a deadlock (the run loop sees no runnable)
            if self.finished:
                raise greenlet.GreenletExit()

    def wake(self, t: Task, latency: int = 0) -> None:
        """Make a blocked task runnable; it resumes no earlier than its waker's time plus the
        latency of the wake-up (virtual time)."""
        if t.state == BLOCKED:
            t.state = RUNNABLE
            cur = self.current
            if cur is not None and cur.clock + latency > t.clock:
                t.clock = cur.clock + latency
            self._unwatch(t)
            if self.virtual:
                heapq.heappush(self.ready, (t.clock, t.id))

    def _unwatch(self, t: Task) -> None:
        for key in t.watching:
            s = self.watch.get(key)
            if s is not None:
                s.discard(t)
        t.watching.clear()
        if t.futex is not None:
            q = self.futexes.get(t.futex)
            if q and t in q:
                q.remove(t)
            t.futex = None

    def wait_written(self, keys: list[tuple[int, int]]) -> None:
        """Block the current task until any of these words is written."""
        t = self.current
        if t is None:
            return
        for key in keys:
            self.watch.setdefault(key, set()).add(t)
            t.watching.append(key)
        self.block()

    def written(self, rid: int, off: int) -> None:
        s = self.watch.get((rid, off))
        if s:
            lat = self.cost.table.line_transfer if self.virtual else 0
            for t in list(s):
                self.wake(t, lat)

    def relax(self) -> None:
        """cpu_relax() in a polling loop: block until a word read since the last relax changes
        (at once if one already did since it was read)."""
        t = self.current
        if t is None:
            return
        reads = t.reads
        t.reads = {}
        if not reads or len(reads) > READS_CAP:
            self.point(K_OTHER, 0, 0)
            return
        for (rid, off), (width, value) in reads.items():
            r = self.raw[rid]
            if (r.load32(off) if width == 4 else r.load64(off)) != value:
                self.point(K_OTHER, 0, 0)
                return
        self.wait_written(list(reads))

    def delay(self, ns: int) -> None:
        t = self.current
        if t is not None:
            t.clock += ns
        self.point(K_DELAY, 0, 0)

    def futex_wait(self, region: Region, rid: int, off: int, expected: int) -> int:
        self.point(K_FUTEX_WAIT, rid, off)
        if region.load32(off) != expected:
            return 1
        t = self.current
        if t is None:
            return 2
        key = (rid, off)
        self.futexes.setdefault(key, []).append(t)
        t.futex = key
        self.block()
        return 0

    def futex_wake(self, rid: int, off: int, n: int) -> int:
        self.point(K_FUTEX_WAKE, rid, off)
        q = self.futexes.get((rid, off))
        woken = 0
        lat = self.cost.table.futex_wake_to_run if self.virtual else 0
        while q and woken < n:
            t = q.pop(0)
            t.futex = None
            self.wake(t, lat)
            woken += 1
        return woken

    def note_read(self, rid: int, off: int, width: int, value: int) -> None:
        t = self.current
        if t is not None and len(t.reads) <= READS_CAP:
            t.reads[(rid, off)] = (width, value)

    def trace_hash(self) -> str:
        h = hashlib.sha256(self.trace.tobytes())
        return h.hexdigest()[:16]


class SchedRegion:
    """A segment seen through the world: the same methods as ``Region``, each one a point."""

    __slots__ = ("w", "r", "rid")

    def __init__(self, world: World, region: Region, rid: int) -> None:
        self.w = world
        self.r = region
        self.rid = rid

    # loads
    def load32(self, off: int) -> int:
        self.w.point(K_LOAD, self.rid, off)
        v = self.r.load32(off)
        self.w.note_read(self.rid, off, 4, v)
        return v

    def load64(self, off: int) -> int:
        self.w.point(K_LOAD, self.rid, off)
        v = self.r.load64(off)
        self.w.note_read(self.rid, off, 8, v)
        return v

    # stores and read-modify-writes: each may wake a watcher of the word
    def store32(self, off: int, v: int) -> None:
        self.w.point(K_STORE, self.rid, off)
        self.r.store32(off, v)
        self.w.written(self.rid, off)

    def store64(self, off: int, v: int) -> None:
        self.w.point(K_STORE, self.rid, off)
        self.r.store64(off, v)
        self.w.written(self.rid, off)

    def cas32(self, off: int, old: int, new: int) -> bool:
        self.w.point(K_RMW, self.rid, off)
        ok = self.r.cas32(off, old, new)
        if ok:
            self.w.written(self.rid, off)
        else:
            self.w.note_read(self.rid, off, 4, self.r.load32(off))
        return ok

    def cas64(self, off: int, old: int, new: int) -> bool:
        self.w.point(K_RMW, self.rid, off)
        ok = self.r.cas64(off, old, new)
        if ok:
            self.w.written(self.rid, off)
        else:
            self.w.note_read(self.rid, off, 8, self.r.load64(off))
        return ok

    def _rmw(self, op: Callable[[int, int], int], off: int, v: int) -> int:
        self.w.point(K_RMW, self.rid, off)
        old = op(off, v)
        self.w.written(self.rid, off)
        return old

    def xchg32(self, off: int, v: int) -> int:
        return self._rmw(self.r.xchg32, off, v)

    def xchg64(self, off: int, v: int) -> int:
        return self._rmw(self.r.xchg64, off, v)

    def fetch_add32(self, off: int, d: int) -> int:
        return self._rmw(self.r.fetch_add32, off, d)

    def fetch_add64(self, off: int, d: int) -> int:
        return self._rmw(self.r.fetch_add64, off, d)

    def fetch_or64(self, off: int, bits: int) -> int:
        return self._rmw(self.r.fetch_or64, off, bits)

    def fetch_and64(self, off: int, mask: int) -> int:
        return self._rmw(self.r.fetch_and64, off, mask)

    # sleeping
    def futex_wait(self, off: int, expected: int, timeout_ns: int) -> int:
        """Blocks until a futex_wake on the word; the process backend's safety timeouts do not
        exist here (a wait nobody ends is a deadlock the world reports)."""
        return self.w.futex_wait(self.r, self.rid, off, expected)

    def futex_wake(self, off: int, n: int) -> int:
        return self.w.futex_wake(self.rid, off, n)

    # spinning
    def spin_lock(self, off: int, me: int, ipi_off: int, budget: int) -> int:
        """As the C loop: 0 acquired at once, ns spun when acquired, -(1 + ns) when an IPI is
        pending.  Spinning blocks until the lock word or the IPI flag is written."""
        w, r = self.w, self.r
        w.point(K_SPIN, self.rid, off)
        if r.cas32(off, 0, me):
            w.written(self.rid, off)
            if w.virtual:
                q0 = w.spinq.get((self.rid, off))
                if q0 and w.current in q0:
                    q0.remove(w.current)
            return 0
        t0 = w.now()
        key = (self.rid, off)
        if w.virtual:
            # queued spinlock (qspinlock): waiters queue in order and only the head is woken
            # by the release; an IPI taken while queued keeps the place in the queue
            q = w.spinq.setdefault(key, [])
            me_task = w.current
            if me_task not in q:
                q.append(me_task)
            keys = [(self.rid, ipi_off)] if ipi_off >= 0 else []
        else:
            keys = [key] + ([(self.rid, ipi_off)] if ipi_off >= 0 else [])
        while True:
            if ipi_off >= 0 and r.load32(ipi_off):  # interrupts are on while spinning
                return -1 - max(0, w.now() - t0)
            if w.virtual and q[0] is not me_task or r.load32(off) != 0:
                w.wait_written(keys)
            w.point(K_SPIN, self.rid, off)
            if r.load32(off) == 0 and r.cas32(off, 0, me):
                w.written(self.rid, off)
                if w.virtual:
                    q.remove(me_task)
                return max(1, w.now() - t0)

    def spin_trylock(self, off: int, me: int) -> bool:
        self.w.point(K_RMW, self.rid, off)
        ok = self.r.spin_trylock(off, me)
        if ok:
            self.w.written(self.rid, off)
        return ok

    def spin_unlock(self, off: int) -> None:
        w = self.w
        w.point(K_STORE, self.rid, off)
        self.r.spin_unlock(off)
        w.written(self.rid, off)
        if w.virtual:
            q = w.spinq.get((self.rid, off))
            if q:
                w.wake(q[0], w.cost.xfer)  # the queue head sees the release a line transfer later

    # ranges (frames: copies, fills, poison checks)
    def copy(self, dst: int, src: int, n: int) -> None:
        self.w.point(K_COPY, self.rid, dst, n)
        self.r.copy(dst, src, n)

    def fill64(self, off: int, n: int, pattern: int) -> None:
        # clear_page() costs; the free poison is the model's bookkeeping, free of charge
        self.w.point(K_COPY if pattern == 0 else K_OTHER, self.rid, off, -8 * n)
        self.r.fill64(off, n, pattern)

    def find_not64(self, off: int, n: int, pattern: int) -> int:
        return self.r.find_not64(off, n, pattern)

    # batches (Region.copy_pages, fetch_add32_each, get_and_clear64): the very calls they batch, in order,
    # so a batched kernel path has the schedule space of its per-page loop
    def copy_pages(self, dst: int, srcs: Any, page_size: int) -> None:
        for j, src in enumerate(srcs.tolist()):
            if src < 0:
                self.fill64(dst + j * page_size, page_size // 8, 0)  # clear_page()
            else:
                self.copy(dst + j * page_size, src, page_size)  # copy_page()

    def fetch_add32_each(self, offs: Any, deltas: Any) -> None:
        for off, d in zip(offs.tolist(), deltas.tolist()):
            self.fetch_add32(off, d)

    def get_and_clear64(self, off: int, out: Any) -> None:
        for j in range(len(out)):
            out[j] = self.xchg64(off + 8 * j, 0)

    def tlb_xchg64(self, tlb: dict[int, int], vpn: int, page_size: int, word_off: int, new: int) -> tuple[int, int] | None:
        """Region.tlb_xchg64: the TLB lookup (no shared word), then the load64 and store64."""
        e = tlb.get(vpn)
        if e is None or not e & 1:
            return None
        off = (e >> 1) * page_size + word_off
        old = self.load64(off)
        self.store64(off, new)
        return e >> 1, old

    def __getattr__(self, name: str) -> Any:
        return getattr(self.r, name)


__all__ = [
    "BudgetExceeded",
    "Deadlock",
    "PctScheduler",
    "RandomScheduler",
    "ReplayScheduler",
    "SchedRegion",
    "Scheduler",
    "World",
    "make_scheduler",
]


# ------------------------------------------------------------------------------------- the driver
# One scheduled execution of a run configuration: the CPUs
# as greenlet tasks over one machine, each running its role for a fixed number of operations.
# What a scheduled run adds to the process backend's CPU is here, in ``SchedCpu``:
#   - its clock, delays, idling and polling go through the world;
#   - its events carry the scheduling step (a ``step`` column in a replay's trace file);
#   - with ``stop_on_violation`` the first violation ends the execution (the schedule is the
#     counterexample; what a broken machine does afterwards is noise);
#   - between two operations it holds no lock (``lock_leak``: the process backend's
#     ``no_lock_held``), checked off the schedule (no scheduling point, no trace entry);
#   - each named point (a chaos point, a delay, an idle) is a scheduling point of its own and
#     says where the CPU stands (``world.named[cpu]``: schedulers may prefer to switch there);
#     preempted at one, the CPU still takes flush IPIs (``world.ipi_pending``), as the
#     stepper's parked CPUs do.
# Recording events is off the schedule too, so a traced replay interleaves exactly like the
# run it replays; ``MachinePool`` reuses populated machines between schedules (same trace).
# A deadlock is a result: when every unfinished CPU is blocked, a CPU asleep on a futex word
# that changed after it went to sleep was owed a wake-up nobody made (``lost_wakeup``, the
# futex(2) contract: whoever changes the word wakes its sleepers); any other is a ``deadlock``
# with the lock dump.

STEP_COL = 6  # the spare event-row word that holds the scheduling step (core/machine/events.py ROW)
# A scheduled CPU passes every park point: some are guarded by ``if cpu.hooks:`` (no chaos
# delay in the process backend's hot path, e.g. machine.alloc_folio), so its hooks are a
# non-empty table that has no hook for any real point.
EVERY_POINT: dict[str, Callable[[], None]] = {"(every park point is a scheduling point)": lambda: None}


class _StopRun(BaseException):
    """Raised in the CPU that recorded the first violation of a run that stops there.  A
    BaseException, so no ``except Exception`` of a kernel path swallows it."""


class unscheduled:  # noqa: N801 - used as a context manager, like contextlib's
    """``with unscheduled(world):`` the model's own bookkeeping inside a task: no scheduling
    point, nothing in the trace."""

    __slots__ = ("w", "cur")

    def __init__(self, world: World) -> None:
        self.w = world

    def __enter__(self) -> None:
        self.cur = self.w.current
        self.w.current = None

    def __exit__(self, *exc: object) -> None:
        self.w.current = self.cur


def step_kind(label: str) -> str:
    """A named kernel step without its numbers: ``store page 140 (pfn 3)`` -> ``store``,
    ``fault ok (page 5)`` -> ``fault ok``, ``flush_tlb_range [0, 16)`` -> ``flush_tlb_range``."""
    head = label.split(" (", 1)[0].split(" [", 1)[0].split(":", 1)[0]
    words = [w for w in head.split() if not any(ch.isdigit() for ch in w)]
    if words and words[-1] == "page":
        words.pop()
    return " ".join(words)


def _sched_cpu_class() -> type:
    from ptlab.core.machine.cpu import CpuContext
    from ptlab.core.machine.events import Recorder

    class StepRecorder(Recorder):
        """Recorder whose rows carry the world's scheduling step when the event ended."""

        world: World

        def put(self, t0: int, lat: int, spin: int, sleep: int, addr: int, packed: int) -> None:
            n = self.n
            if n < self.cap:
                self._put(n, t0, lat, spin, sleep, addr, packed, self.world.step, 0)
                self.n = n + 1
            else:
                self.dropped += 1

        def put_collapse(self, t0: int, lat: int, spin: int, sleep: int, addr: int, packed: int, phases: list[int]) -> None:
            if self.nc < len(self.crows):
                self._c.put_row(self.nc, t0, lat, spin, sleep, addr, packed, self.world.step, 0, *phases)
                self.nc += 1
            else:
                self.dropped += 1

    class SchedCpu(CpuContext):
        """A CPU whose clock, delays, idling and polling go through the world."""

        world: World
        stop_on_violation = False
        sleeping_on: tuple[Any, int, int] | None = None  # (region, offset, expected) while in futex_sleep
        ops_started = 0
        collapses = 0  # collapse attempts finished (khugepaged: a scan that passed)

        def use_step_recorder(self, capacity: int) -> None:
            self.rec.close()
            self.rec = StepRecorder(capacity, max(1000, capacity // 20))
            self.rec.world = self.world

        def delay(self, ns: int) -> None:
            w = self.world
            w.named[self.id] = "delay"  # busy for ns without touching anything shared: others run
            w.delay(ns)
            self._interruptible("delay")
            self.interrupt_point()

        def cpu_relax(self) -> None:
            self.world.relax()

        def idle(self, ns: int) -> None:
            self.leave_cpumask()
            w = self.world
            w.named[self.id] = "idle"
            w.delay(ns)
            w.named[self.id] = ""
            self.join_cpumask()

        def chaos(self, point: str) -> None:
            """A named race point (core/machine/cpu.py): here a scheduling point of its own, at which a
            scheduler may prefer to switch (it reads ``world.named[cpu]``)."""
            w = self.world
            w.named[self.id] = point
            w.point(K_OTHER, 0, 0)
            self._interruptible(point)
            super().chaos(point)

        def _interruptible(self, point: str) -> None:
            """Preempted at a named point, the CPU still takes interrupts (IRQs on): a flush IPI
            sent meanwhile is acked from here — the handler runs to its end — and the CPU may
            stay preempted (the stepper's parked CPUs do the same; --chaos delays service IPIs
            in the process backend)."""
            w = self.world
            raw_ctl = w.raw[0]
            while not self.irqs_off and raw_ctl.load32(self.ipi_flag_off):
                w.named[self.id] = ""
                self.service_ipi()
                w.named[self.id] = point
                w.point(K_OTHER, 0, 0)
            w.named[self.id] = ""

        def ipi_pending(self) -> bool:
            return not self.irqs_off and bool(self.world.raw[0].load32(self.ipi_flag_off))

        def futex_sleep(self, region: Any, off: int, expected: int, timeout_ns: int) -> int:
            self.sleeping_on = (region, off, expected)
            try:
                return super().futex_sleep(region, off, expected, timeout_ns)
            finally:
                self.sleeping_on = None

        def violation(self, kind: str, page: int = -1, detail: str = "", phase: str | None = None) -> None:
            w = self.world
            n = len(self.violations)
            with unscheduled(w):  # reading the published collapse phase is the oracle's, not the CPU's
                super().violation(kind, page, detail, phase)
            if len(self.violations) > n:
                self.violations[-1]["step"] = w.step  # orders the violations of all CPUs
            if self.stop_on_violation and not w.finished:
                w.outcome = "violation"
                w.finished = True  # every later point is a no-op: this CPU unwinds off the schedule
                raise _StopRun()

        # recording events is the model's bookkeeping, not the CPU's: off the schedule, so
        # a traced replay (every access recorded) interleaves exactly like the untraced run
        def op_end(self, *a: Any, **k: Any) -> int:
            with unscheduled(self.world):
                return super().op_end(*a, **k)

        def record_access(self, *a: Any) -> None:
            with unscheduled(self.world):
                super().record_access(*a)

        def record_collapse(self, *a: Any) -> None:
            self.collapses += 1
            with unscheduled(self.world):
                super().record_collapse(*a)

        def woken_never(self) -> bool:
            """Asleep on a futex word that no longer holds the value it went to sleep on."""
            if self.sleeping_on is None:
                return False
            region, off, expected = self.sleeping_on
            raw = getattr(region, "r", region)
            return raw.load32(off) != expected

    return SchedCpu


@dataclass
class SchedResult:
    """What one scheduled execution did."""

    outcome: str  # done | violation (stopped at the first) | deadlock | budget | error
    violations: list[dict[str, Any]]
    steps: int
    decisions: list[int]
    trace_hash: str
    scheduler: str
    errors: list[str]
    roles: list[str]
    lock_dump: list[str]
    story: list[tuple[int, int, str]]  # (step, cpu, kernel step) when traced
    cpus: list[Any] = field(default_factory=list, repr=False)
    ops_started: list[int] = field(default_factory=list)  # per CPU: operations begun
    # distinct (collapse phase in flight, step kind) seen at the named steps of CPUs other
    # than khugepaged (coverage=True); the phase is core.khugepaged.PHASES or "none"
    coverage: set[tuple[str, str]] = field(default_factory=set)
    events: list[tuple[Any, Any]] = field(default_factory=list, repr=False)  # per CPU (rows, crows), traced

    @property
    def failed(self) -> bool:
        return bool(self.violations) or self.outcome not in ("done", "violation")

    @property
    def first(self) -> dict[str, Any] | None:
        """The violation that ended (or first marked) the execution."""
        return self.violations[0] if self.violations else None


def default_ops(config: Any) -> dict[str, int]:
    """Operations per CPU of each role in one scheduled execution (small: one execution is one
    schedule, and explore runs thousands)."""
    return dict(DEFAULT_OPS)


DEFAULT_OPS = {"app": 60, "gup-fast": 6, "gup-slow": 4, "mmap": 3, "zap": 4, "khugepaged": 6,
               "rmap-walk": 4, "pt-walk": 4, "vma-change": 2}


class MachinePool:
    """Populated machines kept for the next schedule of the same configuration: populating
    the VMAs costs about as much as a schedule itself.  A machine is kept with a copy of its
    segments as populated; ``take`` writes that copy back (every bit of state lives in the
    segments) and points its segment wrappers at the new world, so a schedule on a kept
    machine is the schedule on a fresh one (same trace hash).  ``close`` unlinks them all:
    use ``with MachinePool() as pool``."""

    def __init__(self) -> None:
        self.kept: dict[str, tuple[Any, dict[str, bytes]]] = {}

    @staticmethod
    def _key(config: Any) -> str:
        import json

        return json.dumps({k: v for k, v in config.to_dict().items() if k != "seed"}, sort_keys=True)

    def take(self, config: Any, world: World) -> Any:
        got = self.kept.get(self._key(config))
        if got is None:
            return None
        m, snap = got
        for name, data in snap.items():
            m.ns[name].mmap[:] = data
        for sr in (m.ctl, m.pt, m.folio, m.frames):
            sr.w = world
            world.raw[sr.rid] = sr.r
        return m

    def keep(self, config: Any, m: Any) -> None:
        key = self._key(config)
        old = self.kept.pop(key, None)
        if old is not None:
            old[0].close()
        self.kept[key] = (m, {name: bytes(seg.mmap) for name, seg in m.ns.segments.items()})

    def close(self) -> None:
        for m, _ in self.kept.values():
            m.close()
        self.kept.clear()

    def __enter__(self) -> MachinePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def focus_khugepaged(runner: Any, config: Any) -> None:
    """Point khugepaged's few scans where the other CPUs work: visit the ranges in order of how
    often the run's workload touches them (sampled from the same pattern, with a generator of
    its own), ties in khugepaged's own scan order.  A scheduled execution runs a few operations
    per CPU, and a collapse of a range no other CPU touches can race with nothing.  The kernel
    scans an mm in address order; which range comes first is no part of any safety argument."""
    from ptlab.workloads.patterns import make_pattern

    ranges = getattr(runner, "ranges", None)
    if not ranges:
        return
    n = 1 << config.order
    vstart, npages = runner.vma0
    pick = make_pattern(config.workload, npages, random.Random(0x5EED), config.seed)
    hits = [0] * len(ranges)
    for _ in range(64 * len(ranges)):
        hits[min(len(ranges) - 1, pick() // n)] += 1
    c = runner.cursor
    rank = sorted(range(len(ranges)), key=lambda j: (-hits[j], (j - c) % len(ranges)))
    runner.ranges = [ranges[j] for j in rank]
    runner.cursor = 0


def run_scheduled(
    config: Any,
    scheduler: Scheduler | None,
    ops: dict[str, int] | None = None,
    max_steps: int = 400_000,
    trace: bool = False,
    cost: Any = None,
    *,
    quantum_ns: int = 0,
    stop_on_violation: bool = True,
    coverage: bool = False,
    focus: bool = True,
    empty: float = 0.0,
    tail: float | None = None,
    pool: MachinePool | None = None,
) -> SchedResult:
    """Run one execution of ``config`` under ``scheduler``: every CPU a greenlet running its role
    for ``ops[role]`` operations, every shared operation a scheduling point.  Deterministic: the
    same (config, scheduler, seed, ops) gives the same trace hash.  With ``stop_on_violation``
    the execution ends at the first violation; the end-of-run oracle runs when every CPU
    finished.  ``trace`` keeps the story (named kernel steps) and the events; ``coverage``
    records which collapse phase each named step of a non-khugepaged CPU met.  With ``tail``
(and khugepaged CPUs) the ops of the other roles are caps: those CPUs stop once the run is
(1 + tail) times as long, in steps, as it was when the last khugepaged CPU finished — a
schedule lasts as long as its collapses, whatever the strategy and order.  A scheduler with
    an ``attach(world)`` method is handed the world before the run (to read its trace)."""
    from ptlab.core.kernel.khugepaged import PHASES
    from ptlab.core.kernel.oracle import check_machine, lock_dump
    from ptlab.core.kernel.paths import zap_range
    from ptlab.core.kernel.roles import ROLES, assign_roles
    from ptlab.core.machine.layout import COLLAPSE_PHASE, MAX_CPUS
    from ptlab.core.machine.locks import check_locks_released
    from ptlab.core.machine.mm import VMA_COLLAPSE, VMA_OTHER, Machine

    ops = {**default_ops(config), **(ops or {})}
    world = World(scheduler, max_steps=max_steps, cost=cost, quantum_ns=quantum_ns)
    # per CPU, the named point (chaos point, delay, idle) it stands at while it is there: for
    # schedulers that prefer to switch at one (set and cleared by SchedCpu)
    world.named = [""] * config.nr_cpus  # type: ignore[attr-defined]
    world.ipi_pending = lambda t: cpus[t].ipi_pending()  # type: ignore[attr-defined]  # for schedulers
    attach = getattr(scheduler, "attach", None)
    if attach is not None:
        attach(world)
    from ptlab.core.machine.cpu import CpuContext

    m = pool.take(config, world) if pool is not None else None
    pooled = m is not None
    if m is None:
        m = Machine.create(config, wrap=world.region)
    cpus: list[Any] = []
    story: list[tuple[int, int, str]] = []
    seen: set[tuple[int, str]] = set()
    phase_names = ("none", *PHASES)
    try:
        driver = CpuContext(m, MAX_CPUS - 1, "app", config, capacity=1)
        if not pooled:
            m.populate(driver, VMA_COLLAPSE)
            m.populate(driver, VMA_OTHER)
            if pool is not None:
                pool.keep(config, m)
                pooled = True
        if empty > 0:  # the app freed some of its memory before the run: faults race collapses
            holes = random.Random(config.seed * 7919 + 17)
            start, end, _ = m.vma_range(VMA_COLLAPSE)
            for vpn in range(start, end):
                if holes.random() < empty:
                    zap_range(driver, vpn, 1)
        driver.rec.close()
        raw_ctl = world.raw[0]
        roles = assign_roles(config)
        SchedCpu = _sched_cpu_class()

        def on_step_for(i: int, role: str) -> Callable[[str], None] | None:
            cover = coverage and role != "khugepaged"
            if trace and cover:
                def both(label: str) -> None:
                    story.append((world.step, i, label))
                    if not label.startswith("VIOLATION"):
                        seen.add((raw_ctl.load32(COLLAPSE_PHASE), label))
                return both
            if trace:
                return lambda label: story.append((world.step, i, label))
            if cover:
                def cov(label: str) -> None:
                    if not label.startswith("VIOLATION"):
                        seen.add((raw_ctl.load32(COLLAPSE_PHASE), label))
                return cov
            return None

        for i, role in enumerate(roles):
            capacity = max(1000, ops.get(role, 1) * 64)
            c = SchedCpu(m, i, role, config, capacity=1 if not trace else capacity, seed=config.seed)
            c.world = world
            c.now = world.now
            if trace:
                c.use_step_recorder(capacity)
                c.sample = 1  # every access in the trace file (recording is off the schedule)
            c.register()
            c.on_step = on_step_for(i, role)
            c.hooks = EVERY_POINT
            cpus.append(c)

        # the lock words, read raw (the check is the oracle's, off the schedule): a cheap test
        # before core.locks.check_locks_released names what is held
        spin_words = [(lk.r.r, lk.off) for lk in dict.fromkeys((m.page_table_lock, m.pmd_lock, m.zone_lock, *m._ptls))]
        sem_words = [(sem.r.r, sem.off) for sem in (m.mmap_lock, m.anon_vma)]
        folio_owner = m.f["lock_owner"]

        def holds_any(tag: int, cpu: int) -> bool:
            for r, off in spin_words:
                if r.load32(off) == tag:
                    return True
            for r, off in sem_words:
                if r.load32(off + 16) == tag or r.load64(off + 24) >> cpu & 1:
                    return True
            return bool((folio_owner == tag).any())

        def task_for(c: Any, role: str) -> Callable[[], None]:
            def task() -> None:
                runner = ROLES[role](c, random.Random(config.seed * 1000 + c.id))
                if focus and role == "khugepaged":
                    focus_khugepaged(runner, config)
                lead = tail is not None and role != "khugepaged" and bool(collapsers)
                n = ops.get(role, 1)
                try:
                    # khugepaged: n collapse attempts (scans that pass), at most 20 n scans
                    for k in range(n * 20 if role == "khugepaged" else n):
                        if lead and done_at and world.step >= done_at[-1] * (1 + tail):
                            break  # the run lasts (1 + tail) times as long as its collapses
                        if role == "khugepaged":
                            if c.collapses >= n:
                                break
                        else:
                            c.ops_started = k + 1
                        runner.step()
                        c.interrupt_point()
                        leaked = False
                        if holds_any(c.owner_tag, c.id):  # between operations no lock is held
                            with unscheduled(world):
                                leaked = check_locks_released(m, c, "between two operations")
                        if leaked:  # (without stop_on_violation) every other CPU would wait for ever
                            return
                except (_StopRun, greenlet.GreenletExit, BudgetExceeded):
                    raise
                except Exception as e:  # the machine reached a state no kernel path expects
                    import traceback

                    where = traceback.extract_tb(e.__traceback__)[-1]
                    c.stop_on_violation = False
                    c.violation("cpu_exception", detail=f"{type(e).__name__}: {e} at {where.filename.rsplit('/', 1)[-1]}:{where.lineno} ({where.name})")
                    raise
                finally:
                    runner.finish()
                    c.leave_cpumask()
                    if role == "khugepaged":
                        finished.append(world.step)
                        if len(finished) == len(collapsers):
                            done_at.append(world.step)

            return task

        collapsers: list[Any] = []
        finished: list[int] = []
        done_at: list[int] = []  # the step at which the last khugepaged CPU finished
        for c, role in zip(cpus, roles):
            c.stop_on_violation = stop_on_violation
            t = world.spawn(task_for(c, role))
            if role == "khugepaged":
                collapsers.append(t)
        outcome = world.run()
        for c in cpus:
            c.stop_on_violation = False
        errors = [f"CPU {t.id} ({roles[t.id]}): {type(t.error).__name__}: {t.error}" for t in world.tasks
                  if t.error is not None and not isinstance(t.error, _StopRun)]
        violations = [v for c in cpus for v in c.violations]
        dump: list[str] = []
        if outcome == "done":
            violations += check_machine(m)
        elif outcome == "deadlock":
            dump = lock_dump(m, roles)
            stuck = [c for c, t in zip(cpus, world.tasks) if t.state == BLOCKED]
            lost = [c for c in stuck if c.woken_never()]
            for c in lost:
                _r, off, expected = c.sleeping_on
                c.violation("lost_wakeup", detail=f"CPU {c.id} ({c.role}) sleeps on futex word {off:#x}, which changed from {expected:#x} after it went to sleep, and nobody woke it")
            if not lost:
                stuck[0].violation("deadlock", detail="every unfinished CPU is blocked: " + "; ".join(dump))
            violations = [v for c in cpus for v in c.violations]
        violations.sort(key=lambda v: v.get("step", world.step))
        events = [c.rec.export() for c in cpus] if trace else []
        cover = {(phase_names[p] if 0 <= p < len(phase_names) else str(p), step_kind(lab)) for p, lab in seen}
        return SchedResult(outcome, violations, world.step, list(world.decisions), world.trace_hash(),
                           scheduler.describe() if scheduler is not None else "virtual-time", errors, roles, dump, story, cpus,
                           [c.collapses + bool(c.phase) if c.role == "khugepaged" else c.ops_started for c in cpus],
                           cover, events)
    finally:
        world.abandon()
        for c in cpus:
            c.rec.close()
        if not pooled:
            m.close()
