"""How the HTTP face is shipped and run: the ``http`` extra and the ``jobd-http`` command
in the wheel (plain ``pip install .`` needing none of it), and ``systemd/jobd-http.service``
checked with systemd's own tools as jobd's units are."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"
WEB = ("fastapi", "uvicorn", "pyjwt", "starlette", "pydantic", "httpx")

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (apt-get install systemd)")


def test_the_wheel_has_jobd_http_and_the_http_extra_and_requires_none_of_it(
        wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()

    assert {"jobd/http/__init__.py", "jobd/http/api.py", "jobd/http/gateway.py"} <= set(names)
    assert re.search(r"^jobd-http\s*=\s*jobd\.http\.gateway:main$", entry, re.M), entry
    requires = re.findall(r"^Requires-Dist: (.*)$", meta, re.M)

    def name(requirement: str) -> str:
        return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()  # type: ignore

    always = [r for r in requires if "extra ==" not in r]
    assert not [r for r in always if name(r) in WEB], always
    http = {name(r) for r in requires if 'extra == "http"' in r}
    assert http == {"fastapi", "uvicorn", "pyjwt"}, requires
    assert any(r.lower().startswith("pyjwt[crypto]") for r in requires if 'extra == "http"' in r)


def _analyze(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "--no-pager", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SYSTEMD_COLORS": "0"})


@needs_analyze
def test_the_unit_verifies_without_warnings(tmp_path: Path) -> None:
    unit = (UNITS / "jobd-http.service").read_text(encoding="utf-8")
    # verify insists that ExecStart= exists; point it at a real executable
    unit, n = re.subn(r"^ExecStart=/opt/jobd/bin/jobd-http$", f"ExecStart={sys.executable}",
                      unit, flags=re.M)
    assert n == 1, "jobd-http.service: expected ExecStart=/opt/jobd/bin/jobd-http"
    (tmp_path / "jobd-http.service").write_text(unit, encoding="utf-8")
    shutil.copy(UNITS / "jobd.socket", tmp_path / "jobd.socket")

    result = _analyze("verify", "./jobd-http.service", cwd=tmp_path)

    ours = [line for line in result.stderr.splitlines() if "jobd" in line]
    assert ours == [], "systemd-analyze verify warned:\n" + "\n".join(ours)
    assert result.returncode == 0, result.stderr


@needs_analyze
def test_the_unit_sandbox_exposure_is_at_most_2() -> None:
    result = _analyze("security", "--offline=yes", str(UNITS / "jobd-http.service"))
    m = re.search(r"Overall exposure level for jobd-http\.service:\s*([0-9.]+)", result.stdout)
    assert m, f"no exposure level in output:\n{result.stdout}\n{result.stderr}"
    assert float(m.group(1)) <= 2.0, result.stdout


def _values(path: Path, key: str) -> list[str]:
    return [line.split("=", 1)[1].strip() for line in path.read_text().splitlines()
            if line.startswith(f"{key}=")]


def test_the_unit_runs_as_its_own_account_in_the_sockets_group() -> None:
    unit = UNITS / "jobd-http.service"
    assert _values(unit, "User") == ["jobd-http"]
    assert _values(unit, "SupplementaryGroups") == _values(UNITS / "jobd.socket", "SocketGroup")
    sysusers = (UNITS / "jobd-http.sysusers.conf").read_text()
    assert re.search(r"^u jobd-http ", sysusers, re.M) and re.search(
        r"^m jobd-http jobd$", sysusers, re.M), sysusers


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="systemd-sysusers --root writes as root")
@pytest.mark.skipif(shutil.which("systemd-sysusers") is None,
                    reason="systemd-sysusers not installed (apt-get install systemd)")
def test_sysusers_makes_the_account_a_member_of_group_jobd(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "usr/lib/sysusers.d").mkdir(parents=True)
    for name, target in (("jobd.sysusers.conf", "jobd.conf"),
                         ("jobd-http.sysusers.conf", "jobd-http.conf")):
        shutil.copy(UNITS / name, tmp_path / "usr/lib/sysusers.d" / target)
    subprocess.run(["systemd-sysusers", f"--root={tmp_path}"], check=True,
                   capture_output=True, timeout=60)
    groups = {line.split(":")[0]: line.split(":")[3].split(",")
              for line in (tmp_path / "etc/group").read_text().splitlines()}
    passwd = {line.split(":")[0] for line in (tmp_path / "etc/passwd").read_text().splitlines()}
    assert "jobd-http" in passwd and "jobd-http" in groups["jobd"], groups
