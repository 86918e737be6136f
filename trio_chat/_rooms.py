"""What a room allows (the ``[[rooms]]`` tables, SPEC §15), and the room events that travel on
its channel beside its messages: presence, signals and read markers.

No I/O here. A room message on ``chat:room:<room>`` has no ``type``; these events have one, so
the pump tells them apart, and none of them is stored in the room's stream.
"""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING

import attrs

from ._config import HistoryConfig
from ._messages import dumps

if TYPE_CHECKING:
    from collections.abc import Mapping

    from ._config import Config
    from ._messages import JSONValue

#: room ids whose options are remembered; beyond, the memory starts again (the tables are few
#: and fnmatch is cheap, but a join or a send should not pay for it every time)
_REMEMBERED = 10_000

PRESENCE_JOIN = "presence_join"
PRESENCE_LEAVE = "presence_leave"
SIGNAL = "signal"
READ = "read"
#: the ``type`` of every room event that is not a message
ROOM_EVENTS = frozenset({PRESENCE_JOIN, PRESENCE_LEAVE, SIGNAL, READ})


@attrs.frozen
class RoomPolicy:
    """The options of one room: its ``[[rooms]]`` table's, else the defaults."""

    history: HistoryConfig
    presence_events: bool = False
    signals: bool = True
    client_publish: bool = True
    max_members: int = 0


class RoomRules:
    """The policy of each room, from the configuration's ``[[rooms]]`` tables: the first whose
    ``match`` fits the room id applies."""

    def __init__(self, config: Config) -> None:
        self._tables = config.rooms
        self._history = config.history
        self.default = RoomPolicy(config.history)
        self._known: dict[str, RoomPolicy] = {}

    def __call__(self, room: str) -> RoomPolicy:
        if not self._tables:
            return self.default
        if (policy := self._known.get(room)) is None:
            if len(self._known) >= _REMEMBERED:
                self._known.clear()
            policy = self._known[room] = self._find(room)
        return policy

    def _find(self, room: str) -> RoomPolicy:
        for table in self._tables:
            if fnmatch.fnmatchcase(room, table.match):
                history = HistoryConfig(
                    size=self._history.size if table.history_size is None else table.history_size,
                    ttl=self._history.ttl if table.history_ttl is None else table.history_ttl,
                )
                return RoomPolicy(
                    history,
                    presence_events=table.presence_events,
                    signals=table.signals,
                    client_publish=table.client_publish,
                    max_members=table.max_members,
                )
        return self.default


def presence_join(
    room: str, user: str, session: str | None, info: Mapping[str, JSONValue] | None
) -> str:
    """The ``chat:room`` payload of a user's arrival; ``session`` (not forwarded) is where it
    came from, which gets no copy."""
    return dumps(
        {"type": PRESENCE_JOIN, "room": room, "user": user, "info": info, "session": session}
    )


def presence_leave(room: str, user: str, session: str | None) -> str:
    return dumps({"type": PRESENCE_LEAVE, "room": room, "user": user, "session": session})


def signal(room: str, user: str, session: str, data: JSONValue) -> str:
    return dumps({"type": SIGNAL, "room": room, "from": user, "session": session, "data": data})


def read(room: str, user: str, session: str, message_id: str) -> str:
    return dumps({"type": READ, "room": room, "user": user, "id": message_id, "session": session})


def client_frame(event: Mapping[str, JSONValue]) -> dict[str, JSONValue]:
    """The fields of the frame members get for a room event: the payload's but its ``type``
    (the frame's) and the origin session."""
    return {name: value for name, value in event.items() if name not in ("type", "session")}
