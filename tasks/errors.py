"""Errors said in one line: what the project prints where a traceback would bury the cause."""

from __future__ import annotations


def message_line(e: BaseException) -> str:
    """The first line of ``e``'s message, stripped; '' when it has none."""
    lines = str(e).strip().splitlines()
    return lines[0].strip() if lines else ""


def first_line(e: BaseException) -> str:
    """'TypeName: first line of the message', or 'TypeName' alone when it has none."""
    line = message_line(e)
    return f"{type(e).__name__}: {line}" if line else type(e).__name__
