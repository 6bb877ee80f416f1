"""A client session in a pooled backend, and the saved context that makes it look like its own connection.

A session's context is a plain dict of setting name to value: what it asked
for at startup and what it has changed since.  It is a value (copyable,
serializable) so that a later version can hand a session with its context to
another backend.
"""

import re
import secrets
import socket

from ..shared import protocol

# Session states.
STARTING = "starting"   # handed over, not yet greeted (its context not yet applied)
IDLE = "idle"           # between transactions, no input waiting
WAITING = "waiting"     # has a whole message queued, waits for the server connection
ACTIVE = "active"       # owns the server connection
RESTORING = "restoring" # owns it; its settings are being put back before its input goes on
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
                 "settings", "startup", "client_params", "greeted", "gone", "database", "user",
                 "paused", "dirty", "custom_names", "statements", "pinned", "pin_check",
                 "prepared_xacts", "capture_failures", "last_text")

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
        # What RESET returns to in this session (PostgreSQL's reset values).
        self.startup = dict(self.settings)
        # The session may have changed settings since they were last read back.
        self.dirty = False
        # Custom settings ("myapp.tenant") the session has named in a SET or set_config.
        self.custom_names: set[str] = {name for name in self.settings if "." in name}
        # Its protocol-level named statements: client name -> statements.Statement.
        self.statements: dict = {}
        # The server connection it keeps for itself, once it holds state that
        # cannot be copied (temporary tables, session advisory locks, LISTEN,
        # WITH HOLD cursors, SQL-level prepared statements); None while it shares.
        self.pinned = None
        # It may have created or dropped such state: ask the server at the end of the transaction.
        self.pin_check = False
        # Prepared transactions (2PC) it has not yet committed or rolled back.
        self.prepared_xacts = 0
        self.capture_failures = 0
        self.last_text = b""   # the last statement text it sent (for custom setting names)
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


# Restored before the others, in this order: SET SESSION AUTHORIZATION resets the role.
_ORDERED = ("session_authorization", "role")

# Custom settings ("myapp.tenant") a statement may set: pg_settings does not
# list them, so their names are taken from the statement text.
_CUSTOM_NAME = re.compile(
    rb"""(?:\bset\s+(?:session\s+|local\s+)?|set_config\s*\(\s*')"""
    rb"""([a-z_][a-z0-9_$]*\.[a-z_][a-z0-9_$.]*)""", re.IGNORECASE)


def custom_setting_names(statement: bytes) -> set[str]:
    return {m.group(1).decode().lower() for m in _CUSTOM_NAME.finditer(statement)}


def capture_query(custom_names) -> str:
    """Reads a session's settings back after it may have changed them.

    role, session_authorization and custom settings are hidden from
    pg_settings, so they are asked for by name.
    """
    sql = ("SELECT name, setting FROM pg_catalog.pg_settings WHERE source = 'session' "
           "AND name NOT IN ('role', 'session_authorization') "
           "UNION ALL SELECT 'role', pg_catalog.current_setting('role') "
           "UNION ALL SELECT 'session_authorization', pg_catalog.current_setting('session_authorization')")
    for name in sorted(custom_names):
        literal = protocol.quote_literal(name)
        sql += f" UNION ALL SELECT {literal}, pg_catalog.current_setting({literal}, true)"
    return sql


def captured_settings(rows: list[tuple[str, str]], login_user: str) -> dict[str, str]:
    """A session's context from the rows of CAPTURE_QUERY (defaults left out)."""
    settings = {}
    for name, value in rows:
        name = name.lower()   # pg_settings spells some names in mixed case (TimeZone)
        if value is None or (name == "role" and value == "none"):
            continue
        if name == "session_authorization" and value == login_user:
            continue
        settings[name] = value
    return settings


def _set(name: str, value: str) -> str:
    return (f"pg_catalog.set_config({protocol.quote_literal(name)}, "
            f"{protocol.quote_literal(value)}, false)")


def restore_query(current: dict[str, str] | None, wanted: dict[str, str]) -> str:
    """One simple query that turns the server's settings `current` into `wanted`.

    set_config() takes the value exactly as SHOW prints it (lists such as
    search_path included); RESET returns a setting to the connection's default.
    current None means unknown: everything is reset first.  A multi-statement
    query runs as one implicit transaction: if any part fails, none applies.
    """
    parts = []
    if current is None:
        parts += ["RESET SESSION AUTHORIZATION", "RESET ROLE", "RESET ALL"]
        current = {}
    auth_now, auth_wanted = current.get("session_authorization"), wanted.get("session_authorization")
    role_now = current.get("role")
    if auth_now != auth_wanted:
        parts.append(f"SELECT {_set('session_authorization', auth_wanted)}"
                     if auth_wanted is not None else "RESET SESSION AUTHORIZATION")
        role_now = None   # PostgreSQL resets the role along with the session authorization
    role_wanted = wanted.get("role")
    if role_now != role_wanted:
        parts.append(f"SELECT {_set('role', role_wanted)}" if role_wanted is not None else "RESET ROLE")
    sets = [_set(name, value) for name, value in wanted.items()
            if name not in _ORDERED and current.get(name) != value]
    if sets:
        parts.append("SELECT " + ", ".join(sets))
    parts.extend(f"RESET {protocol.quote_ident(name)}" for name in current
                 if name not in wanted and name not in _ORDERED)
    return "; ".join(parts)


# Whether the connection holds state of the session that cannot be copied to another.
PIN_CHECK_QUERY = (
    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_class "
    "WHERE relnamespace = pg_catalog.pg_my_temp_schema()) "
    "OR EXISTS (SELECT 1 FROM pg_catalog.pg_locks "
    "WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid()) "
    "OR EXISTS (SELECT 1 FROM pg_catalog.pg_listening_channels()) "
    "OR EXISTS (SELECT 1 FROM pg_catalog.pg_cursors WHERE is_holdable) "
    "OR EXISTS (SELECT 1 FROM pg_catalog.pg_prepared_statements WHERE from_sql)")


def fixup_query(startup: dict[str, str]) -> str:
    """After RESET or DISCARD: put back the startup values PostgreSQL would reset to.

    Only settings not set in this session any more (source other than
    'session') are touched, so nothing else the session set is disturbed.
    """
    values = ", ".join(f"({protocol.quote_literal(name)}, {protocol.quote_literal(value)})"
                       for name, value in startup.items())
    return ("SELECT pg_catalog.set_config(w.name, w.value, false) "
            f"FROM (VALUES {values}) AS w(name, value) "
            "JOIN pg_catalog.pg_settings s ON pg_catalog.lower(s.name) = w.name "
            "WHERE s.source <> 'session'")
