"""The dashboard of ``jobd-http`` (SPEC §10) as HTTP sees it: ``GET /`` serves the page
without a token, every file it loads comes from the same gateway (no CDN), the headers
keep it to its own scripts and calls, and the wheel ships its files.

Also what the browser tests share: a jobd with a slow job type that prints progress, a
real ``jobd-http`` with an HS256 secret, and tokens minted for its users.
"""

from __future__ import annotations

import json
import sys
import time
import zipfile
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator

import pytest

from served import Gateway, WEB_CONFIG, WEB_ENV

import httpx  # noqa: E402  (after served: skips without the http extra)
import jwt  # noqa: E402

from conftest import Daemon  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SECRET = b"dashboard-test-secret-" + b"0123456789abcdef" * 2
#: a job of a minute, 1 % every 0.6 s: long enough to watch its bar move and cancel it
#: (no braces: in a [types] argv they are jobd's placeholders)
CRAWL = ("import json, time\n"
         "for k in range(1, 101):\n"
         "    print(json.dumps(dict(progress=k, message='page %d of 100' % k)), flush=True)\n"
         "    time.sleep(0.6)\n")
#: JSON strings are TOML strings
DASHBOARD_CONFIG = WEB_CONFIG + f"""
[types.crawl]
argv = {json.dumps([sys.executable, "-c", CRAWL])}
roles = ["user", "service", "admin"]
project = "optional"
"""


def token(user: str, admin: bool = False) -> str:
    """A token the gateway accepts for ``user``, for ten minutes."""
    claims = {"username": user, "exp": int(time.time()) + 600,
              **({"role": "admin"} if admin else {})}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def bearer(user: str, admin: bool = False) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(user, admin)}"}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("jobd"), DASHBOARD_CONFIG, WEB_ENV).start()
    yield d
    assert d.stop() == 0


@pytest.fixture(scope="module")
def gateway(daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """A real ``jobd-http`` in front of ``daemon``, checking HS256 tokens."""
    root = tmp_path_factory.mktemp("gateway")
    (root / "secret").write_bytes(SECRET + b"\n")
    (root / "empty.toml").write_text("")
    with Gateway(root, "--config", str(root / "empty.toml"), "--socket", str(daemon.socket),
                 "--jwt-secret-file", str(root / "secret"), "--algorithm", "HS256") as g:
        yield g


class _Loads(HTMLParser):
    """The URLs a page loads: scripts, style sheets, images, frames."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline_scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "script":
            if a.get("src"):
                self.urls.append(a["src"] or "")
            else:
                self.inline_scripts += 1
        elif tag == "link" and a.get("href"):
            self.urls.append(a["href"] or "")
        elif tag in ("img", "iframe", "source") and a.get("src"):
            self.urls.append(a["src"] or "")


def test_the_page_loads_without_a_token_and_only_from_the_gateway(gateway: Gateway) -> None:
    with httpx.Client(base_url=gateway.url, timeout=10) as web:
        assert web.get("/api/jobs").status_code == 401, "the API needs a token"
        page = web.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp, csp
        assert "connect-src 'self'" in csp and "frame-ancestors 'none'" in csp, csp
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["referrer-policy"] == "no-referrer"

        loads = _Loads()
        loads.feed(page.text)
        assert loads.inline_scripts == 0, "an inline script, which the policy refuses"
        kinds = {}
        for url in loads.urls:
            assert "//" not in url and not url.startswith("/"), \
                f"{url}: the page loads only its own files, relative to where it is served"
            asset = web.get("/" + url)
            assert asset.status_code == 200, url
            kinds[url.rsplit(".", 1)[-1]] = asset.headers["content-type"]
            assert "http://" not in asset.text and "https://" not in asset.text, url
        assert kinds["js"].startswith("text/javascript") and kinds["css"].startswith("text/css")
        # an uptime probe's HEAD, or `curl -I`: the page's and a file's headers, no body
        for path in ("/", "/static/dashboard.js"):
            head = web.head(path)
            assert head.status_code == 200 and head.content == b"", path
            assert head.headers["content-type"] == web.get(path).headers["content-type"]


def test_the_page_reads_the_token_from_a_field_and_never_puts_it_in_a_url(
        gateway: Gateway) -> None:
    with httpx.Client(base_url=gateway.url, timeout=10) as web:
        page = web.get("/").text
        script = web.get("/static/dashboard.js").text
    assert 'type="password"' in page and '<label for="token">' in page
    assert "sessionStorage" in script and "localStorage" not in script
    assert "new EventSource" not in script, "EventSource can carry a token only in the URL"
    assert "Authorization" in script


def test_an_unknown_file_is_404_and_names_no_file_outside_static(gateway: Gateway) -> None:
    with httpx.Client(base_url=gateway.url, timeout=10) as web:
        for path in ("/static/nothing.js", "/static/..%2Fdashboard.py", "/static/%2e%2e%2fapi.py",
                     "/static/__init__.py"):
            r = web.get(path)
            assert r.status_code == 404, (path, r.status_code)
            assert "import" not in r.text, path


def test_the_wheel_ships_the_dashboard(wheel: Path) -> None:
    shipped = set(zipfile.ZipFile(wheel).namelist())
    wanted = {f"jobd/http/static/{p.name}" for p in (ROOT / "jobd/http/static").iterdir()}
    assert {"jobd/http/static/index.html", "jobd/http/static/dashboard.js"} <= wanted
    assert wanted <= shipped, f"not in the wheel: {sorted(wanted - shipped)}"
