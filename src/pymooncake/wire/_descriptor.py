"""Segment descriptors and rpc_meta entries, as JSON values.

The reference publishes one descriptor per RAM segment under
``mooncake/[cluster/]ram/<name>`` and, outside P2P mode, the RPC address under
``mooncake/[cluster/]rpc_meta/<name>``.  In P2P mode the same descriptor is the
reply to a Metadata RPC.

Two TCP shapes exist in the wild (``shared/reference/transfer-engine.md`` 4.3):
HEAD omits ``rdma_server_name`` when empty and has no ``tcp_data_host``; the
0.3.13.post1 wheel always writes ``"rdma_server_name": ""`` and adds
``tcp_data_host``.  We write the wheel's shape and read both, plus the RDMA
shape (``devices``, ``rkey``/``lkey``, ``priority_matrix``).  Unknown fields are
kept in ``extra`` so that our own additions (e.g. a host identity) never break
a reference reader and a reference writer's additions never break us.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ..errors import MalformedMessage
from ._rpc import loads_json
from ._tcp import U64_MAX

__all__ = [
    "BufferDesc",
    "DeviceDesc",
    "RpcMeta",
    "SegmentDesc",
    "decode_rpc_meta",
    "decode_segment",
    "descriptor_timestamp",
    "encode_rpc_meta",
    "encode_segment",
    "metadata_key",
    "rpc_meta_key",
    "segment_key",
]

_KNOWN_SEGMENT_FIELDS: Final = frozenset(
    {
        "name",
        "protocol",
        "tcp_data_port",
        "tcp_proto_version",
        "timestamp",
        "rdma_server_name",
        "tcp_data_host",
        "buffers",
        "devices",
        "priority_matrix",
    }
)
_KNOWN_BUFFER_FIELDS: Final = frozenset({"name", "addr", "length", "rkey", "lkey"})


def metadata_key(suffix: str, cluster_id: str = "") -> str:
    """``mooncake/`` + optional ``<cluster_id>/`` + ``suffix``."""
    return f"mooncake/{cluster_id}/{suffix}" if cluster_id else f"mooncake/{suffix}"


def segment_key(segment_name: str, cluster_id: str = "") -> str:
    """Key of a segment descriptor (``getFullMetadataKey``): names without '/'
    live under ``ram/``; names with one (``nvmeof/disk0``) are used verbatim."""
    suffix = segment_name if "/" in segment_name else f"ram/{segment_name}"
    return metadata_key(suffix, cluster_id)


def rpc_meta_key(server_name: str, cluster_id: str = "") -> str:
    return metadata_key(f"rpc_meta/{server_name}", cluster_id)


def descriptor_timestamp(now: _dt.datetime | None = None) -> str:
    """Local time as ``%Y-%m-%d %H:%M:%S.uuuuuu`` (reference ``getCurrentDateTime``)."""
    now = now or _dt.datetime.now()
    return now.strftime("%Y-%m-%d %H:%M:%S.%f")


@dataclass(frozen=True, slots=True)
class DeviceDesc:
    name: str
    lid: int
    gid: str


@dataclass(frozen=True, slots=True)
class BufferDesc:
    name: str
    addr: int
    length: int
    rkey: tuple[int, ...] = ()
    lkey: tuple[int, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def end(self) -> int:
        return self.addr + self.length


@dataclass(frozen=True, slots=True)
class SegmentDesc:
    name: str
    protocol: str
    buffers: tuple[BufferDesc, ...] = ()
    tcp_data_port: int = 0
    tcp_proto_version: int = 1
    timestamp: str = ""
    rdma_server_name: str = ""
    tcp_data_host: str | None = None
    devices: tuple[DeviceDesc, ...] = ()
    priority_matrix: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def find_buffer(self, addr: int, length: int) -> BufferDesc | None:
        """The published buffer containing ``[addr, addr+length)``, if any."""
        for buf in self.buffers:
            if buf.addr <= addr and addr + length <= buf.end:
                return buf
        return None


@dataclass(frozen=True, slots=True)
class RpcMeta:
    ip_or_host_name: str
    rpc_port: int


# --- encoding -------------------------------------------------------------------


def encode_segment(desc: SegmentDesc) -> dict[str, Any]:
    """The JSON object the reference writes for ``desc`` (TCP or RDMA shape)."""
    out: dict[str, Any] = dict(desc.extra)
    out["name"] = desc.name
    out["protocol"] = desc.protocol
    out["tcp_data_port"] = desc.tcp_data_port
    out["tcp_proto_version"] = desc.tcp_proto_version
    out["timestamp"] = desc.timestamp or descriptor_timestamp()
    out["rdma_server_name"] = desc.rdma_server_name
    if desc.tcp_data_host is not None:
        out["tcp_data_host"] = desc.tcp_data_host
    buffers = []
    for buf in desc.buffers:
        b: dict[str, Any] = dict(buf.extra)
        b["name"] = buf.name
        b["addr"] = buf.addr
        b["length"] = buf.length
        if desc.devices or buf.rkey or buf.lkey:
            b["rkey"] = list(buf.rkey)
            b["lkey"] = list(buf.lkey)
        buffers.append(b)
    out["buffers"] = buffers
    if desc.devices:
        out["devices"] = [{"name": d.name, "lid": d.lid, "gid": d.gid} for d in desc.devices]
    if desc.priority_matrix is not None:
        out["priority_matrix"] = dict(desc.priority_matrix)
    return out


def encode_rpc_meta(meta: RpcMeta) -> dict[str, Any]:
    return {"ip_or_host_name": meta.ip_or_host_name, "rpc_port": meta.rpc_port}


# --- decoding -------------------------------------------------------------------


def _load(value: Any, what: str) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview, str)):
        return loads_json(value, what)
    return value


def _int(
    obj: Mapping[str, Any],
    key: str,
    what: str,
    default: int | None = None,
    limit: int = U64_MAX,
) -> int:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        if value is None:
            raise MalformedMessage(f"{what}: field {key!r} is missing")
        raise MalformedMessage(
            f"{what}: field {key!r} must be a non-negative integer (at most {limit}), got "
            f"{_short(value)}"
        )
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _keys(raw: Mapping[str, Any], name: str, what: str) -> tuple[int, ...]:
    value = raw.get(name) or []
    if not isinstance(value, list):
        raise MalformedMessage(f"{what}: field {name!r} must be a list of integers")
    out = []
    for k in value:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= 0xFFFFFFFF:
            raise MalformedMessage(f"{what}: {name} entries must be 32-bit integers")
        out.append(k)
    return tuple(out)


def _str(obj: Mapping[str, Any], key: str, what: str, default: str | None = None) -> str:
    value = obj.get(key, default)
    if not isinstance(value, str):
        if value is None:
            raise MalformedMessage(f"{what}: field {key!r} is missing")
        raise MalformedMessage(f"{what}: field {key!r} must be a string, got {_short(value)}")
    return value


def decode_segment(value: Any, segment_name: str = "") -> SegmentDesc:
    """Decode a descriptor (JSON text, bytes or an already parsed dict).

    Applies the reference's validation: buffers need a non-empty name, a
    non-zero addr and length; rkey/lkey lists must match each other and the
    device list; devices need a name and a gid.

    Raises:
        MalformedMessage: not JSON, not an object, or failing the rules above.
    """
    what = f"segment descriptor {segment_name!r}" if segment_name else "segment descriptor"
    obj = _load(value, what)
    if not isinstance(obj, dict):
        raise MalformedMessage(f"{what} must be a JSON object, got {type(obj).__name__}")
    protocol_raw = obj.get("protocol", "")
    if isinstance(protocol_raw, list):  # ENABLE_MULTI_PROTOCOL builds
        if not all(isinstance(p, str) for p in protocol_raw):
            raise MalformedMessage(f"{what}: field 'protocol' must list strings")
        protocol = ",".join(protocol_raw)
    elif isinstance(protocol_raw, str):
        protocol = protocol_raw
    else:
        raise MalformedMessage(f"{what}: field 'protocol' must be a string")
    devices = []
    raw_devices = obj.get("devices", None) or []
    if not isinstance(raw_devices, list):
        raise MalformedMessage(f"{what}: field 'devices' must be a list")
    for dev in raw_devices:
        if not isinstance(dev, dict):
            raise MalformedMessage(f"{what}: device entries must be objects")
        d = DeviceDesc(
            _str(dev, "name", what, ""), _int(dev, "lid", what, 0), _str(dev, "gid", what, "")
        )
        if not d.name or not d.gid:
            raise MalformedMessage(
                f"{what}: device entry without name or gid (corrupted descriptor)"
            )
        devices.append(d)
    buffers = []
    raw_buffers = obj.get("buffers")
    if raw_buffers is None:
        raw_buffers = []
    if not isinstance(raw_buffers, list):
        raise MalformedMessage(f"{what}: field 'buffers' must be a list")
    for raw in raw_buffers:
        if not isinstance(raw, dict):
            raise MalformedMessage(f"{what}: buffer entries must be objects")
        rkey = _keys(raw, "rkey", what)
        lkey = _keys(raw, "lkey", what)
        buf = BufferDesc(
            name=_str(raw, "name", what, ""),
            addr=_int(raw, "addr", what, 0),
            length=_int(raw, "length", what, 0),
            rkey=rkey,
            lkey=lkey,
            extra={k: v for k, v in raw.items() if k not in _KNOWN_BUFFER_FIELDS},
        )
        if not buf.name or not buf.addr or not buf.length:
            raise MalformedMessage(
                f"{what}: buffer with empty name, zero addr or zero length (corrupted descriptor)"
            )
        if buf.end > U64_MAX:
            raise MalformedMessage(f"{what}: buffer at {buf.addr:#x} extends past 2^64")
        if (rkey or lkey) and (len(rkey) != len(lkey) or len(rkey) != len(devices)):
            raise MalformedMessage(f"{what}: rkey/lkey counts do not match the device list")
        buffers.append(buf)
    tcp_data_host = obj.get("tcp_data_host")
    if tcp_data_host is not None and not isinstance(tcp_data_host, str):
        raise MalformedMessage(f"{what}: field 'tcp_data_host' must be a string")
    matrix = obj.get("priority_matrix")
    return SegmentDesc(
        name=_str(obj, "name", what, segment_name),
        protocol=protocol,
        buffers=tuple(buffers),
        tcp_data_port=_int(obj, "tcp_data_port", what, 0, 65535),
        tcp_proto_version=_int(obj, "tcp_proto_version", what, 1, 255),
        timestamp=_str(obj, "timestamp", what, ""),
        rdma_server_name=_str(obj, "rdma_server_name", what, ""),
        tcp_data_host=tcp_data_host or None,
        devices=tuple(devices),
        priority_matrix=matrix if isinstance(matrix, dict) else None,
        extra={k: v for k, v in obj.items() if k not in _KNOWN_SEGMENT_FIELDS},
    )


def decode_rpc_meta(value: Any, server_name: str = "") -> RpcMeta:
    what = f"rpc_meta entry {server_name!r}" if server_name else "rpc_meta entry"
    obj = _load(value, what)
    if not isinstance(obj, dict):
        raise MalformedMessage(f"{what} must be a JSON object")
    port = _int(obj, "rpc_port", what)
    if not 0 < port < 65536:
        raise MalformedMessage(f"{what}: rpc_port {port} is not a TCP port")
    return RpcMeta(_str(obj, "ip_or_host_name", what), port)
