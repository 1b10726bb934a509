"""Engines that find each other through a real etcd, in both APIs, and the
errors the troubleshooting guide describes, each with its cause and fix."""

from __future__ import annotations

import json
import logging
import socket
import sys
import textwrap
import uuid
from collections.abc import Callable

import pytest

import mooncake.engine as mc
from pymooncake import EngineConfig, TransferEngine
from pymooncake._etcd import EtcdClient
from pymooncake._etcd import _http as etcd_http
from pymooncake.errors import ConfigError, SegmentNotFound
from pymooncake.testing import EtcdCluster, NetnsNetwork
from pymooncake.transfer.metadata import MetadataConflict, connect_metadata, parse_metadata_target
from pymooncake.transfer.metadata.etcd import EtcdMetadataStore

LOCAL = "127.0.0.1"


@pytest.fixture
def cfg() -> EngineConfig:
    return EngineConfig(tcp_bind_address=LOCAL, transfer_timeout_s=10.0, connect_timeout_s=2.0)


def _name() -> str:
    """A segment name of this test's own (engines advertise tcp_bind_address)."""
    return f"node-{uuid.uuid4().hex[:10]}"


def _closed_port() -> socket.socket:
    s = socket.socket()
    s.bind((LOCAL, 0))
    return s


@pytest.mark.parametrize(
    ("text", "url"),
    [
        ("etcd://h1:2379;h2:2379", "etcd://h1:2379;h2:2379"),
        ("etcd://h1:2379,h2:2379", "etcd://h1:2379;h2:2379"),
        ("etcd://h:2379", "etcd://h:2379"),
        ("h:2379", "etcd://h:2379"),  # no scheme means etcd, as in the reference
        ("ETCD://h", "etcd://h:2379"),
        ("etcd://http://h:1;https://g:2", "etcd://h:1;g:2"),
    ],
)
def test_metadata_strings_open_etcd_as_the_reference_parses_them(
    text: str, url: str, cfg: EngineConfig
) -> None:
    target = parse_metadata_target(text)
    assert target.scheme == "etcd"
    store = connect_metadata(target, cfg)
    try:
        assert isinstance(store, EtcdMetadataStore) and store.url == url
    finally:
        assert store is not None
        store.close()


@pytest.mark.parametrize("text", ["etcd://", "etcd:// ; ", "etcd://h:0", "etcd://h:2379/path"])
def test_unusable_etcd_strings_are_config_errors(text: str, cfg: EngineConfig) -> None:
    with pytest.raises(ConfigError, match="etcd"):
        connect_metadata(parse_metadata_target(text), cfg)


def test_native_engines_exchange_data_through_etcd(
    etcd_cluster: EtcdCluster, cfg: EngineConfig
) -> None:
    with _closed_port() as dead:
        # a dead first endpoint: the client fails over, as with h1:2379;h2:2379
        url = f"etcd://{LOCAL}:{dead.getsockname()[1]};{etcd_cluster.endpoints}"
        with (
            TransferEngine(_name(), url, config=cfg) as a,
            TransferEngine(_name(), etcd_cluster.endpoints, config=cfg) as b,
        ):
            target = bytearray(4096)
            region = b.register(target)
            a.write(b.segment_name, b"through etcd", region.addr)
            assert bytes(target[:12]) == b"through etcd"
            back = bytearray(12)
            a.read(b.segment_name, back, region.addr)
            assert back == b"through etcd"
            with EtcdClient(etcd_cluster.endpoints) as etcd:
                keys = {kv.key.decode() for kv in etcd.get_prefix("mooncake/").kvs}
            for seg in (a.segment_name, b.segment_name):
                assert {f"mooncake/rpc_meta/{seg}", f"mooncake/ram/{seg}"} <= keys
    with EtcdClient(etcd_cluster.endpoints) as etcd:
        left = [kv.key for kv in etcd.get_prefix("mooncake/").kvs]
    assert not any(a.segment_name.encode() in k or b.segment_name.encode() in k for k in left)


@pytest.mark.parametrize("form", ["etcd://", ""])
def test_compat_initialize_with_etcd(
    etcd_cluster: EtcdCluster, form: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MC_TCP_BIND_ADDRESS", LOCAL)
    server = f"{form}{etcd_cluster.endpoints}"
    a, b = mc.TransferEngine(), mc.TransferEngine()
    name_a, name_b = _name(), _name()
    try:
        assert a.initialize(name_a, server, "tcp", "") == 0
        assert b.initialize(name_b, server, "tcp", "") == 0
        src = a.allocate_managed_buffer(1 << 20)
        dst = b.allocate_managed_buffer(1 << 20)
        a.write_bytes_to_buffer(src, b"compat over etcd", 16)
        assert a.transfer_sync_write(name_b, src, dst, 16) == 0
        assert b.read_bytes_from_buffer(dst, 16) == b"compat over etcd"
        assert b.get_first_buffer_address(name_a) != 0
    finally:
        a.close()
        b.close()


def test_segment_name_not_found_in_etcd_lists_the_names_that_are(
    etcd_cluster: EtcdCluster, cfg: EngineConfig
) -> None:
    with (
        TransferEngine("node-a", etcd_cluster.url, config=cfg) as a,
        TransferEngine("node-b", etcd_cluster.url, config=cfg) as b,
    ):
        with pytest.raises(SegmentNotFound) as info:
            b.open_segment("Node-A")
        text = str(info.value)
        assert text.startswith("Failed to get description of Node-A")
        assert "'mooncake/ram/Node-A'" in text and etcd_cluster.url in text
        assert "strictly match the local_hostname" in text
        assert "published segment names: " in text and "'node-a'" in text
        assert b.open_segment("node-a") > 0  # the exact name works
        assert a.segment_name == "node-a"


def test_a_stale_rpc_meta_written_by_a_reference_engine_is_replaced(
    etcd_cluster: EtcdCluster, cfg: EngineConfig, caplog: pytest.LogCaptureFixture
) -> None:
    name = _name()
    with _closed_port() as dead, EtcdClient(etcd_cluster.endpoints) as etcd:
        # as the reference writes it (jsoncpp FastWriter: compact + newline), for
        # a process that died without freeEngine()
        stale = json.dumps({"ip_or_host_name": LOCAL, "rpc_port": dead.getsockname()[1]})
        etcd.put(f"mooncake/rpc_meta/{name}", (stale.replace(" ", "") + "\n").encode())
        with caplog.at_level(logging.WARNING, logger="pymooncake.segments"):
            engine = TransferEngine(name, etcd_cluster.url, config=cfg)
        try:
            kv = etcd.get(f"mooncake/rpc_meta/{name}")
            assert kv is not None and json.loads(kv.value)["rpc_port"] == engine.rpc_port
            assert "replacing stale rpc_meta" in caplog.text
            # while it lives, nobody takes the name
            with pytest.raises(MetadataConflict, match="live engine"):
                TransferEngine(name, etcd_cluster.url, config=cfg)
        finally:
            engine.close()
        assert etcd.get(f"mooncake/rpc_meta/{name}") is None


def test_engine_with_proxy_variables_set_talks_to_etcd_directly_and_warns(
    etcd_cluster: EtcdCluster,
    cfg: EngineConfig,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    etcd_http._warned_proxies.clear()
    with _closed_port() as proxy:
        monkeypatch.setenv("http_proxy", f"http://{LOCAL}:{proxy.getsockname()[1]}")
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        with caplog.at_level(logging.WARNING, logger="pymooncake.etcd"):
            TransferEngine(_name(), etcd_cluster.url, config=cfg).close()
    assert "http_proxy is set" in caplog.text and "Error from etcd client" in caplog.text


# ---------------------------------------------------------------------------------
# seen from another host (network namespaces)
# ---------------------------------------------------------------------------------

_CLIENT = textwrap.dedent(
    """
    import json, sys
    from pymooncake.errors import MetadataError
    from pymooncake.transfer.metadata.etcd import EtcdMetadataStore
    store = EtcdMetadataStore(sys.argv[1], timeout_s=2.0, connect_timeout_s=2.0)
    try:
        store.set("mooncake/ram/from-another-host", b"{}")
        print(json.dumps({"ok": store.get("mooncake/ram/from-another-host").decode()}))
    except MetadataError as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
    finally:
        store.close()
    """
)


def _from_other_host(net: NetnsNetwork, endpoints: str) -> dict[str, str]:
    proc = net.hosts[0].run([sys.executable, "-c", _CLIENT, endpoints], timeout_s=60.0)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    result: dict[str, str] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    return result


def test_etcd_listening_on_loopback_is_invisible_from_another_host(
    etcd_cluster: EtcdCluster, netns: Callable[[int], NetnsNetwork]
) -> None:
    """etcd's default, --listen-client-urls http://127.0.0.1:2379: the host's
    own address is refused from the next machine, and the message says why."""
    net = netns(1)
    port = etcd_cluster.members[0].client_port
    result = _from_other_host(net, f"{net.gateway}:{port}")
    assert result.get("error") == "MetadataUnreachable", result
    text = result["message"]
    assert text.startswith("Error from etcd client") and f"{net.gateway}:{port}" in text
    assert "listens on 127.0.0.1 only" in text
    assert f"--listen-client-urls http://0.0.0.0:{port}" in text
    assert f"--advertise-client-urls http://{net.gateway}:{port}" in text


def test_etcd_listening_on_all_addresses_serves_another_host(
    netns: Callable[[int], NetnsNetwork],
) -> None:
    """The fix: listen on 0.0.0.0 and advertise the host's address."""
    net = netns(1)
    with EtcdCluster(hosts=[net.gateway], listen_any=True) as cluster:
        result = _from_other_host(net, cluster.endpoints)
        assert result == {"ok": "{}"}, result
        with EtcdClient(cluster.endpoints) as etcd:
            kv = etcd.get("mooncake/ram/from-another-host")
            assert kv is not None and kv.value == b"{}"
