"""The API's request and response models (pure pydantic). The OpenAPI document is built from them.

Requests forbid unknown fields, so a typo is a 422 instead of a silently ignored option.
"""

from __future__ import annotations

import re
from datetime import datetime
from ipaddress import IPv4Address
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    model_validator,
)

from libs.common.contracts.provisioner import XFS_MIN_DISK_BYTES
from libs.common.contracts.releases import CHECK_NAME
from libs.common.units import ByteSize

from .states import State

__all__ = [
    "APP_RE",
    "HOSTNAME_RE",
    "IMAGE_RE",
    "Accepted",
    "AcceptedMachine",
    "ActionAccepted",
    "AppCheckList",
    "AppCheckOut",
    "AppPath",
    "AppScale",
    "AuditEntry",
    "AuditPage",
    "CheckDeclare",
    "CheckPath",
    "HostOut",
    "IpInfo",
    "IpPath",
    "IsoDatetime",
    "MachineCreate",
    "MachineOut",
    "MachinePage",
    "MachinePatch",
    "MachineQuery",
    "MachineSummaryOut",
    "PoolCreateBody",
    "PoolPatchBody",
    "Problem",
    "ScaleFailure",
    "ScaleResult",
    "TokenCreate",
    "TokenCreated",
    "TokenList",
    "TokenOut",
    "Transition",
    "WaitQuery",
]

APP_RE = r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$"
DC_RE = r"^[a-z0-9][a-z0-9-]{0,31}$"
# RFC 1123 label; the prefix leaves room for the "-<n>" suffix within 63 characters.
HOSTNAME_RE = r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$"

_LABEL = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*(?::[0-9]+)?"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
# The grammar of github.com/distribution/reference.
IMAGE_RE = rf"^(?:{_DOMAIN}/)?{_COMPONENT}(?:/{_COMPONENT})*(?::{_TAG})?(?:@{_DIGEST})?$"
# ASCII: \w as the document's (ECMA) pattern reads it.
_IMAGE = re.compile(IMAGE_RE, re.ASCII)
SSH_KEY_RE = (
    r"^(ssh-(rsa|ed25519|dss)|ecdsa-sha2-nistp(256|384|521)|sk-[a-z0-9@.-]+)"
    r" [A-Za-z0-9+/]+=*( \S.*)?$"
)
_SSH_KEY = re.compile(SSH_KEY_RE)


def _image(value: str) -> str:
    first, sep, _ = value.partition("/")
    # As in Docker: the first component is a registry only with a dot, a port or "localhost";
    # otherwise it is a path component and must be lower case.
    is_domain = sep and ("." in first or ":" in first or first == "localhost")
    # fullmatch: "$" alone would let a trailing newline through, which the document's does not.
    bad_case = not is_domain and first != first.lower()
    if len(value) > 512 or not _IMAGE.fullmatch(value) or bad_case:
        raise ValueError(f"{value!r} is not an image reference such as registry:5000/team/app:1.2")
    return value


def _ssh_key(value: str) -> str:
    if not _SSH_KEY.match(value.strip()):
        raise ValueError("not an OpenSSH public key (type, base64 key, optional comment)")
    return value.strip()


# RFC 3339, as the document's ``date-time`` format says (pydantic alone would take "0.5" as a
# Unix time); the offset may be left out, as the CLI's ``--from 2026-11-29`` sends it.
_RFC3339 = re.compile(
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]+)?)?"
    r"([Zz]|[+-][0-9]{2}:?[0-9]{2})?$"
)


def _rfc3339(value: Any) -> Any:
    if isinstance(value, str) and not _RFC3339.fullmatch(value):
        raise ValueError("not an RFC 3339 date-time such as 2026-01-31T12:00:00Z")
    return value


# The validators say more than a type: the document gets the same grammar as a pattern.
ImageRef = Annotated[
    str,
    AfterValidator(_image),
    WithJsonSchema({"type": "string", "pattern": IMAGE_RE, "maxLength": 512}),
]
IsoDatetime = Annotated[datetime, BeforeValidator(_rfc3339)]
SshKey = Annotated[
    str,
    AfterValidator(_ssh_key),
    # Surrounding whitespace is stripped (a key pasted with its newline).
    WithJsonSchema({"type": "string", "pattern": r"^\s*" + SSH_KEY_RE[1:]}),
]
Cpus = Annotated[float, Field(gt=0, le=512)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MachineCreate(_Request):
    """``POST /v1/machines``: create ``count`` machines of one app."""

    type: Literal["docker", "kvm"] = "docker"
    app: str = Field(pattern=APP_RE)
    image: ImageRef
    cpus: Cpus
    memory: ByteSize
    disk: ByteSize
    dc: str = Field(pattern=DC_RE)
    vlan_id: int = Field(ge=1, le=4094)
    count: int = Field(default=1, ge=1, le=100)
    hostname_prefix: str | None = Field(default=None, pattern=HOSTNAME_RE)
    ssh_keys: list[SshKey] = Field(default_factory=list, max_length=50)
    # Break-glass: root gets ssh_keys and SSH answers any source. Off, people log in through
    # the bastion (users and grants), and ssh_keys would install nothing.
    direct_ssh: bool = False
    # PID 1 of a docker machine: systemd (systemctl, journalctl, cron, reboot as on a VM) or
    # tini (sshd and the app only). Unset: the image's dockvm.init label says, else tini.
    init: Literal["tini", "systemd"] | None = None

    @model_validator(mode="after")
    def _keys_need_direct_ssh(self) -> MachineCreate:
        if self.ssh_keys and not self.direct_ssh:
            raise ValueError(
                "ssh_keys are installed only with direct_ssh: true (break-glass); "
                "otherwise register the keys as a bastion user (POST /v1/users) and grant access"
            )
        return self


class MachinePatch(_Request):
    """``PATCH /v1/machines/{id}``: resize live; ``force`` overrides the scale-down guard."""

    cpus: Cpus | None = None
    memory: ByteSize | None = None
    disk: ByteSize | None = None
    force: bool = False

    @model_validator(mode="after")
    def _something(self) -> MachinePatch:
        if self.cpus is None and self.memory is None and self.disk is None:
            raise ValueError("give at least one of cpus, memory, disk")
        return self


class AppScale(_Request):
    """``POST /v1/apps/{app}/scale``: the wanted number of machines (ids pick who goes)."""

    count: int = Field(ge=0, le=1000)
    ids: list[str] | None = Field(default=None, max_length=1000)


class PoolCreateBody(_Request):
    """``POST /v1/pools``: an address pool on one VLAN of one dc."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")
    dc: str = Field(pattern=DC_RE)
    vlan_id: int = Field(ge=1, le=4094)
    cidr: str = Field(min_length=9, max_length=18)
    gateway: IPv4Address
    reserved: list[str] = Field(default_factory=list)
    cooldown_s: int = Field(default=7 * 24 * 3600, ge=0)


class PoolPatchBody(_Request):
    """``PATCH /v1/pools/{name}``: new reserved addresses and/or cooldown."""

    reserved: list[str] | None = None
    cooldown_s: int | None = Field(default=None, ge=0)


class TokenCreate(_Request):
    """``POST /v1/tokens``: a named token with a role, optionally scoped to some apps."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._@-]+$")
    role: Literal["admin", "ops", "release", "viewer"]
    apps: list[Annotated[str, Field(pattern=APP_RE)]] | None = Field(
        default=None,
        min_length=1,
        max_length=100,
        description="the apps this token may act on (every app when absent)",
    )

    @model_validator(mode="after")
    def _admin_unscoped(self) -> TokenCreate:
        # An admin makes tokens, so a scope would bind it to nothing.
        if self.role == "admin" and self.apps is not None:
            raise ValueError("an admin token cannot be scoped to apps")
        return self


# A port, optionally followed by a path: what an http or tcp check probes on the machine's IP.
_PORT_TARGET = r"^:?[0-9]{1,5}(/.*)?$"


class CheckDeclare(_Request):
    """``PUT /v1/apps/{app}/checks/{name}``: a health check releases of the app may name.

    ``cmd`` runs ``target`` with ``sh -c`` as root inside each machine; ``http`` and ``tcp``
    probe ``PORT[/PATH]`` on its IP."""

    # The rule across fields below, in the document too (JSON Schema 2020-12's if/then).
    model_config = ConfigDict(
        json_schema_extra={
            "if": {"properties": {"type": {"enum": ["http", "tcp"]}}},
            "then": {"properties": {"target": {"pattern": _PORT_TARGET}}},
        }
    )
    type: Literal["http", "tcp", "cmd"]
    target: str = Field(min_length=1, max_length=1000)
    timeout_s: float = Field(default=30.0, gt=0, le=600)
    fail_after: int | None = Field(
        default=None,
        ge=1,
        le=100,
        description="give up after this many unhealthy answers in a row, not at timeout_s",
    )

    @model_validator(mode="after")
    def _port_target(self) -> CheckDeclare:
        if self.type != "cmd" and not re.fullmatch(_PORT_TARGET, self.target):
            raise ValueError(f"a {self.type} check's target is PORT or PORT/PATH")
        return self


# --- responses ----------------------------------------------------------------------------


class Problem(BaseModel):
    """RFC 9457 problem details; ``errors`` lists every failing field of a 422."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    reason: str | None = None
    errors: list[dict[str, Any]] | None = None


class Transition(BaseModel):
    """One state change of a machine."""

    state: str
    at: datetime
    reason: str | None = None


class MachineSummaryOut(BaseModel):
    """A machine as a list shows it (``GET /v1/machines/{id}`` adds its transitions)."""

    id: str
    type: str
    app: str
    state: str
    reason: str | None = None
    image: str
    cpus: float
    memory: int
    disk: int
    dc: str
    vlan_id: int
    hostname: str
    ip: str | None = None
    host: str | None = None
    pending: str | None = Field(default=None, description="the operation in progress, if any")
    created_at: datetime
    updated_at: datetime
    links: dict[str, str] = Field(default_factory=dict)


class MachineOut(MachineSummaryOut):
    """A machine as the API shows it, with every state change."""

    transitions: list[Transition] = Field(default_factory=list)


class MachinePage(BaseModel):
    """One page of machines; ``next`` is the cursor of the following page."""

    items: list[MachineSummaryOut]
    next: str | None = None


class AcceptedMachine(BaseModel):
    """A machine a request created, with where to follow it."""

    id: str
    state: str
    links: dict[str, str]


class Accepted(BaseModel):
    """The answer to a create: the machines' ids and links."""

    machines: list[AcceptedMachine]
    idempotency_key: str | None = None


class ActionAccepted(BaseModel):
    """The answer to a start/stop/restart/delete/resize."""

    id: str
    action: str
    state: str
    links: dict[str, str]


class ScaleFailure(BaseModel):
    """A machine a scale-in chose but could not begin to destroy, and why."""

    id: str
    reason: str
    detail: str = ""


class ScaleResult(BaseModel):
    """What a scale did; ``failed`` names each machine it could not scale in, and why."""

    app: str
    count: int
    created: list[str]
    destroying: list[str]
    failed: list[ScaleFailure] = Field(default_factory=list)


class HostOut(BaseModel):
    """A Docker host, from its heartbeats."""

    id: str
    dc: str
    status: str
    last_seen: datetime
    capacity: dict[str, float]
    allocated: dict[str, float]
    machines: int
    labels: dict[str, str] = Field(default_factory=dict)
    version: str | None = None
    # The smallest data disk its volume driver makes; a create asking less is refused (422).
    min_disk: int = XFS_MIN_DISK_BYTES
    # Placement skips a drained host (POST /v1/hosts/{id}/drain); status says drained too.
    drained: bool = False
    images: list[str] = Field(default_factory=list)  # the tags its engine holds


class TokenOut(BaseModel):
    """A token's metadata (never the secret)."""

    id: str
    name: str
    role: str
    apps: list[str] | None = None
    created_at: datetime
    revoked: bool = False


class TokenList(BaseModel):
    """Every token's metadata, revoked ones included."""

    items: list[TokenOut]


class TokenCreated(TokenOut):
    """A new token: the secret is shown this once."""

    token: str


class AuditEntry(BaseModel):
    """Who did what, when, and how it ended."""

    at: datetime
    who: str
    role: str
    method: str
    path: str
    status: int
    target: str | None = None
    # A bastion event (session.started, transfer.done...): its type and fields.
    event: str | None = None
    detail: dict[str, Any] | None = None


class AuditPage(BaseModel):
    """Audit entries, newest first."""

    items: list[AuditEntry]


class IpInfo(BaseModel):
    """Who holds an IP now, and who held it before."""

    ip: str
    owner: MachineOut | None = None
    history: list[dict[str, Any]] = Field(default_factory=list)
    lease: dict[str, Any] | None = None


class MachineQuery(_Request):
    """Query of ``GET /v1/machines``: filters and paging (unknown parameters are refused)."""

    app: str | None = Field(default=None, pattern=APP_RE)
    state: State | None = None
    host: str | None = None
    ip: IPv4Address | None = None
    ids: str | None = Field(default=None, description="comma-separated machine ids")
    limit: int = Field(default=100, ge=1, le=1000)
    after: str | None = Field(default=None, description="cursor: the last id of the page before")


class WaitQuery(_Request):
    """``?wait=<seconds>`` on a create."""

    wait: float = Field(default=0, ge=0, le=3600)


# --- path parameters (validated and documented from these) -------------------------------


class IpPath(_Request):
    """``{ip}``: an IPv4 address."""

    ip: IPv4Address


class AppPath(_Request):
    """``{app}``: an app name."""

    app: str = Field(pattern=APP_RE)


class CheckPath(AppPath):
    """``{app}`` and a check's ``{name}``."""

    name: str = Field(pattern=CHECK_NAME)


class AppCheckOut(BaseModel):
    """A health check declared for an app."""

    app: str
    name: str
    type: str
    target: str
    timeout_s: float
    fail_after: int | None = None
    declared_by: str
    updated_at: datetime


class AppCheckList(BaseModel):
    """The health checks declared for an app, by name."""

    items: list[AppCheckOut]
