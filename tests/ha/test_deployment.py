"""The README's "Deployment on several hosts", run as written, one namespace per host.

The commands are read from README.md (the ``bash`` and ``python`` blocks of that
section), so the README cannot drift from what works.  Each paragraph of the
``bash`` block starts with a comment naming the host(s) it runs on ("on
10.0.0.11 and on 10.0.0.12"); every example address 10.0.0.x becomes one
namespace host of a private bridge.  What differs from a real deployment, and
why: ``--ha_lease_ttl_sec=5`` runs as 2 (a shorter test), the etcd data
directory is a temporary one, ``python3`` is this interpreter, ``curl`` is done
with urllib (from the root namespace, a host on the same bridge), and every
process runs with ``PYMOONCAKE_SAME_HOST=0`` (the namespaces share one kernel,
real hosts do not).  After the steps, the failover the section describes: kill
the leading master, the standby serves within two lease periods, the client
reads what it stored before, the old master restarted rejoins as a standby.

Needs root and iproute2 (skipped otherwise) and etcd (Debian etcd-server).
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pymooncake.testing import Host, NetnsNetwork, require_tool
from pymooncake.testing._cluster import NodeProcess, _spawn

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Deployment on several hosts"
EXAMPLE_IP = re.compile(r"\b10\.0\.0\.\d{1,3}\b")
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")
TTL = 2
#: the README's lease TTL, shortened for the test
README_TTL_FLAG = "--ha_lease_ttl_sec=5"
ENV = {"PYMOONCAKE_SAME_HOST": "0"}
#: admin and etcd requests never go through an http_proxy from the environment
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Step:
    """One paragraph of the README's bash block."""

    comment: str
    command: str
    hosts: list[str] = field(default_factory=list)  # example addresses it runs on

    @property
    def program(self) -> str:
        """The command's program (after any ``NAME=value`` assignments)."""
        return next(w for w in shlex.split(self.command) if not ENV_ASSIGNMENT.match(w))


def readme_steps() -> tuple[list[Step], str, list[str]]:
    """The bash steps, the python block and every example address (in order)."""
    text = README.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start : end if end >= 0 else len(text)]
    bash = re.search(r"```bash\n(.*?)```", section, re.S)
    python = re.search(r"```python\n(.*?)```", section, re.S)
    assert bash and python, "the README section lost its bash or python block"
    steps = []
    for para in bash.group(1).strip().split("\n\n"):
        lines = para.strip().splitlines()
        assert lines[0].startswith("#"), f"a README step needs a comment first: {para!r}"
        comment = lines[0]
        command = " ".join(ln.rstrip("\\").strip() for ln in lines[1:] if ln.strip())
        steps.append(Step(comment, command, EXAMPLE_IP.findall(comment)))
    addresses = list(dict.fromkeys(EXAMPLE_IP.findall(section)))
    return steps, python.group(1), addresses


def _get(url: str, timeout_s: float = 2.0) -> str:
    with _OPENER.open(url, timeout=timeout_s) as resp:
        return str(resp.read().decode())


def _etcd_healthy(url: str) -> bool:
    return '"health":"true"' in _get(url)


def _wait(cond: Callable[[], bool], timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        try:
            if cond():
                return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout_s:g} s")


class Deployment:
    """Runs the README's steps on the namespace hosts."""

    def __init__(self, net: NetnsNetwork, addresses: list[str], workdir: Path) -> None:
        self.net = net
        self.hosts = dict(zip(addresses, net.hosts, strict=False))
        self.workdir = workdir
        self.nodes: list[NodeProcess] = []
        #: example address of a master -> (its process, its step)
        self.masters: dict[str, tuple[NodeProcess, Step]] = {}
        self.role_urls: list[str] = []

    def translate(self, step: Step, on: str) -> str:
        """The step's command for the host ``on`` with this network's addresses."""
        text = step.command
        if on and step.hosts and on != step.hosts[0]:  # "each with its own address"
            text = re.sub(rf"\b{re.escape(step.hosts[0])}\b", on, text)
        text = EXAMPLE_IP.sub(lambda m: self.hosts[m.group(0)].address, text)
        text = text.replace(README_TTL_FLAG, f"--ha_lease_ttl_sec={TTL}")
        return text.replace("/var/lib/mooncake-etcd", str(self.workdir / "etcd"))

    def run_step(self, step: Step) -> list[str]:
        """Start (or run) the step on each of its hosts; returns what short-lived
        commands printed."""
        printed = []
        for on in step.hosts or [""]:
            words = shlex.split(self.translate(step, on))
            env = dict(ENV)
            while ENV_ASSIGNMENT.match(words[0]):
                name, _, value = words.pop(0).partition("=")
                env[name] = value
            program, args = words[0], words[1:]
            if program == "curl":  # done by the caller, from the root namespace
                self.role_urls = [a for a in args if a.startswith("http")]
                continue
            host = self.hosts[on]
            if program == "etcd":
                node = self._start(host, [require_tool("etcd", package="etcd-server"), *args], env)
                advertised = args[args.index("--advertise-client-urls") + 1]
                health = f"{advertised.split(',')[0]}/health"
                _wait(functools.partial(_etcd_healthy, health), 30, "etcd healthy")
            elif program == "mooncake_master":
                node = self._start(host, ["-m", "pymooncake.cli.master", *args], env)
                node.wait_for(r"Master service started on", timeout_s=60)
                self.masters[on] = (node, step)
            elif program == "mooncake_client":
                node = self._start(host, ["-m", "pymooncake.cli.store_client", *args], env)
                node.wait_for(r"mooncake_client ready: segment", timeout_s=60)
            elif program == "python3":
                script = [str(self.workdir / a) if a.endswith(".py") else a for a in args]
                done = host.run([sys.executable, *script], env={**os.environ, **env}, timeout_s=120)
                out = done.stdout.decode(errors="replace") + done.stderr.decode(errors="replace")
                assert done.returncode == 0, f"{step.command} on {on} failed:\n{out}"
                printed.append(done.stdout.decode(errors="replace"))
            else:
                raise AssertionError(f"the test does not know how to run {program!r}")
        return printed

    def _start(self, host: Host, args: list[str], env: dict[str, str]) -> NodeProcess:
        if args[0] != "-m":  # not Python: drop the interpreter _spawn puts first
            node = _spawn(args[0], args[1:], env, lambda argv: host.command([args[0], *argv[1:]]))
        else:
            node = _spawn(f"{args[1]}@{host.address}", args, env, host.command)
        self.nodes.append(node)
        return node

    def roles(self) -> list[str]:
        return [_get(url) for url in self.role_urls]

    def role_of(self, master: str) -> str:
        """``/role`` of the master on example address ``master``."""
        address = self.hosts[master].address
        return _get(next(u for u in self.role_urls if f"//{address}:" in u))

    def close(self) -> None:
        for node in reversed(self.nodes):
            node.stop()


def test_the_readme_deployment_runs_and_fails_over(
    netns: Callable[[int], NetnsNetwork], tmp_path: Path
) -> None:
    require_tool("etcd", package="etcd-server")
    steps, client_py, addresses = readme_steps()
    programs = [s.program for s in steps]
    assert [p for p in programs if p != "curl"] == [
        "etcd",
        "mooncake_master",
        "mooncake_client",
        "python3",
    ], programs
    net = netns(len(addresses))
    dep = Deployment(net, addresses, tmp_path)
    # the client script with this network's addresses
    (tmp_path / "client.py").write_text(
        EXAMPLE_IP.sub(lambda m: dep.hosts[m.group(0)].address, client_py)
    )
    try:
        client_output = []
        for step in steps:
            if step.program == "curl":
                dep.run_step(step)
                # the check: one leader, one standby (once the winner's warm-up is over)
                _wait(lambda: sorted(dep.roles()) == ["leader", "standby"], 10 * TTL, "roles")
            else:
                client_output += dep.run_step(step)
        assert client_output == ["b'hello'\n"]

        # kill the leading master: the standby serves within two lease periods
        leader = next(m for m in dep.masters if dep.role_of(m) == "leader")
        other = next(m for m in dep.masters if m != leader)
        node, master_step = dep.masters[leader]
        node.kill()
        took = _wait(lambda: dep.role_of(other) == "leader", 10 * TTL, "failover")
        # 2 lease periods, + etcd's 0.5 s lease-expiry check, + scheduling
        assert took < 2 * TTL + 1.0, f"the standby served {took:.2f} s after the kill"
        # the object the client stored before is there, through the new leader
        client_step = next(s for s in steps if s.program == "python3")
        assert dep.run_step(client_step) == ["b'hello'\n"]
        # the old master, started again with the same command, rejoins as a standby
        again = Step(master_step.comment, master_step.command, [leader])
        dep.run_step(again)
        _wait(lambda: dep.role_of(leader) == "standby", 10 * TTL, "the old master rejoining")
        assert sorted(dep.roles()) == ["leader", "standby"]
        print(f"\nREADME deployment: failover after SIGKILL of the leader took {took:.2f} s")
    finally:
        dep.close()
