"""What every command module shares: the usage error and option parsing."""

from __future__ import annotations

from typing import Any, Callable


class UsageError(Exception):
    """Arguments that do not go together: one line and exit status 2."""


def option(flag: str, parse: Callable[[str], Any], text: str | None) -> Any:
    """A parsed option value; a value that does not parse is a usage error."""
    if not text:
        return None
    try:
        return parse(text)
    except ValueError as e:
        raise UsageError(f"{flag} {text}: {e}") from None
