"""The proxy-cost benchmark against real servers, at a small size.

It starts the real llama-server drafter, the strict verifier and the proxy with
the tiny model pair; the assertions are about behaviour (no errors, outputs equal
to the target alone, samples taken, every process gone), never about timings.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tightwad import tinymodels
from tightwad.suite.bare_client import bare_client_cpu_ms
from tightwad.suite.cost import measure_proxy_cost


def _gone(pid: int) -> bool:
    """Not running and reaped: no /proc entry, or the pid now belongs to someone else."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    # After the ")" that ends the command name: state, then the parent pid.
    ppid = stat.rsplit(")", 1)[1].split()[1]
    return int(ppid) != os.getpid()


@pytest.fixture(scope="module")
def pair(llama_bin: Path) -> tuple[Path, Path]:
    return tinymodels.write_pair("medium")


def test_measures_cpu_streams_and_memory_then_stops_everything(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    lines: list[str] = []
    draft, target = pair
    result = measure_proxy_cost(draft_model=draft, target_model=target, out_dir=tmp_path, requests=300,
                                streams=16, log=lines.append, sample_every=100)
    json.dumps(result)  # the benchmark writes it out as JSON

    cpu = result["cpu_per_round"]
    assert cpu["requests"] == 20 and cpu["rounds"] >= 20
    assert cpu["p50_ms"] > 0 and cpu["p95_ms"] >= cpu["p50_ms"]
    assert isinstance(cpu["meets_goal"], bool)
    # What the machine charges a bare client for the round's two calls: measured with
    # the round's own waits, and below what the proxy (which also drafts, verifies and
    # answers) is charged.
    bare = cpu["bare_client"]
    assert bare["rounds"] > 0 and len(bare["waits_ms"]) == 2
    assert 0 < bare["p50_ms"] < cpu["p50_ms"]
    assert cpu["p50_above_bare_client_ms"] == round(cpu["p50_ms"] - bare["p50_ms"], 3)

    streams = result["streams"]
    assert streams["streams"] == 16
    assert streams["errors"] == 0, streams["error_examples"]
    assert streams["mismatches"] == 0, streams["mismatched_prompts"]
    assert streams["tokens"] > 16  # every stream produced tokens, compared with the target's
    assert streams["tokens_per_s"] > 0

    memory = result["memory"]
    assert memory["errors"] == 0
    assert [s["requests"] for s in memory["samples"]] == [0, 100, 200, 300]
    assert all(s["rss_mib"] > 10 for s in memory["samples"])  # a Python process, really measured
    assert memory["growth_mib"] is not None and memory["growth_mib_per_1000"] is not None
    assert isinstance(memory["flat"], bool)

    assert result["fallbacks"] == {}  # every round was drafted: the drafter was really used
    assert any("300/300 requests" in line for line in lines)
    logs = tmp_path / "logs"
    assert {"draft.log", "verifier.log", "proxy.log"} <= {p.name for p in logs.iterdir()}
    assert set(result["pids"]) == {"draft", "verifier", "proxy"}
    for name, pid in result["pids"].items():
        assert pid is not None and _gone(pid), f"{name} (pid {pid}) still running"


def test_interrupt_stops_every_process(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    pids: list[int] = []

    def log(line: str) -> None:
        # The first measurement is about to start: all three are up. Ctrl-C now.
        if line.startswith("CPU per round"):
            pids.extend(int(p.read_text()) for p in (tmp_path / "logs").glob("*.pid"))
            raise KeyboardInterrupt

    draft, target = pair
    with pytest.raises(KeyboardInterrupt):
        measure_proxy_cost(draft_model=draft, target_model=target, out_dir=tmp_path, requests=10,
                           streams=2, log=log)
    assert len(pids) == 3
    assert all(_gone(pid) for pid in pids), pids
    assert not list((tmp_path / "logs").glob("*.pid"))


def test_bare_client_is_charged_per_round_of_calls() -> None:
    assert bare_client_cpu_ms([])["rounds"] == 0
    bare = bare_client_cpu_ms([0.001, 0.002], rounds=30)
    assert bare["rounds"] == 30 and bare["waits_ms"] == [1.0, 2.0]
    # Two real HTTP calls cost some CPU (syscalls, parsing, wake-ups), never anywhere
    # near the 3 ms the server spent on them: that time is the server's, not the client's.
    assert 0 < bare["p50_ms"] <= bare["p95_ms"] < 3.0
