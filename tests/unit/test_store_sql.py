"""queries.sql's parser: a name given twice is an error, not a silent replacement."""

from __future__ import annotations

import pytest

from jobd.store.sql import parse_queries


def test_a_query_named_twice_is_refused() -> None:
    text = "-- header\n\n-- one --\n-- first\nSELECT 1\n\n-- one --\n-- again\nSELECT 2\n"
    with pytest.raises(ValueError, match="one named more than once"):
        parse_queries(text)


def test_queries_include_shared_parts_by_name() -> None:
    found = parse_queries("-- cols --\n-- shared\na, b\n\n-- q --\n-- uses it\n"
                          "SELECT {cols} FROM t {where}\n")
    assert found["q"] == "SELECT a, b FROM t {where}"
