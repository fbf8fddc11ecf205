"""Raw bytes on a jobd socket, for the protocol tests and the fuzz suite.

A client as thin as a socket: what goes out is exactly the bytes given, what comes back
is read line by line, so the tests see the framing as a hostile client would.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

#: SPEC §4: every code jobd may send, and the HTTP status it maps to
HTTP_STATUS = {-32700: 400, -32600: 400, -32601: 404, -32602: 422, -32001: 401, -32003: 403,
               -32004: 404, -32009: 409, -32029: 429, -32050: 503, -32603: 500}


def checked(resp: Any) -> Any:
    """``resp`` (an answer or a batch of them) after checking its shape against SPEC §4."""
    if isinstance(resp, list):
        assert resp, "an empty batch answer"
        return [checked(item) for item in resp]
    assert isinstance(resp, dict) and resp.get("jsonrpc") == "2.0", resp
    assert ("result" in resp) != ("error" in resp), resp
    assert "id" in resp, resp
    if "error" in resp:
        err = resp["error"]
        assert err["code"] in HTTP_STATUS, f"code outside SPEC §4: {err}"
        assert err["code"] != -32603, f"a client's input reached -32603: {err}"
        assert isinstance(err["data"], dict), err
        assert err["data"]["http_status"] == HTTP_STATUS[err["code"]], err
    return resp


class Wire:
    """One connection to a jobd socket."""

    def __init__(self, path: Path | str, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buf = b""

    def __enter__(self) -> "Wire":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self, timeout: float = 30.0) -> bytes | None:
        """The next answer line (without newline), or None once the daemon closed."""
        self.sock.settimeout(timeout)
        while b"\n" not in self.buf:
            try:
                chunk = self.sock.recv(1 << 20)
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def read(self, timeout: float = 30.0) -> Any:
        """The next answer, checked."""
        line = self.line(timeout)
        assert line is not None, "the daemon closed the connection instead of answering"
        return checked(json.loads(line))

    def ask(self, data: bytes, timeout: float = 30.0) -> Any:
        self.write(data if data.endswith(b"\n") else data + b"\n")
        return self.read(timeout)

    def call(self, method: str, ident: Any = 1, **params: Any) -> Any:
        return self.ask(request(method, ident, **params))

    def silent_for(self, seconds: float) -> bool:
        """Nothing arrives within ``seconds`` and the connection stays open."""
        self.sock.settimeout(seconds)
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            return True
        self.buf += chunk
        return False


def request(method: str, ident: Any = 1, **params: Any) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": ident, "method": method,
                       "params": params}).encode() + b"\n"


def ping_ms(path: Path | str) -> float:
    """How long a ``ping`` on a fresh connection takes, in milliseconds."""
    started = time.perf_counter()
    with Wire(path, timeout=10) as w:
        assert "result" in w.call("ping")
    return (time.perf_counter() - started) * 1000


def rss_mb(pid: int) -> float:
    """A process's resident memory (VmRSS), in MB."""
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith("VmRSS:"):
            return int(row.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def tracebacks(log: str) -> list[str]:
    """Log lines that carry a traceback or an exception."""
    return [row for row in log.splitlines()
            if "Traceback" in row or '"exception"' in row or "rpc_method_crashed" in row
            or "request_failed" in row or "connection_failed" in row]
