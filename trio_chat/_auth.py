"""Handshake authentication (SPEC §5): finding the credential, verifying the JWT, and judging
a user's ``auth:<uid>`` record. Pure functions and one small verifier class; no I/O.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import attrs
import jwt

from ._errors import AuthError, ChatError, ConfigError
from ._messages import is_user_id

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from ._config import AuthConfig
    from ._jwks import Jwks

logger = logging.getLogger(__name__)

SUBPROTOCOL = "trio-chat.v1"
_BEARER_SUBPROTOCOL = "bearer."
_HMAC = frozenset({"HS256", "HS384", "HS512"})


@attrs.frozen
class Identity:
    """Who a verified credential belongs to, and what its token allows."""

    user_id: str
    issued_at: int
    #: unix seconds; None for an opaque session whose key has no TTL
    expires_at: int | None
    #: fnmatch patterns of the rooms the user may join; None means any room
    rooms: tuple[str, ...] | None = None
    #: fnmatch patterns of the rooms the user may ``send`` and ``signal`` to (SPEC §15, the
    #: ``publish`` claim); None means every joined room
    publish: tuple[str, ...] | None = None

    def may_join(self, room: str) -> bool:
        return self.rooms is None or any(fnmatch.fnmatchcase(room, p) for p in self.rooms)

    def may_publish(self, room: str) -> bool:
        return self.publish is None or any(fnmatch.fnmatchcase(room, p) for p in self.publish)


@attrs.frozen
class HandshakeInfo:
    """The parts of an upgrade request authentication looks at."""

    path: str
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]
    subprotocols: tuple[str, ...]

    @classmethod
    def from_request(
        cls, target: str, headers: Iterable[tuple[bytes, bytes]], subprotocols: Iterable[str]
    ) -> HandshakeInfo:
        """Raises AuthError (400) for a request target that is not a URL path."""
        try:
            split = urlsplit(target)
        except ValueError as exc:
            raise AuthError(400, "bad_request", "malformed request target") from exc
        merged: dict[str, str] = {}
        for name, value in headers:
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            # repeated headers are joined as HTTP allows; cookies with "; " as browsers do
            sep = "; " if key == "cookie" else ", "
            merged[key] = f"{merged[key]}{sep}{text}" if key in merged else text
        return cls(split.path, parse_qs(split.query), merged, tuple(subprotocols))


_OPAQUE_ID = re.compile(r"[A-Za-z0-9_\-]{8,256}")


def opaque_session_id(credential: str, config: AuthConfig) -> str | None:
    """The credential as an opaque session id, when ``auth.session_key`` is set and it is not
    shaped like a JWT (three dot-separated parts)."""
    if config.session_key is None or credential.count(".") == 2:
        return None
    if not _OPAQUE_ID.fullmatch(credential):
        raise AuthError(401, "invalid_session", "malformed session id")
    return credential


def find_token(info: HandshakeInfo, config: AuthConfig) -> str | None:
    """Return the credential, first found wins: header, subprotocol, query, cookie."""
    scheme, _, value = info.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    for proto in info.subprotocols:
        if proto.startswith(_BEARER_SUBPROTOCOL) and len(proto) > len(_BEARER_SUBPROTOCOL):
            return proto[len(_BEARER_SUBPROTOCOL) :]
    if config.allow_query_token and (values := info.query.get("token")):
        return values[0]
    # Split by hand: SimpleCookie stops at the first cookie it dislikes, so another site's
    # odd cookie would hide ours.
    for pair in info.headers.get("cookie", "").split(";"):
        name, _, value = pair.strip().partition("=")
        if name == config.cookie_name and value:
            return value.strip('"')
    return None


def origin_allowed(info: HandshakeInfo, config: AuthConfig) -> bool:
    """Browsers always send ``Origin``; clients that send none are not browsers, and an
    origin check only guards against cross-site pages, so they pass."""
    origin = info.headers.get("origin")
    return not config.allowed_origins or origin is None or origin in config.allowed_origins


class TokenVerifier:
    """Verifies JWTs with the configured algorithms and keys only (never ``none``).

    The keys are ``auth.jwt_secret`` (HS*), and for RS*/PS*/ES*/EdDSA the PEM file
    ``auth.jwt_public_key_file`` or the identity provider's key set ``jwks`` (from
    ``auth.jwks_url``, :mod:`._jwks`), where the token's ``kid`` picks the key.

    Raises:
        ConfigError: at construction, when an allowed algorithm has no key configured.
    """

    def __init__(self, config: AuthConfig, jwks: Jwks | None = None) -> None:
        self._config = config
        self._jwks = jwks
        self._keys: dict[str, Any] = {}  # the static keys, by algorithm
        public_key: str | None = None
        if config.jwt_public_key_file is not None:
            try:
                public_key = Path(config.jwt_public_key_file).read_text()
            except OSError as exc:
                raise ConfigError(f"auth.jwt_public_key_file: cannot read: {exc}") from exc
        for alg in config.jwt_algorithms:
            if alg not in _HMAC and jwks is not None:
                continue  # the key set's
            key = config.jwt_secret if alg in _HMAC else public_key
            if not key:
                which = "auth.jwt_secret" if alg in _HMAC else "auth.jwt_public_key_file"
                raise ConfigError(f"{which}: required to verify {alg} tokens")
            self._keys[alg] = key

    async def verify(self, token: str) -> Identity:
        """Return the token's identity, or raise :class:`AuthError` (401)."""
        return (await self.verify_claims(token))[0]

    async def verify_claims(self, token: str) -> tuple[Identity, dict[str, Any]]:
        """Return the token's identity and its verified claims, or raise :class:`AuthError`.

        Only the header's ``alg`` (and, with a key set, its ``kid``) is read before the
        signature is checked, and only to pick one of the configured keys: ``jku``, ``x5u``
        and ``jwk`` never choose a key, and a ``crit`` header (extensions we would have to
        understand) refuses the token. With a key set, an unknown ``kid`` may wait up to 2 s
        for the set to be fetched again; before the first set, the answer is 503.
        """
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise AuthError(401, "invalid_token", f"invalid token: {exc}") from exc
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._config.jwt_algorithms:
            raise AuthError(401, "invalid_token", "token algorithm not accepted")
        if "crit" in header:  # RFC 7515 §4.1.11: we understand no extension
            raise AuthError(401, "invalid_token", "critical header extensions not supported")
        if alg in self._keys:
            key = self._keys[alg]
        else:
            assert self._jwks is not None  # (every other algorithm has a static key)
            key = await self._jwks.key(header.get("kid"), alg)
        return self._decode(token, alg, key)

    def _decode(self, token: str, alg: str, key: Any) -> tuple[Identity, dict[str, Any]]:
        config = self._config
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                issuer=config.issuer,
                audience=config.audience,
                leeway=config.leeway,
                options={
                    "require": ["exp", "iat", "sub"],
                    "verify_aud": config.audience is not None,
                    # checked by _identity once 'exp' is known to be a number: PyJWT reads
                    # "exp": true as 1, and would call a malformed token an expired one
                    "verify_exp": False,
                },
            )
        except jwt.InvalidTokenError as exc:
            raise AuthError(401, "invalid_token", f"invalid token: {exc}") from exc
        except (OverflowError, ValueError, TypeError) as exc:
            # PyJWT's own int() of a claim such as "iat": 1e400 (json reads it as infinity)
            raise AuthError(
                401, "invalid_token", "invalid token: a time claim is no number"
            ) from exc
        return _identity(claims, config.leeway), claims


def _identity(claims: dict[str, Any], leeway: float) -> Identity:
    sub, iat, exp = claims["sub"], claims["iat"], claims["exp"]
    if not is_user_id(sub):
        raise AuthError(
            401, "invalid_token", "'sub' must be 1-256 bytes of UTF-8 without control characters"
        )
    if not all(_finite_number(claims[name]) for name in ("iat", "exp")):
        raise AuthError(401, "invalid_token", "'iat' and 'exp' must be numbers")
    if exp <= time.time() - leeway:
        raise AuthError(401, "token_expired", "token has expired")
    rooms, publish = _patterns(claims, "rooms"), _patterns(claims, "publish")
    return Identity(sub, int(iat), int(exp), rooms, publish)


def _patterns(claims: dict[str, Any], name: str) -> tuple[str, ...] | None:
    """A claim that lists fnmatch patterns of room ids (``rooms``, ``publish``), when present."""
    patterns = claims.get(name)
    if patterns is None:
        return None
    if not (isinstance(patterns, list) and all(isinstance(p, str) for p in patterns)):
        raise AuthError(401, "invalid_token", f"'{name}' must be a list of patterns")
    return tuple(patterns)


def _finite_number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too big for a double: "exp": 1000...0, 400 digits
        return False


class NoSigningKey(ChatError):
    """Tokens cannot be minted: no HMAC secret, or no HS* algorithm, is configured."""


def mint_token(
    config: AuthConfig,
    user: str,
    *,
    ttl: float,
    rooms: Iterable[str] | None = None,
    publish: Iterable[str] | None = None,
) -> str:
    """A JWT for ``user`` that this server accepts, signed with ``auth.jwt_secret`` and the
    first HS* algorithm allowed (for development, tests and the demo page; production
    tokens come from your auth service). Carries ``iss``/``aud`` when they are configured.

    Raises:
        NoSigningKey: nothing to sign with.
    """
    if config.jwt_secret is None:
        raise NoSigningKey("auth.jwt_secret: not set (TRIO_CHAT_AUTH_JWT_SECRET)")
    algorithm = next((a for a in config.jwt_algorithms if a in _HMAC), None)
    if algorithm is None:
        raise NoSigningKey("auth.jwt_algorithms: no HS* algorithm to sign with")
    now = int(time.time())
    claims: dict[str, object] = {"sub": user, "iat": now, "exp": now + int(ttl)}
    if config.issuer is not None:
        claims["iss"] = config.issuer
    if config.audience is not None:
        claims["aud"] = config.audience
    if rooms:
        claims["rooms"] = list(rooms)
    if publish is not None:
        claims["publish"] = list(publish)
    return jwt.encode(claims, config.jwt_secret, algorithm=algorithm)


@attrs.frozen
class AuthRecord:
    """``auth:<uid>`` as the rest of the code reads it (SPEC §3)."""

    status: str = "active"
    not_before: float = 0.0
    muted_until: float = 0.0
    roles: tuple[str, ...] = ()

    @classmethod
    def from_hash(cls, fields: Mapping[str, str]) -> AuthRecord:
        return cls(
            status=fields.get("status", "active"),
            not_before=_seconds(fields, "not_before"),
            muted_until=_seconds(fields, "muted_until"),
            roles=tuple(r for r in fields.get("roles", "").split(",") if r),
        )


#: 9999-12-31T23:59:59Z, the latest time an auth record field stands for
_FOREVER = 253402300799.0


def _seconds(fields: Mapping[str, str], name: str) -> float:
    raw = fields.get(name)
    if not raw:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if math.isnan(value):
        # Another service wrote garbage: ignoring one field beats locking everyone out.
        logger.warning("auth record field %s=%r is not a number; ignored", name, raw)
        return 0.0
    # "inf" means for ever, and must stay a number the rest of the code can print as a time
    return max(-_FOREVER, min(value, _FOREVER))


#: why a record refuses an identity -> (handshake status, error code, close code, logout reason)
REFUSALS: dict[str, tuple[int, str, int, str]] = {
    "banned": (403, "banned", 4403, "banned"),
    "revoked": (401, "token_revoked", 4401, "revoked"),
    "no_record": (401, "not_logged_in", 4000, "logout"),
}


def judge(record: AuthRecord | None, identity: Identity, *, require_record: bool) -> str | None:
    """Return why ``record`` refuses ``identity`` (a key of :data:`REFUSALS`), or None."""
    if record is None:
        return "no_record" if require_record else None
    if record.status == "banned":
        return "banned"
    if identity.issued_at < record.not_before:
        return "revoked"
    return None
