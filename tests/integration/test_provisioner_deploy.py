"""Releases on a real machine (a dockvm/base container) from the real local Maven repository."""

from __future__ import annotations

import asyncio
import os
import uuid

import aiohttp
import docker
import pytest

from libs.common.contracts.releases import Artifact, Deploy, HealthCheck
from libs.common.maven import MavenRepository
from services.provisioner.adapters.shell import DockerMachineShell
from services.provisioner.deploy import Deployer
from services.provisioner.domain import container_name
from tests.integration.test_maven import MAVEN_URL, tampered_repo  # noqa: F401 - fixture
from tests.support.subnets import free_24

IMAGE = os.environ.get("DOCKVM_BASE_IMAGE", "dockvm/base:bookworm")


@pytest.fixture(scope="module")
def machine():
    """One running machine on its own bridge network; removed with the network after."""
    client = docker.from_env()
    subnet = f"10.234.{free_24()}.0/24"
    net = client.networks.create(
        f"dockvm-test-deploy-{uuid.uuid4().hex[:6]}",
        driver="bridge",
        ipam=docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=subnet)]),
        labels={"dockvm.test": "deploy"},
    )
    mid = f"deploy-{uuid.uuid4().hex[:8]}"
    container = client.containers.create(
        IMAGE,
        name=container_name(mid),
        labels={"dockvm.machine_id": mid, "dockvm.test": "deploy"},
        network=net.name,
    )
    try:
        container.start()
        yield mid
    finally:
        container.remove(force=True)
        net.remove()
        client.close()


@pytest.fixture
async def deployer(tmp_path):
    shell = DockerMachineShell("unix:///var/run/docker.sock")
    async with aiohttp.ClientSession() as session:
        yield Deployer(shell, MavenRepository(MAVEN_URL, session), session, tmp_path, "h1"), shell
    shell.close()


def deploy(mid: str, version: str, release: str | None = None) -> Deploy:
    return Deploy(
        release_id=release or f"r-{version}",
        machine_id=mid,
        artifact=Artifact(group_id="com.example", artifact_id="demo-app", version=version),
        health_check=HealthCheck(type="http", target="8000/", timeout_s=8),
    )


async def serves(shell: DockerMachineShell, mid: str) -> str:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://{await shell.ip(mid)}:8000/") as r:
            return await r.text()


async def app_pid(shell: DockerMachineShell, mid: str) -> str:
    return (await shell.exec(mid, ["cat", "/run/dockvm-app.pid"]))[1].strip()


async def test_deploy_upgrade_then_broken_release_rolls_back(machine, deployer):
    d, shell = deployer

    first = await d.run(deploy(machine, "1.0.0"))
    v1 = await serves(shell, machine)
    second = await d.run(deploy(machine, "2.0.0"))
    v2 = await serves(shell, machine)
    broken = await d.run(deploy(machine, "3.0.0"))
    after = await serves(shell, machine)
    _, current = await shell.exec(machine, ["readlink", "/app/current"])

    assert first.TYPE == "deploy.succeeded"
    assert v1 == "demo-app 1.0.0\n"
    assert (second.TYPE, second.previous_version) == ("deploy.succeeded", "1.0.0")
    assert v2 == "demo-app 2.0.0\n"
    assert broken.TYPE == "deploy.failed"
    assert (broken.reason, broken.rolled_back) == ("health_check_failed", True)
    assert after == "demo-app 2.0.0\n"
    assert current.strip() == "/app/releases/2.0.0"


async def test_a_check_that_keeps_answering_unhealthy_gives_up_before_its_timeout(
    machine, deployer
):
    d, _ = deployer
    cmd = deploy(machine, "2.0.0", release="fail-fast").model_copy(
        update={"health_check": HealthCheck(type="cmd", target="exit 3", timeout_s=600,
                                            fail_after=3)}
    )
    started = asyncio.get_running_loop().time()

    failed = await d.run(cmd)

    assert (failed.TYPE, failed.reason) == ("deploy.failed", "health_check_failed")
    assert "`exit 3` exited 3" in failed.detail
    assert asyncio.get_running_loop().time() - started < 600  # the test's own timeout is 300 s


async def test_same_deploy_twice_deploys_once(machine, deployer):
    d, shell = deployer
    await d.run(deploy(machine, "2.1.0-SNAPSHOT", release="twice"))
    pid = await app_pid(shell, machine)

    again = await d.run(deploy(machine, "2.1.0-SNAPSHOT", release="twice"))

    assert again.TYPE == "deploy.succeeded"
    assert await app_pid(shell, machine) == pid
    assert await serves(shell, machine) == "demo-app 2.1.0-SNAPSHOT\n"


async def test_checksum_mismatch_installs_nothing(machine, deployer, tampered_repo, tmp_path):  # noqa: F811
    _, shell = deployer
    await shell.exec(machine, ["rm", "-rf", "/app/releases/1.0.0"])
    async with aiohttp.ClientSession() as session:
        d = Deployer(shell, MavenRepository(tampered_repo, session), session, tmp_path, "h1")
        result = await d.run(deploy(machine, "1.0.0", release="tampered"))
    code, _ = await shell.exec(machine, ["test", "-e", "/app/releases/1.0.0"])

    assert (result.TYPE, result.reason) == ("deploy.failed", "checksum_mismatch")
    assert code != 0


async def test_unknown_artifact_changes_nothing(machine, deployer):
    d, shell = deployer
    _, before = await shell.exec(machine, ["readlink", "/app/current"])

    result = await d.run(deploy(machine, "9.9.9"))
    _, after = await shell.exec(machine, ["readlink", "/app/current"])

    assert (result.TYPE, result.reason) == ("deploy.failed", "not_found")
    assert after == before


async def test_concurrent_app_starts_run_one_app(machine, deployer):
    """dockvm-init's start at boot may race a release's restart: one app must come out."""
    d, shell = deployer
    await d.run(deploy(machine, "2.0.0", release="race"))
    await shell.exec(machine, ["/usr/local/sbin/dockvm-app", "stop"])

    await asyncio.gather(
        *(shell.exec(machine, ["/usr/local/sbin/dockvm-app", "start"]) for _ in range(6))
    )
    await asyncio.sleep(1)
    _, count = await shell.exec(machine, ["pgrep", "-c", "-f", "^python3 .*server.py"])
    code, _ = await shell.exec(machine, ["sh", "-c", "kill -0 $(cat /run/dockvm-app.pid)"])

    assert count.strip() == "1"
    assert code == 0


async def test_release_id_is_written_literally_even_when_it_looks_like_an_option(machine, deployer):
    d, shell = deployer

    result = await d.run(deploy(machine, "1.0.0", release="-n"))
    _, marker = await shell.exec(machine, ["cat", "/app/current/.dockvm-release"])
    again = await d.run(deploy(machine, "1.0.0", release="-n"))

    assert (result.TYPE, again.TYPE) == ("deploy.succeeded", "deploy.succeeded")
    assert marker == "-n\n"
    # Recognised as already deployed: no previous version, so nothing was switched.
    assert again.previous_version is None


async def test_a_hostile_version_past_the_contract_runs_nothing(machine, deployer):
    """A version the contract would refuse, forced in: the machine runs no part of it."""
    d, shell = deployer
    hostile = "1.0.0; touch /tmp/pwned"
    cmd = deploy(machine, "1.0.0", release="hostile")
    forced = cmd.model_copy(
        update={
            "artifact": cmd.artifact.model_copy(update={"version": hostile}),
            "action": "rollback",
        }
    )

    result = await d.run(forced)
    code, _ = await shell.exec(machine, ["test", "-e", "/tmp/pwned"])

    assert (result.TYPE, result.reason) == ("deploy.failed", "not_installed")
    assert code != 0
