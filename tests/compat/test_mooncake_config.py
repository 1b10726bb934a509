"""``mooncake.mooncake_config``: the reference's config cases, plus files with
human-readable sizes, env-only setups and the messages users troubleshoot with."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mooncake import mooncake_config as cfg_mod
from mooncake.mooncake_config import (
    DEFAULT_GLOBAL_SEGMENT_SIZE,
    DEFAULT_LOCAL_BUFFER_SIZE,
    MooncakeConfig,
    _parse_bool,
    _parse_segment_size,
)
from pymooncake.errors import ConfigError

GiB = 1 << 30
MiB = 1 << 20
KiB = 1 << 10

REQUIRED: dict[str, Any] = {
    "local_hostname": "localhost",
    "metadata_server": "localhost:8080",
    "master_server_address": "localhost:8081",
}

FULL: dict[str, Any] = {
    **REQUIRED,
    "global_segment_size": 3355443200,
    "local_buffer_size": 1073741824,
    "protocol": "tcp",
    "device_name": "eth0",
    "enable_ssd_offload": True,
    "ssd_offload_path": "/nvme/mooncake_offload",
    "tenant_id": "tenant-a",
    "enable_client_http_server": True,
    "client_http_port": 19300,
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the real environment's Mooncake variables."""
    for name in list(os.environ):
        if name.startswith("MOONCAKE_") or name == "LOCAL_HOSTNAME":
            monkeypatch.delenv(name)


@pytest.fixture
def write(tmp_path: Path) -> Any:
    """``write(obj)`` stores ``obj`` as JSON (or a str verbatim) and returns the path."""
    path = tmp_path / "config.json"

    def _write(content: object) -> Path:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
        return path

    return _write


def make(**overrides: Any) -> MooncakeConfig:
    kwargs: dict[str, Any] = {
        **REQUIRED,
        "global_segment_size": DEFAULT_GLOBAL_SEGMENT_SIZE,
        "local_buffer_size": DEFAULT_LOCAL_BUFFER_SIZE,
        "protocol": "tcp",
        "device_name": "",
    }
    kwargs.update(overrides)
    return MooncakeConfig(**kwargs)


# --- from_file: the reference's cases -------------------------------------------------------


def test_every_field_is_read_from_a_file(write: Any) -> None:
    config = MooncakeConfig.from_file(str(write(FULL)))
    assert config == MooncakeConfig(**FULL)
    assert config.local_hostname == "localhost"
    assert config.metadata_server == "localhost:8080"
    assert config.master_server_address == "localhost:8081"
    assert config.global_segment_size == 3355443200
    assert config.local_buffer_size == 1073741824
    assert config.protocol == "tcp"
    assert config.device_name == "eth0"
    assert config.enable_ssd_offload is True
    assert config.ssd_offload_path == "/nvme/mooncake_offload"
    assert config.tenant_id == "tenant-a"
    assert config.enable_client_http_server is True
    assert config.client_http_port == 19300


def test_a_file_with_only_the_required_keys_gets_the_defaults(write: Any) -> None:
    config = MooncakeConfig.from_file(write(REQUIRED))
    assert config.global_segment_size == DEFAULT_GLOBAL_SEGMENT_SIZE == 3355443200
    assert config.local_buffer_size == DEFAULT_LOCAL_BUFFER_SIZE == 1073741824
    assert config.protocol == "tcp"
    assert config.device_name == ""
    assert config.enable_ssd_offload is False
    assert config.ssd_offload_path == ""
    assert config.tenant_id == "default"
    assert config.enable_client_http_server is False
    assert config.client_http_port == 9300


def test_tenant_id_comes_from_the_file(write: Any) -> None:
    config = MooncakeConfig.from_file(write({**FULL, "tenant_id": "tenant-from-file"}))
    assert config.tenant_id == "tenant-from-file"


@pytest.mark.parametrize(("key", "default"), [("tenant_id", "default"), ("ssd_offload_path", "")])
def test_null_optional_text_takes_the_default(write: Any, key: str, default: str) -> None:
    config = MooncakeConfig.from_file(write({**FULL, key: None}))
    assert getattr(config, key) == default


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("false", False),
        ("False", False),
        ("0", False),
        ("no", False),
        ("off", False),
        ("true", True),
        ("1", True),
        ("yes", True),
        ("on", True),
        (True, True),
        (False, False),
    ],
)
def test_enable_ssd_offload_reads_words_not_truthiness(
    write: Any, raw: object, expected: bool
) -> None:
    config = MooncakeConfig.from_file(write({**REQUIRED, "enable_ssd_offload": raw}))
    assert config.enable_ssd_offload is expected


def test_enable_ssd_offload_rejects_an_unknown_word(write: Any) -> None:
    with pytest.raises(ValueError, match="notabool"):
        MooncakeConfig.from_file(write({**REQUIRED, "enable_ssd_offload": "notabool"}))


def test_client_http_settings_accept_strings(write: Any) -> None:
    path = write({**FULL, "enable_client_http_server": "enable", "client_http_port": "19444"})
    config = MooncakeConfig.from_file(path)
    assert config.enable_client_http_server is True
    assert config.client_http_port == 19444


@pytest.mark.parametrize("field", ["local_hostname", "metadata_server", "master_server_address"])
def test_a_missing_required_key_is_named(write: Any, field: str) -> None:
    content = {k: v for k, v in FULL.items() if k != field}
    with pytest.raises(ValueError, match=f"Missing required config field: {field}"):
        MooncakeConfig.from_file(write(content))


def test_from_file_keeps_an_unknown_protocol_with_a_warning(
    write: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger=cfg_mod.logger.name):
        config = MooncakeConfig.from_file(write({**REQUIRED, "protocol": "rmda"}))
    assert config.protocol == "rmda"
    assert any("Unrecognised protocol" in r.getMessage() for r in caplog.records)


# --- from_file: beyond the reference ---------------------------------------------------------


def test_sizes_in_a_file_may_be_human_readable(write: Any) -> None:
    path = write({**REQUIRED, "global_segment_size": "4gb", "local_buffer_size": "16 MB"})
    config = MooncakeConfig.from_file(path)
    assert config.global_segment_size == 4 * GiB
    assert config.local_buffer_size == 16 * MiB


@pytest.mark.parametrize(
    ("text", "expected"),
    [("16MB", 16 * MiB), ("1.5 GiB", int(1.5 * GiB)), ("512kb", 512 * KiB), ("0", 0)],
)
def test_human_readable_segment_sizes(write: Any, text: str, expected: int) -> None:
    config = MooncakeConfig.from_file(write({**REQUIRED, "global_segment_size": text}))
    assert config.global_segment_size == expected


def test_a_bad_size_in_a_file_names_the_field_and_the_file(write: Any) -> None:
    path = write({**REQUIRED, "local_buffer_size": "50%"})
    with pytest.raises(ConfigError, match="local_buffer_size") as info:
        MooncakeConfig.from_file(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_an_empty_object_misses_the_first_required_key(write: Any) -> None:
    with pytest.raises(ValueError, match="Missing required config field: local_hostname"):
        MooncakeConfig.from_file(write({}))


def test_a_blank_required_value_is_rejected(write: Any) -> None:
    with pytest.raises(ValueError, match="master_server_address"):
        MooncakeConfig.from_file(write({**REQUIRED, "master_server_address": " "}))


def test_invalid_json_names_the_file_and_position(write: Any) -> None:
    path = write('{"local_hostname": "localhost",\n  "metadata_server": }')
    with pytest.raises(ConfigError) as info:
        MooncakeConfig.from_file(path)
    message = str(info.value)
    assert str(path) in message
    assert "not valid JSON" in message
    assert "line 2" in message
    assert isinstance(info.value.__cause__, json.JSONDecodeError)


def test_a_file_that_is_not_an_object_is_rejected(write: Any) -> None:
    path = write([REQUIRED])
    with pytest.raises(ConfigError, match="JSON object") as info:
        MooncakeConfig.from_file(path)
    assert str(path) in str(info.value)


def test_a_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "absent.json"
    with pytest.raises(FileNotFoundError) as info:
        MooncakeConfig.from_file(missing)
    assert str(missing) in str(info.value)


def test_unknown_keys_in_a_file_are_ignored(write: Any) -> None:
    config = MooncakeConfig.from_file(write({**REQUIRED, "transfer_timeout": 1, "mode": "x"}))
    assert config.master_server_address == "localhost:8081"


# --- load_from_env ---------------------------------------------------------------------------


def test_config_path_variable_loads_the_file(monkeypatch: pytest.MonkeyPatch, write: Any) -> None:
    monkeypatch.setenv("MOONCAKE_CONFIG_PATH", str(write(FULL)))
    config = MooncakeConfig.load_from_env()
    assert config.local_hostname == "localhost"
    assert config == MooncakeConfig(**FULL)


def test_every_field_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # The reference test also sets LOCAL_HOSTNAME, which is not read: the
    # hostname stays at its default, "localhost".
    env = {
        "MOONCAKE_MASTER": "localhost:8081",
        "LOCAL_HOSTNAME": "not-read",
        "MOONCAKE_TE_META_DATA_SERVER": "localhost:8080",
        "MOONCAKE_GLOBAL_SEGMENT_SIZE": "3355443200",
        "MOONCAKE_PROTOCOL": "tcp",
        "MOONCAKE_DEVICE": "eth0",
        "MOONCAKE_OFFLOAD_ENABLED": "True",
        "MOONCAKE_OFFLOAD_FILE_STORAGE_PATH": "/nvme/mooncake_offload",
        "MOONCAKE_TENANT_ID": "tenant-a",
        "MOONCAKE_ENABLE_CLIENT_HTTP_SERVER": "True",
        "MOONCAKE_CLIENT_HTTP_PORT": "19300",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = MooncakeConfig.load_from_env()
    assert config == MooncakeConfig(**FULL)


def test_tenant_id_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOONCAKE_MASTER", "localhost:8081")
    monkeypatch.setenv("MOONCAKE_TENANT_ID", "tenant-from-env")
    assert MooncakeConfig.load_from_env().tenant_id == "tenant-from-env"


def test_master_alone_gives_the_env_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOONCAKE_MASTER", "10.0.0.1:50051")
    config = MooncakeConfig.load_from_env()
    assert config == MooncakeConfig(
        local_hostname="localhost",
        metadata_server="P2PHANDSHAKE",
        global_segment_size=DEFAULT_GLOBAL_SEGMENT_SIZE,
        local_buffer_size=DEFAULT_LOCAL_BUFFER_SIZE,
        protocol="tcp",
        device_name="",
        master_server_address="10.0.0.1:50051",
    )
    assert config.tenant_id == "default"
    assert config.enable_ssd_offload is False
    assert config.client_http_port == 9300


def test_neither_path_nor_master_is_an_error() -> None:
    with pytest.raises(ValueError) as info:
        MooncakeConfig.load_from_env()
    assert (
        "Neither the environment variable 'MOONCAKE_CONFIG_PATH' nor 'MOONCAKE_MASTER' is set."
        in str(info.value)
    )


def test_an_empty_master_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOONCAKE_MASTER", "")
    with pytest.raises(ConfigError, match="MOONCAKE_MASTER"):
        MooncakeConfig.load_from_env()


def test_env_only_configuration_with_human_readable_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOONCAKE_MASTER", "etcd://10.0.0.1:2379")
    monkeypatch.setenv("MOONCAKE_TE_META_DATA_SERVER", "http://10.0.0.1:8080/metadata")
    monkeypatch.setenv("MOONCAKE_LOCAL_HOSTNAME", "10.0.0.2")
    monkeypatch.setenv("MOONCAKE_PROTOCOL", "RDMA")
    monkeypatch.setenv("MOONCAKE_DEVICE", "mlx5_0,mlx5_1")
    monkeypatch.setenv("MOONCAKE_GLOBAL_SEGMENT_SIZE", "4gb")
    monkeypatch.setenv("MOONCAKE_LOCAL_BUFFER_SIZE", "512 MB")
    monkeypatch.setenv("MOONCAKE_OFFLOAD_ENABLED", "off")
    config = MooncakeConfig.load_from_env()
    assert config.master_server_address == "etcd://10.0.0.1:2379"
    assert config.metadata_server == "http://10.0.0.1:8080/metadata"
    assert config.local_hostname == "10.0.0.2"
    assert config.protocol == "rdma"
    assert config.device_name == "mlx5_0,mlx5_1"
    assert config.global_segment_size == 4 * GiB
    assert config.local_buffer_size == 512 * MiB
    assert config.enable_ssd_offload is False


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MOONCAKE_GLOBAL_SEGMENT_SIZE", "50%"),
        ("MOONCAKE_LOCAL_BUFFER_SIZE", "lots"),
        ("MOONCAKE_OFFLOAD_ENABLED", "maybe"),
        ("MOONCAKE_CLIENT_HTTP_PORT", "http"),
        ("MOONCAKE_CLIENT_HTTP_PORT", "70000"),
    ],
)
def test_a_bad_env_value_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv("MOONCAKE_MASTER", "localhost:8081")
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        MooncakeConfig.load_from_env()


def test_config_path_wins_over_the_other_variables(
    monkeypatch: pytest.MonkeyPatch, write: Any
) -> None:
    monkeypatch.setenv("MOONCAKE_CONFIG_PATH", str(write(FULL)))
    monkeypatch.setenv("MOONCAKE_MASTER", "elsewhere:1")
    monkeypatch.setenv("MOONCAKE_PROTOCOL", "rdma")
    monkeypatch.setenv("MOONCAKE_GLOBAL_SEGMENT_SIZE", "50%")  # would fail if it were read
    config = MooncakeConfig.load_from_env()
    assert config.master_server_address == "localhost:8081"
    assert config.protocol == "tcp"
    assert config.global_segment_size == 3355443200


def test_a_missing_config_path_file_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = tmp_path / "nope.json"
    monkeypatch.setenv("MOONCAKE_CONFIG_PATH", str(missing))
    monkeypatch.setenv("MOONCAKE_MASTER", "localhost:8081")
    with pytest.raises(FileNotFoundError) as info:
        MooncakeConfig.load_from_env()
    assert "MOONCAKE_CONFIG_PATH" in str(info.value)
    assert info.value.filename == str(missing)


def test_invalid_json_through_the_config_path_names_the_file(
    monkeypatch: pytest.MonkeyPatch, write: Any
) -> None:
    path = write("{not json")
    monkeypatch.setenv("MOONCAKE_CONFIG_PATH", str(path))
    with pytest.raises(ConfigError, match="not valid JSON") as info:
        MooncakeConfig.load_from_env()
    assert str(path) in str(info.value)


def test_importing_reads_nothing() -> None:
    env = {
        **os.environ,
        "MOONCAKE_CONFIG_PATH": "/nonexistent/mooncake.json",
        "MOONCAKE_GLOBAL_SEGMENT_SIZE": "50%",
    }
    code = "import mooncake.mooncake_config as m; print(m.DEFAULT_LOCAL_BUFFER_SIZE)"
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1073741824"


# --- _parse_segment_size ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1024, 1024),
        (0, 0),
        (1.5, 1),
        ("1024", 1024),
        ("  2048  ", 2048),
        ("1kb", KiB),
        ("1KB", KiB),
        ("512k", 512 * KiB),
        ("1.5kb", int(1.5 * KiB)),
        ("1mb", MiB),
        ("512MB", 512 * MiB),
        ("1m", MiB),
        ("1gb", GiB),
        ("3GB", 3 * GiB),
        ("1g", GiB),
        ("1.5gb", int(1.5 * GiB)),
        ("1tb", 1 << 40),
        ("1TB", 1 << 40),
        ("1t", 1 << 40),
        ("4096b", 4096),
        ("4096B", 4096),
        ("1.5", 1),
        ("1e9", 1_000_000_000),
        ("  3 gb  ", 3 * GiB),
        ("2 GiB", 2 * GiB),
        ("16 MiB", 16 * MiB),
    ],
)
def test_parse_segment_size(value: object, expected: int) -> None:
    assert _parse_segment_size(value) == expected


@pytest.mark.parametrize(
    "value", ["", "   ", "gb", "mb", "abc", "50%", "1e999", "4 bytes", "1\n2", None, True, [1]]
)
def test_parse_segment_size_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        _parse_segment_size(value)


def test_parse_segment_size_names_what_it_parsed() -> None:
    with pytest.raises(
        ConfigError, match=r"MOONCAKE_LOCAL_BUFFER_SIZE: missing number before 'mb'"
    ):
        _parse_segment_size("mb", what="MOONCAKE_LOCAL_BUFFER_SIZE")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (True, True),
        (0, False),
        (2, True),
        (None, False),
        ("", False),
        (" ON ", True),
        ("Disable", False),
        ("enable", True),
    ],
)
def test_parse_bool(value: object, expected: bool) -> None:
    assert _parse_bool(value) is expected


@pytest.mark.parametrize("value", ["maybe", "2", [True]])
def test_parse_bool_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        _parse_bool(value)


# --- validation on construction --------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("tcp", "tcp"),
        ("rdma", "rdma"),
        ("efa", "efa"),
        ("RDMA", "rdma"),
        ("Tcp", "tcp"),
        ("  rdma  ", "rdma"),
        ("cxl", "cxl"),
        ("ascend", "ascend"),
        ("musa", "musa"),
        ("nvlink_intra", "nvlink_intra"),
        ("ub", "ub"),
        ("ubshmem", "ubshmem"),
        ("maca", "maca"),
        ("sunrise_link", "sunrise_link"),
        ("rpc_only", "rpc_only"),
    ],
)
def test_known_protocols_are_lower_cased_without_warning(
    caplog: pytest.LogCaptureFixture, given: str, expected: str
) -> None:
    with caplog.at_level(logging.WARNING, logger=cfg_mod.logger.name):
        assert make(protocol=given).protocol == expected
    assert not caplog.records


@pytest.mark.parametrize("protocol", ["", "   ", None, 5])
def test_a_blank_or_non_text_protocol_is_rejected(protocol: object) -> None:
    with pytest.raises(ValueError, match="Invalid protocol"):
        make(protocol=protocol)


@pytest.mark.parametrize(("given", "expected"), [("rmda", "rmda"), ("udp", "udp"), ("Foo", "foo")])
def test_an_unknown_protocol_warns_and_passes_through(
    caplog: pytest.LogCaptureFixture, given: str, expected: str
) -> None:
    with caplog.at_level(logging.WARNING, logger=cfg_mod.logger.name):
        assert make(protocol=given).protocol == expected
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("Unrecognised protocol" in m and repr(expected) in m for m in warnings)


def test_zero_sizes_are_allowed() -> None:
    config = make(global_segment_size=0, local_buffer_size=0)
    assert (config.global_segment_size, config.local_buffer_size) == (0, 0)


@pytest.mark.parametrize(
    ("field", "value"), [("global_segment_size", -1), ("local_buffer_size", -1024)]
)
def test_a_negative_size_names_its_field(field: str, value: int) -> None:
    with pytest.raises(ValueError, match=field):
        make(**{field: value})


def test_a_size_string_is_not_parsed_by_the_constructor() -> None:
    with pytest.raises(ConfigError, match="global_segment_size"):
        make(global_segment_size="4GB")


@pytest.mark.parametrize("field", ["local_hostname", "metadata_server", "master_server_address"])
@pytest.mark.parametrize("bad", ["", "   ", None])
def test_a_blank_required_field_names_itself(field: str, bad: object) -> None:
    with pytest.raises(ValueError, match=field):
        make(**{field: bad})


def test_the_config_is_a_plain_mutable_dataclass() -> None:
    # Callers of the reference adjust fields after loading (e.g. per-rank devices).
    config = make()
    config.device_name = "mlx5_1"
    assert config.device_name == "mlx5_1"
