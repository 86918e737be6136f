"""The one small tree of trio-chat's own errors.

Library errors (PyJWT, coredis, trio-websocket) are turned into these at the boundary, so the
rest of the code catches narrow types of ours.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator


class ChatError(Exception):
    """Base class of every error trio-chat raises on purpose."""


class ConfigError(ChatError):
    """The configuration has an unknown key or a bad value; the message names the key."""


class BackendUnavailable(ChatError):
    """The store (Redis) could not be reached or did not answer in time.

    Attributes:
        sent: whether the request may have reached the store, and run there; False when
            nothing of it was sent (no connection could be made, or it was never taken out
            of the queue), so that nothing of it can have run.
    """

    def __init__(self, message: str, *, sent: bool = True) -> None:
        super().__init__(message)
        self.sent = sent


class AuthError(ChatError):
    """A credential was refused at the handshake.

    Attributes:
        status: the HTTP status of the refusal (401, 403, 429, 503).
        code: the machine-readable ``error`` field of the JSON body.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class ProtocolError(ChatError):
    """A client frame was refused; answered with an ``error`` frame of this ``code``."""

    def __init__(self, code: str, message: str, ref: object = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.ref = ref


def first_leaf(error: BaseException) -> BaseException:
    """The first exception of what may be a (nested) exception group; itself if no group."""
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


@contextmanager
def single_error() -> Iterator[None]:
    """Re-raise the one exception a nursery wrapped in an ExceptionGroup, as itself.

    A nursery wraps even a single exception of its body; unwrapped, callers catch the same
    exceptions whether or not a nursery ran the code in between. Groups of several are left
    alone.
    """
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) != 1:
            raise
        error = group.exceptions[0]
        context = error.__context__
        try:
            raise error
        finally:
            error.__context__ = context  # not the group, which was only its wrapper
