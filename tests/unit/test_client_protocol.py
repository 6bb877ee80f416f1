"""ClientProtocol driven with frontend bytes and no socket: framing, validation, renaming, flags, streaming."""

import random
import struct

import pytest

from pgforkpool.backend import client
from pgforkpool.backend.client import MAY_PIN, MAY_SET, TERMINATE, ClientProtocol
from pgforkpool.backend.server import BOUNDARY, ServerProtocol
from pgforkpool.backend.statements import MISSING, CloseEntry, DescribeEntry, ParseEntry, ProtocolViolation, StatementRegistry
from pgforkpool.shared import protocol

MB = 1 << 20
CHUNK = 1 << 16

# ================================================================ frontend message builders


def msg(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def query(sql: bytes) -> bytes:
    return msg(b"Q", sql + b"\0")


def parse(name: bytes, text: bytes, oids=()) -> bytes:
    return msg(b"P", name + b"\0" + text + b"\0" + struct.pack("!h", len(oids))
               + b"".join(struct.pack("!I", oid) for oid in oids))


def bind(statement: bytes = b"", params=(), portal: bytes = b"") -> bytes:
    body = portal + b"\0" + statement + b"\0" + struct.pack("!h", 0) + struct.pack("!h", len(params))
    for value in params:
        body += struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value
    return msg(b"B", body + struct.pack("!h", 0))


def describe(kind: bytes, name: bytes = b"") -> bytes:
    return msg(b"D", kind + name + b"\0")


def close(kind: bytes, name: bytes = b"") -> bytes:
    return msg(b"C", kind + name + b"\0")


def execute(portal: bytes = b"", max_rows: int = 0) -> bytes:
    return msg(b"E", portal + b"\0" + struct.pack("!i", max_rows))


SYNC, FLUSH, TERM = msg(b"S"), msg(b"H"), msg(b"X")


def key(text: bytes, oids=()) -> bytes:
    """What a Parse carries after its name (the registry's key)."""
    return parse(b"", text, oids)[6:]


# ================================================================ backend replies (to drive the server side)

PARSE_COMPLETE, BIND_COMPLETE, CLOSE_COMPLETE = msg(b"1"), msg(b"2"), msg(b"3")


def command_complete(tag: bytes) -> bytes:
    return msg(b"C", tag + b"\0")


def rfq(status: bytes = b"I") -> bytes:
    return msg(b"Z", status)


def error(sqlstate: str, text: str) -> bytes:
    return protocol.error_response("ERROR", sqlstate, text)


# ================================================================ helpers


def fresh(cache_size: int = 100):
    registry = StatementRegistry(cache_size)
    return registry, ClientProtocol(registry), ServerProtocol()


def feed(proto: ClientProtocol, srv: ServerProtocol, chunks):
    """Feed chunks in order; the concatenated output and the outcomes that were not None."""
    out, outcomes = [], []
    for chunk in chunks:
        data, outcome = proto.receive(chunk, srv)
        out.append(bytes(data))
        if outcome is not None:
            outcomes.append(outcome)
            break
    return b"".join(out), outcomes


def chunks_of(data: bytes, size: int):
    return [data[i:i + size] for i in range(0, len(data), size)]


def messages(data: bytes):
    """(type, body) of each message in data."""
    out, pos = [], 0
    while pos < len(data):
        length = struct.unpack_from("!I", data, pos + 1)[0]
        out.append((data[pos:pos + 1], data[pos + 5:pos + 1 + length]))
        pos += 1 + length
    assert pos == len(data), "output is not whole messages"
    return out


def pending_shape(srv: ServerProtocol):
    """The pending queue as comparable values."""
    shape = []
    for entry in srv.pending:
        if entry is None:
            shape.append(None)
        elif isinstance(entry, ParseEntry):
            shape.append(("parse", entry.hidden, entry.statement.name if entry.statement else None,
                          entry.client_name))
        elif isinstance(entry, CloseEntry):
            shape.append(("close", entry.statement.name if entry.statement else None,
                          entry.client_name))
        elif isinstance(entry, DescribeEntry):
            shape.append(("describe", entry.hidden, entry.statement.name if entry.statement else None))
        else:
            shape.append(("hidden", entry.kind))
    return shape


def statement_name_of(kind: bytes, body: bytes) -> bytes:
    """The statement name a Parse/Bind/Describe S/Close S message carries."""
    if kind == b"P":
        return body[:body.index(b"\0")]
    if kind == b"B":
        portal_end = body.index(b"\0")
        return body[portal_end + 1:body.index(b"\0", portal_end + 1)]
    return body[1:-1]


UNNAMED_PIPELINE = (parse(b"", b"SELECT $1::int", (23,)) + bind(b"", [b"42"]) + describe(b"P")
                    + execute() + SYNC + query(b"SELECT 1; SELECT 2") + FLUSH
                    + parse(b"", b"SELECT 'a'") + describe(b"S") + bind(b"", [], b"por")
                    + execute(b"por", 10) + close(b"P", b"por") + SYNC)

NAMED_PIPELINE = (parse(b"s1", b"SELECT $1::int", (23,)) + bind(b"s1", [b"1"]) + describe(b"S", b"s1")
                  + execute() + SYNC + parse(b"s2", b"SELECT 2") + bind(b"s2") + execute()
                  + close(b"S", b"s1") + bind(b"nope") + SYNC + query(b"SELECT 3"))


# ================================================================ framing


def test_whole_unnamed_pipeline_passes_untouched():
    """A pipeline with only unnamed statements is forwarded byte for byte, with one pending entry
    per Parse, Describe of a statement, Close and Sync/Query."""
    _reg, proto, srv = fresh()
    out, outcomes = feed(proto, srv, [UNNAMED_PIPELINE])
    assert out == UNNAMED_PIPELINE and outcomes == []
    assert [None if e is None else type(e).__name__ for e in srv.pending] == [
        "ParseEntry", None, None, "ParseEntry", "DescribeEntry", "CloseEntry", None]
    assert not proto.buf and not srv.unsynced


def test_unnamed_pipeline_fed_byte_by_byte_equals_input():
    """Fed one byte at a time, the concatenated output is the input and pending is as if fed at once."""
    _reg, whole_proto, whole_srv = fresh()
    feed(whole_proto, whole_srv, [UNNAMED_PIPELINE])
    _reg, proto, srv = fresh()
    out, outcomes = feed(proto, srv, chunks_of(UNNAMED_PIPELINE, 1))
    assert out == UNNAMED_PIPELINE and outcomes == []
    assert pending_shape(srv) == pending_shape(whole_srv)
    assert not proto.buf and not proto.passthrough


@pytest.mark.parametrize("pipeline", [UNNAMED_PIPELINE, NAMED_PIPELINE], ids=["unnamed", "named"])
def test_split_at_every_byte_boundary_same_as_whole(pipeline):
    """Split in two at every offset, a pipeline gives the output, pending entries and statements it gives whole."""
    _reg, ref_proto, ref_srv = fresh()
    expected, _ = feed(ref_proto, ref_srv, [pipeline])
    for cut in range(1, len(pipeline)):
        _reg, proto, srv = fresh()
        out, outcomes = feed(proto, srv, [pipeline[:cut], pipeline[cut:]])
        assert outcomes == [], cut
        assert out == expected, cut
        assert pending_shape(srv) == pending_shape(ref_srv), cut
        assert set(proto.statements) == set(ref_proto.statements), cut


def test_random_splits_same_as_whole():
    """Random chunkings of a named-statement pipeline give the one-shot output and pending entries."""
    rng = random.Random(1234)
    stream = NAMED_PIPELINE * 3 + UNNAMED_PIPELINE
    _reg, ref_proto, ref_srv = fresh()
    expected, _ = feed(ref_proto, ref_srv, [stream])
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(1, 12)))
        pieces = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
        _reg, proto, srv = fresh()
        out, outcomes = feed(proto, srv, pieces)
        assert outcomes == [] and out == expected
        assert pending_shape(srv) == pending_shape(ref_srv)


def test_incomplete_message_waits_in_buf():
    """A Parse that has not arrived whole is kept in buf and forwarded once its last byte comes."""
    _reg, proto, srv = fresh()
    message = parse(b"", b"SELECT 1")
    out, outcome = proto.receive(message[:-1], srv)
    assert out == b"" and outcome is None and bytes(proto.buf) == message[:-1]
    assert not srv.pending
    out, outcome = proto.receive(message[-1:], srv)
    assert out == message and outcome is None and not proto.buf
    assert len(srv.pending) == 1


def test_terminate_returns_what_came_before():
    """Terminate ends the input: the messages before it are returned with the TERMINATE outcome."""
    _reg, proto, srv = fresh()
    before = query(b"SELECT 1")
    out, outcome = proto.receive(before + TERM + query(b"SELECT 2"), srv)
    assert outcome is TERMINATE
    assert out == before


def test_flush_alone_expects_no_reply():
    """Flush and stray CopyData leave nothing pending (the session may be released at once)."""
    _reg, proto, srv = fresh()
    out, outcome = proto.receive(FLUSH + msg(b"d", b"row\n"), srv)
    assert outcome is None and out == FLUSH + msg(b"d", b"row\n")
    assert not srv.pending and not srv.unsynced


# ================================================================ renaming


def test_named_parse_is_renamed():
    """A named Parse goes to the server as pgforkpool.sN, and is recorded as prepared there."""
    _reg, proto, srv = fresh()
    out, outcome = proto.receive(parse(b"stmt", b"SELECT $1::int", (23,)) + SYNC, srv)
    assert outcome is None
    assert out == parse(b"pgforkpool.s1", b"SELECT $1::int", (23,)) + SYNC
    assert b"pgforkpool.s1" in srv.prepared
    assert pending_shape(srv) == [("parse", False, b"pgforkpool.s1", b"stmt"), None]
    assert proto.statements[b"stmt"].name == b"pgforkpool.s1"


def test_same_text_from_another_session_is_an_unnamed_parse():
    """A second session preparing a text already prepared on the connection sends an unnamed Parse that answers ParseComplete."""
    registry, first, srv = fresh()
    first.receive(parse(b"a", b"SELECT 1") + SYNC, srv)
    srv.receive(PARSE_COMPLETE + rfq())
    second = ClientProtocol(registry)
    out, outcome = second.receive(parse(b"b", b"SELECT 1") + SYNC, srv)
    assert outcome is None
    assert out == parse(b"", b"SELECT 1") + SYNC
    assert second.statements[b"b"] is first.statements[b"a"]
    assert first.statements[b"a"].refs == 2
    assert srv.unnamed is None   # the connection's unnamed statement is gone now
    # Its ParseComplete is the session's own: forwarded.
    reply, event = srv.receive(PARSE_COMPLETE + rfq())
    assert reply == PARSE_COMPLETE + rfq() and event is BOUNDARY


def test_bind_and_describe_of_named_statement_are_renamed():
    """Bind and Describe of a session's statement carry the server name, with correct lengths."""
    _reg, proto, srv = fresh()
    proto.receive(parse(b"stmt", b"SELECT $1::text", (25,)) + SYNC, srv)
    srv.receive(PARSE_COMPLETE + rfq())
    out, outcome = proto.receive(bind(b"stmt", [b"hello"], b"p1") + describe(b"S", b"stmt")
                                 + execute(b"p1") + SYNC, srv)
    assert outcome is None
    assert out == (bind(b"pgforkpool.s1", [b"hello"], b"p1") + describe(b"S", b"pgforkpool.s1")
                   + execute(b"p1") + SYNC)


def test_bind_on_a_connection_lacking_the_statement_prepares_it_first():
    """A Bind of a statement prepared elsewhere is preceded by a hidden Parse on this connection."""
    _reg, proto, first = fresh()
    proto.receive(parse(b"stmt", b"SELECT 7") + SYNC, first)
    other = ServerProtocol()
    out, outcome = proto.receive(bind(b"stmt") + execute() + SYNC, other)
    assert outcome is None
    assert out == parse(b"pgforkpool.s1", b"SELECT 7") + bind(b"pgforkpool.s1") + execute() + SYNC
    assert pending_shape(other) == [("parse", True, b"pgforkpool.s1", None), None]
    # The hidden Parse's ParseComplete is not the client's.
    reply, event = other.receive(PARSE_COMPLETE + BIND_COMPLETE + command_complete(b"SELECT 1") + rfq())
    assert reply == BIND_COMPLETE + command_complete(b"SELECT 1") + rfq() and event is BOUNDARY


@pytest.mark.parametrize("message", [bind(b"nope", [b"x"]), describe(b"S", b"nope")], ids=["bind", "describe"])
def test_unknown_name_becomes_missing(message):
    """A Bind or Describe of a name the session never prepared goes to pgforkpool.missing, remembered for the error text."""
    _reg, proto, srv = fresh()
    out, outcome = proto.receive(message + SYNC, srv)
    assert outcome is None
    (kind, body), sync = messages(out)
    assert statement_name_of(kind, body) == MISSING and sync == (b"S", b"")
    assert srv.error_names[MISSING] == b"nope"


def test_close_of_a_name_releases_it():
    """Close S of a session's name releases it in the registry and sends a harmless Close of pgforkpool.missing."""
    registry, proto, srv = fresh()
    proto.receive(parse(b"stmt", b"SELECT 1") + SYNC, srv)
    statement = proto.statements[b"stmt"]
    out, outcome = proto.receive(close(b"S", b"stmt") + SYNC, srv)
    assert outcome is None
    assert out == close(b"S", MISSING) + SYNC
    assert b"stmt" not in proto.statements
    assert statement.refs == 1   # released when the server confirms the Close
    srv.receive(PARSE_COMPLETE + rfq() + CLOSE_COMPLETE + rfq())
    assert statement.refs == 0 and registry.unused[statement.key] is statement
    # The name is free again: a later Bind of it is unknown.
    out, _ = proto.receive(bind(b"stmt") + SYNC, srv)
    assert statement_name_of(*messages(out)[0]) == MISSING


def test_duplicate_parse_goes_to_the_server_under_the_held_name():
    """A second Parse of a held name is sent under the server name so the server answers 42P05, shown with the client's name."""
    _reg, proto, srv = fresh()
    proto.receive(parse(b"stmt", b"SELECT 1") + SYNC, srv)
    srv.receive(PARSE_COMPLETE + rfq())
    out, outcome = proto.receive(parse(b"stmt", b"SELECT 2") + SYNC, srv)
    assert outcome is None
    assert out == parse(b"pgforkpool.s1", b"SELECT 2") + SYNC
    assert srv.error_names[b"pgforkpool.s1"] == b"stmt"
    reply, event = srv.receive(error("42P05", 'prepared statement "pgforkpool.s1" already exists') + rfq())
    assert event is BOUNDARY
    assert b'prepared statement "stmt" already exists' in reply and b"pgforkpool" not in reply
    # The session still holds its first statement.
    assert proto.statements[b"stmt"].key == key(b"SELECT 1")


# ================================================================ the unnamed statement


def test_unnamed_statement_kept_across_round_trips():
    """Parse "" in one round trip and Bind "" in the next, nothing in between: the Bind goes as it is."""
    _reg, proto, srv = fresh()
    proto.receive(parse(b"", b"SELECT 1") + SYNC, srv)
    srv.receive(PARSE_COMPLETE + rfq())
    later = bind(b"") + execute() + SYNC
    out, outcome = proto.receive(later, srv)
    assert outcome is None and out == later


def test_unnamed_statement_reparsed_after_another_sessions_query():
    """After another session's simple Query on the connection, the session's Bind "" is preceded by a hidden Parse ""."""
    registry, owner, srv = fresh()
    owner.receive(parse(b"", b"SELECT $1::int", (23,)) + SYNC, srv)
    srv.receive(PARSE_COMPLETE + rfq())
    other = ClientProtocol(registry)
    other.receive(query(b"SELECT 2"), srv)
    srv.receive(command_complete(b"SELECT 1") + rfq())
    out, outcome = owner.receive(bind(b"", [b"5"]) + execute() + SYNC, srv)
    assert outcome is None
    assert out == parse(b"", b"SELECT $1::int", (23,)) + bind(b"", [b"5"]) + execute() + SYNC
    assert pending_shape(srv) == [("parse", True, b"", None), None]
    reply, event = srv.receive(PARSE_COMPLETE + BIND_COMPLETE + command_complete(b"SELECT 1") + rfq())
    assert reply == BIND_COMPLETE + command_complete(b"SELECT 1") + rfq() and event is BOUNDARY


def test_unnamed_statement_reparsed_after_another_sessions_parse():
    """Another session's unnamed Parse replaces the connection's: the owner's Describe S "" re-Parses its own first."""
    registry, owner, srv = fresh()
    owner.receive(parse(b"", b"SELECT 'mine'") + SYNC, srv)
    other = ClientProtocol(registry)
    other.receive(parse(b"", b"SELECT 'theirs'") + SYNC, srv)
    out, outcome = owner.receive(describe(b"S") + SYNC, srv)
    assert outcome is None
    assert out == parse(b"", b"SELECT 'mine'") + describe(b"S") + SYNC


def test_bind_unnamed_never_parsed_goes_to_missing():
    """A session that never parsed an unnamed statement must not bind the connection's (another session's)."""
    registry, owner, srv = fresh()
    owner.receive(parse(b"", b"SELECT secret FROM other_tenant") + SYNC, srv)
    srv.receive(PARSE_COMPLETE + rfq())
    stranger = ClientProtocol(registry)
    out, outcome = stranger.receive(bind(b"") + execute() + SYNC, srv)
    assert outcome is None
    (kind, body), *rest = messages(out)
    assert kind == b"B" and statement_name_of(kind, body) == MISSING
    assert b"other_tenant" not in out


def test_describe_unnamed_never_parsed_goes_to_missing():
    """Describe S "" of a session without an unnamed statement does not describe another session's."""
    registry, owner, srv = fresh()
    owner.receive(parse(b"", b"SELECT secret FROM other_tenant") + SYNC, srv)
    stranger = ClientProtocol(registry)
    out, outcome = stranger.receive(describe(b"S") + SYNC, srv)
    assert outcome is None
    assert statement_name_of(*messages(out)[0]) == MISSING


def test_missing_unnamed_statement_error_reads_as_postgresql():
    """The error for Bind "" with no unnamed statement says "unnamed prepared statement", never the pooler's name."""
    _reg, proto, srv = fresh()
    proto.receive(bind(b"") + execute() + SYNC, srv)
    reply, event = srv.receive(
        error("26000", 'prepared statement "pgforkpool.missing" does not exist') + rfq())
    assert event is BOUNDARY
    assert b"pgforkpool" not in reply
    assert b"unnamed prepared statement does not exist" in reply


def test_close_of_unnamed_statement_forgets_it():
    """Close S "" of the session's own unnamed statement passes as it is; a later Bind "" goes to missing."""
    _reg, proto, srv = fresh()
    proto.receive(parse(b"", b"SELECT 1") + SYNC, srv)
    out, outcome = proto.receive(close(b"S") + SYNC, srv)
    assert outcome is None and out == close(b"S") + SYNC
    out, _ = proto.receive(bind(b"") + SYNC, srv)
    assert statement_name_of(*messages(out)[0]) == MISSING


def test_error_skipped_unnamed_parse_never_runs_another_sessions_statement():
    """An unnamed Parse skipped by an earlier error leaves another session's statement on the server: the next Bind "" must re-Parse."""
    registry, other, srv = fresh()
    other.receive(parse(b"", b"SELECT secret FROM other_tenant") + bind(b"") + execute() + SYNC, srv)
    srv.receive(PARSE_COMPLETE + BIND_COMPLETE + command_complete(b"SELECT 1") + rfq())
    proto = ClientProtocol(registry)
    # An Execute of a portal that does not exist fails; the Parse after it is skipped until Sync.
    proto.receive(execute(b"no_such_portal") + parse(b"", b"SELECT 1") + SYNC, srv)
    srv.receive(error("34000", 'portal "no_such_portal" does not exist') + rfq())
    out, outcome = proto.receive(bind(b"") + execute() + SYNC, srv)
    assert outcome is None
    # The server's unnamed statement is still the other session's: a Bind "" alone would run it.
    # Either the session's own text is parsed again first, or the Bind goes to pgforkpool.missing.
    first_kind, first_body = messages(out)[0]
    if first_kind == b"B":
        assert statement_name_of(first_kind, first_body) == MISSING
    else:
        assert out.startswith(parse(b"", b"SELECT 1"))


def test_skipped_hidden_reparse_keeps_the_sessions_unnamed_statement():
    """When an error skips the pooler's own re-Parse of the session's unnamed statement, the session still has it: the next Bind "" re-Parses."""
    registry, proto, srv = fresh()
    proto.receive(parse(b"", b"SELECT 'mine'") + SYNC, srv)
    srv.receive(PARSE_COMPLETE + rfq())
    ClientProtocol(registry).receive(query(b"SELECT 2"), srv)   # another session's query
    srv.receive(command_complete(b"SELECT 1") + rfq())
    out, _ = proto.receive(execute(b"nope") + bind(b"") + execute() + SYNC, srv)
    assert out == execute(b"nope") + parse(b"", b"SELECT 'mine'") + bind(b"") + execute() + SYNC
    # The error skips the hidden Parse and the Bind; on a connection of its own the statement would still exist.
    srv.receive(error("34000", 'portal "nope" does not exist') + rfq())
    out, outcome = proto.receive(bind(b"") + execute() + SYNC, srv)
    assert outcome is None
    assert out == parse(b"", b"SELECT 'mine'") + bind(b"") + execute() + SYNC


def test_failed_or_skipped_unnamed_parse_leaves_no_unnamed_statement():
    """After an error fails or skips a Parse "", the session has no unnamed statement: a Bind "" gets 26000.

    PostgreSQL would keep the previous one when the Parse was skipped rather
    than failed; the pooler cannot tell the two apart from the replies and
    does not run the previous statement again rather than risk running it
    when PostgreSQL would not (a deliberate divergence, README Known limits).
    """
    _reg, proto, srv = fresh()
    proto.receive(parse(b"", b"SELECT 'mine'") + SYNC, srv)
    srv.receive(PARSE_COMPLETE + rfq())
    proto.receive(execute(b"nope") + parse(b"", b"SELECT 'other'") + SYNC, srv)
    srv.receive(error("34000", 'portal "nope" does not exist') + rfq())
    out, outcome = proto.receive(bind(b"") + execute() + SYNC, srv)
    assert outcome is None
    kind, body = messages(out)[0]
    assert statement_name_of(kind, body) == MISSING and srv.error_names[MISSING] == b""


def test_own_simple_query_destroys_the_unnamed_statement():
    """A simple Query destroys the unnamed statement (protocol docs): a later Bind "" of the same session must not bring it back."""
    _reg, proto, srv = fresh()
    proto.receive(parse(b"", b"SELECT 1") + SYNC, srv)
    srv.receive(PARSE_COMPLETE + rfq())
    proto.receive(query(b"SELECT 9"), srv)
    srv.receive(command_complete(b"SELECT 1") + rfq())
    out, outcome = proto.receive(bind(b"") + execute() + SYNC, srv)
    assert outcome is None
    kind, body = messages(out)[0]
    assert kind == b"B" and statement_name_of(kind, body) in (b"", MISSING)


def test_close_skipped_by_an_error_keeps_the_name():
    """A Close S that PostgreSQL skips (an error earlier in the pipeline) leaves the statement: a later Bind of the name runs it."""
    _reg, proto, srv = fresh()
    out, _ = proto.receive(parse(b"a", b"SELECT 1") + bind(b"") + close(b"S", b"a") + SYNC, srv)
    # As PostgreSQL 15 answers: ParseComplete, the Bind's error, and the Close is skipped.
    srv.receive(PARSE_COMPLETE + error("26000", 'prepared statement "pgforkpool.missing" does not exist') + rfq())
    out, outcome = proto.receive(bind(b"a") + execute() + SYNC, srv)
    assert outcome is None
    assert out == bind(b"pgforkpool.s1") + execute() + SYNC


def test_close_of_unnamed_skipped_by_an_error_keeps_it():
    """A Close S "" that PostgreSQL skips leaves the session's unnamed statement: a later Bind "" runs it."""
    _reg, proto, srv = fresh()
    proto.receive(parse(b"", b"SELECT 1") + bind(b"nope") + close(b"S") + SYNC, srv)
    srv.receive(PARSE_COMPLETE + error("26000", 'prepared statement "pgforkpool.missing" does not exist') + rfq())
    out, outcome = proto.receive(bind(b"") + execute() + SYNC, srv)
    assert outcome is None
    assert out in (bind(b"") + execute() + SYNC, parse(b"", b"SELECT 1") + bind(b"") + execute() + SYNC)


# ================================================================ state flags


def test_prepared_set_config_flags_every_later_bind():
    """A prepared set_config statement flags MAY_SET on each Bind of it, in later round trips (defect 1)."""
    _reg, proto, srv = fresh()
    text = b"SELECT set_config('myapp.tenant', $1, false)"
    proto.receive(parse(b"tenant", text, (25,)) + SYNC, srv)
    srv.receive(PARSE_COMPLETE + rfq())
    proto.take_flags()
    for value in (b"t1", b"t2"):
        proto.receive(bind(b"tenant", [value]) + execute() + SYNC, srv)
        flags, texts = proto.take_flags()
        assert flags & MAY_SET
        assert any(b"myapp.tenant" in t for t in texts)


def test_shared_prepared_set_config_flags_another_sessions_bind():
    """The flag lives on the shared statement: a second session preparing the same text is flagged on Bind too."""
    registry, first, srv = fresh()
    text = b"SELECT set_config('myapp.tenant', $1, false)"
    first.receive(parse(b"a", text, (25,)) + SYNC, srv)
    second = ClientProtocol(registry)
    second.receive(parse(b"b", text, (25,)) + SYNC, srv)
    second.take_flags()
    second.receive(bind(b"b", [b"t9"]) + execute() + SYNC, srv)
    assert second.take_flags()[0] & MAY_SET


def test_unnamed_set_config_flags_a_later_bind():
    """An unnamed set_config statement bound in a later round trip flags MAY_SET again."""
    _reg, proto, srv = fresh()
    proto.receive(parse(b"", b"SELECT set_config('myapp.tenant', $1, false)", (25,)) + SYNC, srv)
    proto.take_flags()
    proto.receive(bind(b"", [b"t1"]) + execute() + SYNC, srv)
    assert proto.take_flags()[0] & MAY_SET


def test_plain_statements_earn_no_flags():
    """Statements that touch no session state leave the flags clear."""
    _reg, proto, srv = fresh()
    proto.receive(parse(b"s", b"SELECT 1") + bind(b"s") + execute() + SYNC + query(b"SELECT 2"), srv)
    assert proto.take_flags() == (0, [])


def test_temp_and_advisory_lock_earn_may_pin():
    """Temporary tables and advisory locks flag MAY_PIN (simple and extended)."""
    _reg, proto, srv = fresh()
    proto.receive(query(b"CREATE TEMP TABLE t (x int)"), srv)
    assert proto.take_flags()[0] & MAY_PIN
    proto.receive(parse(b"", b"SELECT pg_advisory_lock(1)") + bind(b"") + execute() + SYNC, srv)
    assert proto.take_flags()[0] & MAY_PIN


def test_set_config_query_split_across_reads_is_flagged():
    """A small Query with set_config that arrives in two reads is flagged as when it arrives whole."""
    message = query(b"SELECT 1, pg_catalog.set_config('myapp.tenant', 'x', false)")
    for cut in (6, 12, len(message) - 3):
        _reg, proto, srv = fresh()
        out, outcomes = feed(proto, srv, [message[:cut], message[cut:]])
        assert out == message and outcomes == []
        assert proto.take_flags()[0] & MAY_SET, cut


# ================================================================ validation


def _header_only(kind: bytes, length: int) -> bytes:
    return kind + struct.pack("!I", length)


BAD_MESSAGES = {
    "flush with a body": msg(b"H", b"x"),
    "sync with a body": msg(b"S", b"\0"),
    "terminate with a body": msg(b"X", b"bye"),
    "copydone with a body": msg(b"c", b"x"),
    "length below 4": _header_only(b"Q", 3),
    "length zero": _header_only(b"S", 0),
    "small message over its limit": _header_only(b"D", client.SMALL_MESSAGE_LIMIT + 1),
    "large message over its limit": _header_only(b"Q", client.LARGE_MESSAGE_LIMIT + 1),
    "length word all ones": _header_only(b"B", 0xFFFFFFFF),
    "unknown type": msg(b"Z", b"I"),
    "type zero": msg(b"\0", b""),
    "startup packet mid-stream": struct.pack("!II", 8, 80877103),
    "parse without NUL in the name": msg(b"P", b"stmt"),
    "parse without NUL in the text": msg(b"P", b"stmt\0SELECT 1"),
    "parse without parameter count": msg(b"P", b"\0SELECT 1\0"),
    "parse with a negative parameter count": msg(b"P", b"\0SELECT 1\0" + struct.pack("!h", -1)),
    "parse with too few oids": msg(b"P", b"\0SELECT 1\0" + struct.pack("!hI", 2, 23)),
    "bind truncated in its names": msg(b"B", b"portal\0stmt"),
    "bind with no NUL at all": msg(b"B", b"xyz"),
    "describe with an empty body": msg(b"D"),
    "describe with a bad kind": msg(b"D", b"X\0"),
    "describe without NUL": msg(b"D", b"Sname"),
    "close with an empty body": msg(b"C"),
    "close with a bad kind": msg(b"C", b"Q\0"),
}


@pytest.mark.parametrize("bad", list(BAD_MESSAGES.values()), ids=list(BAD_MESSAGES))
def test_malformed_message_is_a_violation_not_an_exception(bad):
    """A malformed message gives a ProtocolViolation with the bytes before it, and never reaches the server."""
    _reg, proto, srv = fresh()
    before = query(b"SELECT 1")
    out, outcome = proto.receive(before + bad + query(b"SELECT 2"), srv)
    assert isinstance(outcome, ProtocolViolation) and outcome.text
    assert out == before


@pytest.mark.parametrize("bad", list(BAD_MESSAGES.values()), ids=list(BAD_MESSAGES))
def test_malformed_message_fed_byte_by_byte_is_a_violation(bad):
    """Byte by byte, a malformed message is still a ProtocolViolation, and nothing of it is forwarded."""
    _reg, proto, srv = fresh()
    stream = query(b"SELECT 1") + bad + SYNC * 4
    out, outcomes = feed(proto, srv, chunks_of(stream, 1))
    assert len(outcomes) == 1 and isinstance(outcomes[0], ProtocolViolation)
    assert out == query(b"SELECT 1")


def test_violation_text_names_the_problem():
    """The violation texts are PostgreSQL's wording for the common cases."""
    _reg, proto, srv = fresh()
    assert proto.receive(_header_only(b"Z", 5), srv)[1].text == "invalid frontend message type 90"
    _reg, proto, srv = fresh()
    assert proto.receive(_header_only(b"Q", 2), srv)[1].text == "invalid message length 2"


# ================================================================ waiting input (buffer)


def test_buffer_waits_for_a_whole_message():
    """buffer() says False until the first message is whole, then True."""
    _reg, proto, _srv = fresh()
    message = query(b"SELECT 1")
    assert proto.buffer(message[:3]) is False
    assert proto.buffer(message[3:-1]) is False
    assert proto.buffer(message[-1:]) is True


def test_buffer_refuses_a_bad_first_header():
    """buffer() returns a ProtocolViolation as soon as the first header is wrong."""
    _reg, proto, _srv = fresh()
    assert isinstance(proto.buffer(_header_only(b"Q", 1)), ProtocolViolation)
    _reg, proto, _srv = fresh()
    assert isinstance(proto.buffer(b"\x01\0\0\0\x04"), ProtocolViolation)


def test_buffer_ready_once_it_fills_the_waiting_limit():
    """A large message that has not arrived whole is ready once the waiting buffer is full."""
    _reg, proto, _srv = fresh()
    big = query(b"x" * (2 * client.WAITING_INPUT_LIMIT))
    assert proto.buffer(big[:client.WAITING_INPUT_LIMIT - 1]) is False
    assert proto.buffer(big[client.WAITING_INPUT_LIMIT - 1:client.WAITING_INPUT_LIMIT]) is True


def test_buffered_input_is_forwarded_on_receive():
    """What was buffered while waiting is framed on receive(b"") as if it had just arrived."""
    _reg, proto, srv = fresh()
    assert proto.buffer(NAMED_PIPELINE) is True
    out, outcome = proto.receive(b"", srv)
    _reg, ref_proto, ref_srv = fresh()
    expected, _ = feed(ref_proto, ref_srv, [NAMED_PIPELINE])
    assert outcome is None and out == expected
    assert pending_shape(srv) == pending_shape(ref_srv)


def test_buffered_partial_message_completes_on_receive():
    """A partial message buffered while waiting is completed by what arrives after the session got its connection."""
    _reg, proto, srv = fresh()
    message = parse(b"", b"SELECT 1") + SYNC
    assert proto.buffer(message[:7]) is False
    out1, _ = proto.receive(b"", srv)
    out2, outcome = proto.receive(message[7:], srv)
    assert outcome is None and out1 + out2 == message


# ================================================================ large messages are streamed


def _stream(proto, srv, data, size=CHUNK):
    """Feed data in chunks; the output, the outcomes and the largest buf seen."""
    out, outcomes, largest = [], [], 0
    for chunk in chunks_of(data, size):
        piece, outcome = proto.receive(chunk, srv)
        out.append(bytes(piece))
        largest = max(largest, len(proto.buf))
        if outcome is not None:
            outcomes.append(outcome)
    return b"".join(out), outcomes, largest


@pytest.mark.parametrize("size", [1 * MB, 5 * MB])
def test_large_query_is_streamed(size):
    """A large Query fed in 64 KB chunks is passed on as it arrives: output equals input, buf never holds it."""
    _reg, proto, srv = fresh()
    message = query(b"SELECT '" + b"x" * size + b"'") + query(b"SELECT 2")
    out, outcomes, largest = _stream(proto, srv, message)
    assert out == message and outcomes == []
    assert largest < 2 * CHUNK
    assert list(srv.pending) == [None, None]
    assert not proto.passthrough and not proto.buf


def test_large_query_set_config_straddling_chunks_is_flagged():
    """set_config cut by a 64 KB chunk boundary in a 5 MB Query still flags MAY_SET."""
    _reg, proto, srv = fresh()
    prefix = b"SELECT '" + b"x" * (3 * CHUNK - 5 - 8 - 5) + b"', "
    text = prefix + b"set_config('myapp.tenant', 'x', false), '" + b"y" * (5 * MB) + b"'"
    message = query(text)
    start = message.index(b"set_config")
    assert start // CHUNK != (start + 9) // CHUNK   # the word is cut by a chunk boundary
    out, outcomes, largest = _stream(proto, srv, message)
    assert out == message and outcomes == [] and largest < 2 * CHUNK
    assert proto.take_flags()[0] & MAY_SET


def test_large_query_set_config_in_a_later_chunk_is_flagged():
    """set_config well inside a later chunk of a large Query flags MAY_SET."""
    _reg, proto, srv = fresh()
    message = query(b"SELECT '" + b"x" * (2 * MB) + b"', set_config('myapp.tenant', 'x', false)")
    out, outcomes, _largest = _stream(proto, srv, message)
    assert out == message and outcomes == []
    assert proto.take_flags()[0] & MAY_SET


@pytest.mark.parametrize("size", [1 * MB, 4 * MB, 16 * MB])
def test_large_bind_of_named_statement_is_renamed_and_streamed(size):
    """A large Bind of a named statement is renamed in its header with a correct length and streamed through."""
    _reg, proto, srv = fresh()
    proto.receive(parse(b"big", b"SELECT length($1)", (25,)) + SYNC, srv)
    srv.receive(PARSE_COMPLETE + rfq())
    message = bind(b"big", [b"v" * size]) + execute() + SYNC
    out, outcomes, largest = _stream(proto, srv, message)
    assert outcomes == []
    assert largest <= client.BIND_HEADER_LIMIT + 5
    assert out == bind(b"pgforkpool.s1", [b"v" * size]) + execute() + SYNC
    (kind, body), *_rest = messages(out)
    assert kind == b"B" and statement_name_of(kind, body) == b"pgforkpool.s1"


def test_abandoned_streamed_query_is_filled_so_it_cannot_run():
    """abandon() completes a half-streamed Query with filler that has no NUL: the server refuses the text instead of running it."""
    _reg, proto, srv = fresh()
    message = query(b"DELETE FROM t WHERE x = '" + b"x" * (3 * CHUNK) + b"'")
    out, _outcomes, _largest = _stream(proto, srv, message[:CHUNK + 100])
    filler = proto.abandon()
    assert filler is not None and len(filler) == len(message) - CHUNK - 100
    assert b"\0" not in filler
    sent = out + filler
    assert len(sent) == len(message) and sent[:CHUNK + 100] == message[:CHUNK + 100]
    assert not sent[5:].endswith(b"\0") and b"\0" not in sent[5:]
    assert not proto.passthrough and not proto.scanning


def test_abandon_refuses_a_large_remainder():
    """abandon() returns None when more than ABANDON_FILL_LIMIT of the message is missing."""
    _reg, proto, srv = fresh()
    message = query(b"x" * (client.ABANDON_FILL_LIMIT + 2 * CHUNK))
    _stream(proto, srv, message[:CHUNK])
    assert proto.abandon() is None


def test_large_copy_data_is_streamed():
    """A large CopyData is forwarded as it arrives and nothing is pending for it."""
    _reg, proto, srv = fresh()
    message = msg(b"d", b"r" * (3 * MB)) + msg(b"c")
    out, outcomes, largest = _stream(proto, srv, message)
    assert out == message and outcomes == [] and largest < 2 * CHUNK
    assert not srv.pending


# ---------------------------------------------------------------- query_wait_timeout

def test_drop_request_discards_up_to_the_first_sync_or_query():
    proto = ClientProtocol(StatementRegistry(10))
    pipeline = (msg(b"P", b"\0SELECT 1\0\0\0") + msg(b"B", b"\0\0\0\0\0\0\0\0") + msg(b"E", b"\0\0\0\0\0")
                + msg(b"S"))
    following = msg(b"Q", b"SELECT 2\0")
    assert proto.buffer(pipeline + following + b"Q\0") is True
    assert proto.drop_request() is True
    assert bytes(proto.buf) == following + b"Q\0"
    assert proto.drop_request() is True          # the simple Query is a request of its own
    assert bytes(proto.buf) == b"Q\0"
    assert proto.drop_request() is False         # a partial message is not a request yet
    assert bytes(proto.buf) == b"Q\0"


def test_drop_request_waits_for_the_sync_of_an_unfinished_pipeline():
    proto = ClientProtocol(StatementRegistry(10))
    parse = msg(b"P", b"\0SELECT 1\0\0\0")
    proto.buffer(parse)
    assert proto.drop_request() is False
    assert bytes(proto.buf) == parse
    proto.buffer(msg(b"S"))
    assert proto.drop_request() is True and not proto.buf


def test_a_dropped_unnamed_parse_leaves_no_unnamed_statement_to_bind_later():
    """A pipeline P""/B""/E/S then B""/E/S whose first request is dropped (cancelled before it
    reached the server): the later Bind of the unnamed statement must not run the statement the
    session had before (the client meant the new one); it gets 26000, as after a failed Parse."""
    _reg, proto, server = fresh()
    out, _ = proto.receive(msg(b"P", b"\0DELETE FROM t\0\0\0") + msg(b"S"), server)
    assert proto.unnamed is not None
    server.receive(msg(b"1") + msg(b"Z", b"I"))
    first = (msg(b"P", b"\0SELECT 1\0\0\0") + msg(b"B", b"\0\0\0\0\0\0\0\0") + msg(b"E", b"\0\0\0\0\0")
             + msg(b"S"))
    later = msg(b"B", b"\0\0\0\0\0\0\0\0") + msg(b"E", b"\0\0\0\0\0") + msg(b"S")
    assert proto.buffer(first + later) is True
    assert proto.drop_request() is True and bytes(proto.buf) == later
    assert proto.unnamed is None
    out, _ = proto.receive(b"", server)
    assert b"DELETE" not in out and b"SELECT 1" not in out   # no Parse of either is sent again
    # A dropped request without an unnamed Parse or a Query keeps the session's unnamed statement.
    _reg, proto, server = fresh()
    proto.receive(msg(b"P", b"\0SELECT 7\0\0\0") + msg(b"S"), server)
    server.receive(msg(b"1") + msg(b"Z", b"I"))
    proto.buffer(msg(b"P", b"named\0SELECT 8\0\0\0") + msg(b"S"))
    assert proto.drop_request() is True and proto.unnamed is not None


# ---------------------------------------------------------------- Sync in copy-in mode

COPY_IN_RESPONSE = msg(b"G", b"\0\0\0")
EXTENDED_COPY = parse(b"", b"COPY t FROM STDIN") + bind() + describe(b"P") + execute() + SYNC
EXTENDED_COPY_REPLIES = msg(b"1") + msg(b"2") + msg(b"n") + COPY_IN_RESPONSE


def test_libpq_extended_copy_reaches_its_boundary():
    """libpq's PQexecParams of a COPY FROM STDIN sends Parse, Bind, Describe, Execute and Sync, then
    the rows, CopyDone and Sync. PostgreSQL ignores the first Sync (it arrives in copy-in mode), and
    one ReadyForQuery ends it all: that one is the boundary (the first Sync's reply was awaited
    forever, and the connection never went to anyone else)."""
    _reg, proto, srv = fresh()
    out, outcomes = feed(proto, srv, [EXTENDED_COPY])
    assert out == EXTENDED_COPY and not outcomes
    assert srv.receive(EXTENDED_COPY_REPLIES)[1] is None
    assert srv.copy_in and srv.unsynced and pending_shape(srv) == []
    out, outcomes = feed(proto, srv, [msg(b"d", b"1\n") + msg(b"c") + SYNC])
    assert not outcomes and pending_shape(srv) == [None] and not srv.copy_in and not srv.unsynced
    assert srv.receive(command_complete(b"COPY 1") + rfq())[1] is BOUNDARY


def test_extended_copy_sent_without_waiting_reaches_its_boundary():
    """The same, all sent before the server's first reply: still one ReadyForQuery, the boundary."""
    _reg, proto, srv = fresh()
    feed(proto, srv, [EXTENDED_COPY + msg(b"d", b"1\n") + msg(b"c") + SYNC])
    assert pending_shape(srv) == [("parse", False, b"", None), None, None]
    assert srv.receive(EXTENDED_COPY_REPLIES)[1] is None
    assert pending_shape(srv) == [None] and not srv.copy_in and not srv.unsynced
    assert srv.receive(command_complete(b"COPY 1") + rfq())[1] is BOUNDARY


def test_a_sync_in_the_middle_of_copy_data_gets_no_reply():
    """Sync and Flush sent in copy-in mode are ignored by PostgreSQL, after a simple Query too."""
    _reg, proto, srv = fresh()
    feed(proto, srv, [query(b"COPY t FROM STDIN")])
    srv.receive(COPY_IN_RESPONSE)
    feed(proto, srv, [msg(b"d", b"1\n") + SYNC + FLUSH + msg(b"d", b"2\n") + msg(b"c")])
    assert pending_shape(srv) == [None] and not srv.unsynced
    assert srv.receive(command_complete(b"COPY 2") + rfq())[1] is BOUNDARY


def test_an_extended_query_that_is_not_a_copy_keeps_its_sync():
    """Counting the Syncs after an Execute costs a normal extended query nothing: its Sync is answered."""
    _reg, proto, srv = fresh()
    feed(proto, srv, [parse(b"", b"SELECT 1") + bind() + execute() + SYNC])
    assert pending_shape(srv) == [("parse", False, b"", None), None]
    assert srv.receive(msg(b"1") + msg(b"2") + msg(b"D", b"\0\0") + command_complete(b"SELECT 1")
                       + rfq())[1] is BOUNDARY
    feed(proto, srv, [query(b"COPY t FROM STDIN")])      # then a simple-query COPY: nothing dropped
    srv.receive(COPY_IN_RESPONSE)
    assert pending_shape(srv) == [None] and not srv.unsynced


def test_a_sync_after_a_failing_row_is_not_sent_so_no_reply_goes_astray():
    """A Sync sent in copy-in mode right after a bad row: PostgreSQL reads the row first, fails the
    COPY and then answers the Sync, a ReadyForQuery nobody awaits, which would have answered the next
    session on the connection. The Sync is not sent at all: ignored or answered, no reply comes."""
    _reg, proto, srv = fresh()
    feed(proto, srv, [query(b"COPY t FROM STDIN")])
    srv.receive(COPY_IN_RESPONSE)
    out, outcomes = feed(proto, srv, [msg(b"d", b"x\n") + SYNC])
    assert out == msg(b"d", b"x\n") and not outcomes
    out, event = srv.receive(error("22P02", "invalid input syntax") + rfq())
    assert event is BOUNDARY and not srv.inbuf and not srv.pending


def test_libpq_order_with_a_failing_row_and_a_sync_among_the_rows():
    _reg, proto, srv = fresh()
    feed(proto, srv, [EXTENDED_COPY])
    srv.receive(EXTENDED_COPY_REPLIES)
    out, outcomes = feed(proto, srv, [msg(b"d", b"x\n") + SYNC + msg(b"c") + SYNC])
    assert out == msg(b"d", b"x\n") + msg(b"c") + SYNC and not outcomes
    assert pending_shape(srv) == [None]
    assert srv.receive(error("22P02", "invalid input syntax") + rfq())[1] is BOUNDARY and not srv.inbuf


def test_a_sync_among_rows_sent_before_the_copy_began_is_refused():
    """Rows, then a Sync, all sent before the server said the Execute is a COPY: whether the server
    ignores that Sync (copy-in) or answers it (the COPY failed on a row before it) cannot be told,
    so the client is refused (08P01) instead of the replies getting out of step."""
    _reg, proto, srv = fresh()
    _out, outcomes = feed(proto, srv, [parse(b"", b"COPY t FROM STDIN") + bind() + execute()
                                       + msg(b"d", b"x\n") + SYNC])
    assert len(outcomes) == 1 and isinstance(outcomes[0], ProtocolViolation)


def test_the_clean_up_sync_of_a_client_gone_before_the_copy_began_is_counted():
    """A client sent Parse, Bind, Execute (a COPY) and CopyDone and left before CopyInResponse; the
    clean-up synced the pipeline (as pooled._client_gone does). The connection reaches its boundary."""
    _reg, proto, srv = fresh()
    feed(proto, srv, [parse(b"", b"COPY t FROM STDIN") + bind() + execute() + msg(b"c")])
    assert srv.unsynced
    srv.pending.append(None)            # pooled._client_gone's ABORT_PIPELINE + Sync
    srv.unsynced = False
    srv.synced_after_copy = True
    assert srv.receive(msg(b"1") + msg(b"2") + COPY_IN_RESPONSE)[1] is None
    assert not srv.unsynced and not srv.copy_in
    assert srv.receive(command_complete(b"COPY 0") + error("08P01", "unexpected message")
                       + rfq())[1] is BOUNDARY


def test_a_set_statement_closed_in_the_round_trip_that_runs_it_keeps_its_name_in_sight():
    """Bind, Execute and Close of a prepared SET in one round trip: the Close takes the statement
    away at once, before the boundary looks for the custom setting's name, so its text is kept."""
    from pgforkpool.backend.context import custom_setting_names
    _reg, proto, srv = fresh()
    feed(proto, srv, [parse(b"s1", b"SET myapp.tenant = 'acme'") + SYNC])
    srv.receive(msg(b"1") + rfq())
    feed(proto, srv, [query(b"SELECT 1")])
    srv.receive(command_complete(b"SELECT 1") + rfq())
    feed(proto, srv, [bind(b"s1") + execute() + close(b"S", b"s1") + SYNC])
    assert b"s1" not in proto.statements
    _flags, texts = proto.take_flags()
    names = proto.statement_setting_names()
    for text in texts:
        names |= custom_setting_names(text)
    assert "myapp.tenant" in names
