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
from bisect import bisect_left

from ..shared import channel, log, process, protocol, status
from ..shared.errors import PgError
from . import server as srv
from .readies import BrokenStream, ReadyCounter
from .scheduler import ServerState
from .stream import EPOLLIN, EPOLLOUT, HIGH_WATER, READABLE, Stream

logger = log.get("dedicated")

class DedicatedBackend:
    def __init__(self, settings, conn_id: int, startup: dict[str, str], client_fd: int,
                 chan: socket.socket, counters, secret: str | None):
        self.settings = settings
        self.conn_id = conn_id
        self.chan = chan
        self.counters = counters
        self.client_sock = socket.socket(fileno=client_fd)
        self.client_sock.setblocking(False)
        self.key = int.from_bytes(os.urandom(4), "big") & 0x7FFFFFFF or 1
        self.epoll = select.epoll()
        startup = dict(startup)
        self.startup = startup
        self.connected = time.time()
        try:
            self.address = "%s:%s" % self.client_sock.getpeername()[:2]
        except (OSError, TypeError):
            self.address = ""
        self.server_conn = srv.ServerConnection(settings, startup, secret)
        self.greeting = bytearray()
        # SHOW STATS: the server's ReadyForQuery messages give queries and transactions; a
        # transaction's time runs from the client's first bytes after the session was idle.
        self.readies: ReadyCounter | None = ReadyCounter()
        self.xact_start: float | None = None

    def run(self) -> None:
        try:
            self._login()
        except PgError as exc:
            # As PostgreSQL logs the FATAL of a login it refuses (and the pooled backend does).
            logger.log(log.LOG, "%s: login refused: %s (SQLSTATE %s)",
                       log.session_label(self.conn_id, self.startup["database"], self.startup["user"],
                                         self.address), exc.text, exc.sqlstate)
            exc.severity = "FATAL"
            self._send_now(self.client_sock, exc.packet())
            return
        self.counters[status.SESSIONS] = 1
        try:
            self._relay()
        finally:
            if self.settings.log_disconnections:
                logger.log(log.LOG, "%s", log.disconnection(time.time() - self.connected,
                                                           self.startup["user"],
                                                           self.startup["database"], self.address))

    def _send_now(self, sock: socket.socket, data: bytes) -> None:
        try:
            sock.setblocking(True)
            sock.settimeout(5)
            sock.sendall(data)
        except OSError:
            pass

    # -------------------------------------------------------------- login

    def _login(self) -> None:
        """Connect and authenticate; relay the server's greeting with our cancel key."""
        conn = self.server_conn
        poller = select.epoll()
        poller.register(conn.fd, EPOLLOUT)
        poller.register(self.client_sock.fileno(), EPOLLIN)
        while conn.state is not ServerState.IDLE:
            timeout = conn.deadline - time.monotonic()
            if timeout <= 0:
                raise PgError("sqlclient_unable_to_establish_sqlconnection",
                              "timeout expired while connecting to upstream server")
            for fd, _mask in poller.poll(timeout):
                if fd == self.client_sock.fileno():
                    if not self.client_sock.recv(1, socket.MSG_PEEK):
                        raise PgError("connection_failure", "client closed the connection")
                    poller.unregister(fd)   # it speaks before its turn: later
                    continue
                if conn.state is ServerState.CONNECTING:
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
        if conn.inbuf:   # what followed the login's ReadyForQuery: counted like the rest
            self._count(False, bytes(conn.inbuf))
        self._send_now(self.client_sock, bytes(self.greeting))
        self.client_sock.setblocking(False)

    def _greeting_message(self, msg_type: int, payload: bytes) -> None:
        if msg_type == protocol.AUTHENTICATION:
            return   # the listener has said AuthenticationOk already
        if msg_type == protocol.BACKEND_KEY_DATA:
            self.greeting += protocol.backend_key_data(os.getpid(), self.key)
            return
        self.greeting += protocol.message(bytes([msg_type]), payload)

    # -------------------------------------------------------------- relay

    def _relay(self) -> None:
        """Bytes both ways through two streams; either side's end ends the session."""
        ep = self.epoll
        client = Stream(self.client_sock, ep)
        server = Stream(self.server_conn.sock, ep)
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
                    source.flush()
                    if source.broken:
                        return
                    if source.has_room():
                        target.resume_reading()
                if mask & READABLE:
                    data = source.recv()
                    if data is None:
                        continue
                    if not data:
                        if source is server:
                            self._send_now(self.client_sock, PgError(
                                "connection_failure", "server closed the connection unexpectedly").packet())
                        return
                    self._count(source is client, data)
                    target.send(data)
                    if target.broken:
                        return
                    if len(target.outbuf) > HIGH_WATER:
                        source.pause_reading()

    def _count(self, from_client: bool, data: bytes) -> None:
        """SHOW STATS's figures for the bytes relayed, into the status table slot."""
        counters = self.counters
        if from_client:
            counters[status.BYTES_IN] += len(data)
            if self.xact_start is None:
                self.xact_start = time.monotonic()
            return
        counters[status.BYTES_OUT] += len(data)
        readies = self.readies
        if readies is None:
            return
        before = readies.queries
        try:
            ended = readies.feed(data)
        except BrokenStream as exc:   # counting stops; the relay goes on
            logger.warning("%s: stopped counting its queries: the server sent %s",
                           log.session_label(self.conn_id, self.startup["database"],
                                             self.startup["user"], self.address), exc)
            self.readies = None
            return
        counters[status.QUERIES] += readies.queries - before
        if not ended:
            return
        # Several transactions may end in one piece (a client's pipeline): the first took the
        # time since the client's first bytes, the others none that can be told apart.
        start = self.xact_start
        seconds = time.monotonic() - start if start is not None else 0.0
        self.xact_start = None
        counters[status.TRANSACTIONS] += ended
        counters[status.XACT_US] += int(seconds * 1e6)
        # (The first bound the time does not exceed, as the pooled backend buckets it.)
        counters[status.XACT_HIST + bisect_left(status.HISTOGRAM_BOUNDS_S, seconds)] += 1
        if ended > 1:
            counters[status.XACT_HIST] += ended - 1

    def _on_channel(self) -> bool:
        while True:
            try:
                msg, _fd = channel.receive(self.chan)
            except BlockingIOError:
                return True
            if msg is None:
                return False
            if msg[0] == "cancel" and msg[2] == self.key:   # ("cancel", pid, key)
                family, addr = srv.upstream_address(self.settings)
                try:
                    with socket.socket(family, socket.SOCK_STREAM) as sock:
                        sock.settimeout(5)
                        sock.connect(addr)
                        sock.sendall(self.server_conn.cancel_packet())
                except OSError as exc:
                    logger.warning("connection %d (%s/%s): could not send cancel request: %s",
                                   self.conn_id, self.startup["database"], self.startup["user"], exc)
            elif msg[0] == "ask":
                _, token, what, argument = msg[:4]
                rows: list = []
                if what == "report":
                    host, _, port = self.address.rpartition(":")
                    rows = [{"id": self.conn_id, "address": host or "unix",
                             "port": int(port) if port.isdigit() else None,
                             "database": self.startup["database"], "user": self.startup["user"],
                             "application_name": self.startup.get("application_name", ""),
                             "backend_pid": os.getpid(), "state": "dedicated",
                             "connected": self.connected, "since": self.connected, "wait": 0.0,
                             "pinned": False},
                            {"session": False, "backend_pid": os.getpid(),
                             "server_pids": [self.server_conn.pid], "database": self.startup["database"],
                             "user": self.startup["user"]}]
                elif what == "kill" and argument == self.conn_id:
                    rows = [argument]
                try:
                    channel.send(self.chan, ("answer", token, rows))
                except OSError:
                    pass
                if rows and what == "kill":
                    logger.log(log.LOG, "connection %d (%s/%s): terminated by the admin console",
                               self.conn_id, self.startup["database"], self.startup["user"])
                    self._send_now(self.client_sock, PgError(
                        "admin_shutdown", "terminating connection due to administrator command").packet())
                    return False
            elif msg[0] == "shutdown" and msg[1] != "smart":
                self.server_conn.cancel_now(self.settings)   # nothing may go on running there
                self._send_now(self.client_sock, PgError(
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
