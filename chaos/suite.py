"""Runs scenarios round after round on one private stack, bounded in rounds and in time."""

from __future__ import annotations

import asyncio
import fnmatch
import time

from chaos.report import Outcome, Round
from chaos.scenarios import SCENARIOS, Params, Scenario
from chaos.stack import ChaosStack


def select(only: list[str], disruptive: bool = True) -> list[Scenario]:
    """The scenarios whose name matches one of ``only`` (shell patterns; all when empty)."""
    chosen = [s for s in SCENARIOS if not only or any(fnmatch.fnmatch(s.name, p) for p in only)]
    unknown = [p for p in only if not any(fnmatch.fnmatch(s.name, p) for s in SCENARIOS)]
    if unknown:
        names = ", ".join(s.name for s in SCENARIOS)
        raise ValueError(f"no scenario matches {unknown}; the scenarios are: {names}")
    return [s for s in chosen if disruptive or not s.disruptive]


async def _round(stack: ChaosStack, sc: Scenario, params: Params, i: int) -> Round:
    # A round that hangs is cut: the program is bounded, and the cut is a failure.
    limit = 4 * params.settle_s + 600
    try:
        async with asyncio.timeout(limit):
            return await sc.run(stack, params, i)
    except TimeoutError:
        return Round([f"the round did not end within {limit:.0f}s"])
    except Exception as err:
        return Round([f"the round raised {err!r}"])
    finally:
        await stack.ensure_up()


async def run_suite(
    scenarios: list[Scenario],
    params: Params,
    rounds: int | None = None,
    budget_s: float = 3600.0,
    echo: bool = True,
    outcomes: list[Outcome] | None = None,
) -> list[Outcome]:
    """Run each scenario ``rounds`` times (its own default when None); no round starts past
    ``budget_s`` after the start. One outcome per scenario, appended to ``outcomes`` as they
    start (so a caller that cancels the run still has the rounds done)."""
    deadline = time.monotonic() + budget_s
    stack = ChaosStack()
    outcomes = [] if outcomes is None else outcomes
    try:
        await stack.start()
        for sc in scenarios:
            outcome = Outcome(sc.name, sc.holds, not_run=sc.unsupported())
            outcomes.append(outcome)
            for i in range(0 if outcome.not_run else rounds or sc.rounds):
                if time.monotonic() > deadline:
                    if not outcome.rounds:
                        outcome.not_run = "past the time budget"
                    break
                r = await _round(stack, sc, params, i)
                outcome.rounds.append(r)
                if echo:
                    verdict = "held" if not r.failures else f"{len(r.failures)} failure(s)"
                    cells = ", ".join(f"{k} {v:.1f}s" for k, v in r.timings.items())
                    note = f" [{r.note}]" if r.note else ""
                    print(f"chaos: {sc.name} round {i + 1}: {verdict} ({cells}){note}", flush=True)
                    for line in r.failures[:5]:
                        print(f"chaos:   {line}", flush=True)
    finally:
        await stack.close(keep_logs=not all(o.ok for o in outcomes))
    return outcomes
