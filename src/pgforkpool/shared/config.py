"""The configuration parameter table and the postgresql.conf-syntax loader that it drives."""

import math
import os
import re
from dataclasses import dataclass
from typing import Sequence

# PostgreSQL's CONF_FILE_MAX_DEPTH: how deep include directives may nest.
MAX_INCLUDE_DEPTH = 10


class ConfigError(Exception):
    """A configuration that cannot be loaded; str() names the file and line, as PostgreSQL does."""

    def __init__(self, message: str, where: str | None = None, hint: str | None = None):
        self.message = message
        self.where = where
        self.hint = hint
        text = f"{where}: {message}" if where else message
        if hint:
            text += f"\nHINT:  {hint}"
        super().__init__(text)


@dataclass(frozen=True)
class Param:
    """One row of the parameter table.

    Typed values, and min/max, are in base units: durations in seconds (float),
    sizes in bytes (int).  Every numeric type has both min and max.  `unit` is
    only what a bare number means when written in a file or on the command line.
    """

    name: str
    type: str                   # bool, int, real, string, enum, list, duration or size
    default: object
    context: str                # restart or reload: when a changed value takes effect
    description: str
    enum_values: tuple[str, ...] = ()
    min: float | None = None
    max: float | None = None
    unit: str = ""


LOG_LEVELS = ("debug5", "debug4", "debug3", "debug2", "debug1", "info", "notice",
              "warning", "error", "log", "fatal", "panic")

# The one table of settings, in display order (the order of conf/pgforkpool.conf).
PARAMETERS: dict[str, Param] = {p.name: p for p in (
    # Connections
    Param("listen_addresses", "string", "localhost", "restart",
          "TCP addresses to listen on, comma separated; '*' for all, '' for none."),
    Param("port", "int", 6432, "restart",
          "TCP port to listen on, also the unix socket suffix (.s.PGSQL.<port>).",
          min=1, max=65535),
    Param("unix_socket_directories", "list", ("/tmp",), "restart",
          "Directories to create the unix socket in, comma separated; '' for none."),
    Param("max_connections", "int", 10000, "reload",
          "Client connections the pooler accepts in all.", min=1, max=1000000),
    Param("connection_pool_workers", "int", 2, "restart",
          "Listener processes that accept client connections.", min=1, max=64),
    # Upstream server
    Param("upstream_host", "string", "/var/run/postgresql", "reload",
          "Host name or unix socket directory of the PostgreSQL server; new backends use a new value."),
    Param("upstream_port", "int", 5432, "reload",
          "Port of the PostgreSQL server; new backends use a new value.", min=1, max=65535),
    Param("upstream_connect_timeout", "duration", 10.0, "reload",
          "Time allowed to establish and log in a server connection.",
          min=1, max=600, unit="s"),
    # Pooling
    Param("session_pool_size", "int", 10, "reload",
          "Pooled backends per (database, user) pool.", min=1, max=10000),
    Param("max_sessions", "int", 1000, "reload",
          "Sessions one pooled backend serves.", min=1, max=100000),
    Param("max_pinned_sessions", "int", 100, "reload",
          "Sessions per pooled backend that may hold a server connection of their own; 0 for none.",
          min=0, max=100000),
    Param("query_wait_timeout", "duration", 120.0, "reload",
          "A session that has waited this long for a server connection gets an ERROR (57014) "
          "instead of its result, and stays usable; 0 waits without a bound.",
          min=0, max=2147483, unit="s"),
    Param("idle_in_transaction_session_timeout", "duration", 0.0, "reload",
          "A session idle inside a transaction this long is ended (FATAL 25P03), its transaction "
          "rolled back, so that the server connection serves the others; so is one that holds "
          "the shared server connection stopped in the middle of a message (57P05 outside a "
          "transaction); 0 disables.",
          min=0, max=2147483, unit="s"),
    Param("prepared_statement_cache_size", "int", 256, "reload",
          "Prepared statements no session holds any more that a pooled backend keeps on its "
          "server connection; beyond this, the least recently released are closed.",
          min=0, max=1000000),
    Param("dedicated_databases", "list", ("postgres", "template0", "template1"), "reload",
          "Databases served by one backend per session, comma separated."),
    Param("dedicated_users", "list", ("postgres",), "reload",
          "Users served by one backend per session, comma separated."),
    Param("session_migration", "bool", True, "reload",
          "A session waiting for its backend's server connection, held by another session's "
          "transaction, moves to a backend of the same pool that could serve it now (with its "
          "socket, settings, prepared statements and cancel key). Off: a session stays on its "
          "backend for life, as in Postgres Pro."),
    Param("session_migration_delay", "duration", 0.01, "reload",
          "How long a session waits before it is moved to another backend of its pool.",
          min=0.001, max=3600, unit="ms"),
    Param("session_schedule", "enum", "round-robin", "reload",
          "How a new session picks a pooled backend.",
          enum_values=("round-robin", "random", "load-balancing")),
    Param("restart_pooler_on_reload", "bool", False, "reload",
          "On reload, pooled backends finish their sessions and exit."),
    Param("idle_pool_backend_timeout", "duration", 0.0, "reload",
          "A pooled backend with no sessions exits after this long; 0 disables.",
          min=0, max=2147483647, unit="s"),
    Param("hold_prepared_transactions", "bool", False, "reload",
          "With a prepared transaction open, a session keeps its backend until it commits or rolls back."),
    # Authentication
    Param("auth_method", "enum", "scram-sha-256", "reload",
          "How clients authenticate to the pooler.",
          enum_values=("trust", "password", "md5", "scram-sha-256")),
    Param("auth_file", "string", "", "reload",
          'File of "user" "secret" lines: plain password, md5 hash or SCRAM-SHA-256 verifier.'),
    Param("admin_users", "list", (), "reload",
          "Users allowed into the admin console, comma separated."),
    Param("authentication_timeout", "duration", 60.0, "reload",
          "Time allowed to finish the startup packet and authentication.",
          min=1, max=600, unit="s"),
    # Statistics and metrics
    Param("stats_period", "duration", 60.0, "reload",
          "How often SHOW STATS's per-second averages and the metrics' rates are computed.",
          min=1, max=86400, unit="s"),
    Param("metrics_port", "int", 0, "restart",
          "TCP port of the Prometheus /metrics endpoint; 0 disables it.", min=0, max=65535),
    Param("metrics_address", "string", "localhost", "restart",
          "Address the /metrics endpoint listens on; '*' for all."),
    # Logging
    Param("log_connections", "bool", False, "reload",
          "Log each accepted client connection and its authentication."),
    Param("log_disconnections", "bool", False, "reload",
          "Log the end of each client session, with its duration."),
    Param("log_min_messages", "enum", "warning", "reload",
          "The least severe message level that is logged.", enum_values=LOG_LEVELS),
    # Process
    Param("pid_file", "string", "", "restart",
          "File the postmaster writes its pid to; '' for none."),
    Param("user", "string", "", "restart",
          "OS user to switch to when started as root (required then)."),
)}

# Units as PostgreSQL spells them (case matters), in base units: microseconds, bytes.
DURATION_UNITS = {"us": 1, "ms": 1000, "s": 1000_000, "min": 60_000_000,
                  "h": 3600_000_000, "d": 86400_000_000}
SIZE_UNITS = {"B": 1, "kB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}

_BOOL_WORDS = {"on": True, "true": True, "yes": True, "1": True, "t": True, "y": True,
               "off": False, "false": False, "no": False, "0": False, "f": False, "n": False}
_INT = re.compile(r"[-+]?(?:0[xX][0-9a-fA-F]+|\d+)")
_NUMBER_WITH_UNIT = re.compile(r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*([A-Za-z]*)")


def _units_hint(units) -> str:
    names = [f'"{u}"' for u in units]
    return f"Valid units for this parameter are {', '.join(names[:-1])}, and {names[-1]}."


def parse_value(param: Param, text: str) -> object:
    """The typed value of `text` for `param`; ConfigError (without a location) if invalid."""
    def invalid(hint=None):
        return ConfigError(f'invalid value for parameter "{param.name}": "{text}"', hint=hint)

    kind = param.type
    if kind == "string":
        return text
    if kind == "list":
        return tuple(item.strip() for item in text.split(",") if item.strip())
    word = text.strip()
    if kind == "bool":
        if word.lower() not in _BOOL_WORDS:
            raise invalid()
        return _BOOL_WORDS[word.lower()]
    if kind == "enum":
        if word.lower() not in param.enum_values:
            raise invalid(f"Available values: {', '.join(param.enum_values)}.")
        return word.lower()
    if kind == "int":
        if not _INT.fullmatch(word):
            raise invalid()
        value = int(word, 0) if "x" in word.lower() else int(word)
    elif kind == "real":
        try:
            value = float(word)
        except ValueError:
            raise invalid() from None
        if not math.isfinite(value):
            raise invalid()
    elif kind in ("duration", "size"):
        units = DURATION_UNITS if kind == "duration" else SIZE_UNITS
        match = _NUMBER_WITH_UNIT.fullmatch(word)
        if not match:
            raise invalid()
        number, unit = match.groups()
        if unit not in units and unit:
            raise invalid(_units_hint(units))
        amount = float(number) * units[unit or param.unit]
        if not math.isfinite(amount):
            raise invalid()
        # Durations are held to the microsecond, so that setting_text() is exact.
        value = round(amount) / DURATION_UNITS["s"] if kind == "duration" else round(amount)
    else:
        raise AssertionError(f"parameter {param.name} has unknown type {kind}")
    if not param.min <= value <= param.max:
        raise ConfigError(f"{format_value(param, value)} is outside the valid range for "
                          f'parameter "{param.name}" ({format_value(param, param.min)} .. '
                          f"{format_value(param, param.max)})")
    return value


def _with_unit(amount: int, units: dict[str, int]) -> str:
    # As PostgreSQL's SHOW: the largest unit that holds the amount exactly.
    if amount == 0:
        return "0"
    for unit, factor in reversed(units.items()):
        if amount % factor == 0:
            return f"{amount // factor}{unit}"
    raise AssertionError("the smallest unit is 1")


def format_value(param: Param, value: object) -> str:
    """`value` as SHOW prints it; parse_value(param, format_value(param, value)) == value."""
    kind = param.type
    if kind == "bool":
        return "on" if value else "off"
    if kind == "list":
        return ", ".join(value)
    if kind == "int":
        return str(int(value))
    if kind == "real":
        text = repr(float(value))
        return text[:-2] if text.endswith(".0") else text
    if kind == "duration":
        return _with_unit(round(value * DURATION_UNITS["s"]), DURATION_UNITS)
    if kind == "size":
        return _with_unit(int(value), SIZE_UNITS)
    return str(value)


@dataclass(frozen=True)
class Settings:
    """One loaded configuration: typed values by name, and where each came from."""

    values: dict[str, object]
    sources: dict[str, str]
    path: str | None = None
    overrides: tuple[str, ...] = ()

    def __getattr__(self, name: str) -> object:
        # Only reached for names that are not fields; dunders must fail plainly (copy, pickle).
        if name.startswith("__") or "values" not in self.__dict__:
            raise AttributeError(name)
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(f"no configuration parameter {name!r}") from None

    def setting_text(self, name: str) -> str:
        return format_value(PARAMETERS[name], self.values[name])


def defaults() -> Settings:
    return Settings({name: p.default for name, p in PARAMETERS.items()},
                    {name: "default" for name in PARAMETERS})


# The lexical rules of PostgreSQL's guc-file.l, one line at a time (no token spans lines).
_SPACE = re.compile(r"\s*")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?")
_BARE_VALUE = re.compile(r"[-+]?[A-Za-z0-9_.:/-]+")
_QUOTED_VALUE = re.compile(r"'((?:[^'\\]|\\.|'')*)'")
_ESCAPE = re.compile(r"''|\\([0-7]{1,3}|.)")
_ESCAPED_CHARS = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


def _unescape(match: re.Match) -> str:
    # PostgreSQL's DeescapeQuotedString.
    if match.group(0) == "''":
        return "'"
    char = match.group(1)
    if char[0] in "01234567":
        return chr(int(char, 8))
    return _ESCAPED_CHARS.get(char, char)


def _syntax_error(line: str, pos: int) -> ConfigError:
    rest = line[pos:].strip()
    if not rest or rest.startswith("#"):
        return ConfigError("syntax error near end of line")
    return ConfigError(f'syntax error near "{rest.split()[0]}"')


def _parse_line(line: str) -> tuple[str, str] | None:
    """(name, value) of one line, None for a blank or comment line; ConfigError on a syntax error."""
    pos = _SPACE.match(line).end()
    if pos == len(line) or line[pos] == "#":
        return None
    name = _NAME.match(line, pos)
    if not name:
        raise _syntax_error(line, pos)
    pos = _SPACE.match(line, name.end()).end()
    if line.startswith("=", pos):
        pos = _SPACE.match(line, pos + 1).end()
    if quoted := _QUOTED_VALUE.match(line, pos):
        value = _ESCAPE.sub(_unescape, quoted.group(1))
        end = quoted.end()
    elif bare := _BARE_VALUE.match(line, pos):
        value = bare.group(0)
        end = bare.end()
    else:
        raise _syntax_error(line, pos)
    pos = _SPACE.match(line, end).end()
    if pos < len(line) and line[pos] != "#":
        raise _syntax_error(line, pos)
    return name.group(0), value


def _set(values: dict, sources: dict, name: str, text: str, where: str) -> None:
    param = PARAMETERS.get(name.lower())
    if param is None:
        raise ConfigError(f'unrecognized configuration parameter "{name}"', where)
    try:
        values[param.name] = parse_value(param, text)
    except ConfigError as e:
        raise ConfigError(e.message, where, e.hint) from None
    sources[param.name] = where


def _read_file(path: str, values: dict, sources: dict, depth: int,
               included_from: str | None = None, missing_ok: bool = False) -> None:
    if depth > MAX_INCLUDE_DEPTH:
        raise ConfigError(f'could not open configuration file "{path}": maximum nesting depth exceeded',
                          included_from)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        if missing_ok and isinstance(e, FileNotFoundError):
            return
        raise ConfigError(f'could not open configuration file "{path}": {e.strerror}',
                          included_from) from None
    except UnicodeDecodeError:
        raise ConfigError(f'could not read configuration file "{path}": invalid UTF-8',
                          included_from) from None
    directory = os.path.dirname(path)
    for lineno, line in enumerate(text.split("\n"), 1):
        where = f"{path}:{lineno}"
        try:
            entry = _parse_line(line)
        except ConfigError as e:
            raise ConfigError(e.message, where) from None
        if entry is None:
            continue
        name, value = entry
        directive = name.lower()
        if directive in ("include", "include_if_exists", "include_dir"):
            if not value:
                raise ConfigError(f'empty file name in "{name}"', where)
            target = os.path.join(directory, value)
            if directive == "include_dir":
                _read_directory(target, values, sources, depth + 1, where)
            else:
                _read_file(target, values, sources, depth + 1, where,
                           missing_ok=directive == "include_if_exists")
        else:
            _set(values, sources, name, value, where)


def _read_directory(path: str, values: dict, sources: dict, depth: int, included_from: str) -> None:
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        raise ConfigError(f'could not open configuration directory "{path}": {e.strerror}',
                          included_from) from None
    for name in names:
        file = os.path.join(path, name)
        if name.endswith(".conf") and not name.startswith(".") and os.path.isfile(file):
            _read_file(file, values, sources, depth, included_from)


def load_config(path: str | None, overrides: Sequence[str] = ()) -> Settings:
    """Settings from the file at `path` (if any), then from -c "name=value" overrides; all or nothing."""
    base = defaults()
    values, sources = dict(base.values), dict(base.sources)
    if path is not None:
        path = os.path.abspath(path)
        _read_file(path, values, sources, depth=0)
    for override in overrides:
        name, equals, value = override.partition("=")
        if not equals:
            raise ConfigError(f'-c "{override}" requires a value of the form name=value', "command line")
        # As the postgres command line: -c max-sessions=5 means max_sessions.
        _set(values, sources, name.strip().replace("-", "_"), value, "command line")
    return Settings(values, sources, path, tuple(overrides))


def changed_restart_parameters(old: Settings, new: Settings) -> list[str]:
    """Names of the settings that differ and take effect only on restart."""
    return [name for name, param in PARAMETERS.items()
            if param.context == "restart" and old.values[name] != new.values[name]]
