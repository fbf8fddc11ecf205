"""The ``http`` extra is optional (SPEC §10): the daemon, the client and jobctl import
none of FastAPI, uvicorn, PyJWT or pydantic, and run where they are not installed; the
daemon takes an ``[http]`` section without importing anything for it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import Daemon

WEB_MODULES = ("fastapi", "starlette", "uvicorn", "jwt", "pydantic", "httpx")
ROOT = Path(__file__).resolve().parent.parent.parent


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def test_the_daemon_client_and_jobctl_work_with_the_web_libraries_unimportable() -> None:
    # None in sys.modules makes `import fastapi` raise ImportError, as if not installed
    blocked = "; ".join(f"sys.modules[{m!r}] = None" for m in WEB_MODULES)
    proc = _python(f"import sys; {blocked}; import jobd.daemon, jobd.client, jobd.cli, "
                   "jobctl.cli; print('ok')")
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_importing_the_daemon_and_client_loads_no_web_library() -> None:
    proc = _python("import sys, jobd.daemon, jobd.client, jobd.cli, jobctl.cli; "
                   f"print(sorted(m for m in {WEB_MODULES!r} if m in sys.modules))")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", f"the daemon side imported {proc.stdout.strip()}"


def test_the_daemon_checks_and_ignores_the_http_section(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "ok", '[http]\nlisten = "127.0.0.1:9000"\nalgorithm = "RS256"\n'
               'jwt_public_key_file = "/etc/jobd/jwt.pub"\n').start()
    try:
        assert d.raw("ping")["result"]["version"]
    finally:
        assert d.stop() == 0
    bad = Daemon(tmp_path / "bad", '[http]\nlisten = 8095\n')
    proc = subprocess.run(bad.argv()[:-1] + ["config", "check"], capture_output=True,
                          text=True, env=bad.env, timeout=60)
    assert proc.returncode == 1, proc
    assert "http.listen must be a string" in proc.stderr, proc.stderr


def test_jobd_http_without_the_extra_says_how_to_install_it() -> None:
    blocked = "; ".join(f"sys.modules[{m!r}] = None" for m in WEB_MODULES)
    proc = _python(f"import sys; {blocked}; import jobd.http")
    assert proc.returncode == 1
    last = proc.stderr.splitlines()[-1]
    m = re.fullmatch(r"ModuleNotFoundError: jobd\.http needs (\w+), which is not installed: "
                     r"pip install 'jobd\[http\]'", last)
    assert m and m.group(1) in WEB_MODULES, proc.stderr
