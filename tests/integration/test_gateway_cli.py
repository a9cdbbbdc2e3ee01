"""The installed ``dockvm`` CLI against a real gateway process (peers simulated on the bus)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from libs.common.contracts.releases import DeploySucceeded
from tests.integration.test_gateway import GW_ENV, Peers, _admin_token, peers  # noqa: F401

DOCKVM = str(Path(sys.executable).parent / "dockvm")


async def _cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        DOCKVM, *args, env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


async def test_cli_creates_lists_and_deletes_with_the_local_admin_token(
    start_service, service_env, peers  # noqa: F811
):
    gateway = await start_service("gateway", env=GW_ENV)
    # No token given: the CLI falls back to $DOCKVM_STATE_DIR/admin.token, as k3s does.
    env = {"DOCKVM_URL": gateway.url, "DOCKVM_STATE_DIR": service_env["DOCKVM_STATE_DIR"]}
    async with asyncio.timeout(15):  # until a heartbeat of each simulated host arrived
        while len(json.loads((await _cli(env, "host", "list", "--json"))[1] or "[]")) < 2:
            await asyncio.sleep(0.2)
    code, out, _ = await _cli(
        env, "machine", "create", "--app", "cli", "--image", "dockvm/base:bookworm",
        "--cpus", "1", "--memory", "256m", "--disk", "1g", "--dc", "dc1", "--vlan", "233",
        "--count", "2", "--json",
    )
    created = json.loads(out)
    listed = json.loads((await _cli(env, "machine", "list", "--app", "cli", "--json"))[1])
    deleted = await _cli(env, "machine", "delete", created[0]["id"], "--wait", "10")
    bad = await _cli(env, "machine", "resize", created[1]["id"], "--memory", "12q")
    anon = await _cli({"DOCKVM_URL": gateway.url, "DOCKVM_STATE_DIR": "/nonexistent"},
                      "host", "list")

    assert code == 0
    assert [m["state"] for m in created] == ["running", "running"]
    assert sorted(m["id"] for m in listed) == sorted(m["id"] for m in created)
    assert (deleted[0], deleted[1].strip()) == (0, f"{created[0]['id']}: destroyed")
    assert bad[0] == 1 and "memory:" in bad[2]
    assert anon[0] == 1 and "401" in anon[2]
    assert _admin_token(service_env).startswith("dvm_")


async def test_cli_changes_and_deletes_a_pool(start_service, service_env, peers):  # noqa: F811
    gateway = await start_service("gateway", env=GW_ENV)
    await start_service("ipam")
    env = {"DOCKVM_URL": gateway.url, "DOCKVM_STATE_DIR": service_env["DOCKVM_STATE_DIR"]}
    pool = ("cli-pool", "--dc", "dc8", "--vlan", "801", "--cidr", "10.197.0.0/24",
            "--gateway", "10.197.0.1")

    created = await _cli(env, "pool", "create", *pool)
    updated = await _cli(env, "pool", "update", "cli-pool", "--reserved", "10.197.0.5",
                         "--cooldown", "30")
    refused = await _cli(env, "pool", "update", "cli-pool", "--reserved", "10.1.1.1")
    deleted = await _cli(env, "pool", "delete", "cli-pool")
    gone = await _cli(env, "pool", "delete", "cli-pool")

    assert created[0] == 0
    assert (updated[0], updated[1].strip()) == (0, "pool cli-pool updated")
    assert refused[0] == 1 and "reserved" in refused[2]
    assert (deleted[0], deleted[1].strip()) == (0, "pool cli-pool deleted")
    assert gone[0] == 1 and "404" in gone[2]


async def test_cli_starts_follows_and_lists_a_release(
    start_service, service_env, peers, publisher  # noqa: F811
):
    gateway = await start_service("gateway", env=GW_ENV)
    env = {"DOCKVM_URL": gateway.url, "DOCKVM_STATE_DIR": service_env["DOCKVM_STATE_DIR"]}
    async with asyncio.timeout(15):
        while len(json.loads((await _cli(env, "host", "list", "--json"))[1] or "[]")) < 2:
            await asyncio.sleep(0.2)
    code, out, _ = await _cli(
        env, "machine", "create", "--app", "rel", "--image", "dockvm/base:bookworm", "--cpus",
        "1", "--memory", "256m", "--disk", "1g", "--dc", "dc1", "--vlan", "233", "--count", "2",
        "--json",
    )
    assert code == 0, out
    machines = sorted(m["id"] for m in json.loads(out))
    coords = ("--group", "com.example", "--artifact", "demo-app", "--version", "1.0.0")

    started = await _cli(env, "release", "create", "rel", *coords, "--check", "http:8000/",
                         "--no-wait", "--json")
    rid = json.loads(started[1])["id"]
    for mid in machines:  # the test plays the hosts' answers
        await publisher.publish(DeploySucceeded(release_id=rid, machine_id=mid, host="h1",
                                                version="1.0.0"))
    async with asyncio.timeout(15):
        while json.loads((await _cli(env, "release", "show", rid, "--json"))[1])["status"] \
                == "running":
            await asyncio.sleep(0.2)
    shown = await _cli(env, "release", "show", rid)
    listed = json.loads((await _cli(env, "release", "list", "--app", "rel", "--json"))[1])
    bad_check = await _cli(env, "release", "create", "rel", *coords, "--check", "ping:x")
    missing = await _cli(env, "release", "create", "rel", "--group", "com.example",
                         "--artifact", "demo-app", "--version", "9.9.9", "--check", "tcp:22")

    assert started[0] == 0
    assert shown[0] == 0 and "succeeded" in shown[1] and machines[0] in shown[1]
    assert [(r["id"], r["status"]) for r in listed] == [(rid, "succeeded")]
    assert bad_check[0] == 2 and "--check" in bad_check[2]
    assert missing[0] == 1 and "404" in missing[2]


async def test_cli_lists_what_each_registry_holds(start_service, service_env):
    gateway = await start_service("gateway", env=GW_ENV)
    await start_service("imagesync")
    env = {"DOCKVM_URL": gateway.url, "DOCKVM_STATE_DIR": service_env["DOCKVM_STATE_DIR"]}

    # The stack pushes its base image to dc1 (make run, make test).
    code, out, error = await _cli(env, "image", "registries", "--dc", "dc1",
                                  "--prefix", "dockvm/base", "--json")
    table = await _cli(env, "image", "registries", "--dc", "dc1", "--prefix", "dockvm/base")
    unknown = await _cli(env, "image", "registries", "--dc", "dc9")

    assert code == 0, error
    [dc1] = json.loads(out)["registries"]
    held = {(r["repo"], t["tag"]) for r in dc1["repositories"] for t in r["tags"]}
    assert dc1["reachable"]
    assert ("dockvm/base", "bookworm") in held
    assert all(repo.startswith("dockvm/base") for repo, _ in held)
    assert table[0] == 0 and "bookworm" in table[1]
    assert unknown[0] == 1 and "404" in unknown[2]
