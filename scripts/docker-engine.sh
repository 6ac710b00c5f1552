#!/usr/bin/env bash
# Make sure a Docker engine answers on this machine.
#
# Idempotent: if `docker info` already works this exits 0 at once. Otherwise it
# installs docker.io (and iptables) with apt-get when dockerd is missing, starts
# dockerd in the background (log: $DOCKERD_LOG) and waits up to
# $DOCKERD_WAIT seconds for the engine to answer.
#
# Needs root for the install/start part. Safe to run from CI (no stdin).
set -euo pipefail

DOCKERD_LOG="${DOCKERD_LOG:-/var/log/3compute-dockerd.log}"
DOCKERD_WAIT="${DOCKERD_WAIT:-60}"

log() { printf 'docker-engine: %s\n' "$*" >&2; }
die() { printf 'docker-engine: ERROR: %s\n' "$*" >&2; exit 1; }

dockerd_running() { pgrep -x dockerd >/dev/null 2>&1 || pidof dockerd >/dev/null 2>&1; }
engine_up() { command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; }

if engine_up; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    die "docker engine not reachable and not root: cannot install/start dockerd (start it yourself or run as root)"
fi

# 1. Install the engine if it is missing.
if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker >/dev/null 2>&1 \
        || ! command -v iptables >/dev/null 2>&1; then
    log "installing docker.io and iptables with apt-get"
    export DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1
    apt-get update -qq </dev/null >/dev/null \
        || die "apt-get update failed"
    apt-get install -y -qq --no-install-recommends docker.io iptables ca-certificates \
        </dev/null >/dev/null \
        || die "apt-get install docker.io iptables failed"
    command -v dockerd >/dev/null 2>&1 || die "dockerd still missing after installing docker.io"
fi

# 2. Start dockerd unless one is already running (it may just be slow to answer).
if dockerd_running; then
    log "dockerd already running, waiting for it to answer"
else
    log "starting dockerd (log: $DOCKERD_LOG)"
    mkdir -p "$(dirname "$DOCKERD_LOG")"
    # The daemon starts as a service would, with none of the caller's environment: dockerd
    # hands its own to iptables and runc, so a preload or allocator setting meant for one
    # process would reach every container's start. PATH and the proxy settings pass.
    engine_env=(PATH="$PATH")
    for name in HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy; do
        if [ -n "${!name:-}" ]; then
            engine_env+=("$name=${!name}")
        fi
    done
    # setsid + nohup: the daemon outlives this script and the calling shell.
    setsid nohup env -i "${engine_env[@]}" dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null &
    started=1
fi

# 3. Wait for it.
start=$SECONDS
deadline=$((start + DOCKERD_WAIT))
while ! docker info >/dev/null 2>&1; do
    # a dockerd that died right away (bad config, no iptables, ...) fails fast
    if [ -n "${started:-}" ] && [ $((SECONDS - start)) -ge 3 ] && ! dockerd_running; then
        die "dockerd exited at start; last log line: $(tail -n 1 "$DOCKERD_LOG" 2>/dev/null)"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        die "docker engine did not answer within ${DOCKERD_WAIT}s (see $DOCKERD_LOG)"
    fi
    sleep 1
done
log "docker engine is up ($(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?'))"
