"""Job logs: the cap with absolute offsets, jobd's story lines, carriage-return runs, the
tail for error messages, and removal with every file a log leaves."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jobd import joblogs
from jobd.joblogs import JobLog, is_note, read
from jobd.process import run


@pytest.fixture
def log(tmp_path: Path):
    job_log = JobLog(tmp_path / "logs" / "job.log", 1 << 20)
    yield job_log
    job_log.close()


@pytest.mark.parametrize("chunks, kept", [
    ([b"a 1%\ra 2", b"%\ra 3%\n"], b"a 3%\n"),          # a redraw split across reads
    ([b"one\r\n", b"two\n"], b"one\ntwo\n"),           # \r\n ends a line
    ([b"x 1%\r", b"\n"], b"x 1%\n"),                     # a final \r, then the line end
    ([b"no end\rlast"], b"last\n"),                      # the end of output ends the line
])
def test_the_log_keeps_the_last_state_of_each_carriage_return_run(tmp_path, chunks, kept):
    log = JobLog(tmp_path / "job.log", 1 << 20)
    stream = log.stream()
    for chunk in chunks:
        stream.write(chunk)
    stream.close()
    assert read(log.path, 0, 1 << 16)[0] == kept


def test_log_cap_drops_oldest_and_offsets_stay_absolute(tmp_path):
    path = tmp_path / "job.log"
    job_log = JobLog(path, 1000)
    written = b""
    pages, offset = [], 0
    for i in range(300):
        line = b"line %04d\n" % i
        job_log.write(line)
        written += line
        assert path.stat().st_size <= 1000
        if i % 7 == 0:  # a reader follows along while old output is dropped
            data, offset_next = read(path, offset, 64)
            pages.append((offset_next - len(data), data))
            offset = offset_next
    job_log.close()

    while True:
        data, offset_next = read(path, offset, 64)
        if not data:
            break
        pages.append((offset_next - len(data), data))
        offset = offset_next
    assert offset == len(written)
    for start_at, data in pages:  # every page is what was written at that offset
        assert data == written[start_at:start_at + len(data)]
    starts = [s for s, _ in pages]
    assert starts == sorted(starts) and len(set(starts)) == len(starts)

    # an offset inside the dropped part starts at the oldest byte kept, on a line start
    data, end = read(path, 0, 10_000)
    assert end == len(written) and written.endswith(data)
    assert 0 < len(data) <= 1000 and data.startswith(b"line ")
    assert read(tmp_path / "missing.log", 42, 10) == (b"", 42)


def test_log_takes_concurrent_writers_whole(tmp_path):
    path = tmp_path / "job.log"
    job_log = JobLog(path, 4000)

    def writer(n: int) -> None:
        for i in range(200):
            job_log.write(b"writer %d line %03d\n" % (n, i))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    job_log.close()
    data, end = read(path, 0, 10_000)
    assert end == 4 * 200 * len(b"writer 0 line 000\n")
    assert 0 < len(data) <= 4000
    assert all(line.startswith(b"writer ") and len(line) == 17 for line in data.splitlines())


def test_log_reopened_appends_and_keeps_offsets(tmp_path):
    path = tmp_path / "job.log"
    first = JobLog(path, 100)
    first.write(b"x" * 150)
    first.close()
    again = JobLog(path, 100)
    again.note("phase git_sync")
    again.close()
    data, end = read(path, 0, 1000)
    assert end == 150 + len(b"\n[jobd 2026-11-22T10:00:00Z] phase git_sync\n")
    assert re.search(rb"\[jobd \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\] phase git_sync\n$", data)


def test_note_writes_a_jobd_line(log):
    log.note("$ git fetch --progress origin")
    log.write(b"output\n")
    log.note("phase indexing")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()).encode()
    data = read(log.path, 0, 1000)[0]
    # the stamp is the wall clock: a second may tick between the notes and the read
    assert re.sub(rb"\[jobd [0-9T:Z-]{20}\]", b"[jobd " + stamp + b"]", data) == (
        b"[jobd %s] $ git fetch --progress origin\noutput\n[jobd %s] phase indexing\n"
        % (stamp, stamp))
    assert all(is_note(line) for line in data.decode().splitlines() if line != "output")


def test_story_lines_wait_for_a_log_and_are_dropped_without_one(tmp_path):
    """A job that never writes output gets no file; one that does gets its story first."""
    quiet = JobLog(tmp_path / "quiet.log", 1000)
    quiet.story("attempt 1 started", 1_795_000_000_000_000)
    quiet.close()
    assert not (tmp_path / "quiet.log").exists()
    busy = JobLog(tmp_path / "busy.log", 1000)
    busy.story("attempt 1 started", 1_795_000_000_000_000)
    busy.write(b"out\n")
    busy.story("ended completed", 1_795_000_001_000_000)
    busy.close()
    assert read(tmp_path / "busy.log", 0, 1000)[0] == (
        b"[jobd 2026-11-18T11:06:40Z] attempt 1 started\nout\n"
        b"[jobd 2026-11-18T11:06:41Z] ended completed\n")


def test_a_job_log_nothing_was_written_to_leaves_no_file(tmp_path):
    log = JobLog(tmp_path / "logs" / "quiet.log", 1024)
    log.close()
    assert not (tmp_path / "logs" / "quiet.log").exists()
    assert read(tmp_path / "logs" / "quiet.log", 0, 100) == (b"", 0)
    with pytest.raises(ValueError, match="closed"):
        log.write(b"late\n")


@pytest.mark.parametrize("offset", [4, 5, 1 << 40, 2**63 - 1, 2**63, 2**64])
def test_read_at_or_past_the_end_is_an_empty_page(tmp_path: Path, offset: int) -> None:
    log = JobLog(tmp_path / "job.log", 1 << 20)
    log.write(b"abcd")
    assert read(log.path, offset, 1 << 20) == (b"", offset)
    assert read(log.path, 2, 1 << 20) == (b"cd", 4)


# --------------------------------------------------------------- where a log lives, its end

def test_a_job_s_log_is_its_id_dot_log_in_the_log_folder(tmp_path):
    assert joblogs.path(tmp_path / "logs", "0b7c") == tmp_path / "logs" / "0b7c.log"


def test_delete_removes_the_log_its_base_and_an_interrupted_trim_s_files(tmp_path):
    folder = tmp_path / "logs"
    log = JobLog(joblogs.path(folder, "job-1"), 100)
    log.write(b"x" * 99 + b"\n" + b"y" * 99 + b"\n")  # past the cap: trimmed, a .base kept
    log.close()
    neighbour = JobLog(joblogs.path(folder, "job-10"), 100)
    neighbour.write(b"kept\n")
    neighbour.close()
    # a trim interrupted by a crash leaves its new log and its new base beside the pair
    (folder / "job-1.log.tmp").write_bytes(b"half a trim")
    (folder / "job-1.log.base.tmp").write_text("100")
    assert sorted(p.name for p in folder.iterdir()) == [
        "job-1.log", "job-1.log.base", "job-1.log.base.tmp", "job-1.log.tmp", "job-10.log"]
    joblogs.delete(folder, ["job-1"])
    assert sorted(p.name for p in folder.iterdir()) == ["job-10.log"]
    joblogs.delete(folder, ["job-1"])  # gone already: nothing to do
    joblogs.delete(folder / "never-made", ["job-10"])  # no job ever wrote a log there


def test_tail_is_the_last_line_a_program_printed_not_a_jobd_note(tmp_path, log):
    assert joblogs.tail(log.path) == ""  # no file yet
    log.note("$ git fetch origin")
    assert joblogs.tail(log.path) == ""  # only jobd's own lines
    log.write(b"Receiving objects: 10%\rReceiving objects: 20%\rfatal: no such remote  \n")
    log.story("ended failed")
    assert joblogs.tail(log.path) == "fatal: no such remote"
    log.write(b"z" * 1000)
    assert joblogs.tail(log.path) == "z" * 300  # it goes into an error message: bounded
    # from an offset on: what the program started there printed, not an earlier one's
    log.write(b"\n")
    start = joblogs.end(log.path)
    log.note("$ sh -c 'exit 2'")
    assert joblogs.tail(log.path, start) == ""
    log.write(b"its own\n")
    assert joblogs.tail(log.path, start) == "its own"


@pytest.mark.parametrize("cap", [1 << 30, 100_000])
def test_a_chatty_program_s_log_is_exactly_what_it_printed(tmp_path, cap):
    """Half a line per write, flushed each time: what each read of the pipe completes
    reaches the log in one write, nothing lost, reordered or doubled; with a cap, the log
    is the end of it all and offsets count everything."""
    child = tmp_path / "chatty.py"
    child.write_text(
        "import sys\n"
        "for i in range(20000):\n"
        "    line = b'line %05d %s\\n' % (i, b'x' * (i % 37))\n"
        "    for part in (line[:7], line[7:]):\n"
        "        sys.stdout.buffer.write(part)\n"
        "        sys.stdout.flush()\n")
    printed = b"".join(b"line %05d %s\n" % (i, b"x" * (i % 37)) for i in range(20000))
    log = JobLog(tmp_path / "chatty.log", cap)
    done = run([sys.executable, str(child)], cwd=None, env=None, log=log,
               stop=threading.Event(), deadline=None, grace=1.0)
    log.close()
    assert done.returncode == 0
    data, end = read(log.path, 0, 1 << 30)
    assert end == len(printed)
    if cap > len(printed):
        assert data == printed
    else:
        assert printed.endswith(data) and len(data) <= cap
        assert data.startswith(b"line ")  # the kept part opens on a line


def test_since_is_what_was_written_after_an_offset_even_across_a_trim(tmp_path):
    log = JobLog(tmp_path / "job.log", 100)
    assert joblogs.end(log.path) == 0  # no file yet
    log.write(b"a" * 59 + b"\n")
    start = joblogs.end(log.path)
    assert start == 60
    log.write(b"fatal: one\n")
    assert joblogs.since(log.path, start, 1000) == b"fatal: one\n"
    log.write(b"b" * 79 + b"\n")  # past the cap: the log is cut back to its end
    assert joblogs.end(log.path) == 60 + 11 + 80
    # the offset fell in the dropped part: what is kept of the output since
    assert joblogs.since(log.path, start, 1000) == b"b" * 74 + b"\n"
    assert joblogs.since(log.path, start, 10) == b"b" * 9 + b"\n"  # its last bytes
    log.close()



def test_a_job_log_asks_once_whether_its_file_exists(tmp_path, monkeypatch):
    """Whether a job's log is there already (a retry's) is asked once per attempt, not
    on every story line: a noop job tells two and had two stat calls for them."""
    looked: list[Path] = []
    real = Path.exists
    monkeypatch.setattr(Path, "exists", lambda self: looked.append(self) or real(self))
    quiet = JobLog(tmp_path / "quiet.log", 1000)
    for n in range(3):
        quiet.story(f"line {n}", 1_795_000_000_000_000)
    quiet.close()
    assert looked.count(tmp_path / "quiet.log") == 1
    assert not (tmp_path / "quiet.log").exists()  # held, and dropped without output


# --------------------------------------------------------------- a trim a crash cut short

_CRASHING_TRIM = """
import os, signal, sys
from jobd import joblogs
renames, kill_after = 0, int(sys.argv[2])
real = os.replace
def replace(src, dst):
    global renames
    if renames == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
    renames += 1
joblogs.os.replace = replace
log = joblogs.JobLog(sys.argv[1], 150)
log.write(b"a" * 59 + b"\\n" + b"b" * 59 + b"\\n")  # fits the cap of 150
log.write(b"c" * 59 + b"\\n")                      # 180 bytes: trimmed to the last 60
"""


@pytest.mark.parametrize("kill_after", [0, 1])
def test_a_trim_killed_part_way_leaves_the_log_readable_at_its_offsets(tmp_path, kill_after):
    """A daemon killed (SIGKILL, a real process) in a trim, before its first rename or
    between its two: reads give every byte at its absolute offset, and the log's next
    writer goes on from there, leaving the pair alone on disk."""
    log = tmp_path / "job.log"
    crashed = subprocess.run([sys.executable, "-c", _CRASHING_TRIM, str(log), str(kill_after)],
                             capture_output=True, text=True, timeout=30)
    assert crashed.returncode == -9, crashed.stderr
    names = sorted(p.name for p in tmp_path.iterdir())
    old = b"a" * 59 + b"\n" + b"b" * 59 + b"\n"
    if kill_after == 0:  # the trim's files written, nothing renamed: the old pair stands
        assert names == ["job.log", "job.log.base.tmp", "job.log.tmp"]
        assert read(log, 0, 1000) == (old, 120)  # the trimming write is lost with it
        end = 120
    else:  # the new log in place, its base not yet
        assert names == ["job.log", "job.log.base.tmp"]
        assert read(log, 0, 1000) == (b"c" * 59 + b"\n", 180)
        assert read(log, 150, 1000) == (b"c" * 29 + b"\n", 180)
        end = 180
    assert joblogs.end(log) == end
    again = JobLog(log, 1000)
    again.write(b"d\n")
    again.close()
    assert joblogs.end(log) == end + 2
    assert read(log, end - 1, 10) == (b"\nd\n", end + 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == (
        ["job.log"] if kill_after == 0 else ["job.log", "job.log.base"])
