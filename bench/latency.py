"""Latency of cross-instance delivery and of logout propagation, on two real instances.

Starts a throwaway redis-server on a free port and two ``trio-chat serve`` processes on it,
then measures:

A. send -> delivery: "sender" on instance 1 sends to room "bench"; time until "receiver" on
   instance 2 reads the ``message`` frame (sequential, one message in flight).
B. logout propagation: user u<round> connected once on each instance; time from PUBLISH on
   ``auth:logout`` until both clients have seen the close (each must get ``logout``, then 4000).

Run: .venv/bin/python bench/latency.py [--messages 1000] [--logouts 200]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import jwt
import trio
from trio_websocket import ConnectionClosed

from trio_chat._store.backends import open_backend
from trio_chat._store.interface import Backend, Batch
from trio_chat.client import ChatClient, open_client

if TYPE_CHECKING:
    from collections.abc import Iterator

SECRET = "bench-secret-" + "s" * 51  # 64 characters
ROOM = "bench"
WARMUP = 50
STEP_TIMEOUT = 5.0  # one message or one logout round
START_TIMEOUT = 10.0
STOP_TIMEOUT = 15.0
LOGOUT_FRAME = {"type": "logout", "reason": "logout"}


class BenchError(Exception):
    """A measurement could not be taken, or saw a wrong result."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def token(user: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + 3600}, SECRET, algorithm="HS256")


def stop(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def redis_server(workdir: Path) -> Iterator[str]:
    """A redis-server of our own on a free port of 127.0.0.1, without persistence."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("redis-server is not on PATH")
    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
    command += ["no", "--dir", str(workdir)]
    with (workdir / "redis.log").open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"redis-server did not start on port {port}") from None
                time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(process, 5)


@contextmanager
def chat_server(workdir: Path, redis_url: str, instance_id: str) -> Iterator[str]:
    """``trio-chat serve`` in a child process, logging to a file; yields its ws:// URL."""
    env = {
        **os.environ,
        "TRIO_CHAT_AUTH_JWT_SECRET": SECRET,
        "TRIO_CHAT_ADMIN_ENABLED": "false",
        "TRIO_CHAT_LIMITS_SEND_RATE": "100000",
        "TRIO_CHAT_LIMITS_SEND_BURST": "100000",
        "TRIO_CHAT_LIMITS_FRAME_RATE": "100000",
        "TRIO_CHAT_LIMITS_FRAME_BURST": "100000",
    }
    command = [sys.executable, "-m", "trio_chat", "serve", "--port", "0"]
    command += ["--redis-url", redis_url, "--instance-id", instance_id]
    log = workdir / f"{instance_id}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not (match := re.search(r"listening on (ws://\S+)", log.read_text())):
            if process.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"{instance_id} did not start:\n{log.read_text()}")
            time.sleep(0.02)
        yield match.group(1)
    finally:
        stop(process, STOP_TIMEOUT)


async def send_to_delivery(urls: list[str], count: int) -> list[float]:
    """Workload A: milliseconds from before each send until the other instance delivers it."""
    samples: list[float] = []
    async with (
        open_client(urls[0], token("sender")) as sender,
        open_client(urls[1], token("receiver")) as receiver,
    ):
        await sender.join(ROOM)
        await receiver.join(ROOM)
        for n in range(WARMUP + count):
            with trio.move_on_after(STEP_TIMEOUT) as step:
                start = time.perf_counter()
                await sender.send_frame({"type": "send", "room": ROOM, "data": {"n": n}, "ref": n})
                frame = await receiver.receive()
                elapsed = time.perf_counter() - start
                if frame.get("type") != "message" or frame.get("data") != {"n": n}:
                    raise BenchError(f"receiver expected message {n}, got {frame}")
                ack = await sender.receive()
                if ack.get("type") != "ack" or ack.get("ref") != n:
                    raise BenchError(f"sender expected the ack of {n}, got {ack}")
            if step.cancelled_caught:
                raise BenchError(f"message {n} and its ack took over {STEP_TIMEOUT} s")
            if n >= WARMUP:
                samples.append(elapsed * 1000)
    return samples


async def watch_close(chat: ChatClient, closes: list[tuple[float, list[object], int]]) -> None:
    """Read until the server closes; record when, the frames read, and the close code."""
    frames: list[object] = []
    try:
        while True:
            frames.append(await chat.receive())
    except ConnectionClosed as closed:
        code = closed.reason.code if closed.reason else 0
        closes.append((time.perf_counter(), frames, code))


async def logout_round(urls: list[str], backend: Backend, user: str) -> float:
    """Workload B, one round: milliseconds from PUBLISH until both sessions have closed."""
    async with (
        open_client(urls[0], token(user)) as one,
        open_client(urls[1], token(user)) as two,
    ):
        closes: list[tuple[float, list[object], int]] = []
        batch = Batch()
        subscribers = batch.publish(
            "auth:logout", json.dumps({"user_id": user, "reason": "logout"})
        )
        with trio.move_on_after(STEP_TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch_close, one, closes)
                nursery.start_soon(watch_close, two, closes)
                start = time.perf_counter()
                await backend.execute(batch)
    if subscribers.value != 2:
        raise BenchError(f"auth:logout reached {subscribers.value} instances, not 2")
    if len(closes) != 2:
        raise BenchError(f"{2 - len(closes)} session(s) still open after {STEP_TIMEOUT} s")
    for _, frames, code in closes:
        if frames != [LOGOUT_FRAME] or code != 4000:
            raise BenchError(f"expected [{LOGOUT_FRAME}] then 4000, got {frames} then {code}")
    return (max(at for at, _, _ in closes) - start) * 1000


async def logout_propagation(
    urls: list[str], redis_url: str, rounds: int
) -> tuple[list[float], list[str]]:
    """Workload B: the time of each round that succeeded, and why the others failed."""
    samples: list[float] = []
    failures: list[str] = []
    async with open_backend(redis_url, command_timeout=2) as backend:
        for n in range(rounds):
            try:
                samples.append(await logout_round(urls, backend, f"u{n}"))
            except BenchError as exc:
                failures.append(f"round {n}: {exc}")
    return samples, failures


async def run(
    urls: list[str], redis_url: str, messages: int, logouts: int
) -> tuple[list[float], list[float], list[str]]:
    delivery = await send_to_delivery(urls, messages)
    return delivery, *await logout_propagation(urls, redis_url, logouts)


def summary(samples: list[float]) -> list[str]:
    """p50, p90, p99 (nearest rank) and max, in milliseconds."""
    ordered = sorted(samples)
    if not ordered:
        return ["-"] * 4
    picks = [ordered[math.ceil(q * len(ordered)) - 1] for q in (0.5, 0.9, 0.99)]
    return [f"{value:.2f}" for value in [*picks, ordered[-1]]]


def table(delivery: list[float], logout: list[float], failures: int) -> str:
    rows = [
        ["A: send -> message, instance 1 -> 2", str(len(delivery)), *summary(delivery), "0"],
        [
            "B: logout publish -> both closed 4000",
            str(len(logout)),
            *summary(logout),
            str(failures),
        ],
    ]
    header = ["workload", "samples", "p50 ms", "p90 ms", "p99 ms", "max ms", "failures"]
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def machine() -> str:
    return (
        f"nproc {len(os.sched_getaffinity(0))}, Python {platform.python_version()}, "
        f"trio {trio.__version__}, {platform.platform()}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1000, help="workload A sends (1000)")
    parser.add_argument("--logouts", type=int, default=200, help="workload B rounds (200)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="trio-chat-bench-") as directory:
        workdir = Path(directory)
        try:
            with ExitStack() as stack:
                redis_url = stack.enter_context(redis_server(workdir))
                urls = [
                    stack.enter_context(chat_server(workdir, redis_url, f"bench-{i}"))
                    for i in (1, 2)
                ]
                delivery, logout, failures = trio.run(
                    run, urls, redis_url, args.messages, args.logouts
                )
        except BenchError as exc:
            print(f"FAILED: {exc}", file=sys.stderr)
            return 1
        except Exception:
            traceback.print_exc()
            print("FAILED: unexpected error (traceback above)", file=sys.stderr)
            return 1
    print(table(delivery, logout, len(failures)))
    print(f"\n{machine()}")
    for failure in failures:
        print(f"FAILED: logout {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
