"""scripts/bench end to end, as a developer runs it: its own PostgreSQL, the pooler, pgbench, the
report with CPU figures, and nothing left running or on disk afterwards (the table's own logic
is in tests/unit/test_bench.py)."""

import os
import re
import subprocess
import sys

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_a_quick_run_reports_tps_and_cpu_and_leaves_nothing_behind(tmp_path):
    results = tmp_path / "results"
    run = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "bench.py"), "--quick", "--only", "select-10",
         "--protocol", "simple", "--duration", "2", "--skip", "pgbouncer", "--results-dir", str(results),
         "--timeout", "240"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]

    # The report: on stdout and in the results directory, latest.md a copy of the run's file.
    (report,) = results.glob("bench-*.md")
    assert (results / "latest.md").read_text() == report.read_text() == run.stdout[:-1]   # print()'s newline
    assert list(results.glob("bench-*.pgbench.log"))
    rows = {cells[0]: cells[1:] for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in run.stdout.splitlines()
             if line.startswith("| select-only, 10 clients"))}
    tps = rows["select-only, 10 clients (`-S -c 10 -j 2 -M simple`)"]
    direct, pooled, ratio = (float(cell.replace(",", "").split()[0]) for cell in tps)
    assert direct > 0 and pooled > 0 and abs(ratio - pooled / direct) < 0.01
    cpu = next(cells for name, cells in rows.items() if "CPU per transaction" in name)
    assert float(cpu[1]) > 0   # pgforkpool's µs per transaction, from psutil
    assert re.search(r"pgforkpool 0\.\d+\.\d+, (compiled|pure)", run.stdout)

    # Its PostgreSQL and pooler are gone, and so is its working directory.
    workdir = re.search(r"working in (\S+)", run.stderr).group(1)
    assert not os.path.exists(workdir)
    left = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if any(workdir in arg for arg in proc.info["cmdline"] or []):
            left.append(proc.info)
    assert not left
