"""Fetch release artifacts from a Maven repository (standard layout), verified by checksum.

SNAPSHOT versions resolve through the version directory's ``maven-metadata.xml``. A download
is streamed to disk, never held in memory, and is kept only if its ``.sha256`` (else ``.sha1``)
checksum matches.

The repository is not trusted: its metadata is parsed with defusedxml and refused if it
declares a DTD (Maven's never does; a DTD is how entity bombs and external entities come in),
and the build it names must be one safe path segment, since it becomes a file name here.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from xml.etree.ElementTree import Element, ParseError

import aiohttp
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import fromstring

from .contracts.releases import Artifact
from .errors import DomainError, NotFoundError, TransientError

__all__ = ["ChecksumMismatch", "InvalidMetadata", "MavenRepository", "ResolvedArtifact"]

_SAFE_VERSION = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")


class ChecksumMismatch(DomainError):
    """The downloaded bytes do not match the published checksum."""

    reason = "checksum_mismatch"


class InvalidMetadata(DomainError):
    """``maven-metadata.xml`` is malformed, unsafe to parse, or names an unsafe build."""

    reason = "invalid_metadata"


@dataclass(frozen=True, slots=True)
class ResolvedArtifact:
    """Where an artifact's file lives, with the concrete version of a SNAPSHOT."""

    url: str
    filename: str
    version: str
    file_version: str


class MavenRepository:
    """A read-only client of one Maven repository."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession) -> None:
        self._base = base_url.rstrip("/")
        self._session = session

    def _dir(self, a: Artifact) -> str:
        return f"{self._base}/{a.group_id.replace('.', '/')}/{a.artifact_id}/{a.version}"

    async def _get_text(self, url: str) -> str | None:
        try:
            async with self._session.get(url) as r:
                if r.status == 404:
                    return None
                if r.status >= 500:
                    raise TransientError(f"Maven repository answered {r.status} for {url}")
                if r.status >= 400:
                    raise DomainError(
                        f"Maven repository refused {url}: HTTP {r.status}",
                        reason="repository_refused",
                    )
                return await r.text()
        except aiohttp.ClientConnectionError as err:
            raise TransientError(f"Maven repository unreachable at {self._base}: {err}") from err

    async def resolve(self, a: Artifact) -> ResolvedArtifact:
        """Find the file of ``a``; a SNAPSHOT takes its newest timestamped build."""
        file_version = a.version
        if a.version.endswith("-SNAPSHOT"):
            meta = await self._get_text(f"{self._dir(a)}/maven-metadata.xml")
            if meta is None:
                raise NotFoundError(f"no maven-metadata.xml for {_coords(a)}")
            file_version = _snapshot_version(meta, a)
        suffix = f"-{a.classifier}" if a.classifier else ""
        filename = f"{a.artifact_id}-{file_version}{suffix}.{a.packaging}"
        return ResolvedArtifact(f"{self._dir(a)}/{filename}", filename, a.version, file_version)

    async def check(self, a: Artifact) -> ResolvedArtifact:
        """Fail with :class:`NotFoundError` unless ``a`` exists (metadata and file)."""
        resolved = await self.resolve(a)
        try:
            async with self._session.head(resolved.url) as r:
                if r.status == 404:
                    raise NotFoundError(f"artifact {_coords(a)} not found at {resolved.url}")
                if r.status >= 400:
                    raise TransientError(f"Maven repository answered {r.status} for {resolved.url}")
        except aiohttp.ClientConnectionError as err:
            raise TransientError(f"Maven repository unreachable at {self._base}: {err}") from err
        return resolved

    async def download(self, a: Artifact, dest_dir: Path) -> Path:
        """Download ``a`` into ``dest_dir`` and verify it; nothing is left on a mismatch."""
        resolved = await self.resolve(a)
        expected, algo = await self._checksum(resolved.url)
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / resolved.filename
        partial = dest.with_name(dest.name + ".part")
        digest = hashlib.new(algo)
        try:
            async with self._session.get(resolved.url) as r:
                if r.status == 404:
                    raise NotFoundError(f"artifact {_coords(a)} not found at {resolved.url}")
                if r.status >= 400:
                    raise TransientError(f"Maven repository answered {r.status} for {resolved.url}")
                with partial.open("wb") as f:
                    async for chunk in r.content.iter_chunked(1 << 16):
                        digest.update(chunk)
                        f.write(chunk)
        except aiohttp.ClientConnectionError as err:
            partial.unlink(missing_ok=True)
            raise TransientError(f"Maven repository unreachable at {self._base}: {err}") from err
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        if digest.hexdigest() != expected:
            partial.unlink(missing_ok=True)
            raise ChecksumMismatch(
                f"{resolved.filename}: {algo} is {digest.hexdigest()}, repository says {expected}"
            )
        os.replace(partial, dest)
        return dest

    async def _checksum(self, url: str) -> tuple[str, str]:
        for algo in ("sha256", "sha1"):
            text = await self._get_text(f"{url}.{algo}")
            if text is not None and text.strip():
                return text.split()[0].strip().lower(), algo
        exists = await self._session.head(url)
        exists.release()
        if exists.status == 404:
            raise NotFoundError(f"artifact not found at {url}")
        raise ChecksumMismatch(f"no .sha256 or .sha1 checksum published for {url}")


def _parse_metadata(meta: str, a: Artifact) -> Element:
    """The metadata's root element; :class:`InvalidMetadata` for anything unsafe or malformed."""
    try:
        return fromstring(meta, forbid_dtd=True)
    except DefusedXmlException as err:
        raise InvalidMetadata(
            f"maven-metadata.xml of {_coords(a)} refused: {type(err).__name__} "
            "(a DTD or entities; Maven's metadata has none)"
        ) from err
    except ParseError as err:
        raise InvalidMetadata(f"maven-metadata.xml of {_coords(a)} is not XML: {err}") from err


def _snapshot_version(meta: str, a: Artifact) -> str:
    root = _parse_metadata(meta, a)
    found = None
    for sv in root.iterfind("./versioning/snapshotVersions/snapshotVersion"):
        ext = sv.findtext("extension") or ""
        classifier = sv.findtext("classifier") or None
        if ext == a.packaging and classifier == a.classifier and sv.findtext("value"):
            found = sv.findtext("value")
            break
    ts = root.findtext("./versioning/snapshot/timestamp")
    build = root.findtext("./versioning/snapshot/buildNumber")
    if found is None and ts and build:
        found = a.version.removesuffix("-SNAPSHOT") + f"-{ts}-{build}"
    if found is None:
        raise NotFoundError(f"maven-metadata.xml of {_coords(a)} names no build")
    if not _SAFE_VERSION.fullmatch(found):
        raise InvalidMetadata(f"maven-metadata.xml of {_coords(a)} names an unsafe build {found!r}")
    return found


def _coords(a: Artifact) -> str:
    c = f":{a.classifier}" if a.classifier else ""
    return f"{a.group_id}:{a.artifact_id}:{a.version}:{a.packaging}{c}"
