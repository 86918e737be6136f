"""Time to recover cross-instance fan-out after Redis restarts empty.

Two ``trio-chat serve`` instances on a throwaway redis-server; "sender" on instance 1 and
"receiver" on instance 2 are joined to one room. Each round SIGKILLs redis-server and starts a
new, empty one on the same port, then measures from the moment it answers PING until a message
sent on instance 1 reaches instance 2 again (the sender retries every 10 ms while its sends get
``error unavailable`` or are not delivered). The instances are never restarted: their pumps
reconnect and resubscribe, their heartbeats write the sessions back.

Run: .venv/bin/python bench/recovery.py [--rounds 10]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import trio
from latency import BenchError, chat_server, machine, redis_server, summary, token

from trio_chat.client import ServerError, open_client

ROOM = "recovery"


def restart_redis(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    """Start an empty redis-server on ``port``; return once it answers PING."""
    binary = shutil.which("redis-server")
    assert binary is not None
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
    command += ["no", "--dir", str(workdir)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while (
        subprocess.run(
            ["redis-cli", "-p", str(port), "ping"], capture_output=True, check=False
        ).stdout.strip()
        != b"PONG"
    ):
        if time.monotonic() > deadline:
            raise BenchError("redis-server did not come back")
        time.sleep(0.005)
    return process


def redis_pid(port: int) -> int:
    out = subprocess.run(
        ["redis-cli", "-p", str(port), "info", "server"], capture_output=True, check=True
    ).stdout.decode()
    return int(next(line for line in out.splitlines() if line.startswith("process_id:"))[11:])


async def rounds(urls: list[str], port: int, workdir: Path, count: int) -> list[float]:
    samples = []
    restarted: list[subprocess.Popen[bytes]] = []
    try:
        async with (
            open_client(urls[0], token("sender")) as sender,
            open_client(urls[1], token("receiver")) as receiver,
        ):
            await sender.join(ROOM)
            await receiver.join(ROOM)
            for n in range(count):
                await trio.to_thread.run_sync(_kill, port)
                restarted.append(await trio.to_thread.run_sync(restart_redis, port, workdir))
                start = time.perf_counter()
                with trio.fail_after(30):
                    while True:
                        try:
                            await sender.send(ROOM, {"round": n})
                        except ServerError as exc:
                            if exc.code != "unavailable":
                                raise
                        with trio.move_on_after(0.01):
                            while (await receiver.receive()).get("data") != {"round": n}:
                                pass
                            break
                samples.append((time.perf_counter() - start) * 1000)
                await trio.sleep(0.5)  # let the stragglers of this round arrive
                receiver._pending.clear()
    finally:
        for process in restarted:
            process.kill()
            process.wait()
    return samples


def _kill(port: int) -> None:
    os.kill(redis_pid(port), signal.SIGKILL)
    time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="trio-chat-recovery-") as directory:
        workdir = Path(directory)
        try:
            with ExitStack() as stack:
                redis_url = stack.enter_context(redis_server(workdir))
                port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
                urls = [
                    stack.enter_context(chat_server(workdir, redis_url, f"recover-{i}"))
                    for i in (1, 2)
                ]
                samples = trio.run(rounds, urls, port, workdir, args.rounds)
        except BenchError as exc:
            print(f"FAILED: {exc}", file=sys.stderr)
            return 1
    p50, p90, _, worst = summary(samples)
    print("| workload | rounds | p50 ms | p90 ms | max ms |")
    print("| --- | --- | --- | --- | --- |")
    print(
        f"| fan-out back after an empty Redis restart | {len(samples)} | {p50} | {p90} | {worst} |"
    )
    print(f"\n{machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
