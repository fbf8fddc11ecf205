"""The typed checkers of client values: what each takes, what it refuses, and how it says so."""

from __future__ import annotations

import math

import pytest

from jobd import params
from jobd.errors import InvalidParams


def refused(fn, *args, **kwargs) -> InvalidParams:
    with pytest.raises(InvalidParams) as info:
        fn(*args, **kwargs)
    return info.value


@pytest.mark.parametrize("value", [True, False, 1.0, "3", None, [1], 0, 1001, -5, 2**70])
def test_integer_refuses_what_is_not_an_integer_in_range(value):
    err = refused(params.integer, value, "limit", 1, 1000)
    assert err.data()["field"] == "limit"
    assert err.message == f"limit must be an integer from 1 to 1000 (got {params.shown(value)})"


@pytest.mark.parametrize("value", [1, 500, 1000])
def test_integer_takes_integers_in_range(value):
    assert params.integer(value, "limit", 1, 1000) == value


def test_integer_bounds_may_be_open_and_a_hint_says_what_it_means():
    assert params.integer(-(2**70), "after_version") == -(2**70)
    assert "of at least 0" in refused(params.integer, -1, "offset", 0).message
    assert "of at most 3" in refused(params.integer, 4, "n", None, 3).message
    # a large integer bound in full, not as 1.04858e+06
    assert "from 1 to 1048576 " in refused(params.integer, 0, "n", 1, 1 << 20).message
    err = refused(params.integer, "x", "after_version", hint=" (a job's version)")
    assert err.message == "after_version must be an integer (a job's version) (got 'x')"


@pytest.mark.parametrize("value", [True, "1", math.nan, math.inf, -math.inf, 10**400, -0.5, 11])
def test_number_refuses_bools_text_non_finite_and_out_of_range(value):
    err = refused(params.number, value, "timeout_s", 0, 10)
    assert err.data()["field"] == "timeout_s"
    assert "must be a number from 0 to 10" in err.message


def test_number_takes_integers_and_floats_as_floats():
    assert params.number(3, "t", 0, None) == 3.0
    assert isinstance(params.number(3, "t", 0, None), float)
    assert params.number(2.5, "t", 0, 10) == 2.5


@pytest.mark.parametrize("value", [0, 1, "true", None, "yes"])
def test_flag_is_true_or_false_only(value):
    err = refused(params.flag, value, "dry_run")
    assert err.message == f"dry_run must be true or false (got {params.shown(value)})"
    assert err.data()["field"] == "dry_run"


def test_flag_takes_true_and_false():
    assert params.flag(True, "wait") is True
    assert params.flag(False, "wait") is False


def test_text_counts_bytes_or_characters_and_refuses_lone_surrogates():
    assert params.text("é" * 512, "description", max_bytes=1024) == "é" * 512
    err = refused(params.text, "é" * 513, "description", max_bytes=1024)
    assert "at most 1 KiB as UTF-8" in err.message
    assert refused(params.text, "", "idempotency_key", min_chars=1,
                   max_chars=128).message.startswith("idempotency_key must be 1 to 128 characters")
    assert "at most 200 characters" in refused(params.text, "x" * 201, "reason",
                                               max_chars=200).message
    err = refused(params.text, "a\ud800b", "reason", max_chars=200)
    assert "lone surrogate" in err.message and err.data()["field"] == "reason"
    assert refused(params.text, 5, "reason", max_chars=200).data()["field"] == "reason"


def test_shown_quotes_short_whatever_the_value():
    assert len(params.shown("x" * 10_000)) < 80
    nested: list = []
    for _ in range(100):
        nested = [nested]
    assert len(params.shown(nested)) < 80
    params.shown("\ud800").encode()  # encodable


def test_iso_time():
    assert params.iso_time(None, "created_after") is None
    assert params.iso_time("2026-11-22T10:00:00Z", "created_after") == 1795341600_000000
    err = refused(params.iso_time, "yesterday", "created_after")
    assert err.data()["field"] == "created_after" and "ISO 8601" in err.message
