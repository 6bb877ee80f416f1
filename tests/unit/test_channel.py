"""The postmaster's outbox for a child whose channel is full: order kept, sockets kept open, bounded.

A real SOCK_SEQPACKET pair (channel.channel_pair), filled until the kernel says
EAGAIN, stands for a child that does not read its channel.
"""

import errno
import os
import socket

import pytest

from pgforkpool.shared import channel


@pytest.fixture
def full_channel():
    """(postmaster's end, child's end, messages already in it): no room for one more."""
    parent, child = channel.channel_pair()
    parent.setblocking(False)
    child.setblocking(False)
    sent = 0
    while True:
        try:
            channel.send(parent, ("filler", sent))
        except BlockingIOError:
            break
        sent += 1
    yield parent, child, sent
    parent.close()
    child.close()


def drain(child: socket.socket) -> list:
    """Everything the child can read now, sockets received closed after their check."""
    messages = []
    while True:
        try:
            msg, fd = channel.receive(child)
        except BlockingIOError:
            return messages
        if fd is not None:
            messages.append((msg, os.read(fd, 100)))
            os.close(fd)
        else:
            messages.append(msg)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_message_goes_at_once_when_there_is_room():
    parent, child = channel.channel_pair()
    parent.setblocking(False)
    child.setblocking(False)
    outbox = channel.Outbox()
    assert outbox.send(parent, ("session", 1)) is False
    assert len(outbox) == 0
    assert drain(child) == [("session", 1)]
    parent.close()
    child.close()


def test_messages_wait_in_order_and_go_when_the_child_reads(full_channel):
    parent, child, filled = full_channel
    outbox = channel.Outbox()
    assert outbox.send(parent, ("session", 1)) is True
    assert outbox.send(parent, ("shutdown", "smart")) is True
    assert len(outbox) == 2
    assert outbox.flush(parent) is False   # still no room

    received = drain(child)
    assert received == [("filler", n) for n in range(filled)]
    assert outbox.flush(parent) is True
    assert len(outbox) == 0
    # The session before the shutdown that followed it, as they were sent.
    assert drain(child) == [("session", 1), ("shutdown", "smart")]


def test_a_later_message_waits_behind_earlier_ones_even_when_there_is_room(full_channel):
    parent, child, filled = full_channel
    outbox = channel.Outbox()
    outbox.send(parent, ("first",))
    assert len(drain(child)) == filled        # room now, but "first" has not gone yet
    assert outbox.send(parent, ("second",)) is True
    assert outbox.flush(parent) is True
    assert drain(child) == [("first",), ("second",)]


def test_a_waiting_socket_stays_open_after_the_caller_closes_its_copy(full_channel):
    parent, child, filled = full_channel
    outbox = channel.Outbox()
    read_end, write_end = os.pipe()
    outbox.send(parent, ("session", 7), read_end)
    os.close(read_end)                        # the postmaster closes its copy after a send
    os.write(write_end, b"hello")
    drain(child)
    assert outbox.flush(parent) is True
    # The child gets a working descriptor of the same pipe.
    assert drain(child) == [(("session", 7), b"hello")]
    os.close(write_end)


def test_discard_closes_the_waiting_sockets(full_channel):
    parent, child, filled = full_channel
    outbox = channel.Outbox()
    before = open_fds()
    read_end, write_end = os.pipe()
    for n in range(3):
        outbox.send(parent, ("session", n), read_end)
    os.close(read_end)
    assert open_fds() == before + 1 + 3       # the write end, and the three duplicates
    assert outbox.discard() == 3
    assert len(outbox) == 0
    assert open_fds() == before + 1
    # Nobody holds the read end any more: the writer hears so.
    with pytest.raises(BrokenPipeError):
        os.write(write_end, b"x")
    os.close(write_end)


def test_a_full_outbox_refuses_with_an_error():
    parent, child = channel.channel_pair()
    parent.setblocking(False)
    outbox = channel.Outbox(limit=2)
    while not outbox.send(parent, ("filler",)):
        pass
    outbox.send(parent, ("kept",))
    with pytest.raises(OSError) as caught:
        outbox.send(parent, ("one too many",))
    assert caught.value.errno == errno.ENOBUFS
    assert len(outbox) == 2
    parent.close()
    child.close()


def test_a_gone_child_is_an_error_not_a_queued_message():
    parent, child = channel.channel_pair()
    parent.setblocking(False)
    child.close()
    outbox = channel.Outbox()
    with pytest.raises(OSError):
        outbox.send(parent, ("session", 1))
    assert len(outbox) == 0
    parent.close()


def test_flush_to_a_gone_child_raises_and_discard_empties(full_channel):
    parent, child, filled = full_channel
    outbox = channel.Outbox()
    outbox.send(parent, ("session", 1))
    child.close()
    with pytest.raises(OSError):
        outbox.flush(parent)
    assert outbox.discard() == 1


def test_a_waiting_message_the_channel_refuses_is_dropped_and_the_next_goes(full_channel):
    parent, child, filled = full_channel
    outbox = channel.Outbox()
    read_end, write_end = os.pipe()
    before = open_fds()
    assert outbox.send(parent, ("session", 41)) is True
    # Behind it, so kept without a try: larger than any datagram the channel takes.
    outbox.send(parent, ("adopt", 42, {"buf": b"x" * (8 << 20)}), read_end)
    outbox.send(parent, ("session", 43))
    drain(child)
    with pytest.raises(channel.Undeliverable) as caught:
        outbox.flush(parent)
    assert drain(child) == [("session", 41)]
    assert (caught.value.kind, caught.value.argument) == ("adopt", 42)
    assert caught.value.error.errno == errno.EMSGSIZE
    assert open_fds() == before               # its socket's duplicate closed
    assert outbox.flush(parent) is True
    assert drain(child) == [("session", 43)]
    os.close(read_end)
    os.close(write_end)
