"""A single call's own first attempt (``MasterClient._call_one``) against a scripted
master on a real socket: a pooled connection that breaks is retried with the same
request id on a new one, and a silent master is reported within the RPC timeout.
With HA (a real etcd names the leader): a master that no longer leads hands the
call to the new leader with the same request id, a slow leader is waited for on
the same connection (the request is not sent twice), and a silent one that is
replaced meanwhile hands the call on.

The scripted master is a thread that decodes the real frames and answers (or
closes, or stays silent) as each test asks; it records every request it read.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pymooncake._authio import ClusterSecurity
from pymooncake._etcd import EtcdClient
from pymooncake.errors import RpcFailed, RpcTimeout, StoreError
from pymooncake.store import _master_client
from pymooncake.store._master_client import MasterClient
from pymooncake.store._types import ErrorCode
from pymooncake.store.master._ha import master_view_key
from pymooncake.testing import make_test_pki
from pymooncake.wire import MasterFrameDecoder, MasterRequest, encode_reply
from pymooncake.wire import _master_msgs as msg
from pymooncake.wire._master_reply_msgs import ExistKeyReply, RemoveReply

#: what the script does with a request: "answer", "close", "ignore", "refuse"
#: (the code of a master that does not lead), "slow" (answer after SLOW_S) or
#: "pieces" (answer in three sends, 20 ms apart)
Script = Callable[["Seen"], str]
SLOW_S = 0.5
NOT_LEADER = int(ErrorCode.UNAVAILABLE_IN_CURRENT_STATUS)
CLUSTER = "calls-test"


@dataclass(frozen=True)
class Seen:
    conn: int  # which accepted connection (0, 1, ...)
    method: str
    params: dict[str, Any]


@dataclass
class ScriptedMaster:
    script: Script
    seen: list[Seen] = field(default_factory=list)
    port: int = 0
    threads: list[threading.Thread] = field(default_factory=list)
    tls: ssl.SSLContext | None = None  # serve over TLS with this (server) context

    def serve(self, listener: socket.socket) -> None:
        conns = 0
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return  # the test closed the listener
            thread = threading.Thread(target=self._conn, args=(sock, conns), daemon=True)
            self.threads.append(thread)
            thread.start()
            conns += 1

    def _conn(self, sock: socket.socket, index: int) -> None:
        decoder = MasterFrameDecoder()
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_side=True)
        with sock:
            while True:
                data = sock.recv(1 << 16)
                if not data:
                    return
                decoder.feed(data)
                while isinstance(frame := decoder.next_frame(), MasterRequest):
                    seen = Seen(index, frame.method.value, dict(frame.params))
                    self.seen.append(seen)
                    action = self.script(seen)
                    if action == "close":
                        return
                    if action == "refuse":
                        sock.sendall(encode_reply(frame.id, NOT_LEADER, "not the leader"))
                    if action == "slow":
                        time.sleep(SLOW_S)
                    if action in ("answer", "slow", "pieces"):
                        value: Any = None
                        if frame.method is msg.MasterMethod.EXIST_KEY:
                            value = True
                        elif frame.method is msg.MasterMethod.BATCH_EXIST_KEY:
                            value = [True] * len(frame.params["keys"])
                        reply = encode_reply(frame.id, 0, value)
                        if action != "pieces":
                            sock.sendall(reply)
                            continue
                        # part of the prefix, the rest of it and part of the body, the rest
                        for piece in (reply[:3], reply[3:11], reply[11:]):
                            sock.sendall(piece)
                            time.sleep(0.02)


@pytest.fixture
def scripted() -> Iterator[Callable[..., ScriptedMaster]]:
    started: list[tuple[socket.socket, threading.Thread, ScriptedMaster]] = []

    def start(script: Script, tls: ssl.SSLContext | None = None) -> ScriptedMaster:
        listener = socket.create_server(("127.0.0.1", 0))
        master = ScriptedMaster(script, port=listener.getsockname()[1], tls=tls)
        thread = threading.Thread(target=master.serve, args=(listener,), daemon=True)
        thread.start()
        started.append((listener, thread, master))
        return master

    yield start
    for listener, thread, master in started:
        listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
        listener.close()
        thread.join(5)
        for conn in master.threads:  # each ends when the client has closed its side
            conn.join(5)


def _client(master: ScriptedMaster, timeout_s: float = 5.0) -> MasterClient:
    # TCP (no same-host UNIX socket) and the default GIL-holding wait: the single
    # call's own attempt runs only on a pooled connection with a held socket
    return MasterClient(f"127.0.0.1:{master.port}", timeout_s=timeout_s, same_host_rpc=False)


def test_a_pooled_connection_that_breaks_is_retried_with_the_same_request_id(
    scripted: Callable[[Script], ScriptedMaster],
) -> None:
    def script(seen: Seen) -> str:
        # the master reads the removal on the first connection, then that
        # connection breaks before any answer: it may or may not have acted
        return "close" if seen.method == "Remove" and seen.conn == 0 else "answer"

    master = scripted(script)
    client = _client(master)
    try:
        assert client.call(msg.ExistKey("k")) == ExistKeyReply(True)  # pools connection 0
        reply = client.call(msg.Remove("k", client_id="client-a"))
    finally:
        client.close()
    assert reply == RemoveReply()
    removes = [s for s in master.seen if s.method == "Remove"]
    assert [s.conn for s in removes] == [0, 1]
    assert removes[0].params["rid"] > 0
    assert removes[1].params["rid"] == removes[0].params["rid"]  # answered from the cache
    assert client.retries == 1


def test_an_answer_that_arrives_in_pieces_is_put_together(
    scripted: Callable[[Script], ScriptedMaster],
) -> None:
    """A read holding one whole answer is decoded where it lies; one that holds
    part of it goes through the decoder's buffer until the rest arrives."""
    master = scripted(lambda seen: "pieces" if seen.params.get("key") == "split" else "answer")
    client = _client(master)
    try:
        assert client.call(msg.ExistKey("whole")) == ExistKeyReply(True)
        assert client.call(msg.ExistKey("split")) == ExistKeyReply(True)
        assert client.call(msg.ExistKey("whole")) == ExistKeyReply(True)  # same connection
    finally:
        client.close()
    assert {s.conn for s in master.seen} == {0}
    assert client.retries == 0


def test_a_silent_master_is_reported_and_its_connection_not_reused(
    scripted: Callable[[Script], ScriptedMaster],
) -> None:
    answered = threading.Event()

    def script(seen: Seen) -> str:
        if answered.is_set():
            return "ignore" if seen.conn == 0 else "answer"
        answered.set()
        return "answer"

    master = scripted(script)
    client = _client(master, timeout_s=0.3)
    try:
        assert client.call(msg.ExistKey("k")) == ExistKeyReply(True)
        with pytest.raises(RpcTimeout, match=r"did not answer ExistKey within 0\.3 s"):
            client.call(msg.ExistKey("k"))
        # the silent connection was closed: the next call opens another one
        assert client.call(msg.ExistKey("k")) == ExistKeyReply(True)
    finally:
        client.close()
    assert [s.conn for s in master.seen] == [0, 0, 1]


# --- a link: requests posted without waiting --------------------------------------


def _eventually(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_link_posts_without_waiting_and_reads_the_answers_that_arrived(
    scripted: Callable[[Script], ScriptedMaster],
) -> None:
    release = threading.Event()

    def script(seen: Seen) -> str:
        release.wait(5)  # nothing is answered until the test says so
        return "answer"

    master = scripted(script)
    client = _client(master)
    link = client.link()
    try:
        requests = [msg.ExistKey(f"k{i}") for i in range(3)]
        for r in requests:
            link.post(r)  # returns at once: the master answers nothing yet
        assert link.answers() == [] and link.outstanding == 3
        release.set()
        got: list[tuple[Any, Any]] = []
        _eventually(lambda: bool(got.extend(link.answers())) or len(got) == 3)
        assert got == [(r, ExistKeyReply(True)) for r in requests]  # in order, typed
        assert link.outstanding == 0
    finally:
        link.close()
        client.close()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the certificates")
def test_a_link_over_tls_reads_the_answers_that_arrived(
    scripted: Callable[..., ScriptedMaster], tmp_path: Path
) -> None:
    pki = make_test_pki(tmp_path)
    security = ClusterSecurity(
        tls_cert_file=str(pki.cert), tls_key_file=str(pki.key), tls_ca_file=str(pki.ca)
    )
    master = scripted(lambda seen: "answer", security.server_ssl_context())
    client = MasterClient(
        f"127.0.0.1:{master.port}", timeout_s=5.0, same_host_rpc=False, security=security
    )
    link = client.link()
    try:
        requests = [msg.ExistKey(f"k{i}") for i in range(3)]
        for r in requests:
            link.post(r)
        got: list[tuple[Any, Any]] = []
        _eventually(lambda: bool(got.extend(link.answers())) or len(got) == 3)
        assert got == [(r, ExistKeyReply(True)) for r in requests]
        link.post(msg.ExistKey("again"))  # the socket is blocking again after a read
        _eventually(lambda: bool(got.extend(link.answers())) or len(got) == 4)
    finally:
        link.close()
        client.close()


def test_a_link_that_breaks_ends_what_it_had_posted_with_rpc_failed(
    scripted: Callable[[Script], ScriptedMaster],
) -> None:
    master = scripted(lambda seen: "answer" if seen.params["key"] == "first" else "close")
    client = _client(master)
    link = client.link()
    try:
        link.post(msg.ExistKey("first"))
        link.post(msg.ExistKey("second"))  # the master closes the link on reading it
        got: list[tuple[Any, Any]] = []
        _eventually(lambda: bool(got.extend(link.answers())) or len(got) == 2)
        assert got[0] == (msg.ExistKey("first"), ExistKeyReply(True))
        assert got[1][0] == msg.ExistKey("second")
        assert isinstance(got[1][1], RpcFailed)
        assert not link.open
        with pytest.raises(RpcFailed, match=r"link to the master .* is closed"):
            link.post(msg.ExistKey("third"))
    finally:
        link.close()
        client.close()


# --- with HA: the leader named in etcd -------------------------------------------------


def _lead(etcd: EtcdClient, master: ScriptedMaster) -> None:
    etcd.put(master_view_key(CLUSTER), f"127.0.0.1:{master.port}".encode())


def _ha_client(etcd: EtcdClient, timeout_s: float = 5.0) -> MasterClient:
    endpoints = ";".join(f"{e.host}:{e.port}" for e in etcd.endpoints)
    return MasterClient(
        f"etcd://{endpoints}", cluster_id=CLUSTER, timeout_s=timeout_s, same_host_rpc=False
    )


def _removes(master: ScriptedMaster) -> list[Seen]:
    return [s for s in master.seen if s.method == "Remove"]


@contextlib.contextmanager
def _leader_switched(
    scripted: Callable[[Script], ScriptedMaster], etcd: EtcdClient, refused: str
) -> Iterator[tuple[ScriptedMaster, ScriptedMaster, MasterClient]]:
    """An HA client with a connection pooled to ``old`` (which refuses ``refused``
    requests as no longer the leader), after etcd named ``new`` the leader."""
    old = scripted(lambda seen: "refuse" if seen.method == refused else "answer")
    new = scripted(lambda seen: "answer")
    _lead(etcd, old)
    client = _ha_client(etcd)
    try:
        assert client.call(msg.ExistKey("k")) == ExistKeyReply(True)  # pooled, to the old one
        _lead(etcd, new)
        yield old, new, client
    finally:
        client.close()


def test_ha_a_master_that_no_longer_leads_hands_the_call_to_the_new_leader(
    scripted: Callable[[Script], ScriptedMaster], etcd_client: EtcdClient
) -> None:
    with _leader_switched(scripted, etcd_client, "Remove") as (old, new, client):
        assert client.call(msg.Remove("k", client_id="client-a")) == RemoveReply()
        assert client.target == f"127.0.0.1:{new.port}"
    (refused,) = _removes(old)
    (answered,) = _removes(new)
    assert refused.params["rid"] > 0
    assert answered.params["rid"] == refused.params["rid"]  # the same request, once acted on


def test_ha_a_liveness_probe_gets_the_refusal_and_the_next_call_the_new_leader(
    scripted: Callable[[Script], ScriptedMaster], etcd_client: EtcdClient
) -> None:
    with _leader_switched(scripted, etcd_client, "Ping") as (_old, new, client):
        with pytest.raises(StoreError) as refused:
            client.call(msg.Ping("client-a"), patient=False)
        assert refused.value.code == NOT_LEADER
        assert [s.method for s in new.seen] == []  # not retried now ...
        assert client.call(msg.ExistKey("k")) == ExistKeyReply(True)
        assert [s.method for s in new.seen] == ["ExistKey"]  # ... but the next call goes there


def test_ha_a_slow_leader_is_waited_for_on_the_same_connection(
    scripted: Callable[[Script], ScriptedMaster],
    etcd_client: EtcdClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_master_client, "_HA_SLICE_S", 0.1)
    leader = scripted(lambda seen: "slow" if seen.method == "Remove" else "answer")
    _lead(etcd_client, leader)
    client = _ha_client(etcd_client)
    try:
        assert client.call(msg.ExistKey("k")) == ExistKeyReply(True)
        started = time.monotonic()
        assert client.call(msg.Remove("k", client_id="client-a")) == RemoveReply()
        assert time.monotonic() - started >= SLOW_S
        assert client.call(msg.ExistKey("k")) == ExistKeyReply(True)
    finally:
        client.close()
    # one removal, and every request on the first connection: it was kept
    assert [(s.method, s.conn) for s in leader.seen] == [
        ("ExistKey", 0),
        ("Remove", 0),
        ("ExistKey", 0),
    ]


def test_ha_a_silent_leader_replaced_meanwhile_hands_the_call_on(
    scripted: Callable[[Script], ScriptedMaster],
    etcd_client: EtcdClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_master_client, "_HA_SLICE_S", 0.1)
    frozen = scripted(lambda seen: "ignore" if seen.method == "Remove" else "answer")
    new = scripted(lambda seen: "answer")
    _lead(etcd_client, frozen)
    client = _ha_client(etcd_client)
    switch = threading.Timer(0.3, _lead, (etcd_client, new))
    try:
        assert client.call(msg.ExistKey("k")) == ExistKeyReply(True)
        switch.start()
        assert client.call(msg.Remove("k", client_id="client-a")) == RemoveReply()
    finally:
        switch.join()
        client.close()
    (unanswered,) = _removes(frozen)
    (answered,) = _removes(new)
    assert answered.params["rid"] == unanswered.params["rid"]


def test_idle_intact_drops_the_connections_the_master_closed() -> None:
    """Before a slot put the client checks its pooled connections for a master that
    closed them (it exited or restarted): the closed one is dropped and the epoch
    moves on, the open one stays; and the check never gives up the GIL (beside a
    busy Python thread that would cost every put a switch interval)."""
    from pymooncake.testing import gil_probe

    client = MasterClient("127.0.0.1:1", same_host_rpc=False)
    (a, b), (c, d) = socket.socketpair(), socket.socketpair()
    try:
        client._idle = [
            _master_client._Conn(a, ("127.0.0.1", 1), None, 1.0),
            _master_client._Conn(c, ("127.0.0.1", 1), None, 1.0),
        ]
        with gil_probe() as probe:
            for _ in range(100):
                assert client.idle_intact()
        assert not probe.released
        assert client.epoch == 0
        d.close()  # the master's end of the second connection
        assert not client.idle_intact()
        assert client.epoch == 1
        assert [conn.sock for conn in client._idle] == [a]
        assert c.fileno() == -1  # closed by the client
        assert client.idle_intact()
    finally:
        client.close()
        for s in (a, b, c):
            s.close()


def test_a_batch_polls_longer_for_its_reply(
    scripted: Callable[..., ScriptedMaster], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch keeps the master busy for a few microseconds per key: its reply is
    polled for longer than a single key's, on the single call's own attempt as on
    the retry path (the spin once got lost on the first)."""
    from pymooncake._heldio import HeldSocket

    spins: list[float | None] = []
    recv = HeldSocket.recv

    def recording(self: HeldSocket, spin_s: float | None = None) -> bytes:
        spins.append(spin_s)
        return recv(self, spin_s)

    monkeypatch.setattr(HeldSocket, "recv", recording)
    master = scripted(lambda seen: "answer")
    client = _client(master)
    try:
        client.call(msg.ExistKey("warm"))  # pools a connection
        spins.clear()
        client.call(msg.ExistKey("one"))
        assert spins and spins[0] is None  # the socket's own spin
        spins.clear()
        reply = client.call(msg.BatchExistKey(tuple(f"k{i}" for i in range(32))))
        assert list(reply.exists) == [True] * 32
        assert spins and spins[0] == pytest.approx(client._spin * 5)  # 1 + 32 / 8
        assert client._spin_for(1000) == pytest.approx(client._spin * 8)  # capped
    finally:
        client.close()
