"""Replay time of ``join {room, since}`` (SPEC §11): how long a returning client waits for
what it missed.

Starts a throwaway redis-server on a free port of 127.0.0.1 and one ``trio-chat serve`` on it
(the same way ``run.py`` does, from a copy of ``trio_chat/``), then, in one room:

- "reader" is joined and has seen message id L; it disconnects;
- "writer" sends ``--missed`` messages (pipelined) and reads their acks (their ids);
- "reader" connects again (timed separately: connect + ``welcome``), and the clock starts
  just before it writes ``join {room, since: L}``; it stops when the last of the missed
  ``message`` frames has been read. ``joined`` must say ``missed`` = ``--missed``, and the
  frames must carry exactly the acked ids, in order. L becomes the last of them.

``--warmup`` rounds first, not counted. The time includes the client reading and parsing the
frames (Python, trio-websocket), in the same process. Percentiles are nearest-rank, in ms.
Everything is stopped again at the end (SIGTERM, SIGKILL after 15 s), also on Ctrl-C.

Run: .venv/bin/python bench/replay.py [--rounds 50] [--missed 200] [--history-size N]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import run  # bench/run.py: the process helpers
import trio

from trio_chat.client import ChatClient, open_client

ROOM = "replay"
ROUND_TIMEOUT = 30.0


async def send_batch(writer: ChatClient, count: int, payload: str, start: int) -> list[str]:
    """``count`` sends written back to back, then their acks read: the acked ids, in order."""
    refs = {}
    for k in range(count):
        ref = 1_000_000 + start + k
        refs[ref] = k
        frame = {"type": "send", "ref": ref, "room": ROOM, "data": {"n": start + k, "p": payload}}
        await writer.send_frame(frame)
    ids: list[str | None] = [None] * count
    while refs:
        frame = await writer.receive()
        if frame.get("type") == "error":
            raise run.BenchError(f"writer got {frame}")
        if frame.get("type") == "ack" and frame.get("ref") in refs:
            ids[refs.pop(frame["ref"])] = frame["id"]
    return [i for i in ids if i is not None]


async def rounds(url: str, args: argparse.Namespace) -> dict[str, Any]:
    payload = "x" * args.payload
    replay_ms: list[float] = []
    joined_ms: list[float] = []
    connect_ms: list[float] = []
    recovered: Counter[bool] = Counter()
    sent = 0
    async with open_client(url, run.token("writer")) as writer:
        await writer.join(ROOM)
        # the reader's first visit: one message seen
        async with open_client(url, run.token("reader")) as reader:
            await reader.join(ROOM)
            (last,) = await send_batch(writer, 1, payload, sent)
            sent += 1
            with trio.fail_after(ROUND_TIMEOUT):
                while (frame := await reader.receive()).get("type") != "message":
                    pass
            if frame["id"] != last:
                raise run.BenchError(f"reader saw {frame['id']}, writer was acked {last}")
        for n in range(args.warmup + args.rounds):
            with trio.fail_after(ROUND_TIMEOUT):
                acked = await send_batch(writer, args.missed, payload, sent)
                sent += args.missed
                t_connect = time.perf_counter()
                async with open_client(url, run.token("reader")) as reader:
                    t0 = time.perf_counter()
                    joined = await reader.request("join", room=ROOM, since=last)
                    t_joined = time.perf_counter()
                    got = [await reader.receive() for _ in range(joined["missed"])]
                    t1 = time.perf_counter()
                ids = [f["id"] for f in got]
                if joined["missed"] != args.missed or ids != acked:
                    raise run.BenchError(
                        f"round {n}: joined {joined}, got {len(ids)} frames; ids match the acks: "
                        f"{ids == acked}"
                    )
                if any(f.get("type") != "message" for f in got):
                    raise run.BenchError(f"round {n}: not only message frames: {got[:3]}")
                last = ids[-1]
            if n < args.warmup:
                continue
            recovered[joined["recovered"]] += 1
            connect_ms.append((t0 - t_connect) * 1000)
            joined_ms.append((t_joined - t0) * 1000)
            replay_ms.append((t1 - t0) * 1000)
            await trio.sleep(args.pause)
    # what the client side alone costs: parsing the frames of one replay, as _read does
    raw = [json.dumps(f) for f in got]
    t = time.perf_counter()
    for text in raw:
        json.loads(text)
    parse_ms = (time.perf_counter() - t) * 1000
    return {
        "replay_ms": replay_ms,
        "joined_ms": joined_ms,
        "connect_ms": connect_ms,
        "recovered": {str(k).lower(): v for k, v in recovered.items()},
        "frame_bytes": sum(map(len, raw)) // len(raw),
        "client_json_parse_ms": round(parse_ms, 3),
    }


def row(label: str, samples: list[float]) -> str:
    cells = [run.percentile(samples, q) for q in (50, 90, 99)] + [max(samples)]
    return f"| {label} | {len(samples)} | " + " | ".join(f"{v:.2f}" for v in cells) + " |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50, help="measured rounds (50)")
    parser.add_argument("--warmup", type=int, default=5, help="rounds first, not counted (5)")
    parser.add_argument("--missed", type=int, default=200, help="messages missed per round (200)")
    parser.add_argument("--payload", type=int, default=100, help="bytes of filler per message")
    parser.add_argument("--pause", type=float, default=0.1, help="seconds between rounds (0.1)")
    parser.add_argument(
        "--history-size",
        type=int,
        help="TRIO_CHAT_HISTORY_SIZE (default: the server's default, 200)",
    )
    parser.add_argument("--json", help="also write the samples to this file")
    args = parser.parse_args()
    if args.history_size is not None:
        run.HISTORY_SIZE[0] = args.history_size
    logs = Path(tempfile.mkdtemp(prefix="trio-chat-replay-"))
    source = run.snapshot_source(logs)
    print(f"trio-chat under test: {source}; logs in {logs}", file=sys.stderr)
    load_before = os.getloadavg()
    started = time.monotonic()
    try:
        with contextlib.ExitStack() as stack:
            redis_url, _ = stack.enter_context(run.redis_server(logs))
            url, _ = stack.enter_context(run.trio_chat_server(logs, redis_url, "trio-replay"))
            result = trio.run(rounds, url, args)
    except run.BenchError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - started
    load_after = os.getloadavg()
    history = run.HISTORY_SIZE[0]
    date = datetime.date.today().isoformat()
    print(
        f"\n{date}, replay of {args.missed} missed messages ({args.payload}-byte filler, "
        f"{result['frame_bytes']}-byte frames), history.size "
        f"{'200 (default)' if history is None else history}, {elapsed:.0f} s wall\n"
    )
    print("| measured | rounds | p50 ms | p90 ms | p99 ms | max ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    print(row("join {since} sent → last missed frame read", result["replay_ms"]))
    print(row("join {since} sent → joined read", result["joined_ms"]))
    print(row("(reconnect: connect → welcome)", result["connect_ms"]))
    print(
        f"\njoined.recovered: {result['recovered']}; the client's json.loads of one replay's "
        f"frames alone: {result['client_json_parse_ms']} ms"
    )
    print(
        f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min); "
        f"nproc {len(os.sched_getaffinity(0))}, Python {platform.python_version()}; {source}"
    )
    print(f"Server logs: {logs}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), **result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
