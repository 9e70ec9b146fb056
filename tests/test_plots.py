"""ptlab plot: every figure written as a real PNG, missing data skipped with a note, bad
output directories refused before anything is drawn."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest
import typer
from ptlab.cli import main as cli_main
from ptlab.cli.commands_results import register
from ptlab.core.analysis.plots import FIGURES, plot_paths
from ptlab.core.analysis.results import ResultFileError
from ptlab.core.machine.errors import ConfigError

sys.path.insert(0, str(Path(__file__).parent))
from test_results import make_run  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("runs")
    for i, (s, scale) in enumerate((("pmd-clear", 1.0), ("ptl-hold", 3.0), ("migration-entry", 1.2))):
        make_run(d / f"{s}.arrow", s, seed=i, fault_scale=scale, n_faults=1500)
    return d


def test_all_figures_written(runs_dir: Path, tmp_path: Path) -> None:
    report = plot_paths([runs_dir], tmp_path / "fig")
    assert report.skipped == ()
    assert sorted(p.name for p in report.written) == sorted(FIGURES)
    for p in report.written:
        assert p.stat().st_size > 10_000, p
        w, h = _png_size(p)
        assert w == 800 and 400 <= h <= 700, (p, w, h)
    assert sorted(x.name for x in (tmp_path / "fig").iterdir()) == sorted(FIGURES)  # no temp files


def test_missing_data_skips_figures(tmp_path: Path) -> None:
    make_run(tmp_path / "in" / "a.arrow", "pmd-clear", seed=1, ops=("access", "fault"))
    report = plot_paths([tmp_path / "in"], tmp_path / "fig")
    skipped = dict(report.skipped)
    assert set(skipped) == {"latency-cdf-mmap.png", "waits-per-collapse.png", "collapse-phases.png"}
    assert "no mmap events" in skipped["latency-cdf-mmap.png"]
    assert {p.name for p in report.written} == {"latency-cdf-fault.png", "timeline.png"}


def test_empty_run_skips_everything(tmp_path: Path) -> None:
    make_run(tmp_path / "in" / "a.arrow", "pmd-clear", seed=1, ops=())
    report = plot_paths([tmp_path / "in"], tmp_path / "fig")
    assert report.written == () and len(report.skipped) == len(FIGURES)


def test_bad_output_and_input(runs_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        plot_paths([runs_dir], blocker)
    with pytest.raises(ConfigError, match="cannot create output directory"):
        plot_paths([runs_dir], blocker / "sub")
    with pytest.raises(ResultFileError, match="no such file"):
        plot_paths([tmp_path / "nope.arrow"], tmp_path / "fig")
    assert not (tmp_path / "fig").exists()  # input is checked before anything is created


def test_cli_plot(runs_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                  capsys: pytest.CaptureFixture[str]) -> None:
    app = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
    register(app)
    monkeypatch.setattr(cli_main, "app", app)
    monkeypatch.setattr(cli_main, "_register", lambda: None)
    assert cli_main.main(["plot", str(runs_dir / "ptl-hold.arrow"), "--out", str(tmp_path / "f")]) == 0
    out = capsys.readouterr().out
    assert out.count("wrote ") == len(FIGURES)
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli_main.main(["plot", str(runs_dir), "--out", str(blocker)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ptlab: error: ") and "\n" not in err


def test_timeline_counts_the_sampled_accesses(tmp_path: Path) -> None:
    """Accesses are recorded one in access_sample: the timeline shows accesses per second
    scaled back up (8x low without it); faults are recorded in full."""
    from ptlab.core.analysis.plots import figure_timeline
    from ptlab.core.analysis.results import read_runs

    make_run(tmp_path / "a.arrow", "pmd-clear", seed=1, duration_s=2.0, n_faults=1000,
             meta_extra={"access_sample": 8})
    fig = figure_timeline(read_runs([tmp_path]))
    access_ax, fault_ax = fig.axes[0], fig.axes[1]
    assert sum(access_ax.lines[0].get_ydata()) == pytest.approx(5 * 1000 * 8)
    assert sum(fault_ax.lines[0].get_ydata()) == pytest.approx(1000)
