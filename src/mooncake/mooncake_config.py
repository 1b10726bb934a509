"""``MooncakeConfig``: the settings a Mooncake Store client is set up with.

Drop-in for the reference wheel's ``mooncake.mooncake_config``, which the
store service and the vLLM, SGLang and LMCache connectors import.  A config
comes from one of three places:

* ``MooncakeConfig(...)`` directly;
* ``MooncakeConfig.from_file(path)``: a JSON object whose required keys are
  ``local_hostname``, ``metadata_server`` and ``master_server_address``;
* ``MooncakeConfig.load_from_env()``: the JSON file named by
  ``MOONCAKE_CONFIG_PATH`` when that is set (it wins over everything else),
  otherwise the ``MOONCAKE_*`` variables, of which ``MOONCAKE_MASTER`` is
  required:

  =====================================  =============================  ==============
  variable                               field                          default
  =====================================  =============================  ==============
  ``MOONCAKE_MASTER``                    ``master_server_address``      required
  ``MOONCAKE_TE_META_DATA_SERVER``       ``metadata_server``            ``P2PHANDSHAKE``
  ``MOONCAKE_LOCAL_HOSTNAME``            ``local_hostname``             ``localhost``
  ``MOONCAKE_PROTOCOL``                  ``protocol``                   ``tcp``
  ``MOONCAKE_DEVICE``                    ``device_name``                ``""``
  ``MOONCAKE_GLOBAL_SEGMENT_SIZE``       ``global_segment_size``        3355443200
  ``MOONCAKE_LOCAL_BUFFER_SIZE``         ``local_buffer_size``          1073741824
  ``MOONCAKE_OFFLOAD_ENABLED``           ``enable_ssd_offload``         false
  ``MOONCAKE_OFFLOAD_FILE_STORAGE_PATH`` ``ssd_offload_path``           ``""``
  ``MOONCAKE_TENANT_ID``                 ``tenant_id``                  ``default``
  ``MOONCAKE_ENABLE_CLIENT_HTTP_SERVER`` ``enable_client_http_server``  false
  ``MOONCAKE_CLIENT_HTTP_PORT``          ``client_http_port``           9300
  =====================================  =============================  ==============

Sizes are byte counts or human-readable strings with binary units
(``"4096"``, ``"512k"``, ``"16MB"``, ``"16 MB"``, ``"1.5gb"``, ``"2 GiB"``,
``"1e9"``); booleans accept ``true/false``, ``yes/no``, ``on/off``,
``enable/disable``, ``1/0``.  The protocol is lower-cased (the engine compares
names case-sensitively); a name outside the known set (TCP, RDMA and the other
transports, plus the store-only ``rpc_only``) is logged as a warning and kept,
because which transports exist depends on the build.

Every problem is reported as :class:`pymooncake.errors.ConfigError`, a
``ValueError``, naming the field, file or variable at fault; a config file
that cannot be opened raises the ``OSError`` that ``open`` raised.  Nothing is
read when this module is imported.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pymooncake.errors import ConfigError
from pymooncake.store._config import SIZE_UNITS

__all__ = [
    "DEFAULT_GLOBAL_SEGMENT_SIZE",
    "DEFAULT_LOCAL_BUFFER_SIZE",
    "MooncakeConfig",
]

logger = logging.getLogger(__name__)

#: Reference default for ``global_segment_size``: 3.125 GiB.
DEFAULT_GLOBAL_SEGMENT_SIZE = 3355443200
#: Reference default for ``local_buffer_size``: 1 GiB.
DEFAULT_LOCAL_BUFFER_SIZE = 1073741824
#: Reference default for ``client_http_port``.
_DEFAULT_CLIENT_HTTP_PORT = 9300

#: Protocol names the reference engine and store accept (the union of the
#: transfer engine's transports and the store's modes).  Only a hint: the
#: build decides what really exists, so other names warn instead of failing.
_KNOWN_PROTOCOLS = frozenset(
    {
        "tcp",
        "rdma",
        "efa",
        "nvmeof",
        "nvlink",
        "nvlink_intra",
        "musa",
        "hip",
        "barex",
        "cxl",
        "ascend",
        "ub",
        "ubshmem",
        "maca",
        "sunrise_link",
        "rpc_only",
    }
)

#: Fields a config file must contain and that may never be blank.
_REQUIRED_NON_EMPTY_FIELDS = ("local_hostname", "metadata_server", "master_server_address")

# Binary multiples, as in the reference (which knows b/k/kb/m/mb/g/gb/t/tb); the
# *ib spellings are accepted too: the table is pymooncake.store's SIZE_UNITS.
# "<number><spaces><letters>"; the number part is whatever float() accepts,
# so "1.5", ".5" and "1e9" work like in the reference.
_SIZE_RE = re.compile(r"(?P<number>.*?)\s*(?P<unit>[a-z]*)", re.DOTALL)
_SIZE_HINT = "use a byte count or a number with a b/kb/mb/gb/tb unit, e.g. 4096, '512MB', '4 GiB'"

_TRUE_WORDS = frozenset({"true", "1", "yes", "on", "enable"})
_FALSE_WORDS = frozenset({"false", "0", "no", "off", "disable"})


def _parse_segment_size(value: Any, *, what: str = "size") -> int:
    """Bytes from an int, a float (truncated) or a human-readable string.

    Args:
        value: ``1024``, ``1.5``, ``"2048"``, ``" 3 gb "``, ``"1.5KB"``,
            ``"1e9"``, ``"2 GiB"`` ... Units are binary and case-insensitive.
        what: the field or variable the value came from, for the message.

    Returns:
        The size in bytes.  A negative number is returned as is, so that
        :class:`MooncakeConfig` reports it against its field.

    Raises:
        ConfigError: an empty string, a unit without a number (``"gb"``),
            an unknown unit or text (``"abc"``, ``"50%"``), a non-finite
            number, or a value of another type (``None``, ``True``, a list).
    """
    if isinstance(value, bool):
        raise ConfigError(f"{what}: {value!r} is not a size; {_SIZE_HINT}")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{what}: {value!r} is not a finite size")
        return int(value)
    if not isinstance(value, str):
        raise ConfigError(f"{what}: {value!r} ({type(value).__name__}) is not a size; {_SIZE_HINT}")
    text = value.strip().lower()
    if not text:
        raise ConfigError(f"{what}: the size is an empty string; {_SIZE_HINT}")
    match = _SIZE_RE.fullmatch(text)
    number_text, unit = (match.group("number"), match.group("unit")) if match else (text, "")
    if unit not in SIZE_UNITS:
        raise ConfigError(f"{what}: unknown unit {unit!r} in {value!r}; {_SIZE_HINT}")
    if not number_text:
        raise ConfigError(f"{what}: missing number before {unit!r} in {value!r}; {_SIZE_HINT}")
    try:
        number = float(number_text)
    except ValueError:
        raise ConfigError(f"{what}: {value!r} is not a size; {_SIZE_HINT}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{what}: {value!r} is not a finite size")
    return int(number * SIZE_UNITS[unit])


def _parse_bool(value: Any, *, what: str = "flag") -> bool:
    """A boolean from a bool, a number, ``None`` or a string.

    Strings are read as words (``bool("false")`` would be true): ``true``,
    ``yes``, ``on``, ``enable``, ``1`` and ``false``, ``no``, ``off``,
    ``disable``, ``0``, in any case.  ``None`` and a blank string are false.

    Raises:
        ConfigError: any other string, or a value of another type.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return bool(value)
    if value is None:
        return False
    if not isinstance(value, str):
        raise ConfigError(f"{what}: {value!r} is not a boolean")
    word = value.strip().lower()
    if not word:
        return False
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise ConfigError(
        f"{what}: invalid boolean value {value!r}; use true/false, yes/no, on/off, "
        "enable/disable or 1/0"
    )


def _parse_port(value: Any, *, what: str = "port") -> int:
    """A TCP port number (0-65535) from an int or a decimal string.

    Raises:
        ConfigError: anything else, or a number out of range.
    """
    port: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        port = value
    elif isinstance(value, float) and value.is_integer():
        port = int(value)
    elif isinstance(value, str):
        try:
            port = int(value.strip())
        except ValueError:
            port = None
    if port is None or not 0 <= port <= 65535:
        raise ConfigError(f"{what}: {value!r} is not a port number (0-65535)")
    return port


def _text_or(value: Any, default: str) -> str:
    """``str(value)``, or ``default`` where the value is missing or null."""
    return default if value is None else str(value)


#: The variable each field is read from by ``load_from_env`` (reference names).
_ENV_NAMES: Mapping[str, str] = {
    "local_hostname": "MOONCAKE_LOCAL_HOSTNAME",
    "metadata_server": "MOONCAKE_TE_META_DATA_SERVER",
    "global_segment_size": "MOONCAKE_GLOBAL_SEGMENT_SIZE",
    "local_buffer_size": "MOONCAKE_LOCAL_BUFFER_SIZE",
    "protocol": "MOONCAKE_PROTOCOL",
    "device_name": "MOONCAKE_DEVICE",
    "master_server_address": "MOONCAKE_MASTER",
    "enable_ssd_offload": "MOONCAKE_OFFLOAD_ENABLED",
    "ssd_offload_path": "MOONCAKE_OFFLOAD_FILE_STORAGE_PATH",
    "tenant_id": "MOONCAKE_TENANT_ID",
    "enable_client_http_server": "MOONCAKE_ENABLE_CLIENT_HTTP_SERVER",
    "client_http_port": "MOONCAKE_CLIENT_HTTP_PORT",
}


@dataclass
class MooncakeConfig:
    """How a Mooncake Store client connects and how much memory it offers.

    Attributes:
        local_hostname: the address peers use to reach this node (not a
            loopback name when peers run on other hosts).
        metadata_server: the transfer engine's metadata service:
            ``P2PHANDSHAKE``, ``http://host:port/metadata``,
            ``etcd://host:port`` or ``redis://host:port``.
        global_segment_size: bytes this client contributes to the shared
            pool; 0 contributes none.
        local_buffer_size: bytes of the client's local transfer buffer.
        protocol: ``tcp`` (default), ``rdma`` or another transport; stored
            lower-case.
        device_name: the RDMA device(s), e.g. ``mlx5_0`` or
            ``auto-discovery``; unused with TCP.
        master_server_address: the master, ``host:port`` or
            ``etcd://host:port`` for a highly available one.
        enable_ssd_offload: offload objects to local SSD.
        ssd_offload_path: the directory used for SSD offload.
        tenant_id: the tenant this client's objects belong to.
        enable_client_http_server: serve the client's health and metrics
            endpoints over HTTP.
        client_http_port: the port of those endpoints.

    Example file::

        {
            "local_hostname": "node1",
            "metadata_server": "P2PHANDSHAKE",
            "master_server_address": "master:50051",
            "global_segment_size": "3GB",
            "local_buffer_size": "1GB",
            "protocol": "rdma",
            "device_name": "mlx5_0"
        }

    Raises:
        ConfigError: on construction, when the protocol is not a non-blank
            string, a size is negative or not a number, or a required field
            is not a non-blank string.
    """

    local_hostname: str
    metadata_server: str
    global_segment_size: int
    local_buffer_size: int
    protocol: str
    device_name: str | None
    master_server_address: str
    enable_ssd_offload: bool = False
    ssd_offload_path: str = ""
    tenant_id: str = "default"
    enable_client_http_server: bool = False
    client_http_port: int = _DEFAULT_CLIENT_HTTP_PORT

    def __post_init__(self) -> None:
        protocol: object = self.protocol
        if not isinstance(protocol, str) or not protocol.strip():
            raise ConfigError(
                f"Invalid protocol: {protocol!r}; the protocol must be a non-empty string "
                "such as 'tcp' or 'rdma'"
            )
        self.protocol = protocol.strip().lower()
        if self.protocol not in _KNOWN_PROTOCOLS:
            logger.warning(
                "Unrecognised protocol %r: passing it to the engine unchanged; known "
                "protocols are %s (a typo such as 'rmda' fails later, at setup)",
                self.protocol,
                ", ".join(sorted(_KNOWN_PROTOCOLS)),
            )
        for name in ("global_segment_size", "local_buffer_size"):
            size: object = getattr(self, name)
            if isinstance(size, bool) or not isinstance(size, (int, float)):
                raise ConfigError(
                    f"Invalid {name}: {size!r} is not a number of bytes (strings such as "
                    "'4GB' are parsed by from_file() and load_from_env())"
                )
            if size < 0:
                raise ConfigError(f"Invalid {name}: {size}; a size must be non-negative")
        for name in _REQUIRED_NON_EMPTY_FIELDS:
            text: object = getattr(self, name)
            if not isinstance(text, str) or not text.strip():
                raise ConfigError(f"Config field {name!r} must be a non-empty string, got {text!r}")

    @staticmethod
    def from_file(file_path: str | os.PathLike[str]) -> MooncakeConfig:
        """Read a config from a JSON file holding one object.

        Missing optional keys, and ``null`` ``tenant_id``/``ssd_offload_path``,
        take the defaults (see the module docstring); unknown keys are ignored.

        Raises:
            OSError: the file cannot be opened (``FileNotFoundError`` ...).
            ConfigError: the file is not valid JSON or not an object, a
                required key is missing ("Missing required config field:
                <name>"), or a value is unusable.
        """
        path = os.fspath(file_path)
        with open(path, encoding="utf-8") as fin:
            try:
                text = fin.read()
            except UnicodeDecodeError as exc:
                raise ConfigError(
                    f"Mooncake config file {path!r} is not UTF-8 text: {exc}"
                ) from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"Mooncake config file {path!r} is not valid JSON: {exc.msg} at line "
                f"{exc.lineno} column {exc.colno}"
            ) from exc
        if not isinstance(data, dict):
            raise ConfigError(
                f"Mooncake config file {path!r} must hold a JSON object, not {type(data).__name__}"
            )
        for name in _REQUIRED_NON_EMPTY_FIELDS:
            if name not in data:
                raise ConfigError(
                    f"Missing required config field: {name} (in {path!r}; required fields are "
                    f"{', '.join(_REQUIRED_NON_EMPTY_FIELDS)})"
                )
        return MooncakeConfig._from_values(data.get, source=path, names=None)

    @staticmethod
    def load_from_env() -> MooncakeConfig:
        """Read a config from ``MOONCAKE_CONFIG_PATH`` or ``MOONCAKE_*`` variables.

        When ``MOONCAKE_CONFIG_PATH`` is set (non-blank) the file it names is
        read with :meth:`from_file` and the other variables are ignored.
        Otherwise the fields come from the variables in the module docstring;
        ``MOONCAKE_MASTER`` must be set.

        Raises:
            ConfigError: neither ``MOONCAKE_CONFIG_PATH`` nor ``MOONCAKE_MASTER``
                is set, or a value (file or variable) is unusable.
            OSError: the file named by ``MOONCAKE_CONFIG_PATH`` cannot be
                opened; the message names the variable.
        """
        config_path = os.environ.get("MOONCAKE_CONFIG_PATH", "").strip()
        if config_path:
            try:
                return MooncakeConfig.from_file(config_path)
            except OSError as exc:
                raise type(exc)(
                    exc.errno,
                    f"cannot read the config file named by MOONCAKE_CONFIG_PATH: {exc.strerror}",
                    config_path,
                ) from exc
        if not os.environ.get("MOONCAKE_MASTER"):
            raise ConfigError(
                "Neither the environment variable 'MOONCAKE_CONFIG_PATH' nor 'MOONCAKE_MASTER' "
                "is set. Point MOONCAKE_CONFIG_PATH at a JSON config file, or set MOONCAKE_MASTER "
                "to the master's host:port (and MOONCAKE_TE_META_DATA_SERVER, "
                "MOONCAKE_PROTOCOL ... as needed)."
            )

        def from_env(name: str, default: Any) -> Any:
            return os.environ.get(_ENV_NAMES[name], default)

        return MooncakeConfig._from_values(from_env, source="environment", names=_ENV_NAMES)

    @staticmethod
    def _from_values(
        get: Callable[[str, Any], Any], *, source: str, names: Mapping[str, str] | None
    ) -> MooncakeConfig:
        """Build a config from ``get(field, default)``; ``names`` maps fields to
        the env variables they came from, for error messages."""

        def what(name: str) -> str:
            return names[name] if names is not None else f"{name} (in {source!r})"

        return MooncakeConfig(
            local_hostname=get("local_hostname", "localhost"),
            metadata_server=get("metadata_server", "P2PHANDSHAKE"),
            global_segment_size=_parse_segment_size(
                get("global_segment_size", DEFAULT_GLOBAL_SEGMENT_SIZE),
                what=what("global_segment_size"),
            ),
            local_buffer_size=_parse_segment_size(
                get("local_buffer_size", DEFAULT_LOCAL_BUFFER_SIZE),
                what=what("local_buffer_size"),
            ),
            protocol=get("protocol", "tcp"),
            device_name=get("device_name", ""),
            master_server_address=get("master_server_address", None),
            enable_ssd_offload=_parse_bool(
                get("enable_ssd_offload", False), what=what("enable_ssd_offload")
            ),
            ssd_offload_path=_text_or(get("ssd_offload_path", ""), ""),
            tenant_id=_text_or(get("tenant_id", "default"), "default"),
            enable_client_http_server=_parse_bool(
                get("enable_client_http_server", False), what=what("enable_client_http_server")
            ),
            client_http_port=_parse_port(
                get("client_http_port", _DEFAULT_CLIENT_HTTP_PORT), what=what("client_http_port")
            ),
        )
