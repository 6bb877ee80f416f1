"""Integration harness: a real PostgreSQL 15 the tests start themselves, and real pgforkpool processes."""

import os
import pwd
import shutil
import signal as signals
import socket
import subprocess
import sys
import tempfile
import time

import psycopg
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "scripts"))
from pgcluster import Cluster  # noqa: E402

# Roles the tests use, with their passwords (also written to the pooler's auth_file).
USERS = {"app": "app-secret", "alice": "alice-secret", "bob": "bob-secret"}
PGFORKPOOL = os.path.join(os.path.dirname(sys.executable), "pgforkpool")
WAIT = 20.0   # the bound on every wait in the harness
READY_LINE = "is ready to accept connections"   # the postmaster's log line once started


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readable_tempdir(prefix: str) -> str:
    """A temporary directory the pooler can use after switching to the postgres user."""
    path = tempfile.mkdtemp(prefix=prefix)
    os.chmod(path, 0o755)
    if os.geteuid() == 0:
        entry = pwd.getpwnam("postgres")
        os.chown(path, entry.pw_uid, entry.pw_gid)
    return path


@pytest.fixture(scope="session")
def cluster():
    base = readable_tempdir("pgforkpool-pg-")
    cluster = Cluster(base, free_port())
    cluster.init({"fsync": "off", "synchronous_commit": "off"})
    cluster.start()
    statements = [f"CREATE ROLE {user} LOGIN PASSWORD '{password}'" for user, password in USERS.items()]
    statements += ["ALTER ROLE postgres PASSWORD 'postgres-secret'",
                   "CREATE DATABASE app OWNER app",
                   "CREATE DATABASE other OWNER app"]
    for sql in statements:
        cluster.psql(sql)
    cluster.psql("CREATE TABLE items (id int PRIMARY KEY, note text); "
                 "GRANT ALL ON items TO PUBLIC; GRANT ALL ON SCHEMA public TO PUBLIC", database="app")
    yield cluster
    cluster.destroy()


class Pooler:
    """One pgforkpool process tree in front of the test cluster."""

    def __init__(self, cluster: Cluster, settings: dict):
        self.cluster = cluster
        self.dir = readable_tempdir("pgforkpool-pool-")
        self.port = free_port()
        self.auth_file = os.path.join(self.dir, "users.txt")
        with open(self.auth_file, "w") as f:
            for user, password in USERS.items():
                f.write(f'"{user}" "{password}"\n')
            f.write('"postgres" "postgres-secret"\n')
        self.settings = {
            "listen_addresses": "127.0.0.1",
            "port": self.port,
            "unix_socket_directories": self.dir,
            "upstream_host": cluster.socket_dir,
            "upstream_port": cluster.port,
            "auth_method": "scram-sha-256",
            "auth_file": self.auth_file,
            "pid_file": os.path.join(self.dir, "pgforkpool.pid"),
            "user": "postgres",
            "authentication_timeout": "10s",
        }
        self.settings.update(settings)
        self.conf = os.path.join(self.dir, "pgforkpool.conf")
        self.write_config()
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(self.dir, "pgforkpool.log")

    def write_config(self, **changes) -> None:
        self.settings.update(changes)
        with open(self.conf, "w") as f:
            for name, value in self.settings.items():
                f.write(f"{name} = '{value}'\n")

    def start(self, *extra_args: str) -> "Pooler":
        # Started means what systemd's READY=1 means: the listening socket is open and the
        # start-up is complete (pid file, status table, listeners), which the log line says.
        ready_lines = self.log().count(READY_LINE) if os.path.exists(self.log_path) else 0
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([PGFORKPOOL, "start", self.conf, *extra_args],
                                     stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pgforkpool exited at start:\n{self.log()}")
            if self.log().count(READY_LINE) > ready_lines:
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                        return self
                except OSError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"pgforkpool did not start listening:\n{self.log()}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def stop(self, signum: int = signals.SIGINT) -> int:
        """Stop the process tree we started (by pid) and return the postmaster's exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout=WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=WAIT)

    def conninfo(self, user: str = "app", dbname: str = "app", password: str | None = None,
                 host: str = "127.0.0.1", **params) -> str:
        password = USERS.get(user, "postgres-secret") if password is None else password
        parts = {"host": host, "port": self.port, "user": user, "dbname": dbname,
                 "password": password, "connect_timeout": 10, "sslmode": "disable"}
        parts.update(params)
        return " ".join(f"{k}='{v}'" for k, v in parts.items())

    def connect(self, user: str = "app", dbname: str = "app", autocommit: bool = True,
                **params) -> psycopg.Connection:
        return psycopg.connect(self.conninfo(user, dbname, **params), autocommit=autocommit)

    def psql(self, sql: str, user: str = "app", dbname: str = "app",
             check: bool = True, **params) -> subprocess.CompletedProcess:
        env = dict(os.environ, PGPASSWORD=USERS.get(user, "postgres-secret"), PGCONNECT_TIMEOUT="10")
        return subprocess.run(["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                               "-h", "127.0.0.1", "-p", str(self.port), "-U", user, "-d", dbname,
                               "-c", sql], capture_output=True, text=True, env=env,
                              timeout=WAIT, check=check)

    def children(self) -> list:
        import psutil
        try:
            return psutil.Process(self.pid).children()
        except psutil.Error:
            return []

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def start_pooler(cluster):
    """Factory: start_pooler(session_pool_size=1, ...) returns a running Pooler."""
    started: list[Pooler] = []

    def start(*args: str, **settings) -> Pooler:
        pooler = Pooler(cluster, settings)
        started.append(pooler)
        return pooler.start(*args)

    yield start
    for pooler in started:
        # Shown by pytest only when the test failed: what the pooler logged.
        print(f"--- pgforkpool log ({pooler.log_path})\n{pooler.log()}")
        pooler.cleanup()


@pytest.fixture
def pooler(start_pooler) -> Pooler:
    return start_pooler()


def server_pid(conn: psycopg.Connection) -> int:
    """The upstream server process serving this connection now."""
    return conn.execute("SELECT pg_backend_pid()").fetchone()[0]


def backend_pid(conn: psycopg.Connection) -> int:
    """The pooler process serving this session: the pid of its BackendKeyData."""
    return conn.pgconn.backend_pid


def title(proc) -> str:
    """A process's title as ps shows it ('pgforkpool: backend app/app 2 sessions 0 waiting')."""
    import psutil
    try:
        return " ".join(proc.cmdline()).strip()
    except psutil.Error:
        return ""


def wait_for(predicate, what: str = "a condition", timeout: float = WAIT):
    """Poll predicate until it returns something true; fail after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def query_running(cluster, text: str) -> bool:
    """True when a server process is executing a statement that starts with text."""
    from pgforkpool.shared import protocol
    return cluster.psql("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
                        f"AND query LIKE {protocol.quote_literal(text + '%')}") != "0"


@pytest.fixture
def two(start_pooler):
    """Two sessions interleaved on one pooled backend (one shared server connection)."""
    pooler = start_pooler(session_pool_size=1)
    a, b = pooler.connect(), pooler.connect()
    assert server_pid(a) == server_pid(b)
    yield pooler, a, b
    a.close()
    b.close()
