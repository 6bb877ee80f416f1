"""A session's saved context and its statements, on plain values: no server."""

import pytest

from pgforkpool.backend import context as session, statements


def test_startup_settings_take_fields_and_options():
    got = session.startup_settings({
        "user": "app", "database": "app", "application_name": "psql",
        "options": r"-c search_path=a,b --work-mem=8MB -cTimeZone=UTC -c x.y=one\ two"})
    assert got == {"application_name": "psql", "search_path": "a,b", "work_mem": "8MB",
                   "timezone": "UTC", "x.y": "one two"}


def test_bad_options_are_refused():
    with pytest.raises(ValueError):
        session.parse_options("stray")
    with pytest.raises(ValueError):
        session.parse_options("-c novalue")


def test_restore_sends_only_differences():
    sql = session.restore_query({"timezone": "UTC", "work_mem": "4MB"},
                                {"timezone": "UTC", "application_name": "a"})
    assert "timezone" not in sql
    assert "set_config('application_name', 'a', false)" in sql
    assert 'RESET "work_mem"' in sql
    assert session.restore_query({"a": "1"}, {"a": "1"}) == ""


def test_restore_puts_session_authorization_before_role():
    sql = session.restore_query({}, {"role": "r", "session_authorization": "s"})
    assert sql.index("'session_authorization'") < sql.index("'role'")
    # Leaving a SET ROLE session: the role is reset explicitly (RESET ALL would not).
    assert session.restore_query({"role": "r"}, {}) == session.LIFT_TIMEOUTS + "; RESET ROLE"


def test_restore_from_an_unknown_context_resets_everything_first():
    sql = session.restore_query(None, {"timezone": "UTC"})
    lift = session.LIFT_TIMEOUTS
    assert sql.startswith(f"{lift}; RESET SESSION AUTHORIZATION; RESET ROLE; RESET ALL; {lift}; ")


def test_a_restore_lifts_the_timeouts_of_the_connections_settings_for_itself():
    """The restore runs in the settings of the connection's last owner: a statement_timeout or
    lock_timeout of a few milliseconds there must not cut it short.  SET LOCAL lifts them for the
    restore's own implicit transaction; a value the restore sets for the session comes after."""
    sql = session.restore_query({"statement_timeout": "5ms"}, {"statement_timeout": "7ms"})
    assert sql.startswith("SET LOCAL transaction_deferrable = off; SET LOCAL statement_timeout = 0; "
                          "SET LOCAL lock_timeout = 0; ")
    assert sql.index("SET LOCAL statement_timeout") < sql.index("set_config('statement_timeout', '7ms', false)")


def test_the_settings_of_one_transaction_are_not_read_back():
    """After BEGIN; SET TRANSACTION …; COMMIT PostgreSQL lists transaction_isolation (and
    transaction_read_only, transaction_deferrable) with source 'session': read back, they were
    restored inside the restore's snapshot, refused, and the session ended."""
    sql = session.capture_query(set())
    for name in ("transaction_isolation", "transaction_read_only", "transaction_deferrable"):
        assert f"'{name}'" in sql.split("NOT IN", 1)[1].split(")", 1)[0]


def test_captured_settings_lower_case_names_and_drop_defaults():
    rows = [("TimeZone", "UTC"), ("role", "none"), ("session_authorization", "app"),
            ("myapp.tenant", "t1"), ("other.unset", None)]
    assert session.captured_settings(rows, "app") == {"timezone": "UTC", "myapp.tenant": "t1"}


def test_custom_setting_names_from_statement_text():
    text = b"SET myapp.tenant = 'x'; SELECT set_config('App.User', 'y', false); SET work_mem = 1"
    assert session.custom_setting_names(text) == {"myapp.tenant", "app.user"}


def test_statement_registry_shares_and_evicts():
    registry = statements.StatementRegistry(cache_size=1)
    first = registry.acquire(b"SELECT 1\0\0\0", 0)
    again = registry.acquire(b"SELECT 1\0\0\0", 0)
    assert first is again and first.refs == 2
    other = registry.acquire(b"SELECT 2\0\0\0", 0)
    assert other.name != first.name
    registry.release(first)
    registry.release(first)
    registry.release(other)    # two unused statements, room for one: the older goes
    assert registry.evicted == [first.name]
    assert registry.acquire(b"SELECT 1\0\0\0", 0).name not in (first.name, other.name)


def test_renamed_messages():
    from pgforkpool.shared import protocol
    reader = protocol.MessageReader()
    reader.feed(statements.parse_message(b"s1", b"SELECT 1\0\0\0"))
    assert reader.next() == (protocol.PARSE, b"s1\0SELECT 1\0\0\0")
    bind = statements.with_statement_name(ord("B"), b"\0", b"pgforkpool.s1", b"\0\0\0\0\0\0")
    assert bind[0:1] == b"B" and b"\0pgforkpool.s1\0" in bind
    assert int.from_bytes(bind[1:5], "big") == len(bind) - 1


def test_context_is_a_serializable_value():
    """A session's context survives a round trip through plain data (what a migration will move)."""
    import json
    ctx = session.Context.from_startup({"user": "app", "database": "app", "application_name": "a",
                                        "options": "-c myapp.tenant=t1"})
    ctx.settings["timezone"] = "UTC"
    ctx.reported["TimeZone"] = "UTC"
    again = session.Context.from_dict(json.loads(json.dumps(ctx.to_dict())))
    assert again.to_dict() == ctx.to_dict()
    assert again.startup == {"application_name": "a", "myapp.tenant": "t1"}
    assert again.custom_names == {"myapp.tenant"}


def test_a_placeholder_a_library_reserved_is_found_in_the_refusal_and_dropped():
    """PostgreSQL refuses to set a placeholder ("plpgsql.x") once a library reserved its prefix on
    that server process (42602); the name is the one the refusal quotes, and only a custom setting
    of the context is one: anything else is not this case."""
    from pgforkpool.backend.context import quoted_setting, reserved_placeholder

    assert quoted_setting('invalid configuration parameter name "Plpgsql.X", removing it') == "plpgsql.x"
    assert quoted_setting('invalid name "work_mem"') is None and quoted_setting("nothing quoted") is None

    context = session.Context({"work_mem": "7MB", "plpgsql.tenant_x": "a"}, custom_names={"plpgsql.tenant_x"})
    refusal = 'invalid configuration parameter name "plpgsql.Tenant_X"'
    assert reserved_placeholder("42602", refusal, context) == "plpgsql.tenant_x"
    assert reserved_placeholder("22023", refusal, context) is None           # another error
    assert reserved_placeholder("42602", 'invalid configuration parameter name "other.x"', context) is None
    assert reserved_placeholder("42602", 'invalid configuration parameter name "work_mem"', context) is None
    assert reserved_placeholder("42602", "no name quoted", context) is None
    context.startup["plpgsql.tenant_x"] = "a"
    context.drop("plpgsql.tenant_x")
    assert (context.settings, context.custom_names) == ({"work_mem": "7MB"}, set())
    assert "plpgsql.tenant_x" not in context.startup
    assert reserved_placeholder("42602", refusal, context) is None


@pytest.mark.parametrize("statement, names", [
    (b"SET myapp.tenant = 'a'", {"myapp.tenant"}),
    (b'SET "myapp.tenant" = \'a\'', {"myapp.tenant"}),
    (b'SET "MyApp"."Tenant" TO 1', {"myapp.tenant"}),            # setting names ignore case
    (b"set local myapp . tenant = 1", {"myapp.tenant"}),
    (b'SET SESSION "a""b.c" = 1', {'a"b.c'}),
    (b"set local a.b.c = 1; SET other.x TO 2", {"a.b.c", "other.x"}),
    (b"SELECT set_config('myapp.t', 'v', false)", {"myapp.t"}),
    (b"SELECT pg_catalog.set_config( E'my.\\'q' , 'v', false)", {"my.'q"}),
    (b"SELECT set_config('it''s.x', 'v', false)", {"it's.x"}),
    (b"SELECT set_config($$my.dollar$$, 'v', false)", {"my.dollar"}),
    (b"SELECT set_config($q$my.tagged$q$, 'v', false)", {"my.tagged"}),
    (b"SELECT set_config($1, $2, false)", {session.UNKNOWN_NAME}),
    (b"SELECT set_config(name, 'v', false) FROM t", {session.UNKNOWN_NAME}),
    (b"SET work_mem = '1MB'; SELECT set_config('work_mem', '2MB', false)", set()),
    (b"SET SESSION AUTHORIZATION alice", set()),
    (b"UPDATE t SET x = 1", set()),
])
def test_custom_setting_names_follow_every_spelling_postgresql_accepts(statement, names):
    """The custom settings a statement may set, as PostgreSQL names them (pg_settings and SHOW ALL
    do not list them, so the pooler reads them back by these names); a set_config whose name is
    not a constant is UNKNOWN_NAME."""
    assert session.custom_setting_names(statement) == names


def test_sessions_share_statements_only_when_they_read_texts_alike():
    """A prepared statement keeps the reading of its text under the settings it was prepared in
    (a timestamptz literal under TimeZone, a name under search_path): sessions whose such
    settings differ get statements of their own; the others share one."""
    from pgforkpool.backend.statements import StatementRegistry
    registry = StatementRegistry(10)
    key = b"SELECT '2024-01-01 00:00'::timestamptz\0\0\0"
    tokyo = session.parse_scope({"timezone": "Asia/Tokyo", "application_name": "a"})
    utc = session.parse_scope({"timezone": "UTC"})
    plain = session.parse_scope({"application_name": "b", "myapp.tenant": "t"})
    assert plain == b"" and tokyo != utc
    first = registry.acquire(key, 0, tokyo)
    assert registry.acquire(key, 0, tokyo) is first
    assert registry.acquire(key, 0, utc) is not first
    assert registry.acquire(key, 0, plain) is not first
    assert registry.acquire(key, 0) is registry.acquire(key, 0, b"")
    assert first.key == key   # what is sent to the server stays the client's text
    assert session.parse_scope({"search_path": "s1"}) != session.parse_scope({"search_path": "s2"})


def test_a_scope_cannot_pass_for_a_parse_payload():
    """Scoped registry keys start with two NULs and a length: a payload that starts with two
    NULs (an empty text, no parameter types) is three bytes long, so no client's Parse can
    name another scope's statement."""
    from pgforkpool.backend.statements import StatementRegistry
    registry = StatementRegistry(10)
    scope = session.parse_scope({"timezone": "UTC"})
    theirs = registry.acquire(b"SELECT 1\0\0\0", 0, scope)
    body = b"mine\0" + scope + b"SELECT 1\0\0\0"   # a Parse whose payload is their registry key
    assert isinstance(statements.parse_key(body, 0, len(body)), statements.ProtocolViolation)
    assert registry.acquire(b"\0\0\0", 0) is not theirs


def test_released_scoped_statements_are_evicted_by_their_own_key():
    from pgforkpool.backend.statements import StatementRegistry
    registry = StatementRegistry(1)
    scope = session.parse_scope({"datestyle": "ISO, DMY"})
    one = registry.acquire(b"SELECT 1\0\0\0", 0, scope)
    two = registry.acquire(b"SELECT 2\0\0\0", 0, scope)
    registry.release(one)
    registry.release(two)
    assert registry.evicted == [one.name]
    assert registry.acquire(b"SELECT 2\0\0\0", 0, scope) is two


def test_pg_temp_in_the_search_path_is_seen_in_any_spelling():
    assert session.temp_schema_in_path({"search_path": "pg_temp, public"})
    assert session.temp_schema_in_path({"search_path": 'public, "PG_TEMP"'})
    assert not session.temp_schema_in_path({"search_path": "\"$user\", public"})
    assert not session.temp_schema_in_path({})


def test_retired_statements_stay_with_their_holders_and_new_parses_get_new_ones():
    """After 0A000 (a table changed under a prepared statement) no new Parse is given an old
    statement; a holder keeps its own, which is deallocated once nobody holds it."""
    from pgforkpool.backend.statements import StatementRegistry
    registry = StatementRegistry(10)
    key = b"SELECT * FROM t\0\0\0"
    held = registry.acquire(key, 0)
    idle = registry.acquire(b"SELECT 2\0\0\0", 0)
    registry.release(idle)
    registry.retire_all()
    assert registry.evicted == [idle.name]
    fresh = registry.acquire(key, 0)
    assert fresh is not held and fresh.name != held.name
    registry.release(held)
    assert registry.evicted == [idle.name, held.name]
    assert registry.acquire(key, 0) is fresh


@pytest.mark.parametrize("value, seconds", [
    (None, 0.0), ("", 0.0), ("0", 0.0), ("1000", 1.0), ("1s", 1.0), ("1500ms", 1.5), (" 2 s ", 2.0),
    ("1.5min", 90.0), ("1h", 3600.0), ("1d", 86400.0), ("250000us", 0.25), ("bogus", 0.0), ("-5", 0.0),
])
def test_a_time_setting_in_ms_is_read_as_postgresql_reads_it(value, seconds):
    assert session.duration_setting(value) == pytest.approx(seconds)
