#!/usr/bin/env bash
# Start the local PostgreSQL (and Redis) when they are down, and install PgBouncer when
# it is missing; the tests need all three.
set -euo pipefail

pg_up() { pg_isready -q -h 127.0.0.1 -p 5432; }
if ! pg_up; then
    echo "PostgreSQL is down: starting it" >&2
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
    for _ in $(seq 1 60); do pg_up && break; sleep 0.5; done
    pg_up || { echo "PostgreSQL did not come up" >&2; exit 1; }
fi

if command -v redis-server >/dev/null && ! redis-cli -h 127.0.0.1 ping >/dev/null 2>&1; then
    echo "Redis is down: starting it" >&2
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
        --dir /tmp --logfile /tmp/redis-ci.log
fi

# PgBouncer: the tests start private instances of it (tests/support/pgbouncer.py), so it is
# only installed here, never started. Debian's package puts it in /usr/sbin.
if ! command -v pgbouncer >/dev/null && [ ! -x /usr/sbin/pgbouncer ]; then
    echo "PgBouncer is missing: installing it" >&2
    as_root=""; [ "$(id -u)" -eq 0 ] || as_root="sudo"
    apt_install() { $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbouncer >/dev/null; }
    apt_install || { $as_root apt-get update -qq >/dev/null && apt_install; } \
        || { echo "could not install pgbouncer" >&2; exit 1; }
fi
