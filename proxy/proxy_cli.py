"""``tightwad proxy serve|start|stop|status``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx

from tightwad.config import Config, ProxyConfig
from tightwad.daemon import Daemon, DaemonError, python_argv

RUN_DIR = Path(os.environ.get("TIGHTWAD_RUN_DIR", "run"))


def _local_url(proxy: ProxyConfig) -> str:
    host = "127.0.0.1" if proxy.host in ("0.0.0.0", "::", "") else proxy.host
    return f"http://{host}:{proxy.port}"


def proxy_daemon(proxy: ProxyConfig, config_path: str | None) -> Daemon:
    args = ["-c", config_path] if config_path else []
    return Daemon("proxy", python_argv(*args, "proxy", "serve"), f"{_local_url(proxy)}/health", RUN_DIR)


def serve(config: Config) -> int:
    import uvicorn

    from tightwad.app import create_app

    proxy = config.require_proxy("tightwad proxy serve")
    print(f"tightwad proxy on http://{proxy.host}:{proxy.port}/v1 → target {proxy.target.url} "
          f"({proxy.target.backend}), drafters {', '.join(d.url for d in proxy.drafters)}",
          file=sys.stderr, flush=True)
    # One worker by design: the proxy mostly waits on its backends, and one
    # process keeps its metrics and totals exact without multiprocess mode.
    uvicorn.run(create_app(proxy), host=proxy.host, port=proxy.port, log_level="warning",
                timeout_graceful_shutdown=5)
    return 0


def _served_model(url: str, backend: str) -> str | None:
    """The model a server says it serves: Ollama's first tag, else the first ``/v1/models``
    id (llama-server reports the file's path: shown as its name, without ``.gguf``)."""
    try:
        if backend == "ollama":
            name = httpx.get(url + "/api/tags", timeout=5).json()["models"][0]["name"]
        else:
            name = httpx.get(url + "/v1/models", timeout=5).json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, LookupError, TypeError):
        return None
    if not isinstance(name, str):
        return None
    name = name.rstrip("/").rsplit("/", 1)[-1]
    return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name


def _check(role: str, name: str | None, url: str, backend: str) -> bool:
    try:
        ok = httpx.get(url + _health_path(backend), timeout=5).status_code == 200
    except httpx.HTTPError:
        ok = False
    if ok and name is None:
        name = _served_model(url, backend)
    where = url.split("://", 1)[-1]
    label = f"{role} model {'healthy' if ok else 'NOT reachable'} ({name or '?'} @ {where})"
    print(f"{'✓' if ok else '✗'} {label}")
    return ok


def start(config: Config, config_path: str | None) -> int:
    proxy = config.require_proxy("tightwad proxy start")
    healthy = all([_check("Draft", d.model_name, d.url, d.backend) for d in proxy.drafters])
    target_ok = _check("Target", proxy.target.model_name, proxy.target.url, proxy.target.backend)
    if not target_ok:
        print("error: the target must be up before the proxy starts", file=sys.stderr)
        return 1
    if not healthy:
        note = "requests fall back to the target alone" if proxy.fallback_on_draft_failure else \
            "requests will fail until it is up (fallback_on_draft_failure is off)"
        print(f"! a drafter is down: {note}")
    try:
        pid = proxy_daemon(proxy, config_path).start(timeout=120, log=lambda m: None)
    except DaemonError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    print(f"✓ Proxy running on {_local_url(proxy)}/v1 (pid {pid}, log {RUN_DIR / 'proxy.log'})")
    return 0


def stop(config: Config, config_path: str | None) -> int:
    proxy = config.require_proxy("tightwad proxy stop")
    stopped = proxy_daemon(proxy, config_path).stop()
    print("✓ proxy stopped" if stopped else "- the proxy was not running")
    return 0


def status(config: Config) -> int:
    proxy = config.require_proxy("tightwad proxy status")
    headers = {"Authorization": f"Bearer {proxy.api_key}"} if proxy.api_key else {}
    try:
        body = httpx.get(f"{_local_url(proxy)}/v1/tightwad/status", headers=headers, timeout=10).json()
    except httpx.HTTPError as exc:
        print(f"error: the proxy at {_local_url(proxy)} is not answering ({exc})", file=sys.stderr)
        return 1
    for model, s in body["models"].items():
        rate = s["acceptance_rate"]
        print(f"{model}  (target {s['target']['backend']}, verify_mode {s['target']['verify_mode']})")
        print(f"  acceptance rate   {'-' if rate is None else f'{rate:.1%}'} "
              f"({s['accepted_tokens']}/{s['drafted_tokens']} drafted tokens accepted)")
        print(f"  rounds            {s['rounds']}  (mean {s['mean_tokens_per_round'] or 0:.2f} tokens/round)")
        print(f"  tokens saved      {s['tokens_saved']}")
        print(f"  output            {s['output_tokens_per_s'] or 0} tok/s over {s['requests']} requests")
        print(f"  draft latency     p50 {s['draft_latency_ms']['p50']} ms, p95 {s['draft_latency_ms']['p95']} ms")
        print(f"  verify latency    p50 {s['verify_latency_ms']['p50']} ms, p95 {s['verify_latency_ms']['p95']} ms")
        if s["fallbacks"]:
            print(f"  fallbacks         {s['fallbacks']}")
        for d in s["drafters"]:
            print(f"  drafter {d['name']}: {d['backend']} @ {d['url']} "
                  f"{'healthy' if d['healthy'] else 'DOWN'}, tokenizer {d['tokenizer']}, wins {d['wins']}")
    return 0


def _health_path(backend: str) -> str:
    return {"ollama": "/api/version", "openai": "/v1/models", "openai-echo": "/v1/models"}.get(backend, "/health")
