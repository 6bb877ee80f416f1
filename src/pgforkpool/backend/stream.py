"""A backend's buffered socket: non-blocking reads, an output buffer with back-pressure, and its epoll interest.

Every byte a backend writes to a client or a server goes through Stream.send;
what the kernel does not take at once waits in the output buffer and leaves
with the next EPOLLOUT.  Errors become state (`broken`), never exceptions:
the read side sees the end of the connection and ends it once.
"""

import ctypes
import ctypes.util
import select
from typing import Final

EPOLLIN: Final = select.EPOLLIN
EPOLLOUT: Final = select.EPOLLOUT
READABLE: Final = EPOLLIN | select.EPOLLHUP | select.EPOLLERR

# Bytes asked of one recv(). Larger buffers cost more than they save: CPython
# allocates the whole size and shrinks it, and past 128 kB each call makes the
# allocator trim and regrow the heap (measured: 15 µs against 2 µs per call).
RECV_SIZE: Final = 65536
# Buffered output beyond which the producing side is paused, and below which it goes on.
HIGH_WATER: Final = 1 << 20
LOW_WATER: Final = 1 << 18
# Output buffers that grew past this are dropped when drained, and memory is
# handed back to the system afterwards (see release_memory).
LARGE_BUFFER: Final = 1 << 22


class Stream:
    __slots__ = ("sock", "fd", "epoll", "mask", "outbuf", "broken", "grew")

    def __init__(self, sock, epoll, mask: int = EPOLLIN):
        self.sock = sock
        self.fd = sock.fileno()
        self.epoll = epoll
        self.mask = mask
        self.outbuf = bytearray()
        self.broken = False      # a send failed: nothing more is sent
        self.grew = False        # the output buffer grew past LARGE_BUFFER
        epoll.register(self.fd, mask)

    def recv(self) -> bytes | None:
        """What the socket has: None if nothing now, b"" once the connection is gone."""
        try:
            return self.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return None
        except InterruptedError:
            return None
        except OSError:
            return b""

    def send(self, data) -> None:
        if self.broken:
            return
        if self.outbuf:
            self.outbuf += data
            if len(self.outbuf) > LARGE_BUFFER:
                self.grew = True
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.broken = True   # the read side sees the connection is gone
            return
        if sent < len(data):
            self.outbuf += memoryview(data)[sent:]
            self._set(self.mask | EPOLLOUT)

    def flush(self) -> bool:
        """Write what waits (on EPOLLOUT); True once nothing waits."""
        try:
            sent = self.sock.send(self.outbuf)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            self.broken = True
            self.outbuf = bytearray()
            self._set(self.mask & ~EPOLLOUT)
            return True
        del self.outbuf[:sent]
        if self.outbuf:
            return False
        if self.grew:
            self.outbuf = bytearray()
        self._set(self.mask & ~EPOLLOUT)
        return True

    def pause_reading(self) -> None:
        self._set(self.mask & ~EPOLLIN)

    def resume_reading(self) -> None:
        self._set(self.mask | EPOLLIN)

    def _set(self, mask: int) -> None:
        if mask != self.mask:
            self.mask = mask
            try:
                self.epoll.modify(self.fd, mask)
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        """Best effort for what is still buffered (a last error message), then close."""
        try:
            self.epoll.unregister(self.fd)
        except (OSError, ValueError):
            pass
        if self.outbuf and not self.broken:
            try:
                self.sock.send(self.outbuf)
            except OSError:
                pass
        self.outbuf = bytearray()
        self.broken = True
        try:
            self.sock.close()
        except OSError:
            pass


_libc: "ctypes.CDLL | bool | None" = None


def release_memory() -> None:
    """Hand freed heap memory back to the system after large messages (glibc keeps it otherwise)."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _libc = False
    if isinstance(_libc, ctypes.CDLL):
        _libc.malloc_trim(0)
