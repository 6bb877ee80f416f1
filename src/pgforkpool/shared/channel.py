"""Message channels between pgforkpool processes, carrying client sockets by SCM_RIGHTS.

Every hand-off of a client socket between roles goes through this module, so
the day a socket needs more than its fd to follow it (TLS), one place changes.
"""

import errno
import os
import pickle
import socket
from collections import deque

# One datagram carries one message: a pickled tuple, optionally with fds.
MAX_MESSAGE = 1 << 20
# Messages an Outbox keeps for a child that does not read its channel; past this, a send fails.
OUTBOX_LIMIT = 4096
# A send's errors that mean the child has gone (its end of the channel is closed).
GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ECONNREFUSED, errno.ENOTCONN, errno.EBADF})


class Undeliverable(Exception):
    """A message kept in an Outbox that the channel refused for itself (too large, too many
    sockets in flight) while the child is alive: dropped, its socket closed."""

    def __init__(self, kind: str, argument, error: OSError):
        super().__init__(f'"{kind}": {error}')
        self.kind = kind
        self.argument = argument   # the message's second field (a connection id for most)
        self.error = error


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of SOCK_SEQPACKET sockets: message boundaries are kept."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_MESSAGE)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, MAX_MESSAGE)
    return a, b


def send(chan: socket.socket, message: tuple, fd: int | None = None) -> None:
    """Send one message (a picklable tuple), optionally passing one file descriptor."""
    _send_data(chan, pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL), fd)


def _send_data(chan: socket.socket, data: bytes, fd: int | None) -> None:
    if fd is None:
        chan.sendall(data)   # one datagram: whole, or BlockingIOError on a full channel
    else:
        socket.send_fds(chan, [data], [fd])


class Outbox:
    """The postmaster's messages for one child, in order, past a moment when its channel is full.

    The postmaster never blocks on a child.  A message that finds the channel full (the
    child stopped or busy while thousands of messages came for it) waits here, and so does
    every later one, so that a child sees its messages in the order they were sent: a
    session before the shutdown that follows it.  A queued message's socket is a
    duplicate the outbox owns until the message is sent or discarded, so the caller
    closes its own copy as after any send.
    """

    __slots__ = ("queue", "limit")

    def __init__(self, limit: int = OUTBOX_LIMIT) -> None:
        self.queue: deque[tuple[bytes, int | None, tuple]] = deque()
        self.limit = limit

    def __len__(self) -> int:
        return len(self.queue)

    def send(self, chan: socket.socket, message: tuple, fd: int | None = None) -> bool:
        """Send the message now, or keep it behind those already kept.  True when it was
        kept (the caller watches the channel for room and calls flush).  Raises OSError
        if the channel is broken (the child has gone) or the outbox is full."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        if not self.queue:
            try:
                _send_data(chan, data, fd)
                return False
            except BlockingIOError:
                pass
        if len(self.queue) >= self.limit:
            raise OSError(errno.ENOBUFS, f"{len(self.queue)} messages already wait for the channel")
        self.queue.append((data, None if fd is None else os.dup(fd), message[:2]))
        return True

    def flush(self, chan: socket.socket) -> bool:
        """Send what the channel has room for, in order; True once nothing is kept.
        Raises OSError if the child has gone (discard then), Undeliverable if the channel
        refused the first message for itself (it is dropped: call flush again)."""
        queue = self.queue
        while queue:
            data, fd, head = queue[0]
            try:
                _send_data(chan, data, fd)
            except BlockingIOError:
                return False
            except OSError as exc:
                if exc.errno in GONE:
                    raise
                queue.popleft()
                if fd is not None:
                    os.close(fd)
                raise Undeliverable(head[0], head[1] if len(head) > 1 else None, exc) from exc
            queue.popleft()
            if fd is not None:
                os.close(fd)
        return True

    def discard(self) -> int:
        """Drop what is kept (the child has gone, or this is a new child's copy after fork):
        the sockets' duplicates are closed.  Returns how many messages were dropped."""
        dropped = len(self.queue)
        while self.queue:
            _data, fd, _head = self.queue.popleft()
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        return dropped


def receive(chan: socket.socket) -> tuple[tuple | None, int | None]:
    """(message, fd or None); (None, None) when the peer has closed the channel.

    Raises BlockingIOError when a non-blocking channel has nothing to read.
    """
    data, fds, _flags, _addr = socket.recv_fds(chan, MAX_MESSAGE, 2)
    if not data:
        for extra in fds:
            os.close(extra)
        return None, None
    for extra in fds[1:]:
        os.close(extra)
    return pickle.loads(data), (fds[0] if fds else None)
