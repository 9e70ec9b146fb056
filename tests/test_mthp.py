"""mTHP is the headline: the default run collapses order 4 (64 KiB), and order 9 is refused for
the PTE-level proposals — a PMD-order collapse replaces the page table, which walkers reach
without the PTL, so only pmd-clear models it.  Sweeps leave those cells out by themselves."""

from __future__ import annotations

import subprocess
import sys

import pytest
from ptlab.core.machine.config import RunConfig
from ptlab.core.machine.errors import ConfigError


def test_the_default_order_is_an_mthp_order():
    assert RunConfig().order == 4
    assert RunConfig(strategy="ptl-hold").order == 4


@pytest.mark.parametrize("strategy", ["ptl-hold", "migration-entry"])
def test_order_9_is_refused_for_the_pte_level_strategies(strategy):
    with pytest.raises(ConfigError, match="only pmd-clear models it"):
        RunConfig(strategy=strategy, order=9)
    RunConfig(strategy="pmd-clear", order=9)  # the PMD collapse itself stays


def test_cli_refuses_order_9_with_one_line():
    p = subprocess.run([sys.executable, "-m", "ptlab.cli.main", "run", "-s", "ptl-hold", "--order", "9"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert "Traceback" not in p.stderr
    assert any("only pmd-clear models it" in line for line in lines), p.stderr


def test_sweep_grid_leaves_out_the_order_9_cells_of_ptl_hold_and_migration_entry():
    from ptlab.cluster.grid import SweepSpec, expand

    cells = expand(SweepSpec(strategies=("pmd-clear", "ptl-hold", "migration-entry"), orders=(4, 9)))
    got = {(c.config.strategy, c.config.order) for c in cells}
    assert got == {("pmd-clear", 4), ("pmd-clear", 9), ("ptl-hold", 4), ("migration-entry", 4)}
    with pytest.raises(ConfigError, match="no cell left"):
        expand(SweepSpec(strategies=("ptl-hold",), orders=(9,)))
