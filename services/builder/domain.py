"""The builder's pure logic: the Dockerfile rendered from a spec, the image's labels, and the
verification of a built image against the policy (its packages, its listening sockets, its
layers and size).

Nothing here does I/O; the engine adapter runs what these functions render and hands back the
text (``dpkg-query``, ``ss``) these functions read.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from libs.common.contracts.builder import (
    IMAGE_LABEL_PREFIX,
    BaseImage,
    BuildSpec,
    ImagePolicy,
    Violation,
    package_verdict,
    port_allowed,
)

__all__ = [
    "DPKG_FORMAT",
    "Listener",
    "Package",
    "Step",
    "dependency_closure",
    "image_labels",
    "listening_violations",
    "parse_dpkg",
    "parse_listeners",
    "render_context",
    "render_dockerfile",
    "sbom_violations",
    "shape_violations",
    "sync_job_id",
]


class Step(StrEnum):
    """The steps of a build, in order (the build document's ``step``)."""

    QUEUED = "queued"
    RENDER = "render"
    BASE = "base"
    BUILD = "build"
    VERIFY = "verify"
    PUSH = "push"
    DONE = "done"


APT_ENV = "DEBIAN_FRONTEND=noninteractive"
# The fields dpkg-query prints for each package, tab-separated (see parse_dpkg).
DPKG_FORMAT = (
    "${Package}\\t${Version}\\t${Pre-Depends}\\t${Depends}\\t${Provides}\\t${db:Status-Abbrev}\\n"
)


def _run(script: str) -> str:
    """A RUN in exec form: the script is one JSON string, so nothing in it is re-parsed."""
    return "RUN " + json.dumps(["/bin/sh", "-ec", script])


def render_dockerfile(spec: BuildSpec, base: BaseImage, build_id: str) -> str:
    """The Dockerfile of ``spec`` on ``base``: apt installs, files, env, run, exposed ports.

    Labels are not in it: they are given to the engine's build call, unescaped."""
    lines = [
        f"# dockvm builder, build {build_id}: generated from the spec, never hand-written",
        f"FROM {base.image}",
    ]
    if spec.packages:
        pkgs = " ".join(sorted(set(spec.packages)))
        lines.append(
            _run(
                f"export {APT_ENV}\napt-get update\n"
                f"apt-get install -y --no-install-recommends -- {pkgs}\n"
                "apt-get clean\nrm -rf /var/lib/apt/lists/*"
            )
        )
    if spec.files:
        lines.append("COPY rootfs/ /")
    for key, value in sorted(spec.env.items()):
        quoted = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
        lines.append(f'ENV {key}="{quoted}"')
    if spec.run:
        lines.append(_run("\n".join(spec.run)))
    if spec.ports:
        lines.append("EXPOSE " + " ".join(f"{p}/tcp" for p in sorted(set(spec.ports))))
    return "\n".join(lines) + "\n"


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 0
    tar.addfile(info, io.BytesIO(data))


def render_context(spec: BuildSpec, base: BaseImage, build_id: str) -> bytes:
    """The build context (an uncompressed tar): the Dockerfile and ``rootfs/`` with the files.

    A file whose content starts with ``#!`` is a script (0755); every other file is 0644."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        _add(tar, "Dockerfile", render_dockerfile(spec, base, build_id).encode(), 0o644)
        dirs: set[str] = set()
        for path, content in sorted(spec.files.items()):
            parts = path.strip("/").split("/")
            for i in range(1, len(parts)):
                d = "rootfs/" + "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    info = tarfile.TarInfo(d)
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
            mode = 0o755 if content.startswith("#!") else 0o644
            _add(tar, "rootfs/" + "/".join(parts), content.encode(), mode)
    return buf.getvalue()


def image_labels(
    build_id: str,
    spec: BuildSpec,
    spec_digest: str,
    policy_version: int,
    who: str,
    created: datetime,
    base: BaseImage,
) -> dict[str, str]:
    """The image's labels: the spec's own, the build's, and the OCI annotations."""
    return {
        **spec.labels,
        f"{IMAGE_LABEL_PREFIX}id": build_id,
        f"{IMAGE_LABEL_PREFIX}by": who,
        f"{IMAGE_LABEL_PREFIX}spec_digest": spec_digest,
        f"{IMAGE_LABEL_PREFIX}policy_version": str(policy_version),
        "org.opencontainers.image.created": created.isoformat(),
        "org.opencontainers.image.title": spec.name,
        "org.opencontainers.image.version": spec.tag,
        "org.opencontainers.image.base.name": base.image,
        "org.opencontainers.image.vendor": "dockvm",
    }


# ---- packages ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Package:
    """One installed Debian package as dpkg knows it."""

    name: str
    version: str
    depends: tuple[tuple[str, ...], ...] = ()  # Pre-Depends and Depends: groups of alternatives
    provides: tuple[str, ...] = ()


_QUAL = re.compile(r"\(.*?\)|\[.*?\]|<.*?>")


def _names(field_text: str) -> list[list[str]]:
    """``a (>= 1) | b:any, c`` → ``[["a", "b"], ["c"]]``."""
    groups = []
    for group in field_text.split(","):
        alts = [_QUAL.sub("", a).strip().split(":")[0] for a in group.split("|")]
        alts = [a for a in alts if a]
        if alts:
            groups.append(alts)
    return groups


def parse_dpkg(text: str) -> dict[str, Package]:
    """The installed packages from ``dpkg-query -W -f DPKG_FORMAT`` output."""
    out: dict[str, Package] = {}
    for line in text.splitlines():
        cols = line.split("\t")
        if len(cols) < 6 or not cols[5].startswith("ii"):
            continue
        name, version, pre, deps, provides = cols[:5]
        out[name] = Package(
            name,
            version,
            tuple(tuple(g) for g in _names(pre) + _names(deps)),
            tuple(g[0] for g in _names(provides)),
        )
    return out


def dependency_closure(roots: Iterable[str], installed: dict[str, Package]) -> dict[str, str]:
    """Every installed package reachable from ``roots`` by Depends/Pre-Depends, each mapped to
    the root that pulled it in (a virtual name counts through whatever provides it)."""
    providers: dict[str, list[str]] = {}
    for pkg in installed.values():
        for virtual in pkg.provides:
            providers.setdefault(virtual, []).append(pkg.name)
    found: dict[str, str] = {}
    stack = [(r, r) for r in roots if r in installed]
    while stack:
        name, root = stack.pop()
        if name in found:
            continue
        found[name] = root
        for group in installed[name].depends:
            for alt in group:
                for real in ([alt] if alt in installed else []) + providers.get(alt, []):
                    if real not in found:
                        stack.append((real, root))
    return found


def sbom_violations(
    image: dict[str, Package],
    base: dict[str, Package],
    requested: Iterable[str],
    policy: ImagePolicy,
) -> list[Violation]:
    """What the image holds beyond its base that the policy refuses: a package neither asked
    for nor a dependency of one asked for, or a denied one however it came in."""
    requested = list(requested)
    reach = dependency_closure(requested, image)
    out = []
    for name in sorted(set(image) - set(base)):
        if name not in reach:
            out.append(
                Violation(
                    field="sbom",
                    type="unexpected_package",
                    message=f"{name} is installed but neither allowed nor a "
                    "dependency of an allowed package",
                )
            )
        elif package_verdict(name, policy) == "denied_package":
            out.append(
                Violation(
                    field="sbom",
                    type="denied_dependency",
                    message=f"{name} (pulled in by {reach[name]}) is denied",
                )
            )
    missing = [p for p in requested if p not in image]
    out += [
        Violation(field="sbom", type="missing_package", message=f"{p} is not installed")
        for p in missing
    ]
    return out


# ---- sockets, layers, size -----------------------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class Listener:
    """A listening socket seen in the started image."""

    port: int
    proto: str
    process: str = field(default="?", compare=False)

    def __str__(self) -> str:
        return f"{self.proto}/{self.port} ({self.process})"


_PROC = re.compile(r'\(\("([^"]+)",pid=(\d+)')


def parse_listeners(text: str) -> set[Listener]:
    """Listening TCP and bound UDP sockets from ``ss -ltnupH`` output."""
    out = set()
    for line in text.splitlines():
        cols = line.split()
        if len(cols) < 5 or cols[0] not in ("tcp", "udp"):
            continue
        _, _, port = cols[4].rpartition(":")
        if not port.isdigit():
            continue
        m = _PROC.search(line)
        proc = f"{m.group(1)} pid {m.group(2)}" if m else "?"
        out.add(Listener(int(port), cols[0], proc))
    return out


def listening_violations(
    listeners: Iterable[Listener], base: BaseImage, policy: ImagePolicy
) -> list[Violation]:
    """Sockets on ports the policy denies (the base's own services, e.g. sshd, excepted)."""
    return [
        Violation(
            field="listening",
            type="denied_port_listening",
            message=f"port {s.port}/{s.proto} is listening, opened by {s.process}",
        )
        for s in sorted(listeners)
        if s.port not in base.listens and not port_allowed(s.port, policy.ports)
    ]


def shape_violations(layers: int, size: int, policy: ImagePolicy) -> list[Violation]:
    """Too many layers or too large an image."""
    out = []
    if layers > policy.max_layers:
        out.append(
            Violation(
                field="layers",
                type="too_many_layers",
                message=f"{layers} layers, the policy allows {policy.max_layers}",
            )
        )
    if size > policy.max_size:
        out.append(
            Violation(
                field="size",
                type="too_large",
                message=f"{size} bytes, the policy allows {policy.max_size}",
            )
        )
    return out


def sync_job_id(source: str, target: str, repo: str, tag: str, digest: str) -> str:
    """imagesync's natural key of a copy (its job id): what a build record links to."""
    key = f"{source}\x00{target}\x00{repo}\x00{tag}\x00{digest}"
    return hashlib.sha256(key.encode()).hexdigest()[:32]
