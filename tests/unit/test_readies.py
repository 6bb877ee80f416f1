"""ReadyCounter: a dedicated backend's queries and transactions, from the server's bytes cut anywhere."""

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgforkpool.backend.readies import BrokenStream, ReadyCounter

FUZZ = settings(deadline=None, max_examples=400, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def msg(kind: bytes, body: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def ready(status: bytes) -> bytes:
    return msg(b"Z", status)


def feed_in_pieces(stream: bytes, cuts: list[int]) -> tuple[ReadyCounter, int]:
    counter = ReadyCounter()
    ended = 0
    start = 0
    for cut in sorted(set(c for c in cuts if 0 < c < len(stream))) + [len(stream)]:
        ended += counter.feed(stream[start:cut])
        start = cut
    return counter, ended


def test_a_simple_query_and_a_transaction_block():
    stream = (msg(b"T", b"\0\1rowdesc") + msg(b"D", b"\0\1\0\0\0\1" + b"1") + msg(b"C", b"SELECT 1\0")
              + ready(b"I")                                  # SELECT 1: a query, a transaction
              + msg(b"C", b"BEGIN\0") + ready(b"T")          # BEGIN: a query
              + msg(b"E", b"SERROR\0C22012\0\0") + ready(b"E")
              + msg(b"C", b"ROLLBACK\0") + ready(b"I"))      # ROLLBACK ends the second transaction
    counter = ReadyCounter()
    assert counter.feed(stream) == 2
    assert (counter.queries, counter.idle, counter.skip, counter.head) == (4, 2, 0, b"")


def test_a_large_row_is_skipped_by_its_length_however_it_is_cut():
    row = msg(b"D", b"\0\1" + struct.pack("!i", 1 << 20) + b"Z" * (1 << 20))  # its body full of 'Z'
    stream = row + msg(b"C", b"SELECT 1\0") + ready(b"I")
    counter, ended = feed_in_pieces(stream, list(range(0, len(stream), 65536)) + [3, 5, len(stream) - 1])
    assert (counter.queries, ended) == (1, 1)


def test_a_ready_for_query_cut_before_its_status_is_counted_once_whole():
    counter = ReadyCounter()
    stream = ready(b"I")
    for i in range(len(stream)):
        assert counter.feed(stream[i:i + 1]) == (1 if i == len(stream) - 1 else 0)
    assert counter.queries == 1


def test_a_length_below_four_is_not_the_protocol():
    with pytest.raises(BrokenStream):
        ReadyCounter().feed(b"D\0\0\0\3")
    with pytest.raises(BrokenStream):
        ReadyCounter().feed(msg(b"Z", b"II"))   # a ReadyForQuery is 5 long


messages = st.one_of(
    st.builds(ready, st.sampled_from([b"I", b"T", b"E"])),
    st.builds(msg, st.sampled_from([b"D", b"C", b"T", b"N", b"S", b"A", b"1", b"2", b"d"]),
              st.binary(max_size=300)))


@FUZZ
@given(st.lists(messages, max_size=30), st.lists(st.integers(0, 10_000), max_size=20))
def test_any_stream_cut_anywhere_counts_what_it_holds(parts, cuts):
    stream = b"".join(parts)
    readies = [p for p in parts if p[:1] == b"Z"]
    idle = sum(1 for p in readies if p[5:6] == b"I")
    counter, ended = feed_in_pieces(stream, cuts)
    assert counter.queries == len(readies)
    assert counter.idle == ended == idle
    assert counter.skip == 0 and counter.head == b""   # at a message boundary at the end


@FUZZ
@given(st.binary(max_size=2000), st.lists(st.integers(0, 2000), max_size=10))
def test_arbitrary_bytes_count_or_raise_broken_stream_only(data, cuts):
    try:
        feed_in_pieces(data, cuts)
    except BrokenStream:
        pass


def test_a_mixed_stream_fed_byte_by_byte():
    stream = (msg(b"T", b"\0\1a\0" + b"\0" * 18) + msg(b"D", b"\0\1\0\0\0\1x") + msg(b"C", b"SELECT 1\0")
              + ready(b"T") + msg(b"N", b"SNOTICE\0\0") + ready(b"I") + msg(b"S", b"a\0b\0") + ready(b"E"))
    counter = ReadyCounter()
    ended = sum(counter.feed(stream[i:i + 1]) for i in range(len(stream)))
    assert (counter.queries, ended, counter.skip, counter.head) == (3, 1, 0, b"")


# ---------------------------------------------------------------- the dedicated backend's use of it

class _Monotonic:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _relay_counting(monkeypatch):
    """DedicatedBackend._count on a stand-in with a status slot of its own and a clock we move."""
    import types

    from pgforkpool.backend import dedicated
    from pgforkpool.shared import status
    clock = _Monotonic()
    monkeypatch.setattr(dedicated.time, "monotonic", clock)
    backend = types.SimpleNamespace(counters=memoryview(bytearray(status.INT_BYTES)).cast("q"),
                                    readies=ReadyCounter(), xact_start=None, conn_id=1,
                                    startup={"database": "d", "user": "u"}, address="a")
    return (lambda from_client, data: dedicated.DedicatedBackend._count(backend, from_client, data)), \
        backend.counters, clock, status


def test_the_relay_counts_queries_transactions_bytes_and_their_time(monkeypatch):
    count, counters, clock, status = _relay_counting(monkeypatch)
    query = msg(b"Q", b"SELECT 1\0")
    count(True, query)                        # a transaction starts with the client's bytes
    clock.now += 0.003                         # 3 ms: the 5,000 µs bucket (index 2)
    count(False, msg(b"C", b"SELECT 1\0") + ready(b"I"))
    count(True, msg(b"Q", b"BEGIN\0"))
    count(False, msg(b"C", b"BEGIN\0") + ready(b"T"))   # a query, no transaction yet
    count(True, query)
    clock.now += 2.0                           # the block took 2 s: the 5,000,000 µs bucket (8)
    count(False, msg(b"C", b"SELECT 1\0") + ready(b"T") + msg(b"C", b"COMMIT\0") + ready(b"I"))
    assert counters[status.QUERIES] == 4
    assert counters[status.TRANSACTIONS] == 2
    assert counters[status.XACT_US] == 3_000 + 2_000_000
    hist = list(counters[status.XACT_HIST:status.XACT_HIST + status.HISTOGRAM_BUCKETS])
    assert hist == [0, 0, 1, 0, 0, 0, 0, 0, 1, 0]
    assert counters[status.BYTES_IN] == 2 * len(query) + len(msg(b"Q", b"BEGIN\0"))


def test_pipelined_transactions_ending_in_one_piece_count_each(monkeypatch):
    count, counters, clock, status = _relay_counting(monkeypatch)
    count(True, msg(b"Q", b"SELECT 1\0") * 3)
    clock.now += 0.0004
    count(False, (msg(b"C", b"SELECT 1\0") + ready(b"I")) * 3)
    assert (counters[status.TRANSACTIONS], counters[status.QUERIES]) == (3, 3)
    assert counters[status.XACT_HIST] == 3    # the first took 0.4 ms, the others none told apart


def test_a_broken_stream_stops_the_counting_not_the_relay(monkeypatch):
    count, counters, clock, status = _relay_counting(monkeypatch)
    count(False, b"D\0\0\0\1")
    count(False, ready(b"I"))
    assert counters[status.QUERIES] == 0
    assert counters[status.BYTES_OUT] == 5 + 6   # bytes are still counted
