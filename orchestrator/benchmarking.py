"""benchmark(): the running coordinator's prompt and generation tok/s, one row per prompt."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import httpx

from tightwad.orchestrator import containers as ct
from tightwad.orchestrator.base import OrchestratorBase, Progress, quiet
from tightwad.orchestrator.errors import OrchestratorError
from tightwad.orchestrator.health import http_healthy


class Benchmarking(OrchestratorBase):
    """benchmark(): the running coordinator's tok/s."""

    def benchmark(self, *, max_tokens: int = 64, prompts: Sequence[str] | None = None,
                  progress: Progress = quiet) -> list[dict[str, Any]]:
        """Prompt and generation tok/s of the running coordinator, one row per prompt."""
        running = [c for c in self._coordinator_containers() if c.running]
        if not running:
            raise OrchestratorError("no coordinator is running; `tightwad start` first")
        c = running[0]
        url = self.coordinator_url(c)
        if url is None or not http_healthy(url):
            raise OrchestratorError(f"the coordinator {c.name} is not healthy")
        kind = c.labels.get(ct.LABEL_KIND, "llama-server")
        rows = []
        with httpx.Client(base_url=url, timeout=600) as client:
            for i, prompt in enumerate(prompts or BENCH_PROMPTS):
                progress(f"→ prompt {i + 1}: {prompt[:50]!r}")
                rows.append(_bench_one(client, kind, prompt, max_tokens, c.labels.get(ct.LABEL_MODEL, "?")))
        return rows


BENCH_PROMPTS = (
    "Write a Python function that checks whether a number is prime.",
    "Explain in three sentences why the sky is blue.",
    "List five uses of a hash map, one line each, with a short example for every one of them, "
    "and say which operation each use relies on most.",
)


def _bench_one(client: httpx.Client, kind: str, prompt: str, max_tokens: int,
               model: str) -> dict[str, Any]:
    if kind == "llama-server":
        started = time.monotonic()
        r = client.post("/completion", json={"prompt": prompt, "n_predict": max_tokens,
                                             "temperature": 0, "cache_prompt": False})
        r.raise_for_status()
        t = r.json().get("timings", {})
        return {"model": model, "prompt_tokens": int(t.get("prompt_n", 0)),
                "prompt_tps": float(t.get("prompt_per_second", 0.0)),
                "generated_tokens": int(t.get("predicted_n", 0)),
                "generation_tps": float(t.get("predicted_per_second", 0.0)),
                "seconds": time.monotonic() - started}
    started = time.monotonic()
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens,
                                             "temperature": 0})
    r.raise_for_status()
    elapsed = time.monotonic() - started
    usage = r.json().get("usage", {})
    generated = int(usage.get("completion_tokens", 0))
    return {"model": model, "prompt_tokens": int(usage.get("prompt_tokens", 0)), "prompt_tps": None,
            "generated_tokens": generated, "generation_tps": generated / elapsed if elapsed else 0.0,
            "seconds": elapsed}
