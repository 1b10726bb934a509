"""The etcd client's tests run against a real etcd (Debian's etcd-server)."""

from pymooncake.testing.fixtures import (  # noqa: F401  (fixtures used by name)
    etcd_client,
    etcd_cluster,
    netns,
)
