"""The shared-memory status table: one slot per backend, written by backends, read by everyone.

A file-backed mapping in /dev/shm (named after the port) so that the postmaster,
its children and `pgforkpool status` all read the same numbers, the way
PostgreSQL's backends publish theirs in shared memory for pg_stat_activity.
Each backend writes only its own slot; the postmaster claims and frees slots.
"""

import mmap
import os
import struct
import tempfile
import time

MAGIC = b"PGFKPOOL"
HEADER = struct.Struct("!8sqqd")  # magic, postmaster pid, number of slots, start time
HEADER_SIZE = 64
NAMEDATALEN = 64

# Integer fields of a slot, in order (native int64, so a backend updates them
# through a memoryview cast without packing).
# Cumulative figures (transactions, queries, bytes, times in microseconds) are
# SHOW STATS's; a backend adds to them as traffic passes.
FIELDS: tuple[str, ...] = ("in_use", "pid", "kind", "draining", "sessions", "waiting", "pinned",
          "turns", "ready_sum", "started_us", "served", "transactions",
          "server_connections", "paused", "queries", "bytes_in", "bytes_out", "xact_us",
          "wait_us", "waits", "migrations", "pool", "server_down", "owner_since_ms")
(IN_USE, PID, KIND, DRAINING, SESSIONS, WAITING, PINNED, TURNS, READY_SUM, STARTED_US,
 SERVED, TRANSACTIONS, SERVER_CONNECTIONS, PAUSED, QUERIES, BYTES_IN, BYTES_OUT, XACT_US,
 WAIT_US, WAITS, MIGRATIONS, POOL, SERVER_DOWN, OWNER_SINCE_MS) = range(24)
# MIGRATIONS: sessions this backend handed to another.  POOL: the postmaster's number for
# the backend's (database, user), the same for every backend of a pool (0 for dedicated ones).
# SERVER_DOWN: 1 while the backend's last attempt to reach the upstream failed.
# OWNER_SINCE_MS: when the session that has the backend's server connection now got it
# (time.monotonic() in ms, one clock for every process; up to a few ms stale); stale while
# the connection is free (WAITING is 0 then), 0 after the backend lost it.  Siblings read it
# to tell a connection passing short transactions from one held by a long transaction.
# Histograms of transaction and wait times: a count per bucket (not cumulative),
# the bucket being the first upper bound, in microseconds, that the time does not exceed.
HISTOGRAM_BOUNDS_US = (500, 1000, 5000, 10_000, 50_000, 100_000, 500_000, 1000_000, 5000_000)
HISTOGRAM_BOUNDS_S = tuple(bound / 1e6 for bound in HISTOGRAM_BOUNDS_US)   # the same in seconds
HISTOGRAM_BUCKETS = len(HISTOGRAM_BOUNDS_US) + 1   # the last one: above every bound
XACT_HIST = len(FIELDS)
WAIT_HIST = XACT_HIST + HISTOGRAM_BUCKETS
FIELDS = FIELDS + tuple(f"xact_hist_{i}" for i in range(HISTOGRAM_BUCKETS)) + tuple(
    f"wait_hist_{i}" for i in range(HISTOGRAM_BUCKETS))
INT_BYTES = len(FIELDS) * 8
SLOT_SIZE = INT_BYTES + 2 * NAMEDATALEN

KIND_POOLED = 1
KIND_DEDICATED = 2
KIND_NAMES = {KIND_POOLED: "pooled", KIND_DEDICATED: "dedicated"}


def table_path(port: int) -> str:
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return os.path.join(base, f"pgforkpool.{port}.status")


class StatusTable:
    """The mapping itself; create() in the postmaster, attach() in `pgforkpool status`."""

    def __init__(self, path: str, mm: mmap.mmap, nslots: int):
        self.path = path
        self.mm = mm
        self.nslots = nslots

    @classmethod
    def create(cls, port: int, nslots: int) -> "StatusTable":
        path = table_path(port)
        size = HEADER_SIZE + nslots * SLOT_SIZE
        # A new file renamed into place, never the old one truncated: an instance
        # still finishing keeps its own mapping (truncating it would kill its
        # processes with SIGBUS).
        temporary = f"{path}.{os.getpid()}"
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        HEADER.pack_into(mm, 0, MAGIC, os.getpid(), nslots, time.time())
        os.rename(temporary, path)
        return cls(path, mm, nslots)

    @classmethod
    def attach(cls, port: int) -> "StatusTable | None":
        return cls.attach_path(table_path(port))

    @classmethod
    def attach_path(cls, path: str) -> "StatusTable | None":
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_SIZE:
                return None
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        magic, _pid, nslots, _started = HEADER.unpack_from(mm, 0)
        if magic != MAGIC or HEADER_SIZE + nslots * SLOT_SIZE > size:
            return None
        return cls(path, mm, nslots)

    @property
    def postmaster_pid(self) -> int:
        return HEADER.unpack_from(self.mm, 0)[1]

    @property
    def started(self) -> float:
        """When the postmaster that made the table started (seconds since the epoch)."""
        return HEADER.unpack_from(self.mm, 0)[3]

    def unlink(self) -> None:
        """Remove the file, if it is still this table's (a newer instance may have replaced it)."""
        current = StatusTable.attach_path(self.path)
        if current is not None and current.postmaster_pid != self.postmaster_pid:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    # -- the postmaster's side

    def claim(self, pid: int, kind: int, database: str, user: str, pool: int = 0) -> int | None:
        """Take a free slot for a new backend; None when the table is full."""
        for index in range(self.nslots):
            ints = self.counters(index)
            if not ints[IN_USE]:
                for field in range(len(FIELDS)):
                    ints[field] = 0
                ints[PID] = pid
                ints[KIND] = kind
                ints[POOL] = pool
                ints[STARTED_US] = int(time.time() * 1e6)
                names = self._offset(index) + INT_BYTES
                self.mm[names:names + 2 * NAMEDATALEN] = (
                    _name(database) + _name(user))
                ints[IN_USE] = 1
                return index
        return None

    def release(self, index: int) -> None:
        self.counters(index)[IN_USE] = 0

    # -- everybody's side

    def _offset(self, index: int) -> int:
        return HEADER_SIZE + index * SLOT_SIZE

    def counters(self, index: int) -> memoryview:
        """The slot's integer fields as a writable int64 view (read-only if attached)."""
        start = self._offset(index)
        return memoryview(self.mm)[start:start + INT_BYTES].cast("q")

    def all_ints(self) -> memoryview:
        """Every slot as int64s, slot i's field f at i * SLOT_SIZE // 8 + f (a slot's names
        are int64s there too, never read): a scan of the table makes no object per slot."""
        return memoryview(self.mm)[HEADER_SIZE:HEADER_SIZE + self.nslots * SLOT_SIZE].cast("q")

    def slot(self, index: int) -> dict:
        ints = self.counters(index)
        names = self._offset(index) + INT_BYTES
        row = {field: ints[i] for i, field in enumerate(FIELDS) if not field.startswith("reserved")}
        row["database"] = _unname(self.mm[names:names + NAMEDATALEN])
        row["user"] = _unname(self.mm[names + NAMEDATALEN:names + 2 * NAMEDATALEN])
        row["kind"] = KIND_NAMES.get(row["kind"], "unknown")
        row["load_average"] = load_average(row["turns"], row["ready_sum"])
        return row

    def slots(self) -> list[dict]:
        return [self.slot(i) for i in range(self.nslots) if self.counters(i)[IN_USE]]


# The cumulative figures of SHOW STATS, summed per pool.
STAT_FIELDS = ("transactions", "queries", "bytes_in", "bytes_out", "xact_us", "wait_us",
               "waits") + FIELDS[XACT_HIST:]


def add_stats(totals: dict, row: dict) -> dict:
    """Add the cumulative figures of row (a slot, or a pool's totals) to totals; returns totals."""
    for name in STAT_FIELDS:
        totals[name] = totals.get(name, 0) + row.get(name, 0)
    return totals


def stats_rates(earlier: tuple[float, dict], later: tuple[float, dict]) -> dict:
    """Per-second rates and average times between two (time, totals) samples of one pool."""
    (t0, a), (t1, b) = earlier, later
    elapsed = max(t1 - t0, 1e-6)
    delta = {name: b.get(name, 0) - a.get(name, 0) for name in STAT_FIELDS}
    return {
        "xacts_per_second": delta["transactions"] / elapsed,
        "queries_per_second": delta["queries"] / elapsed,
        "received_per_second": delta["bytes_in"] / elapsed,
        "sent_per_second": delta["bytes_out"] / elapsed,
        "avg_xact_us": delta["xact_us"] // delta["transactions"] if delta["transactions"] > 0 else 0,
        "avg_wait_us": delta["wait_us"] // delta["waits"] if delta["waits"] > 0 else 0,
    }


def backends(table: "StatusTable") -> list[dict]:
    """The running backends' slots, each with its process's RSS and CPU (SHOW BACKENDS, status)."""
    rows = []
    for slot in table.slots():
        if slot["pid"]:
            slot["rss"], slot["cpu_seconds"] = process_figures(slot["pid"])
            rows.append(slot)
    return rows


def process_figures(pid: int) -> tuple[int | None, float | None]:
    """(resident memory in bytes, CPU seconds user + system) of a process; Nones if unknown."""
    import psutil
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            times = proc.cpu_times()
            return proc.memory_info().rss, round(times.user + times.system, 3)
    except psutil.Error:
        return None, None


def load_average(turns: int, ready_sum: int) -> float:
    """pg_backend_load_average: sessions ready to run per event-loop turn since start."""
    return ready_sum / turns if turns else 0.0


def _name(text: str) -> bytes:
    raw = text.encode()[:NAMEDATALEN - 1]
    return raw + bytes(NAMEDATALEN - len(raw))


def _unname(raw: bytes) -> str:
    return bytes(raw).split(b"\0", 1)[0].decode("utf-8", "replace")
