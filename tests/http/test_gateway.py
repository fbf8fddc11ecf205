"""``jobd-http`` (SPEC §10): a real gateway process in front of a real jobd, checking
bearer JWTs with PyJWT — the one pinned algorithm, ``exp`` required, ``nbf`` checked,
30 s leeway, the user and admin claims, audience and issuer, the header as the only
place for a token — and refusing at start, with one line, settings that cannot work."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from served import Gateway
from served import daemon  # noqa: F401 - the fixture: a jobd for this module

import httpx  # noqa: E402  (after served: skips without the http extra)
import jwt  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, rsa  # noqa: E402

from conftest import Daemon  # noqa: E402
from jobd.config import Http  # noqa: E402
from jobd.http.gateway import SettingError, settings  # noqa: E402

SECRET = b"0123456789abcdef" * 4 + b"-test-secret"


def claims(**extra: Any) -> dict[str, Any]:
    return {"username": "alice", "exp": int(time.time()) + 300, **extra}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(payload: dict[str, Any], alg: str = "none") -> str:
    head = b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    return f"{head}.{b64(json.dumps(payload).encode())}."


def hs256_with(key: bytes, payload: dict[str, Any]) -> str:
    """An HS256 token signed with any bytes, a public key's PEM included (PyJWT refuses to)."""
    signing = unsigned(payload, "HS256").rstrip(".")
    signature = hmac.new(key, signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{b64(signature)}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def hs256(daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A gateway configured by flags, with an HS256 secret; its URL."""
    root = tmp_path_factory.mktemp("hs256")
    (root / "secret").write_bytes(SECRET + b"\n")
    (root / "empty.toml").write_text("")
    with Gateway(root, "--config", str(root / "empty.toml"), "--socket", str(daemon.socket),
                 "--jwt-secret-file", str(root / "secret"), "--algorithm", "HS256") as g:
        yield g.url


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rs256(daemon: Daemon, rsa_key: rsa.RSAPrivateKey,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, bytes]]:
    """A gateway configured by ``[http]`` of a jobd.toml: RS256, audience, issuer, claims of
    its own; (its URL, the public key's PEM)."""
    root = tmp_path_factory.mktemp("rs256")
    pem = rsa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    (root / "jwt.pub").write_bytes(pem)
    (root / "jobd.toml").write_text(f"""
[http]
jwt_public_key_file = "{root / 'jwt.pub'}"
algorithm = "RS256"
user_claim = "sub"
admin_claim = "roles=jobd-admin"
audience = "jobd"
issuer = "https://cidx.example"
""")
    with Gateway(root, "--config", str(root / "jobd.toml"), "--socket",
                 str(daemon.socket)) as g:
        yield g.url, pem


def test_a_valid_token_acts_for_its_user_and_only_them(hs256: str) -> None:
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    submitted = httpx.post(f"{hs256}/api/jobs", json={"type": "steps", "priority": 9},
                           headers=bearer(token))
    assert submitted.status_code == 202, submitted.text
    job = submitted.json()
    assert job["user_id"] == "alice" and job["priority"] == 0
    other = jwt.encode(claims(username="bob"), SECRET, algorithm="HS256")
    foreign = httpx.get(f"{hs256}/api/jobs/{job['id']}", headers=bearer(other))
    assert foreign.status_code == 403
    refused = httpx.get(f"{hs256}/api/admin/jobs/stats", headers=bearer(token))
    assert refused.status_code == 403
    httpx.delete(f"{hs256}/api/jobs/{job['id']}", headers=bearer(token))


def now() -> int:
    return int(time.time())


def _hs256(payload: dict[str, Any], key: bytes = SECRET, alg: str = "HS256") -> str:
    return "Bearer " + jwt.encode(payload, key, algorithm=alg)


#: each made when its test runs: a token made at collection could expire (or start to be
#: valid) before the test, in a long run
BAD_TOKENS: dict[str, Callable[[], str | None]] = {
    "missing": lambda: None,
    "not-bearer": lambda: "Basic YWxpY2U6cGFzcw==",
    "malformed": lambda: "Bearer not.a.jwt",
    "bad-signature": lambda: _hs256(claims(), b"another secret, of 32 bytes or more"),
    "expired": lambda: _hs256(claims(exp=now() - 120)),
    "no-exp": lambda: _hs256({"username": "alice"}),
    "not-yet": lambda: _hs256(claims(nbf=now() + 120)),
    "alg-none": lambda: "Bearer " + unsigned(claims()),
    "wrong-alg": lambda: _hs256(claims(), alg="HS512"),
    "no-user": lambda: _hs256({"exp": now() + 300, "sub": "alice"}),
    "empty-user": lambda: _hs256(claims(username="")),
    "not-an-id": lambda: _hs256(claims(username=" alice")),
    "id-too-long": lambda: _hs256(claims(username="a" * 256)),
}


@pytest.mark.parametrize("name", list(BAD_TOKENS))
def test_a_bad_token_is_401_in_the_one_error_shape(hs256: str, name: str) -> None:
    value = BAD_TOKENS[name]()
    response = httpx.get(f"{hs256}/api/jobs", headers={"Authorization": value} if value else {})

    assert response.status_code == 401, (name, response.text)
    assert response.json()["error"]["code"] == -32001
    assert response.headers["WWW-Authenticate"] == "Bearer"


def test_exp_and_nbf_have_30_seconds_of_leeway(hs256: str) -> None:
    for token in (jwt.encode(claims(exp=now() - 10), SECRET, algorithm="HS256"),
                  jwt.encode(claims(nbf=now() + 10), SECRET, algorithm="HS256")):
        assert httpx.get(f"{hs256}/api/jobs", headers=bearer(token)).status_code == 200


def test_a_token_in_the_url_is_not_read(hs256: str) -> None:
    token = jwt.encode(claims(), SECRET, algorithm="HS256")
    for name in ("token", "access_token", "jwt"):
        response = httpx.get(f"{hs256}/api/jobs", params={name: token})
        assert response.status_code == 401, name


@pytest.mark.parametrize("role", ["admin", ["viewer", "admin"]], ids=["string", "list"])
def test_the_admin_claim_as_a_string_or_in_a_list_makes_an_admin(hs256: str,
                                                                 role: Any) -> None:
    token = jwt.encode(claims(username="ada", role=role), SECRET, algorithm="HS256")
    stats = httpx.get(f"{hs256}/api/admin/jobs/stats", headers=bearer(token))
    assert stats.status_code == 200 and "jobs" in stats.json()
    near = jwt.encode(claims(username="ada", role=["administrator"]), SECRET,
                      algorithm="HS256")
    assert httpx.get(f"{hs256}/api/admin/jobs/stats", headers=bearer(near)).status_code == 403


def test_rs256_from_the_config_file_checks_audience_and_issuer(
        rs256: tuple[str, bytes], rsa_key: rsa.RSAPrivateKey) -> None:
    url, pem = rs256
    good = {"sub": "alice", "exp": now() + 300, "aud": "jobd", "iss": "https://cidx.example"}

    def status(payload: dict[str, Any], key: Any = rsa_key, alg: str = "RS256",
               path: str = "/api/jobs") -> int:
        token = jwt.encode(payload, key, algorithm=alg)
        return httpx.get(url + path, headers=bearer(token)).status_code

    assert status(good) == 200
    assert status({**good, "aud": "another"}) == 401
    assert status({k: v for k, v in good.items() if k != "aud"}) == 401
    assert status({**good, "iss": "https://evil.example"}) == 401
    assert status({**good, "roles": ["jobd-admin"]}, path="/api/admin/jobs/stats") == 200
    assert status(good, path="/api/admin/jobs/stats") == 403
    # the public key used as an HMAC secret: the classic confusion, refused by the pin
    confused = hs256_with(pem, good)
    assert httpx.get(url + "/api/jobs", headers=bearer(confused)).status_code == 401
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert status(good, key=other) == 401


def test_settings_that_cannot_work_are_refused_naming_the_problem(tmp_path: Path) -> None:
    secret, short = tmp_path / "secret", tmp_path / "short"
    secret.write_bytes(SECRET)
    short.write_bytes(b"too short\n")
    private = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "ec.pub").write_bytes(private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    (tmp_path / "ec.key").write_bytes(private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    cases = [
        (Http(), "give exactly one of --jwt-secret-file"),
        (Http(jwt_secret_file=str(secret), jwt_public_key_file=str(tmp_path / "ec.pub")),
         "give exactly one of --jwt-secret-file"),
        (Http(jwt_secret_file=str(secret), algorithm="rs256"),
         "algorithm RS256 does not fit the key"),
        (Http(jwt_public_key_file=str(tmp_path / "ec.pub"), algorithm="RS256"),
         "is for ES256"),
        (Http(jwt_public_key_file=str(tmp_path / "ec.key")), "not a PEM public key"),
        (Http(jwt_secret_file=str(short)), "the HS256 secret has 9 bytes"),
        (Http(jwt_secret_file=str(tmp_path / "nowhere")), "cannot read the key"),
        (Http(jwt_secret_file=str(secret), listen="8095"), "write it HOST:PORT"),
        (Http(jwt_secret_file=str(secret), admin_claim="admin"), "write it CLAIM=VALUE"),
        (Http(jwt_secret_file=str(secret), metrics_listen="9100"),
         "metrics listen '9100': write it HOST:PORT"),
        (Http(jwt_secret_file=str(secret), metrics_listen="127.0.0.1:8095"),
         "is the main address"),
    ]
    for http, message in cases:
        with pytest.raises(SettingError, match=message):
            settings(http)
    assert settings(Http(jwt_public_key_file=str(tmp_path / "ec.pub"))).check.algorithm == "ES256"
    assert settings(Http(jwt_secret_file=str(secret), listen="[::1]:9000")).host == "::1"


def test_jobd_http_refuses_to_start_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(SECRET)
    (tmp_path / "jobd.toml").write_text('[http]\nalgorithm = "ES256"\n')
    proc = subprocess.run([sys.executable, "-m", "jobd.http", "--config",
                           str(tmp_path / "jobd.toml"), "--jwt-secret-file",
                           str(tmp_path / "secret")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"jobd-http: algorithm ES256 does not fit the key: the secret in {tmp_path}/secret "
        "is for HS256; give --algorithm HS256"], proc.stderr
    (tmp_path / "bad.toml").write_text('[http]\nalgorithm = "HS1"\n')
    proc = subprocess.run([sys.executable, "-m", "jobd.http", "--config",
                           str(tmp_path / "bad.toml")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "http.algorithm must be one of" in proc.stderr


def test_jobd_http_will_not_serve_as_an_account_jobd_knows_as_an_admin(
        daemon: Daemon, tmp_path: Path) -> None:
    """Run as root, jobd-http would give each token with the admin claim root's rights
    (any program run as jobd's user): it refuses, unless told it is a machine of one's own."""
    (tmp_path / "secret").write_bytes(SECRET)
    (tmp_path / "empty.toml").write_text("")
    proc = subprocess.run([sys.executable, "-m", "jobd.http", "--config",
                           str(tmp_path / "empty.toml"), "--socket", str(daemon.socket),
                           "--jwt-secret-file", str(tmp_path / "secret"), "--listen",
                           "127.0.0.1:1"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.splitlines()[-1]
    assert last.startswith("jobd-http: jobd knows this account (root) as an admin"), last
    assert "[auth] services" in last and "--allow-admin-account" in last, last
    # a jobd that does not answer cannot say: no serving unchecked (nor an admin's rights)
    from jobd.http.gateway import refusal
    started = time.monotonic()
    why = refusal(str(tmp_path / "nobody.sock"), ask_s=1.0)
    assert why is not None and why.startswith("jobd did not answer within 1 s"), why
    assert 1.0 <= time.monotonic() - started < 5
    # told so, it serves (the module's other gateways run so)
    with Gateway(tmp_path, "--config", str(tmp_path / "empty.toml"), "--socket",
                 str(daemon.socket), "--jwt-secret-file", str(tmp_path / "secret")) as g:
        token = jwt.encode(claims(), SECRET, algorithm="HS256")
        assert httpx.get(g.url + "/api/jobs", headers=bearer(token)).status_code == 200
        # a URL it does not serve is no unknown job (a client would think the job gone)
        nope = httpx.get(g.url + "/api/nope", headers=bearer(token))
        assert nope.status_code == 404 and nope.json()["error"]["code"] == -32601, nope.text


def test_jobd_http_serves_only_as_a_service() -> None:
    """As a plain user it would start, then refuse every signed-in user but that one (a
    user may act only as itself): it says so at its start instead."""
    from jobd.http.gateway import refusal_of
    assert refusal_of({"uid": 998, "user": "cidx", "role": "service"}) is None
    admin = refusal_of({"uid": 0, "user": "root", "role": "admin"})
    assert admin is not None and admin.startswith("jobd knows this account (root) as an admin")
    user = refusal_of({"uid": 1000, "user": "www-data", "role": "user"})
    assert user is not None and "(www-data) as a plain user" in user
    assert "[auth] services" in user


def test_metrics_are_for_admins_and_for_anyone_on_the_metrics_address(
        daemon: Daemon, tmp_path: Path) -> None:
    (tmp_path / "secret").write_bytes(SECRET)
    (tmp_path / "empty.toml").write_text("")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    scraper = f"http://127.0.0.1:{port}"
    with Gateway(tmp_path, "--config", str(tmp_path / "empty.toml"), "--socket",
                 str(daemon.socket), "--jwt-secret-file", str(tmp_path / "secret"),
                 "--metrics-listen", f"127.0.0.1:{port}") as g:
        admin = jwt.encode(claims(role="admin"), SECRET, algorithm="HS256")
        got = httpx.get(f"{g.url}/metrics", headers=bearer(admin))
        assert got.status_code == 200, got.text
        assert got.headers["content-type"].startswith("text/plain; version=0.0.4")
        assert "\njobd_rpc_requests_total{" in got.text
        user = jwt.encode(claims(), SECRET, algorithm="HS256")
        assert httpx.get(f"{g.url}/metrics", headers=bearer(user)).status_code == 403
        assert httpx.get(f"{g.url}/metrics").status_code == 401
        scraped = httpx.get(f"{scraper}/metrics")  # no token: the address is the scraper's
        assert scraped.status_code == 200 and "# TYPE jobd_jobs gauge" in scraped.text
        assert httpx.get(f"{scraper}/api/jobs").status_code == 404  # and nothing else
    # SIGTERM stopped both servers gracefully (uvicorn then re-raises it: -15)
    assert g.proc is not None and g.proc.returncode in (0, -15)
    assert g.stderr.read_text().count("Application shutdown complete.") == 2


def test_a_url_or_method_it_does_not_serve_is_answered_in_the_one_error_shape(
        hs256: str) -> None:
    for method, path, status in (("GET", "/api/nope", 404), ("PUT", "/api/jobs", 405),
                                 ("GET", "/openapi.json", 404)):
        response = httpx.request(method, hs256 + path)
        assert response.status_code == status, (method, path, response.text)
        assert set(response.json()) == {"error"} and response.json()["error"]["message"]


def test_a_stop_waits_for_open_streams_only_a_few_seconds(daemon: Daemon,
                                                          tmp_path: Path) -> None:
    """A stream ends with its job, which may be never (dispatch paused): a SIGTERM must
    still stop jobd-http (it once waited for the job's end)."""
    import signal
    import threading

    from jobd.http.gateway import STOP_GRACE_S
    (tmp_path / "secret").write_bytes(SECRET)
    (tmp_path / "empty.toml").write_text("")
    admin = bearer(jwt.encode(claims(role="admin"), SECRET, algorithm="HS256"))
    with Gateway(tmp_path, "--config", str(tmp_path / "empty.toml"), "--socket",
                 str(daemon.socket), "--jwt-secret-file", str(tmp_path / "secret")) as g:
        assert httpx.post(f"{g.url}/api/admin/pause", headers=admin).status_code == 200
        try:
            job = httpx.post(f"{g.url}/api/jobs", json={"type": "steps"}, headers=admin).json()
            opened = threading.Event()

            def follow() -> None:
                try:
                    with httpx.stream("GET", f"{g.url}/api/jobs/{job['id']}/stream",
                                      headers=admin, timeout=60) as stream:
                        opened.set()
                        for _ in stream.iter_lines():
                            pass
                except httpx.HTTPError:
                    pass
            reader = threading.Thread(target=follow, daemon=True)
            reader.start()
            assert opened.wait(10), "the stream did not open"
            assert g.proc is not None
            started = time.monotonic()
            g.proc.send_signal(signal.SIGTERM)
            g.proc.wait(STOP_GRACE_S + 10)
            assert time.monotonic() - started < STOP_GRACE_S + 5
        finally:
            daemon.raw("admin.resume")
            daemon.raw("jobs.cancel", job_id=job["id"])
