"""A sweep's grid: the axes a user varies, expanded into cells with stable ids.

A sweep is the Cartesian product

    strategies × orders × CPU counts per role × workloads × flush modes × PTL modes
               × per-VMA locks × seeds × repeats

with every other RunConfig parameter held fixed (``base``).  Each point is a :class:`Cell`: a
validated RunConfig plus its repeat number.  A cell's id is a hash of its canonical parameters
and repeat, so the same grid always yields the same ids: resuming a sweep, growing its grid or
re-running a lost cell never produces a second copy of a cell that already finished.

Repeats get distinct seeds: repeat 0 runs the seed as given (so a cell reproduces
``ptlab run --seed S``); repeat r > 0 runs a seed derived from (S, r) by a hash.

Grids come from flags or from a TOML file (see ``load_toml`` for the format).
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib
from ptlab.core.machine.config import (
    DEFAULT_CPUS,
    HPAGE_PMD_ORDER,
    PTE_LEVEL_ONLY,
    FlushMode,
    PtlMode,
    Role,
    RunConfig,
    Strategy,
)
from ptlab.core.machine.errors import ConfigError

# RunConfig fields that are axes of the grid; everything else belongs in ``base``.
AXIS_PARAMS = ("strategy", "order", "cpus", "workload", "flush", "ptl", "vma_locks", "seed")

# TOML top-level keys (plural: each is a list) and the RunConfig field each one sets.
TOML_AXES = {
    "strategies": "strategy",
    "orders": "order",
    "cpus": "cpus",
    "workloads": "workload",
    "flush": "flush",
    "ptl": "ptl",
    "vma_locks": "vma_locks",
    "seeds": "seed",
}
TOML_KEYS = (*TOML_AXES, "repeats", "run")

MAX_CELLS = 100_000


def _default_cpus() -> tuple[dict[str, int], ...]:
    return (dict(DEFAULT_CPUS),)


@dataclass(frozen=True, eq=True)
class SweepSpec:
    """The grid of one sweep.  Every axis is a tuple of values; ``repeats`` runs each point that
    many times with distinct seeds; ``base`` holds the fixed RunConfig parameters (duration_s in
    seconds, warmup_s, nr_pmds, …) shared by every cell."""

    strategies: tuple[str, ...] = tuple(s.value for s in Strategy)
    orders: tuple[int, ...] = (9,)
    cpus: tuple[dict[str, int], ...] = field(default_factory=_default_cpus)
    workloads: tuple[str, ...] = ("random",)
    flush: tuple[str, ...] = (FlushMode.IPI.value,)
    ptl: tuple[str, ...] = (PtlMode.SPLIT.value,)
    vma_locks: tuple[bool, ...] = (True,)
    seeds: tuple[int, ...] = (0,)
    repeats: int = 1
    base: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (what the manifest stores)."""
        return {
            "strategies": list(self.strategies),
            "orders": list(self.orders),
            "cpus": [dict(c) for c in self.cpus],
            "workloads": list(self.workloads),
            "flush": list(self.flush),
            "ptl": list(self.ptl),
            "vma_locks": list(self.vma_locks),
            "seeds": list(self.seeds),
            "repeats": self.repeats,
            "base": dict(self.base),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SweepSpec:
        """Inverse of to_dict.  Raises ConfigError on unknown keys."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown sweep key(s): {', '.join(sorted(unknown))}")
        kw: dict[str, Any] = {}
        for k, v in d.items():
            if k == "repeats":
                kw[k] = v
            elif k == "base":
                kw[k] = dict(v)
            elif k == "cpus":
                kw[k] = tuple(dict(c) for c in v)
            else:
                kw[k] = tuple(v)
        return cls(**kw)

    def replace(self, **changes: Any) -> SweepSpec:
        d = self.to_dict()
        d.update(changes)
        return SweepSpec.from_dict(d)


@dataclass(frozen=True)
class Cell:
    """One point of the grid: a validated RunConfig and which repeat of it this is."""

    cell_id: str
    config: RunConfig
    repeat: int
    base_seed: int

    def label(self) -> str:
        c = self.config
        cpus = cpus_label(c.cpus)
        return f"{c.strategy} order={c.order} cpus={cpus} {c.workload} seed={c.seed}"


def cpus_label(cpus: Mapping[str, int]) -> str:
    """``app=1,khugepaged=1``: roles with a non-zero count, sorted (a stable dictionary value)."""
    return ",".join(f"{r}={n}" for r, n in sorted(cpus.items()) if n)


def cell_id(config: RunConfig, repeat: int) -> str:
    """16 hex digits of SHA-256 over the canonical parameters and the repeat number.

    Roles with zero CPUs are dropped before hashing, so ``{app: 1, gup-fast: 0}`` and
    ``{app: 1}`` are the same cell.
    """
    params = config.to_dict()
    params["cpus"] = {r: n for r, n in sorted(params["cpus"].items()) if n}
    blob = json.dumps({"params": params, "repeat": repeat}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def repeat_seed(seed: int, repeat: int) -> int:
    """The seed repeat ``repeat`` of base seed ``seed`` runs: the seed itself for repeat 0, else
    a 31-bit value derived from both by SHA-256 (distinct per repeat, same on every machine)."""
    if repeat == 0:
        return seed
    h = hashlib.sha256(f"ptlab-repeat:{seed}:{repeat}".encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFF_FFFF


def expand(spec: SweepSpec) -> list[Cell]:
    """All cells of the grid, in a stable order, duplicates removed.

    Raises ConfigError (with RunConfig's message that says what to do) when any cell's
    configuration is invalid, when an axis is empty, or when the grid is absurdly large.
    """
    if spec.repeats < 1:
        raise ConfigError(f"--repeats must be at least 1 (got {spec.repeats})")
    axes: dict[str, tuple[Any, ...]] = {
        "strategies": spec.strategies,
        "orders": spec.orders,
        "cpus": spec.cpus,
        "workloads": spec.workloads,
        "flush": spec.flush,
        "ptl": spec.ptl,
        "vma_locks": spec.vma_locks,
        "seeds": spec.seeds,
    }
    for name, values in axes.items():
        if not values:
            raise ConfigError(f"the sweep axis {name!r} is empty; give at least one value")
    for name in AXIS_PARAMS:
        if name in spec.base:
            raise ConfigError(
                f"{name!r} is an axis of the sweep; set it with the grid "
                f"({_axis_flag(name)}), not as a fixed run parameter"
            )
    n = spec.repeats
    for values in axes.values():
        n *= len(values)
    if n > MAX_CELLS:
        raise ConfigError(f"the grid has {n} cells (at most {MAX_CELLS}); split the sweep")

    # Validate each axis value once with the base parameters, so a bad value is reported as
    # itself (not as the 37th cell of the product).
    base = dict(spec.base)
    _check(base, {})
    for name, param in TOML_AXES.items():
        for v in axes[name]:
            _check(base, {param: v})

    cells: dict[str, Cell] = {}
    for strategy, order, cpus, workload, flush, ptl, vma_locks, seed in itertools.product(
        *axes.values()
    ):
        if order == HPAGE_PMD_ORDER and strategy in PTE_LEVEL_ONLY:
            continue  # not a cell of the model: order 9 is pmd-clear only (see RunConfig)
        for r in range(spec.repeats):
            config = _check(
                base,
                {
                    "strategy": strategy,
                    "order": order,
                    "cpus": dict(cpus),
                    "workload": workload,
                    "flush": flush,
                    "ptl": ptl,
                    "vma_locks": vma_locks,
                    "seed": repeat_seed(seed, r),
                },
            )
            cid = cell_id(config, r)
            cells.setdefault(cid, Cell(cid, config, r, seed))
    if not cells:
        raise ConfigError("no cell left: order 9 is a PMD-order collapse that only pmd-clear models; add an mTHP order (2..8) or pmd-clear")
    return list(cells.values())


def _axis_flag(param: str) -> str:
    return {"cpus": "--app/--khugepaged/… or [cpus] in TOML", "vma_locks": "--vma-locks"}.get(
        param, f"--{param.replace('_', '-')}"
    )


def _check(base: Mapping[str, Any], point: Mapping[str, Any]) -> RunConfig:
    kw = {**base, **point}
    try:
        return RunConfig.from_dict(kw)
    except TypeError as e:  # a value of the wrong type that validation compared
        raise ConfigError(f"bad sweep value in {dict(point) or dict(base)}: {e}") from None


# --- building a spec from flags -------------------------------------------------------------


def split_list(values: Iterable[str] | None) -> list[str]:
    """``["a,b", "c"]`` → ``["a", "b", "c"]`` (options may repeat or take comma lists)."""
    out: list[str] = []
    for v in values or ():
        out.extend(p.strip() for p in v.split(",") if p.strip())
    return out


def parse_ints(values: Iterable[str] | None, what: str) -> list[int]:
    """Integers from comma lists and inclusive ranges: ``"4,9"``, ``"2-9"``."""
    out: list[int] = []
    for item in split_list(values):
        m = re.fullmatch(r"(\d+)-(\d+)", item)
        try:
            if m:
                a, b = int(m[1]), int(m[2])
                if b < a:
                    raise ValueError
                out.extend(range(a, b + 1))
            else:
                out.append(int(item))
        except ValueError:
            raise ConfigError(f"{what}: {item!r} is not an integer or a range like 2-9") from None
    return out


def parse_bools(values: Iterable[str] | None, what: str) -> list[bool]:
    table = {"on": True, "true": True, "yes": True, "1": True,
             "off": False, "false": False, "no": False, "0": False}  # fmt: skip
    out = []
    for item in split_list(values):
        if item.lower() not in table:
            raise ConfigError(f"{what}: {item!r} is not on/off (or true/false)")
        out.append(table[item.lower()])
    return out


def cpus_product(per_role: Mapping[str, Sequence[int]]) -> tuple[dict[str, int], ...]:
    """CPU-count dicts for the product of per-role lists; roles not given keep their default
    count (app 1, gup-fast 0, khugepaged 1; others 0)."""
    roles = [r.value for r in Role]
    for role in per_role:
        if role not in roles:
            raise ConfigError(f"unknown role {role!r} in cpus; roles are: {', '.join(roles)}")
    lists: dict[str, Sequence[int]] = {}
    for role in roles:
        if role in per_role:
            vals = per_role[role]
            if isinstance(vals, int) and not isinstance(vals, bool):
                vals = [vals]
            if not isinstance(vals, Sequence) or not vals:
                raise ConfigError(f"cpus.{role} must be a non-empty list of CPU counts")
            lists[role] = vals
        elif DEFAULT_CPUS.get(role):
            lists[role] = [DEFAULT_CPUS[role]]
    out = []
    for combo in itertools.product(*lists.values()):
        out.append({r: n for r, n in zip(lists, combo, strict=True) if n != 0 or r in per_role})
    return tuple(out)


def parse_set(items: Iterable[str] | None) -> dict[str, Any]:
    """``--set nr_pmds=8`` → ``{"nr_pmds": 8}``; the value is read as a TOML value (numbers,
    true/false, quoted strings, arrays), falling back to a bare string."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: write it as KEY=VALUE, e.g. --set nr_pmds=8")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        out[key] = value
    return out


# --- TOML ----------------------------------------------------------------------------------


def load_toml(path: str | Path) -> SweepSpec:
    """Read a sweep file.  Format (every axis optional, each a list; defaults as for flags):

    .. code-block:: toml

        strategies = ["pmd-clear", "ptl-hold", "migration-entry"]
        orders     = [4, 9]
        workloads  = ["random"]
        flush      = ["ipi", "broadcast"]
        ptl        = ["split"]
        vma_locks  = [true]
        seeds      = [0]
        repeats    = 3

        [cpus]            # per role, a list of counts; the grid takes their product
        app        = [1, 2]
        khugepaged = [1]

        [run]             # fixed parameters of every cell (RunConfig field names)
        duration_s = 5.0
        nr_pmds    = 4

    ``cpus`` may instead be an array of tables (``cpus = [{app = 1, khugepaged = 1}, …]``) to
    list CPU layouts explicitly.  Raises ConfigError for a missing file, a TOML syntax error or
    an unknown key (naming the closest known one).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such sweep file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the sweep file ({e.strerror})") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: TOML syntax error: {e}") from None
    return spec_from_mapping(doc, where=str(path))


def spec_from_mapping(doc: Mapping[str, Any], where: str = "sweep") -> SweepSpec:
    """A SweepSpec from a parsed TOML document (see load_toml)."""
    for key in doc:
        if key not in TOML_KEYS:
            hint = difflib.get_close_matches(key, TOML_KEYS, n=1)
            alias = {v: k for k, v in TOML_AXES.items()}.get(key)
            did = f"; did you mean {(alias or hint[0])!r}?" if (alias or hint) else ""
            raise ConfigError(f"{where}: unknown key {key!r}{did} (keys: {', '.join(TOML_KEYS)})")
    kw: dict[str, Any] = {}
    for key in TOML_AXES:
        if key not in doc:
            continue
        value = doc[key]
        if key == "cpus":
            if isinstance(value, Mapping):
                kw["cpus"] = cpus_product(value)
            elif isinstance(value, list) and all(isinstance(v, Mapping) for v in value):
                kw["cpus"] = tuple(dict(v) for v in value)
            else:
                raise ConfigError(
                    f"{where}: cpus must be a table of per-role lists ([cpus] app = [1, 2]) "
                    "or an array of tables (cpus = [{app = 1, khugepaged = 1}])"
                )
            continue
        if not isinstance(value, list):
            value = [value]
        kw[key] = tuple(value)
    if "repeats" in doc:
        if not isinstance(doc["repeats"], int) or isinstance(doc["repeats"], bool):
            raise ConfigError(f"{where}: repeats must be an integer (got {doc['repeats']!r})")
        kw["repeats"] = doc["repeats"]
    if "run" in doc:
        if not isinstance(doc["run"], Mapping):
            raise ConfigError(f"{where}: [run] must be a table of fixed run parameters")
        kw["base"] = dict(doc["run"])
    return SweepSpec(**kw)
