"""scripts/bench end to end, as a developer runs it: its own PostgreSQL, the pooler, pgbench, the
report with CPU figures, and nothing left running or on disk afterwards (the table's own logic
is in tests/unit/test_bench.py)."""

import os
import re
import shutil
import subprocess
import sys

import psutil
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def assert_nothing_left(stderr: str) -> None:
    """The run's working directory (it names it on stderr) is gone, and no process uses it."""
    workdir = re.search(r"working in (\S+)", stderr).group(1)
    assert not os.path.exists(workdir)
    left = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if any(workdir in arg for arg in proc.info["cmdline"] or []):
            left.append(proc.info)
    assert not left


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
    assert_nothing_left(run.stderr)


@pytest.mark.timeout(700)
@pytest.mark.skipif(shutil.which("valgrind") is None,
                    reason="valgrind is not installed (scripts/test installs it when run as root)")
def test_instructions_counts_a_pooled_backend_under_callgrind_and_leaves_nothing_behind(tmp_path):
    """scripts/instructions, one case, few transactions: a count per transaction that a pooled
    backend could run (tens of thousands of instructions; the start-up, logins and shut-down,
    tens of millions, are subtracted out), the same in the report file and on stdout."""
    results = tmp_path / "results"
    run = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "instructions.py"), "--cases", "1:prepared",
         "--transactions", "250", "--results-dir", str(results), "--timeout", "600"],
        capture_output=True, text=True, timeout=660, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    (report,) = results.glob("instructions-*.md")
    assert report.read_text() == run.stdout[:-1]   # print()'s newline
    row = next(line for line in run.stdout.splitlines() if line.startswith("| 1, `-M prepared`"))
    per_transaction = float(row.strip("|").split("|")[1].replace(",", ""))
    assert 5_000 < per_transaction < 500_000, row
    assert_nothing_left(run.stderr)
