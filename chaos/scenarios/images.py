"""A registry (dc2's) or imagesync down during a series of pushes to dc1.

The victim is killed (-9) after a quarter of the pushes and started again after three quarters
(and at least 12 s, longer than imagesync's retries of one copy). Copies to a dc2 that is down
fail for good, and notifications to an imagesync that is down are queued by the registry or
lost: what must hold is that dc2 ends with every image of dc1, with the same digests, by
whatever path (the catalog reconcile runs every 10 s here). Rounds alternate the victim.
"""

from __future__ import annotations

import asyncio
import time

from chaos.report import Round
from chaos.scenarios.common import Params
from chaos.stack import ChaosStack
from libs.common.errors import TransientError
from services.imagesync.adapters.registry import HttpRegistry, new_session
from services.imagesync.settings import RegistryEndpoint
from tests.integration.test_imagesync_support import push_image, random_layer

VICTIMS = ("registry dc2", "imagesync")
OUTAGE_S = 12.0


async def _kill(stack: ChaosStack, victim: str) -> None:
    if victim == "imagesync":
        svc = stack.services["imagesync"]
        svc.kill()
        assert svc.proc is not None
        await svc.proc.wait()
    else:
        reg = stack.registries["dc2"]
        assert reg.proc is not None
        reg.proc.kill()
        await reg.proc.wait()


async def _revive(stack: ChaosStack, victim: str) -> None:
    if victim == "imagesync":
        await stack.services["imagesync"].start(ready_timeout=120)
    else:
        await stack.registries["dc2"].start()


async def _missing(dc2: HttpRegistry, pushed: dict[str, str]) -> list[str]:
    """The repos whose ``v1`` is not in dc2 with dc1's digest."""
    out = []
    for repo, digest in pushed.items():
        try:
            if await dc2.manifest_digest(repo, "v1") != digest:
                out.append(repo)
        except TransientError:
            out.append(repo)
    return out


async def registry_down(stack: ChaosStack, p: Params, rnd: int) -> Round:
    """Push ``p.pushes`` images to dc1 with the victim down for the middle half of them."""
    victim = VICTIMS[rnd % len(VICTIMS)]
    reg1, reg2 = stack.registries["dc1"], stack.registries["dc2"]
    pushed: dict[str, str] = {}
    async with new_session(30, user_agent="dockvm-chaos/1") as http:
        dc1 = HttpRegistry(RegistryEndpoint("dc1", reg1.url), http)
        dc2 = HttpRegistry(RegistryEndpoint("dc2", reg2.url), http)
        killed_at = 0.0
        for i in range(p.pushes):
            if i == p.pushes // 4:
                await _kill(stack, victim)
                killed_at = time.monotonic()
            if i == 3 * p.pushes // 4:
                # Down longer than imagesync's retries of one copy (about 5 s), so what the
                # outage cost is caught up by the reconcile, not by a retry.
                await asyncio.sleep(max(0.0, killed_at + OUTAGE_S - time.monotonic()))
                await _revive(stack, victim)
            repo = f"chaos/{stack.run}-{rnd}-{i}"
            manifest = await push_image(dc1, repo, "v1", [random_layer(16_384)])
            pushed[repo] = manifest.digest
        t0 = time.monotonic()
        missing = list(pushed)
        try:
            async with asyncio.timeout(p.settle_s):
                while missing:
                    missing = await _missing(dc2, pushed)
                    await asyncio.sleep(0.5)
        except TimeoutError:
            pass
    failures = [f"{repo}:v1 not in dc2 after {p.settle_s:.0f}s" for repo in missing]
    done = 100 * (len(pushed) - len(missing)) / len(pushed)
    return Round(failures, {"to 100%": time.monotonic() - t0}, note=f"{victim}: {done:.0f}%")
