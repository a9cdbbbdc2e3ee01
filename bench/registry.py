"""The registry in its production shape (two Distribution replicas on Ceph's S3 behind HAProxy,
scripts/registry.sh) vs one Distribution on the local filesystem, in the same run.

Each round pushes a fresh ~200 MB image (several incompressible layers) through the Registry
API and pulls it back, to:

- ``ceph+lb``: the stack's dc1 balancer (127.0.0.1:5001: HAProxy → replicas → RGW → OSD);
- ``ceph``: one of those replicas directly (the same path without HAProxy);
- ``fs``: a ``docker-registry`` this program starts on a temporary directory (the light mode).

The manifest is put by digest, not tag, so imagesync (if running) does not replicate the
bench's pushes to dc2 meanwhile. Where the time goes: each blob upload is split into its PATCH
(the bytes) and its PUT (the commit: on S3 Distribution copies the upload to its final key),
and a raw S3 PUT of one layer to the RADOS Gateway (curl, SigV4) gives Ceph's own write speed.
Last, one replica of dc1 is killed with SIGKILL: the time until HAProxy marks it DOWN, the
failed requests seen by a client polling the balancer meanwhile, and the time from its restart
(scripts/registry.sh up) until HAProxy marks it UP again.

    .venv/bin/python -m bench.registry [--rounds 3] [--size-mb 200] [--layers 4]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp

from bench._common import machine, median

ROOT = Path(__file__).resolve().parents[1]
STATE = Path(os.environ.get("DOCKVM_STATE_DIR", "/var/lib/dockvm"))
DC1 = f"http://127.0.0.1:{os.environ.get('DOCKVM_REGISTRY_DC1_PORT', '5001')}"
_BASE = int(os.environ.get("DOCKVM_REGISTRY_REPLICA_PORT_BASE", "5000"))
REPLICA = f"http://127.0.0.1:{_BASE + 11}"  # dc1's r1 (scripts/registry.sh's numbering)
RGW = f"http://127.0.0.1:{os.environ.get('DOCKVM_CEPH_RGW_PORT', '7480')}"
SOCK = STATE / "run" / "haproxy.sock"
SCHEMA2 = "application/vnd.docker.distribution.manifest.v2+json"
LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
CHUNK = 1 << 20


class Timings:
    """Seconds spent per phase, summed over a push or pull."""

    def __init__(self) -> None:
        self.patch = self.commit = self.manifest = self.pull = 0.0

    @property
    def push(self) -> float:
        """The whole push."""
        return self.patch + self.commit + self.manifest


async def _upload(s: aiohttp.ClientSession, base: str, repo: str, data: bytes, t: Timings) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    async with s.post(f"{base}/v2/{repo}/blobs/uploads/") as r:
        assert r.status == 202, await r.text()
        loc = r.headers["Location"]
    loc = loc if loc.startswith("http") else base + loc

    async def body():
        for i in range(0, len(data), CHUNK):
            yield data[i : i + CHUNK]

    t0 = time.perf_counter()
    async with s.patch(loc, data=body(), headers={"Content-Type": "application/octet-stream"}) as r:
        assert r.status == 202, await r.text()
        loc = r.headers["Location"]
    loc = loc if loc.startswith("http") else base + loc
    t1 = time.perf_counter()
    sep = "&" if "?" in loc else "?"
    async with s.put(f"{loc}{sep}digest={digest}", headers={"Content-Length": "0"}) as r:
        assert r.status == 201, await r.text()
    t.patch += t1 - t0
    t.commit += time.perf_counter() - t1
    return digest


async def push(s: aiohttp.ClientSession, base: str, repo: str, layers: list[bytes]) -> Timings:
    """Push the layers and a manifest (by digest); the time per phase."""
    t = Timings()
    descs = [
        {"mediaType": LAYER, "digest": await _upload(s, base, repo, d, t), "size": len(d)}
        for d in layers
    ]
    config = json.dumps({"architecture": "amd64", "os": "linux", "n": uuid.uuid4().hex}).encode()
    cdesc = {"mediaType": "application/vnd.docker.container.image.v1+json",
             "digest": await _upload(s, base, repo, config, t), "size": len(config)}
    raw = json.dumps({"schemaVersion": 2, "mediaType": SCHEMA2, "config": cdesc,
                      "layers": descs}).encode()
    mdigest = "sha256:" + hashlib.sha256(raw).hexdigest()
    t0 = time.perf_counter()
    async with s.put(f"{base}/v2/{repo}/manifests/{mdigest}", data=raw,
                     headers={"Content-Type": SCHEMA2}) as r:
        assert r.status == 201, await r.text()
    t.manifest = time.perf_counter() - t0
    t.digest = mdigest  # type: ignore[attr-defined]
    return t


async def pull(s: aiohttp.ClientSession, base: str, repo: str, digest: str) -> float:
    """GET the manifest and stream every blob, checking digests; the seconds."""
    t0 = time.perf_counter()
    async with s.get(f"{base}/v2/{repo}/manifests/{digest}",
                     headers={"Accept": SCHEMA2}) as r:
        doc = json.loads(await r.read())
    for desc in [doc["config"], *doc["layers"]]:
        h = hashlib.sha256()
        async with s.get(f"{base}/v2/{repo}/blobs/{desc['digest']}") as r:
            assert r.status == 200
            async for chunk in r.content.iter_chunked(CHUNK):
                h.update(chunk)
        assert "sha256:" + h.hexdigest() == desc["digest"]
    return time.perf_counter() - t0


def raw_s3_put(data: bytes) -> float:
    """One S3 PUT of ``data`` straight to the RADOS Gateway (the bench bucket); the seconds."""
    lines = (STATE / "ceph" / "s3.env").read_text().splitlines()
    env = dict(line.split("=", 1) for line in lines)
    subprocess.run([str(ROOT / "scripts" / "ceph.sh"), "bucket", "bench"], check=True,
                   capture_output=True)
    with tempfile.NamedTemporaryFile(dir="/var/tmp") as f:
        f.write(data)
        f.flush()
        cfg = f'user = "{env["DOCKVM_S3_ACCESS_KEY"]}:{env["DOCKVM_S3_SECRET_KEY"]}"\n'
        t0 = time.perf_counter()
        out = subprocess.run(
            ["curl", "-s", "-K", "-", "--aws-sigv4", "aws:amz:us-east-1:s3", "-H",
             "x-amz-content-sha256: UNSIGNED-PAYLOAD", "-o", "/dev/null", "-w", "%{http_code}",
             "-T", f.name, f"{RGW}/dockvm-registry-bench/raw-{uuid.uuid4().hex}"],
            input=cfg, capture_output=True, text=True, check=True,
        )
        took = time.perf_counter() - t0
    assert out.stdout == "200", out.stdout
    return took


def fs_registry(root: Path, port: int) -> subprocess.Popen:
    """One ``docker-registry`` on a local directory (the light mode's shape)."""
    cfg = root / "config.yml"
    cfg.write_text(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
                   f"    rootdirectory: {root}/data\n  delete:\n    enabled: true\n"
                   f"http:\n  addr: 127.0.0.1:{port}\n")
    return subprocess.Popen(["docker-registry", "serve", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def haproxy_status(server: str, backend: str = "dc1") -> str:
    """HAProxy's status of one server (UP, DOWN, ...) from its stats socket."""
    with socket.socket(socket.AF_UNIX) as sk:
        sk.settimeout(2)
        sk.connect(str(SOCK))
        sk.sendall(b"show stat\n")
        data = b""
        while chunk := sk.recv(65536):
            data += chunk
    for line in data.decode().splitlines():
        f = line.split(",")
        if len(f) > 17 and f[0] == backend and f[1] == server:
            return f[17]
    raise LookupError(server)


async def recovery() -> dict[str, float]:
    """Kill dc1's r1, time HAProxy's DOWN, count failures through the balancer, restart it."""
    pid = int((STATE / "run" / "registry-dc1-r1.pid").read_text().split()[0])
    failures = requests = 0
    async with aiohttp.ClientSession() as s:
        t0 = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        while haproxy_status("r1") != "DOWN":
            requests += 1
            try:
                async with s.get(f"{DC1}/v2/") as r:
                    failures += r.status != 200
            except aiohttp.ClientError:
                failures += 1
            await asyncio.sleep(0.01)
        down = time.perf_counter() - t0
    t1 = time.perf_counter()
    await asyncio.to_thread(subprocess.run, [str(ROOT / "scripts" / "registry.sh"), "up"],
                            check=True, capture_output=True)
    while haproxy_status("r1") != "UP":
        await asyncio.sleep(0.02)
    return {"down_s": down, "requests": requests, "failures": failures,
            "up_s": time.perf_counter() - t1}


async def rounds(n: int, size_mb: int, nlayers: int, fs_url: str) -> dict[str, list]:
    """``n`` rounds of push+pull on each target; the timings per target."""
    out: dict[str, list] = {"ceph+lb": [], "ceph": [], "fs": []}
    targets = {"ceph+lb": DC1, "ceph": REPLICA, "fs": fs_url}
    timeout = aiohttp.ClientTimeout(total=1200)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        for i in range(n):
            for name, base in targets.items():
                # Fresh bytes per target: the replicas share one blob store, and a blob already
                # there would make the second target's commit a no-op.
                layers = [secrets.token_bytes(size_mb * (1 << 20) // nlayers)
                          for _ in range(nlayers)]
                repo = f"bench-registry/{uuid.uuid4().hex[:8]}"
                t = await push(s, base, repo, layers)
                t.pull = await pull(s, base, repo, t.digest)  # type: ignore[attr-defined]
                out[name].append(t)
                print(f"round {i + 1} {name:8} push {t.push:6.2f}s (bytes {t.patch:5.2f}s, "
                      f"commits {t.commit:5.2f}s) pull {t.pull:6.2f}s", flush=True)
    return out


async def main() -> None:
    """Run the rounds and the recovery, print medians and ratios."""
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--size-mb", type=int, default=200)
    p.add_argument("--layers", type=int, default=4)
    args = p.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            port = sk.getsockname()[1]
        proc = fs_registry(Path(tmp), port)
        try:
            await asyncio.sleep(1)
            res = await rounds(args.rounds, args.size_mb, args.layers, f"http://127.0.0.1:{port}")
        finally:
            proc.terminate()
            proc.wait()
    layer = secrets.token_bytes(args.size_mb * (1 << 20) // args.layers)
    raw = median([raw_s3_put(layer) for _ in range(args.rounds)])
    report(res, raw, args.size_mb / args.layers)
    rec = await recovery()
    print(f"kill -9 of dc1 r1: HAProxy DOWN after {rec['down_s']:.2f}s; "
          f"{rec['failures']:.0f}/{rec['requests']:.0f} GET /v2/ through the balancer failed "
          f"meanwhile; restart to UP {rec['up_s']:.2f}s")


def report(res: dict[str, list], raw_s3: float, layer_mb: float) -> None:
    """Medians per target and the ratios to the filesystem registry."""
    med = {k: {f: median([getattr(t, f) for t in v])
               for f in ("push", "patch", "commit", "manifest", "pull")} for k, v in res.items()}
    for k, m in med.items():
        print(f"median {k:8} push {m['push']:6.2f}s = bytes {m['patch']:.2f}s + commits "
              f"{m['commit']:.2f}s + manifest {m['manifest']:.3f}s; pull {m['pull']:.2f}s")
    fs = med["fs"]
    for k in ("ceph+lb", "ceph"):
        print(f"ratio {k}/fs: push {med[k]['push'] / fs['push']:.2f}x, "
              f"pull {med[k]['pull'] / fs['pull']:.2f}x")
    print(f"raw S3 PUT of one {layer_mb:.0f} MB layer to RGW: {raw_s3:.2f}s "
          f"({layer_mb / raw_s3:.0f} MB/s)")


if __name__ == "__main__":
    asyncio.run(main())
