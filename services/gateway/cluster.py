"""The control plane's identity: one cluster id, made once and stored in the gateway's database.

Every ``machines.known`` the gateway sends carries it. An agent adopts the first id it hears and
ignores lists of any other, so a gateway started on an empty or wrong database (a typo in
``DOCKVM_MONGO_DB``, an old backup without it, a staging gateway on the same vhost) makes a new id
that no agent follows, and cannot have them quarantine what it does not know.

How it copes with FerretDB v1: the id is claimed by inserting ``{_id: "cluster"}``. An insert under
the unique ``_id`` is the one atomic arbiter FerretDB v1 keeps, so of two replicas starting at
once on an empty database exactly one insert succeeds, the other gets a duplicate key, and both
read back the winner's id. The document is written once and never updated (no lost update can
change it).
"""

from __future__ import annotations

import uuid

import structlog
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from libs.common.clock import utcnow
from libs.common.errors import TransientError, translate_errors

__all__ = ["CLUSTER", "ClusterStore"]

log = structlog.get_logger("gateway.cluster")

CLUSTER = "cluster"
_ID = "cluster"


class ClusterStore:
    """The one ``cluster`` document: ``{_id: "cluster", cluster_id, created_at}``."""

    def __init__(self, db: AsyncDatabase) -> None:
        self.coll = db[CLUSTER]

    @translate_errors
    async def ensure(self) -> str:
        """The stored cluster id, made and stored first if there is none."""
        doc = await self.coll.find_one({"_id": _ID})
        if doc is None:
            made = uuid.uuid4().hex
            try:
                await self.coll.insert_one({"_id": _ID, "cluster_id": made, "created_at": utcnow()})
                log.warning("new cluster id made: agents of another ignore us", cluster_id=made)
            except DuplicateKeyError:
                pass  # another replica's insert won: use its id
            doc = await self.coll.find_one({"_id": _ID})
        if doc is None:
            raise TransientError("the cluster document was not readable after its insert")
        return str(doc["cluster_id"])
