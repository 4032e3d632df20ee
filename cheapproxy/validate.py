"""Ingress validation shared by every protocol: strict JSON and bounds.

orjson already refuses NaN/Infinity, numbers that overflow a double (1e309),
invalid UTF-8 and lone surrogates.  On top of it:

* duplicate object keys are refused (parsers disagree on which one wins, the
  classic smuggling trick).  The check is cheap: a regex counts the key
  candidates in the raw bytes (a ``"`` that is not escaped, followed by ``:``);
  every key is one of them, so when that count equals the number of keys
  orjson kept, there was no duplicate.  Only when they differ (a string value
  that starts with a colon) does an exact pass with ``object_pairs_hook`` run;
* nesting is limited to MAX_DEPTH (orjson serializes at most 255 levels, so a
  deeper body could not even be relayed);
* the body must be an object.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

from .errors import ProxyError

MAX_DEPTH = 128
MAX_CHOICES = 128  # OpenAI's own limit for n
# a string delimiter (an even run of backslashes before it), optional space, a colon
_WS_COLON = re.compile(rb'"[ \t\r\n]+:')
_KEY_CANDIDATE = re.compile(rb'(?:^|[^\\])(?:\\\\)*"[ \t\r\n]*:')
# fields that steer where a request goes or which credential it uses in other
# gateways (litellm's api_base / user_config ...): never honoured here, and
# refused at the top level so a client learns it at once
ROUTING_FIELDS = frozenset({
    "api_base", "base_url", "api_key", "api_version", "user_config", "extra_body", "extra_headers", "extra_query",
    "custom_llm_provider", "azure_endpoint", "organization", "host",
})


def _bad(message: str, param: str | None = None) -> ProxyError:
    return ProxyError("invalid_request", message, param=param)


def parse_body(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise _bad("Request body is empty; send a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        msg = str(exc)
        if "recursion" in msg.lower():
            msg = f"nesting is deeper than {MAX_DEPTH} levels"
        raise _bad(f"Request body is not valid JSON: {msg}") from None
    if not isinstance(body, dict):
        raise _bad("Request body must be a JSON object.")
    keys = _count_keys(body)
    # A duplicate key shows as more key positions in the text than keys in
    # the parsed objects.  '":' occurrences never undercount key positions
    # unless whitespace sits between a key and its colon, and any extra (a
    # string that starts with ':', an escaped quote) only raises the count, so
    # equality proves there is no duplicate -- at C speed (the regex below
    # costs milliseconds on the 100 KB+ bodies of agent clients).
    if raw.count(b'":') == keys and _WS_COLON.search(raw) is None:
        return body
    if keys != len(_KEY_CANDIDATE.findall(raw)):
        _exact_duplicate_check(raw)
    return body


def _count_keys(node: Any, depth: int = 1) -> int:
    """Keys of every object in ``node`` (a dict or list from orjson); refuses
    nesting deeper than MAX_DEPTH (so the recursion is bounded by it)."""
    if depth > MAX_DEPTH:
        raise _bad(f"Request body is not valid JSON: nesting is deeper than {MAX_DEPTH} levels")
    if type(node) is dict:
        total = len(node)
        values: Any = node.values()
    else:
        total = 0
        values = node
    for v in values:
        t = type(v)
        if t is dict or t is list:
            total += _count_keys(v, depth + 1)
    return total


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _bad(f"Request body is not valid JSON: the key {k[:64]!r} appears twice in one object.")
            seen.add(k)
    return obj


def _exact_duplicate_check(raw: bytes) -> None:
    try:
        json.loads(raw, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise _bad(f"Request body is not valid JSON: nesting is deeper than {MAX_DEPTH} levels") from None


def check_routing_fields(body: dict[str, Any]) -> None:
    """Refuse top-level fields that other gateways read as an upstream host or
    credential.  Nested anywhere else (metadata, tool schemas) they are plain
    data for the configured upstream: nothing in cheapproxy reads a URL, a
    host or a key from a request body."""
    for k in body:
        if k.lower() in ROUTING_FIELDS:
            raise _bad(f"The field '{k}' is not accepted: upstream hosts and credentials are set by the gateway operator.",
                       param=k)


def _int_field(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise _bad(f"'{name}' must be a whole number.", param=name)
    return value


def requested_max_tokens(body: dict[str, Any]) -> int | None:
    """The output limit the client asked for, whatever its protocol calls it."""
    for name in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        if name in body and body[name] is not None:
            return _int_field(body[name], name)
    gc = body.get("generationConfig") or body.get("generation_config")
    if isinstance(gc, dict):
        for name in ("maxOutputTokens", "max_output_tokens"):
            if gc.get(name) is not None:
                return _int_field(gc[name], name)
    return None


def requested_choices(body: dict[str, Any]) -> int:
    """How many answers the client asked for (OpenAI ``n``, Gemini
    ``candidateCount``), between 1 and MAX_CHOICES: the hold covers all of
    them, and a huge count can never be multiplied into a price."""
    found: list[tuple[str, Any]] = []
    if body.get("n") is not None:
        found.append(("n", body["n"]))
    gc = body.get("generationConfig") or body.get("generation_config")
    if isinstance(gc, dict):
        for name in ("candidateCount", "candidate_count"):
            if gc.get(name) is not None:
                found.append((name, gc[name]))
    n = 1
    for name, value in found:
        count = _int_field(value, name)
        if count is None or not 1 <= count <= MAX_CHOICES:
            raise _bad(f"'{name}' must be a whole number between 1 and {MAX_CHOICES}.", param=name)
        n = max(n, count)
    return n
