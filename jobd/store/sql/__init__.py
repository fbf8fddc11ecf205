"""The store's SQL: named queries (``queries.sql``) and numbered migrations, per dialect.

SQLite's are ``queries.sql`` and ``migrations/`` here (``QUERIES``, ``MIGRATIONS``);
another dialect's are in a folder of its name (``postgres/``), loaded by ``dialect``.

``queries.sql`` holds every statement the store runs, each after a ``-- name --`` line
and one comment line saying what it does (as procrastinate's). A ``{name}`` in a query
is replaced by the query of that name (shared column lists); other braces are left for
the caller to fill (``{where}`` of a filtered list).
"""

from __future__ import annotations

import re
from importlib import resources
from importlib.resources.abc import Traversable

__all__ = ["MIGRATIONS", "QUERIES", "dialect", "parse_queries"]

_NAMED = re.compile(r"(?:\n|^)-- ([a-z0-9_]+) --\n(?:-- .+\n)*", re.MULTILINE)


def parse_queries(text: str) -> dict[str, str]:
    """The queries of a ``queries.sql`` text by name, shared parts filled in."""
    parts = _NAMED.split(text)[1:]  # the file's header goes
    names = parts[::2]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:  # the second would silently replace the first
        raise ValueError(f"queries.sql: {', '.join(twice)} named more than once")
    found = {name: sql.strip() for name, sql in zip(names, parts[1::2])}
    include = re.compile(r"\{(%s)\}" % "|".join(map(re.escape, found)))
    while any(include.search(sql) for sql in found.values()):
        found = {name: include.sub(lambda m: found[m.group(1)], sql)
                 for name, sql in found.items()}
    return found


_HERE = resources.files(__name__)
#: a migration: (number, file name, SQL); the store records the numbers applied
Migration = tuple[int, str, str]


def _load(folder: Traversable) -> tuple[dict[str, str], tuple[Migration, ...]]:
    queries = parse_queries((folder / "queries.sql").read_text(encoding="utf-8"))
    migrations = tuple(
        (int(f.name[:4]), f.name, f.read_text(encoding="utf-8"))
        for f in sorted((folder / "migrations").iterdir(), key=lambda f: f.name)
        if f.name.endswith(".sql"))
    if [m[0] for m in migrations] != list(range(1, len(migrations) + 1)):
        # the runner applies them by position and stores the number: a gap would skip one
        raise RuntimeError(f"{folder}/migrations: numbers not 1..n: "
                           f"{[m[1] for m in migrations]}")
    return queries, migrations


def dialect(name: str) -> tuple[dict[str, str], tuple[Migration, ...]]:
    """The named queries and the migrations in order of the dialect ``name`` (its folder)."""
    return _load(_HERE / name)


QUERIES, MIGRATIONS = _load(_HERE)
