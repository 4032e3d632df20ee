"""CLI: ``cheapproxy tasks list`` / ``tasks show ID`` (async tasks and their state)."""

from __future__ import annotations

from typing import Any

import click

from .cli import State, _out, cli
from .tasks.objects import money, public_state, task_json

STATES = ("queued", "running", "succeeded", "failed")


def task_row(t: Any, user: str) -> dict[str, Any]:
    """One task for ``--json``: the API's task object plus operator fields
    (user, upstream, provider task id, internal state, deadline, callback)."""
    out = task_json(t)
    out.update({
        "user": user, "upstream": t.upstream, "provider_task_id": t.provider_task_id, "state": t.state,
        "attempts": t.attempts, "deadline_at": t.deadline_at, "callback_url": t.callback_url,
        "webhook": (t.result or {}).get("webhook"),
    })
    return out


@cli.group()
def tasks() -> None:
    """Async video / image / audio tasks and their state."""


@tasks.command("list")
@click.option("--user", "user_name", default=None, help="Only this user's tasks.")
@click.option("--status", type=click.Choice(STATES), default=None, help="Only tasks in this state.")
@click.option("--limit", type=click.IntRange(1, 100000), default=200, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def tasks_list(state: State, user_name: str | None, status: str | None, limit: int, as_json: bool) -> None:
    """Tasks, newest first."""
    async def go(s: Any) -> Any:
        names = {u.id: u.name for u in await s.list_users()}
        uid = None
        if user_name is not None:
            uid = next((i for i, n in names.items() if n == user_name), None)
            if uid is None:
                raise click.ClickException(f"no user {user_name!r}")
        return await s.list_tasks(user_id=uid, limit=limit), names

    rows, names = state.with_storage(go)
    rows = [t for t in rows if status is None or public_state(t.state) == status]
    if as_json:
        _out([task_row(t, names.get(t.user_id, str(t.user_id))) for t in rows])
        return
    for t in rows:
        cost = f"${money(t.cost)}" if t.cost is not None else "-"
        click.echo(f"{t.id}  {names.get(t.user_id, t.user_id)!s:<12} {t.model:<24} {t.kind:<6} "
                   f"{public_state(t.state):<10} {cost:>8}  {t.created_at:%Y-%m-%d %H:%M:%S}")
    click.echo(f"{len(rows)} task(s)")


@tasks.command("show")
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def tasks_show(state: State, task_id: str, as_json: bool) -> None:
    """One task in full."""
    async def go(s: Any) -> Any:
        t = await s.get_task(task_id)
        if t is None:
            raise click.ClickException(f"no task {task_id!r}")
        u = await s.get_user_by_id(t.user_id)
        return t, u.name if u is not None else str(t.user_id)

    t, user = state.with_storage(go)
    row = task_row(t, user)
    if as_json:
        _out(row)
        return
    click.echo(f"task {t.id} ({t.kind}) for {user}, model {t.model} via {t.upstream or '-'}")
    click.echo(f"  status:   {row['status']} (internal {t.state}), {t.attempts} poll(s)")
    click.echo(f"  provider: {t.provider_task_id or '-'}")
    click.echo(f"  created:  {t.created_at:%Y-%m-%d %H:%M:%S}, deadline {t.deadline_at:%Y-%m-%d %H:%M:%S}"
               if t.deadline_at else f"  created:  {t.created_at:%Y-%m-%d %H:%M:%S}")
    if row["held"]:
        click.echo(f"  held:     ${row['held']}")
    if row["cost"] is not None:
        click.echo(f"  cost:     ${row['cost']}")
    for url in row["result_urls"]:
        click.echo(f"  result:   {url}")
    if row["usage"]:
        click.echo(f"  usage:    {row['usage']}")
    if row["error"]:
        click.echo(f"  error:    {row['error']['code']}: {row['error']['message']}")
    if t.callback_url:
        hook = row["webhook"] or {}
        click.echo(f"  callback: {t.callback_url} ({hook.get('state', 'pending')})")
