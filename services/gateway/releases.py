"""Rolling releases: the release system's request becomes per-machine deploys, batch by batch.

State lives in the ``releases`` collection, so a restarted gateway resumes a release where it
was: :meth:`Releases.sweep` re-sends the deploys of the current batch that were never sent and
fails those that got no answer in time. Every step is a conditional update, so duplicate or
concurrent results advance a release once.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import structlog
from pymongo import DESCENDING, ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from libs.common.bus import Publisher, host_key
from libs.common.contracts.releases import (
    Artifact,
    Deploy,
    DeployFailed,
    DeploySucceeded,
    KvmDeployRequested,
    ReleaseFailed,
    ReleaseRequested,
    ReleaseSucceeded,
)
from libs.common.errors import ConflictError, DomainError, NotFoundError

from .domain.rollout import MachineStatus, ReleaseStatus, batch_verdict, plan_batches

__all__ = ["MachineDirectory", "ReleaseStore", "Releases", "StoreDirectory", "release_handlers"]

log = structlog.get_logger("gateway.releases")


def _now() -> datetime:
    return datetime.now(UTC)


class MachineDirectory(Protocol):
    """Port: what a release needs to know of an app's machines."""

    async def app_exists(self, app: str) -> bool:
        """Whether the app has ever had a machine."""
        ...

    async def running(self, app: str) -> list[dict[str, Any]]:
        """The app's running machines (``_id``, ``type``, ``host``, ``ip``), oldest first."""
        ...


class ArtifactCheck(Protocol):
    """Port: does an artifact exist in the Maven repository (checked before any machine)."""

    async def check(self, a: Artifact) -> Any:
        """Raise NotFoundError if it does not, TransientError if the repository is down."""
        ...


class ReleaseStore:
    """The ``releases`` collection: one document per release with a status per machine."""

    def __init__(self, db: AsyncDatabase) -> None:
        self.coll = db["releases"]

    async def setup(self) -> None:
        """Indexes for listing."""
        await self.coll.create_index([("app", 1), ("created_at", DESCENDING)])
        await self.coll.create_index([("status", 1)])

    async def insert(self, doc: dict[str, Any]) -> bool:
        """Insert a new release; False if its id exists already."""
        try:
            await self.coll.insert_one(doc)
            return True
        except DuplicateKeyError:
            return False

    async def get(self, release_id: str) -> dict[str, Any] | None:
        """One release."""
        return await self.coll.find_one({"_id": release_id})

    async def list(self, app: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Newest releases first."""
        query = {"app": app} if app else {}
        return await self.coll.find(query).sort("created_at", DESCENDING).limit(limit).to_list()

    async def running(self) -> list[dict[str, Any]]:
        """Releases still in progress."""
        return await self.coll.find({"status": ReleaseStatus.RUNNING.value}).to_list()

    async def set_machine(
        self, release_id: str, machine_id: str, status: MachineStatus, from_: list[str],
        **fields: Any,
    ) -> dict[str, Any] | None:
        """Move one machine to ``status`` if it is in one of ``from_``; the new doc or None."""
        key = f"machines.{machine_id}"
        update = {f"{key}.status": status.value, f"{key}.at": _now(), "updated_at": _now()}
        update |= {f"{key}.{k}": v for k, v in fields.items()}
        return await self.coll.find_one_and_update(
            {"_id": release_id, f"{key}.status": {"$in": from_}},
            {"$set": update},
            return_document=ReturnDocument.AFTER,
        )

    async def advance(self, release_id: str, from_batch: int) -> dict[str, Any] | None:
        """Move to the next batch, once: only the caller that sees ``from_batch`` wins."""
        return await self.coll.find_one_and_update(
            {"_id": release_id, "current_batch": from_batch, "status": ReleaseStatus.RUNNING.value},
            {"$set": {"current_batch": from_batch + 1, "updated_at": _now()}},
            return_document=ReturnDocument.AFTER,
        )

    async def finish(
        self, release_id: str, status: ReleaseStatus, reason: str | None = None
    ) -> dict[str, Any] | None:
        """End a running release, once."""
        return await self.coll.find_one_and_update(
            {"_id": release_id, "status": ReleaseStatus.RUNNING.value},
            {"$set": {"status": status.value, "reason": reason, "finished_at": _now(),
                      "updated_at": _now()}},
            return_document=ReturnDocument.AFTER,
        )


def _spec(req: ReleaseRequested) -> dict[str, Any]:
    return req.model_dump(mode="json", exclude={"release_id"})


class Releases:
    """Drives releases from request to ``release.succeeded`` or ``release.failed``."""

    def __init__(
        self,
        store: ReleaseStore,
        publisher: Publisher,
        machines: MachineDirectory,
        deploy_timeout_s: float = 600.0,
        artifacts: ArtifactCheck | None = None,
    ) -> None:
        self._artifacts = artifacts
        self._store = store
        self._publisher = publisher
        self._machines = machines
        self._timeout = timedelta(seconds=deploy_timeout_s)

    async def request(self, req: ReleaseRequested, requested_by: str) -> dict[str, Any]:
        """Start ``req`` (idempotent by release_id); raise a DomainError for a bad request."""
        existing = await self._store.get(req.release_id)
        if existing is not None:
            if existing["spec"] != _spec(req):
                raise ConflictError(f"release {req.release_id} exists with another spec")
            return existing
        machines = await self._machines.running(req.app)
        if not machines:
            if not await self._machines.app_exists(req.app):
                raise NotFoundError(f"unknown app {req.app!r}")
            raise DomainError(f"app {req.app!r} has no running machines",
                              reason="no_running_machines")
        if self._artifacts is not None:
            # Checked once here, so a missing artifact or a dead repository changes no machine.
            await self._artifacts.check(req.artifact())
        batches = plan_batches([m["_id"] for m in machines], req.batch_size, req.batch_percent)
        at = _now()
        doc = {
            "_id": req.release_id,
            "app": req.app,
            "version": req.version,
            "spec": _spec(req),
            "requested_by": requested_by,
            "status": ReleaseStatus.RUNNING.value,
            "reason": None,
            # FerretDB v1 stores no nested arrays, hence a document per batch.
            "batches": [{"machines": b} for b in batches],
            "current_batch": 0,
            "machines": {
                m["_id"]: {
                    "status": MachineStatus.PENDING.value,
                    "type": m.get("type", "docker"),
                    "host": m.get("host"),
                    "ip": m.get("ip"),
                    "at": at,
                }
                for m in machines
            },
            "created_at": at,
            "updated_at": at,
            "finished_at": None,
        }
        if not await self._store.insert(doc):
            return await self._store.get(req.release_id) or doc
        log.info("release started", release_id=req.release_id, app=req.app,
                 machines=len(machines), batches=len(batches))
        await self._dispatch(doc, 0)
        return await self._store.get(req.release_id) or doc

    async def _dispatch(self, doc: dict[str, Any], index: int) -> None:
        req = ReleaseRequested(release_id=doc["_id"], **doc["spec"])
        for mid in doc["batches"][index]["machines"]:
            machine = doc["machines"][mid]
            if machine["status"] != MachineStatus.PENDING.value:
                continue
            # Publish first, then mark: a crash in between re-sends the deploy on the next
            # sweep, and the host's deploy is idempotent, so nothing is lost or done twice.
            if machine["type"] == "kvm":
                await self._publisher.publish(
                    KvmDeployRequested(
                        release_id=req.release_id, machine_id=mid, ip=machine.get("ip"),
                        artifact=req.artifact(), health_check=req.health_check,
                    )
                )
            else:
                await self._publisher.publish(
                    Deploy(
                        release_id=req.release_id, machine_id=mid, artifact=req.artifact(),
                        health_check=req.health_check,
                    ),
                    routing_key=host_key(machine["host"], Deploy.TYPE),
                )
            await self._store.set_machine(
                doc["_id"], mid, MachineStatus.DEPLOYING, [MachineStatus.PENDING.value],
                sent_at=_now(),
            )

    async def on_result(self, evt: DeploySucceeded | DeployFailed) -> None:
        """Record one machine's outcome and move the release on."""
        if evt.action != "deploy":
            return
        ok = isinstance(evt, DeploySucceeded)
        fields: dict[str, Any] = {"version": evt.version}
        if not ok:
            fields |= {"reason": evt.reason, "detail": evt.detail, "rolled_back": evt.rolled_back}
        doc = await self._store.set_machine(
            evt.release_id, evt.machine_id,
            MachineStatus.SUCCEEDED if ok else MachineStatus.FAILED,
            [MachineStatus.DEPLOYING.value, MachineStatus.PENDING.value],
            **fields,
        )
        if doc is None:
            log.info("deploy result ignored (duplicate or unknown)", release_id=evt.release_id,
                     machine_id=evt.machine_id)
            return
        await self._progress(doc)

    async def _progress(self, doc: dict[str, Any]) -> None:
        if doc["status"] != ReleaseStatus.RUNNING.value:
            return
        index = doc["current_batch"]
        statuses = {mid: m["status"] for mid, m in doc["machines"].items()}
        earlier = {mid for batch in doc["batches"][:index] for mid in batch["machines"]}
        failed_before = sum(statuses[m] == MachineStatus.FAILED for m in earlier)
        verdict = batch_verdict(
            doc["batches"][index]["machines"], statuses, failed_before,
            doc["spec"]["max_failures"],
        )
        if verdict == "wait":
            return
        if verdict == "stop":
            failed = sorted(m for m, s in statuses.items() if s == MachineStatus.FAILED)
            reason = f"{len(failed)} machine(s) failed, more than max_failures"
            if await self._store.finish(doc["_id"], ReleaseStatus.FAILED, reason):
                log.warning("release failed", release_id=doc["_id"], failed=failed)
                await self._publisher.publish(
                    ReleaseFailed(release_id=doc["_id"], app=doc["app"], version=doc["version"],
                                  reason=reason, failed_machines=failed)
                )
            return
        if index + 1 >= len(doc["batches"]):
            if await self._store.finish(doc["_id"], ReleaseStatus.SUCCEEDED):
                log.info("release succeeded", release_id=doc["_id"])
                await self._publisher.publish(
                    ReleaseSucceeded(release_id=doc["_id"], app=doc["app"],
                                     version=doc["version"], machines=len(statuses))
                )
            return
        advanced = await self._store.advance(doc["_id"], index)
        if advanced is not None:
            await self._dispatch(advanced, index + 1)

    async def sweep(self) -> None:
        """Resume after a restart: send unsent deploys, fail those past the timeout."""
        cutoff = _now() - self._timeout
        for doc in await self._store.running():
            index = doc["current_batch"]
            await self._dispatch(doc, index)
            doc = await self._store.get(doc["_id"]) or doc
            for mid in doc["batches"][index]["machines"]:
                m = doc["machines"][mid]
                sent = m.get("sent_at") or m["at"]
                sent = sent if sent.tzinfo else sent.replace(tzinfo=UTC)
                if m["status"] == MachineStatus.DEPLOYING.value and sent < cutoff:
                    updated = await self._store.set_machine(
                        doc["_id"], mid, MachineStatus.FAILED, [MachineStatus.DEPLOYING.value],
                        reason="timeout", detail="no deploy result in time",
                    )
                    if updated is not None:
                        await self._progress(updated)
            fresh = await self._store.get(doc["_id"])
            if fresh is not None:
                await self._progress(fresh)


class StoreDirectory:
    """:class:`MachineDirectory` over the gateway's machine store."""

    def __init__(self, store: Any) -> None:
        self._store = store

    async def app_exists(self, app: str) -> bool:
        """An app exists once it has had a machine."""
        return await self._store.get_app(app) is not None or bool(
            await self._store.app_machines(app, active_only=False)
        )

    async def running(self, app: str) -> list[dict[str, Any]]:
        """The app's running machines, oldest first."""
        return [d for d in await self._store.app_machines(app) if d["state"] == "running"]


RELEASE_QUEUE = "gateway.releases"
RELEASE_BINDINGS = (ReleaseRequested.TYPE, DeploySucceeded.TYPE, DeployFailed.TYPE)


def release_handlers(releases: Releases) -> dict[str, Any]:
    """Bus entrypoints: the release system's request and the hosts' deploy results.

    Delivery guarantee: at least once; a request is idempotent by release_id and a result by
    the machine's status in the release, so redeliveries change nothing.
    """
    from libs.common.bus import MessageContext

    async def requested(msg: ReleaseRequested, ctx: MessageContext) -> None:
        try:
            await releases.request(msg, requested_by=ctx.envelope.source)
        except DomainError as err:
            # The release system hears back on its own channel rather than from a DLQ.
            await ctx.publish(
                ReleaseFailed(release_id=msg.release_id, app=msg.app, version=msg.version,
                              reason=f"{err.reason}: {err}")
            )

    async def result(msg: DeploySucceeded | DeployFailed, ctx: MessageContext) -> None:
        await releases.on_result(msg)

    return {ReleaseRequested.TYPE: requested, DeploySucceeded.TYPE: result,
            DeployFailed.TYPE: result}
