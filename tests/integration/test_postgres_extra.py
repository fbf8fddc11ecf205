"""The ``postgres`` extra is optional (SPEC §11): the daemon, the client and jobctl run
where psycopg is not installed, and a daemon not configured for PostgreSQL loads
neither psycopg nor libpq where it is."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pg
from conftest import Daemon

PG_MODULES = ("psycopg", "psycopg_pool", "psycopg_binary", "psycopg_c")
ROOT = Path(__file__).resolve().parent.parent.parent


def test_the_daemon_client_and_jobctl_import_with_psycopg_unimportable() -> None:
    # None in sys.modules makes `import psycopg` raise ImportError, as if not installed
    blocked = "; ".join(f"sys.modules[{m!r}] = None" for m in PG_MODULES)
    proc = subprocess.run(
        [sys.executable, "-c", f"import sys; {blocked}; import jobd.daemon, jobd.client, "
         "jobd.cli, jobd.store, jobctl.cli; print('ok')"],
        capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_a_running_daemon_has_loaded_neither_psycopg_nor_libpq(
        make_daemon: Callable[..., Daemon]) -> None:
    if importlib.util.find_spec("psycopg") is None:
        pg.unavailable("psycopg is not installed: pip install -e '.[test,postgres]'")
    d = make_daemon()
    assert d.proc is not None
    d.client().submit("noop")
    # what the process has mapped: libpq.so (pure-Python psycopg loads it with ctypes)
    # or psycopg_binary's modules and bundled libpq
    maps = Path(f"/proc/{d.proc.pid}/maps").read_text()
    loaded = sorted({line.split()[-1] for line in maps.splitlines()
                     if "libpq" in line or "psycopg" in line})
    assert loaded == [], f"the daemon loaded {loaded}"
    assert "libc.so" in maps  # the check reads the daemon's real mappings
