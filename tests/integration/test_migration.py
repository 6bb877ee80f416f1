"""Session migration (issue 8): a session waiting behind another session's transaction moves to a
backend of its pool whose server connection is free, keeping everything it had."""

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


def migrations(pooler) -> int:
    """Sessions the pool's backends have handed on so far (the status table's figure)."""
    table = status.StatusTable.attach(pooler.port)
    assert table is not None
    return sum(slot["migrations"] for slot in table.slots())


def same_backend_trio(pooler):
    """Three connections on a pool of two backends: round-robin puts the 1st and 3rd on one."""
    first, second, third = pooler.connect(), pooler.connect(), pooler.connect()
    assert backend_pid(first) == backend_pid(third) != backend_pid(second)
    assert server_pid(first) == server_pid(third) != server_pid(second)
    return first, second, third


def pgbench_loop(pooler, tmp_path, name: str, script: str, clients: int) -> subprocess.Popen:
    """pgbench running `script` in a loop through the pooler for WAIT seconds at most, its clients
    named `name` (application_name); the caller kills it."""
    path = tmp_path / f"{name}.sql"
    path.write_text(script)
    env = dict(os.environ, PGPASSWORD=USERS["app"], PGCONNECT_TIMEOUT="10", PGAPPNAME=name)
    return subprocess.Popen(
        ["pgbench", "-n", "-h", "127.0.0.1", "-p", str(pooler.port), "-U", "app", "-c", str(clients), "-j", "1",
         "-T", str(int(WAIT)), "-f", str(path), "app"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


@pytest.fixture
def pool_of_two(start_pooler):
    pooler = start_pooler(session_pool_size=2, session_schedule="round-robin")
    connections = same_backend_trio(pooler)
    yield (pooler, *connections)
    for conn in connections:
        conn.close()


def test_a_second_connection_of_one_application_does_not_wait_for_the_first(pool_of_two):
    """One application holds a transaction open on a connection and queries on another that
    landed on the same backend: the query is served within 100 ms by the pool's other backend."""
    pooler, holder, other_backend, waiter = pool_of_two
    elapsed = []
    for _round in range(3):
        # The holder is the connection on the waiter's backend (the waiter moved last round).
        if server_pid(waiter) != server_pid(holder):
            holder, other_backend = other_backend, holder
        holder.execute("BEGIN")
        holder.execute("SELECT 1")          # idle in transaction: the backend's connection is held
        started = time.monotonic()
        assert waiter.execute("SELECT 42").fetchone()[0] == 42
        elapsed.append(time.monotonic() - started)
        # Served by the other backend's server connection: it moved there.
        assert server_pid(waiter) == server_pid(other_backend)
        holder.execute("COMMIT")
    assert migrations(pooler) == 3
    print("the waiting query completed in " + ", ".join(f"{e * 1000:.1f}" for e in elapsed) + " ms")
    # The median, so that one hiccup of a loaded test machine is not taken for the pooler's.
    assert sorted(elapsed)[1] < 0.1, f"the query waited {elapsed} s"
    for conn in (holder, other_backend, waiter):
        assert conn.execute("SELECT 1").fetchone()[0] == 1


def test_a_brand_new_connection_behind_its_applications_open_transaction_moves_at_once(start_pooler):
    """An ORM's pool opens a new connection while its first one sits idle in a transaction: the
    new connection has run nothing yet, and still moves within 100 ms (the connection it waits
    for waits on its own client, however long that takes)."""
    pooler = start_pooler(session_pool_size=2, session_schedule="round-robin")
    elapsed = []
    for _round in range(3):
        holder, other = pooler.connect(), pooler.connect()
        assert backend_pid(holder) != backend_pid(other)
        holder.execute("BEGIN")
        holder.execute("SELECT 1")          # idle in transaction: its backend's connection is held
        before = migrations(pooler)
        fresh = pooler.connect()            # round-robin: on the holder's backend, nothing run yet
        started = time.monotonic()
        assert fresh.execute("SELECT 42").fetchone()[0] == 42
        elapsed.append(time.monotonic() - started)
        assert migrations(pooler) == before + 1   # it was on the holder's backend, and moved
        assert server_pid(fresh) == server_pid(other)
        holder.execute("COMMIT")
        for conn in (holder, other, fresh):
            conn.close()
    print("the new connection's first query completed in "
          + ", ".join(f"{e * 1000:.1f}" for e in elapsed) + " ms")
    assert sorted(elapsed)[1] < 0.1, f"the query waited {elapsed} s"


def test_without_migration_the_wait_ends_with_query_wait_timeout(start_pooler):
    """session_migration = off: Postgres Pro's behaviour, bounded by query_wait_timeout."""
    pooler = start_pooler(session_pool_size=2, session_migration="off", query_wait_timeout="1s")
    holder, _other, waiter = same_backend_trio(pooler)
    holder.execute("BEGIN")
    holder.execute("SELECT 1")
    with pytest.raises(psycopg.errors.QueryCanceled, match="query_wait_timeout"):
        waiter.execute("SELECT 1")
    holder.execute("COMMIT")
    assert waiter.execute("SELECT 2").fetchone()[0] == 2   # the session is still usable
    assert migrations(pooler) == 0


def test_a_moved_session_keeps_its_context(pool_of_two):
    """Settings, custom settings, role, ParameterStatus view, prepared statements and the cancel
    key all go with the session to its new backend."""
    pooler, holder, other_backend, waiter = pool_of_two
    pooler.cluster.psql("GRANT alice TO app")
    waiter.execute("SET TimeZone = 'Asia/Tokyo'")
    waiter.execute("SET application_name = 'moving'")
    waiter.execute("SELECT set_config('myapp.tenant', '42', false)")
    waiter.execute("SET ROLE alice")
    statement = "SELECT %s::int + 1"
    assert waiter.execute(statement, (1,), prepare=True).fetchone()[0] == 2
    other_backend.execute("SET TimeZone = 'UTC'")   # the other backend's connection has other settings

    holder.execute("BEGIN")
    holder.execute("SELECT 1")
    # Its very next statement runs on the other backend: the protocol-level prepared one.
    assert waiter.execute(statement, (41,), prepare=True).fetchone()[0] == 42
    assert server_pid(waiter) == server_pid(other_backend)
    assert migrations(pooler) == 1
    assert waiter.execute("SHOW TimeZone").fetchone()[0] == "Asia/Tokyo"
    assert waiter.execute("SELECT current_setting('myapp.tenant')").fetchone()[0] == "42"
    assert waiter.execute("SELECT current_user").fetchone()[0] == "alice"
    assert waiter.execute("SHOW application_name").fetchone()[0] == "moving"
    assert waiter.info.parameter_status("TimeZone") == "Asia/Tokyo"
    assert waiter.info.parameter_status("application_name") == "moving"
    # ... and nobody else got them.
    assert other_backend.execute("SHOW TimeZone").fetchone()[0] == "UTC"
    assert other_backend.execute("SELECT current_user").fetchone()[0] == "app"
    assert other_backend.execute("SELECT current_setting('myapp.tenant', true)").fetchone()[0] in (None, "")

    # Its cancel key (the one its client was told at login) cancels its own query, now running
    # on the new backend, and nobody else's.
    errors: list[BaseException] = []

    def sleeper():
        try:
            waiter.execute("SELECT pg_sleep(30)")
        except BaseException as exc:
            errors.append(exc)
    thread = threading.Thread(target=sleeper)
    thread.start()
    wait_for(lambda: pooler.cluster.psql(
        "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'")
        == "1", "pg_sleep(30) to run")
    waiter.cancel()
    thread.join(WAIT)
    assert not thread.is_alive() and isinstance(errors[0], psycopg.errors.QueryCanceled)
    assert holder.execute("SELECT 2").fetchone()[0] == 2   # still in its transaction, untouched
    holder.execute("COMMIT")
    assert waiter.execute("SELECT 3").fetchone()[0] == 3


def test_sessions_in_a_transaction_or_pinned_never_move(pool_of_two):
    """A session inside a transaction keeps its connection; a pinned one (temporary table) has
    its own; neither is handed on, whatever waits."""
    pooler, holder, other_backend, waiter = pool_of_two
    waiter.execute("CREATE TEMP TABLE mine (x int)")          # pinned from now on
    waiter.execute("INSERT INTO mine VALUES (1)")
    pinned_pid = server_pid(waiter)
    holder.execute("BEGIN")
    holder.execute("SELECT 1")
    other_backend.execute("BEGIN")
    other_backend.execute("SELECT 1")
    for _ in range(3):
        assert waiter.execute("SELECT count(*) FROM mine").fetchone()[0] == 1
        assert holder.execute("SELECT 1").fetchone()[0] == 1
    assert server_pid(waiter) == pinned_pid
    assert migrations(pooler) == 0
    # The two transactions are where they were.
    assert holder.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = pg_backend_pid() "
                          "AND state LIKE 'active'").fetchone()[0] == 1
    holder.execute("COMMIT")
    other_backend.execute("COMMIT")


def test_input_sent_while_moving_is_not_lost(pool_of_two):
    """A pipeline that arrives in pieces, part before the move and part after, runs whole."""
    pooler, holder, _other_backend, waiter = pool_of_two
    holder.execute("BEGIN")
    holder.execute("SELECT 1")
    with waiter.pipeline():
        cursors = [waiter.execute("SELECT %s::int", (i,)) for i in range(50)]
    assert [c.fetchone()[0] for c in cursors] == list(range(50))
    assert migrations(pooler) >= 1
    holder.execute("COMMIT")


def test_a_move_is_counted_and_the_wait_counts_whole_where_the_session_is_served(start_pooler):
    """SHOW BACKENDS and /metrics count the move; SHOW STATS counts the moved session's wait,
    from when it began on the backend it left (at least session_migration_delay)."""
    from test_operations import _free_port, sample, scrape
    port = _free_port()
    pooler = start_pooler(session_pool_size=2, session_schedule="round-robin", admin_users="alice",
                          metrics_port=port, metrics_address="127.0.0.1",
                          session_migration_delay="50ms")
    holder, other_backend, waiter = same_backend_trio(pooler)
    console = pooler.connect(user="alice", dbname="pgforkpool")

    def waits():
        cur = console.execute("SHOW STATS")
        names = [d.name for d in cur.description]
        row = dict(zip(names, cur.fetchone()))
        return row["total_wait_count"], row["total_wait_time"]

    source = backend_pid(holder)
    holder.execute("BEGIN")
    holder.execute("SELECT 1")
    count, total_us = waits()
    assert waiter.execute("SELECT 1").fetchone()[0] == 1
    assert server_pid(waiter) == server_pid(other_backend)
    holder.execute("COMMIT")
    # Backends publish their figures at least once a second.
    new_count, new_total_us = wait_for(lambda: (w := waits())[0] > count and w, "the wait to be counted")
    assert new_total_us - total_us >= 50_000, (total_us, new_total_us)
    cur = console.execute("SHOW BACKENDS")
    names = [d.name for d in cur.description]
    moved = {row[0]: dict(zip(names, row))["migrations"] for row in cur.fetchall()}
    assert moved[source] == 1 and sum(moved.values()) == 1
    assert sample(scrape(port), "pgforkpool_backend_migrations", pid=str(source)) == 1
    console.close()
    for conn in (holder, other_backend, waiter):
        conn.close()


def test_a_session_holding_more_than_256_kB_of_statement_texts_stays_and_is_served(start_pooler):
    """What travels with a moved session is one channel message: a session whose prepared
    statements' texts pass 256 kB is not moved; it waits for its own backend's connection."""
    pooler = start_pooler(session_pool_size=2, session_schedule="round-robin", admin_users="alice")
    holder, _other_backend, waiter = same_backend_trio(pooler)
    console = pooler.connect(user="alice", dbname="pgforkpool")
    for i in range(30):   # 30 statements of 10 kB each, prepared on the server
        assert waiter.execute(f"SELECT {i} /* {'x' * 10_000} */", prepare=True).fetchone()[0] == i
    holder.execute("BEGIN")
    holder.execute("SELECT 1")
    answer = []
    query = threading.Thread(target=lambda: answer.append(waiter.execute("SELECT 42").fetchone()[0]))
    query.start()

    def waited():
        cur = console.execute("SHOW SESSIONS")
        names = [d.name for d in cur.description]
        return max((dict(zip(names, row))["wait"] or 0 for row in cur.fetchall()), default=0)

    # Waiting a good while: twenty times session_migration_delay, every chance to move.
    wait_for(lambda: waited() >= 0.2, "the session to wait 200 ms")
    assert query.is_alive() and migrations(pooler) == 0
    holder.execute("COMMIT")
    query.join(WAIT)
    assert answer == [42]
    assert server_pid(waiter) == server_pid(holder)
    assert waiter.execute("SELECT 29 /* " + "x" * 10_000 + " */", prepare=True).fetchone()[0] == 29
    console.close()
    for conn in (holder, _other_backend, waiter):
        conn.close()


def test_stress_skewed_load_moves_sessions_and_mixes_nothing(start_pooler):
    """40 sessions on 4 backends for 15 s, 3 of them holding transactions open with pg_sleep:
    quick sessions stuck behind them move (to the backend free of them, or with load-balancing to
    a backend with fewer ready), and every session sees only its own settings, role, statements
    and rows."""
    # load-balancing: waiting sessions also move to a busy backend with fewer ready, so moves
    # happen however rarely a backend is idle at the moment one looks.
    pooler = start_pooler(session_pool_size=4, query_wait_timeout="10s", session_schedule="load-balancing")
    pooler.cluster.psql("GRANT alice TO app")
    pooler.cluster.psql("CREATE TABLE IF NOT EXISTS stress_rows (session int, n int); "
                        "GRANT ALL ON stress_rows TO PUBLIC", database="app")
    duration = 15.0
    deadline = time.monotonic() + duration
    failures: list[str] = []
    counts = [0] * 40

    holders_connected = [threading.Event() for _ in range(3)]

    def long_holder(index: int) -> None:
        with pooler.connect() as conn:
            holders_connected[index].set()
            while time.monotonic() < deadline:
                conn.execute("BEGIN")
                conn.execute("SELECT pg_sleep(0.05)")
                conn.execute("COMMIT")

    def checker(index: int) -> None:
        try:
            with pooler.connect(application_name=f"stress-{index}") as conn:
                conn.execute(f"SET myapp.session = '{index}'")
                conn.execute(f"SET statement_timeout = '{10000 + index}ms'")
                if index % 2:
                    conn.execute("SET ROLE alice")
                role = "alice" if index % 2 else "app"
                statement = f"SELECT %s::int * 0 + {index}"   # a statement of its own
                n = 0
                while time.monotonic() < deadline:
                    n += 1
                    row = conn.execute(
                        "SELECT current_setting('myapp.session'), current_setting('statement_timeout'), "
                        "current_user, current_setting('application_name')").fetchone()
                    expected = (str(index), f"{10000 + index}ms", role, f"stress-{index}")
                    if row != expected:
                        failures.append(f"session {index} iteration {n}: saw {row}, expected {expected}")
                        return
                    if conn.execute(statement, (n,), prepare=True).fetchone()[0] != index:
                        failures.append(f"session {index}: its prepared statement gave another answer")
                        return
                    conn.execute("INSERT INTO stress_rows VALUES (%s, %s)", (index, n))
                    mine = conn.execute("SELECT count(*), max(n) FROM stress_rows WHERE session = %s",
                                        (index,)).fetchone()
                    if tuple(mine) != (n, n):
                        failures.append(f"session {index}: {mine} of its rows, expected {n}")
                        return
                counts[index] = n
        except Exception as exc:   # reported, so that the test fails with it rather than hangs
            failures.append(f"session {index}: {exc!r}")

    # The holders connect first: round-robin gives three backends one each.
    threads = [threading.Thread(target=long_holder if i < 3 else checker, args=(i,)) for i in range(40)]
    for thread in threads[:3]:
        thread.start()
    for event in holders_connected:
        assert event.wait(WAIT)
    for thread in threads[3:]:
        thread.start()
    for thread in threads:
        thread.join(duration + WAIT)
    assert not any(thread.is_alive() for thread in threads), "a session hung"
    assert not failures, failures[:5]
    assert all(counts[3:]), "every checking session completed iterations"
    moved = migrations(pooler)
    print(f"{sum(counts)} checked iterations, {moved} migrations")
    assert moved > 0
    pooler.cluster.psql("DROP TABLE stress_rows", database="app")


def test_load_balancing_evens_out_waiting_sessions(start_pooler):
    """session_schedule = load-balancing: a backend with two more sessions ready than another
    hands one of its waiting sessions over, even when that other backend is busy too."""
    pooler = start_pooler(session_pool_size=2, session_schedule="load-balancing")
    h1, h2, s1, _s2, s3 = [pooler.connect() for _ in range(5)]
    assert backend_pid(h1) == backend_pid(s1) == backend_pid(s3) != backend_pid(h2)
    for conn in (h1, h2, s1, _s2, s3):
        conn.execute("SELECT 1")   # each has a transaction behind it: a quick one
    for holder in (h1, h2):
        holder.execute("BEGIN")
        holder.execute("SELECT 1")
    results: list = []
    threads = [threading.Thread(target=lambda c=c: results.append(c.execute("SELECT 7").fetchone()[0]))
               for c in (s1, s3)]
    for thread in threads:
        thread.start()
    # h1's backend has 3 ready (h1 and two waiting), h2's has 1: one waiting session moves.
    wait_for(lambda: migrations(pooler) >= 1, "a waiting session to move to the lighter backend")
    assert migrations(pooler) == 1   # 2 and 2 afterwards: nothing more to even out
    h1.execute("COMMIT")
    h2.execute("COMMIT")
    for thread in threads:
        thread.join(WAIT)
    assert results == [7, 7]
    # After the first COMMIT the two backends go idle in turn (h1's when its waiting session's
    # SELECT is done, h2's at its COMMIT), and a session still waiting on the other one moves
    # to the idle one by the same rule: how many times depends on how the COMMITs and SELECTs
    # interleave on this machine. Each such move follows one of the four events that leave a
    # backend with nothing ready (two COMMITs, two SELECTs done), so sessions never bounce
    # back and forth. With one move, the two ran on the two servers.
    moved = migrations(pooler)
    assert 1 <= moved <= 1 + 4, moved
    if moved == 1:
        assert sorted(server_pid(c) for c in (s1, s3)) == sorted((server_pid(h1), server_pid(h2)))
    for conn in (h1, h2, s1, s3, _s2):
        conn.close()


def test_when_every_connection_is_held_by_a_long_transaction_the_long_sessions_gather(start_pooler, tmp_path):
    """Two backends, each with a pgbench client looping 50 ms transactions back to back and a
    quick client behind it: every connection is held almost all the time, no backend is ever
    free for the quick queries, and without more they would wait out a long transaction each
    (about 50 ms).  The long sessions end up sharing one backend, which leaves the other to the
    quick clients: their queries are then answered without waiting for a long transaction.
    (Not for good: a long session that waits behind a longer one still moves to a sibling that
    is free at that moment, the quick clients' one too, and is sent back when it holds them up.)"""
    pooler = start_pooler(session_pool_size=2, session_schedule="round-robin")
    bench = pgbench_loop(pooler, tmp_path, "long", "BEGIN;\nSELECT pg_sleep(0.05);\nCOMMIT;\n", clients=2)
    quick: list = []
    try:
        # pgbench's two clients are on the pool's two backends (round-robin), one each.
        wait_for(lambda: len(pooler.cluster.psql(
            "SELECT pid FROM pg_stat_activity WHERE state = 'active' AND query LIKE 'SELECT pg_sleep%'").split()) == 2,
            "the two long clients to run on two server connections at once")
        quick = [pooler.connect(), pooler.connect()]
        assert backend_pid(quick[0]) != backend_pid(quick[1])
        for conn in quick:
            conn.execute("SELECT 1")   # a quick transaction behind each: known to be a quick session

        def median_latency() -> float:
            elapsed = []
            for _ in range(10):
                for conn in quick:
                    started = time.monotonic()
                    assert conn.execute("SELECT 42").fetchone()[0] == 42
                    elapsed.append(time.monotonic() - started)
            return sorted(elapsed)[len(elapsed) // 2]

        first = median_latency()
        wait_for(lambda: median_latency() < 0.02, "the quick queries to stop waiting for long transactions",
                 timeout=WAIT / 2)
        assert migrations(pooler) > 0
        print(f"quick queries: median {first * 1000:.1f} ms at first, {median_latency() * 1000:.1f} ms "
              f"after {migrations(pooler)} moves")
    finally:
        bench.kill()
        bench.communicate(timeout=WAIT)
        for conn in quick:
            conn.close()


def test_a_session_behind_an_open_transaction_moves_to_a_sibling_busy_with_short_ones(start_pooler, tmp_path):
    """No sibling is ever free: eight pgbench clients keep the other backend's connection
    changing hands between short transactions.  A query stuck behind a transaction left open on
    its own backend still goes there (to a sibling passing short transactions) and is answered
    while that transaction stays open, instead of waiting for it or for query_wait_timeout.
    (session_migration_delay 100 ms: on a loaded machine the waiter's own last transaction may
    take more than the default 10 ms, which would make it a long session that stays.)"""
    pooler = start_pooler(session_pool_size=2, session_schedule="round-robin", session_migration_delay="100ms")
    holder, other_backend, waiter = same_backend_trio(pooler)
    bench = pgbench_loop(pooler, tmp_path, "short", "SELECT 1 AS short;\n", clients=8)
    try:
        wait_for(lambda: int(pooler.cluster.psql(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT 1 AS short%'")) > 0,
            "pgbench's short transactions to run")
        holder.execute("BEGIN")
        holder.execute("SELECT 1")   # idle in transaction: its backend's connection is held
        # pgbench's clients on the holder's backend move away too: then all eight share one
        # connection, which is never free but changes hands all the time.
        before = migrations(pooler)
        started = time.monotonic()
        assert waiter.execute("SELECT 42").fetchone()[0] == 42
        elapsed = time.monotonic() - started
        assert migrations(pooler) > before
        assert server_pid(waiter) == server_pid(other_backend)
        assert holder.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        print(f"the stuck query was answered in {elapsed * 1000:.1f} ms")
        assert elapsed < WAIT / 4
        holder.execute("COMMIT")
    finally:
        bench.kill()
        bench.communicate(timeout=WAIT)


def test_a_moved_statement_whose_result_changed_fails_as_on_postgresql_and_only_for_its_session(
        pool_of_two):
    """A session describes its statement (its client now reads rows by that description), the
    table's column changes type, a session on the other backend prepares the same text afresh
    there (without describing it), and the first session moves there.  PostgreSQL answers the
    first session's statement with 0A000 and serves the second's; the moved session got the
    second's statement, unchecked, and read float4 bits as an int4 (found by an exploratory
    run on session migration)."""
    pooler, holder, other_backend, waiter = pool_of_two
    with psycopg.connect(host=pooler.cluster.socket_dir, port=pooler.cluster.port, user="postgres",
                         dbname="app", autocommit=True) as su:
        su.execute("DROP TABLE IF EXISTS moved_shape; CREATE TABLE moved_shape (a int); "
                   "INSERT INTO moved_shape VALUES (5); ALTER TABLE moved_shape OWNER TO app")
        text = b"SELECT a FROM moved_shape"
        assert waiter.pgconn.prepare(b"a1", text).status == psycopg.pq.ExecStatus.COMMAND_OK
        assert waiter.pgconn.describe_prepared(b"a1").ftype(0) == 23   # int4
        su.execute("ALTER TABLE moved_shape ALTER a TYPE real")
    assert other_backend.pgconn.prepare(b"e1", text).status == psycopg.pq.ExecStatus.COMMAND_OK
    assert other_backend.pgconn.exec_prepared(b"e1", []).get_value(0, 0) == b"5"

    holder.execute("BEGIN")
    holder.execute("SELECT 1")   # the waiter's backend is busy: its next statement moves it
    result = waiter.pgconn.exec_prepared(b"a1", [], result_format=1)
    assert migrations(pooler) == 1
    assert result.status == psycopg.pq.ExecStatus.FATAL_ERROR, \
        f"rows instead of 0A000: {[result.get_value(0, 0)] if result.ntuples else result.status}"
    assert result.error_field(psycopg.pq.DiagnosticField.SQLSTATE) == b"0A000"
    assert server_pid(waiter) == server_pid(other_backend)
    # The other session's statement, prepared after the change, is right for it: it goes on.
    assert other_backend.pgconn.exec_prepared(b"e1", []).get_value(0, 0) == b"5"
    holder.execute("COMMIT")
    assert waiter.pgconn.exec_prepared(b"a1", []).error_field(
        psycopg.pq.DiagnosticField.SQLSTATE) == b"0A000", "until the client prepares it anew"
    assert waiter.pgconn.prepare(b"a2", text).status == psycopg.pq.ExecStatus.COMMAND_OK
    assert waiter.pgconn.exec_prepared(b"a2", []).get_value(0, 0) == b"5"


# ---------------------------------------------------------------- session_pool_size lowered

def pooled_backends(pooler) -> set[int]:
    """Pids of the pooled backends in the status table (a slot is freed once its process is reaped)."""
    table = status.StatusTable.attach(pooler.port)
    assert table is not None
    return {slot["pid"] for slot in table.slots() if slot["kind"] == "pooled"}


def app_server_connections(pooler) -> int:
    """Server processes of the app/app pool, counted on PostgreSQL itself."""
    return int(pooler.cluster.psql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' "
                                   "AND datname = 'app' AND backend_type = 'client backend'"))


def test_lowering_session_pool_size_moves_the_sessions_and_closes_the_surplus_connections(start_pooler):
    """A reload from 3 backends to 1: the two surplus backends' sessions move to the one kept as
    they finish their transactions (one in the middle of a transaction finishes it first), with
    their settings and prepared statements; the surplus backends exit and their server
    connections close; no session is dropped."""
    pooler = start_pooler(session_pool_size=3, session_schedule="round-robin")
    conns = [pooler.connect() for _ in range(6)]
    try:
        for n, conn in enumerate(conns):
            conn.execute(f"SET work_mem = '{n + 1}MB'")
            conn.execute(f"SET myapp.tenant = 't{n}'")
            assert conn.execute("SELECT %s::int + 1", (n,), prepare=True).fetchone()[0] == n + 1
        assert len(pooled_backends(pooler)) == 3
        assert len({server_pid(conn) for conn in conns}) == 3
        assert app_server_connections(pooler) == 3
        holder = conns[0]
        holder.execute("BEGIN")
        holder.execute("CREATE TABLE shrink_t (n int)")

        pooler.write_config(session_pool_size=1)
        pooler.signal(signal.SIGHUP)
        retired = wait_for(lambda: re.search(r"retiring pooled backends ([\d, ]+);", pooler.log()),
                           "the pool to retire backends")
        # The open transaction goes on on its backend, one of those retired (they had two
        # sessions each: the first two spawned go).
        assert str(backend_pid(holder)) in retired.group(1).split(", ")
        holder.execute("INSERT INTO shrink_t VALUES (1)")
        holder.execute("COMMIT")
        wait_for(lambda: len(pooled_backends(pooler)) == 1, "the surplus backends to exit")
        wait_for(lambda: app_server_connections(pooler) == 1, "their server connections to close")
        kept = server_pid(conns[0])
        for n, conn in enumerate(conns):
            assert server_pid(conn) == kept
            assert conn.execute("SHOW work_mem").fetchone()[0] == f"{n + 1}MB"
            assert conn.execute("SELECT current_setting('myapp.tenant')").fetchone()[0] == f"t{n}"
            assert conn.execute("SELECT %s::int + 1", (n,), prepare=True).fetchone()[0] == n + 1
        assert conns[3].execute("SELECT count(*) FROM shrink_t").fetchone()[0] == 1
        fresh = pooler.connect()
        conns.append(fresh)
        assert server_pid(fresh) == kept
        assert "terminat" not in pooler.log().lower()
    finally:
        for conn in conns:
            conn.close()


def test_a_pinned_session_keeps_its_retiring_backend_until_it_is_unpinned(start_pooler):
    """Every backend holds a pinned session (a temporary table): the one retired stays while its
    pinned session keeps the table, serving it; once the table is dropped the session moves
    and the backend exits."""
    pooler = start_pooler(session_pool_size=2, session_schedule="round-robin")
    first, second, third = pooler.connect(), pooler.connect(), pooler.connect()
    conns = [first, second, third]
    try:
        assert backend_pid(first) == backend_pid(third) != backend_pid(second)
        for conn in (first, second):
            conn.execute("CREATE TEMP TABLE mine (n int)")
        second.execute("SET work_mem = '7MB'")
        # The first backend has two sessions, the second one: the second is retired.
        going = backend_pid(second)
        pooler.write_config(session_pool_size=1)
        pooler.signal(signal.SIGHUP)
        wait_for(lambda: f"retiring pooled backend {going}" in pooler.log(), "the pool to retire one")
        assert second.execute("INSERT INTO mine VALUES (1) RETURNING n").fetchone()[0] == 1
        assert going in pooled_backends(pooler)
        second.execute("DROP TABLE mine")   # unpinned: it can move now
        wait_for(lambda: going not in pooled_backends(pooler), "the retired backend to exit")
        assert second.execute("SHOW work_mem").fetchone()[0] == "7MB"
        assert first.execute("INSERT INTO mine VALUES (2) RETURNING n").fetchone()[0] == 2
        assert third.execute("SELECT 3").fetchone()[0] == 3
    finally:
        for conn in conns:
            conn.close()


def test_lowering_session_pool_size_under_load_drops_no_client(start_pooler, tmp_path):
    """pgbench's 8 clients run back-to-back transactions on 4 backends while the pool is lowered
    to 2: the busy sessions move between their transactions, the two surplus backends exit
    while pgbench runs, and no client sees an error."""
    pooler = start_pooler(session_pool_size=4, session_schedule="round-robin")
    script = tmp_path / "busy.sql"
    script.write_text("SELECT count(*) FROM items;\n")
    env = dict(os.environ, PGPASSWORD=USERS["app"], PGCONNECT_TIMEOUT="10")
    bench = subprocess.Popen(
        ["pgbench", "-n", "-h", "127.0.0.1", "-p", str(pooler.port), "-U", "app", "-c", "8", "-j", "1",
         "-T", "8", "-f", str(script), "app"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        wait_for(lambda: len(pooled_backends(pooler)) == 4, "pgbench's clients to fill the pool")
        pooler.write_config(session_pool_size=2)
        started = time.monotonic()
        pooler.signal(signal.SIGHUP)
        wait_for(lambda: len(pooled_backends(pooler)) == 2 and app_server_connections(pooler) == 2,
                 "the surplus backends to exit while pgbench runs")
        print(f"the pool shrank in {time.monotonic() - started:.2f} s")
        assert bench.poll() is None, "pgbench ended before the pool shrank"
        out, _ = bench.communicate(timeout=WAIT)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    assert bench.returncode == 0, out
    assert "number of failed transactions: 0 " in out, out
