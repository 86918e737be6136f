"""An identity provider's signing keys, from its JWKS URL (``auth.jwks_url``, SPEC §2).

Keycloak, Auth0, Cognito and the like publish the public keys their tokens are signed with as a
JSON Web Key Set and rotate them. :class:`Jwks` fetches the set with httpx, keeps the keys by
``kid``, fetches again every ``auth.jwks_refresh`` seconds, and sooner when a token names a
``kid`` it does not know (at most once per ``auth.jwks_min_refetch``: a stream of tokens with
made-up ``kid`` values cannot make it hammer the provider). A fetch that fails, or gives a set
with no key we can use, keeps the keys it has.

What is never used: ``oct`` (symmetric) keys, whose secret a public URL would give away;
keys marked ``use: enc``; algorithms outside ``auth.jwt_algorithms``; two keys with the same
``kid`` (which one signed?); anything PyJWT cannot read as a key. A key without ``alg`` serves
the allowed algorithms of its type (RSA: RS*/PS*; EC: the ES* of its curve; OKP: EdDSA).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

import httpx
import jwt
import trio

from ._errors import AuthError

if TYPE_CHECKING:
    from collections.abc import Collection

logger = logging.getLogger(__name__)

#: the most a key set may weigh; a provider's is a few KiB
MAX_BYTES = 1 << 20
#: keys read from one set at most
MAX_KEYS = 100
#: seconds a fetch may take
FETCH_TIMEOUT = 5.0
#: seconds a handshake with an unknown ``kid`` waits for the fetch it asked for
WAIT_FOR_KEYS = 2.0

_BY_TYPE = {
    "RSA": ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"),
    "OKP": ("EdDSA",),
}
_BY_CURVE = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}


class JwksError(Exception):
    """A key set that cannot be used (its words say why)."""


#: a usable key: the algorithms it may verify, each with PyJWT's key object
Key = dict[str, Any]


def parse_key_set(document: bytes, algorithms: Collection[str]) -> tuple[dict[str, Key], list[Key]]:
    """The usable keys of a JWKS document: by ``kid``, and those without one.

    Raises:
        JwksError: the document is not a key set, or holds no key we can use.
    """
    try:
        data = json.loads(document)
    except (ValueError, RecursionError) as exc:
        raise JwksError(f"not JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise JwksError('not a key set: no "keys" list')
    entries = [e for e in data["keys"][:MAX_KEYS] if isinstance(e, dict)]
    kids = Counter(e["kid"] for e in entries if isinstance(e.get("kid"), str))
    by_kid: dict[str, Key] = {}
    unnamed: list[Key] = []
    for entry in entries:
        kid = entry.get("kid")
        if kid is not None and (not isinstance(kid, str) or kids[kid] > 1):
            continue  # not a name, or a name two keys claim
        if (key := _usable(entry, algorithms)) is None:
            continue
        if kid is None:
            unnamed.append(key)
        else:
            by_kid[kid] = key
    if not by_kid and not unnamed:
        raise JwksError("no usable key (only oct, enc or other algorithms, or malformed)")
    return by_kid, unnamed


def _usable(entry: dict[str, Any], algorithms: Collection[str]) -> Key | None:
    kty = entry.get("kty")
    if kty not in ("RSA", "EC", "OKP") or entry.get("use", "sig") != "sig":
        return None  # "oct" (a shared secret) above all
    named = entry.get("alg")
    if named is not None:
        candidates: tuple[str, ...] = (named,) if isinstance(named, str) else ()
    elif kty == "EC":
        curve = _BY_CURVE.get(entry.get("crv", ""))
        candidates = (curve,) if curve else ()
    else:
        candidates = _BY_TYPE[kty]
    allowed = [alg for alg in candidates if alg in algorithms and not alg.startswith("HS")]
    if not allowed:
        return None
    try:
        key = jwt.PyJWK(entry, allowed[0]).key
    except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
        return None
    return dict.fromkeys(allowed, key)


class Jwks:
    """The key set of ``url``, kept fresh by :meth:`run` (a task of the server's)."""

    def __init__(
        self, url: str, algorithms: Collection[str], *, refresh: float, min_refetch: float
    ) -> None:
        self.url = url
        self._algorithms = frozenset(algorithms)
        self._refresh = refresh
        self._min_refetch = min_refetch
        self._by_kid: dict[str, Key] = {}
        self._unnamed: list[Key] = []
        #: a set has been fetched: until then handshakes and ``/readyz`` answer 503
        self.ready = False
        self._fetched_at = -float("inf")
        self._wanted = trio.Event()  # set: a handshake asks for a fetch now
        self._fetched = trio.Event()  # set after each fetch, then replaced

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Fetch now, then every ``refresh`` seconds or when asked; until cancelled.

        Until a first fetch succeeds it tries again every ``min_refetch`` seconds (1 at least).
        """
        async with httpx.AsyncClient(timeout=FETCH_TIMEOUT, follow_redirects=False) as client:
            task_status.started()
            while True:
                await self._fetch(client)
                self._fetched_at = trio.current_time()
                self._fetched.set()
                self._fetched, self._wanted = trio.Event(), trio.Event()
                wait = self._refresh if self.ready else max(self._min_refetch, 1.0)
                with trio.move_on_after(wait):
                    await self._wanted.wait()
                    # asked for: not sooner than min_refetch after the last fetch
                    await trio.sleep_until(self._fetched_at + self._min_refetch)

    async def _fetch(self, client: httpx.AsyncClient) -> None:
        try:
            async with client.stream("GET", self.url, headers={"accept": "application/json"}) as r:
                if r.status_code != 200:
                    raise JwksError(f"HTTP {r.status_code}")
                length = r.headers.get("content-length", "")
                if length.isdigit() and int(length) > MAX_BYTES:  # (not even read)
                    raise JwksError(f"over {MAX_BYTES} bytes")
                body = bytearray()
                async for chunk in r.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_BYTES:
                        raise JwksError(f"over {MAX_BYTES} bytes")
            self._by_kid, self._unnamed = parse_key_set(bytes(body), self._algorithms)
        except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError, JwksError) as exc:
            logger.warning(
                "jwks: %s: %s; %s",
                self.url,
                exc or type(exc).__name__,
                "keeping the last keys" if self.ready else "no keys yet",
            )
            return
        self.ready = True
        logger.info(
            "jwks: %s: %d key(s) (%s)",
            self.url,
            len(self._by_kid) + len(self._unnamed),
            ", ".join(sorted(self._by_kid)) or "none named",
        )

    async def key(self, kid: object, alg: str) -> Any:
        """The key that verifies a token signed with ``alg`` whose header names ``kid``.

        A ``kid`` not in the set asks for a fetch (at most one per ``min_refetch``) and waits
        for it up to :data:`WAIT_FOR_KEYS` seconds. Without a ``kid``, the one usable key for
        ``alg`` verifies it, when there is exactly one.

        Raises:
            AuthError: 503 ``unavailable`` before the first set arrived; 401
                ``invalid_token`` when no key fits.
        """
        if not self.ready:
            raise AuthError(503, "unavailable", "the identity provider's keys are not loaded yet")
        if kid is not None and not isinstance(kid, str):
            raise AuthError(401, "invalid_token", "'kid' must be a string")
        found = self._lookup(kid, alg)
        if found is None and isinstance(kid, str) and kid not in self._by_kid:
            fetched = self._fetched
            self._wanted.set()
            with trio.move_on_after(WAIT_FOR_KEYS):
                await fetched.wait()
            found = self._lookup(kid, alg)
        if found is None:
            raise AuthError(401, "invalid_token", "no key of the identity provider fits")
        return found

    def _lookup(self, kid: str | None, alg: str) -> Any:
        if kid is not None:
            return self._by_kid.get(kid, {}).get(alg)
        fitting = [key[alg] for key in (*self._by_kid.values(), *self._unnamed) if alg in key]
        return fitting[0] if len(fitting) == 1 else None
