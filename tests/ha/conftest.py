"""Fixtures of the HA tests: a real etcd (Debian's etcd-server) on 127.0.0.1, and
multi-host networks in namespaces."""

from pymooncake.testing.fixtures import etcd_client, etcd_cluster, netns

__all__ = ["etcd_client", "etcd_cluster", "netns"]
