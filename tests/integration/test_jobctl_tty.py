"""jobctl on a real pseudo-terminal of a set size, and across a daemon restart (SPEC §7).

The live bar must keep the job's id, percentage, status and run time visible at any
width from 60 columns up; ``top`` must quit on ``q`` and on Ctrl-C; ``--follow`` must
say ``reconnecting…`` while the daemon is away and pick the job up again.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time
from typing import Any, Callable, Iterator

import pytest

from conftest import Daemon
from jobd.models import from_iso
from test_jobctl import CONFIG, JOBCTL, base_env, sh_job, until_status

#: colours and styles, which sit inside a line
SGR = re.compile(r"\x1b\[[0-9;]*m")
#: cursor moves and erases, with which a live display redraws: each starts a new line
MOVES = re.compile(r"\x1b\[[0-9;?]*[A-Za-ln-z]|\x1b\][^\x07]*\x07")
SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


@pytest.fixture(scope="module")
def jd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("tty"), CONFIG).start()
    yield d
    assert d.stop() == 0


class Terminal:
    """A process on a new pseudo-terminal of ``cols`` columns that is its controlling one."""

    def __init__(self, argv: list[str], cols: int, rows: int = 30) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        env = base_env(TERM="xterm-256color")

        def controlling() -> None:  # Ctrl-C on the terminal must reach the program
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env,
                                     close_fds=True, preexec_fn=controlling)
        os.close(slave)
        self.out = bytearray()

    def read_until(self, predicate: Callable[[str], bool], timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while not predicate(self.text()) and time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError as e:
                    if e.errno != errno.EIO:
                        raise
                    break
                if not chunk:
                    break
                self.out += chunk
            elif self.proc.poll() is not None:
                break
        return self.text()

    def text(self) -> str:
        return self.out.decode(errors="replace")

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def finish(self, timeout: float = 15.0) -> int:
        self.read_until(lambda _: self.proc.poll() is not None, timeout)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            os.close(self.master)


def screen_lines(raw: str) -> list[str]:
    """Every line drawn, escape sequences removed (a redraw starts a new line)."""
    return [ln for part in MOVES.sub("\n", SGR.sub("", raw)).replace("\r", "\n").split("\n")
            if (ln := part.rstrip())]


@pytest.mark.parametrize("cols", [60, 80, 120])
def test_the_bar_keeps_id_percent_status_and_run_time_at_every_width(jd: Daemon, cols: int
                                                                      ) -> None:
    message = "indexing src/a/very/long/path/that/cannot/fit/anywhere/module_number_42.py"
    job = sh_job(jd, f"tty{cols}", f"echo '{json.dumps({'progress': 37, 'message': message})}';"
                                   " sleep 2.5")
    running = until_status(jd, job["id"], "running")
    # watched from 1.2 s after the start: the clock must count from started_at, not from now
    time.sleep(max(0.0, from_iso(running["started_at"]) / 1e6 + 1.2 - time.time()))
    term = Terminal([JOBCTL, "--socket", str(jd.socket), "status", job["id"][:8], "--follow"],
                    cols)
    code = term.finish()
    assert code == 0, term.text()
    lines = screen_lines(term.text())
    bars = [ln for ln in lines if job["id"][:8] in ln and "%" in ln]
    assert bars, lines
    assert all(len(ln) <= cols for ln in lines), [ln for ln in lines if len(ln) > cols]
    live = [ln for ln in bars if " 37% running" in ln]
    assert live, bars
    # the first frame already shows a second or more run: counted from the job's start
    assert re.search(r" 0:00:0[1-9]", live[0]), live[0]
    assert all(re.search(r" 0:00:\d\d", ln) for ln in live), live
    if cols >= 80:
        assert any("indexing src/" in ln for ln in live), live  # room left: the message shows
    assert any(ln.endswith("…") for ln in live), live  # ... shortened, never wrapped
    final = [ln for ln in bars if "100% completed" in ln]
    assert final, bars
    assert final[-1][0] not in SPINNER, f"a spinner on a finished job: {final[-1]!r}"


@pytest.mark.parametrize("keys", [b"q", b"\x03"], ids=["q", "ctrl-c"])
def test_top_shows_running_and_queued_jobs_and_quits(jd: Daemon, keys: bytes) -> None:
    job = sh_job(jd, f"top{keys[0]}", "sleep 30")
    until_status(jd, job["id"], "running")
    term = Terminal([JOBCTL, "--socket", str(jd.socket), "top"], 100)
    try:
        screen = term.read_until(lambda t: job["id"][:8] in t and "queued (" in t)
        assert "running (" in screen and job["id"][:8] in screen, screen
        assert f"top{keys[0]}: 1 / 0" in screen, screen  # the per-user counts
        started = time.monotonic()
        term.type(keys)
        code = term.finish(timeout=5)
        assert code == 0, term.text()
        assert time.monotonic() - started < 3
    finally:
        with jd.client() as c:
            c.cancel(job["id"])


def test_follow_says_reconnecting_while_the_daemon_restarts(make_daemon: Any) -> None:
    d = make_daemon(config=CONFIG)
    with d.client() as c:
        job = c.submit("noop", options={"seconds": 3})
    until_status(d, job["id"], "running")
    follower = subprocess.Popen([JOBCTL, "--socket", str(d.socket), "status", job["id"],
                                 "--follow"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=base_env())
    try:
        assert follower.stdout is not None
        first = follower.stdout.readline()  # it follows the job: the daemon goes now
        d.kill()
        time.sleep(1.5)  # jobctl is left without a daemon for a while
        d.start()
        out, err = follower.communicate(timeout=30)
        out = first + out
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    lines = out.splitlines()
    assert any(ln.startswith(f"{job['id'][:8]} reconnecting… (socket {d.socket}")
               for ln in lines), (out, err)
    after = [ln for ln in lines[[i for i, ln in enumerate(lines) if "reconnecting…" in ln][-1] + 1:]
             if not ln.startswith("result: ")]
    # picked up again: the job's lines go on to its end, and the exit code is its outcome
    assert after and after[-1].split()[1] in ("completed", "failed"), (out, err)
    assert follower.returncode == (0 if after[-1].split()[1] == "completed" else 1), err


@pytest.mark.parametrize("key,code", [(b"\x03", 130), (b"n\r", 2)])
def test_ctrl_c_at_the_question_before_a_cancel_of_several_touches_nothing_and_exits_130(
        jd: Daemon, key: bytes, code: int) -> None:
    """Asked whether to cancel two jobs, Ctrl-C ends jobctl as Ctrl-C does anywhere else
    in it (130, no "Aborted!"), and a no with 2; either way both jobs go on."""
    jobs = [sh_job(jd, "ttyask", "sleep 30")["id"] for _ in range(2)]
    try:
        for job_id in jobs:
            until_status(jd, job_id, "running")
        term = Terminal([JOBCTL, "--socket", str(jd.socket), "cancel", *jobs], 100)
        term.read_until(lambda text: "[y/N]" in text)
        term.type(key)
        assert term.finish() == code, term.text()
        assert "Aborted" not in term.text() and "Traceback" not in term.text(), term.text()
        with jd.client() as c:
            assert [c.get(j)["cancel_requested"] for j in jobs] == [False, False]
    finally:
        with jd.client() as c:
            for job_id in jobs:
                c.cancel(job_id, wait=True)
