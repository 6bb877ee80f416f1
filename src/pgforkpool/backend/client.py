"""Sans-IO frontend side of a pooled session: frames and validates what a client sends, renames its statements.

ClientProtocol.receive() takes the bytes a client sent while its session owns
a server connection and returns the bytes to send to the server and an
outcome: None, TERMINATE, or a statements.ProtocolViolation.  It never raises
on a client's bytes.  Along the way it

- checks every message's type and length as PostgreSQL's SocketBackend does
  (a length PostgreSQL would refuse never reaches the server, and Sync,
  Flush, Terminate and CopyDone have empty bodies);
- passes a large Query, CopyData or Bind through as it arrives instead of
  buffering it whole (a Bind's statement name is rewritten in its header);
- renames prepared statements (statements.py) and records the replies the
  server owes (ServerProtocol.pending);
- flags statement text that may change session state, and carries the flag
  on the prepared statement to every later Bind of it;
- holds a Bind or Describe of a statement it prepared again on this
  connection until the server has described it there (statements.py: a
  statement whose result changed fails with 0A000; resume()).

ClientProtocol.buffer() keeps what a session sends while it waits for a
server connection, bounded by the caller (it stops reading past
WAITING_INPUT_LIMIT).
"""

import re
import struct
from typing import Final

from ..shared import protocol
from .context import custom_setting_names
from .server import ServerProtocol
from .statements import (MISSING, RENEW, STALE, STALE_NAME, CloseEntry, DescribeEntry, ParseEntry, ProtocolViolation,
                         Statement, StatementRegistry, describe_message, length_word, parse_key, parse_message,
                         with_statement_name)

_header = struct.Struct("!cI").pack
FLUSH_MESSAGE: Final = b"H\0\0\0\x04"

# PostgreSQL's PQ_SMALL_MESSAGE_LIMIT and PQ_LARGE_MESSAGE_LIMIT (MaxAllocSize - 1).
SMALL_MESSAGE_LIMIT: Final = 10000
LARGE_MESSAGE_LIMIT: Final = 0x3FFFFFFF - 1

Q: Final = protocol.QUERY
F: Final = protocol.FUNCTION_CALL
X: Final = protocol.TERMINATE
P: Final = protocol.PARSE
B: Final = protocol.BIND
D: Final = protocol.DESCRIBE
E: Final = protocol.EXECUTE
C: Final = protocol.CLOSE
S: Final = protocol.SYNC
H: Final = protocol.FLUSH
COPY_DATA: Final = protocol.COPY_DATA
COPY_DONE: Final = protocol.COPY_DONE
COPY_FAIL: Final = protocol.COPY_FAIL

# The longest length word each frontend message type may carry; 0: not a frontend message.
LIMITS: Final = [0] * 256
for _t in (Q, F, P, B, COPY_DATA):
    LIMITS[_t] = LARGE_MESSAGE_LIMIT
for _t in (X, C, D, E, H, S, COPY_DONE, COPY_FAIL):
    LIMITS[_t] = SMALL_MESSAGE_LIMIT
del _t
_STATEMENT: Final = ord("S")
_PORTAL: Final = ord("P")

# A Bind's portal and statement names are looked for within this many bytes
# of a message that has not arrived whole.
BIND_HEADER_LIMIT: Final = 1 << 16
# Input a waiting session may buffer before its socket is not read any more.
WAITING_INPUT_LIMIT: Final = 1 << 16
# The most filler sent to complete the message of a client that vanished in
# the middle of it; beyond this its server connection is closed instead.
ABANDON_FILL_LIMIT: Final = 1 << 20

TERMINATE: Final = "terminate"

# ClientProtocol.need while the session's next message waits for the pooler's check of a
# statement it prepared again (statements.py): more input is only buffered.
HOLDING: Final = 1 << 40


class Hold:
    """What a Bind or Describe of a statement that must be checked first sends meanwhile."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: bytes):
        self.prefix = prefix

# Flags of statement text that may change session state without a telling
# command tag (SET, LISTEN, PREPARE, CREATE TABLE… have tags; see server.py).
MAY_SET: Final = 1      # set_config(), UPDATE pg_settings: read the settings back after the transaction
MAY_PIN: Final = 2      # temporary objects, session advisory locks: ask the server whether to pin
# UPDATE pg_settings sets the session's settings (a rule calls set_config), under a tag that
# says nothing of it ("UPDATE 0"); a SELECT from pg_settings does not.
_SETTINGS_TEXT: Final = re.compile(rb"set_config|\bupdate\s+(?:pg_catalog\s*\.\s*)?pg_settings\b",
                                   re.IGNORECASE)
_PIN_TEXT: Final = re.compile(rb"\btemp(?:orary)?\b|pg_temp|advisory_(?:un)?lock", re.IGNORECASE)
# A C-speed first look (lower-case, then substring search) before any regex:
# most statements mention none of these words.
_LOWER: Final = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")
# How much of a streamed text is kept to find a word cut by a chunk boundary.
_OVERLAP: Final = 16


# Whether this module runs compiled (mypyc): a loop over a few bytes is then native
# code, cheaper than a call of a bytes method (about 700 instructions each).
COMPILED: Final = not __file__.endswith(".py")
# Query texts up to this long are scanned by mentions_state_words when compiled; longer
# ones (and every text uncompiled) by may_touch_state's C-speed searches.
SHORT_TEXT: Final = 1024
# Names (a Bind's portal and statement) looked for byte by byte before find() takes over.
SHORT_NAME: Final = 64


def mentions_state_words(data: bytes, start: int, end: int) -> bool:
    """may_touch_state(data[start:end]) without the lower-cased copy and its three searches:
    a byte loop, which mypyc compiles to native code (for a short text)."""
    i = start
    last = end - 4   # temp, the shortest word, has four letters
    while i <= last:
        c = data[i] | 0x20   # a letter in lower case (0x20 is the case bit of ASCII letters)
        if c == 0x74:        # t: temp
            if ((data[i + 1] | 0x20) == 0x65 and (data[i + 2] | 0x20) == 0x6D
                    and (data[i + 3] | 0x20) == 0x70):
                return True
        elif c == 0x73:      # s: set_config, pg_settings
            if i + 8 <= end and (data[i + 1] | 0x20) == 0x65 and (data[i + 2] | 0x20) == 0x74:
                if data[i + 3] == 0x5F:
                    if i + 10 <= end and data[i + 4:i + 10].lower() == b"config":
                        return True
                elif (i >= start + 3 and data[i + 3:i + 8].lower() == b"tings"
                      and data[i - 3:i].lower() == b"pg_"):
                    return True
        elif c == 0x61:      # a: advisory
            if (i + 8 <= end and (data[i + 1] | 0x20) == 0x64
                    and data[i + 2:i + 8].lower() == b"visory"):
                return True
        i += 1
    return False


def nul_at(data: bytes, start: int, end: int) -> int:
    """data.find(b"\0", start, end): byte by byte over the first SHORT_NAME bytes when
    compiled (a name is short; the method call costs more than the loop)."""
    if COMPILED:
        stop = start + SHORT_NAME if start + SHORT_NAME < end else end
        i = start
        while i < stop:
            if data[i] == 0:
                return i
            i += 1
        if stop == end:
            return -1
        start = stop
    return data.find(b"\0", start, end)


def may_touch_state(text) -> bool:
    # find(), not `in`: bytes.__contains__ first tries its argument as an integer, and the
    # TypeError it formats and discards for a bytes argument costs more than the search.
    lowered = text.translate(_LOWER)
    return (lowered.find(b"set_config") >= 0 or lowered.find(b"temp") >= 0
            or lowered.find(b"advisory") >= 0 or lowered.find(b"pg_settings") >= 0)


def text_flags(text) -> int:
    """MAY_SET | MAY_PIN as the statement text earns them."""
    if not may_touch_state(text):
        return 0
    flags = MAY_SET if _SETTINGS_TEXT.search(text) else 0
    if _PIN_TEXT.search(text):
        flags |= MAY_PIN
    return flags


class ClientProtocol:
    """One session's frontend stream and its statement names."""

    __slots__ = ("buf", "need", "passthrough", "scanning", "tail", "statements", "unnamed",
                 "flags", "texts", "last_text", "registry", "scope", "holding")

    def __init__(self, registry: StatementRegistry) -> None:
        self.buf = bytearray()   # received, not yet forwarded (an incomplete message, or input that waits)
        self.need = 5            # framing is tried again once buf holds this many bytes
        self.passthrough = 0     # bytes of a message being streamed to the server, still to come
        self.scanning = False    # the streamed message is a Query: its text is being scanned
        self.tail = b""          # the end of the last streamed chunk (a word may straddle chunks)
        self.statements: dict[bytes, Statement] = {}   # client name -> shared statement
        self.unnamed: Statement | None = None          # the session's unnamed statement
        self.flags = 0           # MAY_SET | MAY_PIN earned since the last transaction boundary
        self.texts: list = []    # statement texts since then with MAY_SET (for custom setting names)
        self.last_text = b""     # the last input with a Query or Parse (SET names a custom setting there)
        self.registry = registry
        self.scope = b""          # context.parse_scope of its settings: whose statements it shares
        self.holding: Statement | None = None   # whose check its next message waits for (HOLDING)

    # ------------------------------------------------------------ waiting for a server

    def buffer(self, data: bytes):
        """Keep input of a session that has no server connection now.

        Returns True when the session has something to run (a whole message,
        or more than fits the waiting buffer), False to wait for more, or a
        ProtocolViolation if the first message's header is already wrong.
        """
        buf = self.buf
        buf += data
        if len(buf) < 5:
            return False
        length = (buf[1] << 24) | (buf[2] << 16) | (buf[3] << 8) | buf[4]   # length_word, of a bytearray
        if not 4 <= length <= LIMITS[buf[0]]:
            return ProtocolViolation(_bad_header(buf[0], length))
        return len(buf) > length or len(buf) >= WAITING_INPUT_LIMIT

    def ready(self):
        """Whether what is buffered is worth a server connection (see buffer)."""
        return self.buffer(b"")

    def drop_request(self) -> bool:
        """Discard the buffered input up to and including its first Query, FunctionCall or Sync.

        For a session whose wait for a server connection timed out, or whose statement
        was cancelled before it reached the server: PostgreSQL answers an error by
        skipping the rest of the request up to its Sync.  False (nothing discarded)
        when no whole request is buffered yet.  A Query or a Parse of the unnamed
        statement among what is discarded leaves the session without one, as when
        PostgreSQL fails them (a later Bind of it gets 26000, never the old statement).
        """
        buf = self.buf
        pos, n = 0, len(buf)
        unnamed_gone = False
        while n - pos >= 5:
            msg_type = buf[pos]
            end = pos + 1 + ((buf[pos + 1] << 24) | (buf[pos + 2] << 16) | (buf[pos + 3] << 8) | buf[pos + 4])
            if end > n or end < pos + 5:
                return False
            if msg_type == Q or (msg_type == P and end > pos + 5 and buf[pos + 5] == 0):
                unnamed_gone = True
            if msg_type == Q or msg_type == F or msg_type == S:
                del buf[:end]
                self.need = 5
                if unnamed_gone:
                    self.unnamed = None
                return True
            pos = end
        return False

    def take_flags(self) -> tuple[int, list]:
        """The state flags and settings texts earned since the last boundary, cleared."""
        flags, texts = self.flags, self.texts
        self.flags = 0
        if texts:
            self.texts = []
        return flags, texts

    # ------------------------------------------------------------ owning a server

    def receive(self, data: bytes, server: ServerProtocol) -> "tuple[bytes, str | ProtocolViolation | None]":
        """Bytes for the server from what the client sent, and an outcome.

        The outcome is None, TERMINATE (the client said goodbye: the bytes
        before it are returned), or a ProtocolViolation (likewise).
        """
        head = b""
        if self.passthrough:
            k = self.passthrough if self.passthrough < len(data) else len(data)
            head = data if k == len(data) else data[:k]
            self.passthrough -= k
            if self.scanning:
                self._scan(head)
            if k == len(data):
                return head, None
            data = data[k:]
        if self.buf:
            if data:
                self.buf += data
                if len(self.buf) < self.need:
                    return head, None
            data = bytes(self.buf)   # (from _activate: what waited, whole or not)
            self.buf = bytearray()
            self.need = 5
        # Framing, inline: this runs for every message a client sends.
        pending = server.pending
        n = len(data)
        pos = 0
        pieces = None     # pieces to send, once a message had to be rewritten
        emit = 0          # data[emit:pos] is still to be sent as it is
        may_touch = None  # whether any text in data may change state (looked at once)
        hold = False      # data[pos:] waits for a check (Hold)
        outcome: str | ProtocolViolation | None = None
        while n - pos >= 5:
            msg_type = data[pos]
            length = length_word(data, pos + 1)
            if not 4 <= length <= LIMITS[msg_type]:
                outcome = ProtocolViolation(_bad_header(msg_type, length))
                break
            end = pos + 1 + length
            if end > n:
                # Not here whole: stream what can be streamed, keep the rest.
                if msg_type == Q:
                    if server.unsynced:
                        outcome = ProtocolViolation(MIXED_PIPELINE)
                        break
                    pending.append(None)
                    if server.copy_via_execute or server.copies_ended:
                        server.forget_copy()
                    self.unnamed = server.unnamed = None
                    self.scanning = True
                    self.tail = b""
                    self.passthrough = end - n   # before the scan: it ends scanning at 0
                    self._scan(data[pos + 5:n])
                    pos = n
                elif msg_type == COPY_DATA:
                    server.copy_data_sent()
                    pos = self._stream(end, n)
                elif msg_type == B:
                    # A large Bind: its statement name renamed in its header, the rest streamed.
                    limit = min(n, pos + 5 + BIND_HEADER_LIMIT)
                    portal_end = data.find(b"\0", pos + 5, limit)
                    name_end = data.find(b"\0", portal_end + 1, limit) if portal_end >= 0 else -1
                    if name_end >= 0:
                        server.unsynced = server.portals = True
                        replaced = self._bind(server, data, pos, portal_end + 1, name_end, length)
                        if replaced is not None:
                            if pieces is None:
                                pieces = []
                            pieces.append(data[emit:pos])
                            if type(replaced) is Hold:
                                pieces.append(replaced.prefix)
                                emit = pos
                                hold = True
                                break
                            pieces.append(replaced)
                            emit = name_end + 1
                        pos = self._stream(end, n)
                    elif n - pos > BIND_HEADER_LIMIT:
                        outcome = ProtocolViolation("invalid Bind message")
                break
            if msg_type == Q or msg_type == F:
                if server.unsynced:
                    outcome = ProtocolViolation(MIXED_PIPELINE)
                    break
                pending.append(None)
                if server.copy_via_execute or server.copies_ended:
                    server.forget_copy()
                if msg_type == Q:
                    self.last_text = data
                    # A simple Query destroys the unnamed statement.
                    self.unnamed = server.unnamed = None
                    if COMPILED and length <= SHORT_TEXT:
                        touch = mentions_state_words(data, pos + 5, end)
                    else:   # a long text, or uncompiled: C-speed searches, once for all of data
                        if may_touch is None:
                            may_touch = may_touch_state(data)
                        touch = may_touch
                    if touch:
                        self._flag_text(data[pos + 5:end])
            elif msg_type == S:
                if length != 4:
                    outcome = ProtocolViolation("invalid message format")
                    break
                if server.copy_in:
                    # PostgreSQL ignores a Sync in copy-in mode, but answers it once the COPY
                    # has failed (a bad row read before it): not sent, so that no reply comes
                    # that nobody awaits.
                    if pieces is None:
                        pieces = []
                    pieces.append(data[emit:pos])
                    emit = end
                    pos = end
                    continue
                if server.copy_via_execute:
                    if server.copies_ended:
                        server.synced_after_copy = True
                    elif server.copy_data_early:
                        # Whether the server reads it in copy-in mode (ignored) or after the
                        # COPY failed on a row (answered) cannot be told: libpq never sends it.
                        outcome = ProtocolViolation("Sync between CopyData messages")
                        break
                    else:
                        server.copy_syncs += 1   # ignored if that Execute turns out to be a COPY FROM STDIN
                pending.append(None)
                server.synced()
            elif msg_type == B or msg_type == E or msg_type == P or msg_type == D or msg_type == C:
                # Extended-query messages leave work on the server until the next Sync (Flush
                # does not: psycopg ends a pipeline with Sync then Flush).  Compared one by one:
                # a set lookup would box msg_type when compiled.
                if not server.unsynced:
                    # The first of a batch: its replies are counted (ServerProtocol.flush_count)
                    # when nothing before them is outstanding.
                    server.flush_count = -1 if None in pending else 0
                server.unsynced = True
                resume = end
                if msg_type == P:
                    self.last_text = data
                    if may_touch is None:
                        may_touch = may_touch_state(data)
                    replaced = self._parse(server, data, pos, end, may_touch)
                    server.expect_reply()
                elif msg_type == B:
                    server.portals = True
                    portal_end = nul_at(data, pos + 5, end)
                    resume = nul_at(data, portal_end + 1, end) + 1 if portal_end >= 0 else 0
                    replaced = (ProtocolViolation("invalid Bind message") if not resume
                                else self._bind(server, data, pos, portal_end + 1, resume - 1, length))
                elif msg_type == E or (msg_type == D and length > 5 and data[pos + 5] == _PORTAL
                                       and data[end - 1] == 0):
                    replaced = None   # Execute, Describe of a portal: nothing to rename
                    server.portals = True
                    if msg_type == E:
                        # Whether it starts a COPY FROM STDIN only the server's reply says
                        # (ServerProtocol.copy_started): the Syncs that follow until its
                        # CopyDone are counted meanwhile.
                        server.copy_via_execute = True
                        server.copy_syncs = server.copies_ended = 0
                        server.copy_data_early = False
                else:
                    replaced = self._describe_or_close(server, msg_type, data, pos, end)
                    if type(replaced) is not Hold:
                        server.expect_reply()
                if replaced is not None:
                    if type(replaced) is ProtocolViolation:
                        outcome = replaced
                        break
                    if pieces is None:
                        pieces = []
                    pieces.append(data[emit:pos])
                    if type(replaced) is Hold:
                        # This message and the rest wait for the check's answer (resume).
                        pieces.append(replaced.prefix)
                        emit = pos
                        hold = True
                        break
                    pieces.append(replaced)
                    emit = resume
            elif msg_type == H or msg_type == X or msg_type == COPY_DONE:   # bodies must be empty (Sync's too, above)
                if length != 4:
                    outcome = ProtocolViolation("invalid message format")
                    break
                if msg_type == X:
                    outcome = TERMINATE
                    break
                if msg_type == COPY_DONE:
                    self._copy_ended(server)
                elif server.flush_count > 0 and not server.portals:
                    server.flushed = True   # a Sync of the pooler's own may follow the replies
            elif msg_type == COPY_FAIL:
                self._copy_ended(server)
            elif msg_type == COPY_DATA:
                server.copy_data_sent()
            pos = end
        if outcome is None and pos < n:
            self.buf = bytearray(data[pos:])
            if n - pos < 5:
                self.need = 5
            else:
                self.need = 1 + length_word(data, pos + 1)
                if data[pos] == B:   # its header is enough to start streaming it
                    self.need = min(self.need, 5 + BIND_HEADER_LIMIT)
            if hold:
                self.need = HOLDING
        if pieces is None:
            out = data if pos == n and emit == 0 else data[emit:pos]
        else:
            pieces.append(data[emit:pos])
            out = b"".join(pieces)
        if head:
            out = head + out
        return out, outcome

    def resume(self) -> None:
        """The check its next message waited for is over (server event CHECKED): receive(b"")
        goes on with what it buffered meanwhile."""
        self.holding = None
        self.need = 5

    @staticmethod
    def _copy_ended(server: ServerProtocol) -> None:
        """A CopyDone or CopyFail: the end of the copy-in the server is in, or of one it has
        not said it began yet (a client that does not wait for CopyInResponse)."""
        if server.copy_in:
            server.copy_in = False
        else:
            server.copies_ended += 1
            server.synced_after_copy = False

    def spliced(self, k: int) -> None:
        """k bytes of the streamed message went to the server past this object (Stream.splice_in:
        only while it is not scanning them)."""
        assert not self.scanning and 0 < k <= self.passthrough
        self.passthrough -= k

    def _stream(self, end: int, n: int) -> int:
        """The message ending at end has arrived up to n: send that much, the rest as it comes."""
        self.passthrough = end - n
        if not self.passthrough:
            self.scanning = False
        return n

    def _scan(self, chunk) -> None:
        """Look at a piece of a streamed Query's text, with the end of the last piece."""
        text = self.tail + chunk if self.tail else chunk
        if may_touch_state(text):
            self._flag_text(bytes(text))
        self.tail = bytes(text[-_OVERLAP:])
        if not self.passthrough:
            self.scanning = False
            self.tail = b""

    def _flag_text(self, text: bytes) -> None:
        flags = text_flags(text)
        if flags:
            self.flags |= flags
            if flags & MAY_SET:
                self.texts.append(text)

    # ------------------------------------------------------------ statements

    def _parse(self, server: ServerProtocol, data: bytes, pos: int, end: int, may_touch: bool):
        """A Parse for the server (None: as it is), or a ProtocolViolation."""
        named = parse_key(data, pos + 5, end)
        if type(named) is ProtocolViolation:
            return named
        name, key = named
        flags = text_flags(key) if may_touch else 0
        if not name:
            # The unnamed statement: the session's own, and now the connection's.
            statement = Statement(b"", key, flags)
            self.unnamed = statement
            server.unnamed = statement
            server.pending.append(ParseEntry(False, server, statement, self, None))
            self.flags |= flags
            if flags & MAY_SET:
                self.texts.append(key)
            return None
        held = self.statements.get(name)
        if held is not None:
            # A duplicate: the server itself says 42P05, about the statement the session holds.
            prefix = self.ensure_prepared(server, held)
            if prefix:
                prefix += self._check_later(server, held)
            server.error_names[held.name] = name
            server.pending.append(ParseEntry(False, server))
            return prefix + parse_message(held.name, key)
        statement = self.registry.acquire(key, flags, self.scope)
        self.statements[name] = statement
        if statement.name in server.prepared:
            # Another session prepared the same text here: an unnamed Parse
            # answers ParseComplete without a second copy.
            server.pending.append(ParseEntry(False, server, statement, self, name))
            server.unnamed = None
            return parse_message(b"", key)
        server.prepared.add(statement.name)
        server.pending.append(ParseEntry(False, server, statement, self, name, True))
        if statement.shape is None:
            return parse_message(statement.name, key)
        # Others hold it and were told its description: prepared as they were told, checked.
        return parse_message(statement.name, statement.prepared_key()) + self._check_later(server, statement)

    def ensure_prepared(self, server: ServerProtocol, statement: Statement) -> bytes:
        """A Parse to send first if this server connection lacks the statement."""
        if statement.name in server.prepared:
            return b""
        server.prepared.add(statement.name)
        server.pending.append(ParseEntry(True, server, statement, prepared_here=True))
        server.expect_reply()
        return parse_message(statement.name, statement.prepared_key())

    def _check_later(self, server: ServerProtocol, statement: Statement) -> bytes:
        """A Describe of a statement a client was told the description of, just prepared here
        on the way (the session's own Parse of it, or a duplicate): nothing waits for the
        answer, which makes the statement STALE if it differs (DescribeEntry.answered)."""
        if statement.shape is None or server.skipping or server.copy_in:
            return b""   # (while the server skips to the Sync after an error, no answer would come)
        server.pending.append(DescribeEntry(True, server, statement, self.registry))
        return describe_message(statement.name)

    def _prepare_checked(self, server: ServerProtocol, statement: Statement) -> "bytes | Hold":
        """ensure_prepared, for a Bind or Describe of the statement.  If it must be prepared here
        and a client was told its shape, a Hold: the Parse and a Describe of it go first, and the
        client's message waits for the answer (statements.py)."""
        parse = self.ensure_prepared(server, statement)
        check = self._check_later(server, statement) if parse else b""
        if not check:
            return parse
        self.holding = statement
        return Hold(parse + check + FLUSH_MESSAGE)

    def _ensure_unnamed(self, server: ServerProtocol) -> bytes:
        """A Parse of the session's unnamed statement, if the connection's is another one."""
        statement = self.unnamed
        if server.unnamed is statement or statement is None:
            return b""
        server.unnamed = statement
        server.pending.append(ParseEntry(True, server, statement, self, None))
        server.expect_reply()
        return parse_message(b"", statement.key)

    def _bind(self, server: ServerProtocol, data: bytes, pos: int, name_start: int, name_end: int, length: int):
        """The start of a Bind up to its statement name, renamed (None: as it is)."""
        name = data[name_start:name_end]
        if not name:
            statement = self.unnamed
            if statement is None:
                server.error_names[MISSING] = b""
                return self._renamed(B, data, pos, name_start, name_end, length, MISSING, b"")
            if statement.flags:
                self._flag_bind(statement)
            prefix = self._ensure_unnamed(server)
            return prefix + bytes(data[pos:name_end + 1]) if prefix else None
        held = self.statements.get(name)
        if held is None:
            server.error_names[MISSING] = name   # the server says 26000 about it
            return self._renamed(B, data, pos, name_start, name_end, length, MISSING, b"")
        if held.flags:
            if held.flags & STALE:
                server.error_names[STALE_NAME] = name   # shown as 0A000
                return self._renamed(B, data, pos, name_start, name_end, length, STALE_NAME, b"")
            if held.flags & RENEW:
                held = self._renew(name, held)
            self._flag_bind(held)
        new_name = held.name
        # _renamed, inline: a prepared statement's Bind is most of -M prepared traffic.
        header = _header(b"B", length - (name_end - name_start) + len(new_name))
        if new_name in server.prepared:
            return b"".join((header, data[pos + 5:name_start], new_name, b"\0"))
        checked = self._prepare_checked(server, held)
        if isinstance(checked, Hold):
            return checked
        return b"".join((checked, header, data[pos + 5:name_start], new_name, b"\0"))

    def _renew(self, name: bytes, old: Statement) -> Statement:
        """The session's statement, prepared afresh (RENEW): shared with those of its text that
        answer as its client was told, if it was told anything (StatementRegistry.adopt)."""
        statement = self.registry.adopt(old.key, old.flags, old.scope, old.shape, old.params)
        self.statements[name] = statement
        self.registry.release(old)
        return statement

    def _flag_bind(self, statement: Statement) -> None:
        self.flags |= statement.flags & (MAY_SET | MAY_PIN)
        if statement.flags & MAY_SET:
            self.texts.append(statement.key)

    @staticmethod
    def _renamed(msg_type: int, data: bytes, pos: int, name_start: int, name_end: int, length: int,
                 new_name: bytes, prefix: bytes) -> bytes:
        """The message's header up to and including its (new) statement name."""
        new_length = length - (name_end - name_start) + len(new_name)
        return (prefix + _header(bytes((msg_type,)), new_length) + bytes(data[pos + 5:name_start])
                + new_name + b"\0")

    def _describe_or_close(self, server: ServerProtocol, msg_type: int, data: bytes, pos: int, end: int):
        body = pos + 5
        if end - body < 2 or data[end - 1] != 0:
            return ProtocolViolation("invalid Describe message" if msg_type == D
                                     else "invalid Close message")
        kind = data[body]
        if kind == _PORTAL:
            if msg_type == C:
                server.pending.append(CloseEntry(server))
            return None   # portals live within a transaction
        if kind != _STATEMENT:
            return ProtocolViolation(f"invalid {'DESCRIBE' if msg_type == D else 'CLOSE'} "
                                     f"message subtype {kind}")
        name = data[body + 1:end - 1]
        before = data[body:body + 1]
        if not name:
            statement = self.unnamed
            if msg_type == C:
                # Undone if an error makes the server skip it (CloseEntry.failed).
                server.pending.append(CloseEntry(server, statement, self, None))
                if statement is not None:
                    self._keep_setting_text(statement)
                self.unnamed = None
                if statement is not None and server.unnamed is statement:
                    server.unnamed = None
                    return None
                return with_statement_name(C, before, MISSING, b"")
            if statement is None:
                server.error_names[MISSING] = b""
                server.pending.append(DescribeEntry(False, server, None))
                return with_statement_name(D, before, MISSING, b"")
            prefix = self._ensure_unnamed(server)
            server.pending.append(DescribeEntry(False, server, None))
            return prefix + data[pos:end] if prefix else None
        held = self.statements.get(name)
        if msg_type == C:
            # The name is free at once (a Parse of it may follow in the same
            # pipeline); the statement is released at CloseComplete, and the
            # name given back if an error makes the server skip the Close.
            if held is not None:
                del self.statements[name]
                self._keep_setting_text(held)
            server.pending.append(CloseEntry(server, held, self, name))
            # The shared statement stays prepared; closing a name the server
            # lacks is not an error: it answers CloseComplete.
            return with_statement_name(C, before, MISSING, b"")
        if held is None:
            server.error_names[MISSING] = name
            server.pending.append(DescribeEntry(False, server, None))
            return with_statement_name(D, before, MISSING, b"")
        if held.flags & STALE:
            server.error_names[STALE_NAME] = name   # shown as 0A000
            server.pending.append(DescribeEntry(False, server, None))
            return with_statement_name(D, before, STALE_NAME, b"")
        if held.flags & RENEW:
            held = self._renew(name, held)
        checked = self._prepare_checked(server, held)
        if isinstance(checked, Hold):
            return checked
        # Its answer is the shape the client is told (ServerProtocol records it).
        server.pending.append(DescribeEntry(False, server, held, self.registry))
        return checked + with_statement_name(D, before, held.name, b"")

    def abandon(self) -> bytes | None:
        """The client vanished in the middle of a streamed message: bytes that end it harmlessly.

        The filler has no NUL, so a Query's text is left unterminated and the
        server refuses it with an ERROR instead of running it; CopyData and
        Bind are followed by the CopyFail or failed pipeline the caller sends.
        None if the rest is too large to be worth sending: the connection
        cannot be brought back in step then.
        """
        remaining = self.passthrough
        if remaining > ABANDON_FILL_LIMIT:
            return None
        self.passthrough = 0
        self.scanning = False
        return b"\x01" * remaining

    def statement_setting_names(self) -> set:
        """The custom settings a SET in any of the session's prepared statements names.

        The server's SET tag may come from a Bind of a statement parsed in an earlier
        round trip, or on another backend before the session moved here, so the text
        of the latest Query or Parse is not enough; the server does not say which
        statement it ran.  Asked only when a SET tag came; each text is read once.
        """
        names: set = set()
        for statement in self.statements.values():
            names |= _setting_names(statement)
        if self.unnamed is not None:
            names |= _setting_names(self.unnamed)
        return names

    def _keep_setting_text(self, statement: Statement) -> None:
        """A statement closed before the boundary may have run its SET in this round trip:
        its text stays in sight of statement_setting_names (through texts) until then."""
        if _setting_names(statement) and len(self.texts) < 64:
            self.texts.append(statement.key)

    def rescope_statements(self) -> None:
        """Its named statements under its new scope (Session.settings_changed); only at a
        boundary, with no Parse or Close of its own in flight."""
        registry, scope = self.registry, self.scope
        for name, statement in list(self.statements.items()):
            if statement.scope != scope and not statement.flags & STALE:
                self.statements[name] = registry.adopt(statement.key, statement.flags, scope, statement.shape,
                                                       statement.params)
                registry.release(statement)

    def release_statements(self) -> None:
        """The session ends, or the server discarded its statements (DISCARD ALL, DEALLOCATE ALL)."""
        for statement in self.statements.values():
            self.registry.release(statement)
        self.statements.clear()
        self.unnamed = None


def _setting_names(statement: Statement) -> frozenset:
    """custom_setting_names of the statement's key (its text, as texts holds it), read once."""
    names = statement.settings
    if names is None:
        names = statement.settings = frozenset(custom_setting_names(statement.key))
    return names


def _bad_header(msg_type: int, length: int) -> str:
    if not LIMITS[msg_type]:
        return f"invalid frontend message type {msg_type}"
    return f"invalid message length {length}"

# PostgreSQL allows a simple Query between unsynced extended-query messages;
# the replies it then skips after an error cannot be told apart without
# following every message, so the pooler refuses it (no driver sends it:
# libpq's pipeline mode forbids it).
MIXED_PIPELINE: Final = "simple Query or FunctionCall inside an unsynced extended-query pipeline"
