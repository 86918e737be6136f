from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from _redis_cluster import RedisCluster
from _redis_server import RedisServer, free_port

from trio_chat._store.backends import open_backend

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

    from trio_chat._store.interface import Backend

#: generous for a local server; the tests about timeouts open their own backend
COMMAND_TIMEOUT = 2.0


def pytest_configure(config: pytest.Config) -> None:
    # coredis 6.9 never closes the anyio buffers of a connection that failed to connect, and the
    # garbage collector warns about them, in a test or after it, whenever Redis was unreachable
    message, module = "Unclosed <MemoryObject", "anyio.streams.memory"
    config.addinivalue_line("filterwarnings", f"ignore:{message}:ResourceWarning:{module}")
    warnings.filterwarnings("ignore", message, ResourceWarning, module)  # outside tests


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh, empty redis-server of this test's own, on a free port (never 6379)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "redis-server is not on PATH: `make test` installs Debian's redis-server "
            "(or run `make redis-server`)"
        )
    with tempfile.TemporaryDirectory(prefix="trio-chat-redis-") as directory:
        server = RedisServer(binary, Path(directory), free_port())
        server.start()
        try:
            yield server
        finally:
            server.stop()


def _cluster() -> Iterator[RedisCluster]:
    missing = [name for name in ("redis-server", "redis-cli") if shutil.which(name) is None]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not on PATH: `make test` installs Debian's redis-server "
            "(or run `make redis-server`), which brings redis-cli"
        )
    cluster = RedisCluster()  # in a temporary directory of its own, which stop() removes
    cluster.start()  # about 2.2 s: a new master waits 2 s before it says cluster_state:ok
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster() -> Iterator[RedisCluster]:
    """A Redis Cluster of this test's own (3 masters, 3 replicas, free ports), ok everywhere:
    for tests that kill, pause or restart nodes, or move slots."""
    yield from _cluster()


@pytest.fixture(scope="module")
def redis_cluster_module() -> Iterator[RedisCluster]:
    """One Redis Cluster shared by a module's tests, which must leave it as they found it
    (every node running, the slots where they were); keys and scripts may stay behind."""
    yield from _cluster()


@pytest.fixture(params=["redis", "cluster"])
def redis_or_cluster(request: pytest.FixtureRequest) -> RedisServer | RedisCluster:
    """A redis-server of this test's own, or the module's Redis Cluster emptied: for the tests
    of what must work alike on both (they use its ``url`` only: no faults)."""
    if request.param == "cluster":
        cluster: RedisCluster = request.getfixturevalue("redis_cluster_module")
        cluster.flushall()
        return cluster
    server: RedisServer = request.getfixturevalue("redis_server")
    return server


@pytest.fixture(params=["memory", "redis", "cluster"])
def backend_url(request: pytest.FixtureRequest) -> str:
    """Each backend in turn: the contract tests run on all three alike."""
    if request.param == "memory":
        return "memory://"
    if request.param == "cluster":
        # one cluster for the module (it takes 2 s to start), emptied for every test
        cluster: RedisCluster = request.getfixturevalue("redis_cluster_module")
        cluster.flushall()
        return cluster.url
    # only the redis variant starts a server
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


@pytest.fixture
async def backend(backend_url: str) -> AsyncIterator[Backend]:
    """An open backend of each kind, for the contract tests."""
    async with open_backend(backend_url, command_timeout=COMMAND_TIMEOUT) as opened:
        yield opened
