"""Releases on one machine, the way a VM gets them: pull the Maven artifact, verify it, install
it under ``/app/releases/<version>/``, switch ``/app/current`` atomically, restart the app and
check its health; on failure switch back and restart the previous version.

A deploy is idempotent by (release_id, machine_id): a machine that already runs the release's
version for that release answers success without touching anything. Every deploy gets an answer:
a refusal (a ``DomainError``) becomes ``deploy.failed``; a transient error is raised, to retry.

The version and the release id come off the bus: the contracts keep them to one safe path
segment, and every shell script here quotes them too (built by the ``*_script`` functions), so
that a contract loosened by mistake still runs no command and escapes no directory.
"""

from __future__ import annotations

import asyncio
import io
import shlex
import tarfile
from pathlib import Path

import aiohttp
import structlog

from libs.common.contracts.releases import (
    Artifact,
    Deploy,
    DeployFailed,
    DeploySucceeded,
    HealthCheck,
)
from libs.common.errors import DomainError, TransientError
from libs.common.maven import MavenRepository

from .adapters.shell import MachineShell

__all__ = [
    "Deployer",
    "install_script",
    "parse_health_target",
    "stage_script",
    "switch_script",
]

log = structlog.get_logger("provisioner.deploy")
RELEASES = "/app/releases"
CURRENT = "/app/current"
MARKER = ".dockvm-release"


def parse_health_target(check: HealthCheck) -> tuple[int, str]:
    """``8000/health`` → (8000, "/health") for http and tcp checks; reject anything else."""
    port_text, _, path = check.target.lstrip(":").partition("/")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise DomainError(
            f"health_check target {check.target!r} must be PORT or PORT/PATH", reason="invalid"
        )
    return int(port_text), "/" + path


def _release_dir(version: str) -> str:
    return f"{RELEASES}/{version}"


def stage_script(version: str) -> str:
    """Shell that makes an empty staging directory for ``version``."""
    new = shlex.quote(f"{_release_dir(version)}.new")
    return f"rm -rf {new} && mkdir -p {new}"


def install_script(version: str, release_id: str) -> str:
    """Shell that marks the staged ``version`` with ``release_id`` and moves it in place."""
    target = _release_dir(version)
    q = shlex.quote
    # printf, not echo: a release id that starts with "-n" is not an option to printf's %s.
    return (
        f"printf '%s\\n' {q(release_id)} > {q(f'{target}.new/{MARKER}')} && "
        f"rm -rf {q(target)} && mv {q(f'{target}.new')} {q(target)}"
    )


def switch_script(version: str) -> str:
    """Shell that points ``/app/current`` at ``version`` atomically (a rename over the link)."""
    q, nxt = shlex.quote, f"{CURRENT}.next"
    return f"ln -sfn {q(_release_dir(version))} {q(nxt)} && mv -T {q(nxt)} {q(CURRENT)}"


def _archive_for(artifact: Artifact, file: Path) -> bytes:
    """What to unpack into the release directory: a tar.gz as it is, a jar/war as app.<ext>."""
    data = file.read_bytes()
    if artifact.packaging == "tar.gz":
        return data
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(f"app.{artifact.packaging}")
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class Deployer:
    """Deploys and rolls back releases on the machines of one host."""

    def __init__(
        self,
        shell: MachineShell,
        maven: MavenRepository,
        session: aiohttp.ClientSession,
        work_dir: Path,
        host_id: str,
    ) -> None:
        self._shell = shell
        self._maven = maven
        self._session = session
        self._work = work_dir
        self._host = host_id
        self._locks: dict[str, asyncio.Lock] = {}

    async def run(self, cmd: Deploy) -> DeploySucceeded | DeployFailed:
        """Carry out ``cmd``; one deploy at a time per machine."""
        lock = self._locks.setdefault(cmd.machine_id, asyncio.Lock())
        async with lock:
            try:
                if cmd.action == "rollback":
                    return await self._rollback(cmd)
                return await self._deploy(cmd)
            except DomainError as err:
                # Every command gets its answer, even one refused outright (a bad health target).
                return self._failed(cmd, err.reason, str(err), None)

    async def _sh(self, machine_id: str, script: str) -> tuple[int, str]:
        return await self._shell.exec(machine_id, ["/bin/sh", "-c", script])

    async def _current(self, machine_id: str) -> tuple[str | None, str | None]:
        code, out = await self._sh(
            machine_id,
            f'v=$(readlink {CURRENT}) && basename "$v" && cat "$v/{MARKER}" 2>/dev/null',
        )
        if code != 0 and not out.strip():
            return None, None
        lines = out.strip().splitlines()
        return (lines[0] if lines else None), (lines[1] if len(lines) > 1 else None)

    def _failed(
        self, cmd: Deploy, reason: str, detail: str, previous: str | None, rolled_back: bool = False
    ) -> DeployFailed:
        log.warning("deploy failed", machine_id=cmd.machine_id, reason=reason, detail=detail)
        return DeployFailed(
            release_id=cmd.release_id,
            machine_id=cmd.machine_id,
            host=self._host,
            version=cmd.artifact.version,
            reason=reason,
            detail=detail[:2000],
            previous_version=previous,
            rolled_back=rolled_back,
            action=cmd.action,
        )

    async def _deploy(self, cmd: Deploy) -> DeploySucceeded | DeployFailed:
        version = cmd.artifact.version
        previous, release = await self._current(cmd.machine_id)
        if previous == version and release == cmd.release_id:
            log.info("release already deployed", machine_id=cmd.machine_id, version=version)
            return self._succeeded(cmd, version, None)
        try:
            file = await self._maven.download(cmd.artifact, self._work / cmd.release_id)
        except DomainError as err:
            return self._failed(cmd, err.reason, str(err), previous)
        except TransientError as err:
            return self._failed(cmd, "repository_unreachable", str(err), previous)

        code, out = await self._sh(cmd.machine_id, stage_script(version))
        if code != 0:
            return self._failed(cmd, "install_failed", out, previous)
        archive = _archive_for(cmd.artifact, file)
        await self._shell.put_archive(cmd.machine_id, f"{_release_dir(version)}.new", archive)
        code, out = await self._sh(cmd.machine_id, install_script(version, cmd.release_id))
        if code != 0:
            return self._failed(cmd, "install_failed", out, previous)

        problem = await self._switch_restart_check(cmd, version)
        if problem is None:
            return self._succeeded(cmd, version, previous)
        rolled_back = False
        if previous and previous != version:
            rolled_back = await self._switch_restart_check(cmd, previous) is None
        return self._failed(cmd, "health_check_failed", problem, previous, rolled_back)

    async def _rollback(self, cmd: Deploy) -> DeploySucceeded | DeployFailed:
        version = cmd.artifact.version
        current, _ = await self._current(cmd.machine_id)
        code, _ = await self._shell.exec(cmd.machine_id, ["test", "-d", _release_dir(version)])
        if code != 0:
            return self._failed(cmd, "not_installed", f"{version} is not on the machine", current)
        problem = await self._switch_restart_check(cmd, version)
        if problem is None:
            return self._succeeded(cmd, version, current)
        return self._failed(cmd, "health_check_failed", problem, current)

    def _succeeded(self, cmd: Deploy, version: str, previous: str | None) -> DeploySucceeded:
        return DeploySucceeded(
            release_id=cmd.release_id,
            machine_id=cmd.machine_id,
            host=self._host,
            version=version,
            previous_version=previous,
            action=cmd.action,
        )

    async def _switch_restart_check(self, cmd: Deploy, version: str) -> str | None:
        """Point /app/current at ``version``, restart, health-check; the problem, or None."""
        code, out = await self._sh(cmd.machine_id, switch_script(version))
        if code != 0:
            return f"switch to {version} failed: {out.strip()}"
        code, out = await self._shell.exec(cmd.machine_id, shlex.split(cmd.restart_command))
        if code != 0:
            return f"restart command exited {code}: {out.strip()[-500:]}"
        return await self._health(cmd.machine_id, cmd.health_check)

    async def _health(self, machine_id: str, check: HealthCheck) -> str | None:
        """Poll the check until it passes (None), or its timeout ends or ``fail_after``
        consecutive unhealthy answers come (the last problem)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + check.timeout_s
        answered_bad = 0
        while True:
            problem, answered = await self._probe(machine_id, check)
            if problem is None:
                return None
            answered_bad = answered_bad + 1 if answered else 0
            if loop.time() >= deadline or (check.fail_after and answered_bad >= check.fail_after):
                return problem
            await asyncio.sleep(0.5)

    async def _probe(self, machine_id: str, check: HealthCheck) -> tuple[str | None, bool]:
        """The problem (None when healthy), and whether the app itself answered it."""
        if check.type == "cmd":
            code, out = await self._sh(machine_id, check.target)
            if code == 0:
                return None, True
            return f"`{check.target}` exited {code}: {out.strip()[-300:]}", True
        ip = await self._shell.ip(machine_id)
        if not ip:
            return "the machine has no IP", False
        port, path = parse_health_target(check)
        if check.type == "tcp":
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), 2)
            except (OSError, TimeoutError) as err:
                return f"tcp {ip}:{port}: {err!r}", False
            writer.close()
            return None, True
        url = f"http://{ip}:{port}{path}"
        try:
            async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=3)) as r:
                return (None if 200 <= r.status < 300 else f"GET {url}: HTTP {r.status}"), True
        except (aiohttp.ClientError, TimeoutError) as err:
            return f"GET {url}: {err!r}", False
