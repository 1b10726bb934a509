"""``_frozen.fast_frozen_inits``: the cheaper ``__init__`` of frozen slotted
dataclasses takes the same arguments, sets the same fields and keeps the values
frozen; classes whose generated ``__init__`` it cannot reproduce keep theirs."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import InitVar, dataclass, field
from typing import Any, ClassVar

import pytest

from pymooncake._frozen import fast_frozen_init, fast_frozen_inits
from pymooncake.store.master import _effects
from pymooncake.wire import _master_msgs, _master_reply_msgs

MODULES = [_master_msgs, _master_reply_msgs, _effects]


def _generated_signature(cls: type) -> inspect.Signature:
    """The signature ``dataclasses`` gives ``cls.__init__``: one parameter per
    field, in order, with the field's default."""
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for f in dataclasses.fields(cls):
        default = inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default
        params.append(
            inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default)
        )
    return inspect.Signature(params)


def _changed(module: Any) -> list[type]:
    return [
        v
        for v in vars(module).values()
        if isinstance(v, type)
        and v.__module__ == module.__name__
        and dataclasses.is_dataclass(v)
        and "_set0"
        in getattr(v.__dict__.get("__init__"), "__code__", compile("", "", "exec")).co_names
    ]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_the_wire_values_take_the_same_arguments_and_stay_frozen(module: Any) -> None:
    changed = _changed(module)
    assert len(changed) >= 15  # (the modules call fast_frozen_inits at their end)
    for cls in changed:
        assert inspect.signature(cls.__init__) == _generated_signature(cls), cls.__name__
        fields = dataclasses.fields(cls)
        values = {f.name: object() for f in fields}
        x = cls(**values)
        for f in fields:
            assert getattr(x, f.name) is values[f.name]
        y = cls(*values.values())
        assert x == y and repr(x) == repr(y)
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(x, fields[0].name, 1)
        if len(fields) > 1:
            z = dataclasses.replace(x, **{fields[-1].name: 5})
            assert (
                getattr(z, fields[-1].name) == 5
                and getattr(z, fields[0].name) is values[fields[0].name]
            )


def test_defaults_apply_when_left_out() -> None:
    remove = _master_msgs.Remove("k")
    assert (remove.key, remove.force, remove.client_id, remove.rid, remove.ack) == (
        "k",
        False,
        "",
        0,
        0,
    )
    with pytest.raises(TypeError):
        _master_msgs.Remove()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        _master_msgs.Remove("k", nope=1)  # type: ignore[call-arg]


def test_classes_it_cannot_reproduce_keep_their_own_init() -> None:
    @dataclass(frozen=True, slots=True)
    class WithFactory:
        a: list[int] = field(default_factory=list)

    @dataclass(frozen=True, slots=True)
    class WithPostInit:
        a: int

        def __post_init__(self) -> None:
            if self.a < 0:
                raise ValueError("negative")

    @dataclass(frozen=True, slots=True)
    class WithInitVar:
        a: int
        b: InitVar[int] = 0

    @dataclass(frozen=True, slots=True)
    class KeywordOnly:
        a: int = field(kw_only=True)

    @dataclass(frozen=True, slots=True)
    class NotInit:
        a: int
        b: int = field(init=False, default=3)

    @dataclass(slots=True)
    class NotFrozen:
        a: int

    @dataclass(frozen=True)
    class NoSlots:
        a: int

    @dataclass(frozen=True, slots=True)
    class OwnInit:
        a: int

        def __init__(self, a: int) -> None:  # (dataclasses keeps a written __init__)
            object.__setattr__(self, "a", abs(a))

    assert OwnInit(-2).a == 2
    for cls in (
        WithFactory,
        WithPostInit,
        WithInitVar,
        KeywordOnly,
        NotInit,
        NotFrozen,
        NoSlots,
        OwnInit,
    ):
        init = cls.__init__
        assert fast_frozen_init(cls) is False, cls.__name__
        assert cls.__init__ is init

    @dataclass(frozen=True, slots=True)
    class Plain:
        a: int
        b: str = "x"
        C: ClassVar[int] = 1

    assert fast_frozen_init(Plain) is True
    assert Plain(1) == Plain(a=1, b="x") and Plain(2, "y").b == "y"
    assert fast_frozen_inits({"__name__": "elsewhere", "Plain": Plain}) == 0  # not its module
