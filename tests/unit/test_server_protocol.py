"""ServerProtocol driven with backend bytes and no socket: reply counting, hidden queries, undo, notes, streaming."""

import struct

import pytest

from pgforkpool.backend import client as client_mod
from pgforkpool.backend import server as srv_mod
from pgforkpool.backend.client import ClientProtocol
from pgforkpool.backend.pooled import ABORT_PIPELINE
from pgforkpool.backend.server import (BOUNDARY, BROKEN, NOTE_DISCARDED, NOTE_OUTDATED, NOTE_PIN, NOTE_RESET, NOTE_STALE,
                                       NOTE_SETTINGS, NOTE_UNPIN, HiddenQuery, ServerProtocol,
                                       TransactionStatus)
from pgforkpool.backend.statements import ProtocolViolation, Statement, StatementRegistry
from pgforkpool.shared import protocol

MB = 1 << 20
CHUNK = 1 << 16

# ================================================================ message builders


def msg(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


PARSE_COMPLETE, BIND_COMPLETE, CLOSE_COMPLETE = msg(b"1"), msg(b"2"), msg(b"3")
SYNC = msg(b"S")


def rfq(status: bytes = b"I") -> bytes:
    return msg(b"Z", status)


def command_complete(tag: bytes) -> bytes:
    return msg(b"C", tag + b"\0")


def row_description(*names: bytes) -> bytes:
    body = struct.pack("!h", len(names))
    for name in names:
        body += name + b"\0" + struct.pack("!ihihih", 0, 0, 25, -1, -1, 0)
    return msg(b"T", body)


def data_row(*values) -> bytes:
    body = struct.pack("!h", len(values))
    for value in values:
        body += struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value
    return msg(b"D", body)


def error(sqlstate: str, text: str) -> bytes:
    return protocol.error_response("ERROR", sqlstate, text)


def notice(sqlstate: str, text: str) -> bytes:
    body = b"SWARNING\0VWARNING\0C" + sqlstate.encode() + b"\0M" + text.encode() + b"\0\0"
    return msg(b"N", body)


def notification(pid: int, channel: bytes, payload: bytes) -> bytes:
    return msg(b"A", struct.pack("!i", pid) + channel + b"\0" + payload + b"\0")


def parameter_status(name: bytes, value: bytes) -> bytes:
    return msg(b"S", name + b"\0" + value + b"\0")


def parse(name: bytes, text: bytes) -> bytes:
    return msg(b"P", name + b"\0" + text + b"\0" + struct.pack("!h", 0))


def bind(statement: bytes = b"") -> bytes:
    return msg(b"B", b"\0" + statement + b"\0" + struct.pack("!hhh", 0, 0, 0))


def execute(portal: bytes = b"") -> bytes:
    return msg(b"E", portal + b"\0" + struct.pack("!i", 0))


def query(sql: bytes) -> bytes:
    return msg(b"Q", sql + b"\0")


def select_reply(*rows) -> bytes:
    return (row_description(b"col") + b"".join(data_row(*row) for row in rows)
            + command_complete(b"SELECT %d" % len(rows)))


def owner_server(n_pending: int = 1) -> ServerProtocol:
    """A connection whose owner awaits n ReadyForQuery."""
    srv = ServerProtocol()
    srv.pending.extend([None] * n_pending)
    return srv


def drain(srv: ServerProtocol, data: bytes):
    """receive(data), then receive(b"") while an event left input behind: outputs and events."""
    outs, events = [], []
    out, event = srv.receive(data)
    while True:
        outs.append(bytes(out))
        if event is not None:
            events.append(event)
        if event is None or event is BROKEN or not srv.inbuf:
            break
        out, event = srv.receive(b"")
    return b"".join(outs), events


# ================================================================ reply counting


def test_boundary_only_after_the_last_ready_for_query():
    """With three Syncs outstanding, only the third ReadyForQuery is a boundary."""
    srv = owner_server(3)
    replies = [PARSE_COMPLETE + BIND_COMPLETE + command_complete(b"SELECT 1") + rfq(b"T"),
               command_complete(b"INSERT 0 1") + rfq(b"T"),
               command_complete(b"COMMIT") + rfq(b"I")]
    for reply, expected in zip(replies, [None, None, BOUNDARY]):
        out, event = srv.receive(reply)
        assert out == reply and event is expected
    assert not srv.pending and srv.status == TransactionStatus.IDLE


def test_boundary_after_all_replies_in_one_chunk():
    """Several pipelines' replies in one chunk: everything is forwarded and the boundary comes once."""
    srv = owner_server(3)
    data = rfq(b"T") + command_complete(b"SELECT 1") + rfq(b"T") + rfq(b"E")
    out, event = srv.receive(data)
    assert out == data and event is BOUNDARY
    assert srv.status == TransactionStatus.FAILED


def test_unsynced_messages_hold_the_boundary():
    """After a Sync's ReadyForQuery, extended messages sent since (not yet synced) keep the owner."""
    srv = owner_server(1)
    srv.unsynced = True
    out, event = srv.receive(rfq())
    assert out == rfq() and event is None


def test_ready_for_query_split_across_reads():
    """A ReadyForQuery cut at any byte is a boundary once its last byte comes."""
    data = command_complete(b"SELECT 1") + rfq()
    for cut in range(1, len(data)):
        srv = owner_server(1)
        out1, event1 = srv.receive(data[:cut])
        out2, event2 = srv.receive(data[cut:])
        assert out1 + out2 == data and event1 is None and event2 is BOUNDARY, cut


def test_replies_split_at_every_byte_give_the_same_output():
    """A reply stream cut in two at every offset is forwarded the same and ends in one boundary."""
    data = (PARSE_COMPLETE + BIND_COMPLETE + select_reply((b"a",), (None,)) + notice("01000", "hi")
            + parameter_status(b"application_name", b"x") + rfq(b"T") + command_complete(b"COMMIT") + rfq())
    for cut in range(1, len(data)):
        srv = owner_server(2)
        out1, event1 = srv.receive(data[:cut])
        out2, event2 = srv.receive(data[cut:])
        assert out1 + out2 == data, cut
        assert [e for e in (event1, event2) if e is not None] == [BOUNDARY], cut


# ================================================================ hidden queries


def test_hidden_query_rows_are_collected_not_forwarded():
    """A hidden query's rows are collected on the HiddenQuery and nothing reaches the client."""
    srv = ServerProtocol()
    sent = srv.hidden("capture", "SELECT name, setting FROM x")
    assert sent == query(b"SELECT name, setting FROM x")
    reply = (row_description(b"name", b"setting") + data_row(b"timezone", b"UTC")
             + data_row(b"myapp.tenant", None) + command_complete(b"SELECT 2") + rfq())
    out, event = srv.receive(reply)
    assert out == b""
    assert isinstance(event, HiddenQuery) and event.kind == "capture"
    assert event.rows == [("timezone", "UTC"), ("myapp.tenant", None)] and event.error is None
    assert not srv.pending


def test_hidden_query_error_is_collected_not_forwarded():
    """A hidden query's ErrorResponse becomes its .error and is not forwarded."""
    srv = ServerProtocol()
    srv.hidden("restore", "SELECT set_config('x', 'y', false)")
    out, event = srv.receive(error("42501", "permission denied to set parameter") + rfq())
    assert out == b""
    assert event.error is not None
    assert event.error.sqlstate == "42501" and "permission denied" in event.error.text


def test_input_after_a_hidden_reply_waits_for_the_next_receive():
    """The owner's replies after a hidden query's ReadyForQuery are kept in inbuf and come with receive(b"")."""
    srv = ServerProtocol()
    srv.hidden("restore", "SELECT 1")
    srv.pending.append(None)
    owner_reply = select_reply((b"1",)) + rfq()
    out, event = srv.receive(select_reply((b"r",)) + rfq() + owner_reply)
    assert out == b"" and isinstance(event, HiddenQuery)
    assert bytes(srv.inbuf) == owner_reply
    assert srv.pending[0] is None
    out, event = srv.receive(b"")
    assert out == owner_reply and event is BOUNDARY and not srv.inbuf


def test_notification_during_a_hidden_query_is_forwarded():
    """A NotificationResponse among a hidden query's replies reaches the session (defect 4); the rest does not."""
    srv = ServerProtocol()
    srv.hidden("capture", "SELECT 1")
    note = notification(4242, b"jobs", b"payload")
    reply = row_description(b"a") + data_row(b"1") + note + command_complete(b"SELECT 1") + rfq()
    out, event = srv.receive(reply)
    assert out == note
    assert event.rows == [("1",)]


def test_notification_split_during_a_hidden_query_is_forwarded_once():
    """Cut at any offset, a notification among hidden replies is forwarded exactly once and whole."""
    note = notification(7, b"ch", b"x" * 50)
    reply = row_description(b"a") + data_row(b"1") + note + command_complete(b"SELECT 1") + rfq()
    for cut in range(1, len(reply)):
        srv = ServerProtocol()
        srv.hidden("capture", "SELECT 1")
        out1, ev1 = srv.receive(reply[:cut])
        out2, ev2 = srv.receive(reply[cut:])
        assert out1 + out2 == note, cut
        assert ev1 is None and isinstance(ev2, HiddenQuery) and ev2.rows == [("1",)], cut


def test_hidden_parameter_status_updates_params_but_not_the_client():
    """A ParameterStatus during a hidden query updates params, is not forwarded, and is not reported as seen."""
    srv = ServerProtocol()
    srv.reported = {}
    srv.hidden("restore", "SELECT 1")
    out, event = srv.receive(parameter_status(b"TimeZone", b"UTC") + command_complete(b"SELECT 1") + rfq())
    assert out == b"" and isinstance(event, HiddenQuery)
    assert srv.params["TimeZone"] == "UTC" and srv.reported == {}


def test_hidden_parse_complete_is_dropped():
    """The ParseComplete of the pooler's own Parse is dropped; the session's own one is forwarded."""
    registry = StatementRegistry(10)
    proto = ClientProtocol(registry)
    first = ServerProtocol()
    proto.receive(parse(b"s", b"SELECT 1") + SYNC, first)
    other = ServerProtocol()
    proto.receive(parse(b"", b"SELECT 2") + bind(b"s") + execute() + SYNC, other)
    assert [getattr(e, "hidden", e) for e in other.pending] == [False, True, None]
    out, event = other.receive(PARSE_COMPLETE + PARSE_COMPLETE + BIND_COMPLETE
                               + command_complete(b"SELECT 1") + rfq())
    assert out == PARSE_COMPLETE + BIND_COMPLETE + command_complete(b"SELECT 1") + rfq()
    assert event is BOUNDARY


def test_cancel_is_routed_only_while_the_owners_work_runs():
    """pending[0] is None only while the owner's own query runs, never during a hidden query."""
    srv = ServerProtocol()
    srv.hidden("restore", "SELECT 1")
    srv.pending.append(None)
    assert isinstance(srv.pending[0], HiddenQuery)
    srv.receive(command_complete(b"SELECT 1"))
    assert isinstance(srv.pending[0], HiddenQuery)     # the restore still runs
    out, event = srv.receive(rfq())
    assert isinstance(event, HiddenQuery) and srv.pending[0] is None   # now the owner's query runs
    srv.receive(command_complete(b"SELECT 1") + rfq())
    assert not srv.pending
    srv.hidden("capture", "SELECT 1")
    assert srv.pending[0] is not None


# ================================================================ errors undo Parses


def test_error_undoes_a_pending_named_parse():
    """An error before a named Parse's ParseComplete releases the session's name and the server's record."""
    registry = StatementRegistry(10)
    proto = ClientProtocol(registry)
    srv = ServerProtocol()
    proto.receive(parse(b"st", b"SELEC 1") + bind(b"st") + execute() + SYNC, srv)
    statement = proto.statements[b"st"]
    reply = error("42601", 'syntax error at or near "SELEC"') + rfq()
    out, event = srv.receive(reply)
    assert out == reply and event is BOUNDARY
    assert b"st" not in proto.statements
    assert statement.name not in srv.prepared and statement.refs == 0
    assert not srv.pending


def test_failed_unnamed_parse_does_not_break_the_connection():
    """A syntax error in an unnamed Parse (any psycopg typo) is forwarded and ends in a boundary."""
    registry = StatementRegistry(10)
    proto = ClientProtocol(registry)
    srv = ServerProtocol()
    proto.receive(parse(b"", b"SELEC 1") + bind(b"") + execute() + SYNC, srv)
    reply = error("42601", 'syntax error at or near "SELEC"') + rfq()
    out, event = srv.receive(reply)
    assert out == reply and event is BOUNDARY and not srv.pending


def test_error_undoes_an_unnamed_parse_of_a_shared_statement():
    """An error skipping the unnamed Parse sent for a text another session prepared releases the session's name."""
    registry = StatementRegistry(10)
    first, second, srv = ClientProtocol(registry), ClientProtocol(registry), ServerProtocol()
    first.receive(parse(b"a", b"SELECT 1") + SYNC, srv)
    srv.receive(PARSE_COMPLETE + rfq())
    second.receive(execute(b"no_portal") + parse(b"b", b"SELECT 1") + SYNC, srv)
    out, event = srv.receive(error("34000", 'portal "no_portal" does not exist') + rfq())
    assert event is BOUNDARY
    assert b"b" not in second.statements
    assert first.statements[b"a"].refs == 1
    assert first.statements[b"a"].name in srv.prepared   # the first session's copy is untouched


def test_error_text_shows_the_clients_statement_name():
    """An error naming pgforkpool.sN reaches the client with its own statement name."""
    registry = StatementRegistry(10)
    proto = ClientProtocol(registry)
    srv = ServerProtocol()
    proto.receive(parse(b"mine", b"SELECT 1") + SYNC, srv)
    srv.receive(PARSE_COMPLETE + rfq())
    proto.receive(parse(b"mine", b"SELECT 1") + SYNC, srv)
    out, event = srv.receive(error("42P05", 'prepared statement "pgforkpool.s1" already exists') + rfq())
    assert b'prepared statement "mine" already exists' in out and b"pgforkpool" not in out
    assert out.endswith(rfq()) and event is BOUNDARY
    assert srv.error_names == {}   # only until the ReadyForQuery


def test_unknown_statement_error_shows_the_clients_name():
    """A Bind of an unknown name errors with the client's name, as PostgreSQL would word it."""
    proto, srv = ClientProtocol(StatementRegistry(10)), ServerProtocol()
    proto.receive(bind(b"nope") + SYNC, srv)
    out, _event = srv.receive(error("26000", 'prepared statement "pgforkpool.missing" does not exist') + rfq())
    assert b'prepared statement "nope" does not exist' in out


def test_unrelated_error_passes_untouched():
    """An error with no statement names to rewrite is forwarded byte for byte."""
    srv = owner_server(1)
    reply = error("22012", "division by zero") + rfq()
    assert srv.receive(reply) == (reply, BOUNDARY)


# ================================================================ notes from replies


def test_reset_tag_holds_the_ready_for_query():
    """After RESET the final ReadyForQuery is held in server.held, not forwarded."""
    srv = owner_server(1)
    out, event = srv.receive(command_complete(b"RESET") + rfq())
    assert out == command_complete(b"RESET") and srv.held == rfq() and event is BOUNDARY
    notes, _xacts = srv.take_notes()
    assert notes & NOTE_RESET and notes & NOTE_SETTINGS


def test_reset_in_a_failed_transaction_is_not_held():
    """A RESET followed by a failed-transaction ReadyForQuery is forwarded (nothing was reset)."""
    srv = owner_server(1)
    data = command_complete(b"RESET") + error("22012", "division by zero") + rfq(b"E")
    out, event = srv.receive(data)
    assert out == data and srv.held == b"" and event is BOUNDARY


def test_discard_all_forgets_prepared_statements():
    """DISCARD ALL clears the connection's prepared statements and unnamed statement, and holds the ReadyForQuery."""
    srv = owner_server(1)
    srv.prepared.add(b"pgforkpool.s1")
    srv.unnamed = Statement(b"", b"SELECT 1\0\0\0")
    out, event = srv.receive(command_complete(b"DISCARD ALL") + rfq())
    assert srv.prepared == set() and srv.unnamed is None and srv.held == rfq()
    notes, _ = srv.take_notes()
    assert notes & NOTE_DISCARDED and notes & NOTE_UNPIN


@pytest.mark.parametrize("tag, note", [
    (b"SET", NOTE_SETTINGS), (b"LISTEN", NOTE_PIN), (b"UNLISTEN", NOTE_UNPIN),
    (b"DECLARE CURSOR", NOTE_PIN), (b"PREPARE", NOTE_PIN), (b"CREATE TABLE", NOTE_PIN),
    (b"DROP TABLE", NOTE_UNPIN | NOTE_STALE), (b"DEALLOCATE", NOTE_UNPIN | NOTE_PIN), (b"LOAD", NOTE_SETTINGS),
    (b"DROP INDEX", 0), (b"ALTER SEQUENCE", 0),
    (b"CLOSE CURSOR", NOTE_UNPIN), (b"COMMIT PREPARED", 0), (b"ALTER TABLE", NOTE_STALE),
    (b"ALTER VIEW", NOTE_STALE), (b"CREATE VIEW", NOTE_STALE), (b"DROP VIEW", NOTE_STALE),
    (b"DROP TYPE", NOTE_STALE), (b"ALTER ROLE", 0), (b"CREATE INDEX", 0), (b"DROPPED", 0),
    (b"SELECT 1", 0), (b"INSERT 0 1", 0), (b"SETTINGS", 0), (b"COMMIT", 0),
    # DO and CALL run statements that send no tags: read back and ask, in case
    (b"DO", NOTE_SETTINGS | NOTE_PIN), (b"CALL", NOTE_SETTINGS | NOTE_PIN), (b"DOT", 0), (b"CALLS", 0),
    # Shorter than the three bytes tags are told apart by: nothing, and no IndexError.
    (b"D", 0), (b"SE", 0), (b"", 0)])
def test_command_tags_note_session_state(tag, note):
    """Command tags that change session state set their NOTE_*; others set none."""
    srv = owner_server(1)
    srv.receive(command_complete(tag) + rfq())
    assert srv.take_notes()[0] == note


def test_prepared_transactions_are_counted():
    """PREPARE TRANSACTION and COMMIT PREPARED move the prepared-transaction count."""
    srv = owner_server(2)
    srv.receive(command_complete(b"PREPARE TRANSACTION") + rfq())
    srv.receive(command_complete(b"PREPARE TRANSACTION") + command_complete(b"COMMIT PREPARED") + rfq())
    assert srv.take_notes()[1] == 1


def test_parameter_status_updates_params_and_reported():
    """ParameterStatus is forwarded, updates params and what the client has seen, and notes a settable change."""
    srv = owner_server(1)
    srv.reported = {}
    data = parameter_status(b"TimeZone", b"Europe/Paris") + command_complete(b"SET") + rfq()
    out, event = srv.receive(data)
    assert out == data and event is BOUNDARY
    assert srv.params["TimeZone"] == "Europe/Paris" and srv.reported["TimeZone"] == "Europe/Paris"
    assert srv.take_notes()[0] & NOTE_SETTINGS


def test_parameter_status_of_a_server_setting_is_not_a_session_change():
    """A ParameterStatus of a setting the session cannot change does not mark its settings dirty."""
    srv = owner_server(1)
    srv.receive(parameter_status(b"server_version", b"17.0") + rfq())
    assert srv.params["server_version"] == "17.0"
    assert srv.take_notes()[0] == 0


def test_placeholder_removed_notice_notes_settings_and_reaches_only_the_session_that_named_it():
    """The 42602 warning (a placeholder setting removed: a library loaded by the owner's statement
    reserved its prefix) marks the settings to be read back, and is passed on only to a session
    that named that setting itself: another session's placeholder, left on the server process,
    is not for the owner to see.  Any other notice passes."""
    import select
    import socket

    from pgforkpool.backend.session import Session
    from pgforkpool.backend.stream import Stream

    ours, peer = socket.socketpair()
    owner = Session(Stream(ours, select.epoll()), 1, {"user": "app", "database": "db"}, StatementRegistry(16))
    removed = notice("42602", 'invalid configuration parameter name "x.Y", removing it')
    other = notice("01000", "something else") + notice("42602", 'a warning about "no_dot"')
    data = removed + other + command_complete(b"DO") + rfq()
    for names, forwarded in (({"x.y"}, data), ({"z.w"}, other + command_complete(b"DO") + rfq()),
                             (set(), other + command_complete(b"DO") + rfq())):
        srv = owner_server(1)
        srv.owner = owner
        owner.context.custom_names = names
        out, event = srv.receive(data)
        assert (bytes(out), event) == (forwarded, BOUNDARY)
        assert srv.take_notes()[0] & NOTE_SETTINGS
    ours.close()
    peer.close()


def test_copy_in_response_marks_copy_in():
    """CopyInResponse sets copy_in; the ReadyForQuery after the COPY clears it."""
    srv = owner_server(1)
    srv.receive(msg(b"G", b"\0\0\0"))
    assert srv.copy_in
    srv.receive(command_complete(b"COPY 1") + rfq())
    assert not srv.copy_in


# ================================================================ streaming


def _stream(srv, data, size=CHUNK):
    outs, events, largest = [], [], 0
    for i in range(0, len(data), size):
        out, event = srv.receive(data[i:i + size])
        outs.append(bytes(out))
        largest = max(largest, len(srv.inbuf))
        if event is not None:
            events.append(event)
    return b"".join(outs), events, largest


@pytest.mark.parametrize("size", [1 * MB, 16 * MB])
def test_large_data_row_is_streamed(size):
    """A large DataRow is passed on as it arrives: output equals input and inbuf stays small."""
    srv = owner_server(1)
    data = row_description(b"big") + data_row(b"z" * size) + command_complete(b"SELECT 1") + rfq()
    out, events, largest = _stream(srv, data)
    assert out == data and events == [BOUNDARY]
    assert largest < 2 * CHUNK


def test_large_copy_data_from_the_server_is_streamed():
    """COPY TO STDOUT data is passed on as it arrives."""
    srv = owner_server(1)
    data = msg(b"H", b"\0\0\0") + msg(b"d", b"q" * (4 * MB)) + msg(b"c") + command_complete(b"COPY 1") + rfq()
    out, events, largest = _stream(srv, data)
    assert out == data and events == [BOUNDARY] and largest < 2 * CHUNK


def test_large_data_row_right_after_a_hidden_reply_is_streamed():
    """A large DataRow that starts in the same read as a hidden query's ReadyForQuery is still streamed, not buffered whole."""
    srv = ServerProtocol()
    srv.hidden("restore", "SELECT 1")
    srv.pending.append(None)
    owner_reply = row_description(b"big") + data_row(b"z" * (4 * MB)) + command_complete(b"SELECT 1") + rfq()
    data = command_complete(b"SELECT 1") + rfq() + owner_reply
    outs, events, largest = [], [], 0
    for i in range(0, len(data), CHUNK):
        out, event = srv.receive(data[i:i + CHUNK])
        while True:
            outs.append(bytes(out))
            largest = max(largest, len(srv.inbuf))
            if event is not None:
                events.append(event)
            if event is None or not srv.inbuf:
                break
            out, event = srv.receive(b"")
    assert b"".join(outs) == owner_reply
    assert isinstance(events[0], HiddenQuery) and events[1:] == [BOUNDARY]
    assert largest < 2 * CHUNK


def test_large_function_call_response_is_passed_on():
    """A FunctionCallResponse larger than the kept-message limit (lo_read through the fastpath) reaches the client, as PostgreSQL allows up to 1 GB."""
    srv = owner_server(1)
    size = srv_mod.MAX_KEPT_MESSAGE + MB
    data = msg(b"V", struct.pack("!i", size) + b"\x07" * size) + rfq()
    out, events, largest = _stream(srv, data)
    assert BROKEN not in events
    assert out == data and events == [BOUNDARY]


# ================================================================ garbage from the server


@pytest.mark.parametrize("data", [b"Z\0\0\0\x02", rfq(b"X"), msg(b"Z")], ids=["length below 4", "bad status byte", "empty ReadyForQuery"])
def test_garbage_breaks_the_connection_without_raising(data):
    """Bytes that are not the protocol give BROKEN, never an exception."""
    srv = owner_server(1)
    out, event = srv.receive(data)
    assert event is BROKEN


@pytest.mark.parametrize("data", [b"Z\0\0\0\x01", rfq(b"?"), msg(b"D", struct.pack("!hi", 1, 100) + b"ab"), msg(b"D", b"\0")],
                         ids=["length below 4", "bad status byte", "overrunning DataRow", "short DataRow"])
def test_garbage_during_a_hidden_query_breaks_without_raising(data):
    """Garbage among a hidden query's replies gives BROKEN, never an exception."""
    srv = ServerProtocol()
    srv.hidden("capture", "SELECT 1")
    events = drain(srv, data + rfq())[1]
    assert BROKEN in events


def test_malformed_error_to_rewrite_breaks_without_raising():
    """An ErrorResponse that cannot be parsed while names are to be rewritten gives BROKEN, not an exception."""
    proto, srv = ClientProtocol(StatementRegistry(10)), ServerProtocol()
    proto.receive(bind(b"nope") + SYNC, srv)
    out, event = srv.receive(msg(b"E", b"Cunterminated") + rfq())
    assert event is BROKEN


def test_oversized_kept_message_breaks():
    """A server message over the kept-message limit that is not streamed breaks the connection early."""
    srv = owner_server(1)
    out, event = srv.receive(b"E" + struct.pack("!I", srv_mod.MAX_KEPT_MESSAGE + 10) + b"x" * 100)
    assert event is BROKEN


def function_call() -> bytes:
    return msg(b"F", struct.pack("!Ihhhh", 1598, 0, 0, 0, 0))


@pytest.mark.parametrize("mixed", [query(b"SELECT 1"), function_call()], ids=["Query", "FunctionCall"])
def test_query_inside_an_unsynced_pipeline_is_refused(mixed):
    """A Query/FunctionCall between unsynced extended messages is refused (client.MIXED_PIPELINE).

    PostgreSQL would skip it after an error in the pipeline and send no reply
    for it; the pooler could not count replies then, so it ends that session
    instead of letting it stall the shared connection.  What came before is
    still forwarded, and the replies it earns end in a boundary after the
    vanished-client Sync.
    """
    proto, srv = ClientProtocol(StatementRegistry(10)), ServerProtocol()
    out, outcome = proto.receive(parse(b"", b"SELEC 1") + bind(b"") + mixed + SYNC, srv)
    assert isinstance(outcome, ProtocolViolation) and outcome.text == client_mod.MIXED_PIPELINE
    assert out == parse(b"", b"SELEC 1") + bind(b"")
    srv.pending.append(None)   # what _client_gone adds with its Sync
    srv.unsynced = False
    reply = error("42601", 'syntax error at or near "SELEC"') + rfq()
    out, event = srv.receive(reply)
    assert event is BOUNDARY and not srv.pending


# ================================================================ a vanished client


@pytest.mark.parametrize("status", [b"I", b"E"])
def test_vanished_client_pipeline_ends_in_a_boundary(status):
    """As pooled._client_gone does: an unsynced pipeline gets ABORT_PIPELINE + Sync, and its replies end in BOUNDARY."""
    registry = StatementRegistry(10)
    proto, srv = ClientProtocol(registry), ServerProtocol()
    out, outcome = proto.receive(parse(b"", b"SELECT 1") + bind(b"") + execute(), srv)
    assert outcome is None and srv.unsynced
    # What _client_gone does with an unsynced pipeline.
    srv.pending.append(None)
    srv.unsynced = False
    # ABORT_PIPELINE is a well-formed Execute: the pooler's own client framing accepts it.
    checker = ClientProtocol(registry)
    assert checker.receive(ABORT_PIPELINE + SYNC, ServerProtocol()) == (ABORT_PIPELINE + SYNC, None)
    replies = (PARSE_COMPLETE + BIND_COMPLETE + data_row(b"1") + command_complete(b"SELECT 1")
               + error("34000", 'portal "pgforkpool.abort" does not exist') + rfq(status))
    out, events = drain(srv, replies)
    assert events == [BOUNDARY]
    assert srv.status == TransactionStatus(status[0])
    assert not srv.pending and not srv.unsynced


def test_vanished_client_with_work_running_ends_in_a_boundary():
    """A vanished client's running query (cancelled) then its Sync: the boundary comes after the last ReadyForQuery."""
    registry = StatementRegistry(10)
    proto, srv = ClientProtocol(registry), ServerProtocol()
    proto.receive(query(b"SELECT pg_sleep(100)") + parse(b"", b"SELECT 2") + bind(b""), srv)
    assert srv.pending[0] is None   # a cancel may be sent
    srv.pending.append(None)
    srv.unsynced = False
    replies = (error("57014", "canceling statement due to user request") + rfq()
               + PARSE_COMPLETE + BIND_COMPLETE + error("34000", "portal does not exist") + rfq())
    out, events = drain(srv, replies)
    assert events == [BOUNDARY] and not srv.pending


def test_a_changed_result_type_is_noted():
    """0A000 (cached plan must not change result type, in any lc_messages): NOTE_STALE, so the
    backend gives new Parses statements of their own, and NOTE_OUTDATED, so that sessions'
    statements are prepared afresh; other errors note nothing."""
    srv = owner_server(1)
    srv.receive(error("0A000", "cached plan must not change result type") + rfq())
    assert srv.take_notes()[0] == NOTE_STALE | NOTE_OUTDATED
    srv = owner_server(1)
    srv.receive(error("42P01", 'relation "t" does not exist') + rfq())
    assert srv.take_notes()[0] == 0


# ================================================================ a Flush after statements only (asyncpg's prepare)

PARAMETER_DESCRIPTION = msg(b"t", struct.pack("!hI", 1, 23))


def _flushed_prepare(server: ServerProtocol, proto: ClientProtocol, name: bytes = b"s") -> bytes:
    out, outcome = proto.receive(parse(name, b"SELECT $1::int") + msg(b"D", b"S" + name + b"\0") + msg(b"H"),
                                 server)
    assert outcome is None
    return out


def test_flushed_statements_answered_whole_let_the_pooler_sync():
    """Parse, Describe, Flush (asyncpg's prepare): once every reply came without an error the
    event FLUSHED lets the pooler send a Sync of its own, whose ReadyForQuery the client does not
    get, and the connection is at a boundary."""
    proto, server = ClientProtocol(StatementRegistry(10)), ServerProtocol()
    _flushed_prepare(server, proto)
    replies = PARSE_COMPLETE + PARAMETER_DESCRIPTION + row_description(b"int4")
    out, events = drain(server, replies)
    assert out == replies and events == [srv_mod.FLUSHED]
    assert server.sync_after_flush() == protocol.SYNC_MESSAGE
    assert not server.unsynced
    out, events = drain(server, rfq())
    assert out == b"" and events == [BOUNDARY]


@pytest.mark.parametrize("then", ["bind", "sync", "error"])
def test_no_sync_of_the_poolers_own_when_a_portal_or_an_error_may_follow(then):
    """A Bind (a portal the Sync would close), the client's own Sync, or an error (the server
    skips until the client's Sync): sync_after_flush declines (after an error or the client's
    Sync there is no FLUSHED at all)."""
    proto, server = ClientProtocol(StatementRegistry(10)), ServerProtocol()
    _flushed_prepare(server, proto)
    if then == "bind":
        proto.receive(bind(b"s") + msg(b"H"), server)
        replies = PARSE_COMPLETE + PARAMETER_DESCRIPTION + row_description(b"int4") + BIND_COMPLETE
    elif then == "sync":
        proto.receive(SYNC, server)
        replies = PARSE_COMPLETE + PARAMETER_DESCRIPTION + row_description(b"int4")
    else:
        replies = error("42601", "syntax error")
    _out, events = drain(server, replies)
    assert then == "bind" or srv_mod.FLUSHED not in events
    assert server.sync_after_flush() == b""


def test_replies_of_a_query_sent_before_the_batch_are_not_counted():
    """A Query still answered when the Parse and Describe came: its RowDescription is not the
    Describe's, so the batch is not counted at all."""
    proto, server = ClientProtocol(StatementRegistry(10)), ServerProtocol()
    proto.receive(query(b"SELECT 1"), server)
    _flushed_prepare(server, proto)
    _out, events = drain(server, select_reply((b"1",)) + rfq() + PARSE_COMPLETE + PARAMETER_DESCRIPTION
                         + row_description(b"int4"))
    assert srv_mod.FLUSHED not in events and server.unsynced
