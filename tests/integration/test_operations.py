"""Operating the pooler: connection logging, shutdown and start hygiene, status, metrics, systemd."""

import os
import re
import signal
import socket
import struct
import subprocess
import threading
import time

import psycopg
import pytest

from conftest import PGFORKPOOL, WAIT, query_running, wait_for


def test_log_connections_and_disconnections_as_postgresql_words_them(start_pooler):
    pool = start_pooler(log_connections="on", log_disconnections="on")
    conn = pool.connect(application_name="billing")
    conn.execute("SELECT 1")
    port = conn.pgconn.socket and socket.socket(fileno=os.dup(conn.pgconn.socket)).getsockname()[1]
    conn.close()
    wait_for(lambda: "disconnection:" in pool.log(), "the disconnection line")
    log = pool.log()
    assert f"LOG:  connection received: host=127.0.0.1 port={port}" in log
    assert "LOG:  connection authorized: user=app database=app application_name=billing" in log
    assert re.search(r"LOG:  disconnection: session time: \d+:\d\d:\d\d\.\d{3} user=app database=app "
                     rf"host=127\.0\.0\.1 port={port}", log), log


def test_fast_shutdown_leaves_no_query_running_on_the_server(start_pooler, cluster):
    pool = start_pooler(session_pool_size=1)
    pinned = pool.connect()
    pinned.execute("CREATE TEMP TABLE t (x int)")   # a pinned session: a connection of its own
    shared = pool.connect()
    threads = []
    for conn, tag in ((shared, "shared"), (pinned, "pinned")):
        t = threading.Thread(target=lambda c=conn, tag=tag: _ignore(c.execute, f"SELECT pg_sleep(60) /* {tag} */"))
        t.start()
        threads.append(t)
    wait_for(lambda: query_running(cluster, "SELECT pg_sleep(60) /* shared") and
             query_running(cluster, "SELECT pg_sleep(60) /* pinned"), "both sleeps to run on the server")
    assert pool.stop(signal.SIGINT) == 0
    wait_for(lambda: not query_running(cluster, "SELECT pg_sleep(60)"), "the sleeps to be cancelled", timeout=5)
    for t in threads:
        t.join(timeout=WAIT)


def _ignore(fn, *args):
    try:
        fn(*args)
    except psycopg.Error:
        pass


def test_smart_shutdown_refuses_new_connections_with_57p03(start_pooler):
    pool = start_pooler()
    old = pool.connect()
    old.execute("SELECT 1")
    pool.signal(signal.SIGTERM)
    wait_for(lambda: "received smart shutdown request" in pool.log(), "the smart shutdown")
    with pytest.raises(psycopg.OperationalError) as info:
        pool.connect()
    assert "the database system is shutting down" in str(info.value)
    out = pool.psql("SELECT 1", check=False)   # psql over TCP asks for SSL first
    assert "the database system is shutting down" in out.stderr
    assert old.execute("SELECT 2").fetchone() == (2,)   # the old session goes on
    old.close()
    assert pool.proc.wait(timeout=WAIT) == 0


def test_an_instance_removes_only_its_own_pid_file_and_status_table(start_pooler):
    first = start_pooler()
    pid_file = first.settings["pid_file"]
    # Another running instance configured with the same pid file is refused, in one line.
    other = type(first)(first.cluster, dict(first.settings, port=first.port + 0))
    other.port = other.settings["port"] = _free_port()
    other.write_config()
    out = subprocess.run([PGFORKPOOL, "start", other.conf], capture_output=True, text=True, timeout=WAIT)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert f"is running with PID {first.pid}" in out.stderr, out.stderr
    # What is no longer this instance's (a newer instance wrote its own) stays when it stops.
    with open(pid_file, "w") as f:
        f.write("4194000\n")
    first.stop()
    assert _read(pid_file) == "4194000\n"
    os.unlink(pid_file)
    # Restarted on the same port: its own pid file and status table, found by `status`.
    second = type(first)(first.cluster, dict(first.settings))
    second.port = first.port
    second.write_config()
    try:
        second.start()
        assert _read(pid_file) == f"{second.pid}\n"
        out = subprocess.run([PGFORKPOOL, "status", second.conf], capture_output=True, text=True,
                             timeout=WAIT)
        assert out.returncode == 0 and f"postmaster {second.pid}" in out.stdout, out.stderr
    finally:
        second.cleanup()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_instances_keep_their_own_pid_files(start_pooler):
    a, b = start_pooler(), start_pooler()
    assert _read(a.settings["pid_file"]) == f"{a.pid}\n"
    assert _read(b.settings["pid_file"]) == f"{b.pid}\n"
    a.stop()
    assert not os.path.exists(a.settings["pid_file"])
    assert _read(b.settings["pid_file"]) == f"{b.pid}\n"


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


@pytest.mark.parametrize("change, message", [
    ({"auth_file": "/nonexistent/users.txt"}, "/nonexistent/users.txt: could not read auth_file"),
    ({"port": "{busy}"}, "address already in use"),
])
def test_start_up_errors_are_one_clear_line(start_pooler, tmp_path, change, message):
    pool = start_pooler()
    busy = pool.port
    other = type(pool)(pool.cluster, dict(pool.settings))
    settings = {k: (v.format(busy=busy) if isinstance(v, str) else v) for k, v in change.items()}
    other.write_config(**settings)
    out = subprocess.run([PGFORKPOOL, "start", other.conf], capture_output=True, text=True, timeout=WAIT)
    assert out.returncode != 0
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    assert "Traceback" not in out.stderr, out.stderr
    assert any(message in line for line in lines), lines
    assert len([line for line in lines if "FATAL" in line]) == 1, lines


def scrape(port):
    import urllib.request
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WAIT) as response:
        assert response.status == 200
        text = response.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample(families, name, suffix="", **labels):
    family = families[name]
    for s in family.samples:
        if s.name == name + suffix and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError((name, suffix, labels))


def test_metrics_endpoint_parses_and_its_counters_grow_with_traffic(start_pooler):
    port = _free_port()
    pool = start_pooler(metrics_port=port, metrics_address="127.0.0.1", session_pool_size=2)
    conn = pool.connect()
    conn.execute("SELECT 1")
    before = scrape(port)
    xacts = sample(before, "pgforkpool_transactions", "_total", database="app", user="app")
    for _ in range(25):
        conn.execute("SELECT repeat('y', 500)")
    # A backend publishes its figures at least once a second.
    after = wait_for(lambda: (f := scrape(port)) and sample(
        f, "pgforkpool_transactions", "_total", database="app", user="app") >= xacts + 25 and f,
        "the transactions to be counted")
    assert sample(after, "pgforkpool_sent_bytes", "_total", database="app", user="app") >= 25 * 500
    count = sample(after, "pgforkpool_transaction_duration_seconds", "_count", database="app", user="app")
    inf = sample(after, "pgforkpool_transaction_duration_seconds", "_bucket", database="app", user="app",
                 le="+Inf")
    assert count == inf >= 26
    assert "pgforkpool_wait_duration_seconds" in after
    sessions = [s for s in after["pgforkpool_backend_sessions"].samples if s.labels["database"] == "app"]
    assert sum(s.value for s in sessions) == 1
    conn.close()


def test_a_slow_metrics_client_stalls_no_other_scrape(start_pooler):
    """/metrics answered one request at a time: a client sending its request a byte at a time
    made every other scrape time out for as long as it stayed; one that went away early left a
    Python traceback in the log (found by a third exploratory run)."""
    port = _free_port()
    pool = start_pooler(metrics_port=port, metrics_address="127.0.0.1")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as slow:
        slow.sendall(b"GET /met")   # and nothing more for now
        started = time.monotonic()
        assert isinstance(scrape(port), dict)
        assert time.monotonic() - started < 5
        for _ in range(3):   # scrapers that reset their connection mid-request
            with socket.create_connection(("127.0.0.1", port), timeout=5) as rude:
                rude.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                rude.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert isinstance(scrape(port), dict)
    assert "Traceback" not in pool.log()


def test_metrics_port_in_use_is_a_start_up_error(start_pooler):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        pool = start_pooler()
        other = type(pool)(pool.cluster, dict(pool.settings))
        other.port = other.settings["port"] = _free_port()
        other.settings["pid_file"] = os.path.join(other.dir, "other.pid")
        other.write_config(metrics_port=busy.getsockname()[1], metrics_address="127.0.0.1")
        out = subprocess.run([PGFORKPOOL, "start", other.conf], capture_output=True, text=True,
                             timeout=WAIT)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "could not bind the metrics endpoint" in out.stderr, out.stderr


def test_listen_addresses_none_of_which_can_be_bound_is_a_start_up_error(start_pooler):
    """An address not on this host: the pooler said it was ready with no TCP socket at all;
    PostgreSQL stops with FATAL "could not create any TCP/IP sockets" (found by a third
    exploratory run)."""
    pool = start_pooler()
    other = type(pool)(pool.cluster, dict(pool.settings))
    other.port = other.settings["port"] = _free_port()
    other.settings["pid_file"] = os.path.join(other.dir, "other.pid")
    other.write_config(listen_addresses="192.0.2.1")   # TEST-NET-1: never a local address
    out = subprocess.run([PGFORKPOOL, "start", other.conf], capture_output=True, text=True,
                         timeout=WAIT)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "could not create any TCP/IP sockets" in out.stderr, out.stderr


def test_systemd_notifications_through_a_real_notify_socket(start_pooler, monkeypatch, tmp_path):
    from conftest import readable_tempdir
    path = os.path.join(readable_tempdir("pgforkpool-notify-"), "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    os.chmod(path, 0o777)   # the pooler sends as its `user` once it has switched
    sock.settimeout(WAIT)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    messages = []

    def receive_until(predicate):
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            messages.append(sock.recv(4096).decode())
            if predicate(messages[-1]):
                return messages[-1]
        raise AssertionError(f"no such notification among {messages}")

    pool = start_pooler()
    ready = receive_until(lambda m: "READY=1" in m)
    assert f"MAINPID={pool.pid}" in ready and "STATUS=accepting connections; 0 sessions" in ready
    conn = pool.connect()
    conn.execute("SELECT 1")
    receive_until(lambda m: "STATUS=accepting connections; 1 session, 1 pooled" in m)
    pool.signal(signal.SIGHUP)
    receive_until(lambda m: "RELOADING=1" in m)
    receive_until(lambda m: m.startswith("READY=1"))
    conn.close()
    pool.stop(signal.SIGINT)
    receive_until(lambda m: "STOPPING=1" in m)
    sock.close()
