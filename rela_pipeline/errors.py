"""User-facing errors.

Every failure that a user can cause (bad paths, bad specs, corrupt shards) is raised as a
:class:`RelaError` whose message fits on one line. The CLI prints it without a traceback and
exits non-zero; Python callers can catch it like any exception.
"""

from __future__ import annotations


class RelaError(Exception):
    """A user-facing error with a one-line message.

    Attributes:
        exit_code: process exit status the CLI uses for this error (default 2).
    """

    exit_code: int = 2

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(" ".join(str(message).split()))
        if exit_code is not None:
            self.exit_code = exit_code
