"""Errors a user can cause. Each renders as one line that says what to change.

Internal invariants are asserts; only these classes reach the CLI, which
prints `str(error)` and exits 2.
"""

from __future__ import annotations


def one_line(text: str) -> str:
    """`text` with line breaks and other unprintable characters escaped (\\n, \\x00, \\u2028)."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


class MlagenError(Exception):
    """Base of every user-facing error."""


class SpecError(MlagenError):
    """A spec file that cannot be used, located at file:line and field."""

    def __init__(
        self, message: str, *, source: str = "<spec>", line: int | None = None, field: str | None = None
    ):
        self.message = message
        self.source = source
        self.line = line
        self.field = field
        super().__init__(self.render())

    def render(self) -> str:
        # The path and the field name come from the user; escape them so the message stays one line.
        source = one_line(self.source)
        where = source if self.line is None else f"{source}:{self.line}"
        field = self.field if self.field is None or self.field.isprintable() else ascii(self.field)
        what = f"{field}: " if field else ""
        return f"{where}: {what}{self.message}"


class ShapeError(MlagenError):
    """An IR edge whose shape or dtype breaks a rule; names the spec field behind it."""


class GenerateError(MlagenError):
    """Generation could not complete (missing templates, unwritable output)."""
