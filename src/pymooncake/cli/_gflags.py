"""A gflags-compatible command-line parser for the reference's C++ commands.

Accepts ``--name=value``, ``--name value``, single-dash forms, booleans as
``--name``, ``--noname`` and ``--name=true|false|1|0``.  Unknown flags are
refused with the reference's wording (``ERROR: unknown command line flag``).
``--logtostderr``, ``--v``, ``--minloglevel`` and ``--log_dir`` (glog flags) are
accepted everywhere and returned in the result like any other flag.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Flag", "FlagError", "parse_flags", "usage"]

_TRUE = {"true", "t", "yes", "y", "1"}
_FALSE = {"false", "f", "no", "n", "0"}


class FlagError(Exception):
    pass


@dataclass(frozen=True)
class Flag:
    name: str
    type: type  # bool, int, float or str
    default: Any
    help: str


_GLOG = (
    Flag("logtostderr", bool, False, "log to stderr (always on in pymooncake)"),
    Flag("alsologtostderr", bool, False, "log to stderr as well"),
    Flag("v", int, 0, "verbose log level"),
    Flag("minloglevel", int, 0, "0 INFO, 1 WARNING, 2 ERROR"),
    Flag("log_dir", str, "", "ignored: logs go to stderr"),
    Flag("stderrthreshold", int, 2, "ignored"),
)


def _convert(flag: Flag, raw: str) -> Any:
    if flag.type is bool:
        v = raw.strip().lower()
        if v in _TRUE:
            return True
        if v in _FALSE:
            return False
        raise FlagError(f"ERROR: illegal value '{raw}' specified for bool flag '{flag.name}'")
    try:
        if flag.type is int:
            return int(raw, 0) if raw.strip().lower().startswith(("0x", "0o", "0b")) else int(raw)
        if flag.type is float:
            return float(raw)
    except ValueError:
        kind = "int" if flag.type is int else "double"
        raise FlagError(
            f"ERROR: illegal value '{raw}' specified for {kind} flag '{flag.name}'"
        ) from None
    return raw


def parse_flags(flags: Sequence[Flag], argv: Sequence[str]) -> dict[str, Any]:
    """Parse ``argv`` (without the program name).

    Raises:
        FlagError: unknown flag, missing value or bad value (message as gflags prints it).
    """
    table = {f.name: f for f in (*flags, *_GLOG)}
    values = {f.name: f.default for f in table.values()}
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            break
        if not arg.startswith("-") or arg == "-":
            raise FlagError(f"ERROR: unexpected argument '{arg}'")
        body = arg.lstrip("-")
        name, sep, raw = body.partition("=")
        flag = table.get(name)
        if flag is None and name.startswith("no") and not sep:
            negated = table.get(name[2:])
            if negated is not None and negated.type is bool:
                values[negated.name] = False
                continue
        if flag is None:
            raise FlagError(f"ERROR: unknown command line flag '{name}'")
        if not sep:
            if flag.type is bool:
                values[name] = True
                continue
            if i >= len(args):
                raise FlagError(f"ERROR: flag '{arg}' is missing its argument")
            raw = args[i]
            i += 1
        values[name] = _convert(flag, raw)
    return values


def usage(prog: str, summary: str, flags: Sequence[Flag]) -> str:
    lines = [f"{prog}: {summary}", "", "  Flags:"]
    for f in flags:
        default = (
            f'"{f.default}"'
            if f.type is str
            else str(f.default).lower()
            if f.type is bool
            else f.default
        )
        lines.append(f"    --{f.name} ({f.help}) type: {f.type.__name__} default: {default}")
    return "\n".join(lines)
