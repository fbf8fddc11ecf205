#!/usr/bin/env bash
# jobd's main job, end to end: start the daemon (its SQLite database in a temp folder),
# make a real git repository and a clone of it, commit upstream, then sync the clone
# through jobd with live progress: git fetch + merge, then the built-in indexer.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
bin="${JOBD_BIN:-$here/.venv/bin}"
command -v git >/dev/null || { echo "demo: git is needed (apt-get install git)" >&2; exit 1; }

work="$(mktemp -d /tmp/jobd-demo.XXXXXX)"
export JOBD_SOCKET="$work/jobd.sock" JOBD_DB="$work/state/jobd.db" JOBD_CONFIG="$work/jobd.toml"
export GIT_AUTHOR_NAME=demo GIT_AUTHOR_EMAIL=demo@example.invalid
export GIT_COMMITTER_NAME=demo GIT_COMMITTER_EMAIL=demo@example.invalid
user="$(id -un)"
printf '[execution]\nworkers = 2\n' > "$JOBD_CONFIG"

"$bin/jobd" --log-format json 2> "$work/jobd.log" &
daemon=$!
# the two 3000-file repositories go (about 40 MB); the daemon's log and database stay
trap 'kill -TERM $daemon 2>/dev/null; wait $daemon 2>/dev/null; rm -rf "$work/upstream" "$work/state/repos"
      echo "daemon stopped; its log: $work/jobd.log, its database: $JOBD_DB"' EXIT
for _ in $(seq 100); do "$bin/jobctl" ping >/dev/null 2>&1 && break; sleep 0.1; done
"$bin/jobctl" ping

echo "== a repository with 3000 files, and its clone where jobd keeps repositories"
up="$work/upstream"
git init -q -b main "$up"
for d in $(seq 30); do
    mkdir -p "$up/src/pkg$d"
    for f in $(seq 100); do printf 'def f%s():\n    return %s\n' "$f" "$d" > "$up/src/pkg$d/m$f.py"; done
done
git -C "$up" add -A && git -C "$up" commit -q -m "initial import"
clone="$work/state/repos/$user/demo"
git clone -q "$up" "$clone"

echo "== first sync: indexes every file"
"$bin/jobctl" sync demo --wait

echo "== upstream adds, changes and deletes files"
for f in $(seq 40); do echo "new $f" > "$up/src/pkg1/new$f.py"; done
for f in $(seq 60); do echo "# changed" >> "$up/src/pkg2/m$f.py"; done
git -C "$up" rm -q src/pkg3/m1.py src/pkg3/m2.py
git -C "$up" add -A && git -C "$up" commit -q -m "upstream work"

echo "== second sync: fetch + fast-forward, then rehash only what changed"
"$bin/jobctl" sync demo --wait
job="$("$bin/jobctl" --json list --type sync --limit 1 | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["id"])')"
"$bin/jobctl" status "$job"
echo "== its history"
"$bin/jobctl" events "$job"
echo "== its result"
"$bin/jobctl" --json status "$job" | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["result"], indent=2))'
