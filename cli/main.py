"""ptlab's command line: one sub-command per noun, each registered by its own module."""

from __future__ import annotations

import sys

import typer
from ptlab.core.errors import PtlabError
from ptlab.core.results import ResultFileError

app = typer.Typer(
    name="ptlab",
    help=(
        "A lab for Linux page-table concurrency: run khugepaged collapse strategies for real "
        "(shared-memory page tables, one process per simulated CPU), prove whether they lose "
        "writes, and measure who waits, how and for how long."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    # Each module adds its commands to `app`.
    from ptlab.cli import commands_run

    commands_run.register(app)
    for name in ("commands_calibrate", "commands_results", "commands_sweep", "commands_kernel"):
        try:
            module = __import__(f"ptlab.cli.{name}", fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name == f"ptlab.cli.{name}":
                continue
            raise
        module.register(app)


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the app; user errors become one line on stderr and an exit code."""
    _register()
    try:
        rc = app(args=argv, standalone_mode=False)
    except PtlabError as e:
        print(f"ptlab: error: {e}", file=sys.stderr)
        return e.exit_code
    except ResultFileError as e:
        print(f"ptlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ptlab: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # typer.Exit inside commands
        return int(e.code or 0)
    except Exception as e:
        # usage errors from typer's (vendored) click: one line, exit 2
        names = {c.__name__ for c in type(e).__mro__}
        if "ClickException" in names:
            msg = e.format_message() if hasattr(e, "format_message") else str(e)
            hint = ""
            ctx = getattr(e, "ctx", None)
            if ctx is not None:
                hint = f" (see `{ctx.command_path} --help`)"
            print(f"ptlab: error: {msg}{hint}", file=sys.stderr)
            return 2
        if "Abort" in names:
            print("ptlab: interrupted", file=sys.stderr)
            return 130
        raise
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
