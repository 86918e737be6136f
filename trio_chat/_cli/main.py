"""The ``trio-chat`` command line: ``serve`` runs an instance, ``token`` mints a test JWT,
``logout``/``ban``/``unban``/``sessions`` call a running instance's admin API."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import urllib.error
import urllib.request
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit

import trio

from .. import __version__
from .._auth import NoSigningKey, mint_token
from .._config import load_config
from .._errors import BackendUnavailable, ConfigError, first_leaf
from .._logging import LOG_FORMATS, LOG_LEVELS, setup_logging

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from .._config import AuthConfig, Config

#: admin commands -> (HTTP method, last segment of /v1/users/<uid>/..., help)
_ADMIN_COMMANDS = {
    "logout": ("POST", "logout", "revoke USER's tokens and close its sessions everywhere"),
    "ban": ("POST", "ban", "ban USER and close its sessions everywhere"),
    "unban": ("POST", "unban", "lift USER's ban"),
    "sessions": ("GET", "sessions", "list USER's live sessions"),
}
_ADMIN_TIMEOUT = 10.0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the process exit status.

    Args:
        argv: the arguments after the program name; None means ``sys.argv[1:]``.

    Returns:
        0 on success (including a clean shutdown), 1 when Redis is unreachable, a listener
        cannot be bound or an admin API call failed, 2 for a bad configuration. Usage errors
        exit 2 from argparse itself.
    """
    raw = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(raw)
    args.raw = raw
    command: Callable[[argparse.Namespace], int] = args.command
    try:
        return command(args)
    except ConfigError as exc:
        return _config_error(exc)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trio-chat", description="Trio WebSocket chat server")
    parser.add_argument("--version", action="version", version=f"trio-chat {__version__}")
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
    serve.add_argument(
        "--workers",
        dest="server.workers",
        type=int,
        metavar="N",
        help="run N supervised instances on the same port (SO_REUSEPORT)",
    )
    serve.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    serve.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        help="text lines, or one JSON object per line (for log shippers)",
    )

    clean = commands.add_parser(
        "clean", help="reap dead instances once (for cron or a systemd timer), then exit"
    )
    clean.set_defaults(command=_clean)
    clean.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration file")
    clean.add_argument("--redis-url", dest="redis.url", metavar="URL", help="redis:// URL")

    client = commands.add_parser("client", help="chat from the terminal with a running server")
    client.set_defaults(command=_client)
    client.add_argument("url", metavar="URL", help="ws://host:port/path of the server")
    who = client.add_mutually_exclusive_group(required=True)
    who.add_argument("--token", metavar="T", help="a JWT (see `token`)")
    who.add_argument(
        "--user", metavar="USER", help="mint a token for USER with auth.jwt_secret (development)"
    )
    client.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration file")

    token = commands.add_parser("token", help="print a JWT for USER signed with auth.jwt_secret")
    token.set_defaults(command=_token)
    token.add_argument("user", metavar="USER", help="the token's subject (sub)")
    token.add_argument("--ttl", type=int, default=3600, metavar="SECONDS", help="lifetime (3600)")
    token.add_argument("--rooms", nargs="+", metavar="PATTERN", help="rooms it may join (fnmatch)")
    token.add_argument(
        "--publish", nargs="*", metavar="PATTERN", help="rooms it may send to (fnmatch; none: none)"
    )
    token.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration file")

    for name, (_, _, summary) in _ADMIN_COMMANDS.items():
        admin = commands.add_parser(name, help=f"{summary} (admin API)")
        admin.set_defaults(command=partial(_admin, name))
        admin.add_argument("user", metavar="USER", help="the user id")
        admin.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration file")
        admin.add_argument(
            "--admin-url",
            metavar="URL",
            help="a running instance's admin API (default http://<admin.host>:<admin.port>); "
            "the key is admin.api_key (TRIO_CHAT_ADMIN_API_KEY)",
        )
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, object]]:
    """The flags whose dest is ``section.key``, as configuration overrides."""
    overrides: dict[str, dict[str, object]] = {}
    for dest, value in vars(args).items():
        if "." in dest and value is not None:
            section, key = dest.split(".")
            overrides.setdefault(section, {})[key] = value
    return overrides


def _clean(args: argparse.Namespace) -> int:
    config = load_config(args.config, overrides=_overrides(args))
    setup_logging("warning", "text")
    from .._reaper import clean_once

    try:
        reaped = trio.run(clean_once, config)
    except BackendUnavailable as exc:
        return _fail(f"redis unreachable: {exc}", 1)
    print(f"reaped {len(reaped)} dead instance(s){': ' if reaped else ''}{' '.join(reaped)}")
    return 0


def _client(args: argparse.Namespace) -> int:
    from trio_websocket import ConnectionRejected

    from .terminal import run_client

    token = args.token or _mint(load_config(args.config).auth, args.user, ttl=3600, rooms=None)
    code = 0
    try:
        code = trio.run(run_client, args.url, token)
    except* ConnectionRejected as group:
        refused = first_leaf(group)
        assert isinstance(refused, ConnectionRejected)
        body = (refused.body or b"").decode(errors="replace")
        code = _fail(f"refused: HTTP {refused.status_code} {body}", 1)
    except* (OSError, ValueError) as group:
        code = _fail(f"cannot connect to {args.url}: {first_leaf(group)}", 1)
    return code


def _serve(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, args.log_format)  # first: loading may warn
    config = load_config(args.config, overrides=_overrides(args))
    if config.server.workers > 1:
        return _supervise(config, args)
    from .._server import serve  # late: of all the commands, only this one needs the server
    from .._systemd import Notifier

    code = 0
    _tune_process()
    try:
        notifier = Notifier.from_environ()
        trio.run(partial(serve, config, handle_signals=True, notifier=notifier))
    except* KeyboardInterrupt:
        pass  # serve drains on SIGINT itself; this is a ^C before its handler is installed
    except* ConfigError as group:
        code = _config_error(first_leaf(group))
    except* BackendUnavailable as group:
        code = _fail(f"redis unreachable: {first_leaf(group)}", 1)
    except* OSError as group:
        code = _fail(f"cannot listen: {first_leaf(group)}", 1)
    return code


def _tune_process() -> None:
    """Settings for a long-lived server process holding thousands of connections.

    Garbage collection: what startup made is frozen (full collections no longer walk it), and
    the youngest generation is collected after 10,000 allocations instead of 700; with the
    defaults, the collector's passes over every connection's objects cost about a third of a
    handshake's CPU at 5,000 connections (bench/README.md). Logging: our formats show no file,
    line or function, so records are made without looking for their caller, which costs time
    and keeps a frame object alive for each connection that logged from its handler (the
    optimisation in the logging HOWTO). An embedding application tunes its own process.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)
    logging._srcfile = None


def _supervise(config: Config, args: argparse.Namespace) -> int:
    from .workers import supervise

    try:
        # the workers get the same command line as the supervisor, after "serve"
        argv = args.raw[args.raw.index("serve") + 1 :]
        return trio.run(supervise, config, argv)
    except ValueError as exc:
        return _fail(str(exc), 2)


def _admin(name: str, args: argparse.Namespace) -> int:
    """Call the admin API for USER; print its JSON answer, or one line on stderr."""
    admin = load_config(args.config).admin
    host = f"[{admin.host}]" if ":" in admin.host else admin.host
    base = (args.admin_url or f"http://{host}:{admin.port}").rstrip("/")
    if urlsplit(base).scheme not in ("http", "https"):
        return _fail(f"--admin-url must be http:// or https://, got {base!r}", 2)
    method, action, _ = _ADMIN_COMMANDS[name]
    request = urllib.request.Request(
        f"{base}/v1/users/{quote(args.user, safe='')}/{action}",
        data=b"" if method == "POST" else None,
        method=method,
    )
    if admin.api_key:
        request.add_header("Authorization", f"Bearer {admin.api_key}")
    try:
        with urllib.request.urlopen(request, timeout=_ADMIN_TIMEOUT) as response:
            result = json.load(response)
    except urllib.error.HTTPError as exc:
        return _fail(f"{name} {args.user}: HTTP {exc.code} {_error_text(exc)}", 1)
    except (OSError, ValueError) as exc:  # URLError, timeouts, a body that is not JSON
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return _fail(f"admin API at {base}: {reason}", 1)
    print(json.dumps(result, indent=2))
    return 0


def _error_text(exc: urllib.error.HTTPError) -> str:
    """``error: message`` from the API's JSON body, else the HTTP reason."""
    try:
        body = json.loads(exc.read())
        return f"{body['error']}: {body['message']}"
    except (OSError, ValueError, KeyError, TypeError):
        return str(exc.reason)


def _token(args: argparse.Namespace) -> int:
    auth = load_config(args.config).auth
    print(_mint(auth, args.user, ttl=args.ttl, rooms=args.rooms, publish=args.publish))
    return 0


def _mint(
    auth: AuthConfig,
    user: str,
    *,
    ttl: int,
    rooms: list[str] | None,
    publish: list[str] | None = None,
) -> str:
    try:
        return mint_token(auth, user, ttl=ttl, rooms=rooms, publish=publish)
    except NoSigningKey as exc:
        raise ConfigError(f"config error: {exc}") from None


def _config_error(exc: BaseException) -> int:
    # load_config's messages start with "config error: "; those the server raises may not.
    message = str(exc)
    if not message.startswith("config error: "):
        message = f"config error: {message}"
    return _fail(message, 2)


def _fail(message: str, code: int) -> int:
    print(f"trio-chat: {message}", file=sys.stderr)
    return code
