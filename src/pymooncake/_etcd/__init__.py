"""An etcd v3 client built on the standard library, through etcd's HTTP/JSON gateway.

Used by the etcd metadata backend (``etcd://h1:2379;h2:2379``) and meant for
the store master's high availability (leader election on a lease, standbys
watching the leader key)::

    with EtcdClient("h1:2379;h2:2379") as etcd:
        lease = etcd.lease_grant(5)
        won = etcd.create("mooncake-store/c/master_view", b"10.0.0.1:50051", lease=lease.id)
        keep = etcd.keep_alive(lease.id, lease.ttl_s, on_lost=stop_serving)
        watch = etcd.watch("mooncake-store/c/master_view", start_revision=won.revision + 1)

What it covers: range (one key, prefixes, at a past revision), put, delete,
transactions with compares on version / create_revision / mod_revision /
value / lease, create-if-absent, compare-and-swap, compare-and-delete, lease
grant / keep-alive (one-shot, or a thread that tracks a safe deadline) /
revoke / time-to-live, watches that resume across reconnects at the right
revision, and ``/v3/maintenance/status``.  Endpoint lists fail over; every call
has a timeout; errors name the endpoints and the likely fix.

Why the standard library and not a client package
-------------------------------------------------
* etcd 3.4+ serves its whole v3 API as JSON over HTTP on the client port
  (``/v3/kv/range``, ``/v3/kv/txn``, ``/v3/lease/*``, ``/v3/watch``), so a
  client needs nothing beyond ``http.client``, ``json`` and ``base64`` (this one
  is about 2,000 lines with its docstrings), and pymooncake keeps zero runtime
  dependencies.
* Every gRPC client (``etcd3``, ``aetcd``, the forks) needs ``grpcio`` (a 7 MB
  wheel, 18 MB installed, built per platform) and ``protobuf``; the most used
  one, ``etcd3`` 0.12, is unmaintained and fails to import with protobuf 4+;
  ``aetcd``, the maintained one, is asyncio-only.
  ``etcd3gw`` (OpenStack) uses the same gateway but brings ``requests``,
  ``futurist`` and ``pbr``, and does not give the keep-alive deadline or the
  gap-free resumable watch that leader election needs.
* ``http.client`` never consults ``http_proxy``/``https_proxy``; the reference's
  gRPC client does, which the troubleshooting guide names as a cause of
  ``Error from etcd client``.  This client connects directly and warns once when
  such a variable would have applied.

What it does not do: etcd authentication (user/password tokens) and client
certificates; ``https://`` endpoints are verified with the system's CA store.
See ``docs/metadata.md``.
"""

from ._client import CreateResult, EtcdClient, Key
from ._endpoints import DEFAULT_PORT, Endpoint, parse_endpoints
from ._errors import EtcdCompacted, EtcdError, EtcdLeaseNotFound, EtcdUnreachable
from ._lease import KeepAlive
from ._stream import WatchEvent, WatchResponse
from ._watch import Watch
from ._wire import (
    Compare,
    DeleteResult,
    GrpcCode,
    KeyValue,
    LeaseGrant,
    LeaseStatus,
    OpDelete,
    OpGet,
    OpPut,
    PutResult,
    RangeResult,
    TxnResult,
    prefix_range_end,
)

__all__ = [
    "DEFAULT_PORT",
    "Compare",
    "CreateResult",
    "DeleteResult",
    "Endpoint",
    "EtcdClient",
    "EtcdCompacted",
    "EtcdError",
    "EtcdLeaseNotFound",
    "EtcdUnreachable",
    "GrpcCode",
    "KeepAlive",
    "Key",
    "KeyValue",
    "LeaseGrant",
    "LeaseStatus",
    "OpDelete",
    "OpGet",
    "OpPut",
    "PutResult",
    "RangeResult",
    "TxnResult",
    "Watch",
    "WatchEvent",
    "WatchResponse",
    "parse_endpoints",
    "prefix_range_end",
]
