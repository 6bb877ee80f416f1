"""Property-based fuzzing of the sans-IO protocol objects: arbitrary, valid and mutated byte streams, in arbitrary chunks."""

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgforkpool.backend.client import (MAY_SET, TERMINATE, ClientProtocol, may_touch_state, mentions_state_words,
                                      nul_at, text_flags)
from pgforkpool.backend.server import BOUNDARY, BROKEN, HiddenQuery, ServerProtocol
from pgforkpool.backend.statements import ProtocolViolation, StatementRegistry

# Derandomized (the same examples every run: a failure is reproducible, never flaky) and no example
# database written into the working tree.
FUZZ = settings(deadline=None, max_examples=300, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FEW = settings(FUZZ, max_examples=1000)


def msg(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


# ================================================================ frontend messages

names = st.sampled_from([b"", b"a", b"b", b"stmt", b"pgforkpool.s1", "é".encode()])
statement_texts = st.one_of(
    st.sampled_from([b"SELECT 1", b"SELECT $1::int", b"SELECT set_config('myapp.t', $1, false)",
                     b"CREATE TEMP TABLE t (x int)", b"SELECT pg_advisory_lock(1)", b"SET x.y = 1",
                     b"RESET ALL", b"DISCARD ALL", b"BEGIN", b"COMMIT"]),
    st.binary(max_size=40).map(lambda b: b.replace(b"\0", b" ")))
oids = st.lists(st.integers(0, 2**32 - 1), max_size=3)
formats = st.lists(st.integers(-2, 2), max_size=3)
values = st.lists(st.one_of(st.none(), st.binary(max_size=20)), max_size=3)


def query_msg(text):
    return msg(b"Q", text + b"\0")


def parse_msg(name, text, types):
    return msg(b"P", name + b"\0" + text + b"\0" + struct.pack("!h", len(types))
               + b"".join(struct.pack("!I", t) for t in types))


def bind_msg(portal, name, fmts, params, result_fmts):
    body = portal + b"\0" + name + b"\0" + struct.pack("!h", len(fmts))
    body += b"".join(struct.pack("!h", f) for f in fmts) + struct.pack("!h", len(params))
    for value in params:
        body += struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value
    body += struct.pack("!h", len(result_fmts)) + b"".join(struct.pack("!h", f) for f in result_fmts)
    return msg(b"B", body)


def function_call_msg(oid, fmts, args, result_fmt):
    body = struct.pack("!Ih", oid, len(fmts)) + b"".join(struct.pack("!h", f) for f in fmts)
    body += struct.pack("!h", len(args))
    for value in args:
        body += struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value
    return msg(b"F", body + struct.pack("!h", result_fmt))


portals = st.sampled_from([b"", b"p1", b"cur"])
SYNC, FLUSH, COPY_DONE, TERM = msg(b"S"), msg(b"H"), msg(b"c"), msg(b"X")

frontend_message = st.one_of(
    st.builds(query_msg, statement_texts),
    st.builds(parse_msg, names, statement_texts, oids),
    st.builds(bind_msg, portals, names, formats, values, formats),
    st.builds(lambda k, n: msg(b"D", k + n + b"\0"), st.sampled_from([b"S", b"P"]), names),
    st.builds(lambda p, n: msg(b"E", p + b"\0" + struct.pack("!i", n)), portals, st.integers(0, 100)),
    st.builds(lambda k, n: msg(b"C", k + n + b"\0"), st.sampled_from([b"S", b"P"]), names),
    st.just(SYNC), st.just(FLUSH),
    st.builds(lambda d: msg(b"d", d), st.binary(max_size=30)),
    st.just(COPY_DONE),
    st.builds(lambda t: msg(b"f", t + b"\0"), st.binary(max_size=20).map(lambda b: b.replace(b"\0", b""))),
    st.builds(function_call_msg, st.integers(0, 2**32 - 1), formats, values, st.integers(0, 1)),
)


def synced(stream: list) -> list:
    """The stream with a Sync before each Query or FunctionCall that follows unsynced extended messages,
    and a CopyDone before a Sync that follows CopyData sent after an Execute (no server reply between).

    PostgreSQL accepts both; the pooler refuses them (client.MIXED_PIPELINE, and "Sync between
    CopyData messages": whether the server ignores that Sync in copy-in mode or answers it after a
    failed row cannot be told), so valid streams for the pooler do not have them.
    """
    out, unsynced = [], False
    executed = early = ended = False
    for message in stream:
        kind = message[:1]
        if kind in (b"Q", b"F"):
            if unsynced:
                if executed and early and not ended:
                    out.append(COPY_DONE)
                out.append(SYNC)
                unsynced = False
            executed = early = ended = False
        elif kind in (b"P", b"B", b"D", b"E", b"C"):
            unsynced = True
            if kind == b"E":
                executed, early, ended = True, False, False
        elif kind == b"S":
            unsynced = False
            if executed and early and not ended:
                out.append(COPY_DONE)
                ended = True
        elif kind == b"d":
            if executed and not ended:
                early = True
        elif kind in (b"c", b"f"):
            if executed:
                ended = True
        out.append(message)
    return out


frontend_streams = st.lists(frontend_message, min_size=1, max_size=25).map(synced)

# Unnamed statements only, parsed before any Bind or Describe, nothing that drops the unnamed statement.
unnamed_message = st.one_of(
    st.builds(parse_msg, st.just(b""), statement_texts, oids),
    st.builds(bind_msg, portals, st.just(b""), formats, values, formats),
    st.builds(lambda k: msg(b"D", k + b"\0"), st.sampled_from([b"S", b"P"])),
    st.builds(lambda p, n: msg(b"E", p + b"\0" + struct.pack("!i", n)), portals, st.integers(0, 100)),
    st.builds(lambda p: msg(b"C", b"P" + p + b"\0"), portals),
    st.just(SYNC), st.just(FLUSH),
    st.builds(lambda d: msg(b"d", d), st.binary(max_size=30)),
    st.just(COPY_DONE),
    st.builds(function_call_msg, st.integers(0, 2**32 - 1), formats, values, st.integers(0, 1)),
)
unnamed_streams = st.builds(lambda first, rest: [first] + rest,
                            st.builds(parse_msg, st.just(b""), statement_texts, oids),
                            st.lists(unnamed_message, max_size=20)).map(synced)


# ================================================================ chunking and mutation

@st.composite
def chunked(draw, data: bytes):
    """data cut at random offsets (empty chunks included)."""
    if not data:
        return [b""]
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    bounds = [0] + cuts + [len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def message_offsets(messages):
    offsets, pos = [], 0
    for message in messages:
        offsets.append(pos)
        pos += len(message)
    return offsets


@st.composite
def mutated(draw, messages):
    """The concatenated messages with a few mutations: flipped bytes, truncation, inserted bytes, changed lengths."""
    data = bytearray(b"".join(messages))
    offsets = message_offsets(messages)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "length", "type"]))
        if kind == "flip" and data:
            pos = draw(st.integers(0, len(data) - 1))
            data[pos] ^= draw(st.integers(1, 255))
        elif kind == "truncate" and data:
            del data[draw(st.integers(0, len(data) - 1)):]
        elif kind == "insert":
            pos = draw(st.integers(0, len(data)))
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "length" and offsets:
            pos = draw(st.sampled_from(offsets)) + 1
            if pos + 4 <= len(data):
                length = draw(st.one_of(st.integers(0, 8), st.integers(0, 2**32 - 1),
                                        st.just((struct.unpack_from("!I", data, pos)[0] + 1) & 0xFFFFFFFF),
                                        st.just(max(0, struct.unpack_from("!I", data, pos)[0] - 1))))
                struct.pack_into("!I", data, pos, length)
        elif kind == "type" and offsets:
            pos = draw(st.sampled_from(offsets))
            if pos < len(data):
                data[pos] = draw(st.integers(0, 255))
    return bytes(data)


def run_client(chunks, proto=None, srv=None):
    """Feed chunks to a fresh ClientProtocol until an outcome; (output, outcome, proto, server)."""
    proto = proto or ClientProtocol(StatementRegistry(4))
    srv = srv or ServerProtocol()
    out = []
    for chunk in chunks:
        data, outcome = proto.receive(chunk, srv)
        assert isinstance(data, (bytes, bytearray, memoryview))
        out.append(bytes(data))
        assert outcome is None or outcome is TERMINATE or isinstance(outcome, ProtocolViolation)
        if outcome is not None:
            return b"".join(out), outcome, proto, srv
    return b"".join(out), None, proto, srv


# ================================================================ (a) arbitrary bytes to the client side


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=10))
def test_arbitrary_client_bytes_never_raise(chunks):
    """Arbitrary bytes in arbitrary chunks: receive() returns bytes and an outcome, never raises."""
    run_client(chunks)


@FUZZ
@given(st.sampled_from([b"Q", b"P", b"B", b"D", b"C", b"E", b"S", b"H", b"d", b"c", b"f", b"F", b"X"]),
       st.lists(st.binary(max_size=64), min_size=1, max_size=10))
def test_known_type_with_arbitrary_rest_never_raises(first, chunks):
    """A frontend type byte followed by arbitrary bytes (deeper than the header check) never raises."""
    chunks[0] = first + chunks[0]
    run_client(chunks)


# ================================================================ (b) valid and mutated frontend streams


@FUZZ
@given(st.data(), frontend_streams)
def test_valid_stream_has_no_violation_and_chunking_does_not_matter(data, messages):
    """A valid frontend stream gives no violation, and any chunking gives the output and pending of feeding it whole."""
    stream = b"".join(messages)
    whole_out, whole_outcome, _p, whole_srv = run_client([stream])
    assert whole_outcome is None
    chunks = data.draw(chunked(stream))
    out, outcome, proto, srv = run_client(chunks)
    assert outcome is None
    assert out == whole_out
    assert len(srv.pending) == len(whole_srv.pending)
    assert [e is None for e in srv.pending] == [e is None for e in whole_srv.pending]
    assert not proto.buf and not proto.passthrough


@FUZZ
@given(st.data(), frontend_streams)
def test_valid_stream_then_terminate(data, messages):
    """A valid stream ending with Terminate gives TERMINATE and everything before it (in any chunking)."""
    stream = b"".join(messages)
    whole_out, _o, _p, _s = run_client([stream])
    out, outcome, _proto, _srv = run_client(data.draw(chunked(stream + TERM + SYNC)))
    assert outcome is TERMINATE
    assert out == whole_out


@FUZZ
@given(st.data(), unnamed_streams)
def test_unnamed_only_stream_passes_untouched(data, messages):
    """With only unnamed statements, parsed before use, the output equals the input in any chunking."""
    stream = b"".join(messages)
    out, outcome, _proto, _srv = run_client(data.draw(chunked(stream)))
    assert outcome is None
    assert out == stream


@FUZZ
@given(st.data(), frontend_streams)
def test_mutated_stream_never_raises(data, messages):
    """Mutated valid streams (flipped bytes, truncation, insertions, bad lengths or types) never raise."""
    stream = data.draw(mutated(messages))
    run_client(data.draw(chunked(stream)))


@FUZZ
@given(st.data(), frontend_streams)
def test_mutated_stream_chunking_does_not_matter(data, messages):
    """Whole or in chunks, a mutated stream gives the same outcome and output (a message cut off at the end may wait)."""
    stream = data.draw(mutated(messages))
    whole_out, whole_outcome, _p, _s = run_client([stream])
    out, outcome, proto, _s = run_client(data.draw(chunked(stream)))
    assert type(outcome) is type(whole_outcome)
    if isinstance(outcome, ProtocolViolation):
        assert outcome.text == whole_outcome.text
    if outcome is not None or (not proto.buf and not proto.passthrough):
        assert out == whole_out
    else:   # a last message that has not arrived whole may be held back longer in chunks
        assert whole_out.startswith(out)


# ================================================================ (c) server replies


def be_msg(kind: bytes, body: bytes = b"") -> bytes:
    return msg(kind, body)


def data_row(cols):
    body = struct.pack("!h", len(cols))
    for value in cols:
        body += struct.pack("!i", -1) if value is None else struct.pack("!i", len(value)) + value
    return be_msg(b"D", body)


def row_description(names_):
    body = struct.pack("!h", len(names_))
    for name in names_:
        body += name + b"\0" + struct.pack("!ihihih", 0, 0, 25, -1, -1, 0)
    return be_msg(b"T", body)


def error_fields(code, sqlstate, text):
    return be_msg(code, b"SERROR\0VERROR\0C" + sqlstate + b"\0M" + text + b"\0\0")


cstr_text = st.binary(max_size=30).map(lambda b: b.replace(b"\0", b""))
tags = st.sampled_from([b"SELECT 1", b"INSERT 0 1", b"SET", b"RESET", b"DISCARD ALL", b"DISCARD TEMP",
                        b"LISTEN", b"UNLISTEN", b"DEALLOCATE ALL", b"PREPARE TRANSACTION",
                        b"COMMIT PREPARED", b"ROLLBACK PREPARED", b"CREATE TABLE", b"BEGIN", b"LOAD"])
server_names = st.sampled_from([b"pgforkpool.s1", b"pgforkpool.missing", b"x"])

backend_message = st.one_of(
    st.sampled_from([be_msg(b"1"), be_msg(b"2"), be_msg(b"3"), be_msg(b"n"), be_msg(b"I"), be_msg(b"s"),
                     be_msg(b"c"), be_msg(b"G", b"\0\0\0"), be_msg(b"H", b"\0\0\0"), be_msg(b"W", b"\0\0\0")]),
    st.builds(lambda s: be_msg(b"Z", s), st.sampled_from([b"I", b"T", b"E"])),
    st.builds(row_description, st.lists(cstr_text, max_size=3)),
    st.builds(data_row, st.lists(st.one_of(st.none(), st.binary(max_size=20)), max_size=3)),
    st.builds(lambda t: be_msg(b"C", t + b"\0"), tags),
    st.builds(error_fields, st.just(b"E"), st.sampled_from([b"42601", b"26000", b"42P05", b"57014"]),
              st.one_of(cstr_text, server_names.map(lambda n: b'prepared statement "' + n + b'" does not exist'))),
    st.builds(error_fields, st.just(b"N"), st.sampled_from([b"01000", b"42602"]), cstr_text),
    st.builds(lambda n, v: be_msg(b"S", n + b"\0" + v + b"\0"),
              st.sampled_from([b"TimeZone", b"application_name", b"server_version", b"is_superuser"]), cstr_text),
    st.builds(lambda p, c, d: be_msg(b"A", struct.pack("!i", p) + c + b"\0" + d + b"\0"),
              st.integers(-2**31, 2**31 - 1), cstr_text, cstr_text),
    st.builds(lambda d: be_msg(b"d", d), st.binary(max_size=30)),
    st.builds(lambda d: be_msg(b"V", struct.pack("!i", len(d)) + d), st.binary(max_size=20)),
    st.builds(lambda ts: be_msg(b"t", struct.pack("!h", len(ts)) + b"".join(struct.pack("!I", t) for t in ts)),
              st.lists(st.integers(0, 2**32 - 1), max_size=3)),
)

server_action = st.one_of(
    st.tuples(st.just("data"), st.lists(backend_message, min_size=1, max_size=8)),
    st.tuples(st.just("hidden"), st.sampled_from(["restore", "capture", "pin check", "rollback"])),
    st.tuples(st.just("owner"), st.integers(1, 3)),
    st.tuples(st.just("names"), server_names),
    st.tuples(st.just("unsynced"), st.booleans()),
)


def check_event(srv, event):
    assert event is None or event is BOUNDARY or event is BROKEN or isinstance(event, HiddenQuery)
    if event is BOUNDARY:
        assert not srv.pending and not srv.unsynced
    if isinstance(event, HiddenQuery):
        assert event not in srv.pending


def server_feed(srv, chunk) -> bool:
    """receive(chunk), then receive(b"") while an event left input; False once the connection broke."""
    out, event = srv.receive(chunk)
    while True:
        assert isinstance(out, (bytes, bytearray, memoryview))
        check_event(srv, event)
        if event is BROKEN:
            return False
        if event is None or not srv.inbuf:
            return True
        out, event = srv.receive(b"")


def run_server_actions(data, actions, mutate: bool, srv=None):
    srv = srv or ServerProtocol()
    for action, arg in actions:
        if action == "data":
            stream = data.draw(mutated(arg)) if mutate else b"".join(arg)
            for chunk in data.draw(chunked(stream)):
                if not server_feed(srv, chunk):
                    return srv
        elif action == "hidden":
            sent = srv.hidden(arg, "SELECT 1")
            assert sent.startswith(b"Q")
        elif action == "owner":
            srv.pending.extend([None] * arg)
        elif action == "names":
            srv.error_names[arg] = b"client name"
        else:
            srv.unsynced = arg
    return srv


@FUZZ
@given(st.data(), st.lists(server_action, min_size=1, max_size=12))
def test_valid_server_replies_never_raise(data, actions):
    """Valid backend messages in random chunks, with hidden queries and owner work queued between, never raise."""
    run_server_actions(data, actions, mutate=False)


@FUZZ
@given(st.data(), st.lists(server_action, min_size=1, max_size=12))
def test_mutated_server_replies_never_raise(data, actions):
    """Mutated backend messages in random chunks give BROKEN at worst, never an exception."""
    run_server_actions(data, actions, mutate=True)


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=10), st.integers(0, 3), st.booleans())
def test_arbitrary_server_bytes_never_raise(chunks, owner, hidden_first):
    """Arbitrary bytes from the server never raise, whatever is pending."""
    srv = ServerProtocol()
    if hidden_first:
        srv.hidden("capture", "SELECT 1")
    srv.pending.extend([None] * owner)
    for chunk in chunks:
        if not server_feed(srv, chunk):
            break


plain_backend_message = st.one_of(
    st.sampled_from([be_msg(b"1"), be_msg(b"2"), be_msg(b"3"), be_msg(b"n"), be_msg(b"I"), be_msg(b"s")]),
    st.builds(row_description, st.lists(cstr_text, max_size=3)),
    st.builds(data_row, st.lists(st.one_of(st.none(), st.binary(max_size=20)), max_size=3)),
    st.builds(lambda t: be_msg(b"C", t + b"\0"), st.sampled_from([b"SELECT 1", b"SET", b"LISTEN", b"BEGIN"])),
    st.builds(error_fields, st.just(b"E"), st.just(b"42601"), cstr_text),
    st.builds(error_fields, st.just(b"N"), st.just(b"01000"), cstr_text),
    st.builds(lambda p, c, d: be_msg(b"A", struct.pack("!i", p) + c + b"\0" + d + b"\0"),
              st.integers(0, 1000), cstr_text, cstr_text),
)


@FUZZ
@given(st.data(), st.lists(st.tuples(st.lists(plain_backend_message, max_size=6),
                                     st.sampled_from([b"I", b"T", b"E"])), min_size=1, max_size=4))
def test_owner_replies_pass_untouched_with_one_boundary(data, groups):
    """Replies to the owner's own work (no hidden query, no names to rewrite, no RESET) pass byte for byte; one BOUNDARY at the end."""
    srv = ServerProtocol()
    srv.pending.extend([None] * len(groups))
    stream = b"".join(b"".join(group) + be_msg(b"Z", status) for group, status in groups)
    outs, events = [], []
    for chunk in data.draw(chunked(stream)):
        out, event = srv.receive(chunk)
        outs.append(bytes(out))
        if event is not None:
            events.append(event)
    assert b"".join(outs) == stream
    assert events == [BOUNDARY]


@FUZZ
@given(st.data(), frontend_streams, st.lists(backend_message, min_size=1, max_size=20))
def test_server_replies_after_a_real_client_pipeline_never_raise(data, messages, replies):
    """With pending built by a real ClientProtocol (Parse entries included), any backend replies never raise."""
    proto = ClientProtocol(StatementRegistry(4))
    srv = ServerProtocol()
    _out, outcome = proto.receive(b"".join(messages), srv)
    assert outcome is None
    srv.unsynced = False
    for chunk in data.draw(chunked(b"".join(replies))):
        if not server_feed(srv, chunk):
            break


# ================================================================ (d) the waiting buffer


def run_buffer(chunks, srv=None):
    """As pooled does: buffer() while waiting, then receive() once ready; never raises."""
    proto = ClientProtocol(StatementRegistry(4))
    srv = srv or ServerProtocol()
    owning = False
    for chunk in chunks:
        if not owning:
            ready = proto.buffer(chunk)
            assert ready is True or ready is False or isinstance(ready, ProtocolViolation)
            if isinstance(ready, ProtocolViolation):
                return ready
            if ready:
                owning = True
                _out, outcome = proto.receive(b"", srv)
                if outcome is not None:
                    return outcome
        else:
            _out, outcome = proto.receive(chunk, srv)
            if outcome is not None:
                return outcome
    return None


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=10))
def test_buffer_of_arbitrary_bytes_never_raises(chunks):
    """buffer() of arbitrary bytes returns True, False or a ProtocolViolation, and the later receive() never raises."""
    run_buffer(chunks)


@FUZZ
@given(st.data(), frontend_streams)
def test_buffer_of_mutated_streams_never_raises(data, messages):
    """buffer() then receive() of mutated valid streams never raises."""
    run_buffer(data.draw(chunked(data.draw(mutated(messages)))))


@FUZZ
@given(st.data(), frontend_streams)
def test_buffer_of_valid_streams_gives_no_violation(data, messages):
    """buffer() then receive() of a valid stream gives no violation."""
    assert run_buffer(data.draw(chunked(b"".join(messages)))) is None


# ================================================================ (e) sessions sharing one connection, against a model of PostgreSQL


def _error(sqlstate: bytes, text: bytes) -> bytes:
    return be_msg(b"E", b"SERROR\0VERROR\0C" + sqlstate + b"\0M" + text + b"\0\0")


class FakePostgres:
    """PostgreSQL's statement rules over the frontend protocol (as checked on PostgreSQL 15), enough to see what each Bind runs.

    A Parse whose text contains BAD fails.  After an error in extended mode
    everything up to Sync is skipped.  A simple Query and a failed unnamed
    Parse drop the unnamed statement; a skipped Parse leaves it.
    """

    def __init__(self):
        self.prepared: dict[bytes, bytes] = {}
        self.unnamed: bytes | None = None
        self.skipping = False

    def feed(self, data: bytes):
        """(replies, statements run): the key of each Bind or Describe S that found its statement."""
        replies, ran, pos = [], [], 0
        while pos < len(data):
            kind = data[pos:pos + 1]
            length = struct.unpack_from("!I", data, pos + 1)[0]
            body = data[pos + 5:pos + 1 + length]
            pos += 1 + length
            if kind == b"S":
                self.skipping = False
                replies.append(be_msg(b"Z", b"I"))
                continue
            if self.skipping:
                continue
            if kind == b"Q":
                self.unnamed = None
                for name in body.split(b'DEALLOCATE "')[1:]:
                    self.prepared.pop(name[:name.index(b'"')], None)
                replies.append(_error(b"42601", b"syntax error") if b"BAD" in body
                               else be_msg(b"C", b"SELECT 1\0"))
                replies.append(be_msg(b"Z", b"I"))
            elif kind == b"P":
                name, key = body.split(b"\0", 1)
                if name and name in self.prepared:
                    self._fail(replies, b"42P05", b'prepared statement "' + name + b'" already exists')
                elif b"BAD" in key:
                    if not name:
                        self.unnamed = None
                    self._fail(replies, b"42601", b"syntax error")
                else:
                    if name:
                        self.prepared[name] = key
                    else:
                        self.unnamed = key
                    replies.append(be_msg(b"1"))
            elif kind in (b"B", b"D") and (kind == b"B" or body[:1] == b"S"):
                if kind == b"B":
                    portal_end = body.index(b"\0")
                    name = body[portal_end + 1:body.index(b"\0", portal_end + 1)]
                else:
                    name = body[1:-1]
                key = self.prepared.get(name) if name else self.unnamed
                if key is None:
                    self._fail(replies, b"26000", b"prepared statement does not exist")
                else:
                    ran.append((kind, key))
                    replies.append(be_msg(b"2") if kind == b"B" else be_msg(b"t", b"\0\0") + be_msg(b"n"))
            elif kind == b"D":
                replies.append(be_msg(b"n"))
            elif kind == b"E":
                replies.append(be_msg(b"C", b"SELECT 1\0"))
            elif kind == b"C":
                if body[:1] == b"S":
                    if body[1:-1]:
                        self.prepared.pop(body[1:-1], None)
                    else:
                        self.unnamed = None
                replies.append(be_msg(b"3"))
        return b"".join(replies), ran

    def _fail(self, replies, sqlstate: bytes, text: bytes) -> None:
        replies.append(_error(sqlstate, text))
        self.skipping = True


def summary(data: bytes):
    """Message types of a reply stream, with the SQLSTATE of each error."""
    out, pos = [], 0
    while pos < len(data):
        kind = data[pos:pos + 1]
        length = struct.unpack_from("!I", data, pos + 1)[0]
        body = data[pos + 5:pos + 1 + length]
        out.append((kind, body[body.index(b"\0C") + 2:][:5]) if kind == b"E" else kind)
        pos += 1 + length
    return out


model_names = st.sampled_from([b"", b"a", b"b"])
model_texts = st.sampled_from([b"SELECT 1", b"SELECT 2", b"BAD 3"])
model_op = st.one_of(
    st.builds(parse_msg, model_names, model_texts, st.just([])),
    st.builds(lambda n: bind_msg(b"", n, [], [], []), st.sampled_from([b"", b"a", b"b", b"c"])),
    st.builds(lambda n: msg(b"D", b"S" + n + b"\0"), model_names),
    st.builds(lambda n: msg(b"C", b"S" + n + b"\0"), model_names),
    st.just(msg(b"E", b"\0\0\0\0\0")),
    st.just(FLUSH),
)
round_trip = st.tuples(
    st.integers(0, 2),                    # the session
    st.booleans(),                        # its context is restored first (a hidden simple Query)
    st.one_of(st.lists(model_op, min_size=1, max_size=6).map(lambda ops: b"".join(ops) + SYNC),
              st.builds(query_msg, st.sampled_from([b"SELECT 9", b"BAD"]))),
)


def run_shared(trips, cache_size):
    """Drive sessions over one ServerProtocol and a FakePostgres, each also over a FakePostgres of its own.

    Yields, per round trip: (statements the shared server ran, those its own
    connection runs, replies the client got, replies its own connection gives,
    every statement key the session has parsed so far).
    """
    registry = StatementRegistry(cache_size)
    srv, shared = ServerProtocol(), FakePostgres()
    sessions = [ClientProtocol(registry) for _ in range(3)]
    own = [FakePostgres() for _ in range(3)]
    parsed = [set() for _ in range(3)]
    for sid, restore, stream in trips:
        proto = sessions[sid]
        pos = 0
        while pos < len(stream):
            length = struct.unpack_from("!I", stream, pos + 1)[0]
            if stream[pos:pos + 1] == b"P":
                parsed[sid].add(stream[pos + 5:pos + 1 + length].split(b"\0", 1)[1])
            pos += 1 + length
        before = b""
        # As pooled._activate: evicted statements are deallocated, the context restored.
        names = [name for name in registry.evicted if name in srv.prepared]
        registry.evicted.clear()
        if names:
            srv.prepared.difference_update(names)
            before += srv.hidden("deallocate", "; ".join(f'DEALLOCATE "{n.decode()}"' for n in names))
        if restore:
            before += srv.hidden("restore", "SELECT 1")
        out, outcome = proto.receive(stream, srv)
        assert outcome is None
        replies, ran = shared.feed(before + out)
        expected, expected_ran = own[sid].feed(stream)
        got, events = [], []
        data = replies
        while True:
            piece, event = srv.receive(data)
            data = b""
            got.append(bytes(piece))
            if event is not None:
                events.append(event)
            if event is None or event is BROKEN or not srv.inbuf:
                break
        assert events and events[-1] is BOUNDARY and not srv.pending
        yield ran, expected_ran, b"".join(got), expected, parsed[sid]


@FEW
@given(st.lists(round_trip, min_size=1, max_size=12), st.integers(0, 2))
def test_shared_connection_never_runs_a_statement_the_session_did_not_prepare(trips, cache_size):
    """Every Bind/Describe the shared server runs for a session is of a statement text that session parsed itself."""
    for ran, _expected_ran, _got, _expected, parsed in run_shared(trips, cache_size):
        for _kind, key in ran:
            assert key in parsed


@FEW
@given(st.lists(round_trip, min_size=1, max_size=12), st.integers(0, 2))
def test_shared_connection_answers_as_the_sessions_own_connection(trips, cache_size):
    """The client gets the replies (types and SQLSTATEs) and statements its own connection would give."""
    for ran, expected_ran, got, expected, _parsed in run_shared(trips, cache_size):
        assert summary(got) == summary(expected)
        assert ran == expected_ran


# ================================================================ the byte loops of the compiled hot path

_WORDS = [b"set_config", b"temp", b"advisory", b"pg_settings", b"settings"]


def _cased(word: bytes, mask: int) -> bytes:
    return bytes(c - 32 if mask >> i & 1 and 97 <= c <= 122 else c for i, c in enumerate(word))


@st.composite
def texts_with_words(draw):
    """Arbitrary bytes with the state words, in any case and cut anywhere, spliced in."""
    parts = []
    for _ in range(draw(st.integers(0, 4))):
        parts.append(draw(st.binary(max_size=12)))
        word = _cased(draw(st.sampled_from(_WORDS)), draw(st.integers(0, 1023)))
        parts.append(word[:draw(st.integers(1, len(word)))])
    parts.append(draw(st.binary(max_size=12)))
    return b"".join(parts)


@settings(max_examples=3000, deadline=None)
@given(texts_with_words(), st.data())
def test_mentions_state_words_agrees_with_may_touch_state(text, data):
    """The byte loop that spots set_config/temp/advisory/pg_settings in a short Query (compiled build) says
    exactly what the lower-cased searches say, for any slice of any text: missing one would let
    a session's setting reach the next session on the connection."""
    start = data.draw(st.integers(0, len(text)))
    end = data.draw(st.integers(start, len(text)))
    assert mentions_state_words(text, start, end) == may_touch_state(text[start:end])


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200).map(lambda b: b.replace(b"\0", b"x")), st.lists(st.integers(0, 199), max_size=3),
       st.data())
def test_nul_at_agrees_with_find(text, nuls, data):
    """nul_at (byte by byte over a name's first bytes, then find) finds the NUL find() finds."""
    text = bytearray(text)
    for i in nuls:
        if i < len(text):
            text[i] = 0
    text = bytes(text)
    start = data.draw(st.integers(0, len(text)))
    end = data.draw(st.integers(start, len(text)))
    assert nul_at(text, start, end) == text.find(b"\0", start, end)


@pytest.mark.parametrize("text, flagged", [
    (b"UPDATE pg_settings SET setting = '7777' WHERE name = 'work_mem'", True),
    (b"update PG_CATALOG.PG_SETTINGS set setting = 'x' where name = 'search_path'", True),
    (b"SELECT * FROM app_settings", False),
    (b"SELECT name, setting FROM pg_settings", False),
    (b"UPDATE user_settings SET x = 1", False),
])
def test_an_update_of_pg_settings_is_read_back_like_a_set(text, flagged):
    """UPDATE pg_settings sets the session's setting through a rule (tag UPDATE 0): only the
    text can tell; a table of the application's own named …settings is not flagged."""
    assert bool(text_flags(text) & MAY_SET) is flagged
    assert mentions_state_words(text, 0, len(text)) is ("pg_settings" in text.decode().lower())
