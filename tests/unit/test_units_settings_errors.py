"""Sizes, settings loading, and the translation of library errors at the boundary."""

from __future__ import annotations

import docker.errors
import pymongo.errors
import pytest

from libs.common.errors import (
    ConflictError,
    DomainError,
    NotFoundError,
    TransientError,
    translate_errors,
)
from libs.common.settings import HostAgentSettings, SettingsError, load_settings
from libs.common.units import format_bytes, parse_bytes
from services.ipam.settings import IpamSettings


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("512m", 512 << 20),
        ("4g", 4 << 30),
        ("4G", 4 << 30),
        ("1.5g", 3 << 29),
        ("4GiB", 4 << 30),
        ("1024", 1024),
        (2048, 2048),
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "g", "4x", "-1g", "0", True, "1e9"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError):
        parse_bytes(text)


@pytest.mark.parametrize(("n", "text"), [(512 << 20, "512m"), (4 << 30, "4g"), (1000, "1000")])
def test_format_bytes(n, text):
    assert format_bytes(n) == text


def test_settings_error_names_the_variable(monkeypatch):
    monkeypatch.setenv("DOCKVM_PREFETCH", "lots")
    monkeypatch.setenv("DOCKVM_IPAM_PORT", "70000")

    with pytest.raises(SettingsError) as info:
        load_settings(IpamSettings)

    assert "invalid setting DOCKVM_PREFETCH" in str(info.value)
    assert "invalid setting DOCKVM_IPAM_PORT" in str(info.value)


def test_service_port_has_its_own_variable(monkeypatch):
    monkeypatch.setenv("DOCKVM_IPAM_PORT", "9999")

    assert load_settings(IpamSettings).port == 9999


def test_host_id_is_validated(monkeypatch):
    with pytest.raises(SettingsError, match="DOCKVM_HOST_ID"):
        load_settings(HostAgentSettings, host_id="Not A Host")


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (pymongo.errors.DuplicateKeyError("E11000"), ConflictError),
        (pymongo.errors.AutoReconnect("gone"), TransientError),
        (pymongo.errors.ServerSelectionTimeoutError("no server"), TransientError),
        # FerretDB's SQLite backend under concurrent writes (seen on 100 parallel DELETEs).
        (
            pymongo.errors.OperationFailure(
                "[collection.go:191 sqlite.(*collection).UpdateAll] database is locked (5) "
                "(SQLITE_BUSY)",
                code=1,
            ),
            TransientError,
        ),
        (pymongo.errors.OperationFailure("shutting down", code=91), TransientError),
        (docker.errors.ImageNotFound("no such image"), NotFoundError),
        (docker.errors.APIError("boom", response=None), TransientError),
        (ConnectionRefusedError(), TransientError),
        (TimeoutError(), TransientError),
    ],
)
async def test_translate_errors_maps_library_errors(raised, expected):
    @translate_errors
    async def call() -> None:
        raise raised

    with pytest.raises(expected) as info:
        await call()

    assert info.value.__cause__ is raised


def test_translate_errors_leaves_a_real_operation_failure_alone():
    """A bad query is a bug to see, not something to retry."""

    @translate_errors
    def call() -> None:
        raise pymongo.errors.OperationFailure("unknown operator: $foo", code=2)

    with pytest.raises(pymongo.errors.OperationFailure):
        call()


def test_translate_errors_leaves_unknown_errors_alone():
    @translate_errors
    def call() -> None:
        raise KeyError("bug")

    with pytest.raises(KeyError):
        call()


def test_domain_error_carries_a_reason():
    err = DomainError("the pool is full", reason="pool_exhausted")

    assert (err.reason, err.message) == ("pool_exhausted", "the pool is full")
