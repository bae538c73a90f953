"""Errors meant for users: one line each, no traceback (unless FLOWSPEC_DEBUG=1)."""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """One or more one-line messages, shown as they are.

    Args:
        lines: the messages (``FILE: dotted.key: what is wrong (what would be valid)``).
        exit_code: 2 for bad input or usage, 1 for a failure at run time.
    """

    def __init__(self, lines: list[str] | str, exit_code: int = 2):
        self.lines = [lines] if isinstance(lines, str) else list(lines)
        self.exit_code = exit_code
        super().__init__("\n".join(self.lines))


def cut(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters (long keys and values in one-line messages)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters."""
    return cut(repr(value), limit)
