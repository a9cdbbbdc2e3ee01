"""Unit tests of the history layout: which (IP, day) table a sample goes to."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from services.monitor.store import history_collection


@pytest.mark.parametrize(
    ("t", "expected"),
    [
        (datetime(2026, 11, 1, 0, 0, tzinfo=UTC), "hist.10.0.0.1.20261101"),
        (datetime(2026, 11, 1, 23, 59, 59, tzinfo=UTC), "hist.10.0.0.1.20261101"),
        # 01:00 at UTC+2 is still the previous UTC day
        (datetime(2026, 11, 2, 1, 0, tzinfo=timezone(timedelta(hours=2))),
         "hist.10.0.0.1.20261101"),
        (datetime(2026, 11, 2, 0, 0), "hist.10.0.0.1.20261102"),  # naive: read as UTC
    ],
)
def test_a_sample_goes_to_the_table_of_its_ip_and_utc_day(t: datetime, expected: str):
    assert history_collection("10.0.0.1", t) == expected


def test_day_tables_sort_like_time_within_an_ip():
    names = [history_collection("10.0.0.1", datetime(2026, m, d, tzinfo=UTC))
             for m, d in ((9, 30), (10, 1), (12, 31))]
    assert names == sorted(names)
