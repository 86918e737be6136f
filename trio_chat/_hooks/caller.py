"""Asking a hook, and failing closed (SPEC §14).

:class:`HookCaller` is what the connection talks to, whichever the transport: it calls the
hook under ``hooks.timeout``, counts and times it, and turns every way a call can go wrong
(an exception, a hang, an answer that is neither :class:`Allow` nor :class:`Deny`, an ``info``
over 1 KiB) into :class:`HookFailed`, which the caller answers with ``unavailable`` (503
``hooks_unavailable`` at connect). A refusal is :class:`HookDenied`. Failures are logged once
per burst, not once per call: an application that is down would otherwise flood the log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Final

import trio

from .._errors import ChatError
from .._messages import dumps
from .events import HOOKS, KEEP, Allow, Deny, DisconnectEvent, Event

if TYPE_CHECKING:
    from .._metrics import Metrics

logger = logging.getLogger(__name__)

#: the largest ``info`` a ``connect`` hook may give, in bytes of its JSON (SPEC §14)
MAX_INFO_BYTES: Final = 1024
#: a burst of failures is reported again, with its count, at most this often (seconds)
REPORT_EVERY: Final = 60.0

Hook = Callable[[Event], Awaitable[object]]


class HookDenied(ChatError):
    """The application said no; the message is its reason, for the client."""


class HookFailed(ChatError):
    """The application could not be asked, or answered nonsense: fail closed."""


def methods_of(hooks: object) -> dict[str, Hook]:
    """The hooks an embedding application's object has (any of :data:`HOOKS`)."""
    found = {}
    for name in HOOKS:
        method = getattr(hooks, name, None)
        if method is not None:
            if not callable(method):
                raise TypeError(f"hooks.{name} is not callable")
            found[name] = method
    if not found:
        raise TypeError(f"the hooks object has none of the methods {', '.join(HOOKS)}")
    return found


class HookCaller:
    """Calls the application's hooks with a deadline, and judges their answers.

    Args:
        hooks: each hook's callable, by name; a hook not in it is never asked (allowed).
        timeout: seconds a call may take, waiting for a free connection included.
        metrics: where ``trio_chat_hook_*`` are counted.
    """

    def __init__(self, hooks: Mapping[str, Hook], *, timeout: float, metrics: Metrics) -> None:
        self._hooks = dict(hooks)
        self._timeout = timeout
        self._metrics = metrics
        self._failures = _Bursts()

    def __contains__(self, name: str) -> bool:
        return name in self._hooks

    async def decide(self, name: str, event: Event) -> Allow:
        """Ask hook ``name`` about ``event``.

        Returns:
            The application's :class:`Allow`, checked (``info`` a JSON object of at most
            1 KiB, ``rooms`` strings, ``publish`` a bool, ``data`` JSON); a room id that is
            not valid is the connection's to refuse, room by room.

        Raises:
            HookDenied: the application refused.
            HookFailed: no valid answer within the timeout.
        """
        started = time.perf_counter()
        try:
            answer = _checked(name, await self._call(name, event))
        except HookFailed as exc:
            self._metrics.hook(name, "error", time.perf_counter() - started)
            self._failures.failed(name, exc)
            raise
        self._failures.succeeded()
        result = "allow" if isinstance(answer, Allow) else "deny"
        self._metrics.hook(name, result, time.perf_counter() - started)
        if isinstance(answer, Deny):
            raise HookDenied(answer.reason)
        return answer

    async def notify(self, event: DisconnectEvent) -> None:
        """Tell the ``disconnect`` hook, once; a failure is logged and counted, never raised."""
        if "disconnect" not in self._hooks:
            return
        started = time.perf_counter()
        try:
            await self._call("disconnect", event)
        except HookFailed as exc:
            self._metrics.hook("disconnect", "error", time.perf_counter() - started)
            self._failures.failed("disconnect", exc)
            return
        self._failures.succeeded()
        self._metrics.hook("disconnect", "allow", time.perf_counter() - started)

    async def _call(self, name: str, event: Event) -> object:
        with trio.move_on_after(self._timeout) as scope:
            try:
                return await self._hooks[name](event)
            except HookFailed:
                raise
            except Exception as exc:  # the application's bug is the application's failure
                raise HookFailed(f"raised {type(exc).__name__}: {exc}") from exc
        assert scope.cancelled_caught
        raise HookFailed(f"no answer within {self._timeout:g} s")


def _checked(name: str, answer: object) -> Allow | Deny:
    if isinstance(answer, Deny):
        if not isinstance(answer.reason, str):
            raise HookFailed("Deny.reason is not a string")
        return answer
    if not isinstance(answer, Allow):
        raise HookFailed(f"answered {type(answer).__name__}, not Allow or Deny")
    if answer.info is not None:
        if not isinstance(answer.info, Mapping):
            raise HookFailed("'info' is not a JSON object")
        try:
            size = len(dumps(dict(answer.info)).encode())
        except (TypeError, ValueError) as exc:
            raise HookFailed(f"'info' is not JSON: {exc}") from None
        if size > MAX_INFO_BYTES:
            raise HookFailed(f"'info' is {size} bytes, over {MAX_INFO_BYTES}")
    for room in answer.rooms:
        if not isinstance(room, str):
            raise HookFailed("'rooms' must be a list of room ids")
    if not isinstance(answer.publish, bool):
        raise HookFailed("'publish' is not a boolean")
    if name != "connect" and (answer.info is not None or answer.rooms):
        raise HookFailed(f"'info' and 'rooms' are answers of connect, not of {name}")
    if answer.data is not KEEP:
        try:
            dumps(answer.data)
        except (TypeError, ValueError, RecursionError) as exc:
            raise HookFailed(f"'data' is not JSON: {exc}") from None
    return answer


class _Bursts:
    """Logs the first failure of a burst, then a count every :data:`REPORT_EVERY` seconds
    while it lasts, and one line when a call succeeds again."""

    def __init__(self) -> None:
        self._since: float | None = None  # when the current burst began
        self._reported = 0.0
        self._count = 0

    def failed(self, name: str, exc: HookFailed) -> None:
        now = time.monotonic()
        self._count += 1
        if self._since is None:
            self._since = self._reported = now
            logger.warning("hook %s failed (failing closed): %s", name, exc)
        elif now - self._reported >= REPORT_EVERY:
            self._reported = now
            logger.warning(
                "hooks still failing: %d failure(s) in %.0f s, last: %s %s",
                self._count,
                now - self._since,
                name,
                exc,
            )

    def succeeded(self) -> None:
        if self._since is not None:
            logger.info(
                "hooks answer again after %d failure(s) in %.1f s",
                self._count,
                time.monotonic() - self._since,
            )
            self._since, self._count = None, 0
