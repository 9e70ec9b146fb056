"""The CLI's contract for `ptlab run`: bad input is one line and exit 2, before any Ray or shared
memory is touched; Ctrl-C ends a run with nothing left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ptlab.cli.main import main

BAD = [
    (["run", "--strategy", "nope"], "nope"),
    (["run", "--inject-bug", "nope", "--unsafe"], "unknown bug"),
    (["run", "--inject-bug", "rfc-v1"], "--unsafe"),
    (["run", "--order", "1"], "out of range"),
    (["run", "--order", "10"], "out of range"),
    (["run", "--app", "0", "--khugepaged", "0"], "at least one simulated CPU"),
    (["run", "--app", "-1"], "non-negative"),
    (["run", "--duration", "0"], "positive"),
    (["run", "--duration", "-3"], "positive"),
    (["run", "--frames", "100"], "frames cannot hold"),
    (["run", "--workload", "nope"], "nope"),
    (["run", "--bogus"], "No such option"),
    (["check", "--order", "12"], "out of range"),
]


@pytest.mark.parametrize("argv,needle", BAD, ids=lambda a: " ".join(a) if isinstance(a, list) else "")
def test_bad_input_is_one_line_and_exit_2(argv, needle, capsys, tmp_path):
    rc = main([*argv, "--out", str(tmp_path / "out")] if argv[0] in ("run", "check") and "--bogus" not in argv else argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert needle in err and "Traceback" not in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_unwritable_output_directory(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["run", "--out", str(blocker / "sub"), "--duration", "1"]) == 2
    err = capsys.readouterr().err
    assert "cannot write results" in err and "Traceback" not in err


def test_strategies_lists_every_bug(capsys):
    assert main(["strategies"]) == 0
    out = capsys.readouterr().out
    from ptlab.core.bugs import BUG_TEXT

    for name in (*BUG_TEXT, "pmd-clear", "ptl-hold", "migration-entry"):
        assert name in out
    assert "test-ptl-leak" not in out


def test_ctrl_c_leaves_nothing_behind(tmp_path):
    """SIGINT in the middle of a run: exit 130, no result file, no shared memory."""
    ptlab = Path(sys.executable).parent / "ptlab"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen(
        [str(ptlab), "run", "-s", "ptl-hold", "--duration", "30", "--out", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,
    )
    mine = f"ptlab.{proc.pid}."
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not any(p.name.startswith(mine) for p in Path("/dev/shm").iterdir()):
        time.sleep(0.2)
    time.sleep(4)  # the CPUs are running
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 130, err.decode()[-500:]
    assert not list(tmp_path.glob("*.arrow"))
    assert not [p for p in Path("/dev/shm").iterdir() if p.name.startswith(mine)]
