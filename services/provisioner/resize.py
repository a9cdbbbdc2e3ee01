"""A machine's live resize on its host: the disk grows online, CPU and memory change in place.

Kept apart from :mod:`.service` (the agent's other commands) for size; the agent calls
:func:`resize_machine` under the machine's lock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from libs.common.contracts.provisioner import (
    ContainerResize,
    ContainerResized,
    ContainerResizeFailed,
)
from libs.common.errors import DomainError, NotFoundError, TransientError

from .domain import Limits, check_machine_id, plan_resize

if TYPE_CHECKING:
    from .service import ProvisionerService

__all__ = ["resize_machine"]


async def resize_machine(
    agent: ProvisionerService, cmd: ContainerResize
) -> ContainerResized | ContainerResizeFailed:
    """Grow the disk online, then change CPU and memory with ``docker update`` (called under
    the machine's lock)."""
    try:
        check_machine_id(cmd.machine_id)
        info = await agent.runtime.find(cmd.machine_id)
        if info is None:
            raise NotFoundError(f"no container for machine {cmd.machine_id}")
        current = Limits(info.cpus, info.memory, await agent.volumes.size(cmd.machine_id) or 0)
        shrinking = cmd.memory is not None and cmd.memory < current.memory
        used = await agent.runtime.memory_used(cmd.machine_id) if shrinking else 0
        plan = plan_resize(
            cmd,
            current,
            memory_used=used,
            margin=agent.config.memory_margin,
            host=await agent.capacity.facts(),
        )
        if plan.disk is not None:
            # Held from the check on (no await between), as a create's disk is.
            with agent.capacity.reserving(f"grow:{cmd.machine_id}", plan.disk - current.disk):
                await agent.volumes.grow(cmd.machine_id, plan.disk)
        if plan.cpus is not None or plan.memory is not None:
            await agent.runtime.update(cmd.machine_id, plan.cpus, plan.memory)
        if plan.cpus is not None:
            agent._write_environment(cmd.machine_id, plan.cpus)
    except (DomainError, TransientError) as err:
        return ContainerResizeFailed(
            machine_id=cmd.machine_id,
            host=agent.host,
            reason=err.reason if isinstance(err, DomainError) else "transient",
            detail=str(err),
            retriable=isinstance(err, TransientError),
        )
    return ContainerResized(
        machine_id=cmd.machine_id,
        host=agent.host,
        cpus=plan.cpus if plan.cpus is not None else current.cpus,
        memory=plan.memory if plan.memory is not None else current.memory,
        disk=plan.disk if plan.disk is not None else current.disk,
    )
