"""``builtin:manifest``: the default indexer, a record of every tracked file.

For each path ``git ls-files`` lists it records size, modification time, line count and
SHA-256 in one JSON document per (user, project), which the job's context loads and
saves through the store (``JobStore.load_manifest``/``save_manifest``): a SQLite jobd
keeps it in ``<state dir>/manifests/<user>/<project>.json`` (outside the repository,
replaced whole by a rename), PostgreSQL in a row every cluster node reads, the save
fenced as the job's other writes. A file whose (size, mtime_ns) is unchanged since the
last manifest keeps its old hash unless a full re-index is asked for.

Symbolic links are never followed (SPEC §3a): a tracked link is recorded with its
target string, and every directory on the way to a file is opened with O_NOFOLLOW, so a
path that passes through a link is skipped rather than read.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from jobd.handlers import Cancelled, JobContext, JobFailed, git
from jobd.models import readable
from jobd.store.errors import StateConflict, StoreError
from jobd.store.sqlite import manifest_file

if TYPE_CHECKING:
    from jobd.config import Config

__all__ = ["FORMAT", "build", "manifest_path"]

T = TypeVar("T")

#: version of the manifest document's layout
FORMAT = 1

_CHUNK = 1 << 20
_PROGRESS_EVERY_S = 0.2
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a path replaced by a FIFO in the work tree must not hang the job
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def manifest_path(config: Config, user_id: str, project_id: str) -> Path:
    """``<state dir>/manifests/<user>/<project>.json``: where a SQLite jobd keeps the
    manifest (SPEC §7), each id one segment as ``paths.segment`` encodes it
    (``org/repo`` is ``org%2Frepo.json``). ValueError if an id cannot name one."""
    return manifest_file(config.state_dir, user_id, project_id)


def build(ctx: JobContext, repo: git.Repository, *, full: bool, low: float,
          high: float) -> dict[str, Any]:
    """Write the manifest of ``repo`` for the job's (user, project); return the counts.

    Progress goes from ``low`` to ``high`` of the whole job while files are hashed; the
    job's cancellation is honoured between files (the old manifest is then kept).
    """
    job = ctx.job
    previous = _load(_stored(ctx.load_manifest), ctx)
    listed = git.run(repo, "ls-files", "-z").stdout.split(b"\0")
    # an unmerged path is listed once per stage
    names = list(dict.fromkeys(os.fsdecode(p) for p in listed if p))
    total = len(names)
    ctx.set_progress(low, f"indexing {total} tracked files")

    files: dict[str, dict[str, Any]] = {}
    rehashed = skipped = 0
    last_report = time.monotonic()
    # the folder git was checked in, not whatever its path leads to now
    root = os.open(".", _DIR_FLAGS, dir_fd=repo.fd)
    try:
        for i, name in enumerate(names):
            if ctx.cancelled:
                raise Cancelled(f"cancelled while indexing ({i} of {total} files done)")
            old = previous.get(name)
            entry, hashed = _entry(root, name, old if not full else None)
            if entry is None:
                skipped += 1
            else:
                files[name] = entry
            rehashed += hashed
            now = time.monotonic()
            if now - last_report >= _PROGRESS_EVERY_S:
                last_report = now
                ctx.set_progress(low + (high - low) * (i + 1) / total,
                                 f"indexed {i + 1} of {total} files")
    finally:
        os.close(root)

    if skipped:
        ctx.joblog.note(f"manifest: skipped {skipped} tracked paths that are missing from the "
                        "work tree, lie beyond a symbolic link, or are not files")
    document = json.dumps({
        "format": FORMAT,
        "user_id": job.user_id,
        "project_id": job.project_id,
        "repository": str(repo.path),
        "revision": git.revision(repo),
        "written_at": time.time(),
        "files": files,
    }, separators=(",", ":"))
    _stored(ctx.save_manifest, document)
    summary = {
        "files_indexed": len(files),
        "added": sum(1 for n in files if n not in previous),
        "changed": sum(1 for n, e in files.items()
                       if n in previous and _content(previous[n]) != _content(e)),
        "removed": sum(1 for n in previous if n not in files),
        "rehashed": rehashed,
    }
    ctx.set_progress(high, f"indexed {len(files)} files ({rehashed} hashed)")
    return summary


def _content(entry: dict[str, Any]) -> tuple[Any, ...]:
    """What makes two entries the same file as far as an index cares."""
    return entry.get("type"), entry.get("sha256"), entry.get("target")


def _entry(root: int, name: str, old: dict[str, Any] | None
           ) -> tuple[dict[str, Any] | None, int]:
    """(entry, 1 if hashed else 0) for one tracked path, never following a link.

    ``old`` is the previous entry to reuse when size and mtime are unchanged (None to
    hash regardless). The entry is None when the path cannot be recorded.
    """
    parts = name.split("/")
    opened: list[int] = []
    try:
        parent = root
        for part in parts[:-1]:
            parent = os.open(part, _DIR_FLAGS, dir_fd=parent)
            opened.append(parent)
        leaf = parts[-1]
        st = os.stat(leaf, dir_fd=parent, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            return {"type": "link", "target": os.readlink(leaf, dir_fd=parent)}, 0
        if not stat.S_ISREG(st.st_mode):
            return None, 0
        if (old is not None and old.get("type") == "file" and old.get("size") == st.st_size
                and old.get("mtime_ns") == st.st_mtime_ns):
            return old, 0
        fd = os.open(leaf, _FILE_FLAGS, dir_fd=parent)
        try:
            entry = _hash(fd)
        finally:
            os.close(fd)
        return entry, int(entry is not None)
    except OSError as e:
        # gone from the work tree, or a directory on the way is a symbolic link (ELOOP)
        # or a file (ENOTDIR): nothing to record
        if e.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
            return None, 0
        raise JobFailed(f"cannot read {readable(os.fsencode(name))}: {e.strerror}"
                        ) from None
    finally:
        for dir_fd in opened:
            os.close(dir_fd)


def _hash(fd: int) -> dict[str, Any] | None:
    # size and mtime from before the read: a file changed meanwhile differs next time
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        return None
    digest = hashlib.sha256()
    lines = 0
    last = b"\n"
    while chunk := os.read(fd, _CHUNK):
        digest.update(chunk)
        lines += chunk.count(b"\n")
        last = chunk[-1:]
    if last != b"\n":
        lines += 1
    return {"type": "file", "size": st.st_size, "mtime_ns": st.st_mtime_ns, "lines": lines,
            "sha256": digest.hexdigest()}


def _stored(call: Callable[..., T], *args: Any) -> T:
    """``call(*args)`` of the context's manifest storage; a store's failure fails the job
    with its reason (a fenced write is passed on: the engine records nothing for it)."""
    try:
        return call(*args)
    except StateConflict:
        raise
    except StoreError as e:
        raise JobFailed(f"manifest: {e}") from None


def _load(document: str | None, ctx: JobContext) -> dict[str, dict[str, Any]]:
    """The previous manifest's files, or nothing when there is none that can be read."""
    if document is None:
        return {}
    try:
        data = json.loads(document)
        files = data["files"]
        if data.get("format") != FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {data.get('format')!r}")
    except (ValueError, KeyError, TypeError) as e:
        ctx.joblog.note(f"manifest: ignoring the unreadable manifest of "
                        f"{ctx.job.user_id}/{ctx.job.project_id} ({e}); hashing every file")
        return {}
    return {k: v for k, v in files.items() if isinstance(v, dict)}
