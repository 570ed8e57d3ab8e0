"""Errors meant for users: a clear message and an exit code, never a traceback.

The CLI (`cli.user_errors`) prints `error: <message>` and exits with `exit_code`;
this module knows nothing of the CLI, so any layer may raise these.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of every error whose message is enough for the user to act on."""

    exit_code = 1


class InputUnavailable(UserError):
    """A model or dataset that is not available here."""

    exit_code = 3
