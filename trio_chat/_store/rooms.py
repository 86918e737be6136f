"""Room presence per user and read markers in Redis (SPEC §15): the scripts, and what a Redis
Cluster does after them.

No I/O here. Two steps must each make exactly one event however many instances race:

- **occupy**: a session enters or leaves a room. ``HINCRBY ws:room:<room>:users <user> ±1``
  answers the user's sessions there; 1 after +1 is the user's arrival, 0 after -1 their
  departure, and only the caller that got that answer publishes ``presence_join`` /
  ``presence_leave``. A count that drops to 0 is removed (atomically with the decrement, so a
  concurrent arrival's +1 is never lost), and ``ws:rooms`` is set to the hash's length.
- **mark_read**: a read marker moves only forward; only a call that moved it publishes ``read``.

On one Redis each is one script, which also publishes and updates ``ws:rooms``, so events leave
in the order of the changes. On a Redis Cluster the index and the room's channel hash to other
slots than the script's key: the script runs alone, and the cluster backend queues the index
update and the publication from its answer (:func:`follow_up`) in a second round trip.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from . import keys

if TYPE_CHECKING:
    from .interface import Batch, Command

#: KEYS[1]: ``ws:room:<room>:users``; KEYS[2]: ``ws:rooms`` (when ARGV[8] is 1). ARGV: user,
#: delta (sessions entering; < 0 leaving; 0: only renew and index), TTL ms, room, channel,
#: event ('': none), the publishing command, whether to index. Returns {the user's sessions
#: after it, the room's users}.
OCCUPY_SCRIPT = """\
local n = 0
local delta = tonumber(ARGV[2])
if delta ~= 0 then
  n = redis.call('HINCRBY', KEYS[1], ARGV[1], delta)
  if n <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
end
local users = redis.call('HLEN', KEYS[1])
if users > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[3]) end
if ARGV[8] == '1' then
  if users > 0 then redis.call('ZADD', KEYS[2], users, ARGV[4])
  else redis.call('ZREM', KEYS[2], ARGV[4]) end
end
if ARGV[6] ~= '' and ((delta > 0 and n == delta) or (delta < 0 and n == 0)) then
  redis.call(ARGV[7], ARGV[5], ARGV[6])
end
return {n, users}
"""
OCCUPY_SHA = hashlib.sha1(OCCUPY_SCRIPT.encode()).hexdigest()

#: KEYS[1]: ``ws:read:<room>``. ARGV: user, message id, TTL ms, channel, event ('': none), the
#: publishing command, ordered ('1': ids are stream ids and the marker only moves forward).
#: Returns 1 when the marker moved (and the event was published), else 0.
MARK_READ_SCRIPT = """\
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current == ARGV[2] then return 0 end
if current and ARGV[7] == '1' then
  local ms, seq = string.match(current, '^(%d+)-(%d+)$')
  local new_ms, new_seq = string.match(ARGV[2], '^(%d+)-(%d+)$')
  if ms and new_ms then
    ms, seq, new_ms, new_seq = tonumber(ms), tonumber(seq), tonumber(new_ms), tonumber(new_seq)
    if new_ms < ms or (new_ms == ms and new_seq <= seq) then return 0 end
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if ARGV[5] ~= '' then redis.call(ARGV[6], ARGV[4], ARGV[5]) end
return 1
"""
MARK_READ_SHA = hashlib.sha1(MARK_READ_SCRIPT.encode()).hexdigest()

#: KEYS[1]: a room's stream. ARGV: an entry id, the most to count. Returns how many entries
#: follow that id (at most ARGV[2]), without sending them.
COUNT_AFTER_SCRIPT = """\
return #redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
"""
COUNT_AFTER_SHA = hashlib.sha1(COUNT_AFTER_SCRIPT.encode()).hexdigest()


def occupy_args(
    room: str, user: str, delta: int, ttl_ms: int, event: str | None, *, sharded: bool
) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of :data:`OCCUPY_SCRIPT`; ``sharded``: a cluster node's share, which
    neither indexes nor publishes (:func:`follow_up` does)."""
    if sharded:
        return [keys.room_users(room)], [user, delta, ttl_ms, room, "", "", "PUBLISH", "0"]
    args = [user, delta, ttl_ms, room, keys.room_channel(room), event or "", "PUBLISH", "1"]
    return [keys.room_users(room), keys.ROOMS], args


def mark_read_args(
    room: str,
    user: str,
    message_id: str,
    ttl_ms: int,
    ordered: bool,
    event: str | None,
    *,
    sharded: bool,
) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV of :data:`MARK_READ_SCRIPT` (``sharded``: see :func:`occupy_args`)."""
    channel = "" if sharded else keys.room_channel(room)
    published = "" if sharded or event is None else event
    args = [user, message_id, ttl_ms, channel, published, "PUBLISH", "1" if ordered else "0"]
    return [keys.read_markers(room)], args


def is_transition(delta: int, sessions: int) -> bool:
    """Whether an occupy call that left the user ``sessions`` sessions in the room was the
    user's arrival (there were none before) or departure (there are none left)."""
    return (delta > 0 and sessions == delta) or (delta < 0 and sessions == 0)


def follow_up(batch: Batch, command: Command) -> None:
    """On a Redis Cluster, what the script of ``command`` (run, its reply set) could not do:
    update ``ws:rooms`` and publish the event on the room's shard channel."""
    match command.name, command.args:
        case "occupy", (room, _, delta, _, event):
            sessions, users = command.reply.value
            if users > 0:
                batch.zadd(keys.ROOMS, {room: users})
            else:
                batch.zrem(keys.ROOMS, room)
            if event is not None and is_transition(delta, sessions):
                batch.publish(keys.room_channel(room), event)
        case "mark_read", (room, _, _, _, _, event):
            if command.reply.value and event is not None:
                batch.publish(keys.room_channel(room), event)
