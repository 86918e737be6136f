"""The servers under test: trio-chat (one process, or a supervisor and its workers),
python-socketio and Node.js Socket.IO; what their logs say; and the copy of trio_chat/ the
trio-chat servers run from (with a digest of its code)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator


from .processes import child, free_port, wait_for
from .settings import (
    BENCH_PYTHON,
    HISTORY_SIZE,
    HOOKS_SECRET,
    LABEL_REDIS,
    NODE_PEER,
    PEERS,
    ROOT,
    SECRET,
    SYSTEMS,
    TRIO_CONFIG,
    TRIO_ENV,
    TRIO_HOOKS,
    TRIO_LAYOUT,
    TRIO_PYTHON,
    TRIO_SRC,
    BenchError,
)


def _children(pid: int) -> set[int]:
    """The child processes of ``pid``, whichever of its threads started them (trio starts
    subprocesses from a worker thread)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found.update(int(p) for p in (task / "children").read_text().split())
    return found


def _is_worker(pid: int, instance_id: str) -> bool:
    """Whether ``pid`` is still the trio-chat worker ``instance_id`` (not a reused pid)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return instance_id.encode() in argv


@contextlib.contextmanager
def trio_chat_server(
    workdir: Path, redis_url: str, name: str, workers: int = 1
) -> Iterator[tuple[str, list[int]]]:
    """One trio-chat process; with ``workers`` > 1 a supervisor of that many workers (instance
    ids ``<name>-w<n>``) on one fixed port (``--workers`` refuses port 0). Yields its URL and
    the pids whose CPU and RSS count: the process itself, or the supervisor then each worker."""
    env = {
        **os.environ,
        "TRIO_CHAT_AUTH_JWT_SECRET": SECRET,
        "TRIO_CHAT_ADMIN_ENABLED": "false",
        "TRIO_CHAT_LIMITS_SEND_RATE": "100000",
        "TRIO_CHAT_LIMITS_SEND_BURST": "100000",
        "TRIO_CHAT_LIMITS_FRAME_RATE": "100000",
        "TRIO_CHAT_LIMITS_FRAME_BURST": "100000",
        "TRIO_CHAT_LIMITS_SIGNAL_RATE": "100000",
        "TRIO_CHAT_LIMITS_SIGNAL_BURST": "100000",
        "TRIO_CHAT_LIMITS_MAX_SESSIONS_PER_USER": "100000",
        "TRIO_CHAT_LIMITS_MAX_CONNECTIONS": "100000",
        **({} if HISTORY_SIZE[0] is None else {"TRIO_CHAT_HISTORY_SIZE": str(HISTORY_SIZE[0])}),
        **TRIO_ENV,
    }
    port = free_port() if workers > 1 else 0
    if TRIO_HOOKS[0] == "python":
        command = [str(TRIO_PYTHON), str(PEERS / "trio_python_hooks.py"), "--host", "127.0.0.1"]
    else:
        command = [str(TRIO_PYTHON), "-m", "trio_chat", "serve", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--redis-url", redis_url, "--instance-id", name]
    if workers > 1:
        command += ["--workers", str(workers)]
    if TRIO_CONFIG[0] is not None:
        command += ["--config", str(TRIO_CONFIG[0])]
    # one log for the supervisor and its workers (they inherit its stdout and stderr)
    log = workdir / f"{name}.log"
    ids = [f"{name}-w{n}" for n in range(workers)] if workers > 1 else [name]
    worker_pids: dict[int, int] = {}
    try:
        with contextlib.ExitStack() as stack:
            if TRIO_HOOKS[0] == "http":
                env.update(_hooks_app(stack, workdir, name))
            process = stack.enter_context(child(command, log, env=env, cwd=TRIO_SRC[0]))
            found: list[str] = []

            def ready() -> bool:
                text = log.read_text(errors="replace")
                matches = [
                    re.search(rf"instance {re.escape(i)} listening on (wss?://\S+)", text)
                    for i in ids
                ]
                if not all(matches):
                    return False
                found.extend(m.group(1) for m in matches if m)
                for n, pid in re.findall(r"worker (\d+) started \(pid (\d+)\)", text):
                    worker_pids[int(n)] = int(pid)  # the last start of each worker counts
                return True

            wait_for(ready, process, name, log)
            if workers > 1:
                children = _children(process.pid)
                if set(worker_pids.values()) != children or len(children) != workers:
                    raise BenchError(
                        f"{name}: workers {worker_pids} in the log, children {children} in /proc"
                    )
            pids = [process.pid] + [worker_pids[n] for n in sorted(worker_pids)]
            yield found[0], pids
    finally:
        # SIGKILL after STOP_TIMEOUT reaches the supervisor only: its workers would live on
        for n, pid in worker_pids.items():
            if _is_worker(pid, ids[n]):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


def _hooks_app(stack: contextlib.ExitStack, workdir: Path, name: str) -> dict[str, str]:
    """Start peers/hooks_allow.py for instance ``name`` (closed with ``stack``); return the
    environment that points the instance's ``send`` hook at it."""
    port = free_port()
    command = [str(TRIO_PYTHON), str(PEERS / "hooks_allow.py"), "--port", str(port)]
    command += ["--secret", HOOKS_SECRET]
    log = workdir / f"{name}-hooks.log"
    app = stack.enter_context(child(command, log))
    wait_for(lambda: "Running on" in log.read_text(errors="replace"), app, f"{name}-hooks", log)
    return {
        "TRIO_CHAT_HOOKS_URL": f"http://127.0.0.1:{port}/hooks",
        "TRIO_CHAT_HOOKS_SECRET": HOOKS_SECRET,
        "TRIO_CHAT_HOOKS_CALLS": "send",
    }


@contextlib.contextmanager
def socketio_server(workdir: Path, redis_url: str, name: str) -> Iterator[tuple[str, list[int]]]:
    env = {**os.environ, "TRIO_CHAT_AUTH_JWT_SECRET": SECRET, "BENCH_REDIS_URL": redis_url}
    port = free_port()
    command = [str(BENCH_PYTHON), "-m", "uvicorn", "--app-dir", str(PEERS), "socketio_server:app"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--loop", "asyncio", "--http", "h11"]
    command += ["--ws", "websockets", "--ws-per-message-deflate", "false", "--lifespan", "off"]
    command += ["--timeout-graceful-shutdown", "5"]
    log = workdir / f"{name}.log"
    with child(command, log, env=env, cwd=ROOT) as process:

        def ready() -> bool:
            return "Uvicorn running on" in log.read_text(errors="replace")

        wait_for(ready, process, name, log)
        yield f"http://127.0.0.1:{port}", [process.pid]


@contextlib.contextmanager
def socketio_node_server(
    workdir: Path, redis_url: str, name: str
) -> Iterator[tuple[str, list[int]]]:
    """One Node.js Socket.IO peer (bench/peers/socketio-node/server.mjs) on a port of its own
    choosing (--port 0); ready once it prints "socketio-node running on http://HOST:PORT"."""
    env = {**os.environ, "TRIO_CHAT_AUTH_JWT_SECRET": SECRET, "BENCH_REDIS_URL": redis_url}
    command = ["node", str(NODE_PEER / "server.mjs"), "--host", "127.0.0.1", "--port", "0"]
    command += ["--name", name]
    log = workdir / f"{name}.log"
    with child(command, log, env=env, cwd=NODE_PEER) as process:
        found: list[str] = []

        def ready() -> bool:
            text = log.read_text(errors="replace")
            match = re.search(r"socketio-node running on (http://127\.0\.0\.1:\d+)", text)
            if match:
                found.append(match.group(1))
            return match is not None

        wait_for(ready, process, name, log)
        yield found[0], [process.pid]


def system_label(system: str) -> str:
    """The system's name in the tables: trio-chat with its layout, e.g. "trio-chat (1x2)", and
    the history size when --history-size gave one ("trio-chat (2x1, history 0)")."""
    if system != "trio":
        return SYSTEMS[system]
    history = "" if HISTORY_SIZE[0] is None else f", history {HISTORY_SIZE[0]}"
    hooks = "" if TRIO_HOOKS[0] == "none" else f", {TRIO_HOOKS[0]} send hook"
    config = "" if TRIO_CONFIG[0] is None else f", --config {TRIO_CONFIG[0].name}"
    return f"{SYSTEMS[system]} ({TRIO_LAYOUT[0]}{history}{hooks}{config}{LABEL_REDIS[0]})"


def connections_by_instance(workdir: Path) -> dict[str, int]:
    """Connections each trio-chat instance (worker) accepted, from its ``connected`` lines."""
    counts: Counter[str] = Counter()
    for log in sorted(workdir.glob("trio-*.log")):
        text = log.read_text(errors="replace")
        counts.update(re.findall(r": connected user=\S+ session=\S+ instance=(\S+)", text))
    return dict(sorted(counts.items()))


def log_notes(workdir: Path) -> list[str]:
    """Warnings, errors and exceptions in the server logs, counted by message shape."""
    notes: list[str] = []
    for log in sorted(workdir.glob("*.log")):
        if log.name.startswith("redis"):  # redis.log, a cluster's redis-<port>.log
            continue
        shapes: Counter[str] = Counter()
        for line in log.read_text(errors="replace").splitlines():
            if re.search(r"\b(WARNING|ERROR|CRITICAL)\b", line):
                shape = re.sub(r"^\S+ \S+ ", "", line)  # drop the timestamp
            elif match := re.match(r"^[\s|+]*(\w+(Error|Exception|Exit)\w*: .*)$", line):
                shape = "raised " + match.group(1)
            else:
                continue
            shape = re.sub(r"session[= ]\S+", "session <id>", shape)
            shape = re.sub(r"\b[0-9a-f]{8,}\b|\d+(\.\d+)?", "#", shape)
            shapes[shape[:200]] += 1
        for shape, count in shapes.most_common(6):
            notes.append(f"{log.name}: {count} x {shape}")
    return notes


def source_digest(root: Path = ROOT) -> str:
    """A digest of trio_chat/**/*.py under ``root``, subpackages included: the code the servers
    import. Each file's path relative to ``root`` and its bytes, in the order of those paths (as
    strings: the same on every Python, and on a flat trio_chat/ the order it always had)."""
    import hashlib

    digest = hashlib.sha256()
    files = {path.relative_to(root).as_posix(): path for path in (root / "trio_chat").rglob("*.py")}
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name].read_bytes())
    return digest.hexdigest()[:12]


def snapshot_source(logs: Path) -> str:
    """Copy trio_chat/ to ``logs``/src and run the servers from there; describe the copy."""
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "trio_chat"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout.strip()
    target = logs / "src"
    shutil.copytree(
        ROOT / "trio_chat", target / "trio_chat", ignore=shutil.ignore_patterns("__pycache__")
    )
    TRIO_SRC[0] = target
    return (
        f"{head}{' + uncommitted changes in trio_chat/' if dirty else ''}, copied to "
        f"{target} (trio_chat/**/*.py sha256 {source_digest(target)})"
    )
