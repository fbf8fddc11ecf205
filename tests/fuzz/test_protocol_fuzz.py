"""Protocol fuzzing against a real daemon (issue 7, "Done when"): hostile params for every
method, garbage bytes, invalid UTF-8, deep nesting, huge and non-finite numbers, and huge
answers nobody reads.

Every answer must be JSON-RPC as SPEC §4 allows and never -32603; the daemon's log must
hold no traceback; ``ping`` on another connection answers within 100 ms after every
example; RSS stays bounded. CI runs a reduced count; the full run is
``JOBD_FUZZ_EXAMPLES=5000 .venv/bin/pytest tests/fuzz``.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import Daemon
from fuzz.wire import Wire, ping_ms, rss_mb, tracebacks

EXAMPLES = int(os.environ.get("JOBD_FUZZ_EXAMPLES", "60"))
PING_MS = 100
#: the fuzz daemon's memory bound. SPEC §9's "hostile answers" figure (≤ 150 MB for 64
#: unread connections of one user) is measured by bench/hostile_bench.py (101 MB). This
#: daemon also carries thousands of other hostile examples and up to 12 unread
#: connections at a 1 MiB answer limit, and its RSS saws between about 90 and 160 MB
#: over a full run (it falls back each time the unread connections go; no leak): the
#: bound here catches growth without end, not that figure.
RSS_MB = 200

FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get(
    "JOBD_FUZZ_RANDOM"), suppress_health_check=list(HealthCheck))

CONFIG = """
[server]
max_batch = 20
max_response_bytes = 1048576
line_timeout = "2s"

[execution]
workers = 2
max_queued_per_user = 50
cancel_grace = "1s"
shutdown_grace = "5s"
"""

METHODS = ["ping", "jobs.submit", "jobs.get", "jobs.list", "jobs.cancel", "jobs.retry",
           "jobs.wait", "jobs.events", "jobs.logs", "admin.stats", "admin.cleanup",
           "admin.pause", "admin.resume"]
PARAM_NAMES = ["type", "project_id", "options", "priority", "metadata", "description",
               "timeout_s", "idempotency_key", "on_duplicate", "as_user", "as_admin", "as_role",
               "job_id", "status", "user_id", "created_after", "created_before", "id_prefix",
               "order", "limit", "cursor", "offset", "with_total", "fields", "wait", "filter",
               "dry_run", "after_version", "limit_bytes", "older_than_s", "since", "branch"]


@pytest.fixture(scope="module")
def fz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("fuzz"), CONFIG)
    d.start()
    # a few real jobs, so ids and lists have something to find
    with Wire(d.socket) as w:
        for i in range(5):
            assert "result" in w.call("jobs.submit", i, type="noop", as_user="fuzz",
                                      metadata={"i": i})
    try:
        yield d
        assert d.proc is not None
        assert rss_mb(d.proc.pid) <= RSS_MB
    finally:
        assert d.stop() == 0  # also when a check failed: no daemon is left behind
    assert tracebacks(d.log()) == [], "\n".join(tracebacks(d.log())[:5])


def fine(d: Daemon) -> None:
    """Between examples: another connection is answered quickly."""
    took = ping_ms(d.socket)
    assert took <= PING_MS, f"ping took {took:.0f} ms"


# -- strategies --------------------------------------------------------------------------------

huge_ints = st.one_of(st.integers(), st.integers(min_value=2**63 - 2, max_value=2**70),
                      st.integers(min_value=-(2**70), max_value=-(2**63)),
                      st.integers(min_value=1, max_value=3000).map(lambda n: 10**n))
floats = st.floats(allow_nan=True, allow_infinity=True)
texts = st.one_of(st.text(st.characters(codec=None), max_size=40),  # surrogates included
                  st.sampled_from(["", " ", "-rf", "../..", "a" * 70_000, "\x00", "\u202e",
                                   "00000000-0000-0000-0000-000000000000", "noop", "sync",
                                   "command", "queued", "created", "2020-01-01T00:00:00Z",
                                   "user", "fold"]))
scalars = st.one_of(st.none(), st.booleans(), huge_ints, floats, texts)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(texts, inner, max_size=5)), max_leaves=20)
params = st.dictionaries(st.one_of(st.sampled_from(PARAM_NAMES), texts), values, max_size=6)
ids = st.one_of(st.integers(), huge_ints, texts, st.none(), st.booleans(), floats,
                st.lists(st.integers(), max_size=2), st.dictionaries(texts, st.integers(),
                                                                       max_size=2))
methods = st.one_of(st.sampled_from(METHODS), texts)


def safe(method: Any, p: Any) -> Any:
    """No fuzzed call runs a program or waits long: that is not what is tested here."""
    if isinstance(p, dict):
        if p.get("type") == "command":
            p["type"] = "noop"
        if method in ("jobs.wait", "jobs.cancel"):
            p.pop("timeout_s", None)
            p.pop("wait", None)
    return p


def encode(doc: Any) -> bytes:
    # ensure_ascii: lone surrogates go out as \\udxxx escapes, as a client would send them
    return json.dumps(doc, ensure_ascii=True, allow_nan=True).encode()


#: the daemon's default server.max_message_bytes: a longer line is a framing error
MAX_LINE = 1_048_576


def answers_for(w: Wire, line: bytes, expect: bool) -> Any:
    """The answer to ``line`` (None when none is due). A line past ``MAX_LINE`` cannot be
    read as a request at all: whatever it holds, it is answered -32600 with id null."""
    try:
        w.write(line + b"\n")
    except (BrokenPipeError, ConnectionResetError):
        # the daemon refused the line before it all arrived, and closed the connection
        assert len(line) > MAX_LINE, "the daemon closed the connection on a line it may read"
    if len(line) > MAX_LINE:
        answer = w.read(timeout=70)
        assert answer["id"] is None and answer["error"]["code"] == -32600, answer
        return None
    if not expect:
        assert w.silent_for(0.05), f"a notification was answered: {w.buf[:300]!r}"
        return None
    return w.read(timeout=70)


# -- the fuzz ----------------------------------------------------------------------------------

@FUZZ
@given(method=methods, p=st.one_of(params, values), ident=ids, notify=st.booleans(),
       extra=st.booleans())
def test_every_method_with_hostile_params_is_answered_and_never_internal(
        fz: Daemon, method: Any, p: Any, ident: Any, notify: bool, extra: bool) -> None:
    doc: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": safe(method, p)}
    if not notify:
        doc["id"] = ident
    if extra:
        doc["junk"] = 1
    valid_notification = notify and not extra and isinstance(method, str)
    with Wire(fz.socket) as w:
        answer = answers_for(w, encode(doc), expect=not valid_notification)
        if answer is not None and isinstance(answer, dict) and "error" in answer:
            assert answer["error"]["code"] != -32603
        if len(encode(doc)) <= MAX_LINE:  # a line too long closes the connection
            assert "result" in w.call("ping", "after")
    fine(fz)


@FUZZ
@given(batch=st.lists(st.fixed_dictionaries(
    {"jsonrpc": st.just("2.0"), "method": st.sampled_from(METHODS), "params": params},
    optional={"id": st.integers(0, 10**6)}), min_size=1, max_size=20))
def test_batches_of_hostile_calls_answer_exactly_their_calls(fz: Daemon,
                                                             batch: list[Any]) -> None:
    for item in batch:
        safe(item["method"], item["params"])
    wanted = [item["id"] for item in batch if "id" in item]
    with Wire(fz.socket) as w:
        answer = answers_for(w, encode(batch), expect=bool(wanted))
        if answer is not None:
            assert [a["id"] for a in answer] == wanted
    fine(fz)


@FUZZ
@given(data=st.binary(min_size=1, max_size=2000))
def test_garbage_bytes_are_refused_and_the_connection_goes_on(fz: Daemon, data: bytes) -> None:
    line = data.replace(b"\n", b" ")
    if not line.strip():
        line += b"x"
    with Wire(fz.socket) as w:
        answer = w.ask(line)
        for item in answer if isinstance(answer, list) else [answer]:
            assert item["error"]["code"] in (-32700, -32600), item
        assert "result" in w.call("ping", "after")
    fine(fz)


@FUZZ
@given(method=st.sampled_from(METHODS), p=params, cut=st.integers(0, 10**6),
       junk=st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                             b"\xe2\x82", b"\x80", b"\xc0\xaf"]))
def test_invalid_utf8_anywhere_is_a_parse_error(fz: Daemon, method: str, p: dict[str, Any],
                                                cut: int, junk: bytes) -> None:
    line = encode({"jsonrpc": "2.0", "id": 1, "method": method, "params": safe(method, p)})
    at = cut % (len(line) + 1)
    with Wire(fz.socket) as w:
        answer = w.ask(line[:at] + junk + line[at:])
        assert answer["error"]["code"] == -32700
        assert "result" in w.call("ping", "after")
    fine(fz)


@FUZZ
@given(depth=st.integers(1, 20_000), opener=st.sampled_from(["[", '{"a":', "[1,", '{"a":[']),
       where=st.sampled_from(["top", "params", "id", "metadata"]), close=st.booleans())
def test_deep_nesting_is_refused_cheaply(fz: Daemon, depth: int, opener: str, where: str,
                                         close: bool) -> None:
    closer = {"[": "]", '{"a":': "}", "[1,": "]", '{"a":[': "]}"}[opener]
    body = opener * depth + "1" + (closer * depth if close else "")
    line = {"top": body,
            "params": f'{{"jsonrpc":"2.0","id":1,"method":"ping","params":{{"x":{body}}}}}',
            "id": f'{{"jsonrpc":"2.0","id":{body},"method":"ping"}}',
            "metadata": ('{"jsonrpc":"2.0","id":1,"method":"jobs.submit","params":'
                         f'{{"type":"noop","as_user":"fuzz","metadata":{{"x":{body}}}}}}}')}[where]
    # how deep the line really is: each opener nests one level ('{"a":[' two), and the
    # request around the body adds its own
    nesting = depth * (2 if opener == '{"a":[' else 1) + {"top": 0, "params": 2, "id": 1,
                                                         "metadata": 3}[where]
    with Wire(fz.socket) as w:
        started = time.perf_counter()
        answer = w.ask(line.encode())
        assert time.perf_counter() - started < 1.0
        item = answer[0] if isinstance(answer, list) else answer
        too_deep = "error" in item and item["error"].get("data", {}).get("detail") == "too deep"
        if nesting > 64 and close:
            assert item["error"]["code"] == -32600 and too_deep, item
        elif nesting <= 64:
            assert not too_deep, item
        assert "result" in w.call("ping", "after")
    fine(fz)


@FUZZ
@given(digits=st.integers(300, 6000), where=st.sampled_from(["id", "limit", "metadata"]),
       form=st.sampled_from(["int", "float", "exp"]))
def test_huge_numbers_are_client_errors(fz: Daemon, digits: int, where: str, form: str) -> None:
    number = {"int": "9" * digits, "float": "9" * digits + ".5", "exp": f"1e{digits}"}[form]
    line = {"id": f'{{"jsonrpc":"2.0","id":{number},"method":"ping"}}',
            "limit": f'{{"jsonrpc":"2.0","id":1,"method":"jobs.list","params":{{"limit":{number}}}}}',
            "metadata": ('{"jsonrpc":"2.0","id":1,"method":"jobs.submit","params":'
                         f'{{"type":"noop","as_user":"fuzz","metadata":{{"n":{number}}}}}}}')}[where]
    with Wire(fz.socket) as w:
        answer = w.ask(line.encode())
        # past 1.8e308 a float is infinite; past 4300 digits Python reads no integer
        refused = digits > (4300 if form == "int" else 308) or where == "limit"
        if refused:
            assert answer["error"]["code"] in (-32700, -32600, -32602), answer
        assert "result" in w.call("ping", "after")
    fine(fz)


@settings(FUZZ, max_examples=max(3, EXAMPLES // 20))
@given(connections=st.integers(2, 12), items=st.integers(1, 20), limit=st.integers(1, 1000),
       fields=st.sampled_from([None, ["id"], ["id", "metadata"]]))
def test_huge_answers_nobody_reads_leave_others_fast_and_memory_bounded(
        fz: Daemon, connections: int, items: int, limit: int, fields: Any) -> None:
    with Wire(fz.socket) as w:  # jobs with big metadata to list, once
        if w.call("jobs.list", as_user="fuzz-big", limit=1)["result"]["jobs"] == []:
            for i in range(40):
                assert "result" in w.call("jobs.submit", i, type="noop", as_user="fuzz-big",
                                          metadata={"p": "m" * 60_000})
    p: dict[str, Any] = {"as_user": "fuzz-big", "limit": limit}
    if fields is not None:
        p["fields"] = fields
    batch = encode([{"jsonrpc": "2.0", "id": i, "method": "jobs.list", "params": p}
                    for i in range(items)])
    hogs = []
    for _ in range(connections):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(str(fz.socket))
        s.sendall(batch + b"\n")
        hogs.append(s)
    assert fz.proc is not None
    try:
        for _ in range(10):
            fine(fz)
            assert rss_mb(fz.proc.pid) <= RSS_MB
            time.sleep(0.05)
    finally:
        for s in hogs:
            s.close()
