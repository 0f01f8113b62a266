"""The one error type users see: its message is the single line the CLI prints."""

from __future__ import annotations

from pathlib import Path


class VqtoolError(Exception):
    """A problem with the user's input or environment, stated in one line."""

    exit_code = 1

    def __init__(self, message: str, path: Path | str | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.reason = message  # without the path: what a skip report lists beside the file
        super().__init__(f"{path}: {message}" if path is not None else message)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none: a library's own words
    fit inside our one-line error that way."""
    text = str(exc)
    return text.splitlines()[0] if text.strip() else type(exc).__name__


def missing_extra(what: str, module: str, extra: str) -> VqtoolError:
    """The one sentence for an optional dependency that is not installed."""
    return VqtoolError(f"{what} needs {module}, which is not installed: pip install 'vqtool[{extra}]'")
