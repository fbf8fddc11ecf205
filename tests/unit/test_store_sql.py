"""queries.sql's parser: a name given twice is an error, not a silent replacement; and
every query the shared rules run has its statement in each backend's file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from jobd.store.sql import QUERIES, dialect, parse_queries

BASE = Path(__file__).resolve().parents[2] / "jobd" / "store" / "base.py"


def test_a_query_named_twice_is_refused() -> None:
    text = "-- header\n\n-- one --\n-- first\nSELECT 1\n\n-- one --\n-- again\nSELECT 2\n"
    with pytest.raises(ValueError, match="one named more than once"):
        parse_queries(text)


def test_queries_include_shared_parts_by_name() -> None:
    found = parse_queries("-- cols --\n-- shared\na, b\n\n-- q --\n-- uses it\n"
                          "SELECT {cols} FROM t {where}\n")
    assert found["q"] == "SELECT a, b FROM t {where}"


@pytest.mark.parametrize("name, queries", [("sqlite", QUERIES),
                                           ("postgres", dialect("postgres")[0])])
def test_each_backend_has_every_query_the_shared_rules_run(
        name: str, queries: dict[str, str]) -> None:
    text = BASE.read_text()
    used = set(re.findall(r"""tx\.(?:run|insert)\(\s*["'](\w+)["']""", text))
    used |= set(re.findall(r"""self\.queries\[["'](\w+)["']\]""", text))
    used |= set(re.findall(r"""self\._cas\(tx, ["'](\w+)["']""", text))
    for names in re.findall(r"for query in \(([^)]*)\)", text):  # the deletes, the prunes
        used |= set(re.findall(r"""["'](\w+)["']""", names))
    assert {"submit_job", "finish_job", "matching_jobs", "delete_jobs", "prune_finished",
            "uncount_jobs"} <= used
    assert used - set(queries) == set(), name
