"""Room history (SPEC §11): the append-and-publish script, stream ids, and the recovery rule.

No I/O here. A room's stream has the name of its channel, ``chat:room:<room>``; a message is
appended and published by one script, so the entry id is the message id that every recipient
sees, and a room's messages are published in id order.
"""

from __future__ import annotations

import hashlib
import logging
import re
from typing import TYPE_CHECKING

import attrs

from .._messages import encode, loads, new_message_id
from . import keys
from .interface import Reply

if TYPE_CHECKING:
    from collections.abc import Iterable

    from .._config import HistoryConfig
    from .interface import Batch, StreamEntry

logger = logging.getLogger(__name__)

#: KEYS[1]: the room's stream, whose name is also the room's channel. ARGV: the message (a
#: JSON object without "id"), the MAXLEN ~ cap, the TTL in ms, and the publishing command
#: (PUBLISH; SPUBLISH on a cluster, where the channel hashes to the slot of the key).
APPEND_SCRIPT = """\
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'm', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call(ARGV[4], KEYS[1], '{"id":"' .. id .. '",' .. string.sub(ARGV[1], 2))
return id
"""
APPEND_SHA = hashlib.sha1(APPEND_SCRIPT.encode()).hexdigest()

#: the field of a stream entry that holds the message
FIELD = "m"

_STREAM_ID = re.compile(r"(\d{1,20})-(\d{1,20})")
_U64 = 2**64

#: an entry id as a comparable pair
StreamId = tuple[int, int]


#: bytes an id adds to a payload, at most: ``"id":"<20 digits>-<20 digits>",``
ID_BYTES = 49


def publish(batch: Batch, history: HistoryConfig, room: str, message: str) -> Reply[str]:
    """Queue the publication of a room message on ``batch``; the reply is its id.

    With history, the message is appended to the room's stream and published by one script
    (:meth:`Batch.append`), and its id is the entry id; without, it is published with an id
    of :func:`~trio_chat._messages.new_message_id`.

    Args:
        message: the payload without its id, from :func:`~trio_chat._messages.room_message`.
    """
    key = keys.room_channel(room)
    if history.size:
        return batch.append(key, message, maxlen=history.size, ttl=history.ttl)
    message_id: Reply[str] = Reply()
    message_id.set(new_message_id())
    batch.publish(key, with_id(message, message_id.value))
    return message_id


def with_id(message: str, message_id: str) -> str:
    """The published payload: ``message`` (a JSON object) with ``"id"`` first, as the script
    makes it."""
    return f'{{"id":"{message_id}",{message[1:]}'


def parse_id(text: object) -> StreamId | None:
    """A full stream id ``<ms>-<seq>`` as a pair, or None for anything else."""
    if not isinstance(text, str) or (match := _STREAM_ID.fullmatch(text)) is None:
        return None
    ms, seq = int(match[1]), int(match[2])
    return (ms, seq) if ms < _U64 and seq < _U64 else None


def format_id(stream_id: StreamId) -> str:
    """A stream id pair as Redis writes it, ``<ms>-<seq>``."""
    return f"{stream_id[0]}-{stream_id[1]}"


def message_frame(room: str, message_id: str, message: dict[str, object]) -> str:
    """The ``message`` frame of a published or stored message: the same bytes either way."""
    return encode(
        "message",
        id=message_id,
        room=room,
        data=message["data"],
        ts=message["ts"],
        **{"from": message["from"]},
    )


def stored(entries: Iterable[StreamEntry]) -> list[dict[str, object]]:
    """The messages of stream entries, as published (with their ``id``), in the same order.

    An entry that is not one of ours (written by someone else: no JSON object with ``data``,
    ``ts`` and ``from`` in field ``m``) is skipped and logged.
    """
    messages = []
    for entry_id, fields in entries:
        try:
            message = loads(fields[FIELD])
            if not isinstance(message, dict) or not {"data", "ts", "from"} <= message.keys():
                raise ValueError("no message object")
        except (KeyError, ValueError) as exc:
            logger.warning("skipped stream entry %s: %s", entry_id, exc)
            continue
        message["id"] = entry_id
        messages.append(message)
    return messages


@attrs.frozen
class Recovery:
    """What a ``join`` with ``since`` answers (SPEC §11)."""

    recovered: bool
    #: the missed messages, oldest first (with their ids)
    missed: list[dict[str, object]]


def recover(
    since: StreamId,
    first: list[StreamEntry],
    newest: list[StreamEntry],
    size: int,
    found: list[StreamEntry] | None = None,
) -> Recovery:
    """Apply the recovery rule to the reads of the room's stream.

    Args:
        since: the last id the client saw.
        first: ``XRANGE key - + COUNT 1``: the oldest entry, if the stream exists.
        newest: ``XREVRANGE key + (since COUNT size+1``: what follows ``since``, newest first.
        size: ``history.size``.
        found: on a Redis Cluster, ``XRANGE key since since``: ``since`` itself.

    ``recovered`` is true exactly when the stream vouches for the whole set: it exists,
    ``since`` is not older than its first entry (trimming removes only the oldest), and no
    more than ``size`` entries follow ``since``. On a cluster, ``since`` must also be in the
    stream: a failover can fork a room's history (a deposed master's late write may have a
    higher id than messages its replica stored meanwhile), and only the stream's own entry
    proves the client's history is the stream's (SPEC §12). Either way the latest ``size``
    that follow are returned.
    """
    oldest = parse_id(first[0][0]) if first else None
    complete = oldest is not None and oldest <= since and len(newest) <= size
    if found is not None:
        complete = complete and bool(found)
    return Recovery(complete, stored(reversed(newest[:size])))
