"""Where the bastion gets the host keys a machine must present, and how an agent reads them."""

from __future__ import annotations

from pathlib import Path

import asyncssh
import pytest

from libs.common.errors import TransientError
from services.bastion.documents import MachineView
from services.bastion.domain import Refused
from services.bastion.fakes import MemoryHostKeyPins
from services.bastion.hostkeys import HostKeyBook
from services.provisioner.hostkeys import read_host_keys


def _line(key: asyncssh.SSHKey) -> str:
    return key.export_public_key().decode().strip()


REAL = _line(asyncssh.generate_private_key("ssh-ed25519"))
OTHER = _line(asyncssh.generate_private_key("ssh-ed25519"))
M: MachineView = {"_id": "m-1", "app": "web", "state": "running", "hostname": "web-1",
                  "ip": "10.0.0.5", "host": "h1"}  # fmt: skip


class Agent:
    def __init__(self, answer: tuple[list[str], str] | Exception) -> None:
        self.answer = answer
        self.asked: list[str] = []

    async def __call__(self, m: MachineView) -> tuple[list[str], str]:
        self.asked.append(m["_id"])
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def _fp(keys: list[asyncssh.SSHKey]) -> list[str]:
    return [k.get_fingerprint() for k in keys]


async def test_keys_the_gateway_records_come_first():
    agent = Agent(([OTHER], ""))
    book = HostKeyBook(MemoryHostKeyPins(), agent)
    keys = await book.keys_for({**M, "host_keys": [REAL]})
    assert (_fp(keys), agent.asked) == (_fp([asyncssh.import_public_key(REAL)]), [])


async def test_the_agent_is_asked_once_and_its_answer_is_pinned():
    pins, agent = MemoryHostKeyPins(), Agent(([REAL], ""))
    book = HostKeyBook(pins, agent)
    first = await book.keys_for(M)
    agent.answer = ([OTHER], "")  # the machine's file changed later: the pin holds
    second = await book.keys_for(M)
    assert _fp(first) == _fp(second) == _fp([asyncssh.import_public_key(REAL)])
    assert (agent.asked, pins.keys) == (["m-1"], {"m-1": [REAL]})


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        (TransientError("no reply"), "its host h1 did not say its host keys"),
        (([], "not_running"), "its host has no host key for it (not_running)"),
        ((["not a key"], ""), "no usable host key is recorded for it"),
    ],
)
async def test_a_machine_without_keys_to_be_had_is_refused(answer, says):
    pins = MemoryHostKeyPins()
    with pytest.raises(Refused, match="cannot verify web-1") as err:
        await HostKeyBook(pins, Agent(answer)).keys_for(M)
    assert err.value.reason == "host_key_unknown"
    assert says in str(err.value)
    assert pins.keys == {}  # nothing is pinned: the next session asks again


def test_an_agent_reads_the_public_keys_ed25519_first_without_comments(tmp_path: Path):
    ssh = tmp_path / "etc" / "ssh"
    ssh.mkdir(parents=True)
    (ssh / "ssh_host_ecdsa_key.pub").write_text("ecdsa-sha2-nistp256 AAAAE2 root@box\n")
    (ssh / "ssh_host_ed25519_key.pub").write_text(REAL + " root@box\n")
    (ssh / "ssh_host_ed25519_key").write_text("PRIVATE\n")
    (ssh / "ssh_host_rsa_key.pub").write_text("garbage\n")
    assert read_host_keys(tmp_path) == [REAL, "ecdsa-sha2-nistp256 AAAAE2"]
    assert read_host_keys(tmp_path / "nothing") == []
