"""Throwaway certificates for tests of the TLS paths (made with the ``openssl``
command: a CA and one node certificate it signed, EC P-256, valid two days)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["TestPki", "make_test_pki"]


@dataclass(frozen=True)
class TestPki:
    """Paths of a test CA and of a node certificate and key it signed."""

    __test__ = False  # not a pytest test class

    ca: Path
    cert: Path
    key: Path

    def env(self, token: str = "") -> dict[str, str]:
        """The ``PYMOONCAKE_TLS_*`` variables (and the cluster token, if given)."""
        out = {
            "PYMOONCAKE_TLS_CERT": str(self.cert),
            "PYMOONCAKE_TLS_KEY": str(self.key),
            "PYMOONCAKE_TLS_CA": str(self.ca),
        }
        if token:
            out["PYMOONCAKE_CLUSTER_TOKEN"] = token
        return out


def make_test_pki(directory: Path) -> TestPki:
    """Make ``ca.pem``/``ca.key`` and ``node.pem``/``node.key`` in ``directory``.

    Raises:
        FileNotFoundError: no ``openssl`` command (callers skip their test).
        subprocess.CalledProcessError: openssl failed.
    """

    def openssl(*args: str) -> None:
        subprocess.run(
            ["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60
        )

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=pymooncake-test-ca")  # fmt: skip
    openssl("req", "-new", *ec, "-keyout", "node.key", "-out", "node.csr", "-subj", "/CN=node")
    openssl("x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "node.pem", "-days", "2")  # fmt: skip
    return TestPki(ca=directory / "ca.pem", cert=directory / "node.pem", key=directory / "node.key")
