"""The gateway's access and accountability records: idempotency keys, API tokens, the audit log.

A part of :class:`~services.gateway.store.GatewayStore` (a base class of it, on the same
database), kept apart from the machines. How it copes with FerretDB v1: an idempotency key and a
token are each one insert under a unique ``_id`` (a second writer gets DuplicateKeyError and
reads the first); an audit entry is an insert of its own; the only update, a token's
revocation, sets one field that nothing else writes.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime
from typing import Any

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import DuplicateKeyError

from libs.common.clock import utcnow
from libs.common.db import read_all
from libs.common.errors import translate_errors

__all__ = ["AccessRecords", "hash_token"]


def hash_token(token: str) -> str:
    """The stored form of a bearer token (SHA-256; tokens are 32 random bytes)."""
    return hashlib.sha256(token.encode()).hexdigest()


class AccessRecords:
    """Idempotency keys, tokens and audit entries (the collections are set by the store)."""

    idempotency: AsyncCollection
    tokens: AsyncCollection
    audit: AsyncCollection

    # --- idempotency ------------------------------------------------------------------------

    @translate_errors
    async def get_idempotency(self, key: str) -> dict[str, Any] | None:
        """The earlier request recorded under ``key``, or None."""
        return await self.idempotency.find_one({"_id": key})

    @translate_errors
    async def claim_idempotency(
        self, key: str, fingerprint: str, machine_ids: list[str]
    ) -> dict[str, Any] | None:
        """Record the key with these ids; if it exists, return the earlier record instead."""
        try:
            await self.idempotency.insert_one(
                {"_id": key, "fingerprint": fingerprint, "ids": machine_ids, "at": utcnow()}
            )
            return None
        except DuplicateKeyError:
            return await self.idempotency.find_one({"_id": key})

    @translate_errors
    async def prune(self, idempotency_before: datetime, audit_before: datetime) -> tuple[int, int]:
        """Forget idempotency keys and audit entries older than the cutoffs; how many of each."""
        keys = await self.idempotency.delete_many({"at": {"$lt": idempotency_before}})
        audit = await self.audit.delete_many({"at": {"$lt": audit_before}})
        return keys.deleted_count, audit.deleted_count

    # --- tokens -----------------------------------------------------------------------------

    @translate_errors
    async def add_token(
        self, token: str, name: str, role: str, apps: list[str] | None = None
    ) -> dict[str, Any]:
        """Store a token (hashed), scoped to ``apps`` when given, and return its document."""
        doc = {
            "_id": secrets.token_hex(6),
            "hash": hash_token(token),
            "name": name,
            "role": role,
            "apps": apps,
            "created_at": utcnow(),
            "revoked": False,
        }
        await self.tokens.insert_one(doc)
        return doc

    @translate_errors
    async def token_by_secret(self, token: str) -> dict[str, Any] | None:
        """The live token with this secret, or None."""
        return await self.tokens.find_one({"hash": hash_token(token), "revoked": False})

    @translate_errors
    async def list_tokens(self) -> list[dict[str, Any]]:
        """Every token, oldest first."""
        return await read_all(self.tokens.find({}).sort("created_at", 1))

    @translate_errors
    async def revoke_token(self, token_id: str) -> bool:
        """Revoke a token; False when there is no such token."""
        res = await self.tokens.update_one({"_id": token_id}, {"$set": {"revoked": True}})
        return res.matched_count == 1

    @translate_errors
    async def has_admin(self) -> bool:
        """Whether a live admin token exists."""
        return await self.tokens.find_one({"role": "admin", "revoked": False}) is not None

    # --- audit ------------------------------------------------------------------------------

    @translate_errors
    async def audit_write(self, entry: dict[str, Any]) -> None:
        """Append one audit entry."""
        await self.audit.insert_one(entry)

    @translate_errors
    async def audit_list(self, limit: int, who: str | None = None) -> list[dict[str, Any]]:
        """The newest audit entries."""
        query = {"who": who} if who else {}
        return await read_all(self.audit.find(query).sort("at", -1).limit(limit))
