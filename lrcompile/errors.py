"""The one user-facing error type, and what the CLI needs to name where anything else happened.

A ``LrcError`` message is printed by the CLI as a single line (no traceback): it says what is
wrong and how to fix it. Anything else that escapes is our bug: the CLI prints one line naming the
stage (``note_stage``) and node where it happened, saves the traceback to a log file and exits
with code 4 (``lrcompile.cli``). Permission and disk errors are the user's situation, not our bug:
``write_error`` turns them into a ``LrcError`` that says which path and what to do.
"""
from __future__ import annotations

import errno
import importlib.metadata
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

#: The exit code of an internal error (a bug of ours); 2 is a user error, 3 a failed verification.
INTERNAL_ERROR_EXIT = 4

#: errno values that say the place cannot be written (the user's situation, not our bug), in words.
WRITE_ERRNOS = {getattr(errno, name): words for name, words in (
    ("EACCES", "permission denied"),
    ("EPERM", "operation not permitted"),
    ("EROFS", "read-only file system"),
    ("ENOSPC", "no space left on device"),
    ("EDQUOT", "disk quota exceeded"),
    ("EFBIG", "file too large for the file system"),
    ("ENOTDIR", "a part of the path is a file, not a folder"),
    ("ENAMETOOLONG", "file name too long"),
) if hasattr(errno, name)}


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


def note_stage(exc: BaseException, stage: str) -> None:
    """Record on ``exc`` the compile stage it escaped from (the innermost one is kept)."""
    if getattr(exc, "lrcompile_stage", None) is None:
        try:
            exc.lrcompile_stage = stage
        except AttributeError:  # an exception type without a __dict__: the CLI then names the command
            pass


def stage_of(exc: BaseException) -> str | None:
    """The stage ``note_stage`` recorded on ``exc`` or on an exception it was raised from."""
    for e in chain(exc):
        stage = getattr(e, "lrcompile_stage", None)
        if stage:
            return stage
    return None


def chain(exc: BaseException):
    """``exc`` and the exceptions it was raised from or during, innermost last (cycles cut)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_write_error(exc: BaseException) -> bool:
    """Whether ``exc`` says a place cannot be written (permission, read-only, full disk, a file
    where a folder should be): the user's situation to fix."""
    return isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS


def write_error(exc: OSError, place: str | os.PathLike, option: str, *, action: str = "write to") -> LrcError:
    """A one-line ``LrcError`` for a write that failed with ``exc`` (call it when
    ``is_write_error(exc)``): ``cannot write to PLACE: REASON; choose another OPTION`` (``option``:
    how the user named the place, e.g. ``-o`` or ``--report``; ``action``: ``access`` where it is
    not known whether it was read or written)."""
    reason = WRITE_ERRNOS.get(exc.errno) or (exc.strerror or type(exc).__name__).lower()
    full = exc.errno in {getattr(errno, n, None) for n in ("ENOSPC", "EDQUOT", "EFBIG")}
    return LrcError(f"cannot {action} {os.fspath(place)}: {reason}; "
                    + (f"free some space or choose another {option}" if full else f"choose another {option}"))


def location(exc: BaseException) -> tuple[str | None, str | None]:
    """``(stage, node)`` of an internal error: the compile stage ``note_stage`` recorded, and the
    node a failed rewrite names (``RewriteError``'s ``node``, ``pass_name`` and ``form``)."""
    node = None
    for e in chain(exc):
        if isinstance(getattr(e, "node", None), str) and getattr(e, "pass_name", None):
            node = f"{e.node} ({e.pass_name} pass, {getattr(e, 'form', '?')} form)"
            break
    return stage_of(exc), node


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` of ``exc`` on one line; for a failed rewrite, that of its cause (the node,
    pass and form are named by ``location``)."""
    if getattr(exc, "pass_name", None) and exc.__cause__ is not None:
        exc = exc.__cause__
    try:
        text = " ".join(str(exc).split())
    except Exception:  # noqa: BLE001 - an exception whose message cannot be made
        text = "(its message could not be printed)"
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def details_dir() -> list[Path]:
    """Where internal-error logs go, in order of preference: ``$LRCOMPILE_CACHE_DIR/errors``, else
    ``~/.cache/lrcompile/errors``; then the system's temporary folder (``lrcompile-errors``)."""
    base = os.environ.get("LRCOMPILE_CACHE_DIR")
    first = (Path(base) if base else Path.home() / ".cache" / "lrcompile") / "errors"
    return [first, Path(tempfile.gettempdir()) / "lrcompile-errors"]


def save_details(exc: BaseException, *, command: str | None = None) -> tuple[Path | None, str | None]:
    """Write the full traceback of ``exc`` (with the command line, stage, node and versions) to a
    fresh log file in the first writable folder of ``details_dir()``.

    Returns ``(path, None)``, or ``(None, why)`` when no folder could be written.
    """
    stage, node = location(exc)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    versions = []
    for pkg in ("lrcompile", "onnx", "onnxruntime", "numpy", "onnx-graphsurgeon", "torch", "tensorrt"):
        try:
            versions.append(f"{pkg} {importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    text = "".join([
        f"lrcompile internal error, {time.strftime('%Y-%m-%d %H:%M:%S %z')}\n",
        f"command: {' '.join(sys.argv) if command is None else command}\n",
        f"stage: {stage or '-'}\nnode: {node or '-'}\n",
        f"python {platform.python_version()} on {platform.platform()}\n",
        f"versions: {', '.join(versions)}\n\n",
        *traceback.format_exception(type(exc), exc, exc.__traceback__),
    ])
    why = None
    for folder in details_dir():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(100):
                path = folder / f"lrcompile-{stamp}-{os.getpid()}{f'-{i}' if i else ''}.log"
                try:
                    with open(path, "x", encoding="utf-8") as f:
                        f.write(text)
                    return path, None
                except FileExistsError:
                    continue
        except OSError as e:
            why = f"{folder}: {e.strerror or type(e).__name__}"
    return None, why


def internal_error_line(exc: BaseException, where: str, *, command: str | None = None) -> str:
    """The one line an internal error prints, its traceback saved (``save_details``):
    ``internal error in STAGE on NODE: MESSAGE; details saved to PATH; please report it``.
    ``where``: the stage to name when none was recorded (the command, e.g. ``inspect``)."""
    stage, node = location(exc)
    path, why = save_details(exc, command=command)
    return (f"internal error in {stage or where}" + (f" on {node}" if node else "") + f": {one_line(exc)}; "
            + (f"details saved to {path}" if path else f"details could not be saved ({why})") + "; please report it")
