"""systemd integration without libsystemd: ``sd_notify`` and service credentials (SPEC §9).

:class:`Notifier` speaks the notification protocol of ``Type=notify`` services: one datagram
of ``KEY=VALUE`` lines to the ``AF_UNIX`` socket named by ``$NOTIFY_SOCKET``. Outside systemd
(no ``$NOTIFY_SOCKET``) every call is a no-op, so the server calls it unconditionally.

:func:`credential` reads a secret that the unit passed with ``LoadCredential=`` from
``$CREDENTIALS_DIRECTORY``.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

__all__ = ["Notifier", "credential"]

logger = logging.getLogger(__name__)

#: longest a notification may take: the socket is local, so only a wedged manager is slower
SEND_TIMEOUT = 1.0


class Notifier:
    """Sends service state notifications to systemd.

    Every method is safe to call outside systemd (a no-op), never raises on a failed send (the
    first failure is logged as a warning, later ones at debug level), and never takes longer
    than :data:`SEND_TIMEOUT`, cancellation included: a send is shielded, so ``stopping()``
    may be awaited in a ``finally`` of a cancelled scope.

    Args:
        address: the socket, as in ``$NOTIFY_SOCKET``: a path, or an abstract name starting
            with ``@``. None disables notifications.
        watchdog_usec: ``$WATCHDOG_USEC``, the watchdog interval in microseconds, if any.
    """

    def __init__(self, address: str | None, *, watchdog_usec: int | None = None) -> None:
        self.address = _socket_address(address)
        self._watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._warned = False

    @classmethod
    def from_environ(cls, env: Mapping[str, str] | None = None) -> Notifier:
        """Build a notifier from ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.

        Args:
            env: where to read them; None means :data:`os.environ`.

        The watchdog is on only when ``WATCHDOG_USEC`` is a positive integer and
        ``WATCHDOG_PID``, when set, is this process's id (a watchdog meant for a parent).
        """
        env = os.environ if env is None else env
        usec: int | None = None
        pid = env.get("WATCHDOG_PID")
        if pid is None or pid.strip() == str(os.getpid()):
            try:
                usec = int(env.get("WATCHDOG_USEC", ""))
            except ValueError:
                usec = None
        return cls(env.get("NOTIFY_SOCKET") or None, watchdog_usec=usec)

    @property
    def enabled(self) -> bool:
        """Whether notifications go anywhere (we run under systemd with ``Type=notify``)."""
        return self.address is not None

    def watchdog_interval(self) -> float | None:
        """The watchdog timeout in seconds (``WatchdogSec=``), or None when it is off.

        Send :meth:`watchdog` at about half this interval, as :meth:`keep_alive` does.
        """
        return None if self._watchdog_usec is None else self._watchdog_usec / 1_000_000

    async def ready(self, status: str | None = None) -> None:
        """``READY=1``: start-up is complete (the listener is bound, Redis connected)."""
        await self.notify("READY=1", *_status(status))

    async def stopping(self, status: str | None = None) -> None:
        """``STOPPING=1``: shutdown began (the drain); systemd's stop timeout applies."""
        await self.notify("STOPPING=1", *_status(status))

    async def watchdog(self) -> None:
        """``WATCHDOG=1``: still alive."""
        await self.notify("WATCHDOG=1")

    async def status(self, text: str) -> None:
        """``STATUS=<text>``: a line shown by ``systemctl status``."""
        await self.notify(*_status(text))

    async def notify(self, *assignments: str) -> None:
        """Send ``KEY=VALUE`` assignments in one datagram, as ``sd_notify(3)`` does."""
        if self.address is None or not assignments:
            return
        message = "\n".join(assignments).encode()
        with trio.move_on_after(SEND_TIMEOUT, shield=True) as scope:
            try:
                with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                    await sock.sendto(message, self.address)
            except OSError as exc:
                self._failed(str(exc))
        if scope.cancelled_caught:
            self._failed(f"no room on the socket within {SEND_TIMEOUT}s")

    async def keep_alive(self, healthy: Callable[[], bool] | None = None) -> None:
        """Send ``WATCHDOG=1`` every half watchdog interval, until cancelled.

        Returns at once when the watchdog is off. A run of trio's event loop late by the whole
        interval misses its beat, and systemd restarts the service: that is the point.

        Args:
            healthy: when given, a beat is skipped while it returns False, so that systemd
                restarts an instance that stays unhealthy for the whole interval.
        """
        interval = self.watchdog_interval()
        if interval is None or self.address is None:
            return
        while True:
            if healthy is None or healthy():
                await self.watchdog()
            await trio.sleep(interval / 2)

    def _failed(self, why: str) -> None:
        if self._warned:
            logger.debug("systemd notification to %r failed: %s", self.address, why)
        else:
            self._warned = True
            logger.warning("systemd notification to %r failed: %s", self.address, why)


def credential(name: str, env: Mapping[str, str] | None = None) -> str | None:
    """Read the credential ``name`` passed by the unit's ``LoadCredential=``.

    Args:
        name: the credential's id, as before the colon in ``LoadCredential=name:/path``.
        env: where to find ``CREDENTIALS_DIRECTORY``; None means :data:`os.environ`.

    Returns:
        The file's text without its trailing line break, or None when there is no
        ``$CREDENTIALS_DIRECTORY`` (not started by systemd) or no such credential.

    Raises:
        ValueError: ``name`` is not a plain file name.
        OSError: the credential exists but cannot be read.
    """
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"not a credential name: {name!r}")
    directory = (os.environ if env is None else env).get("CREDENTIALS_DIRECTORY")
    if not directory:
        return None
    try:
        text = (Path(directory) / name).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    return text.removesuffix("\n").removesuffix("\r")


def _socket_address(address: str | None) -> str | None:
    if not address:
        return None
    if address.startswith("@"):
        return "\0" + address[1:]  # Linux abstract namespace
    if address.startswith("/"):
        return address
    # e.g. vsock:... (systemd 253+, for VMs): not needed for a service on the host
    logger.warning("NOTIFY_SOCKET %r is not a unix socket; notifications are off", address)
    return None


def _status(text: str | None) -> tuple[str, ...]:
    # One assignment per line: a line break in the text would start a bogus one.
    return () if text is None else (f"STATUS={' '.join(text.splitlines())}",)
