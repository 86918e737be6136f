"""The hooks' contract (SPEC §14): the events the application is asked about, its answers.

An application that embeds trio-chat passes ``serve(config, hooks=obj)``, where ``obj`` has
any of the async methods ``connect``, ``join``, ``send``, ``direct`` (each takes its event and
returns :class:`Allow` or :class:`Deny`) and ``disconnect`` (a notification: its answer is
ignored). Over HTTP the same events are the JSON bodies and the same answers come back as JSON.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Final

import attrs

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .._messages import JSONValue

#: the hooks, in the order a session meets them
HOOKS: Final = ("connect", "join", "send", "direct", "disconnect")


class _Keep(enum.Enum):
    KEEP = "keep"

    def __repr__(self) -> str:
        return "KEEP"


#: ``Allow(data=KEEP)``: the message goes out as the client sent it (``data=None`` sends null)
KEEP: Final = _Keep.KEEP


@attrs.frozen(kw_only=True)
class ConnectEvent:
    """A verified client is about to be registered: ``claims`` are the JWT's (never the token),
    None for an opaque session id."""

    user: str
    session: str
    claims: Mapping[str, JSONValue] | None
    remote: str
    instance: str


@attrs.frozen(kw_only=True)
class JoinEvent:
    """A session asks to join a room it is not in; ``info`` is what ``connect`` gave it."""

    user: str
    session: str
    room: str
    info: Mapping[str, JSONValue] | None


@attrs.frozen(kw_only=True)
class SendEvent:
    """A session sends ``data`` to a room it is in (rate limit, mute and membership passed)."""

    user: str
    session: str
    room: str
    data: JSONValue


@attrs.frozen(kw_only=True)
class DirectEvent:
    """A session sends ``data`` to every session of user ``to``."""

    user: str
    session: str
    to: str
    data: JSONValue


@attrs.frozen(kw_only=True)
class DisconnectEvent:
    """A session's records are gone; ``reason`` is one of SPEC §14's (``closed``, ``logout``,
    ``kicked``, ``banned``, ``expired``, ``revoked``, ``timeout``, ``slow``, ``policy``,
    ``shutdown``, ``error``), ``rooms`` those it was in."""

    user: str
    session: str
    reason: str
    rooms: tuple[str, ...]


Event = ConnectEvent | JoinEvent | SendEvent | DirectEvent | DisconnectEvent


@attrs.frozen(kw_only=True)
class Allow:
    """Let it happen, possibly changed.

    Args:
        info: ``connect`` only: a JSON object of at most 1 KiB, public facts about the session
            (a display name...), sent back in ``welcome.info``.
        rooms: ``connect`` only: rooms the session joins at once (the usual rules apply; the
            ``join`` hook is not asked).
        publish: ``join`` only: False makes the membership read-only.
        data: ``send`` and ``direct``: the payload to send instead of the client's.
    """

    info: Mapping[str, JSONValue] | None = None
    rooms: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    publish: bool = True
    data: JSONValue = KEEP


@attrs.frozen
class Deny:
    """Refuse it: the client gets ``forbidden`` with ``reason`` (403 at connect)."""

    reason: str = "denied by the application"


Answer = Allow | Deny
