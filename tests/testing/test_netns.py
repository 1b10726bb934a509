"""The multi-host helper: namespaces on a bridge that reach each other and the
test process, links that can be cut, and nothing left behind -- not after a
failing test, not after a killed test run."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable

import pytest

from pymooncake.testing import NetnsNetwork, cleanup_stale
from pymooncake.testing._netns import STATE_DIR
from pymooncake.testing._tools import find_tool
from pymooncake.testing.fixtures import require_netns

CONNECT = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket()
    s.settimeout(float(sys.argv[3]))
    try:
        s.connect((sys.argv[1], int(sys.argv[2])))
        s.sendall(b"hello from " + sys.argv[4].encode())
        print("connected")
    except OSError as exc:
        print(type(exc).__name__)
    """
)


def _namespaces() -> set[str]:
    out = subprocess.run(
        [find_tool("ip") or "ip", "netns", "list"], capture_output=True, check=False
    ).stdout.decode()
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _links() -> str:
    return subprocess.run(
        [find_tool("ip") or "ip", "-o", "link"], capture_output=True, check=False
    ).stdout.decode()


def test_hosts_reach_the_test_process_and_each_other(
    netns: Callable[[int], NetnsNetwork],
) -> None:
    net = netns(2)
    a, b = net.hosts
    assert {a.address, b.address, net.gateway} <= {str(h) for h in net.subnet.hosts()}
    assert len({a.address, b.address, net.gateway}) == 3
    # the test process listens on the bridge address: a namespace connects to it
    with socket.socket() as srv:
        srv.bind((net.gateway, 0))
        srv.listen(1)
        srv.settimeout(10)
        port = srv.getsockname()[1]
        proc = a.popen(
            [sys.executable, "-c", CONNECT, net.gateway, str(port), "5", a.netns],
            stdout=subprocess.PIPE,
        )
        conn, peer = srv.accept()
        with conn:
            assert conn.recv(100) == f"hello from {a.netns}".encode()
        assert peer[0] == a.address
        assert proc.communicate(timeout=10)[0].strip() == b"connected"
    # namespace to namespace: b listens, a connects
    server = b.popen(
        [
            sys.executable,
            "-c",
            "import socket,sys;s=socket.socket();s.bind((sys.argv[1],7000));s.listen(1);"
            "print('ready',flush=True);c,_=s.accept();print(c.recv(100).decode(),flush=True)",
            b.address,
        ],
        stdout=subprocess.PIPE,
    )
    assert server.stdout is not None and server.stdout.readline().strip() == b"ready"
    out = a.run([sys.executable, "-c", CONNECT, b.address, "7000", "5", "a"]).stdout
    assert out.strip() == b"connected"
    assert server.communicate(timeout=10)[0].strip() == b"hello from a"


def test_loopback_of_one_host_is_not_another_hosts(netns: Callable[[int], NetnsNetwork]) -> None:
    """What makes the "etcd bound to 127.0.0.1" case real: the test process's
    127.0.0.1 is not reachable as the gateway address from a namespace."""
    net = netns(1)
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        out = net.hosts[0].run([sys.executable, "-c", CONNECT, net.gateway, str(port), "5", "x"])
    assert out.stdout.strip() == b"ConnectionRefusedError"


def test_fixed_service_ports_are_never_an_outgoing_connections(
    netns: Callable[[int], NetnsNetwork],
) -> None:
    """Inside each host the master and dummy-client ports (50051-50060) are
    reserved: the kernel does not give them to outgoing connections, which
    could otherwise take one before a storage node binds it; the test process's
    own namespace is left as it was."""
    net = netns(1)
    got = net.hosts[0].run(["cat", "/proc/sys/net/ipv4/ip_local_reserved_ports"])
    assert got.stdout.decode().strip() == "50051-50060"
    with open("/proc/sys/net/ipv4/ip_local_reserved_ports") as f:
        assert "50051" not in f.read()


def test_a_cut_link_drops_packets_until_reconnected(netns: Callable[[int], NetnsNetwork]) -> None:
    net = netns(1)
    host = net.hosts[0]
    with socket.socket() as srv:
        srv.bind((net.gateway, 0))
        srv.listen(4)
        port = srv.getsockname()[1]
        host.disconnect()
        out = host.run([sys.executable, "-c", CONNECT, net.gateway, str(port), "1", "x"])
        assert out.stdout.strip() in (b"TimeoutError", b"OSError")
        host.reconnect()
        net.wait_reachable()
        out = host.run([sys.executable, "-c", CONNECT, net.gateway, str(port), "5", "x"])
        assert out.stdout.strip() == b"connected"


def test_everything_is_removed_even_when_the_test_fails() -> None:
    require_netns()
    names: list[str] = []
    with pytest.raises(RuntimeError, match="boom"), NetnsNetwork(2) as net:
        names = [h.netns for h in net.hosts]
        sleeper = net.hosts[0].popen(["sleep", "600"])
        assert names[0] in _namespaces()
        raise RuntimeError("boom")
    assert sleeper.poll() == -signal.SIGKILL
    assert not set(names) & _namespaces()
    assert net.bridge not in _links() and net.tag not in _links()


def test_two_networks_get_different_subnets() -> None:
    require_netns()
    with NetnsNetwork(1) as one, NetnsNetwork(1) as two:
        assert not one.subnet.overlaps(two.subnet)


def test_leftovers_of_a_killed_run_are_cleaned_up() -> None:
    require_netns()
    script = textwrap.dedent(
        """
        import json, time
        from pymooncake.testing import NetnsNetwork
        net = NetnsNetwork(1)
        print(json.dumps({"tag": net.tag, "netns": net.hosts[0].netns}), flush=True)
        time.sleep(600)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
    finally:
        proc.kill()  # a test run killed before it could clean up
        proc.communicate(timeout=10)
    assert info["netns"] in _namespaces()
    # (cleanup_stale logs what it could not remove: pytest shows it on failure)
    assert info["tag"] in cleanup_stale(), sorted(p.name for p in STATE_DIR.glob("*"))
    assert info["netns"] not in _namespaces() and info["tag"] not in _links()
