"""max_draft_tokens: auto — the draft length adapts, and output stays the target's."""

from __future__ import annotations

import httpx
import openai
from servers import InProcessProxy
from test_proxy_identity import PROMPTS, prompt_tokens, target_alone, via_proxy, visible

from tightwad import tinymodels


def test_adaptive_draft_length_keeps_output_identical(servers):
    draft_path, target_path = tinymodels.write_pair("high")
    draft = servers("llama-server", draft_path, "--parallel", "2")
    target = servers("verifier", target_path, "--parallel", "2", "--strict")
    eog = set(httpx.get(f"{target.url}/v1/tightwad/info").json()["eog_token_ids"])
    section = {"mode": "strict", "max_draft_tokens": "auto",
               "draft": {"url": draft.url}, "target": {"url": target.url}}
    with InProcessProxy(section) as proxy:
        client = openai.OpenAI(base_url=f"{proxy.url}/v1", api_key="unused")
        for prompt in PROMPTS[:8]:
            want = visible(target_alone(target.url, prompt_tokens(target.url, prompt, False), 48), eog)
            assert via_proxy(client, prompt, chat=False, stream=False, max_tokens=48) == want
        status = httpx.get(f"{proxy.url}/v1/tightwad/status").json()
        policy = proxy.server.config.app.state.runtime.drafters[0].adaptive
    assert status["max_draft_tokens"] == "auto"
    # The policy was fed every drafted round, and picks a length within its bounds.
    assert policy is not None and policy._rounds > policy.min_rounds
    assert 1 <= policy.choose() <= policy.k_max
