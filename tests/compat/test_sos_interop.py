"""Structured objects and DataProtos written by either implementation read on the other.

``sos_ref_script.py`` runs the reference wheel's
``mooncake.structured_object_store`` (numpy/msgpack/torch borrowed from this
venv) over a dict-backed store; the same script's functions run here with
pymooncake's module.  Each side writes the same DataProto (every field kind
and codec family, a second stage appended) and object, and each side reads
both stores: the four reads must be identical, and so must the column codecs
and payload specs each side chose (the manifest view).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import subprocess
import sysconfig
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("msgpack")

from test_tensor_interop import ref_python

import mooncake.structured_object_store as sos

pytestmark = pytest.mark.interop

SCRIPT = Path(__file__).with_name("sos_ref_script.py")


def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("sos_ref_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_ref(*args: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    out = subprocess.run(
        [ref_python(), str(SCRIPT), sysconfig.get_paths()["purelib"], *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 0 and "done" in out.stdout, out.stderr[-3000:]


def test_dataprotos_and_objects_read_both_ways(tmp_path: Path) -> None:
    helper = script()
    run_ref(str(tmp_path), "write")
    helper.write(sos, tmp_path, "ours")
    run_ref(str(tmp_path), "read", "ours")
    run_ref(str(tmp_path), "read", "ref")

    def ours_reading(side: str) -> Any:
        objects = pickle.loads((tmp_path / f"{side}_store.pkl").read_bytes())
        refs = json.loads((tmp_path / f"{side}_refs.json").read_text())
        return helper.read_all(sos, objects, refs)

    reads = {
        "ref reads ref": pickle.loads((tmp_path / "ref_reads_ref.pkl").read_bytes()),
        "ref reads ours": pickle.loads((tmp_path / "ref_reads_ours.pkl").read_bytes()),
        "ours reads ref": ours_reading("ref"),
        "ours reads ours": ours_reading("ours"),
    }
    baseline = reads["ref reads ref"]
    for name, value in reads.items():
        for part in baseline:
            assert value[part] == baseline[part], f"{name}: {part}"
    # sanity: the reads hold the data written
    full = reads["ours reads ours"]["full"]
    assert full["meta_info"] == {"step": 3, "tags": ["a"]}
    assert full["non_tensor_batch"]["uid"] == ("objarray", ["a", "bé", "c", ""])
    assert set(full["batch"]) == {"input_ids", "mask", "scores", "jagged", "rewards"}


def test_stored_keys_have_the_same_layout(tmp_path: Path) -> None:
    """Both sides make the same objects: same key suffixes and sizes."""
    helper = script()
    run_ref(str(tmp_path), "write")
    helper.write(sos, tmp_path, "ours")

    def layout(side: str) -> list[tuple[str, int]]:
        objects: dict[str, bytes] = pickle.loads((tmp_path / f"{side}_store.pkl").read_bytes())
        out = []
        for key, value in objects.items():
            parts = key.split("/")  # interop/<partition>/<uuid>/...
            rest = "/".join(parts[3:])
            size = -1 if rest in ("manifest", "meta") else len(value)  # JSON holds uuids
            out.append((rest, size))
        return sorted(out)

    assert layout("ours") == layout("ref")
