"""A missing etcd / redis-server / ip skips a test locally and fails it in CI."""

from __future__ import annotations

import pytest

from pymooncake.testing import _tools


def test_missing_tool_skips_locally_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_tools.shutil, "which", lambda name: None)
    monkeypatch.setattr(_tools, "_EXTRA_DIRS", ())
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install etcd-server"):
        _tools.require_tool("etcd", package="etcd-server")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        _tools.require_tool("etcd", package="etcd-server")
    # what no package can fix (e.g. not root) skips even under CI
    with pytest.raises(pytest.skip.Exception):
        _tools.unavailable("needs root", fail_in_ci=False)


def test_tools_in_sbin_are_found_without_it_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    found = _tools.find_tool("ip")
    if found is None:
        pytest.skip("ip is not installed here")
    assert found.endswith("/ip")
