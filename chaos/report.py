"""Rounds, scenarios' outcomes and the table ``make chaos`` prints (Markdown, for
docs/reliability.md)."""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Round:
    """One round of a scenario: what broke (empty: all held) and its timings in seconds."""

    failures: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    note: str = ""


@dataclass
class Outcome:
    """Every round of one scenario, or why it did not run."""

    name: str
    holds: str
    rounds: list[Round] = field(default_factory=list)
    not_run: str = ""

    @property
    def passed(self) -> int:
        """Rounds where everything held."""
        return sum(1 for r in self.rounds if not r.failures)

    @property
    def ok(self) -> bool:
        """Every round held (a scenario not run is not a failure, it is reported as such)."""
        return all(not r.failures for r in self.rounds)

    def notes(self) -> str:
        """Each distinct note of the rounds, with how many rounds gave it."""
        counts = Counter(r.note for r in self.rounds if r.note)
        return "; ".join(f"{n} ({k}x)" if k > 1 else n for n, k in counts.items())

    def medians(self) -> str:
        """``name median`` of every timing, in the order the rounds report them."""
        keys: list[str] = []
        for r in self.rounds:
            keys += [k for k in r.timings if k not in keys]
        cells = []
        for k in keys:
            values = [r.timings[k] for r in self.rounds if k in r.timings]
            cells.append(f"{k} {statistics.median(values):.1f}")
        return ", ".join(cells)


def table(outcomes: list[Outcome]) -> str:
    """The Markdown table of the outcomes, then each failure line (at most 5 per round)."""
    lines = [
        "| scenario | rounds | what must hold | held | failures | timings, median (s) | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        if o.not_run:
            lines.append(f"| {o.name} | 0 | {o.holds} | not run: {o.not_run} | | | |")
            continue
        failed = len(o.rounds) - o.passed
        lines.append(
            f"| {o.name} | {len(o.rounds)} | {o.holds} | {o.passed}/{len(o.rounds)} "
            f"| {failed} | {o.medians()} | {o.notes()} |"
        )
    details = []
    for o in outcomes:
        for i, r in enumerate(o.rounds, 1):
            for line in r.failures[:5]:
                details.append(f"- {o.name} round {i}: {line}")
            if len(r.failures) > 5:
                details.append(f"- {o.name} round {i}: ... and {len(r.failures) - 5} more")
    return "\n".join(lines + (["", *details] if details else []))
