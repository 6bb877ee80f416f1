"""Protocol-level named prepared statements: each session's names are its own, on a shared server connection."""

import os
import subprocess
import threading
import time

from psycopg import pq

from conftest import USERS, server_pid


def prepare(conn, name: bytes, sql: bytes) -> pq.PGresult:
    return conn.pgconn.prepare(name, sql)


def execute(conn, name: bytes, params=()) -> pq.PGresult:
    return conn.pgconn.exec_prepared(name, list(params))


def value(result: pq.PGresult):
    assert result.status == pq.ExecStatus.TUPLES_OK, result.error_message
    return result.get_value(0, 0).decode()


def sqlstate(result: pq.PGresult) -> str:
    return (result.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode()


def message(result: pq.PGresult) -> str:
    return (result.error_field(pq.DiagnosticField.MESSAGE_PRIMARY) or b"").decode()



def test_same_name_different_queries(two):
    _, a, b = two
    assert prepare(a, b"s1", b"SELECT 'from a'").status == pq.ExecStatus.COMMAND_OK
    assert prepare(b, b"s1", b"SELECT 'from b'").status == pq.ExecStatus.COMMAND_OK
    for _ in range(3):
        assert value(execute(a, b"s1")) == "from a"
        assert value(execute(b, b"s1")) == "from b"


def test_unknown_name_is_26000_and_the_session_lives_on(two):
    _, a, b = two
    prepare(a, b"mine", b"SELECT 1")
    result = execute(b, b"mine")
    assert sqlstate(result) == "26000"
    assert message(result) == 'prepared statement "mine" does not exist'
    assert b.execute("SELECT 42").fetchone()[0] == 42
    assert value(execute(a, b"mine")) == "1"
    described = b.pgconn.describe_prepared(b"mine")
    assert sqlstate(described) == "26000"


def test_duplicate_name_is_42P05_and_keeps_the_first(two):
    _, a, _b = two
    prepare(a, b"dup", b"SELECT 'first'")
    result = prepare(a, b"dup", b"SELECT 'second'")
    assert sqlstate(result) == "42P05"
    assert message(result) == 'prepared statement "dup" already exists'
    assert value(execute(a, b"dup")) == "first"


def test_close_then_reuse_the_name(two):
    _, a, b = two
    prepare(a, b"s", b"SELECT 'one'")
    prepare(b, b"s", b"SELECT 'one'")   # same text: shared on the server
    a.pgconn.send_close_prepared(b"s")
    while a.pgconn.get_result() is not None:
        pass
    assert sqlstate(execute(a, b"s")) == "26000"
    assert value(execute(b, b"s")) == "one"    # b's is untouched
    prepare(a, b"s", b"SELECT 'two'")
    assert value(execute(a, b"s")) == "two"
    assert value(execute(b, b"s")) == "one"


def test_statement_survives_a_new_server_connection(two):
    """A connection that lacks the statement gets it prepared before Describe or Bind."""
    pooler, a, b = two
    prepare(a, b"keep", b"SELECT $1::int + 1")
    old = server_pid(b)
    pooler.cluster.psql(f"SELECT pg_terminate_backend({old}, 5000)")
    time.sleep(0.5)   # let the backend notice the closed connection while idle
    # Lost while idle: nobody's query failed; the backend dials a new connection.
    assert server_pid(b) != old
    described = a.pgconn.describe_prepared(b"keep")
    assert described.status == pq.ExecStatus.COMMAND_OK
    assert described.nparams == 1
    assert value(execute(a, b"keep", [b"41"])) == "42"


def test_psycopg_automatic_prepare_with_many_sessions(start_pooler):
    """psycopg prepares a query after 5 executions under names like _pg3_0: every session uses the same names."""
    pooler = start_pooler(session_pool_size=1)
    conns = [pooler.connect() for _ in range(4)]
    try:
        for round in range(10):
            for i, conn in enumerate(conns):
                assert conn.execute("SELECT %s::int * 2", [i + round]).fetchone()[0] == 2 * (i + round)
                # a different text per session under the same psycopg name
                assert conn.execute(f"SELECT {i} + %s::int", [round]).fetchone()[0] == i + round
        assert len({server_pid(c) for c in conns}) == 1
    finally:
        for conn in conns:
            conn.close()


def test_psycopg_threads_with_automatic_prepare(start_pooler):
    pooler = start_pooler(session_pool_size=2)
    errors = []

    def work(n):
        try:
            with pooler.connect() as conn:
                for i in range(60):
                    got = conn.execute("SELECT %s::int + %s::int", [n, i]).fetchone()[0]
                    assert got == n + i
                    conn.execute("SELECT note FROM items WHERE id = %s", [i]).fetchall()
        except Exception as exc:   # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors


def test_discard_all_forgets_only_the_owners_statements(two):
    _, a, b = two
    prepare(a, b"x", b"SELECT 'a'")
    prepare(b, b"y", b"SELECT 'b'")
    a.execute("DISCARD ALL")
    assert sqlstate(execute(a, b"x")) == "26000"
    assert value(execute(b, b"y")) == "b"


def test_pgbench_prepared_through_the_pooler(start_pooler, tmp_path):
    pooler = start_pooler(session_pool_size=2, auth_method="md5")
    env = dict(os.environ, PGPASSWORD=USERS["app"])
    script = tmp_path / "q.sql"
    script.write_text("\\set id random(1, 1000)\nSELECT :id::int + 1;\nSELECT count(*) FROM items WHERE id = :id;\n")
    out = subprocess.run(["pgbench", "-n", "-h", "127.0.0.1", "-p", str(pooler.port), "-U", "app",
                          "-M", "prepared", "-c", "20", "-j", "2", "-t", "100", "-f", str(script), "app"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "number of failed transactions: 0" in out.stdout
    assert "number of transactions actually processed: 2000/2000" in out.stdout


def test_unused_statements_beyond_the_cache_are_closed_on_the_server(start_pooler):
    pooler = start_pooler(session_pool_size=1, prepared_statement_cache_size=2)
    with pooler.connect() as a:
        a.prepare_threshold = None
        for i in range(6):
            prepare(a, b"s%d" % i, b"SELECT %d" % i)
        count = "SELECT count(*) FROM pg_prepared_statements WHERE NOT from_sql"
        assert a.execute(count).fetchone()[0] == 6
        for i in range(6):
            a.pgconn.send_close_prepared(b"s%d" % i)
            while a.pgconn.get_result() is not None:
                pass
        assert a.execute(count).fetchone()[0] == 2
        # Preparing a closed text again works as if it had never been.
        prepare(a, b"again", b"SELECT 0")
        assert value(execute(a, b"again")) == "0"
