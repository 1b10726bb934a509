"""Static checks as part of the suite: ruff on everything, mypy --strict on src/."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; install the test extra: pip install -e '.[test]'")
    return found


def test_ruff() -> None:
    proc = subprocess.run(
        [_tool("ruff"), "check", "src", "tests", "bench"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy_strict() -> None:
    proc = subprocess.run([_tool("mypy")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_wire_is_sans_io() -> None:
    forbidden = ("import socket", "import asyncio", "import threading", "import selectors")
    for path in (ROOT / "src" / "pymooncake" / "wire").glob("*.py"):
        text = path.read_text()
        for imp in forbidden:
            assert imp not in text, f"{path.name} must stay free of I/O ({imp})"
