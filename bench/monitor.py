"""CPU cost of one sampling round: the monitor's cgroup/netns reads vs the Docker stats API.

Starts N small labelled containers (``sleep infinity``, 32 MiB) for each N, then measures in
the same run, for the same containers:

- **dockvm**: one ``Sampler.round`` (cgroup files + ``/proc/<pid>/net/dev``), after a warm-up
  round; CPU = this process's user+system time, plus dockerd/containerd/shims (≈0: no API).
- **stats API**: ``GET /containers/<id>/stats?stream=false&one-shot=true`` for every container
  through the docker SDK; CPU = this process's time plus dockerd, containerd and the shims
  (the daemons do the work of the stats API).

Prints the median CPU seconds per round, the ratio, and the monitor's share of one core at a
10 s interval. Containers are removed at the end (also on error or Ctrl-C).

    .venv/bin/python -m bench.monitor [--sizes 50 200] [--rounds 5] [--max-seconds 600]
"""

from __future__ import annotations

import argparse
import os
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker

from bench._common import machine, median
from services.monitor.adapters import (
    NetnsReader,
    host_cpus,
    host_memory,
    make_reader,
    raise_fd_limit,
)
from services.monitor.domain import ContainerMeta
from services.monitor.sampler import Sampler, Target

IMAGE = "dockvm/base:bookworm"
LABEL = "dockvm.bench"
_TICK = os.sysconf("SC_CLK_TCK")
_DAEMONS = ("dockerd", "containerd", "containerd-shim", "containerd-shim-runc-v2")


def _daemon_cpu_s() -> float:
    """User+system CPU seconds of dockerd, containerd and every shim, summed."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm = text[text.index("(") + 1 : text.rindex(")")]
        if comm in _DAEMONS:
            fields = text[text.rindex(")") + 2 :].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICK


def _measure(fn, repeat: int = 1) -> tuple[float, float, float]:
    """(own CPU s, daemons' CPU s, wall s) of one call, averaged over ``repeat`` calls.

    Own CPU is ``process_time`` (every thread, ns resolution); the daemons' comes from
    ``/proc/<pid>/stat`` in clock ticks, hence ``repeat`` for the cheap side."""
    d0, o0, w0 = _daemon_cpu_s(), time.process_time(), time.perf_counter()
    for _ in range(repeat):
        fn()
    w1, o1, d1 = time.perf_counter(), time.process_time(), _daemon_cpu_s()
    return (o1 - o0) / repeat, (d1 - d0) / repeat, (w1 - w0) / repeat


def _start(client: docker.DockerClient, run: str, n: int, offset: int) -> list[str]:
    def one(i: int) -> str:
        c = client.containers.run(
            # tini alone: dockvm-init would make ssh host keys in all N containers at once
            IMAGE, ["sleep", "infinity"], entrypoint=["/usr/bin/tini", "--"], detach=True,
            name=f"bench-{run[:8]}-{offset + i}",
            labels={LABEL: run, "dockvm.machine_id": f"bench-{offset + i}",
                    "dockvm.ip": f"10.250.{(offset + i) // 250}.{(offset + i) % 250 + 1}",
                    "dockvm.app": "bench"},
            mem_limit="32m", nano_cpus=250_000_000, network_mode="none",
        )
        return c.id

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(n)))


def _cleanup(client: docker.DockerClient, run: str) -> None:
    containers = client.containers.list(all=True, filters={"label": f"{LABEL}={run}"})
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda c: c.remove(force=True), containers))
    print(f"removed {len(containers)} containers")


def _bench_size(api: docker.APIClient, ids: list[str], rounds: int) -> None:
    """Measure both sides over ``ids`` and print one block of figures."""
    targets = {}
    for cid in ids:
        info = api.inspect_container(cid)
        meta = ContainerMeta.from_labels(cid, info["Config"]["Labels"])
        assert meta is not None
        targets[cid] = Target(meta, info["State"]["Pid"])
    sampler = Sampler(make_reader(), NetnsReader(), host_cpus=host_cpus(),
                      host_memory=host_memory())
    sampler.round(targets)  # warm-up: paths resolved, previous readings kept
    ours = [_measure(lambda: sampler.round(targets), repeat=20) for _ in range(rounds)]
    assert len(sampler.round(targets)) == len(ids), "every container must be sampled"

    def stats_round() -> None:
        # dockerd answers a one-shot only at its collector's next 1 s tick after the first
        # call, so a collector asks concurrently, as a real stats-based agent would.
        with ThreadPoolExecutor(64) as pool:
            list(pool.map(lambda cid: api.stats(cid, stream=False, one_shot=True), ids))

    stats_round()  # warm-up
    theirs = [_measure(stats_round) for _ in range(rounds)]
    ours_cpu = median([o + d for o, d, _ in ours])
    theirs_cpu = median([o + d for o, d, _ in theirs])

    def parts(m: list[tuple[float, float, float]]) -> str:
        return (f"own {median([o for o, _, _ in m]) * 1000:.2f}, daemons "
                f"{median([d for _, d, _ in m]) * 1000:.2f}; wall "
                f"{median([w for _, _, w in m]) * 1000:.1f} ms")

    print(
        f"N={len(ids):4d}  dockvm round:       {ours_cpu * 1000:9.2f} ms CPU ({parts(ours)})\n"
        f"        stats API one_shot: {theirs_cpu * 1000:9.2f} ms CPU ({parts(theirs)})\n"
        f"        ratio stats/dockvm: {theirs_cpu / max(ours_cpu, 1e-9):.1f}x   "
        f"dockvm at a 10 s interval: {ours_cpu / 10 * 100:.3f}% of one core",
        flush=True,
    )


def main() -> None:
    """Run the benchmark and print medians and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-seconds", type=int, default=600)
    args = parser.parse_args()

    def _timeout(*_: object) -> None:
        raise TimeoutError(f"benchmark exceeded {args.max_seconds}s")

    raise_fd_limit()
    signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(args.max_seconds)
    client = docker.from_env(timeout=120)
    api = docker.APIClient(version="auto", timeout=60, max_pool_size=64)
    run = uuid.uuid4().hex
    print(f"# bench.monitor  {machine()}  rounds={args.rounds}")
    ids: list[str] = []
    try:
        for n in sorted(args.sizes):
            ids += _start(client, run, n - len(ids), len(ids))
            _bench_size(api, ids, args.rounds)
    finally:
        signal.alarm(0)
        _cleanup(client, run)
        api.close()
        client.close()


if __name__ == "__main__":
    main()
