"""The outbox on its own: a session's sends batched in order, failures answered in order,
and the read loop held back once too many wait."""

from __future__ import annotations

import json

import trio
import trio.testing

from trio_chat._config import Config
from trio_chat._errors import BackendUnavailable
from trio_chat._metrics import Metrics
from trio_chat._outbox import Outbox, Outgoing
from trio_chat._rooms import RoomRules


class FakeSession:
    """What an Outbox needs of a Session: an id, replies, and a nursery to run in."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.id = "s1"
        self.replies: list[dict[str, object]] = []
        self._nursery = nursery

    def reply(self, text: str) -> bool:
        self.replies.append(json.loads(text))
        return True

    def start_soon(self, task) -> bool:
        self._nursery.start_soon(task)
        return True


class FakeBackend:
    """Records each batch's PUBLISHed payloads; fails while ``down``; waits while ``held``."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.down = False
        self.sent = True  # while down: whether a failed batch may have run
        self.calls = 0
        self.held: trio.Event | None = None

    async def execute(self, batch) -> None:
        self.calls += 1
        if self.held is not None:
            await self.held.wait()
        await trio.lowlevel.checkpoint()
        if self.down:
            raise BackendUnavailable("Redis at redis://test: down", sent=self.sent)
        self.batches.append([command.args[1] for command in batch.commands])
        for command in batch.commands:
            assert command.name == "append"  # the history script: its reply is the id
            command.reply.set(f"1-{command.args[1].removeprefix('payload ')}")


def outgoing(n: int) -> Outgoing:
    return Outgoing("room", f"payload {n}", 1000 + n, n)


async def test_sends_waiting_together_go_in_one_batch_in_order_and_are_acked_in_order(nursery):
    session, backend = FakeSession(nursery), FakeBackend()
    outbox = Outbox(session, backend, Metrics(), RoomRules(Config()))
    backend.held = trio.Event()
    await outbox.put(outgoing(0))
    await trio.testing.wait_all_tasks_blocked()  # the sender took 0 and waits for Redis
    for n in range(1, 5):
        await outbox.put(outgoing(n))  # these wait together for the next batch
    backend.held.set()
    backend.held = None
    await outbox.wait_idle()
    assert backend.batches == [["payload 0"], [f"payload {n}" for n in range(1, 5)]]
    assert session.replies == [
        {"type": "ack", "id": f"1-{n}", "ts": 1000 + n, "ref": n} for n in range(5)
    ]


async def test_a_failed_batch_answers_each_of_its_sends_in_order_and_later_ones_go_on(nursery):
    session, backend = FakeSession(nursery), FakeBackend()
    outbox = Outbox(session, backend, Metrics(), RoomRules(Config()))
    backend.down = True
    for n in range(3):
        await outbox.put(outgoing(n))
    await outbox.wait_idle()
    backend.down = False
    for n in range(3, 5):
        await outbox.put(outgoing(n))
    await outbox.wait_idle()
    assert [(reply["type"], reply.get("code"), reply["ref"]) for reply in session.replies] == [
        ("error", "unavailable", 0),
        ("error", "unavailable", 1),
        ("error", "unavailable", 2),
        ("ack", None, 3),
        ("ack", None, 4),
    ]
    assert backend.batches == [["payload 3", "payload 4"]]


async def test_the_read_loop_waits_once_the_limit_of_waiting_sends_is_reached(nursery):
    session, backend = FakeSession(nursery), FakeBackend()
    outbox = Outbox(session, backend, Metrics(), RoomRules(Config()))
    backend.held = trio.Event()
    await outbox.put(outgoing(0))  # taken by the sender, which waits for the backend
    await trio.testing.wait_all_tasks_blocked()
    for n in range(1, Outbox.LIMIT + 1):
        await outbox.put(outgoing(n))  # these wait, up to the limit
    with trio.move_on_after(0.2) as waited:
        await outbox.put(outgoing(Outbox.LIMIT + 1))
    assert waited.cancelled_caught  # one too many: the reader is held back
    backend.held.set()
    backend.held = None
    await outbox.put(outgoing(Outbox.LIMIT + 1))
    await outbox.wait_idle()
    assert [reply["ref"] for reply in session.replies] == list(range(Outbox.LIMIT + 2))


async def test_a_batch_that_was_never_sent_is_refused_without_looking_for_it(nursery):
    # a refused connection wrote nothing: no stream read can find it, none is made
    session, backend = FakeSession(nursery), FakeBackend()
    outbox = Outbox(session, backend, Metrics(), RoomRules(Config()), settle=30.0)
    backend.down, backend.sent = True, False
    with trio.fail_after(5):
        for n in range(3):
            await outbox.put(outgoing(n))
        await outbox.wait_idle()
    assert [(reply["type"], reply.get("code")) for reply in session.replies] == [
        ("error", "unavailable")
    ] * 3
    assert backend.calls == 1


async def test_a_batch_that_may_have_run_is_looked_for_before_it_is_refused(nursery):
    session, backend = FakeSession(nursery), FakeBackend()
    outbox = Outbox(session, backend, Metrics(), RoomRules(Config()), settle=0.2)
    backend.down = True
    with trio.fail_after(5):
        await outbox.put(outgoing(0))
        await outbox.wait_idle()
    assert [(reply["type"], reply.get("code")) for reply in session.replies] == [
        ("error", "unavailable")
    ]
    assert backend.calls > 1  # the stream was read (here: tried) before the refusal


async def test_read_markers_waiting_together_keep_only_the_newest_per_room(nursery):
    from trio_chat._config import HistoryConfig
    from trio_chat._outbox import OutgoingRead

    session, backend = FakeSession(nursery), FakeBackend()
    outbox = Outbox(session, backend, Metrics(), RoomRules(Config()))
    backend.held = trio.Event()
    await outbox.put(outgoing(1))  # the first batch goes out and is held there
    await trio.testing.wait_all_tasks_blocked()
    history = HistoryConfig()
    for room, message_id in [("a", "5-0"), ("b", "1-0"), ("a", "7-0"), ("a", "6-0")]:
        await outbox.put(OutgoingRead(room, "u", message_id, history, "event", message_id))
    assert [(r.room, r.message_id) for r in outbox._waiting] == [("a", "7-0"), ("b", "1-0")]
