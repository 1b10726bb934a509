"""etcd endpoint lists, parsed as the reference's etcd wrapper parses them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from .._net import split_host_port
from ..errors import InvalidArgument

__all__ = ["DEFAULT_PORT", "Endpoint", "parse_endpoints"]

#: the client port etcd listens on by default (and the reference's examples use)
DEFAULT_PORT: Final = 2379


@dataclass(frozen=True)
class Endpoint:
    """One etcd client URL."""

    host: str
    port: int
    tls: bool = False

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self}"


def parse_endpoints(text: str) -> tuple[Endpoint, ...]:
    """Parse an endpoint list the way the reference's etcd wrapper does.

    Entries are separated by ``;`` or ``,`` (mixed too); blanks around them and
    empty entries are ignored.  Each entry is ``host:port``, ``[v6]:port``,
    ``http://host:port`` or ``https://host:port`` (TLS); a missing port means
    2379.  A trailing ``/`` after the port is ignored.

    Raises:
        InvalidArgument: no endpoint at all, or an entry that is not an address.
    """
    endpoints: list[Endpoint] = []
    for raw in text.replace(",", ";").split(";"):
        entry = raw.strip()
        if not entry:
            continue
        tls = False
        scheme, sep, rest = entry.partition("://")
        if sep:
            if scheme.lower() not in ("http", "https"):
                raise InvalidArgument(
                    f"etcd endpoint {entry!r}: scheme {scheme!r} is not http or https"
                )
            tls = scheme.lower() == "https"
            entry = rest
        entry = entry.rstrip("/")
        if "/" in entry:
            raise InvalidArgument(
                f"etcd endpoint {raw.strip()!r} has a path; give host:port (etcd's client URL)"
            )
        try:
            host, port = split_host_port(entry)
        except InvalidArgument as exc:
            raise InvalidArgument(f"etcd endpoint {raw.strip()!r}: {exc}") from None
        endpoints.append(Endpoint(host, DEFAULT_PORT if port is None else port, tls))
    if not endpoints:
        raise InvalidArgument(
            f"no etcd endpoint in {text!r}; give 'host:2379' or 'h1:2379;h2:2379'"
        )
    return tuple(endpoints)
