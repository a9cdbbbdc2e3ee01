"""Run a dockvm service as a real subprocess, the way `make run` does."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class ServiceProcess:
    """One ``python -m services.<name>`` process with its own env and log file."""

    name: str
    env: dict[str, str]
    port: int
    args: list[str] = field(default_factory=list)
    log_path: Path | None = None
    proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        """Base URL of the service's HTTP port."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self, ready_timeout: float = 30.0) -> ServiceProcess:
        """Start the process and wait until ``/readyz`` answers 200."""
        env = {**os.environ, **self.env, "DOCKVM_LOG_JSON": "true"}
        assert self.log_path is not None
        log = open(self.log_path, "ab")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            f"services.{self.name}",
            "--port",
            str(self.port),
            *self.args,
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=log,
        )
        log.close()
        await self.wait_ready(ready_timeout)
        return self

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Poll ``/readyz`` until it answers 200; fail with the log tail if the process dies."""
        deadline = asyncio.get_running_loop().time() + timeout
        async with aiohttp.ClientSession() as s:
            while True:
                if self.proc is not None and self.proc.returncode is not None:
                    code = self.proc.returncode
                    raise RuntimeError(f"{self.name} exited {code}:\n{self.log_tail()}")
                try:
                    async with s.get(f"{self.url}/readyz", timeout=aiohttp.ClientTimeout(2)) as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    raise TimeoutError(f"{self.name} not ready in {timeout}s:\n{self.log_tail()}")
                await asyncio.sleep(0.2)

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait for the exit code."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), timeout)

    def kill(self) -> None:
        """``kill -9`` the process."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the service's log."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
