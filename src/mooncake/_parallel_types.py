"""``ParallelAxis``, ``TensorParallelism`` and ``ReadTarget`` of ``mooncake.store``.

Plain attribute holders, typed like the reference's pybind classes: a wrong
type raises ``TypeError`` on assignment.  Like pybind, ``TensorParallelism``
and ``ReadTarget`` copy what is assigned to them, while the objects read back
can be changed in place (``for axis in p.axes: axis.rank = r`` works).
The request parsers accept any object with the same attributes (the
reference reads them by name), e.g. a dataclass ``WriterPartition``.
"""

from __future__ import annotations

import copy
from typing import Any

from pymooncake.errors import InvalidParams
from pymooncake.store._tensor import AxisSpec, axis_kind
from pymooncake.store._tensor_parallel import ReadMode, ReadRequest, WriterPartition

__all__ = ["ParallelAxis", "ReadTarget", "TensorParallelism"]


def _opt_int(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"ParallelAxis.{name}: expected an int or None, got {value!r}")
    return value


class ParallelAxis:
    """One axis of a parallel layout: ``kind`` (tp, dp, ep, pp), ``rank``,
    ``size``, and per kind ``split_dim`` (tp), ``expert_id`` (ep), ``stage_id`` (pp)."""

    def __init__(self) -> None:
        self.kind = ""
        self.rank = 0
        self.size = 1
        self.split_dim: int | None = None
        self.expert_id: int | None = None
        self.stage_id: int | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "kind" and not isinstance(value, str):
            raise TypeError(f"ParallelAxis.kind: expected a str, got {value!r}")
        if name in ("rank", "size") and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"ParallelAxis.{name}: expected an int, got {value!r}")
        if name in ("split_dim", "expert_id", "stage_id"):
            value = _opt_int(name, value)
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return (
            f"ParallelAxis(kind={self.kind!r}, rank={self.rank}, size={self.size}, "
            f"split_dim={self.split_dim}, expert_id={self.expert_id}, stage_id={self.stage_id})"
        )


class TensorParallelism:
    """A parallel layout: ``axes``, a list of :class:`ParallelAxis`."""

    def __init__(self) -> None:
        self._axes: list[ParallelAxis] = []

    @property
    def axes(self) -> list[ParallelAxis]:
        return list(self._axes)

    @axes.setter
    def axes(self, value: list[ParallelAxis]) -> None:
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(a, ParallelAxis) for a in value
        ):
            raise TypeError("TensorParallelism.axes: expected a list of ParallelAxis")
        self._axes = [copy.copy(a) for a in value]

    def __repr__(self) -> str:
        return f"TensorParallelism(axes={self._axes!r})"


class ReadTarget:
    """What a read returns: ``mode`` "as_stored" (default), "shard" or "full",
    and optionally the ``parallelism`` the reader uses."""

    def __init__(self) -> None:
        self._mode = ReadMode.AS_STORED
        self._parallelism: TensorParallelism | None = None

    @property
    def mode(self) -> str:
        return self._mode.value

    @mode.setter
    def mode(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("ReadTarget.mode: expected a str")
        try:
            self._mode = ReadMode(value.lower())
        except ValueError:
            raise RuntimeError("Unsupported ReadTarget mode") from None

    @property
    def parallelism(self) -> TensorParallelism | None:
        return self._parallelism

    @parallelism.setter
    def parallelism(self, value: TensorParallelism | None) -> None:
        if value is not None and not isinstance(value, TensorParallelism):
            raise TypeError("ReadTarget.parallelism: expected a TensorParallelism or None")
        self._parallelism = None if value is None else copy.deepcopy(value)

    def __repr__(self) -> str:
        return f"ReadTarget(mode={self.mode!r}, parallelism={self._parallelism!r})"


# --------------------------------------------------------------------------------
# parsing (duck-typed, like the reference)
# --------------------------------------------------------------------------------


def _int_attr(obj: Any, name: str) -> int:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParams(f"{name} must be an int, got {value!r}")
    return value


def parse_axes(obj: Any) -> tuple[AxisSpec, ...]:
    """A ``TensorParallelism``-like object's axes.

    Raises:
        InvalidParams: missing attributes or an unknown axis kind.
    """
    if not hasattr(obj, "axes"):
        raise InvalidParams("TensorParallelism must provide axes")
    out = []
    for a in list(obj.axes):
        if not (hasattr(a, "kind") and hasattr(a, "rank") and hasattr(a, "size")):
            raise InvalidParams("ParallelAxis must provide kind, rank, and size")
        kind = str(a.kind)
        axis_kind(kind)
        out.append(
            AxisSpec(
                kind.lower(),
                _int_attr(a, "rank"),
                _int_attr(a, "size"),
                _opt_attr(a, "split_dim"),
                _opt_attr(a, "expert_id"),
                _opt_attr(a, "stage_id"),
            )
        )
    return tuple(out)


def _opt_attr(obj: Any, name: str) -> int | None:
    value = getattr(obj, name, None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParams(f"{name} must be an int or None, got {value!r}")
    return value


def parse_writer(obj: Any) -> WriterPartition:
    """A writer partition (any object with rank, size and split_dim).

    Raises:
        InvalidParams: missing attributes or values out of range.
    """
    if not all(hasattr(obj, n) for n in ("rank", "size", "split_dim")):
        raise InvalidParams("writer_partition must provide rank, size, and split_dim")
    writer = WriterPartition(
        _int_attr(obj, "rank"), _int_attr(obj, "size"), _int_attr(obj, "split_dim")
    )
    writer.check("writer_partition")
    return writer


def parse_target(obj: Any) -> ReadRequest:
    """A ``ReadTarget``-like object (None reads the tensor as stored).

    Raises:
        InvalidParams: missing attributes, an unknown mode or axis kind.
    """
    if obj is None:
        return ReadRequest()
    if not (hasattr(obj, "mode") and hasattr(obj, "parallelism")):
        raise InvalidParams("ReadTarget must provide mode and parallelism")
    try:
        mode = ReadMode(str(obj.mode).lower())
    except ValueError:
        raise InvalidParams(f"unsupported ReadTarget mode {obj.mode!r}") from None
    parallelism = obj.parallelism
    return ReadRequest(mode, None if parallelism is None else parse_axes(parallelism))
