"""config/nginx/trio-chat.conf in front of two ``trio-chat serve`` instances, with Debian's
nginx (``make test`` installs it when missing; without it the test fails, saying so):
TLS terminated by nginx, reconnecting clients through it, one instance drained with
SIGTERM. Every client comes back through nginx on the other instance, nothing acknowledged is
lost, and the sessions log the clients' addresses from ``X-Forwarded-For``."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio
import trustme
from _chat import make_token, spawn, tls_files, trusting
from _redis_server import free_port
from trio_websocket import ConnectionClosed

from trio_chat.client import ServerError, open_reconnecting_client

CONF = Path(__file__).resolve().parent.parent / "config" / "nginx" / "trio-chat.conf"
ROOM = "lobby"
MEMBERS = 8


def _nginx_conf(directory: Path, port: int, upstreams: list[str], cert: Path, key: Path) -> Path:
    """Our file, with this test's upstreams, port and certificate, in a minimal main config."""
    ours = CONF.read_text()
    servers = "".join(f"    server {u} max_fails=1 fail_timeout=2s;\n" for u in upstreams)
    ours = re.sub(r"(upstream trio_chat \{\n(?:\s*#.*\n)*)(\s*server .*\n)+", r"\1" + servers, ours)
    ours = ours.replace("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;")
    ours = ours.replace("/etc/trio-chat/tls/fullchain.pem", str(cert))
    ours = ours.replace("/etc/trio-chat/tls/privkey.pem", str(key))
    assert all(u in ours for u in upstreams)
    (directory / "trio-chat.conf").write_text(ours)
    temp = "".join(
        f"    {name}_temp_path {directory / name};\n"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    main = directory / "nginx.conf"
    include = directory / "trio-chat.conf"
    main.write_text(
        f"daemon off;\npid {directory / 'nginx.pid'};\nerror_log {directory / 'error.log'} info;\n"
        f"events {{}}\nhttp {{\n    access_log off;\n{temp}    include {include};\n}}\n"
    )
    return main


async def _wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    while True:
        assert process.poll() is None, log.read_text() if log.exists() else "nginx exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            await trio.sleep(0.05)


async def test_clients_through_nginx_come_back_on_the_other_instance_after_a_drain(
    redis_server, tmp_path
):
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if nginx is None:
        pytest.fail("nginx is not on PATH: `make test` installs Debian's nginx")
    ca = trustme.CA()
    cert, key = tls_files(ca, tmp_path)
    context = trusting(ca)

    config = tmp_path / "instances.toml"
    config.write_text('[server]\ntrusted_proxies = ["127.0.0.1"]\n[limits]\nsend_rate = 1000\n')
    instances = {}
    for name in ("inst-1", "inst-2"):
        process, url = await spawn(tmp_path / f"{name}.log", redis_server.url, name, config=config)
        instances[name] = (process, url)
    upstreams = [url.removeprefix("ws://").rstrip("/") for _, url in instances.values()]
    port = free_port()
    main = _nginx_conf(tmp_path, port, upstreams, cert, key)
    proxy = subprocess.Popen([nginx, "-p", str(tmp_path), "-c", str(main)])
    acked: list[str] = []
    try:
        with trio.fail_after(60):
            await _wait_for_port(port, proxy, tmp_path / "error.log")
            url = f"wss://127.0.0.1:{port}/"
            async with AsyncExitStack() as stack:
                members = []
                for n in range(MEMBERS):
                    member = await stack.enter_async_context(
                        open_reconnecting_client(
                            url, make_token(f"m{n}"), ssl_context=context, max_delay=0.3
                        )
                    )
                    await member.join(ROOM)
                    members.append(member)
                first = {m.welcome["instance"] for m in members}
                assert first == {"inst-1", "inst-2"}, first  # nginx spread them
                sender = await stack.enter_async_context(
                    open_reconnecting_client(
                        url, make_token("sender"), ssl_context=context, max_delay=0.3
                    )
                )
                await sender.join(ROOM)
                drained = trio.Event()
                refused: list[str] = []

                async def send() -> None:
                    n = 0
                    while not drained.is_set() or n < len(acked) + 20:
                        try:
                            acked.append((await sender.send(ROOM, n))["id"])
                        except ConnectionClosed:  # dropped by the drain: not acknowledged
                            await trio.sleep(0.02)
                        except ServerError as error:
                            refused.append(error.frame["code"])
                        n += 1
                        await trio.sleep(0.01)
                        if drained.is_set() and len(acked) >= 60:
                            return

                async def drain() -> None:
                    await trio.sleep(0.5)
                    process = instances["inst-1"][0]
                    process.send_signal(signal.SIGTERM)
                    while process.poll() is None:
                        await trio.sleep(0.05)
                    assert process.returncode == 0
                    drained.set()

                async with trio.open_nursery() as traffic:
                    traffic.start_soon(send)
                    traffic.start_soon(drain)
                # every member has every acknowledged message, and is on inst-2 now
                for member in members:
                    seen: set[str] = set()
                    while not set(acked) <= seen:
                        frame = await member.receive()
                        if frame["type"] == "message":
                            seen.add(frame["id"])
                    assert member.welcome["instance"] == "inst-2"
                assert sum(m.reconnects for m in members) >= 1
                assert set(refused) <= {"unavailable"}, refused
    finally:
        proxy.terminate()
        proxy.wait(10)
        for process, _ in instances.values():
            if process.poll() is None:
                process.terminate()
                process.wait(15)
    assert len(acked) >= 60
    # the client's address from X-Forwarded-For has no port, nginx's own connection would
    log = (tmp_path / "inst-2.log").read_text()
    assert re.search(r"connected user=m0 .*remote=127\.0\.0\.1$", log, re.M), log[-2000:]
