"""Errors meant for users: a clear message and an exit code, never a traceback."""

from __future__ import annotations

import traceback
from contextlib import contextmanager
from typing import Iterator

import typer
from rich.console import Console
from rich.markup import escape


class UserError(Exception):
    """Base of every error whose message is enough for the user to act on."""

    exit_code = 1


class InputUnavailable(UserError):
    """A model or dataset that is not available here."""

    exit_code = 3


@contextmanager
def user_errors(console: Console, debug: bool = False) -> Iterator[None]:
    """Turn UserError into `error: message` + exit code; Ctrl-C into a resume hint."""
    try:
        yield
    except UserError as exc:
        if debug:
            traceback.print_exc()
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: finished stages and shards are kept; run the same command again to resume", highlight=False)
        raise typer.Exit(130)
