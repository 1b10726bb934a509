"""Results of ``pymooncake doctor``: one :class:`CheckResult` per check, and the report.

A result says what was checked, its status, why, and -- unless it passed --
how to fix it.  The report renders them one line each for a terminal, or as
JSON for machines, and gives the process exit status (1 when a check failed).
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CheckResult", "DoctorReport", "Status"]


class Status(str, enum.Enum):
    """Outcome of one check.

    ``SKIP`` means the check does not apply to the inputs (no master given,
    TCP without RDMA devices ...); the reason says why.
    """

    PASS = "PASS"
    WARN = "WARN"
    FAIL = "FAIL"
    SKIP = "SKIP"


@dataclass(frozen=True)
class CheckResult:
    """One check's outcome.

    Attributes:
        check: stable identifier, e.g. ``local_hostname`` or ``peer:10.0.0.2:15001``.
        status: PASS / WARN / FAIL / SKIP.
        reason: what was found, naming the concrete name, address or value.
        fix: what to change (empty for PASS and SKIP).
        details: machine-readable facts behind the verdict (addresses, counts ...).
    """

    check: str
    status: Status
    reason: str
    fix: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        """One line: status, check, reason and fix."""
        text = f"{self.status.value:<4}  {self.check:<20} {self.reason}"
        if self.fix:
            text += f" -- fix: {self.fix}"
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "status": self.status.value,
            "reason": self.reason,
            "fix": self.fix,
            "details": dict(self.details),
        }


@dataclass(frozen=True)
class DoctorReport:
    """All results of one doctor run, in the order the checks ran."""

    results: tuple[CheckResult, ...]

    @property
    def ok(self) -> bool:
        """No check failed (warnings allowed)."""
        return not any(r.status is Status.FAIL for r in self.results)

    @property
    def exit_code(self) -> int:
        """0 when no check failed, else 1."""
        return 0 if self.ok else 1

    def by_check(self, check: str) -> CheckResult:
        """The result of ``check``.

        Raises:
            KeyError: no such check ran.
        """
        for r in self.results:
            if r.check == check:
                return r
        raise KeyError(f"no check named {check!r}; ran: {', '.join(self.checks())}")

    def checks(self) -> list[str]:
        return [r.check for r in self.results]

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in Status}
        for r in self.results:
            out[r.status.value] += 1
        return out

    def format_text(self) -> str:
        """One line per check, then a summary line."""
        c = self.counts()
        summary = (
            f"{c['PASS']} passed, {c['WARN']} warning(s), {c['FAIL']} failed, {c['SKIP']} skipped"
        )
        return "\n".join([*(r.line() for r in self.results), summary]) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "counts": self.counts(),
            "checks": [r.to_json() for r in self.results],
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=False)

    @staticmethod
    def of(results: Sequence[CheckResult]) -> DoctorReport:
        return DoctorReport(tuple(results))
