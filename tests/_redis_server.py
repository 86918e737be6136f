"""A throwaway ``redis-server`` process that tests can kill, pause and restart."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

_START_TIMEOUT = 5.0
_STOP_TIMEOUT = 5.0


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _command(port: int, command: bytes, timeout: float) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(command + b"\r\n")
        return sock.recv(64)


class RedisServer:
    """One ``redis-server`` with no persistence, on a fixed port of 127.0.0.1 and a unix socket.

    ``start()`` blocks until the server answers PING; the other methods act on the process
    right away. Every (re)start comes up empty, on the same port.
    """

    def __init__(self, binary: str, directory: Path, port: int) -> None:
        self.binary = binary
        self.directory = directory
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        # keep ``directory`` short: a socket path has at most 107 bytes
        self.unix_socket = directory / "redis.sock"
        self._process: subprocess.Popen[bytes] | None = None
        self._log = directory / "redis.log"

    @property
    def pid(self) -> int:
        assert self._process is not None, "redis-server is not running"
        return self._process.pid

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        assert self._process is None, "redis-server is already running"
        with self._log.open("ab") as log:
            self._process = subprocess.Popen(
                [
                    self.binary,
                    "--port", str(self.port),
                    "--bind", "127.0.0.1",
                    "--save", "",
                    "--appendonly", "no",
                    "--daemonize", "no",
                    "--dir", str(self.directory),
                    "--unixsocket", str(self.unix_socket),
                    "--hz", "100",  # SIGTERM is acted on in a timer: stop in 10 ms, not 100
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                break
            try:
                if _command(self.port, b"PING", timeout=0.5).startswith(b"+PONG"):
                    return
            except OSError:
                time.sleep(0.005)
        self.kill()
        raise RuntimeError(
            f"redis-server did not answer PING on port {self.port}:\n{self._log.read_text()}"
        )

    def kill(self) -> None:
        """SIGKILL the server (even a paused one) and reap it."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def stop(self) -> None:
        """Terminate the server politely, then by force."""
        if self._process is not None:
            self.resume()  # a stopped process would not act on SIGTERM
            self._process.terminate()
            try:
                self._process.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
            self.kill()

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections but nothing answers."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused server."""
        os.kill(self.pid, signal.SIGCONT)

    def restart(self) -> None:
        """Kill the server and start an empty one on the same port."""
        self.kill()
        self.start()

    def flushall(self) -> None:
        """Delete every key (synchronously, over a raw socket)."""
        reply = _command(self.port, b"FLUSHALL", timeout=_START_TIMEOUT)
        assert reply.startswith(b"+OK"), reply
