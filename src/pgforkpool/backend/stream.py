"""A backend's buffered socket: non-blocking reads, an output buffer with back-pressure, and its epoll interest.

Every byte a backend writes to a client or a server goes through Stream.send;
what the kernel does not take at once waits in the output buffer and leaves
with the next EPOLLOUT.  Errors become state (`broken`), never exceptions:
the read side sees the end of the connection and ends it once.
"""

import ctypes
import ctypes.util
import errno
import fcntl
import os
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
# What a pipe between two sockets holds (Stream.splice_in): the most an unprivileged
# process may ask for by default (fs.pipe-max-size); the kernel's 64 kB if refused.
PIPE_SIZE: Final = 1 << 20
_SPLICE_FLAGS: Final = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
# Stream.splice_in: the kernel refuses splice between these sockets (or at all).
SPLICE_REFUSED: Final = -2
_REFUSING: Final = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP)


class Stream:
    __slots__ = ("sock", "fd", "epoll", "mask", "outbuf", "broken", "grew", "pipe", "piped")

    def __init__(self, sock, epoll, mask: int = EPOLLIN):
        self.sock = sock
        self.fd = sock.fileno()
        self.epoll = epoll
        self.mask = mask
        self.outbuf = bytearray()
        self.broken = False      # a send failed: nothing more is sent
        self.grew = False        # the output buffer grew past LARGE_BUFFER
        self.pipe: tuple[int, int] | None = None   # (read end, write end) once splice_in is used
        self.piped = 0           # bytes in the pipe, not yet written: they leave before outbuf
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
        if self.outbuf or self.piped:
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

    def splice_in(self, source: int, most: int) -> int:
        """Move up to `most` bytes from the socket `source` to ours inside the kernel,
        through a pipe, without copying them here: a large message's body whose
        bytes the pooler need not read (splice(2); PgBouncer copies them instead).
        Only when nothing waits to be written.  What our socket does not take at
        once waits in the pipe and leaves first with the next EPOLLOUT (flush).
        Returns the bytes taken from `source`: 0 once it is at its end or broken,
        -1 if it has nothing now, SPLICE_REFUSED if the kernel will not (then
        the caller reads and sends them)."""
        pipe = self.pipe
        if pipe is None:
            try:
                pipe = self.pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:   # out of file descriptors, say
                return SPLICE_REFUSED
            try:
                fcntl.fcntl(pipe[1], fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass   # over the user's pipe quota: the default size does too
        try:
            taken = os.splice(source, pipe[1], most, flags=_SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            return -1
        except OSError as exc:
            return SPLICE_REFUSED if exc.errno in _REFUSING else 0
        self.piped += taken   # (0 before: only when nothing waits)
        self._drain_pipe()
        return taken

    def _drain_pipe(self) -> None:
        assert self.pipe is not None
        try:
            self.piped -= os.splice(self.pipe[0], self.fd, self.piped, flags=_SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.broken = True   # the read side sees the connection is gone
            self.piped = 0
            self.outbuf = bytearray()
        if self.piped:
            self._set(self.mask | EPOLLOUT)

    def flush(self) -> bool:
        """Write what waits (on EPOLLOUT); True once nothing waits."""
        if self.piped:
            self._drain_pipe()
            if self.piped:
                return False
            if not self.outbuf:
                self._set(self.mask & ~EPOLLOUT)
                return True
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

    def has_room(self) -> bool:
        """Little waits to be written (under LOW_WATER, the pipe empty): the side that
        produces for it, paused, may go on."""
        return not self.piped and len(self.outbuf) < LOW_WATER

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
        if self.piped and not self.broken:
            self._drain_pipe()   # (what follows in outbuf may not overtake it)
        if self.outbuf and not self.broken and not self.piped:
            try:
                self.sock.send(self.outbuf)
            except OSError:
                pass
        self.outbuf = bytearray()
        self.broken = True
        if self.pipe is not None:
            os.close(self.pipe[0])
            os.close(self.pipe[1])
            self.pipe = None
            self.piped = 0
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
