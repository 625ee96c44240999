"""How an error is told to a user: in one line.

Libraries raise exceptions whose message is empty (an `IndexError()`, a pyarrow error on an empty
file), spans many lines (a traceback quoted inside), or is huge (a whole JSON body). Every place
that turns a foreign exception into ptv2's own one-line error goes through `first_line`.
"""

from __future__ import annotations


def first_line(error: BaseException | str, limit: int = 300) -> str:
    """The first non-empty line of `error`'s message (at most `limit` characters), or the
    exception's type name when the message is empty."""
    text = error if isinstance(error, str) else str(error)
    line = next((x.strip() for x in text.splitlines() if x.strip()), "")
    if not line:
        line = type(error).__name__ if isinstance(error, BaseException) else "(no message)"
    return line if len(line) <= limit else line[: limit - 1] + "…"
