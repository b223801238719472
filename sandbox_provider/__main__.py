"""Command line: ``python -m sandbox_provider --host 127.0.0.1 --port 8081 [options]``.

Fault flags apply to every request that would create a charge or refund ("creates").

Prints ``sandbox ca <path>`` (with ``--tls``) and then ``sandbox listening on <url>`` to
stdout, flushed, so a parent process can wait for the line instead of sleeping.
SIGTERM and SIGINT stop it cleanly.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from sandbox_provider.faults import DEFAULT_ERROR_STATUS, FaultError, Faults
from sandbox_provider.server import SandboxServer
from sandbox_provider.tls import generate_certificates, server_context
from sandbox_provider.webhooks import (
    DEFAULT_BACKOFF_MS,
    DEFAULT_MAX_ATTEMPTS,
    WebhookError,
    WebhookSettings,
)
from settings import SANDBOX_API_KEY, SANDBOX_PORT

SHUTDOWN_POLL_S = 0.1


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sandbox_provider", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=SANDBOX_PORT, help="0 picks a free port")
    parser.add_argument("--api-key", default=SANDBOX_API_KEY, help="bearer key requests need")
    parser.add_argument("--tls", action="store_true", help="serve HTTPS with a throwaway CA")
    parser.add_argument("--cert-dir", type=Path, help="where --tls writes ca.pem (default: temp)")
    parser.add_argument("--latency-ms", type=float, default=0, help="delay before each create")
    parser.add_argument("--hang", action="store_true", help="creates never answer")
    parser.add_argument(
        "--hang-after-commit", action="store_true", help="record each create, then never answer"
    )
    parser.add_argument("--error-rate", type=float, default=0.0, help="share of creates failed")
    parser.add_argument("--error-status", type=int, default=DEFAULT_ERROR_STATUS)
    parser.add_argument("--retry-after", type=int, help="Retry-After seconds on fault errors")
    parser.add_argument(
        "--trickle-ms", type=float, default=0, help="record each create, then answer bytewise"
    )
    parser.add_argument(
        "--script", default="", help="comma-separated faults for the next creates: 503,reset"
    )
    parser.add_argument(
        "--settle-later-ms",
        type=float,
        default=0,
        help="answer charges and refunds pending, settle them this much later",
    )
    parser.add_argument("--webhook-url", help="where events are POSTed (default: no events)")
    parser.add_argument("--webhook-secret", help="whsec_<base64> key that signs events")
    parser.add_argument(
        "--webhook-attempts",
        type=int,
        default=DEFAULT_MAX_ATTEMPTS,
        help="tries per event before giving up",
    )
    parser.add_argument(
        "--webhook-backoff-ms",
        type=float,
        default=DEFAULT_BACKOFF_MS,
        help="wait before the first retry, doubling after each",
    )
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)
    try:
        args.faults = Faults.from_mapping(
            {
                "latency_ms": args.latency_ms,
                "hang": args.hang,
                "hang_after_commit": args.hang_after_commit,
                "error_rate": args.error_rate,
                "error_status": args.error_status,
                "retry_after": args.retry_after,
                "trickle_ms": args.trickle_ms,
                "settle_later_ms": args.settle_later_ms,
                "script": [int(e) if e.isdigit() else e for e in args.script.split(",") if e],
            }
        )
        args.webhooks = WebhookSettings.from_mapping(
            {
                "url": args.webhook_url,
                "secret": args.webhook_secret,
                "max_attempts": args.webhook_attempts,
                "backoff_ms": args.webhook_backoff_ms,
            }
        )
    except (FaultError, WebhookError) as exc:
        parser.error(str(exc))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # SIGTERM stops the server the way Ctrl-C does: serve_forever unwinds, sockets close.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with ExitStack() as stack:
        ssl_context = None
        if args.tls:
            cert_dir = args.cert_dir or Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="sandbox-tls-"))
            )
            paths = generate_certificates(cert_dir)
            ssl_context = server_context(paths)
            print(f"sandbox ca {paths.ca_cert}", flush=True)
        try:
            server = SandboxServer(
                (args.host, args.port),
                api_key=args.api_key,
                faults=args.faults,
                webhooks=args.webhooks,
                ssl_context=ssl_context,
                verbose=args.verbose,
            )
        except OSError as exc:
            print(f"sandbox: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
            return 1
        print(f"sandbox listening on {server.url}", flush=True)
        try:
            server.serve_forever(poll_interval=SHUTDOWN_POLL_S)
        except KeyboardInterrupt:
            pass
        finally:
            server.faults.release_all()
            server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
