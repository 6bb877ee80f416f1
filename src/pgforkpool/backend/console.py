"""The admin console: the virtual database `pgforkpool`, served to one of `admin_users`.

One process per console connection, forked by the postmaster like a dedicated
backend.  It speaks the simple query protocol with real result sets, so psql
prints tables and drivers read rows.  Figures about backends come from the
shared-memory status table; figures about sessions, and the commands that act
on backends (KILL, PAUSE, RESUME), go through the postmaster, which asks every
backend and answers with what they said (`ask` / `answer` on the channels).

Every command that is not understood gets an ERROR with an SQLSTATE and the
session goes on, as in PostgreSQL.
"""

import datetime
import os
import re
import secrets
import select
import signal
import socket
import struct
import time
from importlib import metadata


from ..shared import channel, config, log, process, protocol, status
from ..shared.errors import PgError

logger = log.get("console")

CONSOLE_DATABASE = "pgforkpool"

# Type OIDs of the columns (pg_type).
BOOL, INT8, TEXT, FLOAT8, TIMESTAMPTZ = 16, 20, 25, 701, 1184
_TYPE_LENGTH = {BOOL: 1, INT8: 8, TEXT: -1, FLOAT8: 8, TIMESTAMPTZ: 8}

# How long the console waits for the postmaster's answer to a question about sessions.
ASK_TIMEOUT = 5.0
# PAUSE waits for running transactions to finish; this long at most.
PAUSE_TIMEOUT = 300.0
HELP_LINES = ("SHOW POOLS", "SHOW BACKENDS", "SHOW SESSIONS", "SHOW STATS", "SHOW CONFIG",
              "SHOW name", "SHOW VERSION", "SHOW HELP", "RELOAD", "PAUSE [db]", "RESUME [db]",
              "KILL SESSION id", "SELECT pg_backend_load_average(pid)",
              "SELECT * FROM pg_backend_load_average")
COMMANDS_HINT = "The console understands " + ", ".join(HELP_LINES) + "."

_COMMAND = re.compile(r"^\s*(\w+)(?:\s+(.*?))?\s*$", re.S)
_LOAD_AVERAGE = re.compile(
    r"^\s*select\s+(?:pg_catalog\s*\.\s*)?pg_backend_load_average\s*\(\s*([^)]*?)\s*\)"
    r"(?:\s+as\s+(\w+))?\s*$", re.I | re.S)
_LOAD_AVERAGE_VIEW = re.compile(r"^\s*select\s+\*\s+from\s+pg_backend_load_average\s*$", re.I | re.S)


class ConsoleError(Exception):
    """An ERROR for the current command; the console session goes on."""

    def __init__(self, sqlstate: str, text: str, hint: str | None = None):
        super().__init__(text)
        self.sqlstate = sqlstate
        self.text = text
        self.hint = hint


class Cancelled(ConsoleError):
    """A CancelRequest with the console's key came while a command waited for the backends."""

    def __init__(self):
        super().__init__("57014", "canceling statement due to user request")


def version() -> str:
    try:
        return metadata.version("pgforkpool")
    except metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------- result sets (bytes)

def row_description(columns: list[tuple[str, int]]) -> bytes:
    body = struct.pack("!h", len(columns))
    for name, oid in columns:
        body += protocol.cstring(name) + struct.pack("!ihihih", 0, 0, oid, _TYPE_LENGTH[oid], -1, 0)
    return protocol.message(b"T", body)


def _text(value, oid: int) -> bytes | None:
    if value is None:
        return None
    if oid == BOOL:
        return b"t" if value else b"f"
    if oid == FLOAT8:
        return repr(float(value)).encode()
    if oid == TIMESTAMPTZ:
        return datetime.datetime.fromtimestamp(value, datetime.timezone.utc).strftime(
            "%Y-%m-%d %H:%M:%S.%f+00").encode()
    return str(value).encode()


def data_row(values: list, columns: list[tuple[str, int]]) -> bytes:
    body = struct.pack("!h", len(values))
    for value, (_name, oid) in zip(values, columns):
        raw = _text(value, oid)
        body += struct.pack("!i", -1) if raw is None else struct.pack("!i", len(raw)) + raw
    return protocol.message(b"D", body)


def command_complete(tag: str) -> bytes:
    return protocol.message(b"C", protocol.cstring(tag))


def result(columns: list[tuple[str, int]], rows: list[list], tag: str | None = None) -> bytes:
    out = [row_description(columns)]
    out.extend(data_row(row, columns) for row in rows)
    out.append(command_complete(tag if tag is not None else "SHOW"))
    return b"".join(out)


def error_packet(sqlstate: str, text: str, hint: str | None = None) -> bytes:
    return protocol.error_response("ERROR", sqlstate, text, None, hint)


# ---------------------------------------------------------------- the figures

POOL_COLUMNS = [("database", TEXT), ("user", TEXT), ("backends", INT8), ("sessions", INT8),
                ("active", INT8), ("waiting", INT8), ("pinned", INT8), ("dedicated", INT8),
                ("maxwait", FLOAT8), ("server_connections", INT8), ("paused", BOOL)]
BACKEND_COLUMNS = [("pid", INT8), ("database", TEXT), ("user", TEXT), ("kind", TEXT),
                   ("state", TEXT), ("sessions", INT8), ("waiting", INT8), ("pinned", INT8),
                   ("load_average", FLOAT8), ("server_pids", TEXT), ("rss_bytes", INT8),
                   ("cpu_seconds", FLOAT8), ("transactions", INT8), ("migrations", INT8),
                   ("started", TIMESTAMPTZ)]
SESSION_COLUMNS = [("id", INT8), ("address", TEXT), ("port", INT8), ("database", TEXT),
                   ("user", TEXT), ("application_name", TEXT), ("backend_pid", INT8),
                   ("state", TEXT), ("connected", TIMESTAMPTZ), ("since", TIMESTAMPTZ),
                   ("wait", FLOAT8)]
STATS_COLUMNS = [("database", TEXT), ("user", TEXT), ("total_xact_count", INT8),
                 ("total_query_count", INT8), ("total_received", INT8), ("total_sent", INT8),
                 ("total_xact_time", INT8), ("total_wait_time", INT8), ("total_wait_count", INT8),
                 ("avg_xact_count", FLOAT8), ("avg_query_count", FLOAT8), ("avg_recv", FLOAT8),
                 ("avg_sent", FLOAT8), ("avg_xact_time", INT8), ("avg_wait_time", INT8)]
CONFIG_COLUMNS = [("name", TEXT), ("setting", TEXT), ("default", TEXT), ("unit", TEXT),
                  ("context", TEXT), ("source", TEXT), ("description", TEXT)]


def backend_rows(table: status.StatusTable, server_pids: dict[int, list[int]] | None = None) -> list[list]:
    rows = []
    for slot in status.backends(table):
        state = "draining" if slot["draining"] else ("paused" if slot["paused"] else "running")
        pids = (server_pids or {}).get(slot["pid"], [])
        rows.append([slot["pid"], slot["database"], slot["user"], slot["kind"], state, slot["sessions"],
                     slot["waiting"], slot["pinned"], round(slot["load_average"], 6),
                     ",".join(str(p) for p in pids), slot["rss"], slot["cpu_seconds"],
                     slot["transactions"], slot["migrations"], slot["started_us"] / 1e6])
    return rows


def pool_backends(table: status.StatusTable) -> dict[tuple[str, str], dict]:
    """Per (database, user): the status table's counters summed over the pool's backends."""
    pools: dict[tuple[str, str], dict] = {}
    for slot in table.slots():
        if not slot["pid"]:
            continue
        pool = pools.setdefault((slot["database"], slot["user"]), {
            "backends": 0, "dedicated": 0, "paused": True})
        if slot["kind"] == "dedicated":
            pool["dedicated"] += 1
        else:
            pool["backends"] += 1
            pool["paused"] = pool["paused"] and bool(slot["paused"])
    for pool in pools.values():
        if not pool["backends"]:
            pool["paused"] = False
    return pools


def config_rows(settings) -> list[list]:
    rows = []
    for name, param in config.PARAMETERS.items():
        rows.append([name, settings.setting_text(name), config.format_value(param, param.default),
                     param.unit or None, param.context, settings.sources.get(name, "default"),
                     param.description])
    return rows


# ---------------------------------------------------------------- the console session

class Console:
    def __init__(self, settings, conn_id: int, startup: dict[str, str], sock: socket.socket,
                 chan: socket.socket, table: status.StatusTable | None):
        self.settings = settings
        self.conn_id = conn_id
        self.startup = startup
        self.sock = sock
        self.chan = chan
        self.table = table
        self.user = startup["user"]
        self.inbuf = bytearray()
        self.next_token = 0
        # The key of our BackendKeyData: a CancelRequest with it (psql's Ctrl-C) ends a wait.
        self.cancel_key = secrets.randbits(31)
        self.extended_error = False   # an extended-protocol message was refused: skip to Sync
        self.statements: dict[str, str] = {}      # prepared by Parse: name -> command text
        self.portals: dict[str, list] = {}        # bound: name -> [command text, reply if described]

    # -- I/O

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def run(self) -> None:
        self.sock.setblocking(True)
        self._greet()
        while True:
            message = self._read_message()
            if message is None:
                return
            msg_type, body = message
            if msg_type == protocol.TERMINATE:
                return
            if msg_type == protocol.QUERY:
                self.extended_error = False
                self.send(self._simple_query(body) + protocol.ready_for_query(b"I"))
            elif msg_type == protocol.SYNC:
                self.extended_error = False
                self.portals.pop("", None)
                self.send(protocol.ready_for_query(b"I"))
            elif msg_type in (protocol.FLUSH, protocol.COPY_DATA, protocol.COPY_DONE, protocol.COPY_FAIL):
                continue
            elif msg_type == protocol.FUNCTION_CALL:
                self.send(error_packet("0A000", "the admin console has no functions to call")
                          + protocol.ready_for_query(b"I"))
            elif msg_type in (protocol.PARSE, protocol.BIND, protocol.DESCRIBE, protocol.EXECUTE,
                              protocol.CLOSE):
                if self.extended_error:
                    continue   # skipped until Sync, as PostgreSQL does after an error
                try:
                    self.send(self._extended(msg_type, body))
                except ConsoleError as exc:
                    self.extended_error = True
                    self.send(error_packet(exc.sqlstate, exc.text, exc.hint))
                except (ValueError, IndexError, struct.error, UnicodeDecodeError):
                    self.send(PgError("protocol_violation", "invalid message format").packet())
                    return
            else:
                self.send(PgError("protocol_violation",
                                  f"invalid frontend message type {msg_type}").packet())
                return

    # -- the extended query protocol (drivers prepare statements they repeat), without parameters

    def _extended(self, msg_type: int, body: bytes) -> bytes:
        if msg_type == protocol.PARSE:
            name, pos = protocol.read_cstring(body, 0)
            query, pos = protocol.read_cstring(body, pos)
            if len([s for s in _split(query) if s.strip()]) > 1:
                raise ConsoleError("42601", "cannot insert multiple commands into a prepared statement")
            self.statements[name] = query
            return protocol.message(b"1")
        if msg_type == protocol.BIND:
            portal, pos = protocol.read_cstring(body, 0)
            name, pos = protocol.read_cstring(body, pos)
            if name not in self.statements:
                raise ConsoleError("26000", f'prepared statement "{name}" does not exist')
            nformats = struct.unpack_from("!h", body, pos)[0]
            pos += 2 + 2 * nformats
            nparams = struct.unpack_from("!h", body, pos)[0]
            pos += 2
            if nparams:
                raise ConsoleError("0A000", "the admin console takes no parameters",
                                   hint="Write the values into the command text.")
            nresults = struct.unpack_from("!h", body, pos)[0]
            formats = struct.unpack_from(f"!{nresults}h", body, pos + 2)
            if any(formats):
                raise ConsoleError("0A000", "the admin console returns text results only")
            self.portals[portal] = [self.statements[name], None]
            return protocol.message(b"2")
        if msg_type == protocol.DESCRIBE:
            kind, name = body[:1], protocol.read_cstring(body, 1)[0]
            if kind == b"S":
                if name not in self.statements:
                    raise ConsoleError("26000", f'prepared statement "{name}" does not exist')
                query, out = self.statements[name], protocol.message(b"t", b"\0\0")
            else:
                if name not in self.portals:
                    raise ConsoleError("34000", f'portal "{name}" does not exist')
                query, out = self.portals[name][0], b""
            if not _READ_ONLY.match(query):
                return out + protocol.message(b"n")   # NoData: it runs at Execute
            reply = self._run_one(query)
            if kind == b"P":
                self.portals[name][1] = reply
            return out + (_first_message(reply) if reply[:1] == b"T" else protocol.message(b"n"))
        if msg_type == protocol.EXECUTE:
            name = protocol.read_cstring(body, 0)[0]
            if name not in self.portals:
                raise ConsoleError("34000", f'portal "{name}" does not exist')
            query, reply = self.portals[name]
            if reply is None:
                reply = self._run_one(query)
            self.portals[name][1] = None
            return reply[len(_first_message(reply)):] if reply[:1] == b"T" else reply
        # Close
        kind, name = body[:1], protocol.read_cstring(body, 1)[0]
        (self.statements if kind == b"S" else self.portals).pop(name, None)
        return protocol.message(b"3")

    def _run_one(self, query: str) -> bytes:
        """One command's reply bytes (RowDescription, rows, CommandComplete), or ConsoleError."""
        self._drain_channel()
        query = query.strip().rstrip(";").strip()
        if not query:
            return protocol.message(b"I")
        return self._command(query)

    def _read_message(self) -> tuple[int, bytes] | None:
        while True:
            if len(self.inbuf) >= 5:
                length = struct.unpack_from("!I", self.inbuf, 1)[0]
                if length < 4 or length > 1 << 20:
                    self.send(PgError("protocol_violation", "invalid message length").packet())
                    return None
                if len(self.inbuf) >= length + 1:
                    msg_type = self.inbuf[0]
                    body = bytes(self.inbuf[5:length + 1])
                    del self.inbuf[:length + 1]
                    return msg_type, body
            try:
                data = self.sock.recv(65536)
            except OSError:
                return None
            if not data:
                return None
            self.inbuf += data

    def _greet(self) -> None:
        params = {
            "server_version": f"15.0 (pgforkpool {version()})",
            "server_encoding": "UTF8", "client_encoding": "UTF8", "DateStyle": "ISO, MDY",
            "integer_datetimes": "on", "standard_conforming_strings": "on", "TimeZone": "UTC",
            "IntervalStyle": "postgres", "is_superuser": "off",
            "session_authorization": self.user,
            "application_name": self.startup.get("application_name", ""),
        }
        out = [protocol.parameter_status(k, v) for k, v in params.items()]
        out.append(protocol.backend_key_data(os.getpid(), self.cancel_key))
        out.append(protocol.ready_for_query(b"I"))
        self.send(b"".join(out))

    # -- commands

    def _postmaster_says(self, msg: tuple) -> None:
        """A message that is not the answer awaited: a reload, or a cancel that came while no
        command waited (it does nothing, as in PostgreSQL)."""
        if msg[0] == "reload":
            self.settings = msg[1]

    def _drain_channel(self) -> None:
        """Messages from the postmaster that came between commands (a reload)."""
        while select.select([self.chan], [], [], 0)[0]:
            msg, fd = channel.receive(self.chan)
            if fd is not None:
                os.close(fd)
            if msg is None:
                raise ConsoleError("57P01", "the postmaster has gone")
            self._postmaster_says(msg)

    def _simple_query(self, body: bytes) -> bytes:
        try:
            self._drain_channel()
        except ConsoleError as exc:
            return error_packet(exc.sqlstate, exc.text)
        text = body.rstrip(b"\0").decode("utf-8", "replace")
        statements = [s for s in _split(text) if s.strip()]
        if not statements:
            return protocol.message(b"I")   # EmptyQueryResponse
        out = []
        for statement in statements:
            try:
                out.append(self._command(statement.strip()))
            except ConsoleError as exc:
                out.append(error_packet(exc.sqlstate, exc.text, exc.hint))
                break   # as PostgreSQL: the rest of a multi-statement query is skipped
        return b"".join(out)

    def _command(self, statement: str) -> bytes:
        match = _LOAD_AVERAGE.match(statement)
        if match:
            return self._load_average(match.group(1), match.group(2))
        if _LOAD_AVERAGE_VIEW.match(statement):
            rows = [[s["pid"], s["database"], s["user"], round(s["load_average"], 6)]
                    for s in self._table().slots() if s["pid"] and s["kind"] == "pooled"]
            return result([("pid", INT8), ("database", TEXT), ("user", TEXT),
                           ("load_average", FLOAT8)], rows, f"SELECT {len(rows)}")
        match = _COMMAND.match(statement)
        if not match:
            raise ConsoleError("42601", f'syntax error at or near "{statement[:20]}"')
        verb, rest = match.group(1).upper(), (match.group(2) or "").strip()
        if verb == "SHOW":
            return self._show(rest)
        if verb == "RELOAD" and not rest:
            os.kill(os.getppid(), signal.SIGHUP)
            return command_complete("RELOAD")
        if verb in ("PAUSE", "RESUME"):
            return self._pause(verb, _identifier(rest) if rest else None)
        if verb == "KILL":
            return self._kill(rest)
        if verb in ("BEGIN", "COMMIT", "ROLLBACK", "SET", "RESET", "DISCARD"):
            return command_complete(verb)   # what drivers send on their own; nothing to do
        raise ConsoleError("42601", f'unrecognized admin console command "{statement[:60]}"',
                           hint=COMMANDS_HINT)

    def _sessions(self) -> list[dict]:
        return [r for r in self._ask("report", None) if r.get("session", True)]

    def _table(self) -> status.StatusTable:
        if self.table is None:
            raise ConsoleError("XX000", "the status table is not available")
        return self.table

    def _show(self, what: str) -> bytes:
        what_upper = what.upper()
        if what_upper == "POOLS":
            return self._show_pools()
        if what_upper == "BACKENDS":
            server_pids = {r["backend_pid"]: r["server_pids"] for r in self._ask("report", None)
                           if not r.get("session", True)}
            return result(BACKEND_COLUMNS, backend_rows(self._table(), server_pids))
        if what_upper == "SESSIONS":
            rows = [[r["id"], r["address"], r["port"], r["database"], r["user"],
                     r["application_name"], r["backend_pid"], r["state"], r["connected"],
                     r["since"], r["wait"]] for r in self._sessions()]
            rows.sort(key=lambda r: r[0])
            return result(SESSION_COLUMNS, rows)
        if what_upper == "STATS":
            return self._show_stats()
        if what_upper == "CONFIG":
            return result(CONFIG_COLUMNS, config_rows(self.settings))
        if what_upper == "VERSION":
            return result([("version", TEXT)], [[f"pgforkpool {version()}"]])
        name = what.lower()
        if name in config.PARAMETERS:
            return result([(name, TEXT)], [[self.settings.setting_text(name)]], "SHOW")
        if what_upper == "HELP":
            return result([("command", TEXT)], [[line] for line in HELP_LINES])
        raise ConsoleError("42704", f'unrecognized configuration parameter "{what}"',
                           hint="SHOW CONFIG lists the parameters. " + COMMANDS_HINT)

    def _show_pools(self) -> bytes:
        pools = pool_backends(self._table())
        maxwait: dict[tuple[str, str], float] = {}
        live: dict[tuple[str, str], dict] = {}
        connections: dict[tuple[str, str], int] = {}
        for row in self._ask("report", None):
            key = (row["database"], row["user"])
            if not row.get("session", True):
                connections[key] = connections.get(key, 0) + len(row["server_pids"])
                continue
            maxwait[key] = max(maxwait.get(key, 0.0), row["wait"] or 0.0)
            counts = live.setdefault(key, {"sessions": 0, "active": 0, "waiting": 0, "pinned": 0})
            counts["sessions"] += 1
            if row["state"] in ("active", "in transaction"):
                counts["active"] += 1
            elif row["state"] == "waiting":
                counts["waiting"] += 1
            if row["pinned"]:
                counts["pinned"] += 1
        rows = []
        for (database, user), p in sorted(pools.items()):
            counts = live.get((database, user), {"sessions": 0, "active": 0, "waiting": 0, "pinned": 0})
            rows.append([database, user, p["backends"], counts["sessions"], counts["active"],
                         counts["waiting"], counts["pinned"], p["dedicated"],
                         round(maxwait.get((database, user), 0.0), 6),
                         connections.get((database, user), 0),   # (dedicated ones report theirs)
                         p["paused"]])
        return result(POOL_COLUMNS, rows)

    def _show_stats(self) -> bytes:
        rows = []
        for p in self._ask("stats", None):
            rows.append([p["database"], p["user"], p["transactions"], p["queries"], p["bytes_in"],
                         p["bytes_out"], p["xact_us"], p["wait_us"], p["waits"],
                         round(p["xacts_per_second"], 3), round(p["queries_per_second"], 3),
                         round(p["received_per_second"], 3), round(p["sent_per_second"], 3),
                         p["avg_xact_us"], p["avg_wait_us"]])
        return result(STATS_COLUMNS, rows)

    def _load_average(self, argument: str, alias: str | None) -> bytes:
        column = [(alias or "pg_backend_load_average", FLOAT8)]
        argument = argument.strip().strip("'")
        if not argument or "," in argument:
            types = ", ".join("integer" for _ in argument.split(",")) if argument else ""
            raise ConsoleError("42883", f"function pg_backend_load_average({types}) does not exist",
                               hint="pg_backend_load_average takes one argument, a backend's pid.")
        if argument.upper() == "NULL":
            value = None
        else:
            try:
                pid = int(argument)
            except ValueError:
                raise ConsoleError("22P02", f'invalid input syntax for type integer: "{argument}"')
            value = None
            for slot in self._table().slots():
                if slot["pid"] == pid and slot["kind"] == "pooled":
                    value = slot["load_average"]
        return result(column, [[value]], "SELECT 1")

    def _kill(self, rest: str) -> bytes:
        words = rest.split()
        if len(words) != 2 or words[0].upper() != "SESSION":
            raise ConsoleError("42601", "syntax: KILL SESSION id (the id column of SHOW SESSIONS)")
        try:
            conn_id = int(words[1])
        except ValueError:
            raise ConsoleError("22P02", f'invalid session id "{words[1]}"')
        if not self._ask("kill", conn_id):
            raise ConsoleError("42704", f"no session with id {conn_id}")
        return command_complete("KILL")

    def _pause(self, verb: str, database: str | None) -> bytes:
        if verb == "PAUSE":
            paused_before = self._paused_databases()
            try:
                answers = self._ask("pause", database, PAUSE_TIMEOUT, cancellable=True)
            except Cancelled:
                # A statement cancelled has not happened: the pools this PAUSE paused resume
                # (those paused before it stay paused), and their backends still waiting for
                # a transaction to end give up waiting.
                if self.table is None:   # nothing tells what was paused before: resume all it named
                    self._ask("resume", database)
                else:
                    pausing = {database} if database is not None else {
                        slot["database"] for slot in self.table.slots() if slot["kind"] == "pooled"}
                    for name in sorted(pausing - paused_before):
                        self._ask("resume", name)
                raise ConsoleError("57014", "canceling statement due to user request",
                                   hint="The pools it was pausing were resumed.")
        else:
            answers = self._ask("resume", database)
        if database is not None and not answers:
            # No backend serves it: nothing was paused or resumed, which an OK would hide.
            raise ConsoleError("42704", f'no pool serves database "{database}"',
                               hint="SHOW POOLS lists the pools; a database has one from its first client on.")
        if verb == "PAUSE" and any(not a for a in answers):
            raise ConsoleError("57014", "PAUSE did not complete: a transaction is still running",
                               hint=f"Backends that did not pause within {PAUSE_TIMEOUT:.0f} s still "
                                    "run a transaction and pause when it ends. RESUME, or wait for "
                                    "the running transactions and PAUSE again.")
        return command_complete(verb)

    def _paused_databases(self) -> set[str]:
        """Databases with a paused pooled backend, as the status table shows them."""
        if self.table is None:
            return set()
        return {slot["database"] for slot in self.table.slots()
                if slot["kind"] == "pooled" and slot["paused"]}

    def _ask(self, what: str, argument, timeout: float = ASK_TIMEOUT, cancellable: bool = False) -> list:
        """Ask every backend, through the postmaster; the rows they answered.

        cancellable: a CancelRequest with our key ends the wait (Cancelled); otherwise one
        that comes meanwhile is ignored, as the command takes effect anyway (and the wait
        is short)."""
        self.next_token += 1
        token = self.next_token
        channel.send(self.chan, ("ask", token, what, argument, timeout))
        deadline = time.monotonic() + timeout + ASK_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConsoleError("57014", f"no answer from the postmaster to {what}")
            ready, _, _ = select.select([self.chan], [], [], left)
            if not ready:
                continue
            msg, fd = channel.receive(self.chan)
            if fd is not None:
                os.close(fd)
            if msg is None:
                raise ConsoleError("57P01", "the postmaster has gone")
            if msg[0] == "answer" and msg[1] == token:
                return msg[2]
            if msg[0] == "cancel" and msg[1] == self.cancel_key and cancellable:
                raise Cancelled()
            self._postmaster_says(msg)


_READ_ONLY = re.compile(r"^\s*(show|select)\b", re.I)


def _first_message(data: bytes) -> bytes:
    return data[:1 + struct.unpack_from("!I", data, 1)[0]]


def _identifier(text: str) -> str:
    text = text.strip().rstrip(";").strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1].replace('""', '"')
    return text


def _split(text: str) -> list[str]:
    """Statements of a simple query, split at semicolons outside quotes, comments
    (-- to the end of the line, /* */ nested as PostgreSQL nests them) left out."""
    parts: list[str] = []
    current: list[str] = []
    quote = None
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if quote:
            current.append(ch)
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
            current.append(ch)
        elif ch == "-" and text.startswith("--", i):
            end = text.find("\n", i)
            i = n if end < 0 else end
            current.append(" ")
            continue
        elif ch == "/" and text.startswith("/*", i):
            depth, i = 1, i + 2
            while i < n and depth:
                if text.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif text.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
            current.append(" ")
            continue
        elif ch == ";":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    parts.append("".join(current))
    return parts


def main(settings, conn_id: int, startup: dict[str, str], client_fd: int,
         chan: socket.socket, table: status.StatusTable | None) -> None:
    """Entry point in the forked console process."""
    process.set_title(f"console {startup['user']}")
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    sock = socket.socket(fileno=client_fd)
    connected = time.time()
    try:
        address = "%s:%s" % sock.getpeername()[:2] if sock.family != socket.AF_UNIX else ""
    except OSError:
        address = ""
    try:
        Console(settings, conn_id, startup, sock, chan, table).run()
    except OSError:
        pass
    finally:
        if settings.log_disconnections:
            logger.log(log.LOG, "%s", log.disconnection(time.time() - connected, startup["user"],
                                                       CONSOLE_DATABASE, address))
        try:
            sock.close()
        except OSError:
            pass
    os._exit(0)
