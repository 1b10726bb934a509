#!/usr/bin/env python3
"""List the metric names a Grafana dashboard's PromQL queries use, per panel.

Used to make ``tests/data/reference_dashboard_metrics.json`` from the reference
Mooncake dashboard (``monitoring/grafana/dashboards/mooncake.json`` in
kvcache-ai/Mooncake) without committing the dashboard itself:

    python3 scripts/dashboard_metric_names.py path/to/mooncake.json \\
        --source "kvcache-ai/Mooncake monitoring/grafana/dashboards/mooncake.json @ <commit>" \\
        > tests/data/reference_dashboard_metrics.json

The output keeps, per panel (nested rows included), its numeric id and the
sorted metric names of its targets' ``expr`` -- nothing else of the dashboard.
``tests/store/test_master_metrics.py`` checks every name against a scrape of a
pymooncake master.

Names are found with a small PromQL tokenizer: string literals, label matchers
``{...}``, range/offset selectors ``[...]`` and the label lists of
``by``/``without``/``on``/``ignoring``/``group_left``/``group_right`` are
dropped; what remains are identifiers, of which function names (followed by
``(``), keywords and aggregation operators are not metrics.  Numbers such as
``1e-9`` and durations such as ``1h30m`` (after ``offset``) are skipped whole.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from typing import Any

_KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "inf",
        "nan",
        "atan2",
        # aggregation operators may be written with the clause first: sum by (le) (x)
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    }
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_TOKEN = re.compile(
    r"(?P<num>(?:\d+(?:ms|[smhdwy]))+|0x[0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)"
    r"|(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)(?P<call>\s*\()?"
)


def metric_names(expr: str) -> set[str]:
    """The metric names used by one PromQL expression."""
    text = _STRING.sub(" ", expr)
    text = _BRACES.sub(" ", text)
    text = _BRACKETS.sub(" ", text)
    text = _LABEL_LIST.sub(" ", text)
    names: set[str] = set()
    for m in _TOKEN.finditer(text):
        ident = m.group("ident")
        if ident is None or m.group("call") or ident.lower() in _KEYWORDS:
            continue
        names.add(ident)
    return names


def _panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in items:
        yield panel
        yield from _panels(panel.get("panels") or [])


def dashboard_metrics(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """``[{"id": panel id, "metrics": [names]}]`` for every panel with queries."""
    out = []
    for panel in _panels(dashboard.get("panels") or []):
        names: set[str] = set()
        for target in panel.get("targets") or []:
            expr = target.get("expr")
            if isinstance(expr, str):
                names |= metric_names(expr)
        if names:
            out.append({"id": panel.get("id"), "metrics": sorted(names)})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dashboard", help="Grafana dashboard JSON file")
    parser.add_argument("--source", default="", help="where the dashboard came from")
    args = parser.parse_args(argv)
    with open(args.dashboard, encoding="utf-8") as f:
        dashboard = json.load(f)
    panels = dashboard_metrics(dashboard)
    doc = {"source": args.source, "panels": panels}
    json.dump(doc, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
