"""pytest fixtures for real etcd, Redis and multi-host networks.

Import the ones a test directory needs into its ``conftest.py``::

    from pymooncake.testing.fixtures import etcd_cluster, netns  # noqa: F401

* ``etcd_cluster`` (session): a one-member etcd on 127.0.0.1, ports chosen at
  run time, in a temporary data directory.
* ``etcd_client`` : an :class:`~pymooncake._etcd.EtcdClient` of it, closed after the test.
* ``redis_server`` / ``redis_server_with_password`` (session): ``redis-server``
  on 127.0.0.1 (the second with ``requirepass``, see :data:`REDIS_PASSWORD`).
* ``netns``: ``netns(hosts)`` builds a :class:`NetnsNetwork`, torn down after
  the test whatever happened.

When etcd, redis-server, redis-py or ``ip`` is missing the test is skipped
with the package to install -- or fails when ``CI`` is set, since ``.ci/run``
installs them.  Network namespaces also need root: without it the test is
skipped, even under CI (nothing to install fixes that).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from .._etcd import EtcdClient
from ._etcd_server import EtcdCluster
from ._netns import NetnsNetwork, netns_unavailable_reason
from ._redis_server import RedisServer
from ._tools import find_tool, require_tool, unavailable

__all__ = [
    "REDIS_PASSWORD",
    "etcd_client",
    "etcd_cluster",
    "netns",
    "redis_server",
    "redis_server_with_password",
    "require_netns",
    "require_redis_py",
]

REDIS_PASSWORD = "mooncake-test-secret"


@pytest.fixture(scope="session")
def etcd_cluster() -> Iterator[EtcdCluster]:
    """A one-member etcd on 127.0.0.1 (Debian package etcd-server)."""
    binary = require_tool("etcd", package="etcd-server")
    with EtcdCluster(binary=binary) as cluster:
        yield cluster


@pytest.fixture
def etcd_client(etcd_cluster: EtcdCluster) -> Iterator[EtcdClient]:
    with EtcdClient(etcd_cluster.endpoints) as client:
        yield client


def require_redis_py() -> None:
    """Skip (fail under CI) when redis-py, the ``redis`` extra, is missing."""
    try:
        import redis  # noqa: F401
    except ImportError:
        unavailable("redis-py is not installed (pip install 'pymooncake[redis]')")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """redis-server on 127.0.0.1 without a password."""
    binary = require_tool("redis-server", package="redis-server")
    require_redis_py()
    with RedisServer(binary=binary) as server:
        yield server


@pytest.fixture(scope="session")
def redis_server_with_password() -> Iterator[RedisServer]:
    """redis-server on 127.0.0.1 with ``requirepass`` :data:`REDIS_PASSWORD`
    and an ACL user ``mooncake`` with the same password."""
    binary = require_tool("redis-server", package="redis-server")
    require_redis_py()
    with RedisServer(
        binary=binary, password=REDIS_PASSWORD, acl_user=("mooncake", REDIS_PASSWORD)
    ) as server:
        yield server


_netns_reason: list[str | None] = []  # probed once per process


def require_netns() -> None:
    """Skip unless network namespaces can be built (root, ``ip``, a kernel and
    container that allow them); a missing ``ip`` fails under CI."""
    if find_tool("ip") is None:
        unavailable("`ip` is not installed (Debian package iproute2; .ci/run installs it)")
    if not _netns_reason:
        _netns_reason.append(netns_unavailable_reason())
    reason = _netns_reason[0]
    if reason is not None:
        unavailable(f"multi-host test needs network namespaces: {reason}", fail_in_ci=False)


@pytest.fixture
def netns() -> Iterator[Callable[[int], NetnsNetwork]]:
    """``netns(n)``: n namespaces on a private bridge; removed after the test."""
    require_netns()
    networks: list[NetnsNetwork] = []

    def make(hosts: int) -> NetnsNetwork:
        net = NetnsNetwork(hosts)
        networks.append(net)
        net.wait_reachable()
        return net

    try:
        yield make
    finally:
        for net in networks:
            net.close()
