"""CPU per call of the hooks' HTTP client (trio_chat._hooks.http), and of httpx for comparison,
against the same application (peers/hooks_allow.py, which checks the signature and allows).

    .venv/bin/python bench/hook_client.py [--calls 4000] [--concurrency 1,20]

It reports wall time and this process's CPU time per call: the cost an instance pays per
message when a ``send`` hook is configured, without the chat around it. httpx is what the
hooks first used (on Trio through anyio and httpcore); it is in the project's dev
dependencies.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import attrs
import httpx
import trio

from trio_chat import HooksConfig, SendEvent
from trio_chat._hooks.http import HttpHooks, parse_answer, signature
from trio_chat._messages import dumps

BENCH = Path(__file__).resolve().parent
SECRET = "bench-hooks-secret"


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def measure(call: object, calls: int, concurrency: int) -> tuple[float, float]:
    """Microseconds of wall time and of CPU per call."""

    async def worker(count: int) -> None:
        for _ in range(count):
            await call()  # type: ignore[operator]

    await call()  # type: ignore[operator]  # connected
    wall, cpu = time.perf_counter(), time.process_time()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker, calls // concurrency)
    done = calls // concurrency * concurrency
    return (time.perf_counter() - wall) / done * 1e6, (time.process_time() - cpu) / done * 1e6


async def main(calls: int, concurrencies: list[int]) -> None:
    port = free_port()
    command = [sys.executable, str(BENCH / "peers" / "hooks_allow.py"), "--port", str(port)]
    app = subprocess.Popen(  # noqa: ASYNC220 (started once, before anything is measured)
        [*command, "--secret", SECRET], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        await trio.sleep(1.5)
        url = f"http://127.0.0.1:{port}/hooks"
        event = SendEvent(user="alice", session="s1", room="lobby", data={"text": "hello"})
        for concurrency in concurrencies:
            ours = HttpHooks(HooksConfig(url=url, secret=SECRET), "bench", 65536)
            wall, cpu = await measure(partial(ours.call, "send", event), calls, concurrency)
            await ours.aclose()
            print(f"h11 client  {concurrency:3} at a time: {wall:6.0f} µs wall, {cpu:5.0f} µs CPU")
            async with httpx.AsyncClient(
                limits=httpx.Limits(max_connections=100, max_keepalive_connections=100)
            ) as http:

                async def with_httpx() -> None:
                    body = dumps(attrs.asdict(event)).encode()
                    stamp = str(int(time.time()))
                    headers = {
                        "Content-Type": "application/json",
                        "X-Trio-Chat-Timestamp": stamp,
                        "X-Trio-Chat-Signature": signature(SECRET, stamp, body),
                    }
                    answer = await http.post(f"{url}/send", content=body, headers=headers)
                    parse_answer(answer.content)

                wall, cpu = await measure(with_httpx, calls, concurrency)
            print(f"httpx       {concurrency:3} at a time: {wall:6.0f} µs wall, {cpu:5.0f} µs CPU")
    finally:
        app.kill()
        app.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=4000)
    parser.add_argument("--concurrency", default="1,20")
    args = parser.parse_args()
    trio.run(main, args.calls, [int(c) for c in args.concurrency.split(",")])
