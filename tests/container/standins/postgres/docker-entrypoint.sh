#!/usr/bin/env bash
# The postgres:15 stand-in's entrypoint (see Containerfile): what the official image's entrypoint
# does with an empty data folder, for the variables compose.yaml sets.
set -Eeuo pipefail

# `docker run postgres:15 -c foo=bar` means the server with those options.
if [ "${1:0:1}" = '-' ]; then
    set -- postgres "$@"
fi

if [ "$1" != postgres ]; then
    exec "$@"
fi

# As root: give the folders to the server's user, then start again as that user.
if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    find "$PGDATA" /var/run/postgresql \! -user postgres -exec chown postgres:postgres '{}' +
    chmod 700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "${BASH_SOURCE[0]}" "$@"
fi

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
        echo "error: the database is uninitialized and POSTGRES_PASSWORD is not set" >&2
        exit 1
    fi
    user="${POSTGRES_USER:-postgres}"
    db="${POSTGRES_DB:-$user}"

    initdb --username="$user" --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD") -D "$PGDATA"
    printf '\nhost all all all scram-sha-256\n' >> "$PGDATA/pg_hba.conf"

    # A server on the Unix socket only, to create the database, then stopped.
    pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start
    if [ "$db" != postgres ]; then
        psql -v ON_ERROR_STOP=1 --username "$user" --no-password --dbname postgres \
            --set db="$db" <<< 'CREATE DATABASE :"db";'
    fi
    pg_ctl -D "$PGDATA" -m fast -w stop
    echo "PostgreSQL init process complete; ready for start up."
fi

exec "$@"
