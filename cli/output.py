"""What every ptlab command shares about output: where it goes, how wide it is, how errors,
exit codes, help and a closed pipe look.

* Results go to stdout, progress and diagnostics to stderr (so ``ptlab run > log`` keeps the
  results and ``ptlab show X | less`` pages only the summary).
* On a terminal, tables take its width and wrap a long cell (overflow "fold"); piped or
  redirected they are as wide as their content needs: a name or a number is never cut.
* Exit codes: :data:`EXIT_OK` 0 clean, :data:`EXIT_VIOLATION` 1 the oracle found a violation,
  :data:`EXIT_USAGE` 2 bad input (one line naming the flag, ending with the ``(see `ptlab CMD
  --help`)`` hint), :data:`EXIT_FAILED` 3 a run that could not complete; 130 for Ctrl-C.
  A reader that closes the pipe early (``ptlab show X | head -1``) is no error: exit 0,
  quietly, as other Unix tools do.
* Help is click's plain formatter: paragraphs re-wrapped to the terminal, a readable
  description column at 80 columns, and metavars that name what a flag takes (``N``,
  ``SECONDS``, ``PATH``, ``[ipi|broadcast]``), never a Python type.
"""

from __future__ import annotations

import os
import sys
from typing import Any

EXIT_OK = 0
EXIT_VIOLATION = 1
EXIT_USAGE = 2
EXIT_FAILED = 3
EXIT_INTERRUPTED = 130

PIPE_WIDTH = 100_000  # "as wide as the content": rich sizes tables to their content


def is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def console(*, stderr: bool = False, quiet: bool = False) -> Any:
    """A rich Console on stdout (results) or stderr (progress, warnings): the terminal's
    width on a terminal, unbounded when piped or redirected (no table is cut at 80 columns).
    ``quiet`` makes it print nothing."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    if quiet:
        return Console(stderr=stderr, quiet=True)
    if is_terminal(stream):
        return Console(stderr=stderr)
    # no colour, no wrapping: a file gets each line whole
    return Console(stderr=stderr, width=PIPE_WIDTH, no_color=True, highlight=False,
                   soft_wrap=False)


def fold_columns(table: Any) -> Any:
    """Make every column of a rich Table wrap (fold) instead of cutting with an ellipsis."""
    for col in table.columns:
        col.overflow = "fold"
    return table


def usage_hint(argv: list[str], commands: set[str]) -> str:
    """`` (see `ptlab CMD --help`)`` for the command named in ``argv`` (``ptlab --help``
    when there is none)."""
    cmd = next((a for a in argv if not a.startswith("-")), None)
    name = f"ptlab {cmd}" if cmd in commands else "ptlab"
    return f" (see `{name} --help`)"


def error_line(message: str, hint: str = "") -> str:
    """The one line every bad input gets on stderr."""
    text = " ".join(str(message).split())  # never more than one line
    return f"ptlab: error: {text}{hint}"


def silence_stdout() -> None:
    """After a reader closed the pipe: point stdout at /dev/null so the interpreter's final
    flush does not complain (the Python documentation's recipe for SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def _stdout_identity() -> tuple[int, int] | None:
    try:
        st = os.fstat(sys.__stdout__.fileno()) if sys.__stdout__ else None
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino) if st else None


def _devnull_identity() -> tuple[int, int] | None:
    try:
        st = os.stat(os.devnull)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


_STDOUT_AT_START = _stdout_identity()


def stdout_pipe_closed() -> bool:
    """True when a reader closed stdout under us: click saw EPIPE (it then wraps stdout in
    its PacifyFlushWrapper and exits 1) or rich did (it points stdout at /dev/null and exits
    1).  ptlab turns either into a quiet 0."""
    if type(sys.stdout).__name__ == "PacifyFlushWrapper":
        return True
    now = _stdout_identity()
    return now is not None and now != _STDOUT_AT_START and now == _devnull_identity()


# --- help -----------------------------------------------------------------------------------

# Metavars by option name, where "N" or "NUM" would not say enough.
_METAVARS = {
    "duration": "SECONDS", "warmup": "SECONDS", "watchdog": "SECONDS", "node_wait": "SECONDS",
    "pin_hold_us": "US", "gap_us": "US", "out": "PATH", "address": "auto|HOST:PORT",
    "inject_bug": "NAME", "mix": "NAME", "baseline": "STRATEGY", "seed": "N",
}


def fix_metavars(command: Any) -> None:
    """Give every option of ``command`` (a click command or group, recursively) a metavar that
    names what it takes: ``[a|b|c]`` for a choice, ``N`` for an integer, ``NUM`` for a number,
    ``PATH``, ``TEXT``, or a name from _METAVARS -- instead of typer's ``<int>`` or
    ``<list[str]>``.  Flags (booleans) take no value and get none."""
    import typing

    for sub in getattr(command, "commands", {}).values():
        fix_metavars(sub)
        if not sub.short_help and sub.help:
            # the first sentence, whole: click would cut it at the column's end with "..."
            first = " ".join(sub.help.strip().split("\n\n")[0].split())
            end = first.find(". ")
            sub.short_help = first[: end + 1] if end > 0 else first
    for p in getattr(command, "params", []):
        if p.param_type_name == "argument":
            # typer prints the Python type beside an argument's metavar ("<list[Path]>")
            p.display_type_rich = lambda ctx=None: None
        if getattr(p, "is_flag", False) or getattr(p, "count", False) or p.metavar is not None:
            continue
        desc = getattr(p, "type_descriptor", None)
        ann = getattr(desc, "annotation", None)
        if typing.get_origin(ann) is list:
            (ann,) = typing.get_args(ann) or (str,)
        name = (p.name or "").lower()
        choices = getattr(desc, "choices", None) if desc is not None else None
        if choices:
            p.metavar = "[" + "|".join(str(getattr(c, "value", c)) for c in choices) + "]"
        elif name in _METAVARS:
            p.metavar = _METAVARS[name]
        elif ann is bool:
            continue
        elif ann is int:
            p.metavar = "N"
        elif ann is float:
            p.metavar = "NUM"
        elif isinstance(ann, type) and issubclass(ann, os.PathLike):
            p.metavar = "PATH"
        elif p.param_type_name == "argument":
            p.metavar = (p.name or "ARG").upper()
        else:
            p.metavar = "TEXT"


def version_text() -> str:
    """``ptlab X.Y.Z`` and, in a git checkout, the revision; then the build of the hot paths
    (``build: compiled (Cython: cpu, layout, ...)``, ``build: pure (PTLAB_PURE=1)``, ...)."""
    from importlib import metadata

    try:
        v = metadata.version("ptlab")
    except metadata.PackageNotFoundError:
        v = "unknown"
    try:
        from ptlab.core.analysis.host import git_revision

        rev, dirty = git_revision()
    except Exception:
        rev, dirty = None, None
    extra = f" (git {rev[:12]}{'+dirty' if dirty else ''})" if rev else ""
    from ptlab.core.machine.build import build_info

    return f"ptlab {v}{extra}\n{build_info().describe()}"


# --- Ray's own output -----------------------------------------------------------------------


class RayLog:
    """Where Ray's chatter went while :func:`ray_output_to_log` was active."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.logs_dir = ""

    def where(self) -> str:
        """"Ray's logs: DIR" for a one-line error message."""
        return f"Ray's logs: {self.logs_dir or os.path.dirname(self.path)}"


def ray_logs_dir() -> str:
    """The log directory of the Ray session this process is connected to ("" if none)."""
    try:
        import ray._private.worker as rw

        node = rw._global_node
        return node.get_logs_dir_path() if node is not None else ""
    except Exception:
        return ""


class ray_output_to_log:  # noqa: N801 (a context manager used like a function)
    """Keep Ray's own output off the terminal while the driver talks to Ray.

    Ray's C++ core worker and its Python loggers write to file descriptor 2; inside this block
    that goes to ``ptlab-driver-<pid>.err`` in Ray's session log directory (moved there by
    :meth:`ray_started` once Ray is up; until then it is in the temp directory), while ptlab's
    own stderr (``sys.stderr``: progress, warnings, the one-line errors) still reaches the
    terminal.  (The errors Ray prints on the driver's *stdout* -- "(raylet) A worker died or
    was killed ...", node-death notices -- are sent to ``ptlab-driver-<pid>.log`` beside it by
    ``ptlab.cluster.sweep.connect``.)  Entering yields a :class:`RayLog` that says where
    everything went.
    """

    def __init__(self) -> None:
        import tempfile

        fd, path = tempfile.mkstemp(prefix=f"ptlab-driver-{os.getpid()}-", suffix=".err")
        self._fd = fd
        self.log = RayLog(path)
        self._saved_fd = -1
        self._saved_stderr: Any = None

    def __enter__(self) -> RayLog:
        sys.stderr.flush()
        self._saved_fd = os.dup(2)
        self._saved_stderr = sys.stderr
        os.dup2(self._fd, 2)
        # ptlab's own messages keep going to the real stderr
        sys.stderr = os.fdopen(os.dup(self._saved_fd), "w", buffering=1, errors="backslashreplace")
        return self.log

    def ray_started(self) -> None:
        """Move the log into Ray's session log directory, now that there is one."""
        logs = ray_logs_dir()
        if not logs:
            return
        self.log.logs_dir = logs
        dest = os.path.join(logs, f"ptlab-driver-{os.getpid()}.err")
        try:
            os.replace(self.log.path, dest)  # the open descriptors follow the file
            self.log.path = dest
        except OSError:
            pass

    def __exit__(self, *exc: object) -> None:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        ours = sys.stderr
        sys.stderr = self._saved_stderr
        os.dup2(self._saved_fd, 2)
        os.close(self._saved_fd)
        os.close(self._fd)
        try:
            ours.close()
        except (OSError, ValueError):
            pass
        try:
            if os.path.getsize(self.log.path) == 0:
                os.unlink(self.log.path)  # nothing was said
        except OSError:
            pass
