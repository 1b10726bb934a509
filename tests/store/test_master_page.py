"""The live cluster page on the master's admin port: its JSON view, the
server-rendered HTML, the login of a token-protected master, and the page in
headless Chromium (real numbers, live updates, a screenshot)."""

from __future__ import annotations

import contextlib
import http.client
import json
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from headless_chromium import Chromium, ChromiumError

from pymooncake._authio import ClusterSecurity, http_request
from pymooncake.store import MasterConfig
from pymooncake.store.master import ThreadedMaster
from pymooncake.store.master._page import (
    MAX_FAILED_LOGINS_PER_MIN,
    SESSION_COOKIE,
    render_page,
)
from pymooncake.testing import LocalCluster

MiB = 1 << 20
TOKEN = "page-test-token-0123456789abcdef0123456789abcdef"


def request(
    base: str,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """One plain HTTP request (no redirects followed, no signing)."""
    parts = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def view_of(base: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    status, _, body = request(base, "GET", "/api/v1/cluster", headers=headers)
    assert status == 200, body
    doc: dict[str, Any] = json.loads(body)
    return doc


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(MasterConfig(client_ttl_s=5.0)) as c:
        c.master.service.stats.sample_interval_s = 0.25
        yield c


# --- the view and the HTML ---------------------------------------------------------------------


def test_the_view_and_the_page_show_the_cluster(cluster: LocalCluster) -> None:
    a = cluster.client(16 * MiB)
    b = cluster.client(8 * MiB)
    samples = cluster.master.service.stats.samples
    first = len(samples)
    deadline = time.monotonic() + 5
    while len(samples) == first and time.monotonic() < deadline:  # a sample before the puts
        time.sleep(0.05)
    for i in range(6):
        assert a.put(f"k{i}", bytes([i]) * 10_000)
    a.get("k1")
    time.sleep(0.6)  # a few more samples
    view = view_of(cluster.metrics_url)
    t = view["totals"]
    assert (t["segments"], t["clients"], t["keys"]) == (2, 2, 6)
    assert t["capacity_bytes"] == 24 * MiB
    assert t["allocated_bytes"] == cluster.master.call(
        lambda st: sum(s.allocator.allocated for s in st.segments.values())
    )
    assert (view["role"], view["state"]) == ("leader", "serving")
    assert {s["name"] for s in view["segments"]} == {a.hostname, b.hostname}
    assert sum(s["objects"] for s in view["segments"]) == 6
    assert all(c["status"] == "alive" and c["segments"] == 1 for c in view["clients"])
    assert len(view["history"]) >= 1 and view["sample_interval_s"] == 0.25
    assert sum(h["put"] for h in view["history"]) > 0, view["history"]

    status, headers, body = request(cluster.metrics_url, "GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    page = body.decode()
    # the numbers are in the HTML itself, before any script runs
    assert 'id="key-count" data-value="6"' in page
    assert 'id="segment-count" data-value="2"' in page
    assert 'id="client-count" data-value="2"' in page
    assert a.hostname in page and '<script src="/static/page.js">' in page
    status, headers, script = request(cluster.metrics_url, "GET", "/static/page.js")
    assert status == 200 and b"/api/v1/cluster" in script
    assert headers["content-type"].startswith("text/javascript")

    cluster.master.service.role = "standby"
    try:
        assert view_of(cluster.metrics_url)["role"] == "standby"
        assert b'id="role">standby<' in request(cluster.metrics_url, "GET", "/")[2]
    finally:
        cluster.master.service.role = "leader"


def test_the_page_escapes_what_clients_name() -> None:
    evil = '<img src=x onerror="alert(1)">'
    view: dict[str, Any] = {
        "cluster_id": evil,
        "role": "leader",
        "state": "serving",
        "service_ready": True,
        "leader": "",
        "failovers": 0,
        "version": "0",
        "uptime_s": 1.0,
        "client_ttl_s": 10,
        "totals": dict.fromkeys(
            (
                "capacity_bytes",
                "allocated_bytes",
                "keys",
                "readable_keys",
                "soft_pinned_keys",
                "writing_keys",
                "segments",
                "clients",
            ),
            0,
        ),
        "rates": {"put": 0.0, "get": 0.0, "hit": 0.0, "evict": 0.0, "evict_bytes": 0.0},
        "sample_interval_s": 5.0,
        "history": [],
        "segments": [
            {
                "name": evil,
                "id": evil,
                "client_id": evil,
                "capacity_bytes": 1,
                "allocated_bytes": 0,
                "objects": 0,
                "status": "ok",
            }
        ],
        "clients": [
            {
                "id": evil,
                "host": "</script><script>alert(2)</script>",
                "last_ping_s": 0,
                "status": "alive",
                "segments": 0,
                "writing": 0,
            }
        ],
    }
    page = render_page(view)
    assert "<img" not in page and "<script>alert" not in page
    assert page.count("</script>") == 2  # the JSON block's and the script tag's own
    assert "&lt;/script&gt;&lt;script&gt;alert(2)" in page  # the clients table
    assert "&lt;img src=x onerror=&quot;alert(1)&quot;&gt;" in page


# --- a master with a cluster token ---------------------------------------------------------------


@pytest.fixture
def secured() -> Iterator[ThreadedMaster]:
    with ThreadedMaster(
        MasterConfig(), metrics_port=0, security=ClusterSecurity(token=TOKEN)
    ) as master:
        yield master


def _login(base: str, token: str) -> tuple[int, dict[str, str], bytes]:
    body = urllib.parse.urlencode({"token": token}).encode()
    return request(
        base,
        "POST",
        "/login",
        body,
        {"Content-Type": "application/x-www-form-urlencoded"},
    )


def test_with_a_token_the_page_needs_a_login(secured: ThreadedMaster) -> None:
    base = secured.metrics_url
    assert base is not None
    status, _, body = request(base, "GET", "/")
    assert status == 200 and b'name="token"' in body and b"key-count" not in body
    assert request(base, "GET", "/api/v1/cluster")[0] == 401
    assert request(base, "GET", "/get_all_keys")[0] == 401  # HttpAuth as before
    assert request(base, "GET", "/metrics")[0] == 200  # scrapers stay open
    assert request(base, "GET", "/static/page.js")[0] == 200

    status, _, body = _login(base, "wrong")
    assert status == 403 and b"That is not this cluster" in body
    status, headers, _ = _login(base, TOKEN)
    assert status == 303 and headers["location"] == "/"
    cookie = headers["set-cookie"]
    assert cookie.startswith(f"{SESSION_COOKIE}=")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie
    session = {"Cookie": cookie.split(";", 1)[0]}
    status, _, body = request(base, "GET", "/", headers=session)
    assert status == 200 and b'id="key-count" data-value="0"' in body
    assert b'action="/logout"' in body
    assert view_of(base, session)["totals"]["keys"] == 0

    # forged, tampered and expired sessions are refused
    name, _, value = session["Cookie"].partition("=")
    expiry, _, mac = value.partition(".")
    for forged in (
        f"{name}={int(expiry) + 3600}.{mac}",
        f"{name}={expiry}.{'0' * len(mac)}",
        f"{name}=1.{mac}",
        f"{name}={expiry}",
        "other=1",
    ):
        assert request(base, "GET", "/api/v1/cluster", headers={"Cookie": forged})[0] == 401

    # a program signs its request instead
    status, body = http_request(
        "GET",
        base + "/api/v1/cluster",
        security=ClusterSecurity(token=TOKEN),
        context=b"master-admin",
    )
    assert status == 200 and json.loads(body)["role"] == "leader"

    status, headers, _ = request(base, "POST", "/logout", b"", session)
    assert status == 303 and "Max-Age=0" in headers["set-cookie"]
    assert request(base, "GET", "/login")[0] == 405


def test_failed_logins_are_limited(secured: ThreadedMaster) -> None:
    base = secured.metrics_url
    assert base is not None
    for _ in range(MAX_FAILED_LOGINS_PER_MIN):
        assert _login(base, "guess")[0] == 403
    status, _, body = _login(base, TOKEN)
    assert status == 429 and b"wait a minute" in body


def test_without_a_token_login_is_not_needed(cluster: LocalCluster) -> None:
    status, headers, _ = _login(cluster.metrics_url, "anything")
    assert status == 303 and "set-cookie" not in headers


# --- in a browser ---------------------------------------------------------------------------------


#: what Chromium answers an evaluation that raced a navigation (a form submitted,
#: a redirect followed): the page being left has no context any more; ask again
_NAVIGATING = ("Inspected target navigated or closed", "Cannot find context with specified id")


def _wait_for(browser: Chromium, expression: str, want: Any, timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    got = None
    while time.monotonic() < deadline:
        try:
            got = browser.evaluate(expression)
        except ChromiumError as exc:
            if not any(text in str(exc) for text in _NAVIGATING):
                raise
            got = f"(navigating: {exc})"
        if got == want:
            return got
        time.sleep(0.2)
    raise AssertionError(f"{expression} stayed {got!r}, expected {want!r}")


_KEYS = "document.getElementById('key-count').dataset.value"


@contextlib.contextmanager
def _screenshot_on_failure(browser: Chromium, shot: Path) -> Iterator[None]:
    """A failed assertion names a screenshot of the page as it was."""
    try:
        yield
    except AssertionError as exc:
        try:
            browser.screenshot(str(shot))
            where = f"screenshot: {shot}"
        except Exception as shot_exc:  # the browser itself may be the problem
            where = f"no screenshot ({shot_exc})"
        raise AssertionError(f"{exc} ({where})") from exc


def test_the_page_in_chromium_shows_real_numbers_and_follows_puts(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    a = cluster.client(16 * MiB)
    cluster.client(8 * MiB)
    for i in range(5):
        assert a.put(f"before-{i}", bytes([i]) * 50_000)
    # buffers reserved ahead go back by themselves within 3 s, which a slow start of
    # the browser can outlast: give them back now so the bytes in use hold still
    a.give_back_reserved()
    shot = tmp_path / "cluster-page.png"
    used = cluster.master.call(lambda st: sum(s.allocator.allocated for s in st.segments.values()))
    with Chromium() as browser, _screenshot_on_failure(browser, shot):
        browser.navigate(cluster.metrics_url + "/")
        assert browser.evaluate(_KEYS) == "5"
        used_shown = browser.evaluate("document.getElementById('capacity-bytes').dataset.value")
        assert used_shown == str(used)
        assert browser.evaluate("document.getElementById('segment-count').dataset.value") == "2"
        assert browser.evaluate("document.getElementById('client-count').dataset.value") == "2"
        cap = browser.evaluate("document.getElementById('capacity-bytes').textContent")
        assert cap.endswith("/ 24.00 MB"), cap
        assert browser.evaluate("document.querySelectorAll('#segments tr').length") == 2
        assert browser.evaluate("document.getElementById('role').textContent") == "leader"

        for i in range(7):
            assert a.put(f"after-{i}", bytes([i]) * 50_000)
        _wait_for(browser, _KEYS, "12")  # the page polled and rewrote itself
        _wait_for(
            browser,
            "document.getElementById('updated').textContent.startsWith('updated ')",
            True,
        )
        _wait_for(  # the rate chart drew the puts
            browser,
            "document.querySelectorAll('#chart-put polyline').length",
            1,
        )
        browser.screenshot(str(shot))
        errors = browser.console_errors()
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"no PNG at {shot}"
    assert shot.stat().st_size > 10_000, f"suspiciously small screenshot {shot}"
    assert not errors, f"page errors: {errors} (screenshot: {shot})"


def test_chromium_logs_in_to_a_token_protected_page(
    secured: ThreadedMaster, tmp_path: Path
) -> None:
    base = secured.metrics_url
    assert base is not None
    shot = tmp_path / "cluster-page-login.png"
    with Chromium() as browser, _screenshot_on_failure(browser, shot):
        browser.navigate(base + "/")
        assert browser.evaluate("document.querySelector('input[name=token]') !== null")
        assert browser.evaluate("document.getElementById('key-count')") is None
        browser.evaluate(f"document.querySelector('input[name=token]').value = {json.dumps(TOKEN)}")
        # submitted on the next turn of the page's loop: the evaluation answers first
        browser.evaluate("setTimeout(() => document.querySelector('form').submit(), 0)")
        _wait_for(browser, "document.getElementById('key-count')?.dataset.value", "0")
        _wait_for(
            browser,
            "document.getElementById('updated').textContent.startsWith('updated ')",
            True,
        )  # the polls authenticate with the session cookie
        browser.screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"no PNG at {shot}"
