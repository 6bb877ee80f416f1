"""The /metrics endpoint: SHOW STATS and SHOW POOLS figures in the Prometheus text format.

A process of its own, forked by the postmaster when `metrics_port` is set, so
that a slow or stuck scraper never holds the postmaster up.  The postmaster
binds the socket (a port in use is a start-up error); this process serves it,
one request at a time.  Each scrape reads the shared-memory status table for
the backends' current figures and asks the postmaster for the pools'
cumulative ones (which include backends that have exited).

The exposition is prometheus_client's: metric families built per scrape by a
custom collector, rendered by generate_latest.
"""

import http.server
import os
import select
import signal
import socket
import sys
import threading
import time

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (CollectorRegistry, CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)

from ..shared import channel, log, process, status

logger = log.get("metrics")

ASK_TIMEOUT = 5.0
POOL = ["database", "user"]
BACKEND = ["pid", "database", "user", "kind"]


class Collector:
    def __init__(self, table: status.StatusTable | None, chan: socket.socket):
        self.table = table
        self.chan = chan
        self.token = 0

    def _pool_stats(self) -> list[dict]:
        """The postmaster's SHOW STATS rows (cumulative, exited backends included)."""
        self.token += 1
        channel.send(self.chan, ("ask", self.token, "stats", None, ASK_TIMEOUT))
        deadline = time.monotonic() + ASK_TIMEOUT
        while time.monotonic() < deadline:
            if not select.select([self.chan], [], [], max(0.0, deadline - time.monotonic()))[0]:
                break
            msg, fd = channel.receive(self.chan)
            if fd is not None:
                os.close(fd)
            if msg is None:
                os._exit(0)   # the postmaster has gone
            if msg[0] == "answer" and msg[1] == self.token:
                return msg[2]
        logger.warning("no answer from the postmaster for /metrics")
        return []

    def collect(self):
        stats = self._pool_stats()
        counters = {
            "transactions": ("pgforkpool_transactions", "Transactions served."),
            "queries": ("pgforkpool_queries", "Queries served (ReadyForQuery messages to clients)."),
            "bytes_in": ("pgforkpool_received_bytes", "Bytes received from clients."),
            "bytes_out": ("pgforkpool_sent_bytes", "Bytes received from the server for clients."),
        }
        families = {key: CounterMetricFamily(name, text, labels=POOL)
                    for key, (name, text) in counters.items()}
        xact = HistogramMetricFamily("pgforkpool_transaction_duration_seconds",
                                     "Time a session held the server connection per transaction.",
                                     labels=POOL)
        wait = HistogramMetricFamily("pgforkpool_wait_duration_seconds",
                                     "Time a session waited for the server connection.", labels=POOL)
        for row in stats:
            labels = [row["database"], row["user"]]
            for key, family in families.items():
                family.add_metric(labels, row.get(key, 0))
            xact.add_metric(labels, _buckets(row, "xact_hist"), row.get("xact_us", 0) / 1e6)
            wait.add_metric(labels, _buckets(row, "wait_hist"), row.get("wait_us", 0) / 1e6)
        yield from families.values()
        yield xact
        yield wait

        gauges = {
            "sessions": ("pgforkpool_backend_sessions", "Client sessions of a backend."),
            "waiting": ("pgforkpool_backend_ready", "Sessions ready to run (running or waiting) at the "
                                                    "backend's last event-loop turn."),
            "pinned": ("pgforkpool_backend_pinned_sessions", "Sessions with a server connection of "
                                                            "their own."),
            "load_average": ("pgforkpool_backend_load_average", "pg_backend_load_average(pid)."),
            "paused": ("pgforkpool_backend_paused", "1 while the backend's pool is paused."),
            "draining": ("pgforkpool_backend_draining", "1 while the backend takes no new sessions."),
            "migrations": ("pgforkpool_backend_migrations", "Sessions the backend has handed to "
                                                            "another backend of its pool "
                                                            "(session_migration) since it started."),
        }
        backend_families = {key: GaugeMetricFamily(name, text, labels=BACKEND)
                            for key, (name, text) in gauges.items()}
        pools = GaugeMetricFamily("pgforkpool_pool_backends", "Backends of a pool.",
                                  labels=POOL + ["kind"])
        per_pool: dict[tuple[str, str, str], int] = {}
        for slot in (self.table.slots() if self.table is not None else []):
            if not slot["pid"]:
                continue
            labels = [str(slot["pid"]), slot["database"], slot["user"], slot["kind"]]
            for key, family in backend_families.items():
                family.add_metric(labels, float(slot[key]))
            key = (slot["database"], slot["user"], slot["kind"])
            per_pool[key] = per_pool.get(key, 0) + 1
        for (database, user, kind), count in sorted(per_pool.items()):
            pools.add_metric([database, user, kind], count)
        yield from backend_families.values()
        yield pools


def _buckets(row: dict, prefix: str) -> list[tuple[str, int]]:
    """Cumulative (upper bound in seconds, count) pairs, the last one +Inf."""
    buckets, running = [], 0
    for i, bound in enumerate(status.HISTOGRAM_BOUNDS_US):
        running += row.get(f"{prefix}_{i}", 0)
        buckets.append((repr(bound / 1e6), running))
    running += row.get(f"{prefix}_{len(status.HISTOGRAM_BOUNDS_US)}", 0)
    buckets.append(("+Inf", running))
    return buckets


def bind(settings) -> socket.socket:
    """The endpoint's listening socket, bound by the postmaster at start (OSError if it cannot)."""
    address = settings.metrics_address
    host = "" if address in ("*", "") else address
    family, _type, _proto, _name, addr = socket.getaddrinfo(
        host or None, settings.metrics_port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    return sock


REQUEST_DEADLINE = 30.0   # seconds a metrics client has to send its request and read the answer


def _shut(connection: socket.socket) -> None:
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def main(listen: socket.socket, table: status.StatusTable | None, chan: socket.socket) -> None:
    """Entry point in the forked metrics process."""
    process.set_title("metrics")
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(table, chan))

    # Each request has a thread of its own, so that a slow client (one that sends its request
    # a byte at a time) holds only itself; the figures are gathered one request at a time (the
    # channel to the postmaster carries one question at a time).
    gather = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        timeout = 10   # a client that sends nothing for this long is dropped

        def setup(self):
            super().setup()
            # ... and one that trickles its request is dropped after REQUEST_DEADLINE in all.
            connection = self.connection
            self.deadline = threading.Timer(REQUEST_DEADLINE, _shut, (connection,))
            self.deadline.daemon = True
            self.deadline.start()

        def finish(self):
            self.deadline.cancel()
            try:
                super().finish()
            except OSError:
                pass

        def do_GET(self):   # noqa: N802 - the name http.server calls
            if self.path.split("?")[0] not in ("/metrics", "/"):
                self.send_error(404, "only /metrics is served here")
                return
            with gather:
                body = generate_latest(registry)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt, *args):
            logger.debug("metrics request: " + fmt, *args)

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request, client_address):
            error = sys.exc_info()[1]
            if isinstance(error, OSError):
                # A scraper that went away mid-request (reset, timed out): one line, no traceback.
                logger.debug("metrics request from %s ended early: %s", client_address[0], error)
            else:
                super().handle_error(request, client_address)

    server = Server(listen.getsockname()[:2], Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = listen
    server.serve_forever()
