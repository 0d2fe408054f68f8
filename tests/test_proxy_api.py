"""The proxy's OpenAI API against real servers: streams, stops, errors, keys,
fallback, disconnects, concurrency and chat templates.

Every proxy (``tightwad proxy serve`` under uvicorn) sits in front of a real
llama-server draft and a real strict-mode verifier target, so its output must
be token for token the target alone's: the verifier generating one token at a
time (``POST /v1/tightwad/generate``) on the same prompt tokens, which come
from the verifier's ``/tokenize`` (and, for chat, from the GGUF's own template
rendered here with Jinja).

Most tests use the tiny "medium" pair (SmolLM2's tokenizer, F32, thousands of
tokens per second, and a draft that is often wrong, so rounds both accept and
reject); the chat-template tests use SmolLM2-135M and the Qwen2.5-Coder pair.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from prometheus_client.parser import text_string_to_metric_families
from servers import ServerProcess, free_port, llama_server, proxy, write_proxy_config

TIMEOUT = 300.0
ERROR_KEYS = {"message", "type", "param", "code"}
PROMPTS = [
    "The quick brown fox",
    "def fibonacci(n):",
    "List the first five prime numbers.",
    "What is 12 times 13?",
    "Once upon a time, in a small village,",
    "SELECT name FROM users WHERE",
    "Write a haiku about the sea.",
    "import numpy as np\n",
    "Name the planets in order.",
    "What does HTTP 404 mean?",
    "class Stack:\n    def __init__(self):",
    "Is 97 a prime number?",
    "Translate 'good morning' into French.",
    "1, 1, 2, 3, 5, 8,",
    "Explain recursion briefly.",
    "Give three tips for commit messages.",
]


# -- the target alone ---------------------------------------------------------------------


@dataclasses.dataclass
class Reference:
    prompt: list[int]  # prompt token ids, as the target tokenizes them
    tokens: list[int]  # the target alone's output, without its end-of-generation token
    finish: str  # "stop" (end of generation) or "length"
    text: str
    starts: list[int]  # character offset of each token in text, then len(text)

    def piece(self, i: int) -> str:
        return self.text[self.starts[i] : self.starts[i + 1]]


class TargetAlone:
    """The verifier's own greedy generation, the reference every proxy output must equal."""

    def __init__(self, url: str):
        self.url = url
        info = httpx.get(f"{url}/v1/tightwad/info").json()
        self.model = info["model"]
        self.eog = set(info["eog_token_ids"])

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        r = httpx.post(f"{self.url}/tokenize", json={"content": text, "add_special": add_special})
        r.raise_for_status()
        return r.json()["tokens"]

    def detokenize(self, tokens: list[int]) -> str:
        r = httpx.post(f"{self.url}/detokenize", json={"tokens": tokens})
        r.raise_for_status()
        return r.json()["content"]

    def run(self, prompt: list[int], max_tokens: int) -> Reference:
        r = httpx.post(f"{self.url}/v1/tightwad/generate",
                       json={"tokens": prompt, "max_tokens": max_tokens}, timeout=TIMEOUT)
        r.raise_for_status()
        out = r.json()["tokens"]
        ended = bool(out) and out[-1] in self.eog
        tokens = [t for t in out if t not in self.eog]
        starts = [len(self.detokenize(tokens[:i])) if i else 0 for i in range(len(tokens))]
        text = self.detokenize(tokens)
        return Reference(prompt, tokens, "stop" if ended else "length", text, [*starts, len(text)])

    def complete(self, prompt: str, max_tokens: int) -> Reference:
        return self.run(self.tokenize(prompt, add_special=True), max_tokens)

    def chat(self, text: str, max_tokens: int) -> Reference:
        """``text``: the conversation already rendered with the model's template."""
        return self.run(self.tokenize(text, add_special=False), max_tokens)


def gguf_chat_prompt(model: Path, messages: list[dict[str, str]]) -> str:
    """The conversation rendered with the GGUF's own ``tokenizer.chat_template``, as
    Hugging Face's ``apply_chat_template`` renders it (independently of Tightwad)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(model))

    def field(key: str) -> Any:
        f = reader.fields[key]
        return f.parts[f.data[0]]

    source = bytes(field("tokenizer.chat_template")).decode()
    vocab = reader.fields["tokenizer.ggml.tokens"]
    token = lambda key: bytes(vocab.parts[vocab.data[int(field(key)[0])]]).decode()  # noqa: E731
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(source).render(
        messages=messages, add_generation_prompt=True,
        bos_token=token("tokenizer.ggml.bos_token_id"), eos_token=token("tokenizer.ggml.eos_token_id"),
    )


# -- proxies ------------------------------------------------------------------------------


@dataclasses.dataclass
class Stack:
    draft: ServerProcess
    target: ServerProcess

    @functools.cached_property
    def ref(self) -> TargetAlone:
        return TargetAlone(self.target.url)


def write_config(path: Path, *, draft_url: str, target_url: str, port: int, draft_timeout_s: float = 20,
                 fallback: bool = True, **kw: Any) -> Path:
    write_proxy_config(path, draft_url=draft_url, target_url=target_url, port=port, mode="strict", **kw)
    text = path.read_text().replace("draft_timeout_s: 20", f"draft_timeout_s: {draft_timeout_s}")
    if not fallback:
        text = text.replace("fallback_on_draft_failure: true", "fallback_on_draft_failure: false")
    path.write_text(text)
    return path


@contextlib.contextmanager
def proxy_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ServerProcess]]:
    """``start(draft_url, target_url, env=..., **config)``: a started proxy, stopped on exit."""
    started: list[ServerProcess] = []

    def start(draft_url: str, target_url: str, *, env: dict[str, str] | None = None,
              **kw: Any) -> ServerProcess:
        port = free_port()
        cfg = write_config(tmp_path_factory.mktemp("proxy") / "cluster.yaml", draft_url=draft_url,
                           target_url=target_url, port=port, **kw)
        argv = proxy(cfg, port=port).argv
        server = ServerProcess("proxy", argv, port=port, env=env)
        started.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="module")
def proxies(tmp_path_factory) -> Iterator[Callable[..., ServerProcess]]:
    with proxy_factory(tmp_path_factory) as start:
        yield start


@pytest.fixture(scope="module")
def tiny_pair() -> tuple[Path, Path]:
    from tightwad import tinymodels

    return tinymodels.write_pair("medium")


@pytest.fixture(scope="module")
def tiny(servers, tiny_pair) -> Stack:
    draft, target = tiny_pair
    return Stack(servers("llama-server", draft, "--parallel", "4"),
                 servers("verifier", target, "--parallel", "4", "--strict"))


@pytest.fixture(scope="module")
def tiny_proxy(proxies, tiny) -> ServerProcess:
    """Small drafts (2 tokens), so rounds are short and stop strings cross them."""
    return proxies(tiny.draft.url, tiny.target.url, max_draft_tokens=2,
                   extra="  max_tokens_limit: 256\n  max_request_bytes: 4096\n")


def client(server: ServerProcess, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_key, timeout=TIMEOUT, max_retries=0)


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(
        s.value for family in text_string_to_metric_families(text) for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def status(server: ServerProcess, **headers: str) -> dict[str, Any]:
    body = httpx.get(f"{server.url}/v1/tightwad/status", headers=headers, timeout=30).json()
    (model,) = body["models"].values()
    return model


def read_sse(response: httpx.Response) -> list[Any]:
    """Every event of a raw SSE stream: each is exactly ``data: <payload>\\n\\n``."""
    assert response.status_code == 200, response.read()
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = response.read().decode().split("\n\n")
    assert blocks[-1] == "", "the stream must end with a blank line"
    events = []
    for block in blocks[:-1]:
        assert block.startswith("data: ") and "\n" not in block, f"not one data line: {block!r}"
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def streamed_tokens(chunks: list[Any]) -> list[int]:
    tokens: list[int] = []
    for chunk in chunks:
        extra = chunk.get("tightwad") if isinstance(chunk, dict) else (chunk.model_extra or {}).get("tightwad")
        tokens += (extra or {}).get("tokens", [])
    return tokens


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# -- 1. streaming formats ---------------------------------------------------------------


@pytest.mark.parametrize("include_usage", [True, False], ids=["usage", "no-usage"])
def test_completions_stream_is_text_completion_chunks(tiny, tiny_proxy, include_usage):
    prompt = PROMPTS[0]
    ref = tiny.ref.complete(prompt, 24)
    body = {"model": "tightwad", "prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": True,
            "return_tokens": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", f"{tiny_proxy.url}/v1/completions", json=body, timeout=TIMEOUT) as r:
        events = read_sse(r)

    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("cmpl-")
    for c in chunks:
        assert c["object"] == "text_completion" and c["model"] == tiny.ref.model
        assert isinstance(c["created"], int)
    if include_usage:
        *chunks, last = chunks
        assert last["choices"] == [] and last["usage"] == usage(len(ref.prompt), len(ref.tokens))
        assert all(c["usage"] is None for c in chunks), "OpenAI sends usage: null on the other chunks"
    else:
        assert all("usage" not in c for c in chunks)
    for c in chunks:
        (choice,) = c["choices"]
        assert set(choice) == {"index", "text", "logprobs", "finish_reason"} and choice["index"] == 0
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + [ref.finish]
    assert "".join(c["choices"][0]["text"] for c in chunks) == ref.text
    assert streamed_tokens(chunks) == ref.tokens


@pytest.mark.parametrize("include_usage", [True, False], ids=["usage", "no-usage"])
def test_chat_stream_is_role_then_content_then_finish(tiny, tiny_proxy, tiny_pair, include_usage):
    messages = [{"role": "user", "content": PROMPTS[1]}]
    ref = tiny.ref.chat(gguf_chat_prompt(tiny_pair[1], messages), 24)
    body = {"messages": messages, "max_tokens": 24, "temperature": 0, "stream": True, "return_tokens": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", f"{tiny_proxy.url}/v1/chat/completions", json=body, timeout=TIMEOUT) as r:
        events = read_sse(r)

    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    if include_usage:
        *chunks, last = chunks
        assert last["choices"] == [] and last["usage"] == usage(len(ref.prompt), len(ref.tokens))
        assert all(c["usage"] is None for c in chunks)
    first, *content, final = chunks
    assert first["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                 "logprobs": None, "finish_reason": None}]
    for c in content:
        (choice,) = c["choices"]
        assert set(choice["delta"]) == {"content"} and choice["delta"]["content"]
        assert choice["finish_reason"] is None
    # As OpenAI ends a chat stream: an empty delta carrying the finish reason.
    assert final["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": ref.finish}]
    assert "".join(c["choices"][0]["delta"]["content"] for c in content) == ref.text
    assert streamed_tokens(chunks) == ref.tokens


def test_streams_through_the_openai_client(tiny, tiny_proxy, tiny_pair):
    api = client(tiny_proxy)
    messages = [{"role": "user", "content": PROMPTS[2]}]
    ref = tiny.ref.chat(gguf_chat_prompt(tiny_pair[1], messages), 20)
    chunks = list(api.chat.completions.create(
        model="tightwad", messages=messages, max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"return_tokens": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref.finish
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(ref.prompt)
    assert chunks[-1].usage.completion_tokens == len(ref.tokens)
    assert streamed_tokens(chunks) == ref.tokens

    ref = tiny.ref.complete(PROMPTS[3], 20)
    chunks = list(api.completions.create(
        model="tightwad", prompt=PROMPTS[3], max_tokens=20, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"return_tokens": True}))
    assert all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert chunks[-1].usage.prompt_tokens == len(ref.prompt)
    assert chunks[-1].usage.completion_tokens == len(ref.tokens)
    assert streamed_tokens(chunks) == ref.tokens


def test_whole_responses_count_usage_with_the_target_tokenizer(tiny, tiny_proxy, tiny_pair):
    api = client(tiny_proxy)
    ref = tiny.ref.complete(PROMPTS[4], 20)
    r = api.completions.create(model="tightwad", prompt=PROMPTS[4], max_tokens=20, temperature=0,
                               extra_body={"return_tokens": True})
    assert r.object == "text_completion" and r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == ref.finish
    assert r.usage.prompt_tokens == len(ref.prompt) and r.usage.completion_tokens == len(ref.tokens)
    assert r.usage.total_tokens == len(ref.prompt) + len(ref.tokens)
    assert r.model_extra["tightwad"]["tokens"] == ref.tokens

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[5]}]
    ref = tiny.ref.chat(gguf_chat_prompt(tiny_pair[1], messages), 20)
    r = api.chat.completions.create(model="tightwad", messages=messages, max_tokens=20, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.text and r.choices[0].finish_reason == ref.finish
    assert r.usage.prompt_tokens == len(ref.prompt) and r.usage.completion_tokens == len(ref.tokens)


# -- 2. stop strings ----------------------------------------------------------------------


def _round_ends(server: ServerProcess, prompt: str, max_tokens: int) -> set[int]:
    """Token counts at which the proxy's stream chunks (its rounds) ended, for one run."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "return_tokens": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=TIMEOUT) as r:
        chunks = read_sse(r)[:-1]
    ends, n = set(), 0
    for chunk in chunks:
        n += len(chunk["tightwad"]["tokens"])
        ends.add(n)
    return ends


def _straddling_stops(ref: Reference) -> list[tuple[int, str]]:
    """(token index b, stop) for stops made of the last 2 characters of token b-1 and
    the first 2 of token b, found first exactly there in the reference text."""
    out = []
    for b in range(2, len(ref.tokens) - 1):
        before, after = ref.piece(b - 1), ref.piece(b)
        if len(before) < 2 or len(after) < 2 or "\ufffd" in before + after:
            continue
        stop = before[-2:] + after[:2]
        if ref.text.find(stop) == ref.starts[b] - 2:
            out.append((b, stop))
    return out


def _stream_text(server: ServerProcess, body: dict[str, Any]) -> tuple[str, str | None, list[int], dict]:
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=TIMEOUT) as r:
        events = read_sse(r)
    assert events[-1] == "[DONE]"
    *chunks, last = events[:-1]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    finish = [c["choices"][0]["finish_reason"] for c in chunks][-1]
    return text, finish, streamed_tokens(chunks), last["usage"]


def test_stop_strings_across_rounds_and_tokens_are_never_emitted(tiny, tiny_proxy):
    checked = 0
    for prompt in PROMPTS[:8]:
        ref = tiny.ref.complete(prompt, 32)
        candidates = _straddling_stops(ref)
        rounds = _round_ends(tiny_proxy, prompt, 32)
        across = [(b, s) for b, s in candidates if b in rounds]  # token b opened a new round
        within = [(b, s) for b, s in candidates if b not in rounds]
        if not across or not within:
            continue
        for stops, (b, stop) in (("string", across[0]), ("list", within[0]), ("list", across[-1])):
            stop_field = stop if stops == "string" else ["\x00never seen", stop]
            text, finish, tokens, used = _stream_text(tiny_proxy, {
                "prompt": prompt, "max_tokens": 32, "temperature": 0, "stream": True, "stop": stop_field,
                "stream_options": {"include_usage": True}, "return_tokens": True})
            want = ref.text[: ref.starts[b] - 2]
            assert text == want, f"{prompt!r} stop {stop!r} (token {b}): {text!r} != {want!r}"
            assert stop not in text and finish == "stop"
            # The tokens up to the one that completed the stop string, and no more.
            assert tokens == ref.tokens[: b + 1] and used["completion_tokens"] == b + 1

            r = client(tiny_proxy).completions.create(
                model="tightwad", prompt=prompt, max_tokens=32, temperature=0, stop=stop_field)
            assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
            assert r.usage.completion_tokens == b + 1
        checked += 1
        if checked == 2:
            return
    pytest.fail(f"only {checked} prompts had stop candidates both across and within rounds")


def test_chat_stop_string_straddling_tokens(tiny, tiny_proxy, tiny_pair):
    messages = [{"role": "user", "content": PROMPTS[6]}]
    ref = tiny.ref.chat(gguf_chat_prompt(tiny_pair[1], messages), 32)
    b, stop = _straddling_stops(ref)[-1]
    chunks = list(client(tiny_proxy).chat.completions.create(
        model="tightwad", messages=messages, max_tokens=32, temperature=0, stream=True, stop=[stop]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == ref.text[: ref.starts[b] - 2]
    assert chunks[-1].choices[0].finish_reason == "stop"


# -- 3. request errors --------------------------------------------------------------------

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HI = [{"role": "user", "content": "hi"}]
BAD_REQUESTS = [
    # (path, body (bytes are sent raw), status, param)
    (COMPLETIONS, {"prompt": "hi", "n": 2}, 400, "n"),
    (CHAT, {"messages": HI, "n": 2}, 400, "n"),
    (COMPLETIONS, b"{not json", 400, "body"),
    (COMPLETIONS, b"", 400, "body"),
    (CHAT, b"[1, 2]", 400, "body"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": "x"}, 400, "max_tokens"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 2.5}, 400, "max_tokens"),
    (COMPLETIONS, {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    (CHAT, {"messages": HI, "temperature": "hot"}, 400, "temperature"),
    (CHAT, {"messages": "hi"}, 400, "messages"),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {}, 400, "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    (CHAT, {"messages": ["hi"]}, 400, "messages[0]"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    (CHAT, {"messages": [{"role": "user"}], "max_tokens": 1}, 400, "messages"),
    (COMPLETIONS, {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    (CHAT, {"messages": HI, "model": "gpt-4"}, 404, "model"),
    (COMPLETIONS, {"prompt": "hi", "model": 5}, 400, "model"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 257}, 400, "max_tokens"),
    (CHAT, {"messages": HI, "max_tokens": 257}, 400, "max_tokens"),
    (CHAT, {"messages": HI, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    (COMPLETIONS, {"prompt": "x" * 5000}, 413, "body"),
    (CHAT, {"messages": [{"role": "user", "content": "x" * 5000}]}, 413, "body"),
    (COMPLETIONS, {}, 400, "prompt"),
    (COMPLETIONS, {"prompt": 5}, 400, "prompt"),
    (COMPLETIONS, {"prompt": [[1, 2], [3]]}, 400, "prompt"),
    (COMPLETIONS, {"prompt": [10**9]}, 400, "prompt"),
    (COMPLETIONS, {"prompt": "hi", "stop": 5}, 400, "stop"),
    (COMPLETIONS, {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    (COMPLETIONS, {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    (COMPLETIONS, {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    (COMPLETIONS, {"prompt": "hi", "stream": True, "stream_options": "x"}, 400, "stream_options"),
    (COMPLETIONS, {"prompt": "hi", "logprobs": True}, 400, "logprobs"),
    (CHAT, {"messages": HI, "top_logprobs": 3}, 400, "top_logprobs"),
    (COMPLETIONS, {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    (COMPLETIONS, {"prompt": "hi", "echo": True}, 400, "echo"),
    (COMPLETIONS, {"prompt": "hi", "best_of": 3}, 400, "best_of"),
    (COMPLETIONS, {"prompt": "hi", "logit_bias": {"5": 10}}, 400, "logit_bias"),
    (CHAT, {"messages": HI, "presence_penalty": 1.0}, 400, "presence_penalty"),
    (CHAT, {"messages": HI, "tools": [{"type": "function"}]}, 400, "tools"),
]


def _post(url: str, body: dict | bytes, **kw: Any) -> httpx.Response:
    if isinstance(body, bytes):
        return httpx.post(url, content=body, headers={"Content-Type": "application/json"},
                          timeout=TIMEOUT, **kw)
    return httpx.post(url, json=body, timeout=TIMEOUT, **kw)


def assert_openai_error(r: httpx.Response, status: int, param: str | None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert body["error"]["param"] == param, body
    if param and param != "body":
        assert param.split("[")[0].split(".")[0] in body["error"]["message"], body
    return body["error"]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_REQUESTS,
                         ids=[f"{'chat' if p == CHAT else 'completions'}-{param}-{i}"
                              for i, (p, _, _, param) in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_openai_errors_naming_the_field(tiny_proxy, path, body, status, param):
    error = assert_openai_error(_post(tiny_proxy.url + path, body), status, param)
    assert error["type"] == "invalid_request_error"


def test_large_and_chunked_bodies_are_refused_with_413(tiny_proxy):
    big = json.dumps({"prompt": "x" * 2_000_000}).encode()
    r = _post(f"{tiny_proxy.url}/v1/completions", big)
    assert_openai_error(r, 413, "body")

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit applies as it arrives
        yield b'{"prompt": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}'

    r = httpx.post(f"{tiny_proxy.url}/v1/completions", content=chunked(), timeout=TIMEOUT,
                   headers={"Content-Type": "application/json"})
    assert_openai_error(r, 413, "body")


ODD_BUT_VALID = [
    (COMPLETIONS, {"prompt": "hi", "seed": 2**70, "temperature": 0.5}),
    (COMPLETIONS, {"prompt": "hi", "seed": -5, "temperature": 0.5, "top_k": 3}),
    (COMPLETIONS, {"prompt": ["hi"], "user": "someone", "stop": []}),
    (COMPLETIONS, {"prompt": [1, 2, 3], "max_tokens": None, "stream": False}),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}),
    (CHAT, {"messages": [{"role": "developer", "content": "Be brief."}, *HI], "n": 1}),
    (CHAT, {"messages": [*HI, {"role": "assistant", "content": "Hello"}, *HI], "max_completion_tokens": 2}),
    (CHAT, {"messages": HI, "logprobs": True, "top_logprobs": 2, "temperature": 0}),
]


@pytest.mark.parametrize(("path", "body"), ODD_BUT_VALID)
def test_odd_but_valid_requests_are_served(tiny_proxy, path, body):
    body = {"max_tokens": 3, **body}
    r = _post(tiny_proxy.url + path, body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1


def test_errors_through_the_openai_client(tiny_proxy):
    api = client(tiny_proxy)
    with pytest.raises(openai.BadRequestError) as bad:
        api.completions.create(model="tightwad", prompt="hi", n=2)
    assert bad.value.body["param"] == "n" and "n" in bad.value.body["message"]
    with pytest.raises(openai.NotFoundError) as missing:
        api.chat.completions.create(model="gpt-4", messages=HI)
    assert missing.value.body["param"] == "model" and missing.value.body["code"] == "model_not_found"


def test_model_may_name_the_target_or_tightwad_or_be_left_out(tiny, tiny_proxy):
    ref = tiny.ref.complete("hi", 2)
    for model in (tiny.ref.model, "tightwad", None, ""):
        body = {"prompt": "hi", "max_tokens": 2, "temperature": 0}
        if model is not None:
            body["model"] = model
        r = httpx.post(f"{tiny_proxy.url}/v1/completions", json=body, timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == ref.text and r.json()["model"] == tiny.ref.model
    listed = client(tiny_proxy).models.list()
    assert [m.id for m in listed.data] == [tiny.ref.model]


def test_unknown_routes_and_methods_are_openai_errors(tiny_proxy):
    r = httpx.get(f"{tiny_proxy.url}/v1/completions")
    assert r.status_code == 405 and set(r.json()["error"]) == ERROR_KEYS
    r = httpx.get(f"{tiny_proxy.url}/v1/nothing-here")
    assert r.status_code == 404 and set(r.json()["error"]) == ERROR_KEYS


# -- 4. API key ---------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["config", "env"])
def test_api_key_guards_the_api_but_not_health_or_metrics(proxies, tiny, where):
    if where == "config":
        server = proxies(tiny.draft.url, tiny.target.url, extra="  api_key: sesame-config\n")
        key = "sesame-config"
    else:
        key = "sesame-env"
        server = proxies(tiny.draft.url, tiny.target.url, env={"TIGHTWAD_API_KEY": key})
    url = server.url
    body = {"prompt": "hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key},
                    {"Authorization": f"Basic {key}"}):
        for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models"),
                             ("GET", "/v1/tightwad/status")):
            r = httpx.request(method, url + path, json=body if method == "POST" else None,
                              headers=headers, timeout=TIMEOUT)
            error = assert_openai_error(r, 401, None)
            assert error["code"] == "invalid_api_key"
    good = {"Authorization": f"Bearer {key}"}
    assert httpx.post(f"{url}/v1/completions", json=body, headers=good, timeout=TIMEOUT).status_code == 200
    assert httpx.get(f"{url}/v1/models", headers=good).status_code == 200
    assert httpx.get(f"{url}/v1/tightwad/status", headers=good).status_code == 200
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        client(server, api_key="wrong").completions.create(model="tightwad", prompt="hi", max_tokens=1)
    r = client(server, api_key=key).completions.create(model="tightwad", prompt="hi", max_tokens=1)
    assert r.usage.completion_tokens == 1


# -- 5. draft failures --------------------------------------------------------------------

LONG_PROMPT = "1, 2, 3, 4, 5, 6, 7, 8,"


def _fallbacks(server: ServerProcess, reason: str) -> tuple[int, float]:
    return (status(server)["fallbacks"].get(reason, 0),
            metric(server.url, "tightwad_fallbacks_total", reason=reason))


def test_draft_killed_mid_stream_falls_back_to_the_exact_target(proxies, tiny, tiny_pair):
    draft = llama_server(tiny_pair[0], "--parallel", "2").start()
    try:
        server = proxies(draft.url, tiny.target.url, max_draft_tokens=2)
        ref = tiny.ref.complete(LONG_PROMPT, 128)
        body = {"prompt": LONG_PROMPT, "max_tokens": 128, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, "return_tokens": True}
        events = []
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=TIMEOUT) as r:
            lines = r.iter_lines()
            for line in lines:
                if line:
                    events.append(json.loads(line[len("data: "):]))
                if len(events) == 2:
                    break
            draft.kill()
            events += [line[len("data: "):] for line in lines if line]
        assert events[-1] == "[DONE]"
        chunks = [e if isinstance(e, dict) else json.loads(e) for e in events[:-1]]
        assert streamed_tokens(chunks) == ref.tokens
        assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == ref.text
        figures = chunks[-1]["tightwad"]
        assert figures["fallbacks"] == ["unavailable"] and figures["drafted"] > 0
        assert _fallbacks(server, "unavailable") == (1, 1.0)
        state = status(server)
        assert state["drafters"][0]["healthy"] is False and state["requests"] == 1
        assert metric(server.url, "tightwad_backend_up", role="draft") == 0
    finally:
        draft.stop()


def test_draft_down_from_the_start_falls_back_and_is_used_once_up(proxies, tiny, tiny_pair):
    port = free_port()
    server = proxies(f"http://127.0.0.1:{port}", tiny.target.url, max_draft_tokens=2)
    api = client(server)
    for i, prompt in enumerate(PROMPTS[:2], start=1):
        ref = tiny.ref.complete(prompt, 16)
        r = api.completions.create(model="tightwad", prompt=prompt, max_tokens=16, temperature=0,
                                   extra_body={"return_tokens": True})
        assert r.model_extra["tightwad"]["tokens"] == ref.tokens
        assert r.model_extra["tightwad"]["fallbacks"] == ["unavailable"]
        assert r.model_extra["tightwad"]["drafted"] == 0
        assert _fallbacks(server, "unavailable") == (i, float(i))
    draft = llama_server(tiny_pair[0], "--parallel", "2", port=port).start()
    try:
        ref = tiny.ref.complete(PROMPTS[2], 16)
        r = api.completions.create(model="tightwad", prompt=PROMPTS[2], max_tokens=16, temperature=0,
                                   extra_body={"return_tokens": True})
        assert r.model_extra["tightwad"]["tokens"] == ref.tokens
        assert r.model_extra["tightwad"]["drafted"] > 0 and r.model_extra["tightwad"]["fallbacks"] == []
        state = status(server)
        assert state["drafters"][0]["tokenizer"] == "shared" and state["drafters"][0]["healthy"] is True
        assert state["fallbacks"] == {"unavailable": 2}
    finally:
        draft.stop()


def test_draft_down_without_fallback_is_an_error(proxies, tiny):
    server = proxies(f"http://127.0.0.1:{free_port()}", tiny.target.url, fallback=False)
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=TIMEOUT)
    error = assert_openai_error(r, 503, None)
    assert "draft" in error["message"] and "fallback_on_draft_failure" in error["message"]
    assert status(server)["requests"] == 0


class _HangingDraft:
    """A draft server that forwards everything to a real llama-server except the drafts
    themselves (``/completion``), or everything when ``hang_all``: it never answers those."""

    def __init__(self, upstream: str, *, hang_all: bool):
        release = self.release = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def _serve(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if hang_all or self.path.startswith("/completion"):
                    release.wait(120)
                    return
                r = httpx.request(self.command, upstream + self.path, content=body,
                                  headers={"Content-Type": "application/json"}, timeout=60)
                self.send_response(r.status_code)
                self.send_header("Content-Type", r.headers.get("content-type", "application/json"))
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            do_GET = do_POST = _serve

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("hang_all", [False, True], ids=["drafts-hang", "everything-hangs"])
def test_draft_timeout_falls_back_to_the_exact_target(proxies, tiny, hang_all):
    hanging = _HangingDraft(tiny.draft.url, hang_all=hang_all)
    try:
        server = proxies(hanging.url, tiny.target.url, draft_timeout_s=1)
        ref = tiny.ref.complete(PROMPTS[3], 16)
        started = time.monotonic()
        r = client(server).completions.create(model="tightwad", prompt=PROMPTS[3], max_tokens=16,
                                              temperature=0, extra_body={"return_tokens": True})
        assert time.monotonic() - started < 30
        assert r.model_extra["tightwad"]["tokens"] == ref.tokens
        assert r.model_extra["tightwad"]["fallbacks"] == ["timeout"]
        assert _fallbacks(server, "timeout") == (1, 1.0)
    finally:
        hanging.close()


# -- 6. client disconnects ---------------------------------------------------------------


def _evaluated(target: ServerProcess) -> float:
    return metric(target.url, "tightwad_verifier_tokens_evaluated_total")


def _wait_idle(server: ServerProcess, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while metric(server.url, "tightwad_requests_in_flight") != 0:
        assert time.monotonic() < deadline, "tightwad_requests_in_flight never returned to 0"
        time.sleep(0.2)


def _assert_target_stops(tiny: Stack, server: ServerProcess) -> None:
    _wait_idle(server)
    time.sleep(1.0)  # a verify call already sent may still be finishing
    before, rounds = _evaluated(tiny.target), metric(server.url, "tightwad_rounds_total")
    time.sleep(3.0)
    assert _evaluated(tiny.target) == before, "the target kept evaluating after the client left"
    assert metric(server.url, "tightwad_rounds_total") == rounds
    assert status(server)["requests"] >= 1


def test_client_disconnect_mid_stream_cancels_upstream_work(proxies, tiny):
    server = proxies(tiny.draft.url, tiny.target.url, max_draft_tokens=2,
                     extra="  max_tokens_limit: 4000\n")
    body = {"prompt": LONG_PROMPT, "max_tokens": 4000, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=TIMEOUT) as r:
        lines = r.iter_lines()  # dropping this iterator would close the connection already
        assert next(lines).startswith('data: {"id"')
        assert metric(server.url, "tightwad_requests_in_flight") == 1
        rounds = metric(server.url, "tightwad_rounds_total")
        time.sleep(0.5)
        assert metric(server.url, "tightwad_rounds_total") > rounds, "generation should go on meanwhile"
    # Leaving the block closes the connection mid-stream.
    _assert_target_stops(tiny, server)
    # Generating 4000 tokens takes far longer than this test waited: it was cancelled.
    assert status(server)["completion_tokens"] < 4000


def test_client_disconnect_while_waiting_for_a_whole_response(proxies, tiny):
    server = proxies(tiny.draft.url, tiny.target.url, max_draft_tokens=2,
                     extra="  max_tokens_limit: 4000\n")
    body = {"prompt": LONG_PROMPT, "max_tokens": 4000, "temperature": 0}
    before = _evaluated(tiny.target)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=httpx.Timeout(30, read=2.0))
    assert _evaluated(tiny.target) > before, "the request never reached the target"
    _assert_target_stops(tiny, server)


# -- 7. concurrency -----------------------------------------------------------------------


def test_sixteen_concurrent_streams_each_equal_their_target_alone(proxies, tiny):
    server = proxies(tiny.draft.url, tiny.target.url, max_draft_tokens=4)
    refs = {p: tiny.ref.complete(p, 24) for p in PROMPTS}
    assert len({tuple(r.tokens) for r in refs.values()}) == len(PROMPTS), "prompts must differ in output"
    api = client(server)

    def run(prompt: str) -> tuple[list[int], str]:
        chunks = list(api.completions.create(model="tightwad", prompt=prompt, max_tokens=24, temperature=0,
                                             stream=True, extra_body={"return_tokens": True}))
        return streamed_tokens(chunks), "".join(c.choices[0].text for c in chunks if c.choices)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        results = dict(zip(PROMPTS, pool.map(run, PROMPTS), strict=True))
    for prompt, (tokens, text) in results.items():
        assert tokens == refs[prompt].tokens, f"{prompt!r}: {tokens} != {refs[prompt].tokens}"
        assert text == refs[prompt].text
    _wait_idle(server)
    assert status(server)["requests"] == len(PROMPTS)


# -- 8. chat templates --------------------------------------------------------------------


def _chat_equals_target(server: ServerProcess, target: TargetAlone, model: Path, expect: str,
                        max_tokens: int) -> None:
    messages = [{"role": "user", "content": "Say hello in one short sentence."}]
    rendered = gguf_chat_prompt(model, messages)
    assert expect in rendered, "the GGUF template should add its own default system prompt"
    ref = target.chat(rendered, max_tokens)
    r = client(server).chat.completions.create(model="tightwad", messages=messages, max_tokens=max_tokens,
                                               temperature=0, extra_body={"return_tokens": True})
    assert r.usage.prompt_tokens == len(ref.prompt)
    assert r.model_extra["tightwad"]["tokens"] == ref.tokens
    assert r.choices[0].message.content == ref.text


def test_chat_uses_the_targets_own_template_smollm(servers, proxies, smollm):
    draft = servers("llama-server", smollm, "--parallel", "4")
    target = servers("verifier", smollm, "--parallel", "4", "--strict")
    server = proxies(draft.url, target.url)
    _chat_equals_target(server, TargetAlone(target.url), smollm, "named SmolLM", 12)


@pytest.mark.slow
def test_chat_uses_the_targets_own_template_qwen(servers, proxies, qwen_draft, qwen_target):
    draft = servers("llama-server", qwen_draft, "--parallel", "4")
    target = servers("verifier", qwen_target, "--parallel", "4", "--strict")
    server = proxies(draft.url, target.url)
    _chat_equals_target(server, TargetAlone(target.url), qwen_target, "You are Qwen", 6)

