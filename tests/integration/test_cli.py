"""The pgforkpool command as an operator runs it: status, reload, stop, start, help."""

import json
import socket
import subprocess

import psutil
import psycopg
import pytest
import yaml

from conftest import PGFORKPOOL, Pooler, WAIT, backend_pid, free_port, wait_for


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([PGFORKPOOL, *args], capture_output=True, text=True, timeout=timeout)


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.fixture
def unstarted(cluster):
    """A pooler configured in a directory of its own but not started; stopped and removed afterwards."""
    pooler = Pooler(cluster, {})
    yield pooler
    pooler.cleanup()


# ---------------------------------------------------------------- status

@pytest.fixture
def busy_pooler(start_pooler):
    """A pooler with two pools in use: (app, app) and (app, alice)."""
    pooler = start_pooler(session_pool_size=1)
    conns = [pooler.connect("app", "app"), pooler.connect("app", "app"), pooler.connect("alice", "app")]
    for conn in conns:
        conn.execute("SELECT 1")
    pooler.backend_pids = sorted({backend_pid(c) for c in conns})
    yield pooler
    for conn in conns:
        conn.close()


def test_status_table(busy_pooler):
    out = cli("status", busy_pooler.conf)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    header = next(line for line in lines if line.split("|")[0].strip() == "pid")
    for column in ("pid", "database", "user", "sessions", "load_average"):
        assert column in header
    rows = {int(line.split("|")[0]): [cell.strip() for cell in line.split("|")]
            for line in lines if line.split("|")[0].strip().isdigit()}
    assert sorted(rows) == busy_pooler.backend_pids
    assert sorted((row[2], row[3]) for row in rows.values()) == [("app", "alice"), ("app", "app")]
    assert str(busy_pooler.pid) in out.stdout


def test_status_json_and_yaml_agree(busy_pooler):
    as_json = cli("status", busy_pooler.conf, "--format", "json")
    as_yaml = cli("status", busy_pooler.conf, "--format", "yaml")
    assert as_json.returncode == 0 and as_yaml.returncode == 0, as_json.stderr + as_yaml.stderr
    data, other = json.loads(as_json.stdout), yaml.safe_load(as_yaml.stdout)
    for parsed in (data, other):
        assert parsed["postmaster_pid"] == busy_pooler.pid
        assert sorted(b["pid"] for b in parsed["backends"]) == busy_pooler.backend_pids
        sessions = {(b["database"], b["user"]): b["sessions"] for b in parsed["backends"]}
        assert sessions == {("app", "app"): 2, ("app", "alice"): 1}
        assert all(isinstance(b["load_average"], float) for b in parsed["backends"])


def test_status_shows_pools_and_takes_the_start_overrides(cluster):
    pooler = Pooler(cluster, {"pid_file": ""})   # found through the status table of its port
    pooler.port = free_port()
    try:
        pooler.start("-c", f"port={pooler.port}")
        with pooler.connect() as conn:
            conn.execute("SELECT 1")
            plain = cli("status", pooler.conf)
            assert plain.returncode != 0 and "no pgforkpool is running" in plain.stderr
            def status_json():
                out = cli("status", pooler.conf, "-c", f"port={pooler.port}", "--format", "json")
                assert out.returncode == 0, out.stderr
                return json.loads(out.stdout)
            # A backend publishes its figures at least once a second.
            data = wait_for(lambda: (d := status_json()) and any(
                p["transactions"] for p in d["pools"]) and d, "the transaction to be counted")
            assert data["port"] == pooler.port and data["postmaster_pid"] == pooler.pid
            pool = next(p for p in data["pools"] if (p["database"], p["user"]) == ("app", "app"))
            assert pool["sessions"] == 1 and pool["transactions"] >= 1
            assert [b["pid"] for b in data["backends"]] == [backend_pid(conn)]
            assert data["backends"][0]["rss_mb"] > 0
            table = cli("status", pooler.conf, "-c", f"port={pooler.port}")
            assert "avg_xact_time_us" in table.stdout and "rss_mb" in table.stdout
        # reload and stop take the same overrides (without them they looked for the pooler the
        # file alone names; found by a third exploratory run).
        assert cli("reload", pooler.conf).returncode != 0
        out = cli("reload", pooler.conf, "-c", f"port={pooler.port}")
        assert out.returncode == 0, out.stderr
        out = cli("stop", pooler.conf, "-c", f"port={pooler.port}")
        assert out.returncode == 0 and "server stopped" in out.stdout, out.stderr
        assert not psutil.pid_exists(pooler.pid) or psutil.Process(pooler.pid).status() == psutil.STATUS_ZOMBIE
    finally:
        pooler.cleanup()


# ---------------------------------------------------------------- reload

def test_reload_command(start_pooler):
    pooler = start_pooler(session_pool_size=1)
    first = pooler.connect()
    conns = [first]
    try:
        pooler.write_config(session_pool_size=2)
        out = cli("reload", pooler.conf)
        assert out.returncode == 0, out.stderr
        assert "server signaled" in out.stdout
        wait_for(lambda: 'parameter "session_pool_size" changed to "2"' in pooler.log(),
                 "the reload to be logged")
        conns.append(pooler.connect())
        assert backend_pid(conns[1]) != backend_pid(first)
    finally:
        for conn in conns:
            conn.close()


# ---------------------------------------------------------------- stop

def test_stop_fast_waits_until_the_postmaster_is_gone(start_pooler):
    pooler = start_pooler(session_pool_size=1)
    session = pooler.connect()
    session.execute("SELECT 1")
    out = cli("stop", pooler.conf, "--mode", "fast", timeout=WAIT)
    assert out.returncode == 0, out.stderr
    # Returned only once the postmaster had exited: nothing is left to wait for.
    assert pooler.proc.poll() == 0
    assert not listening(pooler.port)
    with pytest.raises(psycopg.OperationalError):
        session.execute("SELECT 1")
    session.close()


def test_stop_smart_without_sessions(start_pooler):
    pooler = start_pooler()
    with pooler.connect() as conn:
        conn.execute("SELECT 1")
    out = cli("stop", pooler.conf, "--mode", "smart", timeout=WAIT)
    assert out.returncode == 0, out.stderr
    assert pooler.proc.poll() == 0


def test_stop_when_not_running(start_pooler, unstarted):
    out = cli("stop", unstarted.conf, timeout=WAIT)
    assert out.returncode != 0
    assert "running" in out.stderr
    # And after it has been stopped once.
    pooler = start_pooler()
    assert cli("stop", pooler.conf, timeout=WAIT).returncode == 0
    again = cli("stop", pooler.conf, timeout=WAIT)
    assert again.returncode != 0
    assert "running" in again.stderr


# ---------------------------------------------------------------- start

@pytest.mark.parametrize("bad_line", ["nonsense_param = 1", "session_pool_size = lots"])
def test_start_with_config_error_names_file_and_line(unstarted, bad_line):
    with open(unstarted.conf, "a") as f:
        f.write(f"{bad_line}\n")
    with open(unstarted.conf) as f:
        line = len(f.read().splitlines())
    out = cli("start", unstarted.conf, timeout=WAIT)
    assert out.returncode != 0
    assert f"{unstarted.conf}:{line}" in out.stderr, out.stderr
    assert not listening(unstarted.port)


def test_start_command_line_overrides_the_file(unstarted):
    file_port = free_port()
    unstarted.write_config(port=file_port)
    unstarted.start("-c", f"port={unstarted.port}")   # waits until the override port listens
    with unstarted.connect() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert not listening(file_port)


def test_help():
    top = cli("--help", timeout=WAIT)
    assert top.returncode == 0, top.stderr
    for command in ("start", "reload", "stop", "status"):
        assert command in top.stdout
    start = cli("start", "--help", timeout=WAIT)
    assert start.returncode == 0, start.stderr
    assert "CONFIG" in start.stdout and "-c" in start.stdout


def test_a_throwaway_cluster_starts_on_the_port_asked_for_now():
    """scripts/run's PGPORT= on a second run: the cluster made by the first starts on the new port."""
    from conftest import Cluster, readable_tempdir
    base = readable_tempdir("pgforkpool-rerun-")
    first = Cluster(base, free_port())
    try:
        first.init()
        first.start()
        first.stop()
        second = Cluster(base, free_port())
        second.init()
        second.start()
        assert second.psql("SHOW port") == str(second.port)
    finally:
        first.destroy()
