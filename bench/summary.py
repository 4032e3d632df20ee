#!/usr/bin/env python3
"""The medians of one or more rounds of bench/run.sh, as one Markdown table.

    python bench/summary.py OUT_BASE        # OUT_BASE/round-N/results-MODE/results.jsonl

Per row (mode, api, streamed or not, concurrency): each target's median req/s
over the rounds, and cheapproxy's ("custom") ratio to each other target taken
within each round (targets of one round ran minutes apart on the same
machine), then the median of those ratios with their range.  Then the added
latency at one connection: cheapproxy's p50 minus nginx's own ("direct") for
the non-streamed rows, and its added time to the first byte against the bare
proxy's for the streamed ones.  A row marked (!) had a run that the harness
still found disturbed by other processes after its retries.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

CP = "custom"
NAMES = {"custom": "cheapproxy", "litellm-w1": "LiteLLM w1", "portkey": "Portkey"}
API = {"openai": "OpenAI", "anthropic": "Anthropic"}
CROSS = {"openai": "OpenAI client / Anthropic upstream", "anthropic": "Anthropic client / OpenAI upstream"}


def load(path: Path) -> dict[tuple, dict]:
    """The records of one results.jsonl; of a run repeated after interference,
    the least disturbed attempt (as the harness's report.py)."""
    best: dict[tuple, dict] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        k = (r["target"], r["api"], r["mode"], r["conc"])
        if k not in best or (r.get("other_cpu_pct") or 0) < (best[k].get("other_cpu_pct") or 0):
            best[k] = r
    return best


def label(setup: str, api: str, mode: str, conc: int) -> str:
    kind = "stream" if mode == "sse" else "non-stream"
    if setup == "translated":
        return f"translated {kind}, {CROSS[api]} {conc}"
    return f"{API.get(api, api)} {kind} {conc}"


def med(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def fmt(v: float | None, nd: int = 0) -> str:
    return "" if v is None else f"{v:,.{nd}f}"


def spread(values: list[float], nd: int = 2) -> str:
    if not values:
        return ""
    m = fmt(med(values), nd)
    return m if len(values) == 1 else f"{m} ({min(values):.{nd}f}–{max(values):.{nd}f})"


def same_round(by: dict[str, dict[str, dict]], *targets: str) -> list[tuple[dict, ...]]:
    """The records of ``targets``, one tuple per round that measured all of them."""
    rounds = set.intersection(*(set(by.get(t, {})) for t in targets))
    return [tuple(by[t][rd] for t in targets) for rd in sorted(rounds)]


def main() -> None:
    base = Path(sys.argv[1])
    rounds = sorted(base.glob("round-*"), key=lambda p: int(p.name.split("-")[1]))
    if not rounds:
        sys.exit(f"no round-*/ under {base}")
    # (setup, api, mode, conc) -> target -> round -> record
    rows: dict[tuple, dict[str, dict[str, dict]]] = {}
    targets: list[str] = []
    for rd in rounds:
        for res in sorted(rd.glob("results-*/results.jsonl")):
            setup = res.parent.name.removeprefix("results-")
            for (target, api, mode, conc), r in load(res).items():
                if r.get("rc") not in (0, None) or r.get("failed"):
                    continue
                rows.setdefault((setup, api, mode, conc), {}).setdefault(target, {})[rd.name] = r
                if target not in targets:
                    targets.append(target)
    shown = [t for t in targets if t != "direct"]
    others = [t for t in shown if t != CP]
    print(f"{len(rounds)} round(s) under {base}; req/s are medians over the rounds, ratios the median "
          "(and range) of cheapproxy's ratio within each round\n")
    head = ["measurement", *[NAMES.get(t, t) for t in shown], *[f"cp/{NAMES.get(t, t)}" for t in others],
            "cp p99 ms", "bare p99 ms"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" + "--:|" * (len(head) - 1))
    order = {"same": 0, "translated": 1}
    for key in sorted(rows, key=lambda k: (order.get(k[0], 9), k[1], k[2] == "sse", k[3])):
        by = rows[key]
        bad = any(r.get("interference") for recs in by.values() for r in recs.values())
        cells = [label(*key) + (" (!)" if bad else "")]
        cells += [fmt(med([r["rps"] for r in by.get(t, {}).values()])) for t in shown]
        for t in others:
            # a ratio only between runs of the same round
            cells.append(spread([a["rps"] / b["rps"] for a, b in same_round(by, CP, t) if b["rps"]]))
        cells.append(fmt(med([r["lat_p99_ms"] for r in by.get(CP, {}).values()]), 2))
        cells.append(fmt(med([r["lat_p99_ms"] for r in by.get("bare", {}).values()]), 2))
        print("| " + " | ".join(cells) + " |")
    print()
    for key, by in sorted(rows.items()):
        setup, api, mode, conc = key
        if conc != 1 or CP not in by or "direct" not in by:
            continue
        if mode == "json":
            added = [a["lat_p50_ms"] - d["lat_p50_ms"] for a, d in same_round(by, CP, "direct")]
            print(f"- {label(*key)}: added p50 {spread(added)} ms over direct")
        else:
            added = [a["ttfb_p50_ms"] - d["ttfb_p50_ms"] for a, d in same_round(by, CP, "direct")]
            vs = [(a["ttfb_p50_ms"] - d["ttfb_p50_ms"]) / (b["ttfb_p50_ms"] - d["ttfb_p50_ms"])
                  for a, b, d in same_round(by, CP, "bare", "direct") if b["ttfb_p50_ms"] > d["ttfb_p50_ms"]]
            print(f"- {label(*key)}: added TTFB p50 {spread(added)} ms over direct, {spread(vs)}× the bare proxy's")


if __name__ == "__main__":
    main()
