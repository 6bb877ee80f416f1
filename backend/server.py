"""A backend's connection to the upstream PostgreSQL server: non-blocking connect, login, state."""

import collections
import socket
import struct
import time

from ..shared import auth, protocol
from ..shared.errors import PgError

# States of a server connection, as PgBouncer names its SV_* states.
CONNECTING = "connecting"   # TCP/unix connect in progress
LOGIN = "login"             # startup packet sent, authenticating
IDLE = "idle"               # ready, no session owns it
ACTIVE = "active"           # a session owns it until ReadyForQuery 'I'
# Released while a cancel request sent for its last owner may still arrive: it
# serves nobody until the server has taken the request, or the signal could
# cancel the next session's query.
CANCEL_WAIT = "cancel wait"
CLOSED = "closed"

_two_int32 = struct.Struct("!ii")


def upstream_address(settings) -> tuple[int, object]:
    """(address family, address) of the upstream server, as libpq reads host/port."""
    host, port = settings.upstream_host, settings.upstream_port
    if host.startswith("/"):
        return socket.AF_UNIX, f"{host}/.s.PGSQL.{port}"
    family, _type, _proto, _name, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM)[0]
    return family, addr


class ServerConnection:
    """One server connection and its protocol state, driven by a backend's event loop."""

    __slots__ = ("sock", "fd", "state", "mask", "inbuf", "outbuf", "params", "pid", "key",
                 "owner", "context", "expect", "unsynced", "fixup", "held", "prepared", "parses",
                 "seg_sent", "seg_recv", "error_names", "pinned", "copy_in", "cancels",
                 "idle_status", "deadline", "_reader", "_auth", "_startup")

    def __init__(self, settings, startup: dict[str, str], secret: str | None):
        family, addr = upstream_address(settings)
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        if family != socket.AF_UNIX:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.fd = self.sock.fileno()
        self.state = CONNECTING
        self.mask = 0
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.params: dict[str, str] = {}   # ParameterStatus values currently in force
        self.pid = 0
        self.key = 0
        self.owner = None                   # the Session that owns the connection now
        # Session settings in force on the server now; None when unknown (a
        # session that changed settings vanished before they were read back).
        self.context: dict[str, str] | None = {}
        # One entry per ReadyForQuery still to come, in order: None for the
        # owner's own work, a HiddenQuery for a query the pooler sent itself.
        self.expect: collections.deque = collections.deque()
        self.unsynced = False               # extended-protocol messages sent since last Sync
        self.fixup = False                  # the owner ran RESET/DISCARD: re-apply its startup values
        self.held = b""                     # the owner's ReadyForQuery, held back during a fix-up
        # Named statements: server names prepared on this connection; one entry
        # per Parse sent whose ParseComplete is still to come; ReadyForQuery
        # messages sent and received (a Parse belongs to the segment that the
        # next ReadyForQuery closes); server names to show as the client's own
        # in the error of the current segment.
        self.prepared: set[bytes] = set()
        self.parses: collections.deque = collections.deque()
        self.seg_sent = 0
        self.seg_recv = 0
        self.error_names: dict[bytes, bytes] = {}
        # The session this connection belongs to alone (its state cannot be copied), or None.
        self.pinned = None
        self.copy_in = False                # COPY FROM STDIN in progress
        self.cancels = 0                    # cancel requests for it not yet taken by the server
        self.deadline = time.monotonic() + settings.upstream_connect_timeout
        self.idle_status = True            # the last ReadyForQuery said 'I'
        self._reader = protocol.MessageReader()
        self._auth = auth.ClientAuth(startup["user"], secret)
        self._startup = startup
        try:
            self.sock.connect(addr)
        except BlockingIOError:
            pass
        except OSError as exc:
            self.close()
            raise PgError("sqlclient_unable_to_establish_sqlconnection",
                          f"could not connect to upstream server: {exc.strerror or exc}")

    def connected(self) -> bytes:
        """Called when the socket turns writable in CONNECTING: the startup packet to send."""
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise PgError("sqlclient_unable_to_establish_sqlconnection",
                          f"could not connect to upstream server: {socket.errno.errorcode.get(err, err)}")
        self.state = LOGIN
        return protocol.startup_message(self._startup)

    def login(self, data: bytes, on_message=None) -> bytes:
        """Feed bytes received during LOGIN; returns bytes to send back.

        Sets state IDLE after ReadyForQuery.  on_message(type, payload) sees every
        message (the dedicated backend relays ParameterStatus and notices to its client).
        Raises PgError with the server's own error if it refuses us.
        """
        self._reader.feed(data)
        out = b""
        while self.state == LOGIN:
            item = self._reader.next()
            if item is None:
                break
            msg_type, payload = item
            if msg_type == protocol.AUTHENTICATION:
                code = struct.unpack_from("!i", payload)[0]
                if code != protocol.AUTH_OK:
                    out += self._auth.respond(code, payload[4:])
            elif msg_type == protocol.PARAMETER_STATUS:
                name, pos = protocol.read_cstring(payload, 0)
                value, _ = protocol.read_cstring(payload, pos)
                self.params[name] = value
            elif msg_type == protocol.BACKEND_KEY_DATA:
                self.pid, self.key = _two_int32.unpack(payload)
            elif msg_type == protocol.ERROR_RESPONSE:
                raise PgError.from_fields(protocol.parse_error_fields(payload))
            elif msg_type == protocol.READY_FOR_QUERY:
                self.state = IDLE
            if on_message is not None:
                on_message(msg_type, payload)
        if self.state == IDLE:
            # Whatever followed ReadyForQuery (nothing, normally) is ordinary traffic.
            self.inbuf = self._reader.buf
            self._reader = None
            self._auth = None
        return out

    def cancel_packet(self) -> bytes:
        return protocol.cancel_request(self.pid, self.key)

    def close(self) -> None:
        if self.state != CLOSED:
            self.state = CLOSED
            try:
                self.sock.close()
            except OSError:
                pass


class CancelSender:
    """A one-shot connection that delivers a CancelRequest for one server connection.

    PostgreSQL signals the server process and then closes the connection, so
    end of file here means the signal has been sent.
    """

    __slots__ = ("sock", "fd", "packet", "deadline", "server", "sent")

    def __init__(self, settings, server: ServerConnection):
        family, addr = upstream_address(settings)
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.fd = self.sock.fileno()
        self.packet = server.cancel_packet()
        self.server = server
        self.sent = False
        self.deadline = time.monotonic() + settings.upstream_connect_timeout
        try:
            self.sock.connect(addr)
        except BlockingIOError:
            pass
        except OSError:
            self.sock.close()
            raise

    def send(self) -> bool:
        """Send the request once connected; False if it could not be sent (nothing was signalled)."""
        try:
            if self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                return False
            self.sent = self.sock.send(self.packet) == len(self.packet)
        except OSError:
            self.sent = False
        return self.sent

    def taken(self) -> bool:
        """True once the server has closed the connection (the request is processed)."""
        try:
            return self.sock.recv(64) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True
