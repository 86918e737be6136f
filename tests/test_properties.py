"""Property tests of the pure parsers: client frames (SPEC §6), user ids, auth records, and the
handshake's credential parsers and JWT verifier (SPEC §5). No server, no Redis."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import re
import string
import time
import unicodedata
from typing import Any

import attrs
import pytest
import trio
from _chat import SECRET
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from trio_chat._auth import (
    AuthRecord,
    HandshakeInfo,
    Identity,
    TokenVerifier,
    find_token,
    opaque_session_id,
)
from trio_chat._config import Config
from trio_chat._errors import AuthError, ProtocolError
from trio_chat._messages import (
    Direct,
    Join,
    Leave,
    Ping,
    Refresh,
    Send,
    is_user_id,
    parse_client_message,
)

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- the spec, written out again independently of the code under test --------------------------

ROOM_CHARS = string.ascii_letters + string.digits + "_.:-"
#: SPEC §6's client frame types
SPEC_TYPES = ("join", "leave", "send", "direct", "refresh", "history", "ping")


def spec_room(value: object) -> bool:
    """SPEC §6: 1-128 chars of [A-Za-z0-9_.:-]."""
    return isinstance(value, str) and 1 <= len(value) <= 128 and all(c in ROOM_CHARS for c in value)


def spec_user_id(value: object) -> bool:
    """SPEC §6: 1-256 bytes of UTF-8 without control characters (Unicode category Cc)."""
    if not isinstance(value, str):
        return False
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate has no UTF-8
        return False
    return 1 <= size <= 256 and not any(unicodedata.category(c) == "Cc" for c in value)


# --- strategies --------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=10,
)
rooms = st.from_regex(r"[A-Za-z0-9_.:-]{1,128}", fullmatch=True)
near_rooms = st.text(st.sampled_from(ROOM_CHARS + " /é\x00\n#"), max_size=130)
#: user ids, mostly valid, some just over 256 bytes
user_ids = st.text(
    st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=64
) | st.text(st.sampled_from("aé€😀"), min_size=60, max_size=140)
near_user_ids = st.text(st.characters(exclude_categories=()), max_size=80) | user_ids
refs = st.none() | st.integers() | st.text(max_size=8)


def _mostly(good: st.SearchStrategy[Any], other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``good`` three times in four, else ``other``."""
    return st.integers(min_value=0, max_value=3).flatmap(lambda n: other if n == 3 else good)


_FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "room": _mostly(rooms, near_rooms | json_values),
    "data": json_values,
    "to": _mostly(user_ids, near_user_ids | json_values),
    "token": st.text(max_size=40) | json_values,
    "ref": json_values,
    "since": st.text(max_size=20) | json_values,
    "before": st.text(max_size=20) | json_values,
    "limit": st.integers(min_value=-5, max_value=150) | json_values,
}
_types = _mostly(st.sampled_from(SPEC_TYPES), st.text(max_size=8) | json_values)
frames = st.builds(
    lambda kind, known, other: {**other, **known, **kind},
    _mostly(st.fixed_dictionaries({"type": _types}), st.just({})),
    st.fixed_dictionaries({}, optional=_FIELD_VALUES),
    st.dictionaries(st.text(max_size=6), json_values, max_size=3),
)
#: text that is nearly JSON, and often nearly a frame
_FRAGMENTS = [
    "{", "}", "[", "]", ":", ",", '"', '"type"', '"join"', '"send"', '"room"', '"r"', '"data"',
    '"ref"', '"to"', "null", "true", "1", "-", "0.5e", "1e400", "NaN", "Infinity", '"\\ud800"',
    '"\\u0000"', "\\", " ", "\x00", "é",
]  # fmt: skip
json_ish = st.lists(st.sampled_from(_FRAGMENTS), max_size=30).map("".join) | st.builds(
    lambda text, cut: text[:cut], frames.map(json.dumps), st.integers(min_value=0, max_value=200)
)


# --- client frames -----------------------------------------------------------------------------


def _parse(raw: str | bytes) -> Any:
    """The parsed message, or the ProtocolError: any other exception fails the test."""
    try:
        return parse_client_message(raw)
    except ProtocolError as exc:
        error = exc
    assert error.code in {"bad_request", "unknown_type"}, error.code
    return error


@SETTINGS
@given(st.text() | st.binary() | json_ish)
@example("[" * 100_000)
@example(b"\xff\xfe{}")
@example('{"type": "send", "room": "r", "data": 1' + "0" * 5000 + "}")
@example('{"type": "send", "room": "r", "data": [NaN, Infinity]}')
@example('{"type": "send", "room": "r", "data": -1e400}')
@example('{"type": "ping", "ref": "\\udfff"}')
def test_parse_raises_only_protocol_errors(raw):
    _parse(raw)


@SETTINGS
@given(frames)
@example({"type": "direct", "to": "a\x85b", "data": 1})
@example({"type": "direct", "to": "é" * 129, "data": 1})
@example({"type": "join", "room": "r" * 129})
@example({"type": "send", "room": "lobby"})
def test_parse_accepts_only_what_the_spec_allows(frame):
    result = _parse(json.dumps(frame))
    kind = frame.get("type")
    if isinstance(result, ProtocolError):
        assert result.ref == frame.get("ref")
        if result.code == "unknown_type":
            assert isinstance(kind, str)
            assert kind not in {"join", "leave", "send", "direct", "refresh", "ping"}
        return
    assert type(result).__name__.lower() == kind
    assert kind in SPEC_TYPES
    assert result.ref == frame.get("ref")
    fields = attrs.asdict(result, recurse=False)
    if "room" in fields:
        assert spec_room(result.room)
        assert result.room == frame["room"]
    if "to" in fields:
        assert spec_user_id(result.to)
        assert result.to == frame["to"]
    if "data" in fields:
        assert "data" in frame
        assert result.data == frame["data"]
    if "token" in fields:
        assert isinstance(result.token, str)
        assert result.token
    for name in ("since", "before"):
        if fields.get(name) is not None:
            assert isinstance(fields[name], str)
            assert fields[name]
    if fields.get("limit") is not None:
        assert type(fields["limit"]) is int
        assert 1 <= fields["limit"] <= 100


def _frame_text(message: Any) -> str:
    """``message`` as a client sends it: a JSON object with its ``type``, no null fields but
    ``data`` (a ``ref`` of null is no ref)."""
    fields = attrs.asdict(message, recurse=False)
    body = {name: value for name, value in fields.items() if value is not None or name == "data"}
    return json.dumps({"type": type(message).__name__.lower(), **body})


valid_messages = st.one_of(
    st.builds(Join, room=rooms, ref=refs),
    st.builds(Leave, room=rooms, ref=refs),
    st.builds(Send, room=rooms, data=json_values, ref=refs),
    st.builds(Direct, to=user_ids.filter(spec_user_id), data=json_values, ref=refs),
    st.builds(Refresh, token=st.text(min_size=1), ref=refs),
    st.builds(Ping, ref=refs),
)


@SETTINGS
@given(valid_messages, st.booleans())
@example(Direct(to="é" * 128, data=None), False)
@example(Send(room="r" * 128, data=[-0.0, 1e308, {"": None}], ref=0), True)
def test_valid_frames_survive_encode_and_parse(message, as_bytes):
    text = _frame_text(message)
    assert parse_client_message(text.encode() if as_bytes else text) == message


# --- user ids ----------------------------------------------------------------------------------


@SETTINGS
@given(
    near_user_ids
    | st.text(st.sampled_from("aé€😀\x85\x7f\x00 \ud800"), max_size=140)
    | st.integers()
    | st.none()
    | st.lists(st.text())
)
@example("é" * 128)
@example("a" + "é" * 128)
@example("alice bob")
@example("a\x9fb")
@example("a\xa0b")
@example("")
def test_is_user_id_agrees_with_the_spec(value):
    assert is_user_id(value) == spec_user_id(value)


# --- auth records ------------------------------------------------------------------------------

_numbers = st.sampled_from(["inf", "-inf", "nan", "1e999", "-0", " 5 ", "1_0", "0x10", "", "1e3"])
_record_values = _numbers | st.floats().map(str) | st.integers().map(str) | st.text(max_size=20)


#: 9999-12-31T23:59:59Z: what "inf" (for ever) stands for
FOREVER = 253402300799.0


def _seconds(raw: str) -> float:
    """What a record field means: a time no later than year 9999; 0 for no number."""
    try:
        value = float(raw)
    except ValueError:
        return 0.0
    return 0.0 if math.isnan(value) else max(-FOREVER, min(value, FOREVER))


@SETTINGS
@given(
    st.dictionaries(
        st.sampled_from(["status", "not_before", "muted_until", "roles"]) | st.text(max_size=8),
        _record_values,
        max_size=6,
    )
)
@example({"not_before": "inf", "muted_until": "nan"})
@example({"muted_until": "1e999", "roles": ",,admin,"})
@example({"not_before": "-inf", "muted_until": "1e300"})
def test_auth_record_parsing_never_raises_and_yields_sane_values(fields):
    record = AuthRecord.from_hash(fields)
    assert record.status == fields.get("status", "active")
    for name in ("not_before", "muted_until"):
        value = getattr(record, name)
        assert type(value) is float
        assert math.isfinite(value)
        assert value == _seconds(fields.get(name) or "0")
    assert record.roles == tuple(r for r in fields.get("roles", "").split(",") if r)
    assert all(isinstance(role, str) and role and "," not in role for role in record.roles)


# --- credentials at the handshake --------------------------------------------------------------

AUTH = attrs.evolve(Config().auth, jwt_secret=SECRET)
AUTH_WITH_SESSIONS = attrs.evolve(AUTH, session_key="session:<id>")
_TOKEN_CHARS = string.ascii_letters + string.digits + "-_."

_header_names = st.sampled_from(
    [b"authorization", b"Authorization", b"cookie", b"Cookie", b"origin", b"host"]
) | st.binary(max_size=12)
_header_values = (
    st.binary(max_size=60)
    | st.text(st.characters(max_codepoint=255), max_size=60).map(lambda t: t.encode("latin-1"))
    | st.builds(lambda t: b"Bearer " + t.encode(), st.text(_TOKEN_CHARS, max_size=40))
    | st.builds(lambda t: b"a=b; trio_chat_token=" + t.encode(), st.text(_TOKEN_CHARS, max_size=40))
)
_targets = (
    st.text()
    | st.builds(lambda t: "/?token=" + t, st.text())
    | st.sampled_from(["//[x/", "/?token=&token=a", "http://[::1/", "/%zz?token=%ff", "?", ""])
)
_subprotocols = st.lists(
    st.text(max_size=20) | st.builds(lambda t: "bearer." + t, st.text(max_size=30)), max_size=3
)


@SETTINGS
@given(
    _targets,
    st.lists(st.tuples(_header_names, _header_values), max_size=5),
    _subprotocols,
    st.sampled_from([AUTH, AUTH_WITH_SESSIONS]),
)
def test_credential_parsers_raise_only_auth_errors(target, headers, subprotocols, config):
    try:
        info = HandshakeInfo.from_request(target, headers, subprotocols)
        token = find_token(info, config)
        if token is not None:
            opaque_session_id(token, config)
    except AuthError as exc:
        error = exc
    else:
        error = None
    if error is not None:
        assert (error.status, error.code) in {(400, "bad_request"), (401, "invalid_session")}
        return
    # the Authorization header wins (SPEC §5): a lone well-formed one is what is found
    bearers = [v for n, v in headers if n.lower() == b"authorization"]
    if len(bearers) == 1 and re.fullmatch(rb"Bearer [A-Za-z0-9_.-]+", bearers[0]):
        assert token == bearers[0][7:].decode()
    elif token is not None:
        # whatever was found came from the request (repeated headers are joined, as HTTP allows)
        queried = [value for values in info.query.values() for value in values]
        sources = [*queried, *subprotocols, *info.headers.values()]
        assert any(token in source for source in sources)


# --- the JWT verifier --------------------------------------------------------------------------

VERIFIER = TokenVerifier(AUTH)
_NOW = int(time.time())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signed(header: Any, payload: Any, corrupt: bool) -> str:
    """A token of that header and payload, HMAC-SHA256'd with the server's secret."""
    head = _b64(json.dumps(header).encode())
    body = _b64(json.dumps(payload).encode())
    signature = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    if corrupt:
        signature = bytes([signature[0] ^ 1]) + signature[1:]
    return f"{head}.{body}.{_b64(signature)}"


_times = (
    st.integers(min_value=_NOW - 3600, max_value=_NOW + 7200)
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats()
    | json_values
)
_headers = _mostly(
    st.sampled_from([{"alg": "HS256", "typ": "JWT"}, {"alg": "HS256"}]),
    st.fixed_dictionaries(
        {"alg": st.sampled_from(["HS256", "HS384", "none", "None", "RS256"]) | json_values},
        optional={
            "typ": st.just("JWT") | json_values,
            "kid": st.text(max_size=10) | json_values,
            "crit": st.lists(st.text(max_size=5), max_size=2) | json_values,
            "b64": st.booleans(),
        },
    ),
)
_claims = st.fixed_dictionaries(
    {
        "sub": _mostly(user_ids, near_user_ids | json_values),
        "iat": _mostly(st.integers(min_value=_NOW - 3600, max_value=_NOW), _times),
        # (the suite may reach these tests minutes after _NOW)
        "exp": _mostly(st.integers(min_value=_NOW + 900, max_value=_NOW + 7200), _times),
    },
    optional={
        "nbf": _times,
        "rooms": st.lists(st.text(max_size=5), max_size=3) | json_values,
        "aud": json_values,
        "iss": json_values,
    },
)
#: claims, claims with one dropped (often a required one), and any other JSON
_payloads = _mostly(
    _claims,
    st.builds(
        lambda c, drop: {k: v for k, v in c.items() if k != drop},
        _claims,
        st.sampled_from(["sub", "iat", "exp"]),
    )
    | json_values,
)


def _check_verdict(token: str) -> Identity | AuthError:
    try:
        identity = trio.run(VERIFIER.verify, token)
    except AuthError as exc:
        error = exc
    else:
        error = None
    if error is not None:
        assert error.status == 401
        assert error.code in {"invalid_token", "token_expired"}
        return error
    assert spec_user_id(identity.user_id)
    assert type(identity.issued_at) is int
    assert type(identity.expires_at) is int
    assert identity.expires_at > time.time() - AUTH.leeway - 1
    assert identity.rooms is None or all(isinstance(room, str) for room in identity.rooms)
    return identity


@SETTINGS
@given(st.text() | json_ish | st.builds(".".join, st.lists(st.text(_TOKEN_CHARS), max_size=4)))
def test_verify_raises_only_auth_errors_for_any_string(token):
    _check_verdict(token)


@SETTINGS
@given(_headers, _payloads, st.integers(min_value=0, max_value=3).map(lambda n: n == 3))
@example({"alg": "HS256"}, {"sub": "a", "iat": _NOW, "exp": 10**400}, False)
@example({"alg": "HS256"}, {"sub": "a", "iat": -(10**400), "exp": _NOW + 60}, False)
@example({"alg": "HS256"}, {"sub": "a", "iat": _NOW, "exp": True}, False)
@example({"alg": "HS256"}, {"sub": "a", "iat": _NOW, "exp": _NOW + 60}, False)
def test_verify_judges_any_signed_header_and_payload(header, payload, corrupt):
    verdict = _check_verdict(_signed(header, payload, corrupt))
    if isinstance(verdict, Identity):
        # only a genuine HS256 token of well-typed claims gets through
        assert header["alg"] == "HS256"
        assert "crit" not in header
        assert not corrupt
        assert verdict.user_id == payload["sub"]
    elif verdict.code == "token_expired":
        exp = payload["exp"]
        assert type(exp) in (int, float)
        assert exp <= time.time()


def test_a_genuine_token_is_accepted():
    # the property tests above would pass with a verifier that refuses everything
    now = int(time.time())
    token = _signed(
        {"alg": "HS256", "typ": "JWT"}, {"sub": "a b", "iat": now, "exp": now + 60}, False
    )
    assert trio.run(VERIFIER.verify, token) == Identity("a b", now, now + 60)


@pytest.mark.parametrize(
    "payload",
    [
        {"sub": "a", "iat": _NOW, "exp": 10**400},
        {"sub": "a", "iat": -(10**400), "exp": _NOW + 60},
        {"sub": "a", "iat": _NOW, "exp": True},
    ],
    ids=["exp-huge-int", "iat-huge-negative-int", "exp-true"],
)
def test_time_claims_that_are_no_time_are_invalid_not_expired(payload):
    with pytest.raises(AuthError) as info:
        trio.run(VERIFIER.verify, _signed({"alg": "HS256"}, payload, False))
    assert (info.value.status, info.value.code) == (401, "invalid_token")
