"""``jobctl completion``: the scripts load in their shells and complete job ids (SPEC §7)."""

from __future__ import annotations

import shutil
import subprocess
from typing import Iterator

import pytest

from conftest import Daemon
from test_jobctl import CONFIG, JOBCTL, base_env, submit, until_status


@pytest.fixture(scope="module")
def jd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("completion"), CONFIG).start()
    yield d
    assert d.stop() == 0


def complete(d: Daemon, words: list[str]) -> list[str]:
    """What bash completion offers for the last of ``words``, asked as bash asks it."""
    env = base_env(_JOBCTL_COMPLETE="bash_complete", COMP_WORDS=" ".join(words),
                   COMP_CWORD=str(len(words) - 1), JOBD_SOCKET=str(d.socket))
    proc = subprocess.run([JOBCTL], capture_output=True, text=True, timeout=30, env=env)
    assert proc.returncode == 0, proc.stderr
    # click's bash protocol: "type,value" per line
    return [ln.split(",", 1)[1] for ln in proc.stdout.splitlines() if "," in ln]


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_the_bash_script_registers_a_completion_for_jobctl() -> None:
    proc = subprocess.run(["bash", "-c", f"source <({JOBCTL} completion bash); complete -p jobctl"],
                          capture_output=True, text=True, timeout=30, env=base_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("complete -o nosort -F _jobctl_completion jobctl"), \
        proc.stdout


@pytest.mark.parametrize("shell,marker", [("zsh", "#compdef jobctl"),
                                          ("fish", "complete --no-files --command jobctl")])
def test_zsh_and_fish_scripts(shell: str, marker: str) -> None:
    proc = subprocess.run([JOBCTL, "completion", shell], capture_output=True, text=True,
                          timeout=30, env=base_env())
    assert proc.returncode == 0 and marker in proc.stdout, proc.stdout
    assert "_JOBCTL_COMPLETE" in proc.stdout


def test_commands_options_and_job_ids_complete(jd: Daemon) -> None:
    assert {"cancel", "completion", "top", "version"} <= set(complete(jd, ["jobctl", ""]))
    assert "--strategy" in complete(jd, ["jobctl", "sync", "p", "--"])
    jobs = [submit(jd, "root", "noop", options={"seconds": 0}) for _ in range(3)]
    for job in jobs:
        until_status(jd, job["id"], "completed")
    target = jobs[1]["id"]
    offered = complete(jd, ["jobctl", "status", target[:5]])
    assert target in offered
    assert all(o.startswith(target[:5]) for o in offered), offered
    assert {j["id"] for j in jobs} <= set(complete(jd, ["jobctl", "cancel", ""]))


def test_a_job_id_completes_to_nothing_when_no_daemon_answers(tmp_path: object) -> None:
    env = base_env(_JOBCTL_COMPLETE="bash_complete", COMP_WORDS="jobctl status ab",
                   COMP_CWORD="2", JOBD_SOCKET="/nonexistent/jobd.sock")
    proc = subprocess.run([JOBCTL], capture_output=True, text=True, timeout=30, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "" and proc.stderr == "", proc
