"""PostgreSQL-style logging to stderr for every pgforkpool process."""

import logging
import os
import sys
import time

# log_min_messages values (PostgreSQL's server-log ordering) to Python levels.
# LOG ranks above ERROR in the server log, so operational LOG lines show at
# the default 'warning' just as in PostgreSQL.
LOG = 25
logging.addLevelName(LOG, "LOG")
_LEVEL_NAMES = {logging.DEBUG: "DEBUG", logging.INFO: "INFO", LOG: "LOG",
                logging.WARNING: "WARNING", logging.ERROR: "ERROR", logging.CRITICAL: "FATAL"}
_MIN_MESSAGES = {"debug5": logging.DEBUG, "debug4": logging.DEBUG, "debug3": logging.DEBUG,
                 "debug2": logging.DEBUG, "debug1": logging.DEBUG, "info": logging.INFO,
                 "notice": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
                 "log": LOG, "fatal": logging.CRITICAL, "panic": logging.CRITICAL}


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(record.created))
        millis = int(record.msecs)
        level = _LEVEL_NAMES.get(record.levelno, record.levelname)
        text = f"{stamp}.{millis:03d} UTC [{os.getpid()}] {level}:  {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup(log_min_messages: str = "warning") -> None:
    root = logging.getLogger("pgforkpool")
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Formatter())
        root.addHandler(handler)
        root.propagate = False
    level = _MIN_MESSAGES.get(log_min_messages, logging.WARNING)
    # WARNING and ERROR sit below LOG in PostgreSQL's server-log order.
    root.setLevel(min(level, LOG) if level <= logging.ERROR else level)


def get(name: str) -> logging.Logger:
    return logging.getLogger("pgforkpool." + name)


def disconnection(seconds: float, user: str, database: str, address: str) -> str:
    """PostgreSQL's log_disconnections line; address is "host:port", or "" for a unix socket."""
    millis = int(seconds * 1000)
    hours, rest = divmod(millis, 3600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    host, _, port = address.rpartition(":")
    where = f"host={host} port={port}" if host else "host=[local]"
    return (f"disconnection: session time: {hours}:{minutes:02d}:{secs:02d}.{millis:03d} "
            f"user={user} database={database} {where}")


def session_label(conn_id: int, database: str, user: str, address: str) -> str:
    """How a log line names a client session, as PgBouncer's C-0x… prefixes and PostgreSQL's
    log_line_prefix name a connection: 'session 12 app/alice@10.0.0.5:51234'."""
    return f"session {conn_id} {database}/{user}@{address or 'local'}"
