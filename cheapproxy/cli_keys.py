"""CLI: keys and usage."""

from __future__ import annotations

import datetime as dt
import ipaddress
from decimal import Decimal
from typing import Any

import click

from .auth import hash_key, new_key_id, new_secret
from .cli import State, _out, cli, money
from .storage.base import KeyRecord


def parse_date(value: str) -> dt.datetime:
    """YYYY-MM-DD or an ISO timestamp; naive values are UTC."""
    try:
        d = dt.datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a date (YYYY-MM-DD or ISO 8601)") from None
    return d if d.tzinfo else d.replace(tzinfo=dt.timezone.utc)


def _cidr(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an IP address or CIDR") from None


def key_json(k: KeyRecord) -> dict[str, Any]:
    return {
        "id": k.id, "user": k.user_name, "prefix": k.prefix, "label": k.label, "models": k.models,
        "no_stream": k.no_stream, "allow_ips": k.allow_ips, "rpm": k.rpm, "tpm": k.tpm,
        "max_spend": str(k.max_spend) if k.max_spend is not None else None, "spent": str(k.spent),
        "expires_at": k.expires_at, "revoked": k.revoked, "created_at": k.created_at,
    }


async def create_key(storage: Any, user_name: str, **opts: Any) -> tuple[KeyRecord, str]:
    user = await storage.get_user(user_name)
    if user is None:
        raise click.ClickException(f"no user {user_name!r}")
    secret = new_secret()
    rec = KeyRecord(id=new_key_id(), user_id=user.id, user_name=user.name, key_hash=hash_key(secret),
                    prefix=secret[:7], **opts)
    await storage.create_key(rec)
    return rec, secret


@cli.group()
def keys() -> None:
    """Create, list and revoke API keys."""


@keys.command("create")
@click.argument("name")
@click.option("--models", default=None, help="Comma-separated model globs this key may use (default: all).")
@click.option("--no-stream", is_flag=True, help="Refuse streaming requests.")
@click.option("--allow-ip", "allow_ips", multiple=True, type=_cidr, help="Client IP or CIDR allowed (repeatable).")
@click.option("--rpm", type=click.IntRange(1, 10**7), default=None, help="Requests per minute.")
@click.option("--tpm", type=click.IntRange(1, 10**10), default=None, help="Tokens per minute.")
@click.option("--max-spend", type=money, default=None, help="Spending cap in USD for this key.")
@click.option("--expires", type=parse_date, default=None, help="Expiry date (YYYY-MM-DD or ISO 8601).")
@click.option("--label", default=None)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def keys_create(state: State, name: str, models: str | None, no_stream: bool, allow_ips: tuple[str, ...], rpm: int | None,
                tpm: int | None, max_spend: Decimal | None, expires: dt.datetime | None, label: str | None, as_json: bool) -> None:
    """New API key for user NAME; the secret is shown once."""
    globs = [m.strip() for m in models.split(",") if m.strip()] if models else None
    rec, secret = state.with_storage(lambda s: create_key(
        s, name, label=label, models=globs, no_stream=no_stream, allow_ips=list(allow_ips) or None, rpm=rpm, tpm=tpm,
        max_spend=max_spend, expires_at=expires))
    if as_json:
        _out({"id": rec.id, "key": secret, "user": rec.user_name})
    else:
        click.echo(f"key {rec.id} for {rec.user_name} (shown once, keep it safe):\n{secret}")


@keys.command("list")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def keys_list(state: State, name: str | None, as_json: bool) -> None:
    """Keys (never their secrets)."""
    rows = state.with_storage(lambda s: s.list_keys(name))
    if as_json:
        _out([key_json(k) for k in rows])
        return
    for k in rows:
        flags = " revoked" if k.revoked else ""
        click.echo(f"{k.id}  {k.user_name:<16} {k.prefix}…  {k.label or ''}{flags}")


@keys.command("revoke")
@click.argument("key_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def keys_revoke(state: State, key_id: str, as_json: bool) -> None:
    ok = state.with_storage(lambda s: s.revoke_key(key_id))
    if not ok:
        raise click.ClickException(f"no key {key_id!r}")
    if as_json:
        _out({"id": key_id, "revoked": True})
    else:
        click.echo(f"revoked {key_id}")


USAGE_FIELDS = ("request_id", "user", "key_id", "model", "upstream", "protocol", "streamed", "status", "input_tokens",
                "output_tokens", "cache_write_tokens", "cache_read_tokens", "cost", "created_at")


@cli.command()
@click.option("--user", "user_name", default=None)
@click.option("--since", type=parse_date, default=None)
@click.option("--limit", type=click.IntRange(1, 100000), default=1000, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def usage(state: State, user_name: str | None, since: dt.datetime | None, limit: int, as_json: bool) -> None:
    """Per-request usage records and totals."""
    async def go(s: Any) -> Any:
        recs = await s.list_usage(user_name=user_name, since=since, limit=limit)
        names = {u.id: u.name for u in await s.list_users()}
        return recs, names

    recs, names = state.with_storage(go)
    rows = []
    for r in recs:
        row = {f: getattr(r, f, None) for f in USAGE_FIELDS if f != "user"}
        row["user"] = names.get(r.user_id, str(r.user_id))
        row["cost"] = str(r.cost)
        rows.append({f: row[f] for f in USAGE_FIELDS})
    totals = {
        "requests": len(recs),
        "cost": str(sum((r.cost for r in recs), Decimal(0))),
        "input_tokens": sum(r.input_tokens for r in recs),
        "output_tokens": sum(r.output_tokens for r in recs),
        "cache_write_tokens": sum(r.cache_write_tokens for r in recs),
        "cache_read_tokens": sum(r.cache_read_tokens for r in recs),
    }
    if as_json:
        _out({"records": rows, "totals": totals})
        return
    for r in rows:
        click.echo(f"{r['created_at']}  {r['user']:<12} {r['model']:<20} {r['status']:<10} in={r['input_tokens']} "
                   f"out={r['output_tokens']} cost=${r['cost']}")
    click.echo(f"total: {totals['requests']} requests, ${totals['cost']}")
