"""Configuration: frozen attrs classes, one per section of the TOML file (SPEC §10).

Loading merges, in rising precedence, the TOML file, ``TRIO_CHAT_<SECTION>_<KEY>`` environment
variables and command-line flags; an unknown key or a bad value raises :class:`ConfigError`
naming the key.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import logging
import os
import secrets
import socket
import ssl
import tomllib
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import attrs
import cattrs
from attrs import validators as v
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError
from cattrs.gen import make_dict_structure_fn, override

from ._errors import ConfigError
from ._hooks.events import HOOKS
from ._systemd import credential

if TYPE_CHECKING:
    from pathlib import Path

    # typed loosely so that one validator serves int and float fields alike
    _Validator = Callable[[object, attrs.Attribute[Any], Any], None]

logger = logging.getLogger(__name__)

__all__ = [
    "AdminConfig",
    "AuthConfig",
    "Config",
    "ConfigError",
    "HeartbeatConfig",
    "HistoryConfig",
    "HooksConfig",
    "LimitsConfig",
    "RedisConfig",
    "RoomOptions",
    "ServerConfig",
    "SessionConfig",
    "load_config",
]

_positive: _Validator = v.gt(0)
_non_negative: _Validator = v.ge(0)
_port: _Validator = v.and_(v.ge(0), v.le(65535))


def default_instance_id() -> str:
    """Return ``<host>-<pid>-<rand>``, unique per process start."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def _path(_inst: object, _attribute: attrs.Attribute[str], value: str) -> None:
    if not value.startswith("/"):
        raise ValueError(f"must start with '/', got {value!r}")


# Only signing algorithms: "none" would accept unsigned tokens.
_JWT_ALGORITHMS = frozenset(
    f"{family}{bits}" for family in ("HS", "RS", "PS", "ES") for bits in (256, 384, 512)
) | {"EdDSA"}


def _jwt_algorithms(
    _inst: object, _attribute: attrs.Attribute[Any], value: tuple[str, ...]
) -> None:
    for name in value:
        if name not in _JWT_ALGORITHMS:
            raise ValueError(
                f"unsupported algorithm {name!r} (allowed: {', '.join(sorted(_JWT_ALGORITHMS))})"
            )


def _networks(_inst: object, _attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    for entry in value:
        try:
            ipaddress.ip_network(entry, strict=False)
        except ValueError:
            raise ValueError(f"{entry!r} is not a network (an address or a CIDR)") from None


def _http_url(_inst: object, _attribute: attrs.Attribute[str | None], value: str | None) -> None:
    if value is not None and not value.startswith(("http://", "https://")):
        raise ValueError(f"must be an http:// or https:// URL, got {value!r}")


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """A server's TLS context with the certificate chain ``cert`` and its private key ``key``.

    Raises:
        ConfigError: a file is missing or unreadable, or they are no PEM certificate and key
            that belong together.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load {cert} and {key}: {exc}") from None
    return context


def _ws_url(_inst: object, _attribute: attrs.Attribute[str | None], value: str | None) -> None:
    if value is not None and not value.startswith(("ws://", "wss://")):
        raise ValueError(f"must be a ws:// or wss:// URL, got {value!r}")


@attrs.frozen(kw_only=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = attrs.field(default=8765, validator=_port)
    instance_id: str = attrs.field(factory=default_instance_id, validator=v.min_len(1))
    shutdown_timeout: float = attrs.field(default=10.0, validator=_positive)
    path: str = attrs.field(default="/", validator=_path)
    #: worker processes (``--workers``), each its own instance, sharing the port
    workers: int = attrs.field(default=1, validator=v.and_(v.ge(1), v.le(256)))
    #: bind with SO_REUSEPORT, so several processes can share the port (set for workers)
    reuse_port: bool = False
    #: seconds: under a steady stream to many local sockets, each gets the Pub/Sub traffic in
    #: one write per this much time instead of one per message (0: off); adds at most this
    #: much latency (see :class:`~trio_chat._wire.Cork`)
    write_delay: float = attrs.field(default=0.005, validator=v.and_(_non_negative, v.le(1.0)))
    #: seconds a client has to complete its opening handshake (the HTTP upgrade request), so a
    #: socket that sends half a request (slowloris) holds its memory no longer than this
    handshake_timeout: float = attrs.field(default=10.0, validator=_positive)
    #: the WebSocket URL pages and demo tokens point clients to; None: ``ws://<host>:<port><path>``
    #: (``wss://`` with TLS; behind a proxy, set the public one)
    public_url: str | None = attrs.field(default=None, validator=_ws_url)
    #: networks (CIDR) of the proxies in front: from a peer in one of them, the session's
    #: ``remote`` is the client's address in ``X-Forwarded-For``
    trusted_proxies: tuple[str, ...] = attrs.field(default=(), converter=tuple, validator=_networks)
    #: PEM certificate chain and key: the listener speaks ``wss://`` (reloaded on SIGHUP)
    tls_cert: str | None = None
    tls_key: str | None = None


@attrs.frozen(kw_only=True)
class RedisConfig:
    url: str = "memory://"
    #: seconds a single command or pipeline may take before Redis counts as unreachable
    command_timeout: float = attrs.field(default=2.0, validator=_positive)


@attrs.frozen(kw_only=True)
class AuthConfig:
    jwt_secret: str | None = attrs.field(default=None, repr=False)
    jwt_algorithms: tuple[str, ...] = attrs.field(
        default=("HS256",), converter=tuple, validator=[v.min_len(1), _jwt_algorithms]
    )
    jwt_public_key_file: str | None = None
    #: an identity provider's JWKS (http/https): the keys of RS*/PS*/ES*/EdDSA tokens, by kid
    jwks_url: str | None = attrs.field(default=None, validator=_http_url)
    #: seconds between fetches of the key set
    jwks_refresh: float = attrs.field(default=300.0, validator=_positive)
    #: seconds at least between the fetches an unknown ``kid`` asks for
    jwks_min_refetch: float = attrs.field(default=10.0, validator=_non_negative)
    issuer: str | None = None
    audience: str | None = None
    leeway: float = attrs.field(default=5.0, validator=_non_negative)
    refresh_window: float = attrs.field(default=30.0, validator=_non_negative)
    require_record: bool = False
    allow_query_token: bool = True
    cookie_name: str = "trio_chat_token"
    session_key: str | None = None
    allowed_origins: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    cache_ttl: float = attrs.field(default=1.0, validator=_non_negative)


@attrs.frozen(kw_only=True)
class SessionConfig:
    ttl: float = attrs.field(default=60.0, validator=_positive)
    instance_ttl: float = attrs.field(default=15.0, validator=_positive)


@attrs.frozen(kw_only=True)
class HeartbeatConfig:
    ping_interval: float = attrs.field(default=20.0, validator=_positive)
    ping_timeout: float = attrs.field(default=10.0, validator=_positive)


@attrs.frozen(kw_only=True)
class LimitsConfig:
    max_message_bytes: int = attrs.field(default=65536, validator=_positive)
    max_rooms_per_session: int = attrs.field(default=100, validator=_positive)
    max_sessions_per_user: int = attrs.field(default=20, validator=_positive)
    max_connections: int = attrs.field(default=10000, validator=_positive)
    send_rate: float = attrs.field(default=20.0, validator=_positive)
    send_burst: int = attrs.field(default=40, validator=_positive)
    outbound_queue: int = attrs.field(default=256, validator=_positive)
    #: every client frame spends a token of this bucket (SPEC §6): churning join/leave or
    #: refresh costs Redis work too
    frame_rate: float = attrs.field(default=100.0, validator=_positive)
    frame_burst: int = attrs.field(default=200, validator=_positive)
    #: ``signal`` frames (SPEC §15): beyond, ``rate_limited``, never a close
    signal_rate: float = attrs.field(default=5.0, validator=_positive)
    signal_burst: int = attrs.field(default=10, validator=_positive)


@attrs.frozen(kw_only=True)
class HistoryConfig:
    #: messages kept per room (``MAXLEN ~``: approximately); 0 turns history and recovery off
    size: int = attrs.field(default=200, validator=_non_negative)
    #: seconds a room's stream lives after its last message
    ttl: float = attrs.field(default=86400.0, validator=_positive)


@attrs.frozen(kw_only=True)
class AdminConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = attrs.field(default=8766, validator=_port)
    api_key: str | None = attrs.field(default=None, repr=False)
    #: serve the demo chat page (/demo/) and its token endpoint: for trying it out, never in
    #: production (anyone who reaches the admin port gets a token for any user)
    demo: bool = False
    #: PEM certificate chain and key: the admin API speaks HTTPS
    tls_cert: str | None = None
    tls_key: str | None = None


def _hook_names(_inst: object, _attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    for name in value:
        if name not in HOOKS:
            raise ValueError(f"unknown hook {name!r} (hooks: {', '.join(HOOKS)})")


@attrs.frozen(kw_only=True)
class HooksConfig:
    """The application's hooks over HTTP (SPEC §14); an embedding passes ``hooks=`` instead."""

    #: the application's hook endpoint: each hook is ``POST <url>/<hook>``; None: no HTTP hooks
    url: str | None = attrs.field(default=None, validator=_http_url)
    #: which hooks are called (the others allow without asking)
    calls: tuple[str, ...] = attrs.field(default=HOOKS, converter=tuple, validator=_hook_names)
    #: HMAC-SHA256 key of ``X-Trio-Chat-Signature``; required with ``url``
    secret: str | None = attrs.field(default=None, repr=False)
    #: seconds per hook call (Python hooks too), waiting for a pooled connection included
    timeout: float = attrs.field(default=2.0, validator=_positive)
    #: hook calls in flight per instance; more wait, within ``timeout``
    max_concurrency: int = attrs.field(default=100, validator=_positive)


def _pattern(_inst: object, _attribute: attrs.Attribute[str], value: str) -> None:
    if not value:
        raise ValueError("must be a non-empty fnmatch pattern of room ids")


@attrs.frozen(kw_only=True)
class RoomOptions:
    """One ``[[rooms]]`` table (SPEC §15): options of the rooms whose id ``match`` fits
    (fnmatch); the first table that fits a room applies, and None keeps the ``history.*``
    value."""

    match: str = attrs.field(validator=_pattern)
    #: messages kept (``history.size`` for these rooms; 0: no history)
    history_size: int | None = attrs.field(default=None, validator=v.optional(_non_negative))
    #: seconds the stream and the read markers live after their last change
    history_ttl: float | None = attrs.field(default=None, validator=v.optional(_positive))
    #: ``presence_join`` / ``presence_leave`` to the members
    presence_events: bool = False
    #: ``signal`` frames allowed
    signals: bool = True
    #: False: only the admin API and server-side publishes may post (announcements)
    client_publish: bool = True
    #: distinct users at most (0: no limit); a new user's join beyond it is ``room_full``
    max_members: int = attrs.field(default=0, validator=_non_negative)


@attrs.frozen(kw_only=True)
class Config:
    """The whole configuration, passed explicitly to everything that needs a part of it."""

    server: ServerConfig = attrs.Factory(ServerConfig)
    redis: RedisConfig = attrs.Factory(RedisConfig)
    auth: AuthConfig = attrs.Factory(AuthConfig)
    session: SessionConfig = attrs.Factory(SessionConfig)
    heartbeat: HeartbeatConfig = attrs.Factory(HeartbeatConfig)
    limits: LimitsConfig = attrs.Factory(LimitsConfig)
    history: HistoryConfig = attrs.Factory(HistoryConfig)
    admin: AdminConfig = attrs.Factory(AdminConfig)
    hooks: HooksConfig = attrs.Factory(HooksConfig)
    #: the ``[[rooms]]`` tables, in order (TOML only)
    rooms: tuple[RoomOptions, ...] = ()


def _type_of(field: attrs.Attribute[Any]) -> type[Any]:
    assert field.type is not None, "every field is annotated and resolve_types() ran"
    return field.type


# Field types are strings until resolved (``from __future__ import annotations``).
_SECTIONS = {
    field.name: _type_of(field)
    for field in attrs.fields(attrs.resolve_types(Config))
    if field.name != "rooms"  # a list of tables, not a section
}
attrs.resolve_types(RoomOptions)
for _cls in _SECTIONS.values():
    attrs.resolve_types(_cls)
_ENV_PREFIX = "TRIO_CHAT_"
#: systemd credentials (``LoadCredential=<name>:<file>``) and the key each sets: above the
#: file, below the environment
_CREDENTIALS = {
    "jwt_secret": ("auth", "jwt_secret"),
    "admin_api_key": ("admin", "api_key"),
    "hooks_secret": ("hooks", "secret"),
}
_ENV_NAMES = {
    f"{_ENV_PREFIX}{section}_{field.name}".upper(): (section, field)
    for section, cls in _SECTIONS.items()
    for field in attrs.fields(cls)
}
_BOOLS = dict.fromkeys(("true", "1", "yes", "on"), True) | dict.fromkeys(
    ("false", "0", "no", "off"), False
)


def load_config(
    path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, object]] | None = None,
) -> Config:
    """Build the configuration from, in rising precedence, a file, the environment and flags.

    Args:
        path: a TOML file with one table per section; None reads no file.
        env: the environment to read ``TRIO_CHAT_<SECTION>_<KEY>`` from; None means
            :data:`os.environ`. A ``TRIO_CHAT_`` name that is no known key is an error.
        overrides: typed values by section and key, from the command line.

    Returns:
        The validated configuration; keys given nowhere keep their defaults.

    Raises:
        ConfigError: a one-line message naming the ``section.key`` at fault and its source.
    """
    layers: list[tuple[Mapping[str, object], str]] = []
    rooms: tuple[RoomOptions, ...] = ()
    if path is not None:
        toml = _read_toml(path)
        if "rooms" in toml:
            rooms = _room_options(toml.pop("rooms"), f"in {path}")
        layers.append((toml, f"in {path}"))
    environ = os.environ if env is None else env
    layers.extend(_credential_layers(environ))
    layers.extend(_env_layers(environ))
    if overrides:
        layers.append((overrides, "from the command line"))

    data: dict[str, dict[str, object]] = {}
    # where each section and key was last set, to name it in an error
    sources: dict[str, str] = {}
    for layer, source in layers:
        for section, table in layer.items():
            if not isinstance(table, Mapping):
                raise _error(section, f"expected a table, got {table!r}", source)
            data.setdefault(section, {}).update(table)
            sources[section] = source
            sources.update((f"{section}.{key}", source) for key in table)
    try:
        config = _converter.structure(data, Config)
    except ClassValidationError as exc:
        key, message = next(_problems(exc))
        raise _error(key, message, sources.get(key) or sources[key.partition(".")[0]]) from None
    if config.hooks.url is not None and not config.hooks.secret:
        source = sources.get("hooks.url", "in the configuration")
        raise _error("hooks.secret", "required with hooks.url", source)
    for section in ("server", "admin"):
        cert, key = getattr(config, section).tls_cert, getattr(config, section).tls_key
        if (cert is None) != (key is None):
            given, missing = ("tls_cert", "tls_key") if key is None else ("tls_key", "tls_cert")
            source = sources.get(f"{section}.{given}", "in the configuration")
            raise _error(f"{section}.{missing}", f"required with {section}.{given}", source)
        if cert is not None and key is not None:
            try:
                tls_context(cert, key)
            except ConfigError as exc:
                source = sources.get(f"{section}.tls_cert", "in the configuration")
                raise _error(f"{section}.tls_cert", str(exc), source) from None
    if config.auth.jwks_url is not None and config.auth.jwt_public_key_file is not None:
        source = sources.get("auth.jwks_url", "in the configuration")
        raise _error("auth.jwks_url", "set auth.jwt_public_key_file or this, not both", source)
    return attrs.evolve(config, rooms=rooms) if rooms else config


def _room_options(tables: object, source: str) -> tuple[RoomOptions, ...]:
    """The ``[[rooms]]`` tables; an error names the table by its place: ``rooms[2].signals``."""
    if not isinstance(tables, list):
        raise _error("rooms", "expected [[rooms]] tables (an array of tables)", source)
    options = []
    for number, table in enumerate(tables, 1):
        key = f"rooms[{number}]"
        if not isinstance(table, Mapping):
            raise _error(key, f"expected a table, got {table!r}", source)
        if "match" not in table:
            raise _error(f"{key}.match", "required: the fnmatch pattern of the room ids", source)
        try:
            options.append(_converter.structure(table, RoomOptions))
        except ClassValidationError as exc:
            name, message = next(_problems(exc, key))
            raise _error(name, message, source) from None
    return tuple(options)


def _error(key: str, message: str, source: str) -> ConfigError:
    return ConfigError(f"config error: {key}: {message} ({source})")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"config error: cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config error: {path}: invalid TOML: {exc}") from exc


def _credential_layers(env: Mapping[str, str]) -> Iterator[tuple[Mapping[str, object], str]]:
    """Secrets a systemd unit passed with ``LoadCredential=`` (``$CREDENTIALS_DIRECTORY``)."""
    for name, (section, key) in _CREDENTIALS.items():
        try:
            value = credential(name, env)
        except OSError as exc:
            source = f"from credential {name}"
            raise _error(f"{section}.{key}", f"cannot read: {exc.strerror}", source) from None
        if value is not None:
            yield {section: {key: value}}, f"from credential {name}"


def _env_layers(env: Mapping[str, str]) -> Iterator[tuple[Mapping[str, object], str]]:
    """The ``TRIO_CHAT_<SECTION>_<KEY>`` variables, as layers.

    A name that starts with a section but names no key of it is a typo of a real key, and an
    error; one whose first word is no section (``TRIO_CHAT_BIN`` of a wrapper script) is not
    ours at all: it gets one warning line and is ignored.
    """
    for name, raw in env.items():
        if not name.startswith(_ENV_PREFIX):
            continue
        source = f"from {name}"
        if name not in _ENV_NAMES:
            rest = name.removeprefix(_ENV_PREFIX).lower()
            section = next((s for s in _SECTIONS if rest.startswith(f"{s}_")), None)
            if section is None:
                logger.warning(
                    "ignoring %s: %r is no configuration section (%s)",
                    name,
                    rest.partition("_")[0],
                    ", ".join(_SECTIONS),
                )
                continue
            key = rest.removeprefix(f"{section}_")
            raise _error(f"{section}.{key}", _unknown_key(key, _SECTIONS[section]), source)
        section, field = _ENV_NAMES[name]
        try:
            value = _parse_env(raw, _type_of(field))
        except ValueError as exc:
            raise _error(f"{section}.{field.name}", str(exc), source) from None
        yield {section: {field.name: value}}, source


def _unknown_key(key: str, section: type[Any]) -> str:
    """``unknown key``, with the closest real key of the section when one is close."""
    names = [field.name for field in attrs.fields(section)]
    close = difflib.get_close_matches(key, names, n=1)
    return f"unknown key (did you mean {close[0]}?)" if close else "unknown key"


def _parse_env(raw: str, type_: object) -> object:
    """Turn an environment string into the value a TOML file would hold for this type."""
    if type_ is bool:
        if (flag := _BOOLS.get(raw.strip().lower())) is None:
            raise ValueError(f"expected true/false, yes/no, on/off or 1/0, got {raw!r}")
        return flag
    if type_ is int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"expected an integer, got {raw!r}") from None
    if type_ is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"expected a number, got {raw!r}") from None
    if type_ == tuple[str, ...]:
        if raw.lstrip().startswith("["):
            try:
                return json.loads(raw)
            except ValueError as exc:
                raise ValueError(f"expected a JSON array: {exc}") from None
        return [item.strip() for item in raw.split(",") if item.strip()]
    return raw  # str and str | None


# Strict hooks: cattrs' defaults would call int()/bool()/str() on anything, turning 1.5 into 1
# and "no" into True.
def _int(value: object, _: object) -> int:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise TypeError(f"expected an integer, got {value!r}")


def _float(value: object, _: object) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"expected a number, got {value!r}")


def _bool(value: object, _: object) -> bool:
    if isinstance(value, bool):
        return value
    raise TypeError(f"expected true or false, got {value!r}")


def _str(value: object, _: object) -> str:
    if isinstance(value, str):
        return value
    raise TypeError(f"expected a string, got {value!r}")


def _strings(value: object, _: object) -> tuple[str, ...]:
    if isinstance(value, list | tuple):
        return tuple(_str(item, str) for item in value)
    raise TypeError(f"expected a list of strings, got {value!r}")


def _checked(field: attrs.Attribute[Any]) -> Callable[[object, object], object]:
    """Structure one field and run its validator, so that cattrs reports a failure under the
    field's key; raised from the constructor it would only name the section."""

    def structure(value: object, _: object) -> object:
        value = _converter.structure(value, _type_of(field))
        if field.validator is not None:
            field.validator(None, field, value)
        return value

    return structure


def _problems(exc: BaseException, key: str = "") -> Iterator[tuple[str, str]]:
    """Flatten a cattrs error tree into (``section.key``, message) pairs.

    Unlike :func:`cattrs.transform_error`, this keeps the names of unknown keys apart from
    the message, so that they can be reported as ``section.key``.
    """
    if isinstance(exc, ClassValidationError):
        with_notes, without = exc.group_exceptions()
        for inner, note in with_notes:
            yield from _problems(inner, f"{key}.{note.name}".lstrip("."))
        for inner in without:
            yield from _problems(inner, key)
    elif isinstance(exc, ForbiddenExtraKeysError):
        for name in sorted(exc.extra_fields):
            message = _unknown_key(name, exc.cl) if key else "unknown section"
            yield f"{key}.{name}".lstrip("."), message
    else:
        yield key, str(exc)


_converter = cattrs.Converter(forbid_extra_keys=True)
for _type, _hook in ((int, _int), (float, _float), (bool, _bool), (str, _str)):
    _converter.register_structure_hook(_type, _hook)
_converter.register_structure_hook_func(lambda t: t == tuple[str, ...], _strings)
for _cls in (*_SECTIONS.values(), RoomOptions):
    _overrides: dict[str, Any] = {
        f.name: override(struct_hook=_checked(f)) for f in attrs.fields(_cls)
    }
    _converter.register_structure_hook(_cls, make_dict_structure_fn(_cls, _converter, **_overrides))
