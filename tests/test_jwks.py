"""``auth.jwks_url``: tokens signed by an identity provider's rotating keys (SPEC §2), against a
local JWKS server the test runs (real HTTP over a socket), with RS256, ES256 and EdDSA keys."""

from __future__ import annotations

import json
import time
from typing import Any

import attrs
import jwt
import pytest
import trio
from _chat import ADMIN, admin_client, make_config, start
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from trio_websocket import ConnectionRejected

from trio_chat._config import ConfigError, load_config
from trio_chat._jwks import JwksError, parse_key_set
from trio_chat.client import open_client

ALGORITHMS = ("RS256", "ES256", "EdDSA")


@attrs.define
class Signer:
    """A private key and the JWK of its public half."""

    alg: str
    private: Any
    kid: str

    @classmethod
    def new(cls, alg: str, kid: str) -> Signer:
        private: Any = {
            "RS256": lambda: rsa.generate_private_key(65537, 2048),
            "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
            "EdDSA": ed25519.Ed25519PrivateKey.generate,
        }[alg]()
        return cls(alg, private, kid)

    def jwk(self, **extra: Any) -> dict[str, Any]:
        algorithm = jwt.get_algorithm_by_name(self.alg)
        public = json.loads(algorithm.to_jwk(self.private.public_key()))
        return {**public, "kid": self.kid, "alg": self.alg, "use": "sig", **extra}

    def token(self, user: str, **header: Any) -> str:
        now = int(time.time())
        claims = {"sub": user, "iat": now, "exp": now + 600}
        return jwt.encode(
            claims, self.private, algorithm=self.alg, headers={"kid": self.kid, **header}
        )


@attrs.define
class Provider:
    """A JWKS endpoint: serves ``body`` with ``status``, or closes the socket when ``down``."""

    body: bytes = b'{"keys": []}'
    status: int = 200
    down: bool = False
    fetches: int = 0
    url: str = ""

    def publish(self, *keys: dict[str, Any]) -> None:
        self.body = json.dumps({"keys": list(keys)}).encode()

    async def handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            request = b""
            while b"\r\n\r\n" not in request:
                if not (data := await stream.receive_some()):
                    return
                request += data
            self.fetches += 1
            if self.down:
                return
            head = (
                f"HTTP/1.1 {self.status} X\r\ncontent-type: application/json\r\n"
                f"content-length: {len(self.body)}\r\nconnection: close\r\n\r\n"
            )
            try:
                await stream.send_all(head.encode() + self.body)
            except trio.BrokenResourceError:
                pass  # the client stopped reading (a set over the size limit)


@pytest.fixture
async def provider(nursery: trio.Nursery) -> Provider:
    served = Provider()
    listeners = await nursery.start(trio.serve_tcp, served.handle, 0)
    served.url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/jwks.json"
    return served


SIGNERS = {alg: Signer.new(alg, f"{alg.lower()}-1") for alg in ALGORITHMS}


def _config(provider: Provider, **auth: Any) -> Any:
    fields = {
        "jwks_url": provider.url,
        "jwt_algorithms": ALGORITHMS,
        "jwks_refresh": 300.0,
        "jwks_min_refetch": 0.0,
        **auth,
    }
    return make_config(auth=fields, admin=ADMIN)


async def _accepted(server: Any, token: str) -> bool:
    """Whether the handshake is accepted; a refusal must be a 401."""
    status = 0
    try:
        async with open_client(server.url, token) as chat:
            return bool(chat.welcome["session_id"])
    except ConnectionRejected as refused:
        status = refused.status_code
    assert status == 401, status
    return False


async def _refused(server: Any, token: str) -> None:
    assert not await _accepted(server, token)


async def test_tokens_of_every_key_type_are_verified_by_kid(provider, nursery):
    provider.publish(*(s.jwk() for s in SIGNERS.values()))
    server = await start(nursery, _config(provider))
    with trio.fail_after(10):
        for signer in SIGNERS.values():
            assert await _accepted(server, signer.token(f"user-{signer.alg}")), signer.alg
        # a key of one type does not verify another's tokens, a stranger's key nothing
        rs, es = SIGNERS["RS256"], SIGNERS["ES256"]
        assert not await _accepted(server, es.token("mallory", kid=rs.kid))
        stranger = Signer.new("RS256", rs.kid)
        assert not await _accepted(server, stranger.token("mallory"))
        # HS256 with the public key as its secret (the classic confusion) is not even accepted
        forged = jwt.encode(
            {"sub": "m", "iat": int(time.time()), "exp": int(time.time()) + 60},
            "a public key is no secret, but try it" * 2,
            algorithm="HS256",
            headers={"kid": rs.kid},
        )
        assert not await _accepted(server, forged)


async def test_a_rotation_needs_no_restart(provider, nursery):
    old, new = Signer.new("RS256", "2026-a"), Signer.new("RS256", "2026-b")
    provider.publish(old.jwk())
    server = await start(nursery, _config(provider, jwks_min_refetch=0.2))
    with trio.fail_after(10):
        assert await _accepted(server, old.token("alice"))
        fetched = provider.fetches
        provider.publish(old.jwk(), new.jwk())
        # an unknown kid makes the instance fetch again, and wait for it
        assert await _accepted(server, new.token("bob"))
        assert provider.fetches == fetched + 1
        # made-up kids at once ask for one fetch together (and one per jwks_min_refetch)
        fetched = provider.fetches
        async with trio.open_nursery() as burst:
            for n in range(10):
                burst.start_soon(_refused, server, new.token("mallory", kid=f"made-up-{n}"))
        assert provider.fetches == fetched + 1
        # the old key retired: once fetched again, its tokens are refused
        provider.publish(new.jwk())
        await trio.sleep(0.25)
        assert not await _accepted(server, old.token("carol", kid="2026-c"))  # asks a fetch
        assert not await _accepted(server, old.token("alice"))
        assert await _accepted(server, new.token("bob"))


async def test_no_keys_yet_means_503_until_the_provider_answers(provider, nursery):
    provider.down = True
    signer = SIGNERS["ES256"]
    provider.publish(signer.jwk())
    server = await start(nursery, _config(provider))
    with trio.fail_after(10):
        async with admin_client(server, key=None) as http:
            ready = await http.get("/readyz")
            assert ready.status_code == 503
            assert "signing_keys_missing" in ready.json()["reasons"]
            with pytest.raises(ConnectionRejected) as refused:
                async with open_client(server.url, signer.token("alice")):
                    pass
            assert refused.value.status_code == 503
            provider.down = False  # the instance tries again every second until it answers
            while (await http.get("/readyz")).status_code != 200:
                await trio.sleep(0.1)
        assert await _accepted(server, signer.token("alice"))


async def test_a_provider_down_later_or_answering_garbage_leaves_the_keys_as_they_were(
    provider, nursery
):
    signer = SIGNERS["EdDSA"]
    provider.publish(signer.jwk())
    server = await start(nursery, _config(provider, jwks_refresh=0.2))
    hostile = [
        b"not json",
        json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": signer.kid}]}).encode(),
        json.dumps({"keys": "no list"}).encode(),
        b'{"keys": [' + b'{"kty": "RSA", "n": "AQAB", "e": "AQAB"},' * 200_000 + b"{}]}",  # 10 MB
    ]
    with trio.fail_after(20):
        assert await _accepted(server, signer.token("alice"))
        provider.down = True
        fetched = provider.fetches
        while provider.fetches < fetched + 2:
            await trio.sleep(0.05)
        assert await _accepted(server, signer.token("alice"))
        provider.down = False
        for body in hostile:
            provider.body, fetched = body, provider.fetches
            while provider.fetches < fetched + 2:
                await trio.sleep(0.05)
            assert await _accepted(server, signer.token("alice")), body[:40]
        provider.status = 500
        fetched = provider.fetches
        while provider.fetches < fetched + 2:
            await trio.sleep(0.05)
        assert await _accepted(server, signer.token("alice"))


def test_which_keys_of_a_set_are_used():
    rs, es, ed = SIGNERS["RS256"], SIGNERS["ES256"], SIGNERS["EdDSA"]
    no_alg = {k: v for k, v in rs.jwk(kid="no-alg").items() if k != "alg"}
    document = json.dumps(
        {
            "keys": [
                rs.jwk(),
                es.jwk(use="enc"),  # for encryption, not signatures
                {"kty": "oct", "k": "c2VjcmV0", "kid": "shared", "alg": "HS256"},
                ed.jwk(kid="twice"),
                ed.jwk(kid="twice"),  # two keys claim one kid: neither is trusted
                no_alg,  # serves the allowed algorithms of its type
                {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
                {k: v for k, v in es.jwk(kid="unnamed").items() if k != "kid"},
                "not an object",
            ]
        }
    ).encode()
    by_kid, unnamed = parse_key_set(document, ("RS256", "PS256", "ES256", "EdDSA", "HS256"))
    assert sorted(by_kid) == sorted([rs.kid, "no-alg"])
    assert sorted(by_kid["no-alg"]) == ["PS256", "RS256"]  # not RS384: not allowed
    assert [sorted(key) for key in unnamed] == [["ES256"]]
    with pytest.raises(JwksError, match="no usable key"):
        parse_key_set(document, ("ES384",))
    for garbage in (b"[]", b"{", b'{"keys": {}}', b"\xff"):
        with pytest.raises(JwksError):
            parse_key_set(garbage, ALGORITHMS)


def test_a_jwks_url_that_is_not_http_or_comes_with_a_key_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"auth\.jwks_url: must be an http:// or https:// URL"):
        load_config(env={"TRIO_CHAT_AUTH_JWKS_URL": "file:///etc/keys.json"})
    pem = tmp_path / "key.pem"
    pem.write_text("unused")
    with pytest.raises(ConfigError, match=r"auth\.jwks_url: .*not both"):
        load_config(
            env={
                "TRIO_CHAT_AUTH_JWKS_URL": "https://idp.example/jwks.json",
                "TRIO_CHAT_AUTH_JWT_PUBLIC_KEY_FILE": str(pem),
            }
        )
