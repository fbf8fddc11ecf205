"""The state folder: one daemon per folder, and who may look inside (SPEC §1).

``jobd serve`` and ``jobd db recover`` hold ``flock(LOCK_EX | LOCK_NB)`` on
``<state dir>/jobd.lock`` for their whole run, from before the database is opened or the
socket bound: a second daemon on the same folder — whatever its socket — and a recover
while a daemon runs refuse at once, naming the database and the holder's pid, and touch
nothing. The kernel drops the lock when its holder dies, so a lock file left by a crash
is simply taken over. Outside systemd (which makes ``StateDirectory=`` itself) a new
state folder is made 0700: the database, every user's logs and repositories live there.
A SQLite database outside ``[storage] state_dir`` has its folder locked too, so that no
two daemons share the file whatever their state folders; with PostgreSQL the lock is
the node's state folder's alone (the store refuses a second node on the database).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path
from typing import Iterator

from jobd.config import Config

__all__ = ["InUse", "StateLock", "LOCK_NAME", "locked", "make_private_dir",
           "private_dir_problem"]

LOCK_NAME = "jobd.lock"


class InUse(Exception):
    """Another jobd process holds the state folder's lock."""


def private_dir_problem(path: Path, uid: int) -> str | None:
    """What makes ``path`` not a folder only ``uid`` controls ("is a symbolic link", ...),
    or None when it is one.

    The rule for the per-user socket folder (``/tmp/jobd-$UID``, ``$XDG_RUNTIME_DIR/jobd``),
    applied by the daemon before it binds and by the client before it connects: a real
    folder, not a symlink, owned by ``uid``, not writable by group or others. Anyone else
    could put a socket of their own there, or swap the folder.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "does not exist"
    except OSError as e:
        return f"cannot be examined ({e.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link, not a folder"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a folder"
    if st.st_uid != uid:
        return f"is owned by uid {st.st_uid}, not by uid {uid}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = "others" if st.st_mode & stat.S_IWOTH else "its group"
        return f"is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) as 0700, whatever the umask; leave an existing one."""
    if path.is_dir():
        return
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)


class StateLock:
    """``flock`` on ``<folder>/jobd.lock`` holding the owner's pid and its database (as
    ``Config.database`` names it), for a process's life."""

    def __init__(self, folder: Path, database: str, *, create: bool = True,
                 own_folder: str = "--db") -> None:
        self.path = folder / LOCK_NAME
        self.database = database
        #: make a missing folder (a daemon's first start); a tool that works on an
        #: existing database does not
        self.create = create
        #: how to give a second daemon a folder of its own (the setting that moves it)
        self.own_folder = own_folder
        self._fd: int | None = None

    def acquire(self) -> "StateLock":
        """Take the lock, or raise ``InUse`` naming the database and the holder's pid."""
        try:
            if self.create:
                make_private_dir(self.path.parent)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as e:
            raise OSError(e.errno, f"{self.path}: cannot open the lock file: "
                                   f"{e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            pid, database = _holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                who = f"pid {pid}" if pid else "another process"
                folder = self.path.parent
                # the lock of a database file's own folder: the file itself is in use
                if (database is None or database == self.database) and (
                        Path(self.database).parent == folder):
                    what = f"database {self.database} is in use by jobd ({who})"
                else:  # the folder's logs and repositories are another daemon's
                    what = (f"state folder {folder} is in use by jobd ({who}, database "
                            f"{database or 'unknown'})")
                raise InUse(f"{what}; stop it first (systemctl stop jobd), or give this "
                            f"one a folder of its own ({self.own_folder})") from None
            raise
        if os.fstat(fd).st_uid == os.geteuid():
            os.fchmod(fd, 0o600)  # one left with a wider mode, jobd's own again
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n{self.database}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays for the next owner
            self._fd = None

    def __enter__(self) -> "StateLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def locked(config: Config, *, create: bool = True) -> Iterator[None]:
    """Hold the locks of the folders a daemon on ``config`` owns: its state folder, and a
    SQLite database's folder when that lies elsewhere. ``create``: make missing folders
    (a daemon's first start; a tool on an existing database makes none)."""
    # each with the setting that moves it; a database file's first, the one most shared
    folders = {config.db.parent: "--db"} if config.storage.backend == "sqlite" else {}
    folders.setdefault(config.state_dir,
                       "[storage] state_dir" if config.storage.state_dir else "--db")
    # the folders that exist first: one in use refuses the start before any is made
    with contextlib.ExitStack() as held:
        for folder, own_folder in sorted(folders.items(), key=lambda f: not f[0].is_dir()):
            held.enter_context(StateLock(folder, config.database, create=create,
                                         own_folder=own_folder))
        yield


def _holder(fd: int) -> tuple[int | None, str | None]:
    """(pid, database) the lock's holder wrote into it, each None when unreadable."""
    try:
        lines = os.pread(fd, 4096, 0).decode("utf-8", "replace").splitlines()
    except OSError:
        return None, None
    try:
        pid = int(lines[0])
    except (ValueError, IndexError):
        pid = None
    return pid, (lines[1] if len(lines) > 1 and lines[1] else None)
