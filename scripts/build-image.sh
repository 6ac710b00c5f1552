#!/usr/bin/env bash
# Build the 3Compute container image without any container registry.
#
#   scripts/build-image.sh [--force]
#
# 1. scripts/docker-engine.sh            (make sure an engine answers)
# 2. base image $BASE_IMAGE (3compute-base:bookworm), made once with
#    `debootstrap --variant=minbase bookworm` from the Debian mirror this
#    machine's apt uses, then `docker import`ed
# 3. `docker build --build-arg BASE=$BASE_IMAGE -t $CONTAINER_IMAGE
#    threecompute/containers/image`, skipped when the image already carries the
#    label 3compute.image-hash equal to the hash of the image folder + base.
#
# --force rebuilds the base and the image from scratch.
#
# Environment: CONTAINER_IMAGE (default 3compute), BASE_IMAGE (default
# 3compute-base:bookworm), DEBIAN_MIRROR / DEBIAN_SECURITY_MIRROR (default: from
# /etc/apt, else deb.debian.org), ROOTFS_DIR (default /var/cache/3compute/rootfs).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IMAGE_DIR="$REPO/threecompute/containers/image"
IMAGE="${CONTAINER_IMAGE:-3compute}"
BASE_IMAGE="${BASE_IMAGE:-3compute-base:bookworm}"
SUITE=bookworm
CACHE_DIR="${CACHE_DIR:-/var/cache/3compute}"
ROOTFS_DIR="${ROOTFS_DIR:-$CACHE_DIR/rootfs}"
HASH_LABEL=3compute.image-hash
DEFAULT_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

FORCE=0
for arg in "$@"; do
    case "$arg" in
        --force|-f) FORCE=1 ;;
        -h|--help) sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "build-image: unknown argument: $arg (usage: $0 [--force])" >&2; exit 2 ;;
    esac
done

log() { printf 'build-image: %s\n' "$*" >&2; }
die() { printf 'build-image: ERROR: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1fs", b - a }'; }

T_TOTAL=$(now)

# ---------------------------------------------------------------- engine
t=$(now)
"$REPO/scripts/docker-engine.sh"
log "engine ready ($(elapsed "$t"))"

mkdir -p "$CACHE_DIR"
# One build at a time on this machine (CI and a developer, two test runs...).
exec 9>"$CACHE_DIR/build.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
fi

# ---------------------------------------------------------------- helpers
image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# First http(s) URI of an enabled "deb" source for suite $1, from this machine's
# apt configuration (one-line .list files and deb822 .sources files).
apt_mirror_for() {
    local suite="$1" f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -r "$f" ] || continue
        awk -v s="$suite" '
            $1 == "deb" {
                i = 2
                if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                if ($(i + 1) == s && $i ~ /^https?:\/\//) { print $i; exit }
            }' "$f"
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -r "$f" ] || continue
        awk -v s="$suite" '
            BEGIN { RS = ""; FS = "\n" }
            {
                types = ""; uris = ""; suites = ""; enabled = "yes"
                for (i = 1; i <= NF; i++) {
                    line = $i
                    if (line ~ /^[Tt]ypes:/)   { sub(/^[^:]*:[ \t]*/, "", line); types = line }
                    if (line ~ /^URIs:/)       { sub(/^[^:]*:[ \t]*/, "", line); uris = line }
                    if (line ~ /^[Ss]uites:/)  { sub(/^[^:]*:[ \t]*/, "", line); suites = line }
                    if (line ~ /^[Ee]nabled:/) { sub(/^[^:]*:[ \t]*/, "", line); enabled = line }
                }
                if (enabled == "no" || (" " types " ") !~ / deb /) next
                if ((" " suites " ") !~ (" " s " ")) next
                n = split(uris, u, /[ \t]+/)
                for (j = 1; j <= n; j++) if (u[j] ~ /^https?:\/\//) { print u[j]; exit }
            }' "$f"
    done
}

# Unmount anything left under the rootfs (an interrupted debootstrap may leave
# /proc or /sys mounted there), then remove it, never leaving that file system.
remove_rootfs() {
    [ -e "$ROOTFS_DIR" ] || return 0
    local m
    awk -v d="$ROOTFS_DIR" '$2 == d || index($2, d "/") == 1 { print $2 }' /proc/mounts \
        | sort -r | while read -r m; do umount -l "$m" || true; done
    if awk -v d="$ROOTFS_DIR" '$2 == d || index($2, d "/") == 1 { found = 1 } END { exit !found }' /proc/mounts; then
        die "something is still mounted under $ROOTFS_DIR; not removing it"
    fi
    rm -rf --one-file-system "$ROOTFS_DIR"
}

# Hash of the image folder (README excluded) plus the base image id: a change of
# the Dockerfile, tmux.conf or the base makes a new hash and so a rebuild.
image_hash() {
    {
        (cd "$IMAGE_DIR" && find . -type f ! -name README.md -print0 \
            | LC_ALL=C sort -z | xargs -0 sha256sum)
        docker image inspect --format '{{.Id}}' "$BASE_IMAGE"
    } | sha256sum | cut -c1-16
}

# ---------------------------------------------------------------- base image
if [ "$FORCE" = 1 ] || ! image_exists "$BASE_IMAGE"; then
    t=$(now)
    [ "$(id -u)" -eq 0 ] || die "making the base image needs root (debootstrap)"

    if ! command -v debootstrap >/dev/null 2>&1; then
        log "installing debootstrap with apt-get"
        export DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1
        apt-get update -qq </dev/null >/dev/null || die "apt-get update failed"
        apt-get install -y -qq --no-install-recommends debootstrap debian-archive-keyring \
            </dev/null >/dev/null || die "apt-get install debootstrap failed"
    fi

    MIRROR="${DEBIAN_MIRROR:-$(apt_mirror_for "$SUITE" | head -n 1)}"
    MIRROR="${MIRROR:-http://deb.debian.org/debian}"
    SEC_MIRROR="${DEBIAN_SECURITY_MIRROR:-$(apt_mirror_for "$SUITE-security" | head -n 1)}"
    SEC_MIRROR="${SEC_MIRROR:-http://deb.debian.org/debian-security}"

    trap remove_rootfs EXIT
    remove_rootfs
    mkdir -p "$ROOTFS_DIR"
    log "debootstrap --variant=minbase $SUITE from $MIRROR (log: $CACHE_DIR/debootstrap.log)"
    if ! debootstrap --variant=minbase "$SUITE" "$ROOTFS_DIR" "$MIRROR" \
            >"$CACHE_DIR/debootstrap.log" 2>&1 </dev/null; then
        tail -n 20 "$CACHE_DIR/debootstrap.log" >&2 || true
        die "debootstrap failed (see $CACHE_DIR/debootstrap.log)"
    fi
    log "debootstrap done ($(elapsed "$t"))"

    # Tidy the tree: apt sources like the host's, no downloaded packages or
    # lists, no device nodes or host files (Docker supplies /dev, hosts, DNS).
    t2=$(now)
    awk -v d="$ROOTFS_DIR" '$2 == d || index($2, d "/") == 1 { found = 1 } END { exit !found }' /proc/mounts \
        && die "debootstrap left mounts under $ROOTFS_DIR"
    cat >"$ROOTFS_DIR/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SEC_MIRROR $SUITE-security main
EOF
    rm -rf "${ROOTFS_DIR:?}"/var/cache/apt/archives/*.deb \
           "${ROOTFS_DIR:?}"/var/cache/apt/*.bin \
           "${ROOTFS_DIR:?}"/var/lib/apt/lists/* \
           "${ROOTFS_DIR:?}"/var/log/* \
           "${ROOTFS_DIR:?}"/dev/* \
           "${ROOTFS_DIR:?}"/tmp/* \
           "${ROOTFS_DIR:?}"/debootstrap
    mkdir -p "$ROOTFS_DIR/var/lib/apt/lists/partial" "$ROOTFS_DIR/var/log/apt"
    # Like Debian's official *-slim images: no docs (copyright files kept),
    # man pages or translations, now and for every package installed later.
    cat >"$ROOTFS_DIR/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
EOF
    find "$ROOTFS_DIR/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
    find "$ROOTFS_DIR/usr/share/doc" -mindepth 1 -type d -empty -delete
    rm -rf "${ROOTFS_DIR:?}"/usr/share/groff/* "${ROOTFS_DIR:?}"/usr/share/info/* \
           "${ROOTFS_DIR:?}"/usr/share/linda/* "${ROOTFS_DIR:?}"/usr/share/lintian/overrides/* \
           "${ROOTFS_DIR:?}"/usr/share/locale/* "${ROOTFS_DIR:?}"/usr/share/man/*
    : >"$ROOTFS_DIR/etc/resolv.conf"
    echo 3compute >"$ROOTFS_DIR/etc/hostname"

    docker image rm -f "$BASE_IMAGE" >/dev/null 2>&1 || true
    tar --numeric-owner -C "$ROOTFS_DIR" -c . \
        | docker import \
            --change "ENV PATH=$DEFAULT_PATH" \
            --change 'CMD ["/bin/bash"]' \
            --message "debootstrap --variant=minbase $SUITE $MIRROR" \
            - "$BASE_IMAGE" >/dev/null \
        || die "docker import of the base image failed"
    remove_rootfs
    trap - EXIT
    log "base image $BASE_IMAGE imported ($(elapsed "$t2"); base total $(elapsed "$t"))"
else
    log "base image $BASE_IMAGE present (cached)"
fi

# ---------------------------------------------------------------- image
t=$(now)
HASH="$(image_hash)"
CURRENT="$(docker image inspect --format "{{ index .Config.Labels \"$HASH_LABEL\" }}" "$IMAGE" 2>/dev/null || true)"
if [ "$FORCE" = 0 ] && [ "$CURRENT" = "$HASH" ]; then
    log "image $IMAGE is up to date ($HASH_LABEL=$HASH, cached)"
else
    log "docker build -t $IMAGE (hash $HASH; log: $CACHE_DIR/docker-build.log)"
    build_opts=()
    [ "$FORCE" = 1 ] && build_opts+=(--no-cache)
    if ! DOCKER_BUILDKIT=0 docker build "${build_opts[@]}" \
            --build-arg "BASE=$BASE_IMAGE" \
            --build-arg "IMAGE_HASH=$HASH" \
            --label "$HASH_LABEL=$HASH" \
            -t "$IMAGE" "$IMAGE_DIR" >"$CACHE_DIR/docker-build.log" 2>&1 </dev/null; then
        tail -n 30 "$CACHE_DIR/docker-build.log" >&2 || true
        die "docker build failed (see $CACHE_DIR/docker-build.log)"
    fi
    # Drop our own superseded, now untagged builds (never images in use).
    docker image prune -f --filter "label=$HASH_LABEL" >/dev/null 2>&1 || true
    log "image $IMAGE built ($(elapsed "$t"))"
fi

size="$(docker image inspect --format '{{.Size}}' "$IMAGE" | awk '{ printf "%.0f MB", $1 / 1000000 }')"
log "done: $IMAGE ($size) in $(elapsed "$T_TOTAL")"
