"""The proxy's own cost, measured against real servers on loopback.

``measure_proxy_cost`` starts a llama-server drafter, a strict verifier and the
proxy as background processes (logs under ``out_dir/logs``) and measures three
things the speculation figures elsewhere do not show:

* CPU per round: what the proxy's event-loop thread spends on one round, as the
  proxy itself counts it (``time.thread_time``), over sequential requests on a
  fresh proxy, so no other request's work lands in a round; beside it, what a
  bare client making the same two calls with the same waits is charged
  (``tightwad.suite.bare_client``), the part that is this machine's, not the proxy's.
* Concurrent streams: many greedy SSE streams at once, each compared token for
  token with the target alone (the verifier's own generation); strict mode
  promises equality, and concurrency is where a shared-state bug would show.
* Memory: the proxy's RSS sampled over many short requests, so a leak (a cache
  or a per-request record that is never dropped) shows as steady growth.

Every figure comes from the servers' answers or from /proc; nothing is estimated.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tightwad import llamacpp
from tightwad.daemon import Daemon, python_argv
from tightwad.suite.bare_client import bare_client_cpu_ms

CPU_REQUESTS = 20
CPU_GOAL_MS = 1.0  # p50 of the proxy's CPU per round
STREAM_MAX_TOKENS = 32
MEMORY_MAX_TOKENS = 8
MEMORY_CONCURRENCY = 16
FLAT_MIB = 5.0  # growth after warm-up below this counts as flat
TIMEOUT_S = 600.0
# Short prompts plus 32 tokens fit easily; a small context keeps 64 verifier slots
# (one KV cache each) at a couple of hundred MiB.
VERIFIER_CTX = 512
DRAFT_CTX_PER_SLOT = 1024  # llama-server divides -c among its slots


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 2)
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _daemons(draft_model: Path, target_model: Path, logs: Path, slots: int) -> tuple[list[Daemon], str, str]:
    """(draft, verifier, proxy) daemons, and the verifier's and the proxy's URLs."""
    # One thread each: the tiny models gain nothing from more, and on a small or busy
    # machine ggml's spinning worker threads, descheduled, make each decode many times
    # slower (measured: 2 threads 5-15x slower than 1 on a loaded 2-core VM), and they
    # would take CPU from the proxy, whose cost is what is measured.
    threads = "1"
    draft_port, target_port, proxy_port = _free_port(), _free_port(), _free_port()
    draft_url, target_url = f"http://127.0.0.1:{draft_port}", f"http://127.0.0.1:{target_port}"
    draft = Daemon("draft", [
        str(llamacpp.binary("llama-server")), "-m", str(draft_model), "--host", "127.0.0.1",
        "--port", str(draft_port), "-t", threads, "--parallel", str(slots),
        "-c", str(DRAFT_CTX_PER_SLOT * slots), "--no-webui", *llamacpp.DRAFT_SERVER_FLAGS,
    ], f"{draft_url}/health", logs)
    verifier = Daemon("verifier", python_argv(
        "verifier", "--model", str(target_model), "--host", "127.0.0.1", "--port", str(target_port),
        "--parallel", str(slots), "--ctx-size", str(VERIFIER_CTX), "--threads", threads, "--strict",
    ), f"{target_url}/health", logs)
    config = logs / "proxy.yaml"
    # Strict, fixed draft length and no pipelining: every round does the same work,
    # so the per-round CPU figure is comparable from run to run.
    config.write_text(f"""proxy:
  host: 127.0.0.1
  port: {proxy_port}
  mode: strict
  max_draft_tokens: 4
  pipeline_drafts: false
  draft_timeout_s: 60
  request_timeout_s: {TIMEOUT_S:g}
  draft:
    url: {draft_url}
    backend: llamacpp
  target:
    url: {target_url}
    backend: verifier
""")
    proxy_url = f"http://127.0.0.1:{proxy_port}"
    # Empty overrides count as unset: a TIGHTWAD_MODE or _PROXY_PORT in the caller's
    # environment must not change what is measured.
    proxy = Daemon("proxy", python_argv("-c", str(config), "proxy", "serve"), f"{proxy_url}/health", logs,
                   env={"TIGHTWAD_MODE": "", "TIGHTWAD_PROXY_PORT": "", "TIGHTWAD_API_KEY": ""})
    return [draft, verifier, proxy], target_url, proxy_url


def _model_status(http: httpx.Client, proxy_url: str) -> dict[str, Any]:
    r = http.get(f"{proxy_url}/v1/tightwad/status")
    r.raise_for_status()
    (model,) = r.json()["models"].values()
    return dict(model)


def _cpu_per_round(http: httpx.Client, proxy_url: str) -> dict[str, Any]:
    for i in range(CPU_REQUESTS):
        r = http.post(f"{proxy_url}/v1/completions", json={
            "prompt": f"Tell me about the number {i}.", "max_tokens": STREAM_MAX_TOKENS, "temperature": 0})
        r.raise_for_status()
    status = _model_status(http, proxy_url)
    cpu = status["proxy_cpu_ms_per_round"]
    waits = [status["draft_latency_ms"]["p50"], status["verify_latency_ms"]["p50"]]
    bare = bare_client_cpu_ms([w / 1000 for w in waits if w])
    return {"requests": CPU_REQUESTS, "rounds": status["rounds"], "p50_ms": cpu["p50"], "p95_ms": cpu["p95"],
            "goal_p50_ms": CPU_GOAL_MS, "meets_goal": cpu["p50"] is not None and cpu["p50"] < CPU_GOAL_MS,
            # For scale: the round's wall time outside draft and verify, and the two waits.
            "overhead_ms_per_round": status["proxy_overhead_ms_per_round"],
            "draft_latency_ms": status["draft_latency_ms"], "verify_latency_ms": status["verify_latency_ms"],
            # What the machine charges for the round's two calls alone, measured right after.
            "bare_client": bare, "p50_above_bare_client_ms": round(cpu["p50"] - bare["p50_ms"], 3)
            if cpu["p50"] is not None else None}


async def _reference(http: httpx.AsyncClient, target_url: str, prompt: str, eog: frozenset[int]) -> list[int]:
    """The target alone, with end-of-generation ids dropped as the proxy drops them."""
    ids = (await http.post(f"{target_url}/tokenize", json={"content": prompt, "add_special": True})).json()
    r = await http.post(f"{target_url}/v1/tightwad/generate",
                        json={"tokens": ids["tokens"], "max_tokens": STREAM_MAX_TOKENS})
    r.raise_for_status()
    return [t for t in r.json()["tokens"] if t not in eog]


async def _stream(http: httpx.AsyncClient, proxy_url: str, prompt: str) -> list[int] | str:
    """The stream's tokens, or what was wrong with it (HTTP or protocol)."""
    tokens: list[int] = []
    done = False
    try:
        async with http.stream("POST", f"{proxy_url}/v1/completions", json={
            "prompt": prompt, "max_tokens": STREAM_MAX_TOKENS, "temperature": 0, "stream": True,
            "return_tokens": True,
        }) as r:
            if r.status_code != 200:
                return f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if done:
                    return "data after [DONE]"
                payload = line[len("data: "):]
                if payload == "[DONE]":
                    done = True
                    continue
                chunk = json.loads(payload)
                if "error" in chunk:
                    return f"error event: {chunk['error']}"
                tokens.extend(chunk.get("tightwad", {}).get("tokens", []))
    except (httpx.HTTPError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return tokens if done else "stream ended without [DONE]"


async def _streams(proxy_url: str, target_url: str, n: int, log: Callable[[str], None]) -> dict[str, Any]:
    prompts = [f"Count from {i}:" for i in range(n)]
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    async with httpx.AsyncClient(timeout=TIMEOUT_S, limits=limits) as http:
        info = (await http.get(f"{target_url}/v1/tightwad/info")).json()
        eog = frozenset(info["eog_token_ids"])
        # The references first, so the streams' wall time is the proxy's alone.
        references = await asyncio.gather(*(_reference(http, target_url, p, eog) for p in prompts))
        log(f"  {n} target-alone references ready; starting {n} streams at once")
        started = time.perf_counter()
        outputs = await asyncio.gather(*(_stream(http, proxy_url, p) for p in prompts))
        wall = time.perf_counter() - started
    problems = [o for o in outputs if isinstance(o, str)]
    mismatched = [i for i, (o, ref) in enumerate(zip(outputs, references, strict=True))
                  if not isinstance(o, str) and o != ref]
    n_tokens = sum(len(o) for o in outputs if not isinstance(o, str))
    return {"streams": n, "errors": len(problems), "error_examples": problems[:3],
            "mismatches": len(mismatched), "mismatched_prompts": [prompts[i] for i in mismatched[:5]],
            "tokens": n_tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(n_tokens / wall, 1) if wall else None}


async def _memory(proxy_url: str, pid: int, requests: int, every: int,
                  log: Callable[[str], None]) -> dict[str, Any]:
    samples = [{"requests": 0, "rss_mib": _rss_mib(pid)}]
    counts = {"next": 0, "done": 0, "errors": 0}
    started = time.perf_counter()

    async def worker(http: httpx.AsyncClient) -> None:
        while counts["next"] < requests:
            i = counts["next"]
            counts["next"] += 1
            try:
                # A distinct prompt each time, so a cache keyed by prompt would grow.
                r = await http.post(f"{proxy_url}/v1/completions", json={
                    "prompt": f"Item {i}:", "max_tokens": MEMORY_MAX_TOKENS, "temperature": 0})
                ok = r.status_code == 200 and bool(r.json()["choices"])
            except (httpx.HTTPError, ValueError, KeyError):
                ok = False
            counts["errors"] += not ok
            counts["done"] += 1
            done = counts["done"]
            if done % every == 0 or done == requests:
                samples.append({"requests": done, "rss_mib": _rss_mib(pid)})
                rate = done / (time.perf_counter() - started)
                log(f"  {done}/{requests} requests, RSS {samples[-1]['rss_mib']} MiB, "
                    f"{counts['errors']} errors, {rate:.1f} req/s")

    limits = httpx.Limits(max_connections=MEMORY_CONCURRENCY, max_keepalive_connections=MEMORY_CONCURRENCY)
    async with httpx.AsyncClient(timeout=TIMEOUT_S, limits=limits) as http:
        await asyncio.gather(*(worker(http) for _ in range(MEMORY_CONCURRENCY)))
    seconds = time.perf_counter() - started
    # Growth is counted from the first sample after warm-up (imports, first-touch
    # buffers, the status windows filling) to the last.
    warm = [s for s in samples if s["requests"] >= every]
    growth = per_1000 = None
    if len(warm) >= 2 and warm[-1]["requests"] > warm[0]["requests"]:
        growth = round(warm[-1]["rss_mib"] - warm[0]["rss_mib"], 2)
        per_1000 = round(growth * 1000 / (warm[-1]["requests"] - warm[0]["requests"]), 3)
    return {"requests": requests, "concurrency": MEMORY_CONCURRENCY, "errors": counts["errors"],
            "seconds": round(seconds, 2), "requests_per_s": round(requests / seconds, 2),
            "samples": samples, "growth_mib": growth, "growth_mib_per_1000": per_1000,
            "flat_threshold_mib": FLAT_MIB, "flat": None if growth is None else growth < FLAT_MIB}


def _stop(daemon: Daemon, pid: int | None) -> None:
    daemon.stop()
    if pid is None:
        return
    # Daemon.stop does not reap; our own child would linger as a zombie until we exit.
    deadline = time.monotonic() + 5
    with contextlib.suppress(ChildProcessError):
        while time.monotonic() < deadline and os.waitpid(pid, os.WNOHANG) == (0, 0):
            time.sleep(0.05)


def measure_proxy_cost(*, draft_model: Path, target_model: Path, out_dir: Path, requests: int = 10_000,
                       streams: int = 64, log: Callable[[str], None], sample_every: int = 1000) -> dict:
    """Start draft, verifier and proxy, measure the proxy's cost, and stop them all.

    Returns ``{"cpu_per_round": ..., "streams": ..., "memory": ..., "fallbacks": ...,
    "pids": ..., "logs": ...}``; RSS is sampled every ``sample_every`` requests.
    """
    logs = Path(out_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    daemons, target_url, proxy_url = _daemons(Path(draft_model), Path(target_model), logs,
                                              max(streams, MEMORY_CONCURRENCY))
    pids: dict[str, int | None] = {d.name: None for d in daemons}
    try:
        for daemon in daemons:
            pids[daemon.name] = daemon.start(timeout=300, log=log)
        proxy_pid = pids["proxy"]
        assert proxy_pid is not None
        with httpx.Client(timeout=TIMEOUT_S) as http:
            log(f"CPU per round: {CPU_REQUESTS} sequential requests on a fresh proxy")
            cpu = _cpu_per_round(http, proxy_url)
            log(f"  p50 {cpu['p50_ms']} ms, p95 {cpu['p95_ms']} ms over {cpu['rounds']} rounds")
            log(f"{streams} concurrent streams")
            concurrent = asyncio.run(_streams(proxy_url, target_url, streams, log))
            log(f"  {concurrent['errors']} errors, {concurrent['mismatches']} mismatches, "
                f"{concurrent['tokens_per_s']} tok/s")
            log(f"Memory over {requests} requests")
            memory = asyncio.run(_memory(proxy_url, proxy_pid, requests, sample_every, log))
            fallbacks = _model_status(http, proxy_url)["fallbacks"]
    finally:
        # Also on Ctrl-C, and for a daemon whose start was interrupted (its pid file exists).
        for daemon in reversed(daemons):
            _stop(daemon, pids[daemon.name])
    return {"cpu_per_round": cpu, "streams": concurrent, "memory": memory, "fallbacks": fallbacks,
            "pids": pids, "logs": str(logs)}
