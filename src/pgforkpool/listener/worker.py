"""The listener worker: reads startup packets and authenticates clients for the postmaster.

It serves many connections at once, each a small state machine driven by one
epoll loop, so a slow or silent client delays nobody else.  A finished
connection goes back to the postmaster as its socket plus startup parameters.
"""

import os
import select
import signal
import socket
import struct
import time

from ..shared import auth, channel, log, process, protocol
from ..shared.errors import PgError

logger = log.get("listener")

# States of a connection in startup.
READ_STARTUP = "read startup packet"
AUTHENTICATING = "authenticating"

_two_int32 = struct.Struct("!ii")


class StartupConnection:
    __slots__ = ("conn_id", "sock", "fd", "state", "buf", "deadline", "reject",
                 "params", "auth", "negotiated_ssl", "negotiated_gss", "peer")

    def __init__(self, conn_id: int, sock: socket.socket, deadline: float, reject: str | None):
        self.conn_id = conn_id
        self.sock = sock
        self.fd = sock.fileno()
        self.state = READ_STARTUP
        self.buf = bytearray()
        self.deadline = deadline
        self.reject = reject
        self.params: dict[str, str] = {}
        self.auth: auth.ServerAuth | None = None
        self.negotiated_ssl = False
        self.negotiated_gss = False
        self.peer = ""


class Listener:
    def __init__(self, number: int, settings, chan: socket.socket):
        self.number = number
        self.settings = settings
        self.chan = chan
        self.epoll = select.epoll()
        self.conns: dict[int, StartupConnection] = {}
        self.auth_entries = self._load_auth_file(settings)
        self.running = True

    @staticmethod
    def _load_auth_file(settings) -> dict[str, str]:
        try:
            return auth.load_auth_file(settings.auth_file)
        except auth.AuthFileError as exc:
            logger.error("%s", exc)
            return {}

    # ---------------------------------------------------------------- loop

    def run(self) -> None:
        self.chan.setblocking(False)
        self.epoll.register(self.chan.fileno(), select.EPOLLIN)
        while self.running or self.conns:
            timeout = self._next_timeout()
            for fd, _events in self.epoll.poll(timeout):
                if fd == self.chan.fileno():
                    self._read_channel()
                else:
                    conn = self.conns.get(fd)
                    if conn is not None:
                        self._read_client(conn)
            self._expire(time.monotonic())
            if not self.running:
                for conn in list(self.conns.values()):
                    self._fail(conn, PgError("admin_shutdown",
                                             "terminating connection due to administrator command"))

    def _next_timeout(self) -> float:
        if not self.conns:
            return -1
        soonest = min(c.deadline for c in self.conns.values())
        return max(0.0, soonest - time.monotonic())

    def _expire(self, now: float) -> None:
        for conn in [c for c in self.conns.values() if c.deadline <= now]:
            if conn.state == READ_STARTUP and not conn.buf:
                # PostgreSQL closes silently when no startup packet arrives in time.
                self._close(conn)
            else:
                self._fail(conn, PgError("query_canceled", "canceling authentication due to timeout"))

    def _read_channel(self) -> None:
        while True:
            try:
                msg, fd = channel.receive(self.chan)
            except BlockingIOError:
                return
            if msg is None:  # the postmaster is gone
                os._exit(1)
            kind = msg[0]
            if kind == "connection":
                _, conn_id, reject = msg
                sock = socket.socket(fileno=fd)
                sock.setblocking(False)
                conn = StartupConnection(conn_id, sock,
                                         time.monotonic() + self.settings.authentication_timeout, reject)
                conn.peer = peer_text(sock)
                if self.settings.log_connections:
                    logger.log(log.LOG, "connection received: %s", conn.peer)
                self.conns[conn.fd] = conn
                self.epoll.register(conn.fd, select.EPOLLIN)
            elif kind == "reload":
                self.settings = msg[1]
                self.auth_entries = self._load_auth_file(self.settings)
            elif kind == "shutdown":
                self.running = False

    # ---------------------------------------------------------------- one connection

    def _read_client(self, conn: StartupConnection) -> None:
        try:
            data = conn.sock.recv(16384)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        conn.buf += data
        try:
            while conn.fd in self.conns and self._step(conn):
                pass
        except PgError as exc:
            self._fail(conn, exc)
        except auth.AuthFailed as exc:
            if exc.log_detail:
                logger.log(log.LOG, "%s", exc.log_detail)
            self._fail(conn, exc.error)

    def _step(self, conn: StartupConnection) -> bool:
        """Consume one packet from conn.buf if whole; True if another may follow."""
        if conn.state == READ_STARTUP:
            return self._startup_packet(conn)
        return self._auth_message(conn)

    def _startup_packet(self, conn: StartupConnection) -> bool:
        buf = conn.buf
        if len(buf) < 4:
            return False
        length = struct.unpack_from("!i", buf)[0]
        if length < 8 or length > protocol.MAX_STARTUP_PACKET_LENGTH:
            raise PgError("protocol_violation", "invalid length of startup packet")
        if len(buf) < length:
            return False
        code = struct.unpack_from("!i", buf, 4)[0]
        body = bytes(buf[8:length])
        del buf[:length]

        if code in (protocol.SSL_REQUEST_CODE, protocol.GSSENC_REQUEST_CODE):
            if buf:  # bytes after the request could not have been encrypted by the client
                raise PgError("protocol_violation", "received unencrypted data after SSL request")
            attr = "negotiated_ssl" if code == protocol.SSL_REQUEST_CODE else "negotiated_gss"
            if getattr(conn, attr):
                raise PgError("protocol_violation", "duplicate encryption request")
            setattr(conn, attr, True)
            self._send(conn, b"N")
            return False
        if code == protocol.CANCEL_REQUEST_CODE:
            if len(body) == 8:
                pid, key = _two_int32.unpack(body)
                channel.send(self.chan, ("cancel", conn.conn_id, pid, key))
            self._close(conn)
            return False

        major, minor = code >> 16, code & 0xFFFF
        if major != 3:
            raise PgError("feature_not_supported",
                          f"unsupported frontend protocol {major}.{minor}: "
                          "server supports 3.0 to 3.0")
        try:
            params = protocol.parse_startup_params(body)
        except (ValueError, UnicodeDecodeError):
            raise PgError("protocol_violation",
                          "invalid startup packet layout: expected terminator as last byte")
        unsupported = [name for name in params if name.startswith("_pq_.")]
        for name in unsupported:
            del params[name]
        if minor > 0 or unsupported:
            self._send(conn, protocol.negotiate_protocol_version(unsupported))
        if not params.get("user"):
            raise PgError("invalid_authorization_specification",
                          "no PostgreSQL user name specified in startup packet")
        if params.get("replication", "false").lower() not in ("false", "off", "no", "0"):
            raise PgError("feature_not_supported",
                          "replication connections are not supported by pgforkpool")
        params.setdefault("database", params["user"])
        if not params["database"]:
            params["database"] = params["user"]
        conn.params = params
        if conn.reject == "too_many_connections":
            raise PgError("too_many_connections", "sorry, too many clients already")
        if conn.reject == "cannot_connect_now":
            raise PgError("cannot_connect_now", "the database system is shutting down")

        user = params["user"]
        conn.auth = auth.ServerAuth(self.settings.auth_method, user, self.auth_entries.get(user))
        first = conn.auth.start()
        if conn.auth.done:
            self._authenticated(conn)
            return False
        self._send(conn, first)
        conn.state = AUTHENTICATING
        return bool(conn.buf)

    def _auth_message(self, conn: StartupConnection) -> bool:
        buf = conn.buf
        if len(buf) < 5:
            return False
        msg_type = buf[0]
        length = struct.unpack_from("!I", buf, 1)[0]
        if msg_type != protocol.PASSWORD_MESSAGE:
            raise PgError("protocol_violation",
                          f"expected password response, got message type {msg_type}")
        if length < 4 or length > protocol.MAX_STARTUP_PACKET_LENGTH:
            raise PgError("protocol_violation", "invalid message length")
        if len(buf) < length + 1:
            return False
        payload = bytes(buf[5:length + 1])
        del buf[:length + 1]
        reply = conn.auth.feed(payload)
        if reply:
            self._send(conn, reply)
        if conn.auth.done:
            self._authenticated(conn)
            return False
        return bool(conn.buf)

    def _authenticated(self, conn: StartupConnection) -> None:
        if conn.buf:
            raise PgError("protocol_violation", "unexpected data after authentication")
        self._send(conn, protocol.AUTHENTICATION_OK)
        if self.settings.log_connections:
            params = conn.params
            logger.log(log.LOG, "connection authorized: user=%s database=%s application_name=%s",
                       params["user"], params["database"], params.get("application_name", ""))
        self._forget(conn)
        channel.send(self.chan, ("startup", conn.conn_id, conn.params), conn.fd)
        conn.sock.close()

    # ---------------------------------------------------------------- endings

    def _send(self, conn: StartupConnection, data: bytes) -> None:
        # Startup replies are a few hundred bytes to a fresh socket: they fit in
        # its send buffer, so a short write means the client is misbehaving.
        try:
            sent = conn.sock.send(data)
        except OSError:
            sent = -1
        if sent != len(data):
            raise PgError("connection_failure", "could not send data to client")

    def _fail(self, conn: StartupConnection, error: PgError) -> None:
        if conn.fd not in self.conns:
            return
        if error.sqlstate in ("28P01", "28000"):
            logger.log(log.LOG, "%s (user \"%s\", database \"%s\")", error.text,
                       conn.params.get("user", ""), conn.params.get("database", ""))
        elif error.sqlstate == "08P01":
            logger.log(log.LOG, "connection %d (%s): protocol violation: %s", conn.conn_id,
                       conn.peer or "?", error.text)
        try:
            conn.sock.send(error.packet())
        except OSError:
            pass
        self._close(conn)

    def _forget(self, conn: StartupConnection) -> None:
        del self.conns[conn.fd]
        self.epoll.unregister(conn.fd)

    def _close(self, conn: StartupConnection) -> None:
        if conn.fd not in self.conns:
            return
        self._forget(conn)
        conn.sock.close()
        channel.send(self.chan, ("closed", conn.conn_id))


def peer_text(sock: socket.socket) -> str:
    """host=… port=… as PostgreSQL's log_connections words it ([local] for a unix socket)."""
    if sock.family == socket.AF_UNIX:
        return "host=[local]"
    try:
        host, port = sock.getpeername()[:2]
    except OSError:
        return "host=?"
    return f"host={host} port={port}"


def main(number: int, settings, chan: socket.socket) -> None:
    """Entry point in the forked listener process."""
    process.set_title(f"listener {number}")
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the postmaster says when to stop
    Listener(number, settings, chan).run()
    os._exit(0)
