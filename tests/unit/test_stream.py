"""Stream.splice_in: a streamed message's body moved between two sockets inside the kernel.

Real socket pairs and a real epoll, no pooler: what reaches the far end is exactly
what was spliced and sent, in the order it was, however little the far end takes
at a time; the end of the source, a source with nothing yet, a broken far end and
a source the kernel will not splice from are told apart.
"""

import os
import select
import socket

from hypothesis import given, settings, strategies as st

from pgforkpool.backend.stream import EPOLLOUT, SPLICE_REFUSED, Stream


def _pair(sndbuf: int | None = None) -> tuple[socket.socket, socket.socket]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    theirs.setblocking(False)
    if sndbuf is not None:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sndbuf)
    return ours, theirs


def _read_all(sock: socket.socket, limit: int = 1 << 30) -> bytes:
    out = bytearray()
    while len(out) < limit:
        try:
            data = sock.recv(min(1 << 16, limit - len(out)))
        except BlockingIOError:
            break
        if not data:
            break
        out += data
    return bytes(out)


class Ends:
    """A client socket whose bytes are spliced into a Stream whose far end a test reads."""

    def __init__(self, sndbuf: int | None = None) -> None:
        self.epoll = select.epoll()
        self.source, self.client = _pair()            # the client writes to `client`
        dest, self.server = _pair(sndbuf)             # the server reads `server`
        self.stream = Stream(dest, self.epoll)

    def close(self) -> None:
        self.stream.close()
        for sock in (self.source, self.client, self.server):
            sock.close()
        self.epoll.close()


def test_spliced_bytes_reach_the_far_end_unread_here():
    ends = Ends()
    try:
        body = os.urandom(300_000)
        ends.client.sendall(body[:200_000])
        taken = ends.stream.splice_in(ends.source.fileno(), len(body))
        assert 0 < taken <= 200_000
        assert _read_all(ends.server) == body[:taken]
        assert ends.stream.piped == 0 and not ends.stream.outbuf
    finally:
        ends.close()


def test_splice_takes_no_more_than_asked_and_leaves_the_next_message_in_the_source():
    ends = Ends()
    try:
        ends.client.sendall(b"a" * 1000 + b"NEXT")
        assert ends.stream.splice_in(ends.source.fileno(), 1000) == 1000
        assert _read_all(ends.server) == b"a" * 1000
        assert ends.source.recv(100) == b"NEXT"
    finally:
        ends.close()


def test_nothing_yet_and_the_end_of_the_source_are_told_apart():
    ends = Ends()
    try:
        assert ends.stream.splice_in(ends.source.fileno(), 100) == -1
        ends.client.shutdown(socket.SHUT_WR)
        assert ends.stream.splice_in(ends.source.fileno(), 100) == 0
    finally:
        ends.close()


def test_what_the_far_end_cannot_take_yet_waits_in_the_pipe_and_goes_before_later_sends():
    ends = Ends(sndbuf=4096)
    try:
        body = os.urandom(600_000)
        ends.client.sendall(body[:150_000])
        taken = ends.stream.splice_in(ends.source.fileno(), len(body))
        assert taken > 0
        assert ends.stream.piped > 0, "the far end's buffer is small: some of it must wait"
        assert ends.stream.mask & EPOLLOUT
        ends.stream.send(b"AFTER")            # a later message must not overtake the pipe
        assert bytes(ends.stream.outbuf) == b"AFTER"
        received = bytearray()
        for _ in range(10_000):
            received += _read_all(ends.server)
            if ends.stream.flush():
                break
        received += _read_all(ends.server)
        assert bytes(received) == body[:taken] + b"AFTER"
        assert ends.stream.piped == 0 and not ends.stream.outbuf
        assert not ends.stream.mask & EPOLLOUT
    finally:
        ends.close()


def test_a_far_end_that_is_gone_breaks_the_stream_and_later_sends_are_dropped():
    ends = Ends()
    try:
        ends.server.close()
        ends.client.sendall(b"x" * 10_000)
        ends.stream.splice_in(ends.source.fileno(), 10_000)
        assert ends.stream.broken and ends.stream.piped == 0
        ends.stream.send(b"more")
        assert not ends.stream.outbuf
    finally:
        ends.stream.close()
        ends.source.close()
        ends.client.close()
        ends.epoll.close()


def test_a_source_the_kernel_will_not_splice_from_is_refused_not_taken_for_its_end():
    ends = Ends()
    counter = os.eventfd(5, os.EFD_NONBLOCK)   # has something to read, but no splice
    try:
        assert ends.stream.splice_in(counter, 100) == SPLICE_REFUSED
        assert not ends.stream.broken and ends.stream.piped == 0
    finally:
        os.close(counter)
        ends.close()


def test_closing_with_bytes_in_the_pipe_closes_the_pipe():
    ends = Ends(sndbuf=4096)
    try:
        ends.client.sendall(os.urandom(200_000))
        ends.stream.splice_in(ends.source.fileno(), 200_000)
        assert ends.stream.piped > 0
        pipe = ends.stream.pipe
        assert pipe is not None
    finally:
        ends.close()
    for fd in pipe:
        try:
            os.fstat(fd)
        except OSError:
            continue
        raise AssertionError(f"pipe fd {fd} left open")


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(st.tuples(st.sampled_from(["splice", "send", "drain"]), st.integers(1, 200_000)),
                      min_size=1, max_size=25))
def test_the_far_end_gets_every_byte_in_order_however_splices_sends_and_reads_interleave(steps):
    """Arbitrary interleavings of spliced bodies, sent messages and partial reads by the far
    end: what it reads is what went in, in the order it went in."""
    ends = Ends(sndbuf=8192)
    expected = bytearray()
    received = bytearray()
    counter = 0
    try:
        for op, size in steps:
            if op == "splice":
                if ends.stream.piped or ends.stream.outbuf:
                    continue   # as the pooler: only when nothing waits
                chunk = bytes([65 + counter % 26]) * min(size, 100_000)
                counter += 1
                ends.client.sendall(chunk)
                left = len(chunk)
                while left:
                    taken = ends.stream.splice_in(ends.source.fileno(), left)
                    assert taken > 0
                    expected += chunk[:taken]
                    left -= taken
                    while ends.stream.piped:
                        received += _read_all(ends.server, 1 << 16)
                        ends.stream.flush()
            elif op == "send":
                data = bytes([97 + counter % 26]) * (size % 5000 + 1)
                counter += 1
                ends.stream.send(data)
                expected += data
            else:
                received += _read_all(ends.server, size)
                ends.stream.flush()
        for _ in range(100_000):
            received += _read_all(ends.server)
            if ends.stream.flush() and not ends.stream.piped:
                break
        received += _read_all(ends.server)
        assert bytes(received) == bytes(expected)
    finally:
        ends.close()
