"""What ``pip install .`` (not editable: the systemd README's install) ships: every file
jobd reads at run time, not only its Python modules."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _source_tree(to: Path) -> Path:
    """The checkout's files as a fresh clone has them: no build or egg-info leftovers,
    which would let setuptools find files the packaging itself does not name."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout.split()
    for name in listed:
        if (ROOT / name).is_file():
            (to / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, to / name)
    return to


def test_the_wheel_carries_the_store_queries_and_migrations(tmp_path: Path) -> None:
    source = _source_tree(tmp_path / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "-w", str(tmp_path / "dist"), str(source)],
                   check=True, capture_output=True, timeout=300)
    wheel, = (tmp_path / "dist").glob("jobd-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    wanted = {f"jobd/{p.relative_to(ROOT / 'jobd').as_posix()}"
              for p in (ROOT / "jobd" / "store" / "sql").rglob("*.sql")}
    assert wanted and any(name.endswith("queries.sql") for name in wanted)
    assert wanted <= shipped, sorted(wanted - shipped)
