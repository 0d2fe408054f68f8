"""The benchmark's client: sends one configuration's prompts and times them.

It runs wherever the client of the measured system sits (in the emulated network,
inside the proxy's namespace), so it is also a small program:

    python -m tightwad.suite.client JOB.json RESULT.json

``JOB.json`` is ``{"kind": ..., "url": ..., "prompts": [[token ids], ...],
"max_tokens": N}``; the result lists one ``Run`` per prompt (as JSON), plus the
proxy's ``/v1/tightwad/status`` after the runs for kind ``proxy``. Every figure
comes from what the servers returned; nothing is estimated.

Kinds: ``proxy`` (``/v1/completions`` with the prompt as token ids),
``verifier`` (the target alone: ``/v1/tightwad/generate``), ``llama-server``
(``/completion``: stock llama-server alone, or its own speculative decoding).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import httpx

TIMEOUT_S = 1800.0


@dataclasses.dataclass
class Run:
    tokens: list[int]
    seconds: float
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0


def run_prompt(http: httpx.Client, kind: str, url: str, prompt: Sequence[int], max_tokens: int,
               eog: frozenset[int] = frozenset()) -> Run:
    started = time.perf_counter()
    if kind == "proxy":
        r = http.post(f"{url}/v1/completions", json={
            "prompt": list(prompt), "max_tokens": max_tokens, "temperature": 0, "return_tokens": True,
        })
        r.raise_for_status()
        tw = r.json()["tightwad"]
        return Run(tw["tokens"], time.perf_counter() - started, tw["drafted"], tw["accepted"], tw["rounds"])
    if kind == "verifier":
        r = http.post(f"{url}/v1/tightwad/generate", json={"tokens": list(prompt), "max_tokens": max_tokens})
        r.raise_for_status()
        tokens = [t for t in r.json()["tokens"] if t not in eog]
        return Run(tokens, time.perf_counter() - started, rounds=len(r.json()["tokens"]))
    if kind == "llama-server":
        r = http.post(f"{url}/completion", json={
            "prompt": list(prompt), "n_predict": max_tokens, "temperature": 0, "top_k": 1,
            "cache_prompt": False, "return_tokens": True, "samplers": ["top_k"],
        })
        r.raise_for_status()
        body = r.json()
        timings = body.get("timings", {})
        tokens = [t for t in body["tokens"] if t not in eog]
        return Run(tokens, time.perf_counter() - started, timings.get("draft_n", 0),
                   timings.get("draft_n_accepted", 0))
    raise ValueError(f"unknown client kind {kind!r}")


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    kind, url, eog = job["kind"], job["url"], frozenset(job.get("eog", ()))
    with httpx.Client(timeout=TIMEOUT_S) as http:
        if job.get("warmup", True):
            # One short request first, so that loading and first-touch costs stay out.
            run_prompt(http, kind, url, job["prompts"][0], 4, eog)
            if kind == "proxy":
                before = http.get(f"{url}/v1/tightwad/status").json()
        runs = [run_prompt(http, kind, url, p, job["max_tokens"], eog) for p in job["prompts"]]
        result: dict[str, Any] = {"runs": [dataclasses.asdict(r) for r in runs]}
        if kind == "proxy":
            (after,) = http.get(f"{url}/v1/tightwad/status").json()["models"].values()
            if job.get("warmup", True):
                (prior,) = before["models"].values()
                after["_warmup"] = {k: prior.get(k) for k in (
                    "draft_seconds_total", "draft_wait_seconds_total", "verify_seconds_total",
                    "round_seconds_total", "rounds")}
            result["status"] = after
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m tightwad.suite.client JOB.json RESULT.json", file=sys.stderr)
        return 2
    with open(args[0]) as f:
        job = json.load(f)
    result = run_job(job)
    with open(args[1], "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
