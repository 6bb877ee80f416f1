"""The postmaster: binds the sockets, forks and supervises every other process, routes sessions.

Shaped like gunicorn's arbiter: signal handlers only wake the loop; the loop
dispatches to one method per signal; supervision is reap, then respawn.  The
postmaster never blocks on a client and never speaks the query protocol.
"""

import errno
import grp
import os
import pwd
import select
import signal
import socket
import time

# Every module a child runs is imported here, while the postmaster may still be root: then
# the OS user of the `user` setting need not read them (a Python under /root, say), and an
# import that fails stops the start instead of the postmaster at its first client.
from ..backend import console, dedicated, pooled
from ..listener import worker
from ..shared import auth, channel, config, log, process, status
from ..shared.errors import PgError
from . import metrics
from .pools import BackendSlot, Pool

logger = log.get("postmaster")

MAX_STATUS_SLOTS = 4096
METRICS_RESPAWN_AFTER = 10.0   # a metrics process that lived less than this is not started again
ACCEPT_BATCH = 64


class ListenerSlot:
    __slots__ = ("number", "pid", "chan", "outbox", "in_flight")

    def __init__(self, number: int, pid: int, chan: socket.socket):
        self.number = number
        self.pid = pid
        self.chan = chan
        self.outbox = channel.Outbox()
        self.in_flight: set[int] = set()   # connection ids it is authenticating

    def __str__(self) -> str:
        return f"listener {self.number} (PID {self.pid})"


class ConsoleSlot:
    """An admin console process (one per console connection)."""
    __slots__ = ("pid", "chan", "outbox")

    def __init__(self, pid: int, chan: socket.socket):
        self.pid = pid
        self.chan = chan
        self.outbox = channel.Outbox()

    def __str__(self) -> str:
        return f"console (PID {self.pid})"


class Question:
    """A console's question to every backend, answered through the postmaster."""
    __slots__ = ("console", "token", "what", "waiting", "rows", "deadline")

    def __init__(self, console: ConsoleSlot, token: int, waiting: set[int], deadline: float,
                 what: str):
        self.console = console
        self.token = token
        self.what = what
        self.waiting = waiting
        self.rows: list = []
        self.deadline = deadline

    def give_up(self) -> None:
        """Its deadline passed: answered with what came.  A backend that did not confirm a
        PAUSE (a transaction still runs there) counts as one that could not pause, so that the
        console says the PAUSE did not complete instead of reporting the others' success."""
        if self.what == "pause":
            self.rows.extend([False] * len(self.waiting))


class StartupFailure(Exception):
    pass


class Postmaster:
    def __init__(self, settings: config.Settings):
        self.settings = settings
        self.auth_entries: dict[str, str] = {}
        self.listen_socks: list[socket.socket] = []
        self.unix_paths: list[str] = []
        self.epoll = select.epoll()
        self.listeners: dict[int, ListenerSlot] = {}   # by pid
        self.backends: dict[int, BackendSlot] = {}     # by pid, pooled and dedicated
        self.pools: dict[tuple[str, str], Pool] = {}
        self.by_chan: dict[int, object] = {}           # channel fd -> ListenerSlot/BackendSlot/ConsoleSlot
        self.consoles: dict[int, ConsoleSlot] = {}     # by pid
        self.questions: dict[int, Question] = {}       # console questions being answered, by id
        # Sessions that moved between pooled backends (session_migration): the backend that
        # has them now, by the (pid, key) their client was told, and that route by connection.
        self.cancel_routes: dict[tuple[int, int], int] = {}
        self.moved_sessions: dict[int, tuple[int, int]] = {}
        self.next_question = 0
        # SHOW STATS: what backends that have exited counted, per pool, and the
        # pools' totals sampled every stats_period (the averages are over the last one).
        self.metrics_sock: socket.socket | None = None   # metrics_port, bound at start
        self.metrics: ConsoleSlot | None = None          # the /metrics process
        self.forking_metrics = False
        self.metrics_started = 0.0
        self.sd_status = ""             # the STATUS= systemd was last told
        self.next_sd_status = 0.0
        self.retired_stats: dict[tuple[str, str], dict] = {}
        self.stats_samples: list[tuple[float, dict]] = []
        self.next_stats_sample = 0.0
        self.connections = 0                           # client connections, all stages
        self.next_conn_id = 0
        self.table: status.StatusTable | None = None
        self.signals: process.SignalPipe | None = None
        self.shutdown_mode: str | None = None
        self.pid_file_written = False

    # ================================================================ start-up

    def start(self) -> None:
        settings = self.settings
        self.auth_entries = auth.load_auth_file(settings.auth_file)
        self._bind()
        if os.geteuid() == 0:
            self._switch_user()
        elif settings.user and settings.user != pwd.getpwuid(os.geteuid()).pw_name:
            logger.warning('"user = %s" is ignored: not started as root', settings.user)
        self._write_pid_file()
        self.table = status.StatusTable.create(settings.port, MAX_STATUS_SLOTS)
        self.signals = process.SignalPipe((signal.SIGHUP, signal.SIGTERM, signal.SIGINT,
                                           signal.SIGQUIT, signal.SIGCHLD))
        self.epoll.register(self.signals.read_fd, select.EPOLLIN)
        for number in range(1, settings.connection_pool_workers + 1):
            self._spawn_listener(number)
        if self.metrics_sock is not None:
            self._spawn_metrics()
        logger.log(log.LOG, "pgforkpool is ready to accept connections on port %d "
                   "(upstream %s:%d)", settings.port, settings.upstream_host, settings.upstream_port)
        self.sd_status = self._status_text()
        process.set_title("postmaster " + self.sd_status.split("; ", 1)[-1])
        _sd_notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS={self.sd_status}")

    def _bind(self) -> None:
        settings = self.settings
        addresses = [a.strip() for a in settings.listen_addresses.split(",") if a.strip()]
        for address in addresses:
            host = None if address == "*" else address
            try:
                infos = socket.getaddrinfo(host, settings.port, type=socket.SOCK_STREAM,
                                           flags=socket.AI_PASSIVE)
            except socket.gaierror as exc:
                logger.warning('could not translate host name "%s" to address: %s', address, exc)
                continue
            seen = set()
            for family, socktype, proto, _name, addr in infos:
                if (family, addr[0]) in seen:
                    continue
                seen.add((family, addr[0]))
                sock = socket.socket(family, socktype, proto)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    sock.bind(addr)
                except OSError as exc:
                    sock.close()
                    if exc.errno == errno.EADDRINUSE:
                        raise StartupFailure(
                            f'could not bind {addr[0]} port {settings.port}: address already in use; '
                            "is another pooler already running on this port?")
                    logger.warning("could not bind %s port %d: %s", addr[0], settings.port, exc.strerror)
                    continue
                self._listen(sock)
        if addresses and not self.listen_socks:
            # As PostgreSQL: listen_addresses asks for TCP, and none could be had.
            raise StartupFailure("could not create any TCP/IP sockets")
        for directory in settings.unix_socket_directories:
            path = os.path.join(directory, f".s.PGSQL.{settings.port}")
            self._remove_stale_socket(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(path)
            except OSError as exc:
                sock.close()
                raise StartupFailure(f'could not create Unix-domain socket "{path}": {exc.strerror}')
            os.chmod(path, 0o777)
            self.unix_paths.append(path)
            self._listen(sock)
        if not self.listen_socks:
            raise StartupFailure("no socket created for listening")
        if settings.metrics_port:
            try:
                self.metrics_sock = metrics.bind(settings)
            except OSError as exc:
                raise StartupFailure(f'could not bind the metrics endpoint "{settings.metrics_address}" '
                                     f"port {settings.metrics_port}: {exc.strerror or exc}")

    def _listen(self, sock: socket.socket) -> None:
        sock.listen(1024)
        sock.setblocking(False)
        self.listen_socks.append(sock)
        self.epoll.register(sock.fileno(), select.EPOLLIN)

    @staticmethod
    def _remove_stale_socket(path: str) -> None:
        if not os.path.exists(path):
            return
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)   # nobody listens: left over from a crash
            return
        finally:
            probe.close()
        raise StartupFailure(f'could not create Unix-domain socket "{path}": '
                             "another server is already listening on it")

    def _switch_user(self) -> None:
        """Started as root: become `user` after binding, before forking anything."""
        name = self.settings.user
        if not name:
            raise StartupFailure('pgforkpool must not run as root: set "user" to the '
                                 "operating-system user it should switch to")
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise StartupFailure(f'user "{name}" does not exist')
        for path in self.unix_paths:
            os.chown(path, entry.pw_uid, entry.pw_gid)
        os.setgroups([g.gr_gid for g in grp.getgrall() if name in g.gr_mem] + [entry.pw_gid])
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
        os.environ["HOME"] = entry.pw_dir
        os.environ["USER"] = os.environ["LOGNAME"] = name

    def _write_pid_file(self) -> None:
        path = self.settings.pid_file
        if not path:
            return
        other = _pid_in(path)
        if other is not None and other != os.getpid() and _is_pgforkpool(other):
            raise StartupFailure(f'lock file "{path}" already exists: pgforkpool is running with '
                                 f"PID {other}")
        try:
            with open(path, "w") as f:
                f.write(f"{os.getpid()}\n")
        except OSError as exc:
            raise StartupFailure(f'could not write lock file "{path}": {exc.strerror}')
        self.pid_file_written = True

    # ================================================================ main loop

    def run(self) -> None:
        self.start()
        try:
            while True:
                for fd, mask in self.epoll.poll(1.0):
                    if fd == self.signals.read_fd:
                        self._handle_signals()
                    elif fd in self.by_chan:
                        child = self.by_chan[fd]
                        # What a dying child said first (a session it was moving), then
                        # what waits for it.
                        if mask & ~select.EPOLLOUT:
                            self._read_child(child)
                        if mask & select.EPOLLOUT:
                            self._flush(child)
                    else:
                        self._accept(fd)
                if self.questions:
                    self._expire_questions()
                if time.monotonic() >= self.next_stats_sample:
                    self._sample_stats()
                if time.monotonic() >= self.next_sd_status:
                    self._notify_status()
                if self.shutdown_mode and not self.backends and not self.consoles:
                    if self.listen_socks:
                        self._stop_listening()   # smart shutdown: the last session has ended
                    if not self.listeners:
                        break
        finally:
            self._cleanup()

    def _handle_signals(self) -> None:
        for signum in self.signals.pending():
            if signum == signal.SIGCHLD:
                self.reap_children()
            elif signum == signal.SIGHUP:
                self.handle_hup()
            elif signum == signal.SIGTERM:
                self.handle_shutdown("smart")
            elif signum == signal.SIGINT:
                self.handle_shutdown("fast")
            elif signum == signal.SIGQUIT:
                self.handle_quit()

    def _accept(self, fd: int) -> None:
        sock = next((s for s in self.listen_socks if s.fileno() == fd), None)
        if sock is None:
            return
        for _ in range(ACCEPT_BATCH):
            try:
                client, _addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                logger.warning("could not accept new connection: %s", exc)
                return
            self._hand_to_listener(client)

    def _hand_to_listener(self, client: socket.socket) -> None:
        self.next_conn_id += 1
        conn_id = self.next_conn_id
        reject = None
        if self.shutdown_mode:
            reject = "cannot_connect_now"
        elif self.connections >= self.settings.max_connections:
            reject = "too_many_connections"
        with client:
            # The least busy listener first; one that is not reading its channel last.
            for listener in sorted(self.listeners.values(),
                                   key=lambda l: (len(l.outbox), len(l.in_flight))):
                try:
                    self._send(listener, ("connection", conn_id, reject), client.fileno())
                except OSError:
                    continue
                listener.in_flight.add(conn_id)
                self.connections += 1
                return
            logger.warning("no listener process available: connection closed")

    # ================================================================ children's messages

    def _read_child(self, child) -> None:
        while True:
            try:
                msg, fd = channel.receive(child.chan)
            except BlockingIOError:
                return
            except OSError:
                msg, fd = None, None
            if msg is None:
                self._forget_channel(child)
                return
            if isinstance(child, ListenerSlot):
                self._listener_message(child, msg, fd)
            elif isinstance(child, ConsoleSlot):
                self._console_message(child, msg)
            else:
                try:
                    self._backend_message(child, msg, fd)
                finally:
                    if fd is not None:
                        os.close(fd)

    def _listener_message(self, listener: ListenerSlot, msg: tuple, fd: int | None) -> None:
        kind, conn_id = msg[0], msg[1]
        listener.in_flight.discard(conn_id)
        if kind == "startup":
            try:
                self._assign(conn_id, msg[2], fd)
            finally:
                os.close(fd)
        elif kind == "cancel":
            # A session that moved is cancelled where it is now, by the key its client was told.
            route = self.cancel_routes.get((msg[2], msg[3]))
            console_slot = self.consoles.get(msg[2]) if route is None else None
            if console_slot is not None:   # psql's Ctrl-C during a PAUSE: the console checks the key
                self._tell(console_slot, ("cancel", msg[3]))
                return
            backend = self.backends.get(msg[2] if route is None else route)
            if backend is not None:
                self._tell(backend, ("cancel", msg[2], msg[3]))
        elif kind == "closed":
            self.connections -= 1

    def _console_message(self, slot: ConsoleSlot, msg: tuple) -> None:
        if msg[0] != "ask":
            return
        _, token, what, argument, timeout = msg
        if what == "stats":   # the postmaster's own figures
            self._tell(slot, ("answer", token, self.stats_rows()))
            return
        self.next_question += 1
        qid = self.next_question
        question = Question(slot, token, set(), time.monotonic() + timeout, what)
        for backend in self.backends.values():
            try:
                self._send(backend, ("ask", qid, what, argument))
            except OSError:
                continue
            question.waiting.add(backend.pid)
        self.questions[qid] = question
        if not question.waiting:
            self._answered(qid)

    def _answered(self, qid: int) -> None:
        question = self.questions.pop(qid)
        if question.console.pid in self.consoles:
            self._tell(question.console, ("answer", question.token, question.rows))

    def pool_stats(self) -> dict[tuple[str, str], dict]:
        """Every pool's cumulative figures since start, exited backends included."""
        totals = {key: dict(value) for key, value in self.retired_stats.items()}
        if self.table is not None:
            for slot in self.table.slots():
                if slot["pid"]:
                    status.add_stats(totals.setdefault((slot["database"], slot["user"]), {}), slot)
        return totals

    def _status_text(self) -> str:
        sessions = sum(b.sessions for b in self.backends.values()) + len(self.consoles)
        pooled = sum(1 for b in self.backends.values() if b.pool is not None)
        dedicated = len(self.backends) - pooled
        state = f"shutting down ({self.shutdown_mode})" if self.shutdown_mode else "accepting connections"
        return (f"{state}; {sessions} session{'s' * (sessions != 1)}, {pooled} pooled and "
                f"{dedicated} dedicated backend{'s' * (dedicated != 1)}")

    def _notify_status(self) -> None:
        """STATUS= for systemctl status, when it has changed (at most once a second)."""
        self.next_sd_status = time.monotonic() + 1.0
        text = self._status_text()
        if text != self.sd_status:
            self.sd_status = text
            _sd_notify(f"STATUS={text}")
            # The process title tells the same (ps, top), as a backend's tells its sessions.
            process.set_title("postmaster " + text.split("; ", 1)[-1])

    def _sample_stats(self) -> None:
        now = time.monotonic()
        self.stats_samples = (self.stats_samples + [(now, self.pool_stats())])[-2:]
        self.next_stats_sample = now + self.settings.stats_period

    def stats_rows(self) -> list[dict]:
        """SHOW STATS: totals now; rates over the last complete stats_period (since start before one)."""
        now = time.monotonic()
        current = self.pool_stats()
        if len(self.stats_samples) == 2:
            (t0, before), (t1, after) = self.stats_samples
        else:
            t0, before = self.stats_samples[0] if self.stats_samples else (now, {})
            t1, after = now, current
        rows = []
        for (database, user), totals in sorted(current.items()):
            rates = status.stats_rates((t0, before.get((database, user), {})),
                                       (t1, after.get((database, user), totals)))
            rows.append({"database": database, "user": user, **totals, **rates})
        return rows

    def _expire_questions(self) -> None:
        now = time.monotonic()
        for qid, question in list(self.questions.items()):
            if now > question.deadline:
                logger.warning("backends %s did not answer the admin console in time",
                               ", ".join(str(pid) for pid in sorted(question.waiting)))
                question.give_up()
                self._answered(qid)

    def _backend_message(self, backend: BackendSlot, msg: tuple, fd: int | None = None) -> None:
        kind = msg[0]
        if kind == "migrate":
            if fd is not None:
                self._move_session(backend, msg[1], msg[2], msg[3], fd)
            else:   # the socket did not come with it (MSG_CTRUNC): the session is gone
                logger.warning("connection %d: lost while moving from pooled backend %d (its socket "
                               "was not passed)", msg[1], backend.pid)
                self._session_gone(backend, msg[1])
            return
        if kind == "answer":
            question = self.questions.get(msg[1])
            if question is not None and backend.pid in question.waiting:
                question.waiting.discard(backend.pid)
                question.rows.extend(msg[2])
                if not question.waiting:
                    self._answered(msg[1])
            return
        if kind == "closed":
            self._session_gone(backend, msg[1])
        elif kind == "idle" and backend.sessions == 0 and not backend.draining:
            # idle_pool_backend_timeout: it has had no session for that long.
            logger.debug("retiring idle pooled backend %d", backend.pid)
            self._retire(backend)
        elif kind == "server_failed" and backend.sessions == 0:
            # The upstream refuses this pool (no such database or role): do not keep
            # a process for it; the next session of the pool starts afresh.
            self._retire(backend)

    def _session_gone(self, backend: BackendSlot, conn_id: int) -> None:
        backend.sessions -= 1
        self.connections -= 1
        self._drop_route(conn_id)
        if backend.draining and backend.sessions == 0 and backend.pool is not None:
            self._tell(backend, ("shutdown", "smart"))

    def _move_session(self, source: BackendSlot, conn_id: int, target_pid: int, state: dict,
                      fd: int) -> None:
        """session_migration: pass a session from one pooled backend to another of its pool.

        If the target has gone, is full (several backends chose it at once), is about
        to exit (draining with no session left), or is not reading its channel (messages
        wait for it in its Outbox), the session goes back to the backend it came from.
        A draining backend that still serves sessions stays up until they end: it may take
        one more (in a smart shutdown, the target serves it as well as the source would).
        """
        target = self.backends.get(target_pid)
        if (target is None or target.pool is None or target.pool is not source.pool
                or target.sessions >= self.settings.max_sessions
                or (target.draining and target.sessions == 0)
                or target.outbox):   # not reading its channel: no better place to wait
            target = source
        for receiver in dict.fromkeys((target, source)):
            try:
                # The last field: the session comes back to where it was (no move happened).
                self._send(receiver, ("adopt", conn_id, state, receiver is source), fd)
            except OSError:
                continue
            source.sessions -= 1
            receiver.sessions += 1
            route = (state["origin_pid"], state["key"])
            self.cancel_routes[route] = receiver.pid
            self.moved_sessions[conn_id] = route
            if source.draining and source.sessions == 0 and source.pool is not None:
                self._tell(source, ("shutdown", "smart"))
            return
        # Neither backend can take it: the client's connection closes with our copy of the socket.
        logger.warning("connection %d: lost while moving between pooled backends %d and %d",
                       conn_id, source.pid, target.pid)
        source.sessions -= 1
        self.connections -= 1
        self._drop_route(conn_id)
        if source.draining and source.sessions == 0 and source.pool is not None:
            self._tell(source, ("shutdown", "smart"))

    def _drop_route(self, conn_id: int) -> None:
        """A session that moved has ended: its cancel route goes, and the backend it began on
        may give its cancel key to a new session again."""
        route = self.moved_sessions.pop(conn_id, None)
        if route is None:
            return
        self.cancel_routes.pop(route, None)
        origin = self.backends.get(route[0])
        if origin is not None:
            self._tell(origin, ("key_free", route[1]))

    def _assign(self, conn_id: int, startup: dict[str, str], fd: int) -> None:
        """Choose the backend for an authenticated client and pass its socket on."""
        settings = self.settings
        database, user = startup["database"], startup["user"]
        if self.shutdown_mode:
            self._refuse(fd, conn_id, PgError("cannot_connect_now", "the database system is shutting down"))
            return
        if database == console.CONSOLE_DATABASE:
            if user not in settings.admin_users:
                self._refuse(fd, conn_id, PgError(
                    "insufficient_privilege", f'permission denied for the admin console: user "{user}" '
                    "is not in admin_users"))
                return
            self._spawn_console(conn_id, startup, fd)
            return
        if database in settings.dedicated_databases or user in settings.dedicated_users:
            self._spawn_dedicated(conn_id, startup, fd)
            return
        pool = self.pools.get((database, user))
        if pool is None:
            pool = self.pools[(database, user)] = Pool(database, user, len(self.pools) + 1)
        if len(pool.backends) < settings.session_pool_size:
            backend = self._spawn_pooled(pool, fd)
        else:
            backend = pool.choose(settings, self.table)
        if backend is None:
            self._refuse(fd, conn_id, PgError(
                "too_many_connections",
                f'too many sessions for database "{database}" and user "{user}"',
                detail=f"All {len(pool.backends)} pooled backends of the pool serve "
                       f"max_sessions ({settings.max_sessions}) sessions."))
            return
        try:
            self._send(backend, ("session", conn_id, startup), fd)
        except OSError as exc:
            self._refuse(fd, conn_id, PgError("connection_failure",
                                              f"could not pass the connection to a backend: {exc}"))
            return
        backend.sessions += 1

    def _refuse(self, fd: int, conn_id: int, error: PgError) -> None:
        """Tell an authenticated client why it cannot be served (one small write) and close."""
        try:
            os.set_blocking(fd, False)
            os.write(fd, error.packet())
        except OSError:
            pass
        self.connections -= 1
        logger.log(log.LOG, "connection %d refused: %s", conn_id, error.text)

    # ================================================================ forking

    def _fork(self, title: str, entry, close_fds: tuple[int, ...] = ()) -> tuple[int, socket.socket]:
        """Fork a child that runs entry(channel); returns its pid and our end of the channel.

        close_fds: descriptors the postmaster holds for the moment (a client socket
        in transit) that the child must not keep, or that client never sees EOF.
        """
        parent_end, child_end = channel.channel_pair()
        pid = os.fork()
        if pid == 0:
            try:
                parent_end.close()
                for fd in close_fds:
                    os.close(fd)
                self._close_in_child()
                process.become_child(title)
                entry(child_end)
            except BaseException:
                logger.exception("%s failed", title)
            finally:
                os._exit(1)
        child_end.close()
        parent_end.setblocking(False)
        self.epoll.register(parent_end.fileno(), select.EPOLLIN)
        return pid, parent_end

    def _close_in_child(self) -> None:
        self.epoll.close()
        for sock in self.listen_socks:
            sock.close()
        for child in list(self.listeners.values()) + list(self.backends.values()) + list(
                self.consoles.values()) + ([self.metrics] if self.metrics else []):
            child.chan.close()
            child.outbox.discard()   # this process's copies of the sockets that wait there
        if self.metrics_sock is not None and not self.forking_metrics:
            self.metrics_sock.close()
        self.signals.close()

    def _spawn_listener(self, number: int) -> None:
        settings = self.settings
        pid, chan = self._fork(f"listener {number}",
                               lambda c: worker.main(number, settings, c))
        slot = ListenerSlot(number, pid, chan)
        self.listeners[pid] = slot
        self.by_chan[chan.fileno()] = slot

    def _spawn_pooled(self, pool: Pool, client_fd: int) -> BackendSlot:
        secret = self.auth_entries.get(pool.user)
        table, settings = self.table, self.settings
        # The slot is claimed before the fork so that the child knows it.
        slot = table.claim(0, status.KIND_POOLED, pool.database, pool.user, pool.number)
        pid, chan = self._fork(f"backend {pool.database}/{pool.user}",
                               lambda c: pooled.main(settings, pool.database, pool.user, c,
                                                     table, slot, secret),
                               close_fds=(client_fd,))
        if slot is not None:
            table.counters(slot)[status.PID] = pid
        backend = BackendSlot(pid, chan, status.KIND_POOLED, pool, slot)
        pool.backends.append(backend)
        self.backends[pid] = backend
        self.by_chan[chan.fileno()] = backend
        return backend

    def _spawn_dedicated(self, conn_id: int, startup: dict[str, str], fd: int) -> None:
        secret = self.auth_entries.get(startup["user"])
        table, settings = self.table, self.settings
        slot = table.claim(0, status.KIND_DEDICATED, startup["database"], startup["user"])
        counters = table.counters(slot) if slot is not None else memoryview(bytearray(status.INT_BYTES)).cast("q")
        pid, chan = self._fork(f"dedicated backend {startup['database']}/{startup['user']}",
                               lambda c: dedicated.main(settings, conn_id, startup, fd, c,
                                                        counters, secret))
        if slot is not None:
            table.counters(slot)[status.PID] = pid
        backend = BackendSlot(pid, chan, status.KIND_DEDICATED, None, slot)
        backend.sessions = 1
        self.backends[pid] = backend
        self.by_chan[chan.fileno()] = backend

    def _spawn_console(self, conn_id: int, startup: dict[str, str], fd: int) -> None:
        table, settings = self.table, self.settings
        pid, chan = self._fork(f"console {startup['user']}",
                               lambda c: console.main(settings, conn_id, startup, fd, c, table))
        slot = ConsoleSlot(pid, chan)
        self.consoles[pid] = slot
        self.by_chan[chan.fileno()] = slot

    def _spawn_metrics(self) -> None:
        listen, table = self.metrics_sock, self.table
        self.forking_metrics = True
        try:
            pid, chan = self._fork("metrics", lambda c: metrics.main(listen, table, c))
        finally:
            self.forking_metrics = False
        self.metrics = ConsoleSlot(pid, chan)
        self.metrics_started = time.monotonic()
        self.by_chan[chan.fileno()] = self.metrics

    def _tell(self, child, message: tuple) -> None:
        try:
            self._send(child, message)
        except OSError as exc:
            if exc.errno not in channel.GONE:   # (a child that has gone is reaped anyway)
                logger.warning('could not send "%s" to %s: %s', message[0], child, exc)

    def _send(self, child, message: tuple, fd: int | None = None) -> None:
        """A message for a child, through its outbox: sent now, or, if its channel is full,
        as soon as there is room, after those that came before it.  Raises OSError if the
        child has gone or thousands of messages already wait for it."""
        if child.outbox.send(child.chan, message, fd) and len(child.outbox) == 1:
            logger.warning("%s is not reading its channel: messages for it wait until it does",
                           child)
            try:
                self.epoll.modify(child.chan.fileno(), select.EPOLLIN | select.EPOLLOUT)
            except (OSError, ValueError):
                pass   # its channel is forgotten: it has gone, and its exit drops the outbox

    def _flush(self, child) -> None:
        """Its channel has room: what waits in its outbox goes."""
        if child.outbox:
            while True:
                try:
                    if not child.outbox.flush(child.chan):
                        return
                    logger.log(log.LOG, "%s reads its channel again", child)
                    break
                except channel.Undeliverable as lost:
                    self._undeliverable(child, lost)
                except OSError:   # gone: what waited is dropped (and logged) with its channel
                    self._forget_channel(child)
                    return
        try:   # (an empty outbox: a stale event of a descriptor used again)
            self.epoll.modify(child.chan.fileno(), select.EPOLLIN)
        except (OSError, ValueError):
            pass

    def _undeliverable(self, child, lost: channel.Undeliverable) -> None:
        """A message that waited for a child was refused by the channel: a session in it
        is counted out as a lost one (its client's connection has closed)."""
        logger.warning("could not send %s to %s", lost, child)   # (for a session: it is lost)
        if isinstance(child, ListenerSlot) and lost.kind == "connection":
            if lost.argument in child.in_flight:
                child.in_flight.discard(lost.argument)
                self.connections -= 1
        elif isinstance(child, BackendSlot) and lost.kind in ("session", "adopt"):
            self._session_gone(child, lost.argument)

    def _retire(self, backend: BackendSlot, move_sessions: bool = False) -> None:
        """No new sessions for this backend; it exits once its sessions have ended.

        move_sessions: the pool keeps other backends (session_pool_size lowered), to which
        its sessions move between their transactions, so that it is not kept up by them.
        """
        backend.draining = True
        if backend.slot is not None:
            self.table.counters(backend.slot)[status.DRAINING] = 1
        if backend.pool is not None and backend in backend.pool.backends:
            backend.pool.backends.remove(backend)
        if move_sessions:
            self._tell(backend, ("retire",))
            if backend.sessions == 0:   # a retiring backend exits when told it has none left
                self._tell(backend, ("shutdown", "smart"))
        else:
            self._tell(backend, ("shutdown", "smart"))

    def _shrink_pools(self) -> None:
        """session_pool_size lowered by a reload: each pool keeps that many backends, those
        with the most sessions (pinned ones first, which cannot move), and retires the rest."""
        size = self.settings.session_pool_size
        for pool in self.pools.values():
            surplus = len(pool.backends) - size
            if surplus <= 0:
                continue

            def weight(backend: BackendSlot) -> tuple[int, int]:
                pinned = self.table.counters(backend.slot)[status.PINNED] if backend.slot is not None else 0
                return pinned, backend.sessions
            going = sorted(pool.backends, key=weight)[:surplus]
            logger.log(log.LOG, 'pool %s/%s: session_pool_size is %d: retiring pooled backend%s %s; '
                       'their sessions move to the others', pool.database, pool.user, size,
                       "s" if surplus > 1 else "", ", ".join(str(b.pid) for b in going))
            # All marked before any is told: none moves its sessions to another one going.
            for backend in going:
                if backend.slot is not None:
                    self.table.counters(backend.slot)[status.DRAINING] = 1
            for backend in going:
                self._retire(backend, move_sessions=True)

    # ================================================================ supervision

    def reap_children(self) -> None:
        while True:
            try:
                pid, wstatus = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._child_exited(pid, wstatus)

    def _child_exited(self, pid: int, wstatus: int) -> None:
        if self.metrics is not None and pid == self.metrics.pid:
            self._forget_channel(self.metrics, closing=True)
            self.metrics = None
            if not self.shutdown_mode:
                code = os.waitstatus_to_exitcode(wstatus)
                if time.monotonic() - self.metrics_started < METRICS_RESPAWN_AFTER:
                    # It dies as soon as it starts: no fork loop; /metrics is off until a restart.
                    logger.error("metrics process (PID %d) exited with exit code %d right after it "
                                 "started; /metrics is disabled until pgforkpool restarts", pid, code)
                else:
                    logger.log(log.LOG, "metrics process (PID %d) exited with exit code %d; "
                               "restarting it", pid, code)
                    self._spawn_metrics()
            return
        console_slot = self.consoles.pop(pid, None)
        if console_slot is not None:
            self._forget_channel(console_slot, closing=True)
            self.connections -= 1
            return
        for qid, question in list(self.questions.items()):
            if pid in question.waiting:
                question.waiting.discard(pid)
                if not question.waiting:
                    self._answered(qid)
        if pid in self.backends:
            # What it said before it went: sessions it was handing to another backend are
            # still passed on, the others it had are counted out below.
            try:
                self._read_child(self.backends[pid])
            except OSError:
                pass
        listener = self.listeners.pop(pid, None)
        backend = self.backends.pop(pid, None)
        child = listener or backend
        if child is None:
            return
        code = os.waitstatus_to_exitcode(wstatus)
        abnormal = code != 0 and not self.shutdown_mode
        if abnormal:
            how = f"was terminated by signal {-code}" if code < 0 else f"exited with exit code {code}"
            kind = "listener" if listener else "backend"
            logger.log(log.LOG, "%s process (PID %d) %s", kind, pid, how)
        self._forget_channel(child, closing=True)
        if listener is not None:
            # Connections it was authenticating are gone with it.
            self.connections -= len(listener.in_flight)
            if not self.shutdown_mode:
                self._spawn_listener(listener.number)
            return
        self.connections -= backend.sessions
        for conn_id, route in list(self.moved_sessions.items()):
            if self.cancel_routes.get(route) == pid:   # moved here, gone with it
                self._drop_route(conn_id)
        if backend.pool is not None and backend in backend.pool.backends:
            backend.pool.backends.remove(backend)
        if backend.slot is not None:
            slot = self.table.slot(backend.slot)
            status.add_stats(self.retired_stats.setdefault((slot["database"], slot["user"]), {}), slot)
            self.table.release(backend.slot)

    def _forget_channel(self, child, closing: bool = False) -> None:
        dropped = child.outbox.discard()
        if dropped:
            logger.warning("%s has gone: %d message%s for it dropped", child, dropped,
                           "" if dropped == 1 else "s")
        fd = child.chan.fileno()
        if fd < 0:
            return
        self.by_chan.pop(fd, None)
        try:
            self.epoll.unregister(fd)
        except (OSError, ValueError):
            pass
        if closing:
            child.chan.close()

    # ================================================================ signals

    def handle_hup(self) -> None:
        """Reload: apply a valid configuration file, or nothing at all."""
        _sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
        old = self.settings
        try:
            new = config.load_config(old.path, old.overrides)
            entries = auth.load_auth_file(new.auth_file)
        except (config.ConfigError, auth.AuthFileError) as exc:
            logger.error("configuration file \"%s\" contains errors; no changes were applied", old.path)
            logger.error("%s", exc)
            _sd_notify("READY=1")
            return
        for name in config.changed_restart_parameters(old, new):
            logger.log(log.LOG, 'parameter "%s" cannot be changed without restarting the server', name)
            new.values[name] = old.values[name]
        for name in config.PARAMETERS:
            if new.values[name] != old.values[name]:
                logger.log(log.LOG, 'parameter "%s" changed to "%s"', name, new.setting_text(name))
        self.settings = new
        self.auth_entries = entries
        log.setup(new.log_min_messages)
        for child in list(self.listeners.values()) + list(self.consoles.values()):
            self._tell(child, ("reload", new))
        for backend in list(self.backends.values()):
            if backend.pool is None:
                continue
            if new.restart_pooler_on_reload and not backend.draining:
                self._retire(backend)
            else:
                self._tell(backend, ("reload", new, entries.get(backend.pool.user)))
        if not new.restart_pooler_on_reload:
            self._shrink_pools()
        logger.log(log.LOG, "received SIGHUP, reloading configuration files")
        _sd_notify("READY=1")

    def handle_shutdown(self, mode: str) -> None:
        if self.shutdown_mode == "fast" or self.shutdown_mode == mode:
            return
        logger.log(log.LOG, "received %s shutdown request", mode)
        _sd_notify("STOPPING=1")
        self.shutdown_mode = mode
        if mode != "smart":
            # Smart: the sockets stay open until the last session has ended, so that
            # a new client hears why it cannot connect (57P03), as from PostgreSQL.
            self._stop_listening()
        for backend in self.backends.values():
            self._tell(backend, ("shutdown", mode))
        if mode != "smart":
            for pid in self.consoles:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def _stop_listening(self) -> None:
        self._close_listen_sockets()
        for listener in self.listeners.values():
            self._tell(listener, ("shutdown", self.shutdown_mode))

    def handle_quit(self) -> None:
        logger.log(log.LOG, "received immediate shutdown request")
        for pid in list(self.listeners) + list(self.backends) + list(self.consoles) + (
                [self.metrics.pid] if self.metrics else []):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._cleanup()
        os._exit(0)

    def _close_listen_sockets(self) -> None:
        for sock in self.listen_socks:
            try:
                self.epoll.unregister(sock.fileno())
            except (OSError, ValueError):
                pass
            sock.close()
        self.listen_socks = []
        for path in self.unix_paths:
            try:
                os.unlink(path)
            except OSError:
                pass
        self.unix_paths = []

    def _cleanup(self) -> None:
        self._close_listen_sockets()
        if self.metrics is not None:
            try:
                os.kill(self.metrics.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if self.metrics_sock is not None:
            self.metrics_sock.close()
        if self.table is not None:
            self.table.unlink()
        if self.pid_file_written and _pid_in(self.settings.pid_file) == os.getpid():
            try:
                os.unlink(self.settings.pid_file)
            except OSError:
                pass
        logger.log(log.LOG, "pgforkpool shut down")


def _pid_in(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.readline().strip())
    except (OSError, ValueError):
        return None


def _is_pgforkpool(pid: int) -> bool:
    try:
        import psutil
        return "pgforkpool" in " ".join(psutil.Process(pid).cmdline())
    except Exception:   # psutil.Error: gone, or not ours to look at
        return False


def _sd_notify(message: str) -> None:
    """Tell systemd our state (Type=notify), if it is listening."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
    except OSError as exc:
        logger.warning("could not notify systemd: %s", exc)
