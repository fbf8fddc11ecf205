"""Several real jobd nodes on one PostgreSQL database (SPEC §11), for the cluster tests:
starting them, freezing and killing them, recording every run of a job's program, and
checking the cluster's rules in the database throughout a test.

- ``Cluster``: N ``jobd serve`` processes (``Node``, a ``conftest.Daemon``) on one
  database, each with its own state folder, socket and log, all sharing one repositories
  folder (``[sync] repo_path_template`` and ``allowed_roots`` point there, as SPEC §11's
  shared storage), and short ``[cluster]`` times (``TIMING``) so that a lease runs out
  in seconds. Cluster-wide settings are given once and written into every node's config;
  ``workers`` is per node.
- ``Node.freeze``/``thaw``/``kill``: SIGSTOP, SIGCONT and kill -9 of one node's jobd
  (its supervisors and job processes are separate processes, and are not touched).
- ``RunLedger``: a job program that records each of its runs in a folder — which node
  ran it, its pid, and whether another run of the same job held the job's lock at that
  moment (a job running twice at once). It is also a fake indexer for ``sync`` jobs.
- ``Checker``: a thread that samples the database's rules in one snapshot, again and
  again, while a test runs: never more running per user than ``max_running_per_user``
  across all nodes, never two exclusive jobs running on one repository, never more
  running on a node than its ``workers``, and every running job owned by a node that
  holds its lease or has not been rescued yet. The repository rule reads the jobs'
  ``options.repo_path`` (what the submit resolved), not the store's own column, so a
  store that fills its column wrongly is caught too.

A test module that uses it opts into the PostgreSQL fixtures with
``pytest_plugins = ["pg"]``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Sequence


from conftest import Daemon

__all__ = ["CANCEL_GRACE", "TIMING", "Checker", "Cluster", "Node", "RunLedger", "Timing",
           "connect", "toml_table"]

#: SIGTERM, then SIGKILL after this, on every node (a cluster-wide setting)
CANCEL_GRACE = 0.5


@dataclasses.dataclass(frozen=True)
class Timing:
    """``[cluster]``: a node's lease, how often it renews it, how often it polls."""
    lease: float = 3.0
    heartbeat: float = 0.5
    poll: float = 0.5

    @property
    def rescue_after(self) -> float:
        """The earliest a lost node's jobs may be rescued, counted from its last lease
        renewal: the lease, then ``cancel_grace`` + 1 s (SPEC §11)."""
        return self.lease + CANCEL_GRACE + 1.0

    @property
    def deadline(self) -> float:
        """How long after its last successful heartbeat a node's supervisors stop its
        jobs' processes: ``lease`` − ``heartbeat``."""
        return self.lease - self.heartbeat


#: short enough that a lost node is rescued within seconds
TIMING = Timing()

#: the exclusive built-in job types (SPEC §5): one at a time per repository
EXCLUSIVE_BUILTINS = ("sync", "index")


def connect(dsn: str) -> Any:
    import psycopg
    return psycopg.connect(dsn, autocommit=True)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: the same escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML form for {value!r}")


def toml_table(name: str, values: dict[str, Any]) -> str:
    """``[name]`` and its keys, for a config file."""
    return f"[{name}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in values.items())


class Node(Daemon):
    """One jobd of a cluster: its own state folder, socket and log."""

    def __init__(self, root: Path, name: str, workers: int, config: str) -> None:
        # JOBD_TEST_NODE reaches every job program (jobd passes its environment on):
        # the run ledger notes which node ran each run with it
        super().__init__(root, config, env={"JOBD_TEST_NODE": name})
        self.name = name
        self.workers = workers
        self.frozen = False

    def __repr__(self) -> str:
        return f"Node({self.name})"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def freeze(self) -> None:
        """SIGSTOP jobd alone: its supervisors and their programs go on."""
        os.kill(self.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        self.frozen = False

    def events(self, name: str) -> list[dict[str, Any]]:
        """The node's structlog events called ``name``, oldest first."""
        return [e for e in self.log_events() if e.get("event") == name]

    def node_ids(self) -> list[int]:
        """Every node id this jobd registered (a new one per start and per lost lease)."""
        return [int(e["node_id"]) for e in self.events("node_registered")]

    def halt(self) -> None:
        """Stop it however it is: thawed first (a stopped process never handles SIGTERM),
        then SIGTERM, then SIGKILL."""
        if not self.alive():
            return
        if self.frozen:
            self.thaw()
        self.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        try:
            self.proc.wait(20)  # type: ignore[union-attr]
        except subprocess.TimeoutExpired:
            self.proc.kill()  # type: ignore[union-attr]
            self.proc.wait()  # type: ignore[union-attr]


class RunLedger:
    """A job program that records its runs, and what they recorded.

    Each run of ``program(...)`` takes an exclusive lock on ``<job id>.lock`` for as long
    as it runs (a run that finds it held by another run of the same job writes
    ``.double``), then writes ``<job id>.<pid>.run`` (the node that ran it), and ``.end``
    when it finishes on its own: once a run is seen, it holds the lock. It stops after ``seconds``, or earlier once
    ``release()`` (every job) or ``release(job_id)`` made its release file. With
    ``progress`` it prints a progress line every 50 ms stamped with the machine's
    monotonic clock (the same clock for every process here), for latency figures.
    """

    SCRIPT = """\
set -u
f="{folder}/$JOBD_JOB_ID"
exec 9>>"$f.lock"
flock -n 9 || echo "${{JOBD_TEST_NODE:-?}}" > "$f.$$.double"
echo "${{JOBD_TEST_NODE:-?}}" > "$f.$$.run"
echo "ran on ${{JOBD_TEST_NODE:-?}}"
i=0
while [ ! -e "{folder}/release" ] && [ ! -e "$f.release" ] && [ "$i" -lt "$1" ]; do
    sleep 0.05
    i=$((i + 1))
done
echo '{{"progress": 100, "message": "ran"}}'
echo ok > "$f.$$.end"
"""
    PROGRESS = """\
import json, os, sys, time
folder, seconds = sys.argv[1], float(sys.argv[2])
job = os.environ["JOBD_JOB_ID"]
base = os.path.join(folder, f"{job}.{os.getpid()}")
with open(base + ".run", "w") as f:
    f.write(os.environ.get("JOBD_TEST_NODE", "?"))
n, end = 0, time.monotonic() + seconds
while time.monotonic() < end and not os.path.exists(os.path.join(folder, "release")):
    n += 1
    print(json.dumps({"progress": min(99.0, n * 0.5), "message": repr(time.monotonic())}),
          flush=True)
    time.sleep(0.05)
open(base + ".end", "w").close()
"""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o777)
        self.script = folder.parent / "ledger.sh"
        self.script.write_text(self.SCRIPT.format(folder=folder))
        self.progress_script = folder.parent / "ledger_progress.py"
        self.progress_script.write_text(self.PROGRESS)

    def program(self, seconds: float = 30, progress: bool = False) -> list[str]:
        """The argv of a job program (a ``command``'s, or a sync's indexer)."""
        if progress:
            import sys
            return [sys.executable, str(self.progress_script), str(self.folder), str(seconds)]
        # the script counts 50 ms ticks: sh has no fractions
        return ["sh", str(self.script), str(max(1, round(seconds * 20)))]

    def release(self, job_id: str | None = None) -> None:
        (self.folder / (f"{job_id}.release" if job_id else "release")).touch()

    def runs(self, job_id: str) -> list[tuple[str, int]]:
        """Every run of the job's program so far: (node name, pid), in pid order."""
        found = []
        for path in self.folder.glob(f"{job_id}.*.run"):
            found.append((path.read_text().strip(), int(path.name.split(".")[-2])))
        return sorted(found, key=lambda r: r[1])

    def ended(self, job_id: str) -> int:
        """How many runs of the job finished on their own."""
        return len(list(self.folder.glob(f"{job_id}.*.end")))

    def doubles(self) -> list[str]:
        """Runs that started while another run of the same job held its lock."""
        return sorted(p.name for p in self.folder.glob("*.double"))

    def node_of(self, job_id: str) -> str | None:
        """The node of the job's latest run, if it ran."""
        runs = self.runs(job_id)
        return runs[-1][0] if runs else None


class Cluster:
    """N jobd nodes on the database ``dsn``, sharing ``root/shared/repos``."""

    def __init__(self, root: Path, dsn: str, *, execution: dict[str, Any] | None = None,
                 sync: dict[str, Any] | None = None, sections: str = "",
                 timing: Timing = TIMING) -> None:
        self.root = root
        self.dsn = dsn
        self.shared = root / "shared"
        self.repos = self.shared / "repos"
        self.repos.mkdir(parents=True, exist_ok=True)
        self.ledger = RunLedger(root / "ledger")
        #: cluster-wide settings, the same in every node's config
        self.execution = {"cancel_grace": f"{CANCEL_GRACE}s", "shutdown_grace": "5s",
                          **(execution or {})}
        self.sync = {"repo_path_template": f"{self.repos}/{{user_id}}/{{project_id}}",
                     "allowed_roots": [str(self.repos)], **(sync or {})}
        self.sections = sections
        self.timing = timing
        self.nodes: list[Node] = []

    @property
    def max_running_per_user(self) -> int:
        return int(self.execution.get("max_running_per_user", 3))

    def config(self, state: Path, workers: int, execution: dict[str, Any] | None = None
               ) -> str:
        """A node's config: the cluster-wide settings (``execution`` overrides some, to
        make a node that differs), its own ``workers`` and state folder."""
        parts = [toml_table("execution", {"workers": workers, **self.execution,
                                          **(execution or {})}),
                 toml_table("storage", {"backend": "postgres", "dsn": self.dsn,
                                        "state_dir": str(state)}),
                 toml_table("sync", self.sync),
                 toml_table("cluster", {"lease": f"{self.timing.lease}s",
                                        "heartbeat": f"{self.timing.heartbeat}s",
                                        "poll": f"{self.timing.poll}s"})]
        return "\n".join(parts) + self.sections

    def add(self, workers: int = 2, *, start: bool = True,
            execution: dict[str, Any] | None = None) -> Node:
        """A new node (named a, b, c, ...), started unless ``start`` is false."""
        name = "abcdefghijklmnopqrstuvwxyz"[len(self.nodes)]
        root = self.root / name
        node = Node(root, name, workers, self.config(root / "state", workers, execution))
        self.nodes.append(node)
        return node.start() if start else node

    def start(self, count: int, workers: int = 2) -> list[Node]:
        return [self.add(workers) for _ in range(count)]

    def close(self) -> None:
        for node in self.nodes:
            node.halt()

    def by_name(self, name: str) -> Node:
        (node,) = [n for n in self.nodes if n.name == name]
        return node

    def owner(self, job_id: str) -> Node | None:
        """The node whose id the job's row names as running it (None: not running)."""
        rows = self.rows("SELECT node_id FROM jobs WHERE id = %s AND status = 'running'",
                         job_id)
        if not rows or rows[0][0] is None:
            return None
        for node in self.nodes:
            if rows[0][0] in node.node_ids():
                return node
        return None

    def others(self, node: Node) -> list[Node]:
        return [n for n in self.nodes if n is not node and n.alive() and not n.frozen]

    def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        with connect(self.dsn) as conn:
            return [tuple(r) for r in conn.execute(sql, args).fetchall()]

    @contextlib.contextmanager
    def checked(self, exclusive: Sequence[str] = EXCLUSIVE_BUILTINS, every: float = 0.01
                ) -> Iterator["Checker"]:
        """Sample the rules throughout the block; fail the test on any broken one, or
        on a job program that ran twice at once."""
        checker = Checker(self.dsn, max_running_per_user=self.max_running_per_user,
                          exclusive=tuple(exclusive), every=every)
        with checker:
            yield checker
        checker.assert_held()
        doubles = self.ledger.doubles()
        assert not doubles, f"job programs ran twice at once: {doubles}"


#: one snapshot's broken rules: (rule, what, how many)
_BROKEN = """
SELECT 'user', user_id, count(*) FROM jobs WHERE status = 'running'
GROUP BY user_id HAVING count(*) > %(per_user)s
UNION ALL
SELECT 'repository', options::jsonb->>'repo_path', count(*) FROM jobs
WHERE status = 'running' AND type = ANY(%(exclusive)s)
GROUP BY options::jsonb->>'repo_path' HAVING count(*) > 1
UNION ALL
SELECT 'node', j.node_id::text, count(*) FROM jobs j JOIN nodes n ON n.id = j.node_id
WHERE j.status = 'running' GROUP BY j.node_id, n.workers HAVING count(*) > n.workers
UNION ALL
SELECT 'owner', j.id, 1 FROM jobs j WHERE j.status = 'running' AND NOT EXISTS (
    SELECT 1 FROM nodes n WHERE n.id = j.node_id AND n.ended_at IS NULL)
"""
#: the same snapshot's high-water marks, to show the run came close to each limit
_PEAKS = """
SELECT coalesce((SELECT max(n) FROM (SELECT count(*) n FROM jobs WHERE status = 'running'
                                     GROUP BY user_id) u), 0),
       coalesce((SELECT max(n) FROM (SELECT count(*) n FROM jobs WHERE status = 'running'
                                     AND type = ANY(%(exclusive)s)
                                     GROUP BY options::jsonb->>'repo_path') r), 0),
       (SELECT count(*) FROM jobs WHERE status = 'running'),
       (SELECT count(*) FROM jobs WHERE status = 'queued'
        AND type = ANY(%(exclusive)s) AND options::jsonb->>'repo_path' IN (
            SELECT options::jsonb->>'repo_path' FROM jobs
            WHERE status = 'running' AND type = ANY(%(exclusive)s)))
"""


class Checker(threading.Thread):
    """Samples the cluster's rules in the database until stopped.

    Each sample is one repeatable-read snapshot: the broken rules (none, or each with
    what broke it) and the peaks (most running for one user, on one repository, in all;
    exclusive jobs waiting on a busy repository), so a test can show it reached the
    limits it claims to check.
    """

    def __init__(self, dsn: str, *, max_running_per_user: int, exclusive: tuple[str, ...],
                 every: float = 0.01) -> None:
        super().__init__(name="cluster-checker", daemon=True)
        self.dsn = dsn
        self.params = {"per_user": max_running_per_user, "exclusive": list(exclusive)}
        self.every = every
        self.samples = 0
        self.errors = 0
        #: (seconds since the start, rule, what, how many)
        self.broken: list[tuple[float, str, str, int]] = []
        self.peak_user = self.peak_repository = self.peak_running = self.peak_waiting = 0
        self._done = threading.Event()
        self._began = time.monotonic()

    def __enter__(self) -> "Checker":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self.join(10)

    def run(self) -> None:
        import psycopg
        conn = None
        while not self._done.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.dsn, autocommit=True)
                self.sample(conn)
            except psycopg.OperationalError:
                # PostgreSQL restarting under a test: sample again once it is back
                self.errors += 1
                conn = None
                time.sleep(0.05)
            self._done.wait(self.every)
        if conn is not None:
            conn.close()

    def sample(self, conn: Any) -> None:
        with conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            broken = conn.execute(_BROKEN, self.params).fetchall()
            user, repository, running, waiting = conn.execute(_PEAKS, self.params).fetchone()
        at = time.monotonic() - self._began
        self.broken.extend((round(at, 3), rule, what, n) for rule, what, n in broken)
        self.peak_user = max(self.peak_user, user)
        self.peak_repository = max(self.peak_repository, repository)
        self.peak_running = max(self.peak_running, running)
        self.peak_waiting = max(self.peak_waiting, waiting)
        self.samples += 1

    def assert_held(self, min_samples: int = 20) -> None:
        assert self.samples >= min_samples, (
            f"the checker took only {self.samples} samples ({self.errors} failed reads)")
        assert not self.broken, f"rules broken in {len(self.broken)} samples, first: " \
                                f"{self.broken[:10]}"
