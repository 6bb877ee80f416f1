"""Who shares which server statement: scopes of parse settings, a session's private scope while its
settings are unread, statements moved when its scope changes, the pin check's list of what the
connection still has, and retired statements deallocated on the shared connection. On bytes, no
socket."""

import struct

from pgforkpool.backend import context
from pgforkpool.backend.client import ClientProtocol
from pgforkpool.backend.server import BOUNDARY, HiddenQuery, ServerProtocol
from pgforkpool.backend.statements import StatementRegistry


def msg(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def parse(name: bytes, text: bytes) -> bytes:
    return msg(b"P", name + b"\0" + text + b"\0" + struct.pack("!h", 0))


def bind(statement: bytes) -> bytes:
    return msg(b"B", b"\0" + statement + b"\0" + struct.pack("!hhh", 0, 0, 0))


EXECUTE, SYNC = msg(b"E", b"\0" + struct.pack("!i", 0)), msg(b"S")
PARSE_COMPLETE, BIND_COMPLETE = msg(b"1"), msg(b"2")


def rfq() -> bytes:
    return msg(b"Z", b"I")


def command_complete(tag: bytes) -> bytes:
    return msg(b"C", tag + b"\0")


def parses(out: bytes) -> list[bytes]:
    """The statement names of the Parse messages in out."""
    names, pos = [], 0
    while pos < len(out):
        length = struct.unpack_from("!I", out, pos + 1)[0]
        if out[pos:pos + 1] == b"P":
            names.append(out[pos + 5:out.index(b"\0", pos + 5)])
        pos += 1 + length
    return names


def pin_check_answer(names: bytes | None) -> bytes:
    cols = struct.pack("!h", 2) + b"".join(n + b"\0" + struct.pack("!ihihih", 0, 0, 25, -1, -1, 0)
                                           for n in (b"?column?", b"names"))
    row = struct.pack("!h", 2) + struct.pack("!i", 1) + b"f"
    row += struct.pack("!i", -1) if names is None else struct.pack("!i", len(names)) + names
    return msg(b"T", cols) + msg(b"D", row) + command_complete(b"SELECT 1") + rfq()


def test_a_statement_parsed_after_the_pin_check_was_sent_is_not_forgotten():
    """The owner has its ReadyForQuery before the pin check goes out, and its next request (a
    Parse) may follow the check on the connection: the check's list cannot name that statement,
    which must not be forgotten (its next Bind would prepare it again: 42P05 for good)."""
    registry, server = StatementRegistry(100), ServerProtocol()
    server.pid = 1
    a = ClientProtocol(registry)
    out, _ = a.receive(parse(b"old", b"SELECT 0") + bind(b"old") + EXECUTE + SYNC, server)
    server.receive(PARSE_COMPLETE + BIND_COMPLETE + command_complete(b"SELECT 1") + rfq())
    old = a.statements[b"old"].name
    server.pin_check_sent()   # as _boundary sends the check
    server.hidden("pin check", context.PIN_CHECK_QUERY)
    out, _ = a.receive(parse(b"q1", b"SELECT 1") + bind(b"q1") + EXECUTE + SYNC, server)
    new = a.statements[b"q1"].name
    assert parses(out) == [new]
    _data, event = server.receive(pin_check_answer(None))   # "old" was deallocated behind its back
    assert type(event) is HiddenQuery
    assert server.forget_deallocated(event.rows[0][1]) == 1   # what PooledBackend._prepared_left does
    assert server.prepared == {new}
    assert server.receive(PARSE_COMPLETE + BIND_COMPLETE + command_complete(b"SELECT 1") + rfq())[1] is BOUNDARY
    out, _ = a.receive(bind(b"q1") + EXECUTE + SYNC + bind(b"old") + EXECUTE + SYNC, server)
    assert parses(out) == [old]   # prepared again where it is gone, and only there


def test_a_session_with_unread_settings_shares_nothing_it_prepares():
    """After a SET (or a SET LOCAL in its open transaction) a session's Parse is read under
    settings not read back yet: it gets a statement of a scope of its own."""
    registry, server = StatementRegistry(100), ServerProtocol()
    a, b = ClientProtocol(registry), ClientProtocol(registry)
    a.scope = context.private_scope(7)
    a.receive(parse(b"s", b"SELECT '2024-01-01 00:00'::timestamptz"), server)
    b.receive(parse(b"s", b"SELECT '2024-01-01 00:00'::timestamptz"), server)
    assert a.statements[b"s"] is not b.statements[b"s"]
    assert context.private_scope(7) != context.private_scope(8) != context.parse_scope({"timezone": "UTC"})


def test_a_change_of_scope_moves_the_statements_a_session_holds():
    """A session that changed TimeZone: its statements, prepared again on a connection that lacks
    them, would be read under its new TimeZone, and must not be the ones the sessions of its old
    scope bind."""
    registry, server = StatementRegistry(100), ServerProtocol()
    a, b = ClientProtocol(registry), ClientProtocol(registry)
    a.receive(parse(b"s", b"SELECT 1"), server)
    b.receive(parse(b"t", b"SELECT 1"), server)
    shared = b.statements[b"t"]
    assert a.statements[b"s"] is shared and shared.refs == 2
    a.scope = context.parse_scope({"timezone": "Asia/Tokyo"})
    a.rescope_statements()
    assert a.statements[b"s"] is not shared and shared.refs == 1
    moved = a.statements[b"s"]
    a.rescope_statements()   # nothing more to move
    assert a.statements[b"s"] is moved and moved.refs == 1


def test_retired_statements_are_deallocated_on_the_shared_connection_in_its_turn():
    """A retire_all while a pinned connection is activated: the shared connection's copies are
    deallocated at its own next activation (PooledBackend._deallocate_evicted), not left there
    for its lifetime."""
    registry = StatementRegistry(100)
    shared, pinned = set(), {b"pgforkpool.s1"}
    for n in range(3):
        statement = registry.acquire(b"SELECT %d\0\0\0" % n, 0)
        shared.add(statement.name)
        registry.release(statement)
    registry.retire_all()
    assert registry.take_evicted(pinned, shared) == [b"pgforkpool.s1"]
    assert len(registry.evicted) == 3
    assert sorted(registry.take_evicted(shared, None)) == sorted(shared)
    assert not registry.evicted
