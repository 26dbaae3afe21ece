"""`lmx serve`: start the gateway (and through it the supervisor). Imported by
`lmx_gateway.main` only when that subcommand runs."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import ssl
import sys

import uvicorn

from lmx_gateway.app import create_app
from lmx_gateway.http.logging_setup import setup_logging
from lmx_supervisor.config import Config, ConfigError, ConfigSource, load_config

EXIT_CONFIG = 2
EXIT_BIND = 1


def _fail(message: str, code: int) -> int:
    print(f"lmx: error: {message}", file=sys.stderr)
    return code


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on accepted
    # sockets whose proto says TCP; without it Nagle plus delayed ACKs add
    # ~40 ms to responses written in two parts (headers, then body).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def _tls_problem(cert: str, key: str) -> str | None:
    """Load the pair once here so a bad file is one line, not uvicorn's traceback."""
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        return f"server.tls_cert_file: cannot read {exc.filename}"
    except (ssl.SSLError, OSError) as exc:
        return f"server.tls_cert_file: {cert} / {key}: not a usable certificate and key " \
               f"({getattr(exc, 'reason', None) or type(exc).__name__})"
    return None


def serve(args: argparse.Namespace) -> int:

    env = dict(os.environ)
    if args.host:
        env["LMX_SERVER__HOST"] = args.host
    if args.port is not None:
        env["LMX_SERVER__PORT"] = str(args.port)
    if args.log_level:
        env["LMX_LOGGING__LEVEL"] = args.log_level.upper()
    try:
        config: Config = load_config(args.config, env)
    except ConfigError as exc:
        return _fail(str(exc), EXIT_CONFIG)
    setup_logging(config.logging.level, config.logging.format, config.logging.file)
    host, port = config.server.host, config.server.port
    cert, key = config.server.tls_cert_file, config.server.tls_key_file
    if cert is not None and key is not None:
        problem = _tls_problem(cert, key)
        if problem is not None:
            return _fail(problem, EXIT_CONFIG)
    try:
        sock = _bind(host, port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return _fail(f"port {port} on {host} is already in use "
                         "(set --port or LMX_SERVER__PORT)", EXIT_BIND)
        return _fail(f"cannot listen on {host}:{port}: {exc.strerror}", EXIT_BIND)
    uv_config = uvicorn.Config(
        create_app(config, ConfigSource(args.config, env)),
        log_config=None,
        log_level=config.logging.level.lower(),
        timeout_graceful_shutdown=int(config.server.shutdown_drain_timeout_sec),
        timeout_keep_alive=30,
        ssl_certfile=cert,
        ssl_keyfile=key,
        # Connections beyond it are answered 503 at once, before any work.
        limit_concurrency=config.server.max_connections,
    )
    # uvicorn re-raises the signal that stopped it once it has shut down; a
    # no-op handler makes that a clean exit 0 after our own drain.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    scheme = "https" if cert else "http"
    print(f"LMX listening on {scheme}://{host}:{sock.getsockname()[1]}", file=sys.stderr,
          flush=True)
    uvicorn.Server(uv_config).run(sockets=[sock])
    return 0
