"""The master client's HA tests name their leader in a real etcd (Debian's etcd-server)."""

from pymooncake.testing.fixtures import (  # noqa: F401  (fixtures used by name)
    etcd_client,
    etcd_cluster,
)
