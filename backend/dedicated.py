"""The dedicated backend: one client, one server connection of its own, bytes relayed both ways.

Used for dedicated_databases and dedicated_users, as Postgres Pro spawns a
separate backend for them.  The client's own startup packet goes to the server,
so nothing about the session is shared; the pooler only keeps the cancel key
its own (the postmaster routes cancel requests by the pid in it).
"""

import os
import select
import signal
import socket
import time

from ..shared import channel, log, process, protocol, status
from ..shared.errors import PgError
from . import server as srv

logger = log.get("dedicated")

EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
HIGH_WATER = 1 << 20


class Endpoint:
    """One side of the relay: a socket, what is waiting to be written to it, its epoll mask."""

    __slots__ = ("sock", "fd", "outbuf", "mask")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.fd = sock.fileno()
        self.outbuf = bytearray()
        self.mask = EPOLLIN


class DedicatedBackend:
    def __init__(self, settings, conn_id: int, startup: dict[str, str], client_fd: int,
                 chan: socket.socket, counters, secret: str | None):
        self.settings = settings
        self.conn_id = conn_id
        self.chan = chan
        self.counters = counters
        self.client = Endpoint(socket.socket(fileno=client_fd))
        self.client.sock.setblocking(False)
        self.key = int.from_bytes(os.urandom(4), "big") & 0x7FFFFFFF or 1
        self.epoll = select.epoll()
        startup = dict(startup)
        self.server_conn = srv.ServerConnection(settings, startup, secret)
        self.server = Endpoint(self.server_conn.sock)
        self.greeting = bytearray()

    def run(self) -> None:
        try:
            self._login()
        except PgError as exc:
            exc.severity = "FATAL"
            self._send_now(self.client, exc.packet())
            return
        self.counters[status.SESSIONS] = 1
        self._relay()

    def _send_now(self, end: Endpoint, data: bytes) -> None:
        try:
            end.sock.setblocking(True)
            end.sock.settimeout(5)
            end.sock.sendall(data)
        except OSError:
            pass

    # -------------------------------------------------------------- login

    def _login(self) -> None:
        """Connect and authenticate; relay the server's greeting with our cancel key."""
        conn = self.server_conn
        poller = select.epoll()
        poller.register(conn.fd, EPOLLOUT)
        poller.register(self.client.fd, EPOLLIN)
        while conn.state != srv.IDLE:
            timeout = conn.deadline - time.monotonic()
            if timeout <= 0:
                raise PgError("sqlclient_unable_to_establish_sqlconnection",
                              "timeout expired while connecting to upstream server")
            for fd, _mask in poller.poll(timeout):
                if fd == self.client.fd:
                    if not self.client.sock.recv(1, socket.MSG_PEEK):
                        raise PgError("connection_failure", "client closed the connection")
                    poller.unregister(self.client.fd)   # it speaks before its turn: later
                    continue
                if conn.state == srv.CONNECTING:
                    conn.sock.sendall(conn.connected())
                    poller.modify(conn.fd, EPOLLIN)
                    conn.sock.setblocking(True)
                    conn.sock.settimeout(max(0.1, conn.deadline - time.monotonic()))
                    continue
                try:
                    data = conn.sock.recv(65536)
                except OSError as exc:
                    raise PgError("sqlclient_unable_to_establish_sqlconnection",
                                  f"could not receive data from upstream server: {exc}")
                if not data:
                    raise PgError("sqlclient_unable_to_establish_sqlconnection",
                                  "upstream server closed the connection during login")
                reply = conn.login(data, self._greeting_message)
                if reply:
                    conn.sock.sendall(reply)
        poller.close()
        conn.sock.setblocking(False)
        self.greeting += bytes(conn.inbuf)
        self._send_now(self.client, bytes(self.greeting))
        self.client.sock.setblocking(False)

    def _greeting_message(self, msg_type: int, payload: bytes) -> None:
        if msg_type == protocol.AUTHENTICATION:
            return   # the listener has said AuthenticationOk already
        if msg_type == protocol.BACKEND_KEY_DATA:
            self.greeting += protocol.backend_key_data(os.getpid(), self.key)
            return
        self.greeting += protocol.message(bytes([msg_type]), payload)

    # -------------------------------------------------------------- relay

    def _relay(self) -> None:
        ep = self.epoll
        client, server = self.client, self.server
        ep.register(client.fd, EPOLLIN)
        ep.register(server.fd, EPOLLIN)
        self.chan.setblocking(False)
        ep.register(self.chan.fileno(), EPOLLIN)
        peer = {client.fd: (client, server), server.fd: (server, client)}
        while True:
            for fd, mask in ep.poll():
                if fd == self.chan.fileno():
                    if not self._on_channel():
                        return
                    continue
                source, target = peer[fd]
                if mask & EPOLLOUT:
                    if not self._flush(source, peer):
                        return
                if mask & (EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    try:
                        data = source.sock.recv(65536)   # see pooled.RECV_SIZE
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        if source is server:
                            self._send_now(client, PgError(
                                "connection_failure", "server closed the connection unexpectedly").packet())
                        return
                    if not self._write(target, data, source):
                        return

    def _write(self, target: Endpoint, data: bytes, source: Endpoint) -> bool:
        if not target.outbuf:
            try:
                sent = target.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                return False
            if sent == len(data):
                return True
            data = data[sent:]
        target.outbuf += data
        self._set_mask(target, target.mask | EPOLLOUT)
        if len(target.outbuf) > HIGH_WATER:
            self._set_mask(source, source.mask & ~EPOLLIN)
        return True

    def _flush(self, end: Endpoint, peer) -> bool:
        try:
            sent = end.sock.send(end.outbuf)
        except BlockingIOError:
            return True
        except OSError:
            return False
        del end.outbuf[:sent]
        if not end.outbuf:
            self._set_mask(end, end.mask & ~EPOLLOUT)
            other = peer[end.fd][1]
            self._set_mask(other, other.mask | EPOLLIN)
        return True

    def _set_mask(self, end: Endpoint, mask: int) -> None:
        if end.mask != mask:
            end.mask = mask
            self.epoll.modify(end.fd, mask)

    def _on_channel(self) -> bool:
        while True:
            try:
                msg, _fd = channel.receive(self.chan)
            except BlockingIOError:
                return True
            if msg is None:
                return False
            if msg[0] == "cancel" and msg[1] == self.key:
                family, addr = srv.upstream_address(self.settings)
                try:
                    with socket.socket(family, socket.SOCK_STREAM) as sock:
                        sock.settimeout(5)
                        sock.connect(addr)
                        sock.sendall(self.server_conn.cancel_packet())
                except OSError as exc:
                    logger.warning("could not send cancel request: %s", exc)
            elif msg[0] == "shutdown" and msg[1] != "smart":
                self._send_now(self.client, PgError(
                    "admin_shutdown", "terminating connection due to administrator command").packet())
                return False


def main(settings, conn_id: int, startup: dict[str, str], client_fd: int,
         chan: socket.socket, counters, secret: str | None) -> None:
    """Entry point in the forked dedicated-backend process."""
    process.set_title(f"dedicated backend {startup['database']}/{startup['user']}")
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        DedicatedBackend(settings, conn_id, startup, client_fd, chan, counters, secret).run()
    except PgError as exc:   # could not even start connecting
        sock = socket.socket(fileno=client_fd)
        exc.severity = "FATAL"
        try:
            sock.send(exc.packet())
        except OSError:
            pass
    os._exit(0)
