"""The image policy's versions (collection ``image_policies``), owned by the gateway.

Each ``PUT /v1/images/policy`` inserts a new document whose ``_id`` is the next version number;
nothing is ever updated. On FerretDB v1 an insert under a unique index (``_id``) is the only
arbiter: of two concurrent PUTs reading the same latest version, one insert wins and the other
gets a 409 naming the version that beat it, never a silently lost change. Before any PUT the
shipped :data:`~libs.common.contracts.builder.DEFAULT_POLICY` is version 0 (not stored).
The collection holds one small document per change: reading it whole to find the latest is a
scan of a few rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from libs.common.clock import utcnow
from libs.common.contracts.builder import DEFAULT_POLICY, ImagePolicy
from libs.common.db import read_all
from libs.common.errors import ConflictError

__all__ = ["MemoryPolicyStore", "PolicyStore", "PolicyVersion", "PolicyVersions"]


@dataclass(frozen=True, slots=True)
class PolicyVersion:
    """One version of the policy, who set it and when (version 0: the shipped default)."""

    version: int
    policy: ImagePolicy
    set_by: str
    set_at: datetime | None

    def out(self) -> dict[str, Any]:
        """As the API shows it."""
        return {
            "version": self.version,
            "set_by": self.set_by,
            "set_at": self.set_at.isoformat() if self.set_at else None,
            "policy": self.policy.model_dump(mode="json"),
        }


class PolicyVersions(Protocol):
    """Port: the policy's versions."""

    async def current(self) -> PolicyVersion:
        """The latest version (the default when none was set)."""
        ...

    async def put(self, policy: ImagePolicy, who: str, after: int) -> PolicyVersion:
        """Store ``policy`` as version ``after + 1``; 409 if another change took that number."""
        ...


_DEFAULT = PolicyVersion(0, DEFAULT_POLICY, "dockvm", None)


def _version(doc: dict[str, Any]) -> PolicyVersion:
    return PolicyVersion(
        doc["_id"], ImagePolicy.model_validate(doc["policy"]), doc["set_by"], doc["set_at"]
    )


class PolicyStore:
    """The policy's versions on MongoDB / FerretDB v1."""

    def __init__(self, db: AsyncDatabase) -> None:
        self.coll = db["image_policies"]

    async def current(self) -> PolicyVersion:
        """The latest version (the default when none was set)."""
        docs = await read_all(self.coll.find({}, {"_id": 1}))
        if not docs:
            return _DEFAULT
        latest = await self.coll.find_one({"_id": max(d["_id"] for d in docs)})
        return _version(latest) if latest else _DEFAULT

    async def put(self, policy: ImagePolicy, who: str, after: int) -> PolicyVersion:
        """Store ``policy`` as version ``after + 1``; 409 if another change took that number."""
        doc = {
            "_id": after + 1,
            "policy": policy.model_dump(mode="json"),
            "set_by": who,
            "set_at": utcnow(),
        }
        try:
            await self.coll.insert_one(doc)
        except DuplicateKeyError as err:
            raise ConflictError(
                f"the policy changed meanwhile (version {after + 1} exists): read it and retry",
                reason="policy_changed",
            ) from err
        return _version(doc)


class MemoryPolicyStore:
    """In-memory :class:`PolicyVersions` for unit tests."""

    def __init__(self) -> None:
        self.versions: dict[int, PolicyVersion] = {}

    async def current(self) -> PolicyVersion:
        """The latest version (the default when none was set)."""
        return self.versions[max(self.versions)] if self.versions else _DEFAULT

    async def put(self, policy: ImagePolicy, who: str, after: int) -> PolicyVersion:
        """Store ``policy`` as version ``after + 1``; 409 if another change took that number."""
        if after + 1 in self.versions:
            raise ConflictError(f"version {after + 1} exists", reason="policy_changed")
        self.versions[after + 1] = PolicyVersion(after + 1, policy, who, utcnow())
        return self.versions[after + 1]
