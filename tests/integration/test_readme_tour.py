"""The README's tour (its block between ``<!-- tour -->`` markers) runs as written.

It is run with bash exactly as a reader would paste it, with the checkout's venv first on
PATH (the README's ``. .venv/bin/activate``), and must exit 0 having done what it says.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import GIT_ENV

README = Path(__file__).resolve().parents[2] / "README.md"


def tour() -> str:
    text = README.read_text()
    found = re.search(r"<!-- tour -->\n```sh\n(.*?)```\n<!-- /tour -->", text, re.S)
    assert found, "README.md has no <!-- tour --> block"
    return found.group(1)


@pytest.mark.skipif(shutil.which("git") is None, reason="the tour needs git")
def test_the_readme_tour_runs_as_written(tmp_path: Path) -> None:
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "jobctl").exists(), "jobctl is not installed beside this Python"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JOBD_", "GIT_")) and k not in GIT_ENV}
    env.update(PATH=f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}", HOME=str(tmp_path),
               TMPDIR=str(tmp_path), GIT_CONFIG_NOSYSTEM="1")
    # bash -e: the first failing command fails the test, as a reader would notice
    done = subprocess.run(["bash", "-e", "-c", tour()], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    out = done.stdout
    assert done.returncode == 0, f"the tour failed ({done.returncode}):\n{out}\n{done.stderr}"
    finished = re.findall(r"^[0-9a-f]{8} completed 100% finalizing synced main: (\d+) commits? "
                          r"pulled$", out, re.M)
    assert finished == ["0", "0", "1"], out              # the three syncs, the last pulled one
    assert re.search(r"^cancelled [0-9a-f]{8}", out, re.M), out   # the cancel by filter
    assert "files_indexed: 501" in out, out                        # jobctl status's result
    assert re.search(r"^jobs .*completed 3 .*cancelled 1", out, re.M), out
