"""Many clients at once on a pool of two backends, each doing what real applications do (settings,
prepared and unnamed statements, pipelines with errors, COPY both ways, cursors, temporary tables,
advisory locks, LISTEN, cancels, large messages, placeholders of plpgsql) and some misbehaving
(garbage after login, vanishing mid-result or mid-query).  Every client checks after each step
that its own tenant setting is the one it reads; a monitor session checks that the pool keeps
answering.  Seeded: the same steps each run (their interleaving is the machine's).

This run found three defects, each with a test of its own in test_core_defects.py: a stray
CopyData half sent let the connection go to another session (a FATAL on the server for the
next one), a placeholder another session's plpgsql load reserved ended its session with FATAL,
and the server's WARNING about that placeholder reached the session that loaded plpgsql."""

import contextlib
import os
import random
import socket
import struct
import threading
import time
import traceback

import psycopg
from psycopg import generators

from conftest import WAIT, backend_pid

SECONDS = float(os.environ.get("CHAOS_SECONDS", "15"))
CLIENTS = int(os.environ.get("CHAOS_CLIENTS", "12"))
STUCK = WAIT   # a monitor query unanswered this long fails the test
# Steps after which the client's connection is gone on purpose.
LEAVING = {"vanish_mid_result", "garbage_after_login", "send_and_leave"}
# Errors a step may get by its own doing (a cancel or a timeout; plpgsql's reserved prefix).
EXPECTED = (psycopg.errors.QueryCanceled, psycopg.errors.InvalidName)


def message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


def garbage(rng: random.Random) -> bytes:
    """A few frontend messages, malformed or not: random bodies, absurd lengths, a Bind whose
    parameters are noise, a Query followed by noise."""
    out = b""
    for _ in range(rng.randint(1, 6)):
        kind = rng.choice(b"QPBEDCSHXdcfFp?")
        choice = rng.random()
        if choice < 0.3:
            out += message(bytes([kind]), rng.randbytes(rng.randint(0, 40)))
        elif choice < 0.5:
            out += bytes([kind]) + struct.pack("!I", rng.choice([0, 1, 3, 5, 2**31 - 1, 2**32 - 1, 70_000_000]))
        elif choice < 0.7:
            out += (message(b"P", b"s1\0SELECT 1\0\0\0") + message(b"B", b"\0s1\0" + rng.randbytes(rng.randint(0, 12)))
                    + message(b"E", b"\0\0\0\0\0") + message(b"S", b""))
        else:
            out += message(b"Q", b"SELECT 1;SELECT pg_sleep(0.01)\0") + rng.randbytes(rng.randint(0, 10))
    return out


class Client:
    """One application connection and the tenant it set for itself."""

    def __init__(self, pooler, n: int):
        self.tenant = f"tenant-{n}"
        self.conn = pooler.connect()
        self.conn.execute("SELECT set_config('myapp.tenant', %s, false)", (self.tenant,), prepare=True)

    def tenant_seen(self):
        return self.conn.execute("SELECT current_setting('myapp.tenant', true)").fetchone()[0]

    def set_tenant(self) -> None:
        self.conn.execute("SELECT set_config('myapp.tenant', %s, false)", (self.tenant,))


# ================================================================ the steps


def plain(c, rng):
    assert c.conn.execute("SELECT 41 + 1").fetchone()[0] == 42


def prepared_repeat(c, rng):
    for i in range(rng.randint(1, 8)):
        assert c.conn.execute("SELECT %s::int + 1", (i,), prepare=True).fetchone()[0] == i + 1


def set_and_reset(c, rng):
    c.conn.execute("SET work_mem = '3MB'")
    assert c.conn.execute("SHOW work_mem").fetchone()[0] == "3MB"
    c.conn.execute(rng.choice(["RESET work_mem", "RESET ALL", "SET work_mem TO DEFAULT"]))
    c.set_tenant()


def transaction_with_error(c, rng):
    with c.conn.transaction():
        c.conn.execute("SELECT 1")
        with contextlib.suppress(psycopg.errors.DivisionByZero), c.conn.transaction():
            c.conn.execute("SELECT 1/0")
        c.conn.execute("SELECT 2")


def rollback_setting(c, rng):
    c.conn.execute("BEGIN")
    c.conn.execute(rng.choice(["SET myapp.tenant = 'intruder'",
                               "SELECT set_config('myapp.tenant', 'intruder', false)"]))
    if rng.random() < 0.3:
        with contextlib.suppress(psycopg.errors.DivisionByZero):
            c.conn.execute("SELECT 1/0")
    c.conn.execute("ROLLBACK")


def tenant_in_transaction(c, rng):
    with c.conn.transaction():
        c.conn.execute("SELECT set_config('myapp.tenant', %s, true)", ("local-" + c.tenant,), prepare=True)
        assert c.tenant_seen() == "local-" + c.tenant


def discard(c, rng):
    c.conn.execute(rng.choice(["DISCARD ALL", "DISCARD TEMP", "DISCARD PLANS", "RESET ALL", "DEALLOCATE ALL"]))
    c.set_tenant()


def temp_table(c, rng):
    c.conn.execute("CREATE TEMP TABLE IF NOT EXISTS t (x int)")
    c.conn.execute("INSERT INTO t VALUES (1)")
    assert c.conn.execute("SELECT count(*) FROM t").fetchone()[0] >= 1
    if rng.random() < 0.5:
        c.conn.execute("DROP TABLE t")


def advisory(c, rng):
    key = rng.randint(1, 5)
    if c.conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]:
        c.conn.execute("SELECT pg_advisory_unlock(%s)", (key,))


def listen_notify(c, rng):
    c.conn.execute("LISTEN chaos")
    c.conn.execute("NOTIFY chaos, 'x'")
    c.conn.execute("UNLISTEN chaos")


def pipeline_with_error(c, rng):
    with contextlib.suppress(psycopg.errors.DivisionByZero), c.conn.pipeline():
        c.conn.execute("SELECT 1")
        c.conn.execute("SELECT 1/0")
        c.conn.execute("SELECT 2")


def pipeline_prepared(c, rng):
    with c.conn.pipeline() as pipeline:
        for i in range(rng.randint(1, 20)):
            c.conn.execute("SELECT %s::int", (i,), prepare=True)
            if rng.random() < 0.2:
                pipeline.sync()


def unnamed_across_round_trips(c, rng):
    # (libpq's blocking PQprepare/PQdescribePrepared would hold the GIL while the pool is busy:
    # the asynchronous calls, waited for as psycopg does.)
    pg = c.conn.pgconn
    pg.send_prepare(b"", b"SELECT $1::int + 1")
    (result,) = c.conn.wait(generators.execute(pg))
    assert result.status == psycopg.pq.ExecStatus.COMMAND_OK, result.error_message
    pg.send_describe_prepared(b"")
    (result,) = c.conn.wait(generators.execute(pg))
    assert result.status == psycopg.pq.ExecStatus.COMMAND_OK, result.error_message
    pg.send_query_prepared(b"", [b"41"])
    (result,) = c.conn.wait(generators.execute(pg))
    assert result.get_value(0, 0) == b"42", result.error_message


def copy_out(c, rng):
    with c.conn.cursor().copy(f"COPY (SELECT g FROM generate_series(1, {rng.randint(1, 5000)}) g) TO STDOUT") as copy:
        for _ in copy:
            pass


def copy_in_abort(c, rng):
    c.conn.execute("CREATE TEMP TABLE IF NOT EXISTS ci (x int)")
    try:
        with c.conn.cursor().copy("COPY ci FROM STDIN") as copy:
            for i in range(rng.randint(1, 2000)):
                copy.write_row((i,))
            if rng.random() < 0.5:
                raise ValueError("the application gives up")
    except ValueError:
        pass


def server_side_cursor(c, rng):
    with c.conn.transaction():
        with c.conn.cursor(name="c") as cur:
            cur.execute("SELECT g FROM generate_series(1, 1000) g")
            cur.fetchmany(10)


def idle_in_transaction(c, rng):
    with c.conn.transaction():
        c.conn.execute("SELECT 1")
        time.sleep(rng.random() * 0.05)   # the application thinks


def statement_timeout(c, rng):
    c.conn.execute("SET statement_timeout = '20ms'")
    with contextlib.suppress(psycopg.errors.QueryCanceled):
        c.conn.execute("SELECT pg_sleep(0.1)")
    c.conn.execute("RESET statement_timeout")


def large_messages(c, rng):
    value = "y" * rng.choice([100_000, 1_000_000, 3_000_000])
    assert c.conn.execute("SELECT length(%s)", (value,)).fetchone()[0] == len(value)
    blob = rng.randbytes(rng.choice([10_000, 2_000_000]))
    assert bytes(c.conn.execute("SELECT %b::bytea", (blob,)).fetchone()[0]) == blob


def plpgsql_placeholder(c, rng):
    c.conn.execute(f"SET plpgsql.chaos_{rng.randint(1, 3)} = 'x'")   # InvalidName once loaded here
    c.conn.execute("DO $$BEGIN PERFORM 1; END$$")


def cancel_big_result(c, rng):
    timer = threading.Timer(rng.random() * 0.05, c.conn.cancel_safe, kwargs={"timeout": 5})
    timer.start()
    try:
        c.conn.execute("SELECT repeat('x', 1000) FROM generate_series(1, 20000)").fetchall()
    except psycopg.errors.QueryCanceled:
        pass
    finally:
        timer.cancel()
        timer.join(10)


def vanish_mid_result(c, rng):
    c.conn.pgconn.send_query(b"SELECT repeat('x', 1000) FROM generate_series(1, 50000)")
    time.sleep(rng.random() * 0.01)
    sock = socket.socket(fileno=os.dup(c.conn.pgconn.socket))
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    c.conn.close()


def send_and_leave(c, rng):
    c.conn.pgconn.send_query(rng.choice([b"SELECT pg_sleep(0.05)", b"BEGIN; SELECT 1",
                                         b"SELECT set_config('myapp.tenant', 'leaver', false)"]))
    c.conn.close()


def garbage_after_login(c, rng):
    sock = socket.socket(fileno=os.dup(c.conn.pgconn.socket))
    sock.settimeout(2)
    try:
        sock.sendall(garbage(rng))
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and sock.recv(65536):
            pass
    except OSError:
        pass
    sock.close()
    c.conn.close()


STEPS = [plain, plain, plain, prepared_repeat, prepared_repeat, set_and_reset, transaction_with_error,
         rollback_setting, tenant_in_transaction, discard, temp_table, advisory, listen_notify,
         pipeline_with_error, pipeline_prepared, unnamed_across_round_trips, copy_out, copy_in_abort,
         server_side_cursor, idle_in_transaction, statement_timeout, large_messages, plpgsql_placeholder,
         cancel_big_result, vanish_mid_result, send_and_leave, garbage_after_login]


def retry(fn):
    """fn(), again if a cancel meant for the step before lands on it (a cancel request races
    with the statement it was sent for, in PostgreSQL too)."""
    try:
        return fn()
    except psycopg.errors.QueryCanceled:
        return fn()


class Run:
    def __init__(self, pooler):
        self.pooler = pooler
        self.stop = time.monotonic() + SECONDS
        self.leaks: list[str] = []       # a session that read another tenant than its own
        self.failures: list[str] = []    # errors no step should get
        self.steps = 0
        self.current: dict[int, tuple[str, float]] = {}

    def client(self, n: int) -> None:
        rng = random.Random(n)
        c = None
        try:
            while time.monotonic() < self.stop:
                if c is None or c.conn.closed or c.conn.broken:
                    c = Client(self.pooler, n)
                step = rng.choice(STEPS)
                self.current[n] = (step.__name__, time.monotonic())
                try:
                    step(c, rng)
                except EXPECTED:
                    # (A step cut short may have left its tenant unset: RESET ALL, then a cancel.)
                    if c.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                        c.conn.execute("ROLLBACK")
                    retry(c.set_tenant)
                except psycopg.Error as exc:
                    if not (step.__name__ in LEAVING and isinstance(exc, psycopg.OperationalError)):
                        self.failures.append(f"client {n}, {step.__name__}: {exc!r}")
                    c = None
                    continue
                self.steps += 1
                if step.__name__ in LEAVING or c.conn.closed:
                    c = None
                    continue
                if c.conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
                    seen = retry(c.tenant_seen)
                    if seen != c.tenant:
                        self.leaks.append(f"client {n} after {step.__name__} read tenant {seen!r}")
                        c.set_tenant()
        except Exception:   # noqa: BLE001 - reported by the test
            self.failures.append(f"client {n}: {traceback.format_exc()}")
        finally:
            if c is not None:
                c.conn.close()


def test_many_clients_doing_everything_at_once_stay_isolated_and_served(start_pooler):
    pooler = start_pooler(session_pool_size=2)
    run = Run(pooler)
    monitor = pooler.connect()
    clients = [threading.Thread(target=run.client, args=(n,), daemon=True) for n in range(CLIENTS)]
    for thread in clients:
        thread.start()
    slowest = 0.0
    try:
        while any(thread.is_alive() for thread in clients) and time.monotonic() < run.stop + 30:
            answer: list = []

            def probe():
                try:
                    answer.append(monitor.execute("SELECT 1").fetchone()[0])
                except psycopg.Error as exc:
                    answer.append(exc)

            started = time.monotonic()
            prober = threading.Thread(target=probe, daemon=True)
            prober.start()
            prober.join(STUCK)
            busy = {n: f"{name} for {time.monotonic() - since:.1f} s"
                    for n, (name, since) in dict(run.current).items()}
            assert answer == [1], f"the monitor session got {answer or 'no answer'} in {STUCK} s; clients: {busy}"
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.05)
    finally:
        run.stop = 0.0   # the clients end their step and stop, whatever happened here
        deadline = time.monotonic() + 30
        for thread in clients:
            thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in clients), f"clients still busy: {dict(run.current)}"
    print(f"{run.steps} steps by {CLIENTS} clients in {SECONDS:.0f} s; the monitor's slowest answer "
          f"{slowest * 1000:.0f} ms")
    assert not run.leaks, run.leaks[:10]
    assert not run.failures, run.failures[:10]
    log = pooler.log()
    assert "Traceback" not in log and "lost server connection" not in log
    assert backend_pid(monitor) in {p.pid for p in pooler.children()}
