"""The hooks over HTTP, for ``trio-chat serve`` (SPEC §14): each hook a signed ``POST``.

``POST <hooks.url>/<hook>`` with the event as a JSON body and ``X-Trio-Chat-Timestamp`` and
``X-Trio-Chat-Signature: sha256=<HMAC-SHA256 of "<timestamp>.<body>">``, so the application
can tell trio-chat from anyone else who reaches it and refuse a replayed request. httpx (on
Trio through anyio) keeps the connections alive and pooled: at most ``hooks.max_concurrency``
in flight, more wait within ``hooks.timeout``. The answer is read up to a bound, so a
misbehaving application cannot make an instance buffer megabytes.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from functools import partial
from typing import TYPE_CHECKING

import attrs
import httpx

from .._messages import dumps, loads
from .caller import HookFailed
from .events import KEEP, Allow, Answer, Deny

if TYPE_CHECKING:
    from .._config import HooksConfig
    from .caller import Hook
    from .events import Event

#: bytes of an answer beyond what its ``data`` may take (the rest of the JSON, ``info``...)
_ANSWER_SLACK = 8192


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-Trio-Chat-Signature`` value of a request (the application computes the same)."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


class HttpHooks:
    """A pooled HTTP client for the application's hooks; :meth:`aclose` it when done.

    Args:
        config: the ``[hooks]`` section (``url`` and ``secret`` set).
        instance_id: sent as ``X-Trio-Chat-Instance``.
        max_message_bytes: the largest message; an answer may carry one, JSON-escaped.
    """

    def __init__(self, config: HooksConfig, instance_id: str, max_message_bytes: int) -> None:
        assert config.url is not None
        assert config.secret is not None
        self._url = config.url.rstrip("/")
        self._secret = config.secret
        self._calls = config.calls
        self._instance = instance_id
        self._max_answer = 2 * max_message_bytes + _ANSWER_SLACK
        self._client = httpx.AsyncClient(
            timeout=config.timeout,
            limits=httpx.Limits(
                max_connections=config.max_concurrency,
                max_keepalive_connections=config.max_concurrency,
            ),
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        """Close the pooled connections."""
        await self._client.aclose()

    def hooks(self) -> dict[str, Hook]:
        """The callables of the hooks listed in ``hooks.calls``."""
        return {name: partial(self.call, name) for name in self._calls}

    async def call(self, name: str, event: Event) -> Answer | None:
        """POST ``event`` to the application's ``name`` hook and read its answer.

        Returns:
            The answer; None for ``disconnect``, whose answer is not read.

        Raises:
            HookFailed: unreachable, not 200, too large, or not a valid answer.
        """
        body = dumps(attrs.asdict(event)).encode()
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "X-Trio-Chat-Instance": self._instance,
            "X-Trio-Chat-Timestamp": timestamp,
            "X-Trio-Chat-Signature": signature(self._secret, timestamp, body),
        }
        raw = bytearray()
        try:
            async with self._client.stream(
                "POST", f"{self._url}/{name}", content=body, headers=headers
            ) as response:
                if response.status_code != 200:
                    raise HookFailed(f"POST /{name}: HTTP {response.status_code}")
                if name == "disconnect":
                    return None
                async for chunk in response.aiter_bytes():
                    raw += chunk
                    if len(raw) > self._max_answer:
                        raise HookFailed(f"POST /{name}: answer over {self._max_answer} bytes")
        except httpx.HTTPError as exc:
            raise HookFailed(f"POST /{name}: {type(exc).__name__}: {exc}") from exc
        return parse_answer(bytes(raw))


def parse_answer(raw: bytes) -> Answer:
    """``{"allow": true, ...}`` or ``{"allow": false, "reason": ...}``, as an answer.

    Raises:
        HookFailed: not a JSON object with a boolean ``allow`` and fields of the right types.
    """
    try:
        body = loads(raw)
    except (ValueError, RecursionError) as exc:
        raise HookFailed(f"answer is not JSON: {exc}") from None
    if not isinstance(body, dict) or not isinstance(body.get("allow"), bool):
        raise HookFailed('answer is not a JSON object with a boolean "allow"')
    if not body["allow"]:
        reason = body.get("reason", "denied by the application")
        if not isinstance(reason, str):
            raise HookFailed('"reason" is not a string')
        return Deny(reason)
    rooms = body.get("rooms", [])
    if not isinstance(rooms, list):
        raise HookFailed('"rooms" is not a list')
    info = body.get("info")
    if info is not None and not isinstance(info, dict):
        raise HookFailed('"info" is not an object')
    return Allow(
        info=info,
        rooms=tuple(rooms),
        publish=body.get("publish", True),
        data=body["data"] if "data" in body else KEEP,
    )
