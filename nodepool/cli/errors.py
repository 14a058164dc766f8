"""One line per error and a non-zero exit, never a traceback."""

from __future__ import annotations

from collections.abc import Sequence

import click

__all__ = ["CommandError", "run_command"]

USAGE_EXIT = 2
FAILURE_EXIT = 1
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as shells report Ctrl-C


class CommandError(click.ClickException):
    """A failure to report as one line, exit code 1."""


def run_command(command: click.Command, args: Sequence[str] | None = None) -> int:
    """Runs a click command, turning every failure into ``error: ...`` on stderr."""
    try:
        result = command.main(args=args, standalone_mode=False)
    except click.exceptions.Abort as exc:
        # click turns Ctrl-C (and end of input) at a prompt into Abort.
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, EOFError):
            click.echo("error: no input (end of file at a prompt)", err=True)
            return FAILURE_EXIT
        click.echo("error: interrupted", err=True)
        return INTERRUPTED_EXIT
    except click.UsageError as exc:
        click.echo(f"error: {_one_line(exc.format_message())}", err=True)
        return USAGE_EXIT
    except click.ClickException as exc:
        click.echo(f"error: {_one_line(exc.format_message())}", err=True)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("error: interrupted", err=True)
        return INTERRUPTED_EXIT
    except Exception as exc:
        # Still one line; the type names the failure without a traceback.
        click.echo(f"error: unexpected {type(exc).__name__}: {_one_line(str(exc))}", err=True)
        return FAILURE_EXIT
    return result if isinstance(result, int) else 0


def _one_line(message: str) -> str:
    return " ".join(message.split())
