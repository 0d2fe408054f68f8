"""``tightwad local up|down|ps``: draft, verifier and proxy as local processes.

The addresses come from the proxy section of the configuration (the draft's
and the target's URLs, the proxy's port), so the quick start and the config
file never disagree. Models default to the Qwen2.5-Coder 0.5B/1.5B pair from
``tightwad models fetch``; ``TIGHTWAD_DRAFT_MODEL`` / ``TIGHTWAD_TARGET_MODEL``
point at other GGUF files.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from tightwad import llamacpp, models
from tightwad.config import Config
from tightwad.daemon import Daemon, DaemonError, python_argv

DRAFT_MODEL = "qwen2.5-coder-0.5b-instruct-q4_k_m"
TARGET_MODEL = "qwen2.5-coder-1.5b-instruct-q4_k_m"
RUN_DIR = Path("run")


def _model(env_key: str, name: str) -> Path:
    path = Path(os.environ.get(env_key) or models.model_path(name))
    if not path.is_file():
        raise DaemonError(f"{env_key}: no such model file: {path} (run `make models`)")
    return path


def _host_port(url: str, key: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise DaemonError(f"{key} is {url}: `local up` only starts servers on this machine")
    return parts.hostname, parts.port or 80


def daemons(config: Config, config_path: str | None) -> list[Daemon]:
    proxy = config.require_proxy("tightwad local up")
    draft_cfg = proxy.drafters[0]
    draft_host, draft_port = _host_port(draft_cfg.url, "proxy.draft.url")
    target_host, target_port = _host_port(proxy.target.url, "proxy.target.url")
    draft_model = _model("TIGHTWAD_DRAFT_MODEL", DRAFT_MODEL)
    target_model = _model("TIGHTWAD_TARGET_MODEL", TARGET_MODEL)
    threads = str(len(os.sched_getaffinity(0)))
    draft = Daemon(
        "draft",
        [str(llamacpp.binary("llama-server")), "-m", str(draft_model), "--host", draft_host,
         "--port", str(draft_port), "-c", "4096", "-t", threads, "--metrics", "--no-webui",
         *llamacpp.DRAFT_SERVER_FLAGS,
         "--alias", draft_cfg.model_name or draft_model.stem],
        f"{draft_cfg.url}/health",
        RUN_DIR,
    )
    verifier_args = ["verifier", "--model", str(target_model), "--host", target_host,
                     "--port", str(target_port), "--ctx-size", str(config.verifier.ctx_size),
                     "--parallel", str(config.verifier.parallel), "--threads", threads,
                     "--alias", proxy.target.model_name or target_model.stem]
    if config.verifier.mode == "strict":
        verifier_args.append("--strict")
    verifier = Daemon("verifier", python_argv(*verifier_args), f"{proxy.target.url}/health", RUN_DIR)
    config_args = ["-c", config_path] if config_path else []
    proxy_daemon = Daemon(
        "proxy",
        python_argv(*config_args, "proxy", "serve"),
        f"http://{'127.0.0.1' if proxy.host in ('0.0.0.0', '::') else proxy.host}:{proxy.port}/health",
        RUN_DIR,
    )
    return [draft, verifier, proxy_daemon]


def up(config: Config, config_path: str | None) -> int:
    started: list[Daemon] = []
    try:
        for daemon in daemons(config, config_path):
            daemon.start()
            started.append(daemon)
    except DaemonError:
        for daemon in reversed(started):
            daemon.stop()
        raise
    proxy = config.require_proxy("tightwad local up")
    print(f"\nTightwad is up: point any OpenAI client at http://127.0.0.1:{proxy.port}/v1")
    return 0


def down(config: Config, config_path: str | None) -> int:
    for daemon in reversed(daemons(config, config_path)):
        print(f"{'✓ stopped' if daemon.stop() else '- not running'} {daemon.name}")
    return 0


def ps(config: Config, config_path: str | None) -> int:
    for daemon in daemons(config, config_path):
        pid = daemon.pid()
        state = "healthy" if pid and daemon.healthy() else ("unhealthy" if pid else "stopped")
        print(f"{daemon.name:9s} {state:9s} pid {pid or '-':<8} {daemon.health_url}  log {daemon.logfile}")
    return 0
