# Shared set-up for scripts/run, scripts/test, scripts/bench and scripts/instructions (sourced, not run).
# Installs what is missing on a Debian machine, then the project into a virtual
# environment made from the system Python, readable by the `postgres` user that
# the pooler and PostgreSQL switch to when started as root.

set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PG_BIN="${PG_BIN:-/usr/lib/postgresql/15/bin}"
export PG_BIN

say() { printf '==> %s\n' "$*" >&2; }

install_system_packages() {
    local missing=()
    [ -x "$PG_BIN/initdb" ] || missing+=(postgresql)
    command -v psql >/dev/null && command -v pgbench >/dev/null || missing+=(postgresql-client)
    [ -f /usr/include/sys/capability.h ] || missing+=(libcap-dev)   # python-prctl builds against it
    command -v gcc >/dev/null || missing+=(gcc)
    /usr/bin/python3 -c 'import venv, ensurepip' 2>/dev/null || missing+=(python3-venv)
    [ -f "/usr/include/python3.$(/usr/bin/python3 -c 'import sys; print(sys.version_info[1])')/Python.h" ] || missing+=(python3-dev)
    if [ "${WANT_PGBOUNCER:-0}" = 1 ] && ! [ -x /usr/sbin/pgbouncer ]; then missing+=(pgbouncer); fi
    # valgrind: for scripts/instructions (and its test, which is skipped without it)
    if [ "${WANT_VALGRIND:-0}" = 1 ] && [ "$(id -u)" -eq 0 ] && ! command -v valgrind >/dev/null; then
        missing+=(valgrind)
    fi
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "Missing Debian packages: ${missing[*]}" >&2
        echo "Install them first:  sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
    # The Debian package starts a cluster on 5432 of its own; we use throwaway ones.
    if [[ " ${missing[*]} " == *" postgresql "* ]] && command -v pg_ctlcluster >/dev/null; then
        pg_ctlcluster 15 main stop 2>/dev/null || true
    fi
    if [[ " ${missing[*]} " == *" pgbouncer "* ]]; then
        service pgbouncer stop >/dev/null 2>&1 || true
    fi
}

# The build: the pooled backend's hot path compiled with mypyc (setup.py), in .venv;
# PGFORKPOOL_PURE=1 installs the same source uncompiled, in .venv-pure.
if [ "${PGFORKPOOL_PURE:-0}" = 1 ]; then
    VENV_NAME=.venv-pure
else
    VENV_NAME=.venv
fi
export PGFORKPOOL_PURE="${PGFORKPOOL_PURE:-0}"

# As root, the pooler runs as `postgres` and must be able to read its Python:
# keep the environment inside the checkout if postgres can reach it, else in /var/tmp.
choose_venv() {
    VENV="$ROOT/$VENV_NAME"
    if [ "$(id -u)" -eq 0 ] && id postgres >/dev/null 2>&1 \
        && ! runuser -u postgres -- test -x "$ROOT/scripts" 2>/dev/null; then
        local shared="/var/tmp/pgforkpool${VENV_NAME/.venv/-venv}-$(printf '%s' "$ROOT" | md5sum | cut -c1-12)"
        [ -L "$VENV" ] || rm -rf "$VENV"
        ln -sfn "$shared" "$VENV"
        VENV="$shared"
    fi
}

make_venv() {
    choose_venv
    if ! [ -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
        say "creating virtual environment $VENV"
        rm -rf "$VENV"
        /usr/bin/python3 -m venv "$VENV"
        "$VENV/bin/pip" install -q --upgrade pip
    fi
    say "installing pgforkpool into $VENV (compiling the hot path unless PGFORKPOOL_PURE=1)"
    local log
    log="$(mktemp)"
    if ! "$VENV/bin/pip" install -q --disable-pip-version-check "$ROOT[test]" >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        exit 1
    fi
    rm -f "$log"
    say "$("$VENV/bin/pgforkpool" --version)"
    chmod -R a+rX "$VENV"
}

setup() {
    install_system_packages
    make_venv
}
