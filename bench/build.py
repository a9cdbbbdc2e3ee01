"""Image builds: the platform's build (render, build, verify) vs ``docker build`` of the same
generated Dockerfile on the same engine, in the same run, cold (no cache) and warm (cached).

The builder's use cases run in this process with the real engine adapter and store (a database
of its own, dropped at the end); the push to dc1 is timed apart and left out of the ratio,
since ``docker build`` pushes nothing. The peer is ``docker build`` of the very context the
builder rendered (``--no-cache`` for the cold rounds), on the builder's network. Rounds
alternate platform / peer so that load on the shared host falls on both.

    .venv/bin/python -m bench.build [--rounds 3] [--packages jq]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import time
import uuid

import aiohttp

from bench._common import machine, median
from libs.common.bus.fakes import MemoryPublisher
from libs.common.clock import utcnow
from libs.common.contracts.builder import DEFAULT_POLICY, BuildSpec, spec_digest
from libs.common.db import mongo_client
from services.builder import domain
from services.builder.adapters import DockerEngine
from services.builder.fakes import MemoryRegistries
from services.builder.service import Builds, Runner
from services.builder.store import MongoBuildStore

REGISTRY = "127.0.0.1:5001"
NETWORK = "dockvm-builder"


class _TimedEngine(DockerEngine):
    """The real engine adapter, with the time of its build, verification and push recorded."""

    times: dict[str, float]

    async def _timed(self, name: str, call):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        try:
            return await call
        finally:
            self.times[name] = time.perf_counter() - t0

    async def build(self, context, labels, on_line, cancelled):  # type: ignore[no-untyped-def]
        """Build, timed."""
        return await self._timed("build", super().build(context, labels, on_line, cancelled))

    async def verify(self, image_id, name, settle_s):  # type: ignore[no-untyped-def]
        """Start the image, timed."""
        return await self._timed("verify", super().verify(image_id, name, settle_s))

    async def push(self, image_id, repo, tag, on_line):  # type: ignore[no-untyped-def]
        """Push, timed."""
        return await self._timed("push", super().push(image_id, repo, tag, on_line))


async def _platform(builds: Builds, engine: _TimedEngine, spec: BuildSpec) -> tuple[float, str]:
    build_id = f"b-{uuid.uuid4().hex[:12]}"
    await builds.store.insert({
        "_id": build_id, "name": spec.name, "tag": spec.tag, "state": "queued",
        "spec": spec.model_dump_json(), "spec_digest": spec_digest(spec),
        "policy": DEFAULT_POLICY.model_dump_json(), "policy_version": 0, "requested_by": "bench",
        "created_at": utcnow(), "attempt": 0, "log_seq": 0,
    })  # fmt: skip
    engine.times = {"build": 0.0, "verify": 0.0, "push": 0.0}
    t0 = time.perf_counter()
    await builds.run(build_id)
    total = time.perf_counter() - t0
    doc = await builds.store.get(build_id)
    if doc is None or doc["state"] != "succeeded":
        raise SystemExit(f"platform build failed: {doc and doc.get('detail')}")
    return total - engine.times["push"], doc["image_id"]


def _peer(context: bytes, nocache: bool, labels: dict[str, str]) -> float:
    args = ["docker", "build", "-q", "--network", NETWORK, *(["--no-cache"] if nocache else [])]
    args += [a for k, v in labels.items() for a in ("--label", f"{k}={v}")] + ["-"]
    t0 = time.perf_counter()
    out = subprocess.run(args, input=context, capture_output=True, check=False)
    elapsed = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"docker build failed: {out.stderr.decode()[-500:]}")
    image = out.stdout.decode().strip()
    subprocess.run(["docker", "image", "rm", image], capture_output=True, check=False)
    return elapsed


async def _forget(repo: str) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://{REGISTRY}/v2/{repo}/tags/list") as r:
            tags = (await r.json()).get("tags") or [] if r.status == 200 else []
        for tag in tags:
            head = await s.head(f"http://{REGISTRY}/v2/{repo}/manifests/{tag}", headers={
                "Accept": "application/vnd.docker.distribution.manifest.v2+json"})  # fmt: skip
            digest = head.headers.get("Docker-Content-Digest")
            if digest:
                await s.delete(f"http://{REGISTRY}/v2/{repo}/manifests/{digest}")
    await asyncio.to_thread(
        subprocess.run, f"docker images -q '{REGISTRY}/{repo}' | sort -u | xargs -r docker rmi -f",
        shell=True, capture_output=True, check=False,
    )  # fmt: skip


async def main(rounds: int, packages: list[str]) -> None:
    """Run the rounds and print the medians and ratios."""
    repo = f"bench-build-{uuid.uuid4().hex[:8]}/app"
    client = mongo_client("mongodb://127.0.0.1:27017/", app_name="dockvm-bench")
    db = client[f"bench_build_{uuid.uuid4().hex[:8]}"]
    results: dict[str, dict[str, list[float]]] = {"cold": {}, "warm": {}}
    try:
        for mode in ("cold", "warm"):
            engine = _TimedEngine("unix:///var/run/docker.sock", NETWORK, nocache=mode == "cold")
            runner = Runner(engine, "dc1", REGISTRY, (), timeout_s=900, attempts=1, settle_s=3)
            builds = Builds(MongoBuildStore(db), runner, MemoryRegistries(), MemoryPublisher())
            for i in range(rounds):
                spec = BuildSpec(name=repo, tag=f"{mode}{i}", base="debian-bookworm",
                                 packages=packages, ports=[8080])  # fmt: skip
                base = DEFAULT_POLICY.bases[0]
                context = domain.render_context(spec, base, "b-bench")
                # The same labels as the platform's (a label step is a commit of its own).
                labels = domain.image_labels("b-peer", spec, "sha256:x", 0, "bench", utcnow(), base)
                if mode == "warm" and i == 0:  # fill the cache (not measured)
                    _peer(context, False, labels)
                # Who goes first alternates: the first of a pair also fetches Debian's lists.
                if i % 2:
                    theirs = await asyncio.to_thread(_peer, context, mode == "cold", labels)
                    ours, _ = await _platform(builds, engine, spec)
                else:
                    ours, _ = await _platform(builds, engine, spec)
                    theirs = await asyncio.to_thread(_peer, context, mode == "cold", labels)
                t = engine.times
                for key, value in (("platform", ours), ("docker", theirs), *t.items()):
                    results[mode].setdefault(key, []).append(value)
                print(f"{mode} round {i + 1}: platform {ours:.2f} s (its build {t['build']:.2f}, "
                      f"verification {t['verify']:.2f}; push {t['push']:.2f} apart), "
                      f"docker build {theirs:.2f} s", flush=True)  # fmt: skip
    finally:
        await client.drop_database(db.name)
        await client.close()
        await _forget(repo)
    print(f"\n{machine()}; packages {' '.join(packages)}; {rounds} rounds")
    targets = {"cold": 1.2, "warm": 1.5}
    for mode, r in results.items():
        p, d = median(r["platform"]), median(r["docker"])
        b, v, push = median(r["build"]), median(r["verify"]), median(r["push"])
        print(f"{mode}: platform {p:.2f} s (its build {b:.2f}, verification {v:.2f}; push "
              f"{push:.2f} apart), docker build {d:.2f} s: {p / d:.2f}x "
              f"(target <= {targets[mode]}x)")  # fmt: skip


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--packages", nargs="+", default=["jq"])
    args = ap.parse_args()
    asyncio.run(main(args.rounds, args.packages))
