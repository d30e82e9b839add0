#!/bin/sh
# The nginx stand-in's entrypoint (see Containerfile): as the official image's, it prepares the
# configuration with the scripts in /docker-entrypoint.d/ when it starts nginx, then runs it.
set -e

if [ "$1" = nginx ] || [ "$1" = nginx-debug ]; then
    find /docker-entrypoint.d/ -follow -type f -print | sort -V | while read -r f; do
        case "$f" in
            *.envsh | *.sh)
                if [ ! -x "$f" ]; then
                    echo "$0: Ignoring $f, not executable"
                elif [ "${f%.envsh}" != "$f" ]; then
                    echo "$0: Sourcing $f"
                    # shellcheck disable=SC1090
                    . "$f"
                else
                    echo "$0: Launching $f"
                    "$f"
                fi
                ;;
            *) echo "$0: Ignoring $f" ;;
        esac
    done
    echo "$0: Configuration complete; ready for start up"
fi

exec "$@"
