"""The pooled backend: many client sessions of one (database, user) pool over one server connection.

A session owns the server connection from its first message until the server
says ReadyForQuery with status 'I' and nothing more is outstanding; other
sessions with a whole message waiting queue in arrival order.  When the owner
changes, the new owner's saved settings are put back on the server first, in
the same write as its own first message.

Each server connection keeps, in order, one entry per ReadyForQuery still to
come: None for the owner's own work, or a HiddenQuery the pooler sent itself
(restoring a context, reading settings back, rolling back for a vanished
client).  Replies to hidden queries never reach a client.

Every byte a client sends passes through _forward_client and every byte the
server sends through _server_data: keep them lean.
"""

import collections
import os
import re
import select
import signal
import socket
import struct
import time

from ..shared import channel, log, process, protocol, status
from ..shared.errors import PgError
from . import server as srv
from .statements import MISSING, ParseEntry, StatementRegistry, parse_message, with_statement_name
from .session import (ACTIVE, CLOSED, IDLE, PIN_CHECK_QUERY, REPORTED_SETTABLE, RESTORING, STARTING,
                      WAITING,
                      Session, capture_query, captured_settings, custom_setting_names, fixup_query,
                      restore_query)

logger = log.get("backend")

EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
_READABLE = EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_length = struct.Struct("!I").unpack_from

# Message types the hot loops look at.
_Q, _F, _SYNC, _X = protocol.QUERY, protocol.FUNCTION_CALL, protocol.SYNC, protocol.TERMINATE
_PARSE, _BIND, _CLOSE = protocol.PARSE, protocol.BIND, protocol.CLOSE
# Messages that may name a prepared statement.
_NAMING = frozenset({protocol.PARSE, protocol.BIND, protocol.DESCRIBE, protocol.CLOSE})
_STATEMENT_KIND = ord("S")
# Extended-query messages that leave work on the server until the next Sync.
# (Flush does not: psycopg ends a pipeline with Sync then Flush.)
_EXTENDED = frozenset({protocol.PARSE, protocol.BIND, protocol.DESCRIBE, protocol.EXECUTE,
                       protocol.CLOSE})
_FLUSH = protocol.FLUSH
# Anything else from a client would make the server drop the shared connection.
_COPY = frozenset({protocol.COPY_DATA, protocol.COPY_DONE, protocol.COPY_FAIL})
_Z, _PS, _ERR = protocol.READY_FOR_QUERY, protocol.PARAMETER_STATUS, protocol.ERROR_RESPONSE
_CC, _DATA_ROW = protocol.COMMAND_COMPLETE, ord("D")
_IDLE_STATUS, _FAILED_STATUS = protocol.TRANS_IDLE, protocol.TRANS_FAILED
_PARSE_COMPLETE = ord("1")
# Server messages the owner's stream is watched for; everything else passes untouched.
_NOTED = frozenset({_Z, _PS, _ERR, _CC, protocol.COPY_IN_RESPONSE, _PARSE_COMPLETE})

# Statement text that may change session state without a telling command tag:
# set_config() in any statement, temporary objects made by SELECT INTO or
# CREATE VIEW/SEQUENCE, session advisory locks.  (SET, RESET, LISTEN, PREPARE,
# CREATE TABLE… have command tags; see _command_tag.)
_SETTINGS_TEXT = re.compile(rb"set_config", re.IGNORECASE)
_PIN_TEXT = re.compile(rb"\btemp(?:orary)?\b|pg_temp|advisory_(?:un)?lock", re.IGNORECASE)
# A C-speed first look (lower-case, then substring search) before any regex:
# most statements mention none of these words.
_LOWER = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")


def _may_touch_state(data: bytes) -> bool:
    lowered = data.translate(_LOWER)
    return b"set_config" in lowered or b"temp" in lowered or b"advisory" in lowered
# Command tags after which the session's settings are read back.
_SETTING_TAGS = (b"SET\0", b"RESET\0", b"DISCARD")
# Every tag _command_tag acts on starts with one of these; others (SELECT,
# INSERT, UPDATE, BEGIN, COMMIT…) pass with one C-level test.
_TAG_PREFIXES = (b"SET\0", b"RESET\0", b"DISCARD", b"DEALLOCATE", b"LISTEN", b"UNLISTEN",
                 b"DECLARE", b"PREPARE", b"CREATE TABLE", b"DROP TABLE", b"CLOSE CURSOR")
_RESET_TAGS = (b"RESET\0", b"DISCARD")
# Command tags after which the server holds no prepared statement any more.
_DEALLOCATE_TAGS = (b"DISCARD ALL\0", b"DEALLOCATE ALL\0")
# Command tags that may create, or drop, state that pins a session to its connection.
_PIN_TAGS = (b"LISTEN", b"DECLARE CURSOR", b"PREPARE\0", b"CREATE TABLE")
_UNPIN_TAGS = (b"DISCARD", b"DROP TABLE", b"UNLISTEN", b"CLOSE CURSOR", b"DEALLOCATE")
_COPY_IN_RESPONSE = protocol.COPY_IN_RESPONSE
_COPY_END = frozenset({protocol.COPY_DONE, protocol.COPY_FAIL})
COPY_FAIL = protocol.message(b"f", protocol.cstring("client disconnected"))
# Ends a half-sent pipeline of a vanished client with an error, so that the
# Sync after it rolls its implicit transaction back instead of committing it.
ABORT_PIPELINE = protocol.message(b"E", protocol.cstring("pgforkpool.abort") + b"\0\0\0\0")

# Bytes asked of one recv(). Larger buffers cost more than they save: CPython
# allocates the whole size and shrinks it, and past 128 kB each call makes the
# allocator trim and regrow the heap (measured: 15 µs against 2 µs per call).
RECV_SIZE = 65536
# Buffered bytes beyond which the producing side is paused.
HIGH_WATER = 1 << 20
# Input a waiting session may buffer before we stop reading its socket.
WAITING_INPUT_LIMIT = 1 << 16
# Greeting parameter sets remembered per distinct context.
GREETING_CACHE_SIZE = 64

# Kinds of hidden queries.
RESTORE = "restore"     # put the owner's settings on the server
CAPTURE = "capture"     # read back settings the owner may have changed
FIXUP = "fixup"         # after RESET/DISCARD: the owner's startup values again
ROLLBACK = "rollback"   # end the transaction of a client that vanished
DEALLOCATE = "deallocate"   # close statements no session holds any more
PIN_CHECK = "pin check"     # does the owner hold state that cannot be copied?


class HiddenQuery:
    """A query the pooler sent on a server connection, and what came back."""

    __slots__ = ("kind", "session", "rows", "error")

    def __init__(self, kind: str, session: Session | None):
        self.kind = kind
        self.session = session
        self.rows: list[tuple[str, ...]] = []
        self.error: PgError | None = None


class PooledBackend:
    def __init__(self, settings, database: str, user: str, chan: socket.socket,
                 table: status.StatusTable, slot: int | None, secret: str | None):
        self.settings = settings
        self.database = database
        self.user = user
        self.chan = chan
        self.secret = secret
        self.pid = os.getpid()
        self.epoll = select.epoll()
        self.handlers: dict[int, object] = {}
        self.sessions: dict[int, Session] = {}       # by client fd
        self.by_key: dict[int, Session] = {}
        self.queue: collections.deque[Session] = collections.deque()
        self.server: srv.ServerConnection | None = None
        self.cancels: dict[int, srv.CancelSender] = {}
        self.greetings: dict[frozenset, dict[str, str]] = {}
        self.registry = StatementRegistry(settings.prepared_statement_cache_size)
        self.pinned_count = 0
        self.counters = (table.counters(slot) if slot is not None
                         else memoryview(bytearray(status.INT_BYTES)).cast("q"))
        self.shutdown_mode: str | None = None
        self.title_at = 0.0
        self.title = ""
        self.empty_since = time.monotonic()   # when the last session left (idle_pool_backend_timeout)
        self.idle_reported = False
        # Read every turn of the loop: a plain attribute, not a Settings lookup.
        self.idle_timeout = settings.idle_pool_backend_timeout

    # ================================================================ event loop

    def run(self) -> None:
        self.chan.setblocking(False)
        self.epoll.register(self.chan.fileno(), EPOLLIN)
        self.handlers[self.chan.fileno()] = self._on_channel
        counters = self.counters
        poll = self.epoll.poll
        handlers = self.handlers
        queue = self.queue
        monotonic = time.monotonic
        turns, ready_sum = status.TURNS, status.READY_SUM
        waiting = status.WAITING
        while True:
            # Deadlines (login, cancels, idle timeout, shutdown) are kept by
            # _housekeeping, at least once a second; no per-turn computation.
            events = poll(1.0)
            for fd, mask in events:
                handler = handlers.get(fd)
                if handler is not None:
                    handler(mask)
            server = self.server
            ready = len(queue) + (server is not None and server.owner is not None)
            counters[turns] += 1
            counters[ready_sum] += ready
            counters[waiting] = ready
            if not events or monotonic() > self.title_at:
                self._housekeeping()
                if self.shutdown_mode is not None and not self.sessions:
                    break
        if self.server is not None:
            self.server.close()
        os._exit(0)

    def _housekeeping(self) -> None:
        now = time.monotonic()
        server = self.server
        if server is not None and server.state in (srv.CONNECTING, srv.LOGIN) and now > server.deadline:
            self._server_failed(server, PgError("sqlclient_unable_to_establish_sqlconnection",
                                                "timeout expired while connecting to upstream server"))
        for sender in list(self.cancels.values()):
            if now > sender.deadline:
                self._cancel_done(sender)
        if (self.idle_timeout and not self.sessions and not self.idle_reported
                and now - self.empty_since >= self.idle_timeout):
            # The postmaster decides: it retires us only if it has sent us no new session.
            self.idle_reported = True
            channel.send(self.chan, ("idle",))
        self._update_title(now)
        self.title_at = now + 1.0   # next housekeeping while busy

    def _update_title(self, now: float) -> None:
        title = (f"backend {self.database}/{self.user} {len(self.sessions)} sessions "
                 f"{len(self.queue)} waiting")
        if title != self.title:
            process.set_title(title)
            self.title = title
        self.counters[status.SESSIONS] = len(self.sessions)

    def _register(self, obj, mask: int, handler) -> None:
        self.epoll.register(obj.fd, mask)
        obj.mask = mask
        self.handlers[obj.fd] = handler

    def _unregister(self, obj) -> None:
        self.handlers.pop(obj.fd, None)
        try:
            self.epoll.unregister(obj.fd)
        except (OSError, ValueError):
            pass

    def _set_mask(self, obj, mask: int) -> None:
        if obj.mask != mask:
            obj.mask = mask
            self.epoll.modify(obj.fd, mask)

    # ================================================================ postmaster channel

    def _on_channel(self, _mask: int) -> None:
        while True:
            try:
                msg, fd = channel.receive(self.chan)
            except BlockingIOError:
                return
            if msg is None:   # the postmaster is gone: so are we
                os._exit(1)
            kind = msg[0]
            if kind == "session":
                self._new_session(msg[1], msg[2], fd)
            elif kind == "cancel":
                self._cancel(msg[1])
            elif kind == "reload":
                self.settings = msg[1]
                self.secret = msg[2]
                self.registry.cache_size = self.settings.prepared_statement_cache_size
                self.idle_timeout = self.settings.idle_pool_backend_timeout
            elif kind == "shutdown":
                self._shutdown(msg[1])

    def _shutdown(self, mode: str) -> None:
        self.shutdown_mode = mode
        if mode == "smart":
            return
        error = PgError("admin_shutdown", "terminating connection due to administrator command")
        for session in list(self.sessions.values()):
            self._client_send(session, error.packet())
            self._close_session(session)

    # ================================================================ sessions

    def _new_session(self, conn_id: int, startup: dict[str, str], fd: int) -> None:
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            session = Session(sock, conn_id, startup)
        except ValueError as exc:   # a malformed `options` string
            sock.send(PgError("protocol_violation", str(exc)).packet())
            sock.close()
            channel.send(self.chan, ("closed", conn_id))
            return
        while session.key in self.by_key:
            session.key = (session.key * 7 + 1) & 0x7FFFFFFF or 1
        self.sessions[session.fd] = session
        self.by_key[session.key] = session
        self.idle_reported = False
        self._register(session, EPOLLIN, lambda mask, s=session: self._on_client(s, mask))
        self.counters[status.SESSIONS] = len(self.sessions)
        self.counters[status.SERVED] += 1
        # A context the pooler has greeted before needs no trip to the server.
        known = self.greetings.get(frozenset(session.settings.items()))
        if known is not None:
            self._greet(session, known)
            session.state = IDLE
        else:
            self._enqueue(session)

    def _on_client(self, session: Session, mask: int) -> None:
        if mask & EPOLLOUT:
            self._client_writable(session)
        if mask & (EPOLLIN | select.EPOLLHUP | select.EPOLLERR) and session.state != CLOSED:
            self._client_readable(session)

    def _client_readable(self, session: Session) -> None:
        try:
            data = session.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._client_gone(session)
            return
        state = session.state
        if state == ACTIVE:
            if session.inbuf:
                session.inbuf += data
                data = bytes(session.inbuf)
                session.inbuf.clear()
            self._forward_client(session, data)
            return
        if state == IDLE and not session.inbuf:
            # The common case: a whole query from an idle session, the server
            # connection free and already in this session's context.
            server = self.server
            if (server is not None and server.state is srv.IDLE and not self.queue
                    and session.pinned is None and not self.registry.evicted
                    and (server.context is session.settings or server.context == session.settings)
                    and len(data) >= 5 and len(data) >= 1 + _length(data, 1)[0]):
                session.state = ACTIVE
                server.owner = session
                server.state = srv.ACTIVE
                server.context = session.settings
                self._forward_client(session, data)
                return
        session.inbuf += data
        if state == IDLE:
            if _has_whole_message(session.inbuf):
                self._enqueue(session)
        elif len(session.inbuf) > WAITING_INPUT_LIMIT:
            session.paused = True
            self._set_mask(session, session.mask & ~EPOLLIN)

    def _enqueue(self, session: Session) -> None:
        if session.state == IDLE:
            session.state = WAITING
        if session.pinned is not None:   # its own connection: no queue
            if session.pinned.state is srv.IDLE:
                self._activate(session.pinned, session)
            return   # else it goes on when its connection is free (_cancel_done)
        server = self.server
        if server is not None and server.state == srv.IDLE and not self.queue:
            self._activate(server, session)
            return
        self.queue.append(session)
        if server is None:
            self._connect()

    def _forward_client(self, session: Session, data: bytes) -> None:
        """Pass the session's whole messages to the server, noting what answers they await."""
        server = session.pinned or self.server
        expect = server.expect
        n = len(data)
        pos = 0
        out = None          # pieces to send, once a message had to be rewritten
        emit = 0            # data[emit:pos] is still to be sent as it is
        text_checked = False
        while n - pos >= 5:
            msg_type = data[pos]
            length = _length(data, pos + 1)[0]
            if length < 4:
                self._send_pieces(server, out, data, emit, pos)
                self._protocol_violation(session, "invalid message length")
                return
            end = pos + 1 + length
            if end > n:
                break
            if msg_type == _Q or msg_type == _F:
                expect.append(None)
                server.seg_sent += 1
                if not text_checked:
                    text_checked = True
                    session.last_text = data
                    if _may_touch_state(data):
                        self._may_change_state(session, data)
            elif msg_type == _SYNC:
                expect.append(None)
                server.seg_sent += 1
                server.unsynced = False
            elif msg_type in _EXTENDED:
                server.unsynced = True
                if msg_type in _NAMING:
                    if msg_type == _PARSE and not text_checked:
                        text_checked = True
                        session.last_text = data
                        if _may_touch_state(data):
                            self._may_change_state(session, data)
                    replacement = self._statement_message(session, server, msg_type, data, pos, end)
                    if replacement is not None:
                        if out is None:
                            out = []
                        out.append(data[emit:pos])
                        out.append(replacement)
                        emit = end
            elif msg_type == _X:
                self._send_pieces(server, out, data, emit, pos)
                self._client_gone(session)
                return
            elif msg_type in _COPY:
                if msg_type in _COPY_END:
                    server.copy_in = False
            elif msg_type != _FLUSH:
                self._send_pieces(server, out, data, emit, pos)
                self._protocol_violation(session, f"invalid frontend message type {msg_type}")
                return
            pos = end
        if out is None and pos == n:
            self._server_send(server, data)
        else:
            self._send_pieces(server, out, data, emit, pos)
            if pos < n:
                session.inbuf += data[pos:]
        if not expect and not server.unsynced and server.idle_status:
            # Only messages that expect no answer (stray CopyData): nothing holds the server.
            self._boundary(server)

    def _send_pieces(self, server: srv.ServerConnection, out: list | None, data: bytes,
                     emit: int, pos: int) -> None:
        if out is not None:
            out.append(data[emit:pos])
            self._server_send(server, b"".join(out))
        elif pos:
            self._server_send(server, data[emit:pos])

    # ---------------------------------------------------------------- named statements

    def _statement_message(self, session: Session, server: srv.ServerConnection, msg_type: int,
                           data: bytes, pos: int, end: int) -> bytes | None:
        """Rename the statement in a Parse/Bind/Describe/Close; None to send it unchanged."""
        body = pos + 5
        if msg_type == _PARSE:
            name_end = data.index(b"\0", body, end)
            if name_end == body:   # the unnamed statement is the connection's, as in PostgreSQL
                server.parses.append(ParseEntry(server.seg_sent, False))
                return None
            name = data[body:name_end]
            key = data[name_end + 1:end]
            held = session.statements.get(name)
            if held is not None:
                # A duplicate: the server itself says 42P05, about the statement the session holds.
                prefix = self._ensure_prepared(server, held)
                server.error_names[held.name] = name
                server.parses.append(ParseEntry(server.seg_sent, False))
                return prefix + parse_message(held.name, key)
            statement = self.registry.acquire(key)
            session.statements[name] = statement
            if statement.name in server.prepared:
                # Another session prepared the same text here: an unnamed Parse
                # answers ParseComplete without a second copy.
                server.parses.append(ParseEntry(server.seg_sent, False, session, name, statement))
                return parse_message(b"", key)
            server.prepared.add(statement.name)
            server.parses.append(ParseEntry(server.seg_sent, False, session, name, statement, True))
            return parse_message(statement.name, key)
        if msg_type == _BIND:
            name_start = data.index(b"\0", body, end) + 1
        elif data[body] == _STATEMENT_KIND:   # Describe or Close of a statement
            name_start = body + 1
        else:
            return None                        # of a portal: portals live within a transaction
        name_end = data.index(b"\0", name_start, end)
        if name_end == name_start:
            return None
        name = data[name_start:name_end]
        before, after = data[body:name_start], data[name_end + 1:end]
        held = session.statements.get(name)
        if msg_type == _CLOSE:
            if held is not None:
                del session.statements[name]
                self.registry.release(held)
            # Closing a name the server lacks is not an error: it answers CloseComplete.
            return with_statement_name(b"C", before, MISSING, after)
        if held is None:
            server.error_names[MISSING] = name   # the server says 26000 about it
            return with_statement_name(bytes((msg_type,)), before, MISSING, after)
        return (self._ensure_prepared(server, held)
                + with_statement_name(bytes((msg_type,)), before, held.name, after))

    def _ensure_prepared(self, server: srv.ServerConnection, statement) -> bytes:
        """A Parse to send first if this server connection lacks the statement."""
        if statement.name in server.prepared:
            return b""
        server.prepared.add(statement.name)
        server.parses.append(ParseEntry(server.seg_sent, True, statement=statement, prepared_here=True))
        return parse_message(statement.name, statement.key)

    def _parses_failed(self, server: srv.ServerConnection) -> None:
        """An error skipped the rest of the segment: its Parses created nothing."""
        parses = server.parses
        segment = server.seg_recv
        while parses and parses[0].segment == segment:
            entry = parses.popleft()
            if entry.prepared_here:
                server.prepared.discard(entry.statement.name)
            if entry.client_name is not None:
                held = entry.session.statements
                if held.get(entry.client_name) is entry.statement:
                    del held[entry.client_name]
                    self.registry.release(entry.statement)

    def _client_error(self, server: srv.ServerConnection, payload: bytes) -> bytes:
        """The server's error with the pooler's statement names shown as the client's."""
        fields = protocol.parse_error_fields(payload)
        text = fields.get("M", "")
        for server_name, client_name in server.error_names.items():
            text = text.replace(f'"{server_name.decode()}"', f'"{client_name.decode(errors="replace")}"')
        fields["M"] = text
        body = b"".join(code.encode() + protocol.cstring(value) for code, value in fields.items())
        return protocol.message(b"E", body + b"\0")

    def _statements_discarded(self, server: srv.ServerConnection, owner: Session | None) -> None:
        """DISCARD ALL or DEALLOCATE ALL: the server holds no prepared statement any more."""
        server.prepared.clear()
        if owner is not None:
            for statement in owner.statements.values():
                self.registry.release(statement)
            owner.statements.clear()

    @staticmethod
    def _may_change_state(session: Session, statements: bytes) -> None:
        """The client sent text that may change its session state: check after the transaction."""
        if _SETTINGS_TEXT.search(statements):
            session.dirty = True
            session.custom_names |= custom_setting_names(statements)
        if _PIN_TEXT.search(statements):
            session.pin_check = True

    def _client_writable(self, session: Session) -> None:
        try:
            sent = session.sock.send(session.outbuf)
        except BlockingIOError:
            return
        except OSError:
            session.outbuf.clear()
            self._client_gone(session)
            return
        del session.outbuf[:sent]
        if not session.outbuf:
            self._set_mask(session, session.mask & ~EPOLLOUT)
            server = session.pinned or self.server
            if server is not None and server.owner is session and not server.mask & EPOLLIN:
                self._set_mask(server, server.mask | EPOLLIN)

    def _client_send(self, session: Session, data: bytes) -> None:
        if session.gone:
            return
        if session.outbuf:
            session.outbuf += data
        else:
            try:
                sent = session.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                # Noticed by the next read of the socket; nothing more is sent to it.
                session.gone = True
                return
            if sent == len(data):
                return
            session.outbuf += data[sent:]
            self._set_mask(session, session.mask | EPOLLOUT)
        if len(session.outbuf) > HIGH_WATER:
            server = session.pinned or self.server
            if server is not None and server.owner is session:
                self._set_mask(server, server.mask & ~EPOLLIN)

    def _greet(self, session: Session, params: dict[str, str]) -> None:
        """What PostgreSQL sends after AuthenticationOk: parameters, cancel key, ReadyForQuery."""
        out = [protocol.parameter_status(name, value) for name, value in params.items()]
        out.append(protocol.backend_key_data(self.pid, session.key))
        out.append(protocol.ready_for_query(b"I"))
        session.client_params = dict(params)
        session.greeted = True
        self._client_send(session, b"".join(out))

    def _report_parameters(self, session: Session, params: dict[str, str]) -> None:
        """Send the client the ParameterStatus values that differ from what it last saw.

        PostgreSQL 14+ reports a setting only when its value changes on the
        server, which is not the same as changing for this client.
        """
        seen = session.client_params
        out = b""
        for name, value in params.items():
            if seen.get(name) != value:
                seen[name] = value
                out += protocol.parameter_status(name, value)
        if out:
            self._client_send(session, out)

    def _client_gone(self, session: Session) -> None:
        """The client disconnected or sent Terminate: end the session, clean the server."""
        if session.state == CLOSED:
            return
        session.gone = True
        server = self.server
        if session.pinned is not None:
            pass   # _close_session closes its own connection: the server rolls back
        elif server is not None and server.owner is session:
            # Finish what the session left on the server before anyone else uses it:
            # end a COPY or an unsynced pipeline, cancel running work, then _boundary rolls back.
            if server.copy_in:
                self._server_send(server, COPY_FAIL)
                server.copy_in = False
            if server.unsynced:
                self._server_send(server, ABORT_PIPELINE + protocol.SYNC_MESSAGE)
                server.expect.append(None)
                server.seg_sent += 1
                server.unsynced = False
            if server.expect:
                if server.expect[0] is None:
                    self._send_cancel(server)
            else:
                self._boundary(server)
        self._close_session(session)

    def _protocol_violation(self, session: Session, text: str) -> None:
        self._client_send(session, PgError("protocol_violation", text).packet())
        self._client_gone(session)

    def _close_session(self, session: Session) -> None:
        if session.state == CLOSED:
            return
        if session.state == WAITING or session.state == STARTING:
            try:
                self.queue.remove(session)
            except ValueError:
                pass
        session.state = CLOSED
        session.gone = True
        for statement in session.statements.values():
            self.registry.release(statement)
        session.statements.clear()
        if session.pinned is not None:
            self._close_pinned(session)
        self._unregister(session)
        del self.sessions[session.fd]
        del self.by_key[session.key]
        if session.outbuf:   # a last error message; best effort
            try:
                session.sock.send(session.outbuf)
            except OSError:
                pass
        session.sock.close()
        self.counters[status.SESSIONS] = len(self.sessions)
        if not self.sessions:
            self.empty_since = time.monotonic()
        channel.send(self.chan, ("closed", session.conn_id))

    # ================================================================ server connection

    def _connect(self) -> None:
        startup = {"user": self.user, "database": self.database}
        try:
            server = srv.ServerConnection(self.settings, startup, self.secret)
        except PgError as exc:
            self._server_failed(None, exc)
            return
        self.server = server
        self._register(server, EPOLLOUT, lambda mask, s=server: self._on_server(s, mask))
        self.counters[status.SERVER_CONNECTIONS] += 1

    def _on_server(self, server: srv.ServerConnection, mask: int) -> None:
        state = server.state
        if state is not srv.CONNECTING and state is not srv.LOGIN:
            if mask & EPOLLOUT:
                self._server_writable(server)
                if server.state is srv.CLOSED:
                    return
            if mask & _READABLE:
                try:
                    data = server.sock.recv(RECV_SIZE)
                except BlockingIOError:
                    return
                except OSError:
                    data = b""
                if not data:
                    self._server_lost(server)
                    return
                if server.inbuf:
                    server.inbuf += data
                    data = bytes(server.inbuf)
                    server.inbuf.clear()
                self._server_data(server, data)
            return
        try:
            if state == srv.CONNECTING:
                self._server_send(server, server.connected())
                self._set_mask(server, EPOLLIN | (EPOLLOUT if server.outbuf else 0))
                return
            if mask & EPOLLOUT:
                self._server_writable(server)
            data = server.sock.recv(65536)
            if not data:
                raise PgError("sqlclient_unable_to_establish_sqlconnection",
                              "upstream server closed the connection during login")
            reply = server.login(data)
        except BlockingIOError:
            return
        except OSError as exc:
            self._server_failed(server, PgError("sqlclient_unable_to_establish_sqlconnection",
                                                f"could not connect to upstream server: {exc}"))
            return
        except PgError as exc:
            self._server_failed(server, exc)
            return
        if reply:
            self._server_send(server, reply)
        if server.state == srv.IDLE:
            logger.debug("server connection ready (server pid %d)", server.pid)
            self._next_session(server)

    def _server_failed(self, server: srv.ServerConnection | None, error: PgError) -> None:
        """The server refused us or could not be reached: every waiting session hears why."""
        logger.log(log.LOG, "upstream connection for %s/%s failed: %s",
                   self.database, self.user, error.text)
        if server is not None:
            self._unregister(server)
            server.close()
            if self.server is server:
                self.server = None
        error.severity = "FATAL"
        packet = error.packet()
        for session in list(self.queue):
            self._client_send(session, packet)
            self._close_session(session)
        self.queue.clear()
        if not self.sessions and error.sqlstate in ("3D000", "28000", "28P01"):
            channel.send(self.chan, ("server_failed", error.sqlstate))

    def _server_send(self, server: srv.ServerConnection, data: bytes) -> None:
        if server.outbuf:
            server.outbuf += data
        else:
            try:
                sent = server.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = 0   # the read side will see the connection is gone
            if sent == len(data):
                return
            server.outbuf += data[sent:]
            self._set_mask(server, server.mask | EPOLLOUT)
        owner = server.owner
        if len(server.outbuf) > HIGH_WATER and owner is not None and not owner.gone:
            owner.paused = True
            self._set_mask(owner, owner.mask & ~EPOLLIN)

    def _hidden(self, server: srv.ServerConnection, kind: str, sql: str,
                session: Session | None = None) -> None:
        """Send a query of the pooler's own; its replies go to _hidden_done, not to a client."""
        server.expect.append(HiddenQuery(kind, session))
        server.seg_sent += 1
        self._server_send(server, protocol.query(sql))

    def _server_writable(self, server: srv.ServerConnection) -> None:
        try:
            sent = server.sock.send(server.outbuf)
        except BlockingIOError:
            return
        except OSError:
            return
        del server.outbuf[:sent]
        if not server.outbuf:
            self._set_mask(server, server.mask & ~EPOLLOUT)
            owner = server.owner
            if owner is not None and owner.paused and not owner.gone:
                owner.paused = False
                self._set_mask(owner, owner.mask | EPOLLIN)

    def _server_data(self, server: srv.ServerConnection, data: bytes) -> None:
        owner = server.owner
        if owner is None:
            owner = server.pinned   # a pinned session's notifications arrive while it is idle
        expect = server.expect
        hidden = expect[0] if expect else None
        n = len(data)
        pos = start = 0      # data[start:pos] is to be forwarded to the owner
        boundary = False
        while n - pos >= 5:
            msg_type = data[pos]
            end = pos + 1 + _length(data, pos + 1)[0]
            if end > n:
                break
            if hidden is not None:
                # A reply to the pooler's own query: forward what came before, keep this.
                if pos > start and owner is not None:
                    self._client_send(owner, data[start:pos])
                start = end
                self._hidden_message(server, hidden, msg_type, data, pos + 5, end)
                if msg_type == _Z:
                    expect.popleft()
                    server.seg_recv += 1
                    server.idle_status = data[pos + 5] == _IDLE_STATUS
                    self._hidden_done(server, hidden)
                    if server.state == srv.CLOSED:
                        return
                    if server.owner is not owner:
                        if end < n:   # the rest is the next owner's
                            self._server_data(server, data[end:])
                        return
                    hidden = expect[0] if expect else None
                pos = end
                continue
            if msg_type not in _NOTED:
                pass   # rows, descriptions, notices: only forwarded
            elif msg_type == _Z:
                if expect:
                    expect.popleft()
                if server.parses and server.parses[0].segment == server.seg_recv:
                    self._parses_failed(server)
                server.seg_recv += 1
                if server.error_names:
                    server.error_names.clear()
                server.idle_status = data[pos + 5] == _IDLE_STATUS
                if not expect and not server.unsynced:
                    if server.fixup and data[pos + 5] != _FAILED_STATUS and owner is not None and not owner.gone:
                        # Hold the ReadyForQuery until the startup values are back.
                        server.fixup = False
                        if pos > start:
                            self._client_send(owner, data[start:pos])
                        server.held = data[pos:end]
                        start = end
                        self._hidden(server, FIXUP, fixup_query(owner.startup), owner)
                        hidden = expect[0]
                        pos = end
                        continue
                    boundary = True
                hidden = expect[0] if expect else None
            elif msg_type == _CC:
                if owner is not None and (data.startswith(_TAG_PREFIXES, pos + 5) or owner.prepared_xacts):
                    self._command_tag(server, owner, data[pos + 5:pos + 25])
            elif msg_type == _COPY_IN_RESPONSE:
                server.copy_in = True
            elif msg_type == _PARSE_COMPLETE:
                parses = server.parses
                if parses and parses.popleft().hidden:
                    # The pooler's own Parse (a statement this connection lacked).
                    if pos > start and owner is not None:
                        self._client_send(owner, data[start:pos])
                    start = end
            elif msg_type == _ERR:
                if server.parses:
                    self._parses_failed(server)
                if server.error_names:
                    if owner is not None:
                        if pos > start:
                            self._client_send(owner, data[start:pos])
                        self._client_send(owner, self._client_error(server, data[pos + 5:end]))
                    start = end
            elif msg_type == _PS:
                self._parameter_status(server, owner, data, pos + 5, end)
            pos = end
        if pos < n:
            server.inbuf += data[pos:]
        if owner is not None and not owner.gone and pos > start:
            self._client_send(owner, data[start:pos] if start or pos < n else data)
        if boundary:
            self._boundary(server)

    def _command_tag(self, server: srv.ServerConnection, owner: Session, tag: bytes) -> None:
        """What a CommandComplete says about the owner's session state."""
        if tag.startswith(_SETTING_TAGS):
            owner.dirty = True
            # SET myapp.tenant = …: a custom setting pg_settings will not list.
            owner.custom_names |= custom_setting_names(owner.last_text)
            if tag.startswith(_RESET_TAGS) and owner.startup:
                server.fixup = True
        if tag.startswith(_DEALLOCATE_TAGS):
            self._statements_discarded(server, owner)
        if tag.startswith(_PIN_TAGS) or (owner.pinned is not None and tag.startswith(_UNPIN_TAGS)):
            owner.pin_check = True
        if tag.startswith(b"PREPARE TRANSACTION"):
            if self.settings.hold_prepared_transactions:
                owner.prepared_xacts += 1
        elif tag.startswith((b"COMMIT PREPARED", b"ROLLBACK PREPARED")) and owner.prepared_xacts:
            owner.prepared_xacts -= 1

    def _parameter_status(self, server: srv.ServerConnection, owner: Session | None,
                          data: bytes, pos: int, end: int) -> None:
        name, pos = protocol.read_cstring(data, pos)
        value, _ = protocol.read_cstring(data, pos)
        server.params[name] = value
        if owner is None:
            return
        owner.client_params[name] = value
        if name.lower() in REPORTED_SETTABLE:
            owner.dirty = True   # read back at the end of the transaction

    def _hidden_message(self, server: srv.ServerConnection, hidden: HiddenQuery,
                        msg_type: int, data: bytes, pos: int, end: int) -> None:
        if msg_type == _DATA_ROW:
            hidden.rows.append(_text_row(data, pos))
        elif msg_type == _ERR and hidden.error is None:
            hidden.error = PgError.from_fields(protocol.parse_error_fields(data[pos:end]))
        elif msg_type == _PS:
            name, p = protocol.read_cstring(data, pos)
            server.params[name] = protocol.read_cstring(data, p)[0]

    def _hidden_done(self, server: srv.ServerConnection, hidden: HiddenQuery) -> None:
        """A hidden query's ReadyForQuery arrived: act on what it returned."""
        kind, session, error = hidden.kind, hidden.session, hidden.error
        if kind == RESTORE:
            if error is not None:
                # It ran as one implicit transaction, so none of it applied; the
                # session's input must not run without its settings.
                if session.greeted:
                    logger.warning("could not restore the settings of a session: %s", error.text)
                    error = PgError(error.sqlstate, "could not restore this session's settings: "
                                    + error.text, detail=error.detail)
                error.severity = "FATAL"   # as PostgreSQL refuses a startup packet with a bad setting
                self._client_send(session, error.packet())
                self._close_session(session)
                self._release(server)
                return
            server.context = session.settings
            if session.gone:
                self._release(server)
                return
            session.state = ACTIVE
            if not session.greeted:
                self._greet_restored(server, session)
                return
            self._report_parameters(session, server.params)
            self._forward_buffered(server, session)
            return
        elif kind == CAPTURE:
            if error is None:
                session.settings = captured_settings(hidden.rows, self.user)
                server.context = session.settings
                session.capture_failures = 0
            else:
                logger.warning("could not read back the settings of a session: %s", error.text)
                server.context = None
                session.capture_failures += 1
                if session.capture_failures < 3:
                    session.dirty = True   # try again before anyone else uses the connection
        elif kind == PIN_CHECK:
            # If the server could not say, assume the state is there: pinning is the safe side.
            holds_state = error is not None or (bool(hidden.rows) and hidden.rows[0][0] == "t")
            if session.gone:
                if holds_state and server.pinned is None:
                    # A vanished client's temporary tables or locks: they die with the connection.
                    self._drop_server(server)
                    return
            elif holds_state and session.pinned is None:
                if not self._pin(server, session):
                    return
            elif not holds_state and session.pinned is not None:
                if server.expect or server.unsynced:
                    session.pin_check = True   # its next statement is running here: ask again later
                else:
                    self._unpin(server, session)
                    return
        elif kind == FIXUP:
            if error is not None:
                logger.warning("could not re-apply startup settings: %s", error.text)
            if not session.gone:
                self._report_parameters(session, server.params)
                self._client_send(session, server.held)
            server.held = b""
        if not server.expect and not server.unsynced and server.owner is not None:
            self._boundary(server)

    def _boundary(self, server: srv.ServerConnection) -> None:
        """Nothing is outstanding on the server: end the owner's turn if its transaction is over."""
        owner = server.owner
        if owner is None:
            return
        if owner.gone:
            if not server.idle_status:
                self._hidden(server, ROLLBACK, "ROLLBACK")
                return
            if owner.pin_check and server.pinned is None:
                owner.pin_check = False
                self._hidden(server, PIN_CHECK, PIN_CHECK_QUERY, owner)
                return
            if owner.dirty:
                server.context = None   # what it set was never read back
            self._release(server)
            return
        if not server.idle_status:
            return   # inside a transaction: the owner keeps the connection
        if owner.dirty:
            owner.dirty = False
            self._hidden(server, CAPTURE, capture_query(owner.custom_names), owner)
            return
        if owner.pin_check:
            owner.pin_check = False
            self._hidden(server, PIN_CHECK, PIN_CHECK_QUERY, owner)
            return
        if owner.prepared_xacts and server.pinned is None:
            # hold_prepared_transactions: nobody else runs here until they are resolved.
            return
        self._release(server)

    def _greet_restored(self, server: srv.ServerConnection, session: Session) -> None:
        """Greet a new session whose settings the server has just applied."""
        raw_key = frozenset(session.settings.items())
        # The server reports settings in its own spelling (UTF8, "ISO, MDY"):
        # keep that spelling so that equal contexts compare equal.
        reported = {name.lower(): value for name, value in server.params.items()}
        for name in REPORTED_SETTABLE & session.settings.keys():
            if name in reported:
                session.settings[name] = reported[name]
                session.startup[name] = reported[name]
        params = dict(server.params)
        if len(self.greetings) >= GREETING_CACHE_SIZE:
            self.greetings.clear()
        self.greetings[raw_key] = params
        self.greetings[frozenset(session.settings.items())] = params
        self._greet(session, params)
        if session.gone:
            self._close_session(session)
            self._release(server)
        elif _has_whole_message(session.inbuf):
            self._forward_buffered(server, session)
        else:
            self._release(server)

    def _activate(self, server: srv.ServerConnection, session: Session) -> None:
        """Give the server connection to session: restore its context, pass its waiting input."""
        server.owner = session
        server.state = srv.ACTIVE
        session.state = ACTIVE
        if self.registry.evicted:
            self._deallocate_evicted(server)
        if server.context is not session.settings and server.context != session.settings:
            # Its input waits for the restore: it must not run in another session's settings.
            session.state = RESTORING
            self._hidden(server, RESTORE, restore_query(server.context, session.settings), session)
            return
        if not session.greeted:
            self._greet(session, dict(server.params))
            if not _has_whole_message(session.inbuf):
                self._release(server)
                return
        self._forward_buffered(server, session)

    def _deallocate_evicted(self, server: srv.ServerConnection) -> None:
        names = [name for name in self.registry.evicted if name in server.prepared]
        self.registry.evicted.clear()
        if names:
            server.prepared.difference_update(names)
            self._hidden(server, DEALLOCATE, "; ".join(
                f'DEALLOCATE "{name.decode()}"' for name in names))

    def _forward_buffered(self, server: srv.ServerConnection, session: Session) -> None:
        if session.paused:
            session.paused = False
            self._set_mask(session, session.mask | EPOLLIN)
        if session.inbuf:
            data = bytes(session.inbuf)
            session.inbuf.clear()
            self._forward_client(session, data)

    def _release(self, server: srv.ServerConnection) -> None:
        """The transaction is over: the server connection goes to the next waiting session."""
        session = server.owner
        server.owner = None
        server.state = srv.CANCEL_WAIT if server.cancels else srv.IDLE
        self.counters[status.TRANSACTIONS] += 1
        if session is not None and session.state == ACTIVE:
            session.state = IDLE
            if _has_whole_message(session.inbuf):
                if server.pinned is session:
                    self._enqueue(session)
                    return
                # The client already sent its next transaction: it waits its turn.
                session.state = WAITING
                self.queue.append(session)
        if server.pinned is None and server.state is srv.IDLE:
            self._next_session(server)

    # ================================================================ pinning

    def _pin(self, server: srv.ServerConnection, session: Session) -> bool:
        """The session keeps this connection for itself; the others get a new one."""
        if self.pinned_count >= self.settings.max_pinned_sessions:
            # Its state cannot follow it and must not reach anyone else: the
            # connection goes with the session.
            error = PgError("too_many_connections",
                            "too many pinned sessions in this pooled backend",
                            detail="The session created state (temporary tables, session advisory "
                                   "locks, LISTEN, WITH HOLD cursors, SQL PREPARE) that needs a "
                                   "server connection of its own.",
                            hint="Raise max_pinned_sessions, or use a dedicated user or database "
                                 "for such clients.")
            self._client_send(session, error.packet())
            self._close_session(session)
            self._drop_server(server)
            return False
        session.pinned = server
        server.pinned = session
        self.pinned_count += 1
        self.counters[status.PINNED] = self.pinned_count
        logger.debug("session %d pinned to server process %d", session.conn_id, server.pid)
        if self.server is server:
            self.server = None
            if self.queue:
                self._connect()
        return True

    def _unpin(self, server: srv.ServerConnection, session: Session) -> None:
        """Its state is gone: the session returns to the shared connection."""
        server.owner = None
        session.state = IDLE
        self._close_pinned(session)
        if _has_whole_message(session.inbuf):
            self._enqueue(session)

    def _close_pinned(self, session: Session) -> None:
        server = session.pinned
        session.pinned = None
        server.pinned = None
        self.pinned_count -= 1
        self.counters[status.PINNED] = self.pinned_count
        self._drop_server(server)

    def _drop_server(self, server: srv.ServerConnection) -> None:
        """Close a server connection: whatever it holds dies with it, on the server."""
        self._unregister(server)
        server.close()
        if self.server is server:
            self.server = None
            if self.queue:
                self._connect()

    def _next_session(self, server: srv.ServerConnection) -> None:
        queue = self.queue
        while queue:
            session = queue.popleft()
            if session.state != CLOSED:
                self._activate(server, session)
                return

    def _server_lost(self, server: srv.ServerConnection) -> None:
        """The server connection broke: fail its owner, reconnect for the others."""
        self._unregister(server)
        server.close()
        if self.server is server:
            self.server = None
        logger.log(log.LOG, "lost server connection to %s/%s", self.database, self.user)
        owner = server.owner or server.pinned
        if owner is not None and owner.state != CLOSED:
            self._client_send(owner, PgError(
                "connection_failure", "server closed the connection unexpectedly",
                detail="The upstream server connection of this session was lost.").packet())
            self._close_session(owner)
        if self.queue and self.server is None:
            self._connect()

    # ================================================================ cancel

    def _cancel(self, key: int) -> None:
        session = self.by_key.get(key)
        server = None if session is None else (session.pinned or self.server)
        # Only while this session's own work runs on the server.
        if (session is not None and server is not None and server.owner is session
                and server.expect and server.expect[0] is None):
            self._send_cancel(server)

    def _send_cancel(self, server: srv.ServerConnection) -> None:
        try:
            sender = srv.CancelSender(self.settings, server)
        except OSError as exc:
            logger.warning("could not send cancel request: %s", exc)
            return
        server.cancels += 1
        self.cancels[sender.fd] = sender
        self.epoll.register(sender.fd, EPOLLOUT)
        self.handlers[sender.fd] = lambda mask, c=sender: self._on_cancel(c, mask)

    def _on_cancel(self, sender: srv.CancelSender, mask: int) -> None:
        if not sender.sent:
            if not sender.send():
                self._cancel_done(sender)   # never sent: nothing was signalled
            else:
                self.epoll.modify(sender.fd, EPOLLIN)
        elif sender.taken():
            self._cancel_done(sender)

    def _cancel_done(self, sender: srv.CancelSender) -> None:
        """The server took the request (or it was never sent): its connection may serve others."""
        self.cancels.pop(sender.fd, None)
        self.handlers.pop(sender.fd, None)
        try:
            self.epoll.unregister(sender.fd)
        except (OSError, ValueError):
            pass
        uncertain = sender.sent and not sender.taken()   # timed out after sending
        sender.sock.close()
        server = sender.server
        server.cancels -= 1
        if server.state is srv.CLOSED:
            return
        if uncertain:
            # The signal may still come: that connection must not run anyone's query.
            logger.warning("cancel request not confirmed by the server; closing its connection")
            if server.owner is None:
                self._drop_server(server)
            return
        if server.cancels == 0 and server.state is srv.CANCEL_WAIT:
            server.state = srv.IDLE
            session = server.pinned
            if session is None:
                self._next_session(server)
            elif session.state == WAITING:
                self._activate(server, session)


def _has_whole_message(buf: bytearray) -> bool:
    return len(buf) >= 5 and len(buf) >= 1 + _length(buf, 1)[0]


def _text_row(data: bytes, pos: int) -> tuple[str, ...]:
    """The text values of a DataRow payload starting at pos."""
    count = struct.unpack_from("!h", data, pos)[0]
    pos += 2
    values = []
    for _ in range(count):
        size = struct.unpack_from("!i", data, pos)[0]
        pos += 4
        if size < 0:
            values.append(None)
        else:
            values.append(data[pos:pos + size].decode())
            pos += size
    return tuple(values)


def main(settings, database: str, user: str, chan: socket.socket,
         table: status.StatusTable, slot: int | None, secret: str | None) -> None:
    """Entry point in the forked pooled-backend process."""
    process.set_title(f"backend {database}/{user} 0 sessions 0 waiting")
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the postmaster says how to stop
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    PooledBackend(settings, database, user, chan, table, slot, secret).run()
