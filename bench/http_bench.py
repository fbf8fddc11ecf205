"""HTTP benchmark: ``GET /api/jobs/{id}/status`` through a real ``jobd-http``.

Starts a real jobd and a real ``jobd-http`` (uvicorn, HS256 JWTs checked on every
call) in front of it, and as the reference, in the same run, a bare uvicorn app of the
same FastAPI answering a constant JSON body behind no sign-in: what the gateway adds on
top of the web stack (the token check, the router, the pooled call to jobd) is the
difference. One keep-alive HTTP connection, one call at a time (p50/p99), as seed 002's
polling loop makes them.

SPEC §9: ``GET /api/jobs/{id}/status`` p50 ≤ 5 ms through jobd-http.

Needs the http extra (``pip install -e '.[http]'``): fastapi, uvicorn, PyJWT, httpx.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (ROOT, BenchError, Jobd, Row, machine, ms, pct,  # noqa: E402
                      print_table, workdir)

CONFIG = """
[execution]
workers = 2
"""

SECRET = b"bench-secret-" + b"0123456789abcdef" * 3

# The reference: the same web stack, no jobd behind it and no sign-in.
_REFERENCE = """
import sys, uvicorn
from fastapi import FastAPI
app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
BODY = {"jobId": "x", "status": "completed", "progress": 100.0, "phase": "finalizing",
        "message": None, "error": None, "queuePosition": None, "waitReason": None,
        "etaS": None, "startedAt": None, "completedAt": None}

@app.get("/api/jobs/{job_id}/status")
async def status(job_id: str):
    return BODY

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve(argv: list[str], url: str, log: Path) -> subprocess.Popen[bytes]:
    """Start a web server process and return once ``url`` answers."""
    import httpx
    with open(log, "wb") as err:
        proc = subprocess.Popen(argv, stdout=err, stderr=err, stdin=subprocess.DEVNULL,
                                env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{argv[2]} exited {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            httpx.get(url, timeout=1)
            return proc
        except httpx.TransportError:
            time.sleep(0.05)
    raise BenchError(f"{url} did not answer within 30 s")


def timed(client: object, url: str, headers: dict[str, str], count: int,
          warmup: int) -> list[float]:
    out = []
    for n in range(warmup + count):
        started = time.perf_counter()
        answer = client.get(url, headers=headers)  # type: ignore[attr-defined]
        took = time.perf_counter() - started
        if answer.status_code != 200:
            raise BenchError(f"GET {url}: {answer.status_code} {answer.text[:300]}")
        if n >= warmup:
            out.append(took)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description="jobd-http benchmark: GET /api/jobs/{id}/status p50/p99 through the "
                    "gateway, beside a bare uvicorn app of the same stack.")
    parser.add_argument("--requests", type=int, default=2000, metavar="N",
                        help="timed calls per figure (default 2000)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    try:
        import httpx
        import jwt
    except ImportError as e:
        raise BenchError(f"{e.name} is not installed: pip install -e '.[http]' -r "
                         "bench/requirements.txt") from None
    warmup = min(200, args.requests)
    root = workdir(args.keep)
    (root / "jwt.secret").write_bytes(SECRET)
    daemon = Jobd(root, CONFIG)
    procs: list[subprocess.Popen[bytes]] = []
    load = machine()
    try:
        daemon.start()
        job = daemon.connect().call("jobs.submit", type="noop", as_user="alice",
                                    options={"seconds": 0})
        port, ref_port = free_port(), free_port()
        gateway = f"http://127.0.0.1:{port}"
        procs.append(serve([sys.executable, "-m", "jobd.http", "--listen", f"127.0.0.1:{port}",
                            "--socket", str(daemon.socket), "--jwt-secret-file",
                            str(root / "jwt.secret"), "--log-level", "warning",
                            # the bench's jobd knows its own user as an admin
                            "--allow-admin-account"],
                           gateway + "/api/jobs", root / "jobd-http.log"))
        reference = f"http://127.0.0.1:{ref_port}"
        procs.append(serve([sys.executable, "-c", _REFERENCE, str(ref_port)],
                           reference + "/api/jobs/x/status", root / "reference.log"))
        token = jwt.encode({"username": "alice", "exp": int(time.time()) + 3600}, SECRET,
                           algorithm="HS256")
        path = f"/api/jobs/{job['id']}/status"
        with httpx.Client() as client:
            ours = timed(client, gateway + path, {"Authorization": f"Bearer {token}"},
                         args.requests, warmup)
            bare = timed(client, reference + path, {}, args.requests, warmup)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        daemon.stop()
    p50 = pct(ours, 50)
    rows = [
        Row("GET /api/jobs/{id}/status p50", ms(p50), "≤ 5 ms",
            f"bare uvicorn {ms(pct(bare, 50))} (×{p50 / pct(bare, 50):.1f})", p50 <= 0.005),
        Row("GET /api/jobs/{id}/status p99", ms(pct(ours, 99)), "",
            f"bare uvicorn {ms(pct(bare, 99))}"),
    ]
    print_table(f"http_bench: {args.requests} calls on one keep-alive connection, "
                f"HS256 token checked each call; {load}", rows)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"http_bench: {e}", file=sys.stderr)
        sys.exit(1)
