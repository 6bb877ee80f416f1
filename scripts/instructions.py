"""Instructions per transaction in a pooled backend, counted by valgrind's callgrind.

TPS and CPU time on a shared two-core machine move by 15-40 % from one run to the
next, more than the builds differ; an instruction count does not: it is the same for
the same build, input and interleaving of events, whatever else the machine does.
So this answers "does this change cost the hot path?" where scripts/bench cannot.

For each build (the current pgforkpool, and each --baseline REV, built as
scripts/bench builds it), with a pool of one backend (session_pool_size = 1) in front
of a throwaway PostgreSQL 15: start the pooler under callgrind (each process it forks
is counted on its own), run `pgbench -S -t N` with C clients, stop the pooler, and
read the total of the pooled backend (the process whose pid the clients'
BackendKeyData names).  That is done for two numbers of transactions; the difference
of the two totals over the difference of the transactions is the cost of one
transaction, with the start-up, the logins and the shut-down taken out.

With one client every transaction is the same sequence of events, and the count
repeats to within a few instructions.  With several clients on one backend they queue
for its server connection (25 is what select-only with 100 clients puts on each of 4
backends), and how many events one wake-up finds depends on timing: such counts
repeat to within about 2 %.

A case `MB:bytea` counts large messages instead: one client (bench.py's bytea client, as
`scripts/bench --only large` runs it) makes round trips of `SELECT $1::bytea` with an
MB-megabyte value bound in binary and the result in binary, BYTEA_TRIPS of them in the
larger run and a fifth in the smaller; the figure is the backend's instructions per MB
(moved each way).  How a large message arrives in pieces depends on timing, so these
repeat less exactly than the select-only ones.

Run it through scripts/instructions, which sets up the environment first.
"""

import argparse
import datetime
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import psutil
import psycopg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402
from bench import (DATABASE, PASSWORD, USER, Cluster, build_baseline, client_env,  # noqa: E402
                   free_port, kill_survivors, postgres_tree, resolve_revision, say, server_dir,
                   session_members, tail, write_pgforkpool_config)

VALGRIND = shutil.which("valgrind") or "/usr/bin/valgrind"
START_WAIT = 180.0       # seconds a pooler under callgrind gets to listen (its imports run 50x slower)
STOP_WAIT = 120.0        # and to exit, writing its counts
DEFAULT_CASES = ("1:simple", "1:prepared", "25:simple", "25:prepared")
DEFAULT_TRANSACTIONS = 4000   # in all, for the larger of the two runs; the smaller has a fifth
BYTEA_TRIPS = 10              # round trips of a MB:bytea case's larger run; the smaller has a fifth
PROTOCOLS = ("simple", "extended", "prepared", "bytea")


def start_under_callgrind(program: str, workdir: str, cluster: Cluster, out_dir: str) -> tuple[subprocess.Popen, int, str]:
    """The pooler at `program`, pool size 1, every process under callgrind; (process, port, log)."""
    conf, port = write_pgforkpool_config(workdir, cluster, 1)
    log_path = os.path.join(workdir, "pgforkpool.log")
    # (As root the postmaster's own file, opened before it switches user, cannot be written at
    # its exit: valgrind says so in the log; only the pooled backend's file is read.)
    argv = [VALGRIND, "--tool=callgrind", "--trace-children=yes", "--vgdb=no",
            f"--callgrind-out-file={out_dir}/callgrind.%p", program, "start", conf]
    # The same hash seed in every run: the two runs of a case differ in their transactions only.
    env = dict(os.environ, PYTHONHASHSEED="0")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=env)
    deadline = time.monotonic() + START_WAIT
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the pooler exited at start (code {proc.returncode}):\n{tail(log_path)}")
            try:
                with psycopg.connect(host="127.0.0.1", port=port, user=USER, password=PASSWORD,
                                     dbname=DATABASE, connect_timeout=5):
                    break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the pooler did not answer within {START_WAIT:.0f} s:\n"
                                       f"{tail(log_path)}") from None
                time.sleep(0.5)   # polling a port: the pooler has no other signal to give
    except BaseException:
        stop(proc)
        raise
    return proc, port, log_path


def stop(proc: subprocess.Popen) -> list[str]:
    """Fast shutdown; the processes write their counts as they exit."""
    members = session_members(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=STOP_WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    deadline = time.monotonic() + STOP_WAIT
    while time.monotonic() < deadline and any(_alive(p) for p in members):
        time.sleep(0.2)   # its children exit after it, each writing its counts
    return kill_survivors(members)


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def total_instructions(path: str) -> int:
    """The Ir total of one callgrind output file."""
    with open(path) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError(f"no total in {path}")


def count(program: str, cluster: Cluster, workdir: str, clients: int, protocol: str,
          per_client: int, pgbench: str, log, keep: str = "") -> int:
    """Instructions the pooled backend ran for `per_client` select-only transactions of each
    client (protocol "bytea": `per_client` round trips of `clients` MB by one client); keep: a
    path to copy the backend's callgrind file to."""
    out_dir = server_dir(os.path.join(workdir, "callgrind"))
    proc, port, log_path = start_under_callgrind(program, workdir, cluster, out_dir)
    try:
        with psycopg.connect(host="127.0.0.1", port=port, user=USER, password=PASSWORD,
                             dbname=DATABASE, connect_timeout=30) as conn:
            backend = conn.pgconn.backend_pid
            if protocol == "bytea":
                bytea_round_trips(port, clients, per_client, log)
                argv = []
            else:
                argv = [pgbench, "-n", "-S", "-M", protocol, "-c", str(clients), "-j", "1",
                        "-t", str(per_client), "-h", "127.0.0.1", "-p", str(port), "-U", USER, DATABASE]
            if argv:
                run = subprocess.run(argv, capture_output=True, text=True, env=client_env(), timeout=1800)
                log.write(f"$ {' '.join(argv)}\n{run.stdout}{run.stderr}\n")
                done = re.search(r"number of transactions actually processed: (\d+)", run.stdout)
                if run.returncode != 0 or not done or int(done.group(1)) != clients * per_client:
                    raise RuntimeError(f"pgbench failed (exit {run.returncode}): {run.stderr.strip()[-500:]}")
    finally:
        leftovers = stop(proc)
        if leftovers:
            say(f"killed leftover processes: {'; '.join(leftovers)}")
    path = os.path.join(out_dir, f"callgrind.{backend}")
    if not os.path.exists(path):
        raise RuntimeError(f"no callgrind output for the pooled backend {backend} "
                           f"(found {sorted(os.listdir(out_dir))}):\n{tail(log_path)}")
    total = total_instructions(path)
    if keep:
        shutil.copyfile(path, keep)
    shutil.rmtree(out_dir, ignore_errors=True)
    return total


def bytea_round_trips(port: int, mb: int, trips: int, log) -> None:
    """`trips` round trips of `mb` MB through the pooler at `port`, by bench.py's bytea client
    (which first makes an untimed 1 MB one: the same in both runs of a case)."""
    with bench.ByteaClient(port, (mb,), trips, 1800.0) as client:
        result = client.finish(log)
    done = len(result.round_trips.get(mb, []))
    if result.error or done != trips:
        raise RuntimeError(f"bytea client: {done} of {trips} round trips of {mb} MB"
                           + (f": {result.error}" if result.error else ""))


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="scripts/instructions",
        description="Instructions per select-only transaction in a pooled backend (valgrind's "
                    "callgrind), for the current pgforkpool and older builds; exact where timings "
                    "are noisy.")
    parser.add_argument("--baseline", action="append", default=[], metavar="REV",
                        help="also count pgforkpool as of git revision REV; may be given more than once")
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES),
                        help="comma-separated CLIENTS:PROTOCOL (pgbench -c and -M) to count, or "
                             "MB:bytea (round trips of an MB-megabyte bytea, one client; instructions "
                             f"per MB) (default {','.join(DEFAULT_CASES)})")
    parser.add_argument("--transactions", type=int, default=DEFAULT_TRANSACTIONS,
                        help="transactions in all of the larger run of each case (default "
                             f"{DEFAULT_TRANSACTIONS}); the smaller run has a fifth of them")
    parser.add_argument("--keep", action="store_true",
                        help="keep the pooled backend's callgrind file of each case's larger run in "
                             "the results directory (callgrind.<stamp>.<build>.<clients>.<protocol>), "
                             "for callgrind_annotate")
    parser.add_argument("--timeout", type=int, default=3600,
                        help="bound on the whole run in seconds (default 3600)")
    parser.add_argument("--results-dir", default=os.path.join(bench.REPO, "bench-results"),
                        help="where the report goes (default bench-results/)")
    args = parser.parse_args(argv)
    args.targets = [("pgforkpool", None)]
    for rev in args.baseline:
        commit = resolve_revision(rev)
        if commit is None:
            parser.error(f"--baseline: {rev!r} names no commit")
        args.targets.append((f"pgforkpool@{rev}", commit))
    args.case_list = []
    for item in args.cases.split(","):
        clients, _, protocol = item.partition(":")
        if not clients.isdigit() or int(clients) < 1 or protocol not in PROTOCOLS:
            parser.error(f"--cases: {item!r} is not CLIENTS:simple|extended|prepared or MB:bytea")
        if (int(clients), protocol) not in args.case_list:
            args.case_list.append((int(clients), protocol))
    most = max((clients for clients, protocol in args.case_list if protocol != "bytea"), default=1)
    if args.transactions < 5 * most:
        parser.error(f"--transactions: at least 5 per client ({5 * most} for {most} clients)")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    return args


def render(args: argparse.Namespace, started: datetime.datetime,
           counts: dict[tuple[str, int, str], float]) -> str:
    """The report: instructions per transaction of each build, and the current one's over each other's."""
    names = [t for t, _ in args.targets]
    lines = [f"# Instructions per select-only transaction in a pooled backend, {started:%Y-%m-%d %H:%M} UTC",
             "",
             f"- valgrind callgrind, pool of one backend, {bench.AUTH_METHOD} over TCP 127.0.0.1; pgbench -S -t, "
             f"two runs of {args.transactions // 5:,} and {args.transactions:,} transactions in all, "
             "the difference of the backend's totals over the difference of the transactions",
             f"- git {bench.command_output(['git', 'describe', '--always', '--dirty'])}"
             + "".join(f"; {t} is commit {c[:12]}" for t, c in args.targets[1:]),
             "",
             "| clients, protocol | " + " | ".join(names) + "".join(f" | pgforkpool/{t}" for t in names[1:]) + " |",
             "| --- |" + " ---: |" * (2 * len(names) - 1)]
    for clients, protocol in args.case_list:
        mine = counts.get(("pgforkpool", clients, protocol))
        cells = [f"{counts[(t, clients, protocol)]:,.0f}" if (t, clients, protocol) in counts else "—"
                 for t in names]
        ratios = [f"{mine / counts[(t, clients, protocol)]:.3f}" if mine and counts.get((t, clients, protocol))
                  else "—" for t in names[1:]]
        label = (f"{clients} MB bytea round trips, per MB" if protocol == "bytea"
                 else f"{clients}, `-M {protocol}`")
        lines.append(f"| {label} | " + " | ".join(cells + ratios) + " |")
    lines += ["", "Instructions per transaction of the pooled backend alone (not PostgreSQL's, not the "
              "clients'); a ratio below 1 means the current build runs fewer."]
    if any(protocol == "bytea" for _clients, protocol in args.case_list):
        lines += ["", f"A bytea row: one client's round trips of `SELECT $1::bytea` (value and result "
                  f"binary), {BYTEA_TRIPS // 5} and {BYTEA_TRIPS} of them; the backend's instructions "
                  "per MB moved each way."]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGALRM):
        signal.signal(sig, bench.raise_interrupted)   # stop, clean up, report what was counted
    signal.alarm(args.timeout)
    started = datetime.datetime.now(datetime.timezone.utc)
    workdir = server_dir(tempfile.mkdtemp(prefix="pgforkpool-instructions-"))
    cluster = Cluster(os.path.join(workdir, "pg"), free_port())
    pgbench = bench.pgbench_path()
    os.makedirs(args.results_dir, exist_ok=True)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    log_path = os.path.join(args.results_dir, f"instructions-{stamp}.pgbench.log")
    programs: dict[str, str] = {"pgforkpool": bench.PGFORKPOOL}
    say(f"{len(args.case_list)} case(s) through {len(args.targets)} build(s), two runs each under "
        f"callgrind; working in {workdir}")
    counts: dict[tuple[str, int, str], float] = {}
    pg_tree = []
    interrupted = ""
    try:
        with open(log_path, "w") as log:
            for i, (target, commit) in enumerate(args.targets[1:]):
                say(f"building {target} (commit {commit[:12]})")
                programs[target] = build_baseline(commit, os.path.join(workdir, f"baseline-{i + 1}"))
            say(f"starting PostgreSQL 15 on port {cluster.port}")
            cluster.init({"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"})
            cluster.start()
            pg_tree = postgres_tree(cluster)
            cluster.psql(f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'")
            cluster.psql(f"CREATE DATABASE {DATABASE} OWNER {USER}")
            init = subprocess.run([pgbench, "-i", "-q", "-s", "1", "-h", cluster.socket_dir, "-p",
                                   str(cluster.port), "-U", USER, DATABASE],
                                  capture_output=True, text=True, timeout=600)
            if init.returncode != 0:
                raise RuntimeError(f"pgbench -i failed:\n{init.stderr}")
            for clients, protocol in args.case_list:
                if protocol == "bytea":
                    large, small = BYTEA_TRIPS, BYTEA_TRIPS // 5
                else:
                    large = max(1, args.transactions // clients)
                    small = max(1, large // 5)
                for target, _commit in args.targets:
                    runs = []
                    try:
                        for per_client in (small, large):
                            keep = (os.path.join(args.results_dir, f"callgrind.{stamp}.{target}.{clients}.{protocol}")
                                    if args.keep and per_client == large else "")
                            runs.append(count(programs[target], cluster, server_dir(os.path.join(
                                workdir, f"{target}-{clients}-{protocol}-{per_client}")),
                                clients, protocol, per_client, pgbench, log, keep))
                    except (RuntimeError, subprocess.SubprocessError, OSError, psycopg.Error) as exc:
                        say(f"{clients} client(s) -M {protocol}, {target}: FAILED: {exc}")
                        continue
                    per_xact = (runs[1] - runs[0]) / ((large - small) * clients)
                    counts[(target, clients, protocol)] = per_xact
                    if protocol == "bytea":
                        say(f"{clients} MB bytea round trips, {target}: {per_xact:,.0f} instructions per MB "
                            f"({runs[0]:,} for {small}, {runs[1]:,} for {large})")
                    else:
                        say(f"{clients} client(s) -M {protocol}, {target}: {per_xact:,.0f} instructions "
                            f"per transaction ({runs[0]:,} for {small * clients}, {runs[1]:,} for {large * clients})")
    except bench.Interrupted as exc:
        interrupted = exc.reason
        say(f"stopping: {interrupted}")
    except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
        interrupted = f"error: {exc}"
        say(interrupted)
    finally:
        signal.alarm(0)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)   # nothing may interrupt the clean-up
        try:
            cluster.stop("fast")
        except subprocess.SubprocessError as exc:
            say(f"pg_ctl stop failed: {exc}")
        kill_survivors(pg_tree)
        shutil.rmtree(workdir, ignore_errors=True)
    report = render(args, started, counts)
    if interrupted:
        report += f"\nThe run was cut short: {interrupted}\n"
    path = os.path.join(args.results_dir, f"instructions-{stamp}.md")
    with open(path, "w") as f:
        f.write(report)
    print(report)
    say(f"written to {os.path.relpath(path)}")
    return 0 if not interrupted and len(counts) == len(args.case_list) * len(args.targets) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
