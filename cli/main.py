"""ptlab's command line: one sub-command per noun, each registered by its own module.

Exit status, the same for every command: 0 clean, 1 the oracle found a violation, 2 bad input
(one line on stderr naming the flag, ending with "(see `ptlab CMD --help`)"), 3 a run that
could not complete; 130 after Ctrl-C.  A closed pipe (``ptlab show X | head -1``) exits 0,
quietly.  See ptlab.cli.output.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from ptlab.cli.output import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    error_line,
    fix_metavars,
    silence_stdout,
    stdout_pipe_closed,
    usage_hint,
    version_text,
)
from ptlab.core.analysis.results import ResultFileError
from ptlab.core.machine.errors import PtlabError

app = typer.Typer(
    name="ptlab",
    help=(
        "A lab for Linux page-table concurrency: run khugepaged collapse strategies for real "
        "(shared-memory page tables, one process per simulated CPU), prove whether they lose "
        "writes, and measure who waits, how and for how long.\n\n"
        "Exit status: 0 clean, 1 the oracle found a violation, 2 bad input, 3 a run could not "
        "complete."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's formatter: paragraphs re-wrapped to the terminal
)


def _version(value: bool) -> None:
    if value:
        print(version_text())
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print ptlab's version and exit.")] = False,
) -> None:
    pass  # the help is the Typer's (above)


_registered = False


def _register() -> None:
    # Each module adds its commands to `app`.
    global _registered
    if _registered:
        return
    _registered = True
    from ptlab.cli import commands_run

    commands_run.register(app)
    for name in ("commands_calibrate", "commands_results", "commands_sweep", "commands_kernel", "commands_explore", "commands_crossover"):
        try:
            module = __import__(f"ptlab.cli.{name}", fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name == f"ptlab.cli.{name}":
                continue
            raise
        module.register(app)


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the app; user errors become one line on stderr and an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _register()
    command = typer.main.get_command(app)
    fix_metavars(command)
    commands = set(getattr(command, "commands", {}))
    hint = usage_hint(argv, commands)
    if not argv:  # `ptlab` alone: the help, and no error
        with command.make_context("ptlab", ["--help"], resilient_parsing=True) as ctx:
            print(command.get_help(ctx))
        return EXIT_OK
    try:
        rc = command.main(args=argv, prog_name="ptlab", standalone_mode=False)
    except BrokenPipeError:
        silence_stdout()
        return EXIT_OK
    except PtlabError as e:
        print(error_line(str(e), hint if e.exit_code == EXIT_USAGE else ""), file=sys.stderr)
        return e.exit_code
    except ResultFileError as e:
        print(error_line(str(e), hint), file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("ptlab: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as e:  # typer.Exit inside commands; click's exit after EPIPE
        if stdout_pipe_closed():
            silence_stdout()
            return EXIT_OK
        return e.code if isinstance(e.code, int) else (EXIT_OK if e.code is None else EXIT_FAILED)
    except Exception as e:
        # usage errors from typer's (vendored) click: one line, exit 2
        names = {c.__name__ for c in type(e).__mro__}
        if "ClickException" in names:
            msg = e.format_message() if hasattr(e, "format_message") else str(e)
            ctx = getattr(e, "ctx", None)
            if ctx is not None:
                hint = f" (see `{ctx.command_path} --help`)"
            print(error_line(msg, hint), file=sys.stderr)
            return EXIT_USAGE
        if "Abort" in names:
            print("ptlab: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        raise
    if stdout_pipe_closed():
        silence_stdout()
        return EXIT_OK
    return rc if isinstance(rc, int) else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
