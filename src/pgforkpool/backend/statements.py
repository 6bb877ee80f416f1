"""Every rule for prepared statements on a shared server connection: renaming, prepare-where-missing, undo after errors.

A client's statement names are its own.  On the server a named statement has
a name of the pooler's (`pgforkpool.s<N>`), one per distinct query text and
parameter types, prepared on a server connection only when a session needs it
there.  Names with a dot cannot be written as SQL PREPARE names without
quotes, so they do not collide with a client's own.

The unnamed statement is kept per session too: PostgreSQL keeps it until the
next unnamed Parse or simple Query on the connection, and a client may prepare
it in one round trip and use it in the next (psql's \\gdesc, PQprepare with
""), by which time another session may have used the connection.  It is
parsed again where the connection's unnamed statement is not the session's.

A server statement is shared only by sessions that read its text alike: PostgreSQL
interprets a statement's literals and names when it is prepared, under that
session's search_path, TimeZone, DateStyle… (context.parse_scope), so sessions
whose such settings differ get statements of their own.

A statement carries the flags its text earned (client.text_flags): each
Bind of it marks the session as one that may have changed state, whatever
round trip the Bind comes in.

A statement also keeps the result description a client was last told for it
(its shape: the columns' names and types of a Describe's RowDescription).
PostgreSQL fixes a statement's result when it is prepared and answers 0A000
"cached plan must not change result type" to every later use of it once DDL
has changed that result; drivers that prepare once and describe once
(asyncpg, JDBC, pgx, Npgsql) rely on it, reading rows by the described types.
When the pooler prepares such a statement again on another server connection
(the session moved, the shared connection was pinned or dialled anew), it
prepares it with the parameter types the client was told (as PostgreSQL keeps
them) and asks for the description there before the session's Bind goes; a
statement whose result changed is STALE: every use of it fails with 0A000, as
the session's own statement would on PostgreSQL, never returns rows of another
shape under the old description.  When another session's Parse prepares it on
a connection, a Describe for the pooler goes on the way, and so does every
client's own Describe: any description other than the one its holders were
told makes it STALE.

Nothing here raises on a client's bytes: callers pass message bodies they have
framed, and a malformed one comes back as a ProtocolViolation.
"""

import collections
import struct
from typing import Final

# Server name that is never prepared: a client's unknown name becomes it, and
# the server answers as PostgreSQL would (26000, or CloseComplete for Close).
MISSING: Final = b"pgforkpool.missing"
# Likewise never prepared: the Bind or Describe of a STALE statement names it, so that the
# server fails it (aborting the transaction and skipping to the Sync, as 0A000 does), and its
# 26000 is shown to the client as 0A000 (ServerProtocol._client_error).
STALE_NAME: Final = b"pgforkpool.stale"
# Statement.flags bits (next to client.MAY_SET and MAY_PIN).  STALE: its result changed since
# the session's client was told it.  RENEW: the server found it outdated (an error its
# revalidation raised: StatementRegistry.retire_all): each session that holds it is given a
# statement prepared afresh at its next use (ClientProtocol._renew).
STALE: Final = 4
RENEW: Final = 8

_header = struct.Struct("!cI")
_int16 = struct.Struct("!h").unpack_from
_STATEMENT: Final = ord("S")
_PORTAL: Final = ord("P")
_PARSE: Final = ord("P")
_BIND: Final = ord("B")
_DESCRIBE: Final = ord("D")
_CLOSE: Final = ord("C")


class ProtocolViolation:
    """A client broke the protocol: its session ends with 08P01 and this text."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return f"ProtocolViolation({self.text!r})"


class Statement:
    __slots__ = ("name", "key", "scope", "refs", "flags", "settings", "retired", "shape", "params")

    def __init__(self, name: bytes, key: bytes, flags: int = 0, scope: bytes = b""):
        self.name = name      # server-side name (b"" for a session's unnamed statement)
        self.key = key        # query text NUL parameter types: the Parse payload after the name
        self.scope = scope    # the context.parse_scope of the sessions that share it
        self.refs = 0         # sessions that hold it under a name of theirs
        self.flags = flags    # client.text_flags of its text, and STALE
        self.settings: frozenset | None = None   # custom setting names its text sets, once asked
        self.retired = False  # no longer given to new Parses (StatementRegistry.retire_all)
        # The result description clients were told (result_shape; b"" for NoData), None while
        # no client has described it; and its parameter types then (a ParameterDescription's
        # body, the same bytes as a Parse's count and types).
        self.shape: bytes | None = None
        self.params = b""

    def prepared_key(self) -> bytes:
        """The Parse payload (after the name) that prepares it again: with the parameter types
        its clients were told, as PostgreSQL keeps them when it analyses a statement again
        (after ALTER … TYPE, `$1` inferred anew would take the column's new type, and the
        client's binary int4 be read as a float4)."""
        if not self.params:   # (no client described it)
            return self.key
        return self.key[:self.key.index(b"\0") + 1] + self.params


class ParseEntry:
    """A Parse sent to the server whose ParseComplete has not arrived yet."""

    __slots__ = ("hidden", "server", "statement", "client", "client_name", "prepared_here")

    def __init__(self, hidden: bool, server, statement: Statement | None = None, client=None,
                 client_name: bytes | None = None, prepared_here: bool = False):
        self.hidden = hidden              # the pooler's own: its ParseComplete is not forwarded
        self.server = server              # the ServerProtocol it was sent on
        self.statement = statement
        self.client = client              # the ClientProtocol whose name it binds (or None)
        self.client_name = client_name    # that name; None for the unnamed statement
        self.prepared_here = prepared_here   # it creates statement.name on this connection

    def failed(self) -> None:
        """An error failed or skipped the Parse: it created nothing."""
        statement = self.statement
        if statement is None:
            return
        if self.prepared_here:
            self.server.prepared.discard(statement.name)
        client = self.client
        if client is None:
            return
        if self.client_name is None:
            if self.server.unnamed is statement:
                self.server.unnamed = None
            # The pooler's own Parse of it again failed or was skipped: the
            # session's statement is as it was.  The session's own Parse: it
            # is gone (a failed Parse leaves no unnamed statement; one an
            # earlier error skipped would leave the one before, which the
            # pooler does not run again rather than risk running it twice).
            if not self.hidden and client.unnamed is statement:
                client.unnamed = None
        elif client.statements.get(self.client_name) is statement:
            del client.statements[self.client_name]
            client.registry.release(statement)


class CloseEntry:
    """A Close sent to the server whose CloseComplete has not arrived yet."""

    __slots__ = ("server", "statement", "client", "client_name")
    hidden = False

    def __init__(self, server, statement: Statement | None = None, client=None,
                 client_name: bytes | None = None):
        self.server = server
        self.statement = statement        # what the client's name stood for (None: nothing)
        self.client = client
        self.client_name = client_name    # None for the unnamed statement

    def completed(self) -> None:
        if self.client_name is not None and self.statement is not None:
            self.client.registry.release(self.statement)

    def failed(self) -> None:
        """An error made the server skip the Close: the client's name stands as before."""
        statement, client = self.statement, self.client
        if statement is None:
            return
        if self.client_name is None:
            if client.unnamed is None:
                client.unnamed = statement
        elif self.client_name not in client.statements:
            client.statements[self.client_name] = statement
        else:
            client.registry.release(statement)


class DescribeEntry:
    """A Describe of a statement sent to the server whose ParameterDescription has not arrived
    yet: the client's (its answer is the shape the client is told), or the pooler's own check
    of a statement it prepared again on this connection (hidden: answered to nobody)."""

    __slots__ = ("hidden", "server", "statement", "registry")

    def __init__(self, hidden: bool, server, statement: Statement | None,
                 registry: "StatementRegistry | None" = None):
        self.hidden = hidden
        self.server = server
        self.statement = statement   # None: the unnamed statement, or a name the server lacks
        self.registry = registry     # a check's: where a STALE statement is retired

    def answered(self, shape: bytes, params: bytes) -> bool:
        """The server described the statement as shape and parameter types params: whether that
        is another description than its holders were told (the pooler's check, or a client's
        Describe of a copy prepared on another connection after a change of its result: then
        the statement is STALE, for every session that holds it, which is never told rows of
        a shape it was not told)."""
        statement = self.statement
        if statement is None:
            return False
        if statement.shape is None:
            statement.shape = shape   # what the client is told now
            statement.params = params
            return False
        if shape == statement.shape and params == statement.params:
            return False
        statement.flags |= STALE
        if self.registry is not None:
            self.registry.retire(statement)
        return True

    def failed(self) -> None:
        """An error made the server skip it: a check ends without a verdict."""
        if self.hidden:
            self.server.check_over = True
            self.server.checked = self.statement


# What the server answers with ParseComplete, CloseComplete or a ParameterDescription, or skips
# after an error.
STATEMENT_ENTRIES: Final = (ParseEntry, CloseEntry, DescribeEntry)


class StatementRegistry:
    """The backend's statements by query text, and the unused ones waiting to be closed."""

    def __init__(self, cache_size: int):
        self.cache_size = cache_size     # prepared_statement_cache_size
        self.by_key: dict[bytes, Statement] = {}
        self.unused: collections.OrderedDict[bytes, Statement] = collections.OrderedDict()
        self.evicted: list[bytes] = []   # server names to DEALLOCATE on the shared connection
        self.counter = 0

    def acquire(self, key: bytes, flags: int, scope: bytes = b"") -> Statement:
        """The shared statement of a Parse payload (after the name), for sessions of `scope`
        (context.parse_scope; b"" for those whose parse settings are the connection's)."""
        slot = _slot(key, scope)
        statement = self.by_key.get(slot)
        if statement is None:
            self.counter += 1
            statement = self.by_key[slot] = Statement(b"pgforkpool.s%d" % self.counter, key,
                                                      flags & ~(STALE | RENEW), scope)
        elif statement.refs == 0:
            self.unused.pop(slot, None)
        statement.refs += 1
        return statement

    def release(self, statement: Statement) -> None:
        statement.refs -= 1
        if statement.refs > 0:
            return
        if statement.retired:
            self.evicted.append(statement.name)
            return
        self.unused[_slot(statement.key, statement.scope)] = statement
        while len(self.unused) > self.cache_size:
            slot, old = self.unused.popitem(last=False)
            del self.by_key[slot]
            self.evicted.append(old.name)

    def take_evicted(self, prepared: set[bytes], shared: set[bytes] | None) -> list[bytes]:
        """The evicted statements to deallocate on a connection that has `prepared`, taken off
        the list, but for those the shared connection (`shared`, when this one is a pinned
        session's) still has: they wait for its turn (a retire_all evicts many at once, and they
        must not stay there for its lifetime)."""
        evicted = self.evicted
        names = [name for name in evicted if name in prepared]
        keep = [name for name in evicted if name in shared] if shared is not None else []
        evicted.clear()
        evicted.extend(keep)
        return names

    def retire(self, statement: Statement) -> None:
        """Give new Parses of its text a statement of their own (it is STALE); the sessions that
        hold it keep it."""
        slot = _slot(statement.key, statement.scope)
        if self.by_key.get(slot) is statement:
            del self.by_key[slot]
        if self.unused.get(slot) is statement:
            del self.unused[slot]
        if not statement.retired:
            statement.retired = True
            if statement.refs <= 0:
                self.evicted.append(statement.name)

    def adopt(self, key: bytes, flags: int, scope: bytes, shape: bytes | None, params: bytes = b"") -> Statement:
        """The statement of a session that moved here, or changed scope (its text, flags, and the
        description its client was told): the shared one of its text if its client was told
        nothing, or the same; else one of its own, not shared (retired): the shared one may
        have been prepared here after its result changed, and be right for those who hold it.
        A statement told a description is prepared with its parameter types where it is used,
        and checked there (ClientProtocol._prepare_checked)."""
        if shape is None:
            return self.acquire(key, flags, scope)
        shared = self.by_key.get(_slot(key, scope))
        if not flags & STALE and (shared is None or (shared.shape == shape and shared.params == params)):
            statement = self.acquire(key, flags, scope)
            statement.shape, statement.params = shape, params   # (one just made: prepared nowhere yet)
            return statement
        self.counter += 1
        statement = Statement(b"pgforkpool.s%d" % self.counter, key, flags & ~RENEW, scope)
        statement.retired = True
        statement.refs = 1
        statement.shape, statement.params = shape, params
        return statement

    def retire_all(self, renew: bool = False) -> None:
        """A statement's result type changed under it (0A000 "cached plan must not change result
        type": DDL since it was prepared, or DDL through this backend that may have done so).
        PostgreSQL prepares a new session's Parse afresh against the table as it is now; so does
        the pooler from here on: no new Parse is given one of them.

        renew: the server refused to run one (0A000, or another error of its revalidation: a
        type dropped since, "cache lookup failed", or parameter types inferred then that no
        longer fit, 42804).  Which one is not said, and a session that prepared the text after
        the change would be served on PostgreSQL: every session's statement is prepared afresh
        at its next use (RENEW; one its client was told the description of is checked there,
        and fails with 0A000 if it changed)."""
        for statement in self.by_key.values():
            statement.retired = True
            if renew:
                statement.flags |= RENEW
        self.evicted.extend(statement.name for statement in self.unused.values())
        self.unused.clear()
        self.by_key.clear()


def _slot(key: bytes, scope: bytes) -> bytes:
    """A statement's key in the registry: its Parse payload, after its scope if it has one
    (scopes are length-prefixed and start with two NULs, as no payload longer than 3 bytes does)."""
    return scope + key if scope else key


def length_word(data: bytes, pos: int) -> int:
    """The unsigned big-endian int32 at data[pos:pos + 4]: a message's length word.

    Read byte by byte: native integer operations when compiled, where struct's
    unpack_from makes a tuple and an int object per message (about 1,200
    instructions: scripts/instructions).
    """
    return (data[pos] << 24) | (data[pos + 1] << 16) | (data[pos + 2] << 8) | data[pos + 3]


def parse_message(name: bytes, key: bytes) -> bytes:
    return _header.pack(b"P", len(name) + len(key) + 5) + name + b"\0" + key


def describe_message(name: bytes) -> bytes:
    """Describe of a statement: the pooler's check of one it prepared again."""
    return _header.pack(b"D", len(name) + 6) + b"S" + name + b"\0"


def result_shape(data, pos: int, end: int) -> bytes:
    """What a RowDescription body data[pos:end] says of a result as PostgreSQL compares it (its
    columns' names, types, lengths and modifiers; not their tables and column numbers, which a
    table dropped and made again changes without changing the result).  Raises ValueError or
    IndexError on a malformed one (the server's: the caller drops the connection)."""
    count = (data[pos] << 8) | data[pos + 1]
    out = []
    i = pos + 2
    for _ in range(count):
        name_end = data.index(b"\0", i, end)
        if name_end + 19 > end:
            raise ValueError("short RowDescription")
        out.append(bytes(data[i:name_end + 1]))
        out.append(bytes(data[name_end + 7:name_end + 17]))
        i = name_end + 19
    return b"".join(out) if out else b"\0"


def with_statement_name(msg_type: int, before: bytes, name: bytes, after) -> bytes:
    """A Bind/Describe/Close message with its statement name replaced."""
    payload_len = len(before) + len(name) + 1 + len(after)
    return _header.pack(bytes((msg_type,)), payload_len + 4) + before + name + b"\0" + after


def parse_key(data, body: int, end: int):
    """(name, key) of a Parse body data[body:end], or a ProtocolViolation if it is malformed."""
    name_end = data.find(b"\0", body, end)
    text_end = data.find(b"\0", name_end + 1, end) if name_end >= 0 else -1
    if text_end < 0 or text_end + 3 > end:
        return ProtocolViolation("invalid Parse message")
    count = _int16(data, text_end + 1)[0]
    if count < 0 or text_end + 3 + 4 * count != end:
        return ProtocolViolation("invalid Parse message")
    return data[body:name_end], data[name_end + 1:end]
