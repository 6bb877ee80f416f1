"""The decision at a transaction boundary, the wait queue and state changes, and the order of a context restore."""

import itertools
import select
import socket
import types

import pytest

from pgforkpool.backend.context import Context, partial_datestyle, restore_query
from pgforkpool.backend.scheduler import (Decision, Scheduler, ServerState, SessionState,
                                          boundary_decision)
from pgforkpool.backend.server import ServerConnection, ServerProtocol
from pgforkpool.backend.session import Session
from pgforkpool.backend.statements import StatementRegistry
from pgforkpool.backend.stream import Stream

FACTS = ("gone", "in_transaction", "fixup", "dirty", "pin_check", "pinned", "holding_xacts", "mid_message")


def decide(**facts) -> Decision:
    values = dict.fromkeys(FACTS, False)
    values.update(facts)
    return boundary_decision(**values)


# ================================================================ the decision table, row by row


def test_vanished_owner_inside_a_transaction_rolls_back():
    """Row 1: the owner vanished with a transaction open: ROLLBACK."""
    assert decide(gone=True, in_transaction=True) is Decision.ROLLBACK


def test_vanished_owner_that_may_hold_state_is_pin_checked():
    """Row 2: the owner vanished and may hold uncopyable state on the shared connection: PIN_CHECK."""
    assert decide(gone=True, pin_check=True) is Decision.PIN_CHECK


def test_vanished_pinned_owner_is_released():
    """Row 2 does not apply to a pinned connection (it dies with the session): RELEASE."""
    assert decide(gone=True, pin_check=True, pinned=True) is Decision.RELEASE


def test_vanished_owner_otherwise_released():
    """A vanished owner outside a transaction without suspected state: RELEASE, whatever else was noted."""
    assert decide(gone=True) is Decision.RELEASE
    assert decide(gone=True, fixup=True, dirty=True, holding_xacts=True) is Decision.RELEASE


def test_a_message_half_passed_on_keeps_the_owner_before_anything_is_sent():
    """Row 3: the owner's client has sent part of a message the server is reading (a CopyData
    outside COPY): KEEP, before FIXUP, CAPTURE or PIN_CHECK, whose queries would be read as the
    rest of it; a vanished owner's message is filled in first (the rows above)."""
    assert decide(mid_message=True) is Decision.KEEP
    assert decide(mid_message=True, fixup=True, dirty=True, pin_check=True, holding_xacts=True) is Decision.KEEP
    assert decide(mid_message=True, gone=True) is Decision.RELEASE


def test_reset_or_discard_means_fixup():
    """Row 3: RESET/DISCARD seen: FIXUP."""
    assert decide(fixup=True) is Decision.FIXUP


def test_open_transaction_keeps_the_owner():
    """Row 4: transaction open: KEEP."""
    assert decide(in_transaction=True) is Decision.KEEP


def test_changed_settings_are_captured():
    """Row 5: settings may have changed: CAPTURE."""
    assert decide(dirty=True) is Decision.CAPTURE


def test_possible_uncopyable_state_is_pin_checked():
    """Row 6: uncopyable state may exist: PIN_CHECK (pinned or not: a pinned session may unpin)."""
    assert decide(pin_check=True) is Decision.PIN_CHECK
    assert decide(pin_check=True, pinned=True) is Decision.PIN_CHECK


def test_held_prepared_transaction_holds_the_connection():
    """Row 7: a prepared transaction held on the shared connection: HOLD."""
    assert decide(holding_xacts=True) is Decision.HOLD


def test_held_prepared_transaction_on_a_pinned_connection_releases():
    """Row 7 does not apply to a pinned connection: RELEASE."""
    assert decide(holding_xacts=True, pinned=True) is Decision.RELEASE


def test_nothing_noted_releases():
    """Last row: RELEASE."""
    assert decide() is Decision.RELEASE


@pytest.mark.parametrize("facts, expected", [
    (dict(gone=True, in_transaction=True, fixup=True, dirty=True, pin_check=True), Decision.ROLLBACK),
    (dict(gone=True, fixup=True, pin_check=True), Decision.PIN_CHECK),
    (dict(fixup=True, in_transaction=True, dirty=True, pin_check=True, holding_xacts=True), Decision.FIXUP),
    (dict(in_transaction=True, dirty=True, pin_check=True, holding_xacts=True), Decision.KEEP),
    (dict(dirty=True, pin_check=True, holding_xacts=True), Decision.CAPTURE),
    (dict(pin_check=True, holding_xacts=True), Decision.PIN_CHECK),
], ids=["rollback beats all", "gone beats fixup", "fixup beats keep", "keep beats capture",
        "capture beats pin check", "pin check beats hold"])
def test_first_matching_row_wins(facts, expected):
    """Where several rows match, the first in the table decides."""
    assert decide(**facts) is expected


def test_every_combination_follows_the_table():
    """All 256 combinations of facts give the first matching row of BACKEND.md's table (with the
    row for a message half passed on)."""
    rows = [
        (lambda f: f["gone"] and f["in_transaction"], Decision.ROLLBACK),
        (lambda f: f["gone"] and f["pin_check"] and not f["pinned"], Decision.PIN_CHECK),
        (lambda f: f["gone"], Decision.RELEASE),
        (lambda f: f["mid_message"], Decision.KEEP),
        (lambda f: f["fixup"], Decision.FIXUP),
        (lambda f: f["in_transaction"], Decision.KEEP),
        (lambda f: f["dirty"], Decision.CAPTURE),
        (lambda f: f["pin_check"], Decision.PIN_CHECK),
        (lambda f: f["holding_xacts"] and not f["pinned"], Decision.HOLD),
        (lambda f: True, Decision.RELEASE),
    ]
    for values in itertools.product((False, True), repeat=len(FACTS)):
        facts = dict(zip(FACTS, values))
        expected = next(decision for matches, decision in rows if matches(facts))
        assert boundary_decision(**facts) is expected, facts


# ================================================================ the queue and state changes


def fake_session(name: str, state=SessionState.IDLE) -> Session:
    """A real Session on a socket pair (the scheduler checks the type of what it is given)."""
    ours, peer = socket.socketpair()
    _SOCKETS.extend((ours, peer))
    session = Session(Stream(ours, _EPOLL), len(_SOCKETS), {"user": name, "database": "db"},
                      StatementRegistry(16))
    session.state = state
    return session


_SOCKETS: list = []
_EPOLL = select.epoll()


def test_waiting_sessions_are_served_in_arrival_order():
    """wait() queues sessions as WAITING; next_waiting() takes them first come, first served."""
    scheduler = Scheduler()
    a, b, c = fake_session("a"), fake_session("b"), fake_session("c")
    for session in (a, b, c):
        scheduler.wait(session)
    assert a.state is SessionState.WAITING and scheduler.waiting() == 3
    assert [scheduler.next_waiting() for _ in range(4)] == [a, b, c, None]
    assert scheduler.waiting() == 0


def test_next_waiting_skips_sessions_no_longer_waiting():
    """A queued session that closed or got served meanwhile is skipped; a STARTING one is served."""
    scheduler = Scheduler()
    a, b, c = fake_session("a"), fake_session("b"), fake_session("c", SessionState.STARTING)
    scheduler.wait(a)
    scheduler.wait(b)
    scheduler.queue.append(c)
    a.state = SessionState.CLOSED
    b.state = SessionState.ACTIVE
    assert scheduler.next_waiting() is c
    assert scheduler.next_waiting() is None


def test_forget_removes_a_waiting_session():
    """forget() takes a waiting session out of the queue; forgetting one that is not queued is harmless."""
    scheduler = Scheduler()
    a, b = fake_session("a"), fake_session("b")
    scheduler.wait(a)
    scheduler.wait(b)
    scheduler.forget(a)
    scheduler.forget(fake_session("never queued", SessionState.WAITING))
    assert list(scheduler.queue) == [b]


def test_close_forgets_and_marks_the_session_gone():
    """close() removes a waiting session, marks it CLOSED and gone, and it is never served."""
    scheduler = Scheduler()
    a, b = fake_session("a"), fake_session("b")
    scheduler.wait(a)
    scheduler.wait(b)
    scheduler.close(a)
    assert a.state is SessionState.CLOSED and a.gone
    assert scheduler.next_waiting() is b and scheduler.next_waiting() is None


def test_assign_and_release():
    """assign() makes the session ACTIVE owner; release() returns it, sets it IDLE and the connection IDLE."""
    server = ServerProtocol()
    session = fake_session("a", SessionState.WAITING)
    Scheduler.assign(server, session)
    assert server.owner is session and server.state is ServerState.ACTIVE
    assert session.state is SessionState.ACTIVE and server.reported is session.context.reported
    assert Scheduler.release(server) is session
    assert server.owner is None and server.state is ServerState.IDLE and server.reported is None
    assert session.state is SessionState.IDLE


def test_assign_for_restoring():
    """A session whose context must be put back first is RESTORING until restored()."""
    server = ServerProtocol()
    session = fake_session("a", SessionState.WAITING)
    Scheduler.assign(server, session, restoring=True)
    assert session.state is SessionState.RESTORING
    Scheduler.restored(session)
    assert session.state is SessionState.ACTIVE


def test_release_with_a_pending_cancel_waits_for_it():
    """A connection released while a cancel request for it may still arrive serves nobody (CANCEL_WAIT)."""
    server = ServerProtocol()
    session = fake_session("a")
    Scheduler.assign(server, session)
    server.cancels = 1
    Scheduler.release(server)
    assert server.state is ServerState.CANCEL_WAIT
    Scheduler.ready(server)
    assert server.state is ServerState.IDLE


def test_release_of_a_pinned_connection_reports_to_its_session(tmp_path):
    """A pinned connection keeps reporting parameters to its session after release."""
    # A pinned connection is a real ServerConnection (Session.pinned is typed so);
    # it dials a listening socket that never answers: no server is needed.
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(f"{tmp_path}/.s.PGSQL.5432")
    listener.listen()
    settings = types.SimpleNamespace(upstream_host=str(tmp_path), upstream_port=5432,
                                     upstream_connect_timeout=5)
    server = ServerConnection(settings, {"user": "a", "database": "db"}, None)
    session = fake_session("a")
    Scheduler.assign(server, session)
    Scheduler.pin(server, session)
    Scheduler.release(server)
    assert server.reported is session.context.reported and server.pinned is session
    assert Scheduler.unpin(session) is server
    assert session.pinned is None and server.pinned is None and server.reported is None
    server.close()
    listener.close()


def test_greeted_only_moves_a_starting_session():
    """greeted() makes a STARTING session IDLE and leaves other states alone."""
    starting, active = fake_session("a", SessionState.STARTING), fake_session("b", SessionState.ACTIVE)
    Scheduler.greeted(starting)
    Scheduler.greeted(active)
    assert starting.state is SessionState.IDLE and active.state is SessionState.ACTIVE


# ================================================================ restore order (defect 5)


def _parts(sql: str) -> list[str]:
    """The statements of a restore, without the timeouts it lifts for itself (SET LOCAL)."""
    return [part for part in sql.split("; ") if not part.startswith("SET LOCAL ")]


def _index(parts: list[str], needle: str) -> int:
    found = [i for i, part in enumerate(parts) if needle in part]
    assert found, f"{needle!r} not in {parts}"
    return found[0]


def test_restore_sets_privileged_settings_before_session_authorization():
    """A superuser session that SET session_replication_role then SET SESSION AUTHORIZATION is restored in that order."""
    wanted = {"session_replication_role": "replica", "session_authorization": "alice"}
    parts = _parts(restore_query({}, wanted))
    assert _index(parts, "'session_replication_role'") < _index(parts, "'session_authorization'")
    assert "'session_authorization'" in parts[-1]


def test_restore_resets_identity_first_when_another_identity_is_in_force():
    """From another session's SET SESSION AUTHORIZATION, identity is reset before any setting is applied."""
    current = {"session_authorization": "bob"}
    wanted = {"session_replication_role": "replica", "session_authorization": "alice"}
    parts = _parts(restore_query(current, wanted))
    assert parts[:2] == ["RESET SESSION AUTHORIZATION", "RESET ROLE"]
    assert _index(parts, "'session_replication_role'") < _index(parts, "'session_authorization', 'alice'")
    assert "'session_authorization', 'alice'" in parts[-1]


def test_restore_resets_identity_before_resetting_a_privileged_setting():
    """Leaving an authorization + session_replication_role context: identity is reset before RESET session_replication_role."""
    current = {"session_replication_role": "replica", "session_authorization": "alice"}
    parts = _parts(restore_query(current, {}))
    assert parts[0] == "RESET SESSION AUTHORIZATION"
    assert _index(parts, "RESET ROLE") < _index(parts, 'RESET "session_replication_role"')


def test_restore_of_the_same_identity_with_other_settings_resets_and_reapplies_it():
    """The same authorization with a setting to change: identity reset, setting applied, authorization set again last."""
    current = {"session_authorization": "alice", "work_mem": "4MB"}
    wanted = {"session_authorization": "alice", "work_mem": "8MB"}
    parts = _parts(restore_query(current, wanted))
    assert parts[0] == "RESET SESSION AUTHORIZATION"
    assert _index(parts, "'work_mem', '8MB'") < _index(parts, "'session_authorization', 'alice'")
    assert "'session_authorization', 'alice'" in parts[-1]


def test_restore_with_a_role_resets_it_and_sets_role_last():
    """A SET ROLE context: RESET ROLE first, settings, then the role last (after session_authorization)."""
    current = {"role": "reader"}
    wanted = {"role": "writer", "session_authorization": "alice", "search_path": "app"}
    parts = _parts(restore_query(current, wanted))
    assert parts[0] == "RESET ROLE"
    assert (_index(parts, "'search_path'") < _index(parts, "'session_authorization'")
            < _index(parts, "'role', 'writer'"))
    assert parts[-1].endswith("set_config('role', 'writer', false)")


def test_restore_of_an_equal_context_is_empty():
    """Nothing to change, identity included: no SQL at all (no needless identity reset)."""
    context = {"session_authorization": "alice", "role": "r", "session_replication_role": "replica"}
    assert restore_query(context, dict(context)) == ""


def test_restore_without_identity_does_not_reset_it():
    """No authorization or role in force: settings only, no RESET SESSION AUTHORIZATION."""
    sql = restore_query({"work_mem": "4MB"}, {"work_mem": "8MB"})
    assert "RESET SESSION AUTHORIZATION" not in sql and "RESET ROLE" not in sql


def test_restore_from_an_unknown_context_resets_identity_before_settings():
    """From an unknown context, everything (identity first) is reset before the wanted settings."""
    parts = _parts(restore_query(None, {"session_replication_role": "replica", "session_authorization": "a"}))
    assert parts[:3] == ["RESET SESSION AUTHORIZATION", "RESET ROLE", "RESET ALL"]
    assert _index(parts, "'session_replication_role'") < _index(parts, "'session_authorization'")


@pytest.mark.parametrize("value, partial", [
    ("ISO", True), ("Postgres", True), ("DMY", True), ("euro", True), (" sql ", True),
    ("ISO, DMY", False), ("dmy,postgres", False), ("German", False), ("default", False),
    ('"ISO", "MDY"', False),
])
def test_a_datestyle_naming_only_its_style_or_its_order_is_partial(value, partial):
    assert partial_datestyle(value) is partial


def test_a_partial_datestyle_is_restored_on_top_of_the_servers_default():
    """"ISO" at login means "ISO" with the server's default order, not with the order of the
    session the connection served before: the restore resets DateStyle before it sets it."""
    parts = _parts(restore_query({"datestyle": "ISO, DMY"}, {"datestyle": "ISO"}))
    assert _index(parts, "RESET datestyle") < _index(parts, "'datestyle', 'ISO'")
    assert not [part for part in _parts(restore_query({"datestyle": "SQL, MDY"}, {"datestyle": "ISO, DMY"}))
                if part.startswith("RESET")]
    assert restore_query({"datestyle": "ISO"}, {"datestyle": "ISO"}) == ""
