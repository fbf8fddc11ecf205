"""The signatures jsonrpcserver checks every call against (``rpc._Checked``): its quick
``bind`` must accept and refuse exactly what ``inspect``'s own would, with the same
message, for every method of the real table."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
from jsonrpcserver.dispatcher import validate_args
from jsonrpcserver.request import Request

from jobd import rpc
from jobd.manager import Manager

CALLER = object()


def table() -> dict[str, Any]:
    # the table only reads the manager's bound methods: no store or engine is needed
    server = rpc.Rpc.__new__(rpc.Rpc)
    server.manager = Manager.__new__(Manager)
    return server._table()


METHODS = table()


def calls(sig: inspect.Signature) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """Calls that fit, miss each required param, add an unknown one, pass too many or
    too few positional arguments, or pass the context by name."""
    params = list(sig.parameters.values())[1:]
    required = {p.name: 1 for p in params if p.default is inspect.Parameter.empty}
    every = {p.name: 1 for p in params}
    out: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
        ((CALLER,), required), ((CALLER,), every), ((CALLER,), {**required, "bogus": 1}),
        ((CALLER, 2), required), ((), required), ((CALLER,), {**required, "caller": 1})]
    out += [((CALLER,), {k: v for k, v in required.items() if k != name}) for name in required]
    return out


def outcome(sig: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    try:
        return dict(sig.bind(*args, **kwargs).arguments)
    except TypeError as e:
        return f"TypeError: {e}"


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_quick_bind_agrees_with_inspect_on_every_method(name: str) -> None:
    checked = inspect.signature(METHODS[name])
    assert isinstance(checked, rpc._Checked)  # jsonrpcserver finds ours, not a new one
    plain = inspect.Signature(list(checked.parameters.values()))
    for args, kwargs in calls(checked):
        assert outcome(checked, args, kwargs) == outcome(plain, args, kwargs), (args, kwargs)


def test_jsonrpcserver_refuses_an_unknown_and_a_missing_param_naming_it() -> None:
    method = METHODS["jobs.get"]
    fits = validate_args(Request("jobs.get", {"job_id": "x"}, 1), CALLER, method)
    assert fits._value is method
    unknown = validate_args(Request("jobs.get", {"job_id": "x", "bogus": 1}, 1), CALLER, method)
    assert "'bogus'" in unknown._error.data
    missing = validate_args(Request("jobs.get", {}, 1), CALLER, method)
    assert "'job_id'" in missing._error.data


def test_a_notification_of_a_read_takes_no_answer_room_and_others_do() -> None:
    """It is not run (its answer would be dropped), so it must not wait for the room of
    answers it will never build; a filtered cancel sent as one builds its answer."""
    from jobd.rpc import _may_answer_large
    listing = {"jsonrpc": "2.0", "method": "jobs.list", "params": {"limit": 1000}}
    assert not _may_answer_large(listing)
    assert _may_answer_large({**listing, "id": 1})
    assert _may_answer_large({"jsonrpc": "2.0", "method": "jobs.cancel",
                              "params": {"filter": {"status": "queued"}}})
    assert not _may_answer_large({"jsonrpc": "2.0", "id": 2, "method": "jobs.get",
                                  "params": {"job_id": "x"}})
