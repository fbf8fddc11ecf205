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
    cidx-server-op activate GOLDEN_ALIAS PATH [BRANCH]
    cidx-server-op deactivate PATH

An activation's or deactivation's PATH is the activated work tree jobd was given as the
job's ``options.repo_path`` (checked under ``allowed_roots``, the key of its exclusivity);
CIDX_SERVER_DATA_DIR is the data folder its golden and activated trees lie in.
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


def data_dir() -> Path:
    return Path(os.environ["CIDX_SERVER_DATA_DIR"]).resolve()


def activated(path: str) -> Path:
    """``path`` if it is a folder under CIDX's activated-repos: jobd checked it lies under
    ``allowed_roots``, which hold the golden trees too, and a deactivation must never
    remove one of those."""
    root = data_dir() / "activated-repos"
    tree = Path(path).resolve()
    if root not in tree.parents:
        sys.exit(f"{path} is not under {root}")
    return tree


def golden(alias: str) -> Path:
    """The golden work tree of ``alias``, an ordinary option that jobd does not read as a
    path: one folder name, or the program refuses it."""
    if not alias or Path(alias).name != alias or alias in (".", ".."):
        sys.exit(f"golden alias {alias!r} is not a folder name")
    return data_dir() / "golden-repos" / alias


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


def activate(golden_alias: str, path: str, branch: str | None = None) -> dict[str, Any]:
    source, tree = golden(golden_alias), activated(path)
    tree.parent.mkdir(parents=True, exist_ok=True)
    report(10, f"cloning {golden_alias}")
    git("clone", "-q", "-o", "golden", *(["-b", branch] if branch else []), "--", str(source),
        str(tree))
    return {"path": str(tree), "revision": git("rev-parse", "HEAD", cwd=str(tree))}


def deactivate(path: str) -> dict[str, Any]:
    tree = activated(path)
    shutil.rmtree(tree)
    return {"removed": str(tree)}


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
