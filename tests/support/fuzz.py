"""Schemathesis over the gateway's own OpenAPI document, on a private stack.

:func:`fuzz_stack` starts the gateway and the peers it asks over the bus (ipam, imagesync, a
monitor that follows no container) as real processes on a fresh vhost, database and state dir,
with no Docker host: a machine created by a fuzzed request is placed nowhere and fails, so no
container is ever made. :func:`run_schemathesis` runs the ``schemathesis`` CLI against it with the
admin token and counts, from its JSON report, the cases sent, the 5xx answers and the failures of
each check. Used by ``tests/integration/test_gateway_schema.py`` (a few cases per operation) and
``bench/schema_fuzz.py`` (the full run ``make chaos`` calls).
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from libs.common.db import mongo_client
from tests.support.services import ServiceProcess
from tests.support.stack import MONGO_URL, create_vhost, delete_vhost, free_port

__all__ = [
    "CHECKS",
    "POSITIVE_CHECK",
    "POSITIVE_EXCLUDED",
    "FuzzOutcome",
    "FuzzTarget",
    "fuzz_stack",
    "run_schemathesis",
]

# What must hold: no 5xx, answers that match the document (status, content type, body schema),
# and invalid input refused with a 4xx.
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
)
# A schema-valid request must be accepted, too; but a create or a change may be refused for what
# no schema can say (a pool that does not exist, an address outside the pool's network), so this
# check runs on the reads only.
POSITIVE_CHECK = "positive_data_acceptance"
# Reads whose schema-valid requests may still be refused, by a rule across parameters that a
# schema cannot state: a metrics range of more than 20,000 points at its step, and sessions
# from a time after their to, are 422s. (Both are fuzzed with the other checks all the same.)
POSITIVE_EXCLUDED = ("/v1/ips/{ip}/metrics", "/v1/sessions")
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


@dataclass(frozen=True)
class FuzzTarget:
    """A running gateway and its admin token."""

    url: str
    token: str
    logs: Path


@dataclass
class FuzzOutcome:
    """What one schemathesis run saw: cases generated, answers by status, failures by check."""

    cases: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    exit_code: int = 0

    @property
    def requests(self) -> int:
        """Requests sent (a case may send more than one)."""
        return sum(self.statuses.values())

    @property
    def server_errors(self) -> int:
        """Answers with a 5xx status."""
        return sum(n for status, n in self.statuses.items() if status >= 500)

    def merge(self, other: FuzzOutcome) -> FuzzOutcome:
        """The two runs' counts together."""
        return FuzzOutcome(
            self.cases + other.cases,
            self.statuses + other.statuses,
            self.failures + other.failures,
            self.examples + other.examples,
            max(self.exit_code, other.exit_code),
        )


@asynccontextmanager
async def fuzz_stack(workdir: Path) -> AsyncIterator[FuzzTarget]:
    """ipam, imagesync, monitor, bastion, builder and the gateway on a fresh vhost and
    database."""
    run = uuid.uuid4().hex[:8]
    vhost = await create_vhost()
    db = f"fuzz_{run}"
    state = workdir / "state"
    env = {
        "DOCKVM_AMQP_URL": vhost.url,
        "DOCKVM_MONGO_URL": MONGO_URL,
        "DOCKVM_MONGO_DB": db,
        "DOCKVM_STATE_DIR": str(state),
        "DOCKVM_WEBHOOK_SECRET": f"fuzz-webhook-secret-{run}",
        "DOCKVM_RPC_TIMEOUT_S": "5",
        # A machine create that is waited for ends fast: with no host it fails at placement.
        "DOCKVM_WAIT_MAX_S": "5",
        "DOCKVM_RESIZE_WAIT_S": "2",
        "DOCKVM_MONITOR_LABEL": f"dockvm.fuzz={run}",
    }
    # The bastion keeps its own state (its CA) and listens for SSH on a port of its own.
    bastion = {
        "DOCKVM_STATE_DIR": str(workdir / "bastion"),
        "DOCKVM_BASTION_SSH_PORT": str(free_port()),
    }
    peers = (
        ("ipam", [], {}),
        ("imagesync", [], {}),
        ("monitor", ["--host-id", f"fuzz-{run}"], {}),
        ("bastion", [], bastion),
        # A build that got past the policy would fail at its push (nothing listens on :9), so
        # fuzzing never puts an image into the shared registries.
        ("builder", [], {"DOCKVM_REGISTRIES": "dc1=http://127.0.0.1:9"}),
    )
    started: list[ServiceProcess] = []
    try:
        for name, args, own in (*peers, ("gateway", [], {})):
            svc = ServiceProcess(
                name, {**env, **own}, free_port(), args, log_path=workdir / f"{name}.log"
            )
            started.append(svc)
            await svc.start(ready_timeout=60)
        token = (state / "admin.token").read_text().strip()
        yield FuzzTarget(started[-1].url, token, workdir)
    finally:
        for svc in reversed(started):
            svc.kill()
            if svc.proc is not None:
                await svc.proc.wait()
        await delete_vhost(vhost)
        client = mongo_client(MONGO_URL, app_name="dockvm-fuzz")
        await client.drop_database(db)
        await client.close()


def _outcome(report: Path, har: Path, exit_code: int) -> FuzzOutcome:
    """Counts from schemathesis' JSON report (cases, failures) and HAR (every answer)."""
    data = json.loads(report.read_text())
    out = FuzzOutcome(cases=data["test_cases"]["generated"], exit_code=exit_code)
    for failure in data.get("failures", []):
        out.failures[f"{failure['code']} {failure['title']}"] += failure["count"]
        out.examples += [f"{failure['code']} {op}" for op in failure["operations"]]
    for entry in json.loads(har.read_text())["log"]["entries"] if har.exists() else []:
        status = entry["response"]["status"]
        out.statuses[status] += 1
        if status >= 500 and len(out.examples) < 40:
            out.examples.append(f"{status} {entry['request']['method']} {entry['request']['url']}")
    return out


async def run_schemathesis(
    target: FuzzTarget,
    *,
    max_examples: int,
    name: str,
    methods: str | None = None,
    checks: tuple[str, ...] = CHECKS,
    mode: str = "all",
    seed: int | None = None,
    phases: str = "examples,coverage,fuzzing",
    exclude_paths: tuple[str, ...] = (),
) -> FuzzOutcome:
    """One schemathesis run over the document (``methods``: a regex of methods to include;
    the coverage phase adds each operation's boundary and malformed cases to the examples)."""
    report = target.logs / f"schemathesis-{name}.json"
    har = target.logs / f"schemathesis-{name}.har"
    cmd = [
        str(SCHEMATHESIS), "run", f"{target.url}/v1/openapi.json",
        "-H", f"Authorization: Bearer {target.token}",
        "--checks", ",".join(checks),
        "--mode", mode,
        "--max-examples", str(max_examples),
        "--phases", phases,
        "--workers", "2",
        "--request-timeout", "30",
        "--continue-on-failure",
        "--suppress-health-check", "all",
        "--report", "json,har",
        "--report-json-path", str(report),
        "--report-har-path", str(har),
    ]  # fmt: skip
    if methods:
        cmd += ["--include-method-regex", methods]
    for path in exclude_paths:
        cmd += ["--exclude-path", path]
    if seed is not None:
        cmd += ["--seed", str(seed)]
    with open(target.logs / f"schemathesis-{name}.log", "wb") as log:
        # In the run's directory: schemathesis keeps a cache where it runs.
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=log, stderr=log, cwd=target.logs)
        code = await proc.wait()
    if not report.exists():
        raise RuntimeError(f"schemathesis wrote no report (exit {code}): see {log.name}")
    await _token_still_works(target)
    return _outcome(report, har, code)


async def _token_still_works(target: FuzzTarget) -> None:
    """Raise if the admin token was lost on the way (every later answer a 401, and a hollow
    run): the gateway refuses a token revoking itself, so this would be a bug."""
    headers = {"Authorization": f"Bearer {target.token}"}
    async with aiohttp.ClientSession(headers=headers) as s, s.get(f"{target.url}/v1/tokens") as r:
        if r.status != 200:
            raise RuntimeError(f"the admin token stopped working during the run ({r.status})")
