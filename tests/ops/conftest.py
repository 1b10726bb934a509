"""Fixtures of the doctor tests: a real etcd (Debian's etcd-server) on 127.0.0.1."""

from pymooncake.testing.fixtures import etcd_cluster

__all__ = ["etcd_cluster"]
