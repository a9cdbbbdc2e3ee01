"""Rolling releases: the release system's request becomes per-machine deploys, batch by batch.

State lives in MongoDB (see :class:`ReleaseStore`), so a restarted gateway resumes a release
where it was: :meth:`Releases.sweep` re-sends the deploys of the current batch that were never
sent, fails those that got no answer in time and finishes a step whose taker died. Each step
(the next batch, the end) is taken by exactly one caller, so duplicate or concurrent results,
on one gateway replica or several, move a release on once.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import structlog
from pymongo import DESCENDING
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
    """Releases, stored so that concurrent writers never touch the same document.

    FerretDB v1 applies two concurrent updates of one document as read-modify-write, so one is
    lost; results of one batch arrive together, from two gateway replicas as easily as from one.
    Hence three collections:

    - ``releases``: the plan, written once (spec, batches, each machine's host and IP), plus
      ``current_batch``/``status``, written only by the winner of a step below;
    - ``release_machines``: one document per (release, machine) with its deploy status; a
      machine with none is pending;
    - ``release_steps``: ``<release>/batch/<n>`` and ``<release>/end``, whose unique ``_id``
      elects the one caller that moves the release on.
    """

    def __init__(self, db: AsyncDatabase) -> None:
        self.coll = db["releases"]
        self.machines = db["release_machines"]
        self.steps = db["release_steps"]

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

    async def plan(self, release_id: str) -> dict[str, Any] | None:
        """The release document alone, without machine statuses."""
        return await self.coll.find_one({"_id": release_id})

    async def statuses(
        self, release_id: str, machine_ids: list[str]
    ) -> dict[str, dict[str, Any]]:
        """The status documents of these machines (by ``_id``: the one lookup FerretDB v1
        indexes); a machine without one is absent."""
        docs = await asyncio.gather(
            *(self.machines.find_one({"_id": f"{release_id}/{m}"}) for m in machine_ids)
        )
        return {d["machine_id"]: d for d in docs if d is not None}

    async def _with_statuses(self, doc: dict[str, Any]) -> dict[str, Any]:
        found = await self.statuses(doc["_id"], list(doc["machines"]))
        machines = {}
        for mid, static in doc["machines"].items():
            status = found.get(mid, {})
            machines[mid] = {**static, **{k: v for k, v in status.items()
                                          if k not in ("_id", "release_id", "machine_id")}}
        latest = max((m["at"] for m in found.values()), default=doc["updated_at"])
        return {**doc, "machines": machines, "updated_at": max(doc["updated_at"], latest)}

    async def get(self, release_id: str) -> dict[str, Any] | None:
        """One release with the status of each of its machines."""
        doc = await self.plan(release_id)
        return None if doc is None else await self._with_statuses(doc)

    async def list(self, app: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        """Newest releases first."""
        query = {"app": app} if app else {}
        docs = await self.coll.find(query).sort("created_at", DESCENDING).limit(limit).to_list()
        return list(await asyncio.gather(*(self._with_statuses(d) for d in docs)))

    async def running(self) -> list[dict[str, Any]]:
        """Releases still in progress (plans only)."""
        return await self.coll.find({"status": ReleaseStatus.RUNNING.value}).to_list()

    async def set_machine(
        self, release_id: str, machine_id: str, status: MachineStatus, from_: list[str],
        **fields: Any,
    ) -> bool:
        """Move one machine to ``status`` if it is in one of ``from_``; whether it moved."""
        update = {"status": status.value, "at": _now(), **fields}
        key = f"{release_id}/{machine_id}"
        if MachineStatus.PENDING.value in from_:
            try:
                await self.machines.insert_one(
                    {"_id": key, "release_id": release_id, "machine_id": machine_id, **update}
                )
                return True
            except DuplicateKeyError:
                pass  # no longer pending
        moved = await self.machines.find_one_and_update(
            {"_id": key, "status": {"$in": [s for s in from_ if s != MachineStatus.PENDING]}},
            {"$set": update},
        )
        return moved is not None

    async def take_step(self, release_id: str, step: str) -> bool:
        """Elect the caller that takes ``step`` (``batch/<n>`` or ``end``); True once."""
        try:
            await self.steps.insert_one({"_id": f"{release_id}/{step}", "at": _now()})
            return True
        except DuplicateKeyError:
            return False

    async def update(self, release_id: str, fields: dict[str, Any]) -> None:
        """Write the release-level fields a step's winner owns."""
        await self.coll.update_one({"_id": release_id}, {"$set": {**fields, "updated_at": _now()}})


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
            "failed_before": 0,  # failures in the batches before current_batch
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
        """Send the deploys of batch ``index`` that were never sent."""
        req = ReleaseRequested(release_id=doc["_id"], **doc["spec"])
        batch = doc["batches"][index]["machines"]
        sent = await self._store.statuses(doc["_id"], batch)
        for mid in batch:
            if mid in sent:
                continue
            machine = doc["machines"][mid]
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
        log.info("batch dispatched", release_id=doc["_id"], batch=index,
                 machines=len(batch) - len(sent))

    async def on_result(self, evt: DeploySucceeded | DeployFailed) -> None:
        """Record one machine's outcome and move the release on."""
        if evt.action != "deploy":
            return
        ok = isinstance(evt, DeploySucceeded)
        fields: dict[str, Any] = {"version": evt.version}
        if not ok:
            fields |= {"reason": evt.reason, "detail": evt.detail, "rolled_back": evt.rolled_back}
        moved = await self._store.set_machine(
            evt.release_id, evt.machine_id,
            MachineStatus.SUCCEEDED if ok else MachineStatus.FAILED,
            [MachineStatus.DEPLOYING.value, MachineStatus.PENDING.value],
            **fields,
        )
        log.info("deploy result" if moved else "deploy result again (duplicate)",
                 release_id=evt.release_id, machine_id=evt.machine_id, ok=ok)
        # Also after a duplicate: its first delivery may have died before moving the release
        # on, and every step below happens once whoever calls it.
        await self._progress(evt.release_id)

    async def _progress(self, release_id: str, repair: bool = False) -> None:
        """Move the release on if its current batch is done. Each step (next batch, end) is
        taken by one caller; ``repair`` (the sweep) also finishes a step whose taker died."""
        doc = await self._store.plan(release_id)
        if doc is None or doc["status"] != ReleaseStatus.RUNNING.value:
            return
        index = doc["current_batch"]
        batch = doc["batches"][index]["machines"]
        found = await self._store.statuses(release_id, batch)
        statuses = {m: found[m]["status"] if m in found else MachineStatus.PENDING.value
                    for m in batch}
        failed_before = doc.get("failed_before", 0)
        verdict = batch_verdict(batch, statuses, failed_before, doc["spec"]["max_failures"])
        if verdict == "wait":
            return
        failed_here = [m for m in batch if statuses[m] == MachineStatus.FAILED]
        if verdict == "stop":
            earlier = [m for b in doc["batches"][:index] for m in b["machines"]]
            before = await self._store.statuses(release_id, earlier)
            failed = sorted(failed_here + [m for m, d in before.items()
                                           if d["status"] == MachineStatus.FAILED])
            reason = f"{len(failed)} machine(s) failed, more than max_failures"
            if await self._store.take_step(release_id, "end") or repair:
                await self._store.update(release_id, {
                    "status": ReleaseStatus.FAILED.value, "reason": reason,
                    "finished_at": _now()})
                log.warning("release failed", release_id=release_id, failed=failed)
                await self._publisher.publish(
                    ReleaseFailed(release_id=release_id, app=doc["app"], version=doc["version"],
                                  reason=reason, failed_machines=failed)
                )
            return
        if index + 1 >= len(doc["batches"]):
            if await self._store.take_step(release_id, "end") or repair:
                await self._store.update(release_id, {
                    "status": ReleaseStatus.SUCCEEDED.value, "finished_at": _now()})
                log.info("release succeeded", release_id=release_id)
                await self._publisher.publish(
                    ReleaseSucceeded(release_id=release_id, app=doc["app"],
                                     version=doc["version"], machines=len(doc["machines"]))
                )
            return
        if await self._store.take_step(release_id, f"batch/{index + 1}") or repair:
            fields = {"current_batch": index + 1, "failed_before": failed_before + len(failed_here)}
            await self._store.update(release_id, fields)
            await self._dispatch({**doc, **fields}, index + 1)

    async def sweep(self) -> None:
        """Resume after a restart: send unsent deploys, fail those past the timeout, and
        finish a step whose taker died."""
        cutoff = _now() - self._timeout
        for doc in await self._store.running():
            rid, index = doc["_id"], doc["current_batch"]
            await self._dispatch(doc, index)
            batch = doc["batches"][index]["machines"]
            for mid, m in (await self._store.statuses(rid, batch)).items():
                sent = m.get("sent_at") or m["at"]
                sent = sent if sent.tzinfo else sent.replace(tzinfo=UTC)
                if m["status"] == MachineStatus.DEPLOYING.value and sent < cutoff:
                    await self._store.set_machine(
                        rid, mid, MachineStatus.FAILED, [MachineStatus.DEPLOYING.value],
                        reason="timeout", detail="no deploy result in time",
                    )
            await self._progress(rid, repair=True)


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
