"""Schemathesis over ``/v1/openapi.json`` with an admin token, until at least ``--cases`` cases.

    .venv/bin/python -m bench.schema_fuzz [--cases 1000] [--examples 10] [--seed N]

Starts a private stack (the gateway and the peers it asks: ipam, imagesync, monitor, bastion; no
Docker host, so no container is ever made), then runs schemathesis in rounds (every operation in
positive and negative mode with the checks of :data:`tests.support.fuzz.CHECKS`, and the reads
with ``positive_data_acceptance``), each round with more examples per operation, until the cases
reach ``--cases``. Prints the counts (cases, requests, answers by status, 5xx, failures by check)
and exits 1 if any answer was a 5xx or broke the document. ``make chaos`` runs it with
``--cases 1000``; the logs and reports stay in the printed directory.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

from bench._common import machine
from tests.support.fuzz import (
    POSITIVE_CHECK,
    POSITIVE_EXCLUDED,
    FuzzOutcome,
    fuzz_stack,
    run_schemathesis,
)


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.schema_fuzz", description=__doc__)
    ap.add_argument("--cases", type=int, default=1000, help="run rounds until this many cases")
    ap.add_argument("--examples", type=int, default=10, help="examples per operation, round 1")
    ap.add_argument("--seed", type=int, default=None, help="first round's seed (then +1 each)")
    ap.add_argument("--max-rounds", type=int, default=6)
    return ap.parse_args(argv)


async def fuzz(cases: int, examples: int, seed: int | None, max_rounds: int) -> FuzzOutcome:
    """Rounds of schemathesis on a private stack until ``cases`` cases were generated."""
    workdir = Path(tempfile.mkdtemp(prefix="dockvm-fuzz-"))
    print(f"logs and reports: {workdir}", flush=True)
    total = FuzzOutcome()
    async with fuzz_stack(workdir) as target:
        for n in range(max_rounds):
            if total.cases >= cases:
                break
            round_seed = None if seed is None else seed + n
            every = await run_schemathesis(
                target, max_examples=examples * (n + 1), name=f"all-{n}", seed=round_seed
            )
            reads = await run_schemathesis(
                target,
                max_examples=examples * (n + 1),
                name=f"reads-{n}",
                methods="GET",
                checks=(POSITIVE_CHECK,),
                mode="positive",
                seed=round_seed,
                exclude_paths=POSITIVE_EXCLUDED,
            )
            total = total.merge(every).merge(reads)
            print(f"round {n + 1}: {total.cases} cases, {total.requests} requests", flush=True)
    return total


def _report(out: FuzzOutcome, seconds: float) -> str:
    by_class: dict[str, int] = {}
    for status, n in sorted(out.statuses.items()):
        by_class[f"{status // 100}xx"] = by_class.get(f"{status // 100}xx", 0) + n
    lines = [
        f"schemathesis over /v1/openapi.json ({machine()})",
        f"cases {out.cases}  requests {out.requests}  in {seconds:.0f} s",
        "answers " + "  ".join(f"{k} {v}" for k, v in by_class.items()),
        "statuses " + "  ".join(f"{s}:{n}" for s, n in sorted(out.statuses.items())),
        f"5xx {out.server_errors}",
        f"failures {sum(out.failures.values())}"
        + "".join(f"\n  {name}: {n}" for name, n in sorted(out.failures.items())),
    ]
    lines += [f"  e.g. {e}" for e in out.examples[:20]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run, print the counts; 1 if anything failed."""
    args = _args(argv)
    started = time.monotonic()
    out = asyncio.run(fuzz(args.cases, args.examples, args.seed, args.max_rounds))
    print(_report(out, time.monotonic() - started))
    return 1 if out.server_errors or out.failures or out.cases < args.cases else 0


if __name__ == "__main__":
    sys.exit(main())
