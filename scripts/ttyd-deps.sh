#!/usr/bin/env bash
# Make sure the ttyd peer binary the benchmark compares against can run: its runtime
# libraries (Debian 12; libwebsockets' libuv plugin is dlopened at start, so `ldd` does not
# show it). Idempotent: exits 0 at once when `$TTYD --version` works, or when there is no
# binary at $TTYD (the benchmark then says so and runs without it).
set -euo pipefail

TTYD="${TTYD:-$(cd "$(dirname "$0")/../.." && pwd)/shared/peers/ttyd}"
PACKAGES=(libwebsockets-evlib-uv libwebsockets17 libjson-c5 libuv1 libssl3 zlib1g libcap2)

log() { printf 'ttyd-deps: %s\n' "$*" >&2; }

if [ ! -x "$TTYD" ]; then
    log "no ttyd binary at $TTYD (set TTYD=path); the benchmark will run without it"
    exit 0
fi
if "$TTYD" --version >/dev/null 2>&1 && dpkg -s libwebsockets-evlib-uv >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    log "not root: install ${PACKAGES[*]} with apt-get to run $TTYD"
    exit 0
fi
log "installing ttyd's runtime libraries with apt-get"
export DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1
apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" </dev/null >/dev/null \
    || { apt-get update -qq </dev/null >/dev/null && \
         apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" </dev/null >/dev/null; } \
    || { log "apt-get install failed"; exit 1; }
"$TTYD" --version >/dev/null
