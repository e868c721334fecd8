"""Command line: `python -m tasktree_dist --httpserver [--host 127.0.0.1] [--port 8000] [--trace-dir .traces]`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port: {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range 0-65535: {port}")
    return port


def build_parser() -> argparse.ArgumentParser:
    from .tracing.httpserver import DEFAULT_HOST, DEFAULT_PORT, DEFAULT_TRACE_DIR

    parser = argparse.ArgumentParser(
        prog="python -m tasktree_dist",
        description="tasktree_dist tools. --httpserver serves saved traces and the trace viewer.",
    )
    parser.add_argument("--httpserver", action="store_true", help="serve the trace API and the trace viewer")
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to bind (default {DEFAULT_HOST}; traces may hold sensitive data, keep it local)",
    )
    parser.add_argument("--port", type=_port, default=DEFAULT_PORT, help=f"port to bind (default {DEFAULT_PORT})")
    parser.add_argument(
        "--trace-dir", default=DEFAULT_TRACE_DIR, help=f"directory of saved traces (default {DEFAULT_TRACE_DIR})"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.httpserver:
        parser.print_help(sys.stderr)
        return 2
    from .tracing.httpserver import run_httpserver

    run_httpserver(host=args.host, port=args.port, trace_dir=args.trace_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
