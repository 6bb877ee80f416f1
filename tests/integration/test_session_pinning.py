"""State that cannot be copied pins a session to a server connection of its own; nothing leaks."""

import os
import struct
import signal
import subprocess
import threading
import time

import psycopg
import pytest

from pgforkpool.shared import protocol

from conftest import USERS, WAIT, query_running, server_pid, wait_for



def pinned_count(pooler) -> int:
    import json
    out = subprocess.run([os.path.join(os.path.dirname(os.sys.executable), "pgforkpool"), "status",
                          pooler.conf, "--format", "json"], capture_output=True, text=True, timeout=WAIT)
    return sum(b["pinned"] for b in json.loads(out.stdout)["backends"])


def test_temp_table_pins_and_stays_private(two):
    pooler, a, b = two
    shared = server_pid(a)
    a.execute("CREATE TEMP TABLE scratch (x int)")
    a.execute("INSERT INTO scratch VALUES (1), (2)")
    for _ in range(3):
        assert a.execute("SELECT count(*) FROM scratch").fetchone()[0] == 2
        with pytest.raises(psycopg.errors.UndefinedTable):
            b.execute("SELECT count(*) FROM scratch")
    # a kept the connection with its table; b is on a new one.
    assert server_pid(a) == shared
    assert server_pid(b) != shared
    assert pinned_count(pooler) == 1
    # Dropping the last temporary table may return the session to the shared connection.
    a.execute("DROP TABLE scratch")
    assert wait_for(lambda: pinned_count(pooler) == 0)
    assert server_pid(a) == server_pid(b)


@pytest.mark.parametrize("create, use", [
    ("CREATE FUNCTION pg_temp.answer() RETURNS int LANGUAGE sql AS 'SELECT 42'", "SELECT pg_temp.answer()"),
    ("CREATE DOMAIN pg_temp.small AS int CHECK (VALUE < 10)", "SELECT 5::pg_temp.small"),
])
def test_temp_function_or_type_pins_and_stays_private(two, create, use):
    """A function or a type in pg_temp is the session's own like a temporary table: it pinned
    nothing (the check looked at pg_class only), and the next session on the connection could
    call it, where PostgreSQL says its schema does not exist."""
    pooler, a, b = two
    a.execute(create)
    assert a.execute(use).fetchone()[0] in (42, 5)
    with pytest.raises(psycopg.errors.Error):
        b.execute(use)
    assert server_pid(a) != server_pid(b)
    assert pinned_count(pooler) == 1


def test_session_advisory_lock_pins(two):
    pooler, a, b = two
    a.execute("SELECT pg_advisory_lock(4242)")
    assert b.execute("SELECT pg_try_advisory_lock(4242)").fetchone()[0] is False
    assert a.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                     "AND pid = pg_backend_pid()").fetchone()[0] == 1
    assert server_pid(a) != server_pid(b)
    a.execute("SELECT pg_advisory_unlock_all()")
    assert wait_for(lambda: pinned_count(pooler) == 0)
    assert b.execute("SELECT pg_try_advisory_lock(4242)").fetchone()[0] is True
    b.execute("SELECT pg_advisory_unlock_all()")


def test_transaction_advisory_lock_does_not_pin(two):
    pooler, a, b = two
    a.execute("SELECT pg_advisory_xact_lock(77)")
    assert server_pid(a) == server_pid(b)
    assert pinned_count(pooler) == 0


def test_listen_pins_and_notifications_arrive(two):
    pooler, a, b = two
    a.execute("LISTEN jobs")
    b.execute("NOTIFY jobs, 'hello'")
    received = [(note.channel, note.payload) for note in a.notifies(timeout=5, stop_after=1)]
    assert received == [("jobs", "hello")]
    assert server_pid(a) != server_pid(b)


def test_with_hold_cursor_pins(two):
    _, a, b = two
    a.execute("DECLARE c CURSOR WITH HOLD FOR SELECT generate_series(1, 3)")
    assert a.execute("FETCH 2 FROM c").fetchall() == [(1,), (2,)]
    with pytest.raises(psycopg.errors.InvalidCursorName):
        b.execute("FETCH 1 FROM c")
    assert a.execute("FETCH 1 FROM c").fetchall() == [(3,)]


def test_sql_prepare_is_private_to_its_session(two):
    _, a, b = two
    a.execute("PREPARE q(int) AS SELECT $1 * 10")
    for _ in range(3):
        assert a.execute("EXECUTE q(4)").fetchone()[0] == 40
        with pytest.raises(psycopg.errors.InvalidSqlStatementName):
            b.execute("EXECUTE q(4)")


def test_pinned_connection_closes_with_its_session(two):
    pooler, a, b = two
    a.execute("CREATE TEMP TABLE t (x int)")
    pinned = server_pid(a)
    a.close()
    assert wait_for(lambda: pooler.cluster.psql(
        f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pinned}") == "0")
    assert b.execute("SELECT 1").fetchone()[0] == 1


def test_max_pinned_sessions(start_pooler):
    pooler = start_pooler(session_pool_size=1, max_pinned_sessions=1)
    with pooler.connect() as a, pooler.connect() as b, pooler.connect() as c:
        a.execute("CREATE TEMP TABLE t1 (x int)")
        b.execute("CREATE TEMP TABLE t2 (x int)")
        # Checked when its transaction ends: the session is then told, and closed.
        with pytest.raises(psycopg.OperationalError) as info:
            b.execute("SELECT 1")
        assert "too many pinned sessions" in str(info.value)
        # Its table went with its connection: nobody else can see it.
        with pytest.raises(psycopg.errors.UndefinedTable):
            c.execute("SELECT * FROM t2")
        assert a.execute("SELECT count(*) FROM t1").fetchone()[0] == 0


def test_uncommitted_rows_of_a_vanished_client_never_reach_the_next_session(start_pooler):
    pooler = start_pooler(session_pool_size=1)
    env = dict(os.environ, PGPASSWORD=USERS["app"])
    ghost = subprocess.Popen(["psql", "-X", "-q", "-h", "127.0.0.1", "-p", str(pooler.port), "-U", "app",
                              "-d", "app"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, text=True, env=env)
    ghost.stdin.write("BEGIN;\nINSERT INTO items VALUES (990001, 'ghost');\n")
    ghost.stdin.flush()
    assert wait_for(lambda: pooler.cluster.psql(
        "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
        "WHERE c.relname = 'items' AND l.mode = 'RowExclusiveLock'", database="app") == "1")
    os.kill(ghost.pid, signal.SIGKILL)
    ghost.wait(WAIT)
    with pooler.connect(autocommit=False) as next_session:
        assert next_session.execute("SELECT count(*) FROM items WHERE id = 990001").fetchone()[0] == 0
        next_session.commit()
    assert pooler.cluster.psql("SELECT count(*) FROM items WHERE id = 990001", database="app") == "0"


def test_hold_prepared_transactions(start_pooler):
    pooler = start_pooler(session_pool_size=1, hold_prepared_transactions="on")
    with pooler.connect() as a, pooler.connect() as b:
        a.execute("BEGIN")
        a.execute("INSERT INTO items VALUES (990002, '2pc')")
        a.execute("PREPARE TRANSACTION 'pgfp_2pc_test'")
        done = threading.Event()
        threading.Thread(target=lambda: (b.execute("SELECT 1"), done.set()), daemon=True).start()
        assert not done.wait(1.0), "another session ran while a prepared transaction was held"
        a.execute("COMMIT PREPARED 'pgfp_2pc_test'")
        assert done.wait(10)
    pooler.cluster.psql("DELETE FROM items WHERE id = 990002", database="app")


def test_cancel_reaches_only_its_own_query(two):
    pooler, a, b = two
    outcome = {}

    def sleeper():
        try:
            a.execute("SELECT pg_sleep(5)")
            outcome["a"] = "finished"
        except psycopg.errors.QueryCanceled:
            outcome["a"] = "canceled"

    thread = threading.Thread(target=sleeper)
    thread.start()
    wait_for(lambda: query_running(pooler.cluster, "SELECT pg_sleep(5)"), "the sleep to start")
    b.cancel()          # b's key: b runs nothing, so nothing is canceled
    time.sleep(0.5)
    assert query_running(pooler.cluster, "SELECT pg_sleep(5)"), "another session's cancel reached a's query"
    started = time.monotonic()
    a.cancel()
    thread.join(10)
    assert outcome["a"] == "canceled"
    assert time.monotonic() - started < 4
    assert b.execute("SELECT 1").fetchone()[0] == 1


def test_vanished_pipeline_is_rolled_back_not_committed(start_pooler):
    """Parse/Bind/Execute of an INSERT, then the client vanishes before Sync: as with
    PostgreSQL, the implicit transaction is rolled back, not committed."""
    from test_errors import RawClient
    pooler = start_pooler(session_pool_size=1)
    for row in (990101, 990102, 990103):
        raw = RawClient(pooler.port, timeout=5)
        raw.login()
        raw.send(protocol.message(b"P", b"\0INSERT INTO items VALUES ($1, 'unsynced')\0\0\0")
                 + protocol.message(b"B", b"\0\0\0\0\0\1" + struct.pack("!i", 6) + str(row).encode()
                                    + b"\0\0")
                 + protocol.message(b"E", b"\0\0\0\0\0")
                 + protocol.message(b"H"))
        raw.read_until(protocol.COMMAND_COMPLETE, protocol.ERROR_RESPONSE)
        raw.sock.close()
    with pooler.connect() as probe:
        assert probe.execute("SELECT 1").fetchone() == (1,)   # the backend has cleaned up by now
    assert pooler.cluster.psql("SELECT count(*) FROM items WHERE note = 'unsynced'", database="app") == "0"


def test_vanished_clients_session_state_dies_with_it(start_pooler):
    """A client that takes a session advisory lock (or makes a temp table) and leaves at once:
    nothing of it stays on the shared connection."""
    pooler = start_pooler(session_pool_size=1)
    env = dict(os.environ, PGPASSWORD=USERS["app"])
    for sql in ("SELECT pg_advisory_lock(5150)", "CREATE TEMP TABLE left_behind (x int)"):
        subprocess.run(["psql", "-X", "-q", "-h", "127.0.0.1", "-p", str(pooler.port), "-U", "app",
                        "-d", "app", "-c", sql], check=True, env=env, timeout=WAIT)
    with pooler.connect() as other:
        wait_for(lambda: other.execute("SELECT pg_try_advisory_lock(5150)").fetchone()[0],
                 "the vanished client's lock to be released")
        other.execute("SELECT pg_advisory_unlock_all()")
        with pytest.raises(psycopg.errors.UndefinedTable):
            other.execute("SELECT * FROM pg_temp.left_behind")
    wait_for(lambda: pinned_count(pooler) == 0, "no pinned connection left over")


@pytest.mark.parametrize("create, use", [
    ("CREATE TABLE secret_ctas AS SELECT 42 AS secret", "SELECT secret FROM secret_ctas"),
    ("SELECT 43 AS secret INTO secret_into", "SELECT secret FROM secret_into"),
    ("CREATE SEQUENCE secret_seq START 1000", "SELECT nextval('secret_seq')"),
    ("CREATE VIEW secret_view AS SELECT 44 AS secret", "SELECT secret FROM secret_view"),
])
def test_temporary_objects_made_through_a_pg_temp_search_path_pin(two, create, use):
    """With pg_temp first in its search_path, a session's CREATE TABLE AS, SELECT INTO, CREATE
    SEQUENCE or VIEW makes a temporary object, though neither the text nor the command tag says
    so: the session did not pin, and the next session on the connection read the object (and,
    after the first left, a new one did)."""
    pooler, a, b = two
    a.execute("SET search_path = pg_temp, public")
    a.execute("SELECT 1")   # a round trip of its own between: the SET's own pin check is done
    a.execute(create)
    assert a.execute(use).fetchone()[0] in (42, 43, 44, 1000)
    with pytest.raises(psycopg.errors.UndefinedTable):
        b.execute(use)
    assert server_pid(a) != server_pid(b)
    assert pinned_count(pooler) == 1
    a.close()
    with pooler.connect() as c:
        with pytest.raises(psycopg.errors.UndefinedTable):
            c.execute(use)
