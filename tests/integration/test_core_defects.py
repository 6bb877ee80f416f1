"""Acceptance tests for defects of the pooled backend, each asserting what a user observes.

Every test puts its clients on one pooled backend (session_pool_size=1: one
shared server connection) and checks that one client's statements, bad bytes or
departure neither leak into nor stall nor crash the others.  Clients on bare
sockets log in with trust authentication (the pooler's auth_method) so that they
stay small; every wait is bounded, so a defect shows as a failure, never a hang.
"""

import os
import random
import select
import socket
import struct
import subprocess
import threading
import time

import psutil
import psycopg
import pytest
from psycopg import pq

from conftest import WAIT, backend_pid, server_pid, wait_for

pytestmark = pytest.mark.timeout(90)   # the last resort; every wait below has a tighter bound

RAW_TIMEOUT = 10.0      # every socket wait of a raw client
ANSWER_BOUND = 5.0      # another session's next query must be answered within this
MB = 1 << 20

# ================================================================ a raw protocol client

_i16, _i32, _u32 = struct.Struct("!h"), struct.Struct("!i"), struct.Struct("!I")
PROTOCOL_3_0 = 3 << 16


def message(kind: bytes, body: bytes = b"") -> bytes:
    """A frontend message: type byte, int32 length counting itself, body."""
    return kind + _i32.pack(len(body) + 4) + body


def cstr(text: str | bytes) -> bytes:
    return (text.encode() if isinstance(text, str) else text) + b"\0"


def query(sql: str | bytes) -> bytes:
    return message(b"Q", cstr(sql))


SYNC = message(b"S")
TERMINATE = message(b"X")


class Silent(AssertionError):
    """The pooler neither answered nor closed the connection in time."""


class Raw:
    """A client on a bare socket: startup with trust authentication, then whole messages, every wait bounded."""

    def __init__(self, port: int | str, user: str = "app", database: str = "app",
                 timeout: float = RAW_TIMEOUT, login: bool = True):
        """port: the pooler's TCP port on 127.0.0.1, or the path of a unix socket (PostgreSQL's own)."""
        self.timeout = timeout
        if isinstance(port, str):
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(timeout)
            self.sock.connect(port)
        else:
            self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.eof = False
        self.greeting: list[tuple[int, bytes]] = []
        if login:
            self.login(user, database)

    def __enter__(self) -> "Raw":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def login(self, user: str, database: str) -> None:
        body = _i32.pack(PROTOCOL_3_0) + cstr("user") + cstr(user) + cstr("database") + cstr(database) + b"\0"
        self.send(_i32.pack(len(body) + 4) + body)
        messages, closed = self.reply()
        assert not closed and messages[-1][0] == ord("Z"), \
            f"login failed: {describe(messages)}{', then the connection closed' if closed else ''}"
        auth = [p for t, p in messages if t == ord("R")]
        assert auth and _i32.unpack_from(auth[0])[0] == 0, "the pooler must use trust authentication here"
        self.greeting = messages

    def send(self, data: bytes) -> bool:
        """Send data; False when the pooler has already closed the connection."""
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False
        except socket.timeout:
            raise Silent(f"the pooler took no input for {self.timeout} s") from None

    def read(self) -> tuple[int, bytes] | None:
        """The next whole message, or None once the pooler has closed the connection."""
        while True:
            if len(self.buf) >= 5:
                end = 1 + _u32.unpack_from(self.buf, 1)[0]
                if len(self.buf) >= end:
                    item = (self.buf[0], bytes(self.buf[5:end]))
                    del self.buf[:end]
                    return item
            if self.eof:
                return None
            try:
                data = self.sock.recv(1 << 16)
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            except socket.timeout:
                raise Silent(f"the pooler neither answered nor closed the connection within "
                             f"{self.timeout} s") from None
            if not data:
                self.eof = True
            self.buf += data

    def reply(self) -> tuple[list[tuple[int, bytes]], bool]:
        """Messages up to ReadyForQuery or the close of the connection; (messages, closed)."""
        messages = []
        while True:
            item = self.read()
            if item is None:
                return messages, True
            messages.append(item)
            if item[0] == ord("Z"):
                return messages, False

    def until_closed(self) -> list[tuple[int, bytes]]:
        """Everything up to the close of the connection (bounded by the socket timeout)."""
        messages = []
        while (item := self.read()) is not None:
            messages.append(item)
        return messages

    def query(self, sql: str) -> tuple[list[tuple[int, bytes]], bool]:
        self.send(query(sql))
        return self.reply()


def error_fields(payload: bytes) -> dict[str, str]:
    fields, pos = {}, 0
    while pos < len(payload) and payload[pos]:
        end = payload.index(b"\0", pos + 1)
        fields[chr(payload[pos])] = payload[pos + 1:end].decode(errors="replace")
        pos = end + 1
    return fields


def errors(messages) -> list[dict[str, str]]:
    return [error_fields(p) for t, p in messages if t == ord("E")]


def data_rows(messages) -> list[list[str | None]]:
    rows = []
    for kind, payload in messages:
        if kind != ord("D"):
            continue
        count, pos, row = _i16.unpack_from(payload)[0], 2, []
        for _ in range(count):
            size = _i32.unpack_from(payload, pos)[0]
            pos += 4
            row.append(None if size < 0 else payload[pos:pos + size].decode(errors="replace"))
            pos += max(size, 0)
        rows.append(row)
    return rows


def describe(messages) -> str:
    """A short account of what came back, for assertion messages."""
    parts = []
    for kind, payload in messages:
        if kind == ord("E"):
            f = error_fields(payload)
            parts.append(f"Error({f.get('V')} {f.get('C')} {f.get('M')!r})")
        else:
            parts.append(chr(kind))
    return " ".join(parts) or "nothing"


# ================================================================ helpers

class Call:
    """A blocking call in a daemon thread, so that a test can bound the wait for it."""

    def __init__(self, fn, *args):
        self.result = self.error = None
        self.done_at: float | None = None
        self.done = threading.Event()
        threading.Thread(target=self._run, args=(fn, *args), daemon=True).start()

    def _run(self, fn, *args) -> None:
        try:
            self.result = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - reported by get()
            self.error = exc
        self.done_at = time.monotonic()
        self.done.set()

    def get(self, timeout: float, what: str):
        if not self.done.wait(timeout):
            raise AssertionError(f"{what}: no answer within {timeout:.0f} s")
        if self.error is not None:
            raise AssertionError(f"{what} failed: {self.error!r}") from self.error
        return self.result


def answered_within(conn: psycopg.Connection, sql: str, bound: float = ANSWER_BOUND):
    """Run sql on conn; fail unless it is answered within bound seconds."""
    call = Call(lambda: conn.execute(sql).fetchall())
    return call.get(bound, f"{sql!r} on another session of the backend")


def pooler_pids(pooler) -> set[int]:
    """The postmaster and all its children (listeners, backends)."""
    return {pooler.pid} | {p.pid for p in pooler.children()}


def assert_backend_unhurt(pooler, keeper: psycopg.Connection, pids: set[int], what: str) -> None:
    """The backend that served the misbehaving client still serves its other sessions, in the same processes."""
    try:
        rows = answered_within(keeper, "SELECT current_setting('myapp.keep', true), 1")
    except AssertionError as exc:
        alive = psutil.pid_exists(backend_pid(keeper))
        raise AssertionError(f"after {what}: {exc} (the pooled backend process "
                             f"{'is still running' if alive else 'has died'})") from None
    assert rows == [("kept", 1)], f"after {what}: the other session saw {rows}"
    with pooler.connect() as fresh:
        assert backend_pid(fresh) == backend_pid(keeper), f"after {what}: a new backend serves the pool"
        assert answered_within(fresh, "SELECT 2") == [(2,)]
    assert pooler_pids(pooler) == pids, f"after {what}: pooler processes changed: {pids} -> {pooler_pids(pooler)}"


def keeper_session(pooler, **params) -> psycopg.Connection:
    """A psycopg session with a setting of its own, to check after others misbehave."""
    conn = pooler.connect(**params)
    conn.execute("SET myapp.keep = 'kept'")
    return conn


def direct(cluster, dbname: str = "app") -> psycopg.Connection:
    """A connection straight to the cluster (its unix socket, trust) as the superuser."""
    return psycopg.connect(host=cluster.socket_dir, port=cluster.port, user="postgres",
                           dbname=dbname, autocommit=True)


def ensure_role(cluster, name: str, attributes: str = "", settings: dict | None = None) -> None:
    if cluster.psql(f"SELECT count(*) FROM pg_roles WHERE rolname = '{name}'") == "0":
        cluster.psql(f"CREATE ROLE {name} LOGIN {attributes}")
    for setting, value in (settings or {}).items():
        cluster.psql(f"ALTER ROLE {name} SET {setting} = '{value}'")


@pytest.fixture
def pool(start_pooler):
    """A pooler whose pools each have one backend with one shared server connection; trust logins."""
    return start_pooler(session_pool_size=1, auth_method="trust")


# ================================================================ 1. prepared set_config

@pytest.mark.parametrize("how", ["prepare=True", "auto-prepared"])
def test_prepared_set_config_stays_in_its_session(pool, how):
    """A set_config run as a prepared statement is seen by its own session only, with its latest value."""
    a, b = pool.connect(), pool.connect()
    assert server_pid(a) == server_pid(b)
    sql = "SELECT set_config('myapp.tenant', %s, false)"
    for i in range(10):
        value = f"tenant-{i}"
        if how == "prepare=True":
            got = a.execute(sql, (value,), prepare=True).fetchone()[0]
        else:
            got = a.execute(sql, (value,)).fetchone()[0]   # psycopg prepares it from the 6th run
        assert got == value
        seen_by_b = b.execute("SELECT current_setting('myapp.tenant', true)").fetchone()[0]
        assert seen_by_b in (None, ""), f"run {i}: another session saw {seen_by_b!r}"
        own = a.execute("SELECT current_setting('myapp.tenant', true)").fetchone()[0]
        assert own == value, f"run {i}: the session read back {own!r}, not its latest {value!r}"
    assert server_pid(a) == server_pid(b)


def test_a_prepared_set_bound_in_a_later_round_trip_stays_in_its_session(pool):
    """SET myapp.tenant prepared in one round trip (libpq's PQprepare) and run in a later one
    (PQexecPrepared) with another statement between: the SET tag came with no statement text in
    sight, the name was never read back, and the value stayed on the server connection for the
    next session, while the session itself lost it at its next switch.  (A session that moved to
    another backend between the two is the same case: its statements go with it.)"""
    a, b = pool.connect(), pool.connect()
    assert server_pid(a) == server_pid(b)
    a.pgconn.prepare(b"set_tenant", b"SET myapp.tenant = 'A'")
    a.execute("SELECT 1")
    result = a.pgconn.exec_prepared(b"set_tenant", [])
    assert result.status == psycopg.pq.ExecStatus.COMMAND_OK, result.error_message
    assert result.command_status == b"SET"
    seen = b.execute("SELECT current_setting('myapp.tenant', true)").fetchone()[0]
    assert seen in (None, ""), f"another session read {seen!r}"
    b.execute("SET myapp.tenant = 'B'")
    assert a.execute("SELECT current_setting('myapp.tenant', true)").fetchone()[0] == "A"
    assert b.execute("SELECT current_setting('myapp.tenant', true)").fetchone()[0] == "B"
    assert server_pid(a) == server_pid(b)


SPELLINGS = {   # every way PostgreSQL accepts to name a custom setting, and the name it means
    'SET "myapp.q1" = \'v1\'': "myapp.q1",
    'SET "MyApp"."Q2" TO \'v2\'': "myapp.q2",
    "SET myapp . q3 = 'v3'": "myapp.q3",
    'SET SESSION "myapp.q4" = \'v4\'': "myapp.q4",
    "SELECT set_config(E'myapp.q5', 'v5', false)": "myapp.q5",
    "SELECT set_config($$myapp.q6$$, 'v6', false)": "myapp.q6",
    "SELECT pg_catalog.set_config( 'myapp.q7' , 'v7' , false)": "myapp.q7",
}


def test_custom_settings_however_spelled_stay_in_their_session(pool):
    """A tenant set with a quoted name, spaces around the dot, an E'' or dollar-quoted name is
    the session's own like any other: the next session on the connection does not read it (it
    did: only the plain spellings were recognised, so the others stayed on the connection), and
    the session that set it still has it after the other's turn."""
    a, b = pool.connect(), pool.connect()
    assert server_pid(a) == server_pid(b)
    for statement in SPELLINGS:
        a.execute(statement)
    for i, name in enumerate(SPELLINGS.values(), 1):
        assert b.execute("SELECT current_setting(%s, true)", (name,)).fetchone()[0] in (None, ""), name
        assert a.execute("SELECT current_setting(%s, true)", (name,)).fetchone()[0] == f"v{i}", name


def test_a_setting_beyond_ascii_in_another_client_encoding_survives_the_switch(pool):
    """A LATIN1 client's custom setting with an accented value: read back in the connection's
    encoding and restored as Unicode escapes, it is the session's own after another session's turn
    (it was read as UTF-8, and the session was ended with FATAL at its next switch)."""
    a = pool.connect(client_encoding="LATIN1")
    b = pool.connect()   # UTF8
    assert server_pid(a) == server_pid(b)
    a.execute("SET myapp.word = 'né'")
    b.execute("SET myapp.word = 'über'")
    assert b.execute("SHOW myapp.word").fetchone()[0] == "über"
    assert a.execute("SHOW myapp.word").fetchone()[0] == "né"
    assert b.execute("SHOW myapp.word").fetchone()[0] == "über"
    assert a.execute("SHOW client_encoding").fetchone()[0] == "LATIN1"
    assert b.execute("SHOW client_encoding").fetchone()[0] == "UTF8"


def test_a_setting_named_by_a_parameter_does_not_reach_the_next_session(pool):
    """set_config($1, $2, false): which setting it changes is not in the text.  The next
    session must not read it; the session that set it loses it at its next switch (README,
    Known limits), which is the price of not knowing its name.  Not before: it lost it as soon
    as the pooler had read its settings back, before its next statement unless that came at
    once (a flaky failure of this test found that)."""
    a, b = pool.connect(), pool.connect()
    assert server_pid(a) == server_pid(b)
    a.execute("SELECT set_config(%s, %s, false)", ("myapp.by_param", "secret"))
    a.execute("SELECT 1")   # (the read-back is over by its end)
    assert a.execute("SELECT current_setting('myapp.by_param', true)").fetchone() == ("secret",)
    assert b.execute("SELECT current_setting('myapp.by_param', true)").fetchone()[0] in (None, "")


# ================================================================ 2. malformed messages

# Each malformed message is followed by a Sync, as a client would send it (PostgreSQL
# answers an extended-protocol error only then); a Query needs none.  PostgreSQL
# itself answers each with an ERROR (08P01, or 22021 for the bad encoding) and
# carries on; the pooler may instead say 08P01 and close the connection.
PARSE_S1 = message(b"P", b"s1\0SELECT 1\0\0\0")
MALFORMED = {
    "Parse whose name has no NUL": message(b"P", b"stmt") + SYNC,
    "Parse whose query has no NUL": message(b"P", b"s1\0SELECT 1") + SYNC,
    "Bind truncated after the portal name": message(b"B", b"\0") + SYNC,
    "Bind truncated inside the statement name": message(b"B", b"\0s1") + SYNC,
    "Bind truncated before its parameter count": PARSE_S1 + message(b"B", b"\0s1\0\0") + SYNC,
    "Describe with an empty body": message(b"D") + SYNC,
    "Close with an empty body": message(b"C") + SYNC,
    "Describe with an invalid kind": message(b"D", b"Xs1\0") + SYNC,
    "Describe of a statement name without NUL": message(b"D", b"Ss1") + SYNC,
    "Close of a statement name without NUL": message(b"C", b"Ss1") + SYNC,
    "Execute truncated": message(b"E", b"\0\0") + SYNC,
    "Query without its NUL": message(b"Q", b"SELECT 1"),
    "Query with non-UTF-8 text": message(b"Q", b"SELECT '\xff\xfe\xc3'\0"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_message_ends_only_that_client(pool, case):
    """A client sending a malformed message gets an error (08P01) or is closed; the backend's other sessions carry on."""
    keeper = keeper_session(pool)
    pids = pooler_pids(pool)
    with Raw(pool.port) as raw:
        raw.send(MALFORMED[case])
        messages, closed = raw.reply()
        codes = [f.get("C") for f in errors(messages)]
        if case == "Query with non-UTF-8 text":
            assert codes or closed, f"{case}: neither an error nor a close: {describe(messages)}"
        else:
            assert "08P01" in codes or (closed and not codes), f"{case}: {describe(messages)}"
        if not closed:   # still connected: it goes on as with PostgreSQL
            messages, closed = raw.query("SELECT 'still here'")
            assert data_rows(messages) == [["still here"]] or closed, describe(messages)
    assert_backend_unhurt(pool, keeper, pids, case)


# ---------------------------------------------------------------- the storm

STORM_PER_TYPE = 2000
STORM_TYPES = [b"P", b"B", b"D", b"E", b"C", b"S", b"H", b"F", b"d", b"c", b"f", b"Q", b"X", b"?"]
STORM_ROLE = "core_storm"
# A bound against a hang, not a speed check: the pure-Python build sends the 28,000 messages
# in about 55 s on the development machine, and a busy host has made that more than 75.
STORM_DEADLINE = 120.0
KNOWN_TYPES = set(b"PBDECSHFdcfQX")


def valid_body(kind: bytes, int4abs: int) -> bytes:
    """A well-formed body for a frontend message of this type."""
    return {
        b"P": cstr("s1") + cstr("SELECT $1::int") + _i16.pack(1) + _i32.pack(23),
        b"B": cstr("") + cstr("s1") + _i16.pack(0) + _i16.pack(1) + _i32.pack(1) + b"5" + _i16.pack(0),
        b"D": b"S" + cstr("s1"),
        b"E": cstr("") + _i32.pack(0),
        b"C": b"S" + cstr("s1"),
        b"F": _i32.pack(int4abs) + _i16.pack(0) + _i16.pack(1) + _i32.pack(2) + b"-5" + _i16.pack(0),
        b"d": b"1\tone\n",
        b"f": cstr("client gave up"),
        b"Q": cstr("SELECT 1"),
    }.get(kind, b"")


def mutate(rng: random.Random, kind: bytes, body: bytes) -> tuple[bytes, bool]:
    """A malformed message made from a valid one; (bytes, framing intact)."""
    if kind == b"?":
        kind = bytes([rng.choice([c for c in range(1, 256) if c not in KNOWN_TYPES])])
    roll = rng.random()
    if roll < 0.25 and body:
        new = body[:rng.randrange(len(body))]                       # truncated
    elif roll < 0.45:
        new = rng.randbytes(rng.randrange(0, 40))                    # random bytes
    elif roll < 0.65 and body:
        new = bytearray(body)                                        # a few bytes changed
        for _ in range(rng.randint(1, 3)):
            new[rng.randrange(len(new))] = rng.randrange(256)
        new = bytes(new)
    elif roll < 0.80:
        new = body + rng.randbytes(rng.randint(1, 12))               # trailing garbage
    elif roll < 0.88:
        length = rng.choice([0, 1, 2, 3, -1, -4, -(1 << 31)])       # a length below 4
        return kind + _i32.pack(length) + body, False
    elif roll < 0.96:
        extra = rng.choice([1, 7, 100, 1 << 20, (1 << 31) - 1])      # longer than what follows
        return kind + _i32.pack(min(len(body) + 4 + extra, (1 << 31) - 1)) + body, False
    else:
        cut = rng.randint(1, max(1, len(body)))                      # shorter than what follows
        return kind + _i32.pack(max(4, len(body) + 4 - cut)) + body, False
    return message(kind, new), True


def storm(port: int, items: list[tuple[bytes, bool]], counts: dict, deadline: float) -> None:
    """Send the malformed messages, reconnecting whenever the pooler closes the connection.

    counts["last"] is the message this worker sent last, for the report of a failure.
    """
    raw = None
    marker = 0
    try:
        for data, framed in items:
            if time.monotonic() > deadline:
                raise AssertionError(f"the storm did not finish in {STORM_DEADLINE:.0f} s "
                                     f"({counts['messages']} messages sent)")
            try:
                if raw is None:
                    raw = Raw(port, user=STORM_ROLE, timeout=8.0)
                    counts["connections"] += 1
                counts["messages"] += 1
                counts["last"] = (data, framed)
                if framed:
                    # Sync ends an extended-protocol error; the marker query shows we are through.
                    marker += 1
                    tag = f"mark-{marker}"
                    if not raw.send(data + SYNC + query(f"SELECT '{tag}'")):
                        raw.eof = True          # closed already: reconnect
                    while not raw.eof and (item := raw.read()) is not None:
                        if item[0] == ord("D") and item[1].endswith(tag.encode()):
                            raw.reply()
                            break
                    if raw.eof:
                        raw.close()
                        raw = None
                else:
                    # Framing is lost: send it, end our side, and the pooler must close.
                    raw.send(data)
                    try:
                        raw.sock.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    raw.until_closed()
                    raw.close()
                    raw = None
            except AssertionError as exc:   # Silent, or a failed login
                raise AssertionError(f"{exc}\n  last messages of the workers: {_lasts(counts)}") from None
    finally:
        if raw is not None:
            raw.close()


def _lasts(counts: dict) -> str:
    return "; ".join(f"{data[:48]!r} (framing {'intact' if framed else 'broken'})"
                     for data, framed in (c["last"] for c in counts["all"] if c.get("last")))


@pytest.mark.timeout(200)
def test_storm_of_malformed_messages_leaves_the_backend_serving(start_pooler, cluster):
    """After thousands of malformed messages of every type, the backend's other sessions and processes are as before."""
    ensure_role(cluster, STORM_ROLE, settings={"statement_timeout": "2s"})
    int4abs = int(cluster.psql("SELECT 'int4abs'::regproc::oid"))
    pooler = start_pooler(session_pool_size=1, auth_method="trust")
    keeper = keeper_session(pooler, user=STORM_ROLE)
    assert keeper.execute("SELECT %s::int + 1", (1,), prepare=True).fetchone() == (2,)
    pids = pooler_pids(pooler)

    rng = random.Random(20240607)
    items = []
    for kind in STORM_TYPES:
        body = valid_body(kind, int4abs)
        items += [mutate(rng, kind, body) for _ in range(STORM_PER_TYPE)]
    rng.shuffle(items)
    workers = 3
    counts = [{"messages": 0, "connections": 0} for _ in range(workers)]
    for c in counts:
        c["all"] = counts   # each worker reports what all of them sent last
    deadline = time.monotonic() + STORM_DEADLINE
    calls = [Call(storm, pooler.port, items[i::workers], counts[i], deadline) for i in range(workers)]
    started = time.monotonic()
    for call in calls:
        call.get(STORM_DEADLINE + 20, "a storm worker")
    elapsed = time.monotonic() - started
    sent = sum(c["messages"] for c in counts)
    assert sent == len(items)
    print(f"storm: {sent} messages over {sum(c['connections'] for c in counts)} connections in {elapsed:.1f} s")

    assert pooler_pids(pooler) == pids, "a pooler process died or was replaced during the storm"
    assert answered_within(keeper, "SHOW myapp.keep") == [("kept",)]
    assert keeper.execute("SELECT %s::int + 1", (41,), prepare=True).fetchone() == (42,)
    with pooler.connect(user=STORM_ROLE) as fresh:
        assert backend_pid(fresh) == backend_pid(keeper)
        assert answered_within(fresh, "SELECT current_setting('myapp.keep', true)") in ([(None,)], [("",)])
    assert pooler_pids(pooler) == pids


# ================================================================ 3. notifications

def _collect(conn: psycopg.Connection, n: int, timeout: float) -> list[str]:
    return [note.payload for note in conn.notifies(timeout=timeout, stop_after=n)]


@pytest.mark.parametrize("then", [None, "SET x.y = 1", "SELECT set_config('x.y', '1', false)"])
def test_notifications_right_after_listen_are_all_delivered(pool, cluster, then):
    """Every notification sent after LISTEN returns reaches the listening session (five rounds, new sessions)."""
    other = pool.connect()   # another session of the same backend, whose query runs in between
    with direct(cluster) as notifier:
        for round_ in range(5):
            channel = f"ch_{round_}"
            with pool.connect() as a:
                a.execute(f"LISTEN {channel}")
                for i in range(10):
                    notifier.execute(f"NOTIFY {channel}, 'n{i}'")
                    if i == 2 and then:
                        a.execute(then)
                other.execute("SELECT 1")
                got = _collect(a, 10, timeout=5)
            assert got == [f"n{i}" for i in range(10)], f"round {round_}: received {got}"


def test_notifications_during_a_stream_after_listen_are_all_delivered(pool, cluster):
    """Notifications committed after LISTEN arrive, every one, in order, while they keep coming."""
    a = pool.connect()
    stop = threading.Event()
    sent: list[int] = []

    def notify() -> None:
        with direct(cluster) as notifier:
            for i in range(5000):
                if stop.is_set():
                    return
                notifier.execute(f"NOTIFY ch2, '{i}'")
                sent.append(i)

    call = Call(notify)
    wait_for(lambda: len(sent) >= 20, "the notifier to start", timeout=WAIT)
    a.execute("LISTEN ch2")
    after = len(sent)            # every NOTIFY that starts from here commits after LISTEN
    a.execute("SELECT set_config('x.y', '2', false)")
    wait_for(lambda: len(sent) >= after + 50, "50 more notifications", timeout=WAIT)
    stop.set()
    call.get(WAIT, "the notifier")
    last = sent[-1]
    got: list[int] = []
    for note in a.notifies(timeout=10):   # bounded: 10 s in all
        got.append(int(note.payload))
        if got[-1] == last:
            break
    assert got, "no notification arrived"
    first = got[0]
    # NOTIFY number `after` may have been in flight as LISTEN returned; every later one began after it.
    assert first <= after + 1, f"the first notification received was {first}, sent after LISTEN ({after})"
    missing = sorted(set(range(first, last + 1)) - set(got))
    assert not missing, f"{len(missing)} notifications lost, e.g. {missing[:10]}"
    assert got == sorted(got)


# ================================================================ 4. restore order

def test_superuser_setting_then_session_authorization_is_restored(pool, cluster):
    """A superuser session that sets a superuser-only setting and then drops privileges keeps both, as direct."""
    ensure_role(cluster, "core_su", "SUPERUSER")
    a, b = pool.connect(user="core_su"), pool.connect(user="core_su")
    assert server_pid(a) == server_pid(b)
    a.execute("SET session_replication_role = replica")
    b.execute("SELECT 1")
    a.execute("SET SESSION AUTHORIZATION app")
    for _ in range(3):
        assert b.execute("SHOW session_replication_role").fetchone() == ("origin",)
        assert b.execute("SELECT session_user, current_user").fetchone() == ("core_su", "core_su")
        assert a.execute("SHOW session_replication_role").fetchone() == ("replica",)
        assert a.execute("SELECT session_user, current_user").fetchone() == ("app", "app")
    with pool.connect(user="core_su") as c:
        assert c.execute("SHOW session_replication_role").fetchone() == ("origin",)


# ================================================================ 5. placeholder removal

def test_placeholder_removed_by_loading_its_extension_breaks_nobody(pool):
    """A custom setting that loading plpgsql removes does not make the pool's later logins or sessions fail."""
    existing = pool.connect()
    a = pool.connect()
    assert server_pid(a) == server_pid(existing)
    a.execute("SET plpgsql.my_option = 'x'")
    a.execute("DO $$BEGIN END$$")          # first load of plpgsql on this server connection
    assert a.execute("SELECT 1").fetchone() == (1,)
    a.close()
    assert existing.execute("SELECT 'existing'").fetchone() == ("existing",)
    for i in range(3):
        with pool.connect() as c:
            assert c.execute(f"SELECT {i}").fetchone() == (i,)
    assert existing.execute("SELECT 'existing again'").fetchone() == ("existing again",)
    assert "FATAL" not in pool.log()


def test_a_placeholder_whose_prefix_another_session_reserved_is_removed_as_postgresql_does(pool):
    """Session a sets plpgsql.tenant_x while plpgsql is not loaded on the shared server connection,
    then session b loads plpgsql there.  PostgreSQL removes a placeholder whose prefix a library
    reserves, with a WARNING, and the session goes on; through the pooler a's next turn on that
    connection does the same (it used to end with FATAL): the WARNING, the placeholder gone,
    everything else a set kept; b untouched, and told nothing of a's setting (the server's own
    WARNING about it came during b's statement)."""
    a, b = pool.connect(), pool.connect()
    assert server_pid(a) == server_pid(b)
    a.execute("SET work_mem = '7MB'")
    a.execute("SET plpgsql.tenant_x = 'a'")
    seen_by_b = []
    b.add_notice_handler(lambda d: seen_by_b.append(d.message_primary))
    b.execute("DO $$BEGIN END$$")          # loads plpgsql on the shared server process
    # The server removed a's placeholder with a WARNING during b's statement: not b's to see.
    assert seen_by_b == []
    notices = []
    a.add_notice_handler(lambda d: notices.append((d.severity_nonlocalized, d.sqlstate, d.message_primary)))
    assert a.execute("SELECT current_setting('plpgsql.tenant_x', true), current_setting('work_mem')"
                     ).fetchone() == (None, "7MB")
    assert notices == [("WARNING", "42602", 'invalid configuration parameter name "plpgsql.tenant_x", removing it')]
    assert a.execute("SHOW work_mem").fetchone() == ("7MB",)
    assert b.execute("SELECT current_setting('work_mem')").fetchone() != ("7MB",)
    a.execute("DO $$BEGIN END$$")
    with pytest.raises(psycopg.errors.InvalidName):   # as in a session that loaded plpgsql itself
        a.execute("SET plpgsql.tenant_x = 'again'")
    assert a.execute("SELECT 1").fetchone() == (1,)
    assert "FATAL" not in pool.log()
    assert "refused its setting plpgsql.tenant_x" in pool.log()


@pytest.mark.parametrize("timeout", ["statement_timeout", "lock_timeout"])
def test_a_restore_is_not_cut_short_by_the_previous_owners_statement_timeout(pool, cluster, timeout):
    """Session a sets statement_timeout (or lock_timeout) = '50ms'; session b, whose default_tablespace the pooler
    must restore when b's turn comes, follows it on the one server connection.  Checking a
    tablespace name takes a lock on pg_tablespace, held here by another connection for 200 ms:
    the restore runs in a's settings, and a's timeout is for a's statements, not for the
    pooler's restore of b (it used to be cancelled, and b restored only after a reset, with a
    WARNING in the log).  Both sessions keep their settings."""
    a, b = pool.connect(), pool.connect()
    assert server_pid(a) == server_pid(b)
    b.execute("SET default_tablespace = 'pg_default'")
    a.execute(f"SET {timeout} = '50ms'")   # the connection is in a's settings now
    with direct(cluster) as locker:
        locker.execute("BEGIN")
        locker.execute("LOCK TABLE pg_catalog.pg_tablespace IN ACCESS EXCLUSIVE MODE")
        call = Call(lambda: b.execute("SHOW default_tablespace").fetchall())
        wait_for(lambda: locker.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = 'app'"
        ).fetchone()[0] == 1, "b's restore to wait for the lock")
        locker.execute("SELECT pg_sleep(0.2)")         # the lock outlives a's 50 ms
        locker.execute("COMMIT")
    assert call.get(ANSWER_BOUND, "b's query") == [("pg_default",)]
    assert b.execute(f"SHOW {timeout}").fetchone() == ("0",)
    assert a.execute(f"SHOW {timeout}").fetchone() == ("50ms",)
    assert "restored after a reset" not in pool.log() and "could not restore" not in pool.log()


# ================================================================ 6. a large result left unread

UNREAD = {
    "close": "SELECT /*core-unread*/ repeat('x', 1000) FROM generate_series(1, 50000)",
    "terminate": "SELECT /*core-unread*/ repeat('x', 1000) FROM generate_series(1, 50000)",
    "copy out": "COPY (SELECT /*core-unread*/ repeat('x', 1000) FROM generate_series(1, 50000)) TO STDOUT",
}


@pytest.mark.parametrize("variant", list(UNREAD))
def test_client_leaving_a_large_result_unread_frees_the_backend_at_once(pool, cluster, variant):
    """When a client leaves ~50 MB of result unread, another session's query is answered within a second."""
    b = pool.connect()
    pids = pooler_pids(pool)
    with Raw(pool.port) as raw:
        raw.send(query(UNREAD[variant]))
        first = raw.read()
        assert first is not None and first[0] in (ord("T"), ord("H")), describe([first] if first else [])

        def streaming() -> bool:
            """The server is blocked writing to the pooler, or done: nothing more comes by itself."""
            return cluster.psql("SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                                "AND query LIKE '%/*core-unread*/%' AND state = 'active' "
                                "AND wait_event IS DISTINCT FROM 'ClientWrite'") == "0"

        wait_for(streaming, "the server to block on the unread result", timeout=WAIT)
        call = Call(lambda: b.execute("SELECT 1").fetchall())   # queued behind the raw client
        if variant == "terminate":
            raw.send(TERMINATE)
    closed_at = time.monotonic()
    assert call.get(10.0, "SELECT 1 of another session") == [(1,)]
    elapsed = call.done_at - closed_at
    assert elapsed < 1.0, f"the other session waited {elapsed:.2f} s after the client left"
    assert pooler_pids(pool) == pids


# ================================================================ 7. Flush with a body

def _title(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def test_flush_with_a_body_ends_only_that_client(pool):
    """A Flush with a body earns its sender 08P01 (or a close); another session's query is answered, unharmed."""
    keeper = keeper_session(pool)
    pids = pooler_pids(pool)
    proc = psutil.Process(backend_pid(keeper))
    with Raw(pool.port) as raw:
        raw.send(message(b"H", b"12345"))   # PostgreSQL says nothing until the Sync
        call = Call(lambda: keeper.execute("SELECT current_setting('myapp.keep', true), 1").fetchall())
        # Let the keeper's query be answered or queued behind the unsynced client (the
        # backend's title counts waiting sessions); the Sync below ends the wait either way.
        try:
            wait_for(lambda: call.done.is_set() or " 1 waiting" in _title(proc),
                     "the other session's query to be answered or queued", timeout=2)
        except AssertionError:
            pass
        raw.send(SYNC)
        assert call.get(ANSWER_BOUND, "the other session's query") == [("kept", 1)]
        messages, closed = raw.reply()
        assert "08P01" in [f.get("C") for f in errors(messages)] or closed, describe(messages)
    assert_backend_unhurt(pool, keeper, pids, "a Flush with a body")


@pytest.mark.parametrize("sync_in_copy", [False, True])
def test_libpq_extended_copy_from_stdin_leaves_the_backend_serving(pool, cluster, sync_in_copy):
    """COPY FROM STDIN as libpq's PQexecParams sends it (Parse, Bind, Describe, Execute, Sync; the
    rows, CopyDone, Sync), and with a Sync among the rows: PostgreSQL ignores a Sync in copy-in mode
    and answers the whole with one ReadyForQuery. The pooler awaited a ReadyForQuery for every Sync,
    so the connection never reached a boundary: every other session of the backend waited until
    query_wait_timeout, and went on waiting after the client left."""
    keeper = keeper_session(pool)
    pids = pooler_pids(pool)
    with Raw(pool.port) as raw:
        raw.send(message(b"P", b"\0COPY items FROM STDIN\0\0\0") + message(b"B", b"\0\0\0\0\0\0\0\0")
                 + message(b"D", b"P\0") + message(b"E", b"\0\0\0\0\0") + SYNC)
        _copy_began(raw)
        rows = message(b"d", b"30000001\tone\n") + (SYNC if sync_in_copy else b"")
        raw.send(rows + message(b"d", b"30000002\ttwo\n") + message(b"c") + SYNC)
        messages, closed = raw.reply()
        assert not closed and not errors(messages), describe(messages)
        assert [p for t, p in messages if t == ord("C")] == [b"COPY 2\0"]
        assert [t for t, _p in messages].count(ord("Z")) == 1
        assert answered_within(keeper, "SELECT count(*) FROM items WHERE id > 30000000") == [(2,)]
        messages, closed = raw.query("SELECT 'again'")
        assert not closed and data_rows(messages) == [["again"]]
    assert_backend_unhurt(pool, keeper, pids, "an extended-protocol COPY FROM STDIN")
    with direct(cluster) as conn:
        conn.execute("DELETE FROM items WHERE id > 30000000")


@pytest.mark.parametrize("sent", ["Execute, Sync", "Execute, CopyDone"])
def test_a_client_gone_before_its_copy_began_leaves_the_backend_serving(pool, sent):
    """A client sends a COPY FROM STDIN by Execute and leaves at once, before the server's
    CopyInResponse: the server then waits for rows nobody will send (or for a Sync after the
    CopyDone). The pooler fails the COPY (and syncs) itself, and the backend serves the others."""
    keeper = keeper_session(pool)
    pids = pooler_pids(pool)
    tail = SYNC if sent == "Execute, Sync" else message(b"c")
    with Raw(pool.port) as raw:
        raw.send(message(b"P", b"\0COPY items FROM STDIN\0\0\0") + message(b"B", b"\0\0\0\0\0\0\0\0")
                 + message(b"E", b"\0\0\0\0\0") + tail)
    assert_backend_unhurt(pool, keeper, pids, f"a client gone before its COPY began ({sent})")


def _copy_began(raw: Raw) -> None:
    """Read up to the CopyInResponse of an extended-protocol COPY FROM STDIN."""
    kinds = []
    while not kinds or kinds[-1] not in (ord("G"), ord("E"), ord("Z")):
        item = raw.read()
        assert item is not None, "the connection closed"
        kinds.append(item[0])
    assert kinds[-1] == ord("G"), f"message types {bytes(kinds)!r}"


EXTENDED_COPY = (message(b"P", b"\0COPY items FROM STDIN\0\0\0") + message(b"B", b"\0\0\0\0\0\0\0\0")
                 + message(b"E", b"\0\0\0\0\0") + SYNC)


def test_a_sync_after_a_failing_copy_row_gets_no_answer_meant_for_another_session(pool, cluster):
    """A client in an extended-protocol COPY FROM STDIN sends a row that fails the COPY, then a
    Sync among its rows. PostgreSQL answers that Sync (the COPY is over), where it ignores one
    while the COPY runs; the pooler does not pass it on, so no second ReadyForQuery can reach the
    session the connection serves next (a hostile client could otherwise have read another's rows).
    The client gets the error and one ReadyForQuery for its final Sync; nothing is copied; every
    session goes on, the other first."""
    keeper = keeper_session(pool)
    pids = pooler_pids(pool)
    with Raw(pool.port) as raw:
        raw.send(EXTENDED_COPY)
        _copy_began(raw)
        # The other session's query waits for the connection, to be served the moment it is free.
        waiting = Call(lambda: keeper.execute("SELECT current_setting('myapp.keep'), "
                                              "(SELECT count(*) FROM items WHERE id > 30000010)").fetchall())
        proc = psutil.Process(backend_pid(keeper))
        wait_for(lambda: " 1 waiting" in _title(proc), "the other session waiting for the connection")
        raw.send(message(b"d", b"not a number\tone\n") + SYNC
                 + message(b"d", b"30000011\ttwo\n") + message(b"c") + SYNC)
        messages, closed = raw.reply()
        assert not closed, describe(messages)
        assert [e["C"] for e in errors(messages)] == ["22P02"], describe(messages)
        assert waiting.get(ANSWER_BOUND, "the waiting session's query") == [("kept", 0)]
        messages, closed = raw.query("SELECT 'mine'")
        assert not closed and data_rows(messages) == [["mine"]], describe(messages)
        assert [t for t, _p in messages].count(ord("Z")) == 1, describe(messages)
    assert_backend_unhurt(pool, keeper, pids, "a Sync after a row that failed the COPY")


def test_a_sync_among_rows_sent_before_the_copy_began_ends_only_that_client(pool, cluster):
    """Rows sent right after a COPY's Execute, before the server said the COPY began, then a Sync
    among them: whether PostgreSQL will ignore that Sync or answer it cannot be told, so the pooler
    refuses the stream with 08P01 and ends that session. Nothing it sent is copied, and the
    backend serves the others."""
    keeper = keeper_session(pool)
    pids = pooler_pids(pool)
    with Raw(pool.port) as raw:
        raw.send(EXTENDED_COPY + message(b"d", b"30000021\tone\n") + SYNC
                 + message(b"d", b"30000022\ttwo\n") + message(b"c") + SYNC)
        messages = raw.until_closed()
    fatal = [e for e in errors(messages) if e.get("V") == "FATAL"]
    assert [e["C"] for e in fatal] == ["08P01"], describe(messages)
    assert "Sync between CopyData" in fatal[0]["M"], fatal[0]
    assert answered_within(keeper, "SELECT count(*) FROM items WHERE id > 30000020") == [(0,)]
    assert_backend_unhurt(pool, keeper, pids, "a Sync among rows sent before the COPY began")


def test_a_prepared_set_closed_in_the_round_trip_that_runs_it_stays_in_its_session(pool):
    """Bind, Execute and Close of a prepared SET in one round trip: the Close took the statement,
    and with it the text that names the setting, before the read-back looked for it, so the value
    stayed on the shared connection for the next session and the session itself lost it."""
    a, b = pool.connect(), pool.connect()
    assert server_pid(a) == server_pid(b)
    with Raw(pool.port) as raw:
        raw.send(message(b"P", b"set_tenant\0SET myapp.tenant = 'A'\0\0\0") + SYNC)
        messages, closed = raw.reply()
        assert not closed and not errors(messages), describe(messages)
        messages, closed = raw.query("SELECT 1")   # a round trip between: its text is not the SET's
        assert not closed and data_rows(messages) == [["1"]], describe(messages)
        raw.send(message(b"B", b"\0set_tenant\0\0\0\0\0\0\0") + message(b"E", b"\0\0\0\0\0")
                 + message(b"C", b"Sset_tenant\0") + SYNC)
        messages, closed = raw.reply()
        assert not closed and not errors(messages), describe(messages)
        assert [p for t, p in messages if t == ord("C")] == [b"SET\0"], describe(messages)
        seen = b.execute("SELECT current_setting('myapp.tenant', true)").fetchone()[0]
        assert seen in (None, ""), f"another session read {seen!r}"
        b.execute("SET myapp.tenant = 'B'")
        messages, closed = raw.query("SELECT current_setting('myapp.tenant', true)")
        assert not closed and data_rows(messages) == [["A"]], describe(messages)
    assert b.execute("SELECT current_setting('myapp.tenant', true)").fetchone()[0] == "B"


@pytest.mark.parametrize("then", ["completes it", "vanishes"])
def test_a_stray_copydata_half_sent_keeps_the_connection_until_it_is_whole(pool, then):
    """A CopyData outside COPY (PostgreSQL reads and ignores it) whose header has come and whose
    body has not: the server is in the middle of reading it, so the connection must not go to
    another session yet, or that session's query is read as the rest of it (found by a chaos
    run: PostgreSQL said FATAL "invalid frontend message type" and an innocent session lost its
    connection).  The other session's query waits until the message is whole (or, the client
    gone, filled in), then runs on the same server process, unharmed."""
    keeper = keeper_session(pool)
    pids = pooler_pids(pool)
    server = server_pid(keeper)
    proc = psutil.Process(backend_pid(keeper))
    with Raw(pool.port) as raw:
        # The query makes the session the connection's owner, so the CopyData behind it is passed
        # on as it comes (an idle session's message waits in the pooler until it is whole).
        raw.send(query("SELECT 1") + b"d" + _i32.pack(4 + 6) + b"ab")   # 4 of its 6 bytes to come
        messages, closed = raw.reply()
        assert not closed and messages[-1][0] == ord("Z"), describe(messages)
        call = Call(lambda: keeper.execute("SELECT current_setting('myapp.keep', true), 1").fetchall())
        wait_for(lambda: " 1 waiting" in _title(proc), "the other session's query to queue", timeout=ANSWER_BOUND)
        assert not call.done.is_set()
        if then == "completes it":
            raw.send(b"cdef")   # whole now, and nothing answers it: the connection goes on at once
            assert call.get(ANSWER_BOUND, "the other session's query") == [("kept", 1)]
            raw.send(SYNC)
            messages, closed = raw.reply()
            assert not closed and messages[-1][0] == ord("Z"), describe(messages)
        else:
            raw.close()
            assert call.get(ANSWER_BOUND, "the other session's query") == [("kept", 1)]
    assert server_pid(keeper) == server
    assert_backend_unhurt(pool, keeper, pids, "a half-sent CopyData")
    assert "lost server connection" not in pool.log()


@pytest.mark.parametrize("where", ["outside a transaction", "in a transaction"])
def test_a_client_stopped_in_the_middle_of_a_message_is_ended_after_the_idle_timeout(start_pooler, cluster, where):
    """A client that sent the first bytes of a query and then nothing holds the shared server
    connection (the server is reading that message).  With idle_in_transaction_session_timeout
    set, it is ended once nothing has come for that long: 25P03 in a transaction, as PostgreSQL
    ends a backend waiting there for the rest of a message, 57P05 outside one.  Its transaction
    is rolled back, the session queued behind it is served on the same server process, and no
    process of the pooler changes."""
    pool = start_pooler(session_pool_size=1, auth_method="trust", idle_in_transaction_session_timeout="1s")
    keeper = keeper_session(pool)
    pids = pooler_pids(pool)
    server = server_pid(keeper)
    proc = psutil.Process(backend_pid(keeper))
    first = ("BEGIN; INSERT INTO items VALUES (535353, 'rolled back')" if where == "in a transaction"
             else "SELECT 1")
    with Raw(pool.port) as raw:
        # The first query makes the session the connection's owner; the second comes in part.
        stopped = time.monotonic()
        raw.send(query(first) + b"Q" + _i32.pack(4 + 100) + b"SELECT 'half")
        messages, closed = raw.reply()
        assert not closed and messages[-1][0] == ord("Z"), describe(messages)
        call = Call(lambda: keeper.execute("SELECT current_setting('myapp.keep', true), 1").fetchall())
        wait_for(lambda: " 1 waiting" in _title(proc), "the other session's query to queue", timeout=ANSWER_BOUND)
        # The check runs once a second: the timeout fires between 1 and 2 s after the last byte.
        assert call.get(1.0 + 1.0 + ANSWER_BOUND, "the other session's query") == [("kept", 1)]
        assert call.done_at - stopped >= 1.0, "the client was ended before its timeout"
        ended = errors(raw.until_closed())
    expected = "25P03" if where == "in a transaction" else "57P05"
    assert [(f.get("V"), f.get("C")) for f in ended] == [("FATAL", expected)], ended
    assert "idle_in_transaction_session_timeout" in ended[0].get("D", "")
    assert cluster.psql("SELECT count(*) FROM items WHERE id = 535353", database="app") == "0"
    assert server_pid(keeper) == server   # the message was filled in and refused: the connection lives
    assert_backend_unhurt(pool, keeper, pids, "a client stopped in the middle of a message")
    assert "stopped in the middle of a message" in pool.log()


@pytest.mark.parametrize("where", ["outside a transaction", "in a transaction"])
def test_time_the_server_spends_not_reading_does_not_count_as_a_stopped_client(start_pooler, cluster, where):
    """The mid-message timeout is for a client that stopped sending, not for one the pooler
    stopped reading because the server does not read: a COPY waiting for a lock another
    connection holds takes none of its data, the pooler's buffer towards the server fills and it
    pauses the client in the middle of a 4 MB CopyData.  That client is not ended, however long
    past idle_in_transaction_session_timeout the lock is held, and once the lock is released its
    COPY takes every row."""
    pool = start_pooler(session_pool_size=1, auth_method="trust", idle_in_transaction_session_timeout="1s")
    first_id = 20_000_000
    rows = b"".join(b"%d\t%s\n" % (first_id + i, b"x" * 90) for i in range(42_000))   # about 4 MB
    copy_data = b"d" + _i32.pack(4 + len(rows)) + rows
    cut = 3 * MB   # sent before the lock is released: more than the server side's buffers take
    with direct(cluster) as blocker, Raw(pool.port) as raw:
        if where == "in a transaction":
            messages, closed = raw.query("BEGIN")
            assert not closed and not errors(messages), describe(messages)
        blocker.execute("BEGIN")
        blocker.execute("LOCK TABLE items IN SHARE MODE")   # COPY FROM needs ROW EXCLUSIVE
        raw.send(query("COPY items FROM STDIN"))
        sender = Call(raw.sock.sendall, copy_data[:cut])   # blocks while nobody reads: a thread
        wait_for(lambda: cluster.psql("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                      "AND query = 'COPY items FROM STDIN'", database="app") == "1",
                 "the COPY to wait for the lock", timeout=ANSWER_BOUND)
        # What is asserted is that nothing happens: no signal marks it, so the wait is the span in
        # which the timeout (1 s, checked once a second) would have ended the client, and more.
        time.sleep(3.5)
        readable, _, _ = select.select([raw.sock], [], [], 0)   # (the sender thread has the socket too)
        early = (raw.read() or "the connection closed") if readable else None
        assert early is None, f"the client was answered or closed while the server was not reading: {early!r}"
        blocker.execute("ROLLBACK")
        sender.get(RAW_TIMEOUT, "sending the first 3 MB")
        raw.send(copy_data[cut:] + message(b"c"))
        messages, closed = raw.reply()
        assert not closed and not errors(messages), describe(messages)
        tags = [p.rstrip(b"\0").decode() for t, p in messages if t == ord("C")]
        assert tags == ["COPY 42000"], describe(messages)
        messages, closed = raw.query(f"SELECT count(*) FROM items WHERE id >= {first_id}")
        assert not closed and data_rows(messages) == [["42000"]], describe(messages)
        if where == "outside a transaction":
            raw.query(f"DELETE FROM items WHERE id >= {first_id}")
    assert "stopped in the middle of a message" not in pool.log()


def _raw_backend_pid(raw: Raw) -> int:
    """The pooler process serving a raw client: the pid of its BackendKeyData."""
    return _i32.unpack_from([p for t, p in raw.greeting if t == ord("K")][0])[0]


@pytest.mark.parametrize("message", ["Query", "CopyData"])
def test_a_session_queued_behind_a_client_stopped_mid_message_moves_to_a_free_sibling(start_pooler, message):
    """The connection a client holds while it stopped in the middle of a message waits on that
    client (no timeout is set): a session queued behind it moves to the pool's other backend,
    whose connection is free, in less than a second (a newcomer behind a running statement
    would wait that long before moving; behind a stalled client it moves after
    session_migration_delay), and is served there, while the stopped client still holds the
    first connection; that client is answered once it sends the rest."""
    pool = start_pooler(session_pool_size=2, auth_method="trust", session_schedule="round-robin")
    keeper = pool.connect()
    sibling = pool.connect()
    assert backend_pid(sibling) != backend_pid(keeper)
    # The keeper runs nothing before it is queued: a session with no transaction of its own yet
    # moves away from a running statement only after 1 s, from a stalled client at once.
    with Raw(pool.port) as raw:
        assert _raw_backend_pid(raw) == backend_pid(keeper)   # round-robin: the third on the first
        text = b"SELECT 'half" + b"x" * 86 + b"'\0"
        if message == "Query":
            head, rest = query("SELECT 1") + b"Q" + _i32.pack(4 + len(text)) + text[:12], text[12:]
        else:   # a CopyData outside COPY: PostgreSQL reads it and says nothing
            head, rest = query("SELECT 1") + b"d" + _i32.pack(4 + 6) + b"ab", b"cdef" + SYNC
        raw.send(head)
        messages, closed = raw.reply()
        assert not closed and messages[-1][0] == ord("Z"), describe(messages)
        assert answered_within(keeper, "SELECT 1", bound=0.9) == [(1,)]
        assert server_pid(keeper) == server_pid(sibling)   # it moved
        raw.send(rest)
        messages, closed = raw.reply()
        assert not closed and messages[-1][0] == ord("Z"), describe(messages)
        if message == "Query":
            assert data_rows(messages) == [["half" + "x" * 86]]
        else:
            assert not errors(messages), describe(messages)
        messages, closed = raw.query("SELECT 2")
        assert not closed and data_rows(messages) == [["2"]], describe(messages)
    assert "lost server connection" not in pool.log()


@pytest.mark.parametrize("timeout", ["statement_timeout", "lock_timeout"])
def test_the_pin_check_is_not_cut_short_by_the_sessions_own_timeout(pool, cluster, timeout):
    """After a statement that may leave state on the server (here an advisory-lock function),
    the pooler asks the server whether the session holds any, in the session's settings.  Its
    reading of pg_class waits for a lock another connection holds for 200 ms, longer than the
    session's own 50 ms statement_timeout (or lock_timeout), which is for the session's
    statements, not the pooler's question: the check waits and finds nothing, so the session is
    not pinned and still shares the server connection (an unanswered check would pin it)."""
    a, b = pool.connect(), pool.connect()
    shared = server_pid(a)
    assert server_pid(b) == shared
    a.execute(f"SET {timeout} = '50ms'")
    unlock = "SELECT count(*) FROM (SELECT pg_advisory_unlock_all()) AS done"
    a.execute(unlock)   # once first, so that its own planning finds what it needs cached
    with direct(cluster) as locker:
        locker.execute("BEGIN")
        locker.execute("LOCK TABLE pg_catalog.pg_class IN ACCESS EXCLUSIVE MODE")
        assert answered_within(a, unlock) == [(1,)]   # needs no lock on pg_class; the check after it does
        wait_for(lambda: locker.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = 'app'"
        ).fetchone()[0] >= 1, "the pin check to wait for the lock on pg_class")
        locker.execute("SELECT pg_sleep(0.2)")         # the lock outlives the session's 50 ms
        locker.execute("COMMIT")
    assert server_pid(b) == shared
    assert server_pid(a) == shared, "the session was pinned to a server connection of its own"
    assert a.execute(f"SHOW {timeout}").fetchone() == ("50ms",)


# ================================================================ 8. memory and large messages

def _stream_query(port: int, size: int) -> list:
    """One Query message of size bytes, its header first, then the text in 1 MB pieces."""
    with Raw(port, timeout=60.0) as raw:
        head = b"SELECT 'big' -- "
        raw.send(b"Q" + _i32.pack(size + 4) + head)
        chunk = b"x" * MB
        left = size - len(head) - 1
        while left > 0:
            piece = chunk if left >= MB else chunk[:left]
            raw.send(piece)
            left -= len(piece)
        raw.send(b"\0")
        messages, closed = raw.reply()
        return data_rows(messages) if not closed else ["closed: " + describe(messages)]


@pytest.mark.timeout(240)
def test_backend_memory_returns_to_idle_after_huge_queries(pool):
    """After several clients each send a 200 MB query, the backend's memory returns to what it was idle."""
    keeper = keeper_session(pool)
    proc = psutil.Process(backend_pid(keeper))
    answered_within(keeper, "SELECT 1")
    idle = proc.memory_info().rss
    calls = [Call(_stream_query, pool.port, 200 * MB) for _ in range(3)]
    peak = idle
    deadline = time.monotonic() + 150
    while not all(c.done.is_set() for c in calls) and time.monotonic() < deadline:
        peak = max(peak, proc.memory_info().rss)
        time.sleep(0.1)   # sampling the peak, not waiting for an event
    results = [c.get(1.0, "a client sending a 200 MB query") for c in calls]
    assert results == [[["big"]]] * 3
    assert answered_within(keeper, "SHOW myapp.keep") == [("kept",)]

    def settled() -> bool:
        return proc.memory_info().rss - idle < 20 * MB
    try:
        wait_for(settled, "the backend's memory to return to idle", timeout=5)
    except AssertionError:
        raise AssertionError(f"backend RSS idle {idle / MB:.0f} MB, peak {peak / MB:.0f} MB, after "
                             f"{proc.memory_info().rss / MB:.0f} MB") from None


@pytest.mark.timeout(120)
def test_one_80_mb_copy_data_passes_quickly(pool, cluster):
    """A COPY FROM STDIN whose data is one 80 MB CopyData message completes in a few seconds."""
    cluster.psql("DROP TABLE IF EXISTS core_copy; CREATE TABLE core_copy (line text); "
                 "GRANT ALL ON core_copy TO PUBLIC", database="app")
    try:
        _copy_80_mb(pool, cluster)
    finally:
        cluster.psql("DROP TABLE IF EXISTS core_copy", database="app")


def _copy_80_mb(pool, cluster) -> None:
    keeper = keeper_session(pool)
    line = b"y" * 999 + b"\n"
    lines = 80 * MB // len(line)
    with Raw(pool.port, timeout=15.0) as raw:
        raw.send(query("COPY core_copy FROM STDIN"))
        first = raw.read()
        assert first is not None and first[0] == ord("G"), describe([first] if first else [])
        started = time.monotonic()
        raw.send(b"d" + _i32.pack(lines * len(line) + 4))
        block = line * 1024
        left = lines
        while left:
            n = min(left, 1024)
            raw.send(block if n == 1024 else line * n)
            left -= n
            if time.monotonic() - started > 10:
                pytest.fail(f"only {(lines - left) * len(line) / MB:.0f} MB of 80 MB sent after 10 s")
        raw.send(message(b"c"))
        try:
            messages, closed = raw.reply()
        except Silent:
            pytest.fail(f"80 MB of CopyData sent, but COPY not complete after "
                        f"{time.monotonic() - started:.0f} s")
        elapsed = time.monotonic() - started
        assert not closed and errors(messages) == [], describe(messages)
        assert elapsed < 10, f"80 MB of CopyData took {elapsed:.1f} s"
    assert cluster.psql("SELECT count(*) FROM core_copy", database="app") == str(lines)
    assert answered_within(keeper, "SHOW myapp.keep") == [("kept",)]


# ================================================================ 9. the unnamed statement

def _busy(conn: psycopg.Connection, stop: threading.Event, bound: float) -> int:
    """Unnamed-statement queries in a tight loop until told to stop (or bound seconds)."""
    n, end = 0, time.monotonic() + bound
    while not stop.is_set() and time.monotonic() < end:
        conn.execute("SELECT %s::int AS zz, 'busy' AS busy", (n,))
        n += 1
    return n


def test_psql_gdesc_through_a_busy_pool(pool):
    """psql's \\gdesc describes its own query even while another session of the backend is busy."""
    other = pool.connect()
    other.prepare_threshold = None   # its queries use the unnamed statement, every time
    stop = threading.Event()
    call = Call(_busy, other, stop, 60.0)
    env = dict(os.environ, PGCONNECT_TIMEOUT="10")
    outputs = []
    try:
        for _ in range(20):
            out = subprocess.run(["psql", "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
                                  "-p", str(pool.port), "-U", "app", "-d", "app", "-f", "-"],
                                 input="SELECT 1 AS a, 'x'::text AS b \\gdesc\n",
                                 capture_output=True, text=True, env=env, timeout=WAIT)
            outputs.append((out.returncode, out.stdout.strip(), out.stderr.strip()))
    finally:
        stop.set()
    assert call.get(WAIT, "the busy session") > 0
    wrong = [o for o in outputs if o != (0, "a|integer\nb|text", "")]
    assert not wrong, f"{len(wrong)} of 20 \\gdesc runs went wrong, e.g. {wrong[0]!r}"


def test_unnamed_statement_survives_between_round_trips(pool):
    """A libpq client's unnamed prepared statement is still its own after another session's query."""
    a = pool.connect()
    other = pool.connect()
    other.prepare_threshold = None
    res = a.pgconn.prepare(b"", b"SELECT $1::int")
    assert res.status == pq.ExecStatus.COMMAND_OK, res.error_message
    other.execute("SELECT %s::text AS other, 'x' AS y", ("z",))
    res = a.pgconn.describe_prepared(b"")
    assert res.status == pq.ExecStatus.COMMAND_OK, res.error_message
    assert (res.nparams, res.nfields) == (1, 1)
    assert (res.param_type(0), res.ftype(0)) == (23, 23)
    other.execute("SELECT %s::text AS other", ("z",))
    res = a.pgconn.exec_prepared(b"", [b"5"])
    assert res.status == pq.ExecStatus.TUPLES_OK, res.error_message
    assert res.get_value(0, 0) == b"5"


# ================================================================ 10. bad lengths

BAD_LENGTH = {
    "length field below 4": b"Q" + _i32.pack(2),
    "negative length field": b"Q" + _i32.pack(-8) + b"SELECT 1\0",
    "Sync with a body": message(b"S", b"12345"),
    "Query of length 0x7fffffff": b"Q" + _i32.pack(0x7FFFFFFF) + b"SELECT 1",
}


@pytest.mark.parametrize("case", list(BAD_LENGTH))
def test_bad_message_length_ends_only_that_client(pool, case):
    """A message with an impossible length gets 08P01 or a close at once, as from PostgreSQL; the backend serves the others."""
    keeper = keeper_session(pool)
    pids = pooler_pids(pool)
    with Raw(pool.port, timeout=ANSWER_BOUND) as raw:
        raw.send(BAD_LENGTH[case])
        try:
            first, answer = raw.read(), None   # PostgreSQL itself answers each of these at once
        except Silent as exc:
            first, answer = None, str(exc)
    # The client has gone now, whatever it got: the backend must be unhurt.
    assert_backend_unhurt(pool, keeper, pids, case)
    assert answer is None, f"{case}: {answer}"
    assert first is None or error_fields(first[1]).get("C") == "08P01", f"{case}: {describe([first])}"


# ================================================================ found by a second exploratory run

@pytest.mark.parametrize("a_set, b_set, sql, param, b_expects", [
    ("SET TimeZone = 'Asia/Tokyo'", "SET TimeZone = 'UTC'",
     "SELECT ('2024-01-01 00:00'::timestamptz = %s::timestamptz)::text", "2024-01-01 00:00+00", "true"),
    ("SET DateStyle = 'ISO, MDY'", "SET DateStyle = 'ISO, DMY'",
     "SELECT '03/04/2024'::date::text || %s::text", "", "2024-04-03"),
    ("SET search_path = tenant_one", "SET search_path = tenant_two",
     "SELECT * FROM tenant_table WHERE %s::text IS NOT NULL", "", "two"),
])
def test_a_prepared_text_means_in_each_session_what_its_settings_say(pool, cluster, a_set, b_set, sql,
                                                                       param, b_expects):
    """Two sessions prepare the same text (psycopg prepare=True) under different TimeZone,
    DateStyle or search_path: PostgreSQL reads literals and names when a statement is prepared,
    and the pooler gave the second session the first's statement: a timestamp 9 hours off, a date
    with day and month swapped, or 0A000 "cached plan must not change result type" for a schema
    per tenant."""
    with direct(cluster) as conn:
        conn.execute("DROP SCHEMA IF EXISTS tenant_one CASCADE; DROP SCHEMA IF EXISTS tenant_two CASCADE; "
                     "CREATE SCHEMA tenant_one; CREATE SCHEMA tenant_two; "
                     "CREATE TABLE tenant_one.tenant_table (n int); INSERT INTO tenant_one.tenant_table VALUES (1); "
                     "CREATE TABLE tenant_two.tenant_table (who text, n text); "
                     "INSERT INTO tenant_two.tenant_table VALUES ('two', 'x'); "
                     "GRANT USAGE ON SCHEMA tenant_one, tenant_two TO PUBLIC; "
                     "GRANT SELECT ON tenant_one.tenant_table, tenant_two.tenant_table TO PUBLIC")
    a, b = pool.connect(), pool.connect()
    assert server_pid(a) == server_pid(b)
    a.execute(a_set)
    b.execute(b_set)
    for _ in range(2):
        a.execute(sql, (param,), prepare=True).fetchall()
        assert b.execute(sql, (param,), prepare=True).fetchone()[0] == b_expects
    assert server_pid(a) == server_pid(b)


@pytest.mark.parametrize("in_transaction, b_set", [
    ("SET TRANSACTION DEFERRABLE", "SET TimeZone = 'UTC'"),
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", "SET default_transaction_isolation = 'repeatable read'"),
    ("SET TRANSACTION READ WRITE", "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"),
])
def test_set_transaction_is_not_kept_as_a_session_setting(pool, in_transaction, b_set):
    """After BEGIN; SET TRANSACTION …; COMMIT PostgreSQL lists transaction_isolation (or
    transaction_deferrable, transaction_read_only) as set in the session: the pooler read it back,
    its restore after another session's turn was refused, and the session was ended."""
    a, b = pool.connect(), pool.connect()
    a.execute("BEGIN")
    a.execute(in_transaction)
    a.execute("COMMIT")
    b.execute(b_set)
    for _ in range(2):
        assert a.execute("SELECT current_setting('transaction_isolation'), "
                         "current_setting('transaction_read_only')").fetchone() == ("read committed", "off")
        b.execute("SELECT 1")
    assert server_pid(a) == server_pid(b)


def test_a_sessions_deferrable_transaction_defaults_do_not_make_the_next_session_wait(pool, cluster):
    """A session whose transactions default to SERIALIZABLE, READ ONLY, DEFERRABLE: the pooler's own
    queries ran in those defaults, so the restore for the next session (which set nothing) waited
    for a safe snapshot until every serializable read-write transaction of the cluster ended."""
    with direct(cluster) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS deferrable_probe (n int)")
    other = direct(cluster)
    other.autocommit = False
    other.execute("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
    other.execute("SELECT count(*) FROM deferrable_probe")
    other.execute("INSERT INTO deferrable_probe VALUES (1)")   # read-write and open
    try:
        a, b = pool.connect(), pool.connect()
        for setting in ("default_transaction_isolation = serializable", "default_transaction_read_only = on",
                        "default_transaction_deferrable = on"):
            Call(a.execute, f"SET {setting}").get(ANSWER_BOUND, f"SET {setting}")
        # (a's own next query waits for a safe snapshot, as it does on PostgreSQL direct.)
        assert answered_within(b, "SELECT current_setting('transaction_isolation')") == [("read committed",)]
    finally:
        other.rollback()
        other.close()


@pytest.mark.parametrize("how", ["DO block", "SQL DEALLOCATE of the pooler's name"])
def test_a_deallocate_the_pooler_did_not_see_breaks_no_ones_statements(pool, how):
    """A session deallocates the server's protocol-level statements behind the pooler's back (a
    DEALLOCATE ALL inside a DO block, or an SQL DEALLOCATE of a name of the pooler's): every other
    session binding the shared statement got 26000 "prepared statement pgforkpool.sN does not
    exist" for good, new sessions preparing the same text too. The pooler now notices and
    prepares them again."""
    a, b = pool.connect(), pool.connect()
    assert server_pid(a) == server_pid(b)
    sql = "SELECT 40 + %s::int"
    for _ in range(2):
        assert a.execute(sql, (2,), prepare=True).fetchone()[0] == 42
    if how == "DO block":
        b.execute("DO $$BEGIN EXECUTE 'DEALLOCATE ALL'; END$$")
    else:
        names = [row[0] for row in b.execute("SELECT name FROM pg_prepared_statements WHERE NOT from_sql")]
        assert names
        for name in names:
            b.execute(f'DEALLOCATE "{name}"')
    for _ in range(2):
        assert a.execute(sql, (2,), prepare=True).fetchone()[0] == 42
        assert b.execute(sql, (3,), prepare=True).fetchone()[0] == 43
    with pool.connect() as c:
        assert c.execute(sql, (4,), prepare=True).fetchone()[0] == 44
    assert server_pid(a) == server_pid(b)


def test_a_text_prepared_after_its_table_changed_reads_the_table_as_it_is(pool, cluster):
    """After ALTER TABLE added a column, a new session preparing a text another session had
    prepared before was given the shared statement, and got 0A000 "cached plan must not change
    result type" on every try, where PostgreSQL prepares it afresh. A session that prepared it
    before the change gets 0A000 as it would directly."""
    with direct(cluster) as conn:
        conn.execute("DROP TABLE IF EXISTS growing; CREATE TABLE growing (a int); "
                     "INSERT INTO growing VALUES (1); ALTER TABLE growing OWNER TO app")
    a = pool.connect()
    sql = "SELECT * FROM growing WHERE %s::int > 0"
    for _ in range(2):
        assert a.execute(sql, (1,), prepare=True).fetchall() == [(1,)]
    with pool.connect() as b:   # the change, through the pooler
        b.execute("ALTER TABLE growing ADD COLUMN b int DEFAULT 2")
    with pool.connect() as c:
        assert c.execute(sql, (1,), prepare=True).fetchall() == [(1, 2)]
    with pytest.raises(psycopg.errors.FeatureNotSupported):
        a.execute(sql, (1,), prepare=True)   # as on PostgreSQL direct
    with direct(cluster) as conn:   # a change the pooler does not see: the first 0A000 tells it
        conn.execute("ALTER TABLE growing ADD COLUMN c int DEFAULT 3")
    with pool.connect() as d:
        for attempt in range(2):
            try:
                assert d.execute(sql, (1,), prepare=True).fetchall() == [(1, 2, 3)]
                break
            except psycopg.errors.FeatureNotSupported:
                assert attempt == 0, "a new session's statement stayed stale after the first 0A000"


def test_a_text_prepared_under_set_local_is_not_shared(pool):
    """SET LOCAL TimeZone in a transaction, then a prepared statement: its literal is read in
    Tokyo time, and the session's settings outside the transaction are the defaults, so the
    statement went to the default scope and the next default session bound it (found by a review)."""
    a, b = pool.connect(), pool.connect()
    assert server_pid(a) == server_pid(b)
    sql = "SELECT ('2024-01-01 00:00'::timestamptz = %s::timestamptz)::text"
    with a.transaction():
        a.execute("SET LOCAL TimeZone = 'Asia/Tokyo'")
        assert a.execute(sql, ("2024-01-01 00:00+09",), prepare=True).fetchone()[0] == "true"
    b.execute("SET TimeZone = 'UTC'")   # the server default here too; set, to be sure
    b.execute("RESET TimeZone")
    for _ in range(2):
        assert b.execute(sql, (b.execute("SELECT '2024-01-01 00:00'::timestamptz::text").fetchone()[0],),
                         prepare=True).fetchone()[0] == "true"


# ================================================================ fixes of the second run, as a user sees them

TOKYO_TEXT = "SELECT ('2024-01-01 00:00'::timestamptz = %s::timestamptz)::text"


def test_a_statement_held_across_a_change_of_timezone_is_not_prepared_for_others_under_it(pool):
    """A session holds a statement it prepared under the default TimeZone, then sets Tokyo time.
    When the server lost its statements (another session's DISCARD ALL) the pooler prepared
    the session's statement again under Tokyo time, under the name the default sessions share:
    a new default session preparing the same text read its literal 9 hours off."""
    a, b = pool.connect(), pool.connect()
    assert server_pid(a) == server_pid(b)
    assert a.execute(TOKYO_TEXT, ("2024-01-01 00:00+00",), prepare=True).fetchone()[0] == "true"
    a.execute("SET TimeZone = 'Asia/Tokyo'")
    b.execute("DISCARD ALL")   # every statement of the connection goes, on the server
    # (a's statement is prepared again under its settings now: a known limit of the README.)
    a.execute(TOKYO_TEXT, ("2024-01-01 00:00+00",), prepare=True).fetchone()
    with pool.connect() as c:
        assert server_pid(c) == server_pid(a)
        for _ in range(2):
            assert c.execute(TOKYO_TEXT, ("2024-01-01 00:00+00",), prepare=True).fetchone()[0] == "true"


def _pooler_statements(conn: psycopg.Connection) -> list[str]:
    return [row[0] for row in conn.execute(
        "SELECT statement FROM pg_prepared_statements WHERE name LIKE 'pgforkpool.%' ORDER BY statement")]


def test_statements_retired_while_a_pinned_session_runs_leave_the_shared_connection(pool):
    """An ALTER TABLE retires every statement the pooler keeps for reuse; those on the shared
    connection are deallocated at its next turn. When a pinned session's connection was
    activated first they were forgotten, and stayed on the shared connection for its lifetime."""
    p = pool.connect()
    p.execute("CREATE TEMP TABLE pin_me (x int)")   # p keeps a server connection of its own
    a = pool.connect()
    assert server_pid(a) != server_pid(p)
    for n in range(3):
        a.execute(f"SELECT {n} + %s::int AS retired_{n}", (1,), prepare=True)
    a.close()   # nobody holds them now: kept for reuse
    p.execute("ALTER TABLE pin_me ADD COLUMN y int")
    p.execute("SELECT 1")   # p's own connection has its turn first
    with pool.connect() as b:
        assert not [text for text in _pooler_statements(b) if "retired_" in text]


def test_an_error_whose_text_mentions_0a000_retires_no_statement(pool):
    """Only an error whose code is 0A000 tells the pooler a statement's plan went stale; an
    error that merely says 0A000 in its message made every shared statement be prepared again
    under a new name, once for each session."""
    a, b = pool.connect(), pool.connect()
    sql = "SELECT 'shared once' || %s::text"
    for conn in (a, b):
        conn.execute(sql, ("",), prepare=True)
    with pytest.raises(psycopg.errors.RaiseException):
        a.execute("DO $$BEGIN RAISE EXCEPTION 'code 0A000 in the text'; END$$")
    c = pool.connect()
    for conn in (a, b, c):
        assert conn.execute(sql, ("!",), prepare=True).fetchone()[0] == "shared once!"
    assert _pooler_statements(c).count("SELECT 'shared once' || $1::text") == 1


@pytest.mark.parametrize("first, second, expected", [
    ("ISO, DMY", "ISO", "ISO, MDY"),
    ("SQL, DMY", "Postgres", "Postgres, MDY"),
])
def test_a_datestyle_given_in_part_at_login_keeps_its_order_after_another_sessions_turn(
        pool, first, second, expected):
    """A login's DateStyle that names only the output style takes its order from the server's
    default ("ISO" is "ISO, MDY"), whichever session had the connection before."""
    a = pool.connect(options=f"-c DateStyle={first.replace(' ', '')}")
    b = pool.connect(options=f"-c DateStyle={second}")
    for _ in range(2):
        assert a.execute("SHOW DateStyle").fetchone()[0] == first
        assert b.execute("SHOW DateStyle").fetchone()[0] == expected
        assert b.execute("SELECT to_char('03/04/2024'::date, 'YYYY-MM-DD')").fetchone()[0] == "2024-03-04"


# ================================================================ idle_session_timeout

@pytest.mark.parametrize("how", ["SET", "login option"])
def test_a_sessions_idle_session_timeout_ends_that_session_not_the_shared_connection(pool, how):
    """A session's own idle_session_timeout on the shared connection: the server ended the
    connection once it idled that long (every session's prepared statements and the rest with
    it, a "lost server connection" in the log each time), and the idle session itself went on.
    As on PostgreSQL, the session is ended with 57P05 and nobody else notices."""
    b = pool.connect()
    before = server_pid(b)
    with Raw(pool.port, timeout=RAW_TIMEOUT, login=how == "SET") as a:
        if how == "SET":
            assert not errors(a.query("SET idle_session_timeout = '1s'")[0])
        else:
            body = (_i32.pack(PROTOCOL_3_0) + cstr("user") + cstr("app") + cstr("database") + cstr("app")
                    + cstr("options") + cstr("-c idle_session_timeout=1000") + b"\0")
            a.send(_i32.pack(len(body) + 4) + body)
            messages, closed = a.reply()
            assert not closed and not errors(messages)
        idle_from = time.monotonic()
        ended = a.until_closed()   # bounded by RAW_TIMEOUT
        idled = time.monotonic() - idle_from
    assert [fields["C"] for fields in errors(ended)] == ["57P05"], describe(ended)
    assert 1.0 <= idled < RAW_TIMEOUT
    assert server_pid(b) == before
    assert "lost server connection" not in pool.log()


def test_a_session_that_keeps_running_is_not_ended_by_its_idle_session_timeout(pool):
    """Only idle time counts: a session running a statement every 0.4 s outlives a 1 s timeout."""
    a = pool.connect()
    a.execute("SET idle_session_timeout = '1s'")
    for _ in range(6):
        assert a.execute("SELECT 1").fetchone() == (1,)
        time.sleep(0.4)   # pacing, below the timeout
    assert a.execute("SHOW idle_session_timeout").fetchone() == ("1s",)


def test_an_update_of_pg_settings_stays_in_its_session(pool):
    """UPDATE pg_settings SET setting = … changes the session's setting (a rule calls set_config;
    the tag is UPDATE 0): it stayed on the shared connection for the next sessions, and the
    session itself lost it at its next switch (found by a third exploratory run)."""
    a, b = pool.connect(), pool.connect()
    assert server_pid(a) == server_pid(b)
    default = b.execute("SHOW work_mem").fetchone()[0]
    a.execute("UPDATE pg_settings SET setting = '7777' WHERE name = 'work_mem'")
    for _ in range(2):
        assert b.execute("SHOW work_mem").fetchone()[0] == default
        assert a.execute("SHOW work_mem").fetchone()[0] == "7777kB"
    a.close()
    with pool.connect() as c:
        assert c.execute("SHOW work_mem").fetchone()[0] == default


@pytest.mark.parametrize("setup, change, columns", [
    ("CREATE TABLE ddl_probe (a int); INSERT INTO ddl_probe VALUES (1)",
     "DROP TABLE ddl_probe; CREATE TABLE ddl_probe (a int, b int DEFAULT 2); INSERT INTO ddl_probe VALUES (1)",
     ["a", "b"]),
    ("CREATE TABLE ddl_base (a int); INSERT INTO ddl_base VALUES (1); "
     "CREATE VIEW ddl_probe AS SELECT a FROM ddl_base",
     "CREATE OR REPLACE VIEW ddl_probe AS SELECT a, a + 1 AS b FROM ddl_base", ["a", "b"]),
    ("CREATE TABLE ddl_base (a int); INSERT INTO ddl_base VALUES (1); "
     "CREATE VIEW ddl_probe AS SELECT a FROM ddl_base",
     "ALTER VIEW ddl_probe RENAME COLUMN a TO renamed", ["renamed"]),
])
def test_a_text_prepared_before_other_ddl_is_prepared_afresh_for_a_new_session(pool, cluster, setup,
                                                                            change, columns):
    """DDL through the pooler other than ALTER TABLE (a view replaced, a table dropped and made
    again, a column of a view renamed) left the shared statement in place: a new session's first
    query failed with 0A000 "cached plan must not change result type" (found by a third
    exploratory run)."""
    with direct(cluster) as conn:
        conn.execute("DROP SCHEMA IF EXISTS ddl CASCADE; CREATE SCHEMA ddl AUTHORIZATION app")
    with pool.connect() as owner:   # (through the pooler, as the app role: nothing to retire yet)
        owner.execute("SET search_path = ddl")
        owner.execute(setup)
    sql = "SELECT * FROM ddl.ddl_probe WHERE %s::int > 0"
    with pool.connect() as a:
        for _ in range(2):
            a.execute(sql, (1,), prepare=True).fetchall()
    with pool.connect() as b:
        b.execute("SET search_path = ddl")
        b.execute(change)
    with pool.connect() as c:
        cursor = c.execute(sql, (1,), prepare=True)
        assert [column.name for column in cursor.description] == columns


# ================================================================ asyncpg's prepare: Parse, Describe, Flush

def _prepare_with_flush(raw: Raw, name: str, sql: str) -> list[tuple[int, bytes]]:
    """As asyncpg prepares: Parse, Describe, Flush, no Sync; the replies up to the description."""
    raw.send(message(b"P", cstr(name) + cstr(sql) + _i16.pack(0)) + message(b"D", b"S" + cstr(name))
             + message(b"H"))
    replies = []
    while not replies or replies[-1][0] not in (ord("T"), ord("n"), ord("E")):
        item = raw.read()
        assert item is not None, "the pooler closed the connection"
        replies.append(item)
    return replies


def _run_prepared(raw: Raw, name: str, value: str) -> list[tuple[int, bytes]]:
    raw.send(message(b"B", cstr("") + cstr(name) + _i16.pack(0) + _i16.pack(1) + _i32.pack(len(value))
                     + value.encode() + _i16.pack(0))
             + message(b"E", cstr("") + _i32.pack(0)) + SYNC)
    messages, closed = raw.reply()
    assert not closed
    return messages


@pytest.mark.parametrize("then", ["nothing", "a simple query", "COPY FROM STDIN", "in a transaction"])
def test_a_statement_prepared_with_a_flush_leaves_the_connection_to_others(pool, cluster, then):
    """asyncpg prepares with Parse, Describe and Flush, and sends the Sync only with the first
    Bind, maybe much later. The session kept the shared connection until then: every other
    session of the backend waited (up to query_wait_timeout), and a simple Query it sent next
    (copy_records_to_table's COPY, a pool's reset query) ended it with 08P01. Found by a third
    exploratory run."""
    with direct(cluster) as conn:
        conn.execute("DROP TABLE IF EXISTS flush_copy; CREATE TABLE flush_copy (n int); "
                     "ALTER TABLE flush_copy OWNER TO app")
    b = pool.connect()
    with Raw(pool.port) as a:
        if then == "in a transaction":
            assert not errors(a.query("BEGIN")[0])
        replies = _prepare_with_flush(a, "asyncpg_stmt_1", "SELECT $1::int * 2")
        assert [chr(kind) for kind, _ in replies] == ["1", "t", "T"]
        if then != "in a transaction":
            assert answered_within(b, "SELECT 42") == [(42,)]
        if then in ("a simple query", "in a transaction"):
            messages, closed = a.query("SELECT 'next'")
            assert not closed and not errors(messages) and data_rows(messages) == [["next"]]
        elif then == "COPY FROM STDIN":
            a.send(query("COPY flush_copy FROM STDIN"))
            began = a.read()
            assert began is not None and began[0] == ord("G"), describe([began] if began else [])
            a.send(message(b"d", b"7\n") + message(b"c"))
            messages, closed = a.reply()
            assert not closed and not errors(messages), describe(messages)
            assert answered_within(b, "SELECT n FROM flush_copy") == [(7,)]
        messages = _run_prepared(a, "asyncpg_stmt_1", "21")
        assert not errors(messages) and data_rows(messages) == [["42"]], describe(messages)
        if then == "in a transaction":
            assert not errors(a.query("COMMIT")[0])
        assert answered_within(b, "SELECT 43") == [(43,)]


def test_a_failed_prepare_with_a_flush_is_answered_as_postgresql_does(pool):
    """When the flushed Parse fails, the server skips until the client's Sync: the pooler sends
    no Sync of its own then, so that what the client sends before its Sync is skipped too."""
    with Raw(pool.port) as a:
        replies = _prepare_with_flush(a, "bad", "SELEKT 1")
        assert [fields["C"] for fields in errors(replies)] == ["42601"]
        messages = _run_prepared(a, "bad", "1")   # skipped by the server, up to its Sync
        assert not errors(messages) and [chr(kind) for kind, _ in messages] == ["Z"], describe(messages)
        messages, closed = a.query("SELECT 'still here'")
        assert data_rows(messages) == [["still here"]]


def test_a_client_gone_in_the_middle_of_a_pipeline_leaves_no_batch_state_for_the_next(pool):
    """A client that left after a Bind and Execute without their Sync: the pooler syncs the
    connection for it, and kept its batch's flags, so that the next session's prepare with a
    Flush held the connection again and its next simple Query ended it (found by a review)."""
    with Raw(pool.port) as gone:
        gone.send(message(b"P", cstr("") + cstr("SELECT pg_sleep(0.2)") + _i16.pack(0))
                  + message(b"B", cstr("") + cstr("") + _i16.pack(0) + _i16.pack(0) + _i16.pack(0))
                  + message(b"E", cstr("") + _i32.pack(0)) + message(b"H"))
        assert gone.read() is not None   # ParseComplete: its pipeline is on the server
    with Raw(pool.port) as a:
        assert [chr(kind) for kind, _ in _prepare_with_flush(a, "after_gone", "SELECT $1::int")] == \
            ["1", "t", "T"]
        messages, closed = a.query("SELECT 'next'")
        assert not closed and data_rows(messages) == [["next"]], describe(messages)


# ================================================================ a statement's result changed elsewhere

def _prepare_described(raw: Raw, name: str, sql: str, flush: bool) -> list[tuple[int, bytes]]:
    """Prepare and describe a statement as drivers that keep its description do: asyncpg with a
    Flush (its Sync comes with the first Bind), JDBC and pgx with a Sync."""
    if flush:
        return _prepare_with_flush(raw, name, sql)
    raw.send(message(b"P", cstr(name) + cstr(sql) + _i16.pack(0)) + message(b"D", b"S" + cstr(name)) + SYNC)
    messages, closed = raw.reply()
    assert not closed
    return messages


def _outcome(messages: list[tuple[int, bytes]]) -> tuple:
    """What a client reads from a reply: its errors' SQLSTATEs, its columns' names and types,
    and its rows (binary results, as asyncpg reads them)."""
    columns = []
    for kind, payload in messages:
        if kind == ord("T"):
            pos = 2
            for _ in range(_i16.unpack_from(payload)[0]):
                end = payload.index(b"\0", pos)
                columns.append((payload[pos:end].decode(), _i32.unpack_from(payload, end + 7)[0]))
                pos = end + 19
    return ([e["C"] for e in errors(messages)], columns, data_rows(messages))


def _run_binary(raw: Raw, name: str) -> tuple:
    """Bind (binary results), Execute, Sync of a statement without parameters."""
    raw.send(message(b"B", cstr("") + cstr(name) + _i16.pack(0) + _i16.pack(0) + _i16.pack(1) + _i16.pack(1))
             + message(b"E", cstr("") + _i32.pack(0)) + SYNC)
    messages, closed = raw.reply()
    assert not closed, describe(messages)
    return _outcome(messages)


def _statement_shape_story(connect, cluster, sql: str, change: str, flush: bool) -> list:
    """A prepares and describes a statement; B pins the connection it is on (LISTEN: through the
    pooler, A's next turn is on a newly dialled one, where the pooler prepares A's statement
    again); the table changes; A uses its statement, then does what asyncpg does after 0A000.
    What A (and a newcomer) read at each step."""
    with direct(cluster) as conn:
        conn.execute("DROP TABLE IF EXISTS shape_t; CREATE TABLE shape_t (a int, b text); "
                     "INSERT INTO shape_t VALUES (1, 'x'); ALTER TABLE shape_t OWNER TO app")
    story = []
    with connect() as a, connect() as b:
        story.append(("prepare", _outcome(_prepare_described(a, "s1", sql, flush))))
        messages, _ = b.query("LISTEN shape_ch")
        assert not errors(messages), describe(messages)
        with direct(cluster) as conn:
            conn.execute("SET lock_timeout = '10s'")   # (a lock left by A's prepare fails the test)
            conn.execute(change)
        story.append(("execute", _run_binary(a, "s1")))
        story.append(("again", _run_binary(a, "s1")))
        a.send(message(b"D", b"S" + cstr("s1")) + SYNC)
        story.append(("describe", _outcome(a.reply()[0])))
        story.append(("begin", _outcome(a.query("BEGIN")[0])))
        story.append(("in a transaction", _run_binary(a, "s1")))
        story.append(("after it", _outcome(a.query("SELECT 1")[0])))
        story.append(("rollback", _outcome(a.query("ROLLBACK")[0])))
        # asyncpg's answer to 0A000: close the statement, prepare it again.
        a.send(message(b"C", b"S" + cstr("s1")) + SYNC)
        story.append(("close", _outcome(a.reply()[0])))
        story.append(("prepared anew", _outcome(_prepare_described(a, "s1", sql, flush))))
        story.append(("executed anew", _run_binary(a, "s1")))
        with connect() as c:
            story.append(("newcomer prepares", _outcome(_prepare_described(c, "s9", sql, flush))))
            story.append(("newcomer executes", _run_binary(c, "s9")))
    return story


@pytest.mark.parametrize("flush", [False, True], ids=["sync", "flush"])
@pytest.mark.parametrize("sql, change, stale", [
    ("SELECT * FROM shape_t", "ALTER TABLE shape_t ALTER a TYPE real", True),
    ("SELECT * FROM shape_t", "ALTER TABLE shape_t ADD COLUMN c int DEFAULT 7", True),
    ("SELECT * FROM shape_t", "ALTER TABLE shape_t RENAME COLUMN b TO bb", True),
    ("SELECT a, b FROM shape_t", "ALTER TABLE shape_t ADD COLUMN c int DEFAULT 7", False),
], ids=["type", "column added", "column renamed", "unchanged"])
def test_a_statement_whose_result_changed_fails_as_on_postgresql_when_prepared_again(
        pool, cluster, sql, change, stale, flush):
    """A driver that prepares and describes a statement once (asyncpg, JDBC, pgx) reads its rows
    by the described types. When the statement had to be prepared again on another server
    connection after its table changed, the pooler ran the new shape under the old description:
    asyncpg read a real as the int 1065353216, or failed with "3 columns, 2 described". PostgreSQL
    answers 0A000 "cached plan must not change result type" until the statement is prepared anew.
    Found by the asyncpg verification run; every step is compared with PostgreSQL direct (where
    a prepare with a Flush keeps its lock until the Sync, and the change would wait for it: the
    pooler ends that implicit transaction itself, README Known limits, so the reference story
    prepares with a Sync)."""
    unix = os.path.join(cluster.socket_dir, f".s.PGSQL.{cluster.port}")
    expected = _statement_shape_story(lambda: Raw(unix), cluster, sql, change, False)
    seen = _statement_shape_story(lambda: Raw(pool.port), cluster, sql, change, flush)
    executed = dict(expected)["execute"]
    if stale:
        assert executed[0] == ["0A000"] and not executed[2], f"PostgreSQL itself: {expected}"
    else:
        assert executed[0] == [] and executed[2], f"PostgreSQL itself: {expected}"
    assert seen == expected


def test_a_statement_described_otherwise_elsewhere_is_never_run_under_the_old_description(pool, cluster):
    """A's statement was described before its table changed; after the change a newcomer
    prepares and describes the same text on another server connection of the backend (the
    first is pinned), where the pooler gives it the statement A holds.  A's next execution there
    ran the new shape under A's old description.  Now the two descriptions disagreeing make the
    statement fail with 0A000 for both (A as on PostgreSQL; the newcomer then prepares anew, as
    asyncpg and JDBC do, and is served)."""
    with direct(cluster) as conn:
        conn.execute("DROP TABLE IF EXISTS shape_u; CREATE TABLE shape_u (a int); "
                     "INSERT INTO shape_u VALUES (1077936128); ALTER TABLE shape_u OWNER TO app")
    sql = "SELECT a FROM shape_u"
    with Raw(pool.port) as a, Raw(pool.port) as b, Raw(pool.port) as c:
        assert _outcome(_prepare_described(a, "s1", sql, False))[1] == [("a", 23)]
        assert not errors(b.query("LISTEN shape_u")[0])   # pins the connection A's statement is on
        with direct(cluster) as conn:
            conn.execute("ALTER TABLE shape_u ALTER a TYPE real")
        assert _outcome(_prepare_described(c, "n1", sql, False))[1] == [("a", 700)]
        assert _run_binary(a, "s1")[0] == ["0A000"]
        assert _run_binary(c, "n1")[0] == ["0A000"]
        c.send(message(b"C", b"S" + cstr("n1")) + SYNC)
        c.reply()
        assert _outcome(_prepare_described(c, "n1", sql, False))[1] == [("a", 700)]
        assert _run_binary(c, "n1") == ([], [], [[struct.pack("!f", 1077936128).decode(errors="replace")]])


def test_a_large_message_sent_while_a_bind_waits_for_its_check_does_not_stall_the_backend(pool, cluster):
    """A Bind waits for the pooler's check of its statement, prepared again on a new connection
    (the check's Parse waits for a migration's lock), and the client sends a large message
    meanwhile: the pooler stops reading it past 64 kB.  Once the check was answered it read on
    only if less than 64 kB were left, so the unfinished message kept the session, and every
    session of the backend, waiting for good (found by review)."""
    with direct(cluster) as conn:
        conn.execute("DROP TABLE IF EXISTS shape_h; CREATE TABLE shape_h (a int); "
                     "INSERT INTO shape_h VALUES (7); ALTER TABLE shape_h OWNER TO app")
    with Raw(pool.port) as a, Raw(pool.port) as b:
        assert not errors(_prepare_described(a, "s1", "SELECT a FROM shape_h", False))
        assert not errors(b.query("LISTEN shape_h")[0])   # A's next turn is on a new connection
        with direct(cluster) as locker:
            locker.execute("BEGIN")
            locker.execute("LOCK TABLE shape_h IN ACCESS EXCLUSIVE MODE")
            a.send(message(b"B", cstr("") + cstr("s1") + _i16.pack(0) + _i16.pack(0) + _i16.pack(0))
                   + message(b"E", cstr("") + _i32.pack(0)))
            wait_for(lambda: cluster.psql("SELECT count(*) FROM pg_locks WHERE locktype = 'relation' "
                                          "AND NOT granted") == "1", "the check to wait for the lock")
            big = (message(b"P", cstr("") + cstr("SELECT 2 /*" + "x" * (8 * MB) + "*/") + _i16.pack(0))
                   + message(b"B", cstr("") + cstr("") + _i16.pack(0) + _i16.pack(0) + _i16.pack(0))
                   + message(b"E", cstr("") + _i32.pack(0)) + SYNC)
            sender = Call(a.sock.sendall, big)
            wait_for(lambda: not select.select([], [a.sock], [], 1.0)[1], "the pooler to stop reading A")
            locker.execute("COMMIT")
        sender.get(ANSWER_BOUND, "the rest of A's large message to be read")
        messages, closed = a.reply()
        assert not closed and not errors(messages), describe(messages)
        assert data_rows(messages) == [["7"], ["2"]]
        with Raw(pool.port) as c:
            assert data_rows(c.query("SELECT 3")[0]) == [["3"]]


def _insert_binary_int4(raw: Raw, name: str, value: int) -> list:
    """Bind with one binary int4 parameter (as asyncpg sends what it was told is an int4)."""
    raw.send(message(b"B", cstr("") + cstr(name) + _i16.pack(1) + _i16.pack(1) + _i16.pack(1)
                     + _i32.pack(4) + _i32.pack(value) + _i16.pack(0))
             + message(b"E", cstr("") + _i32.pack(0)) + SYNC)
    messages, closed = raw.reply()
    assert not closed
    return [e["C"] for e in errors(messages)]


@pytest.mark.parametrize("target", ["direct", "pooled"])
def test_a_statement_prepared_again_keeps_the_parameter_types_its_client_was_told(pool, cluster, target):
    """A client was told `$1` is an int4 and sends binary int4 values.  After the column became a
    real, the pooler prepared the statement again on a new connection with `$1` inferred anew as
    a real, and 1000 was stored as 1.4e-42; PostgreSQL keeps the types it told (found by review)."""
    with direct(cluster) as conn:
        conn.execute("DROP TABLE IF EXISTS shape_p; CREATE TABLE shape_p (a int); ALTER TABLE shape_p OWNER TO app")
    port = pool.port if target == "pooled" else os.path.join(cluster.socket_dir, f".s.PGSQL.{cluster.port}")
    with Raw(port) as a, Raw(port) as b:
        a.send(message(b"P", cstr("i1") + cstr("INSERT INTO shape_p VALUES ($1)") + _i16.pack(0))
               + message(b"D", b"S" + cstr("i1")) + SYNC)
        messages, _ = a.reply()
        told = [p for t, p in messages if t == ord("t")]
        assert told and _i32.unpack_from(told[0], 2)[0] == 23, describe(messages)
        assert not errors(b.query("LISTEN shape_p")[0])   # through the pooler: A moves to a new connection
        with direct(cluster) as conn:
            conn.execute("SET lock_timeout = '10s'")
            conn.execute("ALTER TABLE shape_p ALTER a TYPE real")
        assert _insert_binary_int4(a, "i1", 1000) == []
    with direct(cluster) as conn:
        assert conn.execute("SELECT a FROM shape_p").fetchall() == [(1000.0,)]


MIGRATIONS = {
    "column type": ("CREATE TABLE outdated_t (id int, n varchar); INSERT INTO outdated_t VALUES (1, '1')",
                    "UPDATE outdated_t SET n = %s WHERE id = 1",
                    "ALTER TABLE outdated_t ALTER n TYPE integer USING n::integer", "42804"),
    "enum made again": ("CREATE TYPE outdated_e AS ENUM ('a', 'b'); CREATE TABLE outdated_t (n outdated_e)",
                        "INSERT INTO outdated_t VALUES (%s)",
                        "DROP TABLE outdated_t; DROP TYPE outdated_e; CREATE TYPE outdated_e AS ENUM ('a', 'b'); "
                        "CREATE TABLE outdated_t (n outdated_e)", "XX000"),
}


@pytest.mark.parametrize("migration", list(MIGRATIONS))
def test_statements_outdated_by_a_migration_made_elsewhere_are_prepared_afresh(pool, cluster, migration):
    """A migration over a direct connection changes a column's type, or drops and makes again an
    enum.  A new session's statement of the same text was the one prepared before (its parameter
    type inferred from the old column, or the old enum), and every new session failed (42804,
    or XX000 "cache lookup failed for type") for as long as the backend lived.  Now the first
    such error makes every session's statement be prepared afresh at its next use: one
    execution fails (PostgreSQL would have served it), none after it (found by running
    SQLAlchemy's tests through the pooler)."""
    setup, statement, change, sqlstate = MIGRATIONS[migration]
    value = "1" if migration == "column type" else "a"
    with direct(cluster) as conn:
        conn.execute("DROP TABLE IF EXISTS outdated_t; DROP TYPE IF EXISTS outdated_e")
        conn.execute(setup)
        conn.execute("ALTER TABLE outdated_t OWNER TO app")
    keeper = pool.connect()
    keeper.execute(statement, (value,), prepare=True)
    with direct(cluster) as conn:
        conn.execute(change)
        conn.execute("ALTER TABLE outdated_t OWNER TO app")
    outcomes = []
    for _ in range(6):
        with pool.connect() as conn:
            try:
                conn.execute(statement, (value,), prepare=True)
                outcomes.append("ok")
            except psycopg.Error as exc:
                outcomes.append(exc.sqlstate)
    assert outcomes.count("ok") >= 5 and set(outcomes) <= {"ok", sqlstate}, outcomes
    # The session that prepared it before the change is served too, from its next execution.
    try:
        keeper.execute(statement, (value,), prepare=True)
    except psycopg.Error as exc:
        assert exc.sqlstate == sqlstate
    keeper.execute(statement, (value,), prepare=True)
    keeper.close()
