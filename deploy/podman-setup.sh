#!/usr/bin/env bash
# Prepare a daemonless, Docker-Hub-less machine to build and run tickmesh's images:
#   1. install podman, runc and mmdebstrap (apt);
#   2. write /etc/containers/containers.conf (runc, and ulimits the kernel here accepts);
#   3. build the local Python base image the Dockerfiles start FROM, with the host's extra CA
#      certificates trusted (outgoing TLS may be intercepted, and pip inside a build must
#      trust the interceptor).
# Idempotent: each step is skipped when already done. Needs root and apt.
#
#   deploy/podman-setup.sh            # everything
#   BASE_IMAGE=... SUITE=bookworm deploy/podman-setup.sh
#   FORCE_BASE=1 deploy/podman-setup.sh   # rebuild the base (after a CA change)
set -euo pipefail

BASE_IMAGE="${BASE_IMAGE:-localhost/tickmesh-python:bookworm}"
SUITE="${SUITE:-bookworm}"
CA_DIR="${CA_DIR:-/usr/local/share/ca-certificates}"
CONF=/etc/containers/containers.conf

log() { printf 'podman-setup: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    log "needs root (apt-get and /etc/containers)"; exit 2
fi

# 1. packages -------------------------------------------------------------------------------
missing=()
for tool in podman runc mmdebstrap; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 || { log "no apt-get to install ${missing[*]}"; exit 2; }
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # catatonit is what `podman run --init` execs as PID 1.
    apt-get install -y -qq podman runc catatonit mmdebstrap >/dev/null
fi

# 2. containers.conf ------------------------------------------------------------------------
# crun fails on this kind of host, so runc; nproc above 32768 and nofile above the hard limit
# are refused by the kernel here, so both are set explicitly.
nofile_hard="$(awk '/^Max open files/ {print $5}' /proc/self/limits)"
case "$nofile_hard" in ''|unlimited) nofile_hard=1048576 ;; esac
wanted="# written by tickmesh deploy/podman-setup.sh
[containers]
default_ulimits = [\"nofile=${nofile_hard}:${nofile_hard}\", \"nproc=32768:32768\"]

[engine]
runtime = \"runc\"
"
mkdir -p "$(dirname "$CONF")"
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$(printf '%s' "$wanted")" ]; then
    if [ -f "$CONF" ] && ! grep -q 'tickmesh deploy/podman-setup.sh' "$CONF"; then
        cp "$CONF" "$CONF.before-tickmesh"
        log "kept the previous $CONF as $CONF.before-tickmesh"
    fi
    printf '%s' "$wanted" > "$CONF"
    log "wrote $CONF (runc, nofile=${nofile_hard}, nproc=32768)"
fi

# 3. base image -----------------------------------------------------------------------------
if [ -z "${FORCE_BASE:-}" ] && podman image exists "$BASE_IMAGE"; then
    log "base image $BASE_IMAGE present"
    exit 0
fi
log "building $BASE_IMAGE from Debian $SUITE (mmdebstrap, minbase)"
hooks=()
if [ -d /usr/share/mmdebstrap/hooks/merged-usr ]; then
    hooks+=(--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr)
fi
ca_hooks=()
if compgen -G "$CA_DIR/*.crt" >/dev/null; then
    # A hook is a shell command whose $1 is the new root.
    ca_hooks+=(--customize-hook="mkdir -p \"\$1$CA_DIR\" && cp $CA_DIR/*.crt \"\$1$CA_DIR/\"")
fi
started=$(date +%s)
mmdebstrap --quiet --variant=minbase "${hooks[@]}" \
    --include=python3,python3-venv,python3-pip,ca-certificates \
    "${ca_hooks[@]}" \
    --customize-hook='chroot "$1" update-ca-certificates >/dev/null 2>&1 || true' \
    --customize-hook='rm -rf "$1"/var/cache/apt/archives/*.deb "$1"/var/lib/apt/lists/*' \
    "$SUITE" - \
  | podman import --quiet \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        - "$BASE_IMAGE" >/dev/null
log "built $BASE_IMAGE in $(( $(date +%s) - started ))s: $(podman image inspect --format '{{.Size}}' "$BASE_IMAGE") bytes"
