"""Redis metadata backend: ``redis://host:port`` (redis-py, ``pip install 'pymooncake[redis]'``).

As the reference's ``RedisStoragePlugin``: the same keys as etcd and HTTP,
``GET``/``SET``/``DEL`` of JSON text, no expiry; credentials only from
``MC_REDIS_USERNAME``/``MC_REDIS_PASSWORD`` (``AUTH [user] password``) and the
database from ``MC_REDIS_DB_INDEX`` (``SELECT``, 0-255).  The reference parses
the part after ``redis://`` as ``host:port`` only, so a URL with
``user:pass@`` or ``/db`` is refused with a pointer to those variables rather
than half-understood.

pymooncake's additions: ``create`` is ``SET key value NX``; ``compare_and_remove``
a Lua script (``GET`` compared, then ``DEL``) that Redis runs atomically.

Redis support is off in the reference's PyPI wheels (source builds only), so
interoperation is with source-built reference engines.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, TypeVar

from ..._net import split_host_port
from ...errors import ConfigError, InvalidArgument, MetadataError, MetadataUnreachable, NotSupported
from ._base import MetadataStore

__all__ = ["DEFAULT_REDIS_PORT", "RedisMetadataStore", "parse_redis_location"]

T = TypeVar("T")

DEFAULT_REDIS_PORT: Final = 6379

_COMPARE_AND_DELETE: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""

_GLOB_SPECIAL: Final = str.maketrans({c: "\\" + c for c in "*?[]\\"})


def parse_redis_location(location: str) -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``; port 6379 when missing) from the part after ``redis://``.

    Raises:
        ConfigError: credentials, a database path, or not an address.
    """
    text = location.strip().rstrip("/")
    if "@" in text or "/" in text:
        raise ConfigError(
            f"metadata_server 'redis://{location}': give redis://host:port only, as the "
            "reference does; set the credentials with MC_REDIS_USERNAME / MC_REDIS_PASSWORD "
            "and the database with MC_REDIS_DB_INDEX"
        )
    try:
        host, port = split_host_port(text)
    except InvalidArgument as exc:
        raise ConfigError(f"metadata_server 'redis://{location}': {exc}") from None
    return host, DEFAULT_REDIS_PORT if port is None else port


class RedisMetadataStore(MetadataStore):
    """Metadata in Redis.

    Args:
        location: ``host:port``.
        username / password: for ``AUTH`` (empty: none).
        db_index: for ``SELECT``.
        timeout_s / connect_timeout_s: per command / per connection attempt.

    Raises:
        NotSupported: redis-py is not installed.
        ConfigError: ``location`` is not ``host:port``.
    """

    def __init__(
        self,
        location: str,
        *,
        username: str = "",
        password: str = "",
        db_index: int = 0,
        timeout_s: float = 3.0,
        connect_timeout_s: float = 1.5,
    ) -> None:
        host, port = parse_redis_location(location)
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError:
            raise NotSupported(
                f"metadata_server 'redis://{location}' needs the redis-py package: "
                "pip install 'pymooncake[redis]'"
            ) from None
        self._errors = redis.exceptions
        self.url = f"redis://{location.strip()}"
        self._host, self._port, self._db = host, port, db_index
        self._username = username
        self._redis: Any = redis.Redis(
            host=host,
            port=port,
            db=db_index,
            username=username or None,
            password=password or None,
            socket_timeout=timeout_s,
            socket_connect_timeout=connect_timeout_s,
            protocol=2,  # RESP2, as the reference's hiredis speaks (no HELLO handshake)
            # one immediate retry (a pooled connection the server closed); redis-py's
            # default backs off for seconds, which only delays the real error
            retry=Retry(NoBackoff(), 1),
        )
        self._cad = self._redis.register_script(_COMPARE_AND_DELETE)

    def _do(self, what: str, op: Callable[[], T]) -> T:
        errors = self._errors
        try:
            return op()
        except errors.AuthenticationError as exc:
            raise MetadataError(self._auth_message(what, exc)) from exc
        except (errors.ConnectionError, errors.TimeoutError) as exc:
            raise MetadataUnreachable(self._unreachable_message(what, exc)) from exc
        except errors.ResponseError as exc:
            if str(exc).startswith(("NOAUTH", "WRONGPASS", "NOPERM")):
                raise MetadataError(self._auth_message(what, exc)) from exc
            raise MetadataError(f"Redis {self.url} refused {what}: {exc}") from exc
        except errors.RedisError as exc:
            raise MetadataError(f"Redis {self.url} failed {what}: {exc}") from exc

    def _auth_message(self, what: str, exc: BaseException) -> str:
        return (
            f"Redis {self.url} refused {what}: {str(exc).rstrip('.')}. Set the password with MC_REDIS_PASSWORD "
            "(and MC_REDIS_USERNAME for an ACL user) in the environment of every Mooncake "
            "process; they must match the server's requirepass / ACL"
        )

    def _unreachable_message(self, what: str, exc: BaseException) -> str:
        return (
            f"Redis metadata server {self.url} is unreachable ({what}: {exc}). Check that "
            f"redis-server runs on {self._host} and listens on an address this host can "
            "reach: its default 'bind 127.0.0.1' and protected mode refuse other hosts; set "
            "'bind 0.0.0.0' (with requirepass) in redis.conf, and check with "
            f"`redis-cli -h {self._host} -p {self._port} ping` from this host"
        )

    def get(self, key: str) -> bytes | None:
        value: bytes | None = self._do(f"GET {key}", lambda: self._redis.get(key))
        return value

    def _write(self, key: str, value: bytes) -> None:
        self._do(f"SET {key}", lambda: self._redis.set(key, value))

    def create(self, key: str, value: bytes) -> bool:
        return bool(self._do(f"SET {key} NX", lambda: self._redis.set(key, value, nx=True)))

    def remove(self, key: str) -> bool:
        return bool(self._do(f"DEL {key}", lambda: self._redis.delete(key)))

    def compare_and_remove(self, key: str, expected: bytes) -> bool:
        return bool(
            self._do(
                f"compare-and-delete {key}",
                lambda: self._cad(keys=[key], args=[bytes(expected)]),
            )
        )

    def keys(self, prefix: str) -> list[str]:
        pattern = prefix.translate(_GLOB_SPECIAL) + "*"
        found = self._do(
            f"SCAN {pattern}", lambda: list(self._redis.scan_iter(match=pattern, count=1000))
        )
        return sorted(k.decode(errors="replace") for k in found)

    def close(self) -> None:
        self._redis.close()
        self._redis.connection_pool.disconnect()
