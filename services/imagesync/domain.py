"""Pure decisions of imagesync: which registry events to act on, what a manifest references,
what a catalog walk must copy, and how a job is keyed. No I/O here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from libs.common.errors import DomainError, ValidationFailed

__all__ = [
    "EVENTS_MEDIA_TYPE",
    "INDEX_TYPES",
    "MANIFEST_TYPES",
    "USER_AGENT",
    "Descriptor",
    "Ignored",
    "Manifest",
    "PushedManifest",
    "ReconcilePlan",
    "SyncOrder",
    "SyncStats",
    "UnsupportedManifest",
    "add_to_history",
    "classify_event",
    "digest_of",
    "event_host",
    "job_id",
    "parse_envelope",
    "plan_reconcile",
    "push_key",
]

EVENTS_MEDIA_TYPE = "application/vnd.docker.distribution.events.v1+json"
# Our own pushes carry this user agent; their notifications must not be replicated again.
USER_AGENT = "dockvm-imagesync/1"

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
IMAGE_TYPES = frozenset({DOCKER_MANIFEST, OCI_MANIFEST})
INDEX_TYPES = frozenset({DOCKER_LIST, OCI_INDEX})
MANIFEST_TYPES = IMAGE_TYPES | INDEX_TYPES
_FOREIGN_LAYERS = frozenset(
    {
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    }
)


class UnsupportedManifest(DomainError):
    """A manifest type imagesync does not copy (schema 1, an unknown artifact)."""

    reason = "unsupported_manifest"


def digest_of(data: bytes) -> str:
    """The sha256 content digest of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class Descriptor:
    """A content reference inside a manifest."""

    media_type: str
    digest: str
    size: int
    foreign: bool = False


@dataclass(frozen=True, slots=True)
class Manifest:
    """A manifest as served: its exact bytes (the digest covers them) and its media type."""

    media_type: str
    raw: bytes

    @property
    def digest(self) -> str:
        """The digest of the exact bytes."""
        return digest_of(self.raw)

    @property
    def is_index(self) -> bool:
        """A manifest list or OCI index, whose children are manifests."""
        return self.media_type in INDEX_TYPES

    def _doc(self) -> dict[str, Any]:
        if self.media_type not in MANIFEST_TYPES:
            raise UnsupportedManifest(f"cannot copy a manifest of type {self.media_type!r}")
        try:
            doc = json.loads(self.raw)
        except ValueError as err:
            raise ValidationFailed(f"manifest is not JSON: {err}") from err
        if not isinstance(doc, dict):
            raise ValidationFailed("manifest is not a JSON object")
        return doc

    def children(self) -> list[Descriptor]:
        """The child manifests of an index (empty for an image manifest)."""
        if not self.is_index:
            return []
        return [_descriptor(d) for d in self._doc().get("manifests") or []]

    def blobs(self) -> list[Descriptor]:
        """Config then layers of an image manifest, without repeats or foreign layers."""
        if self.is_index:
            return []
        doc = self._doc()
        out: list[Descriptor] = []
        seen: set[str] = set()
        for raw in [doc.get("config"), *(doc.get("layers") or [])]:
            if raw is None:
                continue
            d = _descriptor(raw)
            if d.digest not in seen and not d.foreign:
                seen.add(d.digest)
                out.append(d)
        return out


def _descriptor(raw: Any) -> Descriptor:
    try:
        media_type = str(raw.get("mediaType", ""))
        digest = str(raw["digest"])
        size = int(raw.get("size", 0))
    except (AttributeError, KeyError, TypeError, ValueError) as err:
        raise ValidationFailed(f"bad descriptor in manifest: {raw!r}") from err
    if not digest.startswith("sha256:") or len(digest) != 71:
        raise ValidationFailed(f"unsupported digest {digest!r}")
    foreign = media_type in _FOREIGN_LAYERS and bool(raw.get("urls"))
    return Descriptor(media_type, digest, size, foreign)


# --- registry notifications -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PushedManifest:
    """A notification worth acting on: a tagged manifest push by someone else than us."""

    event_id: str
    repo: str
    tag: str
    digest: str
    media_type: str
    size: int
    blobs: tuple[str, ...] = ()  # config and layers, when the registry lists references


@dataclass(frozen=True, slots=True)
class Ignored:
    """A notification we do not act on, and why."""

    event_id: str
    why: str


def parse_envelope(body: bytes) -> list[dict[str, Any]]:
    """The events of a notification body; raise :class:`ValidationFailed` naming the problem."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise ValidationFailed(f"body is not valid JSON: {err}") from err
    if not isinstance(doc, dict) or not isinstance(doc.get("events"), list):
        raise ValidationFailed('expected an object with an "events" list')
    events = doc["events"]
    for i, ev in enumerate(events):
        if not isinstance(ev, dict) or not isinstance(ev.get("id"), str) or not ev["id"]:
            raise ValidationFailed(f"events[{i}] has no string id")
        if not isinstance(ev.get("target", {}), dict):
            raise ValidationFailed(f"events[{i}].target is not an object")
    return events


def classify_event(ev: Mapping[str, Any]) -> PushedManifest | Ignored:
    """Act only on tagged manifest pushes that we did not cause ourselves."""
    event_id = str(ev.get("id", ""))
    target = ev.get("target") or {}
    action = ev.get("action")
    if action != "push":
        return Ignored(event_id, f"action {action}")
    media_type = str(target.get("mediaType", ""))
    if media_type not in MANIFEST_TYPES:
        return Ignored(event_id, f"not a manifest ({media_type or 'no media type'})")
    tag = target.get("tag")
    if not tag:
        return Ignored(event_id, "manifest pushed by digest, no tag")
    agent = str((ev.get("request") or {}).get("useragent", ""))
    if agent.startswith(USER_AGENT):
        return Ignored(event_id, "our own replication push")
    repo, digest = target.get("repository"), target.get("digest")
    if not isinstance(repo, str) or not repo or not isinstance(digest, str) or not digest:
        return Ignored(event_id, "no repository or digest")
    size = target.get("size") or target.get("length") or 0
    refs = target.get("references") or []
    blobs = tuple(
        str(r["digest"])
        for r in refs
        if isinstance(r, dict) and r.get("digest") and r.get("mediaType") not in MANIFEST_TYPES
    )
    return PushedManifest(event_id, repo, str(tag), digest, media_type, int(size), blobs)


def push_key(dc: str, pushed: PushedManifest) -> str:
    """The dedupe key of a push: the same manifest put to the same tag of one dc.

    Behind a load balancer, one push can be notified twice under two event ids (the replica
    that stored the manifest died before answering; the client's retry landed on the other),
    so the key is the push's content, not the event id. A registry resending the same event
    gets the same key too. Like the copy jobs' natural key, it holds until ``prune``.
    """
    raw = f"{dc}\x00push\x00{pushed.repo}\x00{pushed.tag}\x00{pushed.digest}"
    return "push-" + hashlib.sha256(raw.encode()).hexdigest()[:32]


def event_host(ev: Mapping[str, Any]) -> str | None:
    """The ``host:port`` the event's request was sent to (identifies the registry)."""
    host = (ev.get("request") or {}).get("host")
    return str(host) if host else None


# --- jobs -------------------------------------------------------------------------------


def job_id(source: str, target: str, repo: str, tag: str, digest: str) -> str:
    """The natural key of a copy: the same copy asked twice is the same job."""
    key = f"{source}\x00{target}\x00{repo}\x00{tag}\x00{digest}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]


@dataclass(slots=True)
class SyncStats:
    """What one job moved, summed over its attempts."""

    bytes_copied: int = 0
    blobs_copied: int = 0
    blobs_skipped: int = 0
    blobs_mounted: int = 0
    manifests_put: int = 0
    superseded: bool = False
    already_present: bool = False

    def as_doc(self) -> dict[str, int]:
        """The counters as stored on the job."""
        return {
            "bytes_copied": self.bytes_copied,
            "blobs_copied": self.blobs_copied,
            "blobs_skipped": self.blobs_skipped,
            "blobs_mounted": self.blobs_mounted,
        }


# --- catalog reconcile ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SyncOrder:
    """Copy ``repo:tag`` at ``digest`` from ``source`` to ``target``."""

    source: str
    target: str
    repo: str
    tag: str
    digest: str


@dataclass(slots=True)
class ReconcilePlan:
    """What a catalog walk found to copy, and the tags it cannot decide."""

    orders: list[SyncOrder] = field(default_factory=list)
    conflicts: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)


def plan_reconcile(
    listing: Mapping[str, Mapping[tuple[str, str], str]],
    history: Mapping[tuple[str, str], Sequence[str]],
    order: Iterable[str] | None = None,
) -> ReconcilePlan:
    """Decide the copies that bring every registry to the newest digest of each tag.

    ``listing`` maps dc → (repo, tag) → digest; ``history`` lists, oldest first, the digests
    each tag was seen pushed or replicated at. A tag held at one digest is copied to the
    registries missing it. When registries disagree, a single digest never seen is the newest
    (pushed while we were not listening); with none unseen, the latest seen wins; two unseen
    digests are a conflict, left alone and reported.
    """
    dcs = list(order) if order is not None else sorted(listing)
    plan = ReconcilePlan()
    tags = sorted({key for dc in dcs for key in listing.get(dc, {})})
    for key in tags:
        held = {dc: listing[dc][key] for dc in dcs if key in listing.get(dc, {})}
        digests = set(held.values())
        seen = list(history.get(key, ()))
        unseen = digests - set(seen)
        if len(digests) == 1:
            newest = next(iter(digests))
        elif len(unseen) == 1:
            newest = next(iter(unseen))
        elif not unseen:
            newest = max(digests, key=seen.index)
        else:
            plan.conflicts.append((key[0], key[1], held))
            continue
        source = next(dc for dc in dcs if held.get(dc) == newest)
        for dc in dcs:
            if held.get(dc) != newest:
                plan.orders.append(SyncOrder(source, dc, key[0], key[1], newest))
    return plan


def add_to_history(history: Sequence[str], digest: str, keep: int = 20) -> list[str]:
    """``history`` with ``digest`` moved (or added) to the newest end, capped to ``keep``."""
    return [*(d for d in history if d != digest), digest][-keep:]
