"""What ``pip install .`` (not editable: the systemd README's install) ships: every file
jobd reads at run time, not only its Python modules."""

from __future__ import annotations

import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_carries_the_store_queries_and_migrations(wheel: Path) -> None:
    shipped = set(zipfile.ZipFile(wheel).namelist())
    wanted = {f"jobd/{p.relative_to(ROOT / 'jobd').as_posix()}"
              for p in (ROOT / "jobd" / "store" / "sql").rglob("*.sql")}
    assert wanted and any(name.endswith("queries.sql") for name in wanted)
    assert wanted <= shipped, sorted(wanted - shipped)
