"""Who may do what on the store master (issue 7, "no access control at all").

Every attacker capability of the issue, tried against a master *with* a cluster
token (the attacker has none, or a wrong one: refused before anything is read,
listed, removed or mounted, and the victim's data is untouched) and against an
open master (no token: allowed -- the documented open default of a cluster
that reference engines can join -- except the own-segment rule, which holds
either way: a client unmounts only its own segments, and client ids, its only
credential, never leak through listings or error messages).

Also: a store client holding the token works over TCP and over the same-host
UNIX socket, one without it is told why; ``mooncake_master
--cluster_token_file``, ``ProcessCluster(token=)`` and ``pymooncake cluster``
wire the token end to end.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pymooncake import EngineConfig
from pymooncake._authio import ClusterSecurity, http_request
from pymooncake.errors import AuthenticationError, MooncakeError, StoreError
from pymooncake.store import ErrorCode, MasterConfig, StoreClient, StoreClientConfig
from pymooncake.store._master_client import MasterClient
from pymooncake.store.master._state import client_tag
from pymooncake.testing import LocalCluster, ProcessCluster, console_command, read_stdout_until
from pymooncake.wire import _master_msgs as msg

MiB = 1 << 20
TOKEN = "test-cluster-token-" + "x" * 24
WRONG = "another-cluster-token-" + "y" * 24
ADMIN = b"master-admin"
KEY = "victim/object"
VALUE = b"secret value " * 100


@dataclass
class Ctx:
    cluster: LocalCluster
    victim: StoreClient
    attacker: MasterClient
    attacker_id: str

    @property
    def segment(self) -> Any:
        return self.victim.segments[0]

    def admin(self, path: str, security: ClusterSecurity | None = None) -> tuple[int, bytes]:
        return http_request(
            "GET", self.cluster.metrics_url + path, security=security, context=ADMIN
        )

    def victim_intact(self) -> bool:
        def check(st: Any) -> bool:
            st.validate()
            seg = st.segments.get(self.segment.id)
            return seg is not None and seg.client_id == self.victim.client_id

        return bool(self.cluster.master.call(check)) and self.victim.get(KEY) == VALUE


@pytest.fixture(params=["no token", "wrong token"])
def attacker_security(request: pytest.FixtureRequest) -> ClusterSecurity:
    return ClusterSecurity() if request.param == "no token" else ClusterSecurity(WRONG)


def _ctx(token: str, attacker: ClusterSecurity) -> Iterator[Ctx]:
    with LocalCluster(MasterConfig(client_ttl_s=30.0), token=token) as cluster:
        victim = cluster.client(16 * MiB, 1 * MiB, prefault=False)
        assert victim.put(KEY, VALUE) is True
        client = MasterClient(
            cluster.master_address,
            timeout_s=3.0,
            reconnect_s=0.0,
            same_host_rpc=False,  # an attacker on the network
            security=attacker,
        )
        try:
            yield Ctx(cluster, victim, client, uuid.uuid4().hex)
        finally:
            client.close()


@pytest.fixture
def secured(attacker_security: ClusterSecurity) -> Iterator[Ctx]:
    """A master with a token; an attacker without it (or with another one)."""
    yield from _ctx(TOKEN, attacker_security)


@pytest.fixture
def open_master() -> Iterator[Ctx]:
    """A master without a token (the open default); the attacker has none either."""
    yield from _ctx("", ClusterSecurity())


@pytest.fixture
def insider() -> Iterator[Ctx]:
    """A master with a token and another client that holds it."""
    yield from _ctx(TOKEN, ClusterSecurity(TOKEN))


# ---------------------------------------------------------------------------------
# the attacker's capabilities, through the master RPC and the admin HTTP
# ---------------------------------------------------------------------------------

Attack = Callable[[Ctx], Any]


def _rpc(ctx: Ctx, request: msg.Request) -> Any:
    return ctx.attacker.call(request)


def _list_keys_rpc(ctx: Ctx) -> Any:
    found = _rpc(ctx, msg.GetReplicaListByRegex(".*"))
    assert KEY in found.replicas  # and every replica's segment name and address
    return found


def _read_replicas(ctx: Ctx) -> Any:
    reply = _rpc(ctx, msg.GetReplicaList(KEY))
    assert reply.size == len(VALUE)
    assert _rpc(ctx, msg.BatchGetReplicaList((KEY,))).columns.code == [0]  # (a columnar reply)
    assert _rpc(ctx, msg.ExistKey(KEY)).exists is True
    return reply


def _remove(ctx: Ctx) -> Any:
    _rpc(ctx, msg.Remove(KEY, force=True, client_id=ctx.attacker_id))
    assert not ctx.victim.exists(KEY)


def _remove_all(ctx: Ctx) -> Any:
    assert _rpc(ctx, msg.RemoveAll(force=True, client_id=ctx.attacker_id)).count == 1
    assert not ctx.victim.exists(KEY)


def _remove_by_regex(ctx: Ctx) -> Any:
    assert (
        _rpc(ctx, msg.RemoveByRegex("^victim/", force=True, client_id=ctx.attacker_id)).count == 1
    )
    assert not ctx.victim.exists(KEY)


def _upsert_over(ctx: Ctx) -> Any:
    reps = _rpc(ctx, msg.UpsertStart(ctx.attacker_id, KEY, 8))
    assert reps.replicas  # the attacker is handed the buffers to write
    _rpc(ctx, msg.UpsertEnd(ctx.attacker_id, KEY))
    assert ctx.victim.size_of(KEY) == 8  # the victim's value is replaced


def _mount_under_victims_name(ctx: Ctx) -> Any:
    fake = msg.SegmentParams(uuid.uuid4().hex, ctx.victim.hostname, 1 << 40, 16 * MiB)
    _rpc(ctx, msg.MountSegment(ctx.attacker_id, fake))
    # the master takes the attacker for the victim's restarted engine: the victim's
    # client is expired and its objects dropped
    assert not ctx.victim.exists(KEY)


def _reserve_pool(ctx: Ctx) -> Any:
    # never-finished puts hold the whole pool until put_start_release_timeout
    _rpc(ctx, msg.PutStart(ctx.attacker_id, "hog", 16 * MiB - 64 * 1024))
    with pytest.raises(StoreError) as info:
        ctx.victim.put("honest", b"z" * 256 * 1024)
    assert info.value.code == ErrorCode.NO_AVAILABLE_HANDLE


def _admin_listing(path: str) -> Attack:
    def attack(ctx: Ctx) -> Any:
        status, body = ctx.admin(path.format(key=KEY, segment=ctx.victim.hostname))
        if status == 401:
            raise AuthenticationError(body.decode())
        assert status == 200, body
        assert KEY.encode() in body or ctx.victim.hostname.encode() in body, body
        return body

    return attack


ATTACKS: dict[str, Attack] = {
    "list keys (RPC)": _list_keys_rpc,
    "list keys (admin /get_all_keys)": _admin_listing("/get_all_keys"),
    "list segments (admin /get_all_segments)": _admin_listing("/get_all_segments"),
    "list segments (admin /get_segments_detail)": _admin_listing("/get_segments_detail"),
    "query a segment (admin /query_segment)": _admin_listing("/query_segment?segment={segment}"),
    "read replicas (admin /query_key)": _admin_listing("/query_key?key={key}"),
    "read replicas (admin /batch_query_keys)": _admin_listing("/batch_query_keys?keys={key}"),
    "read replicas (RPC)": _read_replicas,
    "Remove": _remove,
    "RemoveAll": _remove_all,
    "RemoveByRegex": _remove_by_regex,
    "upsert over another client's key": _upsert_over,
    "mount under another node's name": _mount_under_victims_name,
    "reserve the pool with unfinished PutStarts": _reserve_pool,
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_without_the_token_every_capability_is_refused(secured: Ctx, name: str) -> None:
    with pytest.raises(AuthenticationError) as info:
        ATTACKS[name](secured)
    text = str(info.value)
    assert "PYMOONCAKE_CLUSTER_TOKEN" in text  # the refusal names the fix
    assert secured.victim_intact()


@pytest.mark.parametrize("name", list(ATTACKS))
def test_an_open_master_allows_it_documenting_the_open_default(open_master: Ctx, name: str) -> None:
    ATTACKS[name](open_master)


@pytest.mark.parametrize("name", ["Remove", "RemoveAll", "upsert over another client's key"])
def test_a_token_holder_is_trusted(insider: Ctx, name: str) -> None:
    ATTACKS[name](insider)


def test_the_open_endpoints_stay_open_with_a_token(secured: Ctx) -> None:
    for path in ("/metrics", "/metrics/summary", "/health"):
        status, _ = secured.admin(path)
        assert status == 200, path
    # and the token holder reads everything
    status, body = secured.admin("/get_all_keys", ClusterSecurity(TOKEN))
    assert status == 200 and KEY.encode() in body


# ---------------------------------------------------------------------------------
# the own-segment rule: with or without a token
# ---------------------------------------------------------------------------------


@pytest.fixture(params=["open", "token holder"])
def any_master(request: pytest.FixtureRequest) -> Iterator[Ctx]:
    if request.param == "open":
        yield from _ctx("", ClusterSecurity())
    else:
        yield from _ctx(TOKEN, ClusterSecurity(TOKEN))


def test_a_client_unmounts_only_its_own_segments(any_master: Ctx) -> None:
    ctx = any_master
    with pytest.raises(StoreError) as info:
        ctx.attacker.call(msg.UnmountSegment(ctx.attacker_id, ctx.segment.id))
    assert info.value.code == ErrorCode.SEGMENT_NOT_FOUND
    assert ctx.victim_intact()
    # the owner can
    ctx.victim.unmount(ctx.segment.id)
    assert ctx.cluster.master.call(lambda st: len(st.segments)) == 0


def test_client_ids_never_leak(any_master: Ctx) -> None:
    """A client id is the credential of its segments and puts: listings and error
    messages name clients by a digest, so nobody can act as another client."""
    ctx = any_master
    victim_id = ctx.victim.client_id
    sec = ClusterSecurity(TOKEN) if ctx.cluster.token else None
    seen: list[str] = []
    for path in ("/get_segments_detail", "/get_all_segments", "/metrics", "/metrics/summary"):
        status, body = ctx.admin(path, sec)
        assert status == 200
        seen.append(body.decode())
    assert client_tag(victim_id) in seen[0]
    # the victim is writing a key: another client's PutStart/PutEnd/mount are refused
    # without learning who
    ctx.victim.master.call(msg.PutStart(victim_id, "in-flight", 1024))
    for request in (
        msg.PutStart(ctx.attacker_id, "in-flight", 1024),
        msg.PutEnd(ctx.attacker_id, "in-flight"),
        msg.PutRevoke(ctx.attacker_id, "in-flight"),
        msg.UpsertStart(ctx.attacker_id, "in-flight", 1024),
        msg.MountSegment(ctx.attacker_id, ctx.segment.to_params()),
        msg.UnmountSegment(ctx.attacker_id, ctx.segment.id),
    ):
        with pytest.raises(StoreError) as info:
            ctx.attacker.call(request)
        seen.append(info.value.message)
    for text in seen:
        assert victim_id not in text
    ctx.victim.master.call(msg.PutRevoke(victim_id, "in-flight"))
    assert ctx.victim_intact()


# ---------------------------------------------------------------------------------
# the token end to end: store clients, TCP and UNIX, commands and fixtures
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_a_store_client_with_the_token_works_over_both_paths(transport: str) -> None:
    with LocalCluster(token=TOKEN) as cluster:
        engine = cluster.engine_config.replace(same_host_transport=transport == "unix")
        client = cluster.client(8 * MiB, 1 * MiB, prefault=False)
        reader = StoreClient(
            StoreClientConfig(
                "127.0.0.1",
                cluster.metadata_url,
                cluster.master_address,
                0,
                1 * MiB,
                engine=engine,
            )
        )
        try:
            assert reader.master.last_transport == transport
            assert reader.put("k", b"v" * 5000) is True
            assert client.get("k") == b"v" * 5000
            assert reader.get("k") == b"v" * 5000
        finally:
            reader.close()
        # no token, either path: refused with the reason, not a timeout
        bare = engine.replace(cluster_token="")
        with pytest.raises(AuthenticationError, match="PYMOONCAKE_CLUSTER_TOKEN"):
            StoreClient(
                StoreClientConfig(
                    "127.0.0.1", cluster.metadata_url, cluster.master_address, 0, 0, engine=bare
                )
            )


def test_process_cluster_with_a_token_file() -> None:
    """mooncake_master --cluster_token_file + mooncake_client with the token in its
    environment; in-process clients need the same token."""
    with ProcessCluster(token=TOKEN) as cluster:
        mode = stat.S_IMODE(os.stat(cluster.token_file).st_mode)
        assert mode == 0o600
        assert TOKEN not in " ".join(cluster.master.proc.args)
        _, segment = cluster.node("16 MB")
        engine = _engine(TOKEN)
        client = StoreClient(
            StoreClientConfig(
                "127.0.0.1", cluster.metadata_url, cluster.master_address, 0, 1 * MiB, engine=engine
            )
        )
        try:
            assert client.put("p", b"q" * 3000) is True
            assert client.replicas("p")[0].endpoint == segment  # stored on the node
            assert client.get("p") == b"q" * 3000
        finally:
            client.close()
        status, _ = http_request("GET", cluster.metrics_url + "/get_all_keys", context=ADMIN)
        assert status == 401
        status, body = http_request(
            "GET",
            cluster.metrics_url + "/get_all_keys",
            context=ADMIN,
            security=ClusterSecurity(TOKEN),
        )
        assert status == 200 and b"p\n" in body
        with pytest.raises(AuthenticationError):
            StoreClient(
                StoreClientConfig(
                    "127.0.0.1",
                    cluster.metadata_url,
                    cluster.master_address,
                    0,
                    0,
                    engine=_engine(""),
                )
            )


def _engine(token: str) -> EngineConfig:
    """Engine settings of a test client on 127.0.0.1 with ``token``."""
    return EngineConfig(
        tcp_bind_address="127.0.0.1",
        transfer_timeout_s=10.0,
        connect_timeout_s=2.0,
        rpc_io_timeout_s=5.0,
        cluster_token=token,
    )


def _master(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = console_command("mooncake_master", "pymooncake.cli.master")
    return subprocess.run(
        [*cmd, *args, "--port=0", "--metrics_port=0", "--rpc_address=127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **env},
    )


def test_master_refuses_unusable_token_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    other = tmp_path / "other"
    other.write_text(WRONG)
    for args, env, expected in (
        ([f"--cluster_token_file={tmp_path / 'missing'}"], {}, "cannot read it"),
        ([f"--cluster_token_file={empty}"], {}, "is empty"),
        ([f"--cluster_token_file={other}"], {"PYMOONCAKE_CLUSTER_TOKEN": TOKEN}, "different"),
    ):
        done = _master(args, env)
        assert done.returncode == 1, done.stderr
        assert expected in done.stderr
        assert WRONG not in done.stderr and TOKEN not in done.stderr  # never echoed


def _cluster_command(tmp_path: Path, *extra: str) -> subprocess.Popen[bytes]:
    cmd = console_command("pymooncake", "pymooncake.cli.main")
    env = {k: v for k, v in os.environ.items() if k != "PYMOONCAKE_CLUSTER_TOKEN"}
    env.update(XDG_RUNTIME_DIR=str(tmp_path), PYMOONCAKE_PREFAULT="0")
    return subprocess.Popen(
        [
            *cmd,
            "cluster",
            "--port=0",
            "--metadata-port=0",
            "--metrics-port=0",
            "--segment=16MB",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


def test_pymooncake_cluster_turns_authentication_on_and_prints_how(tmp_path: Path) -> None:
    proc = _cluster_command(tmp_path)
    try:
        lines = read_stdout_until(proc, re.compile("Press Ctrl-C"), timeout_s=60)
        text = "\n".join(lines)
        m = re.search(r"export PYMOONCAKE_CLUSTER_TOKEN=\$\(cat (\S+)\)", text)
        assert m, text
        token_file = Path(m.group(1))
        assert token_file.parent == tmp_path / "pymooncake"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 32 and token not in text  # printed: the file, never the secret
        master = re.search(r"master:\s+(\S+)", text)
        meta = re.search(r"metadata server:\s+(\S+)", text)
        assert master and meta
        engine = _engine(token)
        client = StoreClient(
            StoreClientConfig(
                "127.0.0.1", meta.group(1), master.group(1), 0, 1 * MiB, engine=engine
            )
        )
        try:
            assert client.put("from-outside", b"hello" * 10) is True
            assert client.get("from-outside") == b"hello" * 10
        finally:
            client.close()
        with pytest.raises(MooncakeError):  # the metadata server or the master refuses
            StoreClient(
                StoreClientConfig(
                    "127.0.0.1",
                    meta.group(1),
                    master.group(1),
                    0,
                    0,
                    engine=_engine(""),
                )
            )
    finally:
        _stop(proc)
    assert not token_file.exists()  # removed on exit


def test_pymooncake_cluster_insecure_is_open_and_says_so(tmp_path: Path) -> None:
    proc = _cluster_command(tmp_path, "--insecure")
    try:
        lines = read_stdout_until(proc, re.compile("Press Ctrl-C"), timeout_s=60)
        text = "\n".join(lines)
        assert "authentication:  OFF (--insecure)" in text
        assert "PYMOONCAKE_CLUSTER_TOKEN=" not in text
        assert not (tmp_path / "pymooncake").exists()
    finally:
        _stop(proc)


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip("abstract UNIX sockets and /proc are Linux-only")
