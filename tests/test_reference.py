"""The reference runs behind the README: made by results/reference/make.sh, loadable by the
current code, and with the load the README claims (GUP-fast pins, mmap(), walkers)."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest
from ptlab.core.analysis.results import read_run
from ptlab.core.machine.config import RunConfig

ROOT = Path(__file__).resolve().parent.parent
REF = ROOT / "results" / "reference"


def _script_commands() -> list[list[str]]:
    p = subprocess.run(["bash", str(REF / "make.sh")], env={**os.environ, "PTLAB": "echo"},
                       capture_output=True, text=True, timeout=60, check=True)
    return [shlex.split(line) for line in p.stdout.splitlines() if line.strip()]


def test_the_script_makes_valid_runs(monkeypatch):
    """Every command of make.sh builds valid configurations (captured, not run)."""
    import ptlab.cli.commands_run as cr
    from ptlab.cli.main import _register, app

    _register()  # the commands, as `ptlab` registers them (this test may run alone)

    captured: list[RunConfig] = []
    monkeypatch.setattr(cr, "run_configs", lambda configs, *a, **kw: captured.extend(configs) or [])
    cmds = _script_commands()
    assert cmds and all(c[0] == "run" for c in cmds)
    for cmd in cmds:
        cmd = [a if not a.startswith("results/") else str(ROOT / a) for a in cmd]
        try:
            app(args=cmd, standalone_mode=False)
        except SystemExit as e:  # a clean run of nothing exits 0
            assert e.code in (0, None), cmd
    orders = {(c.strategy, c.order, c.backend) for c in captured}
    for order in (2, 4, 6, 8):
        for s in ("pmd-clear", "ptl-hold", "migration-entry"):
            assert (s, order, "virtual") in orders
    assert ("pmd-clear", 9, "virtual") in orders
    for c in captured:
        assert c.cpus.get("gup-fast") and c.cpus.get("mmap"), c.cpus


def test_the_committed_files_load_with_the_current_code():
    files = sorted(REF.rglob("*.arrow"))
    if not files:
        pytest.fail("no reference runs committed: run results/reference/make.sh")
    seen = set()
    for f in files:
        r = read_run(f)  # checksum, schema version, metadata
        config = RunConfig.from_dict(r.meta["params"])
        seen.add((config.strategy, config.order, config.backend))
        ops = set(r.table.column("op").to_pylist())
        assert {"gup_fast", "mmap", "collapse", "fault"} <= ops, (f.name, ops)
        assert r.meta["summary"]["violations"] == 0, f.name
    assert {o for _, o, b in seen if b == "virtual"} == {2, 4, 6, 8, 9}
    assert any(b == "process" for _, _, b in seen)
