#!/usr/bin/env bash
# Make sure Debian's Chromium is installed (the browser tests drive it headless).
#
# Idempotent: exits 0 at once when $CHROMIUM (default /usr/bin/chromium) runs.
# Otherwise installs the `chromium` package with apt-get (needs root; safe from CI).
set -euo pipefail

CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"

log() { printf 'chromium: %s\n' "$*" >&2; }
die() { printf 'chromium: ERROR: %s\n' "$*" >&2; exit 1; }

if [ -x "$CHROMIUM" ]; then
    exit 0
fi
[ "$(id -u)" -eq 0 ] || die "$CHROMIUM missing and not root: install Debian's chromium package"

log "installing chromium with apt-get"
export DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1
apt-get update -qq </dev/null >/dev/null || die "apt-get update failed"
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core </dev/null >/dev/null \
    || die "apt-get install chromium failed"
[ -x "$CHROMIUM" ] || die "$CHROMIUM still missing after installing chromium"
