"""An example plugin distributed on its own: provider type ``shout``.

It needs no upstream: it answers every chat request with the last user
message in upper case.  Its one TOML key, ``suffix``, shows how a provider
declares its own settings.
"""

from __future__ import annotations

from typing import AsyncIterator

import attrs

from cheapproxy import hookimpl, ir
from cheapproxy.provider import ProviderType


@attrs.frozen(kw_only=True)
class ShoutOptions:
    suffix: str = "!"


class ShoutProvider(ProviderType):
    name = "shout"
    protocol = None
    options_class = ShoutOptions

    async def generate(self, request: ir.Request, upstream_model: str) -> AsyncIterator[ir.StreamEvent]:
        text = ""
        for msg in reversed(request.messages):
            if msg.role == "user":
                text = " ".join(p.text for p in msg.content if isinstance(p, ir.TextPart))
                break
        reply = text.upper() + self.options.suffix
        yield ir.MessageStart(id="msg_shout", model=upstream_model)
        yield ir.PartStart(index=0, part=ir.TextPart(text=""))
        yield ir.TextDelta(index=0, text=reply)
        yield ir.PartStop(index=0)
        yield ir.MessageStop(stop_reason=ir.StopReason.END_TURN, usage=ir.Usage(input_tokens=3, output_tokens=2))


@hookimpl
def register_provider_types(register):
    register(ShoutProvider)
