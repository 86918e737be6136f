"""``trio-chat client``: an interactive terminal client on :mod:`trio_chat.client`.

Lines typed are commands (``/join ROOM``, ``/leave ROOM``, ``/room ROOM``, ``/history``,
``/who``, ``/direct USER TEXT``, ``/ping``, ``/quit``) or text sent to the current room; frames
from the server are printed one per line as they arrive. ``/join`` shows the room's last
messages, ``/history`` the ones before the earliest shown, and ``/who`` who is in the room.
End of input closes the connection.

Other people (SPEC §15): "* [lobby] Bob joined" and "* [lobby] Bob left" when the room has
presence events on (the connect hook's ``info.name`` when it gives one, else the user id), and
"[lobby] Bob is typing…" once per burst of ``signal {"typing": true}``: not again for signals
that follow the previous one within :data:`TYPING_SHOWN_FOR` seconds, again after a message.

Typing: on a terminal, keys are read one by one, with the little editing a terminal does
itself (backspace, Ctrl-U, Ctrl-W, Ctrl-D on an empty line), so that while text for the room
is being typed the client sends ``signal {"typing": true}``, at most one per
:data:`TYPING_EVERY` seconds; not for commands. With input from a pipe or a file, whole lines
are read and no signal is sent: one just before the message it announces would say nothing.
"""

from __future__ import annotations

import codecs
import json
import math
import os
import sys
import termios
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, TextIO

import attrs
import trio

from ..client import ChatClient, ConnectionClosed, open_client

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

HELP = (
    "commands: /join ROOM  /leave ROOM  /room ROOM  /history  /who  /direct USER TEXT  /ping  /quit"
)
#: messages shown on /join, and per /history
JOIN_PAGE, HISTORY_PAGE = 10, 20
#: seconds between two typing signals of ours, at least
TYPING_EVERY = 2.0
#: a typing signal that comes within this many seconds of the previous one from the same user
#: in the same room is not shown again (theirs come about every 2 s while they type)
TYPING_SHOWN_FOR = 5.0
#: typing signals whose refusal we still recognise by ``ref``
_SIGNALS_REMEMBERED = 64
_CLEAR_LINE = "\r\x1b[K"

Frame = dict[str, Any]


def typing_of(data: object) -> bool | None:
    """A signal's ``typing`` flag (``{"typing": true}``...), None for other signals."""
    flag = data.get("typing") if isinstance(data, dict) else None
    return flag if isinstance(flag, bool) else None


def display_name(user: str, info: object, names: Mapping[str, str] | None = None) -> str:
    """``info.name`` when the connect hook gave one, else a name seen before, else the id."""
    if isinstance(info, dict) and isinstance(name := info.get("name"), str) and name.strip():
        return name.strip()
    return (names or {}).get(user, user)


def describe(frame: Frame, names: Mapping[str, str] | None = None) -> str:
    """One readable line for a server frame (``names``: user id -> display name)."""
    data = frame.get("data")
    text = data if isinstance(data, str) else json.dumps(data)
    match frame.get("type"):
        case "message":
            return f"[{frame['room']}] {frame['from'] or '(admin)'}: {text}"
        case "direct":
            return f"(direct) {frame['from']}: {text}"
        case "joined":
            unread = frame.get("unread")
            return f"* joined {frame['room']}" + (f" ({unread} unread)" if unread else "")
        case "left":
            return f"* left {frame['room']}"
        case "presence_join":
            who = display_name(frame["user"], frame.get("info"), names)
            return f"* [{frame['room']}] {who} joined"
        case "presence_leave":
            return f"* [{frame['room']}] {display_name(frame['user'], None, names)} left"
        case "signal":
            who = display_name(frame["from"], None, names)
            if typing_of(data):
                return f"[{frame['room']}] {who} is typing…"
            return f"* [{frame['room']}] {who} signals {text}"
        case "presence":
            users: list[Frame] = frame["users"]
            here = ", ".join(
                display_name(u["user"], u.get("info"), names)
                + (f" ({u['sessions']} sessions)" if u.get("sessions", 1) > 1 else "")
                for u in users
            )
            more = f", and {frame['count'] - len(users)} more" if frame.get("truncated") else ""
            return f"* [{frame['room']}] {frame['count']} here: {here}{more}"
        case "error":
            return f"! {frame['code']}: {frame['message']}"
        case "welcome":
            return f"* connected as {frame['user_id']} (session {frame['session_id']})"
        case "logout":
            return f"* logged out: {frame['reason']}"
        case "history":
            messages: list[Frame] = frame["messages"]
            if not messages:
                return f"* [{frame['room']}] no earlier messages"
            return "\n".join(describe({"type": "message", **m}) for m in messages)
    return f"* {json.dumps(frame)}"


@attrs.define
class LineEditor:
    """Keys in, lines out: what a terminal's line discipline does in canonical mode, reduced
    to backspace, Ctrl-U (erase the line), Ctrl-W (erase a word) and Ctrl-D (end of input
    on an empty line). Escape sequences (arrow keys...) and other control keys are ignored."""

    #: the line being typed
    line: str = ""
    _decoder: codecs.IncrementalDecoder = attrs.field(
        factory=lambda: codecs.getincrementaldecoder("utf-8")("replace")
    )
    #: 0: text; 1: after ESC; 2: inside a CSI/SS3 sequence
    _escape: int = 0

    def feed(self, data: bytes) -> tuple[list[str], bool, bool]:
        """Take what the terminal sent; return the lines completed, whether the line now
        being typed gained text, and whether the input ended (Ctrl-D on an empty line)."""
        lines: list[str] = []
        grew = False
        for char in self._decoder.decode(data):
            if self._escape == 1:
                self._escape = 2 if char in "[O" else 0
            elif self._escape == 2:
                self._escape = 0 if "@" <= char <= "~" else 2
            elif char in "\r\n":
                lines.append(self.line)
                self.line, grew = "", False
            elif char in "\x7f\x08":
                self.line = self.line[:-1]
            elif char == "\x15":
                self.line = ""
            elif char == "\x17":
                kept = self.line.rstrip(" ")
                self.line = kept[: kept.rfind(" ") + 1]
            elif char == "\x04":
                if not self.line:
                    return lines, False, True
            elif char == "\x1b":
                self._escape = 1
            elif char >= " ":
                self.line += char
                grew = True
        return lines, grew, False


@attrs.define
class Terminal:
    """The state of one terminal session: where lines go, and what is known of the rooms."""

    chat: ChatClient
    out: TextIO
    #: keys read one by one, the line being typed kept below the output
    editing: bool = False
    room: str | None = None
    #: room -> the earliest message id shown, for /history
    earliest: dict[str, str] = attrs.field(factory=dict)
    #: user id -> display name (``info.name``), as presence told
    names: dict[str, str] = attrs.field(factory=dict)
    #: (room, user) -> when their last typing signal came
    typing_seen: dict[tuple[str, str], float] = attrs.field(factory=dict)
    #: room -> when we last signalled typing there
    typing_sent: dict[str, float] = attrs.field(factory=dict)
    #: ref of a typing signal of ours -> its room (to recognise a refusal)
    signals: dict[int, str] = attrs.field(factory=dict)
    #: rooms where signals are refused (``signals = false``, a ``publish`` claim)
    no_typing: set[str] = attrs.field(factory=set)
    typed: str = ""

    def show(self, text: str) -> None:
        """Print ``text``, keeping the line being typed under it."""
        if self.editing:
            self.out.write(f"{_CLEAR_LINE}{text}\n{self.typed}")
            self.out.flush()
        else:
            print(text, file=self.out, flush=True)

    def echo(self, typed: str) -> None:
        if self.editing and typed != self.typed:
            self.typed = typed
            self.out.write(f"{_CLEAR_LINE}{typed}")
            self.out.flush()

    def entered(self, line: str) -> None:
        """A line was entered: it stays on the screen as typed, above what comes next."""
        if self.editing:
            self.typed = ""
            self.out.write(f"{_CLEAR_LINE}{line}\n")
            self.out.flush()

    def on_frame(self, frame: Frame) -> None:
        """Show a server frame, or not: acks, read markers, our own typing and its refusals,
        and typing signals already shown, are not."""
        kind = frame.get("type")
        me = self.chat.welcome.get("user_id")
        match kind:
            case "ack" | "read":
                return
            case "history" if frame["messages"]:
                self.earliest[frame["room"]] = frame["messages"][0]["id"]
            case "message" if frame.get("from") is not None:
                self.typing_seen.pop((frame["room"], frame["from"]), None)
            case "presence_join" | "presence_leave":
                self.typing_seen.pop((frame["room"], frame["user"]), None)
                self._learn(frame["user"], frame.get("info"))
            case "presence":
                for user in frame["users"]:
                    self._learn(user["user"], user.get("info"))
            case "signal":
                if frame["from"] == me or not self._typing_news(frame):
                    return
            case "error" if (room := self.signals.pop(frame.get("ref", -1), None)) is not None:
                if frame["code"] == "forbidden":  # signals off there: stop trying
                    self.no_typing.add(room)
                return
        self.show(describe(frame, self.names))

    def _learn(self, user: str, info: object) -> None:
        if (name := display_name(user, info)) != user:
            self.names[user] = name

    def _typing_news(self, frame: Frame) -> bool:
        """Whether a signal is worth a line: not ``typing`` (other signals), or the first
        ``typing: true`` of a burst. ``typing: false`` ends a burst and is not shown."""
        typing, key = typing_of(frame.get("data")), (frame["room"], frame["from"])
        if typing is None:
            return True
        if not typing:
            self.typing_seen.pop(key, None)
            return False
        now, last = trio.current_time(), self.typing_seen.get(key, -math.inf)
        self.typing_seen[key] = now
        return now - last > TYPING_SHOWN_FOR

    async def typing(self) -> None:
        """Tell the current room we are typing, unless we did less than TYPING_EVERY ago."""
        room, now = self.room, trio.current_time()
        if room is None or room in self.no_typing:
            return
        if now - self.typing_sent.get(room, -math.inf) < TYPING_EVERY:
            return
        self.typing_sent[room] = now
        self.signals[await self.chat.signal(room, {"typing": True})] = room
        if len(self.signals) > _SIGNALS_REMEMBERED:
            del self.signals[min(self.signals)]

    async def command(self, line: str) -> None:
        """Send what ``line`` asks for (replies are printed by the reader)."""
        chat, room = self.chat, self.room
        verb, _, rest = line.partition(" ")
        match verb:
            case "":
                pass
            case "/join":
                await chat.send_frame({"type": "join", "room": rest})
                await chat.send_frame({"type": "history", "room": rest, "limit": JOIN_PAGE})
                self.room = rest
            case "/history" if room is not None:
                page: Frame = {"type": "history", "room": room, "limit": HISTORY_PAGE}
                if room in self.earliest:
                    page["before"] = self.earliest[room]
                await chat.send_frame(page)
            case "/who" if room is not None:
                await chat.send_frame({"type": "presence", "room": room})
            case "/leave":
                await chat.send_frame({"type": "leave", "room": rest})
            case "/room":
                self.room = rest
            case "/direct":
                to, _, text = rest.partition(" ")
                await chat.send_frame({"type": "direct", "to": to, "data": text})
            case "/ping":
                await chat.send_frame({"type": "ping"})
            case _ if verb.startswith("/"):
                self.show(HELP)
            case _ if room is None:
                self.show("! join a room first: /join ROOM")
            case _:
                await chat.send_frame({"type": "send", "room": room, "data": line})
                self.typing_sent.pop(room, None)  # typing again after a send is news


async def run_client(url: str, token: str, *, out: TextIO = sys.stdout) -> int:
    """Chat on ``url`` with ``token`` until ``/quit``, end of input, or the server closes.

    On a terminal (standard input and ``out`` both), the terminal's line mode is off while
    it runs and restored when it returns, however it returns.

    Returns the process exit status: 0, or 1 when the server closed the connection itself.
    """
    fd = sys.stdin.fileno()
    editing = os.isatty(fd) and out.isatty()
    async with open_client(url, token) as chat:
        terminal = Terminal(chat, out, editing=editing)
        closed_by_server = trio.Event()
        with _keys_one_by_one(fd) if editing else nullcontext():
            terminal.show(describe(chat.welcome))
            terminal.show(HELP)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_print_frames, terminal, closed_by_server, nursery.cancel_scope)
                await _read_commands(terminal, fd)
                nursery.cancel_scope.cancel()
    return 1 if closed_by_server.is_set() else 0


@contextmanager
def _keys_one_by_one(fd: int) -> Iterator[None]:
    """Turn the terminal's line mode and echo off (the :class:`LineEditor` does both), keep
    its signals (Ctrl-C); put it back on exit."""
    saved = termios.tcgetattr(fd)
    mode = termios.tcgetattr(fd)
    mode[3] &= ~(termios.ICANON | termios.ECHO)
    mode[6][termios.VMIN], mode[6][termios.VTIME] = 1, 0
    termios.tcsetattr(fd, termios.TCSANOW, mode)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def _print_frames(terminal: Terminal, closed: trio.Event, scope: trio.CancelScope) -> None:
    try:
        while True:
            terminal.on_frame(await terminal.chat.receive())
    except ConnectionClosed as exc:
        reason = exc.reason
        terminal.show(f"* closed: {reason.code if reason else '?'}")
        closed.set()
        scope.cancel()


async def _read_commands(terminal: Terminal, fd: int) -> None:
    editor = LineEditor() if terminal.editing else None
    async with trio.lowlevel.FdStream(os.dup(fd)) as stdin:
        buffer = b""
        while chunk := await stdin.receive_some():
            if editor is None:
                buffer += chunk
                *raw, buffer = buffer.split(b"\n")
                lines, grew, ended = [r.decode(errors="replace").strip() for r in raw], False, False
            else:
                lines, grew, ended = editor.feed(chunk)
            for line in lines:
                terminal.entered(line)
                if line.strip() == "/quit":
                    return
                await terminal.command(line.strip())
            if editor is not None:
                terminal.echo(editor.line)
                if grew and editor.line.strip() and not editor.line.startswith("/"):
                    await terminal.typing()
            if ended:
                return
