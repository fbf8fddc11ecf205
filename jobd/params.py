"""Checks of the values a client sends (SPEC §3a): one typed checker per kind of value.

Each returns the value as jobd goes on to use it, or raises ``InvalidParams`` naming the
field, what it must be, and what was sent (quoted short, however big or deep the value).
Booleans are never integers here: JSON's ``true`` is not ``1``.
"""

from __future__ import annotations

import math
import reprlib
from typing import Any

from jobd.errors import InvalidParams
from jobd.models import from_iso

__all__ = ["flag", "integer", "iso_time", "number", "shown", "text", "utf8"]

#: a client's value as an error message quotes it
_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlong = 3, 60, 60, 40


def shown(value: Any) -> str:
    """``value`` as an error message quotes it: short, and encodable (repr escapes lone
    surrogates)."""
    return _SHOWN.repr(value)


def _span(low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f" from {_shown_number(low)} to {_shown_number(high)}"
    if low is not None:
        return f" of at least {_shown_number(low)}"
    return "" if high is None else f" of at most {_shown_number(high)}"


def _shown_number(bound: float) -> str:
    """A bound as a person reads it: an integer in full (1048576, not 1.04858e+06)."""
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def integer(value: Any, field: str, low: int | None = None, high: int | None = None,
            hint: str = "") -> int:
    """An integer in ``low`` … ``high`` (None: unbounded on that side); ``hint`` follows
    the rule in the message (what the number means)."""
    if (isinstance(value, bool) or not isinstance(value, int)
            or (low is not None and value < low) or (high is not None and value > high)):
        raise InvalidParams(f"{field} must be an integer{_span(low, high)}{hint} "
                            f"(got {shown(value)})", field=field)
    return value


def number(value: Any, field: str, low: float, high: float | None, hint: str = "") -> float:
    """A finite number (integer or not) in ``low`` … ``high`` (None: no upper bound)."""
    result = math.nan
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            result = float(value)
        except OverflowError:  # an integer past any float
            result = math.inf
    if not (math.isfinite(result) and low <= result and (high is None or result <= high)):
        raise InvalidParams(f"{field} must be a number{_span(low, high)}{hint} "
                            f"(got {shown(value)})", field=field)
    return result


def flag(value: Any, field: str) -> bool:
    """``true`` or ``false``, nothing else (not 0, 1 or "yes")."""
    if not isinstance(value, bool):
        raise InvalidParams(f"{field} must be true or false (got {shown(value)})", field=field)
    return value


def utf8(value: str, field: str) -> bytes:
    """``value`` as UTF-8; a lone surrogate (a ``\\ud800`` escape) is refused naming ``field``."""
    try:
        return value.encode()
    except UnicodeEncodeError:
        raise InvalidParams(f"{field} is not valid Unicode: it holds a lone surrogate (such as "
                            "\\ud800); send UTF-8 text", field=field) from None


def text(value: Any, field: str, *, max_chars: int | None = None,
         max_bytes: int | None = None, min_chars: int = 0) -> str:
    """A string of ``min_chars`` … ``max_chars`` characters and at most ``max_bytes`` as
    UTF-8, valid Unicode."""
    ok = isinstance(value, str) and len(value) >= min_chars and (
        max_chars is None or len(value) <= max_chars) and (
        max_bytes is None or len(value) <= max_bytes)
    if ok and max_bytes is not None:
        ok = len(utf8(value, field)) <= max_bytes
    if not ok:
        if max_bytes is not None:
            size = f"{max_bytes // 1024} KiB" if max_bytes % 1024 == 0 else f"{max_bytes} bytes"
            rule = f"text of at most {size} as UTF-8"
        elif min_chars:
            rule = f"{min_chars} to {max_chars} characters"
        else:
            rule = f"text of at most {max_chars} characters"
        raise InvalidParams(f"{field} must be {rule} (got {shown(value)})", field=field)
    utf8(value, field)
    return value


def iso_time(value: Any, field: str) -> int | None:
    """An ISO 8601 time as microseconds since the epoch (None stays None)."""
    if value is None:
        return None
    try:
        return from_iso(value)
    except (TypeError, ValueError, AttributeError):
        raise InvalidParams(f"{field} must be an ISO 8601 time like 2026-11-22T10:00:00Z "
                            f"(got {shown(value)})", field=field) from None
