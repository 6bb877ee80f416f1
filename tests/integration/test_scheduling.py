"""Which pooled backend a new session lands on: pool life cycle, session_schedule, process titles, status."""

import json
import re
import subprocess
import threading

import psutil

from conftest import PGFORKPOOL, WAIT, backend_pid, server_pid, title, wait_for

BACKEND_TITLE = re.compile(r"^pgforkpool: backend (\S+)/(\S+) (\d+) sessions (\d+) waiting$")





def wait_for_titles(pooler, expected: list[str]) -> None:
    """The harness returns once the port accepts; the listeners may still be starting."""
    wait_for(lambda: sorted(title(p) for p in pooler.children()) == expected,
             f"children titled {expected}")


def status_json(pooler) -> dict:
    out = subprocess.run([PGFORKPOOL, "status", pooler.conf, "--format", "json"],
                         capture_output=True, text=True, timeout=WAIT)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def connect_many(pooler, count: int, **kwargs) -> list:
    return [pooler.connect(**kwargs) for _ in range(count)]


def close_all(conns) -> None:
    for conn in conns:
        conn.close()


class Sleeper:
    """A session busy with one long statement in a thread of its own."""

    def __init__(self, conn, seconds: float):
        self.result = {}
        self.thread = threading.Thread(
            target=lambda: self.result.setdefault("row", conn.execute(f"SELECT pg_sleep({seconds})").fetchone()))
        self.thread.start()

    def join(self) -> None:
        self.thread.join(WAIT)
        assert not self.thread.is_alive()
        assert "row" in self.result


def wait_until_busy(pooler, pid: int) -> None:
    """Until the status table shows a session of backend pid running or waiting for a transaction."""
    def busy():
        return any(b["pid"] == pid and b["waiting"] >= 1 for b in status_json(pooler)["backends"])
    wait_for(busy, f"backend {pid} to show a session waiting for transaction execution")


# ---------------------------------------------------------------- pool life cycle

def test_new_backend_per_session_until_session_pool_size(start_pooler):
    pooler = start_pooler(session_pool_size=3)
    first = connect_many(pooler, 3)
    later = connect_many(pooler, 4)
    try:
        first_pids = [backend_pid(c) for c in first]
        assert len(set(first_pids)) == 3, "each of the first 3 sessions should get a backend of its own"
        assert {backend_pid(c) for c in later} <= set(first_pids)
        # They are real, distinct server connections too.
        assert len({server_pid(c) for c in first}) == 3
        pooled = [p for p in pooler.children() if title(p).startswith("pgforkpool: backend app/app")]
        assert sorted(p.pid for p in pooled) == sorted(first_pids)
    finally:
        close_all(first + later)


def test_pool_per_database_and_user(start_pooler):
    pooler = start_pooler(session_pool_size=1)
    app_app = pooler.connect("app", "app")
    app_alice = pooler.connect("alice", "app")
    other_app = pooler.connect("app", "other")
    app_app_again = pooler.connect("app", "app")
    try:
        pids = {backend_pid(c) for c in (app_app, app_alice, other_app)}
        assert len(pids) == 3
        assert backend_pid(app_app_again) == backend_pid(app_app)
        assert len({server_pid(c) for c in (app_app, app_alice, other_app)}) == 3
        assert app_alice.execute("SELECT current_user, current_database()").fetchone() == ("alice", "app")
        assert other_app.execute("SELECT current_user, current_database()").fetchone() == ("app", "other")
        titles = {backend_pid(c): title(psutil.Process(backend_pid(c)))
                  for c in (app_app, app_alice, other_app)}
        assert titles[backend_pid(app_app)].startswith("pgforkpool: backend app/app ")
        assert titles[backend_pid(app_alice)].startswith("pgforkpool: backend app/alice ")
        assert titles[backend_pid(other_app)].startswith("pgforkpool: backend other/app ")
    finally:
        close_all([app_app, app_alice, other_app, app_app_again])


# ---------------------------------------------------------------- session_schedule

def test_round_robin_alternates(start_pooler):
    pooler = start_pooler(session_pool_size=2, session_schedule="round-robin")
    conns = connect_many(pooler, 6)
    try:
        pids = [backend_pid(c) for c in conns]
        assert pids[0] != pids[1]
        s3, s4, s5, s6 = pids[2:]
        assert s3 != s4
        assert {s3, s4} == {pids[0], pids[1]}
        assert s5 == s3 and s6 == s4
    finally:
        close_all(conns)


def test_random_uses_both_backends(start_pooler):
    pooler = start_pooler(session_pool_size=2, session_schedule="random")
    conns = connect_many(pooler, 24)
    try:
        pids = [backend_pid(c) for c in conns]
        backends = {pids[0], pids[1]}
        assert len(backends) == 2
        assert set(pids) == backends
        # 22 scheduled sessions all on one backend: probability 2**-21.
        assert set(pids[2:]) == backends
    finally:
        close_all(conns)


def test_load_balancing_picks_the_backend_with_fewest_waiting(start_pooler):
    pooler = start_pooler(session_pool_size=2, session_schedule="load-balancing")
    s1, s2 = connect_many(pooler, 2)
    later = []
    try:
        a, b = backend_pid(s1), backend_pid(s2)
        assert a != b
        sleeper = Sleeper(s1, 3)
        wait_until_busy(pooler, a)
        # B has as many sessions as A, then more, but none waiting: it gets them all.
        later = connect_many(pooler, 2)
        assert [backend_pid(c) for c in later] == [b, b]
        for conn in later:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        sleeper.join()
    finally:
        close_all([s1, s2] + later)


def test_round_robin_ignores_load(start_pooler):
    """The contrast to load-balancing: round-robin sends the next session to the busy backend."""
    pooler = start_pooler(session_pool_size=2, session_schedule="round-robin")
    s1, s2 = connect_many(pooler, 2)
    later = []
    try:
        a, b = backend_pid(s1), backend_pid(s2)
        sleeper = Sleeper(s1, 3)
        wait_until_busy(pooler, a)
        later = connect_many(pooler, 2)
        assert [backend_pid(c) for c in later] == [a, b]
        sleeper.join()
    finally:
        close_all([s1, s2] + later)


# ---------------------------------------------------------------- process titles and owner

def test_process_titles_and_os_user(start_pooler):
    pooler = start_pooler(session_pool_size=1)
    postmaster = psutil.Process(pooler.pid)
    wait_for(lambda: title(postmaster) == "pgforkpool: postmaster 0 sessions, 0 pooled and 0 dedicated "
                                          "backends", f"the postmaster's title (it is {title(postmaster)!r})")
    wait_for_titles(pooler, ["pgforkpool: listener 1", "pgforkpool: listener 2"])

    pooled = [pooler.connect(), pooler.connect()]
    dedicated = pooler.connect("postgres", "postgres")
    try:
        pid = backend_pid(pooled[0])
        assert backend_pid(pooled[1]) == pid
        backend = psutil.Process(pid)
        assert title(backend).startswith("pgforkpool: backend app/app")
        # The title is refreshed by the backend's event loop: poll for the count.
        wait_for(lambda: (m := BACKEND_TITLE.match(title(backend))) and m.group(3) == "2",
                 f"the title to show 2 sessions (it is {title(backend)!r})")
        assert title(psutil.Process(backend_pid(dedicated))) == \
            "pgforkpool: dedicated backend postgres/postgres"
        wait_for(lambda: title(postmaster) == "pgforkpool: postmaster 3 sessions, 1 pooled and "
                                              "1 dedicated backend",
                 f"the postmaster's title to count them (it is {title(postmaster)!r})")

        children = pooler.children()
        assert len(children) == 4   # two listeners, one pooled backend, one dedicated backend
        if psutil.Process().username() == "root":
            assert psutil.Process(pooler.pid).username() == "postgres"
            assert {p.username() for p in children} == {"postgres"}
    finally:
        close_all(pooled + [dedicated])


def test_pooled_backend_title_shows_waiting_sessions(start_pooler):
    pooler = start_pooler(session_pool_size=1)
    holder, waiter = pooler.connect(), pooler.connect()
    try:
        backend = psutil.Process(backend_pid(holder))
        holder.execute("BEGIN")
        holder.execute("SELECT 1")
        thread = threading.Thread(target=lambda: waiter.execute("SELECT 1"))
        thread.start()
        wait_for(lambda: title(backend) == "pgforkpool: backend app/app 2 sessions 1 waiting",
                 f"the title to show 1 waiting session (it is {title(backend)!r})")
        holder.execute("COMMIT")
        thread.join(WAIT)
        assert not thread.is_alive()
        wait_for(lambda: title(backend) == "pgforkpool: backend app/app 2 sessions 0 waiting",
                 f"the title to show no waiting session (it is {title(backend)!r})")
    finally:
        close_all([holder, waiter])


def test_connection_pool_workers_sets_the_listener_count(start_pooler):
    pooler = start_pooler(connection_pool_workers=3)
    wait_for_titles(pooler, ["pgforkpool: listener 1", "pgforkpool: listener 2", "pgforkpool: listener 3"])
    with pooler.connect() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


# ---------------------------------------------------------------- status

def test_status_json_lists_pooled_backends(start_pooler):
    pooler = start_pooler(session_pool_size=2)
    conns = connect_many(pooler, 3) + [pooler.connect("alice", "app")]
    try:
        for conn in conns:
            conn.execute("SELECT 1")
        app_pids = sorted({backend_pid(c) for c in conns[:3]})
        alice_pid = backend_pid(conns[3])
        data = status_json(pooler)
        assert data["postmaster_pid"] == pooler.pid
        rows = {row["pid"]: row for row in data["backends"]}
        assert sorted(pid for pid, row in rows.items()
                      if (row["database"], row["user"]) == ("app", "app")) == app_pids
        assert rows[alice_pid]["database"] == "app" and rows[alice_pid]["user"] == "alice"
        assert sorted(rows[pid]["sessions"] for pid in app_pids) == [1, 2]
        assert rows[alice_pid]["sessions"] == 1
        for pid in app_pids + [alice_pid]:
            assert isinstance(rows[pid]["load_average"], float)
            assert rows[pid]["load_average"] >= 0.0
    finally:
        close_all(conns)
