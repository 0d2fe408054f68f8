"""The suite's figures: per-configuration summaries, the goals, a table and a plot.

Definitions (per configuration, over its prompts; the warm-up request excluded):

- output tok/s: tokens returned / client wall time;
- acceptance: accepted / drafted tokens, as the responses report them;
- tokens per round: tokens / target verification rounds;
- overhead per round: (client wall - time waiting for drafts - verify time) / rounds,
  i.e. the proxy's own work plus HTTP to the client, from the proxy's counters;
- efficiency: (time waiting for drafts + verify time) / client wall time. A pipelined
  draft that was made while the target verified costs no waiting, so it does not count.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

GOAL_EFFICIENCY = 0.95
GOAL_ADAPTIVE = 0.95


def summarise(raw: dict[str, Any], reference: list[list[int]] | None) -> dict[str, Any]:
    runs = raw["runs"]
    tokens = sum(len(r["tokens"]) for r in runs)
    seconds = sum(r["seconds"] for r in runs)
    drafted = sum(r["drafted"] for r in runs)
    accepted = sum(r["accepted"] for r in runs)
    rounds = sum(r["rounds"] for r in runs)
    out: dict[str, Any] = {
        "prompts": len(runs), "output_tokens": tokens, "seconds": round(seconds, 3),
        "tok_s": tokens / seconds if seconds else 0.0,
        "drafted": drafted, "accepted": accepted,
        "acceptance": accepted / drafted if drafted else float("nan"),
        "tokens": [r["tokens"] for r in runs],
    }
    if reference is not None:
        out["divergent_prompts"] = sum(r["tokens"] != ref for r, ref in zip(runs, reference, strict=True))
    status = raw.get("status")
    if status is not None:
        warm = status.get("_warmup", {})
        rounds = status["rounds"] - (warm.get("rounds") or 0)

        def spent(key: str) -> float:
            return status[key] - (warm.get(key) or 0.0)

        waited = spent("draft_wait_seconds_total")
        verify = spent("verify_seconds_total")
        out.update(
            rounds=rounds,
            tokens_per_round=tokens / rounds if rounds else float("nan"),
            draft_seconds=round(spent("draft_seconds_total"), 3),
            draft_wait_seconds=round(waited, 3),
            verify_seconds=round(verify, 3),
            overhead_ms_per_round=1000 * (seconds - waited - verify) / rounds if rounds else float("nan"),
            efficiency=(waited + verify) / seconds if seconds else float("nan"),
            proxy_cpu_ms_per_round=status["proxy_cpu_ms_per_round"],
            proxy_overhead_ms_per_round=status["proxy_overhead_ms_per_round"],
            pipeline_hits=status.get("pipeline_hits", 0),
        )
    elif rounds:
        out["rounds"] = rounds
    return out


def _best_fixed(configs: dict[str, Any]) -> tuple[str, float]:
    fixed = {n: c["tok_s"] for n, c in configs.items() if n.startswith("k=")}
    name = max(fixed, key=fixed.__getitem__)
    return name, fixed[name]


def goals(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    spec = {n: b["tok_s"] for n, b in results["baselines"].items() if n.startswith("llama-spec")}
    best_spec = max(spec, key=spec.__getitem__) if spec else None
    for profile, data in results["profiles"].items():
        configs = data["configs"]
        best_name, best = _best_fixed(configs)
        g: dict[str, Any] = {"best_fixed": best_name, "best_fixed_tok_s": round(best, 3)}
        for name in [n for n in configs if n.startswith("adaptive")]:
            g[f"{name} / best fixed"] = round(configs[name]["tok_s"] / best, 3)
            if "pipeline" not in name:
                g[f"{name} within 5% of best fixed"] = configs[name]["tok_s"] >= GOAL_ADAPTIVE * best
        for base in ("adaptive+cut", "adaptive"):
            if {base, f"{base}+pipeline"} <= configs.keys():
                g[f"pipeline gain ({base})"] = round(
                    configs[f"{base}+pipeline"]["tok_s"] / configs[base]["tok_s"], 3)
        effs = {n: round(c["efficiency"], 4) for n, c in configs.items()}
        g["efficiency"] = effs
        g["efficiency >= 0.95 everywhere"] = all(e >= GOAL_EFFICIENCY for e in effs.values())
        if best_spec is not None:
            proxy_best = max(c["tok_s"] for c in configs.values())
            g["llama-spec best"] = best_spec
            g["proxy best / llama-spec best"] = round(proxy_best / spec[best_spec], 3)
            g["proxy >= llama-spec"] = proxy_best >= spec[best_spec]
        out[profile] = g
    if "cost" in results:
        cost = results["cost"]
        cpu = cost["cpu_per_round"]
        out["cost"] = {
            f"proxy CPU per round p50 < {cpu['goal_p50_ms']:g} ms": cpu["meets_goal"],
            f"{cost['streams']['streams']} streams, no errors, all equal to the target alone":
                cost["streams"]["errors"] == 0 and cost["streams"]["mismatches"] == 0,
            f"memory flat over {cost['memory']['requests']} requests": cost["memory"]["flat"],
        }
    return out


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def table(results: dict[str, Any]) -> str:
    lines = [f"\nTightwad benchmark suite: {results['models']['draft']} → {results['models']['target']}, "
             f"{len(results['prompts'])} prompts × {results['max_tokens']} tokens, greedy, fast mode, "
             f"{results['machine']['cpus']} CPUs"
             + ("; draft and target hosts pinned to one CPU each" if results.get("pinned_hosts") else "")]
    head = (f"{'set-up':24} {'tok/s':>7} {'accept':>7} {'tok/round':>9} {'overhead ms/round':>17} "
            f"{'efficiency':>10} {'divergent':>9}")
    lines += ["", "References (loopback; llama.cpp's speculation runs both models in one process):", head,
              "-" * len(head)]
    n = len(results["prompts"])
    for name, b in results["baselines"].items():
        lines.append(f"{name:24} {b['tok_s']:>7.2f} {_fmt(b['acceptance'], '>7.1%')} {'-':>9} {'-':>17} "
                     f"{'-':>10} {b.get('divergent_prompts', 0):>6}/{n}")
    for profile, data in results["profiles"].items():
        lines += ["", f"Profile {profile}: {data['delay_ms']} ms ± {data['jitter_ms']} ms each way "
                  f"({data['method']}); measured RTT draft {data['rtt_ms']['draft']:.2f} ms, "
                  f"target {data['rtt_ms']['target']:.2f} ms", head, "-" * len(head)]
        for name, c in data["configs"].items():
            lines.append(
                f"{name:24} {c['tok_s']:>7.2f} {_fmt(c['acceptance'], '>7.1%')} "
                f"{_fmt(c['tokens_per_round'], '>9.2f')} {_fmt(c['overhead_ms_per_round'], '>17.2f')} "
                f"{_fmt(c['efficiency'], '>10.3f')} {c['divergent_prompts']:>6}/{n}")
    if "cost" in results:
        cpu, streams, memory = (results["cost"][k] for k in ("cpu_per_round", "streams", "memory"))
        rss = memory["samples"]
        lines += ["", "The proxy's own cost (loopback, tiny model pair):",
                  f"  CPU per round (the proxy's own count): p50 {cpu['p50_ms']} ms, p95 {cpu['p95_ms']} ms "
                  f"over {cpu['rounds']} rounds",
                  f"  a bare client making the round's two calls with the same waits (nothing else) is "
                  f"charged p50 {cpu['bare_client']['p50_ms']} ms here; the proxy's p50 is "
                  f"{cpu['p50_above_bare_client_ms']} ms above that",
                  f"  {streams['streams']} concurrent streams: {streams['errors']} errors, "
                  f"{streams['mismatches']} not equal to the target alone, {streams['tokens_per_s']} tok/s",
                  f"  {memory['requests']} requests: RSS {rss[0]['rss_mib']} → {rss[-1]['rss_mib']} MiB "
                  f"(+{memory['growth_mib']} MiB after the first 1000), {memory['errors']} errors, "
                  f"{memory['requests_per_s']} requests/s"]
    lines += ["", "Goals:"]
    for where, g in results.get("goals", {}).items():
        lines.append(f"  {where}: " + "; ".join(f"{k} = {v}" for k, v in g.items() if k != "efficiency"))
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> Path | None:
    """Throughput against k for each profile, with adaptive and the references."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    xs: list[int] = []
    for i, (profile, data) in enumerate(results["profiles"].items()):
        colour = colours[i % len(colours)]
        fixed = sorted((int(n[2:]), c["tok_s"]) for n, c in data["configs"].items() if n.startswith("k="))
        xs = [k for k, _ in fixed]
        ax.plot(xs, [v for _, v in fixed], "o-", color=colour, label=f"{profile}: fixed k")
        for name, style in (("adaptive", "-."), ("adaptive+cut", "--"), ("adaptive+cut+pipeline", ":"),
                            ("adaptive+pipeline", (0, (1, 4)))):
            if name in data["configs"]:
                ax.axhline(data["configs"][name]["tok_s"], color=colour, linestyle=style, linewidth=1.2,
                           label=f"{profile}: {name}")
    base = results["baselines"]
    for name, style in (("target (verifier)", "-"), ("llama-server", "-.")):
        if name in base:
            ax.axhline(base[name]["tok_s"], color="grey", linestyle=style, linewidth=1, label=name)
    spec = {n: b["tok_s"] for n, b in base.items() if n.startswith("llama-spec")}
    if spec:
        best = max(spec, key=spec.__getitem__)
        ax.axhline(spec[best], color="black", linestyle="--", linewidth=1, label=f"{best} (best)")
    if xs:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(k) for k in xs])
    ax.set_xlabel("draft tokens per round (k)")
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"{results['models']['draft']} → {results['models']['target']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
