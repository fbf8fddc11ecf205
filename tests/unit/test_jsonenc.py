"""jobd.jsonenc: encoders made once write exactly what ``json.JSONEncoder`` writes."""

from __future__ import annotations

import enum
import json
import threading
from typing import Any

import pytest
import structlog

from jobd import jsonenc, logs


class _Color(str, enum.Enum):
    RED = "red"


_VALUES: list[Any] = [
    {}, [], "", "plain", "é ü 中文 😀", "lone \ud800 surrogate", "quote \" and \\ and \n\t",
    0, -1, 2**70, 1.5, 1e300, -0.0, float("nan"), float("inf"), float("-inf"),
    True, False, None, _Color.RED,
    {"id": "4b0f6f3c", "progress": 12.5, "options": {"branch": "main", "full": False},
     "metadata": {"tags": ["a", "b"], "n": None}, "result": None},
    {1: "int key", 2.5: "float key", True: "bool key", None: "none key"},
    [[[[{"deep": [1, [2, [3]]]}]]]], ("a", "tuple"),
]


@pytest.mark.parametrize("options", [
    {"separators": (",", ":"), "ensure_ascii": False},
    {},
    {"separators": (",", ":"), "ensure_ascii": True},
    {"separators": (",", ":"), "sort_keys": True},
], ids=["compact", "defaults", "compact-ascii", "compact-sorted"])
def test_an_encoder_writes_what_jsonencoder_writes(options: dict[str, Any]) -> None:
    encode = jsonenc.encoder(**options)
    reference = json.JSONEncoder(**options).encode
    for value in _VALUES:
        assert outcome(encode, value) == outcome(reference, value), value


def outcome(encode: Any, value: Any) -> Any:
    """What ``encode`` makes of ``value``: its text, or the type of error it raised (keys of
    mixed types cannot be sorted)."""
    try:
        return encode(value)
    except TypeError as e:
        return type(e)


def test_nan_is_refused_when_allow_nan_is_off() -> None:
    encode = jsonenc.encoder(allow_nan=False)
    assert encode({"x": 1.0}) == '{"x": 1.0}'
    with pytest.raises(ValueError):
        encode({"x": float("nan")})


def test_a_refused_value_leaves_the_encoder_as_it_was() -> None:
    """A value that cannot be encoded fails its own call only: the encoder keeps nothing
    of it (a kept circular-reference mark would refuse a later, unrelated value)."""
    encode = jsonenc.encoder()
    broken = {"inner": {"bad": object()}}
    for _ in range(3):
        with pytest.raises(TypeError, match="not JSON serializable"):
            encode(broken)
    assert encode(broken["inner"] | {"bad": 1}) == '{"bad": 1}'
    assert encode({"inner": {"bad": 2}}) == '{"inner": {"bad": 2}}'


def test_default_is_asked_for_what_json_cannot_encode() -> None:
    encode = jsonenc.encoder(default=lambda o: f"<{type(o).__name__}>")
    assert encode({"when": object()}) == '{"when": "<object>"}'


def test_one_encoder_serves_many_threads() -> None:
    encode = jsonenc.encoder(separators=(",", ":"))
    values = [{"n": n, "items": list(range(n % 50)), "nested": {"s": "x" * n}}
              for n in range(400)]
    expected = [json.dumps(v, separators=(",", ":")) for v in values]
    wrong: list[int] = []

    def run() -> None:
        for n, value in enumerate(values):
            if encode(value) != expected[n]:
                wrong.append(n)
    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def test_log_lines_are_rendered_as_structlog_renders_them() -> None:
    renderer = structlog.processors.JSONRenderer()

    class Custom:
        def __repr__(self) -> str:
            return "Custom()"

    class Told:
        def __structlog__(self) -> str:
            return "told"

    event = {"event": "job_completed", "job_id": "abc", "attempt": 1, "error": None,
             "seconds": 0.25, "text": "é \ud800", "obj": Custom(), "told": Told(),
             "path": ("a", "b")}
    ours = structlog.processors.JSONRenderer(serializer=logs._render_json)
    assert ours(None, "info", dict(event)) == renderer(None, "info", dict(event))
