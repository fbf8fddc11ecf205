"""Progress lines (SPEC §5): what a line of a program's output says about its progress.

Pure parsing, no I/O: ``Lines`` cuts a stream of output into lines the way progress is
read (on ``\\r`` as well as ``\\n``: git redraws its progress with ``\\r``),
``parse_progress`` reads one line in the three forms a program may print, and
``parse_result`` a program's ``{"result": {...}}`` line. ``Passes`` turns the counts of
an indexer that goes over the files more than once into one rising progress.
``jobd.process`` feeds them what its programs write.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Callable, NamedTuple

__all__ = ["MAX_LINE", "MAX_RESULT", "Counts", "Lines", "Passes", "is_result_line",
           "parse_progress", "parse_result"]

#: the longest ``{"result": ...}`` line taken as a job's result, in bytes
MAX_RESULT = 65536
#: a longer unterminated line keeps only its tail for progress parsing
MAX_LINE = MAX_RESULT + 1024
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
        """The lines ``data`` completes; the unfinished rest is kept (its first
        ``MAX_LINE`` bytes, so a line's kind still shows however it was split into reads)
        for the next call, or read as it is at the stream's end."""
        parts = _EOL.split(self.partial + data)
        self.partial = parts.pop()[:MAX_LINE]
        return parts


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _clamp(percent: float) -> float:
    return min(100.0, max(0.0, percent))


class Counts(NamedTuple):
    """What a ``{"current": n, "total": m}`` line counts (``pass``: its own "pass": k)."""

    current: float
    total: float
    pass_number: int | None


def parse_progress(line: str) -> tuple[float | None, str | None, Counts | None] | None:
    """One output line -> (percent 0-100 or None, message or None, its counts or None), or
    None if not progress.

    Forms: ``{"current": n, "total": m, "info": "..."}`` (percent None when total is 0;
    it may say ``"pass": k``), ``{"progress": 42.5, "message": "..."}``, or text ending
    in ``NN%``/``NN.N%``, which may be followed by git's count, throughput and ``,
    done.``; the message of a text line is the whole stripped line.
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
            k = obj.get("pass")
            counts = Counts(current, total, k if isinstance(k, int) and not isinstance(
                k, bool) and k >= 1 else None)
            return (_clamp(100.0 * current / total) if total else None), message, counts
        progress = _number(obj.get("progress"))
        if progress is not None:
            return _clamp(progress), message, None
        return None
    # what may follow the percentage holds no '%', so only the last one can qualify
    at = text.rfind("%")
    if at < 0 or not _AFTER_PERCENT.fullmatch(text, at + 1):
        return None
    number = _BEFORE_PERCENT.search(text, max(0, at - 32), at)
    if number is None or float(number.group()) > 100:
        return None
    return float(number.group()), text, None


#: how a result line begins, JSON's whitespace allowed: ``{ "result" : ...``
_RESULT_LINE = re.compile(rb'\s*\{\s*"result"\s*:')


def is_result_line(line: bytes) -> bool:
    """Whether ``line`` is meant as a ``{"result": ...}`` line (``parse_result`` says
    whether it is a valid one)."""
    return _RESULT_LINE.match(line) is not None


def parse_result(line: bytes) -> dict[str, Any] | None:
    """A ``{"result": {...}}`` line's object (at most ``MAX_RESULT`` bytes), else None."""
    text = line.strip()
    if not is_result_line(text) or len(text) > MAX_RESULT:
        return None
    try:
        obj = json.loads(text, parse_constant=_not_json, parse_float=_finite_float)
    except ValueError:  # not JSON (NaN, Infinity and 1e999 are not either), or not UTF-8
        return None
    if isinstance(obj, dict) and len(obj) == 1 and isinstance(obj.get("result"), dict):
        return obj["result"]
    return None


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is past a float's range")
    return value


class Passes:
    """An ``on_progress`` callback for an indexer that counts ``current`` of ``total``
    files, perhaps over them more than once (SPEC §5: CIDX hashes every file, then embeds
    every file).

    A ``current`` below the one before, or a ``"pass": k``, starts the next pass; a
    changed ``total`` alone rescales the pass. With ``passes`` = N the whole (0-100,
    handed to ``report``) is split into N equal parts and pass k fills part k; a pass
    beyond N fills what is left of the last part from where it stands. What it reports
    never goes down, and its message names the pass (``pass 2/2: ...``) when there may be
    more than one. ``total`` is the last total counted (the files indexed).
    """

    def __init__(self, report: Callable[[float | None, str | None], None],
                 passes: int = 1) -> None:
        self.report = report
        self.passes = passes
        self.number = 1  #: the pass being counted
        self.total: float | None = None
        self._current: float | None = None
        self._base = 0.0  #: where this pass started, 0-1 of the whole
        self._share = 1.0 / passes  #: what this pass may fill, 0-1 of the whole
        self._done = 0.0  #: the most reported, 0-1 of the whole

    def __call__(self, percent: float | None, message: str | None) -> None:
        """A line without counts (a percentage): reported as it is, never lower."""
        if percent is not None:
            self._done = max(self._done, percent / 100.0)
            percent = 100.0 * self._done
        self.report(percent, message)

    def count(self, counts: Counts, message: str | None) -> None:
        """One ``{"current", "total"}`` line."""
        current, total, k = counts
        if k is not None and k > self.number:
            self._start(k)
        elif k is None and self._current is not None and current < self._current:
            self._start(self.number + 1)
        self._current, self.total = current, total
        if message is not None and (self.passes > 1 or self.number > 1):
            shown = f"{self.number}/{self.passes}" if self.number <= self.passes else (
                f"{self.number}")
            message = f"pass {shown}: {message}"
        if not total:
            self.report(None, message)
            return
        fraction = min(max(current / total, 0.0), 1.0)
        self._done = max(self._done, self._base + self._share * fraction)
        self.report(100.0 * self._done, message)

    def _start(self, number: int) -> None:
        self.number = number
        if number <= self.passes:
            self._base = (number - 1) / self.passes
            self._share = 1.0 / self.passes
        else:  # more passes than said: fill what is left from where it stands
            self._base = self._done
            self._share = 1.0 - self._done
