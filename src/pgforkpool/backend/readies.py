"""The ReadyForQuery messages in a server's byte stream, for a relay that looks at nothing else.

A dedicated backend passes the server's bytes to its client as they come, cut
anywhere. SHOW STATS still wants its queries (one ReadyForQuery each) and its
transactions (those that end with the session idle again). ReadyCounter walks
the message headers only: it skips each body by its length, so a large DataRow
costs one step however it is cut, and it copies nothing but a header cut in two.
Compiled with mypyc, as the rest of the hot path.
"""

from typing import Final

_READY: Final = 0x5A   # 'Z'
_IDLE: Final = 0x49    # 'I': ReadyForQuery outside a transaction block


class BrokenStream(Exception):
    """A message length below 4: the bytes are not the protocol."""


class ReadyCounter:
    """Counts ReadyForQuery messages, and those that say idle, in a stream fed in pieces."""

    __slots__ = ("skip", "head", "queries", "idle")

    def __init__(self) -> None:
        self.skip = 0          # bytes of the current message not yet passed
        self.head = b""        # the beginning of a header cut by the end of a piece
        self.queries = 0       # ReadyForQuery messages so far
        self.idle = 0          # of which with status idle: transactions ended

    def feed(self, data: bytes) -> int:
        """Walk a piece of the stream; returns how many ReadyForQuery messages in it said idle.
        Raises BrokenStream if a header is not the protocol's (the relay stops counting)."""
        n = len(data)
        pos = 0
        ended = 0
        if self.head:
            # A header cut by the end of the last piece: completed from this one.  A
            # ReadyForQuery's is taken with its status byte (6 bytes), any other's is 5.
            head = self.head
            want = 6 if head[0] == _READY else 5
            take = want - len(head)
            head += data[:take]
            if len(head) < want:
                self.head = head
                return 0
            self.head = b""
            ended = self._header(head, 0)
            pos = take
        while True:
            skip = self.skip
            if skip:
                if skip >= n - pos:
                    self.skip = skip - (n - pos)
                    return ended
                pos += skip
                self.skip = 0
            left = n - pos
            if not left:
                return ended
            want = 6 if data[pos] == _READY else 5
            if left < want:
                self.head = data[pos:]
                return ended
            ended += self._header(data, pos)
            pos += want

    def _header(self, data: bytes, pos: int) -> int:
        """The header at data[pos] (with a ReadyForQuery's status): sets the bytes to skip after
        it; 1 if it is a ReadyForQuery that says idle."""
        length = (data[pos + 1] << 24) | (data[pos + 2] << 16) | (data[pos + 3] << 8) | data[pos + 4]
        if data[pos] != _READY:
            if length < 4:
                raise BrokenStream(f"message length {length}")
            self.skip = length - 4
            return 0
        if length != 5:
            raise BrokenStream(f"ReadyForQuery of length {length}")
        self.queries += 1
        if data[pos + 5] == _IDLE:
            self.idle += 1
            return 1
        return 0
