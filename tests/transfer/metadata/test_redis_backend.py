"""The Redis backend against Debian's redis-server: the reference's URL form
and MC_REDIS_* variables, engines exchanging data, and the errors."""

from __future__ import annotations

import sys
import uuid

import pytest

from pymooncake import EngineConfig, TransferEngine
from pymooncake.errors import ConfigError, MetadataError, MetadataUnreachable, NotSupported
from pymooncake.testing import RedisServer
from pymooncake.testing.fixtures import REDIS_PASSWORD
from pymooncake.transfer.metadata import connect_metadata, parse_metadata_target
from pymooncake.transfer.metadata.redis import RedisMetadataStore, parse_redis_location

LOCAL = "127.0.0.1"


def _cfg(**env: str) -> EngineConfig:
    return EngineConfig.from_env({"MC_TCP_BIND_ADDRESS": LOCAL, **env})


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("h:6380", ("h", 6380)),
        ("h", ("h", 6379)),
        ("[::1]:7000", ("::1", 7000)),
        ("10.0.0.1:6379/", ("10.0.0.1", 6379)),
    ],
)
def test_locations(location: str, expected: tuple[str, int]) -> None:
    assert parse_redis_location(location) == expected


@pytest.mark.parametrize("location", ["user:pw@h:6379", ":pw@h:6379", "h:6379/2", "h:x", ""])
def test_url_credentials_and_databases_point_to_the_variables(location: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_redis_location(location)
    if "@" in location or "/" in location:
        assert "MC_REDIS_PASSWORD" in str(info.value) and "MC_REDIS_DB_INDEX" in str(info.value)


def test_mc_redis_variables() -> None:
    cfg = _cfg(MC_REDIS_USERNAME="u", MC_REDIS_PASSWORD="secret", MC_REDIS_DB_INDEX="7")
    assert (cfg.redis_username, cfg.redis_password, cfg.redis_db_index) == ("u", "secret", 7)
    assert "secret" not in repr(cfg)  # never logged
    with pytest.raises(ConfigError, match="MC_REDIS_DB_INDEX"):
        _cfg(MC_REDIS_DB_INDEX="256")
    with pytest.raises(ConfigError, match="MC_REDIS_DB_INDEX"):
        _cfg(MC_REDIS_DB_INDEX="one")


def test_engines_exchange_data_through_redis_with_a_password(
    redis_server_with_password: RedisServer,
) -> None:
    cfg = _cfg(MC_REDIS_PASSWORD=REDIS_PASSWORD, MC_REDIS_DB_INDEX="3")
    url = redis_server_with_password.url
    a_name, b_name = f"node-{uuid.uuid4().hex[:8]}", f"node-{uuid.uuid4().hex[:8]}"
    with (
        TransferEngine(a_name, url, config=cfg) as a,
        TransferEngine(b_name, url, config=cfg) as b,
    ):
        target = bytearray(4096)
        region = b.register(target)
        a.write(b_name, b"through redis", region.addr)
        assert bytes(target[:13]) == b"through redis"
        # the reference's keys, in database 3 and nowhere else
        in_db3 = RedisMetadataStore(
            redis_server_with_password.address, password=REDIS_PASSWORD, db_index=3
        )
        in_db0 = RedisMetadataStore(redis_server_with_password.address, password=REDIS_PASSWORD)
        try:
            assert set(in_db3.keys("mooncake/")) >= {
                f"mooncake/ram/{a_name}",
                f"mooncake/rpc_meta/{a_name}",
                f"mooncake/ram/{b_name}",
                f"mooncake/rpc_meta/{b_name}",
            }
            assert not any(a_name in k for k in in_db0.keys("mooncake/"))
        finally:
            in_db3.close()
            in_db0.close()


def test_acl_user(redis_server_with_password: RedisServer) -> None:
    cfg = _cfg(MC_REDIS_USERNAME="mooncake", MC_REDIS_PASSWORD=REDIS_PASSWORD)
    store = connect_metadata(parse_metadata_target(redis_server_with_password.url), cfg)
    assert store is not None
    try:
        store.set("mooncake/ram/acl", b"{}")
        assert store.get("mooncake/ram/acl") == b"{}"
        assert store.remove("mooncake/ram/acl")
    finally:
        store.close()


@pytest.mark.parametrize("password", ["", "wrong"])
def test_missing_or_wrong_password_names_the_variable(
    redis_server_with_password: RedisServer, password: str
) -> None:
    with pytest.raises(MetadataError, match="MC_REDIS_PASSWORD") as info:
        TransferEngine("n", redis_server_with_password.url, config=_cfg(MC_REDIS_PASSWORD=password))
    assert not isinstance(info.value, MetadataUnreachable)


def test_unreachable_redis_names_bind_and_the_check(redis_server: RedisServer) -> None:
    import socket

    with socket.socket() as closed:
        closed.bind((LOCAL, 0))
        url = f"redis://{LOCAL}:{closed.getsockname()[1]}"
        with pytest.raises(MetadataUnreachable) as info:
            TransferEngine("n", url, config=_cfg())
    text = str(info.value)
    assert url in text and "bind 127.0.0.1" in text and "redis-cli -h" in text


def test_without_redis_py_the_extra_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # import redis -> ImportError
    with pytest.raises(NotSupported, match=r"pip install 'pymooncake\[redis\]'"):
        RedisMetadataStore(f"{LOCAL}:6379")
