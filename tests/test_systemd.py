from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from trio_chat._systemd import Notifier, credential

if TYPE_CHECKING:
    from collections.abc import Iterator

UNIT = Path(__file__).parent.parent / "config" / "trio-chat.service"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="tc-") as directory:
        yield Path(directory)


async def _listener(address: str) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await sock.bind(address)
    return sock


async def _receive(sock: trio.socket.SocketType, limit: float = 5) -> str:
    with trio.fail_after(limit):
        return (await sock.recv(4096)).decode()


# --- notifications ------------------------------------------------------------------------------


async def test_messages_arrive_in_order_on_a_socket_path(short_dir: Path) -> None:
    path = str(short_dir / "notify")
    with await _listener(path) as sock:
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": path})
        assert notifier.enabled
        await notifier.ready()
        await notifier.status("serving 3 sessions")
        await notifier.watchdog()
        await notifier.stopping()
        received = [await _receive(sock) for _ in range(4)]
    assert received == ["READY=1", "STATUS=serving 3 sessions", "WATCHDOG=1", "STOPPING=1"]


async def test_abstract_socket_name(short_dir: Path) -> None:
    name = f"trio-chat-test-{secrets.token_hex(8)}"
    with await _listener("\0" + name) as sock:
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        await notifier.ready(status="listening on ws://127.0.0.1:8765/")
        assert await _receive(sock) == "READY=1\nSTATUS=listening on ws://127.0.0.1:8765/"


async def test_a_line_break_in_a_status_cannot_forge_an_assignment(short_dir: Path) -> None:
    path = str(short_dir / "notify")
    with await _listener(path) as sock:
        await Notifier(path).status("draining\nREADY=1")
        assert await _receive(sock) == "STATUS=draining READY=1"


async def test_without_notify_socket_every_call_is_a_no_op() -> None:
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    assert notifier.watchdog_interval() is None
    await notifier.ready()
    await notifier.status("x")
    await notifier.watchdog()
    await notifier.stopping()
    await notifier.keep_alive()  # returns at once


async def test_send_errors_are_logged_once_and_never_raised(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier(str(short_dir / "nobody-listens"))
    with caplog.at_level(logging.DEBUG, logger="trio_chat._systemd"):
        for _ in range(3):
            await notifier.ready()
            await notifier.stopping()
    levels = [r.levelno for r in caplog.records if r.name == "trio_chat._systemd"]
    assert levels == [logging.WARNING] + [logging.DEBUG] * 5


async def test_stopping_is_sent_from_a_cancelled_scope(short_dir: Path) -> None:
    path = str(short_dir / "notify")
    with await _listener(path) as sock:
        notifier = Notifier(path)
        with trio.CancelScope() as scope:
            scope.cancel()
            try:
                await trio.sleep_forever()
            finally:
                await notifier.stopping()  # shielded inside: still sent
        assert await _receive(sock) == "STOPPING=1"


def test_watchdog_interval() -> None:
    pid = str(os.getpid())
    env = {"NOTIFY_SOCKET": "/run/x"}
    assert Notifier.from_environ(env).watchdog_interval() is None
    usec = {"WATCHDOG_USEC": "30000000"}
    assert Notifier.from_environ(env | usec).watchdog_interval() == 30.0
    assert Notifier.from_environ(env | usec | {"WATCHDOG_PID": pid}).watchdog_interval() == 30.0
    # a watchdog meant for another process (our parent) is not ours to feed
    other = {"WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier.from_environ(env | usec | other).watchdog_interval() is None
    assert Notifier.from_environ(env | {"WATCHDOG_USEC": "0"}).watchdog_interval() is None
    assert Notifier.from_environ(env | {"WATCHDOG_USEC": "soon"}).watchdog_interval() is None


async def test_keep_alive_beats_at_half_the_interval_while_healthy(
    short_dir: Path, mock_clock: trio.testing.MockClock
) -> None:
    mock_clock.autojump_threshold = 0.05  # a real socket is in flight
    path = str(short_dir / "notify")
    healthy = True
    with await _listener(path) as sock:
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000"})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(notifier.keep_alive, lambda: healthy)
            beats = []
            for _ in range(3):
                assert await _receive(sock, 20) == "WATCHDOG=1"
                beats.append(trio.current_time())
            assert [b - beats[0] for b in beats] == pytest.approx([0, 15, 30])
            healthy = False
            with trio.move_on_after(60):
                await _receive(sock, 60)
                pytest.fail("beat while unhealthy")
            healthy = True
            assert await _receive(sock, 20) == "WATCHDOG=1"
            nursery.cancel_scope.cancel()


# --- credentials --------------------------------------------------------------------------------


def test_credential(tmp_path: Path) -> None:
    (tmp_path / "jwt_secret").write_text("s3cret value\n")
    (tmp_path / "raw").write_text("no newline")
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    assert credential("jwt_secret", env) == "s3cret value"
    assert credential("raw", env) == "no newline"
    assert credential("missing", env) is None
    assert credential("jwt_secret", {}) is None
    for bad in ("", "../jwt_secret", "..", "a/b"):
        with pytest.raises(ValueError, match="credential name"):
            credential(bad, env)


# --- the unit file ------------------------------------------------------------------------------


def _unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as (key, value) lists: keys may repeat (SystemCallFilter)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if match := re.fullmatch(r"\[(\w+)\]", line):
            current = sections.setdefault(match.group(1), [])
            continue
        assert current is not None, f"assignment outside a section: {line!r}"
        assert not line.endswith("\\"), "continuation lines are not used"
        key, sep, value = line.partition("=")
        assert sep, f"not an assignment: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def test_unit_file_has_the_required_settings() -> None:
    sections = _unit(UNIT.read_text())
    assert set(sections) == {"Unit", "Service", "Install"}
    service: dict[str, list[str]] = {}
    for key, value in sections["Service"]:
        service.setdefault(key, []).append(value)
    one = {key: values[-1] for key, values in service.items()}
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecStart": (
            "/opt/trio-chat/.venv/bin/trio-chat serve --config /etc/trio-chat/trio-chat.toml"
        ),
        "Restart": "on-failure",
        "WatchdogSec": "30",
        "KillSignal": "SIGTERM",
        "TimeoutStopSec": "20",
        "DynamicUser": "yes",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "CapabilityBoundingSet": "",
        "UMask": "0077",
        "LoadCredential": "jwt_secret:/etc/trio-chat/jwt_secret",
        "EnvironmentFile": "-/etc/trio-chat/secrets.env",
    }
    assert {key: one.get(key) for key in expected} == expected
    assert "@system-service" in service["SystemCallFilter"]
    # the stop timeout leaves the drain (server.shutdown_timeout, 10 s) time to finish
    assert float(one["TimeoutStopSec"]) > 10
    assert ("WantedBy", "multi-user.target") in sections["Install"]


def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # make test installs systemd-analyze (Debian's systemd) and trio-chat into the venv
    assert shutil.which("systemd-analyze") is not None, "run the tests with make test"
    # verify insists that ExecStart's binary exists: point it at this checkout's.
    here = Path(sys.executable).parent / "trio-chat"
    assert here.exists(), f"{here} is not installed"
    unit = tmp_path / "trio-chat.service"
    unit.write_text(UNIT.read_text().replace("/opt/trio-chat/.venv/bin/trio-chat", str(here)))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Unknown keys and bad values are only warnings, naming the file: none allowed.
    assert unit.name not in output, output


async def test_a_live_server_says_ready_then_stopping(short_dir: Path, tmp_path: Path) -> None:
    """`trio-chat serve` under a NOTIFY_SOCKET: READY=1 once listening, STOPPING=1 on SIGTERM,
    then exit 0."""
    import os
    import signal
    import subprocess
    import sys

    path = str(short_dir / "notify")
    with await _listener(path) as sock:
        env = {**os.environ, "NOTIFY_SOCKET": path, "TRIO_CHAT_AUTH_JWT_SECRET": "s" * 64}
        command = [sys.executable, "-m", "trio_chat", "serve", "--port", "0", "--admin-port", "0"]
        with (tmp_path / "serve.log").open("wb") as log:
            process = subprocess.Popen(command, env=env, stderr=log)
        try:
            received = [await _receive(sock, 20)]
            while not received[-1].startswith("READY=1"):
                received.append(await _receive(sock, 20))
            process.send_signal(signal.SIGTERM)
            while not received[-1].startswith("STOPPING=1"):
                received.append(await _receive(sock, 20))
            with trio.fail_after(20):
                while process.poll() is None:
                    await trio.sleep(0.05)
        finally:
            process.kill()
            process.wait()
    assert process.returncode == 0
    assert [m.split("\n")[0] for m in received if m.startswith(("READY", "STOPPING"))] == [
        "READY=1",
        "STOPPING=1",
    ]
