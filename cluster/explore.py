"""``ptlab explore``: search the interleavings of one configuration on the scheduled backend,
replay the one that broke it bit for bit, and shrink it to a story a reviewer can read.

A *schedule* is (plan, seed): the plan is the run configuration, the scheduler spec and the
driver's knobs (operations per role, holes at the start, ...); schedule ``s`` runs the
configuration with seed ``s`` (workload, hot set, holes) under the scheduler seeded with ``s``.
The same schedule gives the same trace hash on any machine (core/backends/scheduled.py).  Shuttle's
round trip is the contract: explore finds a failing schedule, writes it as a small JSON file
(the plan, the seed, and the decision list), ``--replay FILE`` runs it again and gets the same
violation and the same trace hash.

Schedulers (``--scheduler``):
  - ``random[:P[:Q[:L[:H]]]]`` (0.05, 0.5, 3, 0): keep the running CPU, or with probability P switch to
    another runnable one — with probability Q instead where the CPU stands at a named point: a
    race point of a kernel path (``cpu.chaos(...)``, the points the process backend's
    ``--chaos`` widens and the stepper parks at), or busy on its own (``cpu.delay``: a device
    writing through a pin; an idle CPU).  A CPU preempted at a named point stays parked until
    the CPU switched to has passed 1..2L-1 of its own named points — the stepper's "park A
    here until B gets there" — but still takes the flush IPIs sent to it (interrupts are on);
    the windows the model's authors marked are where a preemption is worth most.
    With ``H`` (``random:P:Q:L:H``, default 0) a CPU preempted inside a marked window
    (``HOLD_UNTIL``: a GUP-fast walk, IRQs off) is held with probability H until another CPU
    passes the window's release point (a page table freed) — as a vCPU preempted by its host;
  - ``pct[:D]``: probabilistic concurrency testing (Burckhardt et al., ASPLOS 2010), depth D:
    finds any bug of depth D with probability at least 1/(n k^(D-1)) per schedule (n CPUs, k
    steps) — the bound the coverage report prints.
A replay file holds the decisions, not the scheduler: it replays under any later scheduler code.

Shrinking (``shrink``) turns a failing schedule into the smallest one that still fails with the
same violation kind: fewer CPUs (one at a time, each tried with the same preemptions mapped to
the remaining CPUs, else a short seed search), fewer operations per role (first the number each
CPU had begun when the violation fired, then halving), then fewer preemptions — delta debugging
(ddmin, Zeller 2002) over the schedule's preemptions, each (CPU, its own step count, the CPU
switched to), replayed by ``PreemptionScheduler``: a dropped preemption means "the running CPU
goes on"; where a modified schedule diverges (the CPU switched to is not runnable) it goes on
too.  The result is printed as a per-CPU timeline of named kernel steps.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ptlab.core.backends.scheduled import (
    DONE,
    MachinePool,
    PctScheduler,
    ReplayScheduler,
    SchedResult,
    Scheduler,
    run_scheduled,
)
from ptlab.core.machine.config import RunConfig
from ptlab.core.machine.errors import ConfigError

REPLAY_FORMAT = 1
FAILED_OUTCOMES = ("deadlock", "budget", "error")
# kinds that say a run could not complete (a model exception, no progress within max_steps):
# a failed run, never a catch (core/machine/mutants.py FAILED_RUN)
FAILED_KINDS = ("cpu_exception", "budget")

# Operations per CPU of each role in one schedule.  The CPUs other than khugepaged run until
# the schedule is half as long again as when every khugepaged CPU finished (``tail``), or their
# own count, whichever comes first, so a schedule lasts as long as its collapses whatever the
# strategy or order; the counts are caps.  Three collapses of the hottest ranges (``focus``) are enough for
# every bug in core/kernel/bugs.py (see README "ptlab explore").
EXPLORE_OPS: dict[str, int] = {
    "app": 1000, "gup-fast": 100, "gup-slow": 100, "mmap": 25, "zap": 50, "khugepaged": 3,
    "rmap-walk": 80, "pt-walk": 80, "vma-change": 25,
}
EXPLORE_CPUS: dict[str, int] = {"app": 2, "gup-fast": 1, "khugepaged": 1}
EXPLORE_EMPTY = 0.25  # share of the collapsing VMA left unpopulated at the start
EXPLORE_TAIL = 0.5  # the other CPUs go on for half as long again once the collapses are done
EXPLORE_PIN_HOLD_US = 1000  # a DMA pin held across a whole collapse (50 writes, 20 µs apart)
DEFAULT_SCHEDULER = "random"
DEFAULT_P, DEFAULT_Q, DEFAULT_PARK = 0.05, 0.5, 3.0
# Windows where a CPU may be *held* (``random:P:Q:L:H``, H > 0): a named point -> the named points
# of other CPUs that end the hold.  A GUP-fast walk that read a PMD has IRQs off until it is done
# with the PTE table behind it (gup_fast_pte_range()); nothing but an IPI that waits for it
# (tlb_remove_table_sync_one(), or an x86 flush IPI) keeps that table from being freed under it
# by zap_huge_pmd() -> zap_deposited_table() -> pte_free() (2ba99c5e0881).  A vCPU preempted
# there by the host stays in that window for as long as the host likes.
_TABLE_FREED = ("zap_huge_pmd_after_pte_free",)
HOLD_UNTIL: dict[str, tuple[str, ...]] = {
    "gup_fast_after_pmd_read": _TABLE_FREED,
    "gup_fast_after_pte_read": _TABLE_FREED,
    "gup_fast_after_grab": _TABLE_FREED,
}


# ------------------------------------------------------------------------------------ schedulers
class RandomPoints(Scheduler):
    """Seeded random walk: keep the running CPU, or switch to another runnable one with
    probability ``p`` — ``q`` where the running CPU stands at a named race point or is busy on
    its own (the world's ``named[cpu]``, set by the scheduled CPU).

    A CPU preempted at a named point is parked until the CPU switched to has passed 1..2L-1 of
    its own named points.  With probability ``hold`` (0: never) a CPU preempted at a point of
    a marked window (:data:`HOLD_UNTIL`) is *held* instead: parked until another CPU passes one
    of the window's release points — a vCPU preempted by its host in the middle of a GUP-fast
    walk while the rest of the machine goes on.  A held CPU runs only when no other CPU can (the
    machine would otherwise stop: then the hold is over), or to take a flush IPI (interrupts
    on).  With ``hold`` 0 the scheduler makes the very choices it made before holds existed."""

    name = "random"

    def __init__(self, seed: int, p: float = DEFAULT_P, q: float = DEFAULT_Q, park: float = DEFAULT_PARK,
                 hold: float = 0.0) -> None:
        self.seed, self.p, self.q, self.park, self.hold = seed, p, q, park, hold
        self.rng = random.Random(seed)
        self.world: Any = None
        self.until: dict[int, tuple[int, int]] = {}  # parked CPU -> (CPU it waits on, its named points to go)
        self.held: dict[int, tuple[str, ...]] = {}  # held CPU -> the named points of others that end the hold
        self.irq: set[int] = set()  # held CPUs picked to take a pending IPI (still held)

    def attach(self, world: Any) -> None:
        self.world = world

    def start(self, nr_tasks: int) -> None:
        self.rng = random.Random(self.seed)
        self.until = {}
        self.held = {}
        self.irq = set()

    def pick(self, runnable: Sequence[int], current: int, step: int) -> int:
        rng = self.rng
        parked = self.until
        held = self.held
        w = self.world
        at_point = w.named[current] if w is not None and current >= 0 else ""
        if held and current >= 0:
            if current in held:
                if current not in self.irq:
                    del held[current]  # it runs: no other CPU could, or the world ran it alone
                elif at_point:
                    self.irq.discard(current)  # back at its point, the IPI taken: held again
            if at_point:  # another CPU passes a release point: the holds it ends are over
                for t in [t for t, rel in held.items() if t != current and at_point in rel]:
                    del held[t]
        if current >= 0:
            if at_point and parked:  # the CPU a parked one waits on passes a named point
                for t in [t for t, (on, _) in parked.items() if on == current]:
                    on, n = parked[t]
                    if n <= 1:
                        del parked[t]
                    else:
                        parked[t] = (on, n - 1)
            if current in parked or current in held:
                if not at_point:
                    return current  # a parked CPU runs only its interrupt handler, to its end
            elif rng.random() >= (self.q if at_point else self.p):
                return current
        others = [t for t in runnable if t != current] or list(runnable)
        if parked or held:
            tasks = w.tasks
            for t in [t for t, (on, _) in parked.items() if tasks[on].state == DONE]:
                del parked[t]  # what it waited for will not come
            pending = w.ipi_pending
            # a parked CPU with a flush IPI pending is picked to take it (interrupts are on)
            awake = [t for t in others if (t not in parked and t not in held) or pending(t)]
            if not awake and held:
                awake = [t for t in others if t not in held]
                if not awake and current >= 0 and current not in held and current not in parked:
                    return current  # only held CPUs besides this one: it goes on
            awake = awake or others
        else:
            awake = others
        nxt = awake[rng.randrange(len(awake))]
        if nxt in held and pending(nxt):
            self.irq.add(nxt)
        if current >= 0 and at_point and nxt != current and current not in parked and current not in held:
            rel = HOLD_UNTIL.get(at_point) if self.hold else None
            if rel is not None and rng.random() < self.hold:
                held[current] = rel  # held until another CPU passes a release point
            elif self.park:
                # preempted at a named point until the CPU switched to passes 1..2*park-1 of its
                # own named points: the stepper's "park A here until B reaches X"
                parked[current] = (nxt, rng.randint(1, max(1, int(2 * self.park) - 1)))
        return nxt

    def describe(self) -> str:
        return f"random:seed={self.seed},p={self.p:g},q={self.q:g},park={self.park:g}" + (f",hold={self.hold:g}" if self.hold else "")


class _LocalCounts:
    """Each task's own step count, read from the world's trace (task id in the top byte)."""

    def __init__(self) -> None:
        self.world: Any = None
        self.counts: list[int] = []
        self.seen = 0

    def attach(self, world: Any) -> None:
        self.world = world

    def reset(self, nr_tasks: int) -> None:
        self.counts = [0] * nr_tasks
        self.seen = 0

    def sync(self) -> list[int]:
        trace = self.world.trace
        counts = self.counts
        for v in trace[self.seen:]:
            counts[v >> 56] += 1
        self.seen = len(trace)
        return counts

    def running(self) -> int:
        """The task that was running when the world asked (it just blocked or ended)."""
        cur = self.world.current
        return cur.id if cur is not None else -1


Key = tuple[int, int]  # (task, the task's own step count when the decision was made)


class Recording(Scheduler):
    """Wraps a scheduler and notes its decisions as preemptions and forced choices keyed by
    (task, that task's own step count): the form ``PreemptionScheduler`` replays and shrinks."""

    def __init__(self, inner: Scheduler) -> None:
        self.inner = inner
        self.name = inner.name
        self.local = _LocalCounts()
        self.preempt: dict[Key, int] = {}
        self.forced: dict[Key, int] = {}

    def attach(self, world: Any) -> None:
        self.local.attach(world)
        attach = getattr(self.inner, "attach", None)
        if attach is not None:
            attach(world)

    def start(self, nr_tasks: int) -> None:
        self.local.reset(nr_tasks)
        self.preempt.clear()
        self.forced.clear()
        self.inner.start(nr_tasks)

    def pick(self, runnable: Sequence[int], current: int, step: int) -> int:
        counts = self.local.sync()
        c = self.inner.pick(runnable, current, step)
        if current >= 0:
            if c != current:
                self.preempt[(current, counts[current])] = c
        else:
            t = self.local.running()
            self.forced[(t, counts[t] if t >= 0 else 0)] = c
        return c

    def describe(self) -> str:
        return self.inner.describe()


class PreemptionScheduler(Scheduler):
    """Replays a schedule given as preemptions: at a decision of the running task t at its own
    step n, switch to ``preempt[(t, n)]`` if that task is runnable, else t goes on; when t
    blocked or ended, take ``forced[(t, n)]`` if runnable, else the next runnable task after t
    (round robin).  Counts the preemptions it made."""

    name = "preempt"

    def __init__(self, preempt: dict[Key, int], forced: dict[Key, int]) -> None:
        self.preempt = preempt
        self.forced = forced
        self.local = _LocalCounts()
        self.made = 0

    def attach(self, world: Any) -> None:
        self.local.attach(world)

    def start(self, nr_tasks: int) -> None:
        self.local.reset(nr_tasks)
        self.made = 0

    def pick(self, runnable: Sequence[int], current: int, step: int) -> int:
        counts = self.local.sync()
        if current >= 0:
            u = self.preempt.get((current, counts[current]))
            if u is not None and u != current and u in runnable:
                self.made += 1
                return u
            return current
        t = self.local.running()
        u = self.forced.get((t, counts[t] if t >= 0 else 0))
        if u is not None and u in runnable:
            return u
        after = [r for r in runnable if r > t]
        return after[0] if after else runnable[0]

    def describe(self) -> str:
        return f"preempt:{len(self.preempt)} preemptions"


def parse_scheduler(spec: str) -> tuple[str, tuple[float, ...]]:
    """``random``, ``random:P``, ``random:P:Q``, ``pct``, ``pct:D`` -> (name, args).  Raises
    ConfigError naming --scheduler."""
    name, _, rest = spec.partition(":")
    parts = [p for p in rest.split(":") if p] if rest else []
    try:
        args = tuple(float(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--scheduler {spec!r}: arguments must be numbers (random:P:Q, pct:DEPTH)") from None
    if name == "random":
        if (len(args) > 4 or any(not 0 <= a <= 1 for a in args[:2]) or (len(args) > 2 and args[2] < 0)
                or (len(args) > 3 and not 0 <= args[3] <= 1)):
            raise ConfigError(f"--scheduler {spec!r}: random takes two probabilities in 0..1, a mean park length in named points "
                              "and a hold probability in 0..1 (random:P:Q:L:H)")
        return name, args
    if name == "pct":
        if len(args) > 1 or (args and (args[0] != int(args[0]) or not 1 <= args[0] <= 10)):
            raise ConfigError(f"--scheduler {spec!r}: pct takes one depth, an integer 1..10 (pct:3)")
        return name, args
    raise ConfigError(f"--scheduler {spec!r} is not a choice; choose random[:P[:Q[:L[:H]]]] or pct[:DEPTH]")


def make_scheduler(spec: str, seed: int, k: int) -> Scheduler:
    """The scheduler of ``spec`` seeded with ``seed``; ``k`` is PCT's expected step count."""
    name, args = parse_scheduler(spec)
    if name == "random":
        p = args[0] if args else DEFAULT_P
        q = args[1] if len(args) > 1 else max(p, DEFAULT_Q)
        return RandomPoints(seed, p, q, args[2] if len(args) > 2 else DEFAULT_PARK, args[3] if len(args) > 3 else 0.0)
    return PctScheduler(seed, int(args[0]) if args else 3, max(1, k))


def pct_depth(spec: str) -> int | None:
    name, args = parse_scheduler(spec)
    return (int(args[0]) if args else 3) if name == "pct" else None


def pct_bound(n: int, k: int, d: int, schedules: int = 1) -> float:
    """PCT's guarantee: a bug of depth d is found by one schedule with probability at least
    p = 1/(n k^(d-1)) (n CPUs, k steps), by N independent schedules with 1 - (1-p)^N."""
    p = 1.0 / (max(1, n) * float(max(1, k)) ** (d - 1))
    return -math.expm1(schedules * math.log1p(-p)) if p < 1 else 1.0


# ------------------------------------------------------------------------------------ the plan
@dataclass(frozen=True)
class Plan:
    """Everything a schedule depends on except its seed."""

    config: RunConfig
    scheduler: str = DEFAULT_SCHEDULER
    ops: dict[str, int] = field(default_factory=dict)  # overrides of EXPLORE_OPS
    k: int = 20_000  # PCT: the expected number of steps of a schedule
    max_steps: int = 400_000
    empty: float = EXPLORE_EMPTY
    tail: float | None = EXPLORE_TAIL
    expect: tuple[str, ...] = ()  # kinds that count as catching the injected bugs (() = any)
    # stop a schedule at its first violation (None: when nothing is expected — a safe strategy's
    # first violation is the finding; a bug's schedule runs on, so that every kind it produces
    # is seen, as `ptlab check` judges)
    stop_at_first: bool | None = None

    @property
    def stops_at_first(self) -> bool:
        return self.stop_at_first if self.stop_at_first is not None else not self.expect

    @property
    def all_ops(self) -> dict[str, int]:
        return {**EXPLORE_OPS, **self.ops}

    def config_for(self, seed: int) -> RunConfig:
        return self.config.replace(seed=seed)

    def run(self, seed: int, scheduler: Scheduler | None = None, *, trace: bool = False, coverage: bool = False,
            pool: MachinePool | None = None) -> SchedResult:
        """Schedule ``seed`` (or the given scheduler over the configuration of ``seed``); a
        ``pool`` reuses populated machines between schedules (the same trace either way)."""
        sched = scheduler if scheduler is not None else make_scheduler(self.scheduler, seed, self.k)
        return run_scheduled(self.config_for(seed), sched, ops=self.all_ops, max_steps=self.max_steps, trace=trace,
                             coverage=coverage, empty=self.empty, tail=self.tail,
                             stop_on_violation=self.stops_at_first, pool=pool)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "scheduler": self.scheduler, "ops": dict(self.ops), "k": self.k,
                "max_steps": self.max_steps, "empty": self.empty, "tail": self.tail,
                "expect": list(self.expect), "stop_at_first": self.stop_at_first}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        return cls(RunConfig.from_dict(d["config"]), str(d["scheduler"]), {str(k): int(v) for k, v in d.get("ops", {}).items()},
                   int(d.get("k", 20_000)), int(d.get("max_steps", 400_000)), float(d.get("empty", EXPLORE_EMPTY)),
                   None if d.get("tail", EXPLORE_TAIL) is None else float(d.get("tail", EXPLORE_TAIL)), tuple(d.get("expect", ())),
                   d.get("stop_at_first"))


def validate_ops(items: Iterable[str]) -> dict[str, int]:
    """``ROLE=N`` strings -> {role: N}.  Raises ConfigError naming --ops."""
    from ptlab.core.kernel.roles import ROLES

    out: dict[str, int] = {}
    for item in items:
        role, sep, n = item.partition("=")
        if not sep:
            raise ConfigError(f"--ops {item!r}: give ROLE=N, e.g. --ops app=100")
        if role not in ROLES:
            raise ConfigError(f"--ops {item!r}: unknown role {role!r}; roles are: {', '.join(ROLES)}")
        try:
            out[role] = int(n)
        except ValueError:
            raise ConfigError(f"--ops {item!r}: N must be an integer") from None
        if out[role] < 1:
            raise ConfigError(f"--ops {item!r}: N must be at least 1")
    return out


# ------------------------------------------------------------------------------------ verdicts
@dataclass(frozen=True)
class Verdict:
    """What one schedule says: clean, caught (a violation of an expected kind, or any when the
    plan expects none), wrong_kind (violations, none expected), failed (the run could not
    complete: a model exception or no progress within max_steps)."""

    status: str  # clean | caught | wrong_kind | failed
    kind: str = ""
    violation: dict[str, Any] | None = None

    @property
    def bad(self) -> bool:
        return self.status != "clean"


def judge(plan: Plan, r: SchedResult) -> Verdict:
    """A catch is a violation of an expected kind (any kind when none is expected) found before
    the run failed; the violations are in the order they were found (their scheduling step)."""
    vs = list(r.violations)
    if r.outcome == "budget":
        vs.append({"kind": "budget", "cpu": -1, "role": "", "page": -1, "phase": "", "strategy": plan.config.strategy,
                   "detail": f"no end within {plan.max_steps} scheduling steps (a livelock, or raise --max-steps)"})
    elif r.errors and not any(v["kind"] in FAILED_KINDS for v in vs):
        vs.append({"kind": "cpu_exception", "cpu": -1, "role": "", "page": -1, "phase": "", "strategy": plan.config.strategy,
                   "detail": r.errors[0]})
    for v in vs:
        if v["kind"] in FAILED_KINDS:
            return Verdict("failed", v["kind"], v)
        if not plan.expect or v["kind"] in plan.expect:
            return Verdict("caught", v["kind"], v)
    if vs:
        return Verdict("wrong_kind", vs[0]["kind"], vs[0])
    return Verdict("clean")


# ------------------------------------------------------------------------------------ batches
def run_batch(plan_dict: dict[str, Any], seeds: list[int], stop_on: str = "bad") -> dict[str, Any]:
    """Run schedules ``seeds`` in order (a Ray task, or in-process); stop at the first bad one
    (``stop_on="bad"``) or the first catch (``"caught"``).  Returns counts, the coverage pairs
    and the stopping schedule, if any."""
    plan = Plan.from_dict(plan_dict)
    t0 = time.process_time()
    runs = steps = 0
    cover: set[tuple[str, str]] = set()
    stop: dict[str, Any] | None = None
    seen_bad: list[dict[str, Any]] = []
    with MachinePool() as pool:
        for s in seeds:
            r = plan.run(s, coverage=True, pool=pool)
            runs += 1
            steps += r.steps
            cover |= r.coverage
            v = judge(plan, r)
            if v.bad:
                rec = {"seed": s, "status": v.status, "kind": v.kind, "violation": v.violation, "steps": r.steps,
                       "trace_hash": r.trace_hash, "outcome": r.outcome}
                seen_bad.append(rec)
                if v.status == "caught" or stop_on == "bad":
                    stop = rec
                    break
    return {"first": seeds[0] if seeds else 0, "runs": runs, "steps": steps, "cover": sorted(cover), "stop": stop,
            "bad": seen_bad, "seconds": time.process_time() - t0, "last": seeds[runs - 1] if runs else None}


@dataclass
class Exploration:
    """What ``explore`` found: how much it ran and covered, and the first stopping schedule."""

    plan: Plan
    runs: int = 0
    steps: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    cover: set[tuple[str, str]] = field(default_factory=set)
    stop: dict[str, Any] | None = None
    bad: list[dict[str, Any]] = field(default_factory=list)  # every bad schedule met (stop_on="caught")
    workers: int = 1

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.cpu_seconds if self.cpu_seconds else 0.0


def explore(plan: Plan, schedules: int, base_seed: int = 0, *, workers: int = 1, address: str | None = None,
            batch: int = 0, stop_on: str = "bad", progress: Callable[[int, int], None] | None = None) -> Exploration:
    """Run schedules base_seed .. base_seed+schedules-1 and stop at the first bad one (the one
    with the lowest seed, as a sequential run would: no batch is started after a bad schedule,
    and the batches still running are waited for).  ``workers`` > 1 or an ``address`` fans the
    batches out over Ray (one task per batch; each runs ``run_batch`` in its own process)."""
    say = progress or (lambda done, total: None)
    seeds = list(range(base_seed, base_seed + schedules))
    batch = batch or max(1, min(32, schedules // max(1, 4 * workers)))
    batches = [seeds[i:i + batch] for i in range(0, len(seeds), batch)]
    ex = Exploration(plan, workers=workers)
    t0 = time.perf_counter()
    pd = plan.to_dict()

    def absorb(res: dict[str, Any]) -> None:
        ex.runs += res["runs"]
        ex.steps += res["steps"]
        ex.cpu_seconds += res["seconds"]
        ex.cover |= {tuple(c) for c in res["cover"]}  # type: ignore[misc]
        ex.bad += res["bad"]
        if res["stop"] is not None and (ex.stop is None or res["stop"]["seed"] < ex.stop["seed"]):
            ex.stop = res["stop"]
        say(ex.runs, schedules)

    if workers <= 1 and address is None:
        for b in batches:
            absorb(run_batch(pd, b, stop_on))
            if ex.stop is not None:
                break
    else:
        _explore_ray(pd, batches, workers, address, stop_on, absorb, lambda: ex.stop)
    ex.seconds = time.perf_counter() - t0
    ex.bad.sort(key=lambda b: b["seed"])
    return ex


def _explore_ray(pd: dict[str, Any], batches: list[list[int]], workers: int, address: str | None, stop_on: str,
                 absorb: Callable[[dict[str, Any]], None], stopped: Callable[[], dict[str, Any] | None]) -> None:
    import ray
    from ptlab.cluster.sweep import connect

    started = connect(address)
    try:
        task = ray.remote(num_cpus=1, max_retries=2)(run_batch)
        plan_ref = ray.put(pd)
        pending: dict[Any, int] = {}  # ref -> first seed
        nxt = 0
        while nxt < len(batches) or pending:
            stop = stopped()
            while stop is None and nxt < len(batches) and len(pending) < max(1, workers):
                pending[task.remote(plan_ref, batches[nxt], stop_on)] = batches[nxt][0]
                nxt += 1
            if stop is not None:
                # no more batches; those in flight run to their end (at most one batch per
                # worker): one with lower seeds may hold an earlier failure, and a worker killed
                # mid-batch would leave its machines' shared memory behind
                nxt = len(batches)
            if not pending:
                break
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                pending.pop(ref)
                absorb(ray.get(ref))
    finally:
        if started:
            ray.shutdown()


# ------------------------------------------------------------------------------------ replay files
def encode_decisions(decisions: Sequence[int]) -> str:
    """Run-length encoded decision list: ``0*12,3,1*4`` (CPU, repeat)."""
    out: list[str] = []
    i = 0
    while i < len(decisions):
        j = i
        while j < len(decisions) and decisions[j] == decisions[i]:
            j += 1
        out.append(f"{decisions[i]}*{j - i}" if j - i > 1 else str(decisions[i]))
        i = j
    return ",".join(out)


def decode_decisions(text: str) -> list[int]:
    out: list[int] = []
    for part in filter(None, text.split(",")):
        cpu, _, n = part.partition("*")
        out += [int(cpu)] * (int(n) if n else 1)
    return out


@dataclass(frozen=True)
class ReplayFile:
    """A failing (or any) schedule as data: the plan, the seed it came from, its decisions."""

    plan: Plan
    seed: int
    decisions: list[int]
    trace_hash: str
    violation: dict[str, Any] | None
    outcome: str
    steps: int
    shrunk: bool = False

    def write(self, path: Path) -> Path:
        from ptlab.core.analysis.results import atomic_write_bytes

        d = {"ptlab_replay": REPLAY_FORMAT, **self.plan.to_dict(), "seed": self.seed, "decisions": encode_decisions(self.decisions),
             "trace_hash": self.trace_hash, "violation": self.violation, "outcome": self.outcome, "steps": self.steps,
             "shrunk": self.shrunk}
        return Path(atomic_write_bytes(path, (json.dumps(d, indent=1, default=str) + "\n").encode()))

    @classmethod
    def read(cls, path: Path) -> ReplayFile:
        """Raises ConfigError (one line, naming --replay) for a missing or foreign file."""
        try:
            d = json.loads(Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"--replay {path}: cannot read it ({e.strerror})") from None
        except ValueError:
            raise ConfigError(f"--replay {path}: not a ptlab replay file (not JSON)") from None
        if not isinstance(d, dict) or d.get("ptlab_replay") != REPLAY_FORMAT:
            raise ConfigError(f"--replay {path}: not a ptlab replay file (format {REPLAY_FORMAT} expected)")
        try:
            plan = Plan.from_dict(d)
            parse_scheduler(plan.scheduler)
            return cls(plan, int(d["seed"]), decode_decisions(str(d["decisions"])), str(d.get("trace_hash", "")),
                       d.get("violation"), str(d.get("outcome", "")), int(d.get("steps", 0)), bool(d.get("shrunk", False)))
        except ConfigError as e:
            raise ConfigError(f"--replay {path}: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"--replay {path}: damaged replay file ({type(e).__name__}: {e})") from None

    def run(self, *, trace: bool = True) -> SchedResult:
        return self.plan.run(self.seed, ReplayScheduler(self.decisions), trace=trace)


def replay_file_for(plan: Plan, seed: int, r: SchedResult | None = None) -> ReplayFile:
    """The replay file of schedule ``seed`` (re-running it if its result is not given)."""
    r = r if r is not None else plan.run(seed)
    return ReplayFile(plan, seed, list(r.decisions), r.trace_hash, r.first, r.outcome, r.steps)


# ------------------------------------------------------------------------------------ shrinking
@dataclass
class Shrunk:
    """The smallest failing schedule found, and how it was reached."""

    plan: Plan
    seed: int
    preempt: dict[Key, int]
    forced: dict[Key, int]
    result: SchedResult  # traced
    preemptions: int
    kind: str
    trials: int
    log: list[str]

    def replay_file(self) -> ReplayFile:
        r = self.result
        return ReplayFile(self.plan, self.seed, list(r.decisions), r.trace_hash, r.first, r.outcome, r.steps, shrunk=True)


def _fails_with(r: SchedResult, kind: str) -> bool:
    if kind == "budget":
        return r.outcome == "budget"
    return any(v["kind"] == kind for v in r.violations)


def _record(plan: Plan, seed: int, sched: Scheduler, pool: MachinePool | None = None) -> tuple[SchedResult, dict[Key, int], dict[Key, int]]:
    rec = Recording(sched)
    r = plan.run(seed, rec, pool=pool)
    return r, dict(rec.preempt), dict(rec.forced)


def _remap(keys: dict[Key, int], removed: int) -> dict[Key, int]:
    """Preemption keys after CPU ``removed`` is gone: later CPU ids move down by one."""
    out = {}
    for (t, n), u in keys.items():
        if removed in (t, u):
            continue
        out[(t - (t > removed), n)] = u - (u > removed)
    return out


def _cpu_removed(config: RunConfig, role: str) -> tuple[RunConfig, int]:
    """The configuration with one CPU of ``role`` fewer, and the id that CPU had (the last one
    of its role: core.roles.assign_roles numbers CPUs role by role)."""
    from ptlab.core.kernel.roles import assign_roles

    roles = assign_roles(config)
    idx = max(i for i, r in enumerate(roles) if r == role)
    cpus = dict(config.cpus)
    cpus[role] -= 1
    return config.replace(cpus={r: n for r, n in cpus.items() if n}), idx


def shrink(plan: Plan, seed: int, kind: str, *, search: int = 12, budget: int = 400,
           progress: Callable[[str], None] | None = None) -> Shrunk:
    """Shrink schedule ``seed`` of ``plan`` (which fails with violation ``kind``): fewer CPUs,
    fewer operations, fewer preemptions, each step kept only if the schedule still fails with
    ``kind``.  ``search`` seeds are tried for a configuration where the mapped schedule no longer
    fails; at most ``budget`` schedules run in all."""
    say = progress or (lambda msg: None)
    log: list[str] = []
    trials = 0
    pool = MachinePool()

    def attempt(p: Plan, s: int, sched: Scheduler) -> tuple[bool, SchedResult, dict[Key, int], dict[Key, int]]:
        nonlocal trials
        trials += 1
        r, pre, forced = _record(p, s, sched, pool)
        return _fails_with(r, kind), r, pre, forced

    try:
        return _shrink(plan, seed, kind, search, budget, say, log, attempt, lambda: trials)
    finally:
        pool.close()


def _shrink(plan: Plan, seed: int, kind: str, search: int, budget: int, say: Callable[[str], None], log: list[str],
            attempt: Callable[..., tuple[bool, SchedResult, dict[Key, int], dict[Key, int]]],
            used: Callable[[], int]) -> Shrunk:
    ok, r, preempt, forced = attempt(plan, seed, make_scheduler(plan.scheduler, seed, plan.k))
    if not ok:
        raise ValueError(f"schedule {seed} does not fail with {kind}")
    cur, cur_seed = plan, seed
    if not plan.stops_at_first and r.violations and r.violations[0]["kind"] == kind:
        first = replace(plan, stop_at_first=True)  # the same schedule, ended where it failed
        ok, r2, pre2, f2 = attempt(first, seed, PreemptionScheduler(preempt, forced))
        if ok:
            cur, r, preempt, forced = first, r2, pre2, f2

    def search_seeds(p: Plan) -> tuple[int, SchedResult, dict[Key, int], dict[Key, int]] | None:
        for s in range(cur_seed, cur_seed + search):
            if used() >= budget:
                return None
            ok, r2, pre2, f2 = attempt(p, s, make_scheduler(p.scheduler, s, p.k))
            if ok:
                return s, r2, pre2, f2
        return None

    # 1. fewer CPUs
    changed = True
    while changed and used() < budget:
        changed = False
        for role in sorted(cur.config.cpus, key=lambda x: (x == "khugepaged", x)):
            if cur.config.cpus.get(role, 0) <= 0 or cur.config.nr_cpus <= 1 or used() >= budget:
                continue
            cfg, gone = _cpu_removed(cur.config, role)
            cand = replace(cur, config=cfg)
            ok, r2, pre2, f2 = attempt(cand, cur_seed, PreemptionScheduler(_remap(preempt, gone), _remap(forced, gone)))
            found = (cur_seed, r2, pre2, f2) if ok else search_seeds(cand)
            if found is not None:
                cur_seed, r, preempt, forced = found
                cur = cand
                log.append(f"one {role} CPU fewer: {dict(cfg.cpus)}")
                say(log[-1])
                changed = True
                break
    # 2. fewer operations: what each role had begun when it failed, then halving
    def ops_now(res: SchedResult, p: Plan) -> dict[str, int]:
        out: dict[str, int] = {}
        for role, n in zip(res.roles, res.ops_started):
            out[role] = max(out.get(role, 1), n)
        return out

    want = ops_now(r, cur)
    cand = replace(cur, ops={**cur.ops, **want})
    if used() < budget:
        ok, r2, pre2, f2 = attempt(cand, cur_seed, PreemptionScheduler(preempt, forced))
        if ok:
            cur, r, preempt, forced = cand, r2, pre2, f2
    for role in sorted(set(r.roles)):
        while used() < budget:
            n = cur.all_ops.get(role, 1)
            if n <= 1:
                break
            cand = replace(cur, ops={**cur.ops, role: n // 2})
            ok, r2, pre2, f2 = attempt(cand, cur_seed, PreemptionScheduler(preempt, forced))
            if not ok:
                break
            cur, r, preempt, forced = cand, r2, pre2, f2
    begun = ops_now(r, cur)
    cur = replace(cur, ops={**cur.ops, **begun})
    log.append("operations per CPU: " + ", ".join(f"{k}={v}" for k, v in sorted(begun.items())))
    say(log[-1])
    # 3. fewer preemptions: ddmin over the preemption set (forced choices stay as hints)
    keys = sorted(preempt)
    n = 2
    while len(keys) >= 2 and used() < budget:
        chunk = math.ceil(len(keys) / n)
        subsets = [keys[i:i + chunk] for i in range(0, len(keys), chunk)]
        reduced = False
        for sub in subsets + [[k for k in keys if k not in set(s)] for s in subsets]:
            if used() >= budget or len(sub) == len(keys):
                continue
            ok, r2, pre2, f2 = attempt(cur, cur_seed, PreemptionScheduler({k: preempt[k] for k in sub}, forced))
            if ok:
                keys = sorted(pre2)  # the preemptions that run actually made
                preempt, forced, r = pre2, f2, r2
                n = max(n - 1, 2)
                reduced = True
                break
        if not reduced:
            if n >= len(keys):
                break
            n = min(len(keys), 2 * n)
    if len(keys) == 1 and used() < budget:  # and none at all?
        ok, r2, pre2, f2 = attempt(cur, cur_seed, PreemptionScheduler({}, forced))
        if ok:
            preempt, forced, r = pre2, f2, r2
    log.append(f"{len(preempt)} preemption(s) left")
    say(log[-1])
    final = PreemptionScheduler(preempt, forced)
    rf = cur.run(cur_seed, final, trace=True)
    return Shrunk(cur, cur_seed, preempt, forced, rf, final.made, kind, used() + 1, log)


# ------------------------------------------------------------------------------------ the story
def render_timeline(r: SchedResult, *, max_rows: int = 120, width: int = 38) -> list[str]:
    """The story of a traced schedule as a litmus-style table: one column per CPU that did
    anything, one row per named kernel step, the scheduling step on the left."""
    story = [s for s in r.story]
    if not story:
        return ["(no named steps)"]
    cpus = sorted({c for _, c, _ in story})
    col = {c: i for i, c in enumerate(cpus)}
    w = {c: min(width, max(len(f"CPU{c} {r.roles[c]}"), *(len(_short(lab)) for _, cc, lab in story if cc == c))) for c in cpus}
    head = "  step  " + " | ".join(f"CPU{c} {r.roles[c]}".ljust(w[c]) for c in cpus)
    lines = [head, "  " + "-" * (len(head) - 2)]
    rows = story
    if len(rows) > max_rows:
        lines.append(f"  ... {len(rows) - max_rows} earlier steps (--replay prints them all)")
        rows = rows[-max_rows:]
    for step, c, lab in rows:
        cells = [""] * len(cpus)
        cells[col[c]] = _short(lab)[: w[c]]
        lines.append(f"{step:6d}  " + " | ".join(cell.ljust(w[cc]) for cell, cc in zip(cells, cpus)).rstrip())
    return lines


def _short(label: str) -> str:
    if label.startswith("VIOLATION"):
        return "!! " + label.split(":", 1)[0].removeprefix("VIOLATION ")
    return label


def describe_violation(v: dict[str, Any] | None) -> str:
    if not v:
        return "(none)"
    cpu = v.get("cpu", -1)
    who = f"CPU {cpu} ({v.get('role', '')})" if cpu is not None and cpu >= 0 else "the end-of-run check"
    page = v.get("page", -1)
    where = f", page {page}" if page is not None and page >= 0 else ""
    return f"{v['kind']} on {who}{where}, collapse phase {v.get('phase') or 'none'}: {v.get('detail', '')}"


# ------------------------------------------------------------------------------------ the trace file
def trace_columns(r: SchedResult, run_id: str, strategy: str) -> tuple[dict[str, Any], Any]:
    """The events of a traced schedule as result-file columns (core/machine/events.py to_columns) and
    the ``step`` of each (the scheduling step at which the event ended), sorted by step."""
    import numpy as np
    from ptlab.core.backends.scheduled import STEP_COL
    from ptlab.core.machine.events import ROW, to_columns

    if not r.events:
        raise ValueError("trace_columns needs a traced schedule (trace=True)")
    parts = []
    steps = []
    for cpu, (rows, crows) in enumerate(r.events):
        parts.append(to_columns(rows, crows, cpu, run_id, strategy, 0))
        allrows = np.concatenate([rows, crows[:, :ROW]]) if len(crows) else rows
        steps.append(allrows[:, STEP_COL])
    cols: dict[str, Any] = {}
    for key in parts[0]:
        vals = [p[key] for p in parts]
        cols[key] = [x for v in vals for x in v] if isinstance(vals[0], list) else np.concatenate(vals)
    step = np.concatenate(steps) if steps else np.zeros(0, dtype=np.int64)
    order = np.argsort(step, kind="stable")
    for key, v in cols.items():
        cols[key] = [v[i] for i in order] if isinstance(v, list) else v[order]
    return cols, step[order]


def write_trace(path: Path, r: SchedResult, plan: Plan, seed: int, source: str) -> Path:
    """A replayed schedule's events as a result file: the usual columns plus ``step``; the
    metadata says it is a scheduled run (kind ``sched``) and holds the schedule."""
    import pyarrow as pa
    from ptlab.core.analysis.results import build_table, write_table

    run_id = f"explore-{plan.config.strategy}-s{seed}-{r.trace_hash}"
    cols, step = trace_columns(r, run_id, plan.config.strategy)
    kinds: dict[str, int] = {}
    for v in r.violations:
        kinds[v["kind"]] = kinds.get(v["kind"], 0) + 1
    ops = {}
    for op in cols["op"]:
        ops[str(op)] = ops.get(str(op), 0) + 1
    meta = {
        "run_id": run_id,
        "kind": "sched",
        "params": plan.config_for(seed).to_dict(),
        "host": _host(),
        "calibration": [],
        "violations": r.violations,
        "summary": {"events": ops, "violations": len(r.violations), "violation_kinds": kinds},
        "roles": r.roles,
        "schedule": {"source": source, "scheduler": plan.scheduler, "seed": seed, "ops": plan.all_ops,
                     "empty": plan.empty, "k": plan.k, "outcome": r.outcome, "steps": r.steps,
                     "trace_hash": r.trace_hash, "decisions": encode_decisions(r.decisions),
                     "time_unit": "scheduling steps (one per shared operation) plus delay ns"},
    }
    table = build_table(cols, meta)
    table = table.append_column(pa.field("step", pa.int64()), pa.array(step, pa.int64()))
    return write_table(table, path)


def _host() -> dict[str, Any]:
    try:
        from ptlab.core.analysis.host import fingerprint

        return dict(fingerprint())
    except Exception:  # noqa: BLE001 - the fingerprint is a courtesy here
        import platform

        return {"cores": os.cpu_count(), "kernel_release": platform.release()}


# ------------------------------------------------------------------------------------ the catalog
# Where the process backend's cell (core/machine/mutants.py) is not what a scheduled search needs;
# everything else runs with its cell's strategy, order, flush mode and CPUs (a "scheduler" key
# is the plan's scheduler, the rest are run parameters).  A pin taken by GUP after the
# collapse's reference check needs a GUP CPU standing between its PTE read and its grab at that
# moment: two such CPUs, pinning more often (shorter holds), halve the schedules to the first
# catch.  The two order-9 entries need a THP zapped whole (zap_huge_pmd(): the PMD left none,
# the deposited table freed): with 8-page MADV_DONTNEEDs the zap CPU, asleep on mmap_lock
# through the collapse, wakes to find the THP and splits it (__split_huge_pmd), so no whole zap
# happens; MADV_DONTNEED of whole 2 MiB ranges (an allocator returning a chunk) does it.  Then
# two faults meet in pmd_install() of the empty PMD by themselves; a GUP-fast walk still inside
# the table the collapse deposits needs the hold (HOLD_UNTIL): half the preemptions inside the
# walk last until another CPU frees a page table.
EXPLORE_CELLS: dict[str, dict[str, Any]] = {
    "mutant-gup-fast-no-pte-recheck": {"cpus": {"app": 1, "gup-fast": 2, "khugepaged": 1}, "pin_hold_us": 200},
    "mutant-gup-slow-no-ptl": {"cpus": {"app": 1, "gup-slow": 2, "khugepaged": 1}, "pin_hold_us": 200},
    "no-sync-ipi": {"zap_pages": 512, "scheduler": "random:0.05:0.5:3:0.5"},
    "mutant-pmd-install-no-lock": {"zap_pages": 512},
}


@dataclass(frozen=True)
class CatalogCase:
    """One injectable bug (or combination) or mutant, as ``ptlab explore`` searches for it."""

    label: str
    plan: Plan


def catalog(names: Sequence[str] = ()) -> list[CatalogCase]:
    """Every injectable bug and non-equivalent mutant of core/kernel/bugs.py with the kinds that count
    as its catch: its cell's strategy, order, flush mode and CPUs (or EXPLORE_CELLS), the
    explore defaults for the rest (no chaos delays: the scheduler chooses the interleaving)."""
    from ptlab.core.kernel.bugs import check_cases, mutant_cases

    seen: set[tuple[Any, ...]] = set()
    out: list[CatalogCase] = []
    for c in check_cases((4, 9)) + mutant_cases():
        if not c.expect:
            continue
        label = "+".join(c.bugs)
        key = (c.strategy, c.bugs, c.flush, c.order)
        if key in seen or (names and label not in names):
            continue
        seen.add(key)
        cell = dict(EXPLORE_CELLS.get(label, {}))
        scheduler = str(cell.pop("scheduler", DEFAULT_SCHEDULER))
        params = {**c.params(), "chaos": False, "pin_hold_us": EXPLORE_PIN_HOLD_US, **cell}
        out.append(CatalogCase(label, Plan(RunConfig(**params), scheduler, expect=tuple(c.expect))))
    return out


def first_catch(plan_dict: dict[str, Any], base: int, budget: int) -> dict[str, Any]:
    """Schedules base, base+1, ... until the first catch (an expected kind) or ``budget``
    schedules: how many it took (None: not within the budget)."""
    plan = Plan.from_dict(plan_dict)
    ex = explore(plan, budget, base, stop_on="caught")
    stop = ex.stop if ex.stop is not None and ex.stop["status"] == "caught" else None
    return {"base": base, "n": (stop["seed"] - base + 1) if stop else None, "kind": stop["kind"] if stop else "",
            "runs": ex.runs, "steps": ex.steps, "seconds": ex.cpu_seconds,
            "other": sorted({b["kind"] for b in ex.bad if b["status"] != "caught"})}


def catalog_run(cases: Sequence[CatalogCase], base_seeds: int, budget: int, *, workers: int = 1,
                address: str | None = None, progress: Callable[[str, dict[str, Any]], None] | None = None
                ) -> dict[str, list[dict[str, Any]]]:
    """For each case, ``first_catch`` from base seeds 0, 100000, 200000, ... (``base_seeds`` of
    them), in this process or as Ray tasks.  Returns label -> results."""
    say = progress or (lambda label, res: None)
    jobs = [(c.label, c.plan.to_dict(), b * 100_000) for c in cases for b in range(base_seeds)]
    out: dict[str, list[dict[str, Any]]] = {c.label: [] for c in cases}
    if workers <= 1 and address is None:
        for label, pd, base in jobs:
            res = first_catch(pd, base, budget)
            out[label].append(res)
            say(label, res)
        return out
    import ray
    from ptlab.cluster.sweep import connect

    started = connect(address)
    try:
        task = ray.remote(num_cpus=1, max_retries=2)(first_catch)
        pending = {task.remote(pd, base, budget): label for label, pd, base in jobs}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                label = pending.pop(ref)
                res = ray.get(ref)
                out[label].append(res)
                say(label, res)
    finally:
        if started:
            ray.shutdown()
    return out


# ------------------------------------------------------------------------------------ benchmark
def bench(plan: Plan, seconds: float = 10.0, base_seed: int = 0, profile: bool = False) -> dict[str, Any]:
    """Run schedules of ``plan`` in this process for about ``seconds``: steps per second and
    schedules per minute on one core; with ``profile`` the functions that take the time
    (cProfile, by own time)."""
    import cProfile
    import pstats

    prof = cProfile.Profile() if profile else None
    runs = steps = 0
    t0, c0 = time.perf_counter(), time.process_time()
    s = base_seed
    if prof is not None:
        prof.enable()
    with MachinePool() as pool:
        while time.process_time() - c0 < seconds or runs == 0:
            r = plan.run(s, pool=pool)
            steps += r.steps
            runs += 1
            s += 1
    if prof is not None:
        prof.disable()
    # rates per CPU second of this process: what one core does, whatever else the host runs
    dt = time.process_time() - c0
    out: dict[str, Any] = {"schedules": runs, "steps": steps, "seconds": dt, "wall_s": time.perf_counter() - t0,
                           "steps_per_s": steps / dt, "schedules_per_min": runs / dt * 60, "steps_per_schedule": steps / runs,
                           "load": os.getloadavg()[0]}
    if prof is not None:
        st = pstats.Stats(prof)
        total = sum(v[2] for v in st.stats.values()) or 1.0  # type: ignore[attr-defined]
        top = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:12]  # type: ignore[attr-defined]
        out["profile"] = [{"function": f"{Path(f).name}:{line}({name})", "own_s": v[2], "share": v[2] / total, "calls": v[1]}
                          for (f, line, name), v in top]
    return out


__all__ = [
    "CatalogCase", "catalog", "catalog_run", "first_catch", "EXPLORE_CPUS", "EXPLORE_OPS", "Exploration", "Plan", "PreemptionScheduler", "RandomPoints", "Recording",
    "ReplayFile", "Shrunk", "Verdict", "bench", "decode_decisions", "describe_violation", "encode_decisions",
    "explore", "judge", "make_scheduler", "parse_scheduler", "pct_bound", "pct_depth", "render_timeline",
    "replay_file_for", "run_batch", "shrink", "validate_ops", "write_trace",
]
