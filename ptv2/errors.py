"""The errors ptv2 tells users about, and how: in one line.

Libraries raise exceptions whose message is empty (an `IndexError()`, a pyarrow error on an empty
file), spans many lines (a traceback quoted inside), or is huge (a whole JSON body). Every place
that turns a foreign exception into ptv2's own one-line error goes through `first_line`.
"""

from __future__ import annotations

from collections.abc import Sequence


def first_line(error: BaseException | str, limit: int = 300) -> str:
    """The first non-empty line of `error`'s message (at most `limit` characters), or the
    exception's type name when the message is empty."""
    text = error if isinstance(error, str) else str(error)
    line = next((x.strip() for x in text.splitlines() if x.strip()), "")
    if not line:
        line = type(error).__name__ if isinstance(error, BaseException) else "(no message)"
    return line if len(line) <= limit else line[: limit - 1] + "…"


class JobError(ValueError):
    """A problem with the job itself (its data, settings or model) that no retry can fix; the
    message is one line naming the file and row, the field or the model. Every rank raises it."""


class ArtifactError(ValueError):
    """A prompt artifact that cannot be used (missing, tampered, or for another model)."""


class ServingError(ValueError):
    """A request the served model cannot answer as asked (the caller's mistake)."""


class UnknownPrompt(ServingError):
    def __init__(self, name: str, loaded: Sequence[str]) -> None:
        self.name, self.loaded = name, sorted(loaded)
        shown = ", ".join(self.loaded[:50]) + (" …" if len(self.loaded) > 50 else "")
        super().__init__(f"no prompt {name!r} is loaded; loaded: {shown or 'none'}")


class WrongTask(ServingError):
    pass


class BadInput(ServingError):
    pass


class InputTooLong(BadInput):
    pass
