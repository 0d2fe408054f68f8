"""The cluster commands of ``tightwad`` (wired into tightwad.cli by ``add_parsers``/``run``).

    tightwad status [--no-vram] [--json]     hosts, GPUs, VRAM, workers, coordinator, warnings
    tightwad start [-m MODEL]                workers, then the coordinator with MODEL
    tightwad stop                            the coordinator and every worker
    tightwad swap MODEL                      replace the coordinator's model; workers stay
    tightwad plan [MODEL] [--offline] [--json]   where MODEL's layers would go; starts nothing
    tightwad benchmark [--max-tokens N]      the coordinator's prompt and generation tok/s
                                             (``benchmark --proxy`` is the proxy's benchmark)

With ``--orchestrator URL`` (or $TIGHTWAD_ORCHESTRATOR_URL) status, start,
stop, swap and plan go through a running orchestrator service (``python -m
tightwad.orchestrator serve``), which also switches its front; otherwise they
run in this process against the Docker daemons directly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

COMMANDS = ("status", "start", "stop", "swap", "plan")
ENV_URL = "TIGHTWAD_ORCHESTRATOR_URL"
GIB = 1024**3


def add_parsers(sub: Any) -> None:
    """Add the cluster subcommands to ``tightwad``'s subparsers."""
    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--orchestrator", metavar="URL", default=os.environ.get(ENV_URL) or None,
                       help=f"go through a running orchestrator service (default: ${ENV_URL})")
        return p

    st = common(sub.add_parser("status", help="hosts, GPUs, VRAM, workers and the coordinator"))
    st.add_argument("--no-vram", action="store_true", help="do not run nvidia-smi / rocm-smi")
    st.add_argument("--json", action="store_true", help="print the status as JSON")
    s = common(sub.add_parser("start", help="start the workers and the coordinator"))
    s.add_argument("-m", "--model", help="a name under models: (default: the default model)")
    common(sub.add_parser("stop", help="stop the coordinator and the workers"))
    sw = common(sub.add_parser("swap", help="replace the running model; the workers stay"))
    sw.add_argument("model", help="a name under models:")
    p = common(sub.add_parser("plan", help="where a model's layers would go (starts nothing)"))
    p.add_argument("model", nargs="?", help="a name under models: (default: the default model)")
    p.add_argument("--offline", action="store_true",
                   help="use configured memory figures; contact no Docker daemon")
    p.add_argument("--json", action="store_true")


def run(args: argparse.Namespace, out: Callable[[str], None] = print) -> int:
    """Run one of COMMANDS; TightwadErrors propagate (tightwad.cli prints them)."""
    if args.orchestrator:
        return _remote(args, out)
    from tightwad.config import load_config
    from tightwad.orchestrator.cluster import Orchestrator

    config = load_config(args.config)
    config.require_cluster(f"`tightwad {args.command}`")
    orchestrator = Orchestrator(config)
    try:
        if args.command == "status":
            st = orchestrator.status(probe_vram=not args.no_vram)
            data = st.to_dict()
            out(json.dumps(data, indent=2) if args.json else render_status(data))
            return 1 if _unhealthy(data) else 0
        if args.command == "plan":
            return _plan(orchestrator, args, out)
        progress = _printer(out)
        if args.command == "start":
            r = orchestrator.start(args.model, progress=progress)
            if not r.already_running:
                out(f"✓ {r.model} is serving at {r.url} ({r.seconds:.1f} s)")
            return 0
        if args.command == "stop":
            orchestrator.stop(progress=progress)
            return 0
        if args.command == "swap":
            out(render_swap(orchestrator.swap(args.model, progress=progress).to_dict()))
            return 0
    finally:
        orchestrator.close()
    raise AssertionError(args.command)


def _printer(out: Callable[[str], None]) -> Callable[[str], None]:
    def progress(message: str) -> None:
        out(message)
        sys.stdout.flush()
    return progress


def _plan(orchestrator: Any, args: argparse.Namespace, out: Callable[[str], None]) -> int:
    from tightwad.orchestrator.placement import placement_dict

    notes: list[str] = []
    p = orchestrator.plan(args.model, offline=args.offline, notes=notes)
    data = {**placement_dict(p), "notes": notes}
    out(json.dumps(data, indent=2) if args.json else render_plan(data, orchestrator))
    return 0


def _unhealthy(data: dict[str, Any]) -> bool:
    if any(not h["up"] for h in data["hosts"]):
        return True
    if any(w["state"] in ("down", "unknown") for w in data["workers"]):
        return True
    return any(c["container"]["status"] == "running" and not c["healthy"]
               for c in data["coordinators"])


# --- through a running service --------------------------------------------------------


def _remote(args: argparse.Namespace, out: Callable[[str], None]) -> int:
    import httpx

    from tightwad.errors import TightwadError

    base = args.orchestrator.rstrip("/")
    try:
        with httpx.Client(base_url=base, timeout=httpx.Timeout(30.0, read=None)) as client:
            if args.command == "status":
                data = _json(client.get("/v1/status"))
                out(json.dumps(data, indent=2) if args.json else render_status(data))
                return 1 if _unhealthy(data) else 0
            if args.command == "plan":
                params = {"offline": "1" if args.offline else "0"}
                if args.model:
                    params["model"] = args.model
                data = _json(client.get("/v1/plan", params=params))
                out(json.dumps(data, indent=2) if args.json else render_plan(data, None))
                return 0
            body = {"model": getattr(args, "model", None)}
            with client.stream("POST", f"/v1/{args.command}", json=body) as r:
                if r.status_code != 200:
                    r.read()
                    _json(r)
                result = None
                for line in r.iter_lines():
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if event["event"] == "progress":
                        out(event["message"])
                    elif event["event"] == "error":
                        raise TightwadError(event["error"]["message"])
                    else:
                        result = event["result"]
            if args.command == "swap" and result:
                out(render_swap(result))
            elif args.command == "start" and result and not result.get("already_running"):
                out(f"✓ {result['model']} is serving at {result['url']} ({result['seconds']:.1f} s)")
            return 0
    except httpx.HTTPError as exc:
        raise TightwadError(f"the orchestrator at {base} is unreachable: {exc}") from exc


def _json(r: Any) -> Any:
    from tightwad.errors import TightwadError

    try:
        data = r.json()
    except ValueError:
        data = None
    if r.status_code != 200:
        message = (data or {}).get("error", {}).get("message") if isinstance(data, dict) else None
        raise TightwadError(message or f"the orchestrator answered HTTP {r.status_code}")
    return data


# --- rendering ---------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], indent: str = "  ") -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in cells]
    return "\n".join(lines)


def _gib(n: int | float | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}G"


def render_status(data: dict[str, Any]) -> str:
    parts = ["HOSTS", table(
        ("host", "docker", "daemon", "cluster address"),
        [(h["name"], h["endpoint"], "up" if h["up"] else "UNREACHABLE", h["address"])
         for h in data["hosts"]])]
    parts += ["", "DEVICES", table(
        ("host", "device", "vendor", "role", "total", "used", "free", "free from"),
        [(d["host"], d["name"], d["vendor"], "worker" if d["kind"] == "rpc" else "coordinator",
          _gib(d["total_bytes"]), _gib(d["used_bytes"]), _gib(d["free_bytes"] - (
              d["used_bytes"] or 0) if d["source"] == "configured" else d["free_bytes"]),
          d["source"]) for d in data["devices"]])]
    parts += ["", "WORKERS", table(
        ("worker", "device", "endpoint", "container", "state", "rpc port"),
        [(w["id"], w["gpu"], w["endpoint"],
          (f"{w['container']['name']} ({w['container']['id'][:12]}) {w['container']['status']}"
           if w["container"] else ("-" if w["managed"] else "(not managed)")),
          w["state"].upper() if w["state"] != "up" else "up",
          {"open": "reachable", "busy": "reachable (busy)", "closed": "CLOSED", None: "-"}[w["rpc"]])
         for w in data["workers"]])]
    coordinators = data["coordinators"]
    parts += ["", "COORDINATOR"]
    if coordinators:
        parts.append(table(
            ("model", "kind", "url", "container", "state", "health", "layers offloaded"),
            [(c["model"], c["kind"], c["url"] or "-",
              f"{c['container']['name']} ({c['container']['status']})", c["state"],
              "healthy" if c["healthy"] else "NOT HEALTHY" if c["container"]["status"] == "running"
              else "-",
              f"-ngl {c['placement'].get('ngl', '?')} split {c['placement'].get('split', [])}")
             for c in coordinators]))
    else:
        parts.append("  (none running: `tightwad start`)")
    if "front" in data:
        f = data["front"]
        parts += ["", f"FRONT  → {f['url'] or '(no coordinator)'}"
                  + ("  HOLDING (swap in progress)" if f["held"] else "")
                  + f"  in flight {f['inflight']}"]
    if data.get("operation"):
        parts += ["", f"IN PROGRESS: {data['operation']}"]
    if data["warnings"]:
        parts += ["", "WARNINGS"] + [f"  ! {w}" for w in data["warnings"]]
    return "\n".join(parts)


def render_plan(data: dict[str, Any], orchestrator: Any) -> str:
    lines = [
        f"Plan for {data['model']} ({data['path']})",
        f"  model: {data['n_layer']} layers + output, weights {_gib(data['weights_bytes'])}, "
        f"KV cache {_gib(data['kv_bytes'])} for {data['n_ctx']} tokens, vocabulary {data['n_vocab']}",
        f"  pool:  {len(data['devices'])} devices, {_gib(data['pooled_free_bytes'])} free; "
        f"this model needs {_gib(data['required_bytes'])}",
        "",
        table(("device", "kind", "vendor", "name", "layers", "weights", "KV", "compute", "total",
               "free", "left", "free from"),
              [(d["id"], {"cpu": "cpu (coordinator)", "rpc": "rpc worker", "gpu": "gpu (coordinator)"}[
                  d["kind"]], d["vendor"], d["name"], d["layers"], _gib(d["weights_bytes"]),
                _gib(d["kv_bytes"]), _gib(d["reserve_bytes"]), _gib(d["use_bytes"]),
                _gib(d["free_bytes"]), _gib(d["headroom_bytes"]), d["source"])
               for d in data["devices"]]),
        "",
        f"  coordinator args: {' '.join(data['llama_args'])}",
    ]
    if data["host_ram_bytes"]:
        lines.append(f"  (plus {_gib(data['host_ram_bytes'])} of the coordinator host's RAM for the "
                     "input layer, which llama.cpp keeps on the CPU)")
    if orchestrator is not None:
        lines += ["", "  containers:"] + [f"    {line}" for line in _container_lines(orchestrator, data)]
    for note in data.get("notes", []):
        lines.append(f"  ! {note}; the configured figure is used")
    return "\n".join(lines)


def _container_lines(orchestrator: Any, data: dict[str, Any]) -> list[str]:
    from tightwad.orchestrator import containers as ct

    config = orchestrator.config
    out = []
    for worker in config.workers:
        if worker.host not in config.hosts:
            out.append(f"worker {worker.host}: not managed (RPC servers run by someone else)")
            continue
        for gpu in worker.gpus:
            spec = ct.worker_spec(config, orchestrator.cluster, worker, gpu)
            out.append(f"{spec.name} on {worker.host}: {spec.image} {' '.join(spec.command)}; "
                       f"publish {spec.ports[f'{ct.RPC_PORT_IN_CONTAINER}/tcp'][0]}:{gpu.rpc_port}"
                       + _device_flags(spec))
    coordinator = config.require_cluster()
    model = config.models[data["model"]]
    spec_image = config.images.for_backend(coordinator.backend)
    out.append(f"{ct.coordinator_name(orchestrator.cluster, model.name)} on {coordinator.host}: "
               f"{spec_image} ({orchestrator.kind}); publish "
               f"{config.address_of(coordinator.host)}:{coordinator.port}")
    return out


def _device_flags(spec: Any) -> str:
    flags = []
    for driver, ids in spec.gpu_requests:
        flags.append(f"--gpus driver={driver},device={','.join(ids)}")
    for d in spec.devices:
        flags.append(f"--device {d}")
    for g in spec.group_add:
        flags.append(f"--group-add {g}")
    return ("; " + " ".join(flags)) if flags else ""


def render_swap(r: dict[str, Any]) -> str:
    kept = [w for w in r["workers_before"] if r["workers_after"].get(w) == r["workers_before"][w]]
    lines = [f"✓ swapped {r['old_model']} → {r['new_model']} ({r['strategy']}) in "
             f"{r['seconds']:.1f} s, now at {r['url']}"]
    if r["strategy"] == "overlap":
        lines.append("  downtime: none (the new coordinator answered before the old one stopped)")
    else:
        lines.append(f"  downtime: {r['downtime_s']:.2f} s (old coordinator stopped → new one "
                     "healthy)" + (f"; the front answered 503 + Retry-After for {r['held_s']:.2f} s"
                                   if r["held_s"] else ""))
    lines.append(f"  workers kept: {len(kept)} of {len(r['workers_before'])} (same container IDs)")
    return "\n".join(lines)


# --- benchmark -----------------------------------------------------------------------------


def run_benchmark(args: argparse.Namespace, out: Callable[[str], None] = print) -> int:
    """``tightwad benchmark`` without --proxy: the coordinator alone."""
    from tightwad.config import load_config
    from tightwad.orchestrator.cluster import Orchestrator

    config = load_config(args.config)
    config.require_cluster("`tightwad benchmark`")
    orchestrator = Orchestrator(config)
    try:
        rows = orchestrator.benchmark(max_tokens=args.max_tokens, progress=_printer(out))
    finally:
        orchestrator.close()
    out(render_benchmark(rows))
    return 0


def render_benchmark(rows: Sequence[dict[str, Any]]) -> str:
    def tps(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.1f}"

    body = [(i + 1, r["model"], r["prompt_tokens"], tps(r["prompt_tps"]), r["generated_tokens"],
             tps(r["generation_tps"]), f"{r['seconds']:.2f}") for i, r in enumerate(rows)]
    gen = [r["generation_tps"] for r in rows if r["generation_tps"]]
    prompt = [r["prompt_tps"] for r in rows if r["prompt_tps"]]
    body.append(("mean", "", "", tps(sum(prompt) / len(prompt)) if prompt else "n/a", "",
                 tps(sum(gen) / len(gen)) if gen else "n/a", ""))
    return table(("prompt", "model", "prompt tok", "prompt tok/s", "generated", "gen tok/s",
                  "seconds"), body)
