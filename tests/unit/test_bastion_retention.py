"""Retention: which ended sessions go, and the pruner removing them with their casts."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

from libs.common.clock import utcnow
from services.bastion.domain import prunable
from services.bastion.fakes import MemoryBastionStore
from services.bastion.service import SessionPruner

NOW = utcnow()
DAY = 86400.0
ROOT = Path("/state/bastion/recordings")


def doc(sid: str, ended_days_ago: float | None, path: str | None = None, **kw: Any) -> Any:
    ended = None if ended_days_ago is None else NOW - timedelta(days=ended_days_ago)
    return {"_id": sid, "live": ended is None, "ended_at": ended, "started_at": NOW,
            "recording_path": path, **kw}  # fmt: skip


def test_only_sessions_ended_before_the_retention_go_oldest_first_and_bounded():
    sessions = [
        doc("fresh", 1),
        doc("old", 91),
        doc("older", 200),
        doc("live", None),
        doc("edge", 90 - 1e-6),
        doc("oldest", 365),
        doc("sftp", 100),
        doc("elsewhere", 300, "/other/host/state/x.cast"),
        doc("mine", 95, str(ROOT / "2026-01-01" / "mine.cast")),
        {**doc("ancient-but-live", 400), "live": True},
    ]
    ids = [d["_id"] for d in prunable(sessions, NOW, 90 * DAY, 100, ROOT)]
    assert ids == ["oldest", "older", "sftp", "mine", "old"]
    assert [d["_id"] for d in prunable(sessions, NOW, 90 * DAY, 2, ROOT)] == ["oldest", "older"]
    assert prunable(sessions, NOW, 1000 * DAY, 100, ROOT) == []


async def test_the_pruner_removes_records_and_casts_and_keeps_the_rest(tmp_path: Path):
    root = tmp_path / "recordings"
    old_cast = root / "2026-01-01" / "s-old.cast"
    new_cast = root / "2026-11-01" / "s-new.cast"
    for cast in (old_cast, new_cast):
        cast.parent.mkdir(parents=True)
        cast.write_text("{}\n")
    store = MemoryBastionStore()
    for d in (
        doc("s-old", 100, str(old_cast)),
        doc("s-gone-cast", 100, str(root / "x.cast")),
        doc("s-new", 1, str(new_cast)),
        doc("s-live", None),
        doc("s-sftp", 120),
    ):
        store.sessions[d["_id"]] = d
    pruner = SessionPruner(store, root, 90 * DAY, batch=2)

    first = await pruner.prune()
    second = await pruner.prune()
    third = await pruner.prune()

    assert (first, second, third) == (2, 1, 0)
    assert sorted(store.sessions) == ["s-live", "s-new"]
    assert not old_cast.exists() and not old_cast.parent.exists()  # its empty day went too
    assert new_cast.exists()
