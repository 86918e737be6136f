"""Pure tests of frame parsing and credential handling: no sockets, no store."""

from __future__ import annotations

import json

import pytest
from _chat import SECRET, make_token

from trio_chat._auth import (
    AuthRecord,
    HandshakeInfo,
    Identity,
    TokenVerifier,
    find_token,
    judge,
    origin_allowed,
)
from trio_chat._config import AuthConfig
from trio_chat._errors import AuthError, ConfigError, ProtocolError
from trio_chat._messages import Direct, Join, Ping, Send, encode, parse_client_message


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('{"type":"join","room":"a.b:c-d_1"}', Join("a.b:c-d_1")),
        ('{"type":"send","room":"r","data":null,"ref":"x"}', Send("r", None, "x")),
        ('{"type":"direct","to":"bob","data":[1]}', Direct("bob", [1])),
        ('{"type":"ping","ref":3}', Ping(3)),
    ],
)
def test_parse_valid_frames(raw, expected):
    assert parse_client_message(raw) == expected


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        ("nope", "bad_request"),
        (b"\xff\xfe", "bad_request"),
        ('"string"', "bad_request"),
        ('{"room":"r"}', "bad_request"),
        ('{"type":"join","room":""}', "bad_request"),
        ('{"type":"join","room":"a/b"}', "bad_request"),
        ('{"type":"direct","data":1}', "bad_request"),
        ('{"type":"direct","to":"has\\nnewline","data":1}', "bad_request"),
        ('{"type":"direct","to":"' + "é" * 129 + '","data":1}', "bad_request"),
        ('{"type":"refresh"}', "bad_request"),
        ('{"type":"teleport"}', "unknown_type"),
    ],
)
def test_parse_refuses_bad_frames(raw, code):
    with pytest.raises(ProtocolError) as info:
        parse_client_message(raw)
    assert info.value.code == code


def test_error_keeps_the_ref():
    with pytest.raises(ProtocolError) as info:
        parse_client_message('{"type":"join","ref":{"n":1}}')
    assert info.value.ref == {"n": 1}


def test_encode_echoes_ref_only_when_given():
    assert json.loads(encode("pong")) == {"type": "pong"}
    assert json.loads(encode("pong", 0)) == {"type": "pong", "ref": 0}


def _info(**headers: str) -> HandshakeInfo:
    path = headers.pop("path", "/")
    protocols = tuple(headers.pop("protocols", "").split()) if "protocols" in headers else ()
    raw = [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    return HandshakeInfo.from_request(path, raw, protocols)


def test_credential_precedence():
    config = AuthConfig()
    everything = _info(
        path="/?token=q",
        authorization="Bearer h",
        protocols="trio-chat.v1 bearer.p",
        cookie="trio_chat_token=c",
    )
    assert find_token(everything, config) == "h"
    assert (
        find_token(
            _info(path="/?token=q", protocols="bearer.p", cookie="trio_chat_token=c"), config
        )
        == "p"
    )
    assert find_token(_info(path="/?token=q", cookie="trio_chat_token=c"), config) == "q"
    assert find_token(_info(cookie="x=1; trio_chat_token=c"), config) == "c"
    assert find_token(_info(path="/?token=q"), AuthConfig(allow_query_token=False)) is None
    assert find_token(_info(authorization="Basic abc"), config) is None
    assert find_token(_info(cookie="bad cookie;;;==="), config) is None


def test_origin_check():
    config = AuthConfig(allowed_origins=("https://a.example",))
    assert origin_allowed(_info(origin="https://a.example"), config)
    assert not origin_allowed(_info(origin="https://b.example"), config)
    assert origin_allowed(_info(), config)  # not a browser
    assert origin_allowed(_info(origin="https://b.example"), AuthConfig())


def test_verifier_needs_a_key_for_each_algorithm():
    with pytest.raises(ConfigError, match=r"auth\.jwt_secret"):
        TokenVerifier(AuthConfig())
    with pytest.raises(ConfigError, match=r"auth\.jwt_public_key_file"):
        TokenVerifier(AuthConfig(jwt_secret=SECRET, jwt_algorithms=("HS256", "RS256")))


async def test_verifier_accepts_and_reads_rooms():
    verifier = TokenVerifier(AuthConfig(jwt_secret=SECRET))
    identity = await verifier.verify(make_token("alice", rooms=["team-*", "lobby"]))
    assert identity.user_id == "alice"
    assert identity.may_join("team-red")
    assert identity.may_join("lobby")
    assert not identity.may_join("admins")


async def test_leeway_applies_to_expiry():
    token = make_token("alice", ttl=-3)
    assert await TokenVerifier(AuthConfig(jwt_secret=SECRET, leeway=5)).verify(token)
    with pytest.raises(AuthError) as info:
        await TokenVerifier(AuthConfig(jwt_secret=SECRET, leeway=0)).verify(token)
    assert (info.value.status, info.value.code) == (401, "token_expired")


def test_judge_auth_records():
    identity = Identity("alice", issued_at=100, expires_at=200)
    assert judge(None, identity, require_record=False) is None
    assert judge(None, identity, require_record=True) == "no_record"
    assert judge(AuthRecord(status="banned"), identity, require_record=False) == "banned"
    assert judge(AuthRecord(not_before=101), identity, require_record=False) == "revoked"
    assert judge(AuthRecord(not_before=100), identity, require_record=False) is None
    record = AuthRecord.from_hash({"muted_until": "garbage", "roles": "a,b"})
    assert (record.muted_until, record.roles) == (0.0, ("a", "b"))
