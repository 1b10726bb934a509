"""Segment descriptors and rpc_meta: the reference's exact JSON, both TCP shapes, RDMA shape."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from pymooncake.errors import MalformedMessage
from pymooncake.wire import (
    BufferDesc,
    RpcMeta,
    SegmentDesc,
    decode_rpc_meta,
    decode_segment,
    descriptor_timestamp,
    dumps_json,
    encode_rpc_meta,
    encode_segment,
    rpc_meta_key,
    segment_key,
)

# as observed from mooncake-transfer-engine-non-cuda 0.3.13.post1 over HTTP
WHEEL_TCP = (
    b'{"buffers":[{"addr":94841967196752,"length":4096,"name":"nodeA"}],"name":"nodeA",'
    b'"protocol":"tcp","rdma_server_name":"","tcp_data_host":"10.0.0.5","tcp_data_port":15235,'
    b'"tcp_proto_version":2,"timestamp":"2026-11-26 12:34:05.069872"}'
)
# the shape written by repository HEAD: no tcp_data_host, no empty rdma_server_name
HEAD_TCP = (
    b'{"buffers":[{"addr":94841967196752,"length":4096,"name":"nodeA"}],"name":"nodeA",'
    b'"protocol":"tcp","tcp_data_port":15235,"tcp_proto_version":2,'
    b'"timestamp":"2026-11-26 12:34:05.069872"}\n'
)
RDMA = json.dumps(
    {
        "name": "nodeA",
        "protocol": "rdma",
        "tcp_data_port": 0,
        "tcp_proto_version": 1,
        "timestamp": "2026-11-26 12:00:00.000001",
        "devices": [
            {"name": "mlx5_0", "lid": 0, "gid": "00:00:00:00:00:00:00:00:00:00:ff:ff:0a:00:00:05"},
            {"name": "mlx5_1", "lid": 3, "gid": "fe:80:00:00:00:00:00:00:00:00:00:00:00:00:00:01"},
        ],
        "buffers": [
            {
                "name": "cpu:0",
                "addr": 140583609425936,
                "length": 1 << 30,
                "rkey": [1, 2],
                "lkey": [3, 4],
            }
        ],
        "priority_matrix": {"cpu:0": [["mlx5_0"], ["mlx5_1"]]},
    }
)


def test_encode_matches_the_wheel_byte_for_byte() -> None:
    desc = SegmentDesc(
        name="nodeA",
        protocol="tcp",
        buffers=(BufferDesc("nodeA", 94841967196752, 4096),),
        tcp_data_port=15235,
        tcp_proto_version=2,
        timestamp="2026-11-26 12:34:05.069872",
        tcp_data_host="10.0.0.5",
    )
    assert dumps_json(encode_segment(desc)) == WHEEL_TCP


@pytest.mark.parametrize("raw", [WHEEL_TCP, HEAD_TCP, WHEEL_TCP.decode(), json.loads(WHEEL_TCP)])
def test_decode_both_tcp_shapes(raw: object) -> None:
    desc = decode_segment(raw, "nodeA")
    assert desc.name == "nodeA"
    assert desc.protocol == "tcp"
    assert desc.buffers == (BufferDesc("nodeA", 94841967196752, 4096),)
    assert desc.tcp_data_port == 15235
    assert desc.tcp_proto_version == 2
    assert desc.rdma_server_name == ""


def test_tcp_data_host_optional() -> None:
    assert decode_segment(WHEEL_TCP).tcp_data_host == "10.0.0.5"
    assert decode_segment(HEAD_TCP).tcp_data_host is None


def test_missing_proto_version_means_v1() -> None:
    obj = json.loads(HEAD_TCP)
    del obj["tcp_proto_version"]
    assert decode_segment(obj).tcp_proto_version == 1


def test_rdma_shape() -> None:
    desc = decode_segment(RDMA)
    assert desc.protocol == "rdma"
    assert [d.name for d in desc.devices] == ["mlx5_0", "mlx5_1"]
    assert desc.buffers[0].rkey == (1, 2)
    assert desc.priority_matrix == {"cpu:0": [["mlx5_0"], ["mlx5_1"]]}
    again = decode_segment(dumps_json(encode_segment(desc)))
    assert again.buffers == desc.buffers and again.devices == desc.devices


def test_unknown_fields_survive_a_round_trip() -> None:
    obj = json.loads(WHEEL_TCP)
    obj["host_id"] = "abc"
    obj["buffers"][0]["shm_name"] = "ff00"
    desc = decode_segment(obj)
    out = encode_segment(desc)
    assert out["host_id"] == "abc"
    assert out["buffers"][0]["shm_name"] == "ff00"


def test_empty_buffers_is_an_empty_list() -> None:
    desc = SegmentDesc(name="x", protocol="tcp", tcp_data_port=1)
    assert encode_segment(desc)["buffers"] == []
    assert decode_segment(encode_segment(desc)).buffers == ()


def test_find_buffer() -> None:
    desc = decode_segment(WHEEL_TCP)
    base = 94841967196752
    assert desc.find_buffer(base, 4096) is not None
    assert desc.find_buffer(base + 4095, 1) is not None
    assert desc.find_buffer(base + 4095, 2) is None
    assert desc.find_buffer(base - 1, 1) is None


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda o: o["buffers"][0].update(addr=0), "zero addr"),
        (lambda o: o["buffers"][0].update(length=0), "zero length"),
        (lambda o: o["buffers"][0].update(name=""), "empty name"),
        (lambda o: o["buffers"][0].update(addr=-5), "non-negative integer"),
        (lambda o: o["buffers"][0].update(addr="12"), "non-negative integer"),
        (lambda o: o.update(buffers={}), "must be a list"),
        (lambda o: o.update(tcp_data_port="x"), "tcp_data_port"),
        (lambda o: o.update(protocol=5), "protocol"),
    ],
)
def test_corrupt_descriptors_are_rejected(mutate: object, match: str) -> None:
    obj = json.loads(WHEEL_TCP)
    mutate(obj)  # type: ignore[operator]
    with pytest.raises(MalformedMessage, match=match):
        decode_segment(obj, "nodeA")


def test_rdma_key_count_mismatch_is_rejected() -> None:
    obj = json.loads(RDMA)
    obj["buffers"][0]["rkey"] = [1]
    with pytest.raises(MalformedMessage, match="rkey/lkey"):
        decode_segment(obj)
    obj = json.loads(RDMA)
    obj["devices"][0]["gid"] = ""
    with pytest.raises(MalformedMessage, match="gid"):
        decode_segment(obj)


@pytest.mark.parametrize("raw", [b"not json", b"[1,2]", b"null", b"\xff"])
def test_not_an_object(raw: bytes) -> None:
    with pytest.raises(MalformedMessage):
        decode_segment(raw)


def test_rpc_meta_exact_bytes_and_decode() -> None:
    meta = RpcMeta("10.0.0.5", 16060)
    assert dumps_json(encode_rpc_meta(meta)) == b'{"ip_or_host_name":"10.0.0.5","rpc_port":16060}'
    assert decode_rpc_meta(b'{"ip_or_host_name":"10.0.0.5","rpc_port":16060}\n') == meta
    with pytest.raises(MalformedMessage):
        decode_rpc_meta(b'{"ip_or_host_name":"h","rpc_port":70000}')
    with pytest.raises(MalformedMessage):
        decode_rpc_meta(b'{"rpc_port":1}')


def test_metadata_keys() -> None:
    assert segment_key("nodeA") == "mooncake/ram/nodeA"
    assert segment_key("nodeA", "c1") == "mooncake/c1/ram/nodeA"
    assert segment_key("nvmeof/disk0") == "mooncake/nvmeof/disk0"
    assert rpc_meta_key("127.0.0.1:123") == "mooncake/rpc_meta/127.0.0.1:123"
    assert rpc_meta_key("n", "c1") == "mooncake/c1/rpc_meta/n"


def test_timestamp_format() -> None:
    ts = descriptor_timestamp(dt.datetime(2026, 11, 26, 12, 34, 5, 69872))
    assert ts == "2026-11-26 12:34:05.069872"
