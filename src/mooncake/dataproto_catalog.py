"""``mooncake.dataproto_catalog``: logical rows and fields over stored DataProtos.

A :class:`DataProtoCatalog` maps ``(partition, key)`` rows to tags and, per
field, to a row of an immutable single-stage DataProto *fragment* (a handle
from ``export_dataproto_ref``), so writers can publish fields of the same
logical rows at different times and readers can ask for any set of rows and
fields.  It holds metadata only: bytes move with ``MooncakeBundleTransfer``
and object lifetime stays with the store.  A fragment is kept while a row
field points at it.  One catalog is not thread-safe: its host serializes the
calls (as in the reference).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DataProtoCatalog"]

#: a field's location: (fragment id = the stage manifest key, row in it)
_Location = tuple[str, int]


@dataclass
class _Row:
    tag: dict[str, Any] = field(default_factory=dict)
    fields: dict[str, _Location] = field(default_factory=dict)


class DataProtoCatalog:
    """Rows -> tags and field locations in immutable DataProto fragments."""

    def __init__(self) -> None:
        self._partitions: dict[str, dict[str, _Row]] = {}
        self._fragments: dict[str, dict[str, Any]] = {}
        self._refs: dict[str, int] = {}

    def update(
        self,
        partition: str,
        keys: Sequence[str],
        *,
        tags: Sequence[Mapping[str, Any]] | None = None,
        handle: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Merge per-row ``tags`` into the rows ``keys`` and/or point every
        field of a single-stage DataProto ``handle`` (row i = ``keys[i]``) at it.

        Returns ``{"keys", "tags" (merged, per row), "fields" (the rows' fields)}``.

        Raises:
            ValueError: neither tags nor handle, bad names, tags of another
                length, a handle of another batch size or with several stages
                or no fields, or a different handle under a known fragment id.
            TypeError: a tag that is not a mapping.
        """
        partition = _name(partition, "partition")
        keys = _names(keys, "keys")
        new_tags = _tags(tags, len(keys))
        fragment = None if handle is None else _fragment(handle, len(keys))
        if new_tags is None and fragment is None:
            raise ValueError("catalog update requires tags or a DataProto handle")
        if fragment is not None:
            known = self._fragments.get(fragment[0])
            if known is not None and known != fragment[1]:
                raise ValueError(f"DataProto fragment id collision: {fragment[0]!r}")
        rows = self._partitions.setdefault(partition, {})
        if fragment is not None:
            fragment_id, exported, names = fragment
            self._fragments.setdefault(fragment_id, exported)
            self._refs.setdefault(fragment_id, 0)
        merged: list[dict[str, Any]] = []
        for index, key in enumerate(keys):
            row = rows.setdefault(key, _Row())
            if new_tags is not None:
                row.tag = {**row.tag, **new_tags[index]}
            merged.append(copy.deepcopy(row.tag))
            if fragment is None:
                continue
            for name in names:
                old = row.fields.get(name)
                row.fields[name] = (fragment_id, index)
                if old is None:
                    self._refs[fragment_id] += 1
                elif old[0] != fragment_id:
                    self._release(old[0])
                    self._refs[fragment_id] += 1
        return {"keys": list(keys), "tags": merged, "fields": _fields_of(rows, keys)}

    def resolve(
        self, partition: str, keys: Sequence[str], fields: Sequence[str] | None = None
    ) -> dict[str, Any]:
        """Where fields (all the rows have, by default) of rows ``keys`` live.

        Returns ``{"keys", "tags", "fields", "field_groups": [{"fields",
        "locations": [(fragment id, row), ...]}], "handles": {fragment id:
        handle}}``; fields whose rows all live at the same locations share a
        group, so each group is one read.

        Raises:
            ValueError: unknown keys, no fields, or a field some row lacks.
        """
        partition = _name(partition, "partition")
        keys = _names(keys, "keys")
        rows = self._partitions.get(partition, {})
        unknown = [k for k in keys if k not in rows]
        if unknown:
            raise ValueError(f"keys were not found in partition {partition!r}: {unknown}")
        selected = (
            list(_names(fields, "field names")) if fields is not None else _fields_of(rows, keys)
        )
        if not selected:
            raise ValueError("requested keys do not contain any fields")
        for key in keys:
            absent = [f for f in selected if f not in rows[key].fields]
            if absent:
                raise ValueError(f"fields are not ready for key {key!r}: {absent}")
        groups: dict[tuple[_Location, ...], list[str]] = {}
        for name in selected:
            groups.setdefault(tuple(rows[k].fields[name] for k in keys), []).append(name)
        used = {loc[0] for locations in groups for loc in locations}
        return {
            "keys": list(keys),
            "tags": [copy.deepcopy(rows[k].tag) for k in keys],
            "fields": selected,
            "field_groups": [
                {"fields": names, "locations": list(locs)} for locs, names in groups.items()
            ],
            "handles": {f: copy.deepcopy(self._fragments[f]) for f in used},
        }

    def list(self, partition: str | None = None) -> dict[str, dict[str, Any]]:
        """``{partition: {key: tag}}`` of one partition (if known) or all."""
        if partition is None:
            names = list(self._partitions)
        else:
            partition = _name(partition, "partition")
            names = [partition] if partition in self._partitions else []
        return {
            p: {k: copy.deepcopy(row.tag) for k, row in self._partitions[p].items()} for p in names
        }

    def remove(self, partition: str, keys: Sequence[str]) -> None:
        """Forget rows (metadata only; stored objects are not touched).

        Raises:
            ValueError: bad names.
        """
        partition = _name(partition, "partition")
        keys = _names(keys, "keys")
        rows = self._partitions.get(partition)
        if rows is None:
            return
        for key in keys:
            row = rows.pop(key, None)
            if row is not None:
                for fragment_id, _index in row.fields.values():
                    self._release(fragment_id)
        if not rows:
            del self._partitions[partition]

    def _release(self, fragment_id: str) -> None:
        self._refs[fragment_id] -= 1
        if self._refs[fragment_id] == 0:
            del self._refs[fragment_id]
            del self._fragments[fragment_id]


def _fragment(handle: Mapping[str, Any], rows: int) -> tuple[str, dict[str, Any], tuple[str, ...]]:
    from .structured_object_store import export_dataproto_ref, import_dataproto_ref

    ref = import_dataproto_ref(handle)
    if ref.batch_size != rows:
        raise ValueError(
            f"DataProto batch size {ref.batch_size!r} does not match {rows} logical keys"
        )
    if len(ref.stage_refs) != 1:
        raise ValueError("catalog fragments must contain exactly one DataProto stage")
    fragment_id = _name(next(iter(ref.stage_refs.values())).manifest_key, "manifest_key")
    if not ref.field_index:
        raise ValueError("DataProto catalog fragments cannot be empty")
    return fragment_id, export_dataproto_ref(ref), _names(ref.field_index, "field names")


def _fields_of(rows: Mapping[str, _Row], keys: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(f for k in keys for f in rows[k].fields))


def _names(values: Sequence[str] | Mapping[str, Any], label: str) -> tuple[str, ...]:
    if isinstance(values, str):
        raise ValueError(f"{label} must be a sequence of non-empty strings")
    names = tuple(values)
    if not names or not all(isinstance(v, str) and v for v in names):
        raise ValueError(f"{label} must be non-empty strings")
    if len(set(names)) != len(names):
        raise ValueError(f"{label} must be unique")
    return names


def _tags(tags: Sequence[Mapping[str, Any]] | None, count: int) -> list[dict[str, Any]] | None:
    if tags is None:
        return None
    if len(tags) != count:
        raise ValueError("tags must have the same length as keys")
    if not all(isinstance(t, Mapping) for t in tags):
        raise TypeError("tags must be mappings")
    return [copy.deepcopy(dict(t)) for t in tags]


def _name(value: Any, label: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{label} must be a non-empty string")
    return value
