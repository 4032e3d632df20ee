"""Write the benchmark config for a mode (same | translated) to stdout.

The shared harness sends `gpt-bench` / `claude-bench` to JSON endpoints and
`gpt-bench-stream` / `claude-bench-stream` to streaming ones; nginx on
127.0.0.1:18080 answers OpenAI and Anthropic bodies under /v1 (JSON) and
/stream/v1 (SSE).
"""

import sys
import textwrap

mode = sys.argv[1] if len(sys.argv) > 1 else "same"
UP = "http://127.0.0.1:18080"
# which upstream serves which benchmark model in each mode
routes = {
    "same": {"gpt-bench": "oa-json", "gpt-bench-stream": "oa-sse", "claude-bench": "an-json", "claude-bench-stream": "an-sse"},
    "translated": {"gpt-bench": "an-json", "gpt-bench-stream": "an-sse", "claude-bench": "oa-json", "claude-bench-stream": "oa-sse"},
}[mode]
print(textwrap.dedent(f"""\
    [server]
    database = "sqlite:///bench.db"
    log_format = "json"
    demo = false
    max_in_flight = 100000
    max_in_flight_per_key = 100000
    first_user = "bench-admin"

    [[upstreams]]
    name = "oa-json"
    provider = "openai"
    base_url = "{UP}/v1"
    api_key = "sk-dummy-upstream"

    [[upstreams]]
    name = "oa-sse"
    provider = "openai"
    base_url = "{UP}/stream/v1"
    api_key = "sk-dummy-upstream"

    [[upstreams]]
    name = "an-json"
    provider = "anthropic"
    base_url = "{UP}"
    api_key = "sk-ant-dummy-upstream"

    [[upstreams]]
    name = "an-sse"
    provider = "anthropic"
    base_url = "{UP}/stream"
    api_key = "sk-ant-dummy-upstream"
"""))
for name, up in routes.items():
    print(textwrap.dedent(f"""\
        [[models]]
        name = "{name}"
        upstream = "{up}"
        max_output_tokens = 1024
        [models.price]
        input = 1.00
        output = 2.00
    """))
