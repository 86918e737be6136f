"""The browser client and the pages of the admin port (SPEC §13), in headless Chromium.

Playwright's async API runs on asyncio only, and these tests run on trio: the servers run in
the test's trio loop while one thread of its own drives Chromium through Playwright's sync
API (:class:`Browser`; every Playwright call happens in that thread). Each test opens its
pages in a fresh browser context and fails on any console error or uncaught page error but
those it expects (a reconnect to an instance that is down logs a failed WebSocket).

Screenshots of the demo page and the dashboard go to ``tmp_path``, or to ``docs/`` with
``TRIO_CHAT_SCREENSHOTS=1``.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import httpx
import pytest
import trio
from _chat import ADMIN, ADMIN_KEY, SECRET, admin_client, make_config, make_token
from _redis_server import free_port
from playwright.sync_api import expect, sync_playwright

from trio_chat import Allow, RoomOptions, serve
from trio_chat._store.history import parse_id
from trio_chat.client import open_client

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterator

    from _redis_server import RedisServer
    from playwright.sync_api import Browser as ChromiumBrowser
    from playwright.sync_api import BrowserContext, ConsoleMessage, Locator, Page
    from playwright.sync_api import Error as PageError

    from trio_chat import ConnectEvent, Server

CHROMIUM = os.environ.get("TRIO_CHAT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
#: Playwright's bound on every action and every expectation, in ms
TIMEOUT_MS = 10_000
#: the bound on a whole test
TEST_SECONDS = 30
DEMO = {**ADMIN, "demo": True}
DOCS = Path(__file__).resolve().parent.parent / "docs"
STATIC = Path(__file__).resolve().parent.parent / "trio_chat" / "_web" / "static"
#: write the screenshots to docs/ (and make some traffic for the dashboard's chart first)
SCREENSHOTS = os.environ.get("TRIO_CHAT_SCREENSHOTS") == "1"
#: every room sends presence_join / presence_leave, as with `make run` (off by default)
PRESENCE_EVENTS = (RoomOptions(match="*", presence_events=True),)

# In a page: a TrioChat on this page's server with demo tokens for `user`, kept in
# `window.chat`; what it dispatches is kept in `window.seen` and the token calls counted.
CLIENT_SETUP = """
async ({user, room, badRefresh}) => {
  const { TrioChat } = await import("/client.js");
  const mint = async () => {
    const response = await fetch("/demo/token", {
      method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({user}),
    });
    return response.json();
  };
  const { url } = await mint();
  window.tokenCalls = 0;
  const token = async () => {
    window.tokenCalls += 1;
    // with badRefresh, the first refresh gets a token the server refuses
    if (badRefresh && window.tokenCalls === 2) return "not-a-jwt";
    return (await mint()).token;
  };
  const seen = {message: [], direct: [], state: [], gap: [], logout: [], error: [],
                refreshed: [], token_expiring: [], presence_join: [], presence_leave: [],
                signal: [], read: []};
  window.seen = seen;
  const chat = new TrioChat(url, {token});
  for (const name of Object.keys(seen)) {
    chat.addEventListener(name, (event) => seen[name].push(event.detail));
  }
  window.chat = chat;
  const welcome = await chat.connect();
  if (room) await chat.join(room);
  return welcome;
}
"""


# --- the browser ----------------------------------------------------------------------------


class Browser:
    """Chromium driven from one thread of its own: :meth:`run` calls a function there."""

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="chromium")
        self._stop: Callable[[], None] | None = None
        try:
            self.chromium: ChromiumBrowser = self._thread.submit(self._launch).result()
        except BaseException:
            self._thread.shutdown()
            raise

    def _launch(self) -> ChromiumBrowser:
        expect.set_options(timeout=TIMEOUT_MS)
        playwright = sync_playwright().start()
        try:
            chromium = playwright.chromium.launch(
                executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, timeout=30_000
            )
        except BaseException:
            playwright.stop()
            raise

        def stop() -> None:
            try:
                chromium.close()
            finally:
                playwright.stop()

        self._stop = stop
        return chromium

    async def run(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)`` in the browser's thread, while the trio loop goes on.

        Cancelled, the test stops waiting at once; the thread finishes the call on its own
        (every Playwright call has a timeout) before it runs the next one.
        """
        future = self._thread.submit(function, *args)
        return await trio.to_thread.run_sync(future.result, abandon_on_cancel=True)

    def close(self) -> None:
        try:
            if self._stop is not None:
                self._thread.submit(self._stop).result()
        finally:
            self._thread.shutdown()


class Pages:
    """A fresh browser context; every page opened in it reports its console errors and
    uncaught errors to :attr:`problems`. Use from the browser's thread only."""

    def __init__(self, chromium: ChromiumBrowser) -> None:
        self.context: BrowserContext = chromium.new_context(viewport={"width": 1000, "height": 760})
        self.context.set_default_timeout(TIMEOUT_MS)
        self.problems: list[str] = []

    def open(self, url: str) -> Page:
        page = self.context.new_page()
        page.on("console", self._console)
        page.on("pageerror", self._page_error)
        page.goto(url)
        return page

    def _console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            self.problems.append(f"console {message.type}: {message.text} ({message.location})")

    def _page_error(self, error: PageError) -> None:
        self.problems.append(f"page error: {error.message}\n{error.stack}")

    def unexpected(self, *allowed: str) -> list[str]:
        """The problems that match none of the ``allowed`` patterns (after letting every page
        deliver its pending events)."""
        for page in self.context.pages:
            page.evaluate("0")
        return [p for p in self.problems if not any(re.search(a, p) for a in allowed)]

    def close(self) -> None:
        self.context.close()


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"no Chromium at {CHROMIUM} (apt-get install chromium, or set TRIO_CHAT_CHROMIUM)"
        )
    opened = Browser()
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
async def pages(browser: Browser) -> AsyncIterator[Pages]:
    opened: Pages = await browser.run(Pages, browser.chromium)
    try:
        yield opened
    finally:
        await browser.run(opened.close)


async def assert_clean(browser: Browser, pages: Pages, *allowed: str) -> None:
    problems = await browser.run(pages.unexpected, *allowed)
    assert problems == [], "\n".join(problems)


def screenshot_path(tmp_path: Path, name: str) -> Path:
    if SCREENSHOTS:
        DOCS.mkdir(exist_ok=True)
        return DOCS / name
    return tmp_path / name


# --- the demo page, as a user works it ------------------------------------------------------


def connection(page: Page) -> Locator:
    return page.get_by_role("status", name="Connection")


def messages(page: Page) -> Locator:
    return page.get_by_role("log", name="Messages").get_by_role("listitem")


def rendered_ids(page: Page) -> list[str]:
    ids: list[str] = page.eval_on_selector_all(
        "#messages li", "(items) => items.map(i => i.dataset.id)"
    )
    return ids


def expect_connection(page: Page, text: str, timeout: float = TIMEOUT_MS) -> None:
    expect(connection(page)).to_contain_text(text, timeout=timeout)


def demo_login(page: Page, user: str, room: str | None = "lobby") -> None:
    """Name, Connect, and Join ``room``: back once its history is shown."""
    page.bring_to_front()  # a page behind another gets about one animation frame a second
    page.get_by_role("textbox", name="Your name").fill(user)
    page.get_by_role("button", name="Connect").click()
    expect(connection(page)).to_contain_text(f"Connected as {user}")
    if room is not None:
        page.get_by_role("textbox", name="Room", exact=True).fill(room)
        page.get_by_role("button", name="Join").click()
        expect(page.get_by_role("button", name=room, exact=True)).to_have_attribute(
            "aria-pressed", "true"
        )
        expect(page.get_by_role("textbox", name="Message")).to_be_focused()


def demo_join(page: Page, room: str) -> None:
    """Join one more room (it opens)."""
    page.bring_to_front()
    page.get_by_role("textbox", name="Room", exact=True).fill(room)
    page.get_by_role("button", name="Join").click()
    expect(room_tab(page, room)).to_have_attribute("aria-pressed", "true")


def demo_send(page: Page, text: str) -> None:
    write(page, text)
    expect(page.get_by_role("textbox", name="Message")).to_have_value("")


def write(page: Page, text: str) -> None:
    """Type a message and press Send (without waiting for its ack)."""
    page.bring_to_front()
    page.get_by_role("textbox", name="Message").fill(text)
    page.get_by_role("button", name="Send").click()


def expect_messages(page: Page, texts: list[str]) -> None:
    """The room's list is exactly ``texts``, in order (waiting until it is)."""
    expect(messages(page)).to_have_text(texts)


def members(page: Page) -> Locator:
    return page.get_by_role("list", name="Members").get_by_role("listitem")


def typing_line(page: Page) -> Locator:
    return page.get_by_role("status", name="Typing")


def room_tab(page: Page, room: str) -> Locator:
    """The button that opens ``room`` (its name and unread badge)."""
    return page.get_by_role("navigation", name="Rooms").get_by_role(
        "button", name=re.compile(rf"^{re.escape(room)}( \d+ new)?$")
    )


def unread_badge(page: Page, room: str) -> Locator:
    return room_tab(page, room).locator(".unread")


def message(page: Page, text: str) -> Locator:
    return messages(page).filter(has_text=text)


# --- servers --------------------------------------------------------------------------------


class Names:
    """A connect hook that gives each user a display name: ``info.name``, what presence shows."""

    async def connect(self, event: ConnectEvent) -> Allow:
        return Allow(info={"name": event.user.title()})


async def start_demo(
    nursery: trio.Nursery,
    redis_url: str,
    instance_id: str,
    *,
    hooks: object | None = None,
    rooms: tuple[RoomOptions, ...] = (),
    **sections: Any,
) -> Server:
    """An instance with the admin port, the demo page, and presence events in every room (the
    ``rooms`` tables first)."""
    config = make_config(redis_url, instance_id, admin=DEMO, **sections)
    config = attrs.evolve(config, rooms=(*rooms, *PRESENCE_EVENTS))
    server: Server = await nursery.start(partial(serve, hooks=hooks), config)
    return server


def origin(server: Server) -> str:
    assert server.admin_url is not None
    return server.admin_url.rstrip("/")


class Instance:
    """``trio-chat serve`` as a child process on fixed ports, so that it can be sent SIGTERM
    or SIGKILL and started again where the browser expects it."""

    def __init__(self, directory: Path, redis_url: str) -> None:
        self.directory = directory
        self.redis_url = redis_url
        self.port = free_port()
        self.admin_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    async def start(self, instance_id: str, **env: str) -> None:
        log = self.directory / f"{instance_id}.log"
        environ = {
            **os.environ,
            "TRIO_CHAT_AUTH_JWT_SECRET": SECRET,
            "TRIO_CHAT_ADMIN_API_KEY": ADMIN_KEY,
            "TRIO_CHAT_ADMIN_DEMO": "true",
            **env,
        }
        command = [sys.executable, "-m", "trio_chat", "serve", "--instance-id", instance_id]
        command += ["--port", str(self.port), "--admin-port", str(self.admin_port)]
        command += ["--redis-url", self.redis_url]
        with log.open("wb") as sink:
            self.process = subprocess.Popen(command, env=environ, stderr=sink)
        with trio.fail_after(10):
            while "listening on ws://" not in log.read_text():
                assert self.process.poll() is None, log.read_text()
                await trio.sleep(0.05)

    async def stop(self, signum: int) -> int:
        """Send ``signum`` and wait for the exit; the exit status."""
        assert self.process is not None
        self.process.send_signal(signum)
        with trio.fail_after(12):
            while (status := self.process.poll()) is None:
                await trio.sleep(0.05)
        return status

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


#: rooms of the dashboard's picture, beside the lobby
SIDE_ROOMS = ["support", "random", "releases", "support", "random", "support"]


async def traffic(server: Server, seconds: int, done: trio.Event) -> None:
    """Chat on ``server`` for the dashboard's chart: each second a user more and more
    messages, for ``seconds``, then the same each second until ``done``; the users are in the
    lobby and one more room each, for the list of rooms."""
    async with AsyncExitStack() as stack:
        users = []
        for second in itertools.count():
            if second < seconds:
                token = make_token(f"user{second}")
                users.append(await stack.enter_async_context(open_client(server.url, token)))
                await users[-1].join("lobby")
                await users[-1].join(SIDE_ROOMS[second % len(SIDE_ROOMS)])
            for n in range(3 * len(users) + 1):
                await users[n % len(users)].send("lobby", {"text": f"{second}.{n}"})
            with trio.move_on_after(1):
                await done.wait()
            if done.is_set():
                break
        for n, user in enumerate(users):
            # reads what it was sent up to the reply, and nothing more comes: a client with
            # unread frames may not finish its close handshake (trio-websocket 0.12)
            await user.leave(SIDE_ROOMS[n % len(SIDE_ROOMS)])
            await user.leave("lobby")


# --- the tests ------------------------------------------------------------------------------


async def test_pages_and_their_files_are_served_for_a_strict_policy(nursery):
    """The pages carry the CSP, their files are served with their types, and the pages hold
    nothing the policy would block: no inline script, style or handler (the headers
    themselves are tests/test_pages.py's)."""
    with trio.fail_after(TEST_SECONDS):
        server = await start_demo(nursery, "memory://", "test-1")
        async with httpx.AsyncClient(base_url=origin(server), timeout=5) as http:
            for path in ("/", "/demo/"):
                page = await http.get(path)
                assert "script-src 'self';" in page.headers["content-security-policy"], path
                for src in re.findall(r'(?:src|href)="(/[^"]*)"', page.text):
                    assert (await http.get(src)).status_code == 200, (path, src)
            script = await http.get("/client.js")
            assert script.headers["content-type"] == "text/javascript; charset=utf-8"
            for name, kind in [
                ("style.css", "text/css"),
                ("demo.js", "text/javascript"),
                ("dashboard.js", "text/javascript"),
                ("favicon.svg", "image/svg+xml"),
            ]:
                served = await http.get(f"/static/{name}")
                assert served.status_code == 200, name
                assert served.headers["content-type"].startswith(kind), name
        for page_file in STATIC.glob("*.html"):
            html = page_file.read_text()
            assert not re.search(r"<script(?![^>]*\bsrc=)", html), page_file.name
            assert not re.search(r"<style|\sstyle=|\son[a-z]+=|javascript:", html), page_file.name


async def test_two_pages_chat_through_two_instances(redis_server, nursery, browser, pages):
    """Each page loads client.js from its own instance; send() resolves with the ack whose id
    the other page's message event carries; errors reject with the frame's code."""
    with trio.fail_after(TEST_SECONDS):
        one = await start_demo(nursery, redis_server.url, "inst-1")
        two = await start_demo(nursery, redis_server.url, "inst-2")

        def scenario() -> None:
            alice = pages.open(f"{origin(one)}/demo/")
            bob = pages.open(f"{origin(two)}/demo/")
            welcomes = [
                page.evaluate(CLIENT_SETUP, {"user": user, "room": "room"})
                for page, user in [(alice, "alice"), (bob, "bob")]
            ]
            assert [w["instance"] for w in welcomes] == ["inst-1", "inst-2"]

            ack = alice.evaluate("chat.send('room', {text: 'hi bob'})")
            assert ack["type"] == "ack"
            assert re.fullmatch(r"\d+-\d+", ack["id"])
            bob.wait_for_function("() => seen.message.length === 1")
            [message] = bob.evaluate("seen.message")
            assert message == {
                "type": "message",
                "id": ack["id"],
                "room": "room",
                "from": "alice",
                "data": {"text": "hi bob"},
                "ts": ack["ts"],
            }
            reply = bob.evaluate("chat.send('room', 'hello alice')")
            alice.wait_for_function("() => seen.message.length === 1")
            assert alice.evaluate("seen.message[0].id") == reply["id"]

            bob.evaluate("chat.direct('alice', {text: 'psst'})")
            alice.wait_for_function("() => seen.direct.length === 1")
            assert alice.evaluate("seen.direct[0]")["from"] == "bob"

            # a request the server refuses rejects with an Error carrying the frame's code
            refused = alice.evaluate(
                """chat.history('elsewhere').then(
                    () => null, (e) => [e instanceof Error, e.code, e.frame && e.frame.type])"""
            )
            assert refused == [True, "not_in_room", "error"]
            limited = alice.evaluate("chat.history('room', {limit: 1000}).catch((e) => e.code)")
            assert limited == "bad_request"
            page = alice.evaluate("chat.history('room', {limit: 1})")
            assert [m["id"] for m in page["messages"]] == [reply["id"]]
            assert page["more"] is True
            # a socket dropped before the reply rejects with "disconnected"; later calls, "closed"
            dropped = alice.evaluate(
                """(() => {
                    const pending = chat.ping().catch((e) => e.code);
                    chat.close();
                    return pending;
                })()"""
            )
            assert dropped == "disconnected"
            assert alice.evaluate("chat.send('room', 1).catch((e) => e.code)") == "closed"
            states = alice.evaluate("seen.state.map((s) => s.state)")
            assert states == ["connecting", "open", "closed"]
            assert alice.evaluate("seen.error") == []

        await browser.run(scenario)
        await assert_clean(browser, pages)


async def test_reconnect_after_drain_and_crash_shows_each_missed_message_once(
    redis_server: RedisServer, nursery, browser, pages, tmp_path
):
    """The page's instance drains (SIGTERM: 1001), then crashes (SIGKILL), while bob sends
    through another instance; each time it comes back on the same ports, and the page shows
    every message once, in order, the missed ones replayed. Then one more crash, and the
    instance comes back keeping less history than was missed: the page says so (gap)."""
    with trio.fail_after(45):  # three restarts, each with its reconnect backoff
        other = await start_demo(nursery, redis_server.url, "inst-b")
        instance = Instance(tmp_path, redis_server.url)
        rounds = [
            # signal, close code seen, exit status, history.size after the restart
            (signal.SIGTERM, 1001, 0, 200),
            (signal.SIGKILL, 1006, -signal.SIGKILL, 200),
            (signal.SIGKILL, 1006, -signal.SIGKILL, 3),
        ]
        notice = "#notice"
        try:
            await instance.start("inst-a0")
            page = await browser.run(pages.open, f"{instance.origin}/demo/")
            await browser.run(demo_login, page, "alice", "lobby")
            async with open_client(other.url, make_token("bob")) as bob:
                await bob.join("lobby")

                async def say(text: str) -> tuple[str, str]:
                    ack = await bob.send("lobby", {"text": text})
                    return ack["id"], f"bob: {text}"

                # what the page must show: (id, text), in order (None: an id we do not know)
                shown: list[tuple[str | None, str]] = [await say("before")]
                await browser.run(expect_messages, page, ["bob: before"])
                for n, (signum, code, status, kept) in enumerate(rounds, 1):
                    assert await instance.stop(signum) == status
                    down = f"Reconnecting… (closed with {code})"
                    await browser.run(expect_connection, page, down)
                    missed = [await say(f"missed {n}.{i}") for i in range(5)]
                    shown += missed[-kept:]
                    if n == 1:  # written while away: sent once the connection is back
                        await browser.run(write, page, "while away")
                    await instance.start(f"inst-a{n}", TRIO_CHAT_HISTORY_SIZE=str(kept))
                    await browser.run(expect_connection, page, "Connected as alice", 15_000)
                    if n == 1:
                        shown.append((None, "alice: while away"))
                        await browser.run(expect_messages, page, [text for _, text in shown])
                    shown.append(await say(f"live {n}"))
                    await browser.run(expect_messages, page, [text for _, text in shown])
                    ids = await browser.run(rendered_ids, page)
                    pairs = zip(ids, shown, strict=True)
                    assert all(known in (None, id_) for id_, (known, _) in pairs), ids
                    assert ids == sorted(ids, key=parse_id)
                    gap = await browser.run(lambda: page.locator(notice).text_content())
                    if kept < len(missed):
                        assert gap == (
                            "Some messages in lobby could not be recovered after the reconnect; "
                            "the latest 3 are shown."
                        )
                    else:
                        assert gap == ""
            # alice's own message still goes out on the new connection
            await browser.run(demo_send, page, "back")
        finally:
            instance.kill()
        # The reconnect attempts while the instance was down fail (its token endpoint, or the
        # handshake while it drains), and Chromium says so.
        await assert_clean(
            browser,
            pages,
            rf"WebSocket connection to 'ws://127\.0\.0\.1:{instance.port}/' failed",
            rf"ERR_CONNECTION_REFUSED .*'url': '{re.escape(instance.origin)}/demo/token'",
        )


async def test_token_function_refreshes_on_token_expiring(redis_server, nursery, browser, pages):
    """token_expiring calls the token function again and the socket stays open; a refused
    refresh (4401) reconnects with a fresh token; a plain string token does not."""
    with trio.fail_after(TEST_SECONDS):
        # demo tokens live 900 s: token_expiring comes about a second after each connect/refresh
        auth = {"jwt_secret": SECRET, "refresh_window": 898.8, "leeway": 0.5}
        server = await start_demo(nursery, redis_server.url, "inst-1", auth=auth)
        url = f"{origin(server)}/demo/"

        def refreshes() -> dict[str, Any]:
            page = pages.open(url)
            welcome = page.evaluate(CLIENT_SETUP, {"user": "carol", "room": "room"})
            page.wait_for_function("() => seen.refreshed.length >= 2", timeout=8_000)
            return {"welcome": welcome, **page.evaluate("({...seen, calls: tokenCalls})")}

        seen = await browser.run(refreshes)
        assert seen["calls"] >= 3
        assert len(seen["token_expiring"]) >= 2
        assert [s["state"] for s in seen["state"]] == ["connecting", "open"]
        assert all(r["expires_at"] >= seen["welcome"]["expires_at"] for r in seen["refreshed"])
        async with admin_client(server) as admin:
            sessions = (await admin.get("/v1/users/carol/sessions")).json()["sessions"]
        assert [s["session_id"] for s in sessions] == [seen["welcome"]["session_id"]]

        def refused_refresh() -> dict[str, Any]:
            page = pages.open(url)
            page.evaluate(CLIENT_SETUP, {"user": "dave", "room": "room", "badRefresh": True})
            page.wait_for_function("() => seen.state.length >= 4 && tokenCalls >= 3", timeout=8_000)
            result: dict[str, Any] = page.evaluate("({...seen, rooms: chat.rooms})")
            return result

        seen = await browser.run(refused_refresh)
        states = [s["state"] for s in seen["state"]]
        assert states[:4] == ["connecting", "open", "reconnecting", "open"]
        assert seen["state"][2]["code"] == 4401
        assert seen["logout"] == [{"type": "logout", "reason": "expired"}]
        assert seen["rooms"] == ["room"]

        short = make_token("erin", ttl=2)

        def plain_token_expires() -> list[dict[str, Any]]:
            page = pages.open(url)
            ws_url = f"ws://127.0.0.1:{server.port}/"
            page.evaluate(
                """async ([url, token]) => {
                    const { TrioChat } = await import("/client.js");
                    window.states = [];
                    window.chat = new TrioChat(url, {token});
                    chat.addEventListener("state", (e) => states.push(e.detail));
                    await chat.connect();
                }""",
                [ws_url, short],
            )
            page.wait_for_function("() => states.some((s) => s.state === 'closed')", timeout=8_000)
            page.wait_for_timeout(1000)  # it stays closed
            states: list[dict[str, Any]] = page.evaluate("states")
            return states

        states = await browser.run(plain_token_expires)
        assert [s["state"] for s in states] == ["connecting", "open", "closed"]
        assert states[-1]["code"] == 4401
        await assert_clean(browser, pages)


async def test_demo_page_end_to_end(redis_server, nursery, browser, pages):
    """Name, Connect, Join: the room's last 50 messages, then Load earlier until there are no
    more; a message sent on one page appears on the other; data is text, never markup. In a
    room where only the server posts, typing is quiet and a message is refused."""
    with trio.fail_after(TEST_SECONDS):
        limits = {"send_rate": 1000.0, "send_burst": 1000}
        news = RoomOptions(match="news", client_publish=False)
        server = await start_demo(nursery, redis_server.url, "inst-1", limits=limits, rooms=(news,))
        async with open_client(server.url, make_token("carol")) as carol:
            await carol.join("lobby")
            for n in range(59):
                await carol.send("lobby", {"text": f"old {n}"})
            await carol.send("lobby", "<img src=x onerror=alert(1)><b>bold</b>")
        old = [f"carol: old {n}" for n in range(59)] + [
            "carol: <img src=x onerror=alert(1)><b>bold</b>"
        ]

        def scenario() -> None:
            alice = pages.open(f"{origin(server)}/demo/")
            demo_login(alice, "alice")
            expect_messages(alice, old[-50:])
            assert alice.get_by_role("log", name="Messages").locator("img, b").count() == 0
            earlier = alice.get_by_role("button", name="Load earlier")
            earlier.click()
            expect_messages(alice, old)
            expect(earlier).to_be_hidden()

            bob = pages.open(f"{origin(server)}/demo/")
            demo_login(bob, "bob")
            demo_send(bob, "hello alice")
            expect_messages(alice, [*old, "bob: hello alice"])
            demo_send(alice, "hi bob")
            expect(messages(bob).last).to_have_text("alice: hi bob")
            expect(messages(alice).last).to_have_text("alice: hi bob")
            # a second room, and back
            alice.bring_to_front()
            alice.get_by_role("textbox", name="Room", exact=True).fill("side")
            alice.get_by_role("button", name="Join").click()
            expect(messages(alice)).to_have_count(0)
            alice.get_by_role("button", name="lobby", exact=True).click()
            expect(messages(alice)).to_have_count(62)

            # a read-only room: the typing signal's refusal is no news, a send's is
            demo_join(alice, "news")
            alice.get_by_role("textbox", name="Message").press_sequentially("may I?")
            alice.wait_for_timeout(500)
            expect(alice.locator("#notice")).to_be_hidden()
            alice.get_by_role("button", name="Send").click()
            expect(alice.get_by_role("alert")).to_have_text(
                "Not sent: forbidden: only the server posts in this room"
            )

        await browser.run(scenario)
        await assert_clean(browser, pages)


async def test_dashboard_lists_instances_and_logs_a_user_out(
    redis_server, nursery, browser, pages, tmp_path
):
    """A wrong key is asked again; the instances are listed; presence, publish and mute
    work; a logout closes the user's socket and the demo page stays logged out."""
    with trio.fail_after(60 if SCREENSHOTS else 30):
        one = await start_demo(nursery, redis_server.url, "inst-1")
        two = await start_demo(nursery, redis_server.url, "inst-2")

        def sign_in() -> Page:
            board = pages.open(f"{origin(one)}/?refresh=1")
            board.get_by_role("textbox", name="Admin key").fill("wrong key")
            board.get_by_role("button", name="Sign in").click()
            expect(board.get_by_role("alert")).to_contain_text("refused")
            board.get_by_role("textbox", name="Admin key").fill(ADMIN_KEY)
            board.get_by_role("button", name="Sign in").click()
            instances = board.get_by_role("table", name="Instances")
            expect(instances.get_by_role("row")).to_have_count(3)  # the header and two instances
            expect(instances).to_contain_text("inst-1")
            expect(instances).to_contain_text("inst-2")
            expect(instances.get_by_role("cell", name="alive", exact=True)).to_have_count(2)
            return board

        board = await browser.run(sign_in)

        def act() -> Page:
            dave = pages.open(f"{origin(two)}/demo/")
            demo_login(dave, "dave")
            board.bring_to_front()
            # the instances' session counts, polled every second
            on_two = board.get_by_role("row").filter(has_text="inst-2").get_by_role("cell")
            expect(on_two.nth(2)).to_have_text("1")
            board.get_by_role("textbox", name="Room", exact=True).fill("lobby")
            board.get_by_role("button", name="Look up").click()
            expect(board.get_by_role("table", name="Presence")).to_contain_text("dave")

            board.get_by_role("textbox", name="Publish to room").fill("lobby")
            board.get_by_role("textbox", name="Message").fill("hello from ops")
            board.get_by_role("button", name="Publish").click()
            expect(board.get_by_role("status", name="Result")).to_contain_text("Published to lobby")
            expect_messages(dave, ["admin: hello from ops"])

            board.get_by_role("textbox", name="User").fill("dave")
            board.get_by_role("spinbutton", name="Seconds").fill("30")
            board.get_by_role("button", name="Mute").click()
            expect(board.get_by_role("status", name="Result")).to_contain_text("Muted dave until")
            dave.bring_to_front()
            dave.get_by_role("textbox", name="Message").fill("can I speak?")
            dave.get_by_role("button", name="Send").click()
            expect(dave.get_by_role("alert")).to_contain_text("muted")
            return dave

        dave = await browser.run(act)

        def rooms_listed(rooms: list[str], users: list[str]) -> None:
            # GET /v1/rooms, polled every second: most users first
            table = board.get_by_role("table", name="Rooms")
            expect(table.locator("tbody td:first-child")).to_have_text(rooms)
            expect(table.locator("tbody td.num")).to_have_text(users)

        await browser.run(rooms_listed, ["lobby"], ["1"])
        async with open_client(one.url, make_token("erin")) as erin:
            await erin.join("side")
            await erin.join("lobby")
            await browser.run(rooms_listed, ["lobby", "side"], ["2", "1"])
            await erin.leave("side")
            await browser.run(rooms_listed, ["lobby"], ["2"])

            def follow() -> None:
                # a room's name follows its presence
                board.get_by_role("table", name="Rooms").get_by_role("button", name="lobby").click()
                presence = board.get_by_role("table", name="Presence")
                expect(presence.get_by_role("row").filter(has_text="lobby")).to_contain_text("erin")

            await browser.run(follow)
            await erin.leave("lobby")
        await browser.run(rooms_listed, ["lobby"], ["1"])

        def chart() -> None:
            # the chart of this instance's /metrics, sampled every second
            board.bring_to_front()
            expect(board.locator("#connections")).to_have_text(re.compile(r"^\d+$"))
            expect(board.locator("#chart polyline")).to_have_count(3)
            board.screenshot(path=screenshot_path(tmp_path, "dashboard.png"), full_page=True)

        if SCREENSHOTS:  # with something to see on the chart
            done = trio.Event()
            async with trio.open_nursery() as crowd:
                crowd.start_soon(traffic, one, 15, done)
                await trio.sleep(18)
                await browser.run(chart)
                done.set()
        else:
            await browser.run(chart)

        def logout() -> None:
            board.get_by_role("button", name="Log out").click()
            expect(board.get_by_role("status", name="Result")).to_contain_text(
                "Logged out dave: 1 session closed"
            )
            expect(connection(dave)).to_have_text("Logged out (logout)")
            dave.wait_for_timeout(1500)  # and it does not come back
            expect(connection(dave)).to_have_attribute("data-state", "closed")

        await browser.run(logout)
        async with admin_client(two) as admin:
            assert (await admin.get("/v1/users/dave/sessions")).json() == {"sessions": []}
        await assert_clean(
            browser,
            pages,
            # the wrong key
            r"Failed to load resource: the server responded with a status of 401",
        )


async def test_client_presence_signals_and_read_markers(redis_server, nursery, browser, pages):
    """client.js across two instances: presence() lists both users with their hook's info, a
    second tab of a user makes no presence_join, the last one out makes presence_leave;
    signal() reaches the other user and the user's other tab; read() moves the marker that
    receipts() and the other sessions' read events show; a refused signal or read comes as
    an error event with the ref the call returned."""
    with trio.fail_after(TEST_SECONDS):
        one = await start_demo(nursery, redis_server.url, "inst-1", hooks=Names())
        two = await start_demo(nursery, redis_server.url, "inst-2", hooks=Names())

        def scenario() -> None:
            alice = pages.open(f"{origin(one)}/demo/")
            alice.evaluate(CLIENT_SETUP, {"user": "alice", "room": "room"})
            bob = pages.open(f"{origin(two)}/demo/")
            bob.evaluate(CLIENT_SETUP, {"user": "bob", "room": "room"})
            alice.wait_for_function("() => seen.presence_join.length === 1")
            assert alice.evaluate("seen.presence_join") == [
                {"type": "presence_join", "room": "room", "user": "bob", "info": {"name": "Bob"}}
            ]
            present = bob.evaluate("chat.presence('room')")
            users = sorted(present["users"], key=lambda u: u["user"])
            assert users == [
                {"user": "alice", "info": {"name": "Alice"}, "sessions": 1},
                {"user": "bob", "info": {"name": "Bob"}, "sessions": 1},
            ]
            assert (present["room"], present["count"]) == ("room", 2)

            # alice's second tab, on the other instance: no event, two sessions
            tab = pages.open(f"{origin(two)}/demo/")
            tab.evaluate(CLIENT_SETUP, {"user": "alice", "room": "room"})
            present = bob.evaluate("chat.presence('room')")
            assert {u["user"]: u["sessions"] for u in present["users"]} == {"alice": 2, "bob": 1}

            ref = bob.evaluate("chat.signal('room', {typing: true})")
            assert isinstance(ref, int)
            for page in (alice, tab):
                page.wait_for_function("() => seen.signal.length === 1")
                assert page.evaluate("seen.signal") == [
                    {"type": "signal", "room": "room", "from": "bob", "data": {"typing": True}}
                ]
            # the sender's own other tab gets its signal, the sender does not
            alice.evaluate("chat.signal('room', 'hi me')")
            tab.wait_for_function("() => seen.signal.length === 2")
            assert tab.evaluate("seen.signal[1].from") == "alice"

            ack = bob.evaluate("chat.send('room', 'read me')")
            empty = bob.evaluate("chat.receipts('room')")
            assert (empty["type"], empty["room"], empty["read"]) == ("receipts", "room", {})
            alice.wait_for_function("() => seen.message.length === 1")
            assert isinstance(alice.evaluate(f"chat.read('room', {ack['id']!r})"), int)
            for page in (bob, tab):  # the others, and alice's other tab
                page.wait_for_function("() => seen.read.length === 1")
                assert page.evaluate("seen.read") == [
                    {"type": "read", "room": "room", "user": "alice", "id": ack["id"]}
                ]
            receipts = bob.evaluate("chat.receipts('room')")
            assert receipts["read"] == {"alice": ack["id"]}
            # a marker that does not move forward sends nothing (what alice sends after it
            # comes after it)
            alice.evaluate(f"chat.read('room', {ack['id']!r}); chat.signal('room', 'after')")
            bob.wait_for_function("() => seen.signal.some((s) => s.data === 'after')")
            assert len(bob.evaluate("seen.read")) == 1

            # refusals: the error event carries the call's ref
            refs = alice.evaluate(
                """[chat.signal('elsewhere', 1), chat.read('room', '99999999999999-0')]"""
            )
            alice.wait_for_function("() => seen.error.length === 2")
            errors = alice.evaluate("seen.error")
            assert [(e["ref"], e["code"]) for e in errors] == [
                (refs[0], "not_in_room"),
                (refs[1], "bad_request"),
            ]

            # the last of alice's sessions leaves: presence_leave, once
            alice.evaluate("chat.leave('room')")
            bob.wait_for_timeout(300)
            assert bob.evaluate("seen.presence_leave") == []
            tab.evaluate("chat.close()")
            bob.wait_for_function("() => seen.presence_leave.length === 1")
            assert bob.evaluate("seen.presence_leave") == [
                {"type": "presence_leave", "room": "room", "user": "alice"}
            ]
            assert bob.evaluate("chat.presence('room')")["count"] == 1

        await browser.run(scenario)
        await assert_clean(browser, pages)


async def test_demo_members_typing_and_read_ticks(redis_server, nursery, browser, pages, tmp_path):
    """Two users on two instances: each sees the other in the member list (the names the
    connect hook gave), "Bob is typing…" shows, and clears 4 s after the last signal or at
    once with bob's message; alice's message gets "seen by 1" once bob opens the room where
    it waits as "1 new", and not before; bob's leaving takes him off alice's list."""
    with trio.fail_after(TEST_SECONDS):
        one = await start_demo(nursery, redis_server.url, "inst-1", hooks=Names())
        two = await start_demo(nursery, redis_server.url, "inst-2", hooks=Names())
        async with open_client(one.url, make_token("carol")) as carol:
            await carol.join("lobby")  # and says nothing, reads nothing

            def scenario() -> None:
                alice = pages.open(f"{origin(one)}/demo/")
                demo_login(alice, "alice")
                expect(members(alice)).to_have_text(["Alice @alice (you)", "Carol @carol"])
                bob = pages.open(f"{origin(two)}/demo/")
                demo_login(bob, "bob")
                expect(members(bob)).to_have_text(
                    ["Bob @bob (you)", "Alice @alice", "Carol @carol"]
                )
                expect(members(alice)).to_have_text(
                    ["Alice @alice (you)", "Bob @bob", "Carol @carol"]
                )
                expect(alice.locator("#member-count")).to_have_text("(3)")

                # typing: shown, then gone 4 s after the last signal
                box = bob.get_by_role("textbox", name="Message")
                box.press_sequentially("hel")
                expect(typing_line(alice)).to_have_text("Bob is typing…")
                expect(typing_line(alice)).to_have_text("", timeout=6_000)
                # again (2 s after the last signal), and bob's message ends it at once
                bob.bring_to_front()
                box.press_sequentially("lo alice")
                expect(typing_line(alice)).to_have_text("Bob is typing…")
                bob.get_by_role("button", name="Send").click()
                expect(message(alice, "bob: hello alice")).to_have_count(1)
                expect(typing_line(alice)).to_have_text("", timeout=1_000)
                expect(typing_line(bob)).to_have_text("")  # never one's own

                # bob looks at another room: alice's message waits there unread, unseen
                demo_join(bob, "side")
                demo_send(alice, "are you there?")
                mine = message(alice, "alice: are you there?")
                expect(unread_badge(bob, "lobby")).to_have_text("1 new")
                alice.wait_for_timeout(500)
                expect(mine).not_to_have_attribute("data-seen", re.compile("seen"))
                bob.bring_to_front()
                room_tab(bob, "lobby").click()
                expect(unread_badge(bob, "lobby")).to_have_count(0)
                expect(mine).to_have_attribute("data-seen", "seen by 1")
                expect(mine).to_have_class("mine")

                # the picture: members, someone typing, seen messages, an unread room
                demo_join(alice, "releases")
                room_tab(alice, "lobby").click()
                demo_send(alice, "the release notes are ready")
                bob.bring_to_front()
                expect(message(alice, "release notes")).to_have_attribute("data-seen", "seen by 1")
                bob.wait_for_timeout(2000)  # bob's last typing signal is 2 s old
                bob.get_by_role("textbox", name="Message").press_sequentially("let me")
                alice.bring_to_front()
                expect(typing_line(alice)).to_have_text("Bob is typing…")
                with httpx.Client(base_url=origin(one), timeout=5) as http:
                    for text in ("v2.4 is out", "changelog: presence, typing, read markers"):
                        published = http.post(
                            "/v1/publish",
                            json={"room": "releases", "data": {"text": text}},
                            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                        )
                        assert published.status_code == 200, published.text
                expect(unread_badge(alice, "releases")).to_have_text("2 new")
                alice.screenshot(path=screenshot_path(tmp_path, "demo.png"))

                # bob leaves the room: off alice's list, and not typing any more
                bob.bring_to_front()
                bob.get_by_role("button", name="Leave lobby").click()
                expect(members(alice)).to_have_text(["Alice @alice (you)", "Carol @carol"])
                expect(typing_line(alice)).to_have_text("")

            await browser.run(scenario)
            await carol.leave("lobby")
        await assert_clean(browser, pages)


async def test_demo_unread_counts_follow_the_user_across_tabs(
    redis_server, nursery, browser, pages
):
    """A second tab of alice joins the rooms she had (remembered by this origin's page), its
    unread counts from the server (`joined.unread`); when the first tab opens the room, the
    second tab's count clears (the `read` event of her own user). bob is on another instance."""
    with trio.fail_after(TEST_SECONDS):
        one = await start_demo(nursery, redis_server.url, "inst-1")
        two = await start_demo(nursery, redis_server.url, "inst-2")

        def first_tab() -> Page:
            tab = pages.open(f"{origin(one)}/demo/")
            demo_login(tab, "alice", "side")
            demo_join(tab, "lobby")
            return tab

        first = await browser.run(first_tab)
        async with open_client(two.url, make_token("bob")) as bob:
            await bob.join("side")
            for n in range(2):
                await bob.send("side", {"text": f"psst {n}"})

            def second_tab() -> Page:
                expect(unread_badge(first, "side")).to_have_text("2 new")
                tab = pages.open(f"{origin(one)}/demo/")
                demo_login(tab, "alice", None)  # her rooms come back by themselves
                expect(room_tab(tab, "lobby")).to_have_attribute("aria-pressed", "true")
                expect(unread_badge(tab, "side")).to_have_text("2 new")
                return tab

            second = await browser.run(second_tab)
            await bob.send("side", {"text": "psst 2"})

            def read_on_the_first() -> None:
                expect(unread_badge(second, "side")).to_have_text("3 new")
                expect(unread_badge(first, "side")).to_have_text("3 new")
                first.bring_to_front()
                room_tab(first, "side").click()
                expect_messages(first, ["bob: psst 0", "bob: psst 1", "bob: psst 2"])
                expect(unread_badge(second, "side")).to_have_count(0)
                expect(room_tab(second, "side")).to_have_text("side")

            await browser.run(read_on_the_first)
            await bob.leave("side")
        await assert_clean(browser, pages)
