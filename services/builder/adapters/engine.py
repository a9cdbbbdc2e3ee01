"""The Docker Engine adapter of the builder: the low-level API (``docker.APIClient``), each
blocking call in a thread.

The build streams its log line by line to a callback; asking it to stop (``cancelled``) closes
the API's response, which makes dockerd cancel the build. Engine failures (a RUN that exits
non-zero, a push the registry refuses) are :class:`BuildError`; an engine that does not answer
is a :class:`TransientError`.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import docker
import requests
from docker.errors import APIError, DockerException, ImageNotFound, NotFound

from libs.common.errors import TransientError

from ..domain import DPKG_FORMAT
from ..ports import BuildError, Verification

__all__ = ["DockerEngine"]

_DPKG = ["dpkg-query", "-W", "-f", DPKG_FORMAT.replace("\\t", "\t").replace("\\n", "\n")]
# In one exec: the container's CPU time in ns (cgroup v1; v2's us scaled), how many of its
# processes are runnable, its sockets.
_PROBE = [
    "sh", "-c",
    "(cat /sys/fs/cgroup/cpuacct/cpuacct.usage || "
    "awk '/^usage_usec/ {print $2 * 1000}' /sys/fs/cgroup/cpu.stat) 2>/dev/null; echo; "
    # Processes running or waiting to run, but this shell (builtins only: it forks nothing).
    "n=0; for f in /proc/[0-9]*/status; do case $f in /proc/$$/*) continue;; esac; "
    "while read -r k v rest; do if [ \"$k\" = State: ]; then case $v in R|D) n=$((n+1));; "
    "esac; break; fi; done < $f 2>/dev/null; done; echo $n; "
    "echo ---; ss -ltnupH",
]  # fmt: skip
# What of an image's config changes what it does when started (labels do not).
_RUNTIME = ("Env", "Entrypoint", "Cmd", "WorkingDir", "User", "ExposedPorts", "StopSignal")
# Busy: a process of the image is runnable (on a loaded host a starved process uses little CPU
# but waits to run) or the container used more than this share of a core between two probes (a
# probe itself costs about 10%). Settled: not busy and no new socket for settle_s.
_BUSY_SHARE = 0.25


def _messages(
    stream: Iterator[dict[str, Any]], on_line: Callable[[str], None], cancelled: Callable[[], bool]
) -> dict[str, Any]:
    """Feed a build or push stream to ``on_line``; the last ``aux``; raise on its error."""
    aux: dict[str, Any] = {}
    for msg in stream:
        if cancelled():
            raise BuildError("cancelled")
        if "error" in msg or "errorDetail" in msg:
            detail = msg.get("errorDetail") or {}
            text = detail.get("message") or msg.get("error") or "error"
            on_line(f"ERROR: {text}\n")
            raise BuildError(text)
        if "stream" in msg:
            on_line(msg["stream"])
        elif "status" in msg and "progressDetail" not in msg:
            on_line(f"{msg.get('id', '')} {msg['status']}".strip() + "\n")
        if "aux" in msg and isinstance(msg["aux"], dict):
            aux.update(msg["aux"])
    return aux


class DockerEngine:
    """:class:`~services.builder.ports.Engine` over the Docker Engine API."""

    def __init__(self, base_url: str, network: str, *, nocache: bool = False) -> None:
        self._api = docker.APIClient(base_url=base_url, timeout=600, version="auto")
        self._network = network
        self.nocache = nocache  # the benchmark's cold rounds

    def _ensure_network(self) -> None:
        """The builder's own bridge: RUN steps reach Debian's mirrors through it, never the
        host's loopback services, and it does not depend on the engine's default bridge."""
        if not self._api.networks(names=[self._network]):
            try:
                self._api.create_network(
                    self._network, driver="bridge", labels={"dockvm.builder": "network"}
                )
            except APIError as err:
                if err.status_code != 409:  # another builder made it meanwhile
                    raise

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except (requests.ConnectionError, requests.Timeout) as err:
            raise TransientError(f"docker engine: {err}") from err

    async def ping(self) -> None:
        """Readiness: the engine answers."""
        await self._call(self._api.ping)

    async def ensure_image(self, image: str, registry: str) -> None:
        """Have ``image`` locally, pulling ``registry/image`` if it is missing."""
        try:
            await self._call(self._api.inspect_image, image)
            return
        except ImageNotFound:
            pass
        remote, _, tag = f"{registry}/{image}".rpartition(":")
        try:
            await self._call(self._api.pull, remote, tag=tag)
            await self._call(self._api.tag, f"{remote}:{tag}", *image.rsplit(":", 1))
        except DockerException as err:
            raise BuildError(
                f"base image {image} is neither here nor in {registry}: {err}"
            ) from err

    def _build(
        self,
        context: bytes,
        labels: dict[str, str],
        on_line: Callable[[str], None],
        cancelled: Callable[[], bool],
    ) -> str:
        self._ensure_network()
        stream = self._api.build(
            fileobj=io.BytesIO(context),
            custom_context=True,
            labels=labels,
            rm=True,
            forcerm=True,
            pull=False,
            decode=True,
            nocache=self.nocache,
            network_mode=self._network,
        )
        try:
            aux = _messages(stream, on_line, cancelled)
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        image_id = aux.get("ID")
        if not image_id:
            raise BuildError("the engine reported no image id")
        return str(image_id)

    async def build(
        self,
        context: bytes,
        labels: dict[str, str],
        on_line: Callable[[str], None],
        cancelled: Callable[[], bool],
    ) -> str:
        """Build the context; the image id. Log lines go to ``on_line``; raise BuildError."""
        try:
            return await self._call(self._build, context, labels, on_line, cancelled)
        except APIError as err:
            raise BuildError(str(err.explanation or err)) from err

    async def shape(self, image_id: str) -> tuple[int, int, str]:
        """The image's layer count, size in bytes, and fingerprint (a hash of its layers and
        runtime config: what decides what the started image shows)."""
        info = await self._call(self._api.inspect_image, image_id)
        layers = info["RootFS"].get("Layers") or []
        config = info.get("Config") or {}
        runtime = {k: config.get(k) for k in _RUNTIME}
        raw = json.dumps([layers, runtime], sort_keys=True).encode()
        return len(layers), int(info["Size"]), hashlib.sha256(raw).hexdigest()

    def _run_once(self, image: str, cmd: list[str]) -> str:
        cid = self._api.create_container(
            image,
            entrypoint=cmd[:1],
            command=cmd[1:],
            network_disabled=True,
            host_config=self._api.create_host_config(network_mode="none"),
            labels={"dockvm.builder": "query"},
        )["Id"]
        try:
            self._api.start(cid)
            code = self._api.wait(cid, timeout=120)["StatusCode"]
            out = self._api.logs(cid, stdout=True, stderr=False).decode(errors="replace")
            if code != 0:
                raise BuildError(f"{' '.join(cmd[:1])} exited {code} in {image}")
            return out
        finally:
            self._api.remove_container(cid, force=True)

    async def packages(self, image: str) -> str:
        """``dpkg-query`` output of ``image`` (run once, no network)."""
        return await self._call(self._run_once, image, _DPKG)

    def _exec(self, cid: str, cmd: list[str]) -> str:
        exec_id = self._api.exec_create(cid, cmd, stdout=True, stderr=False)["Id"]
        out = self._api.exec_start(exec_id).decode(errors="replace")
        if self._api.exec_inspect(exec_id).get("ExitCode") != 0:
            raise BuildError(f"{cmd[0]} failed in the started image: {out.strip()[:200]}")
        return out

    def _verify(self, image_id: str, name: str, settle_s: float) -> Verification:
        try:
            self._api.remove_container(name, force=True)  # left by a builder killed midway
        except NotFound:
            pass
        cid = self._api.create_container(
            image_id,
            name=name,
            network_disabled=True,
            labels={"dockvm.builder": "verify"},
            host_config=self._api.create_host_config(network_mode="none"),
        )["Id"]
        try:
            self._api.start(cid)
            sockets: list[str] = []
            seen: set[str] = set()
            started = changed = last = time.monotonic()
            cpu_ns: float | None = None
            # Watched until the image's processes settle: its init starts them, and they open
            # their ports late (sshd after making its host keys, a JVM after loading its app).
            while True:
                state = self._api.inspect_container(cid)["State"]
                if not state.get("Running"):
                    raise BuildError(f"the image exited at start (code {state.get('ExitCode')})")
                head, _, out = self._exec(cid, _PROBE).partition("---\n")
                sockets.append(out)
                now = time.monotonic()
                cpu_text, _, runnable = head.partition("\n")
                cpu = float(cpu_text.strip() or "nan")
                busy = runnable.strip() not in ("", "0") or (
                    cpu_ns is not None and (cpu - cpu_ns) > _BUSY_SHARE * (now - last) * 1e9
                )
                cpu_ns, last = cpu, now
                if busy or not set(out.splitlines()) <= seen:
                    seen |= set(out.splitlines())
                    changed = now
                if now - changed >= settle_s or now - started >= max(10.0, 10 * settle_s):
                    break
                time.sleep(0.25)
            return Verification(dpkg=self._exec(cid, _DPKG), sockets="".join(sockets))
        finally:
            self._api.remove_container(cid, force=True)

    async def verify(self, image_id: str, name: str, settle_s: float) -> Verification:
        """Start the image once with no network under ``name``; its packages and sockets."""
        try:
            return await self._call(self._verify, image_id, name, settle_s)
        except APIError as err:
            raise BuildError(f"verification: {err.explanation or err}") from err

    def _push(self, image_id: str, repo: str, tag: str, on_line: Callable[[str], None]) -> str:
        self._api.tag(image_id, repo, tag)
        try:
            aux = _messages(
                self._api.push(repo, tag=tag, stream=True, decode=True), on_line, lambda: False
            )
        except BaseException:
            # Only the local name goes: the image may be an earlier build's too.
            self._api.remove_image(f"{repo}:{tag}", noprune=True)
            raise
        digest = aux.get("Digest")
        if not digest:
            raise BuildError("the registry reported no digest")
        return str(digest)

    async def push(self, image_id: str, repo: str, tag: str, on_line: Callable[[str], None]) -> str:
        """Tag and push ``repo:tag`` (``repo`` includes the registry); the pushed digest."""
        try:
            return await self._call(self._push, image_id, repo, tag, on_line)
        except APIError as err:
            raise BuildError(f"push: {err.explanation or err}") from err

    async def discard(self, image_id: str) -> None:
        """Remove a build's image (best effort: a layer shared with others stays)."""
        try:
            # An identical earlier build (all cached) has the same id and a tag: keep it.
            if not (await self._call(self._api.inspect_image, image_id)).get("RepoTags"):
                await self._call(self._api.remove_image, image_id, noprune=False)
        except (DockerException, TransientError):
            pass
