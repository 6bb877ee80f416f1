"""Bounded waits: query_wait_timeout and idle_in_transaction_session_timeout, as a client sees them."""

import os
import re
import signal
import subprocess
import threading
import time

import psycopg
import pytest

from conftest import USERS, WAIT, backend_pid, server_pid, wait_for
from pgforkpool.shared import status


def test_a_session_that_waits_too_long_gets_57014_and_stays_usable(start_pooler):
    pool = start_pooler(session_pool_size=1, query_wait_timeout="1s")
    holder = pool.connect(autocommit=False)
    waiter = pool.connect()
    waiter.execute("SET work_mem = '5MB'")
    holder.execute("SELECT 1")   # a transaction holds the backend's one server connection
    assert backend_pid(holder) == backend_pid(waiter)
    started = time.monotonic()
    with pytest.raises(psycopg.errors.QueryCanceled) as info:
        waiter.execute("SELECT 'never ran'")
    waited = time.monotonic() - started
    assert "query_wait_timeout" in str(info.value) and "app/app" in str(info.value)
    assert 1.0 <= waited < 1.0 + 2.5, waited   # the check runs once a second
    # The extended protocol too: the request up to its Sync is answered with the error.
    with pytest.raises(psycopg.errors.QueryCanceled):
        waiter.execute("SELECT %s::int", [1])
    holder.commit()
    # Afterwards the session is as it was: its settings, and it runs queries again.
    assert waiter.execute("SHOW work_mem").fetchone() == ("5MB",)
    assert waiter.execute("SELECT %s::int", [7]).fetchone() == (7,)
    assert server_pid(waiter) == server_pid(holder)
    assert "no server connection became free" in pool.log()


def test_no_timeout_by_default_for_a_short_wait(start_pooler):
    pool = start_pooler(session_pool_size=1)
    holder, waiter = pool.connect(autocommit=False), pool.connect()
    holder.execute("SELECT 1")
    result = []
    t = threading.Thread(target=lambda: result.append(waiter.execute("SELECT 2").fetchone()))
    t.start()
    wait_for(lambda: "1 waiting" in _backend_title(pool), "the waiter to queue")
    holder.commit()
    t.join(timeout=WAIT)
    assert result == [(2,)]


@pytest.fixture
def cancelled_inserts(cluster):
    """A table every user may insert into, made and dropped directly on the server."""
    with psycopg.connect(host=cluster.socket_dir, port=cluster.port, user="postgres", dbname="app",
                         autocommit=True) as owner:
        owner.execute("CREATE TABLE IF NOT EXISTS cancelled_inserts (x int)")
        owner.execute("GRANT ALL ON cancelled_inserts TO PUBLIC")
        yield
        owner.execute("DROP TABLE cancelled_inserts")


def insert_in_thread(conn) -> tuple[threading.Thread, list]:
    """An INSERT into cancelled_inserts started in a thread; the list gets "ran" or the SQLSTATE."""
    outcome: list = []

    def insert():
        try:
            conn.execute("INSERT INTO cancelled_inserts VALUES (1)")
            outcome.append("ran")
        except psycopg.Error as exc:
            outcome.append(exc.sqlstate)
    return threading.Thread(target=insert), outcome


def test_a_cancel_of_a_waiting_statement_keeps_it_from_running(start_pooler, cancelled_inserts):
    """Cancelling a statement that waits for a server connection answers 57014 at once, and the
    statement never runs, as in PostgreSQL (the cancel was dropped, and the statement ran when
    the connection came free: an INSERT the user had cancelled was committed)."""
    pool = start_pooler(session_pool_size=1)
    holder = pool.connect(autocommit=False)
    waiter = pool.connect()
    holder.execute("SELECT 1")   # a transaction holds the backend's one server connection
    t, outcome = insert_in_thread(waiter)
    t.start()
    try:
        wait_for(lambda: "1 waiting" in _backend_title(pool), "the INSERT to queue")
        waiter.cancel()
        t.join(timeout=WAIT)
        assert outcome == ["57014"], outcome   # answered while the holder still holds the connection
    finally:
        holder.commit()
        t.join(timeout=WAIT)
    assert waiter.execute("SELECT count(*) FROM cancelled_inserts").fetchone() == (0,)
    assert waiter.execute("SELECT 2").fetchone() == (2,)   # the session goes on
    assert "canceled while waiting for a server connection" in pool.log()


def test_a_cancel_while_the_sessions_settings_are_restored_keeps_its_statement_from_running(
        start_pooler, cancelled_inserts):
    """A session gets the connection, and its statement waits there while the pooler puts its
    settings back (the server process is stopped to hold the restore): a cancel then answers 57014
    at once, before the server has done anything, and the statement never runs (the cancel was
    dropped, as the session's own statement had not reached the server)."""
    pool = start_pooler(session_pool_size=1)
    mover, other = pool.connect(), pool.connect()
    other.execute("SET work_mem = '9MB'")   # the connection now has other's settings
    upstream = server_pid(other)
    table = status.StatusTable.attach(pool.port)
    slot = next(s for s in table.slots() if s["kind"] == "pooled")
    os.kill(upstream, signal.SIGSTOP)   # the restore for mover will wait there
    t, outcome = insert_in_thread(mover)
    try:
        t.start()
        # mover owns the connection (ready to run: 1) while its restore waits on the server.
        wait_for(lambda: next(s["waiting"] for s in table.slots() if s["pid"] == slot["pid"]) == 1,
                 "the session to take the connection")
        mover.cancel()
        t.join(timeout=WAIT)
        assert outcome == ["57014"], outcome   # answered while the server process is stopped
    finally:
        os.kill(upstream, signal.SIGCONT)
        t.join(timeout=WAIT)
    assert mover.execute("SELECT count(*) FROM cancelled_inserts").fetchone() == (0,)
    assert mover.execute("SHOW work_mem").fetchone() == ("4MB",)
    assert other.execute("SHOW work_mem").fetchone() == ("9MB",)
    assert "canceled while its settings were being restored" in pool.log()


def _backend_title(pool):
    import psutil
    for child in pool.children():
        try:
            title = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "backend app/app" in title:
            return title
    return ""


def test_idle_in_transaction_timeout_ends_the_session_and_frees_the_connection(start_pooler, cluster):
    pool = start_pooler(session_pool_size=1, idle_in_transaction_session_timeout="1s")
    idle = pool.connect(autocommit=False)
    idle.execute("INSERT INTO items VALUES (424242, 'rolled back')")
    other = pool.connect()
    # The other session waits for the connection, then gets it once the idle one is ended.
    started = time.monotonic()
    assert other.execute("SELECT 1").fetchone() == (1,)
    assert time.monotonic() - started < 1.0 + 2.5
    with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout) as info:   # 25P03, as from PostgreSQL
        idle.execute("SELECT 1")
    assert "idle-in-transaction timeout" in str(info.value)
    assert idle.closed or idle.broken
    assert cluster.psql("SELECT count(*) FROM items WHERE id = 424242", database="app") == "0"
    # A transaction that is busy, not idle, is left alone however long it runs.
    busy = pool.connect(autocommit=False)
    busy.execute("SELECT pg_sleep(1.5)")
    busy.execute("SELECT 1")
    busy.commit()


def test_an_upstream_restart_ends_no_session_between_transactions(start_pooler, cluster):
    pool = start_pooler(session_pool_size=2, query_wait_timeout="60s")
    sessions = [pool.connect() for _ in range(6)]
    for i, conn in enumerate(sessions):
        conn.execute(f"SET application_name = 'client{i}'")
        conn.execute("SELECT 1")
    cluster.stop("fast")
    try:
        # A query sent while the server is down waits for it, then runs.
        result = []
        t = threading.Thread(target=lambda: result.append(sessions[0].execute("SELECT 42").fetchone()))
        t.start()
        wait_for(lambda: "connecting again" in pool.log(), "the backend to dial again")
    finally:
        cluster.start()
    t.join(timeout=WAIT)
    assert result == [(42,)]
    assert "is back" in pool.log()
    for i, conn in enumerate(sessions):   # every session is still there, its settings too
        assert conn.execute("SHOW application_name").fetchone() == (f"client{i}",)
        assert conn.execute("SELECT %s::int", [i]).fetchone() == (i,)


def test_an_upstream_restart_under_pgbench_ends_only_the_transactions_it_cut(start_pooler, cluster, tmp_path):
    """pg_ctl restart -m fast while 8 pgbench clients run through 2 server connections: a
    client whose statement was on the server when it went down gets its error, as directly;
    every client that was between transactions goes on and finishes all its transactions."""
    # Each transaction holds its connection at least 1 ms, so the run lasts at least 6 s on any
    # host (12,000 transactions through 2 connections): the restart lands in the middle of it.
    clients, per_client, pool_size = 8, 1500, 2
    pool = start_pooler(session_pool_size=pool_size, query_wait_timeout="60s")
    script = tmp_path / "select.sql"
    script.write_text("SELECT count(*), pg_sleep(0.001) FROM items;\n")
    env = dict(os.environ, PGPASSWORD=USERS["app"], PGCONNECT_TIMEOUT="10")
    bench = subprocess.Popen(
        ["pgbench", "-n", "-h", "127.0.0.1", "-p", str(pool.port), "-U", "app", "-c", str(clients),
         "-j", "2", "-t", str(per_client), "-P", "1", "-f", str(script), "app"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(bench.stderr), daemon=True)
    reader.start()
    try:
        # The load is on (its first progress report) before the upstream goes.
        wait_for(lambda: any(line.startswith("progress:") for line in list(lines)),
                 "pgbench's first progress report")
        cluster.stop("fast")
        cluster.start()
        assert bench.poll() is None, "pgbench finished before the restart: the test proves nothing"
        stdout, _ = bench.communicate(timeout=120)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    reader.join(timeout=WAIT)
    aborted = [line for line in lines if re.search(r"client \d+ (?:script \d+ )?aborted", line)]
    # At most one statement per server connection was running when the server went down.
    assert len(aborted) <= pool_size, "".join(lines[-20:])
    processed = int(re.search(r"number of transactions actually processed: (\d+)", stdout).group(1))
    assert processed >= (clients - len(aborted)) * per_client, stdout + "".join(lines[-30:])
    assert "is back" in pool.log()


def test_a_dropped_request_leaves_no_unnamed_statement_for_a_later_bind(start_pooler):
    """A pipeline `Parse("")/Bind/Execute/Sync` then `Bind("")/Execute/Sync` whose first request
    times out waiting (57014, dropped unrun): the later Bind must not run the session's previous
    unnamed statement with the new request's meaning; it gets 26000, as on PostgreSQL after the
    Parse of the unnamed statement failed."""
    from test_core_defects import Raw, cstr, data_rows, errors, message

    def parse(sql: str) -> bytes:
        return message(b"P", cstr("") + cstr(sql) + b"\0\0")
    bind_execute = message(b"B", cstr("") + cstr("") + b"\0\0\0\0\0\0") + message(b"E", cstr("") + b"\0\0\0\0")
    sync = message(b"S")
    pool = start_pooler(session_pool_size=1, query_wait_timeout="1s", auth_method="trust")
    with Raw(pool.port) as raw:
        raw.send(parse("SELECT 'old'") + bind_execute + sync)
        messages, closed = raw.reply()
        assert not closed and data_rows(messages) == [["old"]]
        holder = pool.connect(autocommit=False)
        holder.execute("SELECT 1")   # a transaction holds the backend's one server connection
        raw.send(parse("SELECT 'new'") + bind_execute + sync + bind_execute + sync)
        messages, closed = raw.reply()
        assert not closed and [e["C"] for e in errors(messages)] == ["57014"]
        holder.commit()
        messages, closed = raw.reply()
        assert not closed and data_rows(messages) == []          # the old statement did not run
        assert [e["C"] for e in errors(messages)] == ["26000"]
        messages, closed = raw.query("SELECT 'goes on'")
        assert data_rows(messages) == [["goes on"]]
        holder.close()
