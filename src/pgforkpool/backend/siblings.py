"""The other pooled backends of a backend's pool, as the shared status table shows them.

Session migration asks where a session may go; the answers are read here from the
status table's integers, with no socket and no process of their own (the table is
a memoryview over shared memory, or over any buffer in a test).  A sibling is *open*
when it may take a session now: running, not draining or paused, its upstream
reachable, not full.  Among the open ones:

- *free*: its server connection serves nobody now (nothing ready to run there);
- *lighter*: fewer sessions ready to run than ours by at least two (load-balancing);
- *flowing*: its connection changed hands less than session_migration_delay ago, so
  it passes short transactions;
- *held long*: its connection has had one owner for longer than that.

The pooled backend decides which of its sessions move and applies the moves.
"""

from typing import Final

from ..shared import status

_SLOT_INTS: Final = status.SLOT_SIZE // 8
_WAITING: Final = status.WAITING
_OWNER_SINCE_MS: Final = status.OWNER_SINCE_MS
_SESSIONS: Final = status.SESSIONS
# How often the list of the pool's backends is read again; their figures are always live.
RELIST_EVERY: Final = 1.0


class Siblings:
    __slots__ = ("ints", "pool", "own_pid", "max_sessions", "listed", "listed_at")

    def __init__(self, ints, pool: int, own_pid: int, max_sessions: int):
        self.ints = ints                    # the status table's slots as int64s
        self.pool = pool                    # the postmaster's number of our pool (0: none)
        self.own_pid = own_pid
        self.max_sessions = max_sessions    # set again on reload
        self.listed: list[tuple[int, int]] = []   # (offset in ints, pid) of the pool's others
        self.listed_at = 0.0

    def open(self, now: float) -> list[tuple[int, int]]:
        """(offset in ints, pid) of the siblings that may take a session now."""
        ints = self.ints
        if now >= self.listed_at:
            self.listed_at = now + RELIST_EVERY
            listed = []
            pool, own = self.pool, self.own_pid
            if pool:
                for base in range(0, len(ints), _SLOT_INTS):
                    if (ints[base + status.POOL] == pool and ints[base + status.IN_USE]
                            and ints[base + status.PID] != own):
                        listed.append((base, ints[base + status.PID]))
            self.listed = listed
        max_sessions = self.max_sessions
        return [(base, pid) for base, pid in self.listed
                if ints[base + status.IN_USE] and ints[base + status.PID] == pid
                and not ints[base + status.DRAINING] and not ints[base + status.PAUSED]
                and not ints[base + status.SERVER_DOWN]   # its upstream connection failed
                and ints[base + _SESSIONS] < max_sessions]

    def relist(self) -> None:
        """Read the list of the pool's backends again at the next question."""
        self.listed_at = 0.0

    def free_then_lighter(self, now: float, balance: int = 0) -> list[int]:
        """Pids of the free siblings, then (balance: our number of sessions ready to run) those
        with at least two fewer ready than that, fewest first."""
        ints = self.ints
        free, lighter = [], []
        for base, pid in self.open(now):
            ready = ints[base + _WAITING]
            if ready == 0:
                free.append(pid)
            elif ready + 2 <= balance:
                lighter.append((ready, pid))
        return free + [pid for _ready, pid in sorted(lighter)]

    def flowing(self, now: float, recent_ms: int, exclude: list[int]) -> list[int]:
        """Pids of the siblings (not in exclude) whose connection changed hands after recent_ms
        (session_migration_delay ago, as OWNER_SINCE_MS counts), fewest ready to run first."""
        ints = self.ints
        flowing = [(ints[base + _WAITING], pid) for base, pid in self.open(now)
                   if ints[base + _OWNER_SINCE_MS] > recent_ms and pid not in exclude]
        return [pid for _ready, pid in sorted(flowing)]

    def held_long(self, now: float, long_ago_ms: int) -> int | None:
        """The pid of a sibling with a lower pid than ours whose connection has had one owner
        since before long_ago_ms, with sessions ready to run: the fewest such first.  Only
        lower pids, so that two backends never swap their long sessions."""
        ints = self.ints
        held = [(ints[base + _WAITING], pid) for base, pid in self.open(now)
                if pid < self.own_pid and ints[base + _WAITING] > 0
                and 0 < ints[base + _OWNER_SINCE_MS] <= long_ago_ms]
        return min(held)[1] if held else None

    def room(self, now: float) -> dict[int, int]:
        """Sessions each open sibling may still take, by pid."""
        ints, max_sessions = self.ints, self.max_sessions
        return {pid: max_sessions - ints[base + _SESSIONS] for base, pid in self.open(now)}
