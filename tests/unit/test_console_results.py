"""The admin console's result sets and statement splitting, on bytes."""

import struct

from pgforkpool.backend import console
from pgforkpool.postmaster import metrics
from pgforkpool.postmaster.main import Question
from pgforkpool.shared import status


def messages(data: bytes) -> list[tuple[bytes, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        length = struct.unpack_from("!I", data, pos + 1)[0]
        out.append((data[pos:pos + 1], data[pos + 5:pos + 1 + length]))
        pos += 1 + length
    return out


def test_a_result_is_row_description_rows_and_a_tag():
    columns = [("pid", console.INT8), ("name", console.TEXT), ("load", console.FLOAT8),
               ("paused", console.BOOL)]
    data = console.result(columns, [[12, "app", 0.5, True], [13, None, None, False]])
    kinds = [kind for kind, _ in messages(data)]
    assert kinds == [b"T", b"D", b"D", b"C"]
    _, description = messages(data)[0]
    assert struct.unpack_from("!h", description)[0] == 4
    assert description.startswith(b"\0\x04pid\0")
    _, second = messages(data)[2]
    # NULL is a length of -1, as PostgreSQL sends it.
    assert second == (struct.pack("!h", 4) + struct.pack("!i", 2) + b"13" + struct.pack("!i", -1)
                      + struct.pack("!i", -1) + struct.pack("!i", 1) + b"f")
    assert messages(data)[-1] == (b"C", b"SHOW\0")


def test_statements_split_at_semicolons_outside_quotes():
    assert [s.strip() for s in console._split("SHOW POOLS; SHOW 'a;b'; ")] == ["SHOW POOLS", "SHOW 'a;b'", ""]
    assert console._identifier('"My DB";') == "My DB"


def test_metrics_buckets_are_cumulative_and_end_at_inf():
    row = {f"xact_hist_{i}": 1 for i in range(status.HISTOGRAM_BUCKETS)}
    buckets = metrics._buckets(row, "xact_hist")
    assert [count for _, count in buckets] == list(range(1, status.HISTOGRAM_BUCKETS + 1))
    assert buckets[-1][0] == "+Inf" and buckets[0][0] == "0.0005"


def test_stats_rates_over_a_period():
    earlier = (10.0, {"transactions": 100, "xact_us": 1000, "waits": 10, "wait_us": 500})
    later = (12.0, {"transactions": 300, "xact_us": 5000, "waits": 10, "wait_us": 500, "queries": 40})
    rates = status.stats_rates(earlier, later)
    assert rates["xacts_per_second"] == 100.0 and rates["queries_per_second"] == 20.0
    assert rates["avg_xact_us"] == 20 and rates["avg_wait_us"] == 0


def test_a_pause_some_backend_did_not_confirm_in_time_did_not_complete():
    """A PAUSE that ran out of time reported success when another backend of the pool had
    paused: each backend still waited for counts as one that could not (found by a third
    exploratory run). Other questions are answered with the rows that came."""
    pause = Question(None, 1, {101, 102}, 0.0, "pause")
    pause.rows.append(True)   # a third backend paused
    pause.give_up()
    assert pause.rows == [True, False, False]
    stats = Question(None, 2, {101}, 0.0, "sessions")
    stats.give_up()
    assert stats.rows == []
