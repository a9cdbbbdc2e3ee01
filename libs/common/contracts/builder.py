"""Messages of the builder service (image builds under a policy) and the policy itself.

A build is asked of the builder by RPC on the queue :data:`RPC_QUEUE` (``builder.build.submit``,
idempotent by the build ``id``): the builder stores the job and queues its own
``build.run`` on :data:`WORK_QUEUE`, a durable queue it takes one message at a time from, so
that builds run one at a time and survive a restart (a build killed halfway is redelivered and
run again from the start, or marked failed once its attempts are spent). Queries
(``builder.build.get``/``list``/``log``, ``builder.image.list``) are RPCs on the same queue;
a refusal is :class:`BuildRejected` with ``reason`` ``not_found`` or ``invalid``.

Events (routing key = type): ``image.built`` (pushed to the dc's registry) and
``image.build_failed`` (with the reason; nothing was pushed).

The policy (:class:`ImagePolicy`) is data: the gateway keeps its versions and checks a spec
with :func:`policy_violations` before anything runs; the builder gets the policy the spec was
checked against with the build and verifies the result against it too.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import posixpath
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from ..units import parse_bytes
from .envelope import Command, Event, register

__all__ = [
    "BUILD_ID_RE",
    "DEFAULT_POLICY",
    "IMAGE_LABEL_PREFIX",
    "REPO_RE",
    "RPC_QUEUE",
    "WORK_QUEUE",
    "BaseImage",
    "BuildFailed",
    "BuildGet",
    "BuildInfo",
    "BuildList",
    "BuildListing",
    "BuildLog",
    "BuildLogChunk",
    "BuildRejected",
    "BuildRun",
    "BuildSpec",
    "BuildState",
    "BuildSubmit",
    "ImageBuilt",
    "ImageList",
    "ImageListing",
    "ImagePolicy",
    "ImageTag",
    "LogLine",
    "PackageRules",
    "PortRules",
    "Violation",
    "package_verdict",
    "policy_violations",
    "port_allowed",
    "spec_digest",
]

RPC_QUEUE = "builder"
"""The queue of the builder's RPCs (submit and queries)."""

WORK_QUEUE = "builder.work"
"""The builder's own durable work queue (``build.run``), consumed one message at a time."""

IMAGE_LABEL_PREFIX = "dockvm.build."
"""Labels the builder sets on every image it makes (users may not set them)."""

REPO_RE = r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$"
TAG_RE = r"^[\w][\w.-]{0,127}$"
PACKAGE_RE = r"^[a-z0-9][a-z0-9+.-]{0,99}$"
ENV_RE = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
LABEL_RE = r"^[a-z0-9][a-z0-9._/-]{0,127}$"
BUILD_ID_RE = r"^b-[a-z0-9]{6,32}$"

BuildState = Literal["queued", "running", "succeeded", "failed"]

# ---- the spec and the policy ----------------------------------------------------------------


class BuildSpec(BaseModel):
    """What a team asks for; the builder renders the Dockerfile from it (never user-written)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=REPO_RE, max_length=200, description="repository, e.g. team/web")
    tag: str = Field(pattern=TAG_RE)
    base: str = Field(min_length=1, max_length=200, description="a base the policy lists")
    packages: list[Annotated[str, Field(pattern=PACKAGE_RE)]] = Field(
        default_factory=list, max_length=200
    )
    files: dict[str, Annotated[str, Field(max_length=1 << 20)]] = Field(
        default_factory=dict, max_length=200, description="absolute path: content (#! → 0755)"
    )
    env: dict[
        Annotated[str, Field(pattern=ENV_RE)],
        Annotated[str, Field(max_length=4096, pattern=r"^[^\r\n]*$")],
    ] = Field(default_factory=dict, max_length=100)
    ports: list[Annotated[int, Field(ge=1, le=65535)]] = Field(default_factory=list, max_length=50)
    run: list[Annotated[str, Field(min_length=1, max_length=4096)]] = Field(
        default_factory=list, max_length=50
    )
    labels: dict[
        Annotated[str, Field(pattern=LABEL_RE)], Annotated[str, Field(max_length=1024)]
    ] = Field(default_factory=dict, max_length=50)


def spec_digest(spec: BuildSpec) -> str:
    """The spec's hash (``sha256:...``) over its canonical JSON: the same spec, the same hash."""
    raw = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(raw.encode()).hexdigest()


def _port_range(value: object) -> str:
    """``22`` or ``"1024-65535"``, normalised to ``"a-b"``."""
    text = str(value).strip()
    lo, sep, hi = text.partition("-")
    try:
        a, b = int(lo), int(hi) if sep else int(lo)
    except ValueError as err:
        raise ValueError(f"{value!r} is not a port or a range a-b") from err
    if not (1 <= a <= b <= 65535):
        raise ValueError(f"{value!r}: ports are 1-65535, low before high")
    return f"{a}-{b}"


PortRange = Annotated[str, BeforeValidator(_port_range)]


class BaseImage(BaseModel):
    """An allowed base: its name in specs, the image built locally, and the ports its own
    services listen on (the base's sshd, reached only through the bastion)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1, max_length=100)
    image: str = Field(min_length=1, max_length=200)
    listens: list[Annotated[int, Field(ge=1, le=65535)]] = Field(default_factory=list)


class PackageRules(BaseModel):
    """Debian package names (shell patterns allowed): deny wins over allow."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    allow: list[str] = Field(default_factory=list, max_length=2000)
    deny: list[str] = Field(default_factory=list, max_length=2000)


class PortRules(BaseModel):
    """Ports an image may expose or listen on: inside an ``allow`` range and no ``deny`` one."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    allow: list[PortRange] = Field(default_factory=lambda: ["1-65535"])
    deny: list[PortRange] = Field(default_factory=list)


class ImagePolicy(BaseModel):
    """What the platform lets an image be made of."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    bases: list[BaseImage] = Field(min_length=1, max_length=50)
    packages: PackageRules
    ports: PortRules
    files_deny: list[str] = Field(
        default_factory=list, max_length=200, description="path prefixes files may not write"
    )
    max_layers: int = Field(ge=1, le=127)
    max_size: int = Field(gt=0, description="bytes, or a size like 2g")
    run_allowed: bool = False

    @field_validator("max_size", mode="before")
    @classmethod
    def _size(cls, v: object) -> int:
        return parse_bytes(v)  # type: ignore[arg-type]

    def base(self, name: str) -> BaseImage | None:
        """The base a spec names (by its name or its image), if the policy lists it."""
        return next((b for b in self.bases if name in (b.name, b.image)), None)


DEFAULT_POLICY = ImagePolicy(
    bases=[
        BaseImage(name="debian-bookworm", image="dockvm/base:bookworm", listens=[22]),
        # The systemd flavour (images/base-systemd): its machines run systemd as PID 1.
        BaseImage(
            name="debian-bookworm-systemd", image="dockvm/base-systemd:bookworm", listens=[22]
        ),
        # The Java flavour on it (Java 17, Tomcat 10 on 8080; a war release is Tomcat's ROOT).
        BaseImage(
            name="debian-bookworm-tomcat", image="dockvm/java-tomcat:bookworm", listens=[22, 8080]
        ),
    ],
    packages=PackageRules(
        allow=[
            "openjdk-17-jre-headless", "tomcat10", "nginx", "nginx-light", "python3",
            "python3-venv", "curl", "ca-certificates", "jq", "less", "vim-tiny", "unzip",
            "zip", "rsync", "git", "netcat-openbsd", "dnsutils", "iputils-ping", "tzdata",
            "locales", "redis-tools", "postgresql-client",
        ],
        deny=[
            "openssh-client", "telnetd", "inetutils-telnetd", "rsh-server", "nis", "tftpd*",
            "vsftpd", "docker.io", "containerd", "runc", "nmap", "netcat-traditional",
            "socat", "gcc", "gcc-*", "build-essential", "sudo",
        ],
    ),
    ports=PortRules(
        allow=["1-65535"],
        # SSH (the platform's own, through the bastion), Docker's API, databases and
        # remote shells are never opened to the outside by an image.
        deny=["22", "23", "111", "512-514", "2375-2376", "3306", "5432", "6379", "27017"],
    ),
    files_deny=[
        "/etc/ssh/", "/root/.ssh/", "/etc/shadow", "/etc/passwd", "/etc/group",
        "/etc/sudoers", "/etc/apt/", "/usr/local/sbin/dockvm-", "/proc/", "/sys/", "/dev/",
        "/run/", "/var/lib/dpkg/",
    ],
    max_layers=8,
    max_size=2 << 30,
    run_allowed=False,
)
"""The policy shipped with dockvm: what ``GET /v1/images/policy`` shows before any ``PUT``."""


class Violation(BaseModel):
    """One reason a spec or an image breaks the policy, on the field at fault."""

    model_config = ConfigDict(frozen=True)
    field: str
    type: str
    message: str


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def port_allowed(port: int, rules: PortRules) -> bool:
    """Whether ``port`` is in an allow range and in no deny range."""

    def within(ranges: list[str]) -> bool:
        for r in ranges:
            lo, _, hi = r.partition("-")
            if int(lo) <= port <= int(hi):
                return True
        return False

    return within(rules.allow) and not within(rules.deny)


def package_verdict(name: str, policy: ImagePolicy) -> str | None:
    """``denied_package``, ``unlisted_package`` or None when the policy allows ``name``."""
    if _matches(name, policy.packages.deny):
        return "denied_package"
    if not _matches(name, policy.packages.allow):
        return "unlisted_package"
    return None


def _path_problem(path: str, policy: ImagePolicy) -> str | None:
    if not path.startswith("/") or path.endswith("/"):
        return "must be an absolute path to a file"
    norm = posixpath.normpath(path)
    if norm != path or "\x00" in path:
        return "must be normalised (no '..', '.', '//')"
    denied = next((p for p in policy.files_deny if (norm + "/").startswith(p) or norm == p), None)
    return f"writes under {denied}, which the policy forbids" if denied else None


def policy_violations(spec: BuildSpec, policy: ImagePolicy) -> list[Violation]:
    """Every item of ``spec`` the policy refuses, each on its field; empty when it passes."""
    out: list[Violation] = []
    if policy.base(spec.base) is None:
        names = ", ".join(b.name for b in policy.bases)
        msg = f"{spec.base!r} is not an allowed base ({names})"
        out.append(Violation(field="base", type="unknown_base", message=msg))
    for i, pkg in enumerate(spec.packages):
        verdict = package_verdict(pkg, policy)
        if verdict is not None:
            why = "denied by" if verdict == "denied_package" else "not on the allowlist of"
            out.append(Violation(field=f"packages.{i}", type=verdict,
                                 message=f"package {pkg} is {why} the policy"))  # fmt: skip
    for i, port in enumerate(spec.ports):
        if not port_allowed(port, policy.ports):
            out.append(Violation(field=f"ports.{i}", type="denied_port",
                                 message=f"port {port} may not be opened"))  # fmt: skip
    for path in spec.files:
        problem = _path_problem(path, policy)
        if problem:
            out.append(Violation(field=f"files.{path}", type="forbidden_path",
                                 message=f"{path} {problem}"))  # fmt: skip
    if spec.run and not policy.run_allowed:
        out.append(Violation(field="run", type="run_not_allowed",
                             message="the policy does not allow run commands"))  # fmt: skip
    for key in spec.labels:
        if key.startswith((IMAGE_LABEL_PREFIX, "org.opencontainers.")):
            out.append(Violation(field=f"labels.{key}", type="reserved_label",
                                 message=f"label {key} is set by the platform"))  # fmt: skip
    return out


# ---- the builder's RPCs ---------------------------------------------------------------------


@register
class BuildSubmit(Command):
    """Store and queue a build (idempotent by ``id``); the spec was checked against ``policy``."""

    TYPE = "builder.build.submit"
    id: str = Field(pattern=BUILD_ID_RE)
    spec: BuildSpec
    policy: ImagePolicy
    policy_version: int = Field(ge=0)
    requested_by: str
    spec_digest: str


@register
class BuildRun(Command):
    """The builder's own work item: run build ``id`` (on :data:`WORK_QUEUE`)."""

    TYPE = "build.run"
    id: str = Field(pattern=BUILD_ID_RE)


@register
class BuildGet(Command):
    """Query: one build."""

    TYPE = "builder.build.get"
    id: str


@register
class BuildList(Command):
    """Query: builds, newest first."""

    TYPE = "builder.build.list"
    state: BuildState | None = None
    name: str | None = None
    limit: int = Field(default=100, ge=1, le=1000)


@register
class BuildLog(Command):
    """Query: the log chunks of a build after ``after`` (a chunk sequence number)."""

    TYPE = "builder.build.log"
    id: str
    after: int = Field(default=-1, ge=-1)
    limit: int = Field(default=200, ge=1, le=1000)


@register
class ImageList(Command):
    """Query: tags the platform built, as the registries hold them now; ``bases`` are the
    policy's base images (``repo:tag``), listed too (made by ``scripts/base-image.sh``)."""

    TYPE = "builder.image.list"
    name: str | None = None
    bases: list[str] = Field(default_factory=list, max_length=50)


@register
class BuildInfo(Event):
    """A build as stored; reply to submit and get, and an item of a listing."""

    TYPE = "builder.build"
    id: str
    name: str
    tag: str
    state: BuildState
    spec: BuildSpec
    spec_digest: str
    policy_version: int
    requested_by: str
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempt: int = 0
    step: str | None = None
    reason: str | None = None
    detail: str | None = None
    image: str | None = None
    image_id: str | None = None
    digest: str | None = None
    layers: int | None = None
    size: int | None = None
    sbom: list[str] = Field(default_factory=list)
    listening: list[str] = Field(default_factory=list)
    sync_jobs: list[str] = Field(default_factory=list)


@register
class BuildListing(Event):
    """Reply to ``builder.build.list``."""

    TYPE = "builder.build.listing"
    builds: list[BuildInfo]


class LogLine(BaseModel):
    """One stored chunk of a build's log."""

    model_config = ConfigDict(frozen=True)
    seq: int
    text: str


@register
class BuildLogChunk(Event):
    """Reply to ``builder.build.log``: the chunks after ``after``; ``done`` once the build
    ended and nothing more will come."""

    TYPE = "builder.build.log_chunk"
    id: str
    chunks: list[LogLine]
    state: BuildState
    step: str | None = None
    done: bool


class ImageTag(BaseModel):
    """One platform-built tag and what each dc's registry holds under it."""

    model_config = ConfigDict(frozen=True)
    name: str
    tag: str
    build_id: str | None
    built_by: str
    spec_digest: str | None
    policy_version: int | None
    built_at: datetime | None
    # Per dc: the manifest digest there; None when that dc lacks it or its registry is down.
    digests: dict[str, str | None]


@register
class ImageListing(Event):
    """Reply to ``builder.image.list``."""

    TYPE = "builder.image.listing"
    images: list[ImageTag]


@register
class BuildRejected(Event):
    """A refused RPC: ``not_found`` or ``invalid`` (with the field)."""

    TYPE = "builder.rejected"
    reason: Literal["not_found", "invalid", "conflict"]
    detail: str = ""
    field: str | None = None


# ---- events ---------------------------------------------------------------------------------


@register
class ImageBuilt(Event):
    """A build passed verification and its tag is in the dc's registry."""

    TYPE = "image.built"
    build_id: str
    registry: str
    dc: str
    repo: str
    tag: str
    digest: str
    spec_digest: str
    policy_version: int
    requested_by: str


@register
class BuildFailed(Event):
    """A build ended without pushing anything; ``reason`` is stable, ``detail`` for people."""

    TYPE = "image.build_failed"
    build_id: str
    repo: str
    tag: str
    reason: str
    detail: str = ""
