"""Compare strategies across result files: distributions, who waits, rates, significance.

What a kernel reviewer wants to know from a set of runs, computed the way pyperf's
``compare_to``, benchstat and mmtests do it (never a bare percentage threshold).

Runs are grouped by strategy and parameters (:func:`group_runs`): repeats of one
configuration are pooled, other configurations of a strategy (another order, an injected bug)
are separate groups, and each group is measured against the baseline strategy's group with
the same parameters.  Per group:

* **Latency** per op, all repeats pooled: count, median, p90, p99, p99.9 and max, in µs.  A quantile is left out (None) when there are too few events to
  estimate it (p99 needs 100 events, p99.9 needs 1000): a "p99.9" of 200 events is their max.
* **Who pays for a collapse.**  For every role other than khugepaged: the spin time (CPU
  burned on a spinlock) and sleep time (blocked on a futex: mmap_lock, folio lock, migration
  entry) of the events that *started while a collapse was in progress* (``during_collapse``),
  summed over all runs of the group and divided by the number of collapse attempts in those
  runs -- ms per collapse.  Totals over all events of the role are kept beside it.
* **Rates** per run (collapses that succeeded per second, collapses attempted per second,
  events per second of every op), summarised over repeats by their harmonic mean (mmtests:
  the harmonic mean is the one that matches "total work over total time" for rates).
* **Result codes** of the collapses (``SCAN_SUCCEED``, ``SCAN_PAGE_COUNT``, ...), pooled.
* **Ratios against the baseline group.**  Latency: the ratio of medians with a bootstrap 95%
  interval (runs resampled, then events within them -- repeats are not independent of each
  other's events) and a two-sided Mann-Whitney U test on the pooled events.  A difference is
  "significant" only if p < 0.05 *and* the interval excludes 1; otherwise it says "not
  significant".  Rates: ratio of harmonic means, Mann-Whitney U over the per-run rates --
  run only when the numbers of repeats allow p < 0.05 at all (4 vs 4 do, 3 vs 3 cannot);
  otherwise the verdict is "no test (3 vs 3 runs)".

Caveats the numbers carry: events within one run are correlated (the test assumes they are
not, so p-values on huge samples are optimistic; the interval, which resamples whole runs, is
the more honest of the two when there are repeats); with repeats the bootstrap uses at most
BOOTSTRAP_MAX_EVENTS events per side (a random subset), which only widens the interval.

Entry points: :func:`compare_paths` / :func:`compare_runs` return a :class:`Comparison`
(Arrow tables); :func:`render_markdown`, :func:`render_rich`, :func:`render_text` and
:func:`write_comparison_arrow` are views of it.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from ptlab.core.analysis.host import check_compatible
from ptlab.core.analysis.results import RunResult, atomic_output, read_runs
from ptlab.core.machine.errors import ConfigError
from scipy.stats import mannwhitneyu

# Display order; anything else follows alphabetically.
STRATEGY_ORDER = ("pmd-clear", "ptl-hold", "migration-entry", "kernel-madv-collapse")
OP_ORDER = ("fault", "access", "gup_fast", "gup_slow", "dma", "mmap", "munmap", "mprotect",
            "zap", "collapse")
ROLE_ORDER = ("app", "gup-fast", "gup-slow", "mmap", "zap", "khugepaged")
QUANTILES: tuple[tuple[str, float], ...] = (
    ("median_us", 0.5), ("p90_us", 0.9), ("p99_us", 0.99), ("p999_us", 0.999),
)
ALPHA = 0.05
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_MAX_EVENTS = 50_000
SEED = 20240531  # fixed: the same files always give the same intervals
COLLAPSE_OK = "SCAN_SUCCEED"
RATE_COLLAPSE_OK = "collapses_ok/s"
RATE_COLLAPSE_ALL = "collapses_attempted/s"
# Rates shown in the views and compared against the baseline (the Arrow table has every op).
MAIN_RATES = (RATE_COLLAPSE_OK, RATE_COLLAPSE_ALL, "access/s", "fault/s", "gup_fast/s", "mmap/s")

SIGNIFICANT = "significant"
NOT_SIGNIFICANT = "not significant"
NO_TEST = "no test"

LATENCY_SCHEMA = pa.schema([
    ("strategy", pa.string()), ("config", pa.string()), ("op", pa.string()), ("runs", pa.int64()), ("count", pa.int64()),
    ("median_us", pa.float64()), ("p90_us", pa.float64()), ("p99_us", pa.float64()),
    ("p999_us", pa.float64()), ("max_us", pa.float64()),
])
WAITS_SCHEMA = pa.schema([
    ("strategy", pa.string()), ("config", pa.string()), ("role", pa.string()), ("collapses", pa.int64()),
    ("spin_ms_per_collapse", pa.float64()), ("sleep_ms_per_collapse", pa.float64()),
    ("waits_during_collapse", pa.int64()), ("waited_on", pa.string()),
    ("spin_ms_total", pa.float64()), ("sleep_ms_total", pa.float64()),
])
RATES_SCHEMA = pa.schema([
    ("strategy", pa.string()), ("config", pa.string()), ("metric", pa.string()), ("runs", pa.int64()),
    ("hmean_per_s", pa.float64()), ("min_per_s", pa.float64()), ("max_per_s", pa.float64()),
])
RESULTS_SCHEMA = pa.schema([
    ("strategy", pa.string()), ("config", pa.string()), ("result", pa.string()), ("count", pa.int64()),
    ("share", pa.float64()),
])
RATIOS_SCHEMA = pa.schema([
    ("strategy", pa.string()), ("config", pa.string()), ("baseline", pa.string()), ("metric", pa.string()),
    ("value", pa.float64()), ("baseline_value", pa.float64()), ("ratio", pa.float64()),
    ("ci_low", pa.float64()), ("ci_high", pa.float64()), ("p99_ratio", pa.float64()),
    ("p_value", pa.float64()), ("verdict", pa.string()),
])
RUNS_SCHEMA = pa.schema([
    ("path", pa.string()), ("run_id", pa.string()), ("strategy", pa.string()),
    ("config", pa.string()), ("kind", pa.string()), ("duration_s", pa.float64()), ("events", pa.int64()),
    ("violations", pa.int64()), ("oversubscription", pa.float64()),
])


@dataclass(frozen=True)
class Comparison:
    """The result of comparing strategies.  Every table is an Arrow table (schemas above);
    times are µs (latency) or ms (waits), rates are per second.

    Rows are per group: runs of one strategy with the same parameters (see group_runs).
    ``strategy`` is the strategy, ``config`` the parameters that tell its groups apart ("" if
    it has one); ``groups`` lists the group labels (``strategy [config]``) in display order.
    ``baseline`` is the baseline strategy (or group label, if one was chosen).  ``notes``
    are one-line caveats the reader must see (oversubscribed runs, runs with correctness
    violations, hosts compared with --force, groups compared with different parameters, ...).
    """

    baseline: str | None
    strategies: tuple[str, ...]
    groups: tuple[str, ...]
    group_params: tuple[tuple[str, str, int], ...]  # (strategy, config, runs) per group
    runs: pa.Table
    latency: pa.Table
    waits: pa.Table
    rates: pa.Table
    results: pa.Table
    ratios: pa.Table
    notes: tuple[str, ...] = ()
    hosts: tuple[Mapping[str, Any], ...] = field(default=())

    def tables(self) -> dict[str, pa.Table]:
        return {"runs": self.runs, "latency": self.latency, "waits": self.waits,
                "rates": self.rates, "results": self.results, "ratios": self.ratios}

    def to_arrow(self) -> pa.Table:
        """All tables in one long ("tidy") table: section, strategy, config, key, stat, value,
        text.

        ``key`` is the op (latency), role (waits), metric (rates, ratios), result code
        (results) or run id (runs); ``value`` is the number, ``text`` a string value (the
        verdict of a ratio, the path of a run).  The schema metadata ``ptlab_compare`` holds
        the baseline, strategies, notes and host fingerprints as JSON.
        """
        keys = {"runs": "run_id", "latency": "op", "waits": "role", "rates": "metric",
                "results": "result", "ratios": "metric"}
        text_cols = {"runs": ("path", "kind"), "waits": ("waited_on",), "ratios": ("verdict", "baseline")}
        cols: dict[str, list[Any]] = {
            k: [] for k in ("section", "strategy", "config", "key", "stat", "value", "text")}
        for section, table in self.tables().items():
            key = keys[section]
            for row in table.to_pylist():
                for name, v in row.items():
                    if name in ("strategy", "config", key):
                        continue
                    is_text = name in text_cols.get(section, ())
                    cols["section"].append(section)
                    cols["strategy"].append(row["strategy"])
                    cols["config"].append(row["config"])
                    cols["key"].append(str(row[key]))
                    cols["stat"].append(name)
                    cols["value"].append(None if is_text or v is None else float(v))
                    cols["text"].append(str(v) if is_text and v is not None else None)
        meta = {"format_version": COMPARE_FORMAT_VERSION, "baseline": self.baseline,
                "strategies": list(self.strategies), "groups": list(self.groups),
                "notes": list(self.notes), "hosts": list(self.hosts)}
        # strings repeat a few values thousands of times: dictionary-encoded, as in result files
        dict_t = pa.dictionary(pa.int32(), pa.string())
        schema = pa.schema([
            ("section", dict_t), ("strategy", dict_t), ("config", dict_t), ("key", dict_t),
            ("stat", dict_t), ("value", pa.float64()), ("text", dict_t),
        ], metadata={b"ptlab_compare": json.dumps(meta, sort_keys=True, default=str).encode()})
        arrays = [pa.array(cols[f.name], pa.string()).dictionary_encode()
                  if pa.types.is_dictionary(f.type) else pa.array(cols[f.name], f.type)
                  for f in schema]
        return pa.Table.from_arrays(arrays, schema=schema)


# --------------------------------------------------------------------------------------------
# groups: runs of one strategy with the same parameters

# Parameters that differ between repeats of one configuration, not between configurations.
REPEAT_KEYS = frozenset({
    "strategy", "seed", "duration_s", "warmup_s", "watchdog_s", "files", "group", "pin_source",
    "pin_dir", "out_dir", "run_id", "node_id",
})
# Display order of parameters in a group's config label.
_PARAM_ORDER = ("order", "cpus", "mix", "workload", "flush", "ptl", "vma_locks", "inject_bugs",
                "unsafe", "chaos", "phase")


@dataclass(frozen=True)
class RunGroup:
    """Runs of one strategy with the same parameters (apart from REPEAT_KEYS): repeats, pooled.

    ``config`` names the parameters that tell this group apart from the strategy's other
    groups ("" when the strategy has one group); ``params`` are the group's parameters."""

    strategy: str
    config: str
    params: Mapping[str, Any]
    runs: tuple[RunResult, ...]

    @property
    def label(self) -> str:
        return f"{self.strategy} [{self.config}]" if self.config else self.strategy

    @property
    def key(self) -> str:
        return _canonical(self.params)


def _design_params(r: RunResult) -> dict[str, Any]:
    """The parameters that define a configuration: all but REPEAT_KEYS and nested records
    (a mapping or list holding mappings or lists describes the run, e.g. its CPU placement;
    a flat one such as ``cpus`` {role: count} is a parameter)."""

    def flat(v: Any) -> bool:
        if isinstance(v, Mapping):
            return all(not isinstance(x, (Mapping, list, tuple)) for x in v.values())
        if isinstance(v, (list, tuple)):
            return all(not isinstance(x, (Mapping, list, tuple)) for x in v)
        return True

    return {k: v for k, v in r.params.items() if k not in REPEAT_KEYS and flat(v)}


def _canonical(v: Any) -> str:
    return json.dumps(v, sort_keys=True, default=str)


def _fmt_param(v: Any) -> str:
    if isinstance(v, Mapping):
        return "+".join(f"{k}:{x}" for k, x in sorted(v.items()) if x) or "none"
    if isinstance(v, (list, tuple)):
        return "+".join(map(str, v)) or "none"
    return str(v)


def _param_keys(keys: Iterable[str]) -> list[str]:
    ks = set(keys)
    return [k for k in _PARAM_ORDER if k in ks] + sorted(ks - set(_PARAM_ORDER))


def group_runs(runs: Sequence[RunResult]) -> list[RunGroup]:
    """Group runs by strategy and parameters, in display order (strategies as STRATEGY_ORDER,
    then by config).  Runs whose parameters differ only in REPEAT_KEYS (seed, duration, ...)
    are repeats of one group."""
    by_strategy: dict[str, list[RunResult]] = {}
    for r in runs:
        by_strategy.setdefault(r.strategy, []).append(r)
    out: list[RunGroup] = []
    for s in _ordered(by_strategy, STRATEGY_ORDER):
        rs = by_strategy[s]
        params = [_design_params(r) for r in rs]
        keys = {k for p in params for k in p}
        varying: list[str] = []
        partitions: set[tuple[int, ...]] = set()
        for k in _param_keys(keys):
            values = [_canonical(p.get(k, "<unset>")) for p in params]
            if len(set(values)) < 2:
                continue
            # a key that splits the runs exactly like one already shown adds nothing to the
            # label (the kernel's phase=loaded is also collapser=active and loaded=True)
            first_seen: dict[str, int] = {}
            partition = tuple(first_seen.setdefault(v, len(first_seen)) for v in values)
            if partition not in partitions:
                partitions.add(partition)
                varying.append(k)
        groups: dict[str, list[int]] = {}
        for i, p in enumerate(params):
            groups.setdefault(_canonical(p), []).append(i)
        made = []
        for idx in groups.values():
            p = params[idx[0]]
            config = ", ".join(f"{k}={_fmt_param(p.get(k, '-'))}" for k in varying)
            made.append(RunGroup(s, config, p, tuple(rs[i] for i in idx)))
        out.extend(sorted(made, key=lambda g: g.config))
    return out


def _param_diff(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    keys = [k for k in _param_keys(set(a) | set(b))
            if _canonical(a.get(k, "<unset>")) != _canonical(b.get(k, "<unset>"))]
    return ", ".join(f"{k}: {_fmt_param(a.get(k, '-'))} vs {_fmt_param(b.get(k, '-'))}" for k in keys)


def _baseline_pairs(
    groups: Sequence[RunGroup], baseline: str | None, notes: list[str]
) -> tuple[str, list[tuple[RunGroup, RunGroup]]]:
    """(baseline name, [(group, its baseline group)]).  A group is measured against the
    baseline strategy's group with the same parameters; failing that, against the baseline
    strategy's only group (with a note saying which parameters differ)."""
    strategies = list(dict.fromkeys(g.strategy for g in groups))
    labels = {g.label: g for g in groups}
    if baseline is None:
        baseline = strategies[0]
    if baseline in labels and baseline not in strategies:
        fixed = labels[baseline]
        return baseline, [(g, fixed) for g in groups if g is not fixed]
    if baseline not in strategies:
        choices = strategies + [lab for lab in labels if lab not in strategies]
        raise ConfigError(
            f"--baseline {baseline!r} is not among the compared strategies; choose one of: "
            f"{', '.join(choices)}"
        )
    candidates = [g for g in groups if g.strategy == baseline]
    pairs, unmatched = [], []
    for g in groups:
        if g.strategy == baseline:
            continue
        same = [b for b in candidates if b.key == g.key]
        if same:
            pairs.append((g, same[0]))
        elif len(candidates) == 1:
            pairs.append((g, candidates[0]))
            diff = _param_diff(g.params, candidates[0].params)
            notes.append(f"{g.label} is measured against {candidates[0].label}, whose parameters "
                         f"differ ({diff})")
        else:
            unmatched.append(g.label)
    if unmatched:
        notes.append(
            f"no {baseline} group has the same parameters as {', '.join(unmatched)}: no ratios for "
            f"them (pick one baseline group with --baseline '<label>')"
        )
    return baseline, pairs


# --------------------------------------------------------------------------------------------
# per-run event arrays


@dataclass
class _Events:
    """One run's events as numpy arrays; string columns as (codes, dictionary)."""

    run: RunResult
    strings: dict[str, tuple[np.ndarray, list[str]]]
    latency: np.ndarray
    spin: np.ndarray
    sleep: np.ndarray
    during: np.ndarray
    t_start: np.ndarray

    @classmethod
    def of(cls, run: RunResult) -> _Events:
        t = run.table.unify_dictionaries().combine_chunks()
        strings: dict[str, tuple[np.ndarray, list[str]]] = {}
        for name in ("op", "role", "result", "waited_on"):
            col = t.column(name)
            if col.num_chunks == 0 or len(col) == 0:
                strings[name] = (np.zeros(0, dtype=np.int32), [])
                continue
            chunk = col.chunk(0)
            codes = chunk.indices.to_numpy(zero_copy_only=False)
            if chunk.null_count:
                codes = np.where(chunk.is_null().to_numpy(zero_copy_only=False), -1, codes)
            strings[name] = (codes, chunk.dictionary.to_pylist())
        return cls(
            run=run,
            strings=strings,
            latency=t.column("latency_ns").to_numpy(),
            spin=t.column("spin_ns").to_numpy(),
            sleep=t.column("sleep_ns").to_numpy(),
            during=t.column("during_collapse").fill_null(False).to_numpy(zero_copy_only=False),
            t_start=t.column("t_start_ns").to_numpy(),
        )

    def values(self, name: str) -> list[str]:
        codes, dictionary = self.strings[name]
        if not len(codes):
            return []
        return [dictionary[i] for i in np.unique(codes[codes >= 0])]

    def eq(self, name: str, value: str) -> np.ndarray:
        codes, dictionary = self.strings[name]
        try:
            return codes == dictionary.index(value)
        except ValueError:
            return np.zeros(len(codes), dtype=bool)

    def ne(self, name: str, value: str) -> np.ndarray:
        return ~self.eq(name, value)


def _ordered(values: Iterable[str], order: Sequence[str]) -> list[str]:
    vs = set(values)
    return [v for v in order if v in vs] + sorted(vs - set(order))


# --------------------------------------------------------------------------------------------
# statistics


def harmonic_mean(rates: Sequence[float]) -> float:
    """Harmonic mean of per-run rates (0.0 if any rate is 0; NaN for no rates)."""
    xs = [float(r) for r in rates]
    if not xs:
        return math.nan
    if any(x <= 0 for x in xs):
        return 0.0
    return len(xs) / sum(1.0 / x for x in xs)


def latency_quantiles_us(ns: np.ndarray) -> dict[str, float | None]:
    """count, median_us, p90_us, p99_us, p999_us, max_us of latencies given in ns.  A quantile
    q is None when fewer than 1/(1-q) events are available."""
    n = len(ns)
    out: dict[str, float | None] = {"count": n}
    if n == 0:
        out.update({name: None for name, _ in QUANTILES})
        out["max_us"] = None
        return out
    qs = np.quantile(ns, [q for _, q in QUANTILES]) / 1e3
    for (name, q), v in zip(QUANTILES, qs, strict=True):
        out[name] = float(v) if q == 0.5 or n >= round(1.0 / (1.0 - q)) else None
    out["max_us"] = float(ns.max()) / 1e3
    return out


def bootstrap_median_ratio(
    samples: Sequence[np.ndarray],
    baseline: Sequence[np.ndarray],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    max_events: int = BOOTSTRAP_MAX_EVENTS,
    confidence: float = 0.95,
    seed: int = SEED,
) -> tuple[float, float]:
    """Percentile bootstrap interval for median(samples) / median(baseline).

    Each side is a list of per-run arrays.  A resample draws runs with replacement, then
    events with replacement within the drawn runs (two-level bootstrap), so run-to-run
    variation widens the interval.  With several runs at most ``max_events`` events per side
    are used (a random subset, which can only widen the interval).  Returns (low, high); NaN
    if a side is empty or a baseline median is 0.
    """
    rng = np.random.default_rng(seed)
    a = [np.asarray(s, dtype=np.float64) for s in samples if len(s)]
    b = [np.asarray(s, dtype=np.float64) for s in baseline if len(s)]
    if not a or not b:
        return math.nan, math.nan
    ma = _median_replicates(a, resamples, max_events, rng)
    mb = _median_replicates(b, resamples, max_events, rng)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = ma / mb
    ratios = ratios[np.isfinite(ratios)]
    if len(ratios) < resamples // 2:
        return math.nan, math.nan
    tail = (1.0 - confidence) / 2 * 100
    lo, hi = np.percentile(ratios, [tail, 100 - tail])
    return float(lo), float(hi)


def _median_replicates(
    runs: list[np.ndarray], resamples: int, max_events: int, rng: np.random.Generator
) -> np.ndarray:
    """Medians of ``resamples`` bootstrap resamples (runs, then events within them).

    Drawing n events with replacement from a (weighted) empirical distribution and taking
    their median is the same as taking the empirical quantile at the median of n uniforms,
    which is Beta((n+1)/2, (n+1)/2) distributed.  So a resample costs one Beta draw (one run)
    or one cumulative sum over the pooled sorted events (several runs), not a sort.
    """
    k = len(runs)
    if k > 1:
        runs = _subsample(runs, max_events, rng)
    x = np.concatenate(runs)
    labels = np.repeat(np.arange(k), [len(r) for r in runs])
    order = np.argsort(x, kind="stable")
    xs, ls = x[order], labels[order]
    n = len(xs)
    if k == 1:
        u = rng.beta((n + 1) / 2, (n + 1) / 2, size=resamples)
        return xs[np.minimum((u * n).astype(np.int64), n - 1)]
    out = np.empty(resamples)
    for i in range(resamples):
        m = rng.multinomial(k, np.full(k, 1.0 / k))  # how often each run was drawn
        cw = np.cumsum(m[ls])
        total = int(cw[-1])
        v = rng.beta((total + 1) / 2, (total + 1) / 2)
        out[i] = xs[min(int(np.searchsorted(cw, v * total, side="right")), n - 1)]
    return out


def _subsample(runs: list[np.ndarray], cap: int, rng: np.random.Generator) -> list[np.ndarray]:
    total = sum(len(r) for r in runs)
    if total <= cap:
        return runs
    return [rng.choice(r, size=max(1, round(len(r) * cap / total)), replace=False) for r in runs]


def _mwu_p(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) == 0 or len(b) == 0:
        return math.nan
    if np.all(a == a[0]) and np.all(b == a[0]):
        return 1.0
    return float(mannwhitneyu(a, b, alternative="two-sided").pvalue)


def _verdict(p: float, lo: float, hi: float) -> str:
    if not math.isfinite(p):
        return NO_TEST
    if p >= ALPHA:
        return NOT_SIGNIFICANT
    if math.isfinite(lo) and math.isfinite(hi) and lo <= 1.0 <= hi:
        return NOT_SIGNIFICANT
    return SIGNIFICANT


def _safe_ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not math.isfinite(a) or not math.isfinite(b) or b == 0:
        return None
    return a / b


# --------------------------------------------------------------------------------------------
# the comparison


def compare_paths(
    paths: Iterable[str | os.PathLike[str]], *, baseline: str | None = None, force: bool = False
) -> Comparison:
    """Read every result file under ``paths`` (files or directories) and compare them.

    See compare_runs for ``baseline`` and ``force``.  Raises ResultFileError for a missing,
    corrupt or too-new file, ConfigError (IncompatibleHostsError) for incompatible hosts or an
    unknown baseline.
    """
    return compare_runs(read_runs(paths), baseline=baseline, force=force)


def compare_runs(
    runs: Sequence[RunResult], *, baseline: str | None = None, force: bool = False
) -> Comparison:
    """Compare runs grouped by strategy and parameters (see group_runs: runs of one strategy
    with the same parameters are repeats, pooled).

    ``baseline`` is the strategy the others are measured against (default: ``pmd-clear`` if
    present, today's kernel, else the first strategy in display order); each group is
    measured against the baseline's group with the same parameters.  A group label
    (``"pmd-clear [order=4]"``) picks one baseline group for all.  Raises ConfigError if the
    baseline is not in the runs, and IncompatibleHostsError (a ConfigError) if the runs come
    from hosts that differ in CPU model, core count or kernel release, unless ``force`` is
    set (the mismatch then becomes a note).
    """
    if not runs:
        raise ConfigError("nothing to compare: no runs given")
    notes: list[str] = []
    runs = _dedupe(runs, notes)
    mismatches = check_compatible([(_label(r), r.host) for r in runs], force=force)
    for m in mismatches:
        notes.append(f"hosts differ, compared anyway (--force): {m}")

    run_groups = group_runs(runs)
    baseline, pairs = _baseline_pairs(run_groups, baseline, notes)
    _run_notes(runs, notes)
    by_label = {g.label: g for g in run_groups}
    labels = [g.label for g in run_groups]
    groups = {g.label: [_Events.of(r) for r in g.runs] for g in run_groups}

    latency_rows, samples = _latency(groups, labels)
    waits_rows = _waits(groups, labels)
    rates_rows, per_run_rates = _rates(groups, labels)
    results_rows = _results(groups, labels)
    ratio_rows = _ratios([(g.label, b.label) for g, b in pairs], samples, latency_rows,
                         per_run_rates, rates_rows)
    for rows in (latency_rows, waits_rows, rates_rows, results_rows, ratio_rows):
        for row in rows:  # rows were keyed by group label: split it into strategy and config
            g = by_label[row["strategy"]]
            row["strategy"], row["config"] = g.strategy, g.config
    runs_rows = [
        {"path": str(r.path), "run_id": r.run_id, "strategy": g.strategy, "config": g.config,
         "kind": r.kind, "duration_s": r.duration_s, "events": r.table.num_rows,
         "violations": len(r.meta.get("violations") or []),
         "oversubscription": _float_or_none(r.host.get("oversubscription"))}
        for g in run_groups for r in g.runs
    ]
    hosts = []
    for r in runs:
        if r.host and r.host not in hosts:
            hosts.append(r.host)
    return Comparison(
        baseline=baseline,
        strategies=tuple(dict.fromkeys(g.strategy for g in run_groups)),
        groups=tuple(labels),
        group_params=tuple((g.strategy, g.config, len(g.runs)) for g in run_groups),
        runs=pa.Table.from_pylist(runs_rows, schema=RUNS_SCHEMA),
        latency=pa.Table.from_pylist(latency_rows, schema=LATENCY_SCHEMA),
        waits=pa.Table.from_pylist(waits_rows, schema=WAITS_SCHEMA),
        rates=pa.Table.from_pylist(rates_rows, schema=RATES_SCHEMA),
        results=pa.Table.from_pylist(results_rows, schema=RESULTS_SCHEMA),
        ratios=pa.Table.from_pylist(ratio_rows, schema=RATIOS_SCHEMA),
        notes=tuple(notes),
        hosts=tuple(hosts),
    )


def _label(r: RunResult) -> str:
    return r.path.name if r.path.name else str(r.path)


def _float_or_none(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) else None


def _dedupe(runs: Sequence[RunResult], notes: list[str]) -> list[RunResult]:
    """One RunResult per run id (a sweep directory holds each run twice: cells/ and merged/)."""
    seen: dict[str, RunResult] = {}
    out = []
    dups: list[tuple[RunResult, RunResult]] = []
    for r in runs:
        if r.run_id in seen:
            dups.append((seen[r.run_id], r))
            continue
        seen[r.run_id] = r
        out.append(r)
    if dups:
        first, again = dups[0]
        more = f" and {len(dups) - 1} more runs" if len(dups) > 1 else ""
        notes.append(
            f"run {first.run_id} (in {first.path} and {again.path}){more} appear in more than one "
            f"file; each run counted once"
        )
    return out


def _run_notes(runs: Sequence[RunResult], notes: list[str]) -> None:
    """Caveats, one line per strategy and kind (not per run: a sweep has hundreds)."""

    def runs_list(rs: list[RunResult]) -> str:
        names = ", ".join(r.run_id for r in rs[:3])
        return names + (f" and {len(rs) - 3} more" if len(rs) > 3 else "")

    by_strategy: dict[str, list[RunResult]] = {}
    for r in runs:
        by_strategy.setdefault(r.strategy, []).append(r)
    for s, rs in by_strategy.items():
        over = [r for r in rs if isinstance(r.host.get("oversubscription"), (int, float))
                and r.host["oversubscription"] > 1.0]
        if over:
            worst = max(r.host["oversubscription"] for r in over)
            notes.append(
                f"{s}: {len(over)} of {len(rs)} runs had more simulated CPUs than cores "
                f"(oversubscription up to {worst:g}; {runs_list(over)}): their spin times "
                f"include lock-holder preemption"
            )
        bad = [r for r in rs if r.meta.get("violations")]
        if bad:
            nv = sum(len(r.meta["violations"]) for r in bad)
            notes.append(
                f"{s}: {len(bad)} of {len(rs)} runs have correctness violations ({nv} in all; "
                f"{runs_list(bad)}): their timings describe a broken kernel path"
            )
        derived = [r for r in rs if r.meta.get("derived_meta")]
        if derived:
            notes.append(
                f"{s}: {len(derived)} runs come from merged files without per-run metadata "
                f"({runs_list(derived)}); their parameters are those of the file"
            )
    kinds = {r.kind for r in runs}
    if len(kinds) > 1:
        notes.append(
            "simulated and kernel runs are compared side by side: simulated times are dilated "
            "by Python (see each file's calibration table, `ptlab show FILE`)"
        )


def _latency(
    groups: Mapping[str, list[_Events]], strategies: Sequence[str]
) -> tuple[list[dict[str, Any]], dict[tuple[str, str], list[np.ndarray]]]:
    rows = []
    samples: dict[tuple[str, str], list[np.ndarray]] = {}
    for s in strategies:
        evs = groups[s]
        ops = _ordered({op for e in evs for op in e.values("op")}, OP_ORDER)
        for op in ops:
            per_run = [e.latency[e.eq("op", op)] for e in evs]
            samples[(s, op)] = per_run
            pooled = np.concatenate(per_run)
            q = latency_quantiles_us(pooled)
            rows.append({"strategy": s, "op": op, "runs": sum(1 for x in per_run if len(x)), **q})
    return rows, samples


def _waits(groups: Mapping[str, list[_Events]], strategies: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for s in strategies:
        evs = groups[s]
        collapses = sum(int(e.eq("op", "collapse").sum()) for e in evs)
        roles = _ordered({ro for e in evs for ro in e.values("role")} - {"khugepaged"}, ROLE_ORDER)
        for role in roles:
            spin = sleep = spin_all = sleep_all = 0
            nwait = 0
            by_lock: dict[str, int] = {}
            for e in evs:
                m = e.eq("role", role)
                spin_all += int(e.spin[m].sum())
                sleep_all += int(e.sleep[m].sum())
                d = m & e.during
                spin += int(e.spin[d].sum())
                sleep += int(e.sleep[d].sum())
                waited = d & ((e.spin > 0) | (e.sleep > 0))
                nwait += int(waited.sum())
                codes, dictionary = e.strings["waited_on"]
                if waited.any():
                    totals = np.bincount(codes[waited & (codes >= 0)],
                                         weights=(e.spin + e.sleep)[waited & (codes >= 0)],
                                         minlength=len(dictionary))
                    for i, w in enumerate(totals):
                        if w > 0 and dictionary[i]:
                            by_lock[dictionary[i]] = by_lock.get(dictionary[i], 0) + int(w)
            top = sorted(by_lock.items(), key=lambda kv: -kv[1])
            rows.append({
                "strategy": s, "role": role, "collapses": collapses,
                "spin_ms_per_collapse": spin / 1e6 / collapses if collapses else None,
                "sleep_ms_per_collapse": sleep / 1e6 / collapses if collapses else None,
                "waits_during_collapse": nwait,
                "waited_on": ",".join(k for k, _ in top),
                "spin_ms_total": spin_all / 1e6, "sleep_ms_total": sleep_all / 1e6,
            })
    return rows


def _rates(
    groups: Mapping[str, list[_Events]], strategies: Sequence[str]
) -> tuple[list[dict[str, Any]], dict[tuple[str, str], list[float]]]:
    rows = []
    per_run: dict[tuple[str, str], list[float]] = {}
    for s in strategies:
        evs = [e for e in groups[s] if e.run.duration_s > 0]
        ops = _ordered({op for e in evs for op in e.values("op")} - {"collapse"}, OP_ORDER)
        metrics: dict[str, list[float]] = {RATE_COLLAPSE_OK: [], RATE_COLLAPSE_ALL: []}
        metrics.update({f"{op}/s": [] for op in ops})
        for e in evs:
            d = e.run.duration_s  # measured (summary.duration_s) when the file has it
            coll = e.eq("op", "collapse")
            metrics[RATE_COLLAPSE_OK].append(float((coll & e.eq("result", COLLAPSE_OK)).sum()) / d)
            metrics[RATE_COLLAPSE_ALL].append(float(coll.sum()) / d)
            for op in ops:
                # TLB-hit accesses are recorded one in access_sample: scale the count back up
                n = float(e.eq("op", op).sum()) * e.run.sample_factor(op)
                metrics[f"{op}/s"].append(n / d)
        for metric, values in metrics.items():
            per_run[(s, metric)] = values
            rows.append({
                "strategy": s, "metric": metric, "runs": len(values),
                "hmean_per_s": harmonic_mean(values) if values else None,
                "min_per_s": min(values) if values else None,
                "max_per_s": max(values) if values else None,
            })
    return rows, per_run


def _results(groups: Mapping[str, list[_Events]], strategies: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for s in strategies:
        counts: dict[str, int] = {}
        for e in groups[s]:
            coll = e.eq("op", "collapse")
            codes, dictionary = e.strings["result"]
            for i, n in enumerate(np.bincount(codes[coll & (codes >= 0)], minlength=len(dictionary))):
                if n:
                    counts[dictionary[i] or "(none)"] = counts.get(dictionary[i] or "(none)", 0) + int(n)
        total = sum(counts.values())
        for code, n in sorted(counts.items(), key=lambda kv: (kv[0] != COLLAPSE_OK, -kv[1], kv[0])):
            rows.append({"strategy": s, "result": code, "count": n, "share": n / total})
    return rows


def _ratios(
    pairs: Sequence[tuple[str, str]],
    samples: Mapping[tuple[str, str], list[np.ndarray]],
    latency_rows: Sequence[Mapping[str, Any]],
    per_run_rates: Mapping[tuple[str, str], list[float]],
    rates_rows: Sequence[Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """Rows of the ratios table for each (group, baseline group) pair, both as labels."""
    lat = {(r["strategy"], r["op"]): r for r in latency_rows}
    rates = {(r["strategy"], r["metric"]): r for r in rates_rows}
    rows = []
    for s, baseline in pairs:
        for (s2, op), runs in samples.items():
            if s2 != s or (baseline, op) not in samples:
                continue
            a, b = np.concatenate(runs), np.concatenate(samples[(baseline, op)])
            if len(a) == 0 or len(b) == 0:
                continue
            mine, base = lat[(s, op)], lat[(baseline, op)]
            ratio = _safe_ratio(mine["median_us"], base["median_us"])
            lo, hi = bootstrap_median_ratio(runs, samples[(baseline, op)])
            p = _mwu_p(a, b)
            rows.append({
                "strategy": s, "baseline": baseline, "metric": f"latency:{op}",
                "value": mine["median_us"], "baseline_value": base["median_us"], "ratio": ratio,
                "ci_low": lo if math.isfinite(lo) else None,
                "ci_high": hi if math.isfinite(hi) else None,
                "p99_ratio": _safe_ratio(mine["p99_us"], base["p99_us"]),
                "p_value": p if math.isfinite(p) else None,
                "verdict": _verdict(p, lo, hi) if ratio is not None else NO_TEST,
            })
        for (s2, metric), values in per_run_rates.items():
            if s2 != s or metric not in MAIN_RATES or (baseline, metric) not in per_run_rates:
                continue
            base_values = per_run_rates[(baseline, metric)]
            if not values or not base_values:
                continue
            mine, base = rates[(s, metric)], rates[(baseline, metric)]
            ratio = _safe_ratio(mine["hmean_per_s"], base["hmean_per_s"])
            p = math.nan
            verdict = NO_TEST + f" ({len(values)} vs {len(base_values)} runs)"
            if _min_rank_p(len(values), len(base_values)) < ALPHA:
                p = _mwu_p(np.asarray(values), np.asarray(base_values))
                verdict = _verdict(p, math.nan, math.nan)
            rows.append({
                "strategy": s, "baseline": baseline, "metric": f"rate:{metric}",
                "value": mine["hmean_per_s"], "baseline_value": base["hmean_per_s"], "ratio": ratio,
                "ci_low": None, "ci_high": None, "p99_ratio": None,
                "p_value": p if math.isfinite(p) else None,
                "verdict": verdict if ratio is not None else NO_TEST,
            })
    return rows


def _min_rank_p(n: int, m: int) -> float:
    """Smallest two-sided p-value a Mann-Whitney U test of n vs m values can give (all of
    one sample below all of the other): 2 / C(n+m, n).  3 vs 3 runs: 0.1 -- never
    significant, so no test is run."""
    if n < 1 or m < 1:
        return 1.0
    return min(1.0, 2.0 / math.comb(n + m, n))


def waits_table(runs: Sequence[RunResult]) -> pa.Table:
    """Only the "who waits for a collapse" table (WAITS_SCHEMA) of ``runs``: no host check,
    no statistics.  Used by the plots."""
    run_groups = group_runs(runs)
    by_label = {g.label: g for g in run_groups}
    rows = _waits({g.label: [_Events.of(r) for r in g.runs] for g in run_groups}, list(by_label))
    for row in rows:
        g = by_label[row["strategy"]]
        row["strategy"], row["config"] = g.strategy, g.config
    return pa.Table.from_pylist(rows, schema=WAITS_SCHEMA)


def group_label(row: Mapping[str, Any]) -> str:
    """``strategy [config]`` of a table row (``strategy`` alone when config is empty)."""
    return _full_label(row)


def _full_label(row: Mapping[str, Any]) -> str:
    return f"{row['strategy']} [{row['config']}]" if row.get("config") else str(row["strategy"])


# --------------------------------------------------------------------------------------------
# views


def fmt_num(v: float | None, digits: int = 3, *, missing: str = "—") -> str:
    """The one number format of every ptlab table: ``digits`` significant digits in fixed
    notation below 1,000 (5.12, 12.3, 123, 0.0512), whole numbers with thousands separators
    from 1,000 up (1,234, 1,234,567); ``missing`` for None or NaN.  Never scientific
    notation, never more digits than the measurement carries."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return missing
    v = float(v)
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v == 0:
        return "0"
    if abs(v) < 1000:
        decimals = max(0, digits - 1 - math.floor(math.log10(abs(v))))
        text = f"{v:.{decimals}f}"
        if abs(float(text)) < 1000:
            return text
    return f"{v:,.0f}"


def fmt_count(n: int | None) -> str:
    """A count with thousands separators (1,234,567)."""
    return "—" if n is None else f"{int(n):,}"


def fmt_us(v: float | None) -> str:
    """A time in µs (fmt_num)."""
    return fmt_num(v)


def _fmt(v: float | None, digits: int = 3) -> str:
    return fmt_num(v, digits)


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "—"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _fmt_ratio(r: Mapping[str, Any]) -> str:
    if r["ratio"] is None:
        return "—"
    s = f"×{fmt_num(r['ratio'])}"
    if r["ci_low"] is not None and r["ci_high"] is not None:
        s += f" [{fmt_num(r['ci_low'])}, {fmt_num(r['ci_high'])}]"
    return s


def _short_names(cmp: Comparison) -> dict[str, str]:
    """Group label -> display name: the strategy, or ``strategy#N`` for a strategy with
    several groups (whose parameters the "Groups" section lists)."""
    names: dict[str, str] = {}
    seen: dict[str, int] = {}
    for label, (strategy, config, _) in zip(cmp.groups, cmp.group_params, strict=True):
        if config:
            seen[strategy] = seen.get(strategy, 0) + 1
            names[label] = f"{strategy}#{seen[strategy]}"
        else:
            names[label] = strategy
    return names


def display_names(groups: Sequence[RunGroup]) -> dict[str, str]:
    """Group label -> short display name (``strategy`` or ``strategy#N``), as in the views."""
    names: dict[str, str] = {}
    seen: dict[str, int] = {}
    for g in groups:
        if g.config:
            seen[g.strategy] = seen.get(g.strategy, 0) + 1
            names[g.label] = f"{g.strategy}#{seen[g.strategy]}"
        else:
            names[g.label] = g.strategy
    return names


def _sections(cmp: Comparison) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """(title, caption, header, rows) of every section, shared by the text and md views."""
    out = []
    names = _short_names(cmp)

    def name(row: Mapping[str, Any]) -> str:
        return names.get(_full_label(row), _full_label(row))

    if any(config for _, config, _ in cmp.group_params):
        out.append((
            "Groups", "runs of one strategy with the same parameters are pooled; the parameters "
            "that tell a strategy's groups apart",
            ["group", "strategy", "runs", "parameters"],
            [[names[label], strategy, str(n), config or "—"]
             for label, (strategy, config, n) in zip(cmp.groups, cmp.group_params, strict=True)],
        ))
    lat = cmp.latency.to_pylist()
    out.append((
        "Latency (µs)", "all repeats pooled; — = too few events for that quantile",
        ["strategy", "op", "runs", "count", "median", "p90", "p99", "p99.9", "max"],
        [[name(r), r["op"], str(r["runs"]), f"{r['count']:,}", fmt_us(r["median_us"]),
          fmt_us(r["p90_us"]), fmt_us(r["p99_us"]), fmt_us(r["p999_us"]), fmt_us(r["max_us"])]
         for r in lat],
    ))
    mm = [r for r in lat if r["op"] in ("mmap", "munmap", "mprotect")]
    if mm:
        out.append((
            "mmap() latency (µs)", "mmap_lock writers: what a collapse costs the rest of the process",
            ["strategy", "op", "count", "median", "p99", "p99.9", "max"],
            [[name(r), r["op"], f"{r['count']:,}", fmt_us(r["median_us"]),
              fmt_us(r["p99_us"]), fmt_us(r["p999_us"]), fmt_us(r["max_us"])] for r in mm],
        ))
    out.append((
        "Who waits for a collapse", "spin = CPU burned on a spinlock, sleep = blocked; events "
        "that started during a collapse, summed and divided by collapse attempts",
        ["strategy", "waiter", "collapses", "spin ms/collapse", "sleep ms/collapse",
         "waits", "waited on", "spin ms total", "sleep ms total"],
        [[name(r), r["role"], f"{r['collapses']:,}", _fmt(r["spin_ms_per_collapse"]),
          _fmt(r["sleep_ms_per_collapse"]), f"{r['waits_during_collapse']:,}",
          r["waited_on"] or "—", _fmt(r["spin_ms_total"]), _fmt(r["sleep_ms_total"])]
         for r in cmp.waits.to_pylist()],
    ))
    out.append((
        "Rates (per second)", "harmonic mean over repeats [min, max]",
        ["strategy", "metric", "runs", "hmean", "min", "max"],
        [[name(r), r["metric"], str(r["runs"]), _fmt(r["hmean_per_s"], 4),
          _fmt(r["min_per_s"], 4), _fmt(r["max_per_s"], 4)]
         for r in cmp.rates.to_pylist() if r["metric"] in MAIN_RATES],
    ))
    out.append((
        "Collapse results", "kernel scan result codes, all repeats pooled",
        ["strategy", "result", "count", "share"],
        [[name(r), r["result"], f"{r['count']:,}", f"{fmt_num(100 * r['share'])}%"]
         for r in cmp.results.to_pylist()],
    ))
    if cmp.baseline and len(cmp.groups) > 1:
        out.append((
            f"Against {cmp.baseline}",
            "ratio of medians (latency) or harmonic means (rates) with bootstrap 95% interval; "
            f"two-sided Mann-Whitney U; significant = p < {ALPHA} and interval excludes 1",
            ["strategy", "metric", "value", "baseline", "ratio [95% CI]", "p99 ratio", "p", "verdict"],
            [[name(r) + ("" if r["baseline"] == cmp.baseline
                                else f" (vs {names.get(r['baseline'], r['baseline'])})"), r["metric"],
              fmt_us(r["value"]) if r["metric"].startswith("latency:") else _fmt(r["value"], 4),
              fmt_us(r["baseline_value"]) if r["metric"].startswith("latency:") else _fmt(r["baseline_value"], 4),
              _fmt_ratio(r), "—" if r["p99_ratio"] is None else f"×{fmt_num(r['p99_ratio'])}",
              _fmt_p(r["p_value"]), r["verdict"]]
             for r in cmp.ratios.to_pylist()],
        ))
    return out


def _left(i: int, header: str) -> bool:
    return i < 2 or header in ("waited on", "verdict", "result", "parameters")


def render_markdown(cmp: Comparison) -> str:
    """The comparison as GitHub Markdown (one table per section, notes as a list)."""
    lines = [f"# ptlab comparison: {', '.join(cmp.groups)}", ""]
    if cmp.baseline:
        lines += [f"Baseline: `{cmp.baseline}`. Runs: {cmp.runs.num_rows}.", ""]
    for title, caption, header, rows in _sections(cmp):
        lines += [f"## {title}", "", f"_{caption}_", ""]
        if not rows:
            lines += ["(no data)", ""]
            continue
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---" if _left(i, h) else "---:" for i, h in enumerate(header)) + "|")
        for row in rows:
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
        lines.append("")
    if cmp.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in cmp.notes] + [""]
    return "\n".join(lines)


def render_rich(cmp: Comparison) -> list[Any]:
    """The comparison as rich renderables (tables and notes) for a terminal."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    out: list[Any] = []
    for title, caption, header, rows in _sections(cmp):
        if header[-1] == "verdict":  # the medians are in the latency table above: keep it narrow
            keep = [i for i, h in enumerate(header) if h not in ("value", "baseline")]
            header = [header[i] for i in keep]
            rows = [[row[i] for i in keep] for row in rows]
        # Text, not str: labels such as "ptl-hold [order=4]" are not rich markup
        t = Table(title=Text(title, style="bold"), caption=Text(caption, style="dim"),
                  title_justify="left", caption_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False)
        for i, h in enumerate(header):
            # fold, never "…": a name or number is wrapped on a narrow terminal, not cut
            t.add_column(h, justify="left" if _left(i, h) else "right", overflow="fold")
        for row in rows:
            style = ""
            if header[-1] == "verdict":
                style = "bold" if row[-1] == SIGNIFICANT else "dim"
            t.add_row(*(Text(c) for c in row), style=style)
        if not rows:
            t.add_row(*(["(no data)"] + [""] * (len(header) - 1)))
        out.append(t)
    for n in cmp.notes:
        out.append(Text(f"note: {n}", style="yellow"))
    return out


def render_text(cmp: Comparison, *, width: int = 1000) -> str:
    """The terminal tables as plain text (no colour), e.g. for a file: as wide as the
    content needs (``width`` is only an upper bound), nothing cut."""
    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, width=width, no_color=True, force_terminal=False)
    for r in render_rich(cmp):
        console.print(r)
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines()) + "\n"


# --------------------------------------------------------------------------------------------
# machine-readable views: JSON, CSV, Arrow

COMPARE_FORMAT_VERSION = 1  # of the JSON, CSV and Arrow outputs (bump when their shape changes)


def to_json_dict(cmp: Comparison) -> dict[str, Any]:
    """The comparison as plain JSON-able data with stable keys: every table a list of rows,
    every row with every column of its schema (null when missing), NaN as null."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v

    names = _short_names(cmp)
    out: dict[str, Any] = {
        "format": "ptlab-compare",
        "format_version": COMPARE_FORMAT_VERSION,
        "baseline": cmp.baseline,
        "strategies": list(cmp.strategies),
        "groups": [
            {"label": label, "name": names[label], "strategy": strategy, "config": config,
             "runs": n}
            for label, (strategy, config, n) in zip(cmp.groups, cmp.group_params, strict=True)
        ],
        "notes": list(cmp.notes),
        "hosts": [dict(h) for h in cmp.hosts],
    }
    for section, table in cmp.tables().items():
        out[section] = [{k: clean(v) for k, v in row.items()} for row in table.to_pylist()]
    return out


def render_json(cmp: Comparison) -> str:
    """to_json_dict as indented JSON with sorted keys (diff-friendly, stable for scripts)."""
    return json.dumps(to_json_dict(cmp), indent=1, sort_keys=True, default=str) + "\n"


def render_csv(cmp: Comparison) -> str:
    """The long ("tidy") table of to_arrow() as CSV: section, strategy, config, key, stat,
    value, text -- one number per row, for spreadsheets and R."""
    import csv

    table = cmp.to_arrow()
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(table.column_names)
    for row in zip(*(table.column(c).to_pylist() for c in table.column_names), strict=True):
        w.writerow(["" if v is None else (repr(v) if isinstance(v, float) else v) for v in row])
    return buf.getvalue()


def write_comparison_arrow(cmp: Comparison, path: str | os.PathLike[str]) -> Path:
    """Write Comparison.to_arrow() as an Arrow IPC file, atomically.  Raises ResultFileError
    when the file cannot be written."""
    import pyarrow.ipc as ipc

    table = cmp.to_arrow()
    path = Path(path)
    with atomic_output(path) as f:
        with ipc.new_file(f, table.schema) as w:
            w.write_table(table)
    return path


# --------------------------------------------------------------------------------------------
# the mailing-list view: plain ASCII text, at most 72 columns

TEXT_WIDTH = 72
_TEXT_LABEL = 24  # the row-label column; 3 value columns of 16 fill the rest
_TEXT_CELL = 16  # a value (9) + " " + a ratio with its mark (6)


def _ascii_num(v: float | None, digits: int = 3) -> str:
    """fmt_num in ASCII, at most 9 characters (larger numbers in scientific notation)."""
    text = fmt_num(v, digits, missing="-")
    return text if len(text) <= 9 else f"{float(v):.2e}"  # type: ignore[arg-type]


def _text_ratio(ratio: float | None, mark: str) -> str:
    """``x`` + the ratio in at most 4 characters (3 significant digits from 0.1 to 1,000, two
    decimals down to 0.01, else scientific: 5e-3, 2e3) + the mark."""
    if ratio is None or not math.isfinite(ratio):
        return ""
    r = abs(ratio)
    if r == 0:
        text = "0"
    elif 0.01 <= r < 0.1:
        text = f"{ratio:.2f}"
    elif r < 0.01 or r >= 1000:
        mant, _, exp = f"{ratio:.0e}".partition("e")
        text = f"{mant}e{int(exp)}"
    elif r < 10:
        text = f"{ratio:.2f}"
    elif r < 100:
        text = f"{ratio:.1f}"
    else:
        text = f"{ratio:.0f}"
    return f"x{text}{mark}"


def render_mail_text(cmp: Comparison) -> str:
    """A fixed-width, ASCII, at most 72-column summary to paste into a mailing-list reply, in
    the spirit of mmtests' compare output: one column per group, the baseline first; each
    value with its ratio to the baseline and ``*`` when the difference is significant
    (two-sided Mann-Whitney U p < 0.05 and a bootstrap 95% interval that excludes 1).  Ratios
    without a test (p99, waits, results) carry no mark.  Groups that do not fit side by side
    continue in further blocks, each led by its baseline again; names that do not fit their
    column are wrapped, never cut."""
    import textwrap

    names = _short_names(cmp)
    ratios = cmp.ratios.to_pylist()
    ratio_of = {(_full_label(r), r["metric"]): r for r in ratios}
    base_of: dict[str, str] = {}
    for r in ratios:
        base_of.setdefault(_full_label(r), r["baseline"])
    # value tables keyed by (group label, key)
    lat = {(_full_label(r), r["op"]): r for r in cmp.latency.to_pylist()}
    waits = {(_full_label(r), r["role"]): r for r in cmp.waits.to_pylist()}
    rates = {(_full_label(r), r["metric"]): r for r in cmp.rates.to_pylist()}
    results = {(_full_label(r), r["result"]): r for r in cmp.results.to_pylist()}
    with_results = {g for g, _ in results}

    # blocks of columns: a baseline group and the groups measured against it
    per_block = (TEXT_WIDTH - _TEXT_LABEL) // _TEXT_CELL - 1
    bases = [g for g in cmp.groups if g in set(base_of.values())]
    blocks: list[tuple[str | None, list[str]]] = []
    for b in bases:
        members = [g for g in cmp.groups if base_of.get(g) == b]
        for i in range(0, len(members), per_block):
            blocks.append((b, [b] + members[i:i + per_block]))
    alone = [g for g in cmp.groups if g not in base_of and g not in bases]
    for i in range(0, len(alone), per_block + 1):
        blocks.append((None, alone[i:i + per_block + 1]))

    out: list[str] = []

    def wrap(text: str, indent: str = "") -> None:
        out.extend(textwrap.wrap(text, TEXT_WIDTH, subsequent_indent=indent) or [""])

    def row(label: str, cells: list[str]) -> None:
        body = "".join(c.ljust(_TEXT_CELL) for c in cells).rstrip()
        if len(label) < _TEXT_LABEL:
            out.append((label.ljust(_TEXT_LABEL) + body).rstrip())
        else:  # a long label gets a line of its own
            out.extend([label, (" " * _TEXT_LABEL + body).rstrip()])

    def values(label: str, block: list[str], base: str | None, get: Any,
               metric: str | None = None, field: str = "ratio", tested: bool = False) -> None:
        """One row: get(group) for each column, with the ratio to the baseline column --
        from the ratios table (``metric``/``field``) or, without a metric, computed."""
        cells = []
        for g in block:
            v = get(g)
            ratio = ""
            if g != base and base is not None:
                if metric is not None:
                    rr = ratio_of.get((g, metric))
                    if rr is not None:
                        mark = "*" if tested and rr["verdict"] == SIGNIFICANT else ""
                        ratio = _text_ratio(rr[field], mark)
                else:
                    bv = get(base)
                    if isinstance(v, (int, float)) and isinstance(bv, (int, float)) and bv:
                        ratio = _text_ratio(v / bv, "")
            text = _ascii_num(v).rjust(9)
            cells.append(f"{text} {ratio}" if ratio else text)
        if any(c.strip() != "-" for c in cells):
            row(label, cells)

    counts = ", ".join(f"{n} {names[g]}"
                       for g, (_, _, n) in zip(cmp.groups, cmp.group_params, strict=True))
    wrap(f"ptlab compare: {cmp.runs.num_rows} runs ({counts})")
    if ratios:
        wrap(f"Ratios against {cmp.baseline}; * = significant (two-sided Mann-Whitney U "
             f"p < {ALPHA} and bootstrap 95% interval excluding 1); p99 ratios, waits and "
             "results are not tested.")
    for g, (_, config, _) in zip(cmp.groups, cmp.group_params, strict=True):
        if config:
            wrap(f"  {names[g]} = {g}", "      ")

    for base, block in blocks:
        out.append("")
        heads = [textwrap.wrap(names[g], _TEXT_CELL - 1) or [""] for g in block]
        for k in range(max(len(h) for h in heads)):
            row("", [(h[k] if k < len(h) else "").rjust(9) for h in heads])
        ops = _ordered({op for g, op in lat if g in block}, OP_ORDER)
        if ops:
            out.append("Latency (us)")
        for op in ops:
            def lat_of(g: str, key: str, op: str = op) -> Any:
                return (lat.get((g, op)) or {}).get(key)

            values(f"  {op} p50", block, base, lambda g, f=lat_of: f(g, "median_us"),
                   f"latency:{op}", "ratio", tested=True)
            values(f"  {op} p99", block, base, lambda g, f=lat_of: f(g, "p99_us"),
                   f"latency:{op}", "p99_ratio")
            values(f"  {op} p99.9", block, base, lambda g, f=lat_of: f(g, "p999_us"))
        roles = _ordered({ro for g, ro in waits if g in block}, ROLE_ORDER)
        if roles:
            out.append("Waits per collapse (ms)")
        for role in roles:
            for how in ("spin", "sleep"):
                values(f"  {role} {how}", block, base,
                       lambda g, role=role, how=how: (waits.get((g, role)) or {}).get(
                           f"{how}_ms_per_collapse"))
        shown = [m for m in MAIN_RATES if any((g, m) in rates for g in block)]
        if shown:
            out.append("Rates (per s, hmean over runs)")
        for m in shown:
            values(f"  {m}", block, base,
                   lambda g, m=m: (rates.get((g, m)) or {}).get("hmean_per_s"),
                   f"rate:{m}", "ratio", tested=True)
        codes = sorted({c for g, c in results if g in block}, key=lambda c: (c != COLLAPSE_OK, c))
        if codes:
            out.append("Collapse results (% of attempts)")
        for code in codes:
            values(f"  {code}", block, base,
                   lambda g, code=code: 100 * results[(g, code)]["share"] if (g, code) in results
                   else (0.0 if g in with_results else None))
    if cmp.notes:
        out.append("")
        for n in cmp.notes:
            wrap(f"note: {n}", "      ")
    text = "\n".join(line.rstrip() for line in out) + "\n"
    return text.replace("µ", "u").replace("×", "x").replace("—", "-").replace("…", "...")


__all__ = [
    "Comparison", "RunGroup", "compare_paths", "compare_runs", "group_runs", "group_label",
    "waits_table", "render_markdown", "render_rich", "render_text", "render_mail_text",
    "render_json", "render_csv", "to_json_dict", "write_comparison_arrow", "harmonic_mean",
    "latency_quantiles_us", "bootstrap_median_ratio", "fmt_num", "fmt_count", "fmt_us",
    "SIGNIFICANT", "NOT_SIGNIFICANT", "NO_TEST", "COMPARE_FORMAT_VERSION", "TEXT_WIDTH",
]
