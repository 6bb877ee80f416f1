"""Which backends a waiting session may move to: the status table as a pooled backend reads it
(a real shared-memory table; no socket, no server)."""

import os
import select
import socket

import pytest

from pgforkpool.backend.pooled import PooledBackend
from pgforkpool.backend.session import Session
from pgforkpool.backend.siblings import Siblings
from pgforkpool.backend.stream import Stream
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


def siblings_of(table, pid=None, pool=1):
    """The pool's other backends as the backend `pid` (this process by default) sees them."""
    return Siblings(table.all_ints(), pool, os.getpid() if pid is None else pid,
                    config.defaults().max_sessions)


def make_backend(table, slot):
    ours, _theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return PooledBackend(config.defaults(), "db", "app", ours, table, slot, None)


def greeted_backend(table):
    """A pooled backend of pool 1 with a channel whose far end the test holds, and a greeting
    remembered for the test's startup packet: a new session is greeted without a server."""
    own = backend_slot(table, os.getpid(), pool=1)
    ours, postmaster = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    backend = PooledBackend(config.defaults(), "db", "app", ours, table, own, None)
    startup = {"user": "app", "database": "db"}
    probe_socket, probe_peer = socket.socketpair()
    probe = Session(Stream(probe_socket, select.epoll()), 0, startup, backend.registry, "")
    backend.greetings[frozenset(probe.settings.items())] = {"server_version": "15.0"}
    probe_socket.close()
    probe_peer.close()
    return backend, own, postmaster, startup


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
    assert make_backend(table, own).siblings.pool == 1   # the pool number its slot was given
    siblings = siblings_of(table)
    assert siblings.free_then_lighter(now=1.0) == [101]
    # load-balancing: with 6 ready here, a sibling with at least two fewer takes one too.
    assert siblings.free_then_lighter(now=1.0, balance=6) == [101, 104]
    assert siblings.free_then_lighter(now=1.0, balance=3) == [101]
    # Its upstream is back: it is a target again (live figures, no refresh needed).
    table.counters(down)[status.SERVER_DOWN] = 0
    assert siblings.free_then_lighter(now=1.5) == [101, 102]


def test_siblings_passing_short_transactions_are_found_by_when_their_connection_changed_hands(table):
    """Where a short session stuck behind a long transaction may go though no sibling is free: a
    busy one whose connection changed hands less than session_migration_delay (10 ms) ago,
    fewest sessions ready first; not one held by one owner for longer, and not an open one."""
    now = 100.0
    delay_ms = config.defaults().session_migration_delay * 1000
    recent, old = int(now * 1000 - delay_ms / 2), int(now * 1000 - 3 * delay_ms)
    own = backend_slot(table, os.getpid(), pool=1, waiting=5, owner_since_ms=old)
    crowded = backend_slot(table, 101, pool=1, waiting=6, owner_since_ms=recent)
    backend_slot(table, 102, pool=1, waiting=1, owner_since_ms=old)       # a long transaction
    backend_slot(table, 103, pool=1, waiting=3, owner_since_ms=recent)
    backend_slot(table, 104, pool=1, waiting=1, owner_since_ms=recent, paused=1)
    backend_slot(table, 105, pool=2, waiting=1, owner_since_ms=recent)    # another pool's
    siblings = siblings_of(table)
    recent_ms = int(now * 1000 - delay_ms)   # what PooledBackend._delay_ago_ms gives
    assert make_backend(table, own)._delay_ago_ms(now) == recent_ms
    assert siblings.free_then_lighter(now) == []          # none is free at this instant
    assert siblings.flowing(now, recent_ms, []) == [103, 101]
    assert siblings.flowing(now, recent_ms, [103]) == [101]
    # Its owner keeps it past the delay: no longer one.
    table.counters(crowded)[status.OWNER_SINCE_MS] = old
    assert siblings.flowing(now, recent_ms, []) == [103]


def test_a_long_session_joins_another_long_one_when_every_connection_is_held_by_one(table):
    """The long session that just ended goes, when short ones found every sibling held by a long
    transaction, to such a sibling with a lower pid: never to one that is free or passing short
    transactions (those take the short ones), never to a higher pid (no two backends swap)."""
    import time

    from pgforkpool.shared import channel

    backend, own, postmaster, startup = greeted_backend(table)
    client, server_side = socket.socketpair()
    backend._new_session(1, startup, server_side.detach())
    (session,) = backend.sessions.values()
    now = backend.now = time.monotonic()
    delay_ms = backend.migration_delay * 1000
    recent, old = int(now * 1000 - delay_ms / 2), int(now * 1000 - 3 * delay_ms)
    backend_slot(table, 101, pool=1, waiting=0, owner_since_ms=old)      # free now
    backend_slot(table, 102, pool=1, waiting=2, owner_since_ms=recent)   # passing short ones
    higher = os.getpid() + 1
    backend_slot(table, higher, pool=1, waiting=1, owner_since_ms=old)   # held long, higher pid
    postmaster.setblocking(False)

    def moved_to():
        try:
            msg, fd = channel.receive(postmaster)
        except BlockingIOError:
            return None
        os.close(fd)
        assert msg[:2] == ("migrate", 1)
        return msg[2]

    backend.gather_long = True
    backend._gather(session)
    assert moved_to() is None and not backend.gather_long and session in backend.sessions.values()
    backend_slot(table, 103, pool=1, waiting=3, owner_since_ms=old)
    backend_slot(table, 104, pool=1, waiting=2, owner_since_ms=old, paused=1)
    backend_slot(table, 105, pool=1, waiting=2, owner_since_ms=0)   # lost its connection: no figure
    backend.siblings.relist()   # the sibling list is read again (once a second otherwise)
    backend.paused = True       # a paused pool moves nobody
    backend._gather(session)
    assert moved_to() is None
    backend.paused = False
    backend._gather(session)
    assert moved_to() == 103
    assert session not in backend.sessions.values() and backend.migrations == 1
    client.close()


def test_the_published_figure_is_at_most_a_quarter_of_the_delay_stale(table):
    """OWNER_SINCE_MS is written at most every 2.5 ms, or a quarter of session_migration_delay
    when that is shorter, so that it tells short transactions from long ones at any delay."""
    own = backend_slot(table, os.getpid(), pool=1)
    settings = config.defaults()
    assert make_backend(table, own).owner_grain == 0.0025
    settings.values["session_migration_delay"] = 0.002
    ours, _theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    assert PooledBackend(settings, "db", "app", ours, table, own, None).owner_grain == 0.0005


def test_only_the_shared_connections_hand_overs_are_published_and_only_with_migration_on(
        table, tmp_path):
    """OWNER_SINCE_MS is what siblings read to choose where a waiting session goes: the shared
    connection's hand-over is written (at most every owner_grain); a pinned session's own
    connection never; and with session_migration off, nobody reads it and it is never written."""
    from pgforkpool.backend.server import ServerConnection

    listener = socket.socket(socket.AF_UNIX)   # a server that never answers: none is needed
    listener.bind(f"{tmp_path}/.s.PGSQL.5432")
    listener.listen()
    settings = config.defaults()
    settings.values.update(upstream_host=str(tmp_path), upstream_port=5432)

    def backend_and_connections(migration: bool):
        settings.values["session_migration"] = migration
        own = backend_slot(table, os.getpid(), pool=1)
        ours, _theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        backend = PooledBackend(settings, "db", "app", ours, table, own, None)
        shared = ServerConnection(settings, {"user": "app", "database": "db"}, None)
        pinned = ServerConnection(settings, {"user": "app", "database": "db"}, None)
        backend.server = shared
        return backend, table.counters(own), shared, pinned

    backend, ints, shared, pinned = backend_and_connections(migration=True)
    backend.now = 100.0
    backend._hand_over(pinned)
    assert ints[status.OWNER_SINCE_MS] == 0 and pinned.since == 100.0
    backend._hand_over(shared)
    assert ints[status.OWNER_SINCE_MS] == 100_000 and shared.since == 100.0
    backend.now = 100.001   # within the grain (2.5 ms): the figure stays, the owner's time moves
    backend._hand_over(shared)
    assert ints[status.OWNER_SINCE_MS] == 100_000 and shared.since == 100.001
    backend.now = 100.003
    backend._hand_over(shared)
    assert ints[status.OWNER_SINCE_MS] == 100_003
    for server in (shared, pinned):
        server.close()

    backend, ints, shared, pinned = backend_and_connections(migration=False)
    for now in (200.0, 201.0, 260.0):
        backend.now = now
        backend._hand_over(shared)
    assert ints[status.OWNER_SINCE_MS] == 0 and shared.since == 260.0
    for server in (shared, pinned):
        server.close()
    listener.close()


def test_a_backend_that_left_is_no_target_even_before_the_refresh(table):
    backend_slot(table, os.getpid(), pool=1)
    gone = backend_slot(table, 101, pool=1)
    siblings = siblings_of(table)
    assert siblings.free_then_lighter(now=1.0) == [101]
    table.release(gone)
    assert siblings.free_then_lighter(now=1.2) == []
    # Its slot taken by a new backend of the same pool: found at the next refresh (1 s on).
    backend_slot(table, 109, pool=1)
    assert siblings.free_then_lighter(now=1.4) == []
    assert siblings.free_then_lighter(now=2.1) == [109]


def test_a_failed_upstream_dial_is_published_and_cleared(table):
    own = backend_slot(table, os.getpid(), pool=1)
    backend = make_backend(table, own)
    from pgforkpool.shared.errors import PgError
    backend._server_failed(None, PgError("too_many_connections", "sorry, too many clients already"))
    assert table.counters(own)[status.SERVER_DOWN] == 1


def test_cancel_keys_are_per_origin_and_a_moved_away_sessions_key_is_not_reused(table, monkeypatch):
    """A session that moved keeps the (pid, key) its client was told; the backend it began on
    gives that key to no new session until the postmaster says the moved session has ended."""
    import secrets

    from pgforkpool.shared import channel

    backend, own, postmaster, startup = greeted_backend(table)
    ours = backend.chan
    clients = []

    def new_session(conn_id, *keys):
        drawn = iter(keys)
        monkeypatch.setattr(secrets, "randbits", lambda _bits: next(drawn))
        client, server_side = socket.socketpair()
        clients.append(client)
        backend._new_session(conn_id, startup, server_side.detach())
        return next(s for s in backend.sessions.values() if s.conn_id == conn_id)

    first = new_session(1, 777)
    assert first.key == 777 and backend.by_key[(os.getpid(), 777)] is first
    backend._migrate(first, 4242)
    msg, fd = channel.receive(postmaster)
    os.close(fd)
    assert msg[:3] == ("migrate", 1, 4242)
    assert msg[3]["origin_pid"] == os.getpid() and msg[3]["key"] == 777
    assert first not in backend.sessions.values() and (os.getpid(), 777) not in backend.by_key

    # Its key is still its client's: a new session here draws again.
    second = new_session(2, 777, 778)
    assert second.key == 778
    # A cancel is matched by pid and key: the same key from another origin is not this session.
    assert backend.by_key.get((os.getpid(), 778)) is second
    assert backend.by_key.get((4242, 778)) is None

    # The moved session ended: its key may be drawn again.
    channel.send(postmaster, ("key_free", 777))
    ours.setblocking(False)   # as run() has it
    backend._on_channel(0)
    third = new_session(3, 777)
    assert third.key == 777
    for sock in clients:
        sock.close()


def test_a_move_sent_back_is_no_move_and_waits_first_in_line(table):
    """The postmaster sends a session back when its target filled up meanwhile: it is counted
    as no move, and it is first in line again, its wait going on from when it began."""
    from pgforkpool.backend.pooled import WAITING
    from pgforkpool.shared import channel

    backend, own, postmaster, startup = greeted_backend(table)
    backend.paused = True   # no server connection is dialled: the sessions wait
    clients, sessions = [], []
    for conn_id in (1, 2):
        client, server_side = socket.socketpair()
        clients.append(client)
        backend._new_session(conn_id, startup, server_side.detach())
        session = next(s for s in backend.sessions.values() if s.conn_id == conn_id)
        session.proto.buf += b"Q\0\0\0\rSELECT 1\0"
        backend._enqueue(session)
        sessions.append(session)
    assert [s.conn_id for s in backend.scheduler.queue] == [1, 2]
    began = sessions[0].since

    backend._migrate(sessions[0], 4242)
    assert backend.migrations == 1 and table.counters(own)[status.MIGRATIONS] == 1
    msg, fd = channel.receive(postmaster)
    assert msg[0] == "migrate"
    backend._adopt(msg[1], msg[3], fd, True)   # what the postmaster sends back: ("adopt", id, state, True)

    assert backend.migrations == 0 and table.counters(own)[status.MIGRATIONS] == 0
    queue = list(backend.scheduler.queue)
    assert [s.conn_id for s in queue] == [1, 2]
    assert queue[0].state is WAITING and queue[0].since == began
    assert bytes(queue[0].proto.buf) == b"Q\0\0\0\rSELECT 1\0"
    for sock in clients:
        sock.close()


def test_a_console_answer_waits_for_a_full_channel_instead_of_being_lost(table):
    """The postmaster is slow to read (migrations' large messages queued, say): an answer to
    the console waits for room on the channel, and arrives after everything queued before it."""
    import threading
    import time

    from pgforkpool.shared import channel

    backend, _own, postmaster, _startup = greeted_backend(table)
    backend.chan.setblocking(False)   # as run() leaves it
    queued = 0
    while True:   # fill the channel as a busy postmaster would leave it
        try:
            channel.send(backend.chan, ("closed", queued))
        except BlockingIOError:
            break
        queued += 1
    assert queued > 0
    answering = threading.Thread(target=backend._answer, args=(7, [{"pid": 1, "sessions": 2}]), daemon=True)
    answering.start()
    deadline = time.monotonic() + 5
    while backend.chan.gettimeout() is None or backend.chan.gettimeout() == 0.0:   # _tell: waiting for room
        assert answering.is_alive() and time.monotonic() < deadline, "the answer was not waited for"
        time.sleep(0.001)
    postmaster.settimeout(5)
    received = [channel.receive(postmaster)[0] for _ in range(queued + 1)]
    answering.join(5)
    assert not answering.is_alive()
    assert [m[1] for m in received[:queued]] == list(range(queued))
    assert received[-1] == ("answer", 7, [{"pid": 1, "sessions": 2}])
    assert backend.chan.gettimeout() == 0.0   # non-blocking again for the event loop


def test_a_retiring_backend_moves_its_idle_sessions_to_the_siblings_with_the_most_room(table):
    """session_pool_size lowered: the backend told to retire hands each session that is between
    transactions to the open sibling of its pool with the most room (never to one draining, of
    another pool, or full), and keeps what no sibling has room for."""
    from pgforkpool.shared import channel

    backend, own, postmaster, startup = greeted_backend(table)
    clients = []
    for conn_id in range(1, 5):
        client, server_side = socket.socketpair()
        clients.append(client)
        backend._new_session(conn_id, startup, server_side.detach())
    max_sessions = backend.settings.max_sessions
    # What the backend asks its siblings as: itself, with the pool's limit of sessions.
    assert (backend.siblings.own_pid, backend.siblings.max_sessions) == (os.getpid(), max_sessions)
    backend_slot(table, 101, pool=1, sessions=max_sessions - 2)   # room for 2
    backend_slot(table, 102, pool=1, sessions=max_sessions - 1)   # room for 1
    backend_slot(table, 103, pool=1, draining=1)                  # retiring too
    backend_slot(table, 104, pool=2)                              # another pool's
    postmaster.setblocking(False)

    def moves():
        found = []
        while True:
            try:
                msg, fd = channel.receive(postmaster)
            except BlockingIOError:
                return found
            if fd is not None:
                os.close(fd)
            if msg[0] == "migrate":
                found.append((msg[1], msg[2]))

    channel.send(postmaster, ("retire",))
    backend.chan.setblocking(False)   # as run() sets it: _on_channel reads until it is empty
    backend._on_channel(0)
    assert backend.retiring and backend.shutdown_mode == "smart"
    moved = moves()
    assert [target for _conn, target in moved] == [101, 101, 102]
    assert len(backend.sessions) == 1 and backend.migrations == 3
    # A whole pooler's shutdown ends the retiring: its siblings take no session either.
    backend._shutdown("smart")
    assert not backend.retiring
    for client in clients:
        client.close()
