"""The doctor with a peer on "another host": a process in a network namespace
joined to this one by a veth pair (root only; skipped otherwise).

* a loopback local_hostname with a peer in the namespace fails, this host's
  veth address passes;
* an HTTP metadata server bound to 127.0.0.1, seen from the namespace, is
  refused (and from here, the exposure check says "loopback only"); bound to
  0.0.0.0 it answers both.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator

import pytest
from ops_netns import NetNs, netns

from pymooncake.config import EngineConfig
from pymooncake.ops import DoctorInputs, Status, SystemProbes, run_doctor
from pymooncake.testing import console_command, read_stdout_until
from pymooncake.transfer.metadata.server import MetadataServer

TARGET_READY = re.compile(r"Transfer Engine target ready: segment (\S+),")
RANGE = EngineConfig(rpc_port_min=31000, rpc_port_max=31050)


@pytest.fixture
def ns() -> Iterator[NetNs]:
    with netns() as n:
        yield n


def test_loopback_name_with_a_peer_in_another_namespace(ns: NetNs) -> None:
    argv = console_command("transfer_engine_bench", "pymooncake.cli.transfer_engine_bench")
    argv += ["--mode", "target", "--local_server_name", ns.ns_ip, "--buffer_size", "65536"]
    with subprocess.Popen(ns.argv(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE) as target:
        try:
            match = TARGET_READY.match(read_stdout_until(target, TARGET_READY, 30)[-1])
            assert match is not None
            segment = match.group(1)
            bad = run_doctor(
                DoctorInputs(
                    local_hostname="127.0.0.1",
                    metadata_server="P2PHANDSHAKE",
                    peers=(segment,),
                    engine=RANGE,
                ),
                SystemProbes(),
            )
            peer = bad.by_check(f"peer:{segment}")
            assert peer.status is Status.PASS, peer  # reachable from here...
            name = bad.by_check("local_hostname")
            assert name.status is Status.FAIL  # ...but it cannot reach us back
            assert "resolves to the loopback address 127.0.0.1" in name.reason
            assert segment in name.reason and ns.host_ip in name.fix
            good = run_doctor(
                DoctorInputs(
                    local_hostname=ns.host_ip,
                    metadata_server="P2PHANDSHAKE",
                    peers=(segment,),
                    engine=RANGE,
                ),
                SystemProbes(),
            )
            assert good.by_check("local_hostname").status is Status.PASS
            assert good.ok, good.format_text()
        finally:
            target.terminate()
            target.communicate(timeout=30)


def _doctor_in(ns: NetNs, url: str) -> dict[str, dict[str, str]]:
    proc = ns.python(
        "-m",
        "pymooncake.cli.main",
        "doctor",
        "--local-hostname",
        ns.ns_ip,
        "--metadata-server",
        url,
        "--json",
        "--timeout",
        "3",
    )
    assert proc.stdout, proc.stderr
    return {c["check"]: c for c in json.loads(proc.stdout)["checks"]}


@pytest.mark.parametrize("bind", ["127.0.0.1", "0.0.0.0"])
def test_metadata_server_bound_to_loopback_seen_from_another_namespace(
    ns: NetNs, bind: str
) -> None:
    server = MetadataServer()
    with server.serve(bind, 0) as http:
        port = http.port
        seen_from_peer = _doctor_in(ns, f"http://{ns.host_ip}:{port}/metadata")
        here = run_doctor(
            DoctorInputs(
                local_hostname=ns.host_ip,
                metadata_server=f"http://127.0.0.1:{port}/metadata",
                remote_peers=True,
                engine=RANGE,
            ),
            SystemProbes(),
        )
    exposure = here.by_check("metadata_exposure")
    if bind == "127.0.0.1":
        assert seen_from_peer["metadata_server"]["status"] == "FAIL"
        assert (
            f"connection refused by {ns.host_ip}:{port}"
            in seen_from_peer["metadata_server"]["reason"]
        )
        assert "--host 0.0.0.0" in seen_from_peer["metadata_server"]["fix"]
        assert exposure.status is Status.FAIL
        assert "answers on loopback only" in exposure.reason
        assert f"{ns.host_ip}:{port}" in exposure.reason
    else:
        assert seen_from_peer["metadata_server"]["status"] == "PASS"
        assert exposure.status is Status.PASS
        assert "peers on other hosts can use" in exposure.reason
