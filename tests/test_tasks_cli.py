"""``cheapproxy tasks list`` / ``tasks show`` against a real SQLite file."""

from __future__ import annotations

import asyncio
import datetime as dt
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from click.testing import CliRunner

from cheapproxy.cli import cli
from cheapproxy.storage.records import TaskRecord
from cheapproxy.storage.sqlite import SQLiteStorage

T0 = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.timezone.utc)


def seed(db: Path) -> None:
    async def go() -> None:
        s = SQLiteStorage(f"sqlite:///{db}")
        await s.open()
        try:
            alice = await s.create_user("alice", Decimal("10"))
            bob = await s.create_user("bob", Decimal("10"))
            spec = {"kind": "video", "model": "demo-video", "upstream_model": "demo-video", "prompt": "cats",
                    "duration": 5, "resolution": "720p", "size": None, "extra": {}}
            await s.create_task(TaskRecord(
                id="task_done", user_id=alice.id, model="demo-video", upstream="demo", kind="video", state="succeeded",
                provider_task_id="demo.video.ok.5.720p.x", request={"spec": spec, "hold_usd": "0.25"},
                result={"outcome": "succeeded", "urls": ["https://cdn.example/v.mp4"], "webhook": {"state": "delivered"}},
                usage={"seconds": 5}, cost=Decimal("0.25"), created_at=T0, updated_at=T0, deadline_at=T0,
                callback_url="https://hooks.example/x"))
            await s.create_task(TaskRecord(
                id="task_fail", user_id=bob.id, model="demo-video", upstream="demo", kind="video", state="failed",
                request={"spec": spec, "hold_usd": "0.25"}, result={"outcome": "failed", "error_code": "demo_failure"},
                error="The demo task failed.", cost=Decimal(0), created_at=T0 + dt.timedelta(minutes=1),
                updated_at=T0 + dt.timedelta(minutes=1)))
            await s.create_task(TaskRecord(
                id="task_run", user_id=alice.id, model="demo-audio", upstream="demo", kind="audio", state="finalizing",
                request={"spec": {**spec, "kind": "audio"}, "hold_usd": "0.10"}, created_at=T0 + dt.timedelta(minutes=2),
                updated_at=T0 + dt.timedelta(minutes=2)))
        finally:
            await s.close()

    asyncio.run(go())


def run(tmp_path: Path, *args: str) -> Any:
    db = tmp_path / "cli.db"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[server]\ndatabase = "sqlite:///{db}"\n')
    if not db.exists():
        seed(db)
    return CliRunner().invoke(cli, ["--config", str(cfg), "tasks", *args], catch_exceptions=False)


def test_tasks_list_json(tmp_path: Path) -> None:
    res = run(tmp_path, "list", "--json")
    assert res.exit_code == 0, res.output
    rows = orjson.loads(res.output)
    assert [(r["id"], r["user"], r["status"], r["cost"]) for r in rows] == [
        ("task_run", "alice", "running", None), ("task_fail", "bob", "failed", "0.00"),
        ("task_done", "alice", "succeeded", "0.25")]
    assert rows[2]["result_urls"] == ["https://cdn.example/v.mp4"] and rows[2]["webhook"] == {"state": "delivered"}
    assert rows[0]["state"] == "finalizing" and rows[0]["held"] == "0.10"


def test_tasks_list_filters(tmp_path: Path) -> None:
    rows = orjson.loads(run(tmp_path, "list", "--user", "alice", "--json").output)
    assert [r["id"] for r in rows] == ["task_run", "task_done"]
    rows = orjson.loads(run(tmp_path, "list", "--status", "failed", "--json").output)
    assert [r["id"] for r in rows] == ["task_fail"]
    res = run(tmp_path, "list", "--user", "nobody")
    assert res.exit_code == 1 and "no user 'nobody'" in res.output


def test_tasks_list_text(tmp_path: Path) -> None:
    res = run(tmp_path, "list")
    assert res.exit_code == 0
    lines = res.output.splitlines()
    assert lines[-1] == "3 task(s)"
    assert lines[2].startswith("task_done  alice") and "succeeded" in lines[2] and "$0.25" in lines[2]


def test_tasks_show(tmp_path: Path) -> None:
    res = run(tmp_path, "show", "task_fail", "--json")
    assert res.exit_code == 0
    row = orjson.loads(res.output)
    assert row["error"] == {"code": "demo_failure", "message": "The demo task failed."} and row["user"] == "bob"
    text = run(tmp_path, "show", "task_done").output
    assert "status:   succeeded (internal succeeded)" in text and "cost:     $0.25" in text
    assert "result:   https://cdn.example/v.mp4" in text and "callback: https://hooks.example/x (delivered)" in text
    res = run(tmp_path, "show", "task_nope")
    assert res.exit_code == 1 and "no task 'task_nope'" in res.output
