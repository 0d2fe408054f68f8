"""Verify latency against generation: the reason the verifier exists.

For N = 1, 4 and 16 drafted tokens, time one verify round on a warm cache
(the context is cached; the last accepted token plus N drafts are new) on the
verifier in fast and strict mode, against stock llama-server generating N
tokens from the same cached context. Prints a table; run with
``make bench-verifier``. Figures are wall-clock medians on this machine.
"""

from __future__ import annotations

import statistics
import sys
import time

import httpx
from servers import llama_server, verifier

from tightwad import models

TARGET = "qwen2.5-coder-1.5b-instruct-q4_k_m"
PROMPT = "Write a Python function that parses an ISO 8601 date and explain each step."
REPEATS = 5


def timed(fn) -> float:  # noqa: ANN001
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> int:
    model = models.fetch(TARGET)
    print(f"model: {model.name}; {REPEATS} repeats, median wall time per call", file=sys.stderr)
    fast = verifier(model, "--parallel", "1").start()
    strict = verifier(model, "--parallel", "1", "--strict").start()
    stock = llama_server(model, "--parallel", "1").start()
    try:
        text = httpx.post(f"{fast.url}/apply-template",
                          json={"messages": [{"role": "user", "content": PROMPT}]}).json()["prompt"]
        prompt = httpx.post(f"{fast.url}/tokenize", json={"content": text}).json()["tokens"]
        gen = httpx.post(f"{fast.url}/v1/tightwad/generate",
                         json={"tokens": prompt, "max_tokens": 40, "stop_at_eog": False}, timeout=300).json()["tokens"]
        rows = []
        for n in (1, 4, 16):
            context, draft = prompt + gen[:8], gen[8:8 + n]
            results = {}
            for name, server in (("fast", fast), ("strict", strict)):
                session = f"bench-{name}-{n}"
                # Warm the cache with the context, then time rounds that add N+1 new tokens.
                httpx.post(f"{server.url}/v1/tightwad/verify",
                           json={"tokens": context[:-1], "draft": [], "session": session}, timeout=300)
                samples = []
                for _ in range(REPEATS):
                    body = {"tokens": context, "draft": draft, "session": session, "n_prompt": len(prompt)}
                    samples.append(timed(lambda b=body, s=server: httpx.post(
                        f"{s.url}/v1/tightwad/verify", json=b, timeout=300).raise_for_status()))
                    # Roll the cache back so each repeat evaluates the same N+1 tokens.
                    httpx.post(f"{server.url}/v1/tightwad/verify",
                               json={"tokens": context[:-1], "draft": [], "session": session,
                                     "n_prompt": len(prompt)}, timeout=300)
                results[name] = statistics.median(samples)
            samples = []
            for _ in range(REPEATS):
                body = {"prompt": context, "n_predict": n, "cache_prompt": True, "temperature": 0,
                        "id_slot": 0}
                samples.append(timed(lambda b=body: httpx.post(
                    f"{stock.url}/completion", json=b, timeout=300).raise_for_status()))
            results["llama-server"] = statistics.median(samples)
            rows.append((n, results))
        print(f"\n{'drafted N':>10} | {'verify fast':>12} | {'verify strict':>13} | {'llama-server gen N':>18} | {'fast speed-up':>13}")
        print("-" * 80)
        for n, r in rows:
            print(f"{n:>10} | {r['fast'] * 1000:>9.1f} ms | {r['strict'] * 1000:>10.1f} ms | "
                  f"{r['llama-server'] * 1000:>15.1f} ms | {r['llama-server'] / r['fast']:>12.2f}x")
    finally:
        for server in (fast, strict, stock):
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
