"""Release batches and the stop rule."""

from __future__ import annotations

import pytest

from services.gateway.domain.rollout import batch_verdict, plan_batches


@pytest.mark.parametrize(
    ("n", "size", "percent", "expected"),
    [
        (4, 2, None, [[0, 1], [2, 3]]),
        (5, 2, None, [[0, 1], [2, 3], [4]]),
        (4, None, 50, [[0, 1], [2, 3]]),
        (3, None, 10, [[0], [1], [2]]),
        (10, None, 25, [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]),
        (2, 10, None, [[0, 1]]),
        (0, 2, None, []),
    ],
)
def test_plan_batches(n, size, percent, expected):
    ids = [str(i) for i in range(n)]

    assert plan_batches(ids, size, percent) == [[str(i) for i in b] for b in expected]


@pytest.mark.parametrize(
    ("statuses", "before", "max_failures", "verdict"),
    [
        ({"a": "succeeded", "b": "deploying"}, 0, 0, "wait"),
        ({"a": "succeeded", "b": "succeeded"}, 0, 0, "next"),
        ({"a": "succeeded", "b": "failed"}, 0, 0, "stop"),
        ({"a": "succeeded", "b": "failed"}, 0, 1, "next"),
        ({"a": "succeeded", "b": "failed"}, 1, 1, "stop"),
        ({"a": "pending", "b": "failed"}, 0, 5, "wait"),
    ],
)
def test_batch_verdict(statuses, before, max_failures, verdict):
    assert batch_verdict(["a", "b"], statuses, before, max_failures) == verdict
