"""``tightwad benchmark --suite`` end to end, small: real servers, real namespaces.

The tiny high-agreement pair, one profile, one fixed k and one llama.cpp sweep point, so it
runs in about a minute. The figures are not judged (speed belongs to ``make bench``);
what is checked is that they are all there, consistent with each other, computed from
what the servers returned, and that the network lab leaves nothing behind.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tightwad import tinymodels


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> tuple[dict, str, object]:
    # The high-agreement pair, so that whole rounds are accepted and prefetches can hit.
    draft, target = tinymodels.write_pair("high")
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, "-m", "tightwad.cli", "benchmark", "--suite", "--draft-model", str(draft),
         "--target-model", str(target), "--profiles", "wan", "--ks", "2", "--spec-n-max", "2",
         "--prompts-per-kind", "1", "--max-tokens", "16", "--no-cost", "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "results.json").read_text()), done.stdout + done.stderr, out


def test_every_set_up_is_measured_side_by_side(suite):
    results, _, _ = suite
    assert set(results["baselines"]) == {"target (verifier)", "llama-server", "llama-spec n-max=2"}
    configs = results["profiles"]["wan"]["configs"]
    assert set(configs) == {"k=2", "adaptive", "adaptive+cut", "adaptive+cut+pipeline",
                            "adaptive+pipeline"}
    assert [p["kind"] for p in results["prompts"]] == ["code", "math", "factual", "list", "creative"]
    for name, c in configs.items():
        assert c["prompts"] == 5 and c["output_tokens"] > 0
        assert c["tok_s"] == pytest.approx(c["output_tokens"] / c["seconds"], rel=1e-2)
        if c["drafted"]:
            assert c["acceptance"] == pytest.approx(c["accepted"] / c["drafted"])
        else:  # nothing drafted (below): no acceptance to speak of
            assert math.isnan(c["acceptance"])
        assert c["tokens_per_round"] == pytest.approx(c["output_tokens"] / c["rounds"])
        # Time waiting for drafts plus verifying cannot exceed the wall time it is part of.
        assert 0 < c["efficiency"] <= 1.0
        if "pipeline" not in name:
            # Without pipelining a round waits only for its own draft call. A pipelined
            # round first waits for the prefetched draft (to learn whether its guess
            # held) and, when it did not, drafts again: only that second call's time
            # is the round's draft time (speculation/loop.py).
            assert c["draft_wait_seconds"] <= c["draft_seconds"] * 1.05 + 0.05
        assert c["proxy_cpu_ms_per_round"]["p50"] > 0
        # The tiny pair has no batch noise to speak of: greedy output is the target's.
        assert c["divergent_prompts"] == 0
    assert all(configs[n]["drafted"] > 0 for n in ("k=2", "adaptive", "adaptive+pipeline"))
    # The tiny models are never 75% sure of a token: the early cut leaves nothing to draft.
    assert configs["adaptive+cut"]["drafted"] == 0
    assert configs["k=2"]["pipeline_hits"] == 0
    assert configs["adaptive+pipeline"]["pipeline_hits"] > 0
    # Prefetched drafts were made while the target verified: the rounds waited less for them.
    piped = configs["adaptive+pipeline"]
    assert piped["draft_wait_seconds"] < 0.9 * piped["draft_seconds"]


def test_the_network_is_emulated_for_real_and_removed(suite):
    results, log, _ = suite
    wan = results["profiles"]["wan"]
    assert wan["method"] in ("netem", "relay")
    # 25 ms each way: every measured round trip is at least the 50 ms it must cost.
    assert min(wan["rtt_ms"].values()) >= 50.0
    assert "removed 3 namespaces" in log
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert "twb-" not in namespaces


def test_goals_table_and_plot_are_written(suite):
    results, log, out = suite
    goals = results["goals"]["wan"]
    assert goals["best_fixed"] == "k=2"
    assert goals["adaptive / best fixed"] == pytest.approx(
        results["profiles"]["wan"]["configs"]["adaptive"]["tok_s"] / goals["best_fixed_tok_s"], rel=1e-2)
    assert "proxy best / llama-spec best" in goals
    assert "Profile wan" in log and "Goals:" in log
    png = (out / "throughput.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # Token lists are used to count divergence, not written out.
    def keys(node: object) -> set[str]:
        if isinstance(node, dict):
            return set(node) | {k for v in node.values() for k in keys(v)}
        return set()
    assert "tokens" not in keys(results)
