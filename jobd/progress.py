"""Progress lines (SPEC §5): what a line of a program's output says about its progress.

Pure parsing, no I/O: ``Lines`` cuts a stream of output into lines the way progress is
read (on ``\\r`` as well as ``\\n``: git redraws its progress with ``\\r``), and
``parse_progress`` reads one line in the three forms a program may print.
``jobd.process`` feeds them what its programs write.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

__all__ = ["MAX_LINE", "Lines", "parse_progress"]

#: a longer unterminated line keeps only its tail for progress parsing
MAX_LINE = 16384
_EOL = re.compile(rb"[\r\n]")

# Text progress: a percentage that ends the line, or is followed only by what git adds:
# "Receiving objects:  45% (45/100), 1.00 MiB | 2.00 MiB/s, done."
_UNIT = r"[\d.]+\s*(?:bytes|[KMGTP]?i?B)"
_BEFORE_PERCENT = re.compile(r"(?<![\d.])\d{1,3}(?:\.\d+)?$")
_AFTER_PERCENT = re.compile(
    rf"(?:\s*\(\d+/\d+\))?(?:,\s*{_UNIT}\s*\|\s*{_UNIT}/s)?(?:,\s*done\.?)?\s*")


class Lines:
    """Splits a stream into lines on both \\r and \\n (git redraws its progress with \\r)."""

    __slots__ = ("partial",)

    def __init__(self) -> None:
        self.partial = b""

    def feed(self, data: bytes) -> list[bytes]:
        """The lines ``data`` completes; the unfinished rest is kept (its last
        ``MAX_LINE`` bytes) for the next call, or read as it is at the stream's end."""
        parts = _EOL.split(self.partial + data)
        self.partial = parts.pop()[-MAX_LINE:]
        return parts


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _clamp(percent: float) -> float:
    return min(100.0, max(0.0, percent))


def parse_progress(line: str) -> tuple[float | None, str | None] | None:
    """One output line -> (percent 0-100 or None, message or None), or None if not progress.

    Forms: ``{"current": n, "total": m, "info": "..."}`` (percent None when total is 0),
    ``{"progress": 42.5, "message": "..."}``, or text ending in ``NN%``/``NN.N%``, which
    may be followed by git's count, throughput and ``, done.``; the message of a text
    line is the whole stripped line.
    """
    text = line.strip()
    if text.startswith("{") and text.endswith("}"):
        try:
            obj = json.loads(text)
        except ValueError:
            return None
        if not isinstance(obj, dict):
            return None
        info = obj.get("info", obj.get("message"))
        message = info if isinstance(info, str) else None
        current, total = _number(obj.get("current")), _number(obj.get("total"))
        if current is not None and total is not None:
            return (_clamp(100.0 * current / total) if total else None), message
        progress = _number(obj.get("progress"))
        if progress is not None:
            return _clamp(progress), message
        return None
    # what may follow the percentage holds no '%', so only the last one can qualify
    at = text.rfind("%")
    if at < 0 or not _AFTER_PERCENT.fullmatch(text, at + 1):
        return None
    number = _BEFORE_PERCENT.search(text, max(0, at - 32), at)
    if number is None or float(number.group()) > 100:
        return None
    return float(number.group()), text
