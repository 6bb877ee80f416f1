"""Named states of sessions and server connections, the wait queue, and the decision at a transaction boundary.

Everything that changes a session's or a server connection's state is a
method here; the pooled backend's event loop applies the I/O that follows.
"""

import collections
import enum
import time
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:   # typed, so that their attributes are native accesses when compiled
    from .server import ServerProtocol
    from .session import Session


class SessionState(enum.Enum):
    STARTING = "starting"     # handed over, not yet greeted (its context not yet applied)
    IDLE = "idle"             # between transactions, no input waiting
    WAITING = "waiting"       # has input to run, waits for the server connection
    ACTIVE = "active"         # owns the server connection
    RESTORING = "restoring"   # owns it; its settings are being put back before its input goes on
    CLOSED = "closed"


class ServerState(enum.Enum):
    """As PgBouncer names its SV_* states."""
    CONNECTING = "connecting"   # TCP/unix connect in progress
    LOGIN = "login"             # startup packet sent, authenticating
    IDLE = "idle"               # ready, no session owns it
    ACTIVE = "active"           # a session owns it until its transaction is over
    # Released while a cancel request sent for its last owner may still arrive:
    # it serves nobody until the server has taken the request, or the signal
    # could cancel the next session's query.
    CANCEL_WAIT = "cancel wait"
    CLOSED = "closed"


# Bound to module names: the methods below run for every transaction.
_monotonic = time.monotonic
_STARTING: Final = SessionState.STARTING
_IDLE: Final = SessionState.IDLE
_WAITING: Final = SessionState.WAITING
_ACTIVE: Final = SessionState.ACTIVE
_SERVER_IDLE: Final = ServerState.IDLE
_SERVER_ACTIVE: Final = ServerState.ACTIVE
_CANCEL_WAIT: Final = ServerState.CANCEL_WAIT


class Decision(enum.Enum):
    """What to do when every reply the owner awaited has come."""
    ROLLBACK = "rollback"       # the owner vanished inside a transaction
    PIN_CHECK = "pin check"     # ask the server whether uncopyable state exists
    FIXUP = "fixup"             # RESET/DISCARD: re-apply startup values, then pass on the ReadyForQuery
    KEEP = "keep"               # inside a transaction or a message: the owner keeps the connection
    CAPTURE = "capture"         # read back settings the owner may have changed
    HOLD = "hold"               # hold_prepared_transactions: nobody else runs here yet
    RELEASE = "release"         # the connection goes to the next session


def boundary_decision(*, gone: bool, in_transaction: bool, fixup: bool, dirty: bool,
                      pin_check: bool, pinned: bool, holding_xacts: bool,
                      mid_message: bool = False) -> Decision:
    """The decision table at a transaction boundary, first matching row wins.

    mid_message: the owner's client has sent part of a message that is passed on as it comes
    (a CopyData outside COPY, which nothing answers): the server is reading it, so nothing
    else may be sent on the connection, the pooler's own queries included, until it is whole.
    """
    if gone:
        if in_transaction:
            return Decision.ROLLBACK
        if pin_check and not pinned:
            return Decision.PIN_CHECK      # its state dies with the connection if it exists
        return Decision.RELEASE
    if mid_message:
        return Decision.KEEP
    if fixup:
        return Decision.FIXUP
    if in_transaction:
        return Decision.KEEP
    if dirty:
        return Decision.CAPTURE
    if pin_check:
        return Decision.PIN_CHECK
    if holding_xacts and not pinned:
        return Decision.HOLD
    return Decision.RELEASE


class Scheduler:
    """The sessions waiting for the shared server connection, and every state change."""

    def __init__(self) -> None:
        self.queue: collections.deque = collections.deque()

    def waiting(self) -> int:
        return len(self.queue)

    def wait(self, session: "Session") -> None:
        """The session has input to run, or is yet to be greeted, and no connection: it queues."""
        if session.state is not _STARTING:
            session.state = _WAITING
        session.since = _monotonic()
        self.queue.append(session)

    def first_in_line(self, session) -> None:
        """A waiting session goes to the head of the queue (it had waited longest: a move that
        came back)."""
        self.queue.remove(session)
        self.queue.appendleft(session)

    def next_waiting(self) -> "Session | None":
        """The first session still waiting, taken from the queue (None if there is none)."""
        queue = self.queue
        while queue:
            session = queue.popleft()
            if session.state is _WAITING or session.state is _STARTING:
                return session
        return None

    def forget(self, session) -> None:
        if session.state is _WAITING or session.state is _STARTING:
            try:
                self.queue.remove(session)
            except ValueError:
                pass

    def drop_wait(self, session) -> None:
        """Its request was answered unrun (query_wait_timeout, a cancel): out of the queue, idle again."""
        self.forget(session)
        session.state = _IDLE
        session.quiet_since = time.monotonic()   # (idle_session_timeout counts from here)

    @staticmethod
    def assign(server: "ServerProtocol", session: "Session", restoring: bool = False) -> None:
        server.owner = session
        server.state = _SERVER_ACTIVE
        server.reported = session.context.reported
        session.state = SessionState.RESTORING if restoring else _ACTIVE

    @staticmethod
    def wait_own(session) -> None:
        """A pinned session with input waits for its own connection (a cancel is in flight there)."""
        session.state = _WAITING

    @staticmethod
    def restored(session) -> None:
        """Its context is on the server (and it is greeted): its input goes on."""
        session.state = _ACTIVE

    @staticmethod
    def release(server: "ServerProtocol") -> "Session | None":
        """The owner's turn is over; returns the former owner."""
        session = server.owner
        server.owner = None
        server.reported = server.pinned.context.reported if server.pinned is not None else None
        server.state = _CANCEL_WAIT if server.cancels else _SERVER_IDLE
        if session is not None and session.state is _ACTIVE:
            session.state = _IDLE
        return session

    @staticmethod
    def ready(server) -> None:
        """Logged in, or every cancel request for it was taken: it may serve."""
        server.state = _SERVER_IDLE

    @staticmethod
    def greeted(session) -> None:
        if session.state is _STARTING:
            session.state = _IDLE
            session.quiet_since = time.monotonic()

    @staticmethod
    def pin(server, session) -> None:
        session.pinned = server
        server.pinned = session

    @staticmethod
    def unpin(session):
        server = session.pinned
        session.pinned = None
        server.pinned = None
        server.owner = None
        server.reported = None
        if session.state is _ACTIVE:
            session.state = _IDLE
            session.quiet_since = time.monotonic()
        return server

    def close(self, session) -> None:
        self.forget(session)
        session.state = SessionState.CLOSED
        session.gone = True
