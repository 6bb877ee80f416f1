"""Which backends a waiting session may move to: the status table as a pooled backend reads it
(a real shared-memory table; no socket, no server)."""

import os
import socket

import pytest

from pgforkpool.backend.pooled import PooledBackend
from pgforkpool.shared import config, status


@pytest.fixture
def table():
    port = 40000 + os.getpid() % 20000   # a table of its own, not a running pooler's
    table = status.StatusTable.create(port, 16)
    yield table
    table.unlink()


def backend_slot(table, pid, pool, database="db", user="app", **fields):
    index = table.claim(pid, status.KIND_POOLED, database, user, pool)
    ints = table.counters(index)
    for name, value in fields.items():
        ints[status.FIELDS.index(name)] = value
    return index


def make_backend(table, slot):
    ours, _theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return PooledBackend(config.defaults(), "db", "app", ours, table, slot, None)


def test_targets_are_the_pools_free_backends_and_not_failed_full_or_foreign_ones(table):
    own = backend_slot(table, os.getpid(), pool=1, waiting=5)
    backend_slot(table, 101, pool=1)                      # free: the one to move to
    down = backend_slot(table, 102, pool=1, server_down=1)  # its upstream dial failed
    backend_slot(table, 103, pool=2)                      # another pool's, free
    backend_slot(table, 104, pool=1, waiting=2)           # busy, three fewer ready than us
    backend_slot(table, 105, pool=1, draining=1)
    backend_slot(table, 106, pool=1, paused=1)
    backend_slot(table, 107, pool=1, sessions=config.defaults().max_sessions)
    # Same names, another pool number (a pool whose name shares a 63-byte prefix, say).
    backend_slot(table, 108, pool=3)
    backend = make_backend(table, own)
    assert backend.pool_number == 1
    assert backend._sibling_targets(now=1.0) == [101]
    # load-balancing: with 6 ready here, a sibling with at least two fewer takes one too.
    assert backend._sibling_targets(now=1.0, balance=6) == [101, 104]
    assert backend._sibling_targets(now=1.0, balance=3) == [101]
    # Its upstream is back: it is a target again (live figures, no refresh needed).
    table.counters(down)[status.SERVER_DOWN] = 0
    assert backend._sibling_targets(now=1.5) == [101, 102]


def test_a_backend_that_left_is_no_target_even_before_the_refresh(table):
    own = backend_slot(table, os.getpid(), pool=1)
    gone = backend_slot(table, 101, pool=1)
    backend = make_backend(table, own)
    assert backend._sibling_targets(now=1.0) == [101]
    table.release(gone)
    assert backend._sibling_targets(now=1.2) == []
    # Its slot taken by a new backend of the same pool: found at the next refresh (1 s on).
    backend_slot(table, 109, pool=1)
    assert backend._sibling_targets(now=1.4) == []
    assert backend._sibling_targets(now=2.1) == [109]


def test_a_failed_upstream_dial_is_published_and_cleared(table):
    own = backend_slot(table, os.getpid(), pool=1)
    backend = make_backend(table, own)
    from pgforkpool.shared.errors import PgError
    backend._server_failed(None, PgError("too_many_connections", "sorry, too many clients already"))
    assert table.counters(own)[status.SERVER_DOWN] == 1
