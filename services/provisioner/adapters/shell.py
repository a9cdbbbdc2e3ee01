"""Running commands and copying files inside a machine, through the Docker Engine.

The port :class:`MachineShell` is what a release needs of a machine; its Docker adapter runs
every SDK call in a bounded thread pool, off the event loop.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from libs.common.errors import NotFoundError, translate_errors

from ..domain import container_name

__all__ = ["DockerMachineShell", "MachineShell"]

T = TypeVar("T")


class MachineShell(Protocol):
    """Port: act inside one machine."""

    async def exec(self, machine_id: str, argv: list[str]) -> tuple[int, str]:
        """Run ``argv`` as root inside the machine; return (exit code, output)."""
        ...

    async def put_archive(self, machine_id: str, path: str, data: bytes) -> None:
        """Unpack a tar (plain or gzip) into ``path`` inside the machine."""
        ...

    async def ip(self, machine_id: str) -> str | None:
        """The machine's IP on its VLAN network."""
        ...


class DockerMachineShell:
    """:class:`MachineShell` on the Docker Engine."""

    def __init__(self, base_url: str, workers: int = 4) -> None:
        import docker

        self._api = docker.APIClient(base_url=base_url, timeout=300, version="auto")
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shell")

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        call = functools.partial(translate_errors(fn), *args)
        return await loop.run_in_executor(self._pool, call)

    def _exec(self, machine_id: str, argv: list[str]) -> tuple[int, str]:
        exec_id = self._api.exec_create(container_name(machine_id), argv, user="root")["Id"]
        output = self._api.exec_start(exec_id, demux=False) or b""
        code = self._api.exec_inspect(exec_id)["ExitCode"]
        return int(code if code is not None else -1), output.decode(errors="replace")

    async def exec(self, machine_id: str, argv: list[str]) -> tuple[int, str]:
        """Run ``argv`` inside the machine and wait for it."""
        return await self._call(self._exec, machine_id, argv)

    def _put(self, machine_id: str, path: str, data: bytes) -> None:
        if not self._api.put_archive(container_name(machine_id), path, data):
            raise NotFoundError(f"could not copy into {path} of machine {machine_id}")

    async def put_archive(self, machine_id: str, path: str, data: bytes) -> None:
        """Unpack ``data`` (a tar, optionally gzipped) at ``path``."""
        await self._call(self._put, machine_id, path, data)

    def _ip(self, machine_id: str) -> str | None:
        attrs = self._api.inspect_container(container_name(machine_id))
        for net in (attrs.get("NetworkSettings", {}).get("Networks") or {}).values():
            if net.get("IPAddress"):
                return net["IPAddress"]
        return attrs.get("Config", {}).get("Labels", {}).get("dockvm.ip")

    async def ip(self, machine_id: str) -> str | None:
        """The first network address of the machine (its VLAN IP), else its label."""
        return await self._call(self._ip, machine_id)

    def close(self) -> None:
        """Release the thread pool."""
        self._pool.shutdown(wait=False, cancel_futures=True)
