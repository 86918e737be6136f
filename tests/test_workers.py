"""``trio-chat serve --workers N``: one port, N supervised instances."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import trio
from _chat import SECRET, make_token, open_backend
from _redis_server import free_port

from trio_chat._store.interface import Batch
from trio_chat.client import ConnectionClosed, open_client


async def _instances(redis_url: str) -> dict[str, dict[str, str]]:
    async with open_backend(redis_url, command_timeout=1) as backend:
        batch = Batch()
        ids = batch.smembers("ws:instances")
        await backend.execute(batch)
        batch = Batch()
        records = {i: batch.hgetall(f"ws:instance:{i}") for i in ids.value}
        await backend.execute(batch)
    return {i: reply.value for i, reply in records.items() if reply.value}


async def test_workers_share_the_port_restart_after_a_crash_and_drain_on_sigterm(
    redis_server, tmp_path
):
    port = free_port()
    command = [sys.executable, "-m", "trio_chat", "serve", "--workers", "2", "--port", str(port)]
    command += ["--redis-url", redis_server.url, "--instance-id", "pool"]
    env = {**os.environ, "TRIO_CHAT_AUTH_JWT_SECRET": SECRET, "TRIO_CHAT_ADMIN_ENABLED": "false"}
    with (tmp_path / "workers.log").open("wb") as log:
        supervisor = subprocess.Popen(command, env=env, stderr=log)
    try:
        with trio.fail_after(20):
            while set(await _instances(redis_server.url)) != {"pool-w0", "pool-w1"}:
                await trio.sleep(0.05)
            seen = set()
            for _ in range(40):  # the kernel spreads connections over both workers
                async with open_client(f"ws://127.0.0.1:{port}/", make_token("alice")) as chat:
                    seen.add(chat.welcome["instance"])
            assert seen == {"pool-w0", "pool-w1"}

            crashed = int((await _instances(redis_server.url))["pool-w1"]["pid"])
            os.kill(crashed, signal.SIGKILL)
            while (await _instances(redis_server.url)).get("pool-w1", {}).get("pid") in (
                None,
                str(crashed),
            ):
                await trio.sleep(0.05)

            async with open_client(f"ws://127.0.0.1:{port}/", make_token("bob")) as chat:
                supervisor.send_signal(signal.SIGTERM)
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        await chat.receive()
                assert closed.value.reason.code == 1001  # the drain
            while supervisor.poll() is None:
                await trio.sleep(0.05)
        assert supervisor.returncode == 0, (tmp_path / "workers.log").read_text()
    finally:
        supervisor.kill()
        supervisor.wait()
