"""The leader -> standby stream over a master RPC port with TLS and a cluster token.

A master with ``PYMOONCAKE_TLS_CERT``/``_KEY``/``_CA`` serves its RPC port over
TLS only; a standby's :class:`Follower` must connect with TLS too (and then
authenticate with the token), or it never gets in sync.  Certificates are made
at test time with Debian's ``openssl``.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import threading
import time
from pathlib import Path

import pytest

from pymooncake._authio import ClusterSecurity
from pymooncake.store._config import MasterConfig
from pymooncake.store.master import ThreadedMaster
from pymooncake.store.master._replication import Follower
from pymooncake.store.master._state import MasterState
from pymooncake.testing import make_test_pki

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="the openssl binary is needed to make test certificates"
)

TOKEN = "ha-stream-tls-test-secret-0123456789"


def _pki(d: Path) -> ClusterSecurity:
    pki = make_test_pki(d)
    return ClusterSecurity(
        token=TOKEN,
        tls_cert_file=str(pki.cert),
        tls_key_file=str(pki.key),
        tls_ca_file=str(pki.ca),
    )


def test_a_standby_follows_a_leader_over_tls_with_a_token(tmp_path: Path) -> None:
    security = _pki(tmp_path)
    with ThreadedMaster(metrics_port=None, security=security) as master:
        svc = master.service

        def collect_effects(_state: object) -> None:
            svc.state.effects = []  # as an HA master does (effects feed the stream)

        master.call(collect_effects)
        follower = Follower(MasterConfig(), "tls-standby", security)
        states: list[MasterState] = []
        loop = asyncio.new_event_loop()

        async def follow() -> None:
            try:
                await follower.run(master.rpc_address, 0, states.append)
            finally:
                await asyncio.sleep(0.3)  # the closing connection's TLS shutdown

        task = loop.create_task(follow())

        def run_loop() -> None:
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(task)

        thread = threading.Thread(target=run_loop, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 20
            while not (follower.synced and master.call(lambda _s: svc.hub.in_sync)):
                assert time.monotonic() < deadline, "the standby never got in sync over TLS"
                time.sleep(0.02)
            assert len(states) == 1
        finally:
            loop.call_soon_threadsafe(task.cancel)
            thread.join(10)
            loop.close()


def test_a_stream_frame_without_its_fields_is_refused_by_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A standby decodes each stream frame as a FollowFrame: a frame that lacks
    ``seq`` ends that connection with a message naming the field (the standby
    then reconnects), and nothing of it is applied."""
    import logging
    import socket

    from pymooncake.wire import encode_reply

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def leader() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(1 << 16)  # the Follow request
            conn.sendall(encode_reply(1, 0, {"effects": [["seg", "x"]]}))  # no "seq"
            conn.recv(1 << 16)  # until the standby hangs up

    serving = threading.Thread(target=leader, daemon=True)
    serving.start()
    follower = Follower(MasterConfig(), "strict-standby", ClusterSecurity())
    states: list[MasterState] = []

    async def follow_once() -> None:
        task = asyncio.ensure_future(follower.run(f"127.0.0.1:{port}", 0, states.append))
        deadline = time.monotonic() + 10
        while "frame.seq is missing" not in caplog.text and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    try:
        with caplog.at_level(logging.WARNING, logger="pymooncake.master"):
            asyncio.run(follow_once())
        assert "frame.seq is missing" in caplog.text
        assert not states and follower.seq == 0 and not follower.synced
    finally:
        serving.join(5)
        listener.close()


def test_a_standby_that_retried_before_its_sync_reports_a_dead_leader_at_once() -> None:
    """The reconnect backoff (up to 1 s) of a standby that retried before its
    stream got in sync -- the leader not up yet -- starts afresh once in sync: a
    leader that then dies is reported gone after two quick refusals, not after
    two 1-s pauses (which made a SIGKILL failover ~2 s late)."""
    from pymooncake.store.master import ThreadedMaster
    from pymooncake.testing import free_port

    port = free_port()
    follower = Follower(MasterConfig(), "retrying-standby", ClusterSecurity())
    gone: list[float] = []

    async def scenario() -> float:
        task = asyncio.ensure_future(
            follower.run(f"127.0.0.1:{port}", 0, lambda _s: None, lambda _l: gone.append(0.0))
        )
        try:
            await asyncio.sleep(2.0)  # nobody listens yet: refusals, backoff up to 1 s
            with ThreadedMaster(metrics_port=None, port=port) as master:
                svc = master.service

                def collect_effects(_state: object) -> None:
                    svc.state.effects = []  # as an HA master does

                master.call(collect_effects)
                deadline = time.monotonic() + 10
                while not follower.synced:
                    assert time.monotonic() < deadline, "never in sync"
                    await asyncio.sleep(0.02)
                await asyncio.sleep(0.3)
            died = time.monotonic()  # the master closed: its port refuses now
            while not gone:
                assert time.monotonic() < died + 10, "the dead leader was never reported"
                await asyncio.sleep(0.01)
            return time.monotonic() - died
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    took = asyncio.run(scenario())
    assert took < 0.8, took  # 0.1 + 0.2 s of pauses, not 1 + 1
