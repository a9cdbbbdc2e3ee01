"""The provisioner's bus edge: each host command (``host.<host_id>.#``) goes to one use-case
method, and the result that method returns is published as the command's answer.

Delivery guarantee: commands arrive at least once. Every method is idempotent by machine_id (see
``service``) or by (release_id, machine_id) for a deploy (see ``deploy``), so a redelivered
command does its work once and answers again; every command gets a result event.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from libs.common.bus import Handler, MessageContext
from libs.common.contracts import Message
from libs.common.contracts.provisioner import (
    ContainerCreate,
    ContainerDestroy,
    ContainerResize,
    ContainerRestart,
    ContainerStart,
    ContainerStop,
    ImagePrewarm,
    MachineExport,
    MachineExportEnd,
    MachineHostKeysGet,
    MachineImport,
    MachinesKnown,
    OrphanPurge,
)
from libs.common.contracts.releases import Deploy

from .deploy import Deployer
from .hostkeys import HostKeyReader
from .migrate import Migrations
from .service import ProvisionerService

__all__ = ["answer", "bus_handlers", "machine_handlers", "migration_handlers"]

Command = Callable[[Any], Awaitable[Message | None]]


async def answer(command: Command, msg: Message, ctx: MessageContext) -> Message | None:
    """Run ``command`` on the message and publish its result (if any) as the answer."""
    result = await command(msg)
    if result is not None:
        await ctx.publish(result)
    return result


def machine_handlers(agent: ProvisionerService) -> dict[str, Handler]:
    """The handlers of the machine and image commands, by message type."""
    commands: dict[str, Command] = {
        ContainerCreate.TYPE: agent.create,
        ContainerStart.TYPE: agent.act,
        ContainerStop.TYPE: agent.act,
        ContainerRestart.TYPE: agent.act,
        ContainerDestroy.TYPE: agent.destroy,
        ContainerResize.TYPE: agent.resize,
        ImagePrewarm.TYPE: agent.prewarm,
        MachinesKnown.TYPE: agent.record_known,
        OrphanPurge.TYPE: agent.orphans.purge,
        MachineHostKeysGet.TYPE: HostKeyReader(agent.runtime, agent.host).get,
    }
    return {kind: partial(answer, command) for kind, command in commands.items()}


def migration_handlers(migrations: Migrations) -> dict[str, Handler]:
    """The handlers of a cold migration's commands (export, import, end of an export)."""
    commands: dict[str, Command] = {
        MachineExport.TYPE: migrations.export,
        MachineImport.TYPE: migrations.import_,
        MachineExportEnd.TYPE: migrations.end,
    }
    return {kind: partial(answer, command) for kind, command in commands.items()}


def bus_handlers(
    agent: ProvisionerService, deployer: Deployer, migrations: Migrations | None = None
) -> dict[str, Handler]:
    """Every handler of the host's queue, by message type: machine commands, deploys and
    (given ``migrations``) migrations."""
    extra = migration_handlers(migrations) if migrations is not None else {}
    return {**machine_handlers(agent), Deploy.TYPE: partial(answer, deployer.run), **extra}
