"""``tightwad benchmark --proxy``: the same prompts through the target alone and the proxy.

Prints a side-by-side table per prompt type: output tok/s, acceptance,
tokens per round, speed-up, and the divergence rate (prompts whose greedy
output differs from the target alone's). With ``--llama-spec``, the same
prompts also go through llama-server's own speculative decoding
(``-md DRAFT --spec-type draft-simple``), started here from the given models,
as a reference. Every figure is measured; nothing is estimated.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections import defaultdict
from pathlib import Path

import httpx

from tightwad import llamacpp
from tightwad.config import Config
from tightwad.daemon import Daemon

PROMPTS: dict[str, list[str]] = {
    "code": [
        "Write a Python function that returns the n-th Fibonacci number iteratively.",
        "Write a JavaScript function that debounces another function.",
        "Write a SQL query that lists the ten customers with the highest total order value.",
    ],
    "math": [
        "What is 37 multiplied by 43? Show your working step by step.",
        "Solve for x: 3x + 7 = 22. Explain each step.",
    ],
    "factual": [
        "Explain how a hash table handles collisions.",
        "What is the difference between TCP and UDP?",
    ],
    "list": [
        "List ten common Linux commands with a one-line description each.",
        "List the planets of the solar system in order from the Sun.",
    ],
    "creative": [
        "Write a short poem about a lighthouse keeper.",
        "Write the opening paragraph of a mystery story set in a library.",
    ],
}


@dataclasses.dataclass
class Run:
    kind: str
    tokens: list[int]
    seconds: float
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _chat_tokens(target_url: str, prompt: str) -> list[int]:
    text = httpx.post(f"{target_url}/apply-template",
                      json={"messages": [{"role": "user", "content": prompt}]}, timeout=60).json()["prompt"]
    return httpx.post(f"{target_url}/tokenize", json={"content": text, "add_special": False},
                      timeout=60).json()["tokens"]


def _target_alone(target_url: str, tokens: list[int], max_tokens: int, eog: set[int]) -> Run:
    start = time.perf_counter()
    r = httpx.post(f"{target_url}/v1/tightwad/generate",
                   json={"tokens": tokens, "max_tokens": max_tokens}, timeout=900)
    r.raise_for_status()
    out = [t for t in r.json()["tokens"] if t not in eog]
    return Run("target", out, time.perf_counter() - start)


def _proxy(proxy_url: str, prompt: str, max_tokens: int, headers: dict[str, str]) -> Run:
    start = time.perf_counter()
    r = httpx.post(f"{proxy_url}/v1/chat/completions", headers=headers, timeout=900, json={
        "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
        "temperature": 0, "return_tokens": True,
    })
    r.raise_for_status()
    tw = r.json()["tightwad"]
    return Run("proxy", tw["tokens"], time.perf_counter() - start, tw["drafted"], tw["accepted"], tw["rounds"])


def _llama_spec(url: str, tokens: list[int], max_tokens: int, eog: set[int]) -> Run:
    start = time.perf_counter()
    r = httpx.post(f"{url}/completion", timeout=900, json={
        "prompt": tokens, "n_predict": max_tokens, "temperature": 0, "cache_prompt": False,
        "return_tokens": True,
    })
    r.raise_for_status()
    body = r.json()
    timings = body.get("timings", {})
    out = [t for t in body["tokens"] if t not in eog]
    return Run("llama-spec", out, time.perf_counter() - start,
               timings.get("draft_n", 0), timings.get("draft_n_accepted", 0))


def start_llama_spec(draft: Path, target: Path, n_max: int, port: int, run_dir: Path) -> Daemon:
    daemon = Daemon(
        f"llama-spec-{port}",
        [str(llamacpp.binary("llama-server")), "-m", str(target), "-md", str(draft),
         "--spec-type", "draft-simple", "--spec-draft-n-max", str(n_max), "--host", "127.0.0.1",
         "--port", str(port), "-c", "4096", "--parallel", "1", "--no-webui"],
        f"http://127.0.0.1:{port}/health", run_dir,
    )
    daemon.start(log=_log)
    return daemon


def run(config: Config, *, max_tokens: int, llama_spec: tuple[Path, Path] | None, spec_n_max: int,
        run_dir: Path, port: int) -> int:
    proxy_cfg = config.require_proxy("tightwad benchmark --proxy")
    if proxy_cfg.target.backend != "verifier":
        _log("error: the benchmark's target-alone runs need a verifier target")
        return 2
    host = "127.0.0.1" if proxy_cfg.host in ("0.0.0.0", "::") else proxy_cfg.host
    proxy_url = f"http://{host}:{proxy_cfg.port}"
    headers = {"Authorization": f"Bearer {proxy_cfg.api_key}"} if proxy_cfg.api_key else {}
    target_url = proxy_cfg.target.url
    info = httpx.get(f"{target_url}/v1/tightwad/info", timeout=30).json()
    eog = set(info["eog_token_ids"])
    spec = start_llama_spec(*llama_spec, spec_n_max, port, run_dir) if llama_spec else None
    results: dict[str, dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    diverged: dict[str, int] = defaultdict(int)
    total = sum(len(v) for v in PROMPTS.values())
    done = 0
    try:
        for kind, prompts in PROMPTS.items():
            for prompt in prompts:
                done += 1
                _log(f"[{done}/{total}] {kind}: {prompt[:60]}")
                tokens = _chat_tokens(target_url, prompt)
                alone = _target_alone(target_url, tokens, max_tokens, eog)
                results[kind]["target"].append(alone)
                via = _proxy(proxy_url, prompt, max_tokens, headers)
                results[kind]["proxy"].append(via)
                diverged["proxy"] += via.tokens != alone.tokens
                if spec is not None:
                    ref = _llama_spec(f"http://127.0.0.1:{port}", tokens, max_tokens, eog)
                    results[kind]["llama-spec"].append(ref)
                    diverged["llama-spec"] += ref.tokens != alone.tokens
    finally:
        if spec is not None:
            spec.stop()
    _print_table(results, diverged, total, info.get("mode"))
    return 0


def _rate(runs: list[Run]) -> float:
    toks, secs = sum(len(r.tokens) for r in runs), sum(r.seconds for r in runs)
    return toks / secs if secs else 0.0


def _print_table(results, diverged, total: int, mode: str | None) -> None:  # noqa: ANN001
    kinds = ["proxy", "llama-spec"] if any("llama-spec" in v for v in results.values()) else ["proxy"]
    print(f"\nverifier mode: {mode}; greedy; tok/s = output tokens / wall time per request")
    header = f"{'prompts':10} {'target tok/s':>12} |"
    for k in kinds:
        header += f" {k + ' tok/s':>16} {'accept':>7} {'tok/round':>9} {'speed-up':>8} |"
    print(header)
    print("-" * len(header))
    all_runs: dict[str, list[Run]] = defaultdict(list)
    for kind, by in [*results.items(), ("all", None)]:
        if by is None:
            by = all_runs
        else:
            for k, v in by.items():
                all_runs[k].extend(v)
        base = _rate(by["target"])
        row = f"{kind:10} {base:>12.2f} |"
        for k in kinds:
            runs = by.get(k, [])
            drafted = sum(r.drafted for r in runs)
            acc = sum(r.accepted for r in runs) / drafted if drafted else float("nan")
            rounds = sum(r.rounds for r in runs)
            tpr = sum(len(r.tokens) for r in runs) / rounds if rounds else float("nan")
            rate = _rate(runs)
            row += f" {rate:>16.2f} {acc:>7.1%} {tpr:>9.2f} {rate / base if base else 0:>7.2f}x |"
        print(row)
    for k in kinds:
        print(f"divergence from the target alone, {k}: {diverged[k]}/{total} prompts")
