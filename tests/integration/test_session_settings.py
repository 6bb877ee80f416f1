"""Every setting a session makes is its own: kept across switches, never seen by another session."""

import pytest

from conftest import server_pid


def show(conn, name):
    return conn.execute(f"SHOW {name}").fetchone()[0]


@pytest.mark.parametrize("name,value", [
    ("search_path", "pg_catalog, public"),
    ("work_mem", "8MB"),
    ("statement_timeout", "5s"),
    ("timezone", "Asia/Tokyo"),
])
def test_set_is_per_session(two, name, value):
    _, a, b = two
    default = show(b, name)
    a.execute(f"SET {name} = '{value}'" if name != "search_path" else f"SET {name} = {value}")
    for _ in range(3):
        assert show(a, name) == value
        assert show(b, name) == default


def test_set_config_in_a_select_is_per_session(two):
    _, a, b = two
    a.execute("SELECT set_config('myapp.tenant', 'acme', false), 1")
    assert a.execute("SELECT current_setting('myapp.tenant', true)").fetchone()[0] == "acme"
    assert b.execute("SELECT current_setting('myapp.tenant', true)").fetchone()[0] in (None, "")
    assert a.execute("SELECT current_setting('myapp.tenant', true)").fetchone()[0] == "acme"


def test_set_local_ends_with_the_transaction(two):
    _, a, b = two
    default = show(b, "work_mem")
    a.execute("BEGIN")
    a.execute("SET LOCAL work_mem = '16MB'")
    assert show(a, "work_mem") == "16MB"
    a.execute("COMMIT")
    assert show(a, "work_mem") == default
    assert show(b, "work_mem") == default


def test_rollback_undoes_set(two):
    _, a, b = two
    default = show(a, "search_path")
    a.execute("BEGIN")
    a.execute("SET search_path = pg_catalog")
    a.execute("ROLLBACK")
    assert show(a, "search_path") == default
    a.execute("SET work_mem = '2MB'")
    a.execute("BEGIN")
    a.execute("SAVEPOINT s")
    a.execute("SET work_mem = '3MB'")
    a.execute("ROLLBACK TO SAVEPOINT s")
    a.execute("COMMIT")
    assert show(a, "work_mem") == "2MB"
    assert show(b, "work_mem") != "2MB"


def test_reset_returns_to_the_startup_value(start_pooler):
    pooler = start_pooler(session_pool_size=1)
    with pooler.connect(options="-c work_mem=12MB -c timezone=Asia/Tokyo") as a, pooler.connect() as b:
        default_tz = show(b, "timezone")
        a.execute("SET work_mem = '20MB'")
        a.execute("SET timezone = 'Europe/Paris'")
        assert show(b, "work_mem") != "20MB"
        a.execute("RESET work_mem")
        assert show(a, "work_mem") == "12MB"
        a.execute("RESET ALL")
        assert show(a, "timezone") == "Asia/Tokyo"
        assert a.info.parameter_status("TimeZone") == "Asia/Tokyo"
        assert show(b, "timezone") == default_tz
        a.execute("DISCARD ALL")
        assert show(a, "work_mem") == "12MB"
        assert show(a, "timezone") == "Asia/Tokyo"


def test_set_role_is_isolated(two):
    """SET ROLE of one session must never give another session that role's privileges."""
    pooler, a, b = two
    pooler.cluster.psql("GRANT alice TO app")
    a.execute("SET ROLE alice")
    assert a.execute("SELECT current_user").fetchone()[0] == "alice"
    for round in range(3):
        assert b.execute("SELECT current_user").fetchone()[0] == "app"
        # What b creates belongs to b's own role, never to the role a took.
        b.execute(f"CREATE TABLE role_probe_{round} (x int)")
        owner = pooler.cluster.psql(
            f"SELECT tableowner FROM pg_tables WHERE tablename = 'role_probe_{round}'", database="app")
        b.execute(f"DROP TABLE role_probe_{round}")
        assert owner == "app"
        assert a.execute("SELECT current_user").fetchone()[0] == "alice"
    # RESET ALL does not reset the role, as in PostgreSQL.
    a.execute("RESET ALL")
    assert a.execute("SELECT current_user").fetchone()[0] == "alice"
    a.execute("RESET ROLE")
    assert a.execute("SELECT current_user").fetchone()[0] == "app"


def test_set_session_authorization_is_isolated(start_pooler):
    pooler = start_pooler(session_pool_size=1, dedicated_users="", dedicated_databases="")
    with pooler.connect(user="postgres") as a, pooler.connect(user="postgres") as b:
        assert server_pid(a) == server_pid(b)
        a.execute("SET SESSION AUTHORIZATION bob")
        assert a.execute("SELECT session_user, current_user").fetchone() == ("bob", "bob")
        assert b.execute("SELECT session_user, current_user").fetchone() == ("postgres", "postgres")
        assert a.execute("SELECT session_user").fetchone()[0] == "bob"
        a.execute("RESET SESSION AUTHORIZATION")
        assert a.execute("SELECT session_user").fetchone()[0] == "postgres"


def test_client_sees_only_its_own_parameter_status(two):
    _, a, b = two
    a.execute("SET DateStyle = 'German'")
    b.execute("SET application_name = 'bee'")
    b.execute("SELECT 1")
    a.execute("SELECT 1")
    assert a.info.parameter_status("DateStyle") == "German, DMY"
    assert b.info.parameter_status("DateStyle") != "German, DMY"
    assert b.info.parameter_status("application_name") == "bee"
    assert a.info.parameter_status("application_name") != "bee"
    # Setting the value another session has in force still reports it to this client.
    a.execute("SET application_name = 'bee'")
    assert a.info.parameter_status("application_name") == "bee"


def test_workload_without_settings_runs_no_hidden_queries(start_pooler):
    """A session that never sets anything costs no extra statements on the server."""
    pooler = start_pooler(session_pool_size=1)
    with pooler.connect() as a, pooler.connect() as b:
        a.prepare_threshold = b.prepare_threshold = None   # named statements are another test's
        before = pooler.cluster.psql(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = 'app'")
        for _ in range(20):
            a.execute("SELECT 1")
            b.execute("SELECT 2")
        pooler.cluster.psql("SELECT pg_stat_force_next_flush()")
        after = pooler.cluster.psql(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = 'app'")
        # 40 transactions of the clients; stats lag is tolerated, extra statements are not.
        assert int(after) - int(before) <= 44


def test_startup_timezone_survives_other_sessions_settings(start_pooler):
    """A session whose time zone came with its startup packet keeps it after another
    session on the same connection ran SET (names read back from pg_settings are
    spelled TimeZone, startup names timezone: the same setting)."""
    pooler = start_pooler(session_pool_size=1)
    with pooler.connect(options="-c timezone=Asia/Tokyo") as a, pooler.connect() as b:
        b.execute("SET timezone = 'Europe/Paris'")
        b.execute("SET work_mem = '5MB'")
        for _ in range(3):
            assert show(a, "timezone") == "Asia/Tokyo"
            assert a.info.parameter_status("TimeZone") == "Asia/Tokyo"
            assert show(b, "timezone") == "Europe/Paris"


def test_what_a_do_block_does_is_the_sessions_own(two):
    """A DO block's statements send no tags of their own: a setting or a role it SETs through
    EXECUTE stayed on the shared connection for the next session, and a LISTEN or a temporary
    table it made did not pin its session. After DO (and CALL) the pooler reads the settings back
    and asks whether to pin, as after SET and CREATE TEMP TABLE."""
    pooler, a, b = two
    assert server_pid(a) == server_pid(b)
    default_path = show(b, "search_path")
    a.execute("DO $$BEGIN EXECUTE 'SET search_path = pg_catalog'; END$$")
    for _ in range(2):
        assert show(b, "search_path") == default_path
        assert show(a, "search_path") == "pg_catalog"
    a.execute("DO $$BEGIN EXECUTE 'LISTEN do_channel'; END$$")
    assert b.execute("SELECT count(*) FROM pg_listening_channels()").fetchone()[0] == 0
    assert server_pid(a) != server_pid(b)   # pinned with its LISTEN
    b.execute("NOTIFY do_channel, 'hello'")
    a.execute("SELECT 1")
    assert [n.payload for n in a.notifies(timeout=5, stop_after=1)] == ["hello"]
