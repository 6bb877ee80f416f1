"""A backend's connection to the upstream PostgreSQL server: non-blocking connect and login, and cancel requests."""

import collections
import enum
import errno
import socket
import struct
import time
from typing import Any, Final, TYPE_CHECKING, cast

from ..shared import auth, protocol
from ..shared.errors import PgError
from .scheduler import ServerState
from .context import REPORTED_SETTABLE, quoted_setting
from .statements import (STALE_NAME, STATEMENT_ENTRIES, CloseEntry, DescribeEntry, ParseEntry, Statement,
                         length_word, result_shape)

if TYPE_CHECKING:
    from .session import Session
    from .stream import Stream

# ---------------------------------------------------------------- the protocol, sans I/O

class TransactionStatus(enum.IntEnum):
    """The status byte of ReadyForQuery (kept as the plain byte value, which compares equal)."""
    IDLE = protocol.TRANS_IDLE
    IN_BLOCK = protocol.TRANS_INBLOCK
    FAILED = protocol.TRANS_FAILED


# The status bytes as plain ints, compared one by one in receive() (a set lookup, or an
# IntEnum member, costs a boxed comparison per ReadyForQuery when compiled).
_IDLE: Final = protocol.TRANS_IDLE
_IN_BLOCK: Final = protocol.TRANS_INBLOCK
_FAILED: Final = protocol.TRANS_FAILED


class HiddenQuery:
    """A query the pooler sent on a server connection itself, and what came back."""

    __slots__ = ("kind", "session", "rows", "error")

    def __init__(self, kind: str, session: "Session | None" = None):
        self.kind = kind
        self.session = session
        self.rows: list[tuple] = []
        self.error: PgError | None = None

    def __repr__(self) -> str:
        return f"HiddenQuery({self.kind!r})"


# Events of ServerProtocol.receive().
BOUNDARY: Final = "boundary"   # every reply the owner awaited has come: its transaction may be over
BROKEN: Final = "broken"       # the server sent what is not the protocol: drop the connection
# Every reply to the owner's Parses, Describes and Closes of statements before its Flush came,
# without an error: the pooler may end their implicit transaction (sync_after_flush).
FLUSHED: Final = "flushed"
# The pooler's check of a statement it prepared again is over (statements.DescribeEntry): the
# owner's input that waits for it goes on (ClientProtocol.resume).
CHECKED: Final = "checked"

# Facts about the owner's session state gathered from the server's replies
# (ServerProtocol.notes), acted on at the transaction boundary.
NOTE_SETTINGS: Final = 1       # a setting may have changed: read them back
NOTE_RESET: Final = 2          # RESET or DISCARD: startup values to re-apply
NOTE_PIN: Final = 4            # state that cannot be copied may exist now
NOTE_UNPIN: Final = 8          # such state may be gone now
NOTE_DISCARDED: Final = 16     # the server holds no prepared statement any more
NOTE_STALE: Final = 32         # 0A000: a prepared statement's result type changed (DDL since it was prepared)
NOTE_OUTDATED: Final = 64      # the server refused to run a prepared statement it must revalidate

Z: Final = protocol.READY_FOR_QUERY
PS: Final = protocol.PARAMETER_STATUS
ERR: Final = protocol.ERROR_RESPONSE
CC: Final = protocol.COMMAND_COMPLETE
NOTICE: Final = protocol.NOTICE_RESPONSE
NOTIFICATION: Final = protocol.NOTIFICATION_RESPONSE
PARSE_COMPLETE: Final = ord("1")
CLOSE_COMPLETE: Final = ord("3")
NO_DATA: Final = ord("n")
PARAMETER_DESCRIPTION: Final = ord("t")
DATA_ROW: Final = ord("D")
ROW_DESCRIPTION: Final = ord("T")
FUNCTION_CALL_RESPONSE: Final = ord("V")
COPY_IN: Final = protocol.COPY_IN_RESPONSE
COPY_BOTH: Final = protocol.COPY_BOTH_RESPONSE
COPY_DATA: Final = ord("d")
# Server messages the owner's stream is watched for; everything else passes untouched.
NOTED: Final = frozenset({Z, PS, ERR, CC, NOTICE, COPY_IN, COPY_BOTH, PARSE_COMPLETE, CLOSE_COMPLETE,
                          ROW_DESCRIPTION, NO_DATA, PARAMETER_DESCRIPTION})
# The same as a table indexed by the type byte: one list index per message (native when
# compiled) instead of a set lookup that boxes the byte.
_NOTED_BY_TYPE: Final = [t in NOTED for t in range(256)]
# Messages that may be large and are passed on as they arrive.
STREAMED: Final = frozenset({DATA_ROW, COPY_DATA, ROW_DESCRIPTION, FUNCTION_CALL_RESPONSE})
# Longest message a server may send that is kept whole (errors, notices, tags).
MAX_KEPT_MESSAGE: Final = 1 << 26

# DDL after which the columns of a table, view, type or function's result may have changed
# (ALTER TABLE, CREATE OR REPLACE VIEW, ALTER VIEW … RENAME COLUMN, DROP then CREATE): new Parses
# get statements of their own (NOTE_STALE, as 0A000 does).  Not DDL that changes no result's
# shape (DROP INDEX, ALTER SEQUENCE, ALTER ROLE); DROP TABLE only on a shared connection
# (_command_tag): on a pinned one it is mostly a temporary table's, every request of a
# temporary-table workload, and a table of everyone's dropped there is caught by the first
# 0A000 it causes.
_STALE_TAGS: Final = (b"ALTER TABLE", b"ALTER VIEW", b"ALTER MATERIALIZED VIEW", b"ALTER TYPE",
                      b"ALTER DOMAIN", b"ALTER FUNCTION", b"ALTER SCHEMA", b"DROP VIEW",
                      b"DROP MATERIALIZED VIEW", b"DROP TYPE", b"DROP DOMAIN", b"DROP FUNCTION",
                      b"DROP SCHEMA", b"CREATE VIEW")
# Command tags that say something about session state.
_TAG_PREFIXES: Final = (b"SET\0", b"RESET\0", b"DISCARD", b"DEALLOCATE", b"LISTEN", b"UNLISTEN",
                        b"DECLARE", b"PREPARE", b"CREATE TABLE", b"DROP TABLE", b"CLOSE CURSOR",
                        b"LOAD", b"COMMIT PREPARED", b"ROLLBACK PREPARED", b"DO\0", b"CALL\0",
                        *_STALE_TAGS)
# The same by their first three bytes (every prefix has three, "DO\0" with its NUL): most tags (SELECT,
# INSERT, UPDATE, BEGIN) are dismissed by one dictionary lookup, without a prefix test.
_TAG_PREFIXES_BY_START: Final[dict[int, tuple[bytes, ...]]] = {
    key: tuple(p for p in _TAG_PREFIXES if (p[0] << 16 | p[1] << 8 | p[2]) == key)
    for key in {p[0] << 16 | p[1] << 8 | p[2] for p in _TAG_PREFIXES}}
_TAG_NOTES: Final = (
    # DO and CALL run code whose statements send no tags of their own (EXECUTE 'SET …',
    # CREATE TEMP TABLE, LISTEN, advisory locks): read back and ask, as after those.
    ((b"SET\0", b"RESET\0", b"DISCARD", b"LOAD", b"DO\0", b"CALL\0"), NOTE_SETTINGS),
    ((b"RESET\0", b"DISCARD"), NOTE_RESET),
    # (After DEALLOCATE the check also says which of the pooler's statements are left.)
    ((b"LISTEN", b"DECLARE CURSOR", b"PREPARE\0", b"CREATE TABLE", b"DO\0", b"CALL\0", b"DEALLOCATE"),
     NOTE_PIN),
    ((b"DISCARD", b"DROP TABLE", b"UNLISTEN", b"CLOSE CURSOR", b"DEALLOCATE"), NOTE_UNPIN),
    ((b"DISCARD ALL\0", b"DEALLOCATE ALL\0"), NOTE_DISCARDED),
    (_STALE_TAGS, NOTE_STALE),
)
# The server removed a placeholder setting (a library reserved its prefix):
# WARNING 42602 "invalid configuration parameter name …, removing it".
_PLACEHOLDER_REMOVED: Final = b"C42602\0"
# "cached plan must not change result type": a table's columns changed since a statement was
# prepared (feature_not_supported; the message is in lc_messages' language, so the code is used).
_STALE_PLAN: Final = b"0A000"
# Errors of a prepared statement's revalidation after DDL, that a statement prepared afresh
# would not raise: its result changed, a type it used was dropped ("cache lookup failed for
# type"), parameter types inferred when it was prepared no longer fit (42804, 42883, 42846).
_OUTDATED: Final = frozenset({_STALE_PLAN, b"XX000", b"42804", b"42883", b"42846", b"42P18"})
# The pooler's answer for a STALE statement (statements.py): PostgreSQL's, with the routine that
# raises it (asyncpg prepares the statement again, outside a transaction, only when it names
# RevalidateCachedQuery).
STALE_PLAN_ERROR: Final = protocol.message(
    b"E", b"SERROR\0VERROR\0C0A000\0Mcached plan must not change result type\0"
          b"Fplancache.c\0RRevalidateCachedQuery\0\0")


class OwnSync:
    """The entry of pending for a Sync the pooler sent itself (ServerProtocol.sync_after_flush):
    the replies before its ReadyForQuery are the owner's, unlike a HiddenQuery's."""

    __slots__ = ()


OWN_SYNC: Final = OwnSync()


class ServerProtocol:
    """A server connection's side of the protocol: what the server owes, and what its replies mean.

    pending is the one queue of outstanding replies, in the order they will
    come: None for a ReadyForQuery the owner awaits (after its Query, Sync or
    FunctionCall), a HiddenQuery for a query of the pooler's own, a
    statements.ParseEntry for a Parse whose ParseComplete is to come.
    receive() returns the bytes to pass to the session that receives this
    connection's output, and an event: None, BOUNDARY, BROKEN, or a
    HiddenQuery whose reply is complete.  Input after an event waits in inbuf
    for the next receive(b"").
    """

    __slots__ = ("state", "owner", "pinned", "pending", "unsynced", "portals", "flush_count", "flushed",
                 "status", "copy_in", "describing", "described_params", "check_over", "checked",
                 "skipping",
                 "copy_via_execute", "copy_syncs", "copies_ended", "synced_after_copy",
                 "copy_data_early", "copy_abandoned", "prepared_checked",
                 "prepared", "unnamed", "error_names", "params", "context", "unknown_by", "reported", "notes",
                 "xacts", "held", "inbuf", "need", "passthrough", "cancels", "sock", "fd",
                 "pid", "key", "deadline", "stream", "since", "queries", "_reader", "_auth", "_startup",
                 "__weakref__")

    # The connection's buffered stream, made by the backend that drives it
    # (pooled._connect) as soon as the connection is; absent in the sans-IO tests.
    stream: "Stream"

    def __init__(self) -> None:
        self.state = ServerState.IDLE
        self.owner: Session | None = None   # the session that owns the connection now
        self.pinned: Session | None = None                 # the session it belongs to alone (state it cannot copy)
        self.pending: collections.deque = collections.deque()
        self.unsynced = False               # extended-protocol messages sent since the last Sync
        self.portals = False                # a Bind or Execute among them: a portal may be open
        # Replies still to come to those messages when they are Parses, Describes and Closes of
        # statements only and began with nothing else outstanding (-1: not counted), and whether
        # a Flush followed them (sync_after_flush).
        self.flush_count = -1
        self.flushed = False
        self.status: int = TransactionStatus.IDLE
        # The Describe of a statement whose ParameterDescription came: its RowDescription or
        # NoData is next.
        self.describing: DescribeEntry | None = None
        self.described_params = b""         # its ParameterDescription's body
        self.check_over = False             # an error ended a check: CHECKED is owed
        # The statement whose check ended last (for ClientProtocol.holding); the backend clears it.
        self.checked: Statement | None = None
        # An error came for the messages sent since the last Sync: the server skips what follows
        # until one (no check is sent meanwhile).
        self.skipping = False
        self.copy_in = False                # COPY FROM STDIN in progress
        # Kept by the client side's framing for copy_started (PostgreSQL ignores Sync in
        # copy-in mode, so a Sync sent between a COPY's Execute and its CopyDone has no reply):
        self.copy_via_execute = False       # the latest Execute or Query sent was an Execute
        self.copy_syncs = 0                 # Syncs sent since that Execute, before a CopyDone/CopyFail
        self.copies_ended = 0               # CopyDone/CopyFail sent before the server said the copy began
        self.synced_after_copy = False      # a Sync was sent after such a CopyDone/CopyFail
        self.copy_data_early = False        # CopyData sent after that Execute before the server said
        self.copy_abandoned = False         # a copy-in began for a client that is gone: end it (pooled)
        self.prepared: set[bytes] = set()   # server names of statements prepared here
        # Those of them the pin check in flight may name (the owner's next Parse can follow it).
        self.prepared_checked: set[bytes] | None = None
        self.unnamed: Statement | None = None   # the statements.Statement that is the unnamed one here
        self.error_names: dict[bytes, bytes] = {}   # server name -> client's, until the next ReadyForQuery
        self.params: dict[str, str] = {}    # ParameterStatus values in force
        # Session settings in force on the server now; None when unknown (a
        # session that changed settings vanished before they were read back).
        self.context: dict[str, str] | None = {}
        # The session that set custom settings of names it did not give (set_config($1, …)): they
        # may be on the connection besides context, so it is reset for any other session.
        self.unknown_by: Session | None = None
        self.reported: dict | None = None   # ParameterStatus values the receiving client has seen
        self.notes = 0                      # NOTE_* facts since the last boundary
        self.xacts = 0                      # PREPARE TRANSACTION minus COMMIT/ROLLBACK PREPARED since then
        self.held = b""                     # the owner's last ReadyForQuery, held back (NOTE_RESET)
        self.inbuf = bytearray()            # received, not yet processed
        self.need = 5                       # processing is tried again once inbuf holds this many bytes
        self.passthrough = 0                # bytes of a streamed message still to come
        self.cancels = 0                    # cancel requests for it not yet taken by the server
        self.since = 0.0                    # monotonic time the owner's turn began (SHOW STATS)
        self.queries = 0                    # the owners' ReadyForQuery messages not yet counted
        self.sock: Any = None               # a socket.socket once connected (ServerConnection)
        self.fd = -1
        self.pid = 0
        self.key = 0

    def hidden(self, kind: str, sql: str, session: "Session | None" = None) -> bytes:
        """A query of the pooler's own: its replies are collected, not forwarded."""
        self.pending.append(HiddenQuery(kind, session))
        self.unnamed = None
        return protocol.query(sql)

    def receive(self, data: bytes) -> tuple[bytes, Any]:
        first = b""
        if self.passthrough:
            k = self.passthrough if self.passthrough < len(data) else len(data)
            self.passthrough -= k
            if k == len(data):
                return data, None
            first = data[:k]
            data = data[k:]
        if self.inbuf:
            self.inbuf += data
            if len(self.inbuf) < self.need:
                return first, None
            data = bytes(self.inbuf)
            self.inbuf = bytearray()
        # Inline: this runs for every message the server sends.
        try:
            pending = self.pending
            n = len(data)
            pos = start = 0        # data[start:pos] is to be forwarded
            pieces = None
            event = None
            head = pending[0] if pending else None
            hidden = type(head) is HiddenQuery
            while n - pos >= 5:
                msg_type = data[pos]
                length = length_word(data, pos + 1)
                if length < 4:
                    return b"", BROKEN
                end = pos + 1 + length
                if hidden:
                    if end > n:
                        if length > MAX_KEPT_MESSAGE:
                            return b"", BROKEN
                        break
                    # A reply to the pooler's own query: forward what came before, keep this.
                    pieces = _cut(pieces, data, start, pos)
                    start = end
                    if msg_type == NOTIFICATION:
                        start = pos   # the session's, whatever the pooler is doing
                    else:
                        self._hidden_message(cast(HiddenQuery, head), msg_type, data, pos + 5, end)
                    if msg_type == Z:
                        pending.popleft()
                        status = data[pos + 5]
                        if status != _IDLE and status != _IN_BLOCK and status != _FAILED:
                            return b"", BROKEN
                        self.status = status
                        pos = end
                        event = head
                        break
                    pos = end
                    continue
                if end > n:
                    if msg_type in STREAMED and (msg_type != ROW_DESCRIPTION or self.describing is None):
                        self.passthrough = end - n
                        pos = n
                    elif length > MAX_KEPT_MESSAGE:
                        return b"", BROKEN
                    break
                if not _NOTED_BY_TYPE[msg_type]:
                    pos = end   # rows, descriptions, notifications: only forwarded
                    continue
                if msg_type == Z:
                    skipped_check = False
                    if (type(head) is ParseEntry or type(head) is CloseEntry
                            or type(head) is DescribeEntry):   # what an error skipped
                        self._skipped()
                        skipped_check = self.check_over
                        self.check_over = False
                    own = bool(pending) and pending.popleft() is OWN_SYNC
                    if own:
                        # The pooler's Sync after a Flush (sync_after_flush): the client sent none
                        # and awaits no ReadyForQuery.
                        pieces = _cut(pieces, data, start, pos)
                        start = end
                    else:
                        self.queries += 1
                    if self.error_names and not pending:
                        # (Kept while a later batch is outstanding: its errors may name them.)
                        self.error_names.clear()
                    self.copy_in = False
                    status = data[pos + 5]
                    if status != _IDLE and status != _IN_BLOCK and status != _FAILED:
                        return b"", BROKEN
                    self.status = status
                    if skipped_check and (pending or self.unsynced):
                        pos = end
                        event = CHECKED
                        break
                    if not pending and not self.unsynced:
                        if self.copy_via_execute or self.copies_ended:
                            self.forget_copy()   # nothing outstanding: no Execute is still to turn out a COPY
                        if self.notes & NOTE_RESET and self.status != _FAILED and not own:
                            # Held until the startup values are back (the caller decides).
                            pieces = _cut(pieces, data, start, pos)
                            self.held = data[pos:end]
                            start = end
                        pos = end
                        event = BOUNDARY
                        break
                    head = pending[0] if pending else None
                    hidden = type(head) is HiddenQuery
                elif msg_type == CC:
                    prefixes = (_TAG_PREFIXES_BY_START.get(data[pos + 5] << 16 | data[pos + 6] << 8
                                                           | data[pos + 7])
                                if end > pos + 7 else None)
                    if prefixes is not None and data.startswith(prefixes, pos + 5):
                        self._command_tag(data[pos + 5:end])
                elif (msg_type == PARSE_COMPLETE or msg_type == CLOSE_COMPLETE
                      or msg_type == ROW_DESCRIPTION or msg_type == NO_DATA):
                    if msg_type == PARSE_COMPLETE:
                        if type(head) is ParseEntry:
                            pending.popleft()
                            if head.hidden:
                                # The pooler's own Parse (a statement this connection lacked).
                                pieces = _cut(pieces, data, start, pos)
                                start = end
                            head = pending[0] if pending else None
                    elif msg_type == CLOSE_COMPLETE:
                        if type(head) is CloseEntry:
                            pending.popleft().completed()
                            head = pending[0] if pending else None
                    elif self.describing is not None:
                        # A statement's description ends: the shape a client is told, or the
                        # answer to the pooler's check (not forwarded).
                        entry = self.describing
                        self.describing = None
                        if entry.statement is not None:
                            shape = (result_shape(data, pos + 5, end) if msg_type == ROW_DESCRIPTION
                                     else b"")
                            if entry.answered(shape, self.described_params):
                                self.notes |= NOTE_STALE   # as the 0A000 PostgreSQL would send
                        if entry.hidden:
                            pieces = _cut(pieces, data, start, pos)
                            start = end
                            self.checked = entry.statement
                            pos = end
                            event = CHECKED
                            break
                    # The last reply of a counted batch (RowDescription or NoData end a Describe's
                    # answer; outside such a batch they are a result's columns, only forwarded).
                    if self.flush_count > 0 and self._batch_reply():
                        pos = end
                        event = FLUSHED
                        break
                elif msg_type == ERR:
                    self.flush_count = -1   # the server skips the rest until the client's Sync
                    if (type(head) is ParseEntry or type(head) is CloseEntry
                            or type(head) is DescribeEntry):   # failed, or skipped until the Sync
                        head = self._skipped()
                        hidden = type(head) is HiddenQuery
                    if self.describing is not None:
                        # A Describe's ParameterDescription came, then this (0A000, or 42P01 when
                        # its table is gone, from the revalidation of its result): no description.
                        if self.describing.hidden:
                            self.check_over = True
                            self.checked = self.describing.statement
                        self.describing = None
                    if self.unsynced and all(type(entry) in STATEMENT_ENTRIES for entry in pending):
                        # No ReadyForQuery is owed before it: the error is of the open batch.
                        self.skipping = True
                    at = data.find(b"\0C", pos + 4, end)   # the code field (S and V come first)
                    code = bytes(data[at + 2:at + 7]) if at >= 0 else b""
                    if code in _OUTDATED:
                        # (Whether a prepared statement raised it is not said: a simple Query's
                        # such error renews them too, which costs each a Parse, no more.)
                        self.notes |= NOTE_OUTDATED | (NOTE_STALE if code == _STALE_PLAN else 0)
                    if self.error_names:
                        pieces = _cut(pieces, data, start, pos)
                        pieces.append(self._client_error(data[pos + 5:end]))
                        start = end
                    if self.check_over:
                        self.check_over = False
                        pos = end
                        event = CHECKED
                        break
                elif msg_type == PS:
                    self._parameter_status(data, pos + 5, end, True)
                elif msg_type == PARAMETER_DESCRIPTION:
                    # A Describe of a statement is answered (its RowDescription or NoData follows).
                    if type(head) is DescribeEntry:
                        pending.popleft()
                        self.describing = head
                        self.described_params = data[pos + 5:end]
                        if head.hidden:
                            pieces = _cut(pieces, data, start, pos)
                            start = end
                        head = pending[0] if pending else None
                        hidden = type(head) is HiddenQuery
                elif msg_type == NOTICE:
                    if data.find(_PLACEHOLDER_REMOVED, pos + 5, end) >= 0:
                        self.notes |= NOTE_SETTINGS
                        if self._others_placeholder(data[pos + 5:end]):
                            # Another session's placeholder, left on this server process: its name
                            # is not this session's to see.
                            pieces = _cut(pieces, data, start, pos)
                            start = end
                else:   # CopyInResponse, CopyBothResponse
                    self.copy_started()
                    head = pending[0] if pending else None
                    hidden = type(head) is HiddenQuery
                pos = end
            if pos < n:
                self.inbuf = bytearray(data[pos:])
                self.need = 5 if n - pos < 5 else 1 + length_word(data, pos + 1)
            if pieces is None:
                out = data if start == 0 and pos == n else data[start:pos]
            else:
                pieces.append(data[start:pos])
                out = b"".join(pieces)
        except (ValueError, IndexError, struct.error):
            return b"", BROKEN
        return (first + out if first else out), event

    def _batch_reply(self) -> bool:
        """One more reply of a counted batch came (flush_count): whether it was the last one of
        a batch the client flushed."""
        self.flush_count -= 1
        return self.flush_count == 0 and self.flushed

    def sync_after_flush(self) -> bytes:
        """A Sync of the pooler's own, after the owner flushed Parses, Describes and Closes of
        statements only and every reply to them came without an error (event FLUSHED); b"" when
        that no longer holds (more came from the client meanwhile).

        asyncpg prepares with Parse, Describe, Flush; the Bind and its Sync come when the
        statement runs, maybe much later.  Until a Sync the server holds the implicit
        transaction those messages began, so the connection would stay with a session that may
        not run anything for minutes (every other session of the backend waiting), and a
        simple Query it sends next (asyncpg's COPY of copy_records_to_table, its reset query)
        could not be accounted for.  With no portal among them and no error, a Sync there ends
        an implicit transaction that has run nothing (inside a transaction block it ends
        nothing), the statements stay prepared, and its ReadyForQuery is not passed on
        (OWN_SYNC).  What the client can tell: outside a transaction block, the statement's
        later execution is a transaction of its own, so under REPEATABLE READ its snapshot,
        its now() and the locks its Parse took date from then, not from the Parse (README,
        Known limits)."""
        if (not self.unsynced or self.portals or self.flush_count != 0 or self.copy_in
                or self.copy_via_execute):
            return b""
        self.pending.append(OWN_SYNC)
        self.synced()
        return protocol.SYNC_MESSAGE

    def expect_reply(self) -> None:
        """A Parse, Describe or Close went to the server: one more reply of a counted batch."""
        if self.flush_count >= 0:
            self.flush_count += 1

    def synced(self) -> None:
        """A Sync went to the server (the client's, or one of the pooler's): no batch is open."""
        self.unsynced = self.portals = self.flushed = self.skipping = False
        self.flush_count = -1

    def forget_copy(self) -> None:
        """A Query, or a boundary: no Execute sent before is still to turn out a COPY."""
        self.copy_via_execute = self.copy_data_early = False
        self.copy_syncs = self.copies_ended = 0

    def copy_data_sent(self) -> None:
        """A CopyData went to the server: rows sent after an Execute before the server said a
        COPY began are noted (a Sync among them cannot be accounted for)."""
        if self.copy_via_execute and not self.copy_in and not self.copies_ended:
            self.copy_data_early = True

    def copy_started(self) -> None:
        """The server entered copy-in mode.

        After an Execute (libpq's PQexecParams of a COPY, say: Parse, Bind, Describe,
        Execute, Sync, then the rows, CopyDone, Sync), the Syncs the client sent before
        its CopyDone are ignored by the server and get no ReadyForQuery: their
        expected replies are taken off the queue, and a Sync is owed after the copy
        (until the client sends one, the server is not at a boundary).
        """
        if self.copy_via_execute and self.copy_syncs:
            drop = self.copy_syncs
            kept: list = []
            pending = self.pending
            while pending and drop:
                entry = pending.popleft()
                if entry is None:
                    drop -= 1
                else:
                    kept.append(entry)
            pending.extendleft(reversed(kept))
            self.copy_syncs = 0
        if self.copies_ended:
            # The client ended the copy before it heard of it.
            self.copies_ended -= 1
            if self.copy_via_execute:
                self.unsynced = not self.synced_after_copy
        else:
            self.copy_in = True
            if self.copy_via_execute:
                self.unsynced = True
            receiver = self.owner or self.pinned
            if receiver is not None and receiver.gone:
                self.copy_abandoned = True   # nobody will send the rows or the CopyDone

    def _skipped(self):
        """Parses and Closes an error failed or made the server skip: undone, the latest first."""
        pending = self.pending
        undone = []
        while pending and type(pending[0]) in STATEMENT_ENTRIES:
            undone.append(pending.popleft())
        for entry in reversed(undone):
            entry.failed()
        return pending[0] if pending else None

    def _command_tag(self, tag: bytes) -> None:
        """What a CommandComplete says about the owner's session state."""
        for prefixes, note in _TAG_NOTES:
            if tag.startswith(prefixes):
                self.notes |= note
        if self.pinned is None and tag.startswith(b"DROP TABLE"):
            self.notes |= NOTE_STALE
        if tag.startswith(b"DISCARD ALL\0") or tag.startswith(b"DEALLOCATE ALL\0"):
            self.prepared.clear()
            self.unnamed = None
        if tag.startswith(b"PREPARE TRANSACTION"):
            self.xacts += 1
        elif tag.startswith((b"COMMIT PREPARED", b"ROLLBACK PREPARED")):
            self.xacts -= 1

    def _others_placeholder(self, fields: bytes) -> bool:
        """Whether a 42602 WARNING ("invalid configuration parameter name "plpgsql.x", removing it":
        loading a library reserved the prefix of a placeholder on this server process) names a
        custom setting that the session receiving this connection's output never named."""
        receiver = self.owner or self.pinned
        if receiver is None:
            return False
        name = quoted_setting(protocol.parse_error_fields(fields).get("M", ""))
        return name is not None and name not in receiver.context.custom_names

    def _parameter_status(self, data: bytes, pos: int, end: int, forwarded: bool) -> None:
        name_end = data.find(b"\0", pos, end)
        value_end = data.find(b"\0", name_end + 1, end)
        if name_end < 0 or value_end < 0:
            return
        name = data[pos:name_end].decode("utf-8", "replace")
        value = data[name_end + 1:value_end].decode("utf-8", "replace")
        self.params[name] = value
        if forwarded:
            if self.reported is not None:
                self.reported[name] = value
            if name.lower() in REPORTED_SETTABLE:
                self.notes |= NOTE_SETTINGS   # read back at the end of the transaction

    def _hidden_message(self, hidden: HiddenQuery, msg_type: int, data: bytes,
                        pos: int, end: int) -> None:
        if msg_type == DATA_ROW:
            hidden.rows.append(text_row(data, pos, end, protocol.python_codec(self.params.get("client_encoding"))))
        elif msg_type == ERR and hidden.error is None:
            hidden.error = PgError.from_fields(protocol.parse_error_fields(data[pos:end]))
        elif msg_type == PS:
            self._parameter_status(data, pos, end, False)

    def _client_error(self, payload: bytes) -> bytes:
        """The server's error with the pooler's statement names shown as the client's."""
        fields = protocol.parse_error_fields(payload)
        text = fields.get("M", "")
        if STALE_NAME in self.error_names and f'"{STALE_NAME.decode()}"' in text:
            return STALE_PLAN_ERROR   # a STALE statement's Bind or Describe (statements.py)
        for server_name, client_name in self.error_names.items():
            quoted = f'"{server_name.decode()}"'
            if quoted in text and not client_name:
                text = text.replace("prepared statement " + quoted, "unnamed prepared statement")
            text = text.replace(quoted, f'"{client_name.decode("utf-8", "replace")}"')
        fields["M"] = text
        body = b"".join(code.encode() + protocol.cstring(value) for code, value in fields.items())
        return protocol.message(b"E", body + b"\0")

    def pin_check_sent(self) -> None:
        """The pin check goes out now: the statements prepared so far are those its answer
        speaks of (forget_deallocated)."""
        self.prepared_checked = set(self.prepared)

    def forget_deallocated(self, names: str | None) -> int:
        """The pin check named the protocol-level statements the connection has (space-separated,
        None for none): forget those prepared before it was sent that it does not name (a
        DEALLOCATE in a function body, or of a name of the pooler's), so that they are prepared
        again where a session binds them; how many.  Only those: a Parse of the owner's next
        request may have followed the check, and its statement is not in the answer."""
        checked, self.prepared_checked = self.prepared_checked, None
        if checked is None:
            return 0
        left = {name.encode() for name in names.split()} if names else set()
        gone = (checked & self.prepared) - left
        self.prepared -= gone
        return len(gone)

    def take_notes(self) -> tuple[int, int]:
        """The NOTE_* facts and prepared-transaction count since the last boundary, cleared."""
        notes, xacts = self.notes, self.xacts
        self.notes = self.xacts = 0
        return notes, xacts


def _cut(pieces: list | None, data: bytes, start: int, pos: int) -> list:
    """The pieces of receive()'s output with data[start:pos], what came before a message that
    is not passed on."""
    if pieces is None:
        pieces = []
    if pos > start:
        pieces.append(data[start:pos])
    return pieces


def text_row(data: bytes, pos: int, end: int, codec: str = "utf-8") -> tuple:
    """The text values of a DataRow payload data[pos:end], in the connection's client encoding."""
    count = _int16(data, pos)[0]
    pos += 2
    values: list[str | None] = []
    for _ in range(count):
        size = _int32(data, pos)[0]
        pos += 4
        if size < 0:
            values.append(None)
        else:
            if pos + size > end:
                raise ValueError("DataRow overruns its message")
            values.append(data[pos:pos + size].decode(codec, "replace"))
            pos += size
    return tuple(values)


_int16 = struct.Struct("!h").unpack_from
_int32 = struct.Struct("!i").unpack_from
_two_int32 = struct.Struct("!ii")


# ---------------------------------------------------------------- the connection

def upstream_address(settings) -> tuple[int, Any]:
    """(address family, address) of the upstream server, as libpq reads host/port."""
    host, port = settings.upstream_host, settings.upstream_port
    if host.startswith("/"):
        return socket.AF_UNIX, f"{host}/.s.PGSQL.{port}"
    family, _type, _proto, _name, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM)[0]
    return family, addr


class ServerConnection(ServerProtocol):
    """One server connection: its socket and login, with the protocol state it inherits."""

    def __init__(self, settings, startup: dict[str, str], secret: str | None):
        super().__init__()
        family, addr = upstream_address(settings)
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        if family != socket.AF_UNIX:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.fd = self.sock.fileno()
        self.state = ServerState.CONNECTING
        self.deadline = time.monotonic() + settings.upstream_connect_timeout
        self._reader: protocol.MessageReader | None = protocol.MessageReader()
        self._auth: auth.ClientAuth | None = auth.ClientAuth(startup["user"], secret)
        self._startup = startup
        try:
            self.sock.connect(addr)
        except BlockingIOError:
            pass
        except OSError as exc:
            self.close()
            raise PgError("sqlclient_unable_to_establish_sqlconnection",
                          f"could not connect to upstream server: {exc.strerror or exc}")

    def connected(self) -> bytes:
        """Called when the socket turns writable in CONNECTING: the startup packet to send."""
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise PgError("sqlclient_unable_to_establish_sqlconnection",
                          f"could not connect to upstream server: {errno.errorcode.get(err, err)}")
        self.state = ServerState.LOGIN
        return protocol.startup_message(self._startup)

    def login(self, data: bytes, on_message=None) -> bytes:
        """Feed bytes received during LOGIN; returns bytes to send back.

        Sets state IDLE after ReadyForQuery.  on_message(type, payload) sees every
        message (the dedicated backend relays ParameterStatus and notices to its client).
        Raises PgError with the server's own error if it refuses us.
        """
        reader, client_auth = self._reader, self._auth
        assert reader is not None and client_auth is not None, "login() after the login"
        reader.feed(data)
        out = b""
        while self.state is ServerState.LOGIN:
            item = reader.next()
            if item is None:
                break
            msg_type, payload = item
            if msg_type == protocol.AUTHENTICATION:
                code = struct.unpack_from("!i", payload)[0]
                if code != protocol.AUTH_OK:
                    out += client_auth.respond(code, payload[4:])
            elif msg_type == protocol.PARAMETER_STATUS:
                name, pos = protocol.read_cstring(payload, 0)
                value, _ = protocol.read_cstring(payload, pos)
                self.params[name] = value
            elif msg_type == protocol.BACKEND_KEY_DATA:
                self.pid, self.key = _two_int32.unpack(payload)
            elif msg_type == protocol.ERROR_RESPONSE:
                raise PgError.from_fields(protocol.parse_error_fields(payload))
            elif msg_type == protocol.READY_FOR_QUERY:
                self.state = ServerState.IDLE
            if on_message is not None:
                on_message(msg_type, payload)
        if self.state is ServerState.IDLE:
            # Whatever followed ReadyForQuery (nothing, normally) is ordinary traffic.
            self.inbuf = reader.buf
            self.need = 1
            self._reader = None
            self._auth = None
        return out

    def cancel_packet(self) -> bytes:
        return protocol.cancel_request(self.pid, self.key)

    def cancel_now(self, settings, timeout: float = 2.0) -> None:
        """Deliver a CancelRequest for this connection and wait until the server has taken it.

        For shutdown only (it blocks): a query must not go on running on the
        server after the pooler has gone.
        """
        family, addr = upstream_address(settings)
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout)
                sock.connect(addr)
                sock.sendall(self.cancel_packet())
                sock.recv(1)   # PostgreSQL closes the connection once it has signalled
        except OSError:
            pass

    def close(self) -> None:
        if self.state is not ServerState.CLOSED:
            self.state = ServerState.CLOSED
            try:
                self.sock.close()
            except OSError:
                pass


class CancelSender:
    """A one-shot connection that delivers a CancelRequest for one server connection.

    PostgreSQL signals the server process and then closes the connection, so
    end of file here means the signal has been sent.
    """

    __slots__ = ("sock", "fd", "packet", "deadline", "server", "sent")

    def __init__(self, settings, server: ServerConnection):
        family, addr = upstream_address(settings)
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()
        self.packet = server.cancel_packet()
        self.server = server
        self.sent = False
        self.deadline = time.monotonic() + settings.upstream_connect_timeout
        try:
            self.sock.connect(addr)
        except BlockingIOError:
            pass
        except OSError:
            self.sock.close()
            raise

    def send(self) -> bool:
        """Send the request once connected; False if it could not be sent (nothing was signalled)."""
        try:
            if self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                return False
            self.sent = self.sock.send(self.packet) == len(self.packet)
        except OSError:
            self.sent = False
        return self.sent

    def taken(self) -> bool:
        """True once the server has closed the connection (the request is processed)."""
        try:
            return self.sock.recv(64) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True
