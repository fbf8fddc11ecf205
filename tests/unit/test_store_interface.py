"""``JobStore`` is the store the layers above use: each backend (SQLite, PostgreSQL) offers
each of its methods with the same parameters, and the manager and engine call nothing
else."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import pytest

from jobd.store.interface import JobStore
from jobd.store.sqlite import SqliteStore

JOBD = Path(__file__).resolve().parents[2] / "jobd"
METHODS = {name for name, value in vars(JobStore).items()
           if callable(value) and not name.startswith("_")}


def backend_class(name: str) -> Any:
    if name == "sqlite":
        return SqliteStore
    pytest.importorskip("psycopg")
    from jobd.store.postgres import PostgresStore
    return PostgresStore


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_each_backend_offers_every_method_of_the_interface(backend: str) -> None:
    store_class = backend_class(backend)
    for name in METHODS:
        want = inspect.signature(getattr(JobStore, name)).parameters
        have = inspect.signature(getattr(store_class, name)).parameters
        assert [(p.name, p.kind) for p in want.values()] == [
            (p.name, p.kind) for p in have.values() if p.name in want], name
        # what the backend takes beyond the interface has a default (a tuning knob)
        assert all(p.default is not p.empty for p in have.values() if p.name not in want), name


def test_the_layers_above_use_only_the_interface() -> None:
    used: dict[str, set[str]] = {}
    for module in ("manager.py", "engine.py", "dispatch.py", "maintenance.py"):
        text = (JOBD / module).read_text()
        used[module] = set(re.findall(r"(?:self|engine)\.store\.(\w+)", text))
    attributes = set(JobStore.__annotations__)
    for module, names in used.items():
        assert names <= METHODS | attributes, (module, sorted(names - METHODS - attributes))
    assert used["manager.py"] and used["engine.py"]
