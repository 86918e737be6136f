"""The ledger: what was sent, acknowledged and delivered, the gaps the server owned up to,
the failovers' replication checks, the read markers sent, and the audit of the invariant at the
end."""

from __future__ import annotations

from collections import Counter
from contextlib import suppress
from typing import Any

from .common import format_id


class Message:
    """One room message id, as seen by the clients: acked by its sender, delivered to some."""

    __slots__ = ("acked", "delivered", "expected", "origin", "sender", "t_send")

    def __init__(self) -> None:
        self.acked = False
        self.sender = -1
        self.t_send = 0.0
        self.expected = 0  # bit c: client c must get it
        self.delivered = 0  # bit c: client c got it
        self.origin: tuple[int, int] | None = None  # (client, n) from the payload


class Gap:
    """Ids of one room a client may never get: after a rejoin's ``recovered: false``."""

    __slots__ = ("cap", "hi", "label", "lo")

    def __init__(self, lo: int, cap: int, label: str) -> None:
        self.lo = lo  # the since of the rejoin (exclusive)
        self.hi: int | None = None  # the first id received after the joined (exclusive)
        self.cap = cap  # ids up to the joined's own time, at most
        self.label = label

    def holds(self, message_id: int) -> bool:
        hi = self.cap if self.hi is None else min(self.hi, self.cap)
        return self.lo < message_id < hi


class ReplicationCheck:
    """One room's stream as the promoted replica held it after a failover (``--cluster``): an
    acknowledged message of that room with an id in ``lo..hi`` that is not in ``present`` was
    stored by the old master only (not replicated, or written by it after it was failed over),
    and is charged to the fault ``label`` (``lost_unreplicated``), not counted as lost."""

    __slots__ = ("hi", "label", "lo", "present")

    def __init__(self, lo: int, hi: int, present: set[int], label: str) -> None:
        self.lo, self.hi, self.present, self.label = lo, hi, present, label

    def misses(self, message_id: int) -> bool:
        return self.lo <= message_id <= self.hi and message_id not in self.present


class Ledger:
    def __init__(self) -> None:
        self.messages: dict[tuple[str, int], Message] = {}
        self.members: dict[str, dict[int, float]] = {}  # room -> client -> member since (ms)
        self.gaps: dict[tuple[int, str], list[Gap]] = {}
        self.replication_checks: dict[str, list[ReplicationCheck]] = {}
        self.sends: dict[tuple[int, int], str] = {}  # (client, n) -> outcome
        #: (client, n) -> (sent, error received (unix ms), instance) of the sends refused
        self.errors_at: dict[tuple[int, int], tuple[float, float, str]] = {}
        self.counts: Counter[str] = Counter()
        self.send_errors: Counter[str] = Counter()
        self.samples: dict[str, list[Any]] = {
            "duplicates": [],
            "order": [],
            "strays": [],
            "read_backwards": [],
            "read_foreign": [],
        }
        #: (user, room) -> every message id that user's clients sent in a ``read`` there
        self.reads_sent: dict[tuple[str, str], set[int]] = {}
        self.read_errors: Counter[str] = Counter()
        #: ``read`` events whose id was not above the last one the connection saw for that user
        #: and room, after a fault that may have lost the marker (Redis restarted empty)
        self.read_backwards_by_fault: Counter[str] = Counter()

    def _message(self, room: str, message_id: int) -> Message:
        key = (room, message_id)
        message = self.messages.get(key)
        if message is None:
            message = self.messages[key] = Message()
        return message

    def join(self, room: str, client: int, since: float) -> None:
        self.members.setdefault(room, {})[client] = since

    def acked(self, client: int, room: str, message_id: int, t_send: float, n: int) -> None:
        message = self._message(room, message_id)
        if message.acked:
            self.counts["id_collisions"] += 1
        message.acked, message.sender, message.t_send = True, client, t_send
        if message.origin is not None and message.origin != (client, n):
            self.counts["payload_mismatches"] += 1
        mask = 0
        for member, since in self.members.get(room, {}).items():
            if member != client and since < t_send:
                mask |= 1 << member
        message.expected = mask
        self.sends[(client, n)] = "acked"
        self.counts["acked"] += 1

    def deliver(self, client: int, room: str, message_id: int, data: Any, via: str) -> None:
        message = self._message(room, message_id)
        bit = 1 << client
        if message.delivered & bit:
            self.counts["duplicates"] += 1
            if len(self.samples["duplicates"]) < 20:
                self.samples["duplicates"].append(
                    {"client": client, "room": room, "id": format_id(message_id), "via": via}
                )
        message.delivered |= bit
        self.counts[f"delivered_{via}"] += 1
        if message.origin is None and isinstance(data, dict):
            with suppress(KeyError, TypeError, ValueError):
                message.origin = (int(data["c"]), int(data["n"]))
        if message.origin is not None and message.origin[0] == client:
            self.counts["own_replayed"] += 1

    def read_sent(self, user: str, room: str, message_id: int) -> None:
        self.reads_sent.setdefault((user, room), set()).add(message_id)
        self.counts["reads"] += 1

    def add_gap(self, client: int, room: str, gap: Gap) -> None:
        self.gaps.setdefault((client, room), []).append(gap)

    def _gap(self, client: int, room: str, message_id: int) -> Gap | None:
        for gap in self.gaps.get((client, room), ()):
            if gap.holds(message_id):
                return gap
        return None

    def add_replication_check(self, room: str, check: ReplicationCheck) -> None:
        self.replication_checks.setdefault(room, []).append(check)

    def _unreplicated(self, room: str, message_id: int) -> str | None:
        for check in self.replication_checks.get(room, ()):
            if check.misses(message_id):
                return check.label
        return None

    def audit(self, *, keep_lost: int = 0) -> dict[str, Any]:
        expected = delivered = extra = lost = gaps = 0
        gaps_by_fault: Counter[str] = Counter()
        unreplicated: Counter[str] = Counter()  # acked messages the promoted replica lacked
        lost_unreplicated: Counter[str] = Counter()  # missing deliveries of those
        unreplicated_samples: list[dict[str, Any]] = []
        lost_list: list[tuple[str, int, int]] = []
        published_after_error = unacked_delivered = 0
        after_error: list[dict[str, Any]] = []
        for (room, message_id), message in self.messages.items():
            if not message.acked:
                extra += message.delivered.bit_count()
                unacked_delivered += 1
                if message.origin is not None:
                    outcome = self.sends.get(message.origin, "")
                    if outcome.startswith("error"):
                        published_after_error += 1
                        sent, refused, instance = self.errors_at[message.origin]
                        after_error.append(
                            {
                                "id": format_id(message_id),
                                "room": room,
                                "error": outcome,
                                "instance": instance,
                                "sent_unix_ms": round(sent),
                                "error_unix_ms": round(refused),
                                "appended_unix_ms": message_id >> 32,
                            }
                        )
                continue
            must = message.expected
            expected += must.bit_count()
            delivered += (must & message.delivered).bit_count()
            extra += (message.delivered & ~must).bit_count()
            missing = must & ~message.delivered
            failover = self._unreplicated(room, message_id)
            if failover is not None:
                unreplicated[failover] += 1
                if len(unreplicated_samples) < 10:
                    unreplicated_samples.append(
                        {
                            "room": room,
                            "id": format_id(message_id),
                            "fault": failover,
                            "from_client": message.sender,
                            "expected": must.bit_count(),
                            "delivered": (must & message.delivered).bit_count(),
                        }
                    )
            while missing:
                low = missing & -missing
                missing ^= low
                client = low.bit_length() - 1
                gap = self._gap(client, room, message_id)
                if gap is not None:
                    gaps += 1
                    gaps_by_fault[gap.label] += 1
                elif failover is not None:
                    lost_unreplicated[failover] += 1
                else:
                    lost += 1
                    if len(lost_list) < keep_lost:
                        lost_list.append((room, message_id, client))
        return {
            "expected_deliveries": expected,
            "delivered": delivered,
            "lost": lost,
            "gaps": gaps,
            "gaps_by_fault": dict(gaps_by_fault),
            "unreplicated": sum(unreplicated.values()),
            "unreplicated_by_fault": dict(unreplicated),
            "lost_unreplicated": sum(lost_unreplicated.values()),
            "lost_unreplicated_by_fault": dict(lost_unreplicated),
            "unreplicated_samples": unreplicated_samples,
            "extra_deliveries": extra,
            "unacked_published": unacked_delivered,
            "published_after_error": published_after_error,
            "published_after_error_samples": after_error[:10],
            "lost_list": lost_list,
        }
