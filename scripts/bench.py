"""Benchmark harness: pgbench through direct PostgreSQL, pgforkpool and PgBouncer, interleaved.

One throwaway PostgreSQL 15 cluster, one pgforkpool and one PgBouncer (transaction
mode) with the same pool size in front of it; every workload of WORKLOADS runs
through each target in turn, in an order that changes from round to round (see
round_order), for --rounds rounds. The median TPS per
(workload, target) and the ratios go to stdout and to
bench-results/bench-<UTC timestamp>.md (copied to bench-results/latest.md).

With --baseline REV, another target, pgforkpool@REV, is the pooler as it was at
git revision REV: extracted with `git archive` into the temporary directory,
installed into a virtual environment of its own there, started with the same
configuration on a port of its own, and run after the current pgforkpool in every
round; the table gains its column and the ratio current/REV. --baseline may be
given more than once: one target, column and ratio per revision, in one run.

A pooler through which a run hung (pgbench or the bytea client killed past its
bound) or that exited is restarted before its next run, and the report lists the
restart: an old build with a defect that hangs its backends (the baseline of
issue 6 hangs on the large-message workload) then fails that one run, not every
run after it.

The large-message workload (`--only large`) measures bytea round trips instead of,
or besides, pgbench: a client on a connection of its own makes round trips of 1, 4,
16 and 64 MB (`SELECT $1::bytea`, the value bound as a binary parameter, the result
in binary), and select-only with 10 clients runs alone, then while another such
client loops 16 MB round trips through the same target one right after the other
(large-during: a faster target moves more data, which costs the others more), and
while it starts one every 0.5 s (large-paced: the same work through every target).
Those clients are
processes of their own (bench.py --bytea-client), bounded in round trips and in
time, and killed past their bound.

A run fails (pgbench exits non-zero, prints an error, has failed transactions or
none at all) in its own table cell; the exit status is 1 when a run through direct
or pgforkpool failed or the whole run was cut short (PgBouncer's and the baseline's
failures, e.g. under -M prepared, are theirs to have).

Run it through scripts/bench, which sets up the environment first.
"""

import argparse
import datetime
import os
import platform
import pwd
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import attrgetter

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
from pgcluster import SERVER_USER, Cluster, pg_bin  # noqa: E402
from pgcluster import _as_server_user as server_user_ids  # noqa: E402

PGFORKPOOL = os.path.join(os.path.dirname(sys.executable), "pgforkpool")
PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
RESULTS_DIR = os.path.join(REPO, "bench-results")

DATABASE = "bench"
USER = "bench"
PASSWORD = "bench-secret"
AUTH_METHOD = "scram-sha-256"     # clients authenticate this way to all three targets
TARGETS = ("direct", "pgforkpool", "pgbouncer")   # each --baseline adds pgforkpool@REV after pgforkpool
STOP_WAIT = 20.0                  # seconds a process gets to stop before SIGKILL
RUN_GRACE = 60.0                  # seconds past -T before a pgbench run is killed

# The large-message workload: one bytea round trip sends N MB (2^20 bytes) and receives them back.
BYTEA_SIZES_MB = (1, 4, 16, 64)   # round trips of each size, one client; --quick leaves out 64
BYTEA_TRIPS = 5                   # round trips per size (the median is reported), and fewer:
BYTEA_SECONDS = 10.0              # none starts after this many seconds on one size
GROWTH_SIZES_MB = (1, 16)         # time per MB at the second over that at the first: 1.00 is linear
DURING_MB = 16                    # the size of the round trips looped during a pgbench run (large-during),
DURING_TRIPS = 100                # at most this many
# large-paced: one such round trip started every PACED_PERIOD seconds (the next at once if one takes
# longer), so that every target carries the same large-message work during the run; large-during's
# back-to-back loop moves more data through a faster target, which then costs the others more CPU.
PACED_PERIOD = 0.5
BYTEA_CLIENT = "--bytea-client"   # first argument of bench.py run as a bytea client (ByteaClient)


@dataclass(frozen=True)
class Workload:
    """One workload: pgbench arguments, without -T, -M and the connection options."""
    key: str                      # short name for --only
    name: str                     # what the table shows
    args: tuple[str, ...]         # none for bytea_sizes, which runs no pgbench
    protocols: tuple[str, ...] = ("simple",)   # pgbench -M values, one table row each, unless --protocol
    latency: bool = False         # also report pgbench's "latency average"
    bytea_sizes: bool = False     # instead of pgbench: round trips of each size of BYTEA_SIZES_MB (--quick: less 64)
    bytea_during: int = 0         # MB of the round trips another client loops through the target during pgbench
    bytea_period: float = 0.0     # seconds between the starts of those round trips; 0: one right after the other
    relative_to: str = ""         # the key of the workload whose tps this one's is also reported over
    extra_seconds: int = 0        # added to -T: pgbench's clock runs while its clients connect
    long_clients: int = 0         # clients looping LONG_TRANSACTION beside the pgbench ones (skewed load)


# To add a workload, add a line. Each runs once per protocol of its own (one row
# each), or once per --protocol value when that option is given.
BOTH = ("simple", "prepared")
SELECT_10 = ("-S", "-c", "10", "-j", "2")
WORKLOADS = (
    Workload("select-10", "select-only, 10 clients", SELECT_10, BOTH),
    Workload("select-100", "select-only, 100 clients", ("-S", "-c", "100", "-j", "2"), BOTH),
    Workload("connect-10", "select-only, new connection per transaction, 10 clients",
             ("-S", "-C", "-c", "10", "-j", "2")),
    Workload("tpcb-20", "TPC-B-like, 20 clients", ("-c", "20", "-j", "2")),
    Workload("latency-1", "select-only, 1 client", ("-S", "-c", "1", "-j", "1"), BOTH, latency=True),
    # Issue 9: many more clients than server connections (the server's max_connections is
    # raised for the direct run; PgBouncer's max_client_conn too).
    # 1,000 logins (scram) take several seconds on 2 cores, within pgbench's -T.
    Workload("select-1000", "select-only, 1,000 clients", ("-S", "-c", "1000", "-j", "2"), ("simple",),
             extra_seconds=15),
    # Issue 8's skewed load: 16 select-only clients measured (TPS, p99 latency) while 4 others
    # hold transactions open (LONG_TRANSACTION), so a pooler that queues the short ones
    # behind the long ones shows it in their p99.
    Workload("skewed-20", "select-only, 16 clients, beside 4 holding 50 ms transactions",
             ("-S", "-c", "16", "-j", "2"), ("simple",), long_clients=4),
    # --only large: issue 6's large messages (see bytea_client); the round trips last, so that a
    # pooler they break fails them rather than the others
    Workload("large-alone", "select-only, 10 clients, alone", SELECT_10),
    Workload("large-during", f"select-only, 10 clients, during {DURING_MB} MB bytea round trips", SELECT_10,
             bytea_during=DURING_MB, relative_to="large-alone"),
    Workload("large-paced", f"select-only, 10 clients, during {DURING_MB} MB bytea round trips, one every "
             f"{PACED_PERIOD} s", SELECT_10, bytea_during=DURING_MB, bytea_period=PACED_PERIOD,
             relative_to="large-alone"),
    Workload("large-sizes", "bytea round trips, 1 client", (), bytea_sizes=True),
)
LONG_TRANSACTION = "BEGIN;\nSELECT pg_sleep(0.05);\nCOMMIT;\n"
WARM_UP = ("-S", "-c", "4", "-j", "2", "-M", "simple")   # 2 s, unrecorded: at the start and between rounds
SETTLED = 0.85        # a round starts once a warm-up reaches this share of the target's TPS at the start
SETTLE_LIMIT = 30.0   # seconds of warm-ups at most before a round
PROFILED_WORKLOAD = "select-100"  # --profile samples a pgforkpool backend during this one


@dataclass(frozen=True)
class Case:
    """A workload with its query protocol: what one table row measures."""
    workload: Workload
    protocol: str                 # "" for a workload that runs no pgbench

    @property
    def label(self) -> str:
        return f"{self.workload.name} (`{' '.join(self.pgbench_args)}`)" if self.protocol else self.workload.name

    @property
    def short(self) -> str:
        return f"{self.workload.name} `-M {self.protocol}`" if self.protocol else self.workload.name

    @property
    def pgbench_args(self) -> tuple[str, ...]:
        return (*self.workload.args, "-M", self.protocol)


@dataclass
class RunResult:
    tps: float | None = None
    latency_ms: float | None = None
    failed_transactions: int = 0
    transactions: int | None = None   # pgbench's "actually processed"
    cpu_us: float | None = None       # the pooler's CPU (user + system, all its processes) per transaction
    switches: float | None = None     # the pooler's context switches (all its processes) per transaction
    p99_ms: float | None = None       # 99th percentile of the measured clients' transaction latency
    round_trips: dict[int, list[float]] = field(default_factory=dict)   # bytea: seconds of each, by MB
    cpu_ms_per_mb: float | None = None   # bytea sizes: the pooler's CPU per MB of the timed round trips (each way)
    error: str = ""               # why the run does not count; empty when it does

    @property
    def ok(self) -> bool:
        return not self.error and (self.tps is not None or bool(self.round_trips))

    @property
    def hung(self) -> bool:
        """A client of the run had to be killed past its bound: the target may be stuck."""
        return "killed after" in self.error

    def seconds(self, mb: int) -> float | None:
        """The median seconds of the round trips of `mb` MB."""
        trips = self.round_trips.get(mb)
        return statistics.median(trips) if trips else None

    @property
    def growth(self) -> float | None:
        """Time per MB at the larger of GROWTH_SIZES_MB over that at the smaller: 1.00 is linear."""
        (small, small_s), (large, large_s) = ((mb, self.seconds(mb)) for mb in GROWTH_SIZES_MB)
        return quotient(large_s / large, small_s / small) if small_s and large_s else None


class Interrupted(BaseException):
    """A signal or the whole-run time limit: stop, clean up, report what was measured."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------- processes

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def give_to_server_user(path: str, mode: int) -> str:
    """When we are root, the poolers run as postgres: make `path` theirs."""
    os.chmod(path, mode)
    if os.geteuid() == 0:
        entry = pwd.getpwnam(SERVER_USER)
        os.chown(path, entry.pw_uid, entry.pw_gid)
    return path


def server_dir(path: str) -> str:
    """A directory the poolers can read and write (configs, logs, pid files, sockets)."""
    os.makedirs(path, exist_ok=True)
    return give_to_server_user(path, 0o755)


def write_private(path: str, text: str) -> None:
    """A file only the poolers may read: the auth files."""
    with open(path, "w") as f:
        f.write(text)
    give_to_server_user(path, 0o600)


def wait_for_port(port: int, proc: subprocess.Popen, what: str, log_path: str) -> None:
    deadline = time.monotonic() + STOP_WAIT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited at start (code {proc.returncode}):\n{tail(log_path)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not start listening on port {port}:\n{tail(log_path)}")


def tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        parent = psutil.Process(pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.Error:
        return []


def session_members(sid: int) -> list[psutil.Process]:
    """The processes of session `sid` (a process started with start_new_session=True and
    whatever it forked), the leader left out."""
    members = []
    for p in psutil.process_iter():
        try:
            if p.pid != sid and os.getsid(p.pid) == sid:
                members.append(p)
        except (OSError, psutil.Error):
            pass
    return members


def cpu_seconds(pid: int) -> dict[int, tuple[float, float, int]]:
    """(user CPU seconds, system CPU seconds, voluntary + involuntary context switches) of each
    process under pid."""
    figures = {}
    for p in process_tree(pid):
        try:
            with p.oneshot():
                t, c = p.cpu_times(), p.num_ctx_switches()
            figures[p.pid] = (t.user, t.system, c.voluntary + c.involuntary)
        except psutil.Error:
            pass
    return figures


def cpu_used(before: dict, after: dict) -> tuple[float, float, int]:
    """User seconds, system seconds and context switches from one cpu_seconds() to the next
    (processes that exited in between are not counted: pooled backends live for the whole run)."""
    zero = (0.0, 0.0, 0)
    return (sum(a[0] - before.get(pid, zero)[0] for pid, a in after.items()),
            sum(a[1] - before.get(pid, zero)[1] for pid, a in after.items()),
            sum(a[2] - before.get(pid, zero)[2] for pid, a in after.items()))


def kill_survivors(processes: list[psutil.Process]) -> list[str]:
    """SIGKILL whichever of these processes (compared by pid and start time) still runs."""
    survivors = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                survivors.append(f"{p.pid} {' '.join(p.cmdline())[:60]}")
                p.kill()
        except psutil.Error:
            pass
    return survivors


class Service:
    """A pooler process we started in the foreground: started, waited for, stopped by pid."""

    def __init__(self, name: str, argv: list[str], port: int, workdir: str, stop_signal: int):
        self.name = name
        self.argv = argv
        self.port = port
        self.log_path = os.path.join(workdir, re.sub(r"[^\w.@+-]", "_", name) + ".log")
        self.stop_signal = stop_signal
        self.proc: subprocess.Popen | None = None
        self.popen_args: dict = {}

    def start(self, **popen_args) -> None:
        """Start it (popen_args, e.g. the user to run as, are kept for a restart) and wait for its port."""
        self.popen_args = popen_args = popen_args or self.popen_args
        with open(self.log_path, "ab") as log:
            # A session of its own: a Ctrl-C at the terminal reaches only this
            # driver, which then stops everything in order.
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         **popen_args)
        wait_for_port(self.port, self.proc, self.name, self.log_path)

    def stop(self) -> list[str]:
        """Stop the process and its children; returns what had to be killed."""
        if self.proc is None:
            return []
        tree = process_tree(self.proc.pid)
        # Those it left behind if it exited first (no longer its children): it was started in a
        # session of its own, which they are still in.
        known = {p.pid for p in tree}
        tree += [p for p in session_members(self.proc.pid) if p.pid not in known]
        if self.proc.poll() is None:
            self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(timeout=STOP_WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_WAIT)
        time.sleep(0.2)   # children die with their parent (PR_SET_PDEATHSIG): give them a moment
        return kill_survivors([p for p in tree if p.pid != self.proc.pid])


def round_order(targets: tuple[str, ...], rnd: int) -> tuple[str, ...]:
    """The targets in the order round `rnd` (from 0) runs them: the rows of a Williams design, so
    that over the rounds each target runs right after each other one about equally often (a
    run can leave the machine busier or quieter for the next: direct's 1,000 server processes
    exiting, say), and consecutive rounds differ; the same for every run of the bench."""
    n = len(targets)
    base = [0]
    for step in range(1, n):   # 0, 1, n-1, 2, n-2, ...
        base.append((step + 1) // 2 if step % 2 else n - step // 2)
    rows = [[(x + r) % n for x in base] for r in range(n)]
    if n % 2:
        # An odd number of targets needs the rows reversed too: each right after its row (the
        # first's last), so that the first rounds, the ones a default run has, vary most.
        rows = [rows[0]] + [row for r in rows[1:] for row in (r, r[::-1])] + [rows[0][::-1]]
    return tuple(targets[x] for x in rows[rnd % len(rows)])


def settle(warm_up, target: str, reference: dict[str, float], limit: float = SETTLE_LIMIT) -> str:
    """Unrecorded warm-up runs through `target` (the next round's first) until one reaches
    SETTLED of its TPS at the start, for at most `limit` seconds: the large-message workloads
    that end a round (and a baseline hung in them and restarted) leave the machine slower for
    several seconds, which would fall on whichever target runs first.  What it took is reported."""
    started = time.monotonic()
    start_tps = reference.get(target, 0.0)
    figures = []
    while True:
        figures.append(warm_up(target).tps or 0.0)
        settled = figures[-1] >= SETTLED * start_tps
        if settled or time.monotonic() - started >= limit:
            break
    return (f"{'settled' if settled else 'not settled'} after {len(figures)} warm-up run(s) through {target} "
            f"({', '.join(f'{tps:,.0f}' for tps in figures)} TPS; {start_tps:,.0f} at the start)")


def restart_if_stuck(pooler: Service, result: RunResult) -> str:
    """Stop and start again a pooler that exited or through which `result`'s run hung, so that it
    fails that run only, not every later one; returns why it was restarted, or ""."""
    exited = pooler.proc is not None and pooler.proc.poll() is not None
    if not exited and not result.hung:
        return ""
    why = "it had exited" if exited else "a client of the run hung"
    killed = pooler.stop()
    if killed:
        why += f"; killed {'; '.join(killed)}"
    try:
        pooler.start()
    except RuntimeError as exc:   # its later runs fail, each in its own cell
        why += f"; it did not start again: {exc}"
    return why


def start_pgforkpool(workdir: str, cluster: Cluster, pool_size: int, name: str = "pgforkpool",
                     program: str = PGFORKPOOL) -> Service:
    """The pgforkpool at `program` (the current one, or the --baseline one) with the same configuration."""
    conf, port = write_pgforkpool_config(workdir, cluster, pool_size)
    service = Service(name, [program, "start", conf], port, workdir, signal.SIGINT)
    service.start()
    return service


def write_pgforkpool_config(workdir: str, cluster: Cluster, pool_size: int) -> tuple[str, int]:
    """The configuration every pgforkpool of a run gets (its own port and files in workdir);
    returns its path and the port."""
    port = free_port()
    auth_file = os.path.join(workdir, "users.txt")
    write_private(auth_file, f'"{USER}" "{PASSWORD}"\n')
    settings = {
        "listen_addresses": "127.0.0.1",
        "port": port,
        "unix_socket_directories": workdir,
        "upstream_host": cluster.socket_dir,
        "upstream_port": cluster.port,
        "session_pool_size": pool_size,
        "auth_method": AUTH_METHOD,
        "auth_file": auth_file,
        "pid_file": os.path.join(workdir, "pgforkpool.pid"),
    }
    if os.geteuid() == 0:
        settings["user"] = SERVER_USER   # it binds its sockets, then switches itself
    conf = os.path.join(workdir, "pgforkpool.conf")
    with open(conf, "w") as f:
        f.writelines(f"{name} = '{value}'\n" for name, value in settings.items())
    return conf, port


def start_pgbouncer(workdir: str, cluster: Cluster, pool_size: int) -> Service:
    port = free_port()
    auth_file = os.path.join(workdir, "userlist.txt")
    write_private(auth_file, f'"{USER}" "{PASSWORD}"\n')
    conf = os.path.join(workdir, "pgbouncer.ini")
    with open(conf, "w") as f:
        f.write(f"""[databases]
{DATABASE} = host={cluster.socket_dir} port={cluster.port} dbname={DATABASE}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir = {workdir}
auth_type = {AUTH_METHOD}
auth_file = {auth_file}
pool_mode = transaction
default_pool_size = {pool_size}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = 1200
max_db_connections = 0
; pgforkpool logs neither by default
log_connections = 0
log_disconnections = 0
pidfile = {os.path.join(workdir, "pgbouncer.pid")}
""")
    os.chmod(conf, 0o644)
    # PgBouncer refuses to run as root: run it as postgres, in the foreground,
    # logging to stderr, which Service sends to pgbouncer.log.
    service = Service("pgbouncer", [PGBOUNCER, conf], port, workdir, signal.SIGTERM)
    service.start(**server_user_ids())
    return service


# ------------------------------------------------------------------ baseline

BASELINE_PYTHON = "/usr/bin/python3"   # what scripts/lib/setup.sh makes the current venv from


def resolve_revision(rev: str) -> str | None:
    """The full commit hash that git revision `rev` of this repository names, or None."""
    if not rev or rev.startswith("-"):
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                             cwd=REPO, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def run_logged(argv: list[str], log_path: str, timeout: float, **popen_args) -> None:
    """A set-up command, its output appended to log_path, in a session of its own whose
    processes are all killed if it overruns or the run is interrupted meanwhile."""
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, **popen_args)
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)   # the group of the process we started
            except ProcessLookupError:
                pass
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed (exit {proc.returncode}):\n{tail(log_path, 20)}")


def build_baseline(commit: str, directory: str) -> str:
    """pgforkpool as of `commit`, in a virtual environment of its own under `directory`
    (pip's cache is reused); returns the path of its pgforkpool program.

    `git archive` rather than a worktree: nothing is registered in the repository,
    so nothing is left there whatever happens to this run; the tree goes with the
    temporary directory. As root the pooler runs as postgres, which must read it all.
    """
    src, venv, tmp, log = (os.path.join(directory, name) for name in ("src", "venv", "tmp", "build.log"))
    os.makedirs(src)
    os.makedirs(tmp)   # pip's temporary files: gone with the rest even if pip is killed
    env = dict(os.environ, TMPDIR=tmp)
    archive = os.path.join(directory, "src.tar")
    run_logged(["git", "archive", "--format=tar", "-o", archive, commit], log, 120, cwd=REPO)
    run_logged(["tar", "-xf", archive, "-C", src], log, 120)
    os.remove(archive)
    run_logged([BASELINE_PYTHON, "-m", "venv", venv], log, 300, env=env)
    run_logged([os.path.join(venv, "bin", "pip"), "install", "-q", "--disable-pip-version-check", src],
               log, 900, env=env)
    run_logged(["chmod", "-R", "a+rX", directory], log, 120)
    program = os.path.join(venv, "bin", "pgforkpool")
    if not os.access(program, os.X_OK):
        raise RuntimeError(f"the baseline at {commit} installed no pgforkpool program:\n{tail(log, 20)}")
    return program


# ------------------------------------------------------------------ pgbench

def pgbench_path() -> str:
    candidate = os.path.join(pg_bin(), "pgbench")
    return candidate if os.access(candidate, os.X_OK) else (shutil.which("pgbench") or "pgbench")


def parse_pgbench(output: str) -> RunResult:
    """TPS, latency and failed transactions from pgbench's summary.

    pgbench 15 prints "tps = N (without initial connection time)", and with -C
    "tps = N (including reconnection times)"; older ones printed two tps lines
    ("including connections establishing" / "excluding ..."). Take the one that
    does not count the initial connections, else the first.
    """
    result = RunResult()
    tps_lines = re.findall(r"^tps = ([0-9.]+) \(([^)]*)\)", output, re.MULTILINE)
    if tps_lines:
        preferred = [v for v, how in tps_lines if "without" in how or "excluding" in how or "reconnection" in how]
        result.tps = float((preferred or [tps_lines[0][0]])[0])
    m = re.search(r"^latency average = ([0-9.]+) ms", output, re.MULTILINE)
    if m:
        result.latency_ms = float(m.group(1))
    m = re.search(r"^number of transactions actually processed: (\d+)", output, re.MULTILINE)
    if m:
        result.transactions = int(m.group(1))
    m = re.search(r"^number of failed transactions: (\d+)", output, re.MULTILINE)
    if m:
        result.failed_transactions = int(m.group(1))
    return result


def client_env() -> dict[str, str]:
    """libpq's environment for the clients (pgbench, the bytea clients): the password, no SSL or GSS."""
    return dict(os.environ, PGPASSWORD=PASSWORD, PGSSLMODE="disable", PGGSSENCMODE="disable",
                PGCONNECT_TIMEOUT="10")


def start_pgbench(pgbench: str, port: int, args: tuple[str, ...], duration: int) -> subprocess.Popen:
    """pgbench -T duration against a target on 127.0.0.1, output captured, in a session of its own."""
    argv = [pgbench, "-h", "127.0.0.1", "-p", str(port), "-U", USER, "-T", str(duration), *args, DATABASE]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=client_env(), start_new_session=True)


def run_pgbench(pgbench: str, port: int, args: tuple[str, ...], duration: int, log) -> RunResult:
    proc = start_pgbench(pgbench, port, args, duration)
    try:
        output, _ = proc.communicate(timeout=duration + RUN_GRACE)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        output += f"\n[bench] pgbench killed after {duration + RUN_GRACE:.0f} s\n"
    finally:
        if proc.poll() is None:   # interrupted: stop it before anything else
            proc.kill()
            proc.wait()
    log.write(f"$ {' '.join(proc.args)}\n{output}\n")
    log.flush()
    result = parse_pgbench(output)
    errors = error_summary(output)
    if proc.returncode != 0:
        result.error = f"pgbench exit {proc.returncode}: {errors or last_line(output)}"
    elif errors:
        # pgbench goes on after some errors and exits 0: with -M prepared, a failed
        # PREPARE ("already exists": a statement another session left on the server
        # connection) is reported and the run continues with whatever the server has.
        result.error = errors
    elif result.failed_transactions:
        result.error = f"{result.failed_transactions} failed transactions"
    elif re.search(r"^number of transactions actually processed: 0$", output, re.MULTILINE):
        result.error = (f"no transaction completed within -T {duration} s"
                        " (did connecting the clients take it all?)")
    elif result.tps is None:
        result.error = "no tps line in pgbench output"
    return result


def error_summary(output: str) -> str:
    """pgbench's "pgbench: error: ..." messages, counted, or "" if there are none.

    Its threads write to the same stream, so two messages may share a line or be
    cut in two: count the "error:" markers, and show the commonest messages.
    """
    count = len(re.findall(r"error:", output))
    if not count:
        return ""
    messages: Counter[str] = Counter()
    for line in output.splitlines():
        for part in line.split("error:")[1:]:
            message = " ".join(part.replace("pgbench:", " ").split())   # another line's pieces out
            if message:
                messages[message[:160]] += 1
    shown = "; ".join(f"{m} (×{n})" if n > 1 else m for m, n in messages.most_common(2))
    return f"{count} pgbench error{'s' if count > 1 else ''}: {shown or 'unreadable'}"


def last_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    return lines[-1].strip()[:200] if lines else "no output"


# ------------------------------------------------------------ large messages

def bytea_client(argv: list[str]) -> int:
    """`bench.py --bytea-client PORT TRIPS SECONDS PERIOD MB...`: the large-message client that ByteaClient runs.

    Connects to 127.0.0.1:PORT as the pgbench clients do (same user and database,
    so into the same pgforkpool pool; client_env() from its parent), autocommit and
    without prepared statements (PgBouncer's transaction mode has none), makes one
    untimed 1 MB round trip (the session's first statement, its buffers), prints
    "connected", then for each size makes up to TRIPS round trips of `SELECT $1::bytea`
    with an MB-megabyte value bound as a binary parameter and the result in binary,
    starting none after SECONDS on that size or once its standard input is closed (its
    parent's way of saying stop), one every PERIOD seconds if PERIOD is not 0 (the next at once
    when one took longer), and prints "MB SECONDS" after each. An error is
    printed as "error: ..." (exit 1).
    """
    import psycopg   # only this client needs it

    port, trips, seconds, period_arg, *sizes = argv
    period = float(period_arg)

    def round_trip(conn: psycopg.Connection, mb: int) -> float:
        payload = bytes(range(256)) * (4096 * mb)
        start = time.perf_counter()
        value = conn.execute("SELECT %b::bytea", [payload], binary=True).fetchone()[0]
        elapsed = time.perf_counter() - start
        if value != payload:
            raise RuntimeError(f"the {mb} MB value came back altered ({len(value)} bytes)")
        return elapsed

    try:
        with psycopg.connect(host="127.0.0.1", port=int(port), user=USER, dbname=DATABASE,
                             autocommit=True, prepare_threshold=None) as conn:
            round_trip(conn, 1)
            print("connected", flush=True)
            for mb in map(int, sizes):
                deadline = time.monotonic() + float(seconds)
                start_at = time.monotonic()
                for _ in range(int(trips)):
                    # End of file on stdin: stop (waited for up to the next start when paced).
                    if select.select([sys.stdin], [], [], max(0.0, start_at - time.monotonic()))[0]:
                        return 0
                    start_at += period
                    print(f"{mb} {round_trip(conn, mb):.6f}", flush=True)
                    if time.monotonic() >= deadline:
                        break
    except (psycopg.Error, RuntimeError, OSError) as exc:
        print(f"error: {' '.join(str(exc).split())[:300]}", flush=True)
        return 1
    return 0


class ByteaClient:
    """bytea_client in a process (and session) of its own, its output read by a thread as it
    comes; killed if it outlives its own bounds by RUN_GRACE or the run is interrupted."""

    def __init__(self, port: int, sizes: tuple[int, ...], trips: int, seconds: float, period: float = 0.0):
        self.argv = [sys.executable, os.path.abspath(__file__), BYTEA_CLIENT, str(port), str(trips),
                     str(seconds), str(period), *map(str, sizes)]
        self.bound = len(sizes) * seconds + RUN_GRACE
        self.deadline = time.monotonic() + self.bound
        self.lines: list[str] = []
        self.connected = threading.Event()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=client_env(),
                                     start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if line == "connected\n":
                self.connected.set()
        self.connected.set()   # it has exited: wait no more

    def __enter__(self) -> "ByteaClient":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:   # interrupted: stop it before anything else
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass

    def wait_connected(self) -> bool:
        self.connected.wait(STOP_WAIT)
        return "connected" in self.lines

    def finish(self, log, stop: bool = False) -> RunResult:
        """Its round trips and error, once it has exited (told to `stop` first, or killed past its bound)."""
        if stop:
            self.proc.stdin.close()
        killed = ""
        try:
            self.proc.wait(timeout=max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            killed = f"bytea client killed after {self.bound:.0f} s"
        self.reader.join(timeout=STOP_WAIT)
        lines = list(self.lines)
        output = "\n".join(lines)
        log.write(f"$ {' '.join(self.argv[1:])}\n{output}\n" + (f"[bench] {killed}\n" if killed else "") + "\n")
        log.flush()
        result = RunResult()
        for line in lines:
            if re.fullmatch(r"\d+ [0-9.]+", line):
                mb, seconds = line.split()
                result.round_trips.setdefault(int(mb), []).append(float(seconds))
        errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
        if not errors and self.proc.returncode not in (0, None) and not killed:
            errors = [f"bytea client exit {self.proc.returncode}: {last_line(output)}"]
        if not errors and "connected" not in lines:
            errors = ["it never connected (connection and an untimed 1 MB round trip)"]
        result.error = "; ".join(filter(None, (killed, *errors)))
        return result


def run_bytea_sizes(port: int, sizes: tuple[int, ...], log) -> RunResult:
    """Round trips of each of `sizes` MB through a target, one client."""
    with ByteaClient(port, sizes, BYTEA_TRIPS, BYTEA_SECONDS) as client:
        result = client.finish(log)
    missing = [str(mb) for mb in sizes if mb not in result.round_trips]
    if missing:
        result.error = "; ".join(filter(None, (result.error, f"no round trip of {', '.join(missing)} MB")))
    return result


def run_pgbench_during_bytea(pgbench: str, port: int, args: tuple[str, ...], duration: int, log,
                             mb: int, period: float = 0.0) -> RunResult:
    """A pgbench run while another client loops `mb` MB round trips through the same target, from
    before pgbench starts until it ends (DURING_TRIPS at most; one every `period` seconds unless
    0); the tps, and those round trips."""
    with ByteaClient(port, (mb,), DURING_TRIPS, duration + STOP_WAIT, period) as client:
        if not client.wait_connected():
            stuck = client.proc.poll() is None
            client.proc.kill()
            background = client.finish(log)
            return RunResult(error=f"{mb} MB client: " + (f"not connected after {STOP_WAIT:.0f} s (connection and an "
                                                          "untimed 1 MB round trip)" if stuck else background.error))
        result = run_pgbench(pgbench, port, args, duration, log)
        background = client.finish(log, stop=True)
    result.round_trips = background.round_trips
    if background.error:
        result.error = "; ".join(filter(None, (result.error, f"{mb} MB client: {background.error}")))
    return result


def run_pgbench_skewed(pgbench: str, port: int, args: tuple[str, ...], duration: int, log,
                       long_clients: int) -> RunResult:
    """pgbench `args` with per-transaction logs (for the p99), while `long_clients` other
    clients loop LONG_TRANSACTION through the same target for a second longer."""
    with tempfile.TemporaryDirectory(prefix="pgforkpool-skewed-") as tmp:
        script = os.path.join(tmp, "long.sql")
        with open(script, "w") as f:
            f.write(LONG_TRANSACTION)
        long_run = start_pgbench(pgbench, port, ("-n", "-f", script, "-c", str(long_clients), "-j", "1"),
                                 duration + 1)
        try:
            result = run_pgbench(pgbench, port, (*args, "-l", "--log-prefix", os.path.join(tmp, "short")),
                                 duration, log)
        finally:
            try:
                long_output, _ = long_run.communicate(timeout=RUN_GRACE + 1)
            except subprocess.TimeoutExpired:
                long_run.kill()
                long_output, _ = long_run.communicate()
        log.write(f"$ {' '.join(long_run.args)}\n{long_output}\n")
        latencies = []
        for name in os.listdir(tmp):
            if name.startswith("short"):
                with open(os.path.join(tmp, name)) as f:
                    # client_id transaction_no latency_us script_no epoch epoch_us
                    latencies += [int(line.split()[2]) for line in f if line.strip()]
    if latencies:
        latencies.sort()
        result.p99_ms = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] / 1000
    if long_run.returncode != 0 and not result.error:
        result.error = f"the {long_clients} long clients' pgbench: exit {long_run.returncode}: {last_line(long_output)}"
    return result


def run_case(pgbench: str, case: Case, port: int, args: argparse.Namespace, log) -> RunResult:
    if case.workload.long_clients:
        return run_pgbench_skewed(pgbench, port, case.pgbench_args, args.duration, log, case.workload.long_clients)
    if case.workload.bytea_sizes:
        return run_bytea_sizes(port, args.sizes, log)
    if case.workload.bytea_during:
        return run_pgbench_during_bytea(pgbench, port, case.pgbench_args, args.duration, log,
                                        case.workload.bytea_during, case.workload.bytea_period)
    return run_pgbench(pgbench, port, case.pgbench_args, args.duration + case.workload.extra_seconds, log)


def case_seconds(case: Case, args: argparse.Namespace) -> float:
    """About how long one run of `case` takes (for the estimate)."""
    if case.workload.bytea_sizes:
        return 2.0 * len(args.sizes)
    return args.duration + case.workload.extra_seconds + (1.2 if case.workload.bytea_during else 0.2)


# ------------------------------------------------------------------ report

def fmt(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def quotient(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


Measure = Callable[[RunResult], float | None]   # what a table row shows of a run


def median_of(results: list[RunResult], measure: Measure) -> float | None:
    values = [measure(r) for r in results if r.ok and measure(r) is not None]
    return statistics.median(values) if values else None


def by_round(results: list[RunResult], measure: Measure) -> list[float | None]:
    """A target's figure in each round (None where its run failed)."""
    return [measure(r) if r.ok else None for r in results]


def per_round(mine: list[float | None], theirs: list[float | None]) -> list[float]:
    """pgforkpool's figure over the other target's, round by round, where both have one: both ran within
    the same minute, so what the machine did in that minute weighs on both sides of each quotient."""
    return [q for q in map(quotient, mine, theirs) if q is not None]


def paired_ratio(values: list[float]) -> str:
    """The median of the per-round quotients, with their range."""
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def cell(results: list[RunResult], measure: Measure, digits: int) -> str:
    value = fmt(median_of(results, measure), digits)
    failed = sum(not r.ok for r in results)
    if failed:
        value += f" ({failed}/{len(results)} failed)"
    return value


def results_table(cases: list[Case], results: dict, targets: tuple[str, ...], baselines: list[str]) -> str:
    """Medians per target, then pgforkpool over direct, over PgBouncer and over each baseline: the median of
    the rounds' quotients (each round's two runs side by side), with their range."""
    compared = [t for t in ("direct", "pgbouncer", *baselines) if t in targets]
    rows = ["| workload | " + " | ".join(f"{t} tps" for t in targets) + " | "
            + " | ".join(f"pgforkpool/{t}" for t in compared) + " |",
            "| --- |" + " ---: |" * (len(targets) + len(compared))]

    def add(label: str, cells: dict[str, str], ratios: dict[str, list[float]]) -> None:
        rows.append(f"| {label} | " + " | ".join(cells[t] for t in targets) + " | "
                    + " | ".join(paired_ratio(ratios[t]) for t in compared) + " |")

    def row(case: Case, label: str, measure: Measure, digits: int) -> None:
        runs = {t: results.get((case, t), []) for t in targets}
        if any(runs.values()):
            add(label, {t: cell(runs[t], measure, digits) for t in targets},
                {t: per_round(by_round(runs["pgforkpool"], measure), by_round(runs[t], measure))
                 for t in compared})

    for case in cases:
        if case.protocol:
            row(case, case.label, attrgetter("tps"), 0)
    for case in cases:
        if case.workload.relative_to:   # tps over that of the workload it is relative to, per target
            base = Case(next(w for w in WORKLOADS if w.key == case.workload.relative_to), case.protocol)
            if any(results.get((base, t)) for t in targets):
                medians = {t: quotient(median_of(results.get((case, t), []), attrgetter("tps")),
                                       median_of(results.get((base, t), []), attrgetter("tps"))) for t in targets}
                # per round, each target's tps during over its tps alone in that round
                relative = {t: list(map(quotient, by_round(results.get((case, t), []), attrgetter("tps")),
                                        by_round(results.get((base, t), []), attrgetter("tps"))))
                            for t in targets}
                add(f"{case.workload.name}: tps over that of {base.workload.key} (`-M {case.protocol}`)",
                    {t: fmt(medians[t], 2) for t in targets},
                    {t: per_round(relative["pgforkpool"], relative[t]) for t in compared})
    for case in cases:
        if case.workload.latency:
            row(case, f"{case.workload.name}: latency average, ms (lower is better) (`-M {case.protocol}`)",
                attrgetter("latency_ms"), 3)
    for case in cases:
        if case.workload.long_clients:
            row(case, f"{case.workload.name}: the 16 clients' p99 latency, ms (lower is better) "
                      f"(`-M {case.protocol}`)", attrgetter("p99_ms"), 2)
    for case in cases:
        if case.protocol and not case.workload.bytea_during:
            row(case, f"{case.workload.name}: pooler CPU per transaction, µs (lower is better) "
                      f"(`-M {case.protocol}`)", attrgetter("cpu_us"), 1)
    for case in cases:
        if case.protocol and not case.workload.bytea_during:
            row(case, f"{case.workload.name}: pooler context switches per transaction (lower is better) "
                      f"(`-M {case.protocol}`)", attrgetter("switches"), 2)
    for case in cases:
        if case.workload.bytea_sizes:
            sizes = sorted({mb for t in targets for r in results.get((case, t), []) for mb in r.round_trips})
            for mb in sizes:
                row(case, f"{case.workload.name}, {mb} MB each way: median seconds (lower is better)",
                    lambda r, mb=mb: r.seconds(mb), 4)
            small, large = GROWTH_SIZES_MB
            row(case, f"{case.workload.name}: time per MB at {large} MB over at {small} MB (1.00 is linear)",
                attrgetter("growth"), 2)
            row(case, f"{case.workload.name}: pooler CPU per MB each way, all sizes, ms (lower is better)",
                attrgetter("cpu_ms_per_mb"), 3)
    return "\n".join(rows)


def runs_table(cases: list[Case], results: dict, rounds: int, targets: tuple[str, ...]) -> str:
    rows = ["| workload | target | " + " | ".join(f"round {i + 1}" for i in range(rounds)) + " |",
            "| --- | --- |" + " ---: |" * rounds]
    for case in cases:
        for target in targets:
            runs = results.get((case, target), [])
            if not runs:
                continue
            cells = [summary(case, r, tps_unit="") + ("" if r.ok else " ✗") for r in runs]
            cells += [""] * (rounds - len(cells))
            rows.append(f"| {case.short} | {target} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def failures_section(cases: list[Case], results: dict, targets: tuple[str, ...]) -> str:
    lines = []
    for case in cases:
        for target in targets:
            for i, r in enumerate(results.get((case, target), [])):
                if not r.ok:
                    lines.append(f"- {case.short}, {target}, round {i + 1}: {r.error}")
    return "\n".join(lines)


def summary(case: Case, r: RunResult, tps_unit: str = " tps") -> str:
    """One run in a few words: its tps (and latency), and its bytea round trips."""
    parts = []
    if r.tps is not None:
        parts.append(f"{r.tps:,.0f}{tps_unit}"
                     + (f", {r.latency_ms:.3f} ms" if case.workload.latency and r.latency_ms is not None else "")
                     + (f", p99 {r.p99_ms:.2f} ms" if r.p99_ms is not None else ""))
    elif not r.round_trips:
        parts.append("no tps" if case.protocol else "no round trip")
    parts += [f"{len(trips)} × {mb} MB, median {r.seconds(mb):.4f} s" for mb, trips in sorted(r.round_trips.items())]
    return "; ".join(parts)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def command_output(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=REPO)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


# ------------------------------------------------------------------ profile

def py_spy() -> str:
    path = os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.access(path, os.X_OK):
        say("installing py-spy into the virtual environment")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "py-spy"], check=True)
    return path


def pooled_backends(postmaster_pid: int) -> list[int]:
    pids = []
    for child in process_tree(postmaster_pid)[1:]:
        try:
            if " ".join(child.cmdline()).startswith("pgforkpool: backend"):
                pids.append(child.pid)
        except psutil.Error:
            pass
    return pids


def summarize_raw(path: str, top: int = 25) -> str:
    """Self and inclusive sample counts per function from py-spy's raw (collapsed) output.

    A frame reads "function (file:line)"; the line number is dropped to count per function.
    """
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = [re.sub(r":\d+\)$", ")", frame) for frame in stack.split(";")]
            self_counts[frames[-1]] += n
            incl_counts.update(dict.fromkeys(frames, n))
    if not total:
        return "no samples\n"
    out = [f"{total} samples (those py-spy sees as idle left out)", "", "self %  function"]
    out += [f"{100 * n / total:6.1f}  {fn}" for fn, n in self_counts.most_common(top)]
    out += ["", "total %  function"]
    out += [f"{100 * n / total:7.1f}  {fn}" for fn, n in incl_counts.most_common(top)]
    return "\n".join(out) + "\n"


def profile_pgforkpool(pgbench: str, pooler: Service, case: Case, seconds: int, stamp: str, log) -> list[str]:
    """An extra, unrecorded run of `case` through pgforkpool while py-spy samples two pooled backends."""
    spy = py_spy()
    svg = os.path.join(RESULTS_DIR, f"profile-{stamp}.svg")
    raw = os.path.join(RESULTS_DIR, f"profile-{stamp}.raw.txt")
    summary = os.path.join(RESULTS_DIR, f"profile-{stamp}.txt")
    load = start_pgbench(pgbench, pooler.port, case.pgbench_args, seconds + 6)
    spies: list[subprocess.Popen] = []
    raw_pid = None
    try:
        time.sleep(3)   # let the clients connect and the backends fork
        backends = pooled_backends(pooler.proc.pid)
        if not backends:
            raise RuntimeError("no pooled backend found under the pgforkpool postmaster")
        say(f"profiling pgforkpool backend {backends[0]} for {seconds} s (flame graph)"
            + (f" and backend {backends[1]} (raw stacks)" if len(backends) > 1 else ""))
        spies.append(subprocess.Popen([spy, "record", "--pid", str(backends[0]), "--duration", str(seconds),
                                       "--format", "flamegraph", "-o", svg],
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        raw_pid = backends[1] if len(backends) > 1 else None
        if raw_pid:
            spies.append(subprocess.Popen([spy, "record", "--pid", str(raw_pid), "--duration", str(seconds),
                                           "--format", "raw", "-o", raw],
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        for spy_proc in spies:
            spy_proc.wait(timeout=seconds + RUN_GRACE)
        output, _ = load.communicate(timeout=seconds + RUN_GRACE)
        log.write(f"$ {' '.join(load.args)}   # profiled\n{output}\n")
    finally:
        for proc in (*spies, load):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    files = [svg] if os.path.exists(svg) else []
    if raw_pid and os.path.exists(raw):
        with open(summary, "w") as f:
            f.write(f"py-spy, pgforkpool pooled backend {raw_pid}, {case.label} through pgforkpool, "
                    f"{seconds} s\n\n" + summarize_raw(raw))
        files += [raw, summary]
    return files


def perf_profile(pgbench: str, service: "Service", case: Case, seconds: int, stamp: str, log) -> list[str]:
    """An extra, unrecorded run of `case` through `service` while perf samples every process of it.

    perf sees what py-spy cannot: the kernel side of each system call and wake-up, and the
    compiled (mypyc) modules as the C functions they are.  Where the pooler's CPU goes, by
    shared object and by function, with its CPU per transaction (user and system) in the run.
    """
    perf = shutil.which("perf")
    if perf is None:
        raise RuntimeError("perf is not installed (Debian: apt-get install linux-perf)")
    tag = re.sub(r"[^\w.@+-]", "_", service.name)
    summary = os.path.join(RESULTS_DIR, f"perf-{stamp}-{tag}.txt")
    datadir = tempfile.mkdtemp(prefix="pgforkpool-perf-")
    data = os.path.join(datadir, "perf.data")
    load = start_pgbench(pgbench, service.port, case.pgbench_args, seconds + 6)
    recorder = None
    try:
        time.sleep(3)   # let the clients connect and the backends fork
        pids = [p.pid for p in process_tree(service.proc.pid)]
        say(f"perf: sampling {len(pids)} processes of {service.name} for {seconds} s")
        before = cpu_seconds(service.proc.pid)
        t0 = time.monotonic()
        recorder = subprocess.Popen([perf, "record", "-q", "-F", "1999", "-g", "-o", data,
                                     "-p", ",".join(map(str, pids)), "--", "sleep", str(seconds)],
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        recorder.wait(timeout=seconds + RUN_GRACE)
        elapsed = time.monotonic() - t0
        user, system, _switches = cpu_used(before, cpu_seconds(service.proc.pid))
        output, _ = load.communicate(timeout=seconds + RUN_GRACE)
        log.write(f"$ {' '.join(load.args)}   # perf-profiled\n{output}\n")
        result = parse_pgbench(output)
        transactions = result.tps * elapsed if result.tps else 0.0

        def report(*sort: str, limit: str) -> str:
            out = subprocess.run([perf, "report", "-i", data, "--stdio", "--no-children", "-q", "-g", "none",
                                  "--percent-limit", limit, "--sort", ",".join(sort)],
                                 capture_output=True, text=True, timeout=300)
            lines = [line.rstrip() for line in out.stdout.splitlines() if line.strip()]
            return "\n".join(lines[:40])

        head = f"perf, every process of {service.name}, {case.label}, {seconds} s"
        if transactions:
            head += (f": {result.tps:,.0f} TPS; CPU per transaction {1e6 * (user + system) / transactions:.1f} µs"
                     f" (user {1e6 * user / transactions:.1f}, system {1e6 * system / transactions:.1f})")
        text = "\n\n".join([head, "by shared object (self %):", report("dso", limit="0.5"),
                            "by function (self %, top 40):", report("dso", "sym", limit="0.4")])
        with open(summary, "w") as f:
            f.write(text + "\n")
        return [summary]
    finally:
        for proc in (recorder, load):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(datadir, ignore_errors=True)


# ------------------------------------------------------------------ main

STARTED = time.monotonic()


def say(message: str) -> None:
    elapsed = int(time.monotonic() - STARTED)
    print(f"==> {elapsed // 60}:{elapsed % 60:02d} {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    keys = ", ".join(w.key for w in WORKLOADS)
    parser = argparse.ArgumentParser(
        prog="scripts/bench",
        description="pgbench through direct PostgreSQL, pgforkpool, optionally pgforkpool as of an "
                    "older revision (--baseline), and PgBouncer (transaction mode, same pool size), "
                    "interleaved; median TPS and ratios.")
    parser.add_argument("--duration", type=int,
                        help="seconds of each pgbench run (-T); default 6, or 5 with --baseline (more "
                             "targets): the default run takes 8-9 minutes; 3 with --quick")
    parser.add_argument("--rounds", type=int, help="rounds of interleaved runs; the median is taken "
                                                   "over them; default 3, 1 with --quick")
    parser.add_argument("--quick", action="store_true",
                        help="a ~2 minute smoke run (1 round of 3 s runs; bytea round trips "
                             f"up to {BYTEA_SIZES_MB[-2]} MB)")
    parser.add_argument("--baseline", metavar="REV", action="append",
                        help="also run pgforkpool as of git revision REV (a commit, tag or branch of this "
                             "repository) as another target, pgforkpool@REV, built into the temporary "
                             "directory; the table gains the ratio pgforkpool/pgforkpool@REV. May be given "
                             "more than once (one target each)")
    parser.add_argument("--skip", metavar="TARGETS",
                        help="comma-separated targets not to run, of: direct, pgbouncer; e.g. "
                             "`--baseline REV --skip direct,pgbouncer` spends the whole run on pgforkpool "
                             "against REV (more rounds in the same time)")
    parser.add_argument("--pool-size", type=int, default=4,
                        help="pgforkpool session_pool_size and PgBouncer default_pool_size (default 4)")
    parser.add_argument("--scale", type=int, default=10, help="pgbench -i scale factor (default 10)")
    parser.add_argument("--protocol",
                        help="pgbench -M for every workload: simple, extended or prepared, or several "
                             "separated by commas for one row each (default: simple and prepared for "
                             + ", ".join(w.key for w in WORKLOADS if len(w.protocols) > 1)
                             + "; simple for the others)")
    parser.add_argument("--only", metavar="KEYS",
                        help=f"comma-separated workloads to run, of: {keys}; a key's beginning up to a '-' "
                             "selects every workload whose key it begins, e.g. large: the large-message ones "
                             f"(bytea round trips of {', '.join(map(str, BYTEA_SIZES_MB))} MB; select-only "
                             f"alone and during {DURING_MB} MB round trips)")
    parser.add_argument("--profile", action="store_true",
                        help=f"after the rounds, an extra {PROFILED_WORKLOAD} run through pgforkpool "
                             "while py-spy samples two of its pooled backends")
    parser.add_argument("--profile-duration", type=int, default=10, help="seconds py-spy samples (default 10)")
    parser.add_argument("--perf", action="store_true",
                        help=f"after the rounds, an extra {PROFILED_WORKLOAD} run (or --perf-workload) through "
                             "pgforkpool and one through PgBouncer while perf samples every process of each, "
                             "kernel included: CPU by shared object and by function, side by side")
    parser.add_argument("--perf-workload", metavar="KEY", default=PROFILED_WORKLOAD,
                        help=f"the workload --perf samples (default {PROFILED_WORKLOAD})")
    parser.add_argument("--timeout", type=int,
                        help="bound on the whole run in seconds (default: twice the estimate plus 5 min)")
    parser.add_argument("--results-dir", metavar="DIR", default=RESULTS_DIR,
                        help="where the report, latest.md and the pgbench output go (default bench-results/)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (cluster, configs, logs) for inspection")
    args = parser.parse_args(argv)
    args.duration = args.duration or (3 if args.quick else 5 if args.baseline else 6)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.sizes = BYTEA_SIZES_MB[:-1] if args.quick else BYTEA_SIZES_MB
    args.protocols = None
    if args.protocol is not None:
        args.protocols = [p.strip() for p in args.protocol.split(",") if p.strip()]
        if not args.protocols:
            parser.error("--protocol: no protocol given")
        for p in args.protocols:
            if p not in ("simple", "extended", "prepared"):
                parser.error(f"--protocol: unknown protocol {p!r}")
    args.baselines = []   # (target name, commit) per --baseline
    for rev in args.baseline or ():
        commit = resolve_revision(rev)
        if not commit:
            parser.error(f"--baseline: {rev!r} names no commit of the repository {REPO} "
                         "(give a commit hash, tag or branch; `git log --oneline` lists them)")
        if f"pgforkpool@{rev}" in (target for target, _commit in args.baselines):
            parser.error(f"--baseline: {rev!r} is given twice")
        args.baselines.append((f"pgforkpool@{rev}", commit))
    skipped = {t.strip() for t in (args.skip or "").split(",") if t.strip()}
    if skipped - {"direct", "pgbouncer"}:
        parser.error(f"--skip: {', '.join(sorted(skipped - {'direct', 'pgbouncer'}))} cannot be skipped "
                     "(only direct and pgbouncer can)")
    args.targets = tuple(t for t in ("direct", "pgforkpool", *(target for target, _commit in args.baselines),
                                     "pgbouncer") if t not in skipped)
    workloads = WORKLOADS
    if args.only:
        wanted = [k.strip() for k in args.only.split(",") if k.strip()]

        def selects(key: str, w: Workload) -> bool:
            return w.key == key or w.key.startswith(key + "-")

        unknown = [k for k in wanted if not any(selects(k, w) for w in WORKLOADS)]
        if unknown:
            parser.error(f"--only: unknown workload(s) {', '.join(sorted(unknown))}; known: {keys}")
        workloads = tuple(w for w in WORKLOADS if any(selects(k, w) for k in wanted))
    if args.perf and "pgbouncer" in skipped:
        parser.error("--perf profiles pgforkpool beside PgBouncer: it cannot be given with --skip pgbouncer")
    if args.perf and not any(w.key == args.perf_workload and w.args for w in WORKLOADS):
        parser.error(f"--perf-workload: {args.perf_workload} is not a pgbench workload; known: {keys}")
    args.cases = [Case(w, p) for w in workloads for p in ((args.protocols or w.protocols) if w.args else ("",))]
    if min(args.duration, args.rounds, args.pool_size, args.scale) < 1:
        parser.error("--duration, --rounds, --pool-size and --scale must be at least 1")
    return args


def raise_interrupted(signum, _frame) -> None:
    if signum == signal.SIGALRM:
        raise Interrupted("the time limit on the whole run (--timeout) was reached")
    raise Interrupted(f"signal {signal.Signals(signum).name}")


BASELINE_BUILD_ESTIMATE = 20   # seconds: git archive, venv, pip install with a warm cache (~10 s here)


def raise_file_limit(wanted: int = 4096) -> None:
    """select-1000 opens 1,000 sockets in pgbench and in each pooler: lift the soft limit (inherited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))


def main(argv: list[str]) -> int:
    global RESULTS_DIR
    args = parse_args(argv)
    RESULTS_DIR = os.path.abspath(args.results_dir)
    raise_file_limit()
    runs = len(args.cases) * len(args.targets) * args.rounds
    estimate = int(10 + args.scale + 3 * len(args.targets)
                   + sum(case_seconds(case, args) for case in args.cases) * len(args.targets) * args.rounds
                   + BASELINE_BUILD_ESTIMATE * len(args.baselines)
                   + (args.profile_duration + 10 if args.profile else 0)
                   + (2 * (args.profile_duration + 40) if args.perf else 0))
    limit = args.timeout or 2 * estimate + 300
    signal.signal(signal.SIGTERM, raise_interrupted)
    signal.signal(signal.SIGHUP, raise_interrupted)
    signal.signal(signal.SIGINT, raise_interrupted)
    signal.signal(signal.SIGALRM, raise_interrupted)   # the bound on the whole run
    signal.alarm(limit)

    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()[0]
    revision = command_output(["git", "describe", "--always", "--dirty"])   # what scripts/bench installed
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    os.makedirs(RESULTS_DIR, exist_ok=True)
    workdir = server_dir(tempfile.mkdtemp(prefix="pgforkpool-bench-"))
    pgbench_log_path = os.path.join(RESULTS_DIR, f"bench-{stamp}.pgbench.log")
    say(f"{runs} runs of about {args.duration} s; expected ~{estimate // 60} min {estimate % 60} s, "
        f"bounded at {limit} s; working in {workdir}")

    cluster = Cluster(os.path.join(workdir, "pg"), free_port())
    services: list[Service] = []
    results: dict[tuple[Case, str], list[RunResult]] = {}
    restarts: list[str] = []
    settles: list[str] = []
    interrupted = ""
    leftovers: list[str] = []
    profile_files: list[str] = []
    profile_error = ""
    server_version = "unknown"
    pg_tree: list[psutil.Process] = []
    pgbench = pgbench_path()
    baseline_programs: list[str] = []
    baseline_info: list[str] = []
    try:
        with open(pgbench_log_path, "w") as pgbench_log:
            for i, (target, commit) in enumerate(args.baselines):
                # First: a revision that does not build fails the run before anything else.
                say(f"building {target} (commit {commit[:12]}) in a virtual environment of its own")
                program = build_baseline(commit, os.path.join(workdir, f"baseline-{i + 1}"))
                baseline_programs.append(program)
                baseline_info.append(
                    f"{target} is commit {commit[:12]} "
                    f"(\"{command_output(['git', 'log', '-1', '--format=%s', commit])}\"), "
                    f"{command_output([program, '--version'])}, installed from `git archive` "
                    "into a virtual environment of its own; same configuration as pgforkpool, its own port")
            say(f"starting PostgreSQL 15 on port {cluster.port}")
            cluster.init({"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
                          # select-1000 runs 1,000 clients straight at the server too
                          "max_connections": "1100"})
            cluster.start()
            pg_tree = postgres_tree(cluster)
            cluster.psql(f"CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'")
            cluster.psql(f"CREATE DATABASE {DATABASE} OWNER {USER}")
            say(f"pgbench -i -s {args.scale}")
            init = subprocess.run([pgbench, "-i", "-q", "-s", str(args.scale), "-h", cluster.socket_dir,
                                   "-p", str(cluster.port), "-U", USER, DATABASE],
                                  capture_output=True, text=True, timeout=600)
            if init.returncode != 0:
                raise RuntimeError(f"pgbench -i failed:\n{init.stderr}")
            cluster.psql("CHECKPOINT")
            server_version = cluster.psql("SHOW server_version")

            say("starting " + ", ".join(t for t in args.targets if t != "direct"))
            services.append(start_pgforkpool(server_dir(os.path.join(workdir, "pgforkpool")), cluster,
                                             args.pool_size))
            for i, ((target, _commit), program) in enumerate(zip(args.baselines, baseline_programs)):
                services.append(start_pgforkpool(server_dir(os.path.join(workdir, f"pgforkpool-baseline-{i + 1}")),
                                                 cluster, args.pool_size, target, program))
            if "pgbouncer" in args.targets:
                services.append(start_pgbouncer(server_dir(os.path.join(workdir, "pgbouncer")), cluster,
                                                args.pool_size))
            ports = {"direct": cluster.port, **{s.name: s.port for s in services}}

            def warm_up(target: str) -> RunResult:   # 2 s, not recorded
                return run_pgbench(pgbench, ports[target], WARM_UP, 2, pgbench_log)

            say("warming up each target (not recorded)")
            reference: dict[str, float] = {}   # each target's warm-up TPS, for the settling below
            for target in args.targets:
                warm = warm_up(target)
                if not warm.ok:
                    raise RuntimeError(f"warm-up through {target} failed: {warm.error}\n"
                                       f"(see {pgbench_log_path})")
                reference[target] = warm.tps or 0.0

            done = 0
            for rnd in range(args.rounds):
                if rnd:
                    settled = settle(warm_up, round_order(args.targets, rnd)[0], reference)
                    settles.append(settled)
                    say(f"round {rnd + 1}: {settled}")
                for case in args.cases:
                    for target in round_order(args.targets, rnd):
                        done += 1
                        pooler = next((s for s in services if s.name == target), None)
                        before = cpu_seconds(pooler.proc.pid) if pooler else {}
                        r = run_case(pgbench, case, ports[target], args, pgbench_log)
                        if pooler and r.transactions:
                            user, system, switches = cpu_used(before, cpu_seconds(pooler.proc.pid))
                            r.cpu_us = (user + system) * 1e6 / r.transactions
                            r.switches = switches / r.transactions
                        elif pooler and case.workload.bytea_sizes and r.round_trips:
                            # The login and the untimed 1 MB round trip are in it too: a few ms in
                            # about 400 MB.
                            user, system, _switches = cpu_used(before, cpu_seconds(pooler.proc.pid))
                            moved = sum(mb * len(trips) for mb, trips in r.round_trips.items())
                            r.cpu_ms_per_mb = (user + system) * 1e3 / moved
                        exited = pooler is not None and pooler.proc.poll() is not None
                        if exited:
                            r.error = "; ".join(filter(None, (
                                f"{target} has exited (code {pooler.proc.returncode})", r.error)))
                        results.setdefault((case, target), []).append(r)
                        say(f"[{done}/{runs}] round {rnd + 1} {case.workload.key}"
                            + (f" -M {case.protocol}" if case.protocol else "")
                            + f" {target}: {summary(case, r)}" + (f"  FAILED: {r.error}" if not r.ok else ""))
                        if pooler is not None:
                            restart = restart_if_stuck(pooler, r)
                            if restart:
                                restarts.append(f"{target} after round {rnd + 1}, {case.short}: {restart}")
                                say(f"restarted {target}: {restart}")

            if args.profile:
                case = next((c for c in args.cases if c.workload.key == PROFILED_WORKLOAD),
                            Case(next(w for w in WORKLOADS if w.key == PROFILED_WORKLOAD),
                                 (args.protocols or ["simple"])[0]))
                try:
                    profile_files = profile_pgforkpool(pgbench, services[0], case, args.profile_duration,
                                                       stamp, pgbench_log)
                except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
                    profile_error = str(exc)
                    say(f"profile failed: {exc}")
            if args.perf:
                case = next((c for c in args.cases if c.workload.key == args.perf_workload),
                            Case(next(w for w in WORKLOADS if w.key == args.perf_workload),
                                 (args.protocols or ["simple"])[0]))
                for service in (services[0], services[-1]):   # pgforkpool, PgBouncer
                    try:
                        profile_files += perf_profile(pgbench, service, case, args.profile_duration,
                                                      stamp, pgbench_log)
                    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
                        profile_error = "; ".join(filter(None, (profile_error, f"perf, {service.name}: {exc}")))
                        say(f"perf profile of {service.name} failed: {exc}")
    except Interrupted as exc:
        interrupted = exc.reason
        say(f"stopping: {interrupted}")
    except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
        interrupted = f"error: {exc}"
        say(interrupted)
    finally:
        # Nothing may interrupt the clean-up; each step is bounded.
        signal.alarm(0)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        say("stopping " + ", ".join(s.name for s in reversed(services)) + (", " if services else "")
            + "PostgreSQL")
        log_tails = {s.name: tail(s.log_path, 40) for s in services}
        for service in reversed(services):
            leftovers += service.stop()
        pg_tree = postgres_tree(cluster) or pg_tree
        try:
            cluster.stop("fast")
        except subprocess.SubprocessError as exc:
            say(f"pg_ctl stop failed: {exc}")
        leftovers += kill_survivors(pg_tree)
        if leftovers:
            say(f"killed leftover processes: {'; '.join(leftovers)}")
        if args.keep:
            say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    if not results:
        if os.path.exists(pgbench_log_path) and not os.path.getsize(pgbench_log_path):
            os.remove(pgbench_log_path)
        say("no results")
        return 1
    versions = {
        "pgbench": command_output([pgbench, "--version"]),
        "PgBouncer": command_output([PGBOUNCER, "--version"]),
        "pgforkpool": command_output([PGFORKPOOL, "--version"]),
        "PostgreSQL server": server_version,
        "Python": platform.python_version(),
        "git": revision,
    }
    load = (load_before, os.getloadavg()[0])
    report = render(args, started, load, versions, baseline_info, results, interrupted, profile_files,
                    profile_error, log_tails, pgbench_log_path, restarts, settles)
    path = os.path.join(RESULTS_DIR, f"bench-{stamp}.md")
    with open(path, "w") as f:
        f.write(report)
    if not interrupted:   # latest.md is always a complete run
        shutil.copyfile(path, os.path.join(RESULTS_DIR, "latest.md"))
    print(report)
    say(f"written to {os.path.relpath(path)}"
        + ("" if interrupted else f" and {os.path.relpath(os.path.join(RESULTS_DIR, 'latest.md'))}")
        + f"; pgbench output in {os.path.relpath(pgbench_log_path)}")
    # PgBouncer's and the baseline's failures are facts about them (PgBouncer 1.18
    # and a pgforkpool older than prepared-statement support both fail -M prepared):
    # reported in the table, but only direct's and the current pgforkpool's fail the run.
    failed = any(not r.ok for (_case, target), rs in results.items() if target in ("direct", "pgforkpool")
                 for r in rs)
    return 1 if interrupted or failed else 0


def postgres_tree(cluster: Cluster) -> list[psutil.Process]:
    """The postmaster (from postmaster.pid) and its children, to make sure they are gone at the end."""
    try:
        with open(os.path.join(cluster.data_dir, "postmaster.pid")) as f:
            return process_tree(int(f.readline()))
    except (OSError, ValueError):
        return []


def loop_time_section() -> str:
    """Event-loop time of one large message in the pooled backend's protocol objects, by size.

    What a message costs the loop that every other session of the backend
    waits on: a Bind with an N MB parameter fed to ClientProtocol.receive and
    a DataRow of N MB fed to ServerProtocol.receive, in the 64 kB pieces the
    backend reads, without sockets (the installed pgforkpool).
    """
    from pgforkpool.backend.client import ClientProtocol
    from pgforkpool.backend.server import ServerProtocol
    from pgforkpool.backend.statements import StatementRegistry
    from pgforkpool.backend.stream import RECV_SIZE
    from pgforkpool.shared.protocol import message

    def fed(feed, data: bytes) -> float:
        start = time.perf_counter()
        for pos in range(0, len(data), RECV_SIZE):
            feed(data[pos:pos + RECV_SIZE])
        return time.perf_counter() - start

    rows = ["| message size | client → server (Bind), s | per MB, ms | server → client (DataRow), s | per MB, ms |",
            "| ---: | ---: | ---: | ---: | ---: |"]
    for mb in (1, 4, 16, 64):
        value = b"x" * (mb << 20)
        bind = message(b"B", b"\0\0" + b"\0\0" + b"\0\1" + len(value).to_bytes(4, "big") + value + b"\0\0")
        row = message(b"D", b"\0\1" + len(value).to_bytes(4, "big") + value)
        timings = []
        for _ in range(3):
            proto, server = ClientProtocol(StatementRegistry(8)), ServerProtocol()
            proto.receive(message(b"P", b"\0SELECT $1::bytea\0\0\0") + message(b"S", b""), server)
            client_s = fed(lambda chunk: proto.receive(chunk, server), bind)
            server = ServerProtocol()
            server.pending.append(None)
            server_s = fed(server.receive, row)
            timings.append((client_s, server_s))
        client_s, server_s = (statistics.median(t[i] for t in timings) for i in (0, 1))
        rows.append(f"| {mb} MB | {client_s:.4f} | {client_s * 1000 / mb:.3f} | {server_s:.4f} "
                    f"| {server_s * 1000 / mb:.3f} |")
    return "\n".join(rows)


def render(args, started, load, versions, baseline_info, results, interrupted, profile_files, profile_error,
           log_tails, pgbench_log_path, restarts=(), settles=()) -> str:
    header = [
        f"# pgforkpool benchmark, {started.strftime('%Y-%m-%d %H:%M UTC')}",
        "",
        f"- machine: {os.cpu_count()} CPUs ({cpu_model()}), {platform.system()} {platform.release()}; "
        f"pgbench, the poolers and PostgreSQL share them; 1-minute load average {load[0]:.2f} before the run, "
        f"{load[1]:.2f} after (other work on the machine skews the figures)",
        f"- pool size: {args.pool_size} (pgforkpool `session_pool_size`, PgBouncer `default_pool_size`, "
        "`pool_mode = transaction`)",
        f"- rounds: {args.rounds}, the targets interleaved per workload, in an order that changes from round "
        "to round so that no target always runs right after the same one ("
        + "; ".join(f"round {rnd + 1}: {' → '.join(round_order(args.targets, rnd))}"
                    for rnd in range(args.rounds)) + "); " +
        f"duration: {args.duration} s per run (`-T`); a target's cells are its medians over the rounds, a "
        "ratio is the median over the rounds of pgforkpool's figure over the other target's in the same round "
        "(their range in brackets)",
        f"- data: `pgbench -i -s {args.scale}`; server with fsync, synchronous_commit and "
        "full_page_writes off",
        f"- client authentication: {AUTH_METHOD} over TCP 127.0.0.1 for all {len(args.targets)} targets; "
        "the poolers reach PostgreSQL through its unix socket",
        "- versions: " + "; ".join(f"{k} {v}" if not v.lower().startswith(k.lower()) else v
                                   for k, v in versions.items()),
    ]
    header += [f"- baseline: {info}" for info in baseline_info]
    if interrupted:
        header.append(f"- **incomplete run**: {interrupted}")
    notes = ["Ratios above 1 mean pgforkpool is faster in the tps rows and slower in the latency and CPU rows"
             + (f" (pgforkpool/pgforkpool@REV: the current pgforkpool over the one at REV)"
                if args.baselines else "") + "; a ratio is — when either side has no successful run."]
    if any(case.workload.bytea_sizes or case.workload.bytea_during for case, _target in results):
        small, large = GROWTH_SIZES_MB
        notes.append(
            "Large messages (issue 6): a bytea round trip is `SELECT $1::bytea` with a value of N MB (2^20 "
            "bytes) bound as a binary parameter and the result in binary, N MB each way, by a psycopg client "
            "on a connection of its own as the pgbench clients' user to their database (through pgforkpool, "
            "a session of the same pool as theirs, sharing a pooled backend with some of them); "
            f"up to {BYTEA_TRIPS} round trips per size, none started after {BYTEA_SECONDS:.0f} s on a size. "
            f"For the select-only run during round trips, such a client loops {DURING_MB} MB round trips (at "
            f"most {DURING_TRIPS}) from before pgbench starts until it ends, one right after the other, or "
            f"(the run 'one every {PACED_PERIOD} s') starting one every {PACED_PERIOD} s, so that every target "
            f"carries the same work: back to back, a target that moves large messages faster moves more of them "
            f"in the run, which takes more of the shared CPUs from the 10 clients. Goals: time per MB that does not grow "
            f"with the size (the {large} MB over {small} MB row near 1.00), and the 10 clients' tps during the "
            f"round trips at least 0.90 of theirs alone; direct's own figure is what the round trips cost "
            f"the shared CPUs without a pooler. In those rows, a ratio above 1 means pgforkpool is slower "
            f"(seconds), grows faster (time per MB) or loses less (tps over tps alone).")
    failed_targets = {target for (case, target), rs in results.items() if any(not r.ok for r in rs)}
    m = re.search(r"(\d+)\.(\d+)", versions.get("PgBouncer", ""))
    if m and (int(m[1]), int(m[2])) < (1, 21) and any(
            not r.ok for (case, target), rs in results.items()
            if target == "pgbouncer" and case.protocol == "prepared" for r in rs):
        notes.append(f"PgBouncer {versions['PgBouncer'].split()[-1]} in transaction mode does not support "
                     "protocol-level prepared statements (`max_prepared_statements` came with 1.21): a "
                     "client finds the statements of others on its server connection, or misses its own, "
                     "hence its `-M prepared` failures.")
    others = [t for t in args.targets if t in failed_targets and t not in ("direct", "pgforkpool")]
    if others:
        notes.append(f"Failures of {' and '.join(others)} are reported but do not make scripts/bench exit "
                     "non-zero; those of direct and of pgforkpool do.")
    body = ["", results_table(args.cases, results, args.targets, [t for t, _c in args.baselines]), "",
            *(line for note in notes for line in (note, ""))]
    if any(case.workload.bytea_sizes for case, _target in results):
        try:
            body += ["## Event-loop time of one large message (pgforkpool's protocol objects, no sockets)", "",
                     loop_time_section(), "",
                     "Linear growth is a constant time per MB: what one large message costs every other "
                     "session of its backend, which waits for the loop.", ""]
        except ImportError as exc:
            body += [f"(event-loop time not measured: {exc})", ""]
    body += [
            "## Every run (tps, or bytea round trips; ✗ = failed, not counted)", "",
            runs_table(args.cases, results, args.rounds, args.targets)]
    failures = failures_section(args.cases, results, args.targets)
    if settles:
        body += ["", "## Before each round", "",
                 f"Unrecorded warm-ups ({' '.join(WARM_UP)}, 2 s) through the round's first target until one "
                 f"reached {SETTLED:.0%} of its TPS at the start, for at most {SETTLE_LIMIT:.0f} s:", "",
                 *(f"- round {i + 2}: {line}" for i, line in enumerate(settles))]
    if restarts:
        body += ["", "## Restarts", "",
                 "A pooler through which a run hung, or that exited, was stopped and started again "
                 "before its next run:", "", *(f"- {line}" for line in restarts)]
    if failures:
        body += ["", "## Failures", "", failures,
                 "", f"pgbench output: `{os.path.relpath(pgbench_log_path, REPO)}`"]
        for name, text in log_tails.items():
            if text.strip():
                body += ["", f"Last lines of the {name} log:", "", "```", text.rstrip(), "```"]
    if profile_files or profile_error:
        body += ["", "## Profile", ""]
        body += [f"- `{os.path.relpath(p, REPO)}`" for p in profile_files]
        if profile_error:
            body.append(f"- failed: {profile_error}")
        for p in profile_files:
            if p.endswith(".txt") and not p.endswith(".raw.txt"):
                with open(p) as f:
                    text = f.read().split("\n\ntotal %")[0]   # the self-time part
                body += ["", "```", text.rstrip(), "```"]
    return "\n".join(header + body) + "\n"


if __name__ == "__main__":
    if sys.argv[1:2] == [BYTEA_CLIENT]:
        sys.exit(bytea_client(sys.argv[2:]))
    sys.exit(main(sys.argv[1:]))
