"""What half-open WebSocket handshakes (slowloris) cost one instance, and whether they end.

Starts ``trio-chat serve`` on the in-memory store, reads its RSS, then opens ``--count`` TCP
connections from this process that each send half of an HTTP upgrade request and stall. Once
the instance's RSS has settled it reports how many of them the instance holds (its open
sockets, and ESTABLISHED connections on its port), the RSS they cost (in all and per
connection), and whether a real client still connects and chats meanwhile. Then it waits for
``server.handshake_timeout`` (``--timeout``) to pass and reports when the instance closed each
half-open connection. Only 127.0.0.1 is used; the server is stopped by pid at the end.

Run: .venv/bin/python bench/slowloris.py [--count 2000] [--timeout 30]
     .venv/bin/python bench/slowloris.py --count 2000 --timeout 2      # the timeout itself
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jwt
import trio

from trio_chat.client import open_client

SECRET = "slowloris-bench-secret-" + "s" * 32
HALF_REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnec"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0


def raise_fd_limit(wanted: int) -> int:
    """Raise RLIMIT_NOFILE (soft) toward ``wanted``; the server child inherits it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rss_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    assert match, status
    return int(match.group(1))


def open_sockets(pid: int) -> int:
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            count += os.readlink(fd).startswith("socket:")
        except OSError:
            pass  # closed meanwhile
    return count


def established(port: int) -> int:
    """ESTABLISHED TCP connections whose local end is ``port`` (the server's side)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            count += state == "01" and int(local.rsplit(":", 1)[1], 16) == port
    return count


def settle(pid: int, deadline: float) -> int:
    """RSS once three readings 0.3 s apart agree within 1%, or at ``deadline``."""
    readings = [rss_kib(pid)]
    while time.monotonic() < deadline:
        time.sleep(0.3)
        readings.append(rss_kib(pid))
        last = readings[-3:]
        if len(last) == 3 and max(last) - min(last) <= max(last) / 100:
            break
    return readings[-1]


def token(user: str) -> str:
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + 600}, SECRET, algorithm="HS256")


async def chat_round_trip(url: str) -> float:
    """Seconds for two real clients to connect, join, and pass one message."""
    begun = time.perf_counter()
    with trio.fail_after(10):
        async with open_client(url, token("alice")) as alice, open_client(url, token("bob")) as bob:
            await alice.join("lobby")
            await bob.join("lobby")
            await alice.send("lobby", "hello")
            frame = await bob.receive()
            if (frame["type"], frame.get("data")) != ("message", "hello"):
                raise SystemExit(f"bob got {frame} instead of alice's message")
    return time.perf_counter() - begun


def start_server(command: str, port: int, timeout: float, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "TRIO_CHAT_AUTH_JWT_SECRET": SECRET,
        "TRIO_CHAT_SERVER_HANDSHAKE_TIMEOUT": str(timeout),
    }
    argv = [command, "serve", "--redis-url", "memory://", "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--admin-port", "0"]
    with log.open("wb") as sink:
        process = subprocess.Popen(argv, env=env, stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_TIMEOUT
    # (not a probe connection: a socket that never completes a handshake is held until the
    # timeout, even once closed by its client, and would be counted)
    while "listening on ws://" not in log.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process)
            raise SystemExit(f"trio-chat serve did not start:\n{log.read_text()}")
        time.sleep(0.05)
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the server drains), then SIGKILL, by pid."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


def open_half(port: int, count: int) -> list[tuple[socket.socket, float]]:
    """``count`` connections, each having sent half an upgrade request: (socket, when)."""
    opened = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(HALF_REQUEST)
        sock.setblocking(False)
        opened.append((sock, time.monotonic()))
    return opened


def wait_closed(opened: list[tuple[socket.socket, float]], deadline: float) -> list[float]:
    """Seconds from opening until the server closed each socket (EOF or reset)."""
    selector = selectors.DefaultSelector()
    for sock, when in opened:
        selector.register(sock, selectors.EVENT_READ, when)
    closed: list[float] = []
    while len(closed) < len(opened) and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.2):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(4096)
            except ConnectionResetError:
                data = b""
            except BlockingIOError:
                continue
            if data:
                print(f"  unexpected bytes from the server: {data[:80]!r}")
                continue
            closed.append(time.monotonic() - key.data)
            selector.unregister(sock)
    selector.close()
    return closed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="half-open handshakes (2000)")
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="server.handshake_timeout, seconds (30)"
    )
    parser.add_argument(
        "--trio-chat",
        default=str(Path(sys.executable).parent / "trio-chat"),
        help="the trio-chat console script (the venv's)",
    )
    args = parser.parse_args()
    limit = raise_fd_limit(2 * args.count + 1024)
    if limit < 2 * args.count + 256:
        raise SystemExit(f"RLIMIT_NOFILE is {limit}: too low for --count {args.count}")

    port = free_port()
    url = f"ws://127.0.0.1:{port}/"
    with tempfile.TemporaryDirectory(prefix="trio-chat-slowloris-") as workdir:
        log = Path(workdir) / "server.log"
        process = start_server(args.trio_chat, port, args.timeout, log)
        opened: list[tuple[socket.socket, float]] = []
        try:
            time.sleep(1)  # let start-up allocations settle
            rss_before = settle(process.pid, time.monotonic() + 5)
            sockets_before = open_sockets(process.pid)
            print(
                f"trio-chat serve pid {process.pid} on {url} (handshake_timeout {args.timeout} s)"
            )
            print(f"RSS before: {rss_before} KiB, {sockets_before} sockets")

            begun = time.monotonic()
            opened = open_half(port, args.count)
            print(f"opened {len(opened)} half-open handshakes in {time.monotonic() - begun:.2f} s")
            # measure while every one is still open: before 80% of the timeout has passed
            rss_after = settle(process.pid, begun + max(0.5, 0.8 * args.timeout - 1))
            held = open_sockets(process.pid) - sockets_before
            held_tcp = established(port)
            round_trip = trio.run(chat_round_trip, url)
            measured_at = time.monotonic() - begun
            delta = rss_after - rss_before
            print(
                f"held after {measured_at:.1f} s: {held} sockets in the instance, "
                f"{held_tcp} ESTABLISHED on its port"
            )
            print(
                f"RSS after: {rss_after} KiB: +{delta} KiB in all, "
                f"{delta / max(held, 1):.1f} KiB per half-open handshake"
            )
            ms = round_trip * 1000
            print(f"a real client connected, joined and chatted meanwhile in {ms:.0f} ms")

            closed = wait_closed(opened, begun + args.timeout + 15)
            if closed:
                print(
                    f"closed by the server: {len(closed)}/{len(opened)}, "
                    f"{min(closed):.2f}-{max(closed):.2f} s after they opened "
                    f"(median {statistics.median(closed):.2f} s; timeout {args.timeout} s)"
                )
            else:
                print(f"closed by the server: 0/{len(opened)}")
            time.sleep(0.5)
            print(
                f"after the closes: {open_sockets(process.pid) - sockets_before} sockets held, "
                f"RSS {rss_kib(process.pid)} KiB"
            )
            ok = len(closed) == len(opened) and min(closed) >= args.timeout * 0.9
            return 0 if ok else 1
        finally:
            for sock, _ in opened:
                sock.close()
            stop(process)
            errors = [
                line
                for line in log.read_text().splitlines()
                if "ERROR" in line or "Traceback" in line
            ]
            if errors:
                print("server errors:\n  " + "\n  ".join(errors[:20]))


if __name__ == "__main__":
    sys.exit(main())
