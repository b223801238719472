#!/usr/bin/env bash
# `make run`: the service on its embedded defaults, a SQLite file under instance/ and the
# local sandbox provider, under gunicorn. Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."

# Outside the quickstart API_KEYS is required; here a local key is made up and printed.
export API_KEYS="${API_KEYS:-quickstart-local-key-$(id -u)-not-for-production}"

sandbox_pid=""
if [[ -z "${PAYMENT_API_URL:-}" ]]; then
    python -m sandbox_provider --host 127.0.0.1 --port 8081 &
    sandbox_pid=$!
fi
cleanup() { [[ -n "$sandbox_pid" ]] && kill "$sandbox_pid" 2>/dev/null || true; }
trap cleanup EXIT

python -c "import database_config; database_config.run_migrations()"

cat >&2 <<MSG

  Payment service on http://127.0.0.1:${PORT:-8000}  (provider: ${PAYMENT_API_URL:-sandbox on :8081})
  Try:  curl -s -X POST http://127.0.0.1:${PORT:-8000}/v1/payments \\
          -H "Authorization: Bearer ${API_KEYS%%,*}" -H "Content-Type: application/json" \\
          -H "Idempotency-Key: order-1" -d '{"amount": "25.99", "currency": "USD"}'

MSG
gunicorn -c gunicorn.conf.py wsgi:app
