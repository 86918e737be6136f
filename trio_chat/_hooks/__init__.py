"""The application's hooks (SPEC §14): what the application decides that only it can know.

``events`` holds the contract both transports share: one frozen event per hook and the two
answers, :class:`~.events.Allow` and :class:`~.events.Deny`. ``caller`` asks a hook and turns
every way it can go wrong (an exception, a hang, an answer of the wrong shape) into one
failure that the connection fails closed on, with the metrics and the rate-limited logs.
``http`` is the daemon's transport: the same hooks as signed ``POST`` requests to the
application, over pooled keep-alive connections. :func:`open_hooks` picks one.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import trio

from .._errors import ConfigError
from .caller import HookCaller, methods_of
from .http import HttpHooks

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from .._config import Config
    from .._metrics import Metrics


def check_hooks(config: Config, hooks: object | None) -> None:
    """Refuse a hooks set-up that cannot work, before anything starts.

    Raises:
        ConfigError: both ``hooks`` and ``hooks.url`` are given, ``hooks.url`` lacks
            ``hooks.secret``, or ``hooks`` has none of the hook methods.
    """
    if hooks is not None:
        if config.hooks.url is not None:
            raise ConfigError(
                "config error: hooks.url: set, and serve() was given hooks= too (one or the other)"
            )
        try:
            methods_of(hooks)
        except TypeError as exc:
            raise ConfigError(f"serve(hooks=...): {exc}") from None
    elif config.hooks.url is not None and not config.hooks.secret:
        raise ConfigError("config error: hooks.secret: required with hooks.url")


@asynccontextmanager
async def open_hooks(
    config: Config, hooks: object | None, metrics: Metrics
) -> AsyncIterator[HookCaller | None]:
    """The caller of an embedding's Python ``hooks``, or of ``hooks.url``, or None (no hooks:
    nothing is asked and nothing costs). :func:`check_hooks` first."""
    settings = config.hooks
    if hooks is not None:
        yield HookCaller(methods_of(hooks), timeout=settings.timeout, metrics=metrics)
        return
    if settings.url is None:
        yield None
        return
    client = HttpHooks(settings, config.server.instance_id, config.limits.max_message_bytes)
    try:
        yield HookCaller(client.hooks(), timeout=settings.timeout, metrics=metrics)
    finally:
        with trio.move_on_after(1, shield=True):
            await client.aclose()
