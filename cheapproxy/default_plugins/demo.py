"""The built-in ``demo`` provider: answers without any upstream, on every
protocol, so ``cheapproxy serve`` works with no configuration at all.

It echoes the last user message ("echo: ...") as a stream of word deltas and
reports usage from the documented local count (utf-8 bytes / 4), billed at
the demo model's price like any real model.  It also offers ``demo-image``
(synchronous images) and the ``demo-video`` / ``demo-audio`` /
``demo-image-task`` task models (``cheapproxy.tasks.demo``).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import secrets
import struct
from typing import AsyncIterator

from cheapproxy import hookimpl, ir
from cheapproxy.config import ModelConfig, PriceConfig
from cheapproxy.provider import ProviderType
from cheapproxy.tasks import ImageProvider, TaskProvider
from cheapproxy.tasks.demo import DemoTasks


def _tokens(text: str) -> int:
    n = len(text.encode())
    return max(1, (n + 3) // 4) if n else 0


def _last_user_text(request: ir.Request) -> tuple[str, bool]:
    for msg in reversed(request.messages):
        if msg.role != "user":
            continue
        texts, results = [], []
        for p in msg.content:
            if isinstance(p, ir.TextPart):
                texts.append(p.text)
            elif isinstance(p, ir.ToolResultPart):
                results.extend(c.text for c in p.content if isinstance(c, ir.TextPart))
        if results:
            return " ".join(results), True
        return " ".join(texts), False
    return "", False


def _prompt_tokens(request: ir.Request) -> int:
    total = sum(_tokens(p.text) for p in request.system)
    for m in request.messages:
        for p in m.content:
            if isinstance(p, (ir.TextPart, ir.ReasoningPart)):
                total += _tokens(p.text)
            elif isinstance(p, ir.ToolCallPart):
                total += _tokens(p.arguments)
            elif isinstance(p, ir.ToolResultPart):
                total += sum(_tokens(c.text) for c in p.content if isinstance(c, ir.TextPart))
    return max(1, total)


class DemoProvider(DemoTasks, TaskProvider, ImageProvider, ProviderType):
    name = "demo"
    protocol = None
    operations = frozenset({"chat", "embeddings", "tasks", "images"})

    @classmethod
    def default_models(cls, upstream_name: str) -> list[ModelConfig]:
        price = PriceConfig(scheme="per_token", options={"input": "1.00", "output": "2.00"})
        return [
            ModelConfig(name="demo", upstream=upstream_name, aliases=["demo-chat"], max_output_tokens=4096,
                        description="Built-in demo model: echoes your last message (no upstream).", price=price),
            ModelConfig(name="demo-embed", upstream=upstream_name, kind="embedding", max_output_tokens=1,
                        description="Built-in demo embedding model (deterministic vectors).",
                        price=PriceConfig(scheme="per_token", options={"input": "0.10"})),
        ] + DemoTasks.demo_models(upstream_name)  # demo-image (sync); demo-video, -audio, -image-task (tasks)

    async def generate(self, request: ir.Request, upstream_model: str) -> AsyncIterator[ir.StreamEvent]:
        text, is_result = _last_user_text(request)
        reply = ("tool result: " if is_result else "echo: ") + (text or "(empty)")
        limit = request.max_tokens
        words = reply.split(" ")
        stop = ir.StopReason.END_TURN
        if limit is not None and limit < len(words):
            words, stop = words[: max(0, limit)], ir.StopReason.MAX_TOKENS
        usage = ir.Usage(input_tokens=_prompt_tokens(request))
        yield ir.MessageStart(id="msg_demo_" + secrets.token_hex(8), model=upstream_model, usage=usage)
        yield ir.PartStart(index=0, part=ir.TextPart(text=""))
        out = ""
        for i, w in enumerate(words):
            piece = w if i == 0 else " " + w
            out += piece
            yield ir.TextDelta(index=0, text=piece)
            await asyncio.sleep(0)
        yield ir.PartStop(index=0)
        yield ir.MessageStop(stop_reason=stop, usage=ir.Usage(input_tokens=usage.input_tokens, output_tokens=max(1, _tokens(out))))

    async def embed(self, request: ir.EmbeddingRequest, upstream_model: str) -> ir.EmbeddingResponse:
        dims = request.dimensions or 8
        vectors = []
        tokens = 0
        for item in request.inputs:
            raw = item if isinstance(item, str) else " ".join(map(str, item))
            tokens += _tokens(raw) if isinstance(item, str) else max(1, len(item))
            seed = hashlib.sha256(raw.encode()).digest()
            vals = []
            while len(vals) < dims:
                seed = hashlib.sha256(seed).digest()
                vals.extend(x / 2**32 * 2 - 1 for x in struct.unpack("<8I", seed))
            v = vals[:dims]
            norm = math.sqrt(sum(x * x for x in v)) or 1.0
            vectors.append([x / norm for x in v])
        return ir.EmbeddingResponse(model=upstream_model, vectors=vectors, usage=ir.Usage(input_tokens=max(1, tokens)))


@hookimpl
def register_provider_types(register):  # type: ignore[no-untyped-def]
    register(DemoProvider)
