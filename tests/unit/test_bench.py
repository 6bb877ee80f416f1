"""scripts/bench's own logic: its options, its table, its report and the restart of a stuck
pooler (a real process listening on a real loopback socket; no pgbench, no PostgreSQL)."""

import datetime
import importlib.util
import os
import signal
import subprocess
import socket
import sys

import psutil
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Two names of one commit: two baselines whatever the clone's depth.
HEAD = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True,
                      timeout=30, check=True).stdout.strip()


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", os.path.join(REPO, "scripts", "bench.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_each_baseline_is_a_target_of_its_own_after_pgforkpool(bench):
    args = bench.parse_args(["--baseline", "HEAD", "--baseline", HEAD, "--only", "latency"])
    assert args.targets == ("direct", "pgforkpool", "pgforkpool@HEAD", f"pgforkpool@{HEAD}", "pgbouncer")
    assert [target for target, _commit in args.baselines] == ["pgforkpool@HEAD", f"pgforkpool@{HEAD}"]
    assert all(len(commit) == 40 for _target, commit in args.baselines)
    assert args.duration == 5
    assert bench.parse_args(["--only", "latency"]).targets == ("direct", "pgforkpool", "pgbouncer")


@pytest.mark.parametrize("argv, message", [
    (["--baseline", "HEAD", "--baseline", "HEAD"], "given twice"),
    (["--baseline", "no-such-revision-anywhere"], "names no commit"),
])
def test_a_wrong_baseline_is_refused_before_anything_runs(bench, capsys, argv, message):
    with pytest.raises(SystemExit) as exit:
        bench.parse_args(argv)
    assert exit.value.code == 2
    assert message in capsys.readouterr().err


def test_skipped_targets_are_neither_run_nor_compared(bench):
    args = bench.parse_args(["--baseline", "HEAD", "--skip", "direct, pgbouncer", "--only", "tpcb"])
    assert args.targets == ("pgforkpool", "pgforkpool@HEAD")
    (case,) = args.cases
    results = {(case, "pgforkpool"): [bench.RunResult(transactions=1000, tps=1000.0, cpu_us=300.0)],
               (case, "pgforkpool@HEAD"): [bench.RunResult(transactions=1000, tps=800.0, cpu_us=400.0)]}
    header, _rule, tps, cpu, _switches = bench.results_table(args.cases, results, args.targets,
                                                             ["pgforkpool@HEAD"]).splitlines()
    assert header == ("| workload | pgforkpool tps | pgforkpool@HEAD tps | pgforkpool/pgforkpool@HEAD |")
    assert tps.endswith("| 1,000 | 800 | 1.25 |") and cpu.endswith("| 0.75 |")
    assert bench.parse_args(["--skip", "pgbouncer"]).targets == ("direct", "pgforkpool")


@pytest.mark.parametrize("argv, message", [
    (["--skip", "pgforkpool"], "cannot be skipped"),
    (["--skip", "pgbouncer", "--perf"], "cannot be given with --skip pgbouncer"),
])
def test_what_cannot_be_skipped_is_refused(bench, capsys, argv, message):
    with pytest.raises(SystemExit) as exit:
        bench.parse_args(argv)
    assert exit.value.code == 2
    assert message in capsys.readouterr().err


def run(tps, cpu_us=None, error=""):
    return {"tps": tps, "cpu_us": cpu_us, "error": error}


def test_the_table_has_a_ratio_for_each_baseline(bench):
    args = bench.parse_args(["--baseline", "HEAD", "--baseline", HEAD, "--only", "tpcb"])
    (case,) = args.cases
    results = {(case, target): [bench.RunResult(transactions=1000, **fields)] for target, fields in {
        "direct": run(2000.0), "pgforkpool": run(1000.0, 300.0), "pgforkpool@HEAD": run(800.0, 400.0),
        f"pgforkpool@{HEAD}": run(1250.0, 200.0), "pgbouncer": run(500.0, 150.0)}.items()}
    table = bench.results_table(args.cases, results, args.targets, [t for t, _c in args.baselines])
    header, _rule, tps, cpu, _switches = table.splitlines()
    assert header.endswith("| pgforkpool/direct | pgforkpool/pgbouncer | pgforkpool/pgforkpool@HEAD "
                           f"| pgforkpool/pgforkpool@{HEAD} |")
    assert tps.endswith("| 0.50 | 2.00 | 1.25 | 0.80 |")
    assert cpu.endswith("| — | 2.00 | 0.75 | 1.50 |")


def test_a_ratio_pairs_the_runs_of_each_round(bench):
    """The ratio is the median of the rounds' quotients, each of two runs made within the same minute: a
    slow minute of the machine weighs on both sides of its quotient instead of on one target's median."""
    args = bench.parse_args(["--baseline", "HEAD", "--skip", "direct,pgbouncer", "--only", "tpcb",
                             "--rounds", "3"])
    (case,) = args.cases
    mine = [run(1000.0, 300.0), run(500.0, 300.0), run(1100.0, 300.0)]     # the machine slow in round 2
    theirs = [run(1050.0, 300.0), run(520.0, 300.0), run(900.0, 300.0)]
    results = {(case, "pgforkpool"): [bench.RunResult(transactions=1000, **f) for f in mine],
               (case, "pgforkpool@HEAD"): [bench.RunResult(transactions=1000, **f) for f in theirs]}
    _header, _rule, tps, *_ = bench.results_table(args.cases, results, args.targets, ["pgforkpool@HEAD"]).splitlines()
    # medians 1000 / 900 would say 1.11; round by round: 0.952, 0.962, 1.222
    assert tps.endswith("| 1,000 | 900 | 0.96 (0.95–1.22) |")
    # a failed run leaves its round out of the ratio
    results[(case, "pgforkpool@HEAD")][2].error = "hung"
    _header, _rule, tps, *_ = bench.results_table(args.cases, results, args.targets, ["pgforkpool@HEAD"]).splitlines()
    assert tps.endswith("| 0.96 (0.95–0.96) |")


def test_the_loss_during_round_trips_is_paired_by_round_too(bench):
    args = bench.parse_args(["--baseline", "HEAD", "--skip", "direct,pgbouncer", "--only", "large-alone,large-during",
                             "--rounds", "2"])
    alone, during = args.cases
    figures = {(alone, "pgforkpool"): [1000.0, 500.0], (during, "pgforkpool"): [700.0, 400.0],
               (alone, "pgforkpool@HEAD"): [1000.0, 1000.0], (during, "pgforkpool@HEAD"): [800.0, 700.0]}
    results = {key: [bench.RunResult(transactions=1000, **run(tps)) for tps in tpss] for key, tpss in figures.items()}
    table = bench.results_table(args.cases, results, args.targets, ["pgforkpool@HEAD"])
    (line,) = [row for row in table.splitlines() if "tps over that of large-alone" in row]
    # 0.70 / 0.80 in round 1 and 0.80 / 0.70 in round 2
    assert line.endswith("| 0.73 | 0.75 | 1.01 (0.87–1.14) |")


def test_the_round_trips_report_the_poolers_cpu_per_mb(bench):
    args = bench.parse_args(["--skip", "direct", "--only", "large-sizes", "--rounds", "2"])
    (case,) = args.cases
    trips = {1: [0.005] * 5, 4: [0.02] * 5}
    results = {(case, "pgforkpool"): [bench.RunResult(round_trips=trips, cpu_ms_per_mb=cpu) for cpu in (1.5, 1.4)],
               (case, "pgbouncer"): [bench.RunResult(round_trips=trips, cpu_ms_per_mb=cpu) for cpu in (3.0, 3.5)]}
    table = bench.results_table(args.cases, results, args.targets, [])
    (line,) = [row for row in table.splitlines() if "pooler CPU per MB" in row]
    # medians 1.45 and 3.25; round by round 0.50 and 0.40
    assert line.endswith("| 1.450 | 3.250 | 0.45 (0.40–0.50) |")


def test_a_round_starts_once_the_machine_has_settled(bench):
    """Warm-ups through the round's first target until one reaches 85 % of its TPS at the start;
    a machine that does not settle costs at most the limit, and the report says which it was."""
    figures = iter([300.0, 600.0, 900.0, 1000.0])
    calls = []

    def warm_up(target):
        calls.append(target)
        return bench.RunResult(tps=next(figures))

    verdict = bench.settle(warm_up, "pgforkpool", {"pgforkpool": 1000.0})
    assert calls == ["pgforkpool"] * 3
    assert verdict.startswith("settled after 3 warm-up run(s) through pgforkpool (300, 600, 900 TPS")
    verdict = bench.settle(lambda target: bench.RunResult(tps=10.0), "direct", {"direct": 1000.0}, limit=0.0)
    assert verdict.startswith("not settled after 1 warm-up run(s)")


def test_the_report_names_every_baseline_and_every_restart_once(bench):
    args = bench.parse_args(["--baseline", "HEAD", "--baseline", HEAD, "--only", "tpcb"])
    (case,) = args.cases
    results = {(case, "pgforkpool@HEAD"): [bench.RunResult(error="pgbench exit -9: [bench] pgbench killed after 65 s")],
               (case, "pgforkpool"): [bench.RunResult(tps=1000.0)]}
    report = bench.render(args, datetime.datetime.now(datetime.timezone.utc), (0.5, 0.7), {"PgBouncer": "1.18.0"},
                          ["pgforkpool@HEAD is commit abc", f"pgforkpool@{HEAD} is commit def"], results, "", [], "",
                          {}, os.path.join(REPO, "bench-results", "x.log"),
                          ["pgforkpool@HEAD after round 1, TPC-B: a client of the run hung"],
                          ["settled after 2 warm-up run(s) through pgforkpool (10, 950 TPS; 1,000 at the start)"])
    assert "- baseline: pgforkpool@HEAD is commit abc" in report
    assert f"- baseline: pgforkpool@{HEAD} is commit def" in report
    assert "## Restarts" in report and "- pgforkpool@HEAD after round 1, TPC-B: a client of the run hung" in report
    assert report.count("## Every run") == 1
    assert "## Before each round" in report and "- round 2: settled after 2 warm-up run(s)" in report
    assert "round 1: " + " → ".join(bench.round_order(args.targets, 0)) in report
    assert "round 2: " + " → ".join(bench.round_order(args.targets, 1)) in report


@pytest.mark.parametrize("count", [3, 4, 5])
def test_over_the_rounds_each_target_runs_right_after_each_other_equally_often(bench, count):
    targets = ("direct", "pgforkpool", "pgforkpool@a", "pgforkpool@b", "pgbouncer")[:count - 1] + ("pgbouncer",)
    rounds = 2 * count if count % 2 else count
    orders = [bench.round_order(targets, rnd) for rnd in range(rounds)]
    assert all(sorted(order) == sorted(targets) for order in orders)
    assert all(a != b for a, b in zip(orders, orders[1:]))   # no two rounds in a row alike
    assert bench.round_order(targets, rounds) == orders[0]   # and the same again after that
    follows = {}
    for order in orders:
        for before, after in zip(order, order[1:]):
            follows[before, after] = follows.get((before, after), 0) + 1
    assert len(follows) == count * (count - 1) and len(set(follows.values())) == 1
    # The default run: 3 rounds of 3 targets; pgforkpool follows direct, nothing, pgbouncer.
    if count == 3:
        assert [o.index("pgforkpool") and o[o.index("pgforkpool") - 1] for o in orders[:3]] == \
            ["direct", 0, "pgbouncer"]


LISTENER = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
while True:
    s.accept()[0].close()
"""


@pytest.fixture
def service(bench, tmp_path):
    port = bench.free_port()
    service = bench.Service("pooler", [sys.executable, "-c", LISTENER, str(port)], port, str(tmp_path),
                            signal.SIGINT)
    service.start()
    yield service
    service.stop()


def test_a_pooler_whose_run_hung_is_restarted_and_listens_again(bench, service):
    first = service.proc.pid
    assert bench.restart_if_stuck(service, bench.RunResult(tps=10.0)) == ""
    assert service.proc.pid == first
    why = bench.restart_if_stuck(service, bench.RunResult(error="pgbench exit -9: [bench] pgbench killed after 65 s"))
    assert why == "a client of the run hung"
    assert service.proc.pid != first and not psutil.pid_exists(first)
    socket.create_connection(("127.0.0.1", service.port), timeout=5).close()


def test_a_pooler_that_exited_is_started_again(bench, service):
    first = service.proc.pid
    os.kill(first, signal.SIGKILL)
    service.proc.wait(timeout=10)
    assert bench.restart_if_stuck(service, bench.RunResult(error="connection refused")) == "it had exited"
    assert service.proc.pid != first
    socket.create_connection(("127.0.0.1", service.port), timeout=5).close()


def test_pgbench_summary_and_a_killed_run(bench):
    result = bench.parse_pgbench("number of transactions actually processed: 5000\n"
                                 "number of failed transactions: 0 (0.000%)\n"
                                 "latency average = 0.200 ms\n"
                                 "initial connection time = 3.1 ms\n"
                                 "tps = 5000.5 (without initial connection time)\n")
    assert (result.tps, result.latency_ms, result.transactions) == (5000.5, 0.2, 5000)
    assert result.ok and not result.hung
    assert bench.RunResult(error="16 MB client: bytea client killed after 85 s").hung


def test_a_pooler_that_cannot_start_again_is_reported_not_fatal(bench, tmp_path):
    port = bench.free_port()
    service = bench.Service("pooler", [sys.executable, "-c", "raise SystemExit(3)"], port, str(tmp_path),
                            signal.SIGINT)
    with pytest.raises(RuntimeError):
        service.start()   # it exits at once
    why = bench.restart_if_stuck(service, bench.RunResult(error="x"))
    assert why.startswith("it had exited; it did not start again: pooler exited at start (code 3)")


def test_a_restart_starts_the_pooler_as_it_was_started(bench, tmp_path):
    """PgBouncer is started as the server's user (Popen arguments): a restart keeps them."""
    port = bench.free_port()
    service = bench.Service("pooler", [sys.executable, "-c", LISTENER, str(port)], port, str(tmp_path),
                            signal.SIGINT)
    service.start(env=dict(os.environ, BENCH_MARK="as started"))
    try:
        first = service.proc.pid
        assert bench.restart_if_stuck(service, bench.RunResult(error="pgbench killed after 65 s"))
        assert service.proc.pid != first
        assert psutil.Process(service.proc.pid).environ().get("BENCH_MARK") == "as started"
    finally:
        service.stop()


FORKING_LISTENER = LISTENER.replace("while True:", """import os
if os.fork() == 0:   # a child that outlives its parent, as a backend would without PR_SET_PDEATHSIG
    s.close()
    while True:
        time.sleep(1)
while True:""")


def test_what_a_pooler_that_exited_left_behind_is_stopped_with_it(bench, tmp_path):
    port = bench.free_port()
    service = bench.Service("pooler", [sys.executable, "-c", FORKING_LISTENER, str(port)], port, str(tmp_path),
                            signal.SIGINT)
    service.start()
    try:
        first = service.proc.pid
        (child,) = psutil.Process(first).children()
        os.kill(first, signal.SIGKILL)
        service.proc.wait(timeout=10)
        assert child.is_running()   # an orphan now: no longer first's child
        assert "it had exited" in bench.restart_if_stuck(service, bench.RunResult(error="x"))
        child.wait(timeout=10)   # killed with the pooler it belonged to
        assert not child.is_running()
    finally:
        service.stop()
