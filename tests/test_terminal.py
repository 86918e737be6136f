"""``trio-chat client`` in the terminal: joins, leaves and typing of the others (SPEC §15), and
its own typing signals when it reads keys from a terminal (a pseudo-terminal here)."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import termios
from functools import partial
from typing import TYPE_CHECKING, Any

import attrs
import trio
from _chat import make_config, make_token, start

import trio_chat
from trio_chat._cli.terminal import LineEditor, describe
from trio_chat._config import RoomOptions
from trio_chat.client import open_client

if TYPE_CHECKING:
    from pathlib import Path

TIME_LIMIT = 30


class Names:
    async def connect(self, event: trio_chat.ConnectEvent) -> trio_chat.Allow:
        return trio_chat.Allow(info={"name": event.user.title()})


class Screen:
    """What the terminal client printed so far, read from its output as needed."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.text = b""

    async def until(self, needle: bytes, count: int = 1) -> None:
        while self.text.count(needle) < count:
            chunk = await self.stream.receive_some()
            assert chunk, f"output ended before {needle!r}: {self.text.decode()}"
            self.text += chunk


def _command(server: trio_chat.Server, user: str) -> list[str]:
    return [sys.executable, "-m", "trio_chat", "client", server.url, "--token", make_token(user)]


def test_the_line_editor_does_what_a_terminal_does():
    editor = LineEditor()
    assert editor.feed(b"hel") == ([], True, False)
    # backspace, Ctrl-W (a word), an arrow key (ignored), a character split across reads
    assert editor.feed(b"lo\x7f\x7fp wor\x17x\x1b[Ay\xc3") == ([], True, False)
    assert editor.feed(b"\xa9\r/who\n") == (["help xy\u00e9", "/who"], False, False)
    assert editor.feed(b"abc\x15") == ([], True, False)
    assert editor.line == ""
    assert editor.feed(b"\x04") == ([], False, True)  # Ctrl-D on an empty line: the end


def test_presence_is_described_with_names():
    frame = {
        "type": "presence",
        "room": "lobby",
        "users": [
            {"user": "alice", "info": {"name": "Alice"}, "sessions": 2},
            {"user": "bob", "info": None, "sessions": 1},
        ],
        "count": 1002,
        "truncated": True,
    }
    assert describe(frame) == "* [lobby] 1002 here: Alice (2 sessions), bob, and 1000 more"
    assert describe({"type": "joined", "room": "lobby", "read": None, "unread": 3}) == (
        "* joined lobby (3 unread)"
    )


async def test_it_shows_who_joins_leaves_and_types(nursery, tmp_path: Path):
    lobby = RoomOptions(match="lobby", presence_events=True)
    config = attrs.evolve(make_config(), rooms=(lobby,))
    server: trio_chat.Server = await nursery.start(partial(trio_chat.serve, hooks=Names()), config)
    typing: dict[str, Any] = {"typing": True}
    with trio.fail_after(TIME_LIMIT), (tmp_path / "stderr").open("wb") as errors:
        process = await trio.lowlevel.open_process(
            _command(server, "alice"), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors
        )
        try:
            assert process.stdin is not None
            assert process.stdout is not None
            screen = Screen(process.stdout)
            await process.stdin.send_all(b"/join lobby\n")
            await screen.until(b"* joined lobby")
            async with open_client(server.url, make_token("bob")) as bob:
                await bob.join("lobby")
                await screen.until(b"* [lobby] Bob joined\n")
                for _ in range(3):  # one burst of typing: shown once
                    await bob.signal("lobby", typing)
                await bob.send("lobby", "hi")
                await screen.until(b"[lobby] bob: hi\n")
                typed_once = screen.text.count(b"[lobby] Bob is typing\xe2\x80\xa6\n")
                await bob.signal("lobby", typing)  # after a message: news again
                await bob.send("lobby", "again")
                await screen.until(b"[lobby] bob: again\n")
                typed_twice = screen.text.count(b"[lobby] Bob is typing\xe2\x80\xa6\n")
                await process.stdin.send_all(b"/who\n")
                await screen.until(b"* [lobby] 2 here: ")
                await process.stdin.send_all(b"hello from the terminal\n")
                # from a pipe, whole lines: no typing signal comes before the message
                message = await bob.receive()
            await screen.until(b"* [lobby] Bob left\n")
            await process.stdin.aclose()
            assert await process.wait() == 0
        finally:
            process.kill()
    (who,) = [line for line in screen.text.decode().splitlines() if " here: " in line]
    assert sorted(who.removeprefix("* [lobby] 2 here: ").split(", ")) == ["Alice", "Bob"]
    assert (typed_once, typed_twice) == (1, 2)
    assert (message["type"], message["data"]) == ("message", "hello from the terminal")


async def test_on_a_terminal_typing_sends_a_signal_at_most_every_two_seconds(
    nursery, tmp_path: Path
):
    server = await start(nursery, make_config())
    master, slave = pty.openpty()
    try:
        with trio.fail_after(TIME_LIMIT), (tmp_path / "stderr").open("wb") as errors:
            process = await trio.lowlevel.open_process(
                _command(server, "alice"), stdin=slave, stdout=slave, stderr=errors
            )
            keys = trio.lowlevel.FdStream(os.dup(master))
            screen = Screen(keys)
            try:
                async with open_client(server.url, make_token("bob")) as bob:
                    await bob.join("lobby")
                    await screen.until(b"* connected as alice")
                    await keys.send_all(b"/join lobby\r")
                    await screen.until(b"* joined lobby")
                    raw = termios.tcgetattr(slave)[3]
                    await keys.send_all(b"hel")
                    signal = await bob.receive()
                    await keys.send_all(b"lo")  # within 2 s of the first: no second signal
                    await screen.until(b"\x1b[Khello")  # (read on its own, not with the rest)
                    await keys.send_all(b"\x7fo!\r")
                    message = await bob.receive()  # the next frame: the message itself
                    await keys.send_all(b"/wh")  # a command is not typing
                    await screen.until(b"\x1b[K/wh")
                    await keys.send_all(b"o\r")
                    await screen.until(b"* [lobby] 2 here: ")
                    with trio.move_on_after(0.5) as quiet:
                        extra = await bob.receive()
                    await keys.send_all(b"\x04")  # Ctrl-D: the end
                    assert await process.wait() == 0
                restored = termios.tcgetattr(slave)[3]
            finally:
                process.kill()
                await keys.aclose()
    finally:
        os.close(master)
        os.close(slave)
    assert signal == {"type": "signal", "room": "lobby", "from": "alice", "data": {"typing": True}}
    assert (message["type"], message["data"]) == ("message", "hello!")
    assert quiet.cancelled_caught, f"unexpected {extra}"
    assert b"hello!\r\n" in screen.text  # the line stays on the screen as typed
    line_mode = termios.ICANON | termios.ECHO
    assert (raw & line_mode, restored & line_mode) == (0, line_mode)
