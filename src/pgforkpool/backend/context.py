"""A session's context: the settings that make a shared server connection look like its own, and the SQL that moves them.

The context is plain data (dicts and sets of strings): it can be copied,
compared, serialized and, in a later version, handed to another backend with
the session.  The SQL built here restores a context on a server connection,
reads it back after the session may have changed it, and puts startup values
back after RESET or DISCARD.
"""

import re
from typing import Final

from ..shared import protocol

# Startup packet fields that are not settings.
NOT_SETTINGS: Final = frozenset({"user", "database", "options", "replication"})

# Settings the server reports with ParameterStatus that a session can change;
# when the server reports one while a session owns it, the session changed it.
# Names are kept lower-case, as PostgreSQL compares setting names.
REPORTED_SETTABLE: Final = frozenset({
    "application_name", "client_encoding", "datestyle", "intervalstyle", "timezone",
    "standard_conforming_strings", "default_transaction_read_only",
})

# Applied last, in this order: SET SESSION AUTHORIZATION resets the role.
IDENTITY: Final = ("session_authorization", "role")


class Context:
    """What one session has in force on the server, and what its client has been told."""

    __slots__ = ("settings", "startup", "custom_names", "reported")

    def __init__(self, settings: dict[str, str], startup: dict[str, str] | None = None,
                 custom_names: set[str] | None = None, reported: dict[str, str] | None = None):
        self.settings = settings                      # name -> value in force (lower-case names)
        self.startup = dict(settings) if startup is None else startup   # what RESET returns to
        # Custom settings ("myapp.tenant") the session has named: pg_settings does not list them.
        self.custom_names = ({name for name in settings if "." in name}
                             if custom_names is None else custom_names)
        self.reported = {} if reported is None else reported   # ParameterStatus its client has seen

    @classmethod
    def from_startup(cls, startup: dict[str, str]) -> "Context":
        return cls(startup_settings(startup))

    def drop(self, name: str) -> None:
        """Forget a custom setting, as PostgreSQL does when a library reserves its prefix."""
        self.settings.pop(name, None)
        self.startup.pop(name, None)
        self.custom_names.discard(name)

    def to_dict(self) -> dict:
        return {"settings": dict(self.settings), "startup": dict(self.startup),
                "custom_names": sorted(self.custom_names), "reported": dict(self.reported)}

    @classmethod
    def from_dict(cls, value: dict) -> "Context":
        return cls(dict(value["settings"]), dict(value["startup"]), set(value["custom_names"]),
                   dict(value["reported"]))


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


# PostgreSQL's refusal of a custom setting whose prefix a loaded library reserved (42602 invalid_name).
_QUOTED_NAME: Final = re.compile(r'"([^"]+)"')


def quoted_setting(text: str) -> str | None:
    """The custom setting ("plpgsql.x", lower-case) a server message quotes first, if any."""
    match = _QUOTED_NAME.search(text)
    if match is None:
        return None
    name = match.group(1).lower()
    return name if "." in name else None


def reserved_placeholder(sqlstate: str, text: str, context: Context) -> str | None:
    """The custom setting of `context` that a server's 42602 error `text` names: a placeholder
    ("plpgsql.x") whose prefix a library loaded on that server process has reserved (PostgreSQL
    refuses to set it, and removes it when a session loads the library).  None for anything else."""
    if sqlstate != "42602":
        return None
    name = quoted_setting(text)
    return name if name is not None and name in context.settings else None


# Custom settings ("myapp.tenant") a statement may set: pg_settings does not list them (nor does
# SHOW ALL), so their names are taken from the statement text.  PostgreSQL's spellings: SET [SESSION
# | LOCAL] name, where name is identifiers, quoted or not, joined by dots with any spaces around
# them ("MyApp"."Tenant" is myapp.tenant: setting names ignore case); set_config('name', ...)
# with the name a string constant ('...', E'...', $$...$$).
_IDENT: Final = rb'(?:[a-z_][a-z0-9_$]*|"(?:[^"]|"")+")'
_SET_NAME: Final = re.compile(
    rb"\bset\s+(?:session\s+|local\s+)?(" + _IDENT + rb"(?:\s*\.\s*" + _IDENT + rb")*)", re.IGNORECASE)
_SET_CONFIG: Final = re.compile(
    rb"\bset_config\s*\(\s*(?:(e)?'((?:[^'\\]|''|\\.)*)'|\$([a-z_][a-z0-9_]*|)\$(.*?)\$\3\$|(.))",
    re.IGNORECASE | re.DOTALL)
_PART: Final = re.compile(rb'"((?:[^"]|"")+)"|([^\s."]+)')
# In custom_setting_names' answer: a set_config whose name is not a constant ($1, a column):
# which setting it changes cannot be known from the text.
UNKNOWN_NAME: Final = "?"


def custom_setting_names(statement: bytes) -> set[str]:
    names = set()
    for match in _SET_NAME.finditer(statement):
        parts = [(quoted.replace(b'""', b'"') if quoted else plain)
                 for quoted, plain in _PART.findall(match.group(1))]
        name = b".".join(parts).decode("utf-8", "replace").lower()
        if "." in name:
            names.add(name)
    for match in _SET_CONFIG.finditer(statement):
        escaped, literal, _tag, dollar, other = match.groups()
        if other is not None:
            names.add(UNKNOWN_NAME)
            continue
        if literal is not None:
            value = literal.replace(b"''", b"'")
            if escaped:
                value = re.sub(rb"\\(.)", rb"\1", value)
        else:
            value = dollar
        name = value.decode("utf-8", "replace").lower()
        if "." in name:
            names.add(name)
    return names


# Settings of one transaction (SET TRANSACTION …): pg_settings lists them with source 'session'
# after a transaction that set them, but each transaction starts from the default_transaction_*
# settings, and set_config() of one is refused once the restore's implicit transaction has a
# snapshot. They are never a session's to keep.
PER_TRANSACTION: Final = "'transaction_isolation', 'transaction_read_only', 'transaction_deferrable'"


# Settings under which PostgreSQL reads a statement's text when it is prepared: which
# relations and functions names mean, what a timestamptz, date or interval literal is, what a
# backslash in a string is. A prepared statement keeps that reading, so sessions share one only
# when these are the same.
# (role and session_authorization: the default search_path's "$user" follows them; client_encoding:
# the same bytes are other characters in another encoding.)
PARSE_SETTINGS: Final = ("search_path", "role", "session_authorization", "client_encoding",
                         "timezone", "timezone_abbreviations", "datestyle", "intervalstyle",
                         "standard_conforming_strings", "backslash_quote", "transform_null_equals",
                         "array_nulls", "xmloption", "lc_monetary", "lc_numeric")


def parse_scope(settings: dict[str, str]) -> bytes:
    """What tells apart the sessions that may share prepared statements (StatementRegistry):
    b"" when none of PARSE_SETTINGS is the session's own, else the values it has, after two
    NULs and a length. (No Parse payload starts like that: two NULs are an empty query text
    and no parameter types, and the payload ends there.)"""
    values = [f"{name}={settings[name]}" for name in PARSE_SETTINGS if name in settings]
    if not values:
        return b""
    return _scope("\0".join(values).encode("utf-8", "surrogateescape"))


def private_scope(conn_id: int) -> bytes:
    """A scope no other session has (Session.private_statements), with a NUL first, where no
    parse_scope has one."""
    return _scope(b"\0session %d" % conn_id)


def _scope(text: bytes) -> bytes:
    return b"\0\0" + len(text).to_bytes(4, "big") + text


_DURATION: Final = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(us|ms|s|min|h|d)?\s*")
_DURATION_UNITS: Final = {None: 0.001, "us": 1e-6, "ms": 0.001, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def duration_setting(value: str | None) -> float:
    """Seconds of a time setting whose unit is ms (idle_session_timeout), as PostgreSQL reads
    "1000", "1s" or "1.5min" (pg_settings gives ms without a unit); 0 for none or unreadable."""
    if not value:
        return 0.0
    match = _DURATION.fullmatch(value)
    if match is None:
        return 0.0
    return max(0.0, float(match.group(1)) * _DURATION_UNITS[match.group(2)])


def temp_schema_in_path(settings: dict[str, str]) -> bool:
    """pg_temp named in the session's search_path: CREATE TABLE AS, SELECT INTO, CREATE
    SEQUENCE or VIEW with unqualified names may make temporary objects without a word of it."""
    return "pg_temp" in settings.get("search_path", "").lower()


def capture_query(custom_names) -> str:
    """Reads a session's settings back after it may have changed them.

    role, session_authorization and custom settings are hidden from
    pg_settings, so they are asked for by name.  Its transaction is made NOT
    DEFERRABLE first, as the pooler's other queries are (LIFT_TIMEOUTS).
    """
    sql = (NOT_DEFERRABLE + "; SELECT name, setting FROM pg_catalog.pg_settings WHERE source = 'session' "
           "AND name NOT IN ('role', 'session_authorization', " + PER_TRANSACTION + ") "
           "UNION ALL SELECT 'role', pg_catalog.current_setting('role') "
           "UNION ALL SELECT 'session_authorization', pg_catalog.current_setting('session_authorization')")
    for name in sorted(custom_names):
        literal = protocol.quote_literal(name)
        sql += f" UNION ALL SELECT {literal}, pg_catalog.current_setting({literal}, true)"
    return sql


def captured_settings(rows: list[tuple], login_user: str) -> dict[str, str]:
    """A session's settings from the rows of capture_query (defaults left out)."""
    settings = {}
    for row in rows:
        if len(row) != 2 or row[0] is None:
            continue
        name, value = row[0].lower(), row[1]   # pg_settings spells some names in mixed case (TimeZone)
        if value is None or (name == "role" and value == "none"):
            continue
        if name == "session_authorization" and value == login_user:
            continue
        settings[name] = value
    return settings


def _set(name: str, value: str) -> str:
    return (f"pg_catalog.set_config({protocol.quote_literal(name)}, "
            f"{protocol.quote_literal(value)}, false)")


# What a query of the pooler's own puts first: the timeouts of whichever session's settings the
# connection has (a statement_timeout or lock_timeout of a few milliseconds) lifted for its own
# implicit transaction, and its transaction made NOT DEFERRABLE: under a session's
# default_transaction_isolation = serializable with default_transaction_read_only and
# default_transaction_deferrable on, it would otherwise wait for every serializable read-write
# transaction of the cluster to end, the next session with it.  SET LOCAL ends with the
# transaction; a session value set after it in the same query stays, and it may come again after
# a RESET ALL, which takes no snapshot (checked on PostgreSQL 15).
NOT_DEFERRABLE: Final = "SET LOCAL transaction_deferrable = off"
LIFT_TIMEOUTS: Final = NOT_DEFERRABLE + "; SET LOCAL statement_timeout = 0; SET LOCAL lock_timeout = 0"


def restore_query(current: dict[str, str] | None, wanted: dict[str, str]) -> str:
    """One simple query that turns the server's settings `current` into `wanted`.

    Settings are applied as the login user, and the session's authorization
    and role last: some settings (session_replication_role,
    lo_compat_privileges) need the login user's privileges, to set and to reset.
    set_config() takes the value exactly as SHOW prints it (lists such as
    search_path included); RESET returns a setting to the connection's default.
    current None means unknown: everything is reset first.  A multi-statement
    query runs as one implicit transaction: if any part fails, none applies.  It
    runs with the timeouts lifted (LIFT_TIMEOUTS), again after RESET ALL, which
    would bring back the defaults for the rest of it.
    """
    parts = [LIFT_TIMEOUTS]
    if current is None:
        parts += ["RESET SESSION AUTHORIZATION", "RESET ROLE", "RESET ALL", LIFT_TIMEOUTS]
        current = {}
    sets = [_set(name, value) for name, value in wanted.items()
            if name not in IDENTITY and current.get(name) != value]
    resets = [f"RESET {protocol.quote_ident(name)}" for name in current
              if name not in wanted and name not in IDENTITY]
    auth_now, role_now = current.get("session_authorization"), current.get("role")
    auth_wanted, role_wanted = wanted.get("session_authorization"), wanted.get("role")
    if (auth_now is not None or role_now is not None) and (
            sets or resets or auth_now != auth_wanted or role_now != role_wanted):
        # Back to the login user before anything else.
        if auth_now is not None:
            parts.append("RESET SESSION AUTHORIZATION")
        parts.append("RESET ROLE")
        auth_now = role_now = None
    datestyle = wanted.get("datestyle")
    if datestyle is not None and current.get("datestyle") != datestyle and partial_datestyle(datestyle):
        # A DateStyle that names only its style or only its order keeps the other from the value
        # in force: at login, from the server's default; here, from there too, not from
        # whichever session's DateStyle the connection had ("ISO" after "ISO, DMY" stayed DMY).
        parts.append("RESET datestyle")
    if sets:
        parts.append("SELECT " + ", ".join(sets))
    parts.extend(resets)
    if auth_wanted is not None and auth_now != auth_wanted:
        parts.append(f"SELECT {_set('session_authorization', auth_wanted)}")
    if role_wanted is not None and role_now != role_wanted:
        parts.append(f"SELECT {_set('role', role_wanted)}")
    return "; ".join(parts) if len(parts) > 1 else ""


_DATE_STYLES: Final = frozenset({"iso", "sql", "postgres", "german"})
_DATE_ORDERS: Final = frozenset({"ymd", "dmy", "euro", "european", "mdy", "us", "noneuro", "noneuropean"})


def partial_datestyle(value: str) -> bool:
    """Whether a DateStyle value leaves its style or its order to the value in force, as
    PostgreSQL's check_datestyle reads it ("ISO", "DMY"; "German" brings DMY, "default" both)."""
    words = {word.strip().strip('"').lower() for word in value.split(",")}
    if "default" in words:
        return False
    return words.isdisjoint(_DATE_STYLES) or (words.isdisjoint(_DATE_ORDERS) and "german" not in words)


# Whether the connection holds state of the session that cannot be copied to another.  It runs
# in that session's settings, with its timeouts lifted (an unanswered check pins).  Its second
# column names the protocol-level statements the connection has: a DEALLOCATE ALL in a DO block,
# or an SQL DEALLOCATE of a name of the pooler's, removes them unseen by the pooler, which
# would go on binding them for every session (26000) instead of preparing them again.
PIN_CHECK_QUERY: Final = (
    LIFT_TIMEOUTS + "; "
    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_class "
    "WHERE relnamespace = pg_catalog.pg_my_temp_schema()) "
    "OR EXISTS (SELECT 1 FROM pg_catalog.pg_proc "
    "WHERE pronamespace = pg_catalog.pg_my_temp_schema()) "
    "OR EXISTS (SELECT 1 FROM pg_catalog.pg_type "
    "WHERE typnamespace = pg_catalog.pg_my_temp_schema()) "
    "OR EXISTS (SELECT 1 FROM pg_catalog.pg_locks "
    "WHERE locktype = 'advisory' AND pid = pg_catalog.pg_backend_pid()) "
    "OR EXISTS (SELECT 1 FROM pg_catalog.pg_listening_channels()) "
    "OR EXISTS (SELECT 1 FROM pg_catalog.pg_cursors WHERE is_holdable) "
    "OR coalesce(p.from_sql, false), p.names FROM (SELECT pg_catalog.bool_or(from_sql) AS from_sql, "
    "pg_catalog.string_agg(name, ' ') FILTER (WHERE NOT from_sql) AS names "
    "FROM pg_catalog.pg_prepared_statements) p")


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
