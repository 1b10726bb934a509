"""Configuration as frozen dataclasses.

Only :meth:`EngineConfig.from_env` (called by the CLIs and the ``mooncake``
compatibility edge) reads ``MC_*`` variables; nothing is read at import time.
Defaults and variable names follow the reference (``config.cpp``,
``shared/reference/transfer-engine.md`` section 8).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from ._authio import ClusterSecurity
from .errors import ConfigError
from .wire._rpc import DEFAULT_MAX_FRAME_LENGTH, MAX_FRAME_LENGTH_LIMIT

__all__ = ["EngineConfig", "parse_bool_env"]

_TRUE: Final = frozenset({"1", "true", "yes", "on", "y", "t"})
_FALSE: Final = frozenset({"0", "false", "no", "off", "n", "f", ""})


def parse_bool_env(name: str, value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ConfigError(f"{name}={value!r} is not a boolean; use 1/0, true/false, yes/no")


def _int_env(env: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw.strip(), 0)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if not lo <= value <= hi:
        raise ConfigError(f"{name}={value} is out of range [{lo}, {hi}]")
    return value


def _float_env(env: Mapping[str, str], name: str, default: float, lo: float) -> float:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if value < lo:
        raise ConfigError(f"{name}={value} must be at least {lo}")
    return value


@dataclass(frozen=True)
class EngineConfig:
    """Settings of one transfer engine.

    Attributes mirror the reference's environment variables; the variable is
    named in each comment.
    """

    #: MC_METADATA_CLUSTER_ID: key namespace ``mooncake/<id>/...``
    metadata_cluster_id: str = ""
    #: MC_MIN_RPC_PORT / MC_MAX_RPC_PORT: random port range for RPC and data listeners
    rpc_port_min: int = 15000
    rpc_port_max: int = 17000
    #: 0 picks a free port from the range; any other value binds exactly that port
    rpc_port: int = 0
    #: MC_LEGACY_RPC_PORT_BINDING: take host:port for the RPC listener from local_hostname
    legacy_rpc_port_binding: bool = False
    #: MC_HANDSHAKE_PORT: port used by legacy binding when the name has none
    handshake_port: int = 12001
    #: MC_HANDSHAKE_MAX_LENGTH: largest accepted RPC frame
    handshake_max_length: int = DEFAULT_MAX_FRAME_LENGTH
    #: MC_HANDSHAKE_CONNECT_TIMEOUT (s): connect timeout for RPC and data connections
    connect_timeout_s: float = 5.0
    #: reference SO_RCVTIMEO of an RPC client (60 s) -- bounded further by each call
    rpc_io_timeout_s: float = 60.0
    #: reference SO_RCVTIMEO of an accepted RPC connection
    rpc_server_timeout_s: float = 5.0
    #: MC_HANDSHAKE_LISTEN_BACKLOG
    listen_backlog: int = 128
    #: MC_TCP_BIND_ADDRESS: address advertised (and bound) outside P2P mode
    tcp_bind_address: str | None = None
    #: MC_USE_IPV6
    use_ipv6: bool = False
    #: MC_TCP_PROTO=1 forces the v1 data protocol (no status frames)
    tcp_force_v1: bool = False
    #: MC_TCP_STATUS_TIMEOUT_SEC: wait for a v2 status frame / any data-socket I/O
    tcp_status_timeout_s: float = 30.0
    #: MC_TCP_LANES_PER_PEER: idle data connections kept per peer
    lanes_per_peer: int = 4
    #: MC_TRANSFER_TIMEOUT (s, min 5): deadline of sync transfers, plus 1 ns per byte
    transfer_timeout_s: float = 30.0
    #: MC_SLICE_TIMEOUT (s; <=0 off): async tasks older than this become TIMEOUT
    slice_timeout_s: float = -1.0
    #: MC_DISABLE_METACACHE: always re-fetch peer descriptors
    disable_metacache: bool = False
    #: HTTP metadata timeouts (reference libcurl: 3000 ms total, 1500 ms connect)
    metadata_timeout_s: float = 3.0
    metadata_connect_timeout_s: float = 1.5
    #: worker threads running asynchronous batches
    async_workers: int = 8
    #: PYMOONCAKE_SAME_HOST (default on): same-host peers copy through shared
    #: memory / process_vm_* instead of TCP
    same_host_transport: bool = True
    #: PYMOONCAKE_DEVICE (auto|cuda|fake|none; PYMOONCAKE_FAKE_GPU=1 means fake):
    #: how device (GPU) memory is reached; auto uses CUDA when cuda-python and a
    #: GPU are there (``docs/gpu.md``)
    device_backend: str = "auto"
    #: PYMOONCAKE_STAGING_CHUNK_BYTES: size of each of the two pinned buffers that
    #: stage device memory through TCP (copy and send overlap chunk by chunk)
    staging_chunk_bytes: int = 4 << 20
    #: PYMOONCAKE_CLUSTER_TOKEN: the cluster's shared secret.  Set: the RPC and
    #: data ports and the HTTP metadata client authenticate every connection
    #: (reference engines cannot: leave it empty in mixed clusters).  Never shown by repr.
    cluster_token: str = field(default="", repr=False)
    #: PYMOONCAKE_TLS_CERT / _KEY / _CA (all three or none): TLS on the RPC port
    #: and the HTTP metadata client; the data port stays plain TCP (zero-copy)
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_ca_file: str = ""
    #: RPC port: connections served at once (more are closed at once, counted)
    rpc_max_connections: int = 256
    #: RPC port: request bytes buffered by all its connections together
    rpc_max_buffered_bytes: int = 64 << 20
    #: notifications held until get_notifies() (count and bytes); beyond, the
    #: sender's send_notify fails with a clear error
    notify_queue_max: int = 65536
    notify_queue_max_bytes: int = 64 << 20
    #: TCP data port: open connections (beyond: refused, counted)
    data_max_connections: int = 4096
    #: TCP data port: worker threads serving readable connections (idle ones cost none)
    data_workers: int = 32
    #: handshake deadline on the RPC and data ports (authentication, first header)
    auth_timeout_s: float = 5.0
    #: unregister_memory(): how long in-flight requests on the region may finish
    #: before their connections are cut
    unregister_drain_s: float = 2.0
    #: MC_REDIS_USERNAME / MC_REDIS_PASSWORD (AUTH) and MC_REDIS_DB_INDEX (SELECT,
    #: 0-255) for a redis:// metadata server
    redis_username: str = ""
    redis_password: str = field(default="", repr=False)
    redis_db_index: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.rpc_port_min <= self.rpc_port_max < 65536:
            raise ConfigError(
                f"RPC port range [{self.rpc_port_min}, {self.rpc_port_max}] is invalid "
                "(MC_MIN_RPC_PORT / MC_MAX_RPC_PORT)"
            )
        if not 0 <= self.rpc_port < 65536:
            raise ConfigError(f"rpc_port {self.rpc_port} is not a TCP port")
        if self.handshake_max_length < 1:
            raise ConfigError("handshake_max_length must be positive")
        if self.lanes_per_peer < 1:
            raise ConfigError("lanes_per_peer must be at least 1")
        if self.async_workers < 1:
            raise ConfigError("async_workers must be at least 1")
        if self.device_backend not in ("auto", "cuda", "fake", "none"):
            raise ConfigError(
                f"device_backend {self.device_backend!r} is not one of auto, cuda, fake, none "
                "(PYMOONCAKE_DEVICE)"
            )
        if not 4096 <= self.staging_chunk_bytes <= 1 << 30:
            raise ConfigError(
                f"staging_chunk_bytes {self.staging_chunk_bytes} is out of range [4096, 1 GiB] "
                "(PYMOONCAKE_STAGING_CHUNK_BYTES)"
            )
        for name in (
            "rpc_max_connections",
            "rpc_max_buffered_bytes",
            "notify_queue_max",
            "notify_queue_max_bytes",
            "data_max_connections",
            "data_workers",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        if not 0 <= self.redis_db_index <= 255:
            raise ConfigError(f"redis_db_index {self.redis_db_index} is outside 0..255")
        self.security  # noqa: B018 - validates the token and TLS files now

    @property
    def security(self) -> ClusterSecurity:
        """The token and TLS settings as one object (what servers and clients take).

        Raises:
            ConfigError: an unusable token or half-configured TLS.
        """
        return ClusterSecurity(
            token=self.cluster_token,
            tls_cert_file=self.tls_cert_file,
            tls_key_file=self.tls_key_file,
            tls_ca_file=self.tls_ca_file,
        )

    def replace(self, **changes: object) -> EngineConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> EngineConfig:
        """Build a config from ``MC_*`` variables (``os.environ`` by default).

        Raises:
            ConfigError: a variable holds an unusable value; the message names it.
        """
        env = os.environ if env is None else env
        lo = _int_env(
            env, "MC_MIN_RPC_PORT", _int_env(env, "MC_MIN_PRC_PORT", 15000, 1, 65535), 1, 65535
        )
        hi = _int_env(
            env, "MC_MAX_RPC_PORT", _int_env(env, "MC_MAX_PRC_PORT", 17000, 1, 65535), 1, 65535
        )
        if lo > hi:
            raise ConfigError(f"MC_MIN_RPC_PORT={lo} is above MC_MAX_RPC_PORT={hi}")
        timeout = _float_env(env, "MC_TRANSFER_TIMEOUT", 30.0, 0.0)
        bind = env.get("MC_TCP_BIND_ADDRESS", "").strip() or None
        sec = ClusterSecurity.from_env(env)
        return cls(
            cluster_token=sec.token,
            tls_cert_file=sec.tls_cert_file,
            tls_key_file=sec.tls_key_file,
            tls_ca_file=sec.tls_ca_file,
            metadata_cluster_id=env.get("MC_METADATA_CLUSTER_ID", "").strip(),
            rpc_port_min=lo,
            rpc_port_max=hi,
            legacy_rpc_port_binding="MC_LEGACY_RPC_PORT_BINDING" in env,
            handshake_port=_int_env(env, "MC_HANDSHAKE_PORT", 12001, 1, 65535),
            handshake_max_length=_int_env(
                env, "MC_HANDSHAKE_MAX_LENGTH", DEFAULT_MAX_FRAME_LENGTH, 1, MAX_FRAME_LENGTH_LIMIT
            ),
            connect_timeout_s=_float_env(env, "MC_HANDSHAKE_CONNECT_TIMEOUT", 5.0, 0.001),
            listen_backlog=_int_env(env, "MC_HANDSHAKE_LISTEN_BACKLOG", 128, 1, 65535),
            tcp_bind_address=bind,
            use_ipv6="MC_USE_IPV6" in env,
            tcp_force_v1=env.get("MC_TCP_PROTO", "").strip() == "1",
            tcp_status_timeout_s=_float_env(env, "MC_TCP_STATUS_TIMEOUT_SEC", 30.0, 0.001),
            lanes_per_peer=_int_env(
                env,
                "MC_TCP_LANES_PER_PEER",
                _int_env(env, "MC_TCP_MAX_CONNECTIONS_PER_PEER", 4, 1, 16),
                1,
                16,
            ),
            # reference: minimum 5 s
            transfer_timeout_s=max(5.0, timeout),
            slice_timeout_s=_float_env(env, "MC_SLICE_TIMEOUT", -1.0, -1.0),
            disable_metacache="MC_DISABLE_METACACHE" in env,
            same_host_transport=parse_bool_env(
                "PYMOONCAKE_SAME_HOST", env.get("PYMOONCAKE_SAME_HOST", "1")
            ),
            device_backend=_device_mode(env),
            staging_chunk_bytes=_int_env(
                env, "PYMOONCAKE_STAGING_CHUNK_BYTES", 4 << 20, 4096, 1 << 30
            ),
            redis_username=env.get("MC_REDIS_USERNAME", ""),
            redis_password=env.get("MC_REDIS_PASSWORD", ""),
            redis_db_index=_int_env(env, "MC_REDIS_DB_INDEX", 0, 0, 255),
        )


def _device_mode(env: Mapping[str, str]) -> str:
    """PYMOONCAKE_DEVICE, or ``fake`` when PYMOONCAKE_FAKE_GPU is true."""
    mode = env.get("PYMOONCAKE_DEVICE", "").strip().lower()
    fake = parse_bool_env("PYMOONCAKE_FAKE_GPU", env.get("PYMOONCAKE_FAKE_GPU", "0"))
    if fake:
        if mode not in ("", "fake"):
            raise ConfigError(
                f"PYMOONCAKE_FAKE_GPU=1 contradicts PYMOONCAKE_DEVICE={mode!r}; set one of them"
            )
        return "fake"
    if mode and mode not in ("auto", "cuda", "fake", "none"):
        raise ConfigError(f"PYMOONCAKE_DEVICE={mode!r} is not one of auto, cuda, fake, none")
    return mode or "auto"
