"""The JSON log line: request id from the pipeline's context, secrets
redacted, one line per event, rendered as bytes."""

import json
import subprocess
import sys

SCRIPT = r"""
import structlog
from cheapproxy.logging import REQUEST_ID, add_secret, configure
configure("info", "json")
add_secret("upstream-secret-123456")
log = structlog.get_logger("t")
token = REQUEST_ID.set("req_abc")
log.info("request.finished", model="m1", error="upstream said sk-abcdefghijklmnop and upstream-secret-123456",
         api_key="cp-shouldneverappear", status=200)
REQUEST_ID.reset(token)
log.warning("after", detail="AIzaSyA-0123456789abcdefghijklmn")
log.debug("hidden")
"""


def test_json_lines_carry_request_id_and_no_secret():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, check=True)
    lines = out.stderr.decode().splitlines()
    assert len(lines) == 2  # debug is filtered at level info
    first, second = (json.loads(line) for line in lines)
    assert first["event"] == "request.finished" and first["request_id"] == "req_abc"
    assert first["level"] == "info" and first["model"] == "m1" and first["status"] == 200
    assert first["api_key"] == "[redacted]"
    assert first["error"] == "upstream said [redacted] and [redacted]"
    assert "request_id" not in second  # the context var was reset
    assert second["detail"] == "[redacted]" and second["timestamp"].endswith("Z")
    for secret in (b"sk-abcdefghijklmnop", b"upstream-secret-123456", b"cp-shouldneverappear", b"AIzaSyA"):
        assert secret not in out.stderr


LOOP_SCRIPT = r"""
import asyncio, os, structlog
from cheapproxy.logging import configure
configure("info", "json")
log = structlog.get_logger("t")

async def main():
    log.info("one")
    log.info("two")
    os.write(2, b"MARK\n")  # written before the two lines: they leave together at the end of the iteration
    await asyncio.sleep(0)
    log.info("three")
    log.warning("four")  # warnings are written at once, after what was pending
    os.write(2, b"MARK2\n")
    log.info("five")  # pending when the loop ends: written at exit

asyncio.run(main())
"""


def test_lines_of_one_loop_iteration_leave_together_and_none_is_lost():
    out = subprocess.run([sys.executable, "-c", LOOP_SCRIPT], capture_output=True, check=True)
    lines = out.stderr.decode().splitlines()
    events = [json.loads(x)["event"] if x.startswith("{") else x for x in lines]
    assert events == ["MARK", "one", "two", "three", "four", "MARK2", "five"]


FAST_SCRIPT = r"""
import structlog
from cheapproxy.logging import add_secret, configure, info_line
configure("info", "json")
add_secret("upstream-secret-123456")
assert info_line("request.finished", {"request_id": "req_1", "model": "m", "status": 200,
                                      "error": "boom upstream-secret-123456 sk-abcdefghijklmnop", "api_key": "x"})
structlog.get_logger("t").info("request.finished", request_id="req_1", model="m", status=200,
                               error="boom upstream-secret-123456 sk-abcdefghijklmnop", api_key="x")
configure("warning", "json")
assert not info_line("request.finished", {"request_id": "req_2"})  # below the level: the caller decides
"""


def test_direct_request_line_matches_the_structlog_line():
    out = subprocess.run([sys.executable, "-c", FAST_SCRIPT], capture_output=True, check=True)
    fast, slow = (json.loads(line) for line in out.stderr.decode().splitlines())
    fast.pop("timestamp")
    stamp = slow.pop("timestamp")
    assert stamp.endswith("Z") and fast == slow
    assert fast["error"] == "boom [redacted] [redacted]" and fast["api_key"] == "[redacted]"
