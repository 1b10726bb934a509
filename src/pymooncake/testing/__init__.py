"""Helpers for tests and demos that users can reuse: local clusters on 127.0.0.1,
the project's commands as subprocesses, real etcd and Redis servers, several
"hosts" in network namespaces, and the metadata backend conformance checks.
pytest fixtures over these live in :mod:`pymooncake.testing.fixtures`."""

from ._cluster import LocalCluster, NodeProcess, ProcessCluster, free_port, journaled_master_flags
from ._etcd_server import EtcdCluster, EtcdMember, EtcdStartError
from ._gil import GilProbe, gil_probe
from ._metadata_conformance import METADATA_CHECKS
from ._netns import Host, NetnsError, NetnsNetwork, cleanup_stale, netns_unavailable_reason
from ._pki import TestPki, make_test_pki
from ._proc import console_command, read_stdout_until, wait_until
from ._proxy import MasterProxy
from ._redis_server import RedisServer, RedisStartError
from ._threads import run_threads
from ._tools import find_tool, require_tool, unavailable

__all__ = [
    "METADATA_CHECKS",
    "EtcdCluster",
    "EtcdMember",
    "EtcdStartError",
    "GilProbe",
    "Host",
    "LocalCluster",
    "MasterProxy",
    "NetnsError",
    "NetnsNetwork",
    "NodeProcess",
    "ProcessCluster",
    "RedisServer",
    "RedisStartError",
    "TestPki",
    "cleanup_stale",
    "console_command",
    "find_tool",
    "free_port",
    "gil_probe",
    "journaled_master_flags",
    "make_test_pki",
    "netns_unavailable_reason",
    "read_stdout_until",
    "require_tool",
    "run_threads",
    "unavailable",
    "wait_until",
]
