"""Process hygiene shared by every role: titles, parent-death signal, forked-child set-up."""

import os
import signal

import prctl

_title_prefix = "pgforkpool: "


def set_title(text: str) -> None:
    """A PostgreSQL-style process title, e.g. 'pgforkpool: listener 1'."""
    title = _title_prefix + text
    try:
        prctl.set_proctitle(title)
    except Exception:  # the argv area may be unavailable (embedded interpreters)
        pass
    prctl.set_name(title[:15])


def become_child(title: str) -> None:
    """Set-up in a freshly forked child: die with the postmaster, default signals, title."""
    prctl.set_pdeathsig(signal.SIGKILL)
    if os.getppid() == 1:  # the postmaster died before we set the death signal
        os._exit(1)
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    set_title(title)


class SignalPipe:
    """Signals turned into bytes on a pipe, read by the process's event loop.

    Handlers do no work (the gunicorn arbiter's rule): Python's wakeup fd writes
    the signal number to the pipe, and the loop dispatches from there.
    """

    def __init__(self, signals: tuple[int, ...]):
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        for sig in signals:
            signal.signal(sig, lambda signum, frame: None)

    def pending(self) -> list[int]:
        try:
            data = os.read(self.read_fd, 512)
        except BlockingIOError:
            return []
        return list(data)

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        os.close(self.read_fd)
        os.close(self.write_fd)
