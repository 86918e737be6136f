"""The wire protocol (SPEC §6): client frames parsed into typed messages, server frames encoded.

No I/O here. Parsing raises :class:`ProtocolError` with the ``error`` code the client receives.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
from typing import Any, TypeAlias

import attrs

from ._errors import ProtocolError

JSONValue: TypeAlias = Any
"""Any value ``json.loads`` can return; ``data`` of a message is passed through untouched."""

ROOM_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
#: the longest user id, in bytes of UTF-8 (SPEC §6)
MAX_USER_ID_BYTES = 256
# C0, DEL and C1: the control characters (Unicode category Cc)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")

BAD_REQUEST = "bad_request"
UNKNOWN_TYPE = "unknown_type"
NOT_IN_ROOM = "not_in_room"
FORBIDDEN = "forbidden"
MUTED = "muted"
RATE_LIMITED = "rate_limited"
TOO_LARGE = "too_large"
ROOM_FULL = "room_full"
UNAVAILABLE = "unavailable"
INTERNAL = "internal"


@attrs.frozen
class Join:
    room: str
    ref: JSONValue = None
    #: the last message id the client saw in the room: replay what followed (SPEC §11)
    since: str | None = None


@attrs.frozen
class Leave:
    room: str
    ref: JSONValue = None


@attrs.frozen
class Send:
    room: str
    data: JSONValue
    ref: JSONValue = None


@attrs.frozen
class Direct:
    to: str
    data: JSONValue
    ref: JSONValue = None


@attrs.frozen
class Refresh:
    token: str = attrs.field(repr=False)  # never in a log line
    ref: JSONValue = None


@attrs.frozen
class Ping:
    ref: JSONValue = None


@attrs.frozen
class History:
    room: str
    #: a message id: only older messages
    before: str | None = None
    limit: int = 50  # DEFAULT_HISTORY_PAGE
    ref: JSONValue = None


@attrs.frozen
class Presence:
    room: str
    ref: JSONValue = None


@attrs.frozen
class Signal:
    room: str
    data: JSONValue
    ref: JSONValue = None


@attrs.frozen
class Read:
    room: str
    #: the id of the last message of the room the user has read
    id: str
    ref: JSONValue = None


@attrs.frozen
class Receipts:
    room: str
    ref: JSONValue = None


ClientMessage: TypeAlias = (
    Join | Leave | Send | Direct | Refresh | Ping | History | Presence | Signal | Read | Receipts
)
#: the longest ``history`` page, and the page without a ``limit`` (SPEC §6)
MAX_HISTORY_PAGE = 100
DEFAULT_HISTORY_PAGE = 50


def parse_client_message(raw: str | bytes) -> ClientMessage:
    """Parse one client frame.

    Raises:
        ProtocolError: ``bad_request`` for invalid JSON, a non-object or a missing/ill-typed
            field; ``unknown_type`` for a type this server does not know. ``ref`` is carried
            in the error whenever the frame had one.
    """
    try:
        frame = loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError(BAD_REQUEST, "frame is not valid JSON") from exc
    if not isinstance(frame, dict):
        raise ProtocolError(BAD_REQUEST, "frame must be a JSON object")
    try:
        # "\ud800" escapes decode to lone surrogates, which no UTF-8 frame can carry on
        _encoder.encode(frame).encode()
    except UnicodeEncodeError as exc:
        raise ProtocolError(BAD_REQUEST, "frame holds invalid unicode (a lone surrogate)") from exc
    ref = frame.get("ref")
    kind = frame.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(BAD_REQUEST, "frame needs a string 'type'", ref)
    match kind:
        case "join":
            return Join(_room(frame, ref), ref, _optional_string(frame, "since", ref))
        case "leave":
            return Leave(_room(frame, ref), ref)
        case "send":
            return Send(_room(frame, ref), _data(frame, ref), ref)
        case "direct":
            return Direct(_user_id(frame, "to", ref), _data(frame, ref), ref)
        case "refresh":
            return Refresh(_string(frame, "token", ref), ref)
        case "ping":
            return Ping(ref)
        case "history":
            before = _optional_string(frame, "before", ref)
            return History(_room(frame, ref), before, _limit(frame, ref), ref)
        case "presence":
            return Presence(_room(frame, ref), ref)
        case "signal":
            return Signal(_room(frame, ref), _data(frame, ref), ref)
        case "read":
            return Read(_room(frame, ref), _string(frame, "id", ref), ref)
        case "receipts":
            return Receipts(_room(frame, ref), ref)
    raise ProtocolError(UNKNOWN_TYPE, f"unknown frame type {kind[:64]!r}", ref)


def is_user_id(value: object) -> bool:
    """Whether ``value`` is a user id (SPEC §6): 1-256 bytes of UTF-8 without control
    characters. Ids are chosen by the token issuer; they end up in key names and log lines."""
    if not isinstance(value, str) or not value or _CONTROL.search(value):
        return False
    try:
        return len(value.encode()) <= MAX_USER_ID_BYTES
    except UnicodeEncodeError:  # a lone surrogate is no UTF-8
        return False


def _string(frame: dict[str, Any], field: str, ref: Any) -> str:
    value = frame.get(field)
    if not isinstance(value, str) or not value:
        raise ProtocolError(BAD_REQUEST, f"'{field}' must be a non-empty string", ref)
    return value


def _optional_string(frame: dict[str, Any], field: str, ref: Any) -> str | None:
    return None if frame.get(field) is None else _string(frame, field, ref)


def _limit(frame: dict[str, Any], ref: Any) -> int:
    value = frame.get("limit", DEFAULT_HISTORY_PAGE)
    if type(value) is not int or not 1 <= value <= MAX_HISTORY_PAGE:
        raise ProtocolError(BAD_REQUEST, f"'limit' must be an integer in 1-{MAX_HISTORY_PAGE}", ref)
    return value


def _user_id(frame: dict[str, Any], field: str, ref: Any) -> str:
    value = _string(frame, field, ref)
    if not is_user_id(value):
        raise ProtocolError(BAD_REQUEST, f"'{field}' is not a valid user id", ref)
    return value


def _room(frame: dict[str, Any], ref: Any) -> str:
    value = frame.get("room")
    if not isinstance(value, str) or not ROOM_ID.fullmatch(value):
        raise ProtocolError(BAD_REQUEST, "'room' must be 1-128 chars of [A-Za-z0-9_.:-]", ref)
    return value


def _data(frame: dict[str, Any], ref: Any) -> JSONValue:
    if "data" not in frame:
        raise ProtocolError(BAD_REQUEST, "'data' is required", ref)
    return frame["data"]


# --- server frames ---------------------------------------------------------------------------

_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _not_json(constant: str) -> float:
    raise ValueError(f"{constant} is not JSON")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} does not fit a double")
    return value


def loads(raw: str | bytes | bytearray) -> JSONValue:
    """Strict JSON: no NaN or Infinity, no number that overflows a double (strict parsers,
    such as browsers', would reject what we then sent on)."""
    return json.loads(raw, parse_constant=_not_json, parse_float=_finite)


def encode(kind: str, ref: JSONValue = None, **fields: JSONValue) -> str:
    """Encode one server frame; ``ref`` is echoed only when the client sent one."""
    frame: dict[str, JSONValue] = {"type": kind, **fields}
    if ref is not None:
        frame["ref"] = ref
    return _encoder.encode(frame)


def error_frame(exc: ProtocolError) -> str:
    return encode("error", exc.ref, code=exc.code, message=exc.message)


def dumps(value: JSONValue) -> str:
    """Compact JSON, used for Pub/Sub payloads and Redis fields."""
    return _encoder.encode(value)


def room_message(
    room: str, sender: str | None, session_id: str | None, data: JSONValue
) -> tuple[int, str]:
    """A new room message: its ``ts``, and its ``chat:room`` payload (SPEC §4) without the
    ``id``, which publishing gives it (:func:`trio_chat._store.history.publish`). The payload
    carries ids and data, never a token. The one place payloads are shaped.

    ``sender`` and ``session_id`` are None for a message of the admin API: no user id can
    stand for it, so no user can impersonate it."""
    ts = now_ms()
    payload = dumps({"room": room, "from": sender, "session": session_id, "data": data, "ts": ts})
    return ts, payload


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def new_message_id() -> str:
    """An opaque, unique, roughly time-ordered id: for direct messages, and for room messages
    when history is off (with history, a room message's id is its stream entry id)."""
    return f"{now_ms():x}-{secrets.token_hex(6)}"


def new_session_id() -> str:
    """128 random bits, url-safe."""
    return secrets.token_urlsafe(16)
