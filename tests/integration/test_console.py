"""The admin console (virtual database `pgforkpool`), as an operator uses it through psql and psycopg."""

import threading
import time

import psycopg
import pytest

from conftest import WAIT, backend_pid, wait_for

ADMIN = "alice"   # in admin_users; app and bob are not


@pytest.fixture
def pool(start_pooler):
    return start_pooler(admin_users=ADMIN, session_pool_size=2, auth_method="scram-sha-256")


def console(pool):
    return pool.connect(user=ADMIN, dbname="pgforkpool")


def rows(conn, sql):
    with conn.cursor() as cur:
        cur.execute(sql)
        names = [d.name for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]


def test_every_show_command_returns_rows_through_psql_and_psycopg(pool):
    app = pool.connect()
    app.execute("SELECT 1")
    for command in ("SHOW POOLS", "SHOW BACKENDS", "SHOW SESSIONS", "SHOW STATS", "SHOW CONFIG",
                    "SHOW VERSION", "SELECT pg_backend_load_average(1)",
                    "SELECT * FROM pg_backend_load_average"):
        out = pool.psql(command, user=ADMIN, dbname="pgforkpool")
        assert out.returncode == 0, (command, out.stderr)
    with console(pool) as admin:
        pools = rows(admin, "SHOW POOLS")
        app_pool = next(p for p in pools if (p["database"], p["user"]) == ("app", "app"))
        assert app_pool["backends"] == 1 and app_pool["sessions"] == 1
        assert app_pool["server_connections"] == 1
        backends = rows(admin, "SHOW BACKENDS")
        assert [b["pid"] for b in backends if b["database"] == "app"] == [backend_pid(app)]
        backend = backends[0]
        assert backend["kind"] == "pooled" and backend["rss_bytes"] > 0
        assert backend["server_pids"] == str(app.execute("SELECT pg_backend_pid()").fetchone()[0])
        sessions = rows(admin, "SHOW SESSIONS")
        assert len(sessions) == 1
        assert sessions[0]["address"] == "127.0.0.1" and sessions[0]["state"] == "idle"
        assert sessions[0]["backend_pid"] == backend_pid(app)
        config = {r["name"]: r for r in rows(admin, "SHOW CONFIG")}
        assert config["session_pool_size"]["setting"] == "2"
        assert config["session_pool_size"]["default"] == "10"
        assert config["admin_users"]["source"].startswith(pool.conf + ":")
        assert config["max_sessions"]["source"] == "default"
        assert "pgforkpool" in rows(admin, "SHOW VERSION")[0]["version"]
        assert rows(admin, "SHOW session_pool_size") == [{"session_pool_size": "2"}]
    app.close()


def test_stats_grow_with_traffic(pool):
    with console(pool) as admin, pool.connect() as app:
        app.execute("SELECT 1")

        def stats():
            return next(s for s in rows(admin, "SHOW STATS") if s["database"] == "app")
        before = stats()
        for _ in range(20):
            app.execute("SELECT repeat('x', 1000)")
        with app.transaction():
            app.execute("SELECT 1")
            app.execute("SELECT 2")
        # A backend publishes its figures at least once a second.
        after = wait_for(lambda: (s := stats())["total_xact_count"] >= before["total_xact_count"] + 21
                         and s, "the transactions to be counted")
        assert after["total_query_count"] >= before["total_query_count"] + 24
        assert after["total_sent"] >= before["total_sent"] + 20 * 1000
        assert after["total_received"] > before["total_received"]
        assert after["total_xact_time"] > before["total_xact_time"]


def test_dedicated_sessions_are_counted_in_show_stats(start_pooler):
    """A dedicated backend relays bytes without reading them, and still counts them: its
    queries and transactions (from the server's ReadyForQuery messages), bytes both ways and
    transaction times appear under its (database, user) in SHOW STATS, as a pool's do."""
    pool = start_pooler(admin_users=ADMIN, dedicated_users="bob")
    with console(pool) as admin, pool.connect(user="bob") as bob:
        assert [b["kind"] for b in rows(admin, "SHOW BACKENDS") if b["user"] == "bob"] == ["dedicated"]

        def stats():
            return next((s for s in rows(admin, "SHOW STATS") if s["user"] == "bob"), None)
        before = stats()   # what the login itself counted
        for _ in range(10):
            bob.execute("SELECT repeat('x', 5000)").fetchone()
        with bob.transaction():
            bob.execute("SELECT 1")
            bob.execute("SELECT pg_sleep(0.05)")
        with pytest.raises(psycopg.errors.DivisionByZero):
            with bob.transaction():
                bob.execute("SELECT 1 / 0")
        # 10 + 1 + 1 transactions; 10 + 4 (BEGIN, two SELECTs, COMMIT) + 3 (BEGIN, the
        # failing SELECT, ROLLBACK) queries.  The backend counts a reply before its client has it.
        after = stats()
        xacts = after["total_xact_count"] - before["total_xact_count"]
        queries = after["total_query_count"] - before["total_query_count"]
        # (psycopg may add statements of its own outside a block: at least 12 transactions.)
        assert xacts >= 12
        # Exactly 5 queries ended inside a transaction block, not counted as transactions:
        # BEGIN and two SELECTs, BEGIN and the failing SELECT.
        assert queries - xacts == 5
        assert after["total_sent"] >= 10 * 5000
        assert after["total_received"] >= 12 * len("SELECT 1")
        assert after["total_xact_time"] >= 50_000   # µs: the transaction with pg_sleep(0.05)
        bob_pid = bob.pgconn.backend_pid
    with console(pool) as admin:   # kept after the dedicated backend has exited
        wait_for(lambda: bob_pid not in [b["pid"] for b in rows(admin, "SHOW BACKENDS")],
                 "the dedicated backend to exit")
        kept = next(s for s in rows(admin, "SHOW STATS") if s["user"] == "bob")
        assert (kept["total_xact_count"], kept["total_query_count"]) == (
            after["total_xact_count"], after["total_query_count"])


def test_drivers_that_prepare_what_they_repeat_get_rows_too(pool):
    with console(pool) as admin:
        for _ in range(3):   # the extended protocol, as psycopg uses for a prepared statement
            cur = admin.execute("SHOW VERSION", prepare=True)
            assert [d.name for d in cur.description] == ["version"]
            assert "pgforkpool" in cur.fetchone()[0]
        for _ in range(7):   # psycopg prepares a query on its own from its fifth run
            assert isinstance(rows(admin, "SHOW POOLS"), list)
        assert admin.execute("SELECT pg_backend_load_average(1)", prepare=True).fetchone() == (None,)
        cur = admin.execute("RELOAD", prepare=True)
        assert cur.description is None and cur.statusmessage == "RELOAD"
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            admin.execute("SHOW POOLS WHERE %s", [1])
        assert admin.execute("SHOW VERSION", prepare=False).fetchone()


def test_non_admin_is_refused_with_42501(pool):
    with pytest.raises(psycopg.OperationalError) as info:
        pool.connect(user="app", dbname="pgforkpool")
    assert "admin console" in str(info.value)
    out = pool.psql("SHOW POOLS", user="bob", dbname="pgforkpool", check=False)
    assert out.returncode != 0 and "permission denied" in out.stderr


def test_unknown_commands_get_an_error_and_the_console_goes_on(pool):
    with console(pool) as admin:
        with pytest.raises(psycopg.errors.SyntaxError):
            admin.execute("DROP TABLE everything")
        with pytest.raises(psycopg.Error) as info:
            admin.execute("SHOW no_such_thing")
        assert info.value.sqlstate == "42704"
        with pytest.raises(psycopg.errors.FeatureNotSupported):
            admin.execute("SHOW POOLS WHERE %s", [1])   # parameters: the extended protocol
        assert rows(admin, "SHOW VERSION")
        assert admin.execute("SELECT pg_backend_load_average(12345)").fetchone() == (None,)
        # (found by a third exploratory run: SHOW HELP was an unknown parameter, a call without
        # its argument an integer syntax error)
        assert {"SHOW POOLS", "PAUSE [db]"} <= {r["command"] for r in rows(admin, "SHOW HELP")}
        for call in ("pg_backend_load_average()", "pg_backend_load_average(1, 2)"):
            with pytest.raises(psycopg.errors.UndefinedFunction):
                admin.execute("SELECT " + call)
        assert rows(admin, "SHOW VERSION")


def test_pause_of_a_database_no_pool_serves_is_an_error_and_comments_are_ignored(pool):
    """PAUSE and RESUME of a database without a pool (a typo, say) said OK and did nothing; they
    are an error now. A command after or around SQL comments is understood, as psql sends them."""
    with pool.connect() as client, console(pool) as admin:
        client.execute("SELECT 1")   # the app/app pool exists
        for command in ("PAUSE no_such_db", "RESUME no_such_db", 'PAUSE "App"'):
            with pytest.raises(psycopg.errors.UndefinedObject) as info:
                admin.execute(command)
            assert "no pool serves database" in str(info.value), command
        assert rows(admin, "-- the version\nSHOW VERSION")
        assert rows(admin, "/* outer /* nested */ still */ SHOW VERSION -- trailing")
        assert rows(admin, "SHOW /* between */ POOLS")
        assert client.execute("SELECT 2").fetchone() == (2,)   # nothing was paused


def test_load_average_of_a_busy_backend_exceeds_an_idle_ones(pool):
    idle = pool.connect(dbname="other")
    idle.execute("SELECT 1")
    busy = [pool.connect() for _ in range(6)]
    stop = time.monotonic() + 3.0
    errors = []

    def work(conn):
        try:
            while time.monotonic() < stop:
                conn.execute("SELECT pg_sleep(0.002)")
        except psycopg.Error as exc:   # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=work, args=(c,)) for c in busy]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=WAIT)
    assert not errors
    with console(pool) as admin:
        busy_pids = {backend_pid(c) for c in busy}
        idle_pid = backend_pid(idle)
        loads = {pid: admin.execute(f"SELECT pg_backend_load_average({pid})").fetchone()[0]
                 for pid in busy_pids | {idle_pid}}
        assert all(loads[pid] > loads[idle_pid] for pid in busy_pids), loads
        view = {r["pid"]: r["load_average"] for r in rows(admin, "SELECT * FROM pg_backend_load_average")}
        assert set(view) >= busy_pids | {idle_pid}
    for c in busy + [idle]:
        c.close()


def test_kill_session_ends_only_that_client(pool):
    victim, other = pool.connect(), pool.connect()
    victim.execute("SELECT 1")
    other.execute("SET application_name = 'survivor'")
    with console(pool) as admin:
        sessions = rows(admin, "SHOW SESSIONS")
        assert {s["application_name"] for s in sessions} >= {"survivor"}
        target = next(s["id"] for s in sessions if s["application_name"] != "survivor")
        admin.execute(f"KILL SESSION {target}")
        with pytest.raises(psycopg.Error):
            admin.execute("KILL SESSION 999999")
    with pytest.raises(psycopg.OperationalError):
        victim.execute("SELECT 1")
    assert other.execute("SHOW application_name").fetchone() == ("survivor",)
    other.close()


def test_pause_waits_for_running_transactions_then_resume_serves_waiting_sessions(pool, cluster):
    a, b = pool.connect(autocommit=False), pool.connect()
    b.execute("SET work_mem = '7MB'")
    a.execute("SELECT 1")   # a transaction is open on the server

    def pooler_connections():
        out = cluster.psql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' "
                           "AND datname = 'app' AND pid <> pg_backend_pid()", database="postgres")
        return int(out.strip())

    admin = console(pool)
    paused = threading.Event()
    failures = []

    def pause():
        try:
            admin.execute("PAUSE app")
            paused.set()
        except psycopg.Error as exc:   # pragma: no cover - reported below
            failures.append(exc)
    t = threading.Thread(target=pause)
    t.start()
    wait_for(lambda: any(p["paused"] for p in rows(console_probe(pool), "SHOW POOLS")),
             "the pool to be marked paused")
    assert not paused.is_set() and pooler_connections() >= 1   # the transaction still runs
    a.commit()
    t.join(timeout=WAIT)
    assert paused.is_set() and not failures
    wait_for(lambda: pooler_connections() == 0, "the pool's server connections to close")

    result = []
    q = threading.Thread(target=lambda: result.append(b.execute("SHOW work_mem").fetchone()))
    q.start()
    wait_for(lambda: any(s["state"] == "waiting" for s in rows(console_probe(pool), "SHOW SESSIONS")),
             "b to wait for the paused pool")
    assert not result
    admin.execute("RESUME app")
    q.join(timeout=WAIT)
    assert result == [("7MB",)]
    a.execute("SELECT 1")
    a.commit()
    admin.close()
    a.close()
    b.close()


def test_a_pause_waiting_for_a_transaction_is_cancelled_by_the_console_client(pool):
    """psql's Ctrl-C (a CancelRequest with the console's key) ends a PAUSE of every pool that waits
    for a running transaction: the console gets 57014 and goes on, the pool it was pausing is
    resumed (a cancelled statement has not happened) while one paused before stays paused, and
    the transaction's session and a new query are served."""
    elsewhere = pool.connect(dbname="other")
    a, b = pool.connect(autocommit=False), pool.connect()
    a.execute("SELECT 1")   # a transaction is open on the server: PAUSE waits for it
    admin = console(pool)
    admin.execute("PAUSE other")   # nothing runs there: paused at once

    def paused():
        return {p["database"]: p["paused"] for p in rows(console_probe(pool), "SHOW POOLS")}
    outcome = []

    def pause():
        try:
            admin.execute("PAUSE")
            outcome.append("completed")
        except psycopg.Error as exc:
            outcome.append(exc)
    t = threading.Thread(target=pause)
    t.start()
    try:
        wait_for(lambda: paused().get("app"), "the pool to be marked paused")
        admin.cancel()
        t.join(timeout=WAIT)
        assert not t.is_alive(), "the PAUSE was not cancelled"
    finally:
        if t.is_alive():
            a.commit()
            t.join(timeout=WAIT)
    assert len(outcome) == 1 and isinstance(outcome[0], psycopg.errors.QueryCanceled), outcome
    assert "canceling statement due to user request" in str(outcome[0])
    assert paused() == {"app": False, "other": True}
    a.execute("SELECT 2")   # the transaction goes on
    a.commit()
    assert b.execute("SELECT 3").fetchone() == (3,)
    assert rows(admin, "SHOW VERSION")   # the console session goes on
    # A cancel of a command that is not a PAUSE, or that comes while the console waits for
    # nothing, does nothing: the commands that ask the backends answer whenever it arrives.
    admin.cancel()
    for _ in range(3):
        assert any(s["database"] == "other" for s in rows(admin, "SHOW SESSIONS"))
    admin.execute("RESUME other")
    assert elsewhere.execute("SELECT 4").fetchone() == (4,)
    for conn in (admin, a, b, elsewhere):
        conn.close()


_probes: dict = {}


def console_probe(pool):
    """A second console connection, kept for the test's polling."""
    conn = _probes.get(pool.port)
    if conn is None or conn.closed:
        conn = _probes[pool.port] = console(pool)
    return conn


def test_reload_by_console_sighup_and_cli_drops_no_session(pool):
    import signal
    import subprocess
    from conftest import PGFORKPOOL
    app = pool.connect()
    app.execute("SET work_mem = '9MB'")
    app_pid = backend_pid(app)
    with console(pool) as admin:
        def max_sessions():
            return {r["name"]: r["setting"] for r in rows(admin, "SHOW CONFIG")}["max_sessions"]
        for value, how in (("500", "console"), ("400", "sighup"), ("300", "cli")):
            pool.write_config(max_sessions=value)
            if how == "console":
                admin.execute("RELOAD")
            elif how == "sighup":
                pool.signal(signal.SIGHUP)
            else:
                out = subprocess.run([PGFORKPOOL, "reload", pool.conf], capture_output=True, text=True,
                                     timeout=WAIT)
                assert out.returncode == 0, out.stderr
            wait_for(lambda: max_sessions() == value, f"the reload by {how} to apply")
            assert app.execute("SHOW work_mem").fetchone() == ("9MB",)
            assert backend_pid(app) == app_pid
        assert len(rows(admin, "SHOW SESSIONS")) == 1
    app.close()


def test_show_pools_counts_a_dedicated_backends_server_connection_once(pool):
    """A dedicated session's server connection was counted twice in server_connections (found
    by a third exploratory run)."""
    with pool.connect("postgres", "app") as dedicated, console(pool) as admin:
        dedicated.execute("SELECT 1")
        own = rows(admin, "SHOW POOLS")
        row = next(p for p in own if (p["database"], p["user"]) == ("app", "postgres"))
        assert row["dedicated"] == 1 and row["server_connections"] == 1
