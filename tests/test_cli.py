"""The CLI as a user meets it: bad input is one line and exit 2 (naming the flag, ending with
the "(see `ptlab CMD --help`)" hint) before any Ray or shared memory is touched; help reflows;
`ptlab` alone and `--version`; exit codes 0/1/2/3; results on stdout and progress on stderr;
a dead CPU is one line; Ctrl-C ends a run with nothing left behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ptlab.cli import commands_run
from ptlab.cli.main import main

sys.path.insert(0, str(Path(__file__).parent))
from _cpu_procs import alive, cpu_states, is_cpu_actor, run_prefixes  # noqa: E402
from test_results import make_run  # noqa: E402

PTLAB = [sys.executable, "-m", "ptlab.cli.main"]
HINT = re.compile(r"\(see `ptlab( [a-z-]+)? --help`\)$")

BAD = [
    (["run", "--strategy", "nope"], "nope"),
    (["run", "--inject-bug", "nope", "--unsafe"], "unknown bug"),
    (["run", "--inject-bug", "rfc-v1"], "--unsafe"),
    (["run", "--order", "1"], "out of range"),
    (["run", "--order", "10"], "out of range"),
    (["run", "--app", "0", "--khugepaged", "0"], "at least one simulated CPU"),
    (["run", "--app", "-1"], "--app takes a non-negative whole number"),
    (["run", "--duration", "0"], "--duration must be positive"),
    (["run", "--duration", "-3"], "--duration must be positive"),
    (["run", "--duration", "inf"], "--duration must be a finite number"),
    (["run", "--duration", "nan"], "--duration must be a finite number"),
    (["run", "--watchdog", "1e9"], "--watchdog must be positive and at most"),
    (["run", "--pin-hold-us", "99999999"], "--pin-hold-us must be 0..1,000,000"),
    (["run", "--max-ptes-none", "600"], "--max-ptes-none must be 0..511 (got 600)"),
    (["run", "--seed", "-1"], "--seed must be"),
    (["run", "--frames", "100"], "frames cannot hold"),
    (["run", "--workload", "nope"], "nope"),
    (["run", "--bogus"], "No such option"),
    (["check", "--order", "12"], "out of range"),
    (["sweep", "--workload", "nope", "--dry-run"], "--workload 'nope' is not a choice"),
    (["sweep", "--duration", "inf", "--dry-run"], "--duration must be a finite number"),
    (["sweep", "--set", "nr_pmds=abc", "--dry-run"], "--nr-pmds takes a whole number (got 'abc')"),
    (["sweep", "--set", "max_ptes_none=600", "--dry-run"], "--max-ptes-none must be 0..511"),
    (["sweep", "--set", "pin_hold_us=100000000", "--dry-run"], "--pin-hold-us must be 0..1,000,000"),
    (["sweep", "--set", "chaos=3", "--dry-run"], "--chaos takes true or false"),
    (["compare", "--format", "pdf", "x"], "pdf"),
    (["show", "--format", "xml", "x"], "xml"),
]


@pytest.mark.parametrize("argv,needle", BAD, ids=lambda a: " ".join(a) if isinstance(a, list) else "")
def test_bad_input_is_one_line_naming_the_flag_with_the_hint(argv, needle, capsys, tmp_path, monkeypatch):
    from ptlab.cluster import sweep as sweep_mod

    started = []
    monkeypatch.setattr(sweep_mod, "connect", lambda *a, **k: started.append(1) or False)
    if argv[0] in ("run", "check", "sweep") and "--bogus" not in argv:
        argv = [*argv, "--out", str(tmp_path / "out")]
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert needle in err and "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("ptlab: error: ") and HINT.search(err), err
    assert f"`ptlab {argv[0]} --help`" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert not started  # refused before Ray was started


def test_out_naming_a_file_says_so(capsys, tmp_path):
    f = tmp_path / "results.txt"
    f.write_text("")
    assert main(["run", "--out", str(f), "--duration", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--out {f} is a file, not a directory" in err and HINT.search(err), err


def test_unwritable_output_directory(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["run", "--out", str(blocker / "sub"), "--duration", "1"]) == 2
    err = capsys.readouterr().err
    assert "cannot write results" in err and "Traceback" not in err


def test_the_test_only_bug_is_not_offered(capsys):
    assert main(["run", "--inject-bug", "nope", "--unsafe"]) == 2
    err = capsys.readouterr().err
    assert "ptl-hold-no-flush" in err and "test-ptl-leak" not in err
    assert main(["run", "--help"]) == 0
    assert main(["strategies"]) == 0
    assert "test-ptl-leak" not in capsys.readouterr().out


def test_strategies_lists_every_bug(capsys):
    assert main(["strategies"]) == 0
    out = capsys.readouterr().out
    from ptlab.core.kernel.bugs import BUG_TEXT

    for name in (*BUG_TEXT, "pmd-clear", "ptl-hold", "migration-entry"):
        assert name in out
    assert "test-ptl-leak" not in out


# --- help, version, no arguments -----------------------------------------------------------------


def test_no_arguments_shows_the_help_and_exits_0(capsys):
    assert main([]) == 0
    cap = capsys.readouterr()
    assert cap.out.startswith("Usage: ptlab") and "Commands:" in cap.out and "run" in cap.out
    assert cap.err == ""


def test_version(capsys):
    from importlib import metadata

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith(f"ptlab {metadata.version('ptlab')}")


def _commands() -> list[str]:
    import typer
    from ptlab.cli import main as cli_main

    cli_main._register()
    return sorted(typer.main.get_command(cli_main.app).commands)


@pytest.mark.parametrize("cmd", [None, *_commands()])
def test_help_fits_80_columns_without_type_metavars(cmd, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    assert main([cmd, "--help"] if cmd else ["--help"]) == 0
    out = capsys.readouterr().out
    long = [line for line in out.splitlines() if len(line) > 80]
    assert not long, long
    for bad in ("<bool>", "<int>", "<float>", "<str>", "<path>", "list[", "<list"):
        assert bad not in out, (bad, out)
    if cmd is None:  # the command list: every summary whole, none cut with "..."
        assert "..." not in out.split("Commands:")[1], out


def test_command_list_reflows(capsys, monkeypatch):
    """`ptlab --help` at 80 columns: each command's summary fills its column; a continuation
    line follows only a line the next word would not fit on (no docstring line breaks)."""
    width = 80
    monkeypatch.setenv("COLUMNS", str(width))
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    section = re.split(r"Commands", out, maxsplit=1)[1]
    lines = [line.replace("│", " ").rstrip() for line in section.splitlines()]
    for a, b in zip(lines, lines[1:]):
        if a.strip() and b.strip() and b.startswith(" " * 10):  # b continues a's summary
            assert len(a) + 1 + len(b.split()[0]) > width - 4, f"a line break inside a summary:\n{a}\n{b}"


@pytest.mark.parametrize("cmd", _commands())
def test_help_reflows_sentences(cmd, capsys, monkeypatch):
    """Written as paragraphs, the help is re-wrapped to the terminal: at 60 columns every line
    of the description is filled (a line breaks only where the next word would not fit), so
    no sentence stops at a line break of the source text."""
    width = 60
    monkeypatch.setenv("COLUMNS", str(width))
    assert main([cmd, "--help"]) == 0
    out = capsys.readouterr().out
    text = re.split(r"\n\s*(?:╭─+ )?(?:Options|Arguments|Commands)\b", out)[0]
    lines = [line.rstrip() for line in text.splitlines()]
    lines = lines[next(i for i, line in enumerate(lines) if "Usage:" in line) + 1:]
    for a, b in zip(lines, lines[1:]):
        if a.strip() and b.strip():
            first = b.split()[0]
            assert len(a) + 1 + len(first) > width - 2, f"a line break inside a sentence:\n{a}\n{b}"


# --- exit codes (the runs replaced by result files: no Ray) --------------------------------------


def _fake_runs(tmp_path, outcomes):
    """A run_configs that returns made-up results: 'clean', 'violation' or 'failed'."""
    paths = []
    for i, what in enumerate(outcomes):
        if what == "failed":
            paths.append(None)
            continue
        v = [{"kind": "lost_write", "cpu": 0, "page": 1, "strategy": "pmd-clear", "phase": "copy",
              "t_ns": 1, "detail": "x"}] if what == "violation" else []
        summary = {"events": {"fault": 10, "access": 100}, "collapses": {"SCAN_SUCCEED": 5},
                   "violations": len(v), "violation_kinds": {"lost_write": 1} if v else {}, "duration_s": 1.0}
        paths.append(make_run(tmp_path / f"r{i}.arrow", "pmd-clear", seed=i, violations=v,
                              meta_extra={"summary": summary, "access_sample": 8}))

    def fake(configs, out, address, labels=None, *, progress=True):
        return [(c, p, "simulated CPU 0 (app) died: killed (Ray's logs: /tmp/x)" if p is None else "")
                for c, p in zip(configs, paths)]

    return fake


@pytest.mark.parametrize("outcomes,rc", [(["clean"], 0), (["violation"], 1), (["failed"], 3),
                                         (["violation", "failed", "clean"], 3),
                                         (["clean", "violation", "clean"], 1)])
def test_run_exit_codes(outcomes, rc, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(commands_run, "run_configs", _fake_runs(tmp_path, outcomes))
    strategy = "pmd-clear" if len(outcomes) == 1 else "all"
    argv = ["run", "-s", strategy, "--app", "1", "--khugepaged", "1", "--no-compare",
            "--out", str(tmp_path / "o")]
    assert main(argv) == rc
    cap = capsys.readouterr()
    if "failed" in outcomes:
        assert "run failed: simulated CPU 0 (app) died" in cap.err
    if "violation" in outcomes:
        assert "1 violation(s): lost_write×1" in cap.out
    # the result line: whole, with separators, accesses scaled up from the 1-in-8 sample
    if outcomes[0] != "failed":
        assert "5/5 collapses succeeded (5.00/s), 10 faults, 800 accesses" in cap.out


# --- real runs, as a user starts them (subprocesses, an embedded Ray) ---------------------------


def _sigint_default() -> None:
    """In the child before exec: SIGINT back to its default, so that Python installs its Ctrl-C
    handler.  A suite started in the background by a non-interactive shell (`make test &`)
    inherits SIGINT ignored, exec keeps that, and the run would not see its Ctrl-C at all."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _env() -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "COLUMNS": "80",
            "PTLAB_TEST_RAY_IP": os.environ.get("PTLAB_TEST_RAY_IP", "127.0.0.2")}


SHORT_RUN = ["run", "-s", "pmd-clear", "--order", "4", "--app", "1", "--khugepaged", "1",
             "--duration", "1", "--no-compare"]


@pytest.mark.parametrize("flags", [[], ["--no-progress"], ["--quiet"]])
def test_results_on_stdout_progress_on_stderr(flags, tmp_path):
    """Piped: the result line whole on stdout (not cut or wrapped at 80 columns), the progress
    bar on stderr (none with --no-progress or --quiet), and nothing from Ray anywhere."""
    p = subprocess.run([*PTLAB, *SHORT_RUN, *flags, "--out", str(tmp_path)], capture_output=True,
                       text=True, env=_env(), timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    assert len(lines) == 2, p.stdout
    assert re.match(r"pmd-clear +order 4: [\d,]+/[\d,]+ collapses succeeded \([\d,.]+/s\), "
                    r"[\d,]+ faults, [\d,]+ accesses; clean$", lines[0]), lines[0]
    assert lines[1].strip().endswith(".arrow") and Path(lines[1].strip()).exists()
    assert "━" not in p.stdout and "(raylet)" not in p.stdout + p.stderr
    if flags:
        assert "━" not in p.stderr
        if flags == ["--quiet"]:
            assert p.stderr == ""
    else:
        assert "━" in p.stderr and "done" in p.stderr


def _cfg() -> object:
    from ptlab.core.machine.config import RunConfig

    return RunConfig(strategy="pmd-clear", order=4, duration_s=30.0, cpus={"app": 1, "khugepaged": 1})


def _wait_for_running_cpus(proc: subprocess.Popen, config) -> list[int]:
    """The pids of the run's simulated CPUs (from its own shared memory) once every one of
    them has done some work.  Fails -- never gives up silently -- when the run ends first
    or does not get there."""
    for _ in range(3000):  # a hang guard only: the condition is progress, not time
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the run ended (exit {proc.returncode}) before its CPUs ran: {err[-1500:]}")
        for prefix in run_prefixes(proc.pid):
            states = cpu_states(prefix, config)
            if states and all(pid and done > 100 for pid, done in states):
                pids = [pid for pid, _ in states]
                assert all(is_cpu_actor(p) for p in pids), pids
                return pids
        time.sleep(0.1)
    pytest.fail("the run's CPUs never made progress")


def test_a_dead_cpu_is_one_line(tmp_path):
    """SIGKILL one CPU process of the run: exit 3 and one line naming the CPU -- not Ray's
    multi-line worker-exit text (which it printed twice, once on stdout)."""
    proc = subprocess.Popen([*PTLAB, *SHORT_RUN[:-3], "--duration", "30", "--no-compare", "--no-progress",
                             "--out", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(), start_new_session=True)
    try:
        pids = _wait_for_running_cpus(proc, _cfg())
        os.kill(pids[0], signal.SIGKILL)  # CPU 0: the app CPU of this run, nobody else's
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 3, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert re.match(rf"pmd-clear: run failed: simulated CPU 0 \(app\) died: its process \(pid {pids[0]}\) "
                    r"was killed by a signal .*\(Ray's logs: /\S+\)$", lines[0]), lines[0]
    assert out == ""  # no "(raylet) A worker died ..." on stdout either
    assert not list(tmp_path.glob("*.arrow"))


def test_ctrl_c_leaves_nothing_behind(tmp_path):
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) in the middle of a
    run: exit 130, no result file and no hidden temp file, no shared memory, and the run's CPU
    processes are gone."""
    proc = subprocess.Popen([*PTLAB, *SHORT_RUN[:-3], "--duration", "30", "--no-compare", "--out", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env(),
                            start_new_session=True, preexec_fn=_sigint_default)
    try:
        pids = _wait_for_running_cpus(proc, _cfg())
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert not list(tmp_path.iterdir()), list(tmp_path.iterdir())  # no .arrow, no hidden .tmp
    assert not run_prefixes(proc.pid)
    for _ in range(300):  # the processes go with Ray's shutdown; wait for the reaper, a hang guard
        if not any(alive(p) for p in pids):
            break
        time.sleep(0.1)
    assert not [p for p in pids if alive(p)], "the run's CPU processes outlived it"
