"""Memory benchmark: idle RSS, RSS with 1,000 concurrent open streams, and
RSS before/after a 50,000-request run (flat within 5 % is the target).

    bench/memory.py [--streams 1000] [--requests 50000] [--venv .venv]

Loopback only.  A slow OpenAI-style upstream (this script, in a subprocess on
core 1) holds every stream open: one chunk at once, then one a second for
``--hold`` seconds, then usage and [DONE]; non-streamed calls are answered at
once.  cheapproxy runs with every feature on (SQLite billing, JSON logs to a
file, Prometheus) pinned to core 0.  Every request must succeed and be
charged exactly once; the script exits 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time

UP_PORT, GW_PORT = 18091, 14291

UPSTREAM = r'''
import asyncio, json, sys
from aiohttp import web
HOLD = float(sys.argv[2])
def chunk(obj): return ("data: " + json.dumps(obj) + "\n\n").encode()
BASE = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
async def chat(request):
    body = await request.json()
    if not body.get("stream"):
        return web.json_response({**BASE, "object": "chat.completion", "choices": [{"index": 0,
            "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}})
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    await resp.write(chunk({**BASE, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "t"}}]}))
    end = asyncio.get_running_loop().time() + HOLD
    while asyncio.get_running_loop().time() < end:
        await asyncio.sleep(1)
        await resp.write(chunk({**BASE, "choices": [{"index": 0, "delta": {"content": " x"}}]}))
    await resp.write(chunk({**BASE, "choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}))
    await resp.write(b"data: [DONE]\n\n")
    return resp
app = web.Application()
app.router.add_post("/v1/chat/completions", chat)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None, backlog=4096)
'''


def rss_mb(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def wait_http(url: str) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as s:
        for _ in range(100):
            try:
                async with s.get(url) as r:
                    if r.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


async def open_streams(n: int, key: str, gw_pid: int, hold: float) -> tuple[float, int]:
    """Open n streams; when every one has its first chunk, read the RSS; then read them to the end."""
    import aiohttp

    started = asyncio.Event()
    first = 0
    ok = 0
    body = {"model": "slow", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {key}"}
    conn = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=hold + 60)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
        async def one() -> None:
            nonlocal first, ok
            async with s.post(f"http://127.0.0.1:{GW_PORT}/v1/chat/completions", json=body, headers=headers) as r:
                assert r.status == 200, r.status
                got_first = False
                data = b""
                async for c in r.content.iter_any():
                    data += c
                    if not got_first:
                        got_first = True
                        first += 1
                        if first == n:
                            started.set()
                if data.rstrip().endswith(b"data: [DONE]"):
                    ok += 1

        tasks = [asyncio.create_task(one()) for _ in range(n)]
        await asyncio.wait_for(started.wait(), hold)
        await asyncio.sleep(0.5)
        rss = rss_mb(gw_pid)
        await asyncio.gather(*tasks)
    return rss, ok


async def many_requests(n: int, key: str, conc: int = 32) -> int:
    import aiohttp

    body = json.dumps({"model": "fast", "messages": [{"role": "user", "content": "hi"}]}).encode()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    left = n
    ok = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        async def worker() -> None:
            nonlocal left, ok
            while left > 0:
                left -= 1
                async with s.post(f"http://127.0.0.1:{GW_PORT}/v1/chat/completions", data=body, headers=headers) as r:
                    await r.read()
                    ok += r.status == 200

        await asyncio.gather(*(worker() for _ in range(conc)))
    return ok


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=50000)
    ap.add_argument("--hold", type=float, default=15.0, help="seconds each slow stream stays open")
    ap.add_argument("--venv", default=str(pathlib.Path(__file__).resolve().parent.parent / ".venv"))
    a = ap.parse_args()
    py = str(pathlib.Path(a.venv) / "bin" / "python")
    work = pathlib.Path(tempfile.mkdtemp(prefix="cheapproxy-mem."))
    cfg = work / "cheapproxy.toml"
    cfg.write_text(textwrap.dedent(f"""\
        [server]
        database = "sqlite:///bench.db"
        log_format = "json"
        demo = false
        max_in_flight = 100000
        max_in_flight_per_key = 100000
        first_user = "bench-admin"

        [[upstreams]]
        name = "slow"
        provider = "openai"
        base_url = "http://127.0.0.1:{UP_PORT}/v1"
        api_key = "sk-dummy-upstream"
        max_connections = 4096

        [[models]]
        name = "slow"
        upstream = "slow"
        [models.price]
        input = 1.00
        output = 2.00

        [[models]]
        name = "fast"
        upstream = "slow"
        [models.price]
        input = 1.00
        output = 2.00
        """))
    cp = [py, "-m", "cheapproxy", "--config", str(cfg)]
    subprocess.run([*cp, "users", "add", "bench", "--balance", "1000000", "--json"], check=True, capture_output=True)
    key = json.loads(subprocess.run([*cp, "keys", "create", "bench", "--json"], check=True, capture_output=True).stdout)["key"]
    (work / "upstream.py").write_text(UPSTREAM)
    up = subprocess.Popen(["taskset", "-c", "1", py, str(work / "upstream.py"), str(UP_PORT), str(a.hold)])
    log = open(work / "gateway.log", "wb")
    gw = subprocess.Popen(["taskset", "-c", "0", *cp, "serve", "--port", str(GW_PORT)], stderr=log, stdout=log)
    failed = False
    try:
        asyncio.run(wait_http(f"http://127.0.0.1:{GW_PORT}/health"))
        asyncio.run(wait_http(f"http://127.0.0.1:{UP_PORT}/"))
        time.sleep(1.0)
        idle = rss_mb(gw.pid)
        t0 = time.monotonic()
        open_rss, streams_ok = asyncio.run(open_streams(a.streams, key, gw.pid, a.hold))
        t_streams = time.monotonic() - t0
        after_streams = rss_mb(gw.pid)
        warm = min(10000, a.requests // 5)
        ok = asyncio.run(many_requests(warm, key))
        rss_warm = rss_mb(gw.pid)
        t0 = time.monotonic()
        ok += asyncio.run(many_requests(a.requests - warm, key))
        t_req = time.monotonic() - t0
        rss_end = rss_mb(gw.pid)
    finally:
        gw.terminate()
        gw.wait(60)
        up.terminate()
        up.wait(10)
    db = sqlite3.connect(work / "bench.db")
    rows = dict(db.execute("SELECT status, count(*) FROM usage GROUP BY status").fetchall())
    charges = db.execute("SELECT count(*) FROM ledger WHERE kind='charge'").fetchone()[0]
    dupes = db.execute("SELECT count(*) FROM (SELECT reference FROM ledger WHERE kind='charge' "
                       "GROUP BY reference HAVING count(*) > 1)").fetchone()[0]
    open_holds = db.execute("SELECT count(*) FROM holds WHERE state='open'").fetchone()[0]
    open_holds += db.execute("SELECT count(*) FROM charge_queue").fetchone()[0]  # a clean stop empties it
    total = a.streams + a.requests
    growth = (rss_end - rss_warm) / rss_warm * 100
    print(f"machine: {os.cpu_count()} cores; python {sys.version.split()[0]}; state in {work}")
    print("| measurement | value | target |")
    print("|---|--:|--:|")
    print(f"| idle RSS | {idle:.1f} MB | < 80 MB |")
    print(f"| RSS with {a.streams} open streams | {open_rss:.1f} MB (+{open_rss - idle:.1f} MB) | + < 100 MB |")
    print(f"| streams completed with [DONE] | {streams_ok}/{a.streams} ({t_streams:.1f} s) | all |")
    print(f"| RSS after {warm} warm-up requests | {rss_warm:.1f} MB | |")
    print(f"| RSS after {a.requests} requests | {rss_end:.1f} MB ({growth:+.1f} %, {a.requests - warm} requests in {t_req:.1f} s) | within 5 % |")
    print(f"| requests answered 200 | {ok}/{a.requests} | all |")
    print(f"charge check: usage rows {rows}; charge rows {charges} (expected {total}); duplicates {dupes}; open holds + queued charges {open_holds}")
    failed = (streams_ok != a.streams or ok != a.requests or rows.get("ok") != total or charges != total
              or dupes or open_holds)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
