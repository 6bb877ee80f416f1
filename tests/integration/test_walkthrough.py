"""The pgcat walkthrough (shared/seeds), replayed with Postgres Pro semantics: one server process, own sessions."""

import threading
import time

from conftest import query_running, server_pid, wait_for


def test_two_clients_share_one_server_process(start_pooler):
    pooler = start_pooler(session_pool_size=1)
    with pooler.connect() as client1, pooler.connect() as client2:
        assert server_pid(client1) == server_pid(client2)
        # The pooler is not a server process of its own: the pid is PostgreSQL's.
        assert pooler.cluster.psql(
            f"SELECT count(*) FROM pg_stat_activity WHERE pid = {server_pid(client1)}") == "1"


def test_set_timezone_is_per_session_and_persists(start_pooler):
    pooler = start_pooler(session_pool_size=1)
    with pooler.connect() as client1, pooler.connect() as client2:
        default = client2.execute("SHOW timezone").fetchone()[0]
        client1.execute("SET timezone TO 'America/Los_Angeles'")
        assert client1.execute("SHOW timezone").fetchone()[0] == "America/Los_Angeles"
        assert client2.execute("SHOW timezone").fetchone()[0] == default
        # Interleave more transactions: each keeps its own value.
        for _ in range(3):
            assert client1.execute("SHOW timezone").fetchone()[0] == "America/Los_Angeles"
            assert client2.execute("SHOW timezone").fetchone()[0] == default
        assert server_pid(client1) == server_pid(client2)
        # What the client library was told (ParameterStatus) is its own value too.
        assert client1.info.parameter_status("TimeZone") == "America/Los_Angeles"
        assert client2.info.parameter_status("TimeZone") == default


def test_open_transaction_makes_the_other_client_wait_not_fail(start_pooler):
    pooler = start_pooler(session_pool_size=1)
    with pooler.connect() as client1, pooler.connect() as client2:
        client1.execute("BEGIN")
        client1.execute("SELECT 1")
        result = {}

        def other():
            started = time.monotonic()
            result["value"] = client2.execute("SELECT 1").fetchone()[0]
            result["waited"] = time.monotonic() - started

        thread = threading.Thread(target=other)
        thread.start()
        thread.join(1.0)
        assert thread.is_alive(), "client2 ran while client1 held the only server connection"
        client1.execute("COMMIT")
        thread.join(10)
        assert not thread.is_alive()
        assert result["value"] == 1
        assert result["waited"] >= 0.9


def test_long_statement_makes_the_other_wait_then_both_succeed(start_pooler):
    pooler = start_pooler(session_pool_size=1)
    with pooler.connect() as client1, pooler.connect() as client2:
        outcome = {}
        sleeper = threading.Thread(
            target=lambda: outcome.setdefault("sleep", client2.execute("SELECT pg_sleep(1.5)").fetchone()))
        sleeper.start()
        wait_for(lambda: query_running(pooler.cluster, "SELECT pg_sleep(1.5)"), "the sleep to start")
        started = time.monotonic()
        assert client1.execute("SELECT 1").fetchone()[0] == 1
        assert time.monotonic() - started > 0.5
        sleeper.join(10)
        assert outcome["sleep"] == ("",) or outcome["sleep"] == (None,)
