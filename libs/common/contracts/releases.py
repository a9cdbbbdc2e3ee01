"""Messages of a release: the release system's request, the per-machine deploy command and its
outcome, and the release's final result.

The release system publishes ``release.requested`` on the ``dockvm`` exchange (routing key
``release.requested``) or calls ``POST /v1/releases``. The gateway rolls it out: Docker machines
get ``host.<host_id>.deploy``, KVM machines ``kvm.deploy.requested`` with the same coordinates.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .envelope import Command, Event, register

__all__ = [
    "APP_COMMAND",
    "CHECK_NAME",
    "Artifact",
    "Deploy",
    "DeployFailed",
    "DeploySucceeded",
    "HealthCheck",
    "KvmDeployRequested",
    "ReleaseFailed",
    "ReleaseRequested",
    "ReleaseSpec",
    "ReleaseSucceeded",
]

# Versions and release ids become directory names on hosts and machines, and reach shells:
# dot-separated runs of safe characters, so no leading dot, no "..", no slash. (No look-ahead:
# pydantic's regex engine has none.) Lengths are each field's max_length.
_MAVEN_ID = r"^[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*$"
RELEASE_ID = r"^[A-Za-z0-9_:-]+(?:\.[A-Za-z0-9_:-]+)*$"
# The name of a health check ops declared for an app (``PUT /v1/apps/{app}/checks/{name}``).
CHECK_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"


class Artifact(Command):
    """Maven coordinates of what is released."""

    TYPE = "artifact"
    group_id: str = Field(min_length=1, max_length=200, pattern=_MAVEN_ID)
    artifact_id: str = Field(min_length=1, max_length=200, pattern=_MAVEN_ID)
    version: str = Field(min_length=1, max_length=100, pattern=_MAVEN_ID)
    packaging: Literal["war", "jar", "tar.gz"] = "tar.gz"
    classifier: str | None = Field(default=None, max_length=100, pattern=_MAVEN_ID)


class HealthCheck(Command):
    """How a machine proves the new version works.

    ``http`` and ``tcp`` probe a port of the machine's IP from its host and run nothing in it;
    ``cmd`` runs ``target`` as root inside the machine, so it only ever comes from a check that
    ops declared for the app (a release names it with ``ReleaseSpec.check``).
    """

    TYPE = "health_check"
    type: Literal["http", "tcp", "cmd"]
    target: str = Field(min_length=1, max_length=1000)
    timeout_s: float = Field(default=30.0, gt=0, le=600)
    # Give up before ``timeout_s`` after this many consecutive answers that say "unhealthy"
    # (an HTTP status outside 2xx, a command's non-zero exit): an app that answers 404 after its
    # restart will not heal by itself. A refused or timed-out connection (still starting) counts
    # only against ``timeout_s``. None waits out ``timeout_s``.
    fail_after: int | None = Field(default=None, ge=1, le=100)


# The machine image's release hook: ``start|stop|restart|reload|status`` of the app.
APP_COMMAND = "/usr/local/sbin/dockvm-app"


class ReleaseSpec(Command):
    """What a release rolls out and how: Maven coordinates, batches, the health check."""

    TYPE = "release.spec"
    app: str = Field(min_length=1, max_length=64)
    group_id: str = Field(min_length=1, max_length=200, pattern=_MAVEN_ID)
    artifact_id: str = Field(min_length=1, max_length=200, pattern=_MAVEN_ID)
    version: str = Field(min_length=1, max_length=100, pattern=_MAVEN_ID)
    packaging: Literal["war", "jar", "tar.gz"] = "tar.gz"
    classifier: str | None = Field(default=None, max_length=100, pattern=_MAVEN_ID)
    batch_size: int | None = Field(default=None, ge=1, le=1000)
    batch_percent: int | None = Field(default=None, ge=1, le=100)
    max_failures: int = Field(default=0, ge=0)
    # A named check is resolved by the gateway into ``health_check`` before anything is stored
    # or sent, so a stored release carries both: the name, and the check that ran.
    health_check: HealthCheck | None = None
    check: str | None = Field(
        default=None,
        max_length=63,
        pattern=CHECK_NAME,
        description="the name of a health check declared for the app",
    )
    activate: Literal["restart", "reload"] = Field(
        default="restart",
        description="how a machine puts the new version live: restart the app, or (a war) "
        "reload it: Tomcat redeploys the war without restarting its JVM",
    )

    @model_validator(mode="after")
    def _reload_is_for_a_war(self) -> ReleaseSpec:
        if self.activate == "reload" and self.packaging != "war":
            raise ValueError("activate: reload is Tomcat's redeploy of a war (packaging: war)")
        return self

    @model_validator(mode="after")
    def _one_batch_rule(self) -> ReleaseSpec:
        if (self.batch_size is None) == (self.batch_percent is None):
            raise ValueError("give exactly one of batch_size and batch_percent")
        return self

    @model_validator(mode="after")
    def _some_check(self) -> ReleaseSpec:
        if self.health_check is None and self.check is None:
            raise ValueError("give check (a check declared for the app) or health_check")
        return self


@register
class ReleaseRequested(ReleaseSpec):
    """Roll ``artifact`` onto every running machine of ``app``, in batches."""

    TYPE = "release.requested"
    release_id: str = Field(min_length=1, max_length=64, pattern=RELEASE_ID)

    def artifact(self) -> Artifact:
        """The Maven coordinates of this release."""
        return Artifact(
            group_id=self.group_id,
            artifact_id=self.artifact_id,
            version=self.version,
            packaging=self.packaging,
            classifier=self.classifier,
        )


@register
class Deploy(Command):
    """Install ``artifact`` on one machine, restart its app, check its health.

    Routing key ``host.<host_id>.deploy``. Idempotent by (release_id, machine_id, action).
    """

    TYPE = "deploy"
    release_id: str = Field(min_length=1, max_length=64, pattern=RELEASE_ID)
    machine_id: str = Field(min_length=1, max_length=64)
    artifact: Artifact
    health_check: HealthCheck
    action: Literal["deploy", "rollback"] = "deploy"
    restart_command: str = f"{APP_COMMAND} restart"


@register
class DeploySucceeded(Event):
    """The machine runs ``version`` and passed its health check."""

    TYPE = "deploy.succeeded"
    release_id: str
    machine_id: str
    host: str
    version: str
    previous_version: str | None = None
    action: Literal["deploy", "rollback"] = "deploy"


@register
class DeployFailed(Event):
    """The deploy failed; the machine was switched back to ``previous_version`` if any."""

    TYPE = "deploy.failed"
    release_id: str
    machine_id: str
    host: str
    version: str
    reason: str
    detail: str = ""
    previous_version: str | None = None
    rolled_back: bool = False
    action: Literal["deploy", "rollback"] = "deploy"


@register
class KvmDeployRequested(Event):
    """A KVM machine of the app should deploy the same coordinates (legacy KVM channel)."""

    TYPE = "kvm.deploy.requested"
    release_id: str
    machine_id: str
    ip: str | None = None
    artifact: Artifact
    health_check: HealthCheck
    activate: Literal["restart", "reload"] = "restart"


@register
class ReleaseSucceeded(Event):
    """Every machine of the release runs the new version."""

    TYPE = "release.succeeded"
    release_id: str
    app: str
    version: str
    machines: int


@register
class ReleaseFailed(Event):
    """The release stopped; failed machines were rolled back."""

    TYPE = "release.failed"
    release_id: str
    app: str
    version: str
    reason: str
    failed_machines: list[str] = Field(default_factory=list)
