"""Helpers for tests that run real trio-chat instances: configs, tokens, servers."""

from __future__ import annotations

import os
import re
import ssl
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import attrs
import httpx
import jwt
import trio
from trio_websocket import ConnectionClosed

from trio_chat import Config, Server, serve
from trio_chat._store.backends import open_backend
from trio_chat._store.interface import Backend, Batch

if TYPE_CHECKING:
    from pathlib import Path

    import trustme

    from trio_chat.client import ChatClient

SECRET = "test-secret-" + "s" * 64  # long enough for HS512 too
ADMIN_KEY = "test-admin-key"
#: the ``admin`` section that turns the admin API on, for ``make_config(..., admin=ADMIN)``
ADMIN = {"enabled": True, "port": 0, "api_key": ADMIN_KEY}


def make_token(user: str, *, ttl: float = 3600, iat: float | None = None, **claims: Any) -> str:
    now = time.time() if iat is None else iat
    payload = {"sub": user, "iat": int(now), "exp": int(now + ttl), **claims}
    return jwt.encode(payload, SECRET, algorithm="HS256")


def make_config(
    redis_url: str = "memory://", instance_id: str = "test-1", **sections: Any
) -> Config:
    """A config for one test instance: ephemeral port, no admin API; ``sections`` maps a section
    name to a dict of field overrides, e.g. ``limits={"outbound_queue": 4}``."""
    config = Config()
    changes: dict[str, Any] = {
        "server": attrs.evolve(config.server, port=0, instance_id=instance_id),
        "redis": attrs.evolve(config.redis, url=redis_url, command_timeout=0.5),
        "auth": attrs.evolve(config.auth, jwt_secret=SECRET),
        "admin": attrs.evolve(config.admin, enabled=False),
    }
    for name, fields in sections.items():
        changes[name] = attrs.evolve(changes.get(name, getattr(config, name)), **fields)
    return attrs.evolve(config, **changes)


async def start(nursery: trio.Nursery, config: Config) -> Server:
    server: Server = await nursery.start(serve, config)
    return server


def admin_client(server: Server, key: str | None = ADMIN_KEY) -> httpx.AsyncClient:
    """An HTTP client for ``server``'s admin API, sending ``key`` as the bearer (None: none)."""
    assert server.admin_url is not None, "start the server with make_config(..., admin=ADMIN)"
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    return httpx.AsyncClient(base_url=server.admin_url, headers=headers, timeout=5)


async def read_hash(backend: Backend, key: str) -> dict[str, str]:
    batch = Batch()
    reply = batch.hgetall(key)
    await backend.execute(batch)
    return reply.value


async def snapshot(backend: Backend, *keys: str) -> dict[str, int]:
    """EXISTS of each key, for asserting what is and is not left behind."""
    batch = Batch()
    replies = {key: batch.exists(key) for key in keys}
    await backend.execute(batch)
    return {key: reply.value for key, reply in replies.items()}


async def spawn(
    log: Path, redis_url: str, instance_id: str, *, config: Path | None = None, **env: str
) -> tuple[subprocess.Popen[bytes], str]:
    """Run ``trio-chat serve`` in a child process (with the TOML file ``config``, if any);
    return it and its WebSocket URL.

    Its log goes to a file (a pipe nobody drains would stall it once full).
    """
    environ = {
        **os.environ,
        "TRIO_CHAT_AUTH_JWT_SECRET": SECRET,
        "TRIO_CHAT_ADMIN_ENABLED": "false",
        **env,
    }
    command = [sys.executable, "-m", "trio_chat", "serve", "--port", "0"]
    command += ["--redis-url", redis_url, "--instance-id", instance_id]
    if config is not None:
        command += ["--config", str(config)]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, env=environ, stderr=sink)
    with trio.fail_after(10):
        while not (match := re.search(r"listening on (ws://\S+)", log.read_text())):
            assert process.poll() is None, log.read_text()
            await trio.sleep(0.02)
    return process, match.group(1)


def tls_files(ca: trustme.CA, directory: Path, name: str = "server") -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost issued by ``ca``, as PEM files (the chain,
    the key) in ``directory``: written again, a call gives the same paths a new certificate."""
    issued = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    issued.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
    return cert, key


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    """A client's TLS context that trusts ``ca``."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


async def closed_with(chat: ChatClient) -> tuple[list[dict[str, Any]], int]:
    """Read until the server closes; return the frames read and the close code."""
    frames = []
    with trio.fail_after(5):
        try:
            while True:
                frames.append(await chat.receive())
        except ConnectionClosed as closed:
            return frames, closed.reason.code if closed.reason else 1006


__all__ = [
    "ADMIN",
    "ADMIN_KEY",
    "SECRET",
    "admin_client",
    "make_config",
    "make_token",
    "open_backend",
    "read_hash",
    "snapshot",
    "spawn",
    "start",
    "tls_files",
    "trusting",
]
