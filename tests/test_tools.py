"""The developer tools work against a live server: the embedding example, the terminal client."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import trio
from _chat import make_config, make_token, start

from trio_chat.client import open_client

ROOT = Path(__file__).resolve().parent.parent


async def test_embedding_example_runs():
    with trio.fail_after(30):
        result = await trio.run_process(
            [sys.executable, str(ROOT / "examples" / "embed.py")], capture_stdout=True
        )
    lines = result.stdout.decode().splitlines()
    assert lines[1] == "bob got: 'hello from the embedding app' from alice"
    assert lines[-1] == "stopped cleanly"


async def test_terminal_client_chats_with_a_live_server(nursery):
    server = await start(nursery, make_config())
    command = [sys.executable, "-m", "trio_chat", "client", server.url, "--token"]
    command.append(make_token("alice"))
    with trio.fail_after(30):
        async with open_client(server.url, make_token("bob")) as bob:
            await bob.join("lobby")
            for n in range(12):
                await bob.send("lobby", f"earlier {n}")
            process = await trio.lowlevel.open_process(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE
            )
            try:
                assert process.stdin is not None
                assert process.stdout is not None
                await process.stdin.send_all(b"/join lobby\nhello from the terminal\n")
                message = await bob.receive()
                assert (message["from"], message["data"]) == ("alice", "hello from the terminal")
                await bob.send("lobby", "hi alice")
                output = b""
                while b"[lobby] bob: hi alice" not in output:
                    output += await process.stdout.receive_some()
                await process.stdin.send_all(b"/history\n")
                while b"bob: earlier 1\n" not in output:
                    output += await process.stdout.receive_some()
                await process.stdin.send_all(b"/history\n")
                while b"no earlier messages" not in output:
                    output += await process.stdout.receive_some()
                await process.stdin.aclose()  # end of input: the client says goodbye
                assert await process.wait() == 0
            finally:
                process.kill()
    text = output.decode()
    assert "* connected as alice" in text
    assert "* joined lobby" in text
    # /join shows the last ten, /history the two before them, then says there are no more
    shown = [
        line.removeprefix("[lobby] bob: ") for line in text.splitlines() if "bob: earl" in line
    ]
    assert shown == [f"earlier {n}" for n in (*range(2, 12), 0, 1)]
