"""The pooled backend: many client sessions of one (database, user) pool over one server connection.

This module is glue: an epoll loop that reads sockets, feeds the sans-IO
protocol objects (client.ClientProtocol per session, server.ServerProtocol
per connection), writes what they return through stream.Stream, and applies
their decisions through the scheduler (scheduler.py), the only place states
change.

A session owns the server connection from its first message until every
reply it awaited has come and the transaction is over (boundary_decision);
other sessions with input queue in arrival order.  When the owner changes,
the new owner's saved context is put back on the server first, in the same
write as its own first message.  Queries the pooler sends itself (restoring a
context, reading settings back, checking for uncopyable state, rolling back
for a vanished client) are HiddenQuery entries of the connection's one queue
of outstanding replies: their replies never reach a client, but a
notification that arrives among them does.

Every byte a client sends passes through _forward and every byte the server
sends through _on_server: keep them lean.
"""

import functools
import math
import os
import secrets
import select
import signal
import socket
import time
from bisect import bisect_right
from typing import Callable, Final

from ..shared import channel, log, process, protocol, status
from ..shared.errors import PgError
from . import server as srv
from .client import HOLDING, MAY_PIN, MAY_SET, TERMINATE, WAITING_INPUT_LIMIT
from .context import (PIN_CHECK_QUERY, UNKNOWN_NAME, Context, capture_query,
                      captured_settings, custom_setting_names, duration_setting, fixup_query,
                      reserved_placeholder, restore_query)
from .scheduler import Decision, Scheduler, ServerState, SessionState, boundary_decision
from .server import (BOUNDARY, BROKEN, CHECKED, FLUSHED, NOTE_DISCARDED, NOTE_OUTDATED, NOTE_PIN, NOTE_SETTINGS,
                     NOTE_STALE, NOTE_UNPIN, TransactionStatus)
from .session import Session
from .siblings import Siblings
from .statements import ProtocolViolation, Statement, StatementRegistry, length_word
from .stream import EPOLLIN, EPOLLOUT, HIGH_WATER, READABLE, RECV_SIZE, SPLICE_REFUSED, Stream, release_memory

logger = log.get("backend")

IDLE: Final = SessionState.IDLE
ACTIVE: Final = SessionState.ACTIVE
WAITING: Final = SessionState.WAITING
RESTORING: Final = SessionState.RESTORING
CLOSED: Final = SessionState.CLOSED
SERVER_IDLE: Final = ServerState.IDLE
SERVER_ACTIVE: Final = ServerState.ACTIVE
CONNECTING: Final = ServerState.CONNECTING
LOGIN: Final = ServerState.LOGIN
SERVER_CLOSED: Final = ServerState.CLOSED
TX_IDLE: Final = int(TransactionStatus.IDLE)
# Events taken by one epoll.poll(): without a bound CPython allocates room for 1,023 on
# every call (about 190 instructions a turn); more than this many ready sockets are
# served on the next turn (epoll is level-triggered).
MAX_EVENTS: Final = 256
_TRANSACTIONS: Final = status.TRANSACTIONS
_QUERIES: Final = status.QUERIES
_BYTES_IN: Final = status.BYTES_IN
_BYTES_OUT: Final = status.BYTES_OUT
_XACT_US: Final = status.XACT_US
_WAIT_US: Final = status.WAIT_US
_WAITS: Final = status.WAITS
_XACT_HIST: Final = status.XACT_HIST
_WAIT_HIST: Final = status.WAIT_HIST
_TURNS: Final = status.TURNS
_READY_SUM: Final = status.READY_SUM
_WAITING: Final = status.WAITING
_OWNER_SINCE_MS: Final = status.OWNER_SINCE_MS
_BOUNDS_S: Final = status.HISTOGRAM_BOUNDS_S
_STAT_INDEXES: Final = tuple(status.FIELDS.index(name) for name in status.STAT_FIELDS)

COPY_FAIL: Final = protocol.message(b"f", protocol.cstring("client disconnected"))
# Ends a half-sent pipeline of a vanished client with an error, so that the
# Sync after it rolls its implicit transaction back instead of committing it.
ABORT_PIPELINE: Final = protocol.message(b"E", protocol.cstring("pgforkpool.abort") + b"\0\0\0\0")

# Upstream failures worth dialing again for (a restart, a failover, an outage);
# others (no such database, authentication) are told to the waiting sessions.
TRANSIENT_FAILURES: Final = frozenset({"57P01", "57P02", "57P03", "08000", "08001", "08003", "08004",
                                "08006", "53300"})
# A retiring backend (session_pool_size lowered) hands on at most this many sessions at once.
MOVE_OUT_BATCH: Final = 32
# Session migration: how often a backend whose waiting sessions found every sibling busy looks again.
MIGRATION_RECHECK: Final = 0.05
# Sessions whose buffered input and prepared-statement texts are larger than this stay
# (the state travels as one message on the postmaster's channel, channel.MAX_MESSAGE).
MIGRATION_STATE_LIMIT: Final = 1 << 18
# How stale the published time a connection changed hands may be (see _publish_owner_since),
# at most a quarter of session_migration_delay.
OWNER_SINCE_GRAIN: Final = 0.0025
# ... and how long it takes the transaction of a session that has not finished one yet to be.
UNKNOWN_XACT: Final = 1.0
REDIAL_FIRST: Final = 0.1
REDIAL_MAX: Final = 2.0

# Greeting parameter sets remembered per distinct context.
GREETING_CACHE_SIZE: Final = 64

# Kinds of hidden queries.
RESTORE: Final = "restore"         # put the owner's settings on the server
CAPTURE: Final = "capture"         # read back settings the owner may have changed
FIXUP: Final = "fixup"             # after RESET/DISCARD: the owner's startup values again
ROLLBACK: Final = "rollback"       # end the transaction of a client that vanished
DEALLOCATE: Final = "deallocate"   # close statements no session holds any more
PIN_CHECK: Final = "pin check"     # does the owner hold state that cannot be copied?
DISARM: Final = "disarm"           # idle_session_timeout off while the shared connection idles


class PooledBackend:
    def __init__(self, settings, database: str, user: str, chan: socket.socket,
                 table: status.StatusTable | None, slot: int | None, secret: str | None):
        self.settings = settings
        self.database = database
        self.user = user
        self.chan = chan
        self.secret = secret
        self.pid = os.getpid()
        self.epoll = select.epoll()
        self.handlers: dict[int, Callable[[int], None]] = {}
        self.sessions: dict[int, Session] = {}       # by client fd
        # Sessions by the (pid, key) their client was told in BackendKeyData: a session that
        # moved here keeps its first backend's pid (origin_pid), so keys only differ per origin.
        self.by_key: dict[tuple[int, int], Session] = {}
        # Keys of sessions that began here and moved away, still in use by their clients:
        # never given to a new session here (the postmaster says when one is free again).
        self.moved_keys: set[int] = set()
        self.scheduler = Scheduler()
        self.server: srv.ServerConnection | None = None   # the shared connection
        self.cancels: dict[int, srv.CancelSender] = {}
        self.greetings: dict[frozenset, dict[str, str]] = {}
        self.registry = StatementRegistry(settings.prepared_statement_cache_size)
        self.pinned_count = 0
        self.counters = (table.counters(slot) if table is not None and slot is not None
                         else memoryview(bytearray(status.INT_BYTES)).cast("q"))
        self.shutdown_mode: str | None = None
        # session_pool_size was lowered: this backend takes no new session, and its sessions
        # move to the pool's other backends between their transactions; it exits when empty.
        self.retiring = False
        self.title_at = 0.0
        self.title = ""
        self.empty_since = time.monotonic()   # when the last session left (idle_pool_backend_timeout)
        self.idle_reported = False
        self.trim_memory = False               # bulk traffic passed: hand memory back at housekeeping
        # Read every turn of the loop: a plain attribute, not a Settings lookup.
        self.idle_timeout = settings.idle_pool_backend_timeout
        # SHOW STATS's figures.  The hot path only appends a duration or adds to an
        # attribute; _housekeeping sums, buckets and publishes them at least once a second.
        self.stats = [0] * len(status.FIELDS)   # cumulative, by status-table index
        self.xact_times: list[float] = []       # seconds each transaction held the connection
        self.wait_times: list[float] = []       # seconds each session waited for it
        self.bytes_in = self.bytes_out = self.queries = 0
        self.now = time.monotonic()   # the current turn of the event loop began
        # PAUSE from the admin console: no transaction starts, the shared
        # connection is closed once free; the console's question waits for that.
        self.paused = False
        self.pause_tokens: list[int] = []
        # The upstream is down or restarting: sessions that need a server wait
        # (bounded by query_wait_timeout) while the backend dials again with backoff.
        self.redial_at = 0.0
        self.redial_delay = 0.0
        self.poll_timeout = 1.0
        self.server_error: PgError | None = None   # why the last dial failed
        self.ever_connected = False   # a first dial that fails is a configuration error: told at once
        # Session migration: waiting sessions move to a backend of the pool that could
        # serve them now, found in the status table.
        self.table = table
        self.siblings = (Siblings(table.all_ints(), self.counters[status.POOL], self.pid,
                                  settings.max_sessions)
                         if table is not None else None)
        self.migrate_at = 0.0
        self.owner_published = 0.0   # when OWNER_SINCE_MS was last written
        self._apply_migration_settings()
        self.migrations = 0

    # ================================================================ event loop

    def run(self) -> None:
        self.chan.setblocking(False)
        self.epoll.register(self.chan.fileno(), EPOLLIN)
        self.handlers[self.chan.fileno()] = self._on_channel
        counters = self.counters
        poll = self.epoll.poll
        handlers = self.handlers
        sessions = self.sessions
        queue = self.scheduler.queue
        monotonic = time.monotonic
        # pg_backend_load_average's figures, kept in locals (a shared-memory update per turn
        # costs more than the rest of a turn's bookkeeping) and published with the stats.
        turns = ready_sum = 0
        while True:
            # Deadlines (login, cancels, idle timeout, shutdown) are kept by
            # _housekeeping, at least once a second; no per-turn computation.
            delay = self.migration_delay
            # While sessions wait, wake every session_migration_delay to look for a free sibling.
            server = self.server
            short_poll = (bool(delay and queue) and delay < self.poll_timeout and server is not None
                          and server.state is SERVER_ACTIVE and not self.paused)
            events = poll(min(self.poll_timeout, max(delay, self.migrate_at - self.now))
                          if short_poll else self.poll_timeout, MAX_EVENTS)
            now = self.now = monotonic()   # the time of this turn, for every figure it records
            for fd, mask in events:
                # Client sockets and the shared connection straight to their methods (a
                # direct call when compiled); pinned connections, cancels and the channel
                # through their handlers.
                session = sessions.get(fd)
                if session is not None:
                    self._on_client(session, mask)
                    continue
                server = self.server
                if server is not None and server.fd == fd:
                    self._on_server(server, mask)
                    continue
                handler = handlers.get(fd)
                if handler is not None:
                    handler(mask)
            if queue and delay and now >= self.migrate_at:
                self._migrate_waiting(now)
            server = self.server
            ready = len(queue) + (server is not None and server.owner is not None)
            if events or not short_poll:   # a wake-up to look for siblings is not a turn
                turns += 1
                ready_sum += ready
            counters[_WAITING] = ready   # live: the load-balancing policy reads it
            if (not events and not short_poll) or now > self.title_at:
                counters[_TURNS], counters[_READY_SUM] = turns, ready_sum
                self._housekeeping()
                if self.shutdown_mode is not None and not self.sessions and not self.retiring:
                    self._on_channel(0)   # a session on its way here (moved) keeps us going
                    if not self.sessions:
                        break
        counters[_TURNS], counters[_READY_SUM] = turns, ready_sum
        self._publish_stats()
        if self.server is not None:
            self.server.close()
        os._exit(0)

    def _publish_stats(self) -> None:
        """SHOW STATS's figures, counted in a plain list on the hot path, into the status table."""
        stats = self.stats
        for times, total, count, histogram in ((self.xact_times, _XACT_US, _TRANSACTIONS, _XACT_HIST),
                                               (self.wait_times, _WAIT_US, _WAITS, _WAIT_HIST)):
            if times:
                times.sort()
                stats[count] += len(times)
                stats[total] += int(sum(times) * 1e6)
                below = 0
                for bucket, bound in enumerate(_BOUNDS_S):
                    upto = bisect_right(times, bound)
                    stats[histogram + bucket] += upto - below
                    below = upto
                stats[histogram + len(_BOUNDS_S)] += len(times) - below
                times.clear()
        stats[_QUERIES], stats[_BYTES_IN], stats[_BYTES_OUT] = self.queries, self.bytes_in, self.bytes_out
        counters = self.counters
        for index in _STAT_INDEXES:
            counters[index] = stats[index]

    def _housekeeping(self) -> None:
        now = time.monotonic()
        self._publish_stats()
        server = self.server
        if (server is not None and server.state in (ServerState.CONNECTING, ServerState.LOGIN)
                and now > server.deadline):
            self._server_failed(server, PgError("sqlclient_unable_to_establish_sqlconnection",
                                                "timeout expired while connecting to upstream server"))
        for sender in list(self.cancels.values()):
            if now > sender.deadline:
                self._cancel_done(sender)
        if (self.idle_timeout and not self.sessions and not self.idle_reported
                and now - self.empty_since >= self.idle_timeout):
            # The postmaster decides: it retires us only if it has sent us no new session.
            self.idle_reported = True
            self._tell(("idle",))
        if self.trim_memory:
            self.trim_memory = False
            release_memory()
        if self.redial_at and now >= self.redial_at:
            self.redial_at = 0.0
            self.poll_timeout = 1.0
            if self.server is None and self.scheduler.queue:
                self._connect()
        if self.scheduler.queue and self.settings.query_wait_timeout:
            self._expire_waits(now)
        if self.settings.idle_in_transaction_session_timeout:
            self._expire_idle_transactions(now)
        self._expire_idle_sessions(now)
        if self.retiring:
            self._move_out(now)
        self._update_title()
        self.title_at = now + 1.0   # next housekeeping while busy

    def _expire_waits(self, now: float) -> None:
        """query_wait_timeout: a session that waited too long is answered with an error."""
        timeout = self.settings.query_wait_timeout
        for session in list(self.scheduler.queue):
            if session.state is SessionState.STARTING and now - session.since >= timeout:
                # Never greeted: the upstream could not be reached, or the pool was busy, all this time.
                error = self.server_error or PgError(
                    "query_canceled", f"no server connection of pool {self.database}/{self.user} "
                    f"became free within query_wait_timeout "
                    f"({self.settings.setting_text('query_wait_timeout')})")
                error.severity = "FATAL"
                self._client_send(session, error.packet())
                self._close_session(session)
                continue
            if (session.state is not WAITING or session.pinned is not None
                    or now - session.since < timeout or not session.proto.drop_request()):
                continue
            self.scheduler.drop_wait(session)
            logger.log(log.LOG, "%s: no server connection became free in %.1f s; query canceled",
                       session, now - session.since)
            error = PgError("query_canceled", "canceling statement due to query_wait_timeout: no "
                            f"server connection of pool {self.database}/{self.user} became free "
                            f"within {self.settings.setting_text('query_wait_timeout')}",
                            severity="ERROR",
                            hint="The pool was busy: its server connections were held by other "
                                 "sessions' transactions. The session is still usable.")
            self._answer_dropped(session, error)

    def _answer_dropped(self, session: Session, error: PgError) -> None:
        """A waiting session's request was dropped unrun (and the session taken out of the
        queue): the client gets the error and ReadyForQuery, as PostgreSQL answers a failed
        request; what it sent after that request waits its turn afresh."""
        self._client_send(session, error.packet() + protocol.ready_for_query(b"I"))
        session.resume_input()
        if session.proto.ready() is True:
            self._enqueue(session)

    def _expire_idle_transactions(self, now: float) -> None:
        """idle_in_transaction_session_timeout: end such a session, as PostgreSQL does.

        A client that stopped in the middle of a message it streams holds the
        connection the same way, in a transaction or not (PostgreSQL, reading
        that message, would only block itself): it is ended too once nothing
        of the message has come for that long.
        """
        timeout = self.settings.idle_in_transaction_session_timeout
        for session in list(self.sessions.values()):
            server = session.pinned or self.server
            if (server is None or server.owner is not session or not session.idle_since
                    or now - session.idle_since < timeout):
                continue
            in_transaction = server.status != TX_IDLE
            if session.proto.passthrough:
                if not in_transaction and session.pinned is not None:
                    continue   # its own connection, outside a transaction: it blocks only itself
                if session.paused or server.stream.outbuf:
                    # Not the client's doing: the server is not reading (a COPY waiting for a
                    # lock, a statement ahead of the message), so the pooler stopped reading it.
                    session.idle_since = now
                    continue
                error = (PgError("25P03", "terminating connection due to idle-in-transaction timeout")
                         if in_transaction else
                         PgError("57P05", "terminating connection due to idle-session timeout"))
                error.detail = ("The rest of a message did not come within "
                                "idle_in_transaction_session_timeout "
                                f"({self.settings.setting_text('idle_in_transaction_session_timeout')}) "
                                "while the session held a server connection of the pool.")
                logger.log(log.LOG, "%s: terminating connection: stopped in the middle of a message "
                           "for %.1f s while holding server connection %d", session,
                           now - session.idle_since, server.pid)
            elif not in_transaction or server.pending or server.unsynced:
                continue
            else:
                error = PgError("25P03", "terminating connection due to idle-in-transaction timeout")
                logger.log(log.LOG, "%s: terminating connection due to idle-in-transaction timeout",
                           session)
            self._client_send(session, error.packet())
            self._client_gone(session)   # its transaction is rolled back before anyone else's turn

    def _expire_idle_sessions(self, now: float) -> None:
        """A session's own idle_session_timeout, where it shares a connection: the session is
        ended, as PostgreSQL ends an idle session, once it has had nothing to run for that long
        (looked at once a second).  A pinned session's own connection keeps it on the server."""
        for session in list(self.sessions.values()):
            timeout = session.idle_session_timeout
            if (timeout <= 0.0 or session.state is not IDLE or session.pinned is not None
                    or session.gone or session.proto.buf or session.proto.passthrough
                    or now - session.quiet_since < timeout):
                continue
            logger.log(log.LOG, "%s: terminating connection due to idle-session timeout (%.1f s)",
                       session, now - session.quiet_since)
            self._client_send(session, PgError(
                "57P05", "terminating connection due to idle-session timeout").packet())
            self._close_session(session)

    def _update_title(self) -> None:
        title = (f"backend {self.database}/{self.user} {len(self.sessions)} sessions "
                 f"{self.scheduler.waiting()} waiting")
        if title != self.title:
            process.set_title(title)
            self.title = title
        self.counters[status.SESSIONS] = len(self.sessions)

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
                if fd is None:   # the postmaster always sends the socket with it
                    logger.warning("a session was handed over without its socket")
                    self._tell(("closed", msg[1]))
                    continue
                self._new_session(msg[1], msg[2], fd)
            elif kind == "cancel":
                self._cancel(msg[1], msg[2])
            elif kind == "key_free":
                self.moved_keys.discard(msg[1])
            elif kind == "reload":
                self.settings = msg[1]
                self.secret = msg[2]
                self.registry.cache_size = self.settings.prepared_statement_cache_size
                self.idle_timeout = self.settings.idle_pool_backend_timeout
                self._apply_migration_settings()
                if self.siblings is not None:
                    self.siblings.max_sessions = self.settings.max_sessions
            elif kind == "adopt":
                if fd is None:
                    logger.warning("a moved session was handed over without its socket")
                    self._tell(("closed", msg[1]))
                    continue
                self._adopt(msg[1], msg[2], fd, msg[3])
            elif kind == "shutdown":
                self._shutdown(msg[1])
            elif kind == "retire":
                self._retire()
            elif kind == "ask":
                self._ask(msg[1], msg[2], msg[3])

    def _tell(self, message: tuple) -> None:
        """A message to the postmaster.  The channel is non-blocking; a full one (the
        postmaster busy, migrations' large messages queued) is waited for, up to 10 s, rather
        than the message lost or the backend ended."""
        try:
            channel.send(self.chan, message)
            return
        except BlockingIOError:
            pass
        except OSError as exc:   # the postmaster is gone: the channel's EOF ends us
            logger.warning("could not send \"%s\" to the postmaster: %s", message[0], exc)
            return
        self.chan.settimeout(10.0)
        try:
            channel.send(self.chan, message)
        except OSError as exc:
            logger.error("could not send \"%s\" to the postmaster: %s", message[0], exc)
        finally:
            self.chan.setblocking(False)

    def _answer(self, token: int, rows: list) -> None:
        """The answer to a console question; a full channel is waited for like any other
        message, so the console does not wait out its timeout for an answer dropped here."""
        self._tell(("answer", token, rows))

    def _ask(self, token: int, what: str, argument) -> None:
        """A question of the admin console, relayed by the postmaster."""
        if what == "report":
            self._answer(token, self._report())
        elif what == "kill":
            session = next((s for s in self.sessions.values() if s.conn_id == argument), None)
            if session is None:
                self._answer(token, [])
                return
            logger.log(log.LOG, "%s: terminated by the admin console", session)
            self._client_send(session, PgError(
                "admin_shutdown", "terminating connection due to administrator command").packet())
            self._client_gone(session)
            self._answer(token, [argument])
        elif what == "pause":
            if argument is not None and argument != self.database:
                self._answer(token, [])
                return
            self.paused = True
            self.counters[status.PAUSED] = 1
            self.pause_tokens.append(token)
            self._pause_step()
        elif what == "resume":
            if argument is not None and argument != self.database:
                self._answer(token, [])
                return
            was_paused = self.paused
            self.paused = False
            self.counters[status.PAUSED] = 0
            for pending in self.pause_tokens:
                self._answer(pending, [False])
            self.pause_tokens.clear()
            if was_paused:
                logger.log(log.LOG, "pool %s/%s resumed", self.database, self.user)
            if self.scheduler.queue:
                if self.server is None:
                    self._connect()
                elif self.server.state is SERVER_IDLE and self.server.owner is None:
                    self._next_session(self.server)
            self._answer(token, [True])
        else:
            self._answer(token, [])

    def _pause_step(self) -> None:
        """Paused: close the shared connection once no transaction runs on it."""
        server = self.server
        if server is not None:
            if server.owner is not None or server.pending or server.unsynced:
                return   # _release comes back here
            self._close_server(server)
            logger.log(log.LOG, "pool %s/%s paused: server connection %d closed",
                       self.database, self.user, server.pid)
        for token in self.pause_tokens:
            self._answer(token, [True])
        self.pause_tokens.clear()

    def _report(self) -> list[dict]:
        """One row per session, as SHOW SESSIONS lists them."""
        now, wall = time.monotonic(), time.time()
        rows = []
        for session in self.sessions.values():
            server = session.pinned or self.server
            state = session.state
            if state is WAITING or (state is SessionState.STARTING and not session.greeted):
                name, since = "waiting", session.since
            elif server is not None and server.owner is session:
                in_xact = server.status != TX_IDLE
                name, since = ("in transaction" if in_xact else "active"), server.since
            else:
                name, since = "idle", None
            if session.pinned is not None and name == "idle":
                name = "pinned"
            host, _, port = session.address.rpartition(":")
            rows.append({
                "id": session.conn_id, "address": host or "unix", "port": int(port) if port.isdigit() else None,
                "database": session.database, "user": session.user,
                "application_name": session.context.settings.get(
                    "application_name", session.context.startup.get("application_name", "")),
                "backend_pid": self.pid, "state": name, "connected": session.connected,
                "since": wall - (now - since) if since else None,
                "wait": round(now - session.since, 6) if name == "waiting" and session.since else 0.0,
                "pinned": session.pinned is not None,
            })
        # The backend's server connections (SHOW BACKENDS), on a row of their own.
        pids = [] if self.server is None else [self.server.pid]
        pids += [s.pinned.pid for s in self.sessions.values() if s.pinned is not None]
        rows.append({"session": False, "backend_pid": self.pid, "server_pids": pids,
                     "database": self.database, "user": self.user})
        return rows

    def _shutdown(self, mode: str) -> None:
        self.shutdown_mode = mode
        self.retiring = False   # the whole pooler stops: its siblings take no session either
        if mode == "smart":
            return
        # Queries running for the sessions it ends are cancelled first: closing the
        # connection alone would leave them running on the server.
        servers = [self.server] + [s.pinned for s in self.sessions.values() if s.pinned is not None]
        for server in servers:
            if server is not None and server.state is not SERVER_CLOSED and (
                    server.pending or server.unsynced or server.status != TX_IDLE):
                server.cancel_now(self.settings)
        error = PgError("admin_shutdown", "terminating connection due to administrator command")
        for session in list(self.sessions.values()):
            self._client_send(session, error.packet())
            self._close_session(session)

    # ================================================================ session migration

    def _retire(self) -> None:
        """session_pool_size was lowered below the pool's number of backends: we are one too many.
        No new session comes (the postmaster sends none); ours move to the other backends as
        they finish their transactions.  Once the last has gone, the postmaster, which
        knows whether one is coming back (its target was full), tells us to shut down, and
        we exit with our server connection.  A pinned session stays until its state is gone
        or it ends."""
        if self.shutdown_mode is not None:
            return
        self.shutdown_mode = "smart"
        self.retiring = True
        logger.log(log.LOG, "pooled backend of %s/%s retiring (session_pool_size lowered): %d sessions "
                   "move to the other backends of the pool", self.database, self.user, len(self.sessions))
        self._move_out(self.now)

    def _move_out(self, now: float, only: Session | None = None) -> None:
        """A retiring backend hands its sessions that are between transactions (`only`: that
        one) to the open siblings with the fewest sessions, at most MOVE_OUT_BATCH at a time
        (each is a message with a socket on the postmaster's channel); the rest go later."""
        if self.siblings is None or self.paused:
            return
        room = self.siblings.room(now)
        if not room:
            return
        candidates = [only] if only is not None else list(self.sessions.values())
        moved = 0
        for session in candidates:
            if not self._movable(session):
                continue
            target = max(room, key=room.__getitem__)   # the fewest sessions: the most room
            if room[target] <= 0 or moved >= MOVE_OUT_BATCH:
                return
            if not self._migrate(session, target):
                return   # the channel is full: the next housekeeping goes on
            room[target] -= 1
            moved += 1

    def _migrate_waiting(self, now: float) -> None:
        """Move sessions that waited session_migration_delay to backends of the pool that are idle."""
        delay = self.migration_delay
        self.migrate_at = now + delay
        self.gather_long = False
        server = self.server
        siblings = self.siblings
        if (siblings is None or server is None or server.state is not SERVER_ACTIVE
                or self.paused or self.shutdown_mode is not None):
            return
        # Only sessions whose last transaction was shorter than the current owner has held the
        # connection so far: a quick one stuck behind a long one moves, the long ones stay, so
        # that long transactions do not spread over every backend of the pool.
        # A session that has not finished a transaction here yet is taken for a long one
        # (UNKNOWN_XACT): it moves only away from a connection held that long.
        held = now - server.since
        # A connection whose owner sits idle in its transaction (or in the middle of a message
        # it streams) waits on that client, for as long as it likes (an application's own open
        # transaction, say): then any waiting session moves, whatever its history.
        owner = server.owner
        stalled = (owner is not None and owner.idle_since > 0.0 and now - owner.idle_since >= delay
                   and (owner.proto.passthrough > 0
                        or (server.status != TX_IDLE and not server.pending and not server.unsynced)))
        movable = [session for session in self.scheduler.queue
                   if session.state is WAITING and now - session.since >= delay
                   and (stalled or (session.last_xact or UNKNOWN_XACT) < held)
                   and self._movable(session)]
        if not movable:
            return
        # Ready to run here: the waiting sessions and the owner.  With load-balancing, a
        # sibling with at least two fewer takes one too, which evens the queues out.
        balance = len(self.scheduler.queue) + 1 if self.settings.session_schedule == "load-balancing" else 0
        targets = siblings.free_then_lighter(now, balance)
        for target in targets:
            if not movable:
                break
            self._migrate(movable.pop(0), target)
        if movable and held >= delay:
            # The owner here runs a long transaction.  Sessions whose own transactions are
            # short also run at once on a sibling that is passing short ones (its connection
            # changed hands less than session_migration_delay ago), though it is seldom free
            # at the instant we look: without this, they wait out every long transaction
            # here while such a sibling serves the rest of the pool.  The long ones still
            # stay (only to a free sibling), so that they do not spread over the pool.
            short = [session for session in movable if 0.0 < session.last_xact < delay]
            if short:
                flowing = siblings.flowing(now, self._delay_ago_ms(now), targets)
                targets = targets + flowing
                for target in flowing:
                    if not short:
                        break
                    self._migrate(short.pop(0), target)
                # Nowhere to go: every connection of the pool is held by a long transaction.
                # Then the long one here moves when it ends, to a sibling held by a long
                # one too, and leaves this backend to the short ones (_gather).
                self.gather_long = not targets
        if not targets:
            # Every sibling is busy too: look again less often (each look is a wake-up).
            self.migrate_at = now + max(delay, MIGRATION_RECHECK)

    def _apply_migration_settings(self) -> None:
        """session_migration and its delay, at start and on reload."""
        settings = self.settings
        self.migration_delay = settings.session_migration_delay if settings.session_migration else 0.0
        # Without migration no sibling reads OWNER_SINCE_MS: it is not written at all.
        self.owner_grain = (min(OWNER_SINCE_GRAIN, self.migration_delay / 4) if self.migration_delay
                            else math.inf)
        # Every sibling was held by a long transaction too while short sessions waited here:
        # the long one here moves, when it ends, to such a sibling (see _gather).
        self.gather_long = False

    @staticmethod
    def _movable(session: Session) -> bool:
        """Between transactions (idle or waiting), sharing, greeted, and with nothing half-done
        on either side."""
        proto = session.proto
        state = session.state
        return ((state is IDLE or state is WAITING)
                and session.pinned is None and session.greeted and not session.gone
                and not session.paused and not session.dirty and not session.pin_check
                and not session.prepared_xacts and not session.stream.outbuf
                and not proto.passthrough
                # what travels must fit one channel message, with room to spare
                and len(proto.buf) + sum(len(st.key) for st in proto.statements.values())
                < MIGRATION_STATE_LIMIT)

    def _delay_ago_ms(self, now: float) -> int:
        """session_migration_delay before now, as OWNER_SINCE_MS counts: a sibling whose
        connection changed hands after it passes short transactions, one before it is held long."""
        return int((now - self.migration_delay) * 1000.0)

    def _hand_over(self, server: srv.ServerConnection) -> None:
        """The connection changes hands now: its owner's time starts, and the shared
        connection's hand-over is published for the siblings (at most every owner_grain)."""
        now = server.since = self.now
        if server is self.server and now - self.owner_published >= self.owner_grain:
            self._publish_owner_since(now)

    def _publish_owner_since(self, now: float) -> None:
        """When the connection's owner got it, for the siblings (status.OWNER_SINCE_MS).  Written
        at most every owner_grain: at a few hundred transactions a second the write costs
        more than the rest of a hand-over, and a figure up to that much older than the truth
        still tells a connection passing short transactions from one held by a long one."""
        self.owner_published = now
        self.counters[_OWNER_SINCE_MS] = int(now * 1000.0)

    def _gather(self, session: Session) -> None:
        """A long transaction just ended here while short sessions found every backend of the pool
        held by a long one: its session moves to a sibling held by a long transaction too (it
        waits its turn there between its transactions), which leaves this backend to the short
        ones, and the short ones of the other backends move here once it is passing them.
        Only to a sibling with a lower pid, so that two backends never swap theirs."""
        self.gather_long = False
        if (self.siblings is None or self.paused or self.shutdown_mode is not None
                or not self._movable(session)):
            return
        target = self.siblings.held_long(self.now, self._delay_ago_ms(self.now))
        if target is not None:
            self._migrate(session, target)

    def _migrate(self, session: Session, target: int) -> bool:
        """Hand a waiting session, with its socket and everything it holds here, to backend `target`.

        The postmaster passes it on (or back to us, if the target is gone).  What
        the client sends meanwhile stays in the socket for the adopter to read.
        """
        proto = session.proto
        state = {
            "key": session.key, "origin_pid": session.origin_pid,
            "last_xact": session.last_xact, "since": session.since,
            "address": session.address, "connected": session.connected,
            "context": session.context.to_dict(), "buf": bytes(proto.buf),
            "statements": [(name, st.key, st.flags, st.shape, st.params)
                           for name, st in proto.statements.items()],
            "unnamed": None if proto.unnamed is None else (proto.unnamed.key, proto.unnamed.flags),
        }
        try:
            channel.send(self.chan, ("migrate", session.conn_id, target, state), session.fd)
        except OSError as exc:
            logger.warning("%s: could not be moved to backend %d: %s", session, target, exc)
            return False
        if state["origin_pid"] == self.pid:
            self.moved_keys.add(session.key)
        self._detach(session)   # our copy of the socket closes: the client's connection lives on
        self.migrations += 1
        self.counters[status.MIGRATIONS] = self.migrations
        logger.debug("%s: moved to backend %d after waiting %.1f ms", session, target,
                     (self.now - session.since) * 1000)
        return True

    def _adopt(self, conn_id: int, state: dict, fd: int, returned: bool = False) -> None:
        """A session another backend of the pool handed over: it goes on here as if it had always been.

        returned: it is one of ours that the postmaster sent back (its target was full or
        gone): it was not moved, and it waits first in line again, where it was.
        """
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        session = Session(Stream(sock, self.epoll), conn_id, {"user": self.user, "database": self.database},
                          self.registry, state["address"])
        session.key = state["key"]
        session.origin_pid = state["origin_pid"]
        session.last_xact = state["last_xact"]
        session.connected = state["connected"]
        session.context = Context.from_dict(state["context"])
        session.settings_changed()
        session.greeted = True
        session.state = IDLE
        proto = session.proto
        for name, key, flags, shape, params in state["statements"]:
            proto.statements[name] = self.registry.adopt(key, flags, proto.scope, shape, params)
        if state["unnamed"] is not None:
            proto.unnamed = Statement(b"", state["unnamed"][0], state["unnamed"][1])
        if session.origin_pid == self.pid:   # back where it began
            self.moved_keys.discard(session.key)
        if returned:
            self.migrations -= 1
            self.counters[status.MIGRATIONS] = self.migrations
        self._register(session)
        if self.shutdown_mode is not None and self.shutdown_mode != "smart":
            # It was on its way while the pooler began a fast shutdown: end it as the others were.
            self._client_send(session, PgError(
                "admin_shutdown", "terminating connection due to administrator command").packet())
            self._close_session(session)
            return
        proto.buf += state["buf"]
        ready = proto.ready()
        if type(ready) is ProtocolViolation:
            self._protocol_violation(session, ready.text)
        elif ready:
            self._enqueue(session)
            # Its wait goes on from when it began (CLOCK_MONOTONIC is the same in every process):
            # query_wait_timeout and SHOW STATS count it whole.
            if session.state is WAITING:
                session.since = state["since"]
                if returned:
                    self.scheduler.first_in_line(session)
            else:
                self.wait_times.append(self.now - state["since"])

    # ================================================================ sessions

    def _new_session(self, conn_id: int, startup: dict[str, str], fd: int) -> None:
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        address = ""
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                address = "%s:%s" % sock.getpeername()[:2]
            except OSError:
                pass
        try:
            session = Session(Stream(sock, self.epoll), conn_id, startup, self.registry, address)
        except ValueError as exc:   # a malformed `options` string
            try:
                sock.send(PgError("protocol_violation", str(exc)).packet())
            except OSError:
                pass
            self.epoll.unregister(fd)
            sock.close()
            self._tell(("closed", conn_id))
            return
        session.origin_pid = self.pid
        while session.cancel_id in self.by_key or session.key in self.moved_keys:
            session.key = secrets.randbits(31) or 1
        self._register(session)
        self.counters[status.SERVED] += 1
        # A context the pooler has greeted before needs no trip to the server.
        known = self.greetings.get(frozenset(session.settings.items()))
        if known is not None:
            self._greet(session, known)
        else:
            self._enqueue(session)

    def _on_client(self, session: Session, mask: int) -> None:
        if mask & EPOLLOUT:
            self._client_writable(session)
            if not mask & READABLE or session.state is CLOSED:
                return
        # Readable.  (A native call when compiled: no copy of Stream.recv inlined here.)
        proto = session.proto
        if proto.passthrough and not proto.scanning and session.state is ACTIVE and self._splice(session):
            return
        data = session.stream.recv()
        if data is None:
            return
        if not data:
            self._client_gone(session)
            return
        self.bytes_in += len(data)
        if len(data) == RECV_SIZE:
            self.trim_memory = True
        state = session.state
        if state is ACTIVE:
            server = session.pinned or self.server
            assert server is not None, "an active session has a server connection"
            self._forward(session, server, data)
            return
        proto = session.proto
        if state is IDLE and not proto.buf:
            # The common case: a whole message from an idle session, the server
            # connection free and already in this session's context.
            server = self.server
            if (server is not None and server.state is SERVER_IDLE and not self.scheduler.queue
                    and session.pinned is None and not self.registry.evicted
                    and (server.context is session.context.settings
                         or (server.unknown_by is None and server.context == session.context.settings))
                    and len(data) >= 5 and len(data) > length_word(data, 1)):
                self.scheduler.assign(server, session)
                self._hand_over(server)
                server.context = session.context.settings
                self._forward(session, server, data)
                return
        ready = proto.buffer(data)
        if type(ready) is ProtocolViolation:
            self._protocol_violation(session, ready.text)
            return
        if len(proto.buf) >= WAITING_INPUT_LIMIT:
            session.pause_input()
        if ready and state is IDLE:
            server = self.server
            if session.pinned is None and server is not None and server.state is not SERVER_IDLE:
                self.scheduler.wait(session)   # the connection is busy: _enqueue's last line
            else:
                self._enqueue(session)

    def _forward(self, session: Session, server: srv.ServerConnection, data: bytes) -> None:
        """Pass what the owner sent to the server."""
        proto = session.proto
        streaming = proto.passthrough
        out, outcome = proto.receive(data, server)
        if streaming or proto.passthrough:
            session.idle_since = self.now   # a piece of a streamed message: idle from now on
        if out:
            stream = server.stream
            stream.send(out)
            if stream.outbuf and len(stream.outbuf) > HIGH_WATER:
                session.pause_input()
        if outcome is not None:
            if type(outcome) is ProtocolViolation:
                self._protocol_violation(session, outcome.text)
            else:   # TERMINATE
                self._client_gone(session)
            return
        if proto.need == HOLDING and len(proto.buf) >= WAITING_INPUT_LIMIT:
            session.pause_input()   # until the check it waits for is answered (_checked)
        if (not server.pending and not server.unsynced and server.status == TX_IDLE
                and server.owner is session and len(session.proto.buf) < WAITING_INPUT_LIMIT):
            # Only messages that expect no answer (Flush, stray CopyData): nothing holds the server.
            self._boundary(server)

    def _splice(self, session: Session) -> bool:
        """The owner streams the body of a large message (a Bind's value, CopyData): pass what
        it has of it to the server inside the kernel, without reading it here (Stream.splice_in).
        False when it must go the copying way: output waits before it, or splice is refused."""
        server = session.pinned or self.server
        assert server is not None, "an active session has a server connection"
        stream = server.stream
        if stream.outbuf or stream.piped or stream.broken:
            return False
        proto = session.proto
        taken = stream.splice_in(session.stream.fd, proto.passthrough)
        if taken == SPLICE_REFUSED:
            return False
        if taken == 0:
            self._client_gone(session)
        elif taken > 0:
            self.bytes_in += taken
            proto.spliced(taken)
            session.idle_since = self.now   # a piece of a streamed message: idle from now on
            if stream.piped:
                session.pause_input()   # until the server has taken it (_server_writable)
            if not proto.passthrough:
                self._forward(session, server, b"")   # the message is whole: what ends with it
        return True

    def _enqueue(self, session: Session) -> None:
        """The session has input to run: give it its connection, or queue it."""
        pinned = session.pinned
        if pinned is not None:   # its own connection: no queue
            if pinned.state is SERVER_IDLE:
                self._activate(pinned, session)
            else:
                self.scheduler.wait_own(session)   # goes on when its connection is free (_cancel_done)
            return
        server = self.server
        if server is not None and server.state is SERVER_IDLE and not self.scheduler.queue:
            self._activate(server, session)
            return
        self.scheduler.wait(session)
        if server is None:
            self._connect()

    def _client_send(self, session: Session, data: bytes) -> None:
        if session.gone:
            return
        stream = session.stream
        stream.send(data)
        if stream.outbuf and len(stream.outbuf) > HIGH_WATER:
            server = session.pinned or self.server
            if server is not None and server.owner is session or (
                    server is not None and server.pinned is session):
                server.stream.pause_reading()   # until the client has read some

    def _client_writable(self, session: Session) -> None:
        stream = session.stream
        stream.flush()
        if stream.broken:
            self._client_gone(session)
            return
        if stream.has_room():
            server = session.pinned or self.server
            if server is not None and (server.owner is session or server.pinned is session):
                server.stream.resume_reading()

    def _greet(self, session: Session, params: dict[str, str]) -> None:
        """What PostgreSQL sends after AuthenticationOk: parameters, cancel key, ReadyForQuery."""
        out = [protocol.parameter_status(name, value) for name, value in params.items()]
        out.append(protocol.backend_key_data(self.pid, session.key))
        out.append(protocol.ready_for_query(b"I"))
        reported = session.context.reported   # the connection may be forwarding into it already
        reported.clear()
        reported.update(params)
        session.greeted = True
        self.scheduler.greeted(session)
        self._client_send(session, b"".join(out))

    def _report_parameters(self, session: Session, params: dict[str, str]) -> None:
        """Send the client the ParameterStatus values that differ from what it last saw.

        PostgreSQL 14+ reports a setting only when its value changes on the
        server, which is not the same as changing for this client.
        """
        seen = session.context.reported
        out = b""
        for name, value in params.items():
            if seen.get(name) != value:
                seen[name] = value
                out += protocol.parameter_status(name, value)
        if out:
            self._client_send(session, out)

    def _client_gone(self, session: Session) -> None:
        """The client disconnected or sent Terminate: end the session, clean the server."""
        if session.state is CLOSED:
            return
        session.gone = True
        server = self.server
        if session.pinned is None and server is not None and server.owner is session:
            # Finish what the session left on the server before anyone else uses it:
            # read (and drop) what it still sends, end a COPY or an unsynced
            # pipeline, cancel running work; then _boundary rolls back.
            if session.proto.passthrough:
                filler = session.proto.abandon()
                if filler is None:
                    # Too much of the message is missing to fill it in: its
                    # transaction dies with the connection.
                    logger.log(log.LOG, "%s: client vanished in the middle of a message; "
                               "closing server connection %d", session, server.pid)
                    self._close_session(session)
                    self._drop_server(server)
                    return
                self._server_send(server, filler)
            server.stream.resume_reading()
            if server.copy_in:
                self._server_send(server, COPY_FAIL)
                server.copy_in = False
            if server.unsynced:
                server.pending.append(None)
                server.synced()
                server.synced_after_copy = True   # (a CopyDone it sent may not have been answered yet)
                self._server_send(server, ABORT_PIPELINE + protocol.SYNC_MESSAGE)
            if server.pending:
                if server.pending[0] is None:
                    self._send_cancel(server)
            else:
                self._boundary(server)
        self._close_session(session)

    def _end_abandoned_copy(self, server: srv.ServerConnection) -> None:
        """The server began a COPY FROM STDIN for a client that has gone (it left before the
        CopyInResponse): fail it, and sync it if it came by Execute (the Syncs the client sent
        before were ignored in copy-in mode), so that the connection reaches its boundary."""
        server.copy_abandoned = False
        server.copy_in = False
        self._server_send(server, COPY_FAIL)
        if server.copy_via_execute:
            server.pending.append(None)
            server.synced()
            self._server_send(server, protocol.SYNC_MESSAGE)

    def _protocol_violation(self, session: Session, text: str) -> None:
        logger.log(log.LOG, "%s: protocol violation: %s", session, text)
        self._client_send(session, PgError("protocol_violation", text).packet())
        self._client_gone(session)

    def _register(self, session: Session) -> None:
        """A session (new, or moved here) joins this backend: by socket, and by the cancel
        key its client knows."""
        self.sessions[session.fd] = session
        self.by_key[session.cancel_id] = session
        self.idle_reported = False
        self.counters[status.SESSIONS] = len(self.sessions)

    def _detach(self, session: Session) -> None:
        """A session leaves this backend (ended, or moved away): out of the schedule and the
        tables, its statements released, our copy of its socket closed."""
        self.scheduler.close(session)
        session.proto.release_statements()
        del self.sessions[session.fd]
        if self.by_key.get(session.cancel_id) is session:
            del self.by_key[session.cancel_id]
        session.stream.close()
        self.counters[status.SESSIONS] = len(self.sessions)
        if not self.sessions:
            self.empty_since = time.monotonic()

    def _close_session(self, session: Session) -> None:
        if session.state is CLOSED:
            return
        self.scheduler.close(session)   # CLOSED before anything its pinned connection's end triggers
        if session.pinned is not None:
            self._close_pinned(session)
        self._detach(session)
        if self.settings.log_disconnections:
            logger.log(log.LOG, "%s", log.disconnection(time.time() - session.connected, session.user,
                                                       session.database, session.address))
        self._tell(("closed", session.conn_id))

    # ================================================================ server connection

    def _connect(self) -> None:
        if self.paused:
            return   # RESUME connects
        startup = {"user": self.user, "database": self.database}
        try:
            server = srv.ServerConnection(self.settings, startup, self.secret)
        except PgError as exc:
            self._server_failed(None, exc)
            return
        self.server = server
        server.stream = Stream(server.sock, self.epoll, EPOLLOUT)
        self.handlers[server.fd] = functools.partial(self._on_server, server)
        self.counters[status.SERVER_CONNECTIONS] += 1

    def _on_server(self, server: srv.ServerConnection, mask: int) -> None:
        state = server.state
        if state is SERVER_ACTIVE or (state is not CONNECTING and state is not LOGIN):
            if mask & EPOLLOUT:
                self._server_writable(server)
                if server.state is SERVER_CLOSED:
                    return
            if mask & READABLE:
                data = server.stream.recv()
                if data is None:
                    return
                if not data:
                    self._server_lost(server)
                    return
                self.bytes_out += len(data)
                if len(data) == RECV_SIZE:
                    self.trim_memory = True
                out, event = server.receive(data)
                if server.copy_abandoned:
                    self._end_abandoned_copy(server)
                if out:
                    target = server.owner or server.pinned
                    if target is not None and not target.gone:
                        stream = target.stream   # _client_send, inline
                        stream.send(out)
                        if stream.outbuf:
                            if len(stream.outbuf) > HIGH_WATER:
                                server.stream.pause_reading()   # until the client has read some
                if event is BOUNDARY and not server.inbuf:
                    self._boundary(server)
                elif event is not None:
                    self._server_events(server, event)
            return
        try:
            if state is ServerState.CONNECTING:
                server.stream.send(server.connected())
                server.stream._set(EPOLLIN | (EPOLLOUT if server.stream.outbuf else 0))
                return
            if mask & EPOLLOUT:
                server.stream.flush()
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
        except (ValueError, IndexError, TypeError) as exc:   # not the protocol
            self._server_failed(server, PgError("sqlclient_unable_to_establish_sqlconnection",
                                                f"invalid response from upstream server: {exc}"))
            return
        if reply:
            server.stream.send(reply)
        if server.state is SERVER_IDLE:
            logger.debug("server connection ready (server pid %d)", server.pid)
            if self.redial_delay:
                logger.log(log.LOG, "upstream connection for %s/%s is back (server process %d)",
                           self.database, self.user, server.pid)
            self.redial_delay = 0.0
            self.server_error = None
            self.ever_connected = True
            self.counters[status.SERVER_DOWN] = 0
            if server.inbuf:   # whatever followed the login's ReadyForQuery
                out, event = server.receive(b"")
                if out:
                    self._pass_on(server, out)
                if event is not None:
                    self._server_events(server, event)
            self._next_session(server)

    def _pass_on(self, server: srv.ServerConnection, out: bytes) -> None:
        """Replies for the session that receives this connection's output (_on_server has it inline)."""
        target = server.owner or server.pinned
        if target is not None and not target.gone:
            self._client_send(target, out)

    def _server_events(self, server: srv.ServerConnection, event) -> None:
        """Act on what the server's replies decided; input after an event waits in its inbuf."""
        while True:
            if event is BOUNDARY:
                self._boundary(server)
            elif event is BROKEN:
                logger.warning("server process %d (%s/%s) sent an invalid message; closing its "
                               "connection", server.pid, self.database, self.user)
                self._server_lost(server)
            elif event is FLUSHED:
                self._sync_after_flush(server)
            elif event is CHECKED:
                self._checked(server)
            else:
                self._hidden_done(server, event)
            if server.state is SERVER_CLOSED or not server.inbuf:
                return
            out, event = server.receive(b"")
            if out:
                self._pass_on(server, out)
            if event is None:
                return

    def _sync_after_flush(self, server: srv.ServerConnection) -> None:
        """The owner's flushed Parses and Describes are all answered (asyncpg's prepare): a Sync
        of the pooler's own ends their implicit transaction, so that the connection is free for
        others until the owner runs something (ServerProtocol.sync_after_flush)."""
        owner = server.owner
        if owner is not None and not owner.gone and not owner.proto.buf and not owner.proto.passthrough:
            sync = server.sync_after_flush()
            if sync:
                self._server_send(server, sync)

    def _checked(self, server: srv.ServerConnection) -> None:
        """The server described a statement the pooler prepared again on this connection: the
        owner's Bind or Describe of it, and what it sent after, go on (statements.py)."""
        checked, server.checked = server.checked, None
        owner = server.owner
        if owner is None or owner.gone or checked is None or owner.proto.holding is not checked:
            return   # (a check of a statement prepared on the way: nothing waits for it)
        owner.proto.resume()
        self._forward(owner, server, b"")
        if not owner.gone and owner.proto.need != HOLDING and server.stream.has_room():
            # (What it buffered meanwhile has gone on: an unfinished message of any size may
            # be left, which needs more input.)
            owner.resume_input()

    def _server_failed(self, server: srv.ServerConnection | None, error: PgError) -> None:
        """The server refused us or could not be reached: every waiting session hears why."""
        logger.log(log.LOG, "upstream connection for %s/%s failed: %s",
                   self.database, self.user, error.text)
        self.counters[status.SERVER_DOWN] = 1   # siblings move no session here meanwhile
        if server is not None:
            self._close_server(server)
        if (error.sqlstate in TRANSIENT_FAILURES and self.ever_connected and self.scheduler.queue
                and not self.shutdown_mode and self.settings.query_wait_timeout):
            # A restart or an outage: the waiting sessions keep waiting (query_wait_timeout
            # bounds it), their contexts kept, while we dial again with backoff.
            self.server_error = error
            self.redial_delay = min(max(self.redial_delay * 2, REDIAL_FIRST), REDIAL_MAX)
            self.redial_at = time.monotonic() + self.redial_delay
            self.poll_timeout = min(1.0, self.redial_delay)
            logger.log(log.LOG, "%d sessions of %s/%s wait; connecting again in %.1f s",
                       len(self.scheduler.queue), self.database, self.user, self.redial_delay)
            return
        error.severity = "FATAL"
        packet = error.packet()
        while True:
            session = self.scheduler.next_waiting()
            if session is None:
                break
            self._client_send(session, packet)
            self._close_session(session)
        if not self.sessions and error.sqlstate in ("3D000", "28000", "28P01"):
            self._tell(("server_failed", error.sqlstate))

    def _server_send(self, server: srv.ServerConnection, data: bytes) -> None:
        stream = server.stream
        stream.send(data)
        owner = server.owner
        if stream.outbuf and len(stream.outbuf) > HIGH_WATER and owner is not None and not owner.gone:
            owner.pause_input()

    def _hidden(self, server: srv.ServerConnection, kind: str, sql: str,
                session: Session | None = None) -> None:
        """Send a query of the pooler's own; its replies go to _hidden_done, not to a client."""
        self._server_send(server, server.hidden(kind, sql, session))

    def _server_writable(self, server: srv.ServerConnection) -> None:
        stream = server.stream
        stream.flush()
        owner = server.owner
        if (owner is not None and owner.paused and not owner.gone and stream.has_room()
                and (owner.proto.need != HOLDING or len(owner.proto.buf) < WAITING_INPUT_LIMIT)):
            owner.resume_input()

    # ================================================================ transaction boundaries

    def _boundary(self, server: srv.ServerConnection) -> None:
        """Every reply the owner awaited has come: decide what happens next (scheduler.Decision)."""
        owner = server.owner
        if owner is None:
            server.held = b""
            return
        if server.notes or server.xacts or owner.proto.flags or owner.temp_path:
            notes, xacts = server.take_notes()
            flags, texts = owner.proto.take_flags()
            self._note_state(server, owner, notes, flags, texts, xacts)
        proto = owner.proto
        if (not owner.gone and not server.held and server.status == TX_IDLE and not owner.dirty
                and not owner.pin_check and not owner.prepared_xacts and not proto.passthrough):
            self._release(server)   # the last row of the table, taken at once
            return
        fixup = bool(server.held) and bool(owner.context.startup) and not owner.gone
        if server.held and not fixup:
            self._client_send(owner, server.held)
            server.held = b""
        decision = boundary_decision(
            gone=owner.gone, in_transaction=server.status != TX_IDLE, fixup=fixup,
            dirty=owner.dirty, pin_check=owner.pin_check, pinned=server.pinned is not None,
            holding_xacts=owner.prepared_xacts > 0, mid_message=proto.passthrough > 0)
        if decision is Decision.RELEASE:
            if owner.gone and owner.dirty:
                server.context = None   # what it set was never read back
            self._release(server)
        elif decision is Decision.ROLLBACK:
            self._hidden(server, ROLLBACK, "ROLLBACK")
        elif decision is Decision.PIN_CHECK:
            owner.pin_check = False
            server.pin_check_sent()
            self._hidden(server, PIN_CHECK, PIN_CHECK_QUERY, owner)
        elif decision is Decision.CAPTURE:
            owner.dirty = False
            self._hidden(server, CAPTURE, capture_query(owner.context.custom_names), owner)
        elif decision is Decision.FIXUP:
            self._hidden(server, FIXUP, fixup_query(owner.context.startup), owner)
        elif decision is Decision.KEEP and (server.status != TX_IDLE or proto.passthrough):
            owner.idle_since = self.now   # idle in transaction (or in a message) from now
        # KEEP and HOLD: the owner keeps the connection.

    def _note_state(self, server, owner: Session, notes: int, flags: int, texts: list,
                    xacts: int) -> None:
        """What the owner's last statements may have done to its session state."""
        if notes & NOTE_SETTINGS or flags & MAY_SET:
            owner.dirty = True
            owner.private_statements()   # until they are read back (settings_changed)
            names = owner.context.custom_names
            if notes & NOTE_SETTINGS:
                names |= custom_setting_names(owner.proto.last_text)
                names |= owner.proto.statement_setting_names()
            for text in texts:
                names |= custom_setting_names(text)
            if UNKNOWN_NAME in names:
                # set_config with a name that is not a constant: which custom setting it
                # changed cannot be read back by name, so the connection's settings are
                # unknown after this session's turn (the next restore resets everything).
                names.discard(UNKNOWN_NAME)
                owner.unknown_settings = True
        if (notes & NOTE_PIN or flags & MAY_PIN or (owner.pinned is not None and notes & NOTE_UNPIN)
                or (owner.temp_path and owner.pinned is None)):
            owner.pin_check = True
        if notes & NOTE_DISCARDED:
            owner.proto.release_statements()
        if notes & NOTE_OUTDATED:
            self.registry.retire_all(renew=True)
        elif notes & NOTE_STALE:
            self.registry.retire_all()
        if xacts and self.settings.hold_prepared_transactions:
            owner.prepared_xacts = max(0, owner.prepared_xacts + xacts)

    def _prepared_left(self, server: srv.ServerConnection, names: str | None) -> None:
        """The pin check named the protocol-level statements the connection has: forget those
        it no longer has (a DEALLOCATE in a function body, or of one of the pooler's names), so
        that they are prepared again where a session binds them."""
        gone = server.forget_deallocated(names)
        if gone:
            logger.log(log.LOG, "server process %d: %d prepared statement(s) of the pooler's were "
                       "deallocated by a session's statement; they will be prepared again",
                       server.pid, gone)

    def _hidden_done(self, server: srv.ServerConnection, hidden: srv.HiddenQuery) -> None:
        """A hidden query's ReadyForQuery arrived: act on what it returned."""
        kind, session, error = hidden.kind, hidden.session, hidden.error
        if session is None:   # the pooler's own (ROLLBACK, DEALLOCATE): nothing to act on
            if not server.pending and not server.unsynced and server.owner is not None:
                self._boundary(server)
            return
        if kind == RESTORE:
            self._restored(server, session, error)
            return
        if kind == CAPTURE:
            if error is None:
                session.context.settings = captured_settings(hidden.rows, self.user)
                session.settings_changed()
                server.context = session.context.settings
                if session.unknown_settings:
                    # A custom setting of unknown name may be there: the next restore for
                    # another session resets everything; this one keeps it meanwhile.
                    session.unknown_settings = False
                    server.unknown_by = session
                session.capture_failures = 0
            else:
                logger.warning("%s: could not read back its settings: %s", session, error.text)
                server.context = None
                session.capture_failures += 1
                if session.capture_failures < 3:
                    session.dirty = True   # try again before anyone else uses the connection
        elif kind == PIN_CHECK:
            # If the server could not say, assume the state is there: pinning is the safe side.
            holds_state = error is not None or (bool(hidden.rows) and hidden.rows[0][:1] == ("t",))
            if error is None and hidden.rows and len(hidden.rows[0]) == 2:
                self._prepared_left(server, hidden.rows[0][1])
            if session.gone:
                if holds_state and server.pinned is None:
                    # A vanished client's temporary tables or locks: they die with the connection.
                    self._drop_server(server)
                    return
            elif holds_state and session.pinned is None:
                if not self._pin(server, session):
                    return
            elif not holds_state and session.pinned is not None:
                if server.pending or server.unsynced or session.proto.passthrough:
                    session.pin_check = True   # its next statement is running here: ask again later
                else:
                    self._unpin(server, session)
                    return
        elif kind == FIXUP:
            if error is not None:
                logger.warning("%s: could not re-apply its startup settings: %s", session, error.text)
            if not session.gone:
                self._report_parameters(session, server.params)
                self._client_send(session, server.held)
            server.held = b""
        if not server.pending and not server.unsynced and server.owner is not None:
            self._boundary(server)

    def _restored(self, server: srv.ServerConnection, session: Session, error: PgError | None) -> None:
        if error is not None:
            refused = reserved_placeholder(error.sqlstate, error.text, session.context)
            if refused is not None and not session.gone:
                # A library loaded on this server process (by another session: plpgsql at a
                # first DO) reserved the prefix of a placeholder this session set.  PostgreSQL
                # removes such a placeholder, with this WARNING, when the session loads the
                # library; the pooler does the same and serves the session.  Each round
                # drops one setting: it ends.  (The failed restore changed nothing.)
                session.context.drop(refused)
                prefix = refused.partition(".")[0]
                logger.warning("%s: server process %d refused its setting %s (a library loaded there "
                               "reserved the prefix %s); removed, as PostgreSQL removes such a placeholder",
                               session, server.pid, refused, prefix)
                self._client_send(session, protocol.error_response(
                    "WARNING", error.sqlstate, f'invalid configuration parameter name "{refused}", removing it',
                    detail=f'"{prefix}" is now a reserved prefix.', kind=b"N"))
                self._hidden(server, RESTORE, restore_query(server.context, session.context.settings), session)
                return
            if server.context is not None and not session.gone:
                # What the pooler believes is on the connection may not be what
                # is there (a library loaded since removed a placeholder): the
                # session is not to blame.  Reset everything and try once more.
                session.restore_retried = True
                server.context = None
                self._hidden(server, RESTORE, restore_query(None, session.context.settings), session)
                return
            # From a reset connection too: the settings themselves are refused.
            if session.greeted:
                logger.warning("%s: could not restore its settings: %s", session, error.text)
                error = PgError(error.sqlstate, "could not restore this session's settings: "
                                + error.text, detail=error.detail)
            else:   # as PostgreSQL logs the FATAL of a startup packet it refuses
                logger.log(log.LOG, "%s: login refused: %s (SQLSTATE %s)", session, error.text,
                           error.sqlstate)
            error.severity = "FATAL"   # as PostgreSQL refuses a startup packet with a bad setting
            self._client_send(session, error.packet())
            self._close_session(session)
            server.context = None
            self._release(server)
            return
        if session.restore_retried:
            session.restore_retried = False
            logger.warning("%s: the settings recorded for server process %d were not what the "
                           "server had; restored after a reset", session, server.pid)
        server.context = session.context.settings
        if session.gone:
            self._release(server)
            return
        self.scheduler.restored(session)
        if not session.greeted:
            self._greet_restored(server, session)
            return
        self._report_parameters(session, server.params)
        self._forward_buffered(server, session)

    def _greet_restored(self, server: srv.ServerConnection, session: Session) -> None:
        """Greet a new session whose settings the server has just applied."""
        settings = session.context.settings
        raw_key = frozenset(settings.items())
        # The server reports settings in its own spelling (UTF8, "ISO, MDY"):
        # keep that spelling so that equal contexts compare equal.
        reported = {name.lower(): value for name, value in server.params.items()}
        for name in settings.keys() & srv.REPORTED_SETTABLE:
            if name in reported:
                settings[name] = reported[name]
                session.context.startup[name] = reported[name]
        session.settings_changed()
        params = dict(server.params)
        self._remember_greeting(settings, params)
        self.greetings[raw_key] = params
        self._greet(session, params)
        self.scheduler.restored(session)
        self._forward_buffered(server, session)

    def _remember_greeting(self, settings: dict[str, str], params: dict[str, str]) -> None:
        if len(self.greetings) >= GREETING_CACHE_SIZE:
            self.greetings.clear()
        self.greetings[frozenset(settings.items())] = params

    # ================================================================ scheduling

    def _activate(self, server: srv.ServerConnection, session: Session) -> None:
        """Give the server connection to session: restore its context, pass its waiting input."""
        settings = session.context.settings
        unknown = server.unknown_by is not None and server.unknown_by is not session
        if unknown or server.context is None:
            server.context = None   # everything is reset first
            server.unknown_by = None
        restoring = server.context is not settings and server.context != settings
        now = self.now
        self._hand_over(server)
        if session.state is WAITING:
            self.wait_times.append(now - session.since)
        self.scheduler.assign(server, session, restoring)
        if self.registry.evicted:
            self._deallocate_evicted(server)
        if restoring:
            # Its input waits for the restore: it must not run in another session's settings.
            self._hidden(server, RESTORE, restore_query(server.context, settings), session)
            return
        if not session.greeted:
            # The server is in this session's context already: what it reports is this
            # context's greeting, for the next new session with the same settings too.
            params = dict(server.params)
            self._remember_greeting(settings, params)
            self._greet(session, params)
            self.scheduler.restored(session)
        self._forward_buffered(server, session)

    def _deallocate_evicted(self, server: srv.ServerConnection) -> None:
        shared = self.server
        names = self.registry.take_evicted(
            server.prepared, shared.prepared if shared is not None and shared is not server else None)
        if names:
            server.prepared.difference_update(names)
            self._hidden(server, DEALLOCATE, "; ".join(
                f'DEALLOCATE "{name.decode()}"' for name in names))

    def _forward_buffered(self, server: srv.ServerConnection, session: Session) -> None:
        session.resume_input()
        if session.proto.buf:
            self._forward(session, server, b"")
        elif not server.pending and not server.unsynced and server.owner is session:
            self._boundary(server)

    def _release(self, server: srv.ServerConnection) -> None:
        """The transaction is over: the server connection goes to the next waiting session."""
        session = released = self.scheduler.release(server)
        gather: Session | None = None
        if server.queries:   # a transaction of the owner's, not only the pooler's own queries
            held = self.now - server.since
            self.xact_times.append(held)
            if session is not None:
                session.last_xact = held
                if self.gather_long and held >= self.migration_delay > 0.0 and self.scheduler.queue:
                    gather = session
            self.queries += server.queries
            server.queries = 0
        disarm = False
        if session is not None:
            session.quiet_since = self.now
            disarm = session.idle_session_timeout > 0.0
        stream = server.stream
        if not stream.mask & EPOLLIN:
            # The server owes nothing now: a pause for that owner's slow client ends with its turn.
            stream.resume_reading()
        if (session is not None and session.proto.buf and session.state is IDLE
                and len(session.proto.buf) >= 5):
            ready = session.proto.ready()
            if type(ready) is ProtocolViolation:
                self._protocol_violation(session, ready.text)
            elif ready:
                if server.pinned is not None and server.pinned is session:
                    self._enqueue(server.pinned)
                    return
                # The client already sent its next transaction: it waits its turn.
                self.scheduler.wait(session)
        if self.paused and server is self.server:
            self._pause_step()
            return
        scheduler = self.scheduler
        if scheduler.queue and server.pinned is None and server.state is SERVER_IDLE:
            session = scheduler.next_waiting()
            if session is not None:
                self._activate(server, session)
        if disarm and server.owner is None and server is self.server and server.state is SERVER_IDLE:
            self._disarm_idle_session_timeout(server)
        if gather is not None and server is self.server:
            self._gather(gather)
        elif self.retiring and released is not None:
            self._move_out(self.now, released)

    def _disarm_idle_session_timeout(self, server: srv.ServerConnection) -> None:
        """The shared connection goes idle after the turn of a session with an idle_session_timeout:
        the server would end the connection, not that session, once it idled that long (the pooler
        keeps the session's timeout: _expire_idle_sessions).  It is set to 0 for the idle time."""
        context = server.context
        if context is not None:   # (None: unknown, the next restore resets everything)
            if duration_setting(context.get("idle_session_timeout")) <= 0.0:
                return
            context = dict(context)
            context["idle_session_timeout"] = "0"
            server.context = context   # its owner's next restore sets it again
        self._hidden(server, DISARM, "SET idle_session_timeout = 0")

    def _next_session(self, server: srv.ServerConnection) -> None:
        session = self.scheduler.next_waiting()
        if session is not None:
            self._activate(server, session)

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
        self.scheduler.pin(server, session)
        self.pinned_count += 1
        self.counters[status.PINNED] = self.pinned_count
        logger.debug("%s pinned to server process %d", session, server.pid)
        if self.server is server:
            self.server = None
            if self.scheduler.queue:
                self._connect()
        return True

    def _unpin(self, server: srv.ServerConnection, session: Session) -> None:
        """Its state is gone: the session returns to the shared connection."""
        self._close_pinned(session)
        ready = session.proto.ready()
        if ready and type(ready) is not ProtocolViolation:
            self._enqueue(session)

    def _close_pinned(self, session: Session) -> None:
        server = self.scheduler.unpin(session)
        self.pinned_count -= 1
        self.counters[status.PINNED] = self.pinned_count
        self._drop_server(server)

    def _close_server(self, server: srv.ServerConnection) -> None:
        self.handlers.pop(server.fd, None)
        server.stream.close()
        server.close()
        if self.server is server:
            self.server = None

    def _drop_server(self, server: srv.ServerConnection) -> None:
        """Close a server connection: whatever it holds dies with it, on the server."""
        shared = self.server is server
        self._close_server(server)
        if shared and self.scheduler.queue:
            self._connect()

    def _server_lost(self, server: srv.ServerConnection) -> None:
        """The server connection broke: fail its owner, reconnect for the others."""
        owner = server.owner or server.pinned
        self._close_server(server)
        if self.server is None:   # it was the shared one
            # No long transaction holds it now: siblings send no long session here to wait.
            self.gather_long = False
            self.counters[_OWNER_SINCE_MS] = 0
            self.owner_published = 0.0
        if owner is None or owner.state is CLOSED:
            logger.log(log.LOG, "lost server connection to %s/%s (server process %d)",
                       self.database, self.user, server.pid)
        else:
            logger.log(log.LOG, "%s: lost server connection (server process %d)", owner, server.pid)
            self._client_send(owner, PgError(
                "connection_failure", "server closed the connection unexpectedly",
                detail="The upstream server connection of this session was lost.").packet())
            self._close_session(owner)
        if self.scheduler.queue and self.server is None:
            self._connect()

    # ================================================================ cancel

    def _cancel(self, pid: int, key: int) -> None:
        """A CancelRequest for the session its client knows as (pid, key)."""
        session = self.by_key.get((pid, key))
        if (session is not None and session.state is WAITING and session.pinned is None
                and session.proto.drop_request()):
            # Its statement has not started: it never will, as if cancelled at once (otherwise
            # the cancel would be lost and the statement run later, when the client has been
            # told nothing and may have gone on).
            self.scheduler.drop_wait(session)
            logger.log(log.LOG, "%s: canceled while waiting for a server connection", session)
            self._answer_dropped(session, PgError("query_canceled", "canceling statement due to user request"))
            return
        if (session is not None and session.state is RESTORING and session.greeted
                and session.proto.drop_request()):
            # It has the connection, but its statement waits for its settings to be put back
            # there: dropped the same way.  The restore goes on; what the client sent after
            # the statement follows it (_forward_buffered), or the turn ends there.
            logger.log(log.LOG, "%s: canceled while its settings were being restored", session)
            self._client_send(session, PgError("query_canceled", "canceling statement due to user request")
                              .packet() + protocol.ready_for_query(b"I"))
            return
        server = None if session is None else (session.pinned or self.server)
        # Only while this session's own work runs on the server.
        if (session is not None and server is not None and server.owner is session
                and ((server.pending and server.pending[0] is None) or server.copy_in)):
            self._send_cancel(server)

    def _send_cancel(self, server: srv.ServerConnection) -> None:
        try:
            sender = srv.CancelSender(self.settings, server)
        except OSError as exc:
            logger.warning("could not send cancel request to server process %d (%s/%s): %s",
                           server.pid, self.database, self.user, exc)
            return
        server.cancels += 1
        self.cancels[sender.fd] = sender
        self.epoll.register(sender.fd, EPOLLOUT)
        self.handlers[sender.fd] = functools.partial(self._on_cancel, sender)

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
        if server.state is ServerState.CLOSED:
            return
        if uncertain:
            # The signal may still come: that connection must not run anyone's query.
            logger.warning("cancel request for server process %d (%s/%s) not confirmed; closing its "
                           "connection", server.pid, self.database, self.user)
            if server.owner is None:
                self._drop_server(server)
            return
        if server.cancels == 0 and server.state is ServerState.CANCEL_WAIT:
            self.scheduler.ready(server)
            session = server.pinned
            if session is None:
                self._next_session(server)
            elif session.state is WAITING:
                self._activate(server, session)


def _exit_now(_signum: int, _frame: object) -> None:
    os._exit(0)


def main(settings, database: str, user: str, chan: socket.socket,
         table: status.StatusTable, slot: int | None, secret: str | None) -> None:
    """Entry point in the forked pooled-backend process."""
    process.set_title(f"backend {database}/{user} 0 sessions 0 waiting")
    signal.signal(signal.SIGTERM, _exit_now)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the postmaster says how to stop
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    PooledBackend(settings, database, user, chan, table, slot, secret).run()
