"""Fixtures for the interop tests: the reference virtual environment, reference
peers, metadata servers, and reference/pymooncake engine pairs.

The reference engine (PyPI ``mooncake-transfer-engine-non-cuda``) lives in its
own virtual environment, ``.cache/refvenv`` in the repository (built on first
use, reused afterwards), or the interpreter named by ``PYMOONCAKE_REF_PYTHON``.
When it cannot be had, the tests are skipped -- or, when ``CI`` is set, fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import pytest
from interop_support import (
    REF_PACKAGE,
    REF_PACKAGE_VERSION,
    REPO_ROOT,
    MetadataServerProc,
    Mode,
    Pair,
    RefPeer,
    metadata_string,
    open_pair,
    start_metadata_server,
)

REF_VENV = REPO_ROOT / ".cache" / "refvenv"
#: Debian packages the reference wheel links against
REF_SYSTEM_PACKAGES = "libibverbs1 librdmacm1 libnuma1"
IMPORT_TIMEOUT_S = 120
VENV_TIMEOUT_S = 120
PIP_TIMEOUT_S = 600


def _unavailable(reason: str) -> None:
    message = f"reference engine unavailable: {reason}"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI is set, so this is an error, not a skip)", pytrace=False)
    pytest.skip(message)


def _clean_env() -> dict[str, str]:
    # PYTHONPATH could put our own ``mooncake`` package in front of the reference's
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}


#: the reference's mooncake.engine is a C++ extension; ours (the compat package,
#: also named ``mooncake``) is pure Python and must not pass for it
_REF_IMPORT_CHECK = (
    "import mooncake.engine as e, sys; "
    "sys.exit(0 if e.__file__.endswith(('.so', '.pyd')) else "
    "'mooncake.engine at ' + e.__file__ + ' is not the reference extension module')"
)


def _import_error(python: str) -> str | None:
    """None if ``python`` can import the reference's ``mooncake.engine``, else why not."""
    try:
        proc = subprocess.run(
            [python, "-c", _REF_IMPORT_CHECK],
            capture_output=True,
            timeout=IMPORT_TIMEOUT_S,
            env=_clean_env(),
            cwd="/",
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{python} -c 'import mooncake.engine' could not run: {exc}"
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-5:]
        hint = ""
        if any(".so" in line for line in err):
            hint = f" (missing shared libraries? apt-get install {REF_SYSTEM_PACKAGES})"
        return f"{python} cannot import mooncake.engine{hint}: " + " | ".join(err)
    return None


def _run_step(argv: list[str], timeout_s: float) -> str | None:
    try:
        proc = subprocess.run(
            argv, capture_output=True, timeout=timeout_s, env=_clean_env(), check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{' '.join(argv)} failed: {exc}"
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).decode("utf-8", "replace").strip().splitlines()[-8:]
        return f"{' '.join(argv)} exited with {proc.returncode}: " + " | ".join(out)
    return None


def _build_ref_venv() -> tuple[str | None, str]:
    """Create ``.cache/refvenv`` with the reference wheel; (python, '') or (None, why)."""
    python = REF_VENV / "bin" / "python"
    if python.exists() and _import_error(str(python)) is None:
        return str(python), ""
    if REF_VENV.exists():
        shutil.rmtree(REF_VENV)
    REF_VENV.parent.mkdir(parents=True, exist_ok=True)
    base = shutil.which("python3") or sys.executable
    err = _run_step([base, "-m", "venv", str(REF_VENV)], VENV_TIMEOUT_S)
    if err is None:
        err = _run_step(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--quiet",
                f"{REF_PACKAGE}=={REF_PACKAGE_VERSION}",
            ],
            PIP_TIMEOUT_S,
        )
    if err is None:
        err = _import_error(str(python))
    if err is not None:
        return None, err
    return str(python), ""


_resolved: list[tuple[str | None, str]] = []


def _resolve_ref_python() -> tuple[str | None, str]:
    """(interpreter, "") or (None, why not); computed once per session."""
    if not _resolved:
        explicit = os.environ.get("PYMOONCAKE_REF_PYTHON")
        if explicit:
            explicit = os.path.abspath(shutil.which(explicit) or explicit)
            err = _import_error(explicit)
            _resolved.append(
                (None, f"PYMOONCAKE_REF_PYTHON={explicit}: {err}") if err else (explicit, "")
            )
        else:
            python, why = _build_ref_venv()
            _resolved.append(
                (python, "") if python else (None, f"could not build {REF_VENV}: {why}")
            )
    return _resolved[0]


def pytest_collection_finish(session: pytest.Session) -> None:
    """Prepare the reference environment before any test runs, outside the
    per-test timeout (a first ``pip install`` may take minutes)."""
    if session.config.option.collectonly:
        return
    if not any(item.get_closest_marker("interop") for item in session.items):
        return
    if not os.environ.get("PYMOONCAKE_REF_PYTHON") and not (REF_VENV / "bin" / "python").exists():
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                f"interop: creating {REF_VENV} with {REF_PACKAGE}=={REF_PACKAGE_VERSION} "
                f"(once; pip may take up to {PIP_TIMEOUT_S} s)"
            )
    _resolve_ref_python()


@pytest.fixture(scope="session")
def ref_python() -> str:
    """An interpreter that imports the reference ``mooncake.engine``."""
    python, why = _resolve_ref_python()
    if python is None:
        _unavailable(why)
    assert python is not None
    return python


# ---------------------------------------------------------------------------------
# failure reports show what the reference said
# ---------------------------------------------------------------------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed:
        for peer in list(RefPeer.live):
            report.sections.append(
                (f"reference peer {peer.label} stderr (tail)", peer.stderr_tail())
            )


# ---------------------------------------------------------------------------------
# factories
# ---------------------------------------------------------------------------------


def _open_fds() -> set[tuple[int, str]]:
    """(fd, what it points to) of this process; sockets and pipes name their inode,
    so a number reused for something new counts as new."""
    out = set()
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:  # not Linux
        return out
    for name in names:
        try:
            out.add((int(name), os.readlink(f"/proc/self/fd/{name}")))
        except OSError:  # closed meanwhile (the listing's own descriptor)
            pass
    return out


@pytest.fixture(scope="module", autouse=True)
def _no_leaks_per_module() -> Iterator[None]:
    """Every engine, peer and server a module starts is gone when it ends.

    (tests/conftest.py checks each test; interop tests share module-scoped
    engines and processes, so they are checked per module instead.)
    """
    threads_before = set(threading.enumerate())
    fds_before = _open_fds()
    yield
    deadline = time.monotonic() + 5.0
    threads: list[threading.Thread] = []
    fds: set[tuple[int, str]] = set()
    for _ in range(500):
        threads = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        fds = _open_fds() - fds_before
        if (not threads and not fds) or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert not threads, f"threads left behind: {threads}"
    assert not fds, f"file descriptors left open: {sorted(fds)}"
    assert not RefPeer.live, f"reference peers left running: {RefPeer.live}"


@pytest.fixture(scope="module")
def metadata_servers(
    ref_python: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str], MetadataServerProc]]:
    """``get(kind)``: our (``"ours"``) or the reference's (``"reference"``) HTTP
    metadata server, started on first use and stopped after the module."""
    log_dir = tmp_path_factory.mktemp("metadata")
    servers: dict[str, MetadataServerProc] = {}

    def get(kind: str) -> MetadataServerProc:
        if kind not in servers:
            servers[kind] = start_metadata_server(kind, ref_python, log_dir / f"{kind}.stderr")
        return servers[kind]

    try:
        yield get
    finally:
        for server in servers.values():
            server.close()


@pytest.fixture(scope="module")
def ref_peers(
    ref_python: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., RefPeer]]:
    """``spawn(label, env=None)``: a fresh reference peer, killed after the module."""
    log_dir = tmp_path_factory.mktemp("refpeers")
    peers: list[RefPeer] = []

    def spawn(label: str, env: dict[str, str] | None = None) -> RefPeer:
        peer = RefPeer(ref_python, label, log_dir / f"{label}-{len(peers)}.stderr", env)
        peers.append(peer)
        return peer

    try:
        yield spawn
    finally:
        for peer in peers:
            peer.close()


@pytest.fixture(scope="module")
def pair_factory(
    ref_python: str,
    tmp_path_factory: pytest.TempPathFactory,
    metadata_servers: Callable[[str], MetadataServerProc],
) -> Callable[[Mode], AbstractContextManager[Pair]]:
    """``with make(mode) as pair``: a reference/pymooncake :class:`Pair`."""
    log_dir = tmp_path_factory.mktemp("pairs")
    count = 0

    def make(mode: Mode) -> AbstractContextManager[Pair]:
        nonlocal count
        count += 1
        servers = {}
        if not mode.p2p:
            kind = "ours" if mode.metadata == "http-ours" else "reference"
            servers[kind] = metadata_servers(kind)
        return open_pair(
            mode, metadata_string(mode, servers), ref_python, log_dir, f"{mode}-{count}"
        )

    return make


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test module's ``MODES`` list parametrizes its ``pair`` fixture: one pair
    per mode, shared by the module's tests."""
    modes = getattr(metafunc.module, "MODES", None)
    if modes is not None and "pair" in metafunc.fixturenames:
        metafunc.parametrize("pair", modes, indirect=True, ids=str, scope="module")


@pytest.fixture(scope="module")
def pair(
    request: pytest.FixtureRequest, pair_factory: Callable[[Mode], AbstractContextManager[Pair]]
) -> Iterator[Pair]:
    """A reference/pymooncake pair in the mode the module's ``MODES`` gives
    (P2PHANDSHAKE over TCP v2 where the module has none)."""
    with pair_factory(getattr(request, "param", Mode("p2p"))) as p:
        yield p
