"""``jobd-http``: the router served alone by uvicorn, checking JWTs itself (SPEC §10).

This module owns the gateway's settings (flags over ``[http]`` of jobd.toml), loading
the verification key and pinning the one algorithm that key is for, turning an
``Authorization: Bearer`` token into a ``Principal``, and running uvicorn. A setting
that cannot work (no key, two keys, an algorithm the key is not for, a bad address)
stops it at start with one line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Callable

import click
import jwt
import uvicorn
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from fastapi import FastAPI, Header, HTTPException, Request, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

import structlog

from jobd import logs
from jobd.client import Client
from jobd.config import ConfigError, Http, load
from jobd.http import dashboard
from jobd.auth import check_id
from jobd.errors import InvalidParams, JobdError, Unavailable, Unreachable
from jobd.http.api import Principal, failure, metrics_router, router

__all__ = ["Gateway", "TokenCheck", "app", "main", "metrics_app", "serve"]

#: how far a token's exp and nbf may be off the gateway's clock
LEEWAY_S = 30
#: how long a stop waits for open requests (streams) before closing them
STOP_GRACE_S = 5
#: RFC 7518 §3.2: an HS256 key must be at least as long as the hash
_MIN_SECRET_BYTES = 32


class SettingError(Exception):
    """A gateway setting that cannot work; the message is the one line shown."""


# eq=False: FastAPI keys its dependency cache by the dependency, so it hashes by identity
@dataclasses.dataclass(frozen=True, eq=False)
class TokenCheck:
    """Verifies a bearer token and reads who it names; the FastAPI dependency of the gateway."""

    key: Any
    algorithm: str
    user_claim: str = "username"
    #: (claim, value): an admin's token has the claim equal to the value, or a list holding it
    admin_claim: tuple[str, str] = ("role", "admin")
    audience: str | None = None
    issuer: str | None = None

    def principal(self, token: str) -> Principal:
        """The Principal ``token`` names; HTTPException 401 saying why when it names none."""
        try:
            claims = jwt.decode(token, self.key, algorithms=[self.algorithm],
                                audience=self.audience, issuer=self.issuer, leeway=LEEWAY_S,
                                options={"require": ["exp"],
                                         "verify_aud": self.audience is not None})
        except jwt.InvalidTokenError as e:
            raise _refused(f"the bearer token was refused: {e}") from None
        user = claims.get(self.user_claim)
        if not isinstance(user, str) or not user:
            raise _refused(f"the bearer token has no {self.user_claim!r} claim naming the user")
        try:
            check_id(user, self.user_claim)
        except InvalidParams as e:  # a token naming nobody jobd could know is no sign-in
            raise _refused(f"the bearer token's {e.message}") from None
        name, value = self.admin_claim
        held = claims.get(name)
        admin = held == value or (isinstance(held, list) and value in held)
        return Principal(user, admin=admin)

    def __call__(self, authorization: str | None = Header(None)) -> Principal:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _refused("send the token as `Authorization: Bearer <JWT>`")
        return self.principal(token.strip())


def _refused(message: str) -> HTTPException:
    return HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})


@dataclasses.dataclass(frozen=True)
class Gateway:
    """What ``jobd-http`` runs: where it listens, whom it trusts, which jobd it fronts."""

    host: str
    port: int
    check: TokenCheck
    socket: str | None = None
    #: (host, port) serving GET /metrics to anyone who reaches it, or None
    metrics: tuple[str, int] | None = None


def settings(http: Http, socket: str | None = None) -> Gateway:
    """The Gateway that ``http`` (the ``[http]`` section with the flags laid over it)
    describes; SettingError naming the setting when it cannot work."""
    key, kind = _key(http)
    algorithm = (http.algorithm or kind).upper()
    if algorithm != kind:
        raise SettingError(f"algorithm {algorithm} does not fit the key: "
                           f"{_described(http)} is for {kind}; give --algorithm {kind}")
    name, sep, value = http.admin_claim.partition("=")
    if not sep or not name or not value:
        raise SettingError(f"admin claim {http.admin_claim!r}: write it CLAIM=VALUE, "
                           "e.g. role=admin")
    if not http.user_claim:
        raise SettingError("user claim: name the claim that holds the user, e.g. username")
    host, port = _listen(http.listen)
    metrics = _listen(http.metrics_listen, "metrics listen") if http.metrics_listen else None
    if metrics == (host, port):
        raise SettingError(f"metrics listen {http.metrics_listen!r} is the main address; "
                           "give the scraper an address of its own")
    check = TokenCheck(key, algorithm, http.user_claim, (name, value),
                       http.audience or None, http.issuer or None)
    return Gateway(host, port, check, socket, metrics)


def _described(http: Http) -> str:
    if http.jwt_secret_file:
        return f"the secret in {http.jwt_secret_file}"
    return f"the public key in {http.jwt_public_key_file}"


def _key(http: Http) -> tuple[Any, str]:
    """(the verification key, the one algorithm it is for)."""
    if bool(http.jwt_secret_file) == bool(http.jwt_public_key_file):
        raise SettingError("give exactly one of --jwt-secret-file (HS256) and "
                           "--jwt-public-key-file (RS256 or ES256)")
    path = Path(http.jwt_secret_file or http.jwt_public_key_file)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SettingError(f"{path}: cannot read the key: {e.strerror or e}") from None
    if http.jwt_secret_file:
        secret = data.rstrip(b"\r\n")
        if len(secret) < _MIN_SECRET_BYTES:
            raise SettingError(f"{path}: the HS256 secret has {len(secret)} bytes; use at "
                               f"least {_MIN_SECRET_BYTES} random bytes")
        return secret, "HS256"
    try:
        public = load_pem_public_key(data)
    except ValueError:
        raise SettingError(f"{path}: not a PEM public key (-----BEGIN PUBLIC KEY-----)"
                           ) from None
    if isinstance(public, rsa.RSAPublicKey):
        return public, "RS256"
    if isinstance(public, ec.EllipticCurvePublicKey) and isinstance(public.curve, ec.SECP256R1):
        return public, "ES256"
    raise SettingError(f"{path}: an RSA or P-256 public key is needed (RS256, ES256)")


def _listen(listen: str, what: str = "listen") -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SettingError(f"{what} {listen!r}: write it HOST:PORT, e.g. 127.0.0.1:8095")
    return host, int(port)


def app(gateway: Gateway, **router_options: Any) -> FastAPI:
    """The gateway's FastAPI app: the router behind its token check. Being all of the
    app, it answers a URL or method it does not serve in the one error shape too."""
    # no /docs or /redoc: FastAPI's pages load their scripts from a CDN; no schema either
    web = FastAPI(title="jobd", docs_url=None, redoc_url=None, openapi_url=None)
    web.add_exception_handler(StarletteHTTPException, _shaped)
    web.include_router(router(principal=gateway.check, socket=gateway.socket,
                              **router_options))
    web.include_router(dashboard.router())
    return web


async def _shaped(request: Request, e: Exception) -> Response:
    return failure(e)


def metrics_app(gateway: Gateway) -> FastAPI:
    """The app of the metrics address: ``GET /metrics`` and nothing else."""
    web = FastAPI(title="jobd metrics", docs_url=None, redoc_url=None, openapi_url=None)
    web.add_exception_handler(StarletteHTTPException, _shaped)
    web.include_router(metrics_router(socket=gateway.socket))
    return web


async def serve(gateway: Gateway, log_level: str) -> None:
    """Run uvicorn on the main address, and on the metrics address if there is one, until
    a signal stops them (each server traps SIGTERM/SIGINT; one stopping stops all)."""
    # open streams end with their job, which may be never: a stop waits for them
    # STOP_GRACE_S at most (a browser then resumes its stream with Last-Event-ID)
    servers = [uvicorn.Server(uvicorn.Config(web, host=host, port=port, log_config=None,
                                             log_level=log_level,
                                             timeout_graceful_shutdown=STOP_GRACE_S))
               for web, (host, port) in [(app(gateway), (gateway.host, gateway.port)),
                                         *([(metrics_app(gateway), gateway.metrics)]
                                           if gateway.metrics else [])]]
    tasks = [asyncio.create_task(s.serve()) for s in servers]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for s in servers:
        s.should_exit = True
    await asyncio.gather(*tasks)


log = structlog.get_logger()


#: how long jobd-http waits at its start for jobd to say whom it knows it as
ASK_S = 15.0


def refusal(socket: str | None, ask_s: float = ASK_S) -> str | None:
    """Why jobd-http may not serve as the account it runs as, or None (SPEC §10: it acts
    as a *service*). jobd knowing it as an admin (root, jobd's own user, ``auth.admins``)
    would give every token with the admin claim a local admin's rights, such as running
    any program as jobd's user. A jobd that does not answer within ``ask_s`` is a refusal
    too: the account cannot be checked (under systemd, jobd's socket unit answers)."""
    deadline = time.monotonic() + ask_s
    while True:
        try:
            with Client(socket, timeout=10) as client:
                caller = client.call("ping")["caller"]
            break
        except (Unreachable, Unavailable, OSError) as e:
            if time.monotonic() >= deadline:
                return (f"jobd did not answer within {ask_s:g} s ({e}), so jobd-http cannot "
                        "check which account jobd knows it as; start jobd first")
            time.sleep(0.5)
        except JobdError as e:
            return f"jobd refused to say which account it knows jobd-http as: {e}"
    log.info("gateway_caller", user=caller["user"], role=caller["role"])
    return refusal_of(caller)


def refusal_of(caller: dict[str, Any]) -> str | None:
    """Why jobd-http may not serve as ``caller`` (``ping``'s answer: whom jobd knows it
    as), or None: only as a service (SPEC §10)."""
    if caller["role"] == "service":
        return None
    if caller["role"] == "admin":
        return (f"jobd knows this account ({caller['user']}) as an admin, so a token with "
                "the admin claim would have a local admin's rights (it could run any "
                "program as jobd's user); run jobd-http as the account listed in [auth] "
                "services of jobd.toml, or give --allow-admin-account on a machine of your "
                "own")
    return (f"jobd knows this account ({caller['user']}) as a plain user, who may act only "
            "as itself, so every signed-in user but that one would be refused; list it in "
            "[auth] services of jobd.toml")


_FLAGS: list[tuple[str, str]] = [
    ("--listen", "HOST:PORT to serve on (default 127.0.0.1:8095)."),
    ("--jwt-secret-file", "File holding the HS256 secret."),
    ("--jwt-public-key-file", "PEM public key for RS256 (RSA) or ES256 (P-256)."),
    ("--algorithm", "The one algorithm accepted; must be the key's (default: the key's)."),
    ("--user-claim", "The claim naming the user (default username)."),
    ("--admin-claim", "CLAIM=VALUE: admins' tokens have it, or a list holding it "
                      "(default role=admin)."),
    ("--audience", "Accept only tokens for this aud."),
    ("--issuer", "Accept only tokens from this iss."),
    ("--metrics-listen", "HOST:PORT serving only GET /metrics, with no sign-in, for a "
                         "scraper (default: none)."),
]


def _options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for flag, help_text in reversed(_FLAGS):
        fn = click.option(flag, help=help_text + " Else [http] of jobd.toml.")(fn)
    return fn


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@_options
@click.option("--socket", help="jobd's socket (default: JOBD_SOCKET, else where jobctl looks).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="jobd.toml holding [http] (default: jobd's, env JOBD_CONFIG).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True)
@click.option("--allow-admin-account", is_flag=True,
              help="Serve even when jobd knows this account as an admin (root, jobd's own "
                   "user, auth.admins): tokens with the admin claim then have a local "
                   "admin's rights. For a development machine; in production run jobd-http "
                   "as the account in [auth] services.")
def main(socket: str | None, config_file: str | None, log_level: str,
         allow_admin_account: bool, **flags: str | None) -> None:
    """Serve jobd's REST API over HTTP, checking each call's bearer JWT."""
    try:
        http = load(config_file).http
        http = dataclasses.replace(http, **{k: v for k, v in flags.items() if v is not None})
        gateway = settings(http, socket)
    except (ConfigError, SettingError) as e:
        click.echo(f"jobd-http: {e}", err=True)
        sys.exit(1)
    logs.setup(log_level)
    if not allow_admin_account and (why := refusal(gateway.socket)):
        click.echo(f"jobd-http: {why}", err=True)
        sys.exit(1)
    # uvicorn logs through the root logger that logs.setup configured
    asyncio.run(serve(gateway, log_level))
