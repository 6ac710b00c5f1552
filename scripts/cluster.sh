#!/usr/bin/env bash
# Several server replicas behind HAProxy on one private PostgreSQL, all on loopback.
#
#   scripts/cluster.sh up        install postgresql/haproxy if missing (apt), start it all
#   scripts/cluster.sh down      stop it all and remove it (database, containers, folder)
#   scripts/cluster.sh status    what runs, and /healthz through HAProxy
#   scripts/cluster.sh install   only install postgresql and haproxy if missing (apt, root)
#
# Settings (environment):
#   CLUSTER_DIR=/tmp/3compute-cluster   everything lives here: the database, DATA_DIR, logs, pids
#   REPLICAS=3                          how many server processes
#   CLUSTER_PORT=5600                   HAProxy's port; replicas use the next REPLICAS ports
#   PG_PORT=5599                        the private PostgreSQL
#   CLUSTER_BACKEND=docker|local        default: docker when an engine answers, else local
#   CLUSTER_FLAGS="--dev"               extra server flags (dev mode: /auth/dev-login)
# Other server settings (FLASK_SECRET, GOOGLE_*, MAX_CONTAINERS, …) pass through the
# environment; a FLASK_SECRET is made once per cluster when none is set (every replica must
# sign and check sessions with the same key).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DIR=${CLUSTER_DIR:-/tmp/3compute-cluster}
REPLICAS=${REPLICAS:-3}
CLUSTER_PORT=${CLUSTER_PORT:-5600}
PG_PORT=${PG_PORT:-5599}
FLAGS=${CLUSTER_FLAGS:---dev}
PY=${PYTHON:-$ROOT/.venv/bin/python}

say() { echo "cluster: $*" >&2; }

install_missing() {
    scripts/postgres.sh install
    local missing=()
    command -v haproxy >/dev/null || missing+=(haproxy)
    command -v curl >/dev/null || missing+=(curl)
    if [ ${#missing[@]} -gt 0 ]; then
        [ "$(id -u)" = 0 ] || { say "${missing[*]} missing; run as root to install (apt)"; exit 1; }
        say "installing ${missing[*]} (apt)..."
        apt-get -o DPkg::Lock::Timeout=600 update -qq
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${missing[@]}" >/dev/null
    fi
}

backend() {
    if [ -n "${CLUSTER_BACKEND:-}" ]; then echo "$CLUSTER_BACKEND"
    elif docker info >/dev/null 2>&1; then echo docker
    else echo local; fi
}

replica_port() { echo $((CLUSTER_PORT + $1)); }

server_env() {  # the environment every replica shares
    echo "DATABASE_URL=$(cat "$DIR/database_url")"
    echo "DATA_DIR=$DIR/data"
    echo "FLASK_SECRET=${FLASK_SECRET:-$(cat "$DIR/secret")}"
    echo "REDIRECT_URI_DEV=${REDIRECT_URI_DEV:-http://127.0.0.1:$CLUSTER_PORT/auth/callback}"
    echo "REDIRECT_URI_PROD=${REDIRECT_URI_PROD:-http://127.0.0.1:$CLUSTER_PORT/auth/callback}"
}

wait_healthy() {  # wait_healthy URL SECONDS
    local deadline=$((SECONDS + $2))
    until curl -fsS -o /dev/null "$1/healthz" 2>/dev/null; do
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.2
    done
}

start_replica() {  # start_replica I
    local port; port=$(replica_port "$1")
    local args=(server.py --host 127.0.0.1 --port "$port" --backend "$(cat "$DIR/backend")")
    # shellcheck disable=SC2206
    args+=($FLAGS)
    (
        while IFS= read -r line; do export "${line?}"; done < <(server_env)
        export PYTHONUNBUFFERED=1
        exec setsid "$PY" "${args[@]}" >"$DIR/replica-$1.log" 2>&1 </dev/null
    ) &
    echo $! >"$DIR/replica-$1.pid"
}

write_haproxy_config() {
    local i port
    {
        grep -v '^    server ' deploy/haproxy.cfg | sed '/^backend socketio/,$d'
        for i in $(seq 1 "$REPLICAS"); do echo "    server r$i 127.0.0.1:$(replica_port "$i") check"; done
        echo
        sed -n '/^backend socketio/,$p' deploy/haproxy.cfg | grep -v '^    server '
        for i in $(seq 1 "$REPLICAS"); do echo "    server r$i 127.0.0.1:$(replica_port "$i") check cookie r$i"; done
    } >"$DIR/haproxy.cfg"
}

up() {
    if [ -f "$DIR/haproxy.pid" ]; then say "already up in $DIR (scripts/cluster.sh down first)"; exit 1; fi
    install_missing
    [ -x "$PY" ] || make -s setup
    mkdir -p "$DIR/data"
    chmod 755 "$DIR"
    backend >"$DIR/backend"
    [ -f "$DIR/secret" ] || "$PY" -c 'import secrets; print(secrets.token_urlsafe(32))' >"$DIR/secret"
    # The database's own folder in /tmp: as root PostgreSQL runs as another user, who may not
    # be able to reach into CLUSTER_DIR.
    [ -f "$DIR/pg_dir" ] || mktemp -d /tmp/3compute-pg.XXXXXX >"$DIR/pg_dir"
    say "PostgreSQL on 127.0.0.1:$PG_PORT ($(cat "$DIR/pg_dir"))"
    scripts/postgres.sh start "$(cat "$DIR/pg_dir")" "$PG_PORT"
    psql -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -tc "SELECT 1 FROM pg_database WHERE datname = 'threecompute'" \
        | grep -q 1 || psql -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -c "CREATE DATABASE threecompute"
    echo "postgresql://postgres@127.0.0.1:$PG_PORT/threecompute" >"$DIR/database_url"
    for i in $(seq 1 "$REPLICAS"); do start_replica "$i"; done
    for i in $(seq 1 "$REPLICAS"); do
        wait_healthy "http://127.0.0.1:$(replica_port "$i")" 60 \
            || { say "replica $i did not come up:"; tail -n 20 "$DIR/replica-$i.log" >&2; down; exit 1; }
    done
    write_haproxy_config
    THREECOMPUTE_BIND="127.0.0.1:$CLUSTER_PORT" THREECOMPUTE_ERRORS="$ROOT/deploy/errors" \
        haproxy -D -f "$DIR/haproxy.cfg" -p "$DIR/haproxy.pid" >"$DIR/haproxy.log" 2>&1 \
        || { cat "$DIR/haproxy.log" >&2; down; exit 1; }
    wait_healthy "http://127.0.0.1:$CLUSTER_PORT" 30 || { say "HAProxy does not answer"; down; exit 1; }
    say "$REPLICAS replicas ($(cat "$DIR/backend") backend) behind http://127.0.0.1:$CLUSTER_PORT"
    echo "http://127.0.0.1:$CLUSTER_PORT"
}

alive() {  # alive PID: running (a zombie no parent has reaped yet is not)
    kill -0 "$1" 2>/dev/null && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]
}

stop_pid() {  # stop_pid PIDFILE: TERM, then KILL after 20 s
    [ -f "$1" ] || return 0
    local pid; pid=$(cat "$1")
    if alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do alive "$pid" || break; sleep 0.2; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$1"
}

down() {
    [ -d "$DIR" ] || { say "nothing in $DIR"; return 0; }
    stop_pid "$DIR/haproxy.pid"
    for pidfile in "$DIR"/replica-*.pid; do stop_pid "$pidfile"; done
    if [ -f "$DIR/backend" ]; then  # user containers (or tmux servers) outlive servers by design: remove them
        DATA_DIR="$DIR/data" FLASK_SECRET=x "$PY" - "$(cat "$DIR/backend")" <<'PY' || say "could not remove the users' containers"
import asyncio, sys
from pathlib import Path
from threecompute.containers import make_backend
from threecompute.settings import load_settings
settings = load_settings(["--dev", "--backend", sys.argv[1]], dotenv=Path("/nonexistent"))
asyncio.run(make_backend(settings).purge())
PY
    fi
    [ -f "$DIR/pg_dir" ] && scripts/postgres.sh stop "$(cat "$DIR/pg_dir")"
    rm -rf "$DIR"
    say "down"
}

status() {
    [ -d "$DIR" ] || { say "down"; return 1; }
    local state=0 i pid
    for i in $(seq 1 "$REPLICAS"); do
        pid=$(cat "$DIR/replica-$i.pid" 2>/dev/null || echo 0)
        if alive "$pid"; then echo "replica $i: pid $pid, port $(replica_port "$i")"
        else echo "replica $i: not running"; state=1; fi
    done
    pid=$(cat "$DIR/haproxy.pid" 2>/dev/null || echo 0)
    if alive "$pid"; then echo "haproxy: pid $pid, http://127.0.0.1:$CLUSTER_PORT"
    else echo "haproxy: not running"; state=1; fi
    echo "healthz: $(curl -sS "http://127.0.0.1:$CLUSTER_PORT/healthz" 2>&1 || true)"
    return $state
}

case "${1:-}" in
up) up ;;
install) install_missing ;;
down) down ;;
status) status ;;
*) sed -n '2,17p' "$0" >&2; exit 2 ;;
esac
