"""Build pgforkpool: the pooled backend's per-message modules compiled with mypyc.

Every byte a pooled client sends passes through these modules; compiled, the
interpreter's overhead per message goes (README, "Performance").  The source
stays plain, type-checked Python: the same files are installed beside the
compiled ones and run as they are when the compiled ones are absent.

The pure-Python build is what you get when
- PGFORKPOOL_PURE=1 is set for the install, or
- mypyc or the C compiler is missing or fails (a warning says why).
`pgforkpool --version` says which build runs.
"""

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

# The hot path: stream buffers, client and server framing, the outstanding-reply
# queue, statement renaming, contexts, the scheduler, the siblings a waiting session may
# move to, the event loop that drives them, and the dedicated relay's ReadyForQuery counter.
COMPILED = [
    "src/pgforkpool/backend/stream.py",
    "src/pgforkpool/backend/statements.py",
    "src/pgforkpool/backend/client.py",
    "src/pgforkpool/backend/server.py",
    "src/pgforkpool/backend/context.py",
    "src/pgforkpool/backend/scheduler.py",
    "src/pgforkpool/backend/session.py",
    "src/pgforkpool/backend/siblings.py",
    "src/pgforkpool/backend/pooled.py",
    "src/pgforkpool/backend/readies.py",
]


def warn(text: str) -> None:
    print(f"pgforkpool: {text}; installing the pure-Python build", file=sys.stderr)


class OptionalBuildExt(build_ext):
    """Compile if possible; on any failure leave no half-built extension behind."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # a compiler error, a missing header, anything
            warn(f"compiling the hot path failed ({exc})")
            for path in self.get_outputs():
                if os.path.exists(path):
                    os.remove(path)
            self.extensions = []


def ext_modules() -> list:
    if os.environ.get("PGFORKPOOL_PURE") == "1":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError as exc:
        warn(f"mypyc is not available ({exc})")
        return []
    try:
        return mypycify(["--ignore-missing-imports", "--follow-imports=silent", *COMPILED],
                        opt_level="3", debug_level="0", group_name="pgforkpool")
    except (Exception, SystemExit) as exc:  # mypy refuses the source (a type error)
        warn(f"mypyc could not compile the hot path ({exc})")
        return []


setup(ext_modules=ext_modules(), cmdclass={"build_ext": OptionalBuildExt})
