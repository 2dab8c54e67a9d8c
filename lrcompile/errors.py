"""The one user-facing error type.

A ``LrcError`` message is printed by the CLI as a single line (no traceback): it says what is
wrong and how to fix it. Anything else that escapes is our bug and keeps its traceback.
"""
from __future__ import annotations


class LrcError(Exception):
    """A user error: bad input, bad option, missing optional dependency."""

    exit_code = 2

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class VerificationFailed(LrcError):
    """The compressed model's outputs differ from the original's by more than the tolerance.

    ``result`` holds the run's CompileResult (its report says what failed; nothing was written).
    """

    exit_code = 3

    def __init__(self, message: str, *, result=None) -> None:
        super().__init__(message)
        self.result = result
