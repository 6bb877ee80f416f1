"""Refusals are PostgreSQL ErrorResponses with the right SQLSTATE, and they affect only the client refused.

libpq keeps no SQLSTATE for a connection it could not open (psycopg's
OperationalError.sqlstate is None even against PostgreSQL itself), so the code
of a refused login is read by RawClient, a client on a bare socket; psycopg
checks the message a person sees.  RawClient also sends what libpq never would.
"""

import signal
import socket
import struct
import time

import psutil
import psycopg
import pytest

from conftest import USERS, WAIT, server_pid, wait_for
from pgforkpool.shared import auth, protocol

RELOADED = "received SIGHUP, reloading configuration files"

_int32 = struct.Struct("!i")
DATA_ROW = ord("D")


class RawClient:
    """A client on a bare socket that speaks the protocol one message at a time."""

    def __init__(self, port: int, timeout: float = WAIT):
        self.timeout = timeout
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.reader = protocol.MessageReader()

    def __enter__(self) -> "RawClient":
        return self

    def __exit__(self, *_exc) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> bytes:
        """Bytes as they arrive; b"" once the pooler has closed the connection."""
        try:
            return self.sock.recv(65536)
        except ConnectionResetError:
            return b""
        except TimeoutError:
            raise AssertionError(f"the pooler neither answered nor closed within {self.timeout} s") from None

    def read(self) -> tuple[int, bytes] | None:
        """The next whole message, or None once the pooler has closed the connection."""
        while True:
            item = self.reader.next()
            if item is not None:
                return item
            data = self.recv()
            if not data:
                return None
            self.reader.feed(data)

    def read_until(self, *types: int) -> list[tuple[int, bytes]]:
        """Messages up to and including the first of one of types."""
        messages = []
        while True:
            item = self.read()
            assert item is not None, f"connection closed after {messages}"
            messages.append(item)
            if item[0] in types:
                return messages

    def error(self) -> dict[str, str]:
        """The fields of the next ErrorResponse."""
        return protocol.parse_error_fields(self.read_until(protocol.ERROR_RESPONSE)[-1][1])

    def closed(self) -> bool:
        """True once the pooler closes the connection with nothing more to say."""
        return self.read() is None

    def login(self, user: str = "app", database: str = "app", password: str | None = None,
              **params: str) -> list[tuple[int, bytes]]:
        """Startup and authentication: the messages up to ReadyForQuery or an ErrorResponse."""
        self.send(protocol.startup_message({"user": user, "database": database, **params}))
        password = USERS.get(user, "") if password is None else password
        client_auth = auth.ClientAuth(user, password)   # the pooler's own client side of SCRAM/MD5
        messages = []
        while True:
            item = self.read()
            assert item is not None, f"connection closed during login after {messages}"
            messages.append(item)
            msg_type, payload = item
            if msg_type == protocol.AUTHENTICATION:
                reply = client_auth.respond(_int32.unpack_from(payload)[0], payload[4:])
                if reply:
                    self.send(reply)
            elif msg_type in (protocol.READY_FOR_QUERY, protocol.ERROR_RESPONSE):
                return messages

    def query(self, sql: str) -> list[tuple[int, bytes]]:
        """A simple Query: its replies up to ReadyForQuery."""
        self.send(protocol.query(sql))
        return self.read_until(protocol.READY_FOR_QUERY)


def key_data(messages: list[tuple[int, bytes]]) -> tuple[int, int]:
    """(process id, secret key) of the BackendKeyData among messages."""
    payload = next(p for t, p in messages if t == protocol.BACKEND_KEY_DATA)
    return struct.unpack("!ii", payload)


def rows(messages: list[tuple[int, bytes]]) -> list[list[str | None]]:
    """The text values of the DataRows among messages."""
    result = []
    for msg_type, payload in messages:
        if msg_type != DATA_ROW:
            continue
        count, pos, row = struct.unpack_from("!h", payload)[0], 2, []
        for _ in range(count):
            length = _int32.unpack_from(payload, pos)[0]
            pos += 4
            row.append(None if length < 0 else payload[pos:pos + length].decode())
            pos += max(length, 0)
        result.append(row)
    return result


def ready_status(messages: list[tuple[int, bytes]]) -> bytes:
    """The transaction status of the last ReadyForQuery among messages."""
    return next(p for t, p in reversed(messages) if t == protocol.READY_FOR_QUERY)


def assert_refused(pooler, sqlstate: str, text: str, user: str = "app", dbname: str = "app",
                   password: str | None = None, **params: str) -> None:
    """A login is refused with sqlstate and text, and the pooler then closes that connection."""
    with RawClient(pooler.port) as raw:
        messages = raw.login(user, dbname, password, **params)
        assert messages[-1][0] == protocol.ERROR_RESPONSE, messages
        fields = protocol.parse_error_fields(messages[-1][1])
        assert (fields.get("C"), fields.get("V")) == (sqlstate, "FATAL"), fields
        assert text in fields.get("M", ""), fields
        assert raw.closed()
    with pytest.raises(psycopg.OperationalError) as refused:
        pooler.connect(user, dbname, password=password, **params).close()
    assert text in str(refused.value)


def connect_eventually(pooler, **params) -> psycopg.Connection:
    """Connect, retrying while a slot freed by a closed client is still being reported."""
    deadline = time.monotonic() + WAIT
    while True:
        try:
            return pooler.connect(**params)
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def assert_serves(pooler, user: str = "app") -> None:
    with pooler.connect(user) as conn:
        assert conn.execute("SELECT current_user, 1 + 1").fetchone() == (user, 2)


# ================================================================ authentication

@pytest.mark.parametrize("method", ["scram-sha-256", "md5", "password"])
def test_wrong_password_is_28P01_and_others_are_served(start_pooler, method):
    pooler = start_pooler(auth_method=method)
    assert_refused(pooler, "28P01", 'password authentication failed for user "app"',
                   password="not-the-secret")
    assert_serves(pooler)


@pytest.mark.parametrize("method", ["scram-sha-256", "md5", "password"])
def test_user_missing_from_auth_file_gets_the_same_refusal(start_pooler, method):
    pooler = start_pooler(auth_method=method)
    assert_refused(pooler, "28P01", 'password authentication failed for user "nobody"',
                   user="nobody", password="guess")
    assert_serves(pooler, "alice")


def test_a_password_changed_in_auth_file_is_the_one_asked_for_after_reload(start_pooler):
    """A listener keeps the SCRAM keys of a plain auth_file password between logins; once the file
    says another password and the pooler has reloaded, that one logs in and the old one is refused."""
    pooler = start_pooler()
    for _ in range(4):   # more logins than listeners: each has the keys kept
        assert_serves(pooler)
    with open(pooler.auth_file) as f:
        before = f.read()
    after = before.replace(f'"app" "{USERS["app"]}"', '"app" "changed-secret"')
    assert after != before
    with open(pooler.auth_file, "w") as f:
        f.write(after)
    reloads = pooler.log().count(RELOADED)
    pooler.signal(signal.SIGHUP)
    # The postmaster tells every listener before it logs this, and hands them connections after.
    wait_for(lambda: pooler.log().count(RELOADED) > reloads, "the reload")
    for _ in range(4):
        with pooler.connect(password="changed-secret") as conn:
            assert conn.execute("SELECT current_user").fetchone() == ("app",)
    assert_refused(pooler, "28P01", 'password authentication failed for user "app"', password=USERS["app"])


def test_trust_needs_no_password(start_pooler):
    pooler = start_pooler(auth_method="trust")
    with pooler.connect("bob", password="") as conn:
        assert not conn.pgconn.used_password
        assert conn.execute("SELECT current_user").fetchone() == ("bob",)


# ================================================================ what the upstream refuses

def _children_titled(pooler, word: str) -> list[str]:
    titles = []
    for child in pooler.children():
        try:
            title = " ".join(child.cmdline())
        except psutil.Error:   # exited meanwhile
            continue
        if word in title:
            titles.append(title)
    return titles


def test_a_login_whose_settings_the_server_refuses_is_logged_with_the_reason(start_pooler):
    """The client got PostgreSQL's FATAL for a bad option, but the pooler's log had only
    'connection authorized' (found by a third exploratory run)."""
    pooler = start_pooler(session_pool_size=1)
    assert_refused(pooler, "22023", 'invalid value for parameter "work_mem"',
                   options="-c work_mem=banana")
    log_text = wait_for(lambda: (text := pooler.log()) and "login refused" in text and text,
                        "the refusal to be logged")
    assert 'app/app@127.0.0.1' in log_text and 'invalid value for parameter "work_mem"' in log_text
    assert_serves(pooler)


def test_a_dedicated_login_the_server_refuses_is_logged_with_the_reason(start_pooler):
    """The same for a dedicated backend (dedicated_databases): its refusal was not logged at all."""
    pooler = start_pooler(session_pool_size=1, dedicated_databases="other")
    assert_refused(pooler, "22023", 'invalid value for parameter "work_mem"',
                   dbname="other", options="-c work_mem=banana")
    log_text = wait_for(lambda: (text := pooler.log()) and "login refused" in text and text,
                        "the refusal to be logged")
    assert 'other/app@127.0.0.1' in log_text and 'invalid value for parameter "work_mem"' in log_text
    assert "SQLSTATE 22023" in log_text
    assert_serves(pooler)


def test_unknown_database_is_3D000_and_its_backend_goes_away(start_pooler):
    pooler = start_pooler(session_pool_size=1)
    assert_refused(pooler, "3D000", 'database "nosuchdb" does not exist', dbname="nosuchdb")
    assert_serves(pooler)
    # Titles are readable (else the check below would be void).
    assert _children_titled(pooler, "backend app/app")
    deadline = time.monotonic() + 10
    while _children_titled(pooler, "nosuchdb") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _children_titled(pooler, "nosuchdb") == []
    # The pool can be tried again and is refused again, not left broken.
    assert_refused(pooler, "3D000", 'database "nosuchdb" does not exist', dbname="nosuchdb")


def test_replication_connection_is_0A000(start_pooler):
    pooler = start_pooler()
    assert_refused(pooler, "0A000", "replication", replication="database")
    assert_serves(pooler)


# ================================================================ limits

def test_max_sessions_overflow_is_53300_until_one_leaves(start_pooler):
    pooler = start_pooler(session_pool_size=1, max_sessions=2)
    first, second = pooler.connect(), pooler.connect()
    try:
        assert server_pid(first) == server_pid(second)
        assert_refused(pooler, "53300", "too many")
        assert first.execute("SELECT 1").fetchone() == (1,)
        first.close()
        with connect_eventually(pooler) as third:
            assert server_pid(third) == server_pid(second)
    finally:
        first.close()
        second.close()


def test_max_connections_is_53300_too_many_clients(start_pooler):
    pooler = start_pooler(max_connections=3)
    held = [pooler.connect() for _ in range(3)]
    try:
        assert_refused(pooler, "53300", "sorry, too many clients already")
        assert [c.execute("SELECT 1").fetchone() for c in held] == [(1,)] * 3
        held.pop().close()
        with connect_eventually(pooler) as again:
            assert again.execute("SELECT 2").fetchone() == (2,)
    finally:
        for conn in held:
            conn.close()


# ================================================================ the startup packet, raw

def test_ssl_request_is_answered_N_then_startup_proceeds(start_pooler):
    pooler = start_pooler(auth_method="trust")
    with RawClient(pooler.port) as raw:
        raw.send(struct.pack("!ii", 8, protocol.SSL_REQUEST_CODE))
        assert raw.recv() == b"N"
        assert ready_status(raw.login()) == b"I"
        assert rows(raw.query("SELECT 40 + 2")) == [["42"]]


def test_gssenc_request_is_answered_N_then_startup_proceeds(start_pooler):
    pooler = start_pooler(auth_method="trust")
    with RawClient(pooler.port) as raw:
        raw.send(struct.pack("!ii", 8, protocol.GSSENC_REQUEST_CODE))
        assert raw.recv() == b"N"
        assert ready_status(raw.login()) == b"I"
        assert rows(raw.query("SELECT current_user")) == [["app"]]


def test_protocol_2_is_0A000(start_pooler):
    pooler = start_pooler()
    body = struct.pack("!i", 2 << 16) + b"user\0app\0database\0app\0\0"
    with RawClient(pooler.port) as raw:
        raw.send(_int32.pack(len(body) + 4) + body)
        fields = raw.error()
        assert fields["C"] == "0A000"
        assert "unsupported frontend protocol 2.0" in fields["M"]
        assert raw.closed()


@pytest.mark.parametrize("length", [4, 20000])
def test_invalid_startup_length_is_08P01(start_pooler, length):
    pooler = start_pooler()
    with RawClient(pooler.port) as raw:
        raw.send(struct.pack("!ii", length, protocol.PROTOCOL_3_0))
        fields = raw.error()
        assert fields["C"] == "08P01"
        assert "invalid length of startup packet" in fields["M"]
        assert raw.closed()
    assert_serves(pooler)


def test_startup_without_user_is_28000(start_pooler):
    pooler = start_pooler()
    with RawClient(pooler.port) as raw:
        raw.send(protocol.startup_message({"database": "app"}))
        fields = raw.error()
        assert fields["C"] == "28000"
        assert "no PostgreSQL user name specified" in fields["M"]
        assert raw.closed()


def test_protocol_3_2_is_negotiated_down_to_3_0(start_pooler):
    pooler = start_pooler()
    body = struct.pack("!i", (3 << 16) | 2) + b"user\0app\0database\0app\0\0"
    with RawClient(pooler.port) as raw:
        raw.send(_int32.pack(len(body) + 4) + body)
        msg_type, payload = raw.read()
        assert chr(msg_type) == "v"
        # The newest version as PostgreSQL sends it (3.0, whole), no options refused.
        assert struct.unpack("!ii", payload) == (3 << 16, 0)
        msg_type, payload = raw.read()
        assert (chr(msg_type), _int32.unpack_from(payload)[0]) == ("R", protocol.AUTH_SASL)


def test_libpq_asking_for_protocol_3_2_logs_in(start_pooler):
    """libpq 18 with max_protocol_version=3.2 (or latest) refused every login: the pooler's
    NegotiateProtocolVersion said version 0 ("server requested downgrade to pre-3.0"), where
    PostgreSQL says 3.0 (found by a third exploratory run)."""
    if psycopg.pq.version() < 180000:
        pytest.skip("libpq older than 18 has no max_protocol_version")
    pooler = start_pooler()
    with psycopg.connect(pooler.conninfo("app", "app") + " max_protocol_version=3.2") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.pgconn.protocol_version == 3


def test_silent_client_is_closed_after_authentication_timeout(start_pooler):
    pooler = start_pooler(authentication_timeout="2s")
    with RawClient(pooler.port, timeout=8) as raw:
        started = time.monotonic()
        assert raw.recv() == b""
        assert 1.5 < time.monotonic() - started < 5
    assert_serves(pooler)


def test_client_silent_during_authentication_gets_57014(start_pooler):
    pooler = start_pooler(authentication_timeout="2s")
    with RawClient(pooler.port, timeout=8) as raw:
        started = time.monotonic()
        raw.send(protocol.startup_message({"user": "app", "database": "app"}))
        fields = raw.error()
        assert 1.5 < time.monotonic() - started < 5
        assert fields["C"] == "57014"
        assert "authentication" in fields["M"]
        assert raw.closed()


# ================================================================ bad input after authentication

@pytest.mark.parametrize("garbage_first", [False, True], ids=["other-first", "garbage-first"])
def test_invalid_message_type_is_08P01_and_spares_the_shared_server_connection(start_pooler, garbage_first):
    # garbage-first: the offender is the session whose arrival started the pooled backend.
    pooler = start_pooler(auth_method="trust", session_pool_size=1)
    with RawClient(pooler.port, timeout=10) as raw:
        if garbage_first:
            assert ready_status(raw.login()) == b"I"
        with pooler.connect() as other:
            before = server_pid(other)
            if not garbage_first:
                assert ready_status(raw.login()) == b"I"
            raw.send(b"\x01" + struct.pack("!I", 4))
            fields = raw.error()
            assert fields["C"] == "08P01"
            assert "invalid frontend message type" in fields["M"]
            assert raw.closed()
            assert other.execute("SELECT 1").fetchone() == (1,)
            assert server_pid(other) == before


@pytest.mark.parametrize("in_transaction", [False, True], ids=["idle", "in-transaction"])
def test_client_vanishing_mid_message_does_not_disturb_others(start_pooler, in_transaction):
    pooler = start_pooler(auth_method="trust", session_pool_size=1)
    row_id = 700_000 + in_transaction
    with pooler.connect() as other:
        before = server_pid(other)
        with RawClient(pooler.port) as raw:
            assert ready_status(raw.login()) == b"I"
            if in_transaction:
                assert ready_status(raw.query("BEGIN")) == b"T"
                assert ready_status(raw.query(f"INSERT INTO items VALUES ({row_id}, 'half')")) == b"T"
            raw.send(protocol.query("SELECT 'never whole'")[:9])
        assert other.execute("SELECT 1").fetchone() == (1,)
        assert server_pid(other) == before
        assert other.execute("SELECT count(*) FROM items WHERE id = %s", (row_id,)).fetchone() == (0,)
        assert other.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
