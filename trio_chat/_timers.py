"""Many cheap one-shot timers served by one task.

Every session has a token deadline (and its warning), but a sleeping task per session costs
kilobytes per idle connection; a heap of timers served by one task costs a few dozen bytes.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from collections.abc import Callable

logger = logging.getLogger(__name__)


class Timer:
    """A scheduled call; :meth:`cancel` drops it (and what its callback holds) at once."""

    __slots__ = ("callback", "seq", "when")

    def __init__(self, when: float, seq: int, callback: Callable[[], object]) -> None:
        self.when = when
        self.seq = seq
        self.callback: Callable[[], object] | None = callback

    def __lt__(self, other: Timer) -> bool:
        return (self.when, self.seq) < (other.when, other.seq)

    def cancel(self) -> None:
        self.callback = None


class Timers:
    """Calls sync callbacks at trio-clock times, from :meth:`run` (one task for them all)."""

    def __init__(self) -> None:
        self._heap: list[Timer] = []
        self._seq = itertools.count()
        self._wakeup = trio.Event()

    def call_later(self, delay: float, callback: Callable[[], object]) -> Timer:
        timer = Timer(trio.current_time() + delay, next(self._seq), callback)
        heapq.heappush(self._heap, timer)
        if self._heap[0] is timer:
            self._wakeup.set()  # earlier than what run() sleeps until
        return timer

    async def run(self) -> None:
        """Fire due timers until cancelled; a callback that raises is logged, not fatal."""
        while True:
            now = trio.current_time()
            while self._heap and self._heap[0].when <= now:
                callback = heapq.heappop(self._heap).callback
                if callback is not None:
                    try:
                        callback()
                    except Exception:
                        logger.exception("timer callback %r failed", callback)
            self._wakeup = trio.Event()
            with trio.move_on_at(self._heap[0].when if self._heap else math.inf):
                await self._wakeup.wait()
