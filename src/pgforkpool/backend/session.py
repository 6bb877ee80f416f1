"""A client session in a pooled backend: its socket, its protocol state, its context and its place in the schedule."""

import secrets
import time
from typing import TYPE_CHECKING

from ..shared import log
from .client import ClientProtocol
from .context import Context, duration_setting, parse_scope, private_scope, temp_schema_in_path
from .scheduler import SessionState
from .stream import Stream

if TYPE_CHECKING:
    from .server import ServerConnection
    from .statements import StatementRegistry


class Session:
    __slots__ = ("stream", "fd", "conn_id", "key", "state", "context", "proto", "database", "user",
                 "address", "greeted", "gone", "paused", "dirty", "pin_check", "pinned",
                 "prepared_xacts", "capture_failures", "restore_retried", "since", "connected",
                 "idle_since", "origin_pid", "last_xact", "unknown_settings", "temp_path",
                 "idle_session_timeout", "quiet_since", "__weakref__")

    def __init__(self, stream: Stream, conn_id: int, startup: dict[str, str],
                 registry: "StatementRegistry", address: str = ""):
        self.stream = stream
        self.fd = stream.fd
        self.conn_id = conn_id
        # A random cancel key (PostgreSQL's own is random too): never derived from anything guessable.
        self.key = secrets.randbits(31) or 1
        self.state = SessionState.STARTING
        self.database = startup["database"]
        self.user = startup["user"]
        self.address = address
        self.context = Context.from_startup(startup)   # raises ValueError for bad `options`
        self.proto = ClientProtocol(registry)
        self.temp_path = False       # pg_temp in its search_path: a pin check after each statement
        # Its own idle_session_timeout, in seconds (0: none), and since when it has had nothing
        # to run (monotonic: logged in, or its last turn on a connection ended).  On a shared
        # connection the pooler keeps it, not the server (PooledBackend._expire_idle_sessions).
        self.idle_session_timeout = 0.0
        self.quiet_since = time.monotonic()
        self.settings_changed()
        self.greeted = False
        self.gone = False            # the client disconnected, or is being disconnected
        self.paused = False          # its socket is not read now (back-pressure)
        self.dirty = False           # it may have changed settings since they were last read back
        # It may have created or dropped state that cannot be copied: ask the server at the boundary.
        self.pin_check = False
        # The server connection it keeps for itself, once it holds state that
        # cannot be copied (temporary tables, session advisory locks, LISTEN,
        # WITH HOLD cursors, SQL-level prepared statements); None while it shares.
        self.pinned: ServerConnection | None = None
        self.prepared_xacts = 0      # prepared transactions (2PC) not yet committed or rolled back
        self.capture_failures = 0
        # It ran set_config with a name that is not a constant: a custom setting the pooler
        # cannot name may be on the connection after its turn (see PooledBackend._note_state).
        self.unknown_settings = False
        self.restore_retried = False  # its restore failed once and was tried on a fresh connection
        self.since = 0.0             # monotonic time it began to wait for a connection (Scheduler.wait)
        self.connected = time.time()
        self.idle_since = 0.0        # monotonic time its transaction went idle (KEEP at a boundary), or the last piece of a message it streams came
        # The pid its client was told in BackendKeyData: the backend it began on, set there
        # and kept when it moves (with `key`, what the client's CancelRequest names).
        self.origin_pid = 0
        # Seconds its last transaction held the server connection (session migration moves
        # a session stuck behind a longer one, not the long ones).
        self.last_xact = 0.0

    def pause_input(self) -> None:
        """Stop reading its socket (back-pressure: what it sends has nowhere to go yet)."""
        if not self.paused:
            self.paused = True
            self.stream.pause_reading()

    def resume_input(self) -> None:
        if self.paused:
            self.paused = False
            self.stream.resume_reading()

    def settings_changed(self) -> None:
        """Its context's settings are new (read back, or from its startup packet).

        A change of the settings its statements' texts are read under (context.PARSE_SETTINGS)
        moves the statements it holds to statements of its new scope: prepared again on a
        connection that lacks them, they are read under its new settings, and must not be
        bound by the sessions of the old scope."""
        settings = self.context.settings
        proto = self.proto
        scope = parse_scope(settings)
        if scope != proto.scope:
            proto.scope = scope
            proto.rescope_statements()
        self.temp_path = temp_schema_in_path(settings)
        self.idle_session_timeout = duration_setting(settings.get("idle_session_timeout"))

    def private_statements(self) -> None:
        """It may have changed settings not read back yet (a SET, a SET LOCAL inside its
        transaction): what it prepares meanwhile may read its text under them, so it shares
        with nobody (a scope of its own) until settings_changed."""
        self.proto.scope = private_scope(self.conn_id)

    @property
    def cancel_id(self) -> tuple[int, int]:
        return (self.origin_pid, self.key)

    @property
    def settings(self) -> dict[str, str]:
        return self.context.settings

    def __str__(self) -> str:
        return log.session_label(self.conn_id, self.database, self.user, self.address)
