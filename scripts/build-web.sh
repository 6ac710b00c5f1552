#!/usr/bin/env bash
# Build the built-in web workspace (web/ -> web/dist/) with esbuild.
#
#   scripts/build-web.sh
#
# Installs Node.js and npm with apt when the machine lacks them, installs the locked npm
# packages (`npm ci`) when node_modules is missing or older than package-lock.json, then
# bundles.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WEB="$REPO/web"

apt_install() {
    if [ "$(id -u)" != 0 ]; then
        echo "build-web: $* missing; install it (apt-get install $*) or run as root" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    apt_install nodejs npm
fi

cd "$WEB"
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
    npm ci --no-audit --no-fund --loglevel=error
fi
node build.mjs
echo "build-web: web/dist built ($(cd dist && du -sk assets | cut -f1) KiB of assets)"
