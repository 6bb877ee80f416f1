"""Message channels between pgforkpool processes, carrying client sockets by SCM_RIGHTS.

Every hand-off of a client socket between roles goes through this module, so
the day a socket needs more than its fd to follow it (TLS), one place changes.
"""

import os
import pickle
import socket

# One datagram carries one message: a pickled tuple, optionally with fds.
MAX_MESSAGE = 1 << 20


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair of SOCK_SEQPACKET sockets: message boundaries are kept."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_MESSAGE)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, MAX_MESSAGE)
    return a, b


def send(chan: socket.socket, message: tuple, fd: int | None = None) -> None:
    """Send one message (a picklable tuple), optionally passing one file descriptor."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    if fd is None:
        chan.sendall(data)
    else:
        socket.send_fds(chan, [data], [fd])


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
