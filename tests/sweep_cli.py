"""Run ``ptlab sweep`` as the console script does: ``python tests/sweep_cli.py sweep ARGS…``.

Uses ptlab's full CLI when it can be assembled, else an app with only the sweep command, so
the sweep tests do not depend on the other commands being present.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    try:
        from ptlab.cli import commands_run  # noqa: F401
    except ImportError:
        pass
    else:
        from ptlab.cli.main import main as ptlab_main

        return ptlab_main(argv)
    import typer
    from ptlab.cli import commands_sweep

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.callback()
    def _root() -> None:
        """ptlab (sweep only)"""

    commands_sweep.register(app)
    try:
        rc = app(args=argv, standalone_mode=False)
    except SystemExit as e:
        return int(e.code or 0)
    except KeyboardInterrupt:
        print("ptlab: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            return 2
        raise
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
