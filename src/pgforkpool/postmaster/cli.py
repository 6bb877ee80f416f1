"""The pgforkpool command: start, reload, stop and status, in the manner of pg_ctl."""

import json
import os
import signal
import sys
import time

import click
import psutil
import yaml

from ..shared import auth, config, log, status

STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}


def _load(config_file: str, overrides: tuple[str, ...] = ()) -> config.Settings:
    try:
        return config.load_config(config_file, overrides)
    except config.ConfigError as exc:
        raise click.ClickException(str(exc))


def _postmaster_pid(settings: config.Settings) -> int | None:
    """The running postmaster's pid: from pid_file if set, else from the status table."""
    pid = None
    if settings.pid_file:
        try:
            with open(settings.pid_file) as f:
                pid = int(f.readline().strip())
        except (OSError, ValueError):
            pid = None
    if pid is None:
        table = status.StatusTable.attach(settings.port)
        pid = table.postmaster_pid if table is not None else None
    if pid is None:
        return None
    try:
        title = " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return None
    return pid if "pgforkpool" in title else None


def _running_pid(settings: config.Settings) -> int:
    pid = _postmaster_pid(settings)
    if pid is None:
        raise click.ClickException(f"no pgforkpool is running on port {settings.port}")
    return pid


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """--version: the release and which build runs (compiled hot path or pure Python)."""
    if not value or ctx.resilient_parsing:
        return
    from importlib import metadata

    import pgforkpool
    click.echo(f"pgforkpool {metadata.version('pgforkpool')}, {pgforkpool.build()}")
    ctx.exit()


@click.group()
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the version and which build runs (compiled or pure Python), then exit.")
def main() -> None:
    """pgforkpool: a PostgreSQL connection pooler with session semantics."""


@main.command()
@click.argument("config_file", type=click.Path(dir_okay=False))
@click.option("-c", "overrides", multiple=True, metavar="NAME=VALUE",
              help="Set a configuration parameter, overriding the file.")
def start(config_file: str, overrides: tuple[str, ...]) -> None:
    """Run the pooler in the foreground (systemd Type=notify)."""
    from .main import Postmaster, StartupFailure

    settings = _load(config_file, overrides)
    log.setup(settings.log_min_messages)
    try:
        Postmaster(settings).run()
    except (StartupFailure, auth.AuthFileError) as exc:
        log.get("postmaster").critical("%s", exc)
        sys.exit(1)
    except OSError as exc:
        where = f' "{exc.filename}"' if exc.filename else ""
        log.get("postmaster").critical("could not start%s: %s", where, exc.strerror or exc)
        sys.exit(1)


@main.command()
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@click.option("-c", "overrides", multiple=True, metavar="NAME=VALUE",
              help="Set a configuration parameter, as given to start (port, pid_file).")
def reload(config_file: str, overrides: tuple[str, ...]) -> None:
    """Make the running pooler re-read its configuration (SIGHUP)."""
    settings = _load(config_file, overrides)
    os.kill(_running_pid(settings), signal.SIGHUP)
    click.echo("server signaled")


@main.command()
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--mode", type=click.Choice(list(STOP_SIGNALS)), default="fast", show_default=True,
              help="smart: wait for sessions to end; fast: roll back and close them; "
                   "immediate: kill every process.")
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="Seconds to wait for the pooler to exit.")
@click.option("-c", "overrides", multiple=True, metavar="NAME=VALUE",
              help="Set a configuration parameter, as given to start (port, pid_file).")
def stop(config_file: str, mode: str, timeout: float, overrides: tuple[str, ...]) -> None:
    """Stop the running pooler and wait until it has exited."""
    settings = _load(config_file, overrides)
    pid = _running_pid(settings)
    os.kill(pid, STOP_SIGNALS[mode])
    click.echo("waiting for server to shut down...", nl=False)
    deadline = time.monotonic() + timeout
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        if time.monotonic() > deadline:
            click.echo(" failed")
            raise click.ClickException("server does not shut down")
        time.sleep(0.1)
        click.echo(".", nl=False)
    click.echo(" done\nserver stopped")


def status_rows(table: status.StatusTable) -> list[dict]:
    """One row per backend, as SHOW BACKENDS lists them."""
    return [{
        "pid": slot["pid"], "type": slot["kind"], "database": slot["database"],
        "user": slot["user"], "sessions": slot["sessions"], "waiting": slot["waiting"],
        "pinned": slot["pinned"], "transactions": slot["transactions"],
        "migrations": slot["migrations"], "load_average": round(slot["load_average"], 4),
        "draining": bool(slot["draining"]), "paused": bool(slot["paused"]),
        "rss_mb": round(slot["rss"] / 2**20, 1) if slot["rss"] is not None else None,
        "cpu_seconds": slot["cpu_seconds"],
    } for slot in status.backends(table)]


def pool_rows(table: status.StatusTable) -> list[dict]:
    """One row per (database, user), as SHOW POOLS and SHOW STATS sum their backends (running ones)."""
    pools: dict[tuple[str, str], dict] = {}
    for slot in table.slots():
        if not slot["pid"]:
            continue
        pool = pools.setdefault((slot["database"], slot["user"]), {
            "database": slot["database"], "user": slot["user"], "backends": 0, "dedicated": 0,
            "sessions": 0, "ready": 0, "pinned": 0})
        pool["dedicated" if slot["kind"] == "dedicated" else "backends"] += 1
        for name in ("sessions", "pinned"):
            pool[name] += slot[name]
        pool["ready"] += slot["waiting"]
        status.add_stats(pool, slot)
    rows = []
    for pool in pools.values():
        xacts, waits = pool["transactions"], pool["waits"]
        rows.append({
            "database": pool["database"], "user": pool["user"], "backends": pool["backends"],
            "dedicated": pool["dedicated"], "sessions": pool["sessions"], "ready": pool["ready"],
            "pinned": pool["pinned"], "transactions": xacts, "queries": pool["queries"],
            "received_bytes": pool["bytes_in"], "sent_bytes": pool["bytes_out"],
            "avg_xact_time_us": pool["xact_us"] // xacts if xacts else 0,
            "avg_wait_time_us": pool["wait_us"] // waits if waits else 0,
        })
    return sorted(rows, key=lambda r: (r["database"], r["user"]))


def _print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max([len(c)] + [len(str(r[c])) for r in rows]) for c in columns}
    click.echo(" | ".join(c.ljust(widths[c]) for c in columns))
    click.echo("-+-".join("-" * widths[c] for c in columns))
    for r in rows:
        click.echo(" | ".join(str(r[c]).ljust(widths[c]) for c in columns))
    click.echo(f"({len(rows)} rows)")


@main.command("status")
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@click.option("-c", "overrides", multiple=True, metavar="NAME=VALUE",
              help="Set a configuration parameter, as given to start (port, pid_file).")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "yaml"]), default="table",
              show_default=True)
def status_command(config_file: str, overrides: tuple[str, ...], fmt: str) -> None:
    """Show the running pooler's pools and backends, with their load and totals."""
    settings = _load(config_file, overrides)
    pid = _running_pid(settings)
    table = status.StatusTable.attach(settings.port)
    backends = status_rows(table) if table is not None else []
    pools = pool_rows(table) if table is not None else []
    data = {"postmaster_pid": pid, "port": settings.port, "pools": pools, "backends": backends}
    if fmt == "json":
        click.echo(json.dumps(data, indent=2))
    elif fmt == "yaml":
        click.echo(yaml.safe_dump(data, sort_keys=False), nl=False)
    else:
        click.echo(f"pgforkpool postmaster {pid}, port {settings.port}")
        click.echo("")
        _print_table(pools, ["database", "user", "backends", "dedicated", "sessions", "ready", "pinned",
                             "transactions", "queries", "avg_xact_time_us", "avg_wait_time_us"])
        click.echo("")
        _print_table(backends, ["pid", "type", "database", "user", "sessions", "waiting", "pinned",
                                "transactions", "migrations", "load_average", "draining", "paused",
                                "rss_mb", "cpu_seconds"])
