"""The developer tools work against a live server: the embedding example, the terminal client."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import trio
from _chat import make_config, make_token, start

from trio_chat.client import open_client

ROOT = Path(__file__).resolve().parent.parent


async def run_example(name: str) -> list[str]:
    """Run ``examples/<name>`` to its end; its lines of output."""
    with trio.fail_after(30):
        result = await trio.run_process(
            [sys.executable, str(ROOT / "examples" / name)], capture_stdout=True
        )
    return result.stdout.decode().splitlines()


async def test_embedding_example_runs():
    lines = await run_example("embed.py")
    assert lines[1] == "bob got: 'hello from the embedding app' from alice"
    assert lines[-1] == "stopped cleanly"


async def test_moderated_example_runs():
    """examples/moderated.py: the join hook refuses carol, the send hook masks, the bot rolls."""
    lines = await run_example("moderated.py")
    assert lines[0] == "carol was refused: forbidden: team-a is for its members"
    assert lines[1] == "bob got from alice: well, ****"
    assert lines[2] == "bob got from alice: /roll"
    assert re.fullmatch(r"bob got from dice-bot: alice rolled [1-6]", lines[3])
    assert lines[-1] == "stopped cleanly"


def test_examples_and_readme_import_nothing_private():
    """An embedding needs only what ``trio_chat`` exports (and the public client)."""
    texts = [path.read_text() for path in (ROOT / "examples").glob("*.py")]
    texts.append((ROOT / "README.md").read_text())
    for text in texts:
        assert not re.search(r"(from|import) trio_chat\._", text)


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
