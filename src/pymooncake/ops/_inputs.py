"""What ``pymooncake doctor`` checks: a node's start-up settings in one frozen value.

The settings come from the places a Mooncake node reads them, highest
priority first: command-line flags, a Mooncake JSON config file (as
``mooncake.mooncake_config`` reads it; the CLI loads it), the ``MOONCAKE_*``
variables, then defaults.  ``MC_*`` variables are read through
:meth:`pymooncake.EngineConfig.from_env`, exactly as the engine reads them.
A value that cannot be used is not an exception here: it becomes a problem
that the ``inputs`` check reports as FAIL, so the other checks still run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ..config import EngineConfig
from ..errors import ConfigError
from ..store._config import parse_size

__all__ = ["DoctorInputs"]

#: MOONCAKE_* variables of mooncake.mooncake_config, by field
ENV_FIELDS: Final = {
    "local_hostname": "MOONCAKE_LOCAL_HOSTNAME",
    "metadata_server": "MOONCAKE_TE_META_DATA_SERVER",
    "master_server_address": "MOONCAKE_MASTER",
    "protocol": "MOONCAKE_PROTOCOL",
    "device_name": "MOONCAKE_DEVICE",
    "global_segment_size": "MOONCAKE_GLOBAL_SEGMENT_SIZE",
    "local_buffer_size": "MOONCAKE_LOCAL_BUFFER_SIZE",
}

#: reference store client port range when local_hostname has no port (store_py.cpp)
STORE_CLIENT_PORTS: Final = (12300, 14300)


def _split_devices(text: str) -> tuple[str, ...]:
    return tuple(d.strip() for d in text.replace(";", ",").split(",") if d.strip())


@dataclass(frozen=True)
class DoctorInputs:
    """A node's settings as the doctor checks them.

    Attributes:
        local_hostname: the name/address the node advertises (``host`` or ``host:port``).
        metadata_server: ``P2PHANDSHAKE``, ``http://...``, ``etcd://...``, ``host:port``
            (etcd), ``redis://...``; empty when not given.
        protocol: transfer protocol (``tcp``, ``rdma`` ...).
        device_names: RDMA devices from ``device_name`` (comma-separated in flags).
        nic_priority_matrix: the NIC priority matrix as JSON text, or a path to
            a JSON file; empty when not given.
        master_server_address: the store master's ``host:port``; empty when not given.
        peers: segment names of peers this node must reach.
        remote_peers: peers run on other hosts even if none is named.
        global_segment_size: bytes this node contributes (registered memory).
        local_buffer_size: bytes of its local transfer buffer (registered memory).
        engine: the engine's ``MC_*`` settings (port range, cluster id, bind address).
        store_port_range: the RPC port range of a store client whose
            local_hostname has no port (``MC_STORE_CLIENT_MIN_PORT``/``MAX``);
            None for a plain engine.
        env: the environment the node starts with (proxies, ``MC_MTU`` ...).
        timeout_s: per network probe.
        problems: settings that could not be used (reported by the ``inputs`` check).
        sources: where each setting came from (flag, file, variable, default).
    """

    local_hostname: str = ""
    metadata_server: str = ""
    protocol: str = "tcp"
    device_names: tuple[str, ...] = ()
    nic_priority_matrix: str = ""
    master_server_address: str = ""
    peers: tuple[str, ...] = ()
    remote_peers: bool = False
    global_segment_size: int = 0
    local_buffer_size: int = 0
    engine: EngineConfig = field(default_factory=EngineConfig)
    store_port_range: tuple[int, int] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = 2.0
    problems: tuple[str, ...] = ()
    sources: Mapping[str, str] = field(default_factory=dict)

    @property
    def registered_bytes(self) -> int:
        """Memory the node registers: global_segment_size + local_buffer_size."""
        return self.global_segment_size + self.local_buffer_size

    @property
    def rdma(self) -> bool:
        """RDMA devices matter: protocol rdma, or devices / a matrix named."""
        return self.protocol == "rdma" or bool(self.device_names) or bool(self.nic_priority_matrix)

    @classmethod
    def from_sources(
        cls,
        flags: Mapping[str, Any],
        env: Mapping[str, str],
        file_values: Mapping[str, Any] | None = None,
        *,
        file_name: str = "",
    ) -> DoctorInputs:
        """Merge flags > config file > ``MOONCAKE_*`` variables > defaults.

        Args:
            flags: values given on the command line (None/absent = not given):
                local_hostname, metadata_server, protocol, device_name,
                nic_priority_matrix, master_server_address, peers, remote_peers,
                global_segment_size, local_buffer_size, timeout_s.
            env: the environment (``os.environ`` for the CLI).
            file_values: fields of a Mooncake JSON config file, already parsed.
            file_name: the file's name, for ``sources``.
        """
        problems: list[str] = []
        sources: dict[str, str] = {}
        file_values = file_values or {}

        def pick(name: str, default: Any) -> Any:
            value = flags.get(name)
            if value not in (None, ""):
                sources[name] = "flag"
                return value
            if file_values.get(name) not in (None, ""):
                sources[name] = f"file {file_name}" if file_name else "config file"
                return file_values[name]
            var = ENV_FIELDS.get(name)
            if var and env.get(var, "").strip():
                sources[name] = var
                return env[var].strip()
            sources[name] = "default"
            return default

        def size(name: str) -> int:
            raw = pick(name, 0)
            try:
                return parse_size(raw, what=name)
            except ConfigError as exc:
                problems.append(f"{exc} (from {sources[name]})")
                return 0

        try:
            engine = EngineConfig.from_env(env)
        except ConfigError as exc:
            problems.append(f"{exc} (an MC_* variable; the engine refuses to start with it)")
            engine = EngineConfig()
        local_hostname = str(pick("local_hostname", "")).strip()
        master = str(pick("master_server_address", "")).strip()
        store_range: tuple[int, int] | None = None
        if master:
            lo, hi = STORE_CLIENT_PORTS
            try:
                lo = int(env.get("MC_STORE_CLIENT_MIN_PORT", lo))
                hi = int(env.get("MC_STORE_CLIENT_MAX_PORT", hi))
            except ValueError:
                problems.append(
                    "MC_STORE_CLIENT_MIN_PORT / MC_STORE_CLIENT_MAX_PORT must be port numbers"
                )
            store_range = (lo, hi)
        devices = pick("device_name", "")
        device_names = (
            _split_devices(devices) if isinstance(devices, str) else tuple(map(str, devices))
        )
        peers = flags.get("peers") or ()
        timeout = flags.get("timeout_s")
        return cls(
            local_hostname=local_hostname,
            metadata_server=str(pick("metadata_server", "")).strip(),
            protocol=str(pick("protocol", "tcp")).strip().lower() or "tcp",
            device_names=device_names,
            nic_priority_matrix=str(flags.get("nic_priority_matrix") or "").strip()
            or env.get("MC_NIC_PRIORITY_MATRIX", "").strip()
            or env.get("MC_CUSTOM_TOPO_JSON", "").strip(),
            master_server_address=master,
            peers=tuple(str(p) for p in peers),
            remote_peers=bool(flags.get("remote_peers")),
            global_segment_size=size("global_segment_size"),
            local_buffer_size=size("local_buffer_size"),
            engine=engine,
            store_port_range=store_range,
            env=dict(env),
            timeout_s=float(timeout) if timeout else 2.0,
            problems=tuple(problems),
            sources=sources,
        )
