"""A statement's result shape, driven with bytes and no socket: what a client was told of a
statement is recorded, a statement prepared again on another connection is described there
before the client's Bind or Describe of it goes, and one whose result changed fails with 0A000."""

import struct

from hypothesis import given, settings, strategies as st

from pgforkpool.backend.client import HOLDING, ClientProtocol
from pgforkpool.backend.server import BOUNDARY, CHECKED, NOTE_STALE, STALE_PLAN_ERROR, ServerProtocol
from pgforkpool.backend.statements import (STALE, STALE_NAME, DescribeEntry, ParseEntry, StatementRegistry,
                                           result_shape)
from pgforkpool.shared import protocol

# ================================================================ messages (the frontend builders of test_client_protocol)

from test_client_protocol import FLUSH, SYNC, bind, error, execute, msg, parse, rfq  # noqa: E402


def describe_statement(name: bytes) -> bytes:
    return msg(b"D", b"S" + name + b"\0")


PARSE_COMPLETE, BIND_COMPLETE, NO_DATA = msg(b"1"), msg(b"2"), msg(b"n")
PARAMETERS = msg(b"t", struct.pack("!h", 0))
TEXT = b"SELECT * FROM t"


def columns(*cols: tuple[bytes, int], table: int = 16384) -> bytes:
    """A RowDescription: (name, type oid) per column, of table `table`."""
    body = struct.pack("!h", len(cols))
    for number, (name, oid) in enumerate(cols, 1):
        body += name + b"\0" + struct.pack("!ihihih", table, number, oid, 4, -1, 0)
    return msg(b"T", body)


INT_TEXT = columns((b"a", 23), (b"b", 25))
REAL_TEXT = columns((b"a", 700), (b"b", 25))


# ================================================================ helpers


def described_elsewhere():
    """A session that prepared TEXT as s1 and was told INT_TEXT on connection `first`; then a
    connection `second` that lacks it."""
    registry = StatementRegistry(100)
    proto = ClientProtocol(registry)
    first = ServerProtocol()
    out, outcome = proto.receive(parse(b"s1", TEXT) + describe_statement(b"s1") + SYNC, first)
    assert outcome is None
    reply = PARSE_COMPLETE + PARAMETERS + INT_TEXT + rfq()
    forwarded, _event = first.receive(reply)
    assert forwarded == reply, "the client's own description reaches it whole"
    statement = proto.statements[b"s1"]
    assert statement.shape == result_shape(INT_TEXT, 5, len(INT_TEXT))
    return registry, proto, statement, ServerProtocol()


def server_side(server: ServerProtocol, data: bytes):
    """Feed the server's bytes; the bytes for the client and the events, each event's rest fed
    with receive(b"") as the backend does."""
    out, events = [], []
    chunk, event = server.receive(data)
    out.append(chunk)
    while event is not None:
        events.append(event)
        if not server.inbuf:
            break
        chunk, event = server.receive(b"")
        out.append(chunk)
    return b"".join(out), events


def check_sent(name: bytes) -> bytes:
    return parse(name, TEXT) + describe_statement(name) + FLUSH


# ================================================================ tests


def test_a_bind_of_a_described_statement_prepared_again_waits_for_its_description():
    """The pooler sends Parse, Describe, Flush, and holds the Bind and what follows (more input too)."""
    _registry, proto, statement, second = described_elsewhere()
    out, outcome = proto.receive(bind(b"s1") + execute(), second)
    assert outcome is None and out == check_sent(statement.name)
    assert proto.need == HOLDING and proto.holding is statement
    out, outcome = proto.receive(SYNC, second)
    assert (out, outcome) == (b"", None), "input while held is only buffered"
    assert [type(e) for e in second.pending] == [ParseEntry, DescribeEntry]
    assert all(e.hidden for e in second.pending)


def test_the_same_shape_lets_the_bind_go_and_nothing_of_the_check_reaches_the_client():
    _registry, proto, statement, second = described_elsewhere()
    proto.receive(bind(b"s1") + execute() + SYNC, second)
    out, events = server_side(second, PARSE_COMPLETE + PARAMETERS + columns((b"a", 23), (b"b", 25), table=99))
    assert (out, events) == (b"", [CHECKED]), "another table with the same columns is the same result"
    assert not statement.flags & STALE
    proto.resume()
    out, outcome = proto.receive(b"", second)
    assert outcome is None
    assert out == bind(statement.name) + execute() + SYNC
    assert list(second.pending) == [None]


def test_a_changed_shape_makes_the_statement_fail_with_0A000_for_its_holders_only():
    registry, proto, statement, second = described_elsewhere()
    other = ClientProtocol(registry)   # a session that holds it too
    other.receive(parse(b"x", TEXT), ServerProtocol())
    assert other.statements[b"x"] is statement
    proto.receive(bind(b"s1") + execute() + SYNC, second)
    out, events = server_side(second, PARSE_COMPLETE + PARAMETERS + REAL_TEXT)
    assert (out, events) == (b"", [CHECKED])
    assert statement.flags & STALE and second.notes & NOTE_STALE
    proto.resume()
    out, _ = proto.receive(b"", second)
    assert out == bind(STALE_NAME) + execute() + SYNC, "the server fails the Bind and skips to the Sync"
    missing = error("26000", f'prepared statement "{STALE_NAME.decode()}" does not exist')
    out, events = server_side(second, missing + rfq())
    assert out == STALE_PLAN_ERROR + rfq()
    # Its Describe fails alike, for every session that holds it; a new Parse of the text gets a
    # statement of its own.
    out, _ = other.receive(describe_statement(b"x") + SYNC, second)
    assert out == describe_statement(STALE_NAME) + SYNC
    newcomer = ClientProtocol(registry)
    newcomer.receive(parse(b"y", TEXT), second)
    assert newcomer.statements[b"y"] is not statement and not newcomer.statements[b"y"].flags & STALE


def test_an_error_that_skips_the_check_lets_the_held_input_go_without_a_second_check():
    """The table is gone: the pooler's Parse fails, the client sees that error (as PostgreSQL's
    revalidation would say it), and its Bind and Sync go on to a server that skips to the Sync."""
    _registry, proto, statement, second = described_elsewhere()
    proto.receive(bind(b"s1") + execute() + SYNC, second)
    gone = error("42P01", 'relation "t" does not exist')
    out, events = server_side(second, gone)
    assert (out, events) == (gone, [CHECKED])
    assert not second.pending and second.skipping
    proto.resume()
    out, _ = proto.receive(b"", second)
    assert out == parse(statement.name, TEXT) + bind(statement.name) + execute() + SYNC
    assert proto.need != HOLDING
    out, events = server_side(second, rfq())
    assert out == rfq() and not second.skipping


def test_no_check_is_sent_while_the_server_skips_to_the_sync():
    """An error of the open batch came before the Bind: a check would get no answer."""
    _registry, proto, statement, second = described_elsewhere()
    proto.receive(parse(b"", b"SELECT 1/0") + bind(b"") + execute(), second)
    server_side(second, PARSE_COMPLETE + BIND_COMPLETE + error("22012", "division by zero"))
    assert second.skipping
    out, _ = proto.receive(bind(b"s1") + execute() + SYNC, second)
    assert out == parse(statement.name, TEXT) + bind(statement.name) + execute() + SYNC


def test_an_error_of_an_earlier_batch_does_not_stop_a_check():
    _registry, proto, statement, second = described_elsewhere()
    proto.receive(parse(b"", b"SELECT 1/0") + bind(b"") + execute() + SYNC, second)
    out, _ = proto.receive(bind(b"s1") + execute() + SYNC, second)
    assert out == check_sent(statement.name)
    server_side(second, PARSE_COMPLETE + BIND_COMPLETE + error("22012", "division by zero"))
    assert not second.skipping, "that error's batch is synced"
    out, events = server_side(second, rfq() + PARSE_COMPLETE + PARAMETERS + INT_TEXT)
    assert out == rfq() and events == [CHECKED]


def test_a_describe_of_a_statement_prepared_again_is_held_too():
    _registry, proto, statement, second = described_elsewhere()
    out, _ = proto.receive(describe_statement(b"s1") + SYNC, second)
    assert out == check_sent(statement.name)
    assert server_side(second, PARSE_COMPLETE + PARAMETERS + INT_TEXT) == (b"", [CHECKED])
    proto.resume()
    out, _ = proto.receive(b"", second)
    assert out == describe_statement(statement.name) + SYNC
    reply = PARAMETERS + INT_TEXT + rfq()
    assert server_side(second, reply) == (reply, [BOUNDARY])


def test_a_statement_never_described_is_prepared_again_without_a_check():
    registry = StatementRegistry(100)
    proto = ClientProtocol(registry)
    proto.receive(parse(b"s1", TEXT) + SYNC, ServerProtocol())
    second = ServerProtocol()
    out, _ = proto.receive(bind(b"s1") + execute() + SYNC, second)
    name = proto.statements[b"s1"].name
    assert out == parse(name, TEXT) + bind(name) + execute() + SYNC


def test_result_shape_compares_what_postgresql_compares():
    def shape(message: bytes) -> bytes:
        return result_shape(message, 5, len(message))
    assert shape(INT_TEXT) == shape(columns((b"a", 23), (b"b", 25), table=1))
    assert shape(INT_TEXT) != shape(REAL_TEXT)
    assert shape(INT_TEXT) != shape(columns((b"a", 23), (b"bb", 25)))
    assert shape(INT_TEXT) != shape(columns((b"a", 23), (b"b", 25), (b"c", 23)))
    assert shape(columns()) != b"", "no columns is not NoData"


def test_a_moved_session_shares_a_statement_only_with_those_told_the_same_shape():
    """A moved session's statement is the shared one of its text only when that one is known to
    answer as its client was told: one of unknown shape may have been prepared here after the
    table changed (a libpq client's, never described), and one of another shape is right for
    those who hold it.  Else the session gets one of its own, checked where it is prepared."""
    registry = StatementRegistry(100)
    told = result_shape(INT_TEXT, 5, len(INT_TEXT))
    other = result_shape(REAL_TEXT, 5, len(REAL_TEXT))
    key = TEXT + b"\0\0\0"
    unknown = registry.acquire(key, 0)
    own = registry.adopt(key, 0, b"", told)
    assert own is not unknown and own.shape == told and not own.flags & STALE
    assert unknown.shape is None, "the shared one is not stamped with a shape nobody checked"
    unknown.shape = other
    own2 = registry.adopt(key, 0, b"", told)
    assert own2 is not unknown and own2.name != own.name
    unknown.shape = told
    assert registry.adopt(key, 0, b"", told) is unknown and unknown.refs == 2
    assert registry.adopt(key, 0, b"", None) is unknown, "told nothing: shared"
    assert registry.adopt(key, STALE, b"", told).flags & STALE
    # Its own is prepared where it is used, and the Bind waits for the check there.
    proto = ClientProtocol(registry)
    proto.statements[b"s1"] = own
    out, _ = proto.receive(bind(b"s1") + execute() + SYNC, ServerProtocol())
    assert out == check_sent(own.name)


def test_the_0A000_of_a_stale_statement_names_the_routine_postgresql_names():
    """asyncpg prepares again after 0A000 only when the error names RevalidateCachedQuery."""
    fields = protocol.parse_error_fields(STALE_PLAN_ERROR[5:])
    assert fields["C"] == "0A000" and fields["R"] == "RevalidateCachedQuery"
    assert fields["M"] == "cached plan must not change result type"


@settings(max_examples=200, deadline=None)
@given(cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8), same=st.booleans())
def test_the_check_reads_alike_however_the_server_bytes_are_cut(cuts, same):
    """Split anywhere, the check's answer gives one CHECKED and nothing for the client; what
    follows it (the Bind's replies) is forwarded whole."""
    _registry, proto, statement, second = described_elsewhere()
    proto.receive(bind(b"s1") + execute() + SYNC, second)
    answer = PARSE_COMPLETE + PARAMETERS + (INT_TEXT if same else REAL_TEXT)
    data = answer + BIND_COMPLETE + msg(b"C", b"SELECT 0\0") + rfq()
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    out, events = [], []
    for start, end in zip(points, points[1:]):
        chunk, event = server_side(second, data[start:end])
        out.append(chunk)
        events += event
    assert events.count(CHECKED) == 1
    assert b"".join(out) == data[len(answer):]
    assert bool(statement.flags & STALE) is not same


def test_a_client_told_another_shape_than_the_statements_holders_makes_it_stale():
    """Two copies of a shared statement answer differently (one prepared on another connection
    after the table changed): a client's own Describe shows it.  The statement is STALE for
    everyone who holds it (0A000, after which asyncpg and JDBC prepare anew), never run under
    a description its holder was not told."""
    registry, proto, statement, second = described_elsewhere()
    newcomer = ClientProtocol(registry)
    out, _ = newcomer.receive(parse(b"n1", TEXT) + describe_statement(b"n1") + SYNC, second)
    assert newcomer.statements[b"n1"] is statement
    # Prepared there as its holders were told, and described for the pooler on the way.
    assert out == (parse(statement.name, TEXT) + describe_statement(statement.name)
                   + describe_statement(statement.name) + SYNC)
    check = PARAMETERS + REAL_TEXT
    reply = PARSE_COMPLETE + check + PARAMETERS + REAL_TEXT + rfq()
    assert server_side(second, reply) == (PARSE_COMPLETE + PARAMETERS + REAL_TEXT + rfq(), [CHECKED, BOUNDARY]), \
        "the newcomer is told what it asked"
    assert statement.flags & STALE and second.notes & NOTE_STALE
    out, _ = proto.receive(bind(b"s1") + execute() + SYNC, second)
    assert out == bind(STALE_NAME) + execute() + SYNC


def test_a_describe_that_fails_after_its_parameter_description_leaves_no_description_pending():
    """PostgreSQL answers a Describe of a statement whose result changed with its
    ParameterDescription and then 0A000 (or 42P01 when its table is gone): the next
    RowDescription, of another query, is not that statement's shape (found by review)."""
    registry, proto, statement, second = described_elsewhere()
    first = ServerProtocol()
    first.prepared.add(statement.name)
    proto.receive(describe_statement(b"s1") + SYNC, first)
    stale = error("0A000", "cached plan must not change result type")
    assert server_side(first, PARAMETERS + stale + rfq()) == (PARAMETERS + stale + rfq(), [BOUNDARY])
    assert first.describing is None
    proto.receive(msg(b"Q", b"SELECT 1.5::real AS a, 'x' AS b\0"), first)
    server_side(first, REAL_TEXT + msg(b"C", b"SELECT 1\0") + rfq())
    assert statement.shape == result_shape(INT_TEXT, 5, len(INT_TEXT)) and not statement.flags & STALE


def test_a_check_that_fails_after_its_parameter_description_releases_the_hold():
    _registry, proto, statement, second = described_elsewhere()
    proto.receive(bind(b"s1") + execute() + SYNC, second)
    stale = error("0A000", "cached plan must not change result type")
    out, events = server_side(second, PARSE_COMPLETE + PARAMETERS + stale)
    assert events == [CHECKED] and second.checked is statement and out == stale
    assert second.skipping, "the server skips the held Bind to the Sync"


def test_a_statement_is_prepared_again_with_the_parameter_types_its_client_was_told():
    """After ALTER … TYPE real, `$1` inferred anew would be a real, and the client's binary int4
    be stored as a tiny float; PostgreSQL keeps the types it told (found by review)."""
    registry = StatementRegistry(100)
    proto = ClientProtocol(registry)
    first, second = ServerProtocol(), ServerProtocol()
    text = b"INSERT INTO t VALUES ($1)"
    proto.receive(parse(b"i1", text) + describe_statement(b"i1") + SYNC, first)
    int4 = msg(b"t", struct.pack("!hI", 1, 23))
    server_side(first, PARSE_COMPLETE + int4 + NO_DATA + rfq())
    statement = proto.statements[b"i1"]
    out, _ = proto.receive(bind(b"i1") + execute() + SYNC, second)
    typed = msg(b"P", statement.name + b"\0" + text + b"\0" + struct.pack("!hI", 1, 23))
    assert out == typed + describe_statement(statement.name) + FLUSH
    # A check told other parameter types makes it STALE, as another result shape does.
    assert server_side(second, PARSE_COMPLETE + msg(b"t", struct.pack("!hI", 1, 700)) + NO_DATA) == (b"", [CHECKED])
    assert statement.flags & STALE


def test_another_sessions_parse_of_a_described_statement_is_checked_on_the_way():
    """A session that was never told the description prepares the shared statement on a
    connection that lacks it: as its holders were told, with a Describe for the pooler that
    nothing waits for; a changed result makes it STALE before any holder binds it there."""
    registry, proto, statement, second = described_elsewhere()
    other = ClientProtocol(registry)
    out, _ = other.receive(parse(b"o1", TEXT) + bind(b"o1") + execute() + SYNC, second)
    assert out == (parse(statement.name, TEXT) + describe_statement(statement.name)
                   + bind(statement.name) + execute() + SYNC)
    rows = BIND_COMPLETE + msg(b"D", struct.pack("!hi", 1, 1) + b"1") + msg(b"C", b"SELECT 1\0") + rfq()
    out, events = server_side(second, PARSE_COMPLETE + PARAMETERS + REAL_TEXT + rows)
    assert out == PARSE_COMPLETE + rows and events == [CHECKED, BOUNDARY]
    assert statement.flags & STALE
    out, _ = proto.receive(bind(b"s1") + execute() + SYNC, second)
    assert out == bind(STALE_NAME) + execute() + SYNC


def test_after_a_revalidation_error_every_holder_prepares_its_statement_afresh():
    """42804 or XX000 from the server (a statement outdated by a migration made elsewhere): its
    text's statements are retired and renewed, so neither a new session nor the one that holds
    it keeps failing; one told a description is prepared with it and checked."""
    registry, proto, statement, second = described_elsewhere()
    plain = ClientProtocol(registry)
    plain.receive(parse(b"p1", b"SELECT 1") + SYNC, second)
    server_side(second, PARSE_COMPLETE + rfq())
    old_plain = plain.statements[b"p1"]
    plain.receive(bind(b"p1") + execute() + SYNC, second)
    outdated = error("42804", 'column "n" is of type integer but expression is of type character varying')
    server_side(second, outdated + rfq())
    from pgforkpool.backend.server import NOTE_OUTDATED
    assert second.take_notes()[0] & NOTE_OUTDATED
    registry.retire_all(renew=True)
    out, _ = plain.receive(bind(b"p1") + execute() + SYNC, second)
    renewed = plain.statements[b"p1"]
    assert renewed is not old_plain and renewed.name != old_plain.name
    assert out == parse(renewed.name, b"SELECT 1") + bind(renewed.name) + execute() + SYNC
    out, _ = proto.receive(bind(b"s1") + execute() + SYNC, second)
    assert proto.statements[b"s1"] is not statement and out == check_sent(proto.statements[b"s1"].name)


def test_a_pipelined_batchs_error_about_a_stale_statement_is_shown_as_0A000():
    """The ReadyForQuery of an earlier batch came between the framing of the Bind and its error:
    the pooler's name for a stale statement reached the client (found running SQLAlchemy's tests)."""
    registry, proto, statement, second = described_elsewhere()
    statement.flags |= STALE
    out, _ = proto.receive(msg(b"Q", b"SELECT 1\0") + bind(b"s1") + execute() + SYNC, second)
    missing = error("26000", f'prepared statement "{STALE_NAME.decode()}" does not exist')
    first_reply = msg(b"C", b"SELECT 1\0") + rfq()
    out, _events = server_side(second, first_reply + missing + rfq())
    assert out == first_reply + STALE_PLAN_ERROR + rfq()
