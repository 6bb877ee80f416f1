"""The postmaster's pool table: pools by (database, user), their backends, and session scheduling."""

import random
import socket

from ..shared import channel, status


class BackendSlot:
    """What the postmaster knows of one backend process it forked."""

    __slots__ = ("pid", "chan", "outbox", "kind", "pool", "slot", "sessions", "draining")

    def __init__(self, pid: int, chan: socket.socket, kind: int, pool: "Pool | None", slot: int | None):
        self.pid = pid
        self.chan = chan
        self.outbox = channel.Outbox()   # messages waiting for room in the channel
        self.kind = kind            # status.KIND_POOLED or status.KIND_DEDICATED
        self.pool = pool
        self.slot = slot            # index in the status table, None if it was full
        self.sessions = 0           # sessions handed to it and not yet reported closed
        self.draining = False       # gets no new session; exits when its sessions end

    def __str__(self) -> str:
        if self.pool is None:
            return f"dedicated backend (PID {self.pid})"
        return f"pooled backend {self.pid} ({self.pool.database}/{self.pool.user})"


class Pool:
    """The pooled backends serving one (database, user)."""

    __slots__ = ("database", "user", "number", "backends", "next_rr")

    def __init__(self, database: str, user: str, number: int = 0):
        self.database = database
        self.user = user
        self.number = number   # in the status table, how backends find the others of their pool
        self.backends: list[BackendSlot] = []   # pooled, not draining
        self.next_rr = 0

    def choose(self, settings, table: status.StatusTable) -> BackendSlot | None:
        """The existing backend for a new session by session_schedule, or None if all are full.

        Call only when the pool already has session_pool_size backends.
        """
        open_backends = [b for b in self.backends if b.sessions < settings.max_sessions]
        if not open_backends:
            return None
        # One that is not reading its channel (messages wait for it in the postmaster) only
        # if every one is such.
        reading = [b for b in open_backends if not b.outbox]
        if reading:
            open_backends = reading
        policy = settings.session_schedule
        if policy == "random":
            return random.choice(open_backends)
        if policy == "load-balancing":
            # Postgres Pro's measure: sessions waiting for transaction execution now.
            def load(b: BackendSlot) -> tuple[int, int]:
                waiting = table.counters(b.slot)[status.WAITING] if b.slot is not None else 0
                return waiting, b.sessions
            return min(open_backends, key=load)
        # round-robin over the pool's backends, skipping full ones
        count = len(self.backends)
        for step in range(count):
            candidate = self.backends[(self.next_rr + step) % count]
            if candidate.sessions < settings.max_sessions:
                self.next_rr = (self.next_rr + step + 1) % count
                return candidate
        return None
