#!/usr/bin/env bash
# A private PostgreSQL cluster in a folder of its own, on a loopback port: never the system's.
#
#   scripts/postgres.sh install            install the postgresql package if initdb is missing (apt, root)
#   scripts/postgres.sh start DIR PORT     initdb in DIR (if empty) and start it on 127.0.0.1:PORT
#   scripts/postgres.sh stop DIR           stop it (immediately) and remove DIR
#   scripts/postgres.sh halt DIR           stop it, keeping DIR (`start DIR PORT` again resumes it)
#   scripts/postgres.sh url PORT           the DATABASE_URL of such a cluster
#
# PostgreSQL refuses to run as root: as root the cluster runs as the `postgres` user (made by
# the Debian package) or else `nobody`, and DIR is handed to that user. Superuser `postgres`,
# trust authentication, listening on loopback only; the unix socket lives in DIR.
# PG_FAST=1 turns fsync off (tests: the data is thrown away).
set -euo pipefail

pg_bin() {
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -z "$dir" ] && command -v initdb >/dev/null; then dir=$(dirname "$(readlink -f "$(command -v initdb)")"); fi
    [ -n "$dir" ] && [ -x "$dir/initdb" ] || { echo "postgres.sh: PostgreSQL is not installed (scripts/postgres.sh install)" >&2; return 1; }
    echo "$dir"
}

run_as() {  # run_as USER CMD...: as the cluster's user (only when we are root)
    local user=$1; shift
    if [ "$(id -u)" = 0 ]; then runuser -u "$user" -- "$@"; else "$@"; fi
}

cluster_user() {
    if [ "$(id -u)" != 0 ]; then id -un; elif id postgres >/dev/null 2>&1; then echo postgres; else echo nobody; fi
}

case "${1:-}" in
install)
    if pg_bin >/dev/null 2>&1; then exit 0; fi
    [ "$(id -u)" = 0 ] || { echo "postgres.sh: run as root to install postgresql (apt)" >&2; exit 1; }
    echo "installing postgresql (apt)..." >&2
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq postgresql >/dev/null
    pg_bin >/dev/null
    ;;
start)
    dir=${2:?DIR}; port=${3:?PORT}
    bin=$(pg_bin); user=$(cluster_user)
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown "$user" "$dir"
    chmod 700 "$dir"
    if [ ! -f "$dir/data/PG_VERSION" ]; then
        run_as "$user" "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --no-locale -N >"$dir/initdb.log" 2>&1 \
            || { cat "$dir/initdb.log" >&2; exit 1; }
    fi
    opts="-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=200"
    [ "${PG_FAST:-0}" = 1 ] && opts="$opts -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    run_as "$user" "$bin/pg_ctl" -D "$dir/data" -o "$opts" -l "$dir/postgres.log" -w -t 60 start >/dev/null \
        || { tail -n 20 "$dir/postgres.log" >&2; exit 1; }
    ;;
stop)
    dir=${2:?DIR}
    if [ -f "$dir/data/postmaster.pid" ]; then
        bin=$(pg_bin); user=$(cluster_user)
        run_as "$user" "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$dir"
    ;;
halt)
    dir=${2:?DIR}; bin=$(pg_bin); user=$(cluster_user)
    run_as "$user" "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
    ;;
url)
    echo "postgresql://postgres@127.0.0.1:${2:?PORT}/postgres"
    ;;
*)
    sed -n '2,10p' "$0" >&2; exit 2
    ;;
esac
