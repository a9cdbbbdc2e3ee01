"""``python -m chaos``: run the chaos scenarios on a private stack and print the table.

    .venv/bin/python -m chaos [--rounds N | --quick] [--only 'kill-*,registry-down']
        [--no-disruptive] [--batch 10] [--pushes 20] [--dockerd-machines 50]
        [--dockerd-restarts 6] [--loop-seconds 20] [--budget-minutes 120] [--list]
        [--shared-infra]

The suite runs on a RabbitMQ node and a FerretDB of its own (chaos/infra.py), started here and
stopped at the end, so restarting them disturbs nothing else; ``--shared-infra`` uses the
stack's own instead.

Exit status 1 when any round of any scenario broke what must hold.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import TYPE_CHECKING

from chaos import infra

if TYPE_CHECKING:
    from chaos.scenarios import Params, Scenario


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m chaos", description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, help="rounds of every scenario (default: its own)")
    ap.add_argument("--quick", action="store_true", help="one round of each scenario")
    ap.add_argument("--only", default="", help="comma-separated names or shell patterns")
    ap.add_argument(
        "--no-disruptive",
        action="store_true",
        help="skip the RabbitMQ, FerretDB and dockerd restarts (they disturb the whole machine)",
    )
    ap.add_argument("--batch", type=int, default=10, help="machines per create (kill scenarios)")
    ap.add_argument("--pushes", type=int, default=20)
    ap.add_argument("--dockerd-machines", type=int, default=50)
    ap.add_argument("--dockerd-restarts", type=int, default=6)
    ap.add_argument("--loop-seconds", type=float, default=20.0)
    ap.add_argument("--budget-minutes", type=float, default=120.0, help="no round starts past it")
    ap.add_argument("--list", action="store_true", help="list the scenarios and exit")
    ap.add_argument(
        "--shared-infra",
        action="store_true",
        help="run on the stack's RabbitMQ and FerretDB rather than a private pair",
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, run, print the table; the exit status."""
    a = _args(argv)
    private = not a.shared_infra and not a.list
    if private:
        # Before anything imports tests.support.stack, which reads the addresses once.
        infra.enter()
    try:
        return _main(a)
    finally:
        if private:
            infra.leave()


def _main(a: argparse.Namespace) -> int:
    from bench._common import machine
    from chaos.report import table
    from chaos.scenarios import SCENARIOS, Params
    from chaos.suite import select

    if a.list:
        for s in SCENARIOS:
            flag = " (disruptive)" if s.disruptive else ""
            print(f"{s.name:26} {s.rounds:3} rounds{flag}  {s.holds}")
        return 0
    only = [p.strip() for p in a.only.split(",") if p.strip()]
    try:
        scenarios = select(only, disruptive=not a.no_disruptive)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    params = Params(
        batch=a.batch,
        pushes=a.pushes,
        dockerd_machines=a.dockerd_machines,
        dockerd_restarts=a.dockerd_restarts,
        loop_s=a.loop_seconds,
    )
    rounds = 1 if a.quick else a.rounds
    print(f"# chaos — {machine()}", flush=True)
    outcomes: list = []
    stopped = asyncio.run(_run(scenarios, params, rounds, a.budget_minutes * 60, outcomes))
    print(table(outcomes))
    if stopped:
        print("chaos: stopped by a signal; the table has the rounds done until then")
    return 0 if all(o.ok for o in outcomes) and not stopped else 1


async def _run(
    scenarios: list[Scenario], params: Params, rounds: int | None, budget: float, out: list
) -> bool:
    """Run the suite; SIGTERM or SIGINT cancels it, so the stack is still cleaned up. Whether
    it was stopped so."""
    from chaos.suite import run_suite

    task = asyncio.create_task(run_suite(scenarios, params, rounds, budget, outcomes=out))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        return True
    return False


if __name__ == "__main__":
    sys.exit(main())
