"""GET /metrics end to end: real requests through the gateway (demo model, a
loopback fake OpenAI upstream, an in-process provider that holds a stream
open), scraped over HTTP and parsed with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from typing import Any

import aiohttp
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from cheapproxy import hookimpl, ir
from cheapproxy.events import CallFinished, RequestRejected, UpstreamCooledDown, UpstreamFailed
from cheapproxy.provider import ProviderType
from cheapproxy.testing.fixtures import UPSTREAM_SECRET

M1 = """
[[models]]
name = "m1"
upstream = "up"
upstream_model = "real-model-1"
[models.price]
input = 3
output = 15
cache_read = 0.3

[routing]
retries = 0
cooldown_after_failures = 2
cooldown_base_seconds = 60
"""

# the fake upstream's usage (docs/dev/fakes.md): 10 uncached input, 5 cache
# read, 7 output -> (10*3 + 5*0.3 + 7*15) / 1e6 = 0.0001365, rounded up to a
# whole micro-USD = 0.000137 per request
M1_COST = Decimal("0.000137")


# ---------------------------------------------------------------- helpers


class Scrape:
    """One parsed /metrics answer."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]

    def get(self, name: str, **labels: str) -> float | None:
        """The value of the sample with exactly these labels (le aside)."""
        found = [s.value for s in self.samples if s.name == name and s.labels == labels]
        assert len(found) <= 1, (name, labels, found)
        return found[0] if found else None

    def total(self, name: str, **labels: str) -> float:
        """Sum over every sample of ``name`` whose labels include ``labels``."""
        return sum(s.value for s in self.samples if s.name == name and labels.items() <= s.labels.items())

    def series(self, name: str) -> list[dict[str, str]]:
        return [s.labels for s in self.samples if s.name == name]


async def scrape(gw: Any, accept: str | None = None) -> tuple[int, str, str]:
    headers = {"Accept": accept} if accept else {}
    async with aiohttp.ClientSession() as s:
        async with s.get(gw.url + "/metrics", headers=headers) as r:
            return r.status, r.headers["Content-Type"], await r.text()


async def scrape_when(gw: Any, name: str, expected: float, **labels: str) -> Scrape:
    """Scrape until the total of ``name`` reaches ``expected`` (events are
    counted on a background task), then return that scrape."""
    deadline = time.monotonic() + 5
    while True:
        status, _, text = await scrape(gw)
        assert status == 200
        got = Scrape(text)
        if got.total(name, **labels) == expected or time.monotonic() > deadline:
            assert got.total(name, **labels) == expected, (name, labels, got.series(name))
            return got
        await asyncio.sleep(0.02)


async def post(gw: Any, path: str, body: dict[str, Any], *, key: str | None = None,
               header: str = "authorization") -> tuple[int, dict[str, Any] | bytes, str]:
    secret = gw.key if key is None else key
    auth = {header: ("Bearer " + secret) if header == "authorization" else secret}
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + path, json=body, headers=auth) as r:
            raw = await r.read()
            data: dict[str, Any] | bytes = raw
            if r.headers.get("Content-Type", "").startswith("application/json"):
                data = await r.json()
            return r.status, data, r.headers["x-request-id"]


def chat(model: str, text: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **extra}


# ---------------------------------------------------------------- tests


async def test_requests_tokens_cost_failures_and_cooldowns(gateway, fake_upstream):
    fake = await fake_upstream("openai-chat")
    gw = await gateway(fake.toml("up") + M1)
    request_ids = []

    # 7 answers: the cost total must be the exact Decimal sum (7 float
    # additions of 0.000137 give 0.0009589999999999999)
    for _ in range(7):
        status, body, rid = await post(gw, "/v1/chat/completions", chat("m1", "hi"))
        assert status == 200, body
        request_ids.append(rid)
    m = await scrape_when(gw, "cheapproxy_requests_total", 7)
    assert f'cheapproxy_cost_usd_total{{model="m1",upstream="up"}} {7 * M1_COST}\n' in m.text
    assert str(7 * M1_COST) == "0.000959"

    status, body, rid = await post(gw, "/v1/chat/completions", chat("m1", "hi", stream=True))
    assert status == 200 and body.endswith(b"data: [DONE]\n\n"), body
    request_ids.append(rid)
    # the demo model through another protocol
    status, demo_body, rid = await post(gw, "/v1/messages", {"model": "demo", "max_tokens": 50,
                                                              "messages": [{"role": "user", "content": "hello metrics"}]},
                                        header="x-api-key")
    assert status == 200, demo_body
    request_ids.append(rid)
    # two upstream 500s: each is an upstream failure; the second one cools "up" down
    for _ in range(2):
        status, body, rid = await post(gw, "/v1/chat/completions", chat("m1", "[error500] boom"))
        assert status == 502, body
        request_ids.append(rid)
    # rejected before any upstream call
    status, _, rid = await post(gw, "/v1/chat/completions", chat("m1", "hi"), key="sk-wrong-key-123456")
    assert status == 401
    request_ids.append(rid)
    status, _, rid = await post(gw, "/v1/chat/completions", chat("no-such-model", "hi"))
    assert status == 404
    request_ids.append(rid)

    await gw.idle()
    m = await scrape_when(gw, "cheapproxy_requests_total", 11)

    req = "cheapproxy_requests_total"
    assert m.get(req, model="m1", upstream="up", protocol="openai-chat", streamed="false", status="ok", code="200") == 7
    assert m.get(req, model="m1", upstream="up", protocol="openai-chat", streamed="true", status="ok", code="200") == 1
    assert m.get(req, model="m1", upstream="up", protocol="openai-chat", streamed="false", status="error", code="502") == 2
    assert m.get(req, model="demo", upstream="demo", protocol="anthropic-messages", streamed="false", status="ok", code="200") == 1
    assert len(m.series(req)) == 4

    rej = "cheapproxy_requests_rejected_total"
    assert m.get(rej, protocol="openai-chat", kind="authentication", code="401") == 1
    assert m.get(rej, protocol="openai-chat", kind="not_found", code="404") == 1
    assert m.total(rej) == 2

    # latency: one observation per finished call, +Inf bucket == count
    dur = "cheapproxy_request_duration_seconds"
    assert m.get(dur + "_count", model="m1", upstream="up", streamed="false", status="ok") == 7
    assert m.get(dur + "_count", model="m1", upstream="up", streamed="true", status="ok") == 1
    assert m.get(dur + "_count", model="m1", upstream="up", streamed="false", status="error") == 2
    assert m.get(dur + "_bucket", model="m1", upstream="up", streamed="false", status="ok", le="+Inf") == 7
    assert m.get(dur + "_bucket", model="m1", upstream="up", streamed="false", status="ok", le="300.0") == 7
    assert 0 < m.get(dur + "_sum", model="m1", upstream="up", streamed="false", status="ok") < 7 * 5
    # time to first token: only the streamed call
    assert m.get("cheapproxy_time_to_first_token_seconds_count", model="m1", upstream="up") == 1
    assert m.total("cheapproxy_time_to_first_token_seconds_count") == 1

    # tokens: 8 successful m1 calls of 10 input + 5 cache read + 7 output; errors report none
    tok = "cheapproxy_tokens_total"
    assert m.get(tok, model="m1", upstream="up", type="input") == 80
    assert m.get(tok, model="m1", upstream="up", type="cache_read") == 40
    assert m.get(tok, model="m1", upstream="up", type="output") == 56
    assert m.get(tok, model="m1", upstream="up", type="cache_write") == 0
    assert m.get(tok, model="m1", upstream="up", type="reasoning") == 0
    demo_usage = demo_body["usage"]
    assert m.get(tok, model="demo", upstream="demo", type="input") == demo_usage["input_tokens"] > 0
    assert m.get(tok, model="demo", upstream="demo", type="output") == demo_usage["output_tokens"] > 0

    # cost: the exact sum of what the ledger charged
    recs = await gw.storage.list_usage()
    charged: dict[str, Decimal] = {}
    for r in recs:
        if r.cost:
            charged[r.model] = charged.get(r.model, Decimal(0)) + r.cost
    assert charged["m1"] == 8 * M1_COST
    assert f'cheapproxy_cost_usd_total{{model="m1",upstream="up"}} {charged["m1"]}\n' in m.text
    assert Decimal(repr(m.get("cheapproxy_cost_usd_total", model="demo", upstream="demo"))) == charged["demo"] > 0

    # upstream failures and the breaker
    assert m.get("cheapproxy_upstream_failures_total", upstream="up", model="m1", kind="upstream_failed", code="500") == 2
    assert m.total("cheapproxy_upstream_failures_total") == 2
    assert m.get("cheapproxy_upstream_cooldowns_total", upstream="up") == 1
    assert m.get("cheapproxy_upstream_cooldowns_total", upstream="demo") == 0
    assert m.get("cheapproxy_upstream_cooling_down", upstream="up") == 1
    assert m.get("cheapproxy_upstream_cooling_down", upstream="demo") == 0
    assert 55 < m.get("cheapproxy_upstream_cooldown_remaining_seconds", upstream="up") <= 60
    assert m.get("cheapproxy_upstream_cooldown_remaining_seconds", upstream="demo") == 0

    # scrape-time gauges once everything is done
    assert m.get("cheapproxy_in_flight_requests") == 0
    assert m.get("cheapproxy_open_holds") == 0
    assert m.get("cheapproxy_storage_up") == 1
    assert m.get("cheapproxy_events_dropped_total") == 0
    assert m.get("cheapproxy_build_info", version="0.1.0") == 1

    # nothing secret or per-user in the output
    for needle in [gw.key, UPSTREAM_SECRET, "sk-wrong-key-123456", gw.key_id, gw.user, *request_ids]:
        assert needle not in m.text, needle
    labels = {k for s in m.samples for k in s.labels}
    assert not labels & {"user", "user_id", "key", "key_id", "request_id"}


class GateProvider(ProviderType):
    """In-process provider whose stream waits on ``gate`` after the first delta."""

    name = "gate"
    protocol = None
    gate: asyncio.Event

    async def generate(self, request: ir.Request, upstream_model: str):  # type: ignore[override]
        yield ir.MessageStart(id="msg_gate", model=upstream_model)
        yield ir.PartStart(index=0, part=ir.TextPart(text=""))
        yield ir.TextDelta(index=0, text="first")
        await GateProvider.gate.wait()
        yield ir.TextDelta(index=0, text=" second")
        yield ir.PartStop(index=0)
        yield ir.MessageStop(stop_reason=ir.StopReason.END_TURN, usage=ir.Usage(input_tokens=4, output_tokens=2))


class GatePlugin:
    @hookimpl
    def register_provider_types(self, register: Any) -> None:
        register(GateProvider)


GATED = """
[[upstreams]]
name = "slow"
provider = "gate"

[[models]]
name = "held"
upstream = "slow"
[models.price]
input = 1000
output = 2000
"""


async def test_in_flight_and_open_holds_while_a_stream_is_open(gateway):
    GateProvider.gate = asyncio.Event()
    gw = await gateway(GATED, plugins=[("gate", GatePlugin())])
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/v1/chat/completions", json=chat("held", "wait", stream=True, max_tokens=10),
                          headers={"Authorization": "Bearer " + gw.key}) as r:
            assert r.status == 200
            first = b""
            while b'"content":"first"' not in first:  # the provider is now waiting on the gate
                chunk = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
                assert chunk, first
                first += chunk
            _, _, text = await scrape(gw)
            during = Scrape(text)
            assert during.get("cheapproxy_in_flight_requests") == 1
            assert during.get("cheapproxy_open_holds") == 1
            assert during.total("cheapproxy_requests_total") == 0
            GateProvider.gate.set()
            rest = await r.read()
    assert b" second" in first + rest and rest.endswith(b"data: [DONE]\n\n")
    await gw.idle()
    after = await scrape_when(gw, "cheapproxy_requests_total", 1)
    assert after.get("cheapproxy_requests_total", model="held", upstream="slow", protocol="openai-chat",
                     streamed="true", status="ok", code="200") == 1
    assert after.get("cheapproxy_in_flight_requests") == 0
    assert after.get("cheapproxy_open_holds") == 0
    assert after.get("cheapproxy_time_to_first_token_seconds_count", model="held", upstream="slow") == 1
    # (4 * 1000 + 2 * 2000) / 1e6
    assert after.get("cheapproxy_cost_usd_total", model="held", upstream="slow") == 0.008
    assert after.get("cheapproxy_tokens_total", model="held", upstream="slow", type="input") == 4
    assert after.get("cheapproxy_tokens_total", model="held", upstream="slow", type="output") == 2


async def test_each_gateway_has_its_own_registry(gateway):
    a = await gateway()
    b = await gateway()
    for _ in range(2):
        status, _, _ = await post(a, "/v1/chat/completions", chat("demo", "one"))
        assert status == 200
    await a.idle()
    ma = await scrape_when(a, "cheapproxy_requests_total", 2)
    assert ma.get("cheapproxy_requests_total", model="demo", upstream="demo", protocol="openai-chat",
                  streamed="false", status="ok", code="200") == 2
    status, _, text = await scrape(b)
    mb = Scrape(text)
    assert status == 200
    assert mb.series("cheapproxy_requests_total") == []
    assert mb.series("cheapproxy_cost_usd_total") == []
    # known upstreams start at 0 so that rate() sees the first cool-down
    assert mb.get("cheapproxy_upstream_cooldowns_total", upstream="demo") == 0


async def test_labels_are_bounded_and_never_carry_ids(gateway):
    """Events with values outside the gateway's own catalog, registry, HTTP
    range or error kinds are counted under "other", never as new label values."""
    gw = await gateway()
    proxy = gw.proxy
    proxy.emit(CallFinished(
        request_id="req_canary_1", user_id=424242, key_id="key_canary", model="unknown-model-canary",
        upstream="upstream-canary", protocol="proto-canary", streamed=False, status="weird-canary",
        http_status=9999, usage=ir.Usage(input_tokens=3, output_tokens=1), cost=Decimal("0.5"),
        latency_seconds=0.2, ttft_seconds=None, attempts=1,
    ))
    proxy.emit(RequestRejected(protocol="openai-chat", http_status=418, kind="kind-canary"))
    proxy.emit(UpstreamFailed(upstream="demo", model="demo", kind="upstream_timeout", upstream_status=None))
    proxy.emit(UpstreamCooledDown(upstream="nowhere-canary"))
    m = await scrape_when(gw, "cheapproxy_upstream_cooldowns_total", 1)
    assert "canary" not in m.text and "424242" not in m.text
    assert m.get("cheapproxy_requests_total", model="other", upstream="other", protocol="other",
                 streamed="false", status="other", code="other") == 1
    assert m.get("cheapproxy_requests_rejected_total", protocol="openai-chat", kind="other", code="418") == 1
    assert m.get("cheapproxy_upstream_failures_total", upstream="demo", model="demo", kind="upstream_timeout", code="none") == 1
    assert m.get("cheapproxy_upstream_cooldowns_total", upstream="other") == 1
    assert m.get("cheapproxy_cost_usd_total", model="other", upstream="other") == 0.5
    assert m.get("cheapproxy_tokens_total", model="other", upstream="other", type="input") == 3


async def test_dropped_events_are_exposed(gateway):
    """A full observer queue drops events (never blocks a request); the
    count is visible to Prometheus."""
    gw = await gateway()
    # no await in between: the dispatcher cannot drain, the queue (10000) overflows
    for _ in range(10_003):
        gw.proxy.emit(UpstreamCooledDown(upstream="demo"))
    assert gw.proxy.dropped_events == 3
    m = await scrape_when(gw, "cheapproxy_upstream_cooldowns_total", 10_000, upstream="demo")
    assert m.get("cheapproxy_events_dropped_total") == 3


async def test_content_negotiation_and_route(gateway):
    gw = await gateway()
    status, ctype, text = await scrape(gw)
    assert status == 200
    assert ctype == "text/plain; version=0.0.4; charset=utf-8"
    assert "# TYPE cheapproxy_in_flight_requests gauge\n" in text
    status, ctype, text = await scrape(gw, accept="application/openmetrics-text; version=1.0.0; charset=utf-8")
    assert status == 200
    assert ctype.startswith("application/openmetrics-text; version=1.0.0")
    assert text.endswith("# EOF\n")
    names = {f.name for f in parse_openmetrics(text)}
    assert {"cheapproxy_in_flight_requests", "cheapproxy_open_holds", "cheapproxy_upstream_cooling_down"} <= names
    # served without a key, GET only
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + "/metrics") as r:
            assert r.status == 405
    info = gw.proxy.registry.plugins["prometheus"]
    assert info.distribution == "cheapproxy-prometheus"
    assert info.hooks == ["register_routes", "track_event"]
    assert info.provides == {"routes": ["GET /metrics"]}


async def test_scrape_answers_when_the_database_does_not(gateway):
    gw = await gateway()
    await gw.storage.close()
    status, _, text = await scrape(gw)
    m = Scrape(text)
    assert status == 200
    assert m.get("cheapproxy_storage_up") == 0
    assert m.series("cheapproxy_open_holds") == []
    assert m.get("cheapproxy_in_flight_requests") == 0
