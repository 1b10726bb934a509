"""Fixtures of the metadata tests: real etcd and Redis (from
:mod:`pymooncake.testing.fixtures`), our HTTP metadata server, and one opener
per backend for the conformance suite."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest

from pymooncake.testing import EtcdCluster, RedisServer
from pymooncake.testing.fixtures import (  # noqa: F401  (fixtures used by name)
    REDIS_PASSWORD,
    etcd_client,
    etcd_cluster,
    netns,
    redis_server,
    redis_server_with_password,
)
from pymooncake.transfer.metadata import HttpMetadataStore, MemoryMetadataStore, MetadataStore
from pymooncake.transfer.metadata.server import MetadataServer

OpenStore = Callable[[], MetadataStore]

BACKENDS = ["memory", "http", "etcd", "redis"]


@pytest.fixture
def http_metadata() -> Iterator[tuple[MetadataServer, str]]:
    """Our HTTP metadata server on 127.0.0.1 and its URL (one per test: its
    thread must be gone when the leak check looks)."""
    server = MetadataServer()
    with server.serve() as http:
        yield server, server.url(http)


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=BACKENDS)
def open_store(request: pytest.FixtureRequest, prefix: str) -> OpenStore:
    """A function returning a new client of the backend under test."""
    kind = request.param
    if kind == "memory":
        return lambda: MemoryMetadataStore(prefix)
    if kind == "http":
        _, url = request.getfixturevalue("http_metadata")
        return lambda: HttpMetadataStore(url)
    if kind == "etcd":
        from pymooncake.transfer.metadata.etcd import EtcdMetadataStore

        cluster: EtcdCluster = request.getfixturevalue("etcd_cluster")
        return lambda: EtcdMetadataStore(cluster.endpoints)
    from pymooncake.transfer.metadata.redis import RedisMetadataStore

    server: RedisServer = request.getfixturevalue("redis_server_with_password")
    return lambda: RedisMetadataStore(server.address, password=REDIS_PASSWORD)
