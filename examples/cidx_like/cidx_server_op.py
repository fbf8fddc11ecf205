"""A stand-in for ``cidx-server-op``: the program a CIDX server's ``[types]`` jobs run.

CIDX has no such program yet: its golden-repository and activation work is Python inside
the server (``GoldenRepoManager``, ``RefreshScheduler``, ``ActivatedRepoManager``). This
stand-in does the git part of each operation and speaks jobd's program protocol (SPEC §5):
progress lines ``{"progress": n, "message": "..."}`` on stdout and, last, a
``{"result": {...}}`` line that becomes the job's result. A real one would also run
``cidx init``/``cidx index`` and update CIDX's registry, snapshots and aliases.

    cidx-server-op add-golden-repo ALIAS URL PATH [BRANCH]
    cidx-server-op refresh-golden-repo ALIAS PATH
    cidx-server-op remove-golden-repo ALIAS PATH
    cidx-server-op activate GOLDEN_PATH TARGET [BRANCH]
    cidx-server-op deactivate TARGET
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any


def report(progress: float, message: str) -> None:
    print(json.dumps({"progress": progress, "message": message}), flush=True)


def git(*args: str, cwd: str | None = None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, text=True,
                          capture_output=True).stdout.strip()


def activated(target: str) -> Path:
    """``target`` if it is a folder under CIDX's activated-repos; jobd does not check an
    option that is a path, so the program must."""
    root = Path(os.environ["CIDX_SERVER_DATA_DIR"], "activated-repos").resolve()
    path = Path(target).resolve()
    if root not in path.parents:
        sys.exit(f"{target} is not under {root}")
    return path


def add_golden_repo(alias: str, url: str, path: str, branch: str | None = None) -> dict[str, Any]:
    report(10, f"cloning {url}")
    git("clone", "-q", *(["-b", branch] if branch else []), "--", url, path)
    return {"alias": alias, "revision": git("rev-parse", "HEAD", cwd=path)}


def refresh_golden_repo(alias: str, path: str) -> dict[str, Any]:
    old = git("rev-parse", "HEAD", cwd=path)
    report(10, f"fetching {alias}")
    git("pull", "-q", "--ff-only", cwd=path)
    report(90, "indexing and publishing a snapshot (not in this stand-in)")
    new = git("rev-parse", "HEAD", cwd=path)
    return {"alias": alias, "old_revision": old, "new_revision": new}


def remove_golden_repo(alias: str, path: str) -> dict[str, Any]:
    shutil.rmtree(path)
    return {"alias": alias, "removed": path}


def activate(golden: str, target: str, branch: str | None = None) -> dict[str, Any]:
    path = activated(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    report(10, f"cloning {golden}")
    git("clone", "-q", "-o", "golden", *(["-b", branch] if branch else []), "--", golden,
        str(path))
    return {"path": str(path), "revision": git("rev-parse", "HEAD", cwd=str(path))}


def deactivate(target: str) -> dict[str, Any]:
    path = activated(target)
    shutil.rmtree(path)
    return {"removed": str(path)}


OPERATIONS = {"add-golden-repo": add_golden_repo, "refresh-golden-repo": refresh_golden_repo,
              "remove-golden-repo": remove_golden_repo, "activate": activate,
              "deactivate": deactivate}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in OPERATIONS:
        print(__doc__, file=sys.stderr)
        return 2
    result = OPERATIONS[argv[0]](*argv[1:])
    print(json.dumps({"result": result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
