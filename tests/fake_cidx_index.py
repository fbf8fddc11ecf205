"""A stand-in for ``cidx index --progress-json``, printing CIDX's exact lines.

As CIDX's ``emit_progress_json`` (``services/progress_phase_allocator.py``) prints them:
``json.dumps({"current", "total", "info"})`` with the default ``ensure_ascii``, so emoji
are surrogate-pair escapes and other non-ASCII ``\\uXXXX``. Two passes over the work tree's files: hashing (``0/N``
first, then one line per file, then ``N/N``), then embedding (restarting at ``1``, no
``0/N`` line), each line flushed. Between lines it waits ``FAKE_CIDX_DELAY`` seconds, so
a test can watch the progress rise; it writes its arguments and ``VOYAGE_API_KEY`` (as
``index_env`` sets it) to the file ``FAKE_CIDX_RECORD`` names. Other output (a non-JSON
line on stdout, Rich's on stderr) is mixed in, as CIDX's is.
"""

from __future__ import annotations

import json
import os
import sys
import time


def emit(current: int, total: int, info: str) -> None:
    print(json.dumps({"current": current, "total": total, "info": info}), flush=True)


def main() -> int:
    files = sorted(os.path.relpath(os.path.join(top, name), ".")
                   for top, dirs, names in os.walk(".") if ".git" not in top.split(os.sep)
                   for name in names)
    n = len(files)
    delay = float(os.environ.get("FAKE_CIDX_DELAY", "0"))
    record = os.environ.get("FAKE_CIDX_RECORD")
    if record:
        with open(record, "w") as out:
            json.dump({"key": os.environ.get("VOYAGE_API_KEY"), "argv": sys.argv[1:]}, out)
    print("Indexing repository...", flush=True)  # not a JSON line: skipped
    print("\u2139\ufe0f Preparing indexing phase...", file=sys.stderr, flush=True)
    emit(0, n, f"0/{n} files (0%) | 0.0 files/s | 0.0 KB/s | 0 threads | "
               "\U0001f50d Starting hash calculation...")
    for k, name in enumerate(files, 1):
        time.sleep(delay)
        emit(k, n, f"{k}/{n} files ({100 * k // n}%) | 311.4 files/s | 1843.2 KB/s | "
                   f"8 threads | \U0001f50d {name}")
    emit(n, n, f"{n}/{n} files (100%) | 298.0 files/s | 1790.5 KB/s | 8 threads | "
               "\U0001f50d \u2705 Hash calculation complete")
    for k, name in enumerate(files, 1):
        time.sleep(delay)
        emit(k, n, f"{k}/{n} files ({100 * k // n}%) | 5.3 files/s | 31.7 KB/s | 8 threads | "
                   f"\U0001f4ca {name}")
    emit(n, n, f"{n}/{n} files (100%) | 0.0 files/s | 30.9 KB/s | 0 threads | \u2705 Completed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
