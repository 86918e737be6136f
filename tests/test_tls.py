"""TLS on the WebSocket and admin listeners (``server.tls_cert``/``tls_key``, SPEC §2), with a
throwaway CA (trustme): ``wss://``, frames through the TLS stream (``_wire``'s direct writes
are for plain sockets), a certificate rotated by SIGHUP without dropping a connection, and
certificates that cannot be loaded refused at start with the key named."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys

import httpx
import pytest
import trio
import trustme
from _chat import ADMIN, SECRET, make_config, make_token, spawn, start, tls_files, trusting
from _redis_server import free_port

from trio_chat._config import ConfigError, load_config
from trio_chat.client import open_client


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def test_wss_carries_the_chat_and_the_admin_api_speaks_https(ca, tmp_path, nursery):
    cert, key = tls_files(ca, tmp_path)
    tls = {"tls_cert": str(cert), "tls_key": str(key)}
    limits = {"send_rate": 1000, "send_burst": 1000}
    config = make_config(server=tls, admin={**ADMIN, **tls}, limits=limits)
    server = await start(nursery, config)
    assert server.url.startswith("wss://")
    context = trusting(ca)
    with trio.fail_after(10):
        async with (
            open_client(server.url, make_token("alice"), ssl_context=context) as alice,
            open_client(server.url, make_token("bob"), ssl_context=context) as bob,
        ):
            for chat in (alice, bob):
                await chat.join("room")
            for n in range(50):  # written through the TLS stream, in order
                await alice.send("room", n)
            assert [(await bob.receive())["data"] for _ in range(50)] == list(range(50))
        assert server.admin_url is not None
        assert server.admin_url.startswith("https://")
        async with httpx.AsyncClient(base_url=server.admin_url, verify=context) as http:
            assert (await http.get("/healthz")).json() == {"status": "ok"}
        # a client that does not trust the CA is refused by its own TLS check
        untrusting = ssl.create_default_context()
        with pytest.raises(trio.BrokenResourceError) as refused:
            async with open_client(server.url, make_token("eve"), ssl_context=untrusting):
                pass
        assert isinstance(refused.value.__cause__, ssl.SSLCertVerificationError)


async def test_sighup_loads_a_new_certificate_and_keeps_the_connections(ca, tmp_path):
    cert, key = tls_files(ca, tmp_path)
    config = tmp_path / "tls.toml"
    config.write_text(f'[server]\ntls_cert = "{cert}"\ntls_key = "{key}"\n')
    log = tmp_path / "serve.log"
    environ = {
        **os.environ,
        "TRIO_CHAT_AUTH_JWT_SECRET": SECRET,
        "TRIO_CHAT_ADMIN_ENABLED": "false",
    }
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "trio_chat",
        "serve",
        "--port",
        str(port),
        "--config",
        str(config),
    ]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, env=environ, stderr=sink)
    url, context = f"wss://127.0.0.1:{port}/", trusting(ca)

    def served(client) -> bytes:
        """The certificate the server presented to ``client`` (DER)."""
        return client.ws._stream.getpeercert(binary_form=True)

    try:
        with trio.fail_after(20):
            while b"listening on" not in log.read_bytes():
                assert process.poll() is None, log.read_text()
                await trio.sleep(0.05)
            async with open_client(url, make_token("alice"), ssl_context=context) as alice:
                await alice.join("room")
                first = served(alice)
                tls_files(ca, tmp_path)  # a new certificate in the same files
                process.send_signal(signal.SIGHUP)
                while b"reloaded" not in log.read_bytes():
                    await trio.sleep(0.05)
                async with open_client(url, make_token("bob"), ssl_context=context) as bob:
                    assert served(bob) != first
                    await bob.join("room")
                    await bob.send("room", "after the rotation")
                    # alice's connection, made with the old certificate, is still there
                    assert (await alice.receive())["data"] == "after the rotation"
                assert process.poll() is None  # SIGHUP did not stop the server
    finally:
        process.terminate()
        process.wait(15)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"tls_cert": "/nonexistent.pem", "tls_key": "/nonexistent.key"},
            r"server\.tls_cert: cannot load",
        ),
        ({"tls_cert": "CERT"}, r"server\.tls_key: required with server\.tls_cert"),
        ({"tls_cert": "KEY", "tls_key": "KEY"}, r"server\.tls_cert: cannot load"),
    ],
)
def test_a_certificate_that_cannot_be_loaded_is_refused_at_start(ca, tmp_path, fields, message):
    cert, key = tls_files(ca, tmp_path)
    env = {
        f"TRIO_CHAT_SERVER_{name.upper()}": value.replace("CERT", str(cert)).replace(
            "KEY", str(key)
        )
        for name, value in fields.items()
    }
    with pytest.raises(ConfigError, match=message):
        load_config(env=env)


async def test_sighup_without_tls_stops_nothing(tmp_path):
    # the unit's ExecReload sends SIGHUP whatever the configuration: it must not kill
    process, _ = await spawn(tmp_path / "serve.log", "memory://", "plain-1")
    try:
        process.send_signal(signal.SIGHUP)
        with trio.fail_after(10):
            while b"nothing to reload" not in (tmp_path / "serve.log").read_bytes():
                assert process.poll() is None, (tmp_path / "serve.log").read_text()
                await trio.sleep(0.05)
        assert process.poll() is None
    finally:
        process.terminate()
        assert process.wait(15) == 0
