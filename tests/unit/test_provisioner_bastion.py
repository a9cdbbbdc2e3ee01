"""The provisioner's side of the bastion, on fakes: the machine's spec (CA bound, keys only for
break-glass), the SSH guard's rule set and when it is (re)written, and the CA key file."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from ipaddress import IPv4Network
from pathlib import Path

import asyncssh
import pytest

from libs.common.bus import MemoryPublisher
from libs.common.contracts import Message
from libs.common.contracts.bastion import MACHINE_CA_PATH, CaInfo
from libs.common.contracts.provisioner import ContainerCreate, ContainerRestart
from libs.common.errors import TransientError
from services.provisioner.adapters import BridgeNetwork
from services.provisioner.adapters.bastion import (
    NftSshGuard,
    UserCaKey,
    allowed_sources,
    fetch_user_ca,
    parse_sources,
    ssh_ruleset,
)
from services.provisioner.adapters.runtime import ContainerInfo
from services.provisioner.domain import build_spec
from services.provisioner.fakes import MemoryRuntime, MemoryVolumes
from services.provisioner.service import AgentConfig, ProvisionerService
from services.provisioner.settings import ProvisionerSettings

pytestmark = pytest.mark.unit
GW, DIRECT = "dockvm.gateway", "dockvm.direct_ssh"
G = 1 << 30
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl a@b"


def _create(**overrides: object) -> ContainerCreate:
    fields: dict[str, object] = {
        "machine_id": "m1", "app": "web", "image": "dockvm/base:bookworm", "cpus": 1,
        "memory": "1g", "disk": "10g", "ip": "10.9.0.10", "prefix_len": 24,
        "gateway": "10.9.0.1", "vlan_id": 9, "hostname": "web1", "ssh_authorized_keys": [KEY],
    }  # fmt: skip
    fields.update(overrides)
    return ContainerCreate.model_validate(fields)


def _info(labels: dict[str, str], pid: int = 100, running: bool = True) -> ContainerInfo:
    return ContainerInfo(
        id="c1", name="dockvm-m1", machine_id="m1", labels=labels,
        state="running" if running else "exited", started_at=datetime(2026, 1, 1, tzinfo=UTC),
        pid=pid, cpus=1, memory=G, image="img", network="net",
    )  # fmt: skip


@dataclass
class Commands:
    """Records host commands instead of running them."""

    calls: list[tuple[tuple[str, ...], bytes | None]] = field(default_factory=list)

    async def run(self, *argv: str, check: bool = True, input: bytes | None = None) -> str:
        self.calls.append((argv, input))
        return ""


# ---- the spec --------------------------------------------------------------------------------


def test_without_direct_ssh_the_keys_are_not_installed_and_the_ca_is_bound_read_only():
    spec = build_spec(_create(), data_path="/d", network="n", static_ip=True, lxcfs_root=None,
                      user_ca_file="/state/machines/m1/user_ca.pub")  # fmt: skip

    assert "DOCKVM_AUTHORIZED_KEYS" not in spec.env
    assert spec.labels["dockvm.direct_ssh"] == "false"
    assert ("/state/machines/m1/user_ca.pub", MACHINE_CA_PATH, True) in [
        (m.source, m.target, m.read_only) for m in spec.mounts
    ]


def test_direct_ssh_installs_the_keys_and_marks_the_machine():
    spec = build_spec(_create(direct_ssh=True), data_path="/d", network="n", static_ip=True,
                      lxcfs_root=None)  # fmt: skip

    assert spec.env["DOCKVM_AUTHORIZED_KEYS"] == KEY
    assert spec.labels["dockvm.direct_ssh"] == "true"


# ---- sources and rules -----------------------------------------------------------------------


def test_sources_parse_addresses_and_networks_and_name_a_bad_one():
    assert parse_sources(" 10.0.0.1, 10.2.0.0/24,") == (
        IPv4Network("10.0.0.1/32"), IPv4Network("10.2.0.0/24"))  # fmt: skip
    with pytest.raises(ValueError, match="'bastion' is not an IPv4"):
        parse_sources("10.0.0.1,bastion")


def test_a_bad_bastion_source_setting_is_refused():
    with pytest.raises(ValueError, match="DOCKVM_BASTION_SOURCE|bastion_source"):
        ProvisionerSettings(bastion_source="10.0.0.300")


@pytest.mark.parametrize(
    ("labels", "configured", "expected"),
    [
        ({GW: "10.9.0.1", DIRECT: "false"}, (), (IPv4Network("10.9.0.1/32"),)),
        ({GW: "10.9.0.1", DIRECT: "false"}, (IPv4Network("172.17.0.1/32"),),
         (IPv4Network("172.17.0.1/32"),)),
        ({GW: "10.9.0.1", DIRECT: "true"}, (), None),
        # Made before the bastion: it trusts its old keys, so it is left as it was.
        ({GW: "10.9.0.1"}, (), None),
        ({DIRECT: "false"}, (), ()),
    ],
)  # fmt: skip
def test_allowed_sources_are_the_setting_else_the_gateway_and_none_for_break_glass_or_legacy(
    labels, configured, expected
):
    assert allowed_sources(_info(labels), configured) == expected


def test_the_ruleset_replaces_the_table_accepts_the_sources_and_resets_the_rest():
    text = ssh_ruleset([IPv4Network("10.9.0.1/32"), IPv4Network("10.8.0.0/16")])

    lines = [line.strip() for line in text.splitlines()]
    assert lines[:3] == [
        "table inet dockvm_ssh", "delete table inet dockvm_ssh", "table inet dockvm_ssh {"]
    assert "tcp dport 22 ip saddr { 10.8.0.0/16, 10.9.0.1/32 } accept" in lines
    assert 'iifname "lo" accept' in lines
    assert lines.index("tcp dport 22 reject with tcp reset") > lines.index(
        "tcp dport 22 ip saddr { 10.8.0.0/16, 10.9.0.1/32 } accept")  # fmt: skip


def test_with_no_source_known_every_ssh_attempt_is_reset():
    text = ssh_ruleset([])

    assert "accept\n" not in text.replace("policy accept;", "").replace('"lo" accept', "")
    assert "tcp dport 22 reject with tcp reset" in text


async def test_the_guard_writes_once_per_namespace_and_again_after_a_restart():
    commands = Commands()
    guard = NftSshGuard((), commands)  # type: ignore[arg-type]
    labels = {GW: "10.9.0.1", DIRECT: "false"}

    first = await guard.apply(_info(labels, pid=100))
    again = await guard.apply(_info(labels, pid=100))
    restarted = await guard.apply(_info(labels, pid=200))
    stopped = await guard.apply(_info(labels, pid=0, running=False))
    direct = await guard.apply(_info({**labels, DIRECT: "true"}, pid=300))

    assert (first, again, restarted, stopped, direct) == (True, False, True, False, False)
    assert [argv for argv, _ in commands.calls] == [
        ("nsenter", "-t", "100", "-n", "nft", "-f", "-"),
        ("nsenter", "-t", "200", "-n", "nft", "-f", "-"),
    ]
    assert b"ip saddr { 10.9.0.1/32 } accept" in (commands.calls[0][1] or b"")


# ---- the CA key file -------------------------------------------------------------------------


def _ca_line() -> str:
    return asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().strip()


def test_the_ca_key_is_empty_while_absent_then_read_and_reread_when_it_changes(tmp_path):
    path = tmp_path / "user_ca.pub"
    ca = UserCaKey(path)

    absent = ca.current()
    path.write_text(_ca_line() + "\n")
    first = ca.current()
    path.write_text("not a key")
    kept = ca.current()
    rotated_line = _ca_line()
    path.write_text(rotated_line + "\n")
    rotated = ca.current()

    assert absent == ""
    assert first.startswith("ssh-ed25519 ") and first.endswith("\n")
    assert kept == first  # a half-written or broken file keeps the last good key
    assert rotated == rotated_line + "\n"


class _Rpc:
    """Plays the bastion's ``bastion.ca.get``: a reply, or a bastion that does not answer."""

    def __init__(self, reply: Message | None) -> None:
        self.reply = reply
        self.asked = 0

    async def request(self, msg: Message, *, timeout: float = 10.0) -> Message:
        self.asked += 1
        if self.reply is None:
            raise TransientError("no reply to bastion.ca.get within 5s")
        return self.reply


def _ca_info(line: str) -> CaInfo:
    return CaInfo(public_key=line, path="/var/lib/dockvm/bastion/user_ca.pub", fingerprint="x")


async def test_without_the_file_the_key_comes_from_the_bastion(tmp_path):
    ca = UserCaKey(tmp_path / "absent.pub")
    line = _ca_line()
    silent, answering = _Rpc(None), _Rpc(_ca_info(line))

    nothing = await fetch_user_ca(ca, silent)
    adopted = await fetch_user_ca(ca, answering)
    again = await fetch_user_ca(ca, answering)

    assert (nothing, adopted, again) == (False, True, False)
    assert ca.current() == line + "\n"


async def test_with_the_file_here_the_bastion_is_not_asked_and_a_bad_answer_is_not_taken(
    tmp_path,
):
    path = tmp_path / "user_ca.pub"
    path.write_text(_ca_line() + "\n")
    here, elsewhere = UserCaKey(path), UserCaKey(tmp_path / "absent.pub")
    here.current()
    rpc = _Rpc(_ca_info(_ca_line()))

    asked_here = await fetch_user_ca(here, rpc)
    bad = await fetch_user_ca(elsewhere, _Rpc(_ca_info("not a key")))

    assert (asked_here, rpc.asked, here.current()) == (False, 0, path.read_text())
    assert (bad, elsewhere.current()) == (False, "")


async def test_create_binds_the_ca_copy_and_guards_and_a_restart_guards_again(tmp_path):
    runtime = MemoryRuntime(cpus=4, memory=8 * G)
    commands = Commands()
    ca_file = tmp_path / "ca.pub"
    ca_file.write_text(_ca_line() + "\n")
    agent = ProvisionerService(
        AgentConfig(host_id="h1", dc="dc1", lxcfs_path=None, files_dir=tmp_path / "machines"),
        runtime, BridgeNetwork(runtime, "dockvm"), MemoryVolumes(total=100 * G),
        MemoryPublisher(), guard=NftSshGuard((), commands),  # type: ignore[arg-type]
        user_ca=UserCaKey(ca_file),
    )  # fmt: skip

    created = await agent.create(_create())
    copy = tmp_path / "machines" / "m1" / "user_ca.pub"
    copied = copy.read_text()
    await agent.act(ContainerRestart(machine_id="m1"))

    assert created.TYPE == "container.created"
    assert copied == ca_file.read_text()
    assert [argv[2] for argv, _ in commands.calls] == ["4242", "4243"]
    assert Path(copy).stat().st_size > 0
