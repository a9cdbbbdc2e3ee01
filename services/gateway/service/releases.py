"""Rolling releases: the release system's request becomes per-machine deploys, batch by batch.

State lives in MongoDB (see :class:`~services.gateway.store.ReleaseStore`), so a restarted
gateway resumes a release where it was: :meth:`Releases.sweep` re-sends the deploys of the
current batch that were never sent, fails those that got no answer in time and finishes a step
whose taker died. Each step (the next batch, the end) is taken by exactly one caller, so
duplicate or concurrent results, on one gateway replica or several, move a release on once.

The end (``release.succeeded`` or ``release.failed``) is written with its event in one update
(the release's ``outbox``, see :mod:`..outbox`), then published: a publish that fails for good
is retried by the outbox relay, never lost. The event's id is ``<release_id>/end``, so an end
written twice (a repair racing a slow winner) is one message to a consumer that dedupes.
"""

from __future__ import annotations

from datetime import UTC, timedelta
from typing import Any, Protocol

import structlog

from libs.common.bus import Publisher, host_key
from libs.common.clock import utcnow
from libs.common.contracts.releases import (
    APP_COMMAND,
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

from ..documents import MachineDoc, ReleaseDoc
from ..domain import State
from ..domain.rollout import MachineStatus, ReleaseStatus, Verdict, batch_verdict, plan_batches
from ..outbox import OutboxRelay, outbox_entry
from ..store import MachineStore, ReleaseStore
from .checks import CheckDirectory, resolve_check

__all__ = ["ArtifactCheck", "MachineDirectory", "Releases", "StoreDirectory"]

log = structlog.get_logger("gateway.releases")

# The steps of a release that exactly one caller takes (see ReleaseStore.take_step).
_END = "end"


def _batch_step(index: int) -> str:
    """The step that starts batch ``index``."""
    return f"batch/{index}"


class MachineDirectory(Protocol):
    """Port: what a release needs to know of an app's machines."""

    async def app_exists(self, app: str) -> bool:
        """Whether the app has ever had a machine."""
        ...

    async def running(self, app: str) -> list[MachineDoc]:
        """The app's running machines (``_id``, ``type``, ``host``, ``ip``), oldest first."""
        ...


class ArtifactCheck(Protocol):
    """Port: does an artifact exist in the Maven repository (checked before any machine)."""

    async def check(self, a: Artifact) -> Any:
        """Raise NotFoundError if it does not, TransientError if the repository is down."""
        ...


def _spec(req: ReleaseRequested) -> dict[str, Any]:
    """The request as stored and compared (a replay with another spec is a conflict)."""
    return req.model_dump(mode="json", exclude={"release_id"})


def _plan(req: ReleaseRequested, requested_by: str, machines: list[MachineDoc]) -> ReleaseDoc:
    """A new release's document: its batches, and each machine pending where it runs."""
    batches = plan_batches([m["_id"] for m in machines], req.batch_size, req.batch_percent)
    at = utcnow()
    return {
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


class Releases:
    """Drives releases from request to ``release.succeeded`` or ``release.failed``."""

    def __init__(
        self,
        store: ReleaseStore,
        publisher: Publisher,
        machines: MachineDirectory,
        deploy_timeout_s: float = 600.0,
        artifacts: ArtifactCheck | None = None,
        checks: CheckDirectory | None = None,
        outbox: OutboxRelay | None = None,
    ) -> None:
        self._artifacts = artifacts
        self._checks = checks
        self._store = store
        self._publisher = publisher
        self._machines = machines
        self._timeout = timedelta(seconds=deploy_timeout_s)
        # Publishes the end event each release writes into its outbox.
        self.outbox = outbox or OutboxRelay(publisher, store, name="releases")

    async def request(self, req: ReleaseRequested, requested_by: str) -> ReleaseDoc:
        """Start ``req`` (idempotent by release_id); raise a DomainError for a bad request."""
        req = await resolve_check(req, self._checks)
        existing = await self._store.get(req.release_id)
        if existing is not None:
            if existing["spec"] != _spec(req):
                raise ConflictError(f"release {req.release_id} exists with another spec")
            return existing
        machines = await self._machines.running(req.app)
        if not machines:
            if not await self._machines.app_exists(req.app):
                raise NotFoundError(f"unknown app {req.app!r}")
            raise DomainError(
                f"app {req.app!r} has no running machines", reason="no_running_machines"
            )
        if self._artifacts is not None:
            # Checked once here, so a missing artifact or a dead repository changes no machine.
            await self._artifacts.check(req.artifact())
        doc = _plan(req, requested_by, machines)
        if not await self._store.insert(doc):
            return await self._store.get(req.release_id) or doc
        log.info(
            "release started",
            release_id=req.release_id,
            app=req.app,
            machines=len(machines),
            batches=len(doc["batches"]),
        )
        await self._dispatch(doc, 0)
        return await self._store.get(req.release_id) or doc

    async def _dispatch(self, doc: ReleaseDoc, index: int) -> None:
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
                        release_id=req.release_id,
                        machine_id=mid,
                        ip=machine.get("ip"),
                        artifact=req.artifact(),
                        health_check=req.health_check,
                        activate=req.activate,
                    )
                )
            else:
                await self._publisher.publish(
                    Deploy(
                        release_id=req.release_id,
                        machine_id=mid,
                        artifact=req.artifact(),
                        health_check=req.health_check,
                        restart_command=f"{APP_COMMAND} {req.activate}",
                    ),
                    routing_key=host_key(machine["host"], Deploy.TYPE),
                )
            await self._store.set_machine(
                doc["_id"],
                mid,
                MachineStatus.DEPLOYING,
                [MachineStatus.PENDING.value],
                sent_at=utcnow(),
            )
        log.info(
            "batch dispatched", release_id=doc["_id"], batch=index, machines=len(batch) - len(sent)
        )

    async def on_result(self, evt: DeploySucceeded | DeployFailed) -> None:
        """Record one machine's outcome and move the release on."""
        if evt.action != "deploy":
            return
        ok = isinstance(evt, DeploySucceeded)
        fields: dict[str, Any] = {"version": evt.version}
        if not ok:
            fields |= {"reason": evt.reason, "detail": evt.detail, "rolled_back": evt.rolled_back}
        moved = await self._store.set_machine(
            evt.release_id,
            evt.machine_id,
            MachineStatus.SUCCEEDED if ok else MachineStatus.FAILED,
            [MachineStatus.DEPLOYING.value, MachineStatus.PENDING.value],
            **fields,
        )
        log.info(
            "deploy result" if moved else "deploy result again (duplicate)",
            release_id=evt.release_id,
            machine_id=evt.machine_id,
            ok=ok,
        )
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
        statuses = {
            m: found[m]["status"] if m in found else MachineStatus.PENDING.value for m in batch
        }
        failed_before = doc.get("failed_before", 0)
        verdict = batch_verdict(batch, statuses, failed_before, doc["spec"]["max_failures"])
        if verdict == Verdict.WAIT:
            return
        failed_here = [m for m in batch if statuses[m] == MachineStatus.FAILED]
        if verdict == Verdict.STOP:
            earlier = [m for b in doc["batches"][:index] for m in b["machines"]]
            before = await self._store.statuses(release_id, earlier)
            failed = sorted(
                failed_here + [m for m, d in before.items() if d["status"] == MachineStatus.FAILED]
            )
            reason = f"{len(failed)} machine(s) failed, more than max_failures"
            if await self._store.take_step(release_id, _END) or repair:
                await self._end(
                    release_id,
                    {"status": ReleaseStatus.FAILED.value, "reason": reason},
                    ReleaseFailed(
                        release_id=release_id,
                        app=doc["app"],
                        version=doc["version"],
                        reason=reason,
                        failed_machines=failed,
                    ),
                )
                log.warning("release failed", release_id=release_id, failed=failed)
            return
        if index + 1 >= len(doc["batches"]):
            if await self._store.take_step(release_id, _END) or repair:
                await self._end(
                    release_id,
                    {"status": ReleaseStatus.SUCCEEDED.value},
                    ReleaseSucceeded(
                        release_id=release_id,
                        app=doc["app"],
                        version=doc["version"],
                        machines=len(doc["machines"]),
                    ),
                )
                log.info("release succeeded", release_id=release_id)
            return
        if await self._store.take_step(release_id, _batch_step(index + 1)) or repair:
            fields = {"current_batch": index + 1, "failed_before": failed_before + len(failed_here)}
            await self._store.update(release_id, fields)
            await self._dispatch({**doc, **fields}, index + 1)

    async def _end(
        self, release_id: str, fields: dict[str, Any], event: ReleaseSucceeded | ReleaseFailed
    ) -> None:
        """Write the release's end and its event in one update, then publish the event (best
        effort: what fails is the outbox relay's)."""
        entry = outbox_entry(event, id=f"{release_id}/{_END}")
        written = await self._store.update(
            release_id, {**fields, "finished_at": utcnow()}, outbox=[entry]
        )
        if written is not None:
            await self.outbox.flush(release_id, written.get("outbox") or [])

    async def sweep(self) -> None:
        """Resume after a restart: send unsent deploys, fail those past the timeout, and
        finish a step whose taker died."""
        cutoff = utcnow() - self._timeout
        for doc in await self._store.running():
            rid, index = doc["_id"], doc["current_batch"]
            await self._dispatch(doc, index)
            batch = doc["batches"][index]["machines"]
            for mid, m in (await self._store.statuses(rid, batch)).items():
                sent = m.get("sent_at") or m["at"]
                sent = sent if sent.tzinfo else sent.replace(tzinfo=UTC)
                if m["status"] == MachineStatus.DEPLOYING.value and sent < cutoff:
                    await self._store.set_machine(
                        rid,
                        mid,
                        MachineStatus.FAILED,
                        [MachineStatus.DEPLOYING.value],
                        reason="timeout",
                        detail="no deploy result in time",
                    )
            await self._progress(rid, repair=True)


class StoreDirectory:
    """:class:`MachineDirectory` over the gateway's machine store."""

    def __init__(self, store: MachineStore) -> None:
        self._store = store

    async def app_exists(self, app: str) -> bool:
        """An app exists once it has had a machine."""
        return await self._store.get_app(app) is not None or bool(
            await self._store.app_machines(app, active_only=False)
        )

    async def running(self, app: str) -> list[MachineDoc]:
        """The app's running machines, oldest first."""
        return [d for d in await self._store.app_machines(app) if d["state"] == State.RUNNING]
