"""The ``trio-chat`` command line: ``serve`` runs an instance, ``token`` mints a test JWT."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import jwt
import trio

from ._config import load_config
from ._errors import BackendUnavailable, ConfigError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the process exit status.

    Args:
        argv: the arguments after the program name; None means ``sys.argv[1:]``.

    Returns:
        0 on success (including a clean shutdown), 1 when Redis is unreachable, 2 for a bad
        configuration. Usage errors exit 2 from argparse itself.
    """
    args = _parser().parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.command
    try:
        return command(args)
    except ConfigError as exc:
        return _config_error(exc)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trio-chat", description="Trio WebSocket chat server")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run one chat server instance")
    serve.set_defaults(command=_serve)
    serve.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration file")
    # A dest of the form section.key marks a flag that overrides that configuration key.
    serve.add_argument("--host", dest="server.host", metavar="H", help="WebSocket host")
    serve.add_argument("--port", dest="server.port", type=int, metavar="P", help="WebSocket port")
    serve.add_argument("--redis-url", dest="redis.url", metavar="URL", help="redis:// or memory://")
    serve.add_argument(
        "--instance-id", dest="server.instance_id", metavar="ID", help="this instance's id"
    )
    serve.add_argument(
        "--admin-port", dest="admin.port", type=int, metavar="P", help="admin API port"
    )
    serve.add_argument("--log-level", choices=_LOG_LEVELS, default="info")

    clean = commands.add_parser(
        "clean", help="reap dead instances once (for cron or a systemd timer), then exit"
    )
    clean.set_defaults(command=_clean)
    clean.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration file")
    clean.add_argument("--redis-url", dest="redis.url", metavar="URL", help="redis:// URL")

    token = commands.add_parser("token", help="print a JWT for USER signed with auth.jwt_secret")
    token.set_defaults(command=_token)
    token.add_argument("user", metavar="USER", help="the token's subject (sub)")
    token.add_argument("--ttl", type=int, default=3600, metavar="SECONDS", help="lifetime (3600)")
    token.add_argument("--rooms", nargs="+", metavar="PATTERN", help="rooms it may join (fnmatch)")
    token.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration file")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, object]]:
    """The flags whose dest is ``section.key``, as configuration overrides."""
    overrides: dict[str, dict[str, object]] = {}
    for dest, value in vars(args).items():
        if "." in dest and value is not None:
            section, key = dest.split(".")
            overrides.setdefault(section, {})[key] = value
    return overrides


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # coredis logs a traceback for every failed connection attempt; ours say it in one line.
    logging.getLogger("coredis").setLevel(logging.CRITICAL)


def _clean(args: argparse.Namespace) -> int:
    config = load_config(args.config, overrides=_overrides(args))
    _setup_logging("warning")
    from ._reaper import clean_once

    try:
        reaped = trio.run(clean_once, config)
    except BackendUnavailable as exc:
        return _fail(f"redis unreachable: {exc}", 1)
    print(f"reaped {len(reaped)} dead instance(s){': ' if reaped else ''}{' '.join(reaped)}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    config = load_config(args.config, overrides=_overrides(args))
    _setup_logging(args.log_level)
    from ._server import serve  # late: of all the commands, only this one needs the server

    code = 0
    try:
        trio.run(partial(serve, config, handle_signals=True))
    except* KeyboardInterrupt:
        pass  # serve drains on SIGINT itself; this is a ^C before its handler is installed
    except* ConfigError as group:
        code = _config_error(_first(group))
    except* BackendUnavailable as group:
        code = _fail(f"redis unreachable: {_first(group)}", 1)
    return code


def _token(args: argparse.Namespace) -> int:
    auth = load_config(args.config).auth
    if auth.jwt_secret is None:
        raise ConfigError("config error: auth.jwt_secret: not set (TRIO_CHAT_AUTH_JWT_SECRET)")
    algorithm = next((a for a in auth.jwt_algorithms if a.startswith("HS")), None)
    if algorithm is None:
        raise ConfigError("config error: auth.jwt_algorithms: no HS* algorithm to sign with")
    now = int(time.time())
    claims: dict[str, object] = {"sub": args.user, "iat": now, "exp": now + args.ttl}
    if auth.issuer is not None:
        claims["iss"] = auth.issuer
    if auth.audience is not None:
        claims["aud"] = auth.audience
    if args.rooms:
        claims["rooms"] = args.rooms
    print(jwt.encode(claims, auth.jwt_secret, algorithm=algorithm))
    return 0


def _first(exc: BaseException) -> BaseException:
    """The first leaf of a (possibly nested) exception group."""
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _config_error(exc: BaseException) -> int:
    # load_config's messages start with "config error: "; those the server raises may not.
    message = str(exc)
    if not message.startswith("config error: "):
        message = f"config error: {message}"
    return _fail(message, 2)


def _fail(message: str, code: int) -> int:
    print(f"trio-chat: {message}", file=sys.stderr)
    return code
