"""The health checks ops declare per app, which releases name (see :mod:`.service.checks`).

One document per check, ``_id`` = ``<app>/<name>``, in its own collection rather than inside the
app's document: the create saga rewrites the app's spec, and FerretDB v1 runs an update as a read
then a whole-document write, so two writers of one document can lose each other's change. Here a
declaration replaces its own document whole (the last declaration wins, which is what a PUT
means), and a concurrent first declaration that loses the upsert's insert race is retried as a
plain replace.
"""

from __future__ import annotations

from typing import Any

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from libs.common.clock import utcnow
from libs.common.db import read_all
from libs.common.errors import translate_errors

__all__ = ["APP_CHECKS", "AppCheckStore", "check_doc"]

APP_CHECKS = "app_checks"


def check_doc(app: str, name: str, check: dict[str, Any], by: str) -> dict[str, Any]:
    """The stored form of a declaration."""
    return {
        "_id": f"{app}/{name}",
        "app": app,
        "name": name,
        "type": check["type"],
        "target": check["target"],
        "timeout_s": check["timeout_s"],
        "fail_after": check.get("fail_after"),
        "declared_by": by,
        "updated_at": utcnow(),
    }


class AppCheckStore:
    """Declared health checks in MongoDB."""

    def __init__(self, db: AsyncDatabase) -> None:
        self.coll = db[APP_CHECKS]

    @translate_errors
    async def declare(self, app: str, name: str, check: dict[str, Any], by: str) -> dict[str, Any]:
        """Declare (or replace) the check ``name`` of ``app``; the stored document."""
        doc = check_doc(app, name, check, by)
        try:
            await self.coll.replace_one({"_id": doc["_id"]}, doc, upsert=True)
        except DuplicateKeyError:
            await self.coll.replace_one({"_id": doc["_id"]}, doc)
        return doc

    @translate_errors
    async def app_check(self, app: str, name: str) -> dict[str, Any] | None:
        """The declared check, or None."""
        return await self.coll.find_one({"_id": f"{app}/{name}"})

    @translate_errors
    async def app_checks(self, app: str) -> list[dict[str, Any]]:
        """Every check declared for ``app``, by name."""
        docs = await read_all(self.coll.find({"app": app}))
        return sorted(docs, key=lambda d: d["name"])

    @translate_errors
    async def withdraw(self, app: str, name: str) -> bool:
        """Forget a declaration; False when there was none."""
        res = await self.coll.delete_one({"_id": f"{app}/{name}"})
        return res.deleted_count == 1
