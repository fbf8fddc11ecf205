"""The benchmarks still run: each script with tiny counts exits 0 and prints its table.

Not a measurement (CI's figures would mean nothing): this only keeps ``bench/`` working as
the daemon changes under it. huey is not installed in the test venv, so the engine bench
runs without its reference.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: the server cluster_bench.py starts for itself, from Debian's packages
DEBIAN_INITDB = "/usr/lib/postgresql/*/bin/initdb"

RUNS = {
    "rpc_bench.py": ["--prefill", "2000", "--requests", "50", "--stats", "5",
                     "--duration", "0.5"],
    "engine_bench.py": ["--jobs", "100", "--pickups", "10", "--cancels", "1",
                        "--updates", "10", "--no-huey"],
    "lifecycle_bench.py": ["--jobs", "200", "--warmup", "100", "--round", "100"],
    "hostile_bench.py": ["--jobs", "20", "--connections", "2", "--batch", "2",
                         "--duration", "1"],
    "changes_bench.py": ["--seconds", "0.2", "--rounds", "1", "--waiters", "3"],
    "http_bench.py": ["--requests", "20"],
    "queue_bench.py": ["--users", "20", "--queued", "10", "--rounds", "1", "--submits", "3"],
    "cluster_bench.py": ["--jobs", "100", "--pickups", "5", "--cancels", "1",
                         "--updates", "10"],
}


@pytest.mark.parametrize("script", sorted(RUNS))
def test_bench_script_runs(script: str) -> None:
    if script == "cluster_bench.py" and not glob.glob(DEBIAN_INITDB) and os.environ.get(
            "JOBD_REQUIRE_POSTGRES") != "1":
        pytest.skip("PostgreSQL's server is not installed (apt-get install postgresql)")
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), *RUNS[script]],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    title = script.removesuffix(".py") + ":"
    assert title in done.stdout, done.stdout[-3000:]
    # figures printed against their goals
    assert "goal" in done.stdout, done.stdout[-3000:]
    if script == "cluster_bench.py":  # its references measured too, not only the nodes
        for reference in ("bare claim loop", "one hop per batch, jobd's schema"):
            said = done.stdout.split(f"{reference} ...\n", 1)[1].splitlines()[0]
            assert "not measured" not in said, f"{reference}: {said}"
        # and what a claim cost the server, the nodes and the machine, in both
        cpu = next(line for line in done.stdout.splitlines()
                   if line.startswith("CPU of the nodes' claims"))
        assert cpu.count("µs PostgreSQL + ") == 2 and cpu.count("cores busy") == 2, cpu
