"""JWT attacks at the WebSocket handshake (SPEC §5): each is an HTTP 401 with a JSON ``error``
code, never an upgrade, never a session record in Redis, and the server goes on serving.

Three servers differ only in what they verify with: ``hs`` (HS256 and the shared secret, the
default), ``rs`` (RS256 and a public key file; the secret is still set, so that HS256 tokens
signed with it must be refused for their algorithm) and ``both``.
"""

from __future__ import annotations

import base64
import gc
import hmac
import json
import time
from functools import partial
from typing import TYPE_CHECKING, Any

import attrs
import coredis
import jwt
import pytest
import trio
from _chat import SECRET, make_config, open_backend, snapshot, start
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from trio_websocket import ConnectionRejected

from trio_chat.client import open_client

if TYPE_CHECKING:
    from collections.abc import Callable

    from trio_chat import Server

# As in test_server.py: trio-websocket's client (0.12) may leave its socket open when the server
# refuses the upgrade, and the garbage collector close it later with a ResourceWarning.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning"
)

ATTACKER = "mallory"


@pytest.fixture(scope="module", autouse=True)
def _collect_leaked_sockets():
    """Close any leaked socket within this module, where its warning is expected: once, as a
    full collection costs some 50 ms."""
    yield
    gc.collect()


# --- keys and tokens ---------------------------------------------------------------------------


@attrs.frozen
class Keys:
    server: rsa.RSAPrivateKey
    attacker: rsa.RSAPrivateKey
    #: the server's public key, exactly as in ``auth.jwt_public_key_file``
    public_pem: bytes
    public_file: str


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    server = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = server.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path = tmp_path_factory.mktemp("jwt-keys") / "public.pem"
    path.write_bytes(public_pem)
    return Keys(server, attacker, public_pem, str(path))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(sub: Any = ATTACKER, **changes: Any) -> dict[str, Any]:
    """Valid claims for ``sub``; a change to None drops that claim."""
    now = int(time.time())
    claims = {"sub": sub, "iat": now, "exp": now + 3600, **changes}
    return {name: value for name, value in claims.items() if value is not None}


def _token(header: dict[str, Any], payload: Any, sign: Callable[[bytes], bytes]) -> str:
    """A compact JWS built by hand: PyJWT would refuse to build most of these. ``payload`` is
    the exact payload bytes, or a value to encode as JSON."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(body)}"
    return f"{signing_input}.{_b64(sign(signing_input.encode()))}"


def _hmac(key: bytes | str, digest: str = "sha256") -> Callable[[bytes], bytes]:
    secret = key.encode() if isinstance(key, str) else key
    return lambda data: hmac.new(secret, data, digest).digest()


def _rsa(key: rsa.RSAPrivateKey) -> Callable[[bytes], bytes]:
    return lambda data: key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def _unsigned(data: bytes) -> bytes:
    return b""


HS256 = {"alg": "HS256", "typ": "JWT"}
RS256 = {"alg": "RS256", "typ": "JWT"}


def _hs(payload: Any = None, **header: Any) -> str:
    """Signed like a genuine token of the ``hs`` server."""
    return _token({**HS256, **header}, _claims() if payload is None else payload, _hmac(SECRET))


def _tampered() -> str:
    head, _, signature = _hs().split(".")
    return f"{head}.{_b64(json.dumps(_claims('admin')).encode())}.{signature}"


def _attacker_jwk(keys: Keys) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(keys.attacker.public_key()))
    return {**jwk, "kid": "attacker", "use": "sig", "alg": "RS256"}


def _by_attacker(keys: Keys, **header: Any) -> str:
    return _token({**RS256, **header}, _claims(), _rsa(keys.attacker))


def _jwks(keys: Keys) -> bytes:
    """What the trap serves to anyone who fetches a ``jku``/``x5u`` URL: the attacker's key."""
    return json.dumps({"keys": [_attacker_jwk(keys)]}).encode()


def _12kb() -> str:
    """A token of some 12 KB (within the 16 KiB of request head h11 reads), wrongly signed."""
    token = _token(HS256, _claims(pad="p" * 8_800), _hmac(SECRET + "x"))
    assert 11_500 < len(token) < 12_500
    return token


def _raw_claims(exp: str = "", iat: str = "") -> bytes:
    """Claims with ``exp``/``iat`` as raw JSON text (``1e400`` is infinity to Python's json)."""
    now = int(time.time())
    return (f'{{"sub": "{ATTACKER}", "iat": {iat or now}, "exp": {exp or now + 3600}}}').encode()


@attrs.frozen
class Attack:
    id: str
    #: (keys, URL of the trap) -> the token
    token: Callable[[Keys, str], str]
    server: str = "hs"
    code: str = "invalid_token"


def _attack(id: str, token: Callable[[Keys, str], str], server: str = "hs", **kw: Any) -> Any:
    return pytest.param(Attack(id, token, server, **kw), id=id)


ATTACKS = [
    # alg none: never accepted, signed or not, whatever its spelling
    _attack("alg-none", lambda k, t: _token({"alg": "none"}, _claims(), _unsigned)),
    _attack("alg-none-signed", lambda k, t: _token({"alg": "none"}, _claims(), _hmac(SECRET))),
    _attack("alg-None-both", lambda k, t: _token({"alg": "None"}, _claims(), _unsigned), "both"),
    _attack("alg-NONE-rs", lambda k, t: _token({"alg": "NONE"}, _claims(), _unsigned), "rs"),
    # HS/RS confusion
    _attack(
        "rs:hs256-with-public-pem", lambda k, t: _token(HS256, _claims(), _hmac(k.public_pem)), "rs"
    ),
    _attack("rs:hs256-with-the-secret", lambda k, t: _hs(), "rs"),
    _attack("hs:rs256-by-attacker", lambda k, t: _by_attacker(k)),
    _attack("hs:rs256-by-server-key", lambda k, t: _token(RS256, _claims(), _rsa(k.server))),
    _attack(
        "both:hs256-with-public-pem",
        lambda k, t: _token(HS256, _claims(), _hmac(k.public_pem)),
        "both",
    ),
    _attack("both:rs256-by-attacker", lambda k, t: _by_attacker(k), "both"),
    _attack(
        "both:hs384-with-the-secret",
        lambda k, t: _token({"alg": "HS384"}, _claims(), _hmac(SECRET, "sha384")),
        "both",
    ),
    # the header never chooses the key
    _attack("kid-server", lambda k, t: _by_attacker(k, kid="server"), "both"),
    _attack(
        "kid-dev-null-empty-hmac",
        lambda k, t: _token({**HS256, "kid": "/dev/null"}, _claims(), _hmac(b"")),
        "both",
    ),
    _attack(
        "kid-public-key-file",
        lambda k, t: _token({**HS256, "kid": k.public_file}, _claims(), _hmac(k.public_pem)),
        "both",
    ),
    _attack("jku", lambda k, t: _by_attacker(k, kid="attacker", jku=f"{t}/jwks.json"), "both"),
    _attack("x5u", lambda k, t: _by_attacker(k, x5u=f"{t}/cert.pem"), "rs"),
    _attack("jwk-embedded", lambda k, t: _by_attacker(k, jwk=_attacker_jwk(k)), "both"),
    _attack(
        "jwk-embedded-oct",
        lambda k, t: _token(
            {**HS256, "jwk": {"kty": "oct", "k": _b64(b"attacker")}}, _claims(), _hmac("attacker")
        ),
    ),
    # crit: no extension is understood, so any crit header refuses a token however signed
    _attack("crit-exp", lambda k, t: _hs(crit=["exp"])),
    # PyJWT alone would accept this one (it knows b64, and true is its default)
    _attack("crit-b64-true", lambda k, t: _hs(crit=["b64"], b64=True)),
    _attack("crit-b64-false", lambda k, t: _hs(crit=["b64"], b64=False)),
    _attack("crit-private", lambda k, t: _hs(crit=["x-private"], **{"x-private": 1})),
    _attack("crit-empty", lambda k, t: _hs(crit=[])),
    # required claims, and the user id (SPEC §6: 1-256 bytes of UTF-8, no control character)
    _attack("no-exp", lambda k, t: _hs(_claims(exp=None))),
    _attack("no-iat", lambda k, t: _hs(_claims(iat=None))),
    _attack("no-sub", lambda k, t: _hs(_claims(sub=None))),
    _attack("sub-number", lambda k, t: _hs(_claims(sub=42))),
    _attack("sub-list", lambda k, t: _hs(_claims(sub=["alice"]))),
    _attack("sub-empty", lambda k, t: _hs(_claims(sub=""))),
    _attack("sub-257-bytes", lambda k, t: _hs(_claims(sub="a" + "é" * 128))),
    _attack("sub-newline", lambda k, t: _hs(_claims(sub="a\nb"))),
    _attack("sub-nul", lambda k, t: _hs(_claims(sub="a\x00b"))),
    _attack("sub-nel", lambda k, t: _hs(_claims(sub="a\x85b"))),
    _attack("sub-del", lambda k, t: _hs(_claims(sub="a\x7fb"))),
    # times (leeway is 5 s)
    _attack("nbf-future", lambda k, t: _hs(_claims(nbf=int(time.time()) + 60))),
    _attack("iat-future", lambda k, t: _hs(_claims(iat=int(time.time()) + 60))),
    _attack(
        "expired",
        lambda k, t: _hs(_claims(iat=int(time.time()) - 120, exp=int(time.time()) - 60)),
        code="token_expired",
    ),
    _attack("exp-1e400", lambda k, t: _hs(_raw_claims(exp="1e400"))),
    _attack("exp-minus-1e400", lambda k, t: _hs(_raw_claims(exp="-1e400"))),
    _attack("exp-NaN", lambda k, t: _hs(_raw_claims(exp="NaN"))),
    _attack("exp-string", lambda k, t: _hs(_raw_claims(exp='"tomorrow"'))),
    _attack("exp-true", lambda k, t: _hs(_raw_claims(exp="true"))),
    _attack("exp-null", lambda k, t: _hs(_raw_claims(exp="null"))),
    _attack("exp-huge-int", lambda k, t: _hs(_raw_claims(exp="1" + "0" * 400))),
    _attack("iat-1e400", lambda k, t: _hs(_raw_claims(iat="1e400"))),
    _attack("iat-string", lambda k, t: _hs(_raw_claims(iat='"now"'))),
    _attack("iat-true", lambda k, t: _hs(_raw_claims(iat="true"))),
    _attack("iat-huge-negative-int", lambda k, t: _hs(_raw_claims(iat="-1" + "0" * 400))),
    # the signature
    _attack("tampered-payload", lambda k, t: _tampered()),
    _attack("truncated-signature", lambda k, t: _hs()[:-4]),
    _attack("no-signature", lambda k, t: _hs().rpartition(".")[0] + "."),
    _attack("wrong-secret", lambda k, t: _token(HS256, _claims(), _hmac(SECRET + "x"))),
    _attack("12kb-wrong-secret", lambda k, t: _12kb()),
    # payloads that are no JSON object, genuinely signed
    _attack("payload-not-json", lambda k, t: _hs(b"not json")),
    _attack("payload-not-utf8", lambda k, t: _hs(b"\xff\xfe{}")),
    _attack("payload-empty", lambda k, t: _hs(b"")),
    _attack("payload-array", lambda k, t: _hs(b'["sub", "mallory"]')),
    _attack("payload-number", lambda k, t: _hs(b"42")),
    _attack("payload-string", lambda k, t: _hs(b'"mallory"')),
    _attack("payload-null", lambda k, t: _hs(b"null")),
    # shapes
    _attack("two-segments", lambda k, t: _hs().rpartition(".")[0]),
    _attack("four-segments", lambda k, t: _hs() + ".c2ln"),
    _attack("header-not-base64", lambda k, t: "%%%." + _hs().partition(".")[2]),
]

#: genuine tokens with something unusual: the positive controls, each accepted as this user
ACCEPTED = [
    pytest.param("hs", lambda k: _hs(kid="2024-key"), ATTACKER, id="hs:harmless-kid"),
    pytest.param(
        "rs",
        lambda k: _token({**RS256, "kid": "2024-key"}, _claims(), _rsa(k.server)),
        ATTACKER,
        id="rs:harmless-kid",
    ),
    pytest.param("both", lambda k: _hs(), ATTACKER, id="both:hs256"),
    pytest.param(
        "both", lambda k: _token(RS256, _claims(), _rsa(k.server)), ATTACKER, id="both:rs256"
    ),
    pytest.param("hs", lambda k: _hs(_claims(sub="é" * 128)), "é" * 128, id="sub-256-bytes"),
    pytest.param("hs", lambda k: _hs(_claims(sub="alice bob")), "alice bob", id="sub-space"),
]


def _genuine(server: str, keys: Keys, user: str) -> str:
    if server == "rs":
        return _token(RS256, _claims(user), _rsa(keys.server))
    return _hs(_claims(user))


# --- servers and checks ------------------------------------------------------------------------


def _config(server: str, redis_url: str, keys: Keys) -> Any:
    auth = {
        "hs": {},
        "rs": {"jwt_algorithms": ["RS256"], "jwt_public_key_file": keys.public_file},
        "both": {"jwt_algorithms": ["HS256", "RS256"], "jwt_public_key_file": keys.public_file},
    }[server]
    return make_config(redis_url, f"inst-{server}", auth=auth)


@attrs.define
class Trap:
    """An HTTP server on 127.0.0.1 that serves the attacker's JWKS to whoever asks, and
    remembers being asked: the server must never fetch a ``jku`` or ``x5u``."""

    url: str = ""
    requests: list[bytes] = attrs.Factory(list)


@pytest.fixture
async def trap(nursery, keys):
    found = Trap()
    body = _jwks(keys)

    async def answer(stream: trio.SocketStream) -> None:
        async with stream:
            found.requests.append(await stream.receive_some())
            head = (
                f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}"
            )
            await stream.send_all(f"{head}\r\nconnection: close\r\n\r\n".encode() + body)

    listeners = await nursery.start(partial(trio.serve_tcp, answer, 0, host="127.0.0.1"))
    found.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}"
    return found


async def _refusal(url: str, token: str) -> tuple[int, dict[str, Any]]:
    with trio.fail_after(5), pytest.raises(ConnectionRejected) as info:
        async with open_client(url, token):
            pass
    assert info.value.body is not None
    return info.value.status_code, json.loads(info.value.body)


async def _session_keys(redis_url: str) -> list[str]:
    """Every ``ws:session:*`` and ``ws:user:*`` key (KEYS: the store is this test's own)."""
    client = coredis.Redis.from_url(redis_url, decode_responses=True)
    async with client:
        found = [*await client.keys("ws:session:*"), *await client.keys("ws:user:*")]
    return sorted(found)


async def _assert_no_session(redis_url: str, *servers: str) -> None:
    assert await _session_keys(redis_url) == []
    async with open_backend(redis_url, command_timeout=2) as backend:
        left = await snapshot(
            backend,
            f"ws:user:{ATTACKER}",
            "ws:user:admin",
            *(f"ws:instance:inst-{server}:sessions" for server in servers),
        )
    assert set(left.values()) == {0}, left


async def _serves(server: Server, kind: str, keys: Keys, user: str = "survivor") -> None:
    with trio.fail_after(5):
        async with open_client(server.url, _genuine(kind, keys, user)) as chat:
            assert chat.welcome["user_id"] == user
            assert (await chat.ping())["type"] == "pong"


# --- tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("attack", ATTACKS)
async def test_the_attack_is_refused_with_401_and_leaves_no_session(
    attack, keys, trap, redis_server, nursery
):
    server = await start(nursery, _config(attack.server, redis_server.url, keys))
    status, body = await _refusal(server.url, attack.token(keys, trap.url))
    assert (status, body["error"]) == (401, attack.code), body
    assert body["message"]
    await _assert_no_session(redis_server.url, attack.server)
    assert trap.requests == []
    await _serves(server, attack.server, keys)


@pytest.mark.parametrize(("kind", "token", "user"), ACCEPTED)
async def test_genuine_tokens_with_unusual_parts_are_accepted(kind, token, user, keys, nursery):
    server = await start(nursery, _config(kind, "memory://", keys))
    with trio.fail_after(5):
        async with open_client(server.url, token(keys)) as chat:
            assert chat.welcome["user_id"] == user
            assert (await chat.ping())["type"] == "pong"


async def test_the_server_lives_through_the_whole_attack_set(keys, trap, redis_server, nursery):
    servers = {
        kind: await start(nursery, _config(kind, redis_server.url, keys))
        for kind in ("hs", "rs", "both")
    }
    answers, expected = {}, {}
    for param in ATTACKS:
        attack = param.values[0]
        status, body = await _refusal(servers[attack.server].url, attack.token(keys, trap.url))
        answers[attack.id] = (status, body["error"])
        expected[attack.id] = (401, attack.code)
    assert answers == expected
    await _assert_no_session(redis_server.url, *servers)
    assert trap.requests == []
    for kind, server in servers.items():
        await _serves(server, kind, keys)


# --- tokens too big for the request head ------------------------------------------------------


_UPGRADE = (
    b"Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


async def _exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` while reading the answer, until the server closes or resets; the
    server may well stop reading, answer and close before all of it is sent."""
    response = b""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream, trio.open_nursery() as nursery:

        async def send() -> None:
            try:
                await stream.send_all(request)
            except trio.BrokenResourceError:
                pass  # the server closed with our request unread

        nursery.start_soon(send)
        with trio.fail_after(5):
            try:
                while chunk := await stream.receive_some():
                    response += chunk
            except trio.BrokenResourceError:
                pass  # a reset, after or instead of an answer
        nursery.cancel_scope.cancel()
    return response


@pytest.mark.parametrize("where", ["authorization", "query"])
async def test_a_1mb_token_gets_no_upgrade_and_leaves_no_session(
    where, keys, redis_server, nursery
):
    # A genuinely signed token: were the request read whole, the claim would be accepted.
    token = _hs(_claims(pad="p" * (1 << 20))).encode()
    if where == "query":
        request = b"GET /?token=" + token + b" HTTP/1.1\r\n" + _UPGRADE + b"\r\n"
    else:
        request = b"GET / HTTP/1.1\r\n" + _UPGRADE + b"Authorization: Bearer " + token + b"\r\n\r\n"
    server = await start(nursery, _config("hs", redis_server.url, keys))
    response = await _exchange(server.port, request)
    # h11 (under wsproto) buffers at most 16 KiB of request head: past that, trio-websocket
    # answers a bare "400" with an empty body and closes (a reset, as our bytes are unread).
    # The server's own handler never sees the request. A reset before the answer arrives
    # would be as right; an upgrade (101) never is.
    assert response in (b"", b"HTTP/1.1 400 \r\ncontent-length: 0\r\n\r\n"), response[:200]
    await _assert_no_session(redis_server.url, "hs")
    await _serves(server, "hs", keys)
