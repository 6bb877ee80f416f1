"""Processes a user can see: dedicated backends, supervision, shutdown modes, root, reload, unix socket."""

import os
import random
import signal
import socket
import subprocess
import threading
import time

import psutil
import psycopg
import pytest

from conftest import PGFORKPOOL, Pooler, WAIT, backend_pid, server_pid, title, wait_for
from pgforkpool.shared import protocol, status





def children_titled(pooler, prefix: str) -> dict[int, str]:
    return {p.pid: t for p in pooler.children() if (t := title(p)).startswith(prefix)}


def gone(pid: int) -> bool:
    """Exited (a zombie nobody has reaped yet counts as exited)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for_log(pooler, text: str) -> None:
    wait_for(lambda: text in pooler.log(), f"{text!r} in the pooler's log")


def unique_id() -> int:
    return random.randrange(10_000_000, 2_000_000_000)


# ---------------------------------------------------------------- dedicated backends

def test_dedicated_user_gets_a_backend_and_server_process_per_session(start_pooler):
    pooler = start_pooler(session_pool_size=1)
    first = pooler.connect("postgres", "app", application_name="dedicated-one")
    second = pooler.connect("postgres", "app", application_name="dedicated-two")
    first_backend, second_backend = backend_pid(first), backend_pid(second)
    try:
        pids = server_pid(first), server_pid(second)
        assert pids[0] != pids[1]
        for pid, name in zip(pids, ("dedicated-one", "dedicated-two")):
            assert pooler.cluster.psql(
                f"SELECT usename || ' ' || application_name FROM pg_stat_activity WHERE pid = {pid}") \
                == f"postgres {name}"
        dedicated = children_titled(pooler, "pgforkpool: dedicated backend app/postgres")
        assert sorted(dedicated) == sorted([first_backend, second_backend])
        assert children_titled(pooler, "pgforkpool: backend ") == {}
    finally:
        first.close()
    wait_for(lambda: gone(first_backend) and first_backend not in children_titled(pooler, "pgforkpool: "),
             "the dedicated backend to exit with its client")
    assert second.execute("SELECT current_user").fetchone() == ("postgres",)
    assert second_backend in children_titled(pooler, "pgforkpool: dedicated backend")
    second.close()
    wait_for(lambda: not children_titled(pooler, "pgforkpool: dedicated"),
             "the second dedicated backend to exit with its client")


def test_dedicated_database(start_pooler):
    pooler = start_pooler(session_pool_size=1, dedicated_databases="other")
    other = [pooler.connect("app", "other"), pooler.connect("app", "other")]
    app = [pooler.connect("app", "app"), pooler.connect("app", "app")]
    try:
        assert server_pid(other[0]) != server_pid(other[1])
        assert server_pid(app[0]) == server_pid(app[1])
        assert sorted(children_titled(pooler, "pgforkpool: dedicated backend other/app")) == \
            sorted(backend_pid(c) for c in other)
        assert list(children_titled(pooler, "pgforkpool: backend ")) == [backend_pid(app[0])]
    finally:
        for conn in other + app:
            conn.close()


def test_dedicated_session_keeps_full_session_state(start_pooler):
    pooler = start_pooler(session_pool_size=1)
    with pooler.connect("postgres", "app") as conn, pooler.connect("postgres", "app") as neighbour:
        conn.execute("SET work_mem = '3MB'")
        conn.execute("PREPARE twice(int) AS SELECT $1 * 2")
        conn.execute("CREATE TEMP TABLE scratch (x int)")
        conn.execute("INSERT INTO scratch VALUES (1)")
        with conn.transaction():
            conn.execute("INSERT INTO scratch VALUES (2)")
        neighbour.execute("SELECT 1")
        assert conn.execute("SHOW work_mem").fetchone() == ("3MB",)
        assert conn.execute("EXECUTE twice(21)").fetchone() == (42,)
        assert conn.execute("SELECT sum(x) FROM scratch").fetchone() == (3,)
        assert neighbour.execute("SHOW work_mem").fetchone() != ("3MB",)
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            neighbour.execute("EXECUTE twice(1)")


# ---------------------------------------------------------------- supervision

def test_killed_listener_is_respawned(start_pooler):
    pooler = start_pooler()
    listeners = wait_for(lambda: len(found := children_titled(pooler, "pgforkpool: listener ")) == 2 and found,
                         "two listeners")
    victim, victim_title = next(iter(listeners.items()))
    os.kill(victim, signal.SIGKILL)

    def respawned():
        now = children_titled(pooler, "pgforkpool: listener ")
        return len(now) == 2 and victim not in now and sorted(now.values()) == sorted(listeners.values())
    wait_for(respawned, f"a new process titled {victim_title!r}")
    assert any(pid not in listeners for pid in children_titled(pooler, "pgforkpool: listener "))

    for _ in range(3):
        with pooler.connect() as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    # With one connection held in startup by a listener, the next goes to the other one.
    with socket.create_connection(("127.0.0.1", pooler.port), timeout=5):
        with pooler.connect() as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)


def test_killed_pooled_backend(start_pooler):
    pooler = start_pooler(session_pool_size=1)
    victim_client = pooler.connect()
    victim = backend_pid(victim_client)
    victim_client.execute("SELECT 1")
    os.kill(victim, signal.SIGKILL)
    with pytest.raises(psycopg.OperationalError):
        victim_client.execute("SELECT 1")
    victim_client.close()
    wait_for(lambda: gone(victim) and victim not in children_titled(pooler, "pgforkpool: backend"),
             "the postmaster to reap the killed backend")
    with pooler.connect() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert backend_pid(conn) != victim
        assert list(children_titled(pooler, "pgforkpool: backend app/app")) == [backend_pid(conn)]


def test_a_backend_that_stops_reading_its_channel_gets_its_messages_when_it_reads_again(start_pooler):
    """The postmaster never blocks on a child, and drops nothing for one that is slow: while a
    pooled backend is stopped, thousands of cancel requests for it fill its channel; the
    messages after them, a login the pool sends there among them, wait in the postmaster in
    order. Once the backend runs again, the new client is served (it was refused with
    "could not pass the connection to a backend"), and the first session goes on."""
    pooler = start_pooler(session_pool_size=1, log_connections="on")
    first = pooler.connect()
    first.execute("SET work_mem = '7MB'")
    pid = backend_pid(first)
    postmaster = psutil.Process(pooler.pid)

    def held_clients() -> int:
        """Client connections the postmaster holds a socket of (normally none: it passes them on)."""
        return sum(1 for c in postmaster.net_connections("tcp")
                   if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == pooler.port)

    wrong_key = protocol.cancel_request(pid, 0)
    outcome: list = []

    def login() -> None:
        try:
            with pooler.connect(connect_timeout=WAIT * 3) as conn:
                outcome.append(conn.execute("SELECT current_setting('work_mem')").fetchone()[0])
        except psycopg.Error as exc:
            outcome.append(exc)

    os.kill(pid, signal.SIGSTOP)
    newcomer = threading.Thread(target=login)
    try:
        deadline = time.monotonic() + 60
        sent = 0
        while f"pooled backend {pid} (app/app) is not reading its channel" not in pooler.log():
            assert time.monotonic() < deadline and sent < 20_000, \
                f"{sent} cancel requests did not fill the stopped backend's channel"
            for _ in range(100):
                with socket.create_connection(("127.0.0.1", pooler.port), timeout=10) as sock:
                    sock.sendall(wrong_key)
            sent += 100
        newcomer.start()
        # The login's socket waits in the postmaster, behind the cancels, for the backend.
        wait_for(held_clients, "the new session to wait in the postmaster for the stopped backend")
        assert not outcome, outcome
    finally:
        os.kill(pid, signal.SIGCONT)
    newcomer.join(timeout=WAIT)
    assert outcome == ["4MB"], outcome
    wait_for(lambda: "reads its channel again" in pooler.log(), "the outbox to empty")
    assert held_clients() == 0
    assert first.execute("SHOW work_mem").fetchone() == ("7MB",)
    assert backend_pid(first) == pid and not gone(pid)
    assert "could not pass the connection" not in pooler.log()
    first.close()


def test_children_die_with_the_postmaster(start_pooler):
    pooler = start_pooler(session_pool_size=1)
    pooled = pooler.connect()
    dedicated = pooler.connect("postgres", "app")
    try:
        pooled.execute("SELECT 1")
        children = wait_for(lambda: len(found := pooler.children()) == 4 and found,
                            "two listeners and two backends")
        pids = [p.pid for p in children]
        os.kill(pooler.pid, signal.SIGKILL)
        pooler.proc.wait(timeout=WAIT)
        wait_for(lambda: all(gone(pid) for pid in pids), f"children {pids} to exit with the postmaster")
    finally:
        pooled.close()
        dedicated.close()
        # Left behind by the killed postmaster, which had no chance to remove it.
        try:
            os.unlink(status.table_path(pooler.port))
        except FileNotFoundError:
            pass


# ---------------------------------------------------------------- shutdown

def refused(pooler) -> bool:
    try:
        socket.create_connection(("127.0.0.1", pooler.port), timeout=1).close()
    except OSError:
        return True
    return False


def test_smart_shutdown_lets_sessions_finish(start_pooler):
    pooler = start_pooler(session_pool_size=1)
    session = pooler.connect()
    pid = server_pid(session)
    pooler.signal(signal.SIGTERM)
    wait_for(lambda: "received smart shutdown request" in pooler.log(), "the smart shutdown")
    with pytest.raises(psycopg.OperationalError) as info:   # 57P03, as PostgreSQL says it
        pooler.connect().close()
    assert "the database system is shutting down" in str(info.value)
    for _ in range(3):
        assert server_pid(session) == pid
        time.sleep(0.3)
    assert pooler.proc.poll() is None, "the pooler exited while a session was open"
    session.close()
    assert pooler.proc.wait(timeout=WAIT) == 0


def test_fast_shutdown_rolls_back_open_transactions(start_pooler):
    pooler = start_pooler(session_pool_size=1)
    row = unique_id()
    session = pooler.connect()
    session.execute("BEGIN")
    session.execute("INSERT INTO items VALUES (%s, 'uncommitted')", (row,))
    pooler.signal(signal.SIGINT)
    started = time.monotonic()
    assert pooler.proc.wait(timeout=10) == 0
    assert time.monotonic() - started < 5, "fast shutdown was not prompt"
    with pytest.raises(psycopg.OperationalError) as failure:
        session.execute("SELECT 1")
    assert failure.value.sqlstate in ("57P01", None)
    session.close()
    # Inserting the same key proves the transaction is gone (it would block on its lock otherwise).
    try:
        pooler.cluster.psql(f"SET lock_timeout = '10s'; INSERT INTO items VALUES ({row}, 'after')",
                            database="app")
        assert pooler.cluster.psql(f"SELECT note FROM items WHERE id = {row}", database="app") == "after"
    finally:
        pooler.cluster.psql(f"DELETE FROM items WHERE id = {row}", database="app")


# ---------------------------------------------------------------- root

@pytest.mark.skipif(os.geteuid() != 0, reason="only root must name the user to switch to")
def test_root_without_user_refuses_to_start(cluster):
    pooler = Pooler(cluster, {})
    try:
        del pooler.settings["user"]
        pooler.write_config()
        out = subprocess.run([PGFORKPOOL, "start", pooler.conf], capture_output=True, text=True,
                             timeout=WAIT)
        assert out.returncode != 0
        assert '"user"' in out.stderr, out.stderr
        assert refused(pooler)
    finally:
        pooler.cleanup()


# ---------------------------------------------------------------- reload

def test_sighup_applies_new_session_pool_size(start_pooler):
    pooler = start_pooler(session_pool_size=1)
    conns = [pooler.connect(), pooler.connect()]
    try:
        first = backend_pid(conns[0])
        assert backend_pid(conns[1]) == first
        pooler.write_config(session_pool_size=2)
        pooler.signal(signal.SIGHUP)
        wait_for_log(pooler, 'parameter "session_pool_size" changed to "2"')
        conns.append(pooler.connect())
        assert backend_pid(conns[2]) != first
        conns.append(pooler.connect())
        assert backend_pid(conns[3]) in (first, backend_pid(conns[2]))
    finally:
        for conn in conns:
            conn.close()


def test_broken_config_on_reload_applies_nothing(start_pooler):
    pooler = start_pooler(session_pool_size=1)
    conns = [pooler.connect()]
    try:
        first = backend_pid(conns[0])
        pooler.write_config(session_pool_size=2)
        with open(pooler.conf, "a") as f:
            f.write("nonsense_param = 1\n")
        with open(pooler.conf) as f:
            bad_line = len(f.read().splitlines())
        pooler.signal(signal.SIGHUP)
        wait_for_log(pooler, f"{pooler.conf}:{bad_line}")
        assert pooler.proc.poll() is None
        # The valid change in the same file was not applied either.
        conns.append(pooler.connect())
        assert backend_pid(conns[1]) == first
        assert conns[1].execute("SELECT 1").fetchone() == (1,)
    finally:
        for conn in conns:
            conn.close()


def test_restart_pooler_on_reload(start_pooler):
    pooler = start_pooler(session_pool_size=1)
    old_session = pooler.connect()
    old = backend_pid(old_session)
    server = server_pid(old_session)
    pooler.write_config(restart_pooler_on_reload="on")
    pooler.signal(signal.SIGHUP)
    wait_for_log(pooler, 'parameter "restart_pooler_on_reload" changed to "on"')
    new_session = pooler.connect()
    try:
        assert backend_pid(new_session) != old
        assert new_session.execute("SELECT 1").fetchone() == (1,)
        # The draining backend still serves the session it has.
        assert server_pid(old_session) == server
        time.sleep(0.5)
        assert not gone(old)
        old_session.close()
        wait_for(lambda: gone(old), "the draining backend to exit after its last session")
        assert server_pid(new_session) != server
    finally:
        old_session.close()
        new_session.close()


# ---------------------------------------------------------------- unix socket

def test_unix_socket(start_pooler):
    pooler = start_pooler(session_pool_size=1)
    assert os.path.exists(os.path.join(pooler.dir, f".s.PGSQL.{pooler.port}"))
    with pooler.connect(host=pooler.dir) as over_unix, pooler.connect() as over_tcp:
        assert over_unix.execute("SELECT current_user").fetchone() == ("app",)
        assert server_pid(over_unix) == server_pid(over_tcp)


def test_idle_pool_backend_timeout(start_pooler):
    """A pooled backend with no session for idle_pool_backend_timeout exits; the pool starts afresh."""
    pooler = start_pooler(session_pool_size=1, idle_pool_backend_timeout="1s")
    with pooler.connect() as session:
        first = backend_pid(session)
        time.sleep(1.5)   # busy sessions keep their backend however long they last
        assert session.execute("SELECT 1").fetchone() == (1,)
        assert backend_pid(session) == first
    wait_for(lambda: not psutil.pid_exists(first) or psutil.Process(first).status() == psutil.STATUS_ZOMBIE,
             "the idle backend to exit")
    with pooler.connect() as session:
        assert backend_pid(session) != first
        assert session.execute("SELECT 1").fetchone() == (1,)
