"""The query protocol through a pooled backend: every session behaves as if it had its own server connection.

Most tests put two or more clients on one pooled backend (session_pool_size=1)
and check that what one does neither breaks nor shows in the other.
"""

import os
import re
import signal
import socket
import subprocess
import threading
import time
import uuid
from contextlib import closing

import psycopg
import pytest

from conftest import USERS, WAIT, query_running, server_pid, wait_for
from pgforkpool.shared import protocol
from test_errors import RawClient, assert_refused, key_data, ready_status, rows

TCP_CLOSE_WAIT = 8   # Linux's tcp_info.tcpi_state for a connection the peer has closed


class Background:
    """A call run in a thread, whose result or exception is collected with a bounded join."""

    def __init__(self, call):
        self.result = self.error = None
        self.elapsed = 0.0
        self.thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self.thread.start()

    def _run(self, call) -> None:
        started = time.monotonic()
        try:
            self.result = call()
        except Exception as exc:
            self.error = exc
        self.elapsed = time.monotonic() - started

    def join(self, timeout: float = WAIT) -> "Background":
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the call did not finish in time"
        return self


@pytest.fixture
def table(pooler_one):
    """A real table of its own for one test, dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    pooler_one.cluster.psql(f"CREATE TABLE {name} (id int PRIMARY KEY, note text); "
                            f"GRANT ALL ON {name} TO PUBLIC", database="app")
    yield name
    pooler_one.cluster.psql(f"DROP TABLE IF EXISTS {name}", database="app")


@pytest.fixture
def pooler_one(start_pooler):
    """A pooler whose sessions of one pool all share one pooled backend."""
    return start_pooler(session_pool_size=1, auth_method="trust")


# ================================================================ simple and extended query

def test_multi_statement_simple_query(pooler_one, table):
    with pooler_one.connect() as conn, pooler_one.connect() as other:
        cur = conn.execute(f"INSERT INTO {table} VALUES (1, 'one'); SELECT 'two', 2; VALUES (3), (4)")
        assert cur.rowcount == 1
        assert cur.nextset() and cur.fetchall() == [("two", 2)]
        assert cur.nextset() and cur.fetchall() == [(3,), (4,)]
        assert not cur.nextset()
        # A multi-statement query is one implicit transaction: a failure undoes all of it.
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute(f"INSERT INTO {table} VALUES (2, 'two'); SELECT 1 / 0")
        assert other.execute(f"SELECT id, note FROM {table} ORDER BY id").fetchall() == [(1, "one")]
        assert server_pid(conn) == server_pid(other)


def test_error_in_transaction_fails_only_that_session(pooler_one):
    with pooler_one.connect() as conn, pooler_one.connect() as other:
        conn.execute("BEGIN")
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1 / 0")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        waiting = Background(lambda: other.execute("SELECT 'other', 1").fetchone())
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        assert waiting.thread.is_alive(), "the other session ran inside a failed transaction"
        conn.execute("ROLLBACK")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert conn.execute("SELECT 2").fetchone() == (2,)
        assert waiting.join().error is None
        assert waiting.result == ("other", 1)
        assert other.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_extended_protocol_parameters_and_binary_results(pooler_one):
    with pooler_one.connect() as conn, pooler_one.connect() as other:
        values = (41, "héllo wörld", b"\x00\x01\xff", None)
        query = "SELECT %s::int + 1, %s::text, %s::bytea, %s::text IS NULL"
        for cursor in (conn.cursor(), conn.cursor(binary=True)):
            cursor.execute(query, values)
            assert cursor.fetchone() == (42, "héllo wörld", b"\x00\x01\xff", True)
        assert cursor.pgresult.fformat(0) == 1   # the server did send binary
        assert other.cursor(binary=True).execute("SELECT %s::int8 * 2", (2 ** 40,)).fetchone() == (2 ** 41,)
        assert server_pid(conn) == server_pid(other)


def test_psycopg_prepared_statements_of_two_sessions_stay_apart(pooler_one):
    # psycopg prepares a query on the server (as "_pg3_0", "_pg3_1", ...) once it
    # has run it prepare_threshold times: both sessions pick the same names.
    with pooler_one.connect() as first, pooler_one.connect() as second:
        for i in range(8):
            assert first.execute("SELECT %s::int * 2", (i,)).fetchone() == (i * 2,)
            assert second.execute("SELECT %s::text || '!'", (str(i),)).fetchone() == (f"{i}!",)
        assert first.execute("SELECT %s::int - 1", (10,), prepare=True).fetchone() == (9,)
        assert second.execute("SELECT upper(%s::text)", ("x",), prepare=True).fetchone() == ("X",)
        assert server_pid(first) == server_pid(second)


def test_pipeline_mode(pooler_one, table):
    # The other session is a raw client, so that a server connection never handed back
    # shows as a timeout rather than a hang.
    with pooler_one.connect() as conn, RawClient(pooler_one.port, timeout=10) as other:
        assert ready_status(other.login()) == b"I"
        with conn.pipeline():
            inserted = [conn.execute(f"INSERT INTO {table} VALUES (%s, %s) RETURNING id", (i, f"n{i}"))
                        for i in range(1, 6)]
            total = conn.execute(f"SELECT count(*), sum(id) FROM {table}")
            echo = conn.cursor(binary=True).execute("SELECT %s::text, %s::int", ("pipe", 7))
        assert [cur.fetchone() for cur in inserted] == [(i,) for i in range(1, 6)]
        assert total.fetchone() == (5, 15)
        assert echo.fetchone() == ("pipe", 7)
        assert rows(other.query(f"SELECT count(*) FROM {table}")) == [["5"]]
        # An error in a pipeline fails the rest of it, and nothing else.
        with pytest.raises(psycopg.errors.UniqueViolation):
            with conn.pipeline():
                conn.execute(f"INSERT INTO {table} VALUES (%s, 'dup')", (1,))
                conn.execute("SELECT 1")
        assert rows(other.query(f"SELECT count(*) FROM {table}")) == [["5"]]
        assert conn.execute("SELECT 'after'").fetchone() == ("after",)


# ================================================================ COPY and large results

def test_copy_in_and_out(pooler_one, table):
    count = 10_000
    with pooler_one.connect() as writer, pooler_one.connect() as reader:
        with writer.cursor().copy(f"COPY {table} (id, note) FROM STDIN") as copy:
            for i in range(count):
                copy.write_row((i, f"row {i}\twith tab"))
        assert writer.execute(f"SELECT count(*), sum(id) FROM {table}").fetchone() == (
            count, count * (count - 1) // 2)
        with reader.cursor().copy(f"COPY (SELECT id, note FROM {table} ORDER BY id) TO STDOUT") as copy:
            copied = list(copy.rows())
        assert copied == [(str(i), f"row {i}\twith tab") for i in range(count)]
        # A COPY the client abandons (CopyFail) loads nothing and leaves both sessions usable.
        with pytest.raises(RuntimeError):
            with writer.cursor().copy(f"COPY {table} (id, note) FROM STDIN") as copy:
                copy.write_row((count, "abandoned"))
                raise RuntimeError("client gives up")
        assert reader.execute(f"SELECT count(*) FROM {table}").fetchone() == (count,)
        assert writer.execute("SELECT 1").fetchone() == (1,)
        assert server_pid(writer) == server_pid(reader)


def test_large_result_arrives_whole_while_another_session_runs(pooler_one):
    with pooler_one.connect() as big, pooler_one.connect() as small:
        def small_queries():
            return [small.execute("SELECT %s::int", (i,)).fetchone()[0] for i in range(200)]

        others = Background(small_queries)
        for _ in range(3):
            result = big.execute("SELECT repeat('x', 1000), n FROM generate_series(1, 20000) n").fetchall()
            assert len(result) == 20000
            assert all(text == "x" * 1000 for text, _ in result)
            assert [n for _, n in result] == list(range(1, 20001))
        others.join()
        assert others.error is None
        assert others.result == list(range(200))


# ================================================================ cancel

def test_cancel_stops_only_that_sessions_query(pooler_one):
    with pooler_one.connect() as sleeper, pooler_one.connect() as idle:
        before = server_pid(idle)
        sleeping = Background(lambda: sleeper.execute("SELECT pg_sleep(10)"))
        wait_for(lambda: query_running(pooler_one.cluster, "SELECT pg_sleep(10)"), "the sleep to start")
        sleeper.cancel_safe(timeout=WAIT)
        sleeping.join(8)
        assert isinstance(sleeping.error, psycopg.errors.QueryCanceled), sleeping.error
        assert sleeping.error.sqlstate == "57014"
        assert sleeping.elapsed < 5
        assert idle.execute("SELECT 'not cancelled'").fetchone() == ("not cancelled",)
        assert sleeper.execute("SELECT 'still usable'").fetchone() == ("still usable",)
        assert server_pid(idle) == before


def test_cancel_request_with_a_wrong_key_does_nothing(pooler_one):
    with pooler_one.connect() as sleeper, RawClient(pooler_one.port) as bystander:
        pid, bystander_key = key_data(bystander.login())
        assert pid == sleeper.pgconn.backend_pid
        sleeping = Background(lambda: sleeper.execute("SELECT pg_sleep(1.5), 'slept'").fetchone())
        wait_for(lambda: query_running(pooler_one.cluster, "SELECT pg_sleep(1.5)"), "the sleep to start")
        # A made-up key, and the key of another session on the same backend.
        for key in (bystander_key ^ 0x2468ACE, bystander_key):
            with RawClient(pooler_one.port) as canceller:
                canceller.send(protocol.cancel_request(pid, key))
                assert canceller.recv() == b""
        sleeping.join()
        assert sleeping.error is None, sleeping.error
        assert sleeping.result[1] == "slept"
        assert sleeping.elapsed >= 1.4
        # The same request with the right key does cancel (so the above was not lost on the way).
        bystander.send(protocol.query("SELECT pg_sleep(10)"))
        wait_for(lambda: query_running(pooler_one.cluster, "SELECT pg_sleep(10)"), "the sleep to start")
        with RawClient(pooler_one.port) as canceller:
            canceller.send(protocol.cancel_request(pid, bystander_key))
        started = time.monotonic()
        assert bystander.error()["C"] == "57014"
        assert time.monotonic() - started < 5
        assert ready_status(bystander.read_until(protocol.READY_FOR_QUERY)) == b"I"


def test_sessions_on_one_backend_get_different_cancel_keys(pooler_one):
    with RawClient(pooler_one.port) as first, RawClient(pooler_one.port) as second, \
            pooler_one.connect() as third:
        pid1, key1 = key_data(first.login())
        pid2, key2 = key_data(second.login())
        assert pid1 == pid2 == third.pgconn.backend_pid
        assert key1 != key2
        # The pid is the pooled backend's, not the server process's.
        assert pid1 in [child.pid for child in pooler_one.children()]
        assert rows(first.query("SELECT pg_backend_pid()")) != [[str(pid1)]]


# ================================================================ failures of the server or a client

def closed_by_pooler(conn: psycopg.Connection) -> bool:
    """True once the pooler has closed conn's connection (the client's end is in CLOSE_WAIT).

    Looked at from outside because libpq, told FATAL, waits for the close before it
    reports anything: a connection left open would hang the next statement.
    """
    with socket.socket(fileno=os.dup(conn.pgconn.socket)) as sock:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == TCP_CLOSE_WAIT


@pytest.mark.parametrize("owner_first", [True, False], ids=["owner-first", "owner-second"])
def test_lost_server_connection_fails_only_its_owner(pooler_one, owner_first):
    # owner-first: the session that loses its server is the one whose arrival started the backend.
    cluster = pooler_one.cluster
    first, second = pooler_one.connect(), pooler_one.connect()
    owner, other = (first, second) if owner_first else (second, first)
    with closing(owner), closing(other):
        owner.execute("BEGIN")
        old = server_pid(owner)
        assert cluster.psql(f"SELECT pg_terminate_backend({old})") == "t"
        wait_for(lambda: closed_by_pooler(owner), "the pooler to close the session that lost its server",
                 timeout=10)
        with pytest.raises(psycopg.OperationalError, match="terminating connection|server closed"):
            owner.execute("SELECT 1")
        # The log names the session that lost its server connection, as PostgreSQL's would.
        assert re.search(rf"session \d+ app/app@127\.0\.0\.1:\d+: lost server connection "
                         rf"\(server process {old}\)", pooler_one.log()), pooler_one.log()
        assert other.execute("SELECT 'survived'").fetchone() == ("survived",)
        new = server_pid(other)
        assert new != old
    with pooler_one.connect() as newcomer:
        assert newcomer.execute("SELECT 1").fetchone() == (1,)
        assert server_pid(newcomer) == new


def test_client_killed_in_transaction_leaves_no_lock_and_no_row(pooler_one):
    cluster = pooler_one.cluster
    ghost = 800_000 + os.getpid() % 100_000
    env = dict(os.environ, PGPASSWORD=USERS["app"], PGCONNECT_TIMEOUT="10")
    psql = subprocess.Popen(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
                             "-p", str(pooler_one.port), "-U", "app", "-d", "app"],
                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=env, text=True)
    try:
        psql.stdin.write(f"BEGIN;\nINSERT INTO items VALUES ({ghost}, 'ghost');\n"
                         "SELECT pg_advisory_xact_lock(42);\n"
                         "LOCK TABLE items IN ACCESS EXCLUSIVE MODE;\n")
        psql.stdin.flush()
        held = ("SELECT count(*) FROM pg_locks l LEFT JOIN pg_class c ON c.oid = l.relation "
                "WHERE l.granted AND ((c.relname = 'items' AND l.mode = 'AccessExclusiveLock') "
                "OR (l.locktype = 'advisory' AND l.objid = 42))")

        def locked() -> bool:
            assert psql.poll() is None, f"psql exited: {psql.stderr.read()}"
            return cluster.psql(held, database="app") == "2"

        wait_for(locked, "psql to take its locks")
    finally:
        psql.kill()   # SIGKILL, by its pid
        psql.wait(timeout=WAIT)
    assert psql.returncode == -signal.SIGKILL

    with pooler_one.connect() as successor:
        notices = []
        successor.add_notice_handler(lambda diag: notices.append(diag.message_primary))
        successor.execute("BEGIN")
        successor.execute("SET LOCAL lock_timeout = '5s'")
        successor.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
        assert successor.execute("SELECT pg_try_advisory_xact_lock(42)").fetchone() == (True,)
        assert successor.execute("SELECT count(*) FROM items WHERE id = %s", (ghost,)).fetchone() == (0,)
        successor.execute("COMMIT")
        assert notices == []   # no "there is already a transaction in progress"
    assert cluster.psql(f"SELECT count(*) FROM items WHERE id = {ghost}", database="app") == "0"


# ================================================================ a session's own settings

def test_startup_options_are_the_sessions_own(pooler_one):
    default = pooler_one.cluster.psql("SHOW timezone", database="app")
    assert default != "Asia/Tokyo"
    with pooler_one.connect(options="-c timezone=Asia/Tokyo") as tokyo, pooler_one.connect() as plain:
        for _ in range(3):
            assert tokyo.execute("SHOW timezone").fetchone() == ("Asia/Tokyo",)
            assert plain.execute("SHOW timezone").fetchone() == (default,)
        assert tokyo.info.parameter_status("TimeZone") == "Asia/Tokyo"
        assert plain.info.parameter_status("TimeZone") == default
        assert server_pid(tokyo) == server_pid(plain)


def test_application_name_is_the_sessions_own(pooler_one):
    names = ("alpha", "beta", "gamma")
    conns = [pooler_one.connect(application_name=name) for name in names]
    try:
        for _ in range(2):
            for name, conn in zip(names, conns):
                assert conn.execute("SHOW application_name").fetchone() == (name,)
                assert conn.execute("SELECT application_name FROM pg_stat_activity "
                                    "WHERE pid = pg_backend_pid()").fetchone() == (name,)
                assert conn.info.parameter_status("application_name") == name
        assert len({server_pid(conn) for conn in conns}) == 1
    finally:
        for conn in conns:
            conn.close()


def test_invalid_startup_setting_is_22023_and_others_carry_on(pooler_one):
    with pooler_one.connect(options="-c timezone=Asia/Tokyo") as tokyo, pooler_one.connect() as plain:
        before = server_pid(plain)
        default = plain.execute("SHOW timezone").fetchone()[0]
        assert_refused(pooler_one, "22023", 'invalid value for parameter "TimeZone": "Nowhere/Invalid"',
                       options="-c timezone=Nowhere/Invalid")
        assert tokyo.execute("SHOW timezone").fetchone() == ("Asia/Tokyo",)
        assert plain.execute("SHOW timezone").fetchone() == (default,)
        assert server_pid(plain) == before
