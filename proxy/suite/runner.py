"""``tightwad benchmark --suite`` (``make bench``): everything side by side, measured.

One run, same machine, same models, same prompts:

1. on loopback, the references: the target alone through the verifier, stock
   llama-server alone, and llama.cpp's own speculative decoding (``-md
   --spec-type draft-simple``) at each ``--spec-draft-n-max`` of a small sweep.
   llama.cpp's speculation needs both models in one process, so no network
   applies to it: that is the set-up Tightwad exists to split across machines;
2. per network profile, draft, verifier and proxy in separate network namespaces
   (``tightwad.suite.network``), and the proxy at fixed k and with adaptive k,
   with and without pipelined drafting; the client sits with the proxy;
3. the proxy's own cost (``tightwad.suite.cost``), on loopback.

Every figure comes from responses and the proxy's own counters
(``/v1/tightwad/status``); ``tightwad.suite.report`` turns them into a table,
JSON and a plot.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tightwad import llamacpp
from tightwad.benchmark import PROMPTS
from tightwad.daemon import Daemon, python_argv
from tightwad.suite import report
from tightwad.suite.client import run_job
from tightwad.suite.network import NetworkLab

DEFAULT_PROFILES = ("lan", "wifi", "wan")
DEFAULT_KS = (4, 8, 16, 32)
DEFAULT_SPEC_N_MAX = (4, 8, 16)
DRAFT_PORT, TARGET_PORT, PROXY_PORT = 8081, 8090, 8088
CUT = 0.75  # draft_min_confidence of the adaptive set-ups
DRAFT_CPU, TARGET_CPU = 0, 1  # with --pin-hosts


@dataclasses.dataclass
class Options:
    draft_model: Path
    target_model: Path
    out_dir: Path
    profiles: tuple[str, ...] = DEFAULT_PROFILES
    ks: tuple[int, ...] = DEFAULT_KS
    spec_n_max: tuple[int, ...] = DEFAULT_SPEC_N_MAX
    max_tokens: int = 32
    prompts_per_kind: int = 0  # 0: all of tightwad.benchmark.PROMPTS
    cost: bool = True
    cost_requests: int = 10_000
    cost_streams: int = 64
    threads: int = dataclasses.field(default_factory=lambda: len(os.sched_getaffinity(0)))
    # Give the draft's and the target's "machines" a CPU each (taskset, one thread),
    # so that they do not compete for cores as separate boxes would not; the
    # references run on the target's CPU too.
    pin_hosts: bool = False
    only: tuple[str, ...] = ()  # proxy set-ups to run (default all)

    def pinned(self, argv: list[str], cpu: int) -> list[str]:
        return ["taskset", "-c", str(cpu), *argv] if self.pin_hosts else argv

    @property
    def server_threads(self) -> int:
        return 1 if self.pin_hosts else self.threads


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def proxy_configs(ks: tuple[int, ...]) -> dict[str, dict[str, Any]]:
    """The proxy set-ups compared on every profile (name -> proxy config keys).

    "adaptive" is the shipped default: k chosen each round from measured costs and
    acceptance by position. "+cut" also streams the draft and cuts it where its
    confidence falls (at llama.cpp's default ``--spec-draft-p-min`` of 0.75);
    "+pipeline" drafts the next round while the target verifies this one.
    """
    off = {"pipeline_drafts": False, "draft_min_confidence": 0.0}
    configs: dict[str, dict[str, Any]] = {f"k={k}": {"max_draft_tokens": k, **off} for k in ks}
    for cut in (False, True):
        for pipeline in (False, True):
            name = "adaptive" + "+cut" * cut + "+pipeline" * pipeline
            configs[name] = {"max_draft_tokens": "auto", "pipeline_drafts": pipeline,
                             "draft_min_confidence": CUT if cut else 0.0}
    return configs


def run(opts: Options) -> dict[str, Any]:
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    logs = opts.out_dir / "logs"
    logs.mkdir(exist_ok=True)
    started = time.time()
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "machine": {"cpus": opts.threads, "platform": platform.platform(), "python": platform.python_version()},
        "models": {"draft": opts.draft_model.name, "target": opts.target_model.name},
        "pinned_hosts": opts.pin_hosts,
        "max_tokens": opts.max_tokens, "baselines": {}, "profiles": {},
    }
    prompts, eog = _prompt_tokens(opts, logs)
    results["prompts"] = [{"kind": kind, "text": text} for kind, text, _ in prompts]
    ids = [p for _, _, p in prompts]
    results["baselines"] = _baselines(opts, ids, eog, logs)
    reference = results["baselines"]["target (verifier)"]["tokens"]
    for profile in opts.profiles:
        results["profiles"][profile] = _profile(opts, profile, ids, eog, reference, logs)
        _save(opts, results)
    if opts.cost:
        from tightwad import tinymodels
        from tightwad.suite.cost import measure_proxy_cost

        log("→ the proxy's own cost (tiny model pair, loopback)")
        draft, target = tinymodels.write_pair("medium")
        results["cost"] = measure_proxy_cost(draft_model=draft, target_model=target, out_dir=opts.out_dir,
                                             requests=opts.cost_requests, streams=opts.cost_streams, log=log)
    results["seconds"] = round(time.time() - started, 1)
    results["goals"] = report.goals(results)
    _save(opts, results)
    return results


def _save(opts: Options, results: dict[str, Any]) -> None:
    (opts.out_dir / "results.json").write_text(json.dumps(_public(results), indent=2))


def _public(results: dict[str, Any]) -> dict[str, Any]:
    """The results without per-prompt token lists (kept only to count divergence)."""
    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k != "tokens"}
        return node
    return strip(results)


# -- prompts and references ---------------------------------------------------------------


def _prompt_tokens(opts: Options, logs: Path) -> tuple[list[tuple[str, str, list[int]]], list[int]]:
    """Each prompt as the target's chat-templated token ids, and the target's eog ids."""
    verifier = _verifier_daemon(opts, logs, "verifier-tokenize")
    verifier.start(log=log)
    try:
        url = verifier.health_url.rsplit("/", 1)[0]
        out = []
        for kind, texts in PROMPTS.items():
            for text in texts[: opts.prompts_per_kind or None]:
                templated = httpx.post(f"{url}/apply-template", timeout=60, json={
                    "messages": [{"role": "user", "content": text}]}).json()["prompt"]
                ids = httpx.post(f"{url}/tokenize", timeout=60,
                                 json={"content": templated, "add_special": False}).json()["tokens"]
                out.append((kind, text, ids))
        eog = httpx.get(f"{url}/v1/tightwad/info", timeout=60).json()["eog_token_ids"]
    finally:
        verifier.stop()
    return out, eog


def _verifier_daemon(opts: Options, logs: Path, name: str, port: int = TARGET_PORT) -> Daemon:
    argv = opts.pinned(python_argv("verifier", "--model", str(opts.target_model), "--host", "127.0.0.1",
                                   "--port", str(port), "--ctx-size", "4096", "--parallel", "2",
                                   "--threads", str(opts.server_threads)), TARGET_CPU)
    return Daemon(name, argv, f"http://127.0.0.1:{port}/health", logs)


def _llama_daemon(opts: Options, logs: Path, name: str, *extra: str, port: int = TARGET_PORT) -> Daemon:
    argv = opts.pinned([str(llamacpp.binary("llama-server")), "-m", str(opts.target_model), "--host",
                        "127.0.0.1", "--port", str(port), "-c", "4096", "--parallel", "1",
                        "-t", str(opts.server_threads), "--no-webui", *extra], TARGET_CPU)
    return Daemon(name, argv, f"http://127.0.0.1:{port}/health", logs)


def _measure(daemon: Daemon, kind: str, ids: list[list[int]], eog: list[int], max_tokens: int,
             reference: list[list[int]] | None) -> dict[str, Any]:
    daemon.start(log=log)
    try:
        url = daemon.health_url.rsplit("/", 1)[0]
        raw = run_job({"kind": kind, "url": url, "prompts": ids, "max_tokens": max_tokens, "eog": eog})
    finally:
        daemon.stop()
    return report.summarise(raw, reference)


def _baselines(opts: Options, ids: list[list[int]], eog: list[int], logs: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    log(f"→ target alone through the verifier ({len(ids)} prompts × {opts.max_tokens} tokens)")
    out["target (verifier)"] = alone = _measure(_verifier_daemon(opts, logs, "verifier-alone"), "verifier",
                                                ids, eog, opts.max_tokens, None)
    reference = alone["tokens"]
    alone["divergent_prompts"] = 0
    log(f"  {alone['tok_s']:.2f} tok/s")
    log("→ stock llama-server, target alone")
    out["llama-server"] = _measure(_llama_daemon(opts, logs, "llama-server-alone"), "llama-server",
                                   ids, eog, opts.max_tokens, reference)
    log(f"  {out['llama-server']['tok_s']:.2f} tok/s")
    for n in opts.spec_n_max:
        log(f"→ llama.cpp speculative decoding, --spec-draft-n-max {n}")
        daemon = _llama_daemon(opts, logs, f"llama-spec-{n}", "-md", str(opts.draft_model),
                               "--spec-type", "draft-simple", "--spec-draft-n-max", str(n))
        out[f"llama-spec n-max={n}"] = _measure(daemon, "llama-server", ids, eog, opts.max_tokens, reference)
        log(f"  {out[f'llama-spec n-max={n}']['tok_s']:.2f} tok/s")
    return out


# -- one network profile --------------------------------------------------------------------


def _profile(opts: Options, profile: str, ids: list[list[int]], eog: list[int],
             reference: list[list[int]], logs: Path) -> dict[str, Any]:
    log(f"→ network profile {profile}")
    out: dict[str, Any] = {"configs": {}}
    with NetworkLab(profile) as lab:
        draft = lab.spawn("draft", opts.pinned([
            str(llamacpp.binary("llama-server")), "-m", str(opts.draft_model), "--host", "0.0.0.0",
            "--port", str(DRAFT_PORT), "-c", "4096", "--parallel", "2", "-t", str(opts.server_threads),
            "--no-webui",
        ], DRAFT_CPU), **_logged(logs / f"{profile}-draft.log"))
        target = lab.spawn("target", opts.pinned(python_argv(
            "verifier", "--model", str(opts.target_model), "--host", "0.0.0.0", "--port", str(TARGET_PORT),
            "--ctx-size", "4096", "--parallel", "2", "--threads", str(opts.server_threads),
        ), TARGET_CPU), **_logged(logs / f"{profile}-target.log"))
        draft_at = lab.expose("draft", DRAFT_PORT)
        target_at = lab.expose("target", TARGET_PORT)
        _wait_healthy(lab, draft_at, draft, logs / f"{profile}-draft.log")
        _wait_healthy(lab, target_at, target, logs / f"{profile}-target.log")
        out["method"] = lab.method
        out["delay_ms"] = lab.profile.delay_ms
        out["jitter_ms"] = lab.profile.jitter_ms
        out["rtt_ms"] = {host: round(lab.rtt_ms(host), 3) for host in ("draft", "target")}
        log(f"  {lab.method}: measured RTT draft {out['rtt_ms']['draft']:.2f} ms, "
            f"target {out['rtt_ms']['target']:.2f} ms")
        configs = proxy_configs(opts.ks)
        for i, (name, keys) in enumerate(configs.items()):
            if opts.only and name not in opts.only:
                continue
            log(f"  {profile} / {name}")
            raw = _proxy_run(opts, lab, name, keys, draft_at, target_at, PROXY_PORT + i, ids, eog, logs,
                             profile)
            out["configs"][name] = summary = report.summarise(raw, reference)
            log(f"    {summary['tok_s']:.2f} tok/s, acceptance {summary['acceptance']:.1%}, "
                f"{summary['tokens_per_round']:.2f} tok/round, efficiency {summary['efficiency']:.3f}")
    return out


def _logged(path: Path) -> dict[str, Any]:
    return {"stdout": path.open("ab"), "stderr": subprocess.STDOUT, "stdin": subprocess.DEVNULL}


def _wait_healthy(lab: NetworkLab, at: tuple[str, int], proc: subprocess.Popen[Any], logfile: Path,
                  timeout: float = 600.0) -> None:
    """Poll ``GET /health`` from the hub until 200 (llama.cpp answers 503 while loading)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = logfile.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"a server exited with {proc.returncode} while starting:\n{tail}")
        try:
            with lab.connect(lab.hub, at, timeout=5) as sock:
                sock.sendall(b"GET /health HTTP/1.0\r\nHost: bench\r\n\r\n")
                if sock.recv(64).split(b" ", 2)[1:2] == [b"200"]:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"no healthy server at {at} after {timeout:g} s (log: {logfile})")


def _proxy_run(opts: Options, lab: NetworkLab, name: str, keys: dict[str, Any], draft_at: tuple[str, int],
               target_at: tuple[str, int], port: int, ids: list[list[int]], eog: list[int], logs: Path,
               profile: str) -> dict[str, Any]:
    slug = f"{profile}-" + "".join(c if c.isalnum() else "-" for c in name).strip("-")
    config = logs / f"{slug}.yaml"
    lines = ["proxy:", "  host: 127.0.0.1", f"  port: {port}", "  mode: fast", "  draft_timeout_s: 120",
             "  request_timeout_s: 1800", *(f"  {k}: {_yaml(v)}" for k, v in keys.items()),
             "  draft:", f"    url: http://{draft_at[0]}:{draft_at[1]}",
             "  target:", f"    url: http://{target_at[0]}:{target_at[1]}"]
    config.write_text("\n".join(lines) + "\n")
    proxy = lab.spawn("proxy", python_argv("-c", str(config), "proxy", "serve"), **_logged(logs / f"{slug}.log"))
    try:
        _wait_healthy(lab, ("127.0.0.1", port), proxy, logs / f"{slug}.log", timeout=120)
        job, result = logs / f"{slug}-job.json", logs / f"{slug}-result.json"
        job.write_text(json.dumps({"kind": "proxy", "url": f"http://127.0.0.1:{port}", "prompts": ids,
                                   "max_tokens": opts.max_tokens, "eog": eog}))
        client = lab.spawn("proxy", [sys.executable, "-m", "tightwad.suite.client", str(job), str(result)],
                           **_logged(logs / f"{slug}-client.log"))
        if client.wait() != 0:
            tail = (logs / f"{slug}-client.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the benchmark client failed for {profile} / {name}:\n{tail}")
        return json.loads(result.read_text())
    finally:
        proxy.terminate()
        try:
            proxy.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proxy.kill()


def _yaml(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def main_from_cli(opts: Options, print_out: Callable[[str], None] = print) -> int:
    results = run(opts)
    print_out(report.table(results))
    png = report.plot(results, opts.out_dir / "throughput.png")
    print_out(f"\nresults: {opts.out_dir / 'results.json'}" + (f"\nplot:    {png}" if png else ""))
    return 0
