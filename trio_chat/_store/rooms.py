"""Room presence per user and read markers in Redis (SPEC §15): the scripts, and the steps a
Redis Cluster takes instead.

No I/O here. Presence is counted per session, so that every step can be done twice:

- **occupy** (a session enters or leaves a room): ``ZADD`` / ``ZREM`` of the session in
  ``ws:room:<room>`` says whether its membership changed; only then does
  ``HINCRBY ws:room:<room>:users <user> ±1`` count it. The answer of that ``HINCRBY`` decides
  the one caller that announces: 1 after +1 is the user's arrival (``presence_join``), 0 after
  -1 their departure (``presence_leave``, and the count is removed). A cleanup sent again after
  a failure, a reaper that reaps a session its owner removed, a stale room list: none of them
  counts anybody twice, because the session is no longer a member the second time.
- **renew** (the heartbeat, for a room's local sessions): ``ZADD`` of each, and the sessions
  that were not members (Redis restarted empty, or evicted them) are counted in again, without
  an announcement (for the clients they never left).
- **mark_read**: a read marker moves only forward; only a call that moved it announces ``read``.

``ws:rooms`` is set from the length of the users hash by every one of them.

On one Redis each is one script over the three keys (they may be in one script), which also
publishes, so events leave in the order of the changes. On a Redis Cluster the keys and the
channel hash to different slots: the cluster backend takes the same steps one round trip each
(:class:`ClusterSteps`), and keeps ``ws:rooms`` with increments at each arrival and departure,
which commute where two instances' absolute writes would cross. A failure between two steps
there loses that one change of a count.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from . import keys

if TYPE_CHECKING:
    from collections.abc import Mapping

#: the end of both: renew the counts' TTL and set the room's score in ws:rooms from them
_INDEX = """\
local users = redis.call('HLEN', KEYS[2])
if users > 0 then
  redis.call('PEXPIRE', KEYS[2], ttl)
  redis.call('ZADD', KEYS[3], users, room)
else
  redis.call('ZREM', KEYS[3], room)
end
"""

#: KEYS: ``ws:room:<room>``, ``ws:room:<room>:users``, ``ws:rooms``. ARGV: session, user,
#: delta (1 enters, -1 leaves), now (ms), TTL (ms), room, channel, event ('': none),
#: the publishing command. Returns {1 if the session's membership changed else 0, the user's
#: sessions in the room after it, the room's users}.
OCCUPY_SCRIPT = (
    """\
local ttl, room = ARGV[5], ARGV[6]
local delta = tonumber(ARGV[3])
local changed
if delta > 0 then
  changed = redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
else
  changed = redis.call('ZREM', KEYS[1], ARGV[1])
end
redis.call('PEXPIRE', KEYS[1], ttl)
local n = tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or '0')
if changed == 1 then
  n = redis.call('HINCRBY', KEYS[2], ARGV[2], delta)
  if n <= 0 then redis.call('HDEL', KEYS[2], ARGV[2]) end
end
"""
    + _INDEX
    + """\
if changed == 1 and ARGV[8] ~= '' and ((delta > 0 and n == 1) or (delta < 0 and n == 0)) then
  redis.call(ARGV[9], ARGV[7], ARGV[8])
end
return {changed, n, users}
"""
)
OCCUPY_SHA = hashlib.sha1(OCCUPY_SCRIPT.encode()).hexdigest()

#: KEYS: as :data:`OCCUPY_SCRIPT`. ARGV: now (ms), TTL (ms), room, then session and user of
#: each local member. Returns the room's users.
RENEW_SCRIPT = (
    """\
local ttl, room = ARGV[2], ARGV[3]
for i = 4, #ARGV, 2 do
  if redis.call('ZADD', KEYS[1], ARGV[1], ARGV[i]) == 1 then
    redis.call('HINCRBY', KEYS[2], ARGV[i + 1], 1)
  end
end
redis.call('PEXPIRE', KEYS[1], ttl)
"""
    + _INDEX
    + "return users\n"
)
RENEW_SHA = hashlib.sha1(RENEW_SCRIPT.encode()).hexdigest()

#: A cluster's second step of occupy and renew. KEYS[1]: ``ws:room:<room>:users``. ARGV: TTL
#: (ms), then user and delta of each change. Returns {each user's sessions after it...,
#: the room's users}.
COUNT_SCRIPT = """\
local counts = {}
for i = 2, #ARGV, 2 do
  local n = redis.call('HINCRBY', KEYS[1], ARGV[i], tonumber(ARGV[i + 1]))
  if n <= 0 then redis.call('HDEL', KEYS[1], ARGV[i]) end
  counts[#counts + 1] = n
end
local users = redis.call('HLEN', KEYS[1])
if users > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
counts[#counts + 1] = users
return counts
"""
COUNT_SHA = hashlib.sha1(COUNT_SCRIPT.encode()).hexdigest()

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

#: every script, by its SHA: loaded again where Redis answers NOSCRIPT
SCRIPTS = {
    OCCUPY_SHA: OCCUPY_SCRIPT,
    RENEW_SHA: RENEW_SCRIPT,
    COUNT_SHA: COUNT_SCRIPT,
    MARK_READ_SHA: MARK_READ_SCRIPT,
    COUNT_AFTER_SHA: COUNT_AFTER_SCRIPT,
}


def occupy_call(
    room: str,
    session: str,
    user: str,
    delta: int,
    now_ms: int,
    ttl_ms: int,
    event: str | None,
    publish: str = "PUBLISH",
) -> tuple[list[str], list[str | int]]:
    """KEYS and ARGV of :data:`OCCUPY_SCRIPT`."""
    names = [keys.room_presence(room), keys.room_users(room), keys.ROOMS]
    channel = keys.room_channel(room)
    return names, [session, user, delta, now_ms, ttl_ms, room, channel, event or "", publish]


def renew_call(
    room: str, members: Mapping[str, str], now_ms: int, ttl_ms: int
) -> tuple[list[str], list[str | int]]:
    """KEYS and ARGV of :data:`RENEW_SCRIPT`."""
    names = [keys.room_presence(room), keys.room_users(room), keys.ROOMS]
    args: list[str | int] = [now_ms, ttl_ms, room]
    for session, user in members.items():
        args += [session, user]
    return names, args


def is_transition(delta: int, sessions: int) -> bool:
    """Whether a change of ``delta`` sessions that left the user ``sessions`` sessions in the
    room was the user's arrival (none there before) or departure (none left)."""
    return (delta > 0 and sessions == delta) or (delta < 0 and sessions == 0)
