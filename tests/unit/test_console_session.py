"""The console's session cookie and CSRF tokens, and the plot columns it derives (pure)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.gateway.console.session import (
    Session,
    cookie_options,
    csrf_valid,
    new_session,
    parse_session,
)
from services.gateway.console.views import RANGES, owner_marks, plot_columns, window


def test_a_cookie_round_trips_to_the_same_session_and_csrf_token():
    s = new_session("dvm_secret-token_1")

    back = parse_session(s.cookie)

    assert back == s
    assert csrf_valid(back, s.csrf)


def test_each_login_has_its_own_csrf_token():
    a, b = new_session("dvm_tok"), new_session("dvm_tok")

    assert a.csrf != b.csrf
    assert not csrf_valid(a, b.csrf)


def test_a_csrf_token_depends_on_the_bearer_token():
    # An attacker who knows a nonce but not the token cannot mint the field.
    assert Session("dvm_a", "n1").csrf != Session("dvm_b", "n1").csrf


@pytest.mark.parametrize("given", ["", None, "0" * 64, "x"])
def test_a_missing_or_wrong_csrf_field_is_refused(given):
    assert not csrf_valid(new_session("dvm_tok"), given)


def test_no_session_accepts_no_csrf_field():
    assert not csrf_valid(None, new_session("dvm_tok").csrf)


@pytest.mark.parametrize("value", [None, "", "nodot", ".tok", "nonce.", "a b.tok", "n.t\n"])
def test_a_malformed_cookie_is_no_session(value):
    assert parse_session(value) is None


def test_cookies_are_httponly_samesite_strict_and_scoped_to_the_console():
    opts = cookie_options(secure=True)

    assert (opts["httponly"], opts["samesite"], opts["path"], opts["secure"]) == (
        True, "Strict", "/ui", True)  # fmt: skip


def test_plot_columns_are_rates_per_second_and_cores_from_the_quota():
    points = [
        {"t": "2026-11-29T10:00:00Z", "cpu_percent": 50.0, "mem_working_set": 100.0,
         "mem_limit": 256, "net_rx_bytes": 600, "net_tx_bytes": 60, "blk_read_bytes": 0,
         "blk_write_bytes": 6000},
        {"t": "2026-11-29T10:10:00Z", "cpu_percent": None},
    ]  # fmt: skip

    cols = plot_columns(points, 600, cpus=0.5)

    assert cols["t"] == [datetime(2026, 11, 29, 10, tzinfo=UTC).timestamp(), cols["t"][0] + 600]
    assert cols["cpu_percent"] == [50.0, None]
    assert cols["cpu_cores"] == [0.25, None]
    assert (cols["net_rx"][0], cols["net_tx"][0], cols["disk_write"][0]) == (1.0, 0.1, 10.0)
    assert cols["mem_limit"] == [256, None]


def test_owner_marks_are_clipped_to_the_window():
    start = datetime(2026, 11, 29, 10, tzinfo=UTC)
    end = datetime(2026, 11, 29, 11, tzinfo=UTC)
    owners = [
        {"machine_id": "m-old", "from": "2026-11-28T00:00:00Z", "until": "2026-11-29T10:30:00Z"},
        {"machine_id": "m-new", "from": "2026-11-29T10:31:00Z", "until": None},
    ]

    marks = owner_marks(owners, start, end)

    assert [(m["machine_id"], m["from"], m["until"]) for m in marks] == [
        ("m-old", start.timestamp(), start.timestamp() + 1800),
        ("m-new", start.timestamp() + 1860, end.timestamp()),
    ]


@pytest.mark.parametrize(
    ("name", "step"), [("1h", "10s"), ("1d", "1m"), ("1w", "10m"), ("x", "10s")]
)
def test_each_range_reads_at_most_about_a_thousand_points(name, step):
    rng, query = window(name, datetime(2026, 11, 29, tzinfo=UTC))

    assert query["step"] == step
    assert rng.seconds / rng.step_s <= 1440
    assert set(RANGES) == {"1h", "1d", "1w"}
