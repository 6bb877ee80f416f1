"""Under concurrent load, bad input affects only its own client, and no session's state reaches another.

One pooler (session_pool_size=2) serves, for RUN_SECONDS, twelve well-behaved
psycopg sessions, each with an identity of its own (TimeZone from `options`,
search_path, application_name, a custom setting, its own rows, sometimes a SQL
PREPARE that pins it), while misbehaving clients on bare sockets keep
connecting and vanishing at the worst moments: inside a transaction, in the
middle of a message, during COPY, in an unsynced pipeline, holding temporary
tables, advisory locks or another role, after sending garbage, with wrong
passwords, and by firing cancel requests with guessed keys.

Afterwards: the well-behaved sessions saw no error and never another session's
state; nothing a vanished client left uncommitted exists; every pooler process
is the one that was there at the start; and once the misbehaving clients are
gone the pooler holds no pinned connection, advisory lock or role of theirs.
"""

import contextlib
import itertools
import json
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback

import psutil
import psycopg

from conftest import PGFORKPOOL, USERS, wait_for
from test_errors import RawClient, ready_status, rows
from pgforkpool.shared import protocol

RUN_SECONDS = 16          # the concurrent phase
GOOD_SESSIONS = 12
RAW_TIMEOUT = 8.0         # every socket operation of a misbehaving client
JOIN_TIMEOUT = 15.0       # the bound on every thread's end after the run
SETTLE_TIMEOUT = 12.0     # the bound on every wait for the pooler to settle afterwards

ZONES = ["Europe/Paris", "Asia/Tokyo", "America/New_York", "Australia/Sydney", "Africa/Cairo",
         "America/Sao_Paulo", "Asia/Kolkata", "Europe/Moscow", "Pacific/Auckland",
         "America/Anchorage", "Asia/Singapore", "Europe/Lisbon"]
GOOD_BASE = 5_000_000               # good session i owns ids GOOD_BASE + i*GOOD_SPAN ..
GOOD_SPAN = 10_000
GHOST_LO, GHOST_HI = 6_000_000, 6_999_999   # rows written by clients that vanish without committing
GHOST_NOTE = "robust-ghost"
LOCK_BASE = 880_000_000             # advisory lock keys of vanishing clients
PREPARING = {1, 5, 9}               # good sessions that pin themselves with SQL PREPARE


def status_json(pooler) -> dict:
    out = subprocess.run([PGFORKPOOL, "status", pooler.conf, "--format", "json"],
                         capture_output=True, text=True, timeout=15)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


class Record:
    """What every thread saw, thread-safe."""

    def __init__(self):
        self.lock = threading.Lock()
        self.good_errors: list[str] = []       # exceptions of well-behaved sessions
        self.mismatches: list[str] = []        # a well-behaved session saw state not its own
        self.bad_anomalies: list[str] = []     # a misbehaving client was not answered as documented
        self.kinds: dict[str, int] = {}        # mismatches by what was checked
        self.counts: dict[str, int] = {}

    def add(self, bucket: list, text: str) -> None:
        with self.lock:
            bucket.append(f"[{time.strftime('%H:%M:%S')}] {text}")

    def mismatch(self, what: str, text: str) -> None:
        with self.lock:
            first = what not in self.kinds
            self.kinds[what] = self.kinds.get(what, 0) + 1
            if first or len(self.mismatches) < 200:
                self.mismatches.append(f"[{time.strftime('%H:%M:%S')}] {text}")

    def mismatch_report(self) -> str:
        """How many of each kind, then the first of each kind, then the first few in time."""
        with self.lock:
            kinds = ", ".join(f"{what!r} x{n}" for what, n in sorted(self.kinds.items(), key=lambda kv: -kv[1]))
            firsts = []
            for what in self.kinds:
                firsts.append(next(m for m in self.mismatches if f" {what}: " in m))
            return (f"{sum(self.kinds.values())} mismatches: {kinds}\n  first of each kind:\n  "
                    + "\n  ".join(firsts) + "\n  first in time:\n  " + _first(self.mismatches, 6))

    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counts[name] = self.counts.get(name, 0) + n


# ================================================================ well-behaved sessions

class GoodSession:
    def __init__(self, i: int, pooler, record: Record):
        self.i = i
        self.pooler = pooler
        self.record = record
        self.rng = random.Random(1000 + i)
        self.zone = ZONES[i]
        self.tenant = f"tenant-{i}"
        self.app = f"good-{i}"
        self.search_path = f"good_{i}, public"
        self.note = f"robust-good-{i}"
        self.lo = GOOD_BASE + i * GOOD_SPAN
        self.hi = self.lo + GOOD_SPAN - 1
        self.next_id = self.lo
        self.committed = 0
        self.prepared = False          # holds its SQL PREPARE (pinned)
        self.transactions = 0
        self.reconnects = 0
        self.conn: psycopg.Connection | None = None

    # ---------------------------------------------------------------- set-up

    def connect(self) -> None:
        conn = psycopg.connect(self.pooler.conninfo(options=f"-c timezone={self.zone}"), autocommit=True)
        conn.execute(f"SET search_path = good_{self.i}, public")
        conn.execute(f"SET application_name = '{self.app}'")
        conn.execute("SELECT set_config('myapp.tenant', %s, false)", (self.tenant,))
        self.conn = conn
        self.prepared = False
        self.committed = self.count_own()[0]

    def expect(self, what: str, got, wanted) -> None:
        if got != wanted:
            self.record.mismatch(what, f"good-{self.i} {what}: got {got!r}, expected {wanted!r}")

    # ---------------------------------------------------------------- checks

    def check_identity(self) -> None:
        conn = self.conn
        self.expect("SHOW timezone", conn.execute("SHOW timezone").fetchone()[0], self.zone)
        self.expect("current_setting('myapp.tenant')",
                    conn.execute("SELECT current_setting('myapp.tenant')").fetchone()[0], self.tenant)
        self.expect("SHOW application_name", conn.execute("SHOW application_name").fetchone()[0], self.app)
        user, session_user, role, search_path = conn.execute(
            "SELECT current_user, session_user, current_setting('role'), current_setting('search_path')").fetchone()
        self.expect("current_user, session_user, role", (user, session_user, role), ("app", "app", "none"))
        self.expect("search_path", search_path, self.search_path)
        self.expect("another session's temporary table or advisory lock",
                    conn.execute("SELECT pg_catalog.to_regclass('pg_temp.robust_scratch')::text, "
                                 "(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                                 "AND pid = pg_backend_pid())").fetchone(), (None, 0))
        self.expect("ParameterStatus TimeZone", conn.info.parameter_status("TimeZone"), self.zone)
        self.expect("ParameterStatus application_name",
                    conn.info.parameter_status("application_name"), self.app)

    def check_parameterised(self) -> None:
        conn, i = self.conn, self.i
        k = self.rng.randint(1, 10_000)
        # Text only this session sends (psycopg prepares it after 5 runs, as _pg3_N).
        self.expect("own parameterised query",
                    conn.execute(f"SELECT %s::int + {i}, %s::text || '-{i}', current_setting('application_name')",
                                 (k, "x")).fetchone(),
                    (k + i, f"x-{i}", self.app))
        # Text every session sends: one statement on the server, shared.
        self.expect("shared parameterised query",
                    conn.execute("SELECT %s::int * 2, current_setting('myapp.tenant'), "
                                 "current_setting('TimeZone'), current_user", (k,)).fetchone(),
                    (2 * k, self.tenant, self.zone, "app"))

    def count_own(self) -> tuple[int, int]:
        return self.conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE note <> %s) FROM items WHERE id BETWEEN %s AND %s",
            (self.note, self.lo, self.hi)).fetchone()

    def write(self) -> None:
        conn = self.conn
        n = self.rng.randint(1, 3)
        ids = list(range(self.next_id, self.next_id + n))
        self.next_id += n
        commit = self.rng.random() < 0.6
        with conn.transaction():
            for row_id in ids:
                conn.execute("INSERT INTO items (id, note) VALUES (%s, %s)", (row_id, self.note))
            self.expect("own rows inside the transaction", self.count_own(), (self.committed + n, 0))
            if self.rng.random() < 0.3:
                self.expect("tenant inside a writing transaction",
                            conn.execute("SELECT current_setting('myapp.tenant'), pg_sleep(0.002)::text"
                                         ).fetchone(), (self.tenant, ""))
            if not commit:
                raise psycopg.Rollback()
        if commit:
            self.committed += n
        self.expect("own rows after COMMIT" if commit else "own rows after ROLLBACK",
                    self.count_own(), (self.committed, 0))
        if not commit:
            self.resync_prepared()

    def resync_prepared(self) -> None:
        """After a ROLLBACK psycopg sends DEALLOCATE ALL if it has prepared statements of its own,
        which drops SQL-prepared ones too (on PostgreSQL itself as well): ask the server."""
        if self.i in PREPARING:
            self.prepared = self.conn.execute(
                "SELECT EXISTS (SELECT 1 FROM pg_prepared_statements WHERE name = %s)",
                (f"good_stmt_{self.i}",)).fetchone()[0]

    def sql_prepare(self) -> None:
        conn, i = self.conn, self.i
        if not self.prepared:
            conn.execute(f"PREPARE good_stmt_{i}(int) AS "
                         f"SELECT $1 + {i}, current_setting('myapp.tenant')", prepare=False)
            self.prepared = True
        k = self.rng.randint(1, 1000)
        self.expect("EXECUTE of its own SQL-prepared statement",
                    conn.execute(f"EXECUTE good_stmt_{i}({k})", prepare=False).fetchone(),
                    (k + i, self.tenant))

    def foreign_execute(self) -> None:
        """Another session's SQL-prepared statement does not exist here."""
        j = self.rng.choice(sorted(PREPARING - {self.i}))
        try:
            got = self.conn.execute(f"EXECUTE good_stmt_{j}(1)", prepare=False).fetchone()
        except psycopg.errors.InvalidSqlStatementName:
            return
        what = "EXECUTE of another session's SQL-prepared statement"
        self.record.mismatch(what, f"good-{self.i} {what}: good_stmt_{j} of good-{j} gave {got!r}")

    # ---------------------------------------------------------------- loop

    def iteration(self) -> None:
        rng = self.rng
        if rng.random() < 0.5:
            with self.conn.transaction():
                self.check_identity()
                self.check_parameterised()
        else:
            self.check_identity()          # each statement its own transaction
            self.check_parameterised()
        if rng.random() < 0.5:
            self.write()
        if self.i in PREPARING and (self.prepared or rng.random() < 0.2):
            self.sql_prepare()
        if rng.random() < 0.08:
            self.foreign_execute()
        if rng.random() < 0.1:
            self.expect("pg_sleep with tenant",
                        self.conn.execute("SELECT pg_sleep(0.005)::text, current_setting('myapp.tenant')"
                                          ).fetchone(), ("", self.tenant))
        self.transactions += 1

    def run(self, stop: threading.Event, deadline: float) -> None:
        for _ in range(100_000):
            if stop.is_set() or time.monotonic() > deadline:
                return
            try:
                self.iteration()
            except Exception as exc:   # every one is unexpected
                self.record.add(self.record.good_errors,
                                f"good-{self.i}: {type(exc).__name__} "
                                f"(sqlstate {getattr(exc, 'sqlstate', None)}): {exc}")
                if not self.recover():
                    return

    def recover(self) -> bool:
        """After an error: resynchronise the row count, or reconnect with the same identity."""
        try:
            if not self.conn.closed:
                self.committed = self.count_own()[0]
                self.resync_prepared()
                return True
        except Exception:
            pass
        if self.reconnects >= 3:
            return False
        self.reconnects += 1
        try:
            self.conn.close()
            self.connect()
            return True
        except Exception as exc:
            self.record.add(self.record.good_errors, f"good-{self.i} could not reconnect: {exc}")
            return False


# ================================================================ misbehaving clients

def parse(name: str, sql: str) -> bytes:
    return protocol.message(b"P", protocol.cstring(name) + protocol.cstring(sql) + struct.pack("!h", 0))


def bind(portal: str, statement: str, params: list[bytes]) -> bytes:
    body = protocol.cstring(portal) + protocol.cstring(statement) + struct.pack("!hh", 0, len(params))
    for value in params:
        body += struct.pack("!i", len(value)) + value
    return protocol.message(b"B", body + struct.pack("!h", 0))


def execute(portal: str = "") -> bytes:
    return protocol.message(b"E", protocol.cstring(portal) + struct.pack("!i", 0))


FLUSH = protocol.message(b"H")


class Misbehaving:
    """The misbehaving clients: each method is one connection that ends badly."""

    def __init__(self, pooler, record: Record, good_pids: list[int]):
        self.pooler = pooler
        self.record = record
        self.good_pids = good_pids
        self.ghost_ids = itertools.count(GHOST_LO)
        self.lock_keys = itertools.count(LOCK_BASE)
        self.lock = threading.Lock()
        self.open: set = set()            # live sockets, to shut down if a thread hangs

    # ---------------------------------------------------------------- helpers

    def ghost(self) -> int:
        with self.lock:
            row_id = next(self.ghost_ids)
        assert row_id <= GHOST_HI
        self.record.count("ghost rows attempted")
        return row_id

    def raw(self) -> RawClient:
        raw = RawClient(self.pooler.port, timeout=RAW_TIMEOUT)
        with self.lock:
            self.open.add(raw.sock)
        return raw

    def login(self, raw: RawClient, **params) -> None:
        messages = raw.login(**params)
        if messages[-1][0] != protocol.READY_FOR_QUERY:
            raise AssertionError(f"login refused: {protocol.parse_error_fields(messages[-1][1])}")

    def query(self, raw: RawClient, sql: str, status: bytes | None = None) -> list:
        messages = raw.query(sql)
        errors = [protocol.parse_error_fields(p) for t, p in messages if t == protocol.ERROR_RESPONSE]
        if errors:
            raise AssertionError(f"{sql!r} failed: {errors[0]}")
        if status is not None and ready_status(messages) != status:
            raise AssertionError(f"{sql!r} left status {ready_status(messages)!r}, expected {status!r}")
        return messages

    def vanish(self, raw: RawClient, rng: random.Random) -> None:
        """Close without Terminate: half of the time with a FIN, half with a RST."""
        if rng.random() < 0.5:
            raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with self.lock:
            self.open.discard(raw.sock)
        raw.sock.close()

    def close_all(self) -> None:
        with self.lock:
            socks = list(self.open)
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def insert_ghost(self, raw: RawClient, kind: str) -> int:
        row_id = self.ghost()
        self.query(raw, f"INSERT INTO items VALUES ({row_id}, '{GHOST_NOTE}-{kind}')", b"T")
        return row_id

    # ---------------------------------------------------------------- the clients

    def vanish_in_transaction(self, rng: random.Random, n: int) -> None:
        if n % 6 == 5:
            return self.psql_killed(rng)
        raw = self.raw()
        try:
            self.login(raw)
            self.query(raw, "BEGIN", b"T")
            self.insert_ghost(raw, "txn")
            if n % 3 == 1:
                # Vanish while a statement is still running on the server.
                raw.send(protocol.query(f"INSERT INTO items VALUES ({self.ghost()}, '{GHOST_NOTE}-running'); "
                                        "SELECT pg_sleep(0.05)"))
            elif n % 3 == 2:
                raw.send(protocol.query(f"INSERT INTO items VALUES ({self.ghost()}, '{GHOST_NOTE}-running')"))
        finally:
            self.vanish(raw, rng)

    def psql_killed(self, rng: random.Random) -> None:
        """A real client killed with SIGKILL inside its transaction."""
        env = dict(os.environ, PGPASSWORD=USERS["app"], PGCONNECT_TIMEOUT="8")
        proc = subprocess.Popen(["psql", "-X", "-q", "-h", "127.0.0.1", "-p", str(self.pooler.port),
                                 "-U", "app", "-d", "app"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, env=env)
        try:
            proc.stdin.write(f"BEGIN;\nINSERT INTO items VALUES ({self.ghost()}, '{GHOST_NOTE}-psql');\n"
                             "\\echo inserted\n")
            proc.stdin.flush()
            ready, _, _ = select.select([proc.stdout], [], [], RAW_TIMEOUT)
            if not ready or proc.stdout.readline().strip() != "inserted":
                raise AssertionError("psql did not report its INSERT")
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def garbage(self, rng: random.Random, n: int) -> None:
        raw = self.raw()
        try:
            self.login(raw)
            variant = n % 4
            if variant in (1, 3):
                self.query(raw, "BEGIN", b"T")
                self.insert_ghost(raw, "garbage")
            if variant == 2:
                raw.send(b"Q" + struct.pack("!I", 2))           # a length that cannot be
            elif variant == 3:
                # A valid statement and garbage in one write.
                raw.send(protocol.query(f"INSERT INTO items VALUES ({self.ghost()}, '{GHOST_NOTE}-garbage')")
                         + b"\x01" + struct.pack("!I", 4))
            else:
                raw.send(bytes([rng.choice([0x01, 0x7f, ord("z"), ord("!")])]) + struct.pack("!I", 4))
            messages = []
            for _ in range(100):
                item = raw.read()
                if item is None:
                    break
                messages.append(item)
            errors = [protocol.parse_error_fields(p) for t, p in messages if t == protocol.ERROR_RESPONSE]
            codes = [e.get("C") for e in errors]
            if "08P01" not in codes:
                raise AssertionError(f"garbage variant {variant}: no 08P01 before the close, got {errors}")
        finally:
            self.vanish(raw, rng)

    def half_message(self, rng: random.Random, n: int) -> None:
        raw = self.raw()
        try:
            self.login(raw)
            if n % 2:
                self.query(raw, "BEGIN", b"T")
                self.insert_ghost(raw, "half")
            if n % 3 == 0:
                raw.send(b"Q" + struct.pack("!I", 1 << 20) + b"SELECT ")   # promises a megabyte
            else:
                whole = protocol.query(f"INSERT INTO items VALUES ({self.ghost()}, '{GHOST_NOTE}-half')")
                raw.send(whole[:rng.randint(1, len(whole) - 1)])
            time.sleep(rng.random() * 0.05)
        finally:
            self.vanish(raw, rng)

    def copy_vanish(self, rng: random.Random, n: int) -> None:
        raw = self.raw()
        try:
            self.login(raw)
            if n % 2:
                self.query(raw, "BEGIN", b"T")
            raw.send(protocol.query("COPY items (id, note) FROM STDIN"))
            raw.read_until(protocol.COPY_IN_RESPONSE)
            data = "".join(f"{self.ghost()}\t{GHOST_NOTE}-copy\n" for _ in range(3)).encode()
            raw.send(protocol.message(b"d", data))
            if n % 3 == 0:
                raw.send(protocol.message(b"d", f"{self.ghost()}\t{GHOST_NOTE}-copy\n".encode())[:7])
            time.sleep(rng.random() * 0.03)
        finally:
            self.vanish(raw, rng)

    def pipeline_vanish(self, rng: random.Random, n: int) -> None:
        raw = self.raw()
        try:
            self.login(raw)
            variant = n % 3
            if variant == 0:
                # Parse and Bind, no Execute, no Sync.
                raw.send(parse("s1", f"INSERT INTO items VALUES ($1, '{GHOST_NOTE}-pipeline')")
                         + bind("", "s1", [str(self.ghost()).encode()]))
                time.sleep(rng.random() * 0.03)
            else:
                # An INSERT executed in the pipeline's implicit transaction, never synced:
                # the Flush makes the server report that it ran before the client vanishes.
                if variant == 2:
                    self.query(raw, "BEGIN", b"T")
                raw.send(parse("", f"INSERT INTO items VALUES ($1, '{GHOST_NOTE}-pipeline')")
                         + bind("", "", [str(self.ghost()).encode()]) + execute() + FLUSH)
                messages = raw.read_until(protocol.COMMAND_COMPLETE, protocol.ERROR_RESPONSE)
                if messages[-1][0] != protocol.COMMAND_COMPLETE:
                    raise AssertionError(f"pipelined INSERT failed: "
                                         f"{protocol.parse_error_fields(messages[-1][1])}")
        finally:
            self.vanish(raw, rng)

    def temp_table_vanish(self, rng: random.Random, n: int) -> None:
        raw = self.raw()
        try:
            self.login(raw)
            self.query(raw, "CREATE TEMP TABLE robust_scratch (x int)", b"I")
            self.query(raw, "INSERT INTO robust_scratch VALUES (1)", b"I")
            if n % 2:
                self.query(raw, "BEGIN", b"T")
                self.insert_ghost(raw, "temp")
            time.sleep(rng.random() * 0.05)
        finally:
            self.vanish(raw, rng)

    def advisory_vanish(self, rng: random.Random, n: int) -> None:
        raw = self.raw()
        try:
            self.login(raw)
            with self.lock:
                key = next(self.lock_keys)
            got = rows(self.query(raw, f"SELECT pg_advisory_lock({key})::text, 'locked'", b"I"))
            if got != [["", "locked"]]:
                raise AssertionError(f"pg_advisory_lock answered {got}")
            if n % 2:
                self.query(raw, "BEGIN", b"T")
                self.insert_ghost(raw, "advisory")
            time.sleep(rng.random() * 0.05)
        finally:
            self.vanish(raw, rng)

    def set_role_stay(self, rng: random.Random, n: int) -> None:
        """Takes another role and other settings, stays a while doing work, then vanishes."""
        raw = self.raw()
        try:
            self.login(raw)
            self.query(raw, "SET ROLE alice; SET application_name = 'evil'; SET TimeZone = 'UTC'; "
                            "SET search_path = evil; SELECT set_config('myapp.tenant', 'evil', false)", b"I")
            until = time.monotonic() + 0.3 + rng.random() * 0.7
            for _ in range(40):
                if time.monotonic() > until:
                    break
                got = rows(self.query(raw, "SELECT current_user, current_setting('myapp.tenant'), "
                                           "current_setting('TimeZone')"))
                if got != [["alice", "evil", "UTC"]]:
                    self.record.add(self.record.bad_anomalies,
                                    f"set_role_stay lost its own state: {got}")
                time.sleep(0.03)
            if n % 2:
                self.query(raw, "BEGIN", b"T")
                self.query(raw, "SET LOCAL ROLE alice", b"T")
        finally:
            self.vanish(raw, rng)

    def evil_settings_vanish(self, rng: random.Random, n: int) -> None:
        """Changes settings and role and vanishes before the pooler can read them back."""
        raw = self.raw()
        try:
            self.login(raw)
            if n % 2:
                self.query(raw, "BEGIN", b"T")
            raw.send(protocol.query("SET ROLE alice; SET application_name = 'evil'; "
                                    "SET TimeZone = 'UTC'; SET search_path = evil; "
                                    "SELECT set_config('myapp.tenant', 'evil', false)"))
            if n % 3 == 0:
                raw.read_until(protocol.READY_FOR_QUERY)
        finally:
            self.vanish(raw, rng)

    def wrong_password(self, rng: random.Random, n: int) -> None:
        raw = self.raw()
        try:
            if n % 5 == 4:
                # Not a startup packet: an impossible length, or an unknown protocol version.
                if n % 2:
                    raw.send(struct.pack("!ii", rng.choice([0, 3, 7, 10_001, 1 << 30]), protocol.PROTOCOL_3_0))
                    wanted = "08P01"
                else:
                    body = struct.pack("!i", rng.choice([1 << 16, 7 << 16, 0x12345678])) + b"user\0app\0\0"
                    raw.send(struct.pack("!i", len(body) + 4) + body)
                    wanted = "0A000"
                fields = raw.error()
                if fields.get("C") != wanted or not raw.closed():
                    raise AssertionError(f"bad startup packet: expected {wanted} and a close, got {fields}")
                return
            user = "nobody" if n % 3 == 2 else "app"
            messages = raw.login(user=user, password=f"wrong-{n}")
            fields = protocol.parse_error_fields(messages[-1][1]) if messages[-1][0] == protocol.ERROR_RESPONSE else {}
            if fields.get("C") != "28P01":
                raise AssertionError(f"wrong password for {user}: {fields or messages[-1]}")
        finally:
            self.vanish(raw, rng)

    def cancel_spam(self, rng: random.Random, n: int) -> None:
        pid = rng.choice(self.good_pids) if rng.random() < 0.9 else rng.randint(2, 4_000_000)
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", self.pooler.port), timeout=RAW_TIMEOUT) as sock:
                sock.sendall(protocol.cancel_request(pid, rng.randint(1, 0x7FFFFFFF)))
            self.record.count("cancel requests sent")

    CLIENTS = ["vanish_in_transaction", "garbage", "half_message", "copy_vanish", "pipeline_vanish",
               "temp_table_vanish", "advisory_vanish", "set_role_stay", "evil_settings_vanish",
               "wrong_password", "cancel_spam"]

    def run(self, name: str, stop: threading.Event, deadline: float) -> None:
        client = getattr(self, name)
        rng = random.Random(name)
        for n in range(2000):
            if stop.is_set() or time.monotonic() > deadline:
                return
            self.record.count(name)          # attempts; failures are counted apart
            try:
                client(rng, n)
            except Exception as exc:
                self.record.count(f"{name} failed")
                self.record.add(self.record.bad_anomalies, f"{name} #{n}: {type(exc).__name__}: {exc}")
            time.sleep(0.01 + rng.random() * 0.03)


# ================================================================ the test

def _pooler_processes(pooler) -> dict[int, float]:
    procs = {pooler.pid: psutil.Process(pooler.pid).create_time()}
    for child in pooler.children():
        try:
            procs[child.pid] = child.create_time()
        except psutil.Error:
            pass
    return procs


def _first(items: list, n: int = 8) -> str:
    return "\n  ".join(items[:n]) + (f"\n  ... and {len(items) - n} more" if len(items) > n else "")


def _log_tail(pooler, lines: int = 25) -> str:
    """The pooler's last log lines, without the refusals of wrong passwords (expected here)."""
    noise = ("password authentication failed", "Password does not match", "has no entry in auth_file")
    return "\n".join([line for line in pooler.log().splitlines()
                      if not any(text in line for text in noise)][-lines:])


def cut(conn: psycopg.Connection) -> None:
    """Shut the connection's socket down under a blocked client, so that it fails instead of waiting."""
    try:
        socket.socket(fileno=os.dup(conn.fileno())).shutdown(socket.SHUT_RDWR)
    except (OSError, psycopg.Error):
        pass


@contextlib.contextmanager
def guarded(conns: list, seconds: float = 10.0):
    """Queries of the main thread: a pooler that never answers makes them fail, not hang."""
    timer = threading.Timer(seconds, lambda: [cut(conn) for conn in conns])
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def test_bad_clients_under_load_touch_no_other_session(start_pooler, cluster):
    cluster.psql("GRANT alice TO app")
    cluster.psql(f"DELETE FROM items WHERE id BETWEEN {GOOD_BASE} AND {GHOST_HI}", database="app")
    pooler = start_pooler(session_pool_size=2, max_sessions=1000, max_pinned_sessions=50)
    record = Record()
    good = [GoodSession(i, pooler, record) for i in range(GOOD_SESSIONS)]
    threads: list[threading.Thread] = []
    stop = threading.Event()
    misbehaving = None
    # Every failed check is collected, so that one run reports all that went wrong.
    problems: list[str] = []
    try:
        for session in good:
            session.connect()
            session.check_identity()      # a mismatch here is recorded like any other
        backends = {session.conn.pgconn.backend_pid for session in good}
        assert len(backends) == 2, backends
        processes = _pooler_processes(pooler)
        titles = {pid: " ".join(psutil.Process(pid).cmdline()) for pid in processes}
        assert sum("backend app/app" in t for t in titles.values()) == 2, titles

        misbehaving = Misbehaving(pooler, record, sorted(backends))
        deadline = time.monotonic() + RUN_SECONDS
        threads = [threading.Thread(target=s.run, args=(stop, deadline), name=f"good-{s.i}", daemon=True)
                   for s in good]
        threads += [threading.Thread(target=misbehaving.run, args=(name, stop, deadline), name=name,
                                     daemon=True) for name in Misbehaving.CLIENTS]
        for thread in threads:
            thread.start()
        time.sleep(RUN_SECONDS)
        stop.set()

        # ------------------------------------------------ every thread ends, bounded
        join_deadline = time.monotonic() + JOIN_TIMEOUT
        for thread in threads:
            thread.join(max(0.1, join_deadline - time.monotonic()))
        hung = [t.name for t in threads if t.is_alive()]
        if hung:   # unblock them so that nothing outlives the test, then fail
            frames = sys._current_frames()
            stacks = {t.name: "".join(traceback.format_stack(frames[t.ident], limit=6))
                      for t in threads if t.is_alive() and t.ident in frames}
            problems.append(f"threads still blocked {JOIN_TIMEOUT:.0f} s after the run: {hung}\n"
                            f"  last iteration counts of the good sessions: "
                            f"{[(s.i, s.transactions) for s in good]}\n"
                            f"  where the first is blocked:\n{next(iter(stacks.values()), '')}")
            misbehaving.close_all()
            for session in good:
                if f"good-{session.i}" in hung and session.conn is not None and not session.conn.closed:
                    cut(session.conn)
            for thread in threads:
                thread.join(5)
        activity = (f"good sessions' iterations {[s.transactions for s in good]}\n"
                    f"misbehaving clients' connections {record.counts}")
        if min(s.transactions for s in good) < 20:
            problems.append(f"well-behaved sessions made little progress: {activity}")
        idle = [name for name in Misbehaving.CLIENTS if record.counts.get(name, 0) < 5]
        if idle:
            problems.append(f"misbehaving clients that hardly ran: {idle}")

        # ------------------------------------------------ the well-behaved sessions saw only their own
        for session in good:   # one more look, now that the storm is over
            try:
                with guarded([session.conn]):
                    session.check_identity()
                    session.expect("own rows at the end", session.count_own(), (session.committed, 0))
            except Exception as exc:
                record.add(record.good_errors, f"good-{session.i} after the run: {type(exc).__name__}: {exc}")
        if record.good_errors:
            problems.append(f"{len(record.good_errors)} errors in well-behaved sessions:\n  "
                            f"{_first(record.good_errors)}")
        if record.mismatches:
            problems.append("well-behaved sessions saw state not their own: " + record.mismatch_report())

        # ------------------------------------------------ nothing uncommitted by a vanished client exists
        ghosts = cluster.psql(f"SELECT count(*) || ' ' || coalesce(string_agg(id || ':' || note, ', ' "
                              f"ORDER BY id), '') FROM items WHERE id BETWEEN {GHOST_LO} AND {GHOST_HI}",
                              database="app")
        if ghosts.split(" ", 1)[0] != "0":
            problems.append(f"rows of vanished clients' uncommitted work exist (count, id:note): {ghosts}")

        # ------------------------------------------------ no pooler process crashed
        if pooler.proc.poll() is not None:
            problems.append(f"the postmaster exited with {pooler.proc.returncode}")
        now = _pooler_processes(pooler)
        lost = [titles[pid] for pid, started in processes.items() if now.get(pid) != started]
        if lost:
            problems.append(f"pooler processes gone or replaced: {lost}")
        if "Traceback" in pooler.log():
            problems.append("a pooler process logged a traceback")

        # ------------------------------------------------ the misbehaving clients were answered as documented
        if record.bad_anomalies:
            problems.append(f"{len(record.bad_anomalies)} misbehaving clients were not answered as "
                            f"documented:\n  {_first(record.bad_anomalies)}")

        # ------------------------------------------------ what the vanished clients held is gone
        for session in good:
            if session.i in PREPARING:
                try:
                    with guarded([session.conn]):
                        session.sql_prepare()    # prepares again if a ROLLBACK's DEALLOCATE ALL dropped it
                except Exception as exc:
                    problems.append(f"good-{session.i} could not use SQL PREPARE after the run: {exc}")
        still_pinned = sum(1 for s in good if s.i in PREPARING and s.prepared)
        pinned = {}

        def settled() -> bool:
            pinned["now"] = sum(b["pinned"] for b in status_json(pooler)["backends"])
            return pinned["now"] == still_pinned
        try:
            wait_for(settled, "pinned sessions to be only the good ones", SETTLE_TIMEOUT)
        except AssertionError:
            problems.append(f"pgforkpool status counts {pinned['now']} pinned sessions {SETTLE_TIMEOUT:.0f} s "
                            f"after the misbehaving clients left; expected {still_pinned} "
                            f"(the good sessions that ran SQL PREPARE)")
        locks = {}

        def no_locks() -> bool:
            locks["now"] = cluster.psql("SELECT count(*) || ' ' || coalesce(string_agg(objid::text, ','), '') "
                                        "FROM pg_locks WHERE locktype = 'advisory'")
            return locks["now"].split(" ", 1)[0] == "0"
        try:
            wait_for(no_locks, "advisory locks of vanished clients to go", SETTLE_TIMEOUT)
        except AssertionError:
            problems.append(f"advisory locks remain (count, keys): {locks['now']}")

        # ------------------------------------------------ fresh sessions get a clean one, on every backend
        default_tz = cluster.psql("SHOW timezone", database="app")
        clean = ("app", "app", "none", "", default_tz, '"$user", public', "", 0)
        fresh, unclean = [], []
        try:
            try:
                for _ in range(6):
                    fresh.append(pooler.connect())
            except psycopg.Error as exc:
                problems.append(f"a new connection after the run failed: {type(exc).__name__}: {exc}")
            if fresh and {c.pgconn.backend_pid for c in fresh} != backends:
                problems.append(f"fresh sessions not served by the original backends {backends}")
            try:
                with guarded(fresh, 15.0):
                    for n, conn in enumerate(fresh):
                        for _ in range(3):
                            got = conn.execute(
                                "SELECT current_user, session_user, current_setting('role'), "
                                "current_setting('application_name'), current_setting('TimeZone'), "
                                "current_setting('search_path'), "
                                "coalesce(current_setting('myapp.tenant', true), ''), "
                                "(SELECT count(*) FROM items WHERE id BETWEEN %s AND %s)",
                                (GHOST_LO, GHOST_HI)).fetchone()
                            if got != clean:
                                unclean.append(f"fresh session {n}: got {got}")
                                break
            except psycopg.Error as exc:
                problems.append(f"a new session failed after the run: {type(exc).__name__}: {exc}")
            if unclean:
                problems.append(f"{len(unclean)} of {len(fresh)} fresh sessions are not clean "
                                f"(expected (current_user, session_user, role, application_name, TimeZone, "
                                f"search_path, myapp.tenant, ghost rows) = {clean}):\n  " + _first(unclean, 3))
        finally:
            for conn in fresh:
                conn.close()

        assert not problems, (f"{len(problems)} problems:\n\n" + "\n\n".join(problems)
                              + f"\n\n{activity}\npooler log tail:\n{_log_tail(pooler)}")
    finally:
        stop.set()
        if misbehaving is not None:
            misbehaving.close_all()
        for thread in threads:
            thread.join(5)
        for session in good:
            if session.conn is not None:
                session.conn.close()
        cluster.psql(f"DELETE FROM items WHERE id BETWEEN {GOOD_BASE} AND {GHOST_HI}", database="app")
