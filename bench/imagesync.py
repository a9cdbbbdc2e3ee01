"""Cross-dc image replication on the local stack: imagesync vs ``skopeo copy``, same run.

For each round a fresh ~200 MB image of several random (incompressible) layers is pushed to
dc1 through the Registry API. dockvm: the time from the push's last request (the tagged
manifest PUT) until dc2 serves the tag, the copy being driven by dc1's notification to
imagesync. Peer: ``skopeo copy docker://dc1/... docker://dc2/...`` of the same image into a
repository of dc2 that holds none of its blobs. Then a second image sharing all but one layer
with the first is pushed, and the bytes imagesync moved are compared with its new bytes.

It uses the imagesync answering on :8081 (``make run``), or starts one there.

    .venv/bin/python -m bench.imagesync [--rounds 3] [--size-mb 200] [--layers 5]
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp

from bench._common import machine, median
from libs.common.bus import RpcClient, connect
from libs.common.contracts.imagesync import SyncJobsList, SyncJobsListed, SyncJobView
from libs.common.errors import TransientError
from libs.common.settings import load_settings
from services.imagesync.adapters.registry import HttpRegistry, new_session
from services.imagesync.domain import Manifest
from services.imagesync.settings import ImagesyncSettings, RegistryEndpoint

ROOT = Path(__file__).resolve().parents[1]
SCHEMA2 = "application/vnd.docker.distribution.manifest.v2+json"
LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"


async def _imagesync_up(url: str) -> bool:
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{url}/readyz", timeout=aiohttp.ClientTimeout(total=2)) as r:
                body = await r.json(content_type=None)
                return r.status == 200 and body.get("service") == "imagesync"
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return False


def _spawn(port: int, log_path: Path) -> subprocess.Popen:
    log = open(log_path, "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "services.imagesync", "--port", str(port)],
        cwd=ROOT, stdout=log, stderr=log, env={**os.environ, "DOCKVM_LOG_JSON": "true"},
    )


async def _ensure_imagesync(port: int, log_path: Path) -> subprocess.Popen | None:
    url = f"http://127.0.0.1:{port}"
    if await _imagesync_up(url):
        print(f"using the imagesync already on :{port}")
        return None
    print(f"starting imagesync on :{port} (log {log_path})")
    proc = _spawn(port, log_path)
    async with asyncio.timeout(30):
        while not await _imagesync_up(url):
            if proc.poll() is not None:
                raise SystemExit(f"imagesync exited {proc.returncode}, see {log_path}")
            await asyncio.sleep(0.2)
    return proc


async def _jobs(rpc: RpcClient, **query: object) -> list[SyncJobView]:
    reply = await rpc.request(SyncJobsList(**query), timeout=15)  # type: ignore[arg-type]
    assert isinstance(reply, SyncJobsListed)
    return reply.jobs


async def _settle(rpc: RpcClient, timeout: float = 120) -> None:
    """Wait (bounded) until imagesync has no job pending or running (its start-up reconcile)."""
    quiet = 0
    try:
        async with asyncio.timeout(timeout):
            while quiet < 3:
                busy = [j for s in ("pending", "running") for j in await _jobs(rpc, state=s)]
                quiet = 0 if busy else quiet + 1
                await asyncio.sleep(0.5)
    except TimeoutError:
        print(f"note: imagesync still had jobs in flight after {timeout}s; measuring anyway")


async def _push_image(reg: HttpRegistry, repo: str, tag: str, layers: list[bytes],
                      shared: list[tuple[str, int, str]] = ()) -> tuple[Manifest, int]:
    """Push layers (plus ``shared`` ones mounted from their repo); return manifest, new bytes."""
    descs = []
    for digest, size, from_repo in shared:
        assert await reg.mount_blob(repo, digest, from_repo)
        descs.append({"mediaType": LAYER, "digest": digest, "size": size})
    for data in layers:
        descs.append({"mediaType": LAYER, "digest": await reg.push_blob(repo, data),
                      "size": len(data)})
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in descs]},
    }).encode()
    doc = {
        "schemaVersion": 2, "mediaType": SCHEMA2,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                   "digest": await reg.push_blob(repo, config), "size": len(config)},
        "layers": descs,
    }
    manifest = Manifest(SCHEMA2, json.dumps(doc).encode())
    await reg.put_manifest(repo, tag, manifest)
    return manifest, sum(len(x) for x in layers) + len(config)


async def _wait_tag(reg: HttpRegistry, repo: str, tag: str, digest: str,
                    timeout: float = 600) -> None:
    async with asyncio.timeout(timeout):
        while True:
            try:
                if await reg.manifest_digest(repo, tag) == digest:
                    return
            except TransientError:
                # Distribution's filesystem driver can answer 500 while it writes the tag link.
                pass
            await asyncio.sleep(0.01)


async def _webhook_latency(url: str) -> str:
    """The webhook's answer times, from imagesync's own histogram (all notifications)."""
    async with aiohttp.ClientSession() as s, s.get(f"{url}/metrics") as r:
        text = await r.text()
    buckets: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("dockvm_imagesync_webhook_seconds_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[le] = float(line.rsplit(" ", 1)[1])
    total = buckets.get("+Inf", 0.0)
    if not total:
        return "webhook: no notification answered"
    return (f"webhook answers: {int(total)} notifications, "
            f"{buckets.get('0.025', 0) / total:.0%} <= 25 ms, "
            f"{buckets.get('0.1', 0) / total:.0%} <= 100 ms  (target: all < 100 ms)")


async def _finished_job(rpc: RpcClient, repo: str, timeout: float = 60) -> SyncJobView:
    """The job of ``repo`` once it is recorded as finished (the tag lands just before)."""
    async with asyncio.timeout(timeout):
        while True:
            done = [j for j in await _jobs(rpc, repo=repo) if j.state == "done"]
            if done:
                return done[0]
            await asyncio.sleep(0.1)


def _layers(total_mb: int, count: int) -> list[bytes]:
    # Really gzip-compressed, as the media type says: skopeo would otherwise recompress them.
    size = total_mb * (1 << 20) // count
    return [gzip.compress(secrets.token_bytes(size), compresslevel=1) for _ in range(count)]


async def main() -> None:
    """Run the rounds and print medians and ratios."""
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--size-mb", type=int, default=200)
    p.add_argument("--layers", type=int, default=5)
    p.add_argument("--port", type=int, default=8081)
    args = p.parse_args()

    settings = load_settings(ImagesyncSettings)
    topo = {r.dc: r for r in settings.topology()}
    src_ep, dst_ep = topo["dc1"], topo["dc2"]
    run = uuid.uuid4().hex[:6]
    proc = await _ensure_imagesync(args.port, Path(f"/tmp/bench-imagesync-{run}.log"))
    conn = await connect(settings.amqp_url, name="dockvm-bench-imagesync")
    rpc = RpcClient(conn, source="bench")
    # Not imagesync's user agent: the bench's pushes must look like anyone's.
    session = new_session(120, user_agent="dockvm-bench/1")
    dc1 = HttpRegistry(RegistryEndpoint("dc1", src_ep.url), session)
    dc2 = HttpRegistry(RegistryEndpoint("dc2", dst_ep.url), session)
    try:
        await _settle(rpc)
        dockvm_s, skopeo_s = [], []
        print(machine())
        print(f"image: {args.size_mb} MB in {args.layers} random layers; {args.rounds} rounds")
        last: tuple[Manifest, str] | None = None
        for i in range(args.rounds):
            repo, peer_repo, tag = f"bench/imagesync-{run}", f"bench/skopeo-{run}-{i}", f"r{i}"
            layers = _layers(args.size_mb, args.layers)
            manifest, _ = await _push_image(dc1, repo, tag, layers)
            pushed = time.perf_counter()
            await _wait_tag(dc2, repo, tag, manifest.digest)
            dockvm_s.append(time.perf_counter() - pushed)
            last = (manifest, repo)

            started = time.perf_counter()
            skopeo = await asyncio.create_subprocess_exec(
                "skopeo", "copy", "--quiet", "--src-tls-verify=false",
                "--dest-tls-verify=false", f"docker://{dc1.host}/{repo}:{tag}",
                f"docker://{dc2.host}/{peer_repo}:{tag}",
            )
            if await skopeo.wait() != 0:
                raise SystemExit(f"skopeo copy failed ({skopeo.returncode})")
            skopeo_s.append(time.perf_counter() - started)
            peer_digest = await dc2.manifest_digest(peer_repo, tag)
            if peer_digest != manifest.digest:
                print(f"  note: skopeo rewrote the manifest ({peer_digest})")
            # skopeo's push notifies imagesync, which copies it back to dc1 (by mounts):
            # let that finish so it does not overlap the next round.
            await _wait_tag(dc1, peer_repo, tag, peer_digest or "")
            await _settle(rpc)
            print(f"  round {i}: imagesync {dockvm_s[-1]:.2f}s  skopeo {skopeo_s[-1]:.2f}s")

        assert last is not None
        base, base_repo = last
        shared = [(d["digest"], d["size"], base_repo)
                  for d in json.loads(base.raw)["layers"][:-1]]
        second_repo = f"bench/imagesync-{run}-second"
        new_layer = _layers(args.size_mb // args.layers, 1)
        second, new_bytes = await _push_image(dc1, second_repo, "v1", new_layer, shared)
        await _wait_tag(dc2, second_repo, "v1", second.digest)
        job = await _finished_job(rpc, second_repo)
        shared_bytes = sum(s for _, s, _ in shared)

        d, s = median(dockvm_s), median(skopeo_s)
        print()
        print(f"push -> tag in dc2, imagesync : median {d:.2f}s  ({args.size_mb} MB)")
        print(f"skopeo copy dc1 -> dc2        : median {s:.2f}s")
        print(f"ratio imagesync/skopeo        : {d / s:.2f}  (target <= 1.2)")
        print(f"second image: {new_bytes} new bytes, {shared_bytes} shared; imagesync moved "
              f"{job.bytes_copied} bytes ({job.blobs_mounted} mounted, "
              f"{job.blobs_skipped} skipped)")
        print(f"ratio moved/new               : {job.bytes_copied / new_bytes:.3f}"
              f"  (target <= 1.05)")
        print(await _webhook_latency(f"http://127.0.0.1:{args.port}"))
    finally:
        await session.close()
        await rpc.close()
        await conn.close()
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    asyncio.run(main())
