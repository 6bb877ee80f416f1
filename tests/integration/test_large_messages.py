"""Large messages whose bodies the pooler passes to the server inside the kernel (splice).

A Bind's large value and the rows of a COPY FROM STDIN are not read by the pooler
once their message header is through: they must reach PostgreSQL byte for byte,
whoever else shares the backend, and a client gone in the middle of one must leave
the backend serving the others.
"""

import hashlib
import os
import socket
import struct
import threading

import pytest

from conftest import WAIT, backend_pid
from test_core_defects import (Raw, _i16, _i32, assert_backend_unhurt, cstr, keeper_session, message,
                               pooler_pids)

MB = 1 << 20


@pytest.fixture
def pooler(start_pooler):
    return start_pooler(session_pool_size=1)


def test_large_values_bound_by_several_sessions_of_one_backend_reach_the_server_intact(pooler):
    """Three sessions of one backend bind 20+ MB values at once while a fourth runs small
    queries: PostgreSQL's md5 of each value is the client's, and the small queries are served."""
    senders = [pooler.connect() for _ in range(3)]
    small = pooler.connect()
    assert len({backend_pid(c) for c in senders + [small]}) == 1
    values = [os.urandom(20 * MB + 4097 * i) for i in range(3)]
    answers: dict = {}
    failures: list = []

    def send(i: int) -> None:
        try:
            for _ in range(2):
                row = senders[i].execute("SELECT md5(%b::bytea), length(%b::bytea)",
                                         (values[i], values[i])).fetchone()
                answers.setdefault(i, []).append(row)
        except Exception as exc:   # noqa: BLE001 - reported below
            failures.append((i, exc))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    served = 0
    while any(t.is_alive() for t in threads) and served < 2000:
        assert small.execute("SELECT 41 + 1").fetchone() == (42,)
        served += 1
    for thread in threads:
        thread.join(WAIT)
    assert not any(t.is_alive() for t in threads), "a sender hung"
    assert not failures, failures
    for i, value in enumerate(values):
        assert answers[i] == [(hashlib.md5(value).hexdigest(), len(value))] * 2
    assert served > 0


def test_copy_from_stdin_in_large_pieces_reaches_the_table_intact(pooler):
    """COPY FROM STDIN written in 4 MB pieces (CopyData messages the pooler streams) fills the
    table with exactly the rows sent; another session of the backend works afterwards."""
    conn, other = pooler.connect(), pooler.connect()
    assert backend_pid(conn) == backend_pid(other)
    conn.execute("CREATE TABLE large_copy (n int, v text)")
    try:
        rows = [f"{n}\t{os.urandom(48 * 1024).hex()}\n".encode() for n in range(300)]   # ~28 MB
        data = b"".join(rows)
        with conn.cursor() as cur:
            with cur.copy("COPY large_copy FROM STDIN") as copy:
                for start in range(0, len(data), 4 * MB):
                    copy.write(data[start:start + 4 * MB])
        digest = hashlib.md5(b"".join(r.split(b"\t")[1].rstrip(b"\n") for r in rows)).hexdigest()
        assert conn.execute("SELECT count(*), md5(string_agg(v, '' ORDER BY n)) FROM large_copy"
                            ).fetchone() == (300, digest)
        assert other.execute("SELECT count(*) FROM large_copy").fetchone() == (300,)
    finally:
        conn.execute("DROP TABLE large_copy")


@pytest.mark.parametrize("how", ["FIN", "RST"])
def test_a_client_gone_in_the_middle_of_a_large_value_leaves_the_backend_serving_and_nothing_stored(
        start_pooler, how):
    """A client sends a Bind promising an 8 MB value, 3 MB of it, and goes (a close, or a reset):
    the other session of the backend keeps its setting and is answered, a new login lands on
    the same backend, no pooler process changed, and no row was stored."""
    pool = start_pooler(session_pool_size=1, auth_method="trust")
    keeper = keeper_session(pool)
    pids = pooler_pids(pool)
    keeper.execute("CREATE TABLE half_sent (v bytea)")
    try:
        raw = Raw(pool.port)
        size = 8 * MB
        head = cstr("") + cstr("") + _i16.pack(1) + _i16.pack(1) + _i16.pack(1) + _i32.pack(size)
        bind_length = 4 + len(head) + size + 2   # then the result formats: none
        raw.send(message(b"P", cstr("") + cstr("INSERT INTO half_sent VALUES ($1)") + _i16.pack(0))
                 + b"B" + _i32.pack(bind_length) + head + b"\x07" * (3 * MB))
        if how == "RST":
            raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw.close()
        assert_backend_unhurt(pool, keeper, pids, f"a client gone ({how}) 3 MB into an 8 MB value")
        assert keeper.execute("SELECT count(*) FROM half_sent").fetchone() == (0,)
    finally:
        keeper.execute("DROP TABLE half_sent")
