"""A client session in a pooled backend, and the saved context that makes it look like its own connection.

A session's context is a plain dict of setting name to value: what it asked
for at startup and what it has changed since.  It is a value (copyable,
serializable) so that a later version can hand a session with its context to
another backend.
"""

import secrets
import socket

from ..shared import protocol

# Session states.
STARTING = "starting"   # handed over, not yet greeted (its context not yet applied)
IDLE = "idle"           # between transactions, no input waiting
WAITING = "waiting"     # has a whole message queued, waits for the server connection
ACTIVE = "active"       # owns the server connection
CLOSED = "closed"

# Startup packet fields that are not settings.
NOT_SETTINGS = frozenset({"user", "database", "options", "replication"})

# Settings the server reports with ParameterStatus that a session can change;
# when the server reports one while a session owns it, the session changed it.
# Names are kept lower-case, as PostgreSQL compares setting names.
REPORTED_SETTABLE = frozenset({
    "application_name", "client_encoding", "datestyle", "intervalstyle", "timezone",
    "standard_conforming_strings", "default_transaction_read_only",
})


class Session:
    __slots__ = ("sock", "fd", "conn_id", "key", "state", "mask", "inbuf", "outbuf",
                 "settings", "client_params", "greeted", "gone", "database", "user",
                 "paused")

    def __init__(self, sock: socket.socket, conn_id: int, startup: dict[str, str]):
        self.sock = sock
        self.fd = sock.fileno()
        self.conn_id = conn_id
        # A random cancel key (PostgreSQL's own is random too): never derived from anything guessable.
        self.key = secrets.randbits(31) or 1
        self.state = STARTING
        self.mask = 0
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.database = startup["database"]
        self.user = startup["user"]
        self.settings = startup_settings(startup)   # the session's context
        self.client_params: dict[str, str] = {}      # ParameterStatus values this client has seen
        self.greeted = False
        self.gone = False
        self.paused = False


def startup_settings(startup: dict[str, str]) -> dict[str, str]:
    """The settings a startup packet asks for: its own fields and `options` -c switches."""
    settings = {name.lower(): value for name, value in startup.items() if name not in NOT_SETTINGS}
    for name, value in parse_options(startup.get("options", "")):
        settings[name.lower()] = value
    return settings


def parse_options(options: str) -> list[tuple[str, str]]:
    """The -c name=value / --name=value switches of a startup `options` string.

    Words are separated by spaces; a backslash escapes the next character (as
    PostgreSQL's pg_split_opts reads it).  Dashes in names stand for underscores.
    """
    words, word, escaped, has_word = [], [], False, False
    for char in options:
        if escaped:
            word.append(char)
            escaped = False
        elif char == "\\":
            escaped, has_word = True, True
        elif char.isspace():
            if has_word:
                words.append("".join(word))
            word, has_word = [], False
        else:
            word.append(char)
            has_word = True
    if has_word:
        words.append("".join(word))

    pairs, i = [], 0
    while i < len(words):
        item = words[i]
        if item == "-c" and i + 1 < len(words):
            item, i = words[i + 1], i + 1
        elif item.startswith("-c"):
            item = item[2:]
        elif item.startswith("--"):
            item = item[2:]
        else:
            raise ValueError(f'invalid command-line argument for server process: {item}')
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f'-c {name} requires a value')
        pairs.append((name.replace("-", "_"), value))
        i += 1
    return pairs


def restore_query(current: dict[str, str], wanted: dict[str, str]) -> str:
    """One simple query that turns the server's settings `current` into `wanted`.

    set_config() takes the value exactly as SHOW prints it (lists such as
    search_path included); RESET returns a setting to the connection's default.
    A multi-statement query runs as one implicit transaction: if any part fails,
    none of it applies.
    """
    parts = []
    sets = [f"pg_catalog.set_config({protocol.quote_literal(name)}, "
            f"{protocol.quote_literal(value)}, false)"
            for name, value in wanted.items() if current.get(name) != value]
    if sets:
        parts.append("SELECT " + ", ".join(sets))
    parts.extend(f"RESET {protocol.quote_ident(name)}" for name in current if name not in wanted)
    return "; ".join(parts)
