"""Micro-benchmark of translated streaming: upstream SSE -> IR -> client SSE,
without the network, the event loop or the database.

    taskset -c 1 python bench/translate_micro.py [--payloads DIR] [--iters N] [--read 4096]

It takes the recorded upstream bodies the shared nginx upstream serves
(``make_payloads.py DIR``: DIR/stream/v1/chat/completions and
DIR/stream/v1/messages; made in a temporary directory when --payloads is not
given), cuts each into reads of ``--read`` bytes and, per stream, does what the
gateway's relay does between socket reads: build the upstream protocol's stream
decoder and the client protocol's stream encoder (as pipeline.attempt_one and
relay._stream_events do, TextRuns asked for unless --no-runs), ``decoder.feed``
each read, ``encoder.encode`` each IR event (``encode_text_run`` each TextRun),
then ``decoder.close`` / ``encoder.close``.  Two directions:

  a<-o  Anthropic-Messages client, OpenAI-Chat upstream
  o<-a  OpenAI-Chat client (include_usage), Anthropic-Messages upstream

Printed: microseconds per stream (best of 5 runs of --iters streams) for the
whole translation, and for decode alone, plus events per stream.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

from cheapproxy.protocol import EncodeContext, Inbound
from cheapproxy_anthropic.codec import AnthropicMessagesProtocol
from cheapproxy_openai.codec import OpenAIChatProtocol

HERE = pathlib.Path(__file__).resolve().parent
MAKE_PAYLOADS = HERE.parent.parent / "shared" / "bench" / "upstream" / "make_payloads.py"

# the bodies the shared stream client sends (shared/bench/stream_client.py)
OPENAI_BODY = {"model": "gpt-bench-stream", "messages": [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Explain in one short paragraph what a reverse proxy does."}],
    "max_tokens": 128, "temperature": 0.2, "stream": True, "stream_options": {"include_usage": True}}
ANTHROPIC_BODY = {"model": "gpt-bench-stream", "max_tokens": 128, "system": "You are a helpful assistant.",
                  "messages": [{"role": "user", "content":
                                "Explain in one short paragraph what a reverse proxy does."}],
                  "stream": True}


def _ctx(proto: Any, body: dict[str, Any]) -> EncodeContext:
    inbound = Inbound(model=body["model"], stream=True, operation="chat", body=body)
    return EncodeContext(model=inbound.model, request_id="req-bench", created=int(time.time()),
                         request=proto.decode_request(inbound), inbound=inbound)


def _reads(body: bytes, size: int) -> list[bytes]:
    return [body[i:i + size] for i in range(0, len(body), size)]


def _translate(up: Any, client: Any, ctx: EncodeContext, reads: list[bytes], runs: bool) -> Callable[[], int]:
    def one() -> int:
        dec = up.stream_decoder()
        dec.text_runs = runs
        enc = client.stream_encoder(ctx)
        encode, encode_run = enc.encode, enc.encode_text_run
        n = 0
        out = [enc.start()]
        for chunk in reads:
            for ev in dec.feed(chunk):
                n += 1
                out.append(encode_run(ev) if ev.type == "text_run" else encode(ev))
        for ev in dec.close():
            n += 1
            out.append(encode(ev))
        out.append(enc.close())
        return n
    return one


def _decode_only(up: Any, reads: list[bytes], runs: bool) -> Callable[[], int]:
    def one() -> int:
        dec = up.stream_decoder()
        dec.text_runs = runs
        n = 0
        for chunk in reads:
            n += len(dec.feed(chunk))
        return n + len(dec.close())
    return one


def _best(fn: Callable[[], int], iters: int, repeats: int = 5) -> float:
    """Best per-call time in microseconds over ``repeats`` runs of ``iters`` calls."""
    for _ in range(min(200, iters)):  # warm up
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        best = min(best, (time.perf_counter() - t0) / iters)
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--payloads", help="a make_payloads.py output directory (default: make one)")
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--read", type=int, default=4096, help="bytes per upstream read")
    ap.add_argument("--no-runs", action="store_true",
                    help="a TextDelta per text frame (the relay asks decoders for TextRuns)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(a.payloads) if a.payloads else pathlib.Path(tmp)
        if not a.payloads:
            subprocess.run([sys.executable, str(MAKE_PAYLOADS), tmp], check=True, stdout=subprocess.DEVNULL)
        chat_body = (root / "stream/v1/chat/completions").read_bytes()
        msg_body = (root / "stream/v1/messages").read_bytes()
    oai, anth = OpenAIChatProtocol(), AnthropicMessagesProtocol()
    cases = [
        ("a<-o", oai, anth, _ctx(anth, ANTHROPIC_BODY), chat_body),
        ("o<-a", anth, oai, _ctx(oai, OPENAI_BODY), msg_body),
    ]
    print(f"python {sys.version.split()[0]}, {a.iters} streams x 5, reads of {a.read} B")
    for name, up, client, ctx, body in cases:
        reads = _reads(body, a.read)
        full = _translate(up, client, ctx, reads, not a.no_runs)
        events = full()
        t_full = _best(full, a.iters)
        t_dec = _best(_decode_only(up, reads, not a.no_runs), a.iters)
        print(f"{name}: {len(body)} B in {len(reads)} reads, {events} IR events{'' if a.no_runs else ' (runs)'}: "
              f"decode+encode {t_full:7.1f} us/stream ({t_full / events * 1000:6.0f} ns/event), "
              f"decode alone {t_dec:7.1f} us/stream")


if __name__ == "__main__":
    main()
