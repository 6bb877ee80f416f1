"""Protocol-level named prepared statements, shared by the sessions of a pooled backend.

A client's statement name is its own; on the server a statement has a name of
the pooler's (`pgforkpool.s<N>`), one per distinct query text and parameter
types, prepared on a server connection only when a session needs it there.
Names with a dot cannot be written as SQL PREPARE names without quotes, so they
do not collide with a client's own.
"""

import collections
import struct

# Server name that is never prepared: a client's unknown name becomes it, and
# the server answers as PostgreSQL would (26000, or CloseComplete for Close).
MISSING = b"pgforkpool.missing"

_header = struct.Struct("!cI")


class Statement:
    __slots__ = ("name", "key", "refs")

    def __init__(self, name: bytes, key: bytes):
        self.name = name      # server-side name
        self.key = key        # query text NUL parameter types: the Parse payload after the name
        self.refs = 0         # sessions that hold it under a name of theirs


class ParseEntry:
    """A Parse sent to the server whose ParseComplete has not arrived yet."""

    __slots__ = ("segment", "hidden", "session", "client_name", "statement", "prepared_here")

    def __init__(self, segment: int, hidden: bool, session=None, client_name: bytes | None = None,
                 statement: Statement | None = None, prepared_here: bool = False):
        self.segment = segment
        self.hidden = hidden              # the pooler's own: its ParseComplete is not forwarded
        self.session = session
        self.client_name = client_name
        self.statement = statement
        self.prepared_here = prepared_here


class StatementRegistry:
    """The backend's statements by query text, and the unused ones waiting to be closed."""

    def __init__(self, cache_size: int):
        self.cache_size = cache_size     # prepared_statement_cache_size
        self.by_key: dict[bytes, Statement] = {}
        self.unused: collections.OrderedDict[bytes, Statement] = collections.OrderedDict()
        self.evicted: list[bytes] = []   # server names to DEALLOCATE on the shared connection
        self.counter = 0

    def acquire(self, key: bytes) -> Statement:
        statement = self.by_key.get(key)
        if statement is None:
            self.counter += 1
            statement = self.by_key[key] = Statement(b"pgforkpool.s%d" % self.counter, key)
        elif statement.refs == 0:
            self.unused.pop(key, None)
        statement.refs += 1
        return statement

    def release(self, statement: Statement) -> None:
        statement.refs -= 1
        if statement.refs > 0:
            return
        self.unused[statement.key] = statement
        while len(self.unused) > self.cache_size:
            _key, old = self.unused.popitem(last=False)
            del self.by_key[old.key]
            self.evicted.append(old.name)


def parse_message(name: bytes, key: bytes) -> bytes:
    return _header.pack(b"P", len(name) + len(key) + 5) + name + b"\0" + key


def with_statement_name(msg_type: bytes, before: bytes, name: bytes, after: bytes) -> bytes:
    """A Bind/Describe/Close message with its statement name replaced."""
    payload = before + name + b"\0" + after
    return _header.pack(msg_type, len(payload) + 4) + payload
