"""``jobd-http`` as it runs in production: as a real service account (``useradd`` +
``setpriv``) listed in ``[auth] services``, not as root. jobd then knows it as a service,
so what a web user may do is what ``as_role: "user"`` gives (SPEC §3): their own jobs,
no priority above 0, no admin endpoint, and a web account named like a local admin is
refused; only a token with the admin claim acts ``as_admin``."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from served import WEB_CONFIG, WEB_ENV, Gateway

import httpx  # noqa: E402  (after served: skips without the http extra)
import jwt  # noqa: E402

from conftest import OTHER_UID_PYTHON, Daemon, LocalAccounts, clone, make_upstream  # noqa: E402

SERVICE = "jobdt_httpsvc"
SECRET = b"a secret for the service account's gateway, 32+ bytes"

#: what jobd-http imports from site-packages, uvicorn's protocol modules included
_LIBRARIES = """
import sys, sysconfig, fastapi, uvicorn, jobd.http.gateway
uvicorn.Config(fastapi.FastAPI()).load()
roots = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
tops = set()
for module in list(sys.modules.values()):
    path = getattr(module, "__file__", None) or ""
    for root in roots:
        if path.startswith(root + "/"):
            tops.add(path[len(root) + 1:].split("/")[0])
print("\\n".join(sorted(tops)))
"""


@pytest.fixture(scope="module")
def readable_gateway(readable_jobd: dict[str, str]) -> Iterator[dict[str, str]]:
    """``readable_jobd``'s environment, with the libraries of jobd-http copied into a
    folder of their own that the service account may read."""
    top = Path(tempfile.mkdtemp(prefix="jobd-http-libraries-"))
    found = subprocess.run([sys.executable, "-c", _LIBRARIES], check=True, text=True,
                           capture_output=True).stdout.split()
    site = Path(__import__("fastapi").__file__).parent.parent
    try:
        for name in found:
            source = site / name
            # jobd is readable_jobd's copy; an editable install's finder is not wanted
            if name == "jobd" or name.startswith("__editable__") or not source.exists():
                continue
            # with their bytecode: the service account may write none, and compiling
            # FastAPI and pydantic at every start takes seconds
            if source.is_dir():
                shutil.copytree(source, top / name)
            else:
                shutil.copy2(source, top / name)
        for path in [top, *top.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        yield {**readable_jobd,
               "PYTHONPATH": f"{readable_jobd['PYTHONPATH']}:{top}"}
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture(scope="module")
def service(local_accounts: LocalAccounts) -> str:
    local_accounts.user(SERVICE)
    return SERVICE


@pytest.fixture
def gateway(service: str, readable_gateway: dict[str, str], tmp_path: Path
            ) -> Iterator[tuple[Daemon, str]]:
    config = f'[server]\nsocket_mode = "0666"\n{WEB_CONFIG}\n[auth]\nservices = ["{service}"]\n'
    d = Daemon(tmp_path / "jobd", config, WEB_ENV)
    d.socket.parent.chmod(0o755)
    d.start()
    # the secret where the service account may read it
    shared = Path(tempfile.mkdtemp(prefix="jobd-http-"))
    shared.chmod(0o755)
    (shared / "secret").write_bytes(SECRET)
    (shared / "secret").chmod(0o644)
    (shared / "jobd.toml").write_text(f'[http]\njwt_secret_file = "{shared / "secret"}"\n')
    (shared / "jobd.toml").chmod(0o644)
    g = Gateway(tmp_path, "--config", str(shared / "jobd.toml"), "--socket", str(d.socket),
                as_admin_account=False)
    g.argv = ["setpriv", f"--reuid={service}", f"--regid={service}", "--init-groups", "--",
              OTHER_UID_PYTHON, *g.argv[1:]]
    g.env = {"PATH": "/usr/bin:/bin", "HOME": "/", **readable_gateway}
    try:
        with g:
            yield d, g.url
    finally:
        shutil.rmtree(shared, ignore_errors=True)
        assert d.stop() == 0


def token(user: str, **extra: Any) -> dict[str, str]:
    claims = {"username": user, "exp": int(time.time()) + 300, **extra}
    return {"Authorization": f"Bearer {jwt.encode(claims, SECRET, algorithm='HS256')}"}


@pytest.mark.root
def test_a_web_user_through_the_service_account_has_a_plain_users_rights(
        gateway: tuple[Daemon, str], tmp_path: Path) -> None:
    d, url = gateway
    clone(make_upstream(tmp_path / "upstream"), d.repos / "alice" / "proj")
    with httpx.Client(base_url=url, timeout=30) as web:
        assert web.get("/api/jobs", headers=token("alice")).status_code == 200
        job_id = web.post("/api/sync", json={"projectId": "proj"},
                          headers=token("alice")).json()["jobId"]
        steps = web.post("/api/jobs", json={"type": "steps", "priority": 20},
                         headers=token("alice"))
        assert steps.status_code == 202 and steps.json()["priority"] == 0

        events = web.get(f"/api/jobs/{job_id}/events", headers=token("alice")).json()
        assert events[0]["actor"] == f"service:{SERVICE}", events
        assert web.get(f"/api/jobs/{job_id}", headers=token("bob")).status_code == 403
        assert web.get("/api/admin/jobs/stats", headers=token("alice")).status_code == 403
        # a web account named like a local admin is not that admin
        root = web.get("/api/jobs", headers=token("root"))
        assert root.status_code == 403 and root.json()["error"]["field"] == "as_user"
        # the admin claim: the service acts as_admin, for one of the web server's admins
        admin = token("ada", role="admin")
        assert web.get("/api/admin/jobs/stats", headers=admin).status_code == 200
        assert web.get(f"/api/jobs/{job_id}", headers=admin).status_code == 200
        web.delete(f"/api/jobs/{steps.json()['id']}", headers=token("alice"))
