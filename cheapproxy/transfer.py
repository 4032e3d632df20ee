"""``POST /api/user/transfer``: move balance to another user (CONTRACT section 7).

Body ``{"toUsername": "...", "amount": 12.5}``.  Answers
``{"success": true, "amount", "from", "to", "senderNewBalance",
"receiverNewBalance"}`` (money as decimal strings with two decimals) or
``{"success": false, "error": "<message>"}`` with 400 / 404 / 409.

Idempotency-Key (Stripe semantics): validation failures (bad amount, unknown
or same user) are answered and never stored; an executed request (success or
``Insufficient balance``) is stored with its status and body in the same
transaction that moves the money, so a retry -- or 20 concurrent copies --
moves money once and all get the stored answer; the same key with a different
body gets 409.  Keys are scoped to the sender.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
from decimal import ROUND_DOWN, Decimal
from typing import Any, Callable

import orjson

from .errors import ProxyError
from .events import BalanceChanged
from .storage.base import InsufficientBalance, Storage, User
from .storage.records import IdempotentReplay, IdempotentWrite

CENT = Decimal("0.01")
MAX_TRANSFER = Decimal("1000000000.00")
_AMOUNT_TEXT = re.compile(r"[0-9]{1,10}(?:\.[0-9]{1,2})?")
BAD_AMOUNT = "Invalid amount: it must be a positive number with at most two decimals, at most 1000000000.00"
INSUFFICIENT = "Insufficient balance"
NOT_FOUND = "User not found"
SELF = "Cannot transfer to yourself"
REUSED = "Idempotency-Key reused with a different request"


def parse_amount(raw: Any) -> Decimal:
    """A transfer amount: a positive JSON number or numeric string with at
    most two decimals and at most 1,000,000,000.00; 400 otherwise (NaN,
    Infinity, bools, 1e-30, zero, negatives, huge values, sub-cent digits)."""
    bad = ProxyError("invalid_request", BAD_AMOUNT, param="amount")
    if isinstance(raw, bool):
        raise bad
    if isinstance(raw, int):
        if not 0 < raw <= MAX_TRANSFER:
            raise bad
        value = Decimal(raw)
    elif isinstance(raw, float):
        if not math.isfinite(raw):
            raise bad
        value = Decimal(repr(raw))  # the digits the client wrote, not the binary expansion
    elif isinstance(raw, str):
        if len(raw) > 16 or not _AMOUNT_TEXT.fullmatch(raw):
            raise bad
        value = Decimal(raw)
    elif isinstance(raw, Decimal):
        value = raw
    else:
        raise bad
    if not value.is_finite() or value <= 0 or value > MAX_TRANSFER or value != value.quantize(CENT):
        raise bad
    return value.quantize(CENT)


def money(amount: Decimal) -> str:
    """Two-decimal string; a balance with sub-cent digits is shown rounded
    down, so the answer never shows more than the user has."""
    return f"{amount.quantize(CENT, rounding=ROUND_DOWN):f}"


def _fail(status: int, message: str) -> tuple[int, dict[str, Any]]:
    return status, {"success": False, "error": message}


def _valid_idempotency_key(key: str) -> bool:
    return 0 < len(key) <= 255 and all(32 < ord(c) < 127 for c in key)


async def do_transfer(storage: Storage, *, sender: User, body: Any, idempotency_key: str | None,
                      emit: Callable[[Any], None] | None = None) -> tuple[int, dict[str, Any]]:
    """Validate and execute a transfer; returns (HTTP status, JSON body).
    ``emit`` gets a ``BalanceChanged`` event per side of a transfer made (not
    of a refused one, nor of an idempotent replay)."""
    if not isinstance(body, dict):
        return _fail(400, "The body must be a JSON object with toUsername and amount")
    to_name = body.get("toUsername")
    if not isinstance(to_name, str) or not to_name:
        return _fail(400, "toUsername is required (the name of the receiving user)")
    try:
        amount = parse_amount(body.get("amount"))
    except ProxyError as exc:
        return _fail(400, exc.message)
    if idempotency_key is not None and not _valid_idempotency_key(idempotency_key):
        return _fail(400, "Idempotency-Key must be 1 to 255 printable ASCII characters without spaces")
    recipient = await storage.get_user(to_name)
    if recipient is None:
        return _fail(404, NOT_FOUND)
    if recipient.id == sender.id:
        return _fail(400, SELF)

    def success(sender_balance: Decimal, receiver_balance: Decimal) -> dict[str, Any]:
        return {"success": True, "amount": money(amount), "from": sender.name, "to": recipient.name,
                "senderNewBalance": money(sender_balance), "receiverNewBalance": money(receiver_balance)}

    reference = "tr_" + secrets.token_hex(12)
    spec = None
    if idempotency_key is not None:
        # semantically equal bodies ("10" and 10.00) are the same request
        request_hash = hashlib.sha256(orjson.dumps([to_name, str(amount)])).hexdigest()
        spec = IdempotentWrite(
            scope=f"transfer:{sender.id}", key=idempotency_key, request_hash=request_hash,
            on_success=lambda sb, rb: (200, orjson.dumps(success(sb, rb))),
            on_insufficient=lambda: (400, orjson.dumps(_fail(400, INSUFFICIENT)[1])),
        )
    try:
        if spec is None:
            sb, rb = await storage.transfer(from_user_id=sender.id, to_user_id=recipient.id, amount=amount,
                                            reference=reference)
        else:
            sb, rb = await storage.transfer(from_user_id=sender.id, to_user_id=recipient.id, amount=amount,  # type: ignore[call-arg]
                                            reference=reference, idempotency=spec)
    except InsufficientBalance:
        return _fail(400, INSUFFICIENT)
    except IdempotentReplay as replay:
        assert spec is not None
        if replay.request_hash != spec.request_hash:
            return _fail(409, REUSED)
        return replay.status, orjson.loads(replay.body)
    except ValueError as exc:  # e.g. the receiver's balance would pass the maximum
        return _fail(400, f"Transfer refused: {exc}")
    if emit is not None:
        emit(BalanceChanged(user_id=sender.id, amount=-amount, kind="transfer_out"))
        emit(BalanceChanged(user_id=recipient.id, amount=amount, kind="transfer_in"))
    return 200, success(sb, rb)
