"""The one root of user-facing errors. No dependencies: every package (cache_format and ops included) imports it.

Contract: ``str(err)`` is ONE line naming what is wrong and where (file, line, sample id, field), so a command can
print ``error: <message>`` and exit 2 without a traceback (:func:`vlsi.common.cli.user_errors`). Anything that is
not a ``VlsiError`` is a bug and keeps its traceback.
"""

from __future__ import annotations

import re

__all__ = ["VlsiError", "ConfigError", "one_line"]


def one_line(text: str) -> str:
    """``text`` with line breaks folded: reasons often embed lower-level messages that span lines."""
    return re.sub(r"\s*[\r\n]+\s*", " ", str(text)).strip()


class VlsiError(Exception):
    """Base of every user-facing vlsi error; ``str(err)`` is a single line."""

    def __init__(self, message: str = "") -> None:
        super().__init__(one_line(message))


class ConfigError(VlsiError):
    """A bad option value, option combination or config file (one line naming the option)."""
