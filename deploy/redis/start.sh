#!/bin/sh
# Start Redis with tickmesh's ACL users (deploy/redis/users.acl.in) and their passwords from
# the environment (REDIS_PASSWORD_INGEST, REDIS_PASSWORD_BARS, ...). A missing password stops
# here with one line naming the variable: no user is ever created without one. The rendered
# file lives on a tmpfs (/run/tickmesh), never in an image or a volume. Extra arguments go to
# redis-server.
set -eu
template="${TICKMESH_ACL_TEMPLATE:-/etc/tickmesh/users.acl.in}"
rendered="${TICKMESH_ACL_FILE:-/run/tickmesh/users.acl}"
umask 077
mkdir -p "$(dirname "$rendered")"
: > "$rendered"
while read -r keyword name rest; do
    [ "$keyword" = "user" ] || continue
    case " $rest " in
        *" off "* | *" nopass "*) echo "user $name $rest" >> "$rendered"; continue ;;
    esac
    variable="REDIS_PASSWORD_$(echo "$name" | tr '[:lower:]' '[:upper:]')"
    password="$(printenv "$variable" || true)"
    if [ -z "$password" ]; then
        echo "redis: $variable is not set: every tickmesh service has its own Redis user" \
            "(deploy/redis/users.acl.in); set its password in deploy/.env" >&2
        exit 78
    fi
    echo "user $name $rest >$password" >> "$rendered"
done < "$template"
exec redis-server --aclfile "$rendered" "$@"
