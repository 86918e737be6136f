"""What every part of the soak shares: the instances' settings and timeouts, SoakError, stream
ids as integers, free ports and quiet subprocess runs."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent  # bench/_soak/common.py
#: --hooks: the HMAC key the instances sign with and peers/hooks_allow.py checks
HOOKS_SECRET = "soak-hooks-secret"

SECRET = "soak-secret-" + "s" * 52
ADMIN_KEY = "soak-admin-key"
#: short, so that the end-of-run leak check is quick (the heartbeat runs every second)
SESSION_TTL = 6
INSTANCE_TTL = 3
SHUTDOWN_TIMEOUT = 8
REFRESH_WINDOW = 15
START_TIMEOUT = 30.0
PROGRESS_EVERY = 10.0
#: close codes the server uses on purpose (SPEC §7); the rest are counted as they come
LOGOUT, BANNED, EXPIRED = 4000, 4403, 4401


class SoakError(Exception):
    """The soak could not run (not: the invariant failed)."""


def now_ms() -> float:
    """Wall-clock milliseconds: the clock Redis stamps stream ids with (same machine)."""
    return time.time() * 1000


def parse_id(text: str) -> int:
    """A stream id ``<ms>-<seq>`` as one comparable integer."""
    ms, _, seq = text.partition("-")
    return (int(ms) << 32) | int(seq)


def format_id(value: int) -> str:
    return f"{value >> 32}-{value & 0xFFFFFFFF}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def run_quiet(argv: list[str], *, check: bool = True, timeout: float = 20.0) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise SoakError(f"{' '.join(argv)}: {result.stderr.strip() or result.returncode}")
    return result.stdout
