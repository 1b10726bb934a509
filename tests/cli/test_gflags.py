"""``pymooncake.cli._gflags``: the gflags-compatible parser of the reference's C++ commands."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from pymooncake.cli._gflags import Flag, FlagError, parse_flags, usage

FLAGS = (
    Flag("a", int, 7, "an int"),
    Flag("b", bool, False, "a bool"),
    Flag("on", bool, True, "a bool that defaults to true"),
    Flag("s", str, "dflt", "a string"),
    Flag("f", float, 0.5, "a double"),
)


def parse(*argv: str) -> dict[str, Any]:
    return parse_flags(FLAGS, argv)


def error(argv: Sequence[str]) -> str:
    with pytest.raises(FlagError) as info:
        parse_flags(FLAGS, argv)
    return str(info.value)


def test_defaults_without_arguments() -> None:
    values = parse()
    assert {k: values[k] for k in ("a", "b", "on", "s", "f")} == {
        "a": 7,
        "b": False,
        "on": True,
        "s": "dflt",
        "f": 0.5,
    }


@pytest.mark.parametrize(
    "argv",
    [("--a=1",), ("--a", "1"), ("-a=1",), ("-a", "1")],
)
def test_int_value_forms(argv: tuple[str, ...]) -> None:
    assert parse(*argv)["a"] == 1


@pytest.mark.parametrize(
    ("argv", "value"),
    [
        (("--a=-5",), -5),
        (("--a", "-5"), -5),  # a value that looks like a flag is still the value
        (("--a=0x10",), 16),
        (("--a=+3",), 3),
    ],
)
def test_int_values(argv: tuple[str, ...], value: int) -> None:
    assert parse(*argv)["a"] == value


@pytest.mark.parametrize(
    ("argv", "value"),
    [
        (("--b",), True),
        (("-b",), True),
        (("--b=true",), True),
        (("--b=1",), True),
        (("--b=yes",), True),
        (("--b=TRUE",), True),
        (("--b=false",), False),
        (("--b=0",), False),
        (("--b=no",), False),
        (("--b", "--nob"), False),
        (("--nob",), False),
    ],
)
def test_bool_forms(argv: tuple[str, ...], value: bool) -> None:
    assert parse(*argv)["b"] is value


def test_no_prefix_turns_a_true_default_off() -> None:
    assert parse("--noon")["on"] is False
    assert parse("--on=false")["on"] is False
    assert parse()["on"] is True


def test_bool_does_not_consume_the_next_argument() -> None:
    values = parse("--b", "--a=3")
    assert values["b"] is True
    assert values["a"] == 3


def test_string_and_double_values() -> None:
    values = parse("--s=x=y", "--f", "2.25")
    assert values["s"] == "x=y"  # only the first '=' separates
    assert values["f"] == 2.25
    assert parse("--s=")["s"] == ""


def test_last_occurrence_wins() -> None:
    assert parse("--a=1", "--a=2")["a"] == 2


def test_double_dash_ends_the_flags() -> None:
    assert parse("--a=1", "--", "--a=2")["a"] == 1


def test_bad_int() -> None:
    assert error(["--a=abc"]) == "ERROR: illegal value 'abc' specified for int flag 'a'"
    assert error(["--a=1.5"]) == "ERROR: illegal value '1.5' specified for int flag 'a'"


def test_bad_double() -> None:
    assert error(["--f=fast"]) == "ERROR: illegal value 'fast' specified for double flag 'f'"


def test_bad_bool() -> None:
    assert error(["--b=maybe"]) == "ERROR: illegal value 'maybe' specified for bool flag 'b'"


@pytest.mark.parametrize("argv", [["--a"], ["--s"], ["--b", "--a"]])
def test_missing_value(argv: list[str]) -> None:
    message = error(argv)
    assert message.startswith("ERROR: flag '")
    assert "is missing its argument" in message
    assert f"'{argv[-1]}'" in message


@pytest.mark.parametrize(
    ("argv", "name"),
    [
        (["--x"], "x"),
        (["--x=1"], "x"),
        (["-x", "1"], "x"),
        (["--nox"], "nox"),
        (["--a=1", "--bogus"], "bogus"),
    ],
)
def test_unknown_flag(argv: list[str], name: str) -> None:
    assert error(argv) == f"ERROR: unknown command line flag '{name}'"


@pytest.mark.parametrize(
    "argv",
    [
        ["--noa"],  # "no" only negates booleans
        ["--nos=x"],
        ["--nob=true"],  # and takes no value
    ],
)
def test_no_prefix_misuse_is_refused(argv: list[str]) -> None:
    message = error(argv)
    assert message.startswith("ERROR: ")
    assert argv[0][2:].partition("=")[0] in message


@pytest.mark.parametrize(
    ("argv", "key", "value"),
    [
        (["--logtostderr"], "logtostderr", True),
        (["--alsologtostderr"], "alsologtostderr", True),
        (["--v=2"], "v", 2),
        (["--minloglevel=1"], "minloglevel", 1),
        (["--log_dir=/tmp/logs"], "log_dir", "/tmp/logs"),
        (["--stderrthreshold", "0"], "stderrthreshold", 0),
    ],
)
def test_glog_flags_are_accepted(argv: list[str], key: str, value: object) -> None:
    values = parse(*argv)
    assert values[key] == value
    assert values["a"] == 7


def test_usage_lists_every_flag() -> None:
    text = usage("prog", "does things", FLAGS)
    assert text.startswith("prog: does things")
    for flag in FLAGS:
        assert f"--{flag.name} ({flag.help})" in text
    assert 'default: "dflt"' in text
    assert "default: false" in text
