"""``mooncake.dataproto_catalog.DataProtoCatalog``: rows, tags and field fragments."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("msgpack")

from mooncake.dataproto_catalog import DataProtoCatalog
from mooncake.structured_object_store import (
    MooncakeBundleTransfer,
    export_dataproto_ref,
)

sys.path.insert(0, str(Path(__file__).parent))
from sos_ref_script import DictStore


@pytest.fixture
def transfer() -> MooncakeBundleTransfer:
    return MooncakeBundleTransfer(DictStore(), key_prefix="cat")


def fragment(transfer: MooncakeBundleTransfer, rows: int, **fields: Any) -> dict[str, Any]:
    ref = transfer.put_dataproto({"batch": fields}, stage="s")
    assert ref.batch_size == rows
    return export_dataproto_ref(ref)


def test_rows_fields_and_groups(transfer: MooncakeBundleTransfer) -> None:
    catalog = DataProtoCatalog()
    prompts = fragment(transfer, 3, prompt=np.arange(3), mask=np.ones(3))
    out = catalog.update("p", ["a", "b", "c"], tags=[{"i": 0}, {"i": 1}, {"i": 2}], handle=prompts)
    assert out == {
        "keys": ["a", "b", "c"],
        "tags": [{"i": 0}, {"i": 1}, {"i": 2}],
        "fields": ["prompt", "mask"],
    }
    # a later fragment holds responses for two of the rows, in another order
    responses = fragment(transfer, 2, response=np.asarray([20, 10]))
    catalog.update("p", ["c", "a"], tags=[{"done": True}, {"done": True}], handle=responses)
    assert catalog.list("p") == {
        "p": {"a": {"i": 0, "done": True}, "b": {"i": 1}, "c": {"i": 2, "done": True}}
    }
    plan = catalog.resolve("p", ["a", "c"])
    assert plan["fields"] == ["prompt", "mask", "response"]
    prompt_id = prompts["stage_refs"]["s"]["manifest_key"]
    response_id = responses["stage_refs"]["s"]["manifest_key"]
    assert plan["field_groups"] == [
        {"fields": ["prompt", "mask"], "locations": [(prompt_id, 0), (prompt_id, 2)]},
        {"fields": ["response"], "locations": [(response_id, 1), (response_id, 0)]},
    ]
    assert set(plan["handles"]) == {prompt_id, response_id}
    # each group is one indexed read of its fragment
    for group in plan["field_groups"]:
        fid = group["locations"][0][0]
        rows = [row for _f, row in group["locations"]]
        got = transfer.get_dataproto(plan["handles"][fid], fields=group["fields"], rows=rows)
        if "response" in group["fields"]:
            assert got["batch"]["response"].tolist() == [10, 20]
        else:
            assert got["batch"]["prompt"].tolist() == [0, 2]
    with pytest.raises(ValueError, match="not ready for key 'b'"):
        catalog.resolve("p", ["b"], fields=["response"])
    with pytest.raises(ValueError, match="not found"):
        catalog.resolve("p", ["zz"])
    assert catalog.list("other") == {} and set(catalog.list()) == {"p"}


def test_fragments_are_kept_while_referenced(transfer: MooncakeBundleTransfer) -> None:
    catalog = DataProtoCatalog()
    first = fragment(transfer, 2, x=np.arange(2))
    second = fragment(transfer, 2, x=np.arange(2) + 5)
    catalog.update("p", ["a", "b"], handle=first)
    catalog.update("p", ["a"], tags=[{}], handle=fragment(transfer, 1, y=np.arange(1)))
    catalog.update("p", ["a", "b"], handle=second)  # x moves to the second fragment
    assert set(catalog.resolve("p", ["a", "b"], fields=["x"])["handles"]) == {
        second["stage_refs"]["s"]["manifest_key"]
    }
    assert first["stage_refs"]["s"]["manifest_key"] not in catalog._fragments
    catalog.remove("p", ["a"])
    assert catalog.list("p") == {"p": {"b": {}}}
    catalog.remove("p", ["b", "never"])
    assert catalog.list() == {} and catalog._fragments == {} and catalog._refs == {}
    catalog.remove("gone", ["x"])


def test_update_is_validated_before_it_changes_anything(transfer: MooncakeBundleTransfer) -> None:
    catalog = DataProtoCatalog()
    two = fragment(transfer, 2, x=np.arange(2))
    for call, err in [
        (lambda: catalog.update("p", ["a"]), "requires tags or a DataProto handle"),
        (lambda: catalog.update("", ["a"], tags=[{}]), "partition"),
        (lambda: catalog.update("p", "ab", tags=[{}]), "sequence"),
        (lambda: catalog.update("p", ["a", "a"], tags=[{}, {}]), "unique"),
        (lambda: catalog.update("p", ["a"], tags=[{}, {}]), "same length"),
        (lambda: catalog.update("p", ["a"], handle=two), "does not match 1 logical keys"),
        (lambda: catalog.update("p", ["a", "b"], handle={"type": "x"}), "not a Mooncake"),
    ]:
        with pytest.raises(ValueError, match=err):
            call()
    with pytest.raises(TypeError, match="mappings"):
        catalog.update("p", ["a"], tags=[3])  # type: ignore[list-item]
    ref = transfer.put_dataproto({"batch": {"x": np.arange(2)}}, stage="s")
    ref = transfer.append_dataproto_fields(ref, {"batch": {"y": np.arange(2)}}, stage="t")
    with pytest.raises(ValueError, match="exactly one DataProto stage"):
        catalog.update("p", ["a", "b"], handle=export_dataproto_ref(ref))
    catalog.update("p", ["a", "b"], handle=two)
    forged = dict(two, meta_info={"other": 1})
    with pytest.raises(ValueError, match="collision"):
        catalog.update("p", ["a", "b"], handle=forged)
    assert catalog.list() == {"p": {"a": {}, "b": {}}}
