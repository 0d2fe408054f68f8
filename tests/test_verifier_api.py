"""The verifier's HTTP API: layouts, sessions, bad input, loading, RPC pooling."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
import time

import httpx
import pytest
from servers import free_port, rpc_server, verifier


@pytest.fixture(scope="module")
def smol(servers, smollm):
    return servers("verifier", smollm, "--parallel", "2", "--ctx-size", "256")


def post(url: str, path: str, body) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return httpx.post(url + path, content=body, timeout=60)
    return httpx.post(url + path, json=body, timeout=60)


def tokens_of(url: str, text: str) -> list[int]:
    return post(url, "/tokenize", {"content": text}).json()["tokens"]


def test_tokenize_detokenize_round_trip(smol):
    text = "def add(a, b):\n    return a + b  # ünïcödé"
    ids = tokens_of(smol.url, text)
    assert len(ids) > 5
    assert post(smol.url, "/detokenize", {"tokens": ids}).json()["content"] == text
    pieces = post(smol.url, "/tokenize", {"content": "hello world", "with_pieces": True}).json()["tokens"]
    assert "".join(p["piece"] for p in pieces) == "hello world"


def test_chat_template_comes_from_the_gguf(smol):
    props = httpx.get(smol.url + "/props").json()
    assert "<|im_start|>" in props["chat_template"]  # SmolLM2's own ChatML template
    prompt = post(smol.url, "/apply-template",
                  {"messages": [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Hi"}]}).json()["prompt"]
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_info_and_models(smol):
    info = httpx.get(smol.url + "/v1/tightwad/info").json()
    assert info["n_vocab"] == 49152 and info["verify_mode"] == "one-pass" and info["mode"] == "fast"
    assert 2 in info["eog_token_ids"]
    models = httpx.get(smol.url + "/v1/models").json()
    assert models["data"][0]["id"] == "smollm2-135m-instruct-q4_1"


def test_verify_returns_only_new_positions(smol):
    ctx = tokens_of(smol.url, "The quick brown fox jumps over the lazy dog. " * 3)
    gen = post(smol.url, "/v1/tightwad/generate", {"tokens": ctx, "max_tokens": 6}).json()
    r = post(smol.url, "/v1/tightwad/verify",
             {"tokens": ctx, "draft": gen["tokens"][:5], "top_logprobs": 3, "session": "s"}).json()
    assert len(r["positions"]) == 6  # 5 drafted + the token after them, never the context
    assert [p["token"] for p in r["positions"][:5]] == gen["tokens"][:5]
    for pos, drafted in zip(r["positions"], gen["tokens"][:5], strict=False):
        assert pos["draft_logprob"] == pytest.approx(pos["logprob"], abs=0.5)
        assert len(pos["top_logprobs"]) == 3 and pos["top_logprobs"][0][0] == pos["token"]
        assert drafted == pos["token"]
    assert "draft_logprob" not in r["positions"][5]
    # The next round evaluates only what is new: the cache kept the accepted prefix.
    r2 = post(smol.url, "/v1/tightwad/verify",
              {"tokens": ctx + gen["tokens"][:3], "draft": [5, 6], "session": "s"}).json()
    assert r2["n_cached"] == len(ctx) + 2 and r2["n_evaluated"] == 3


def test_sampling_fields_and_seeded_generation(smol):
    ctx = tokens_of(smol.url, "Once upon a time")
    sampling = {"temperature": 0.9, "top_p": 0.95, "seed": 7}
    a = post(smol.url, "/v1/tightwad/generate", {"tokens": ctx, "max_tokens": 12, "sampling": sampling}).json()
    b = post(smol.url, "/v1/tightwad/generate", {"tokens": ctx, "max_tokens": 12, "sampling": sampling}).json()
    assert a["tokens"] == b["tokens"]
    c = post(smol.url, "/v1/tightwad/generate",
             {"tokens": ctx, "max_tokens": 12, "sampling": {**sampling, "seed": 8}}).json()
    assert c["tokens"] != a["tokens"]
    r = post(smol.url, "/v1/tightwad/verify", {
        "tokens": ctx, "draft": a["tokens"][:2],
        "sampling": {**sampling, "support": [[a["tokens"][0], 11], [a["tokens"][1]]]},
    }).json()
    first = dict(map(tuple, r["positions"][0]["probs"]))
    assert set(first) == {a["tokens"][0], 11}
    assert all(0.0 <= p <= 1.0 for p in first.values())
    assert r["positions"][0]["tail_sample"] not in first
    assert r["positions"][2]["probs"] == [] and r["positions"][2]["tail_sample"] is not None


def test_echo_layout_matches_vllm(smol):
    ctx = tokens_of(smol.url, "def fibonacci(n):")
    r = post(smol.url, "/v1/completions", {
        "prompt": ctx, "echo": True, "logprobs": 2, "max_tokens": 1, "temperature": 0,
        "return_tokens_as_token_ids": True,
    }).json()
    lp = r["choices"][0]["logprobs"]
    n = len(ctx) + 1
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert lp["tokens"][:-1] == [f"token_id:{t}" for t in ctx]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(isinstance(x, float) and x <= 0 for x in lp["token_logprobs"][1:])
    assert all(len(d) == 2 and all(k.startswith("token_id:") for k in d) for d in lp["top_logprobs"][1:])
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    # The generated token is the greedy choice the native API reports.
    greedy = post(smol.url, "/v1/tightwad/verify", {"tokens": ctx, "draft": []}).json()
    assert lp["tokens"][-1] == f"token_id:{greedy['positions'][0]['token']}"
    assert r["choices"][0]["text"].startswith("def fibonacci(n):")
    assert r["usage"] == {"prompt_tokens": len(ctx), "completion_tokens": 1, "total_tokens": n}
    # Plain strings too, as vLLM returns them.
    r = post(smol.url, "/v1/completions", {"prompt": "Hello world", "echo": True, "logprobs": 1,
                                            "max_tokens": 0}).json()
    lp = r["choices"][0]["logprobs"]
    assert "".join(lp["tokens"]) == "Hello world" and lp["text_offset"] == [0, 5]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/tightwad/verify", b"{not json", "body"),
        ("/v1/tightwad/verify", b"[1, 2]", "body"),
        ("/v1/tightwad/verify", {"draft": [1]}, "tokens"),
        ("/v1/tightwad/verify", {"tokens": [1, 2], "draft": [49152]}, "draft"),
        ("/v1/tightwad/verify", {"tokens": [-1]}, "tokens"),
        ("/v1/tightwad/verify", {"tokens": ["a"]}, "tokens"),
        ("/v1/tightwad/verify", {"tokens": [1] * 250, "draft": [1] * 10}, "tokens"),
        ("/v1/tightwad/verify", {"tokens": [1, 2], "n_prompt": 3}, "n_prompt"),
        ("/v1/tightwad/verify", {"tokens": [1], "top_logprobs": 50}, "top_logprobs"),
        ("/v1/tightwad/verify", {"tokens": [1], "draft": [2], "sampling": {"temperature": 1, "support": [[1], [2]]}},
         "sampling.support"),
        ("/v1/tightwad/generate", {"tokens": [1], "max_tokens": 0}, "max_tokens"),
        ("/v1/tightwad/generate", {"tokens": [1], "max_tokens": 2, "sampling": {"temperature": "hot"}},
         "sampling.temperature"),
        ("/detokenize", {"tokens": [99999]}, "tokens"),
        ("/v1/completions", {"prompt": "x", "model": "gpt-9"}, "model"),
        ("/v1/completions", {"prompt": {"a": 1}}, "prompt"),
        ("/v1/completions", {"prompt": "x", "n": 2}, "n"),
        ("/apply-template", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ],
)
def test_bad_input_is_a_4xx_naming_the_field(smol, path, body, param):
    r = post(smol.url, path, body)
    assert 400 <= r.status_code < 500, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert err["message"]


def test_bad_input_leaks_no_slot(smol):
    for _ in range(5):
        post(smol.url, "/v1/tightwad/verify", {"tokens": [1] * 300})
    ctx = tokens_of(smol.url, "Hello")
    results = [post(smol.url, "/v1/tightwad/verify", {"tokens": ctx, "draft": [], "session": f"x{i}"})
               for i in range(4)]
    assert all(r.status_code == 200 for r in results)
    assert httpx.get(smol.url + "/health").status_code == 200


def test_concurrent_sessions_match_sequential(smol):
    prompts = ["One two three", "Alpha beta", "import numpy as np", "Dear Sir,"]
    ctxs = [tokens_of(smol.url, p) for p in prompts]
    sequential = [post(smol.url, "/v1/tightwad/generate", {"tokens": c, "max_tokens": 10}).json()["tokens"]
                  for c in ctxs]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(post, smol.url, "/v1/tightwad/generate",
                               {"tokens": c, "max_tokens": 10, "session": f"c{i}"}) for i, c in enumerate(ctxs)]
        concurrent_ = [f.result().json()["tokens"] for f in futures]
    assert concurrent_ == sequential


def test_health_is_503_while_loading(llama_bin, qwen_target):
    server = verifier(qwen_target, "--parallel", "1", "--ctx-size", "512")
    server.proc = subprocess.Popen(server.argv, stdout=server.log_path.open("wb"),
                                   stderr=subprocess.STDOUT, start_new_session=True)
    seen: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                code = httpx.get(server.url + "/health", timeout=2).status_code
            except httpx.HTTPError:
                time.sleep(0.02)
                continue
            seen.append(code)
            if code == 200:
                break
            r = httpx.post(server.url + "/v1/tightwad/verify", json={"tokens": [1]})
            if r.status_code != 200:  # it may have finished loading in between
                assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
                assert r.headers["Retry-After"]
            time.sleep(0.02)
    finally:
        server.stop()
    assert 503 in seen and seen[-1] == 200, seen


def test_bad_model_path_is_refused_by_name(tmp_path):
    missing = tmp_path / "nope.gguf"
    proc = subprocess.run([sys.executable, "-m", "tightwad.cli", "verifier", "--model", str(missing),
                           "--port", str(free_port())], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--model" in proc.stderr and str(missing) in proc.stderr
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + b"\0" * 100)
    proc = subprocess.run([sys.executable, "-m", "tightwad.cli", "verifier", "--model", str(garbage),
                           "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "--model" in proc.stderr and "could not load" in proc.stderr


def test_rpc_pooling_gives_the_same_greedy_tokens(servers, smollm):
    rpc = rpc_server().start()
    try:
        pooled = verifier(smollm, "--rpc", f"127.0.0.1:{rpc.port}", "--parallel", "1").start()
        try:
            local = servers("verifier", smollm, "--parallel", "2", "--ctx-size", "256")
            ctx = tokens_of(local.url, "The capital of France is")
            body = {"tokens": ctx, "max_tokens": 16, "stop_at_eog": False}
            want = post(local.url, "/v1/tightwad/generate", body).json()["tokens"]
            got = post(pooled.url, "/v1/tightwad/generate", body).json()["tokens"]
            assert got == want
            assert httpx.get(pooled.url + "/v1/tightwad/info").json()["rpc_servers"] == [f"127.0.0.1:{rpc.port}"]
            assert "Accepted client connection" in rpc.log_tail(200)  # the layers really went there
        finally:
            pooled.stop()
    finally:
        rpc.stop()
