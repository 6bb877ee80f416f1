"""A throwaway PostgreSQL cluster (initdb, start, stop) for scripts/run, scripts/bench and the tests.

PostgreSQL refuses to run as root, so when we are root the server runs as the
`postgres` operating-system user, in a directory it owns.

    python scripts/pgcluster.py start DIR PORT     # initdb if needed, start
    python scripts/pgcluster.py stop DIR
"""

import glob
import os
import pwd
import shutil
import subprocess
import sys
import time

SERVER_USER = "postgres"


def pg_bin() -> str:
    """The PostgreSQL 15 server binaries (PG_BIN overrides)."""
    if os.environ.get("PG_BIN"):
        return os.environ["PG_BIN"]
    candidates = sorted(glob.glob("/usr/lib/postgresql/15/bin")) or sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not candidates:
        raise SystemExit("PostgreSQL server binaries not found: install the Debian package postgresql-15")
    return candidates[-1]


def _as_server_user() -> dict:
    if os.geteuid() != 0:
        return {}
    entry = pwd.getpwnam(SERVER_USER)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


class Cluster:
    def __init__(self, base_dir: str, port: int, host: str = "127.0.0.1"):
        self.base_dir = os.path.abspath(base_dir)
        self.data_dir = os.path.join(self.base_dir, "data")
        self.socket_dir = self.base_dir
        self.port = port
        self.host = host
        self.log_file = os.path.join(self.base_dir, "postgresql.log")

    def _run(self, args: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(args, check=True, capture_output=True, text=True,
                              cwd=self.base_dir, **_as_server_user(), **kwargs)

    def init(self, settings: dict[str, str] | None = None) -> None:
        """initdb with trust on the unix socket and scram-sha-256 over TCP."""
        os.makedirs(self.base_dir, exist_ok=True)
        os.chmod(self.base_dir, 0o755)
        if os.geteuid() == 0:
            entry = pwd.getpwnam(SERVER_USER)
            os.chown(self.base_dir, entry.pw_uid, entry.pw_gid)
        if os.path.exists(os.path.join(self.data_dir, "PG_VERSION")):
            return
        self._run([os.path.join(pg_bin(), "initdb"), "-D", self.data_dir, "-U", "postgres",
                   "-A", "trust", "--no-sync", "-E", "UTF8", "--locale=C"])
        conf = {
            "port": str(self.port),
            "listen_addresses": f"'{self.host}'",
            "unix_socket_directories": f"'{self.socket_dir}'",
            "max_connections": "300",
            "max_prepared_transactions": "20",
            "password_encryption": "'scram-sha-256'",
            "shared_buffers": "128MB",
            "logging_collector": "off",
        }
        conf.update(settings or {})
        with open(os.path.join(self.data_dir, "postgresql.auto.conf"), "a") as f:
            for name, value in conf.items():
                f.write(f"{name} = {value}\n")
        with open(os.path.join(self.data_dir, "pg_hba.conf"), "w") as f:
            f.write("local all all trust\n"
                    "host all all 127.0.0.1/32 scram-sha-256\n"
                    "host all all ::1/128 scram-sha-256\n")

    def start(self) -> None:
        # The port on the command line: a cluster made by an earlier run with
        # another port starts on the one asked for now.
        self._run([os.path.join(pg_bin(), "pg_ctl"), "-D", self.data_dir, "-l", self.log_file,
                   "-o", f"-p {self.port}", "-w", "-t", "60", "start"])

    def stop(self, mode: str = "fast") -> None:
        if os.path.exists(os.path.join(self.data_dir, "postmaster.pid")):
            self._run([os.path.join(pg_bin(), "pg_ctl"), "-D", self.data_dir, "-m", mode,
                       "-w", "-t", "60", "stop"])

    def psql(self, sql: str, database: str = "postgres", user: str = "postgres") -> str:
        """Run SQL through the unix socket as a superuser; returns psql's unaligned output."""
        out = subprocess.run(["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                              "-h", self.socket_dir, "-p", str(self.port), "-U", user,
                              "-d", database, "-c", sql],
                             check=True, capture_output=True, text=True, timeout=60)
        return out.stdout.strip()

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.base_dir, ignore_errors=True)


def main(argv: list[str]) -> None:
    if len(argv) >= 3 and argv[0] == "start":
        cluster = Cluster(argv[1], int(argv[2]))
        cluster.init()
        cluster.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                cluster.psql("SELECT 1")
                break
            except subprocess.CalledProcessError:
                time.sleep(0.2)
    elif len(argv) >= 2 and argv[0] == "stop":
        Cluster(argv[1], 0).stop()
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
