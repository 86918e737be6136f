"""Choose the backend for ``redis.url`` (SPEC §2)."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from .._errors import ConfigError
from .cluster import SCHEMES as CLUSTER_SCHEMES
from .cluster import open_cluster_backend
from .memory import MemoryBackend
from .redis import open_redis_backend

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from .interface import Backend


@asynccontextmanager
async def open_backend(url: str, *, command_timeout: float) -> AsyncIterator[Backend]:
    """Open the store named by ``url``; it is closed, with its connections, when the context exits.

    Args:
        url: ``memory://`` for the in-process store; ``redis://``, ``rediss://``, ``unix://`` for
            a Redis; ``redis+cluster://``, ``rediss+cluster://`` for a Redis Cluster.
        command_timeout: the longest a Redis round trip may take (connecting included).

    Raises:
        ConfigError: the scheme is not one of those, or the URL cannot be parsed.
        BackendUnavailable: Redis did not answer a PING (a cluster: no seed node told its slot
            map) within ``command_timeout``; the message names the URL, without its password.
    """
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        yield MemoryBackend()
    elif scheme in {"redis", "rediss", "unix"}:
        async with open_redis_backend(url, command_timeout=command_timeout) as backend:
            yield backend
    elif scheme in CLUSTER_SCHEMES:
        async with open_cluster_backend(url, command_timeout=command_timeout) as backend:
            yield backend
    else:
        raise ConfigError(
            f"redis.url: unsupported scheme {scheme!r}; use memory://, redis://, rediss://, "
            "unix://, redis+cluster:// or rediss+cluster://"
        )
