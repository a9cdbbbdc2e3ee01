"""Replication jobs and the catalog reconcile: the one coordinator that talks to registries.

Delivery guarantee: a job runs at least once per ``image.sync`` delivery and has one effect
per natural key (source, target, repo, tag, digest): a done job is not run again, and a
running one is claimed by a single worker (a lease in MongoDB). Transient errors are retried
with tenacity's exponential backoff; after ``sync_attempts`` the job fails and
``image.sync_failed`` is emitted. ``image.replicated`` follows every tag written.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import structlog
from prometheus_client import Counter
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt
from tenacity import wait_exponential_jitter as wait_exp

from libs.common.contracts import Message
from libs.common.contracts.imagesync import ImageReplicated, ImageSync, ImageSyncFailed
from libs.common.errors import DomainError, TransientError

from .catalog import RepositoryNames
from .copier import Copier
from .domain import SyncOrder, SyncStats, plan_reconcile
from .ports import Registry
from .store import SyncStore

__all__ = ["RetryPolicy", "SyncService"]

log = structlog.get_logger("imagesync.service")
_JOBS = Counter("dockvm_imagesync_jobs_total", "Replication jobs by outcome", ["target", "outcome"])

Publish = Callable[[Message], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How hard one job tries before it fails for good."""

    attempts: int = 6
    initial_s: float = 0.5
    max_s: float = 30.0
    # A running job renews its lease every lease_s / 3; a worker that died without releasing
    # it (SIGKILL) leaves the job claimable again after lease_s.
    lease_s: float = 60.0


class SyncService:
    """Runs copies between the registries of the topology and plans the catalog reconcile."""

    def __init__(
        self,
        registries: Sequence[Registry],
        store: SyncStore,
        copier: Copier,
        policy: RetryPolicy,
        max_concurrent_jobs: int = 4,
        names_max_age_s: float = 0.0,
    ) -> None:
        self.registries: dict[str, Registry] = {r.dc: r for r in registries}
        # Shared with the listing API: a walk of a registry's catalog costs seconds on S3.
        self.names = RepositoryNames(self.registries, names_max_age_s)
        self._store = store
        self._copier = copier
        self._policy = policy
        self._slots = asyncio.Semaphore(max_concurrent_jobs)
        self._running: dict[str, asyncio.Task] = {}

    def by_host(self, host: str) -> Registry | None:
        """The registry serving ``host:port``."""
        return next((r for r in self.registries.values() if r.host == host), None)

    def targets_of(self, source: str) -> list[str]:
        """Every other dc of the topology."""
        return [dc for dc in self.registries if dc != source]

    def _retrying(self) -> AsyncRetrying:
        return AsyncRetrying(
            retry=retry_if_exception_type(TransientError),
            wait=wait_exp(multiplier=self._policy.initial_s, max=self._policy.max_s),
            stop=stop_after_attempt(self._policy.attempts),
            reraise=True,
        )

    async def sync(self, cmd: ImageSync, publish: Publish) -> dict | None:
        """Run the copy ``cmd`` asks for; return the finished job (None if not run here)."""
        src, dst = self.registries.get(cmd.source), self.registries.get(cmd.target)
        if src is None or dst is None or src is dst:
            await publish(
                ImageSyncFailed(
                    registry=dst.host if dst else "",
                    dc=cmd.target,
                    source_dc=cmd.source,
                    repo=cmd.repo,
                    tag=cmd.tag,
                    digest=cmd.digest,
                    reason="unknown_dc",
                    detail=f"topology has {sorted(self.registries)}",
                )
            )
            return None
        digest = cmd.digest
        if digest is None:
            digest = await self._resolve(src, cmd, publish)
            if digest is None:
                return None
        order = SyncOrder(cmd.source, cmd.target, cmd.repo, cmd.tag, digest)
        async with self._slots:
            job = await self._store.claim(order, cmd.reason, self._policy.lease_s)
            if job is None:
                log.info(
                    "job finished already or held by another worker",
                    repo=order.repo,
                    tag=order.tag,
                    target=order.target,
                )
                return None
            return await self._run(order, job["_id"], src, dst, publish)

    async def _resolve(self, src: Registry, cmd: ImageSync, publish: Publish) -> str | None:
        try:
            async for attempt in self._retrying():
                with attempt:
                    digest = await src.manifest_digest(cmd.repo, cmd.tag)
        except TransientError as err:
            digest, reason, detail = None, "source_unavailable", str(err)
        else:
            reason, detail = "not_found", f"{cmd.repo}:{cmd.tag} not found in {cmd.source}"
        if digest is None:
            await publish(
                ImageSyncFailed(
                    registry=self.registries[cmd.target].host,
                    dc=cmd.target,
                    source_dc=cmd.source,
                    repo=cmd.repo,
                    tag=cmd.tag,
                    reason=reason,
                    detail=detail,
                )
            )
        return digest

    async def shutdown(self) -> None:
        """Stop the copies still running; their jobs go back to pending for another worker."""
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _keep_lease(self, jid: str) -> None:
        while True:
            await asyncio.sleep(self._policy.lease_s / 3)
            try:
                await self._store.renew(jid, self._policy.lease_s)
            except Exception as err:  # the next beat tries again; the copy goes on meanwhile
                log.warning("lease renewal failed", job=jid, error=repr(err))

    async def _run(
        self, order: SyncOrder, jid: str, src: Registry, dst: Registry, publish: Publish
    ) -> dict | None:
        task = asyncio.current_task()
        if task is not None:
            self._running[jid] = task
        heartbeat = asyncio.ensure_future(self._keep_lease(jid))
        stats = SyncStats()
        try:
            return await self._attempts(order, jid, src, dst, publish, stats)
        except asyncio.CancelledError:
            # Hand the job back before the message is requeued, so a redelivery can claim it.
            await asyncio.shield(self._store.release(jid, stats))
            log.warning("job interrupted, released", job=jid)
            raise
        finally:
            heartbeat.cancel()
            self._running.pop(jid, None)

    async def _attempts(
        self,
        order: SyncOrder,
        jid: str,
        src: Registry,
        dst: Registry,
        publish: Publish,
        stats: SyncStats,
    ) -> dict | None:
        error: DomainError | TransientError | None = None
        log.info(
            "job started",
            job=jid,
            source=order.source,
            target=order.target,
            repo=order.repo,
            tag=order.tag,
            digest=order.digest,
        )
        try:
            async for attempt in self._retrying():
                with attempt:
                    if attempt.retry_state.attempt_number > 1:  # the claim counted the first
                        await self._store.attempt(jid, self._policy.lease_s)
                    try:
                        await self._copier.copy(
                            src, dst, order.repo, order.tag, order.digest, stats
                        )
                    except TransientError as err:
                        log.warning("attempt failed, will retry", job=jid, error=str(err))
                        raise
        except (DomainError, TransientError) as err:
            error = err
        except Exception as err:  # a bug must not leave the job "running" until its lease ends
            log.exception("job crashed", job=jid)
            error = DomainError(f"internal error: {err!r}", reason="internal_error")

        if error is not None:
            reason = error.reason if isinstance(error, DomainError) else "unreachable"
            job = await self._store.finish(jid, "failed", stats, f"{reason}: {error}")
            _JOBS.labels(order.target, "failed").inc()
            log.error("job failed", job=jid, reason=reason, error=str(error))
            await publish(
                ImageSyncFailed(
                    registry=dst.host,
                    dc=order.target,
                    source_dc=order.source,
                    repo=order.repo,
                    tag=order.tag,
                    digest=order.digest,
                    reason=reason,
                    detail=str(error)[:2000],
                    attempts=job["attempts"] if job else 0,
                )
            )
            return job

        if stats.superseded:
            _JOBS.labels(order.target, "superseded").inc()
            return await self._store.finish(jid, "superseded", stats, "a newer push of the tag")
        job = await self._store.finish(jid, "done", stats)
        self.names.learn(order.target, order.repo)
        await self._store.remember_tag(order.repo, order.tag, order.digest, order.source)
        _JOBS.labels(order.target, "done").inc()
        log.info("job done", job=jid, **stats.as_doc(), already=stats.already_present)
        if not stats.already_present:
            await publish(
                ImageReplicated(
                    registry=dst.host,
                    dc=order.target,
                    repo=order.repo,
                    tag=order.tag,
                    digest=order.digest,
                    ref=f"{dst.host}/{order.repo}:{order.tag}",
                    source_dc=order.source,
                    bytes_copied=stats.bytes_copied,
                )
            )
        return job

    # --- catalog reconcile --------------------------------------------------------------

    async def _listing(self, reg: Registry) -> dict[tuple[str, str], str]:
        out: dict[tuple[str, str], str] = {}
        sem = asyncio.Semaphore(8)

        async def head(repo: str, tag: str) -> None:
            async with sem:
                digest = await reg.manifest_digest(repo, tag)
            if digest is not None:
                out[(repo, tag)] = digest

        for repo in await self.names.walk(reg.dc):
            tags = await reg.tags(repo)
            await asyncio.gather(*(head(repo, t) for t in tags))
        return out

    async def reconcile(self) -> list[SyncOrder]:
        """Walk every registry's catalog and return the copies that bring them level."""
        listing: dict[str, Mapping[tuple[str, str], str]] = {}
        for dc, reg in self.registries.items():
            try:
                listing[dc] = await self._listing(reg)
            except (TransientError, DomainError) as err:
                # An unreachable registry is left out of this round, as source and as target.
                log.warning("reconcile skips a registry", dc=dc, error=str(err))
        plan = plan_reconcile(listing, await self._store.tag_history(), order=list(listing))
        for repo, tag, held in plan.conflicts:
            log.warning(
                "tag differs between registries, newest unknown", repo=repo, tag=tag, digests=held
            )
        log.info(
            "reconcile planned",
            registries=list(listing),
            copies=len(plan.orders),
            conflicts=len(plan.conflicts),
        )
        return plan.orders
