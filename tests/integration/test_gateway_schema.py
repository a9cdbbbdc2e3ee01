"""Schemathesis over the real gateway's OpenAPI document: no 5xx, and nothing outside it.

A few cases per operation (the full run of 1,000 cases and more is ``bench/schema_fuzz.py``,
which ``make chaos`` calls) against a private stack: the gateway and the peers it asks over the
bus, with no Docker host (see :mod:`tests.support.fuzz`). Every operation is fuzzed in positive
and negative mode (no 5xx; statuses, content types and bodies as documented; invalid input
refused with a 4xx), and the reads in positive mode must accept every schema-valid request: the
document says what validation checks, since both come from the same models.
"""

from __future__ import annotations

from tests.support.fuzz import POSITIVE_CHECK, POSITIVE_EXCLUDED, fuzz_stack, run_schemathesis

EXAMPLES = 3
SEED = 21


async def test_fuzzed_requests_get_no_5xx_and_only_documented_answers(tmp_path):
    async with fuzz_stack(tmp_path) as target:
        every = await run_schemathesis(
            target, max_examples=EXAMPLES, name="all", seed=SEED, phases="fuzzing"
        )
        reads = await run_schemathesis(
            target, max_examples=EXAMPLES, name="reads", methods="GET",
            checks=(POSITIVE_CHECK,), mode="positive", seed=SEED, phases="fuzzing",
            exclude_paths=POSITIVE_EXCLUDED,
        )
    out = every.merge(reads)

    assert out.cases >= 100
    assert (out.server_errors, dict(out.failures)) == (0, {}), out.examples
    assert out.exit_code == 0, f"see {tmp_path}/schemathesis-*.log"
