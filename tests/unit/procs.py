"""/proc helpers for tests of job processes: a process's state, a process group's members."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable


def state_and_group(pid: int) -> tuple[str, int] | None:
    """(state, process group) of a process from /proc, None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return None
    fields = raw[raw.rindex(b")") + 2:].split()
    return fields[0].decode(), int(fields[2])


def group(pgid: int, *, zombies: bool = True) -> list[int]:
    """Every process in /proc whose process group is ``pgid``."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and (stat := state_and_group(int(name))) and stat[1] == pgid:
            if zombies or stat[0] != "Z":
                found.append(int(name))
    return found


def alive(pid: int) -> bool:
    stat = state_and_group(pid)
    return stat is not None and stat[0] != "Z"


def wait_for(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    until = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < until, "condition not reached in time"
        time.sleep(0.005)
