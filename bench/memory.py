"""Where an idle joined connection's memory goes: tracemalloc in a server holding N of them.

    .venv/bin/python bench/memory.py [--connections 2000] [--top 25] [--group file|line|trace]

The server (`trio_chat.serve`, memory backend, in this process) runs under tracemalloc; a child
process opens the connections (each joins a room of its own) and holds them while this process
compares snapshots taken before and after. Allocations are grouped by the first frame outside
trio-chat's own helpers that asked for them (`--group file`: by file), so the table says which
library, and which of our lines, the KiB per connection belong to. RSS growth per connection is
printed too, though RSS is what `bench/run.py --workloads C` measures, from outside, as the
benchmark figure; tracemalloc does not count the interpreter's own free lists and arenas.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from _chat import make_config, make_token  # noqa: E402

from trio_chat import serve  # noqa: E402

CLIENT = """
import sys, trio
from trio_chat.client import open_client

async def main(url, tokens):
    joined, done = [], trio.Event()
    limit = trio.Semaphore(100)

    async def one(n, token):
        async with limit:
            chat_context = open_client(url, token)
            chat = await chat_context.__aenter__()
            await chat.join(f"idle-{n}")
        joined.append(n)
        if len(joined) == len(tokens):
            print("READY", flush=True)
        await done.wait()
        await chat_context.__aexit__(None, None, None)

    async with trio.open_nursery() as nursery:
        for n, token in enumerate(tokens):
            nursery.start_soon(one, n, token)
        await trio.to_thread.run_sync(sys.stdin.readline)
        done.set()

url, *tokens = sys.stdin.readline().split()
trio.run(main, url, tokens)
"""


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def main(args: argparse.Namespace) -> None:
    config = make_config("memory://", "memory-bench")
    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve, config)
        tokens = [make_token(f"u{n}") for n in range(args.connections)]
        child = await trio.lowlevel.open_process(
            [sys.executable, "-c", CLIENT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert child.stdin is not None and child.stdout is not None
        gc.collect()
        before, rss_before = tracemalloc.take_snapshot(), rss_kib()
        await child.stdin.send_all((" ".join([server.url, *tokens]) + "\n").encode())
        line = b""
        while not line.endswith(b"\n"):
            line += await child.stdout.receive_some(100)
        assert line.startswith(b"READY"), line
        await trio.sleep(1)  # let the last handshakes settle
        gc.collect()
        after, rss_after = tracemalloc.take_snapshot(), rss_kib()
        await child.stdin.send_all(b"\n")
        await child.wait()
        nursery.cancel_scope.cancel()

    n = args.connections
    key = {"file": "filename", "line": "lineno", "trace": "traceback"}[args.group]
    stats = after.compare_to(before, key)
    total = sum(stat.size_diff for stat in stats)
    print(f"{n} idle joined connections: tracemalloc {total / n / 1024:.2f} KiB each, "
          f"RSS {(rss_after - rss_before) / n:.2f} KiB each")
    for stat in stats[: args.top]:
        frames = list(stat.traceback)[: 1 if args.group != "trace" else 6]
        where = " <- ".join(f"{_short(f.filename)}:{f.lineno}" for f in frames)
        print(f"{stat.size_diff / n:8.0f} B {stat.count_diff / n:6.1f} objs  {where}")


def _short(filename: str) -> str:
    """``package/module.py`` of a path in site-packages or the project."""
    path = Path(filename)
    return "/".join(path.parts[-2:])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--group", choices=("file", "line", "trace"), default="line")
    parser.add_argument("--frames", type=int, default=8, help="tracemalloc frames kept")
    arguments = parser.parse_args()
    tracemalloc.start(arguments.frames)
    trio.run(main, arguments)
