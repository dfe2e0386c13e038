"""Figures, the table they are printed in, and the JSON they are written to."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any, Literal, TextIO

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text


@dataclass
class Figure:
    """One measurement beside its baseline from the same run.

    ``ratio`` is always chatapp / baseline; ``better`` says which way is good,
    and ``goal`` (when there is one) is the bound ``ratio`` or ``value`` must meet.
    """

    key: str
    label: str
    value: float | None
    unit: str
    baseline: float | None
    baseline_label: str
    better: Literal["lower", "higher"]
    goal: str = ""
    goal_on: Literal["ratio", "value", ""] = ""
    goal_limit: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.baseline:
            return None
        return self.value / self.baseline

    @property
    def met(self) -> bool | None:
        if self.goal_limit is None or not self.goal_on:
            return None
        measured = self.ratio if self.goal_on == "ratio" else self.value
        if measured is None:
            return None
        if self.better == "lower":
            return measured <= self.goal_limit
        return measured >= self.goal_limit

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["ratio"] = self.ratio
        data["met"] = self.met
        return data


def unavailable(key: str, label: str, unit: str, baseline_label: str, why: str) -> Figure:
    """A figure that could not be measured in this run (shown as n/a, with the reason)."""
    return Figure(key, label, None, unit, None, baseline_label, "lower", note=why)


def median(values: list[float]) -> float:
    return statistics.median(values)


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "s" and value < 0.01:
        return f"{value * 1e6:.0f} us"
    if unit == "s" and value < 1:
        return f"{value * 1e3:.1f} ms"
    if abs(value) >= 1000:
        return f"{value:,.0f} {unit}"
    return f"{value:.3g} {unit}"


def rich_table(figures: list[Figure]) -> RenderableType:
    """The figures as a table that fits the console it is printed on (long cells wrap)."""
    table = Table(show_edge=False, pad_edge=False, header_style="bold")
    table.add_column("figure", ratio=3, overflow="fold")
    table.add_column("chatapp", justify="right", no_wrap=True)
    table.add_column("baseline", ratio=2, overflow="fold")
    table.add_column("ratio", justify="right", no_wrap=True)
    table.add_column("goal", overflow="fold")
    for f in figures:
        ratio = "n/a" if f.ratio is None else f"{f.ratio:.2f}x"
        mark = {True: " ok", False: " MISSED", None: ""}[f.met]
        baseline = _fmt(f.baseline, f.unit)
        if f.baseline is not None:
            baseline = f"{baseline} ({f.baseline_label})"
        table.add_row(f.label, _fmt(f.value, f.unit), baseline, ratio, f.goal + mark)
    notes = [Text(f"  {f.label}: {f.note}") for f in figures if f.note]
    if not notes:
        return table
    return Group(table, Text(""), Text("notes:"), *notes)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def machine_info() -> dict[str, Any]:
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "trio": _version("trio"),
        "msgspec": _version("msgspec"),
        "chatapp": _version("chatapp"),
    }


def write_json(out: TextIO, mode: str, figures: list[Figure], elapsed: float) -> None:
    """Write the figures to ``out``, a file opened for writing before the run."""
    document = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": mode,
        "elapsed_s": round(elapsed, 2),
        "machine": machine_info(),
        "argv": sys.argv[1:],
        "figures": [f.to_json() for f in figures],
    }
    json.dump(document, out, indent=2)
    out.write("\n")
    out.flush()
