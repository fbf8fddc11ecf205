"""The systemd units, sysusers/tmpfiles snippets and example config in systemd/.

They are checked with systemd's own tools (``systemd-analyze verify`` and ``security``,
``systemd-sysusers``, ``systemd-tmpfiles``) and against jobd's config defaults, so a
unit that systemd would warn about, a sandbox that loosened, or a stop timeout shorter
than jobd's shutdown grace fails here rather than on a server.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from jobd import config

UNITS = Path(__file__).resolve().parents[2] / "systemd"

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (apt-get install systemd)")


def directives(path: Path) -> dict[str, dict[str, list[str]]]:
    """Section -> key -> every value given, in order (keys such as After= repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(path: Path, section: str, key: str) -> str:
    values = directives(path)[section][key]
    assert len(values) == 1, f"{path.name}: {key}= given {len(values)} times"
    return values[0]


def analyze(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "--no-pager", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SYSTEMD_COLORS": "0"})


@needs_analyze
def test_units_verify_without_warnings(tmp_path: Path) -> None:
    # verify insists that ExecStart= exists; point it at a real executable.
    service = (UNITS / "jobd.service").read_text(encoding="utf-8")
    service, n = re.subn(r"^ExecStart=/opt/jobd/bin/jobd ",
                         f"ExecStart={sys.executable} ", service, flags=re.M)
    assert n == 1, "jobd.service: expected ExecStart=/opt/jobd/bin/jobd serve"
    (tmp_path / "jobd.service").write_text(service, encoding="utf-8")
    shutil.copy(UNITS / "jobd.socket", tmp_path / "jobd.socket")

    result = analyze("verify", "./jobd.service", "./jobd.socket", cwd=tmp_path)

    ours = [line for line in result.stderr.splitlines() if "jobd" in line]
    assert ours == [], "systemd-analyze verify warned:\n" + "\n".join(ours)
    assert result.returncode == 0, result.stderr


@needs_analyze
def test_service_sandbox_exposure_is_at_most_2() -> None:
    result = analyze("security", "--offline=yes", str(UNITS / "jobd.service"))

    m = re.search(r"Overall exposure level for jobd\.service:\s*([0-9.]+)", result.stdout)
    assert m, f"no exposure level in output:\n{result.stdout}\n{result.stderr}"
    assert float(m.group(1)) <= 2.0, result.stdout


def test_service_keeps_git_on_the_network_and_peer_credentials_real() -> None:
    service = directives(UNITS / "jobd.service")["Service"]
    families = " ".join(service["RestrictAddressFamilies"]).split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(families)
    # Each of these would break sync jobs (no network) or auth (uids mapped to nobody).
    for key in ("PrivateNetwork", "IPAddressDeny", "PrivateUsers"):
        assert key not in service, f"{key}= would break jobd; see the unit's comments"


def test_stop_timeout_leaves_room_for_shutdown_grace() -> None:
    timeout = config.parse_duration(one(UNITS / "jobd.service", "Service", "TimeoutStopSec"))
    grace = config.load(UNITS / "jobd.toml.example", env={}).execution.shutdown_grace

    assert timeout >= grace + 5


def test_socket_is_where_clients_look_and_survives_service_stop() -> None:
    service = UNITS / "jobd.service"
    listen = Path(one(UNITS / "jobd.socket", "Socket", "ListenStream"))

    assert listen in config.default_socket_paths(env={})
    assert listen.parent == Path("/run") / one(service, "Service", "RuntimeDirectory")
    # Without it, stopping the service deletes /run/jobd and the listening socket in it.
    assert one(service, "Service", "RuntimeDirectoryPreserve") == "yes"
    under_systemd = config.load(env={"RUNTIME_DIRECTORY": str(listen.parent),
                                   "STATE_DIRECTORY": "/var/lib/jobd"})
    assert under_systemd.socket == listen


def test_example_config_names_every_key_with_its_default() -> None:
    example = UNITS / "jobd.toml.example"
    raw = tomllib.loads(example.read_text(encoding="utf-8"))
    loaded = config.load(example, env={})
    defaults = config.load(env={})

    for section in ("server", "storage", "execution", "retention", "auth", "sync", "http"):
        fields = {f.name for f in dataclasses.fields(getattr(defaults, section))}
        assert set(raw[section]) == fields, f"[{section}] keys differ from the Config's"
        assert getattr(loaded, section) == getattr(defaults, section), section
    assert set(raw) == {"server", "storage", "execution", "retention", "auth", "sync", "http"}


@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="tmpfiles chowns to jobd: needs root")
@pytest.mark.skipif(shutil.which("systemd-sysusers") is None
                    or shutil.which("systemd-tmpfiles") is None,
                    reason="systemd-sysusers/systemd-tmpfiles not installed "
                           "(apt-get install systemd)")
def test_sysusers_and_tmpfiles_make_the_user_and_its_directories(tmp_path: Path) -> None:
    # Installed as a package would, into an empty root, so the host is left alone.
    (tmp_path / "etc").mkdir()
    for kind, name in (("sysusers.d", "jobd.sysusers.conf"), ("tmpfiles.d", "jobd.tmpfiles.conf")):
        (tmp_path / "usr/lib" / kind).mkdir(parents=True)
        shutil.copy(UNITS / name, tmp_path / "usr/lib" / kind / "jobd.conf")

    subprocess.run(["systemd-sysusers", f"--root={tmp_path}"], check=True,
                   capture_output=True, timeout=60)
    subprocess.run(["systemd-tmpfiles", f"--root={tmp_path}", "--create"], check=True,
                   capture_output=True, timeout=60)

    passwd = {line.split(":")[0]: line.split(":")
              for line in (tmp_path / "etc/passwd").read_text().splitlines()}
    groups = {line.split(":")[0] for line in (tmp_path / "etc/group").read_text().splitlines()}
    assert "jobd-admin" in groups and "jobd" in groups
    uid, gid, home = int(passwd["jobd"][2]), int(passwd["jobd"][3]), passwd["jobd"][5]
    assert home == "/var/lib/jobd"
    state_mode = int(one(UNITS / "jobd.service", "Service", "StateDirectoryMode"), 8)
    for path, mode in (("var/lib/jobd", state_mode), ("run/jobd", 0o755)):
        st = (tmp_path / path).stat()
        assert (st.st_uid, st.st_gid) == (uid, gid), path
        assert stat.S_IMODE(st.st_mode) == mode, path
