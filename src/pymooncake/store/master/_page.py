"""The live cluster page on the master's admin HTTP port (``/``).

Theory of operation
-------------------
``GET /`` answers an HTML page rendered on the server from
:func:`cluster_view` (so it shows real numbers without JavaScript); the page's
script (``_static/page.js``, plain JavaScript, no library) then polls
``GET /api/v1/cluster`` -- the same view as JSON -- every 2 s and rewrites the
numbers, the tables and the rate charts.  Rates come from the ring of samples
that :class:`~._metrics.MasterStats` takes every few seconds (the last point
is "now"), so a page load costs one pass over segments and clients, never over
objects.  Nothing is fetched from anywhere but the master itself.

With a cluster token the page is protected like the other admin endpoints,
but a browser cannot sign requests, so it logs in instead: ``/`` without a
session shows only a login form; ``POST /login`` with the cluster token sets
a session cookie (``HttpOnly``, ``SameSite=Strict``, ``Secure`` under TLS)
holding an expiry and an HMAC of it under the cluster key -- nothing is
stored on the master, a new token invalidates every session, and ``POST
/logout`` clears it.  ``/api/v1/cluster`` accepts that cookie or a signed
request (``HttpAuth`` has verified any ``Authorization`` header before the
handler runs).  Failed logins are limited to a few per minute.
"""

from __future__ import annotations

import hmac
import html
import itertools
import json
import time
import urllib.parse
from collections.abc import Callable
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any, Final

from ... import __version__
from ..._httpd import HttpRequest, HttpResponse
from ..._metrics import format_bytes
from ...wire._auth import ClusterKey
from ._exposition import role_state
from ._records import READABLE
from ._state import SLOT_MARK

if TYPE_CHECKING:
    from ._service import MasterService

__all__ = [
    "PAGE_OPEN_PATHS",
    "SESSION_COOKIE",
    "ClusterPage",
    "cluster_view",
]

#: paths HttpAuth lets through unsigned: the page checks its session itself
PAGE_OPEN_PATHS: Final = ("/", "/login", "/logout", "/api/v1/cluster", "/static/page.js")
SESSION_COOKIE: Final = "pymooncake_admin"
#: how long a login lasts
SESSION_TTL_S: Final = 12 * 3600
#: failed logins accepted per minute (all peers together) before answering 429
MAX_FAILED_LOGINS_PER_MIN: Final = 10
#: at most this many segments and clients are listed (the totals count all)
MAX_ROWS: Final = 500
_SESSION_CONTEXT: Final = b"pymooncake master admin page session v1"

_HTML: Final = "text/html; charset=utf-8"
_JSON: Final = "application/json; charset=utf-8"
_HEADERS: Final = (
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    (
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'",
    ),
)


@cache
def _asset(name: str) -> bytes:
    return resources.files(__package__).joinpath("_static").joinpath(name).read_bytes()


# --- the view ------------------------------------------------------------------------------


def _rates(svc: MasterService) -> tuple[dict[str, float], list[dict[str, float]]]:
    """(rates over the last sample interval, history of rates) from the sample ring."""
    samples = list(svc.stats.samples)
    samples.append(svc.stats.current(svc.state))
    history: list[dict[str, float]] = []
    for a, b in itertools.pairwise(samples):
        dt = b.mono - a.mono
        if dt <= 0.2:  # "now" right after a sample: no meaningful rate
            continue
        history.append(
            {
                "t": round(b.wall, 3),
                "put": (b.puts - a.puts) / dt,
                "get": (b.gets - a.gets) / dt,
                "hit": (b.hits - a.hits) / dt,
                "evict": (b.evicted_keys - a.evicted_keys) / dt,
                "evict_bytes": (b.evicted_bytes - a.evicted_bytes) / dt,
                "used": b.allocated_bytes,
            }
        )
    now = (
        history[-1]
        if history
        else {
            "t": time.time(),
            "put": 0.0,
            "get": 0.0,
            "hit": 0.0,
            "evict": 0.0,
            "evict_bytes": 0.0,
        }
    )
    rates = {k: round(float(v), 3) for k, v in now.items() if k != "used"}
    return rates, [{k: round(float(v), 3) for k, v in h.items()} for h in history]


def cluster_view(svc: MasterService) -> dict[str, Any]:
    """Everything the page shows, JSON-able (the body of ``/api/v1/cluster``)."""
    st = svc.state
    now = svc.now()
    ttl = st.config.client_ttl_s
    segments = []
    cap = used = 0
    reserved: dict[str, int] = {}  # reserved put buffers: memory in use, not objects
    for key, obj in st.inflight.items():
        if key[:1] == SLOT_MARK:
            for s in obj.segments():
                reserved[s.id] = reserved.get(s.id, 0) + 1
    for seg in st.segments.values():
        c, u = seg.allocator.capacity, seg.allocator.allocated
        cap += c
        used += u
        segments.append(
            {
                "name": seg.name,
                "id": seg.id,
                "client_id": seg.client_id,
                "capacity_bytes": c,
                "allocated_bytes": u,
                "objects": seg.live_count - reserved.get(seg.id, 0),
                "status": "draining" if seg.draining else "ok",
            }
        )
    segments.sort(key=lambda s: (s["name"], s["id"]))
    clients = []
    for client in st.clients.values():
        silent = max(0.0, now - client.last_seen)
        clients.append(
            {
                "id": client.id,
                "host": client.host_id,
                "last_ping_s": round(silent, 1),
                "status": "alive" if silent <= ttl / 2 else "late",
                "segments": len(client.segments),
                "writing": sum(1 for k in client.inflight if k[:1] != SLOT_MARK),
            }
        )
    clients.sort(key=lambda c: (c["host"], c["id"]))
    writing_new = sum(1 for obj in st.inflight.values() if not obj.flags & READABLE)
    rates, history = _rates(svc)
    role, state, ready = role_state(svc)
    return {
        "cluster_id": st.config.cluster_id,
        "role": role,
        "state": state,
        "service_ready": ready,
        "leader": svc.leader_address,
        "failovers": svc.failovers,
        "version": __version__,
        "uptime_s": round(time.time() - svc.started_at, 1),
        "client_ttl_s": ttl,
        "totals": {
            "capacity_bytes": cap,
            "allocated_bytes": used,
            "keys": st.key_count(),
            "readable_keys": len(st.objects) - writing_new,
            "soft_pinned_keys": st.soft_pinned,
            "writing_keys": len(st.inflight) - st.slots_held(),
            "segments": len(st.segments),
            "clients": len(st.clients),
        },
        "rates": rates,
        "sample_interval_s": svc.stats.sample_interval_s,
        "history": history,
        "segments": segments[:MAX_ROWS],
        "clients": clients[:MAX_ROWS],
    }


# --- HTML ----------------------------------------------------------------------------------


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _pct(used: int, cap: int) -> str:
    return f"{used / cap * 100:.1f}%" if cap else "0.0%"


def _stat(ident: str, label: str, value: int, text: str, sub: str = "") -> str:
    return (
        f'<div class="card"><div class="label">{_e(label)}</div>'
        f'<div class="value" id="{ident}" data-value="{value}">{_e(text)}</div>'
        f'<div class="sub" id="{ident}-sub">{_e(sub)}</div></div>'
    )


def _segment_rows(view: dict[str, Any]) -> str:
    rows = []
    for s in view["segments"]:
        cap, used = s["capacity_bytes"], s["allocated_bytes"]
        width = used / cap * 100 if cap else 0
        rows.append(
            "<tr>"
            f"<td>{_e(s['name'])}</td><td class=mono>{_e(s['id'][:8])}</td>"
            f"<td class=mono>{_e(s['client_id'][:8])}</td>"
            f"<td>{_e(format_bytes(used))} / {_e(format_bytes(cap))} ({_pct(used, cap)})"
            f'<div class="bar"><span style="width:{width:.1f}%"></span></div></td>'
            f"<td>{s['objects']}</td><td>{_e(s['status'])}</td>"
            "</tr>"
        )
    return "".join(rows)


def _client_rows(view: dict[str, Any]) -> str:
    return "".join(
        "<tr>"
        f"<td class=mono>{_e(c['id'])}</td><td>{_e(c['host'])}</td>"
        f"<td>{c['last_ping_s']} s ago</td><td class={_e(c['status'])}>{_e(c['status'])}</td>"
        f"<td>{c['segments']}</td><td>{c['writing']}</td>"
        "</tr>"
        for c in view["clients"]
    )


def _leader_text(view: dict[str, Any]) -> str:
    """ "leader at host:port" on a master that does not lead (HA)."""
    if view["role"] != "leader" and view["leader"]:
        return f"leader at {view['leader']}"
    return ""


def render_page(view: dict[str, Any], *, logout: bool = False) -> str:
    """The page, with ``view``'s numbers already in it (``logout``: with a log-out
    button, for a master with a cluster token)."""
    t = view["totals"]
    r = view["rates"]
    cap, used = t["capacity_bytes"], t["allocated_bytes"]
    cards = "".join(
        (
            _stat(
                "capacity-bytes",
                "Memory used",
                used,
                f"{format_bytes(used)} / {format_bytes(cap)}",
                _pct(used, cap),
            ),
            _stat(
                "key-count",
                "Objects",
                t["keys"],
                str(t["keys"]),
                f"{t['soft_pinned_keys']} soft-pinned, {t['writing_keys']} being written",
            ),
            _stat(
                "segment-count", "Segments", t["segments"], str(t["segments"]), format_bytes(cap)
            ),
            _stat("client-count", "Clients", t["clients"], str(t["clients"])),
        )
    )
    charts = "".join(
        f'<div class="card chart"><div class="label">{_e(label)}</div>'
        f'<div class="value" id="rate-{key}">{r[key]:.1f}/s</div>'
        f'<svg id="chart-{key}" viewBox="0 0 300 60" preserveAspectRatio="none"></svg>'
        f'<div class="sub" id="chart-{key}-sub">collecting samples...</div></div>'
        for key, label in (("put", "Puts"), ("get", "Gets"), ("evict", "Evictions"))
    )
    # JSON inside <script>: no "<", ">" or "&" that could end the element or open a comment
    data = (
        json.dumps(view, separators=(",", ":"))
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>pymooncake master - {_e(view["cluster_id"])}</title>
<style>{_asset("page.css").decode()}</style></head>
<body>
<header><h1>pymooncake master</h1>
<span class="pill" id="cluster-id">{_e(view["cluster_id"])}</span>
<span class="pill role-{_e(view["role"])}" id="role">{_e(view["role"])}</span>
<span class="muted" id="leader">{_e(_leader_text(view))}</span>
<span class="muted" id="version">v{_e(view["version"])}</span>
<span class="muted">up <span id="uptime">{view["uptime_s"]:.0f}</span> s</span>
<span class="muted right" id="updated">rendered by the master</span>{_LOGOUT if logout else ""}</header>
<main>
<section class="cards">{cards}</section>
<section class="cards">{charts}</section>
<h2>Segments</h2>
<table><thead><tr><th>name</th><th>id</th><th>client</th><th>used / capacity</th><th>replicas</th><th>status</th></tr></thead>
<tbody id="segments">{_segment_rows(view)}</tbody></table>
<h2>Clients</h2>
<table><thead><tr><th>id</th><th>host</th><th>last ping</th><th>liveness</th><th>segments</th><th>keys being written</th></tr></thead>
<tbody id="clients">{_client_rows(view)}</tbody></table>
<p class="muted">Refreshes every 2 s from <a href="/api/v1/cluster">/api/v1/cluster</a>;
Prometheus metrics at <a href="/metrics">/metrics</a>, summary at <a href="/metrics/summary">/metrics/summary</a>.</p>
</main>
<script type="application/json" id="initial">{data}</script>
<script src="/static/page.js"></script>
</body></html>
"""


_LOGOUT: Final = '<form method="post" action="/logout" class="logout"><button type="submit">Log out</button></form>'


def render_login(message: str = "") -> str:
    """The login form shown instead of the page to a browser without a session."""
    note = f'<p class="error">{_e(message)}</p>' if message else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>pymooncake master - login</title>
<style>{_asset("page.css").decode()}</style></head>
<body><main class="login"><h1>pymooncake master</h1>
<p>This master has a cluster token. Enter it to see the cluster.</p>{note}
<form method="post" action="/login">
<input type="password" name="token" autocomplete="current-password" autofocus required>
<button type="submit">Log in</button></form></main></body></html>
"""


# --- sessions and routes -------------------------------------------------------------------


class ClusterPage:
    """The page's routes and sessions.

    Args:
        service: the master (read on the master's loop).
        key: the cluster key (None: the page is open, as every admin endpoint).
        secure: the port speaks TLS (the cookie gets ``Secure``).
        clock: Unix time (tests inject one).
    """

    def __init__(
        self,
        service: MasterService,
        key: ClusterKey | None,
        *,
        secure: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._svc = service
        self._key = key
        self._secure = secure
        self._clock = clock
        self._failed: list[float] = []

    # --- sessions ------------------------------------------------------------------

    def _mac(self, expiry: int) -> str:
        assert self._key is not None
        return self._key.mac(_SESSION_CONTEXT, str(expiry).encode()).hex()

    def issue(self) -> str:
        """A new session cookie value."""
        expiry = int(self._clock()) + SESSION_TTL_S
        return f"{expiry}.{self._mac(expiry)}"

    def _session_ok(self, request: HttpRequest) -> bool:
        for part in request.headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name != SESSION_COOKIE:
                continue
            expiry_text, _, mac = value.partition(".")
            if not expiry_text.isdigit() or int(expiry_text) < self._clock():
                continue
            if hmac.compare_digest(mac, self._mac(int(expiry_text))):
                return True
        return False

    def allowed(self, request: HttpRequest) -> bool:
        """Whether ``request`` may see the cluster: no token, a request HttpAuth
        has verified (it checks every ``Authorization`` header), or a session."""
        if self._key is None or request.headers.get("authorization"):
            return True
        return self._session_ok(request)

    def _cookie(self, value: str, max_age: int) -> tuple[str, str]:
        secure = "; Secure" if self._secure else ""
        return (
            "Set-Cookie",
            f"{SESSION_COOKIE}={value}; Max-Age={max_age}; Path=/; HttpOnly; SameSite=Strict{secure}",
        )

    # --- routes --------------------------------------------------------------------

    def page(self, request: HttpRequest) -> HttpResponse:
        if not self.allowed(request):
            return HttpResponse(200, render_login().encode(), _HTML, headers=_HEADERS)
        body = render_page(cluster_view(self._svc), logout=self._key is not None).encode()
        return HttpResponse(200, body, _HTML, headers=_HEADERS)

    def api(self, request: HttpRequest) -> HttpResponse:
        if not self.allowed(request):
            return HttpResponse(
                401,
                b'{"error":"log in at / with the cluster token, or sign the request"}',
                _JSON,
                headers=_HEADERS,
            )
        body = json.dumps(cluster_view(self._svc), separators=(",", ":")).encode()
        return HttpResponse(200, body, _JSON, headers=_HEADERS)

    def script(self, request: HttpRequest) -> HttpResponse:
        return HttpResponse(
            200, _asset("page.js"), "text/javascript; charset=utf-8", headers=_HEADERS
        )

    def login(self, request: HttpRequest) -> HttpResponse:
        if request.method != "POST":
            return HttpResponse(405, b"POST the token from the form at /", headers=_HEADERS)
        if self._key is None:
            return HttpResponse(303, b"", headers=(*_HEADERS, ("Location", "/")))
        now = self._clock()
        self._failed = [t for t in self._failed if now - t < 60.0]
        if len(self._failed) >= MAX_FAILED_LOGINS_PER_MIN:
            page = render_login("Too many failed logins; wait a minute and try again.")
            return HttpResponse(429, page.encode(), _HTML, headers=_HEADERS)
        form = urllib.parse.parse_qs(request.body.decode("utf-8", "replace"), max_num_fields=8)
        token = form.get("token", [""])[0]
        try:
            ok = bool(token) and ClusterKey(token) == self._key
        except ValueError:
            ok = False
        if not ok:
            self._failed.append(now)
            page = render_login("That is not this cluster's token (PYMOONCAKE_CLUSTER_TOKEN).")
            return HttpResponse(403, page.encode(), _HTML, headers=_HEADERS)
        return HttpResponse(
            303,
            b"",
            headers=(*_HEADERS, ("Location", "/"), self._cookie(self.issue(), SESSION_TTL_S)),
        )

    def logout(self, request: HttpRequest) -> HttpResponse:
        if request.method != "POST":
            return HttpResponse(405, b"use POST", headers=_HEADERS)
        return HttpResponse(303, b"", headers=(*_HEADERS, ("Location", "/"), self._cookie("", 0)))
