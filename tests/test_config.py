"""tightwad.config: the shipped example, defaults, every class of bad input, env overrides."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from tightwad import config_schema
from tightwad.config import (
    BackendConfig,
    Config,
    load_config,
    parse_config,
)
from tightwad.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "configs" / "cluster.yaml"

# The seed project's example, which must keep loading with the same meaning.
SEED = {
    "coordinator": {
        "host": "0.0.0.0",
        "port": 8080,
        "backend": "hip",
        "gpus": [{"name": "7900 XTX #0", "vram_gb": 24}],
    },
    "workers": [
        {
            "host": "192.168.1.100",
            "gpus": [{"name": "RTX 4070 Ti Super", "vram_gb": 16, "rpc_port": 50052}],
        }
    ],
    "models": {
        "qwen3-72b": {
            "path": "/models/Qwen3-72B-Q4_K_M.gguf",
            "ctx_size": 8192,
            "predict": 4096,
            "flash_attn": True,
            "default": True,
        }
    },
    "proxy": {
        "host": "0.0.0.0",
        "port": 8088,
        "max_draft_tokens": 8,
        "fallback_on_draft_failure": True,
        "draft": {
            "url": "http://192.168.1.50:11434",
            "model_name": "qwen3:8b",
            "backend": "ollama",
        },
        "target": {
            "url": "http://192.168.1.100:11434",
            "model_name": "qwen3:32b",
            "backend": "llamacpp",
        },
    },
    "binaries": {"coordinator": "/usr/local/bin/llama-server", "rpc_server": "rpc-server"},
}


def base() -> dict[str, Any]:
    """A small valid config that each bad case below breaks in one place."""
    return {
        "hosts": {
            "gpu-box": {
                "docker": "ssh://me@10.0.0.2",
                "gpus": [{"vendor": "nvidia", "name": "RTX 3060", "vram_gb": 12}],
            }
        },
        "coordinator": {"host": "127.0.0.1", "backend": "cpu"},
        "workers": [{"host": "gpu-box"}],
        "models": {"m": {"path": "/models/m.gguf", "default": True}},
        "proxy": {
            "draft": {"url": "http://127.0.0.1:8081"},
            "target": {"url": "http://127.0.0.1:8090"},
        },
    }


_STEP = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def with_value(path: str, value: Any, data: dict | None = None) -> dict:
    """A copy of ``data`` (default: base()) with ``path`` (``a.b[0].c``) set to ``value``."""
    data = copy.deepcopy(base() if data is None else data)
    steps = [name if name else int(index) for name, index in _STEP.findall(path)]
    node: Any = data
    for step in steps[:-1]:
        node = node[step]
    node[steps[-1]] = value
    return data


def without(path: str) -> dict:
    data = base()
    *parents, last = path.split(".")
    node: Any = data
    for step in parents:
        node = node[step]
    del node[last]
    return data


def config_error(data: Any, **kwargs: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(data, **kwargs)
    return info.value


# --- the shipped example ------------------------------------------------------


def test_example_loads_with_the_quick_start_values() -> None:
    config = load_config(EXAMPLE, env={})
    proxy = config.require_proxy()
    assert (proxy.host, proxy.port, proxy.mode) == ("127.0.0.1", 8088, "fast")
    assert len(proxy.drafters) == 1
    assert proxy.draft == BackendConfig(
        name="draft",
        role="draft",
        url="http://127.0.0.1:8081",
        backend="llamacpp",
        model_name="qwen2.5-coder-0.5b-instruct",
        timeout_s=10.0,
    )
    assert (proxy.target.url, proxy.target.backend) == ("http://127.0.0.1:8090", "verifier")
    assert proxy.target.model_name == "qwen2.5-coder-1.5b-instruct"
    assert proxy.target.timeout_s == proxy.request_timeout_s == 300.0
    assert proxy.api_key is None


def test_example_describes_a_cuda_a_rocm_and_a_cpu_machine() -> None:
    config = load_config(EXAMPLE, env={})
    coordinator = config.require_cluster()
    assert coordinator.backend == "cpu"
    assert config.hosts[coordinator.host].docker.startswith("unix://")
    assert sorted(w.backend for w in config.workers) == ["cuda", "rocm"]
    cuda_host = config.hosts["gaming-pc"]
    assert cuda_host.docker.startswith("tcp://") and cuda_host.tls is not None
    assert cuda_host.cluster_address == "192.168.1.20"  # taken from the docker URL
    assert config.rpc_endpoints() == ("192.168.1.20:50052", "192.168.1.30:50052")
    assert config.default_model is not None and config.default_model.flash_attn == "on"
    assert config.images.for_backend("rocm") == "tightwad/llama.cpp:rocm"


def test_example_documents_every_field() -> None:
    text = EXAMPLE.read_text()
    derived = {"source", "name", "role"}
    classes = [
        obj
        for obj in vars(config_schema).values()
        if dataclasses.is_dataclass(obj) and obj.__module__ == config_schema.__name__
    ]
    missing = {
        f"{cls.__name__}.{field.name}"
        for cls in classes
        for field in dataclasses.fields(cls)
        if field.name not in derived and not re.search(rf"\b{field.name}:", text)
    }
    assert not missing, f"configs/cluster.yaml does not document {sorted(missing)}"


def test_seed_config_keeps_its_meaning() -> None:
    config = parse_config(SEED)
    assert config.coordinator is not None
    assert (config.coordinator.host, config.coordinator.backend) == ("0.0.0.0", "rocm")
    assert config.coordinator.gpus[0].vendor == "amd"
    worker = config.workers[0]
    assert (worker.backend, worker.gpus[0].vendor) == (None, None)  # not managed by Tightwad
    assert config.rpc_endpoints() == ("192.168.1.100:50052",)
    assert config.model("qwen3-72b").ctx_size == 8192
    assert config.proxy is not None and config.proxy.draft.backend == "ollama"
    assert config.binaries.coordinator == "/usr/local/bin/llama-server"


# --- defaults -------------------------------------------------------------------


def test_empty_config_has_defaults_and_no_sections() -> None:
    for data in ({}, None):
        config = parse_config(data)
        assert config.proxy is None and config.coordinator is None
        assert config.workers == () and dict(config.hosts) == {} and dict(config.models) == {}
        assert config.verifier == config_schema.VerifierConfig(4096, 4, "fast", 20, None)
        assert config.binaries.rpc_server == "rpc-server"
        assert config.images.for_backend("cpu") == "tightwad/llama.cpp:cpu"
        assert config.default_model is None


@pytest.mark.parametrize(
    ("call", "key"),
    [(Config.require_proxy, "proxy"), (Config.require_cluster, "coordinator")],
)
def test_require_names_the_missing_section(call: Any, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        call(parse_config({}), "this command")
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: section is required for this command")


def test_require_cluster_wants_a_model() -> None:
    with pytest.raises(ConfigError, match=r"^models: at least one model"):
        parse_config({"coordinator": {}}).require_cluster()


def test_proxy_defaults() -> None:
    proxy = parse_config({"proxy": base()["proxy"]}).require_proxy()
    assert (proxy.host, proxy.port, proxy.max_draft_tokens) == ("127.0.0.1", 8088, None)
    assert proxy.adaptive_draft and not proxy.pipeline_drafts and proxy.draft_min_confidence == 0.0
    assert proxy.fallback_on_draft_failure is True and proxy.mode == "fast"
    assert (proxy.max_tokens_limit, proxy.max_request_bytes) == (4096, 1 << 20)
    assert (proxy.request_timeout_s, proxy.draft_timeout_s) == (300.0, 10.0)
    assert proxy.draft.name == "draft" and proxy.draft.backend == "llamacpp"
    assert proxy.draft.timeout_s == 10.0
    assert proxy.target.name == "target" and proxy.target.backend == "verifier"


def test_cluster_defaults_come_from_the_hosts_entry() -> None:
    config = parse_config(base())
    worker = config.workers[0]
    assert worker.backend == "cuda"
    assert worker.gpus == (config_schema.GpuConfig("RTX 3060", 12.0, "nvidia", 0, 50052),)
    assert config.coordinator == config_schema.CoordinatorConfig("127.0.0.1", 8080, "cpu", ())
    host = config.hosts["gpu-box"]
    assert (host.cluster_address, host.tls, host.insecure) == ("10.0.0.2", None, False)
    here = parse_config({"hosts": {"here": None}}).hosts["here"]
    assert (here.docker, here.cluster_address, here.gpus) == (
        "unix:///var/run/docker.sock",
        "127.0.0.1",
        (),
    )


def test_worker_gpu_inherits_from_the_host_by_index() -> None:
    data = with_value("workers[0].gpus", [{"index": 0, "rpc_port": 6000}])
    gpu = parse_config(data).workers[0].gpus[0]
    assert (gpu.name, gpu.vram_gb, gpu.vendor, gpu.rpc_port) == ("RTX 3060", 12.0, "nvidia", 6000)


def test_rpc_ports_default_by_position() -> None:
    data = with_value("workers[0]", {"host": "10.0.0.9", "gpus": [{"vram_gb": 8}] * 2})
    assert parse_config(data).rpc_endpoints() == ("10.0.0.9:50052", "10.0.0.9:50053")


def test_max_draft_tokens_auto_means_adaptive() -> None:
    proxy = parse_config(with_value("proxy.max_draft_tokens", "auto")).require_proxy()
    assert proxy.max_draft_tokens is None and proxy.adaptive_draft


def test_drafting_switches() -> None:
    proxy = parse_config(with_value("proxy.draft_min_confidence", 0.75)).require_proxy()
    assert (proxy.pipeline_drafts, proxy.parallel_drafters, proxy.draft_min_confidence) == (False, True, 0.75)
    proxy = parse_config(with_value("proxy.pipeline_drafts", True)).require_proxy()
    assert proxy.pipeline_drafts is True
    assert parse_config(with_value("proxy.draft_min_confidence", 0)).require_proxy().draft_min_confidence == 0.0


def test_drafters_list() -> None:
    drafters = [
        {"name": "small", "url": "http://a:1/", "timeout_s": 2},
        {"name": "ollama", "url": "https://b:2", "backend": "ollama", "model_name": "q:0.5b"},
    ]
    data = with_value("proxy.drafters", drafters)
    del data["proxy"]["draft"]
    proxy = parse_config(data).require_proxy()
    assert [d.name for d in proxy.drafters] == ["small", "ollama"]
    assert proxy.drafters[0].url == "http://a:1"  # trailing slash dropped
    assert [d.timeout_s for d in proxy.drafters] == [2.0, 10.0]
    assert proxy.draft is proxy.drafters[0]


def test_mode_hip_flash_attn_and_other_spellings() -> None:
    data = with_value("coordinator.backend", "HIP")
    data["models"]["m"]["flash_attn"] = False
    config = parse_config(data)
    assert config.coordinator is not None and config.coordinator.backend == "rocm"
    assert config.model("m").flash_attn == "off"


def test_verifier_mode_inherits_proxy_mode() -> None:
    assert parse_config(with_value("proxy.mode", "strict")).verifier.mode == "strict"
    data = with_value("verifier", {"mode": "strict"})
    assert parse_config(data).verifier.mode == "strict"  # stricter than the proxy is fine


def test_model_lookup_lists_known_models() -> None:
    config = parse_config(base())
    assert config.model("m").path == "/models/m.gguf"
    with pytest.raises(ConfigError) as info:
        config.model("gpt-5")
    assert info.value.key == "models"
    assert "'gpt-5'" in str(info.value) and "known models: m" in str(info.value)


def test_default_model_is_the_marked_or_the_only_one() -> None:
    data = base()
    data["models"]["n"] = {"path": "/models/n.gguf"}
    assert parse_config(data).default_model.name == "m"  # type: ignore[union-attr]
    data["models"]["m"]["default"] = False
    assert parse_config(data).default_model is None
    del data["models"]["n"]
    assert parse_config(data).default_model.name == "m"  # type: ignore[union-attr]


def test_config_is_frozen_and_hides_api_keys() -> None:
    data = with_value("proxy.api_key", "sk-secret")
    data["proxy"]["target"]["api_key"] = "sk-target"
    config = parse_config(data)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.proxy.port = 1  # type: ignore[misc, union-attr]
    assert config.proxy is not None and config.proxy.api_key == "sk-secret"
    assert "sk-secret" not in repr(config) and "sk-target" not in repr(config)


def test_registry_prefix_gets_a_slash() -> None:
    images = parse_config({"images": {"registry_prefix": "registry.lan:5000"}}).images
    assert images.for_backend("cuda") == "registry.lan:5000/tightwad/llama.cpp:cuda"


# --- bad input: each error names the exact dotted key ---------------------------

BAD: list[tuple[str, dict, str]] = [
    # wrong types
    ("port-type", with_value("proxy.port", "8088"), "proxy.port: expected an integer between 1 and 65535, got '8088'"),
    ("port-bool", with_value("proxy.port", True), "proxy.port: expected an integer"),
    ("port-range", with_value("proxy.port", 70000), "proxy.port: expected an integer between 1 and 65535, got 70000"),
    ("coordinator-port", with_value("coordinator.port", 0), "coordinator.port: expected an integer between 1 and 65535, got 0"),
    ("rpc-port", with_value("workers[0].gpus", [{"rpc_port": 65536}]), "workers[0].gpus[0].rpc_port: expected an integer between 1 and 65535"),
    ("bool", with_value("proxy.fallback_on_draft_failure", "sometimes"), "proxy.fallback_on_draft_failure: expected true or false, got 'sometimes'"),
    ("timeout", with_value("proxy.draft_timeout_s", 0), "proxy.draft_timeout_s: expected a number > 0, got 0"),
    ("timeout-type", with_value("proxy.request_timeout_s", "10s"), "proxy.request_timeout_s: expected a number > 0, got '10s'"),
    ("backend-timeout", with_value("proxy.target.timeout_s", -1), "proxy.target.timeout_s: expected a number > 0, got -1"),
    ("draft-tokens", with_value("proxy.max_draft_tokens", 0), "proxy.max_draft_tokens: expected an integer between 1 and 256 or 'auto', got 0"),
    ("draft-tokens-word", with_value("proxy.max_draft_tokens", "lots"), "proxy.max_draft_tokens: expected an integer between 1 and 256 or 'auto', got 'lots'"),
    ("pipeline", with_value("proxy.pipeline_drafts", "yes"), "proxy.pipeline_drafts: expected true or false, got 'yes'"),
    ("parallel-drafters", with_value("proxy.parallel_drafters", 1), "proxy.parallel_drafters: expected true or false, got 1"),
    ("min-confidence", with_value("proxy.draft_min_confidence", 1.5), "proxy.draft_min_confidence: expected a number <= 1.0, got 1.5"),
    ("min-confidence-negative", with_value("proxy.draft_min_confidence", -0.1), "proxy.draft_min_confidence: expected a number >= 0, got -0.1"),
    ("request-bytes", with_value("proxy.max_request_bytes", 10), "proxy.max_request_bytes: expected an integer between 1024 and 1073741824, got 10"),
    ("max-tokens", with_value("proxy.max_tokens_limit", 2.5), "proxy.max_tokens_limit: expected an integer between 1 and 1048576, got 2.5"),
    ("api-key-empty", with_value("proxy.draft.api_key", ""), "proxy.draft.api_key: expected a non-empty string, got ''"),
    ("model-name", with_value("proxy.target.model_name", 1.5), "proxy.target.model_name: expected a non-empty string, got 1.5"),
    ("section-type", with_value("proxy", ["draft"]), "proxy: expected a mapping, got a list"),
    ("workers-type", with_value("workers", {"host": "x"}), "workers: expected a list, got a mapping"),
    ("hosts-type", with_value("hosts", ["gpu-box"]), "hosts: expected a mapping of names to settings, got a list"),
    ("model-type", with_value("models.m", "/models/m.gguf"), "models.m: expected a mapping, got '/models/m.gguf'"),
    ("worker-item", with_value("workers[0]", "gpu-box"), "workers[0]: expected a mapping, got 'gpu-box'"),
    ("host-name", with_value("hosts", {"bad host": {}}), "hosts.bad host: expected a name of letters"),
    ("verifier-parallel", with_value("verifier", {"parallel": 0}), "verifier.parallel: expected an integer between 1 and 256, got 0"),
    ("verifier-threads", with_value("verifier", {"threads": "many"}), "verifier.threads: expected an integer between 1 and 1024, got 'many'"),
    ("image", with_value("images", {"cuda": ""}), "images.cuda: expected an image name, got ''"),
    ("binary", with_value("binaries", {"coordinator": 5}), "binaries.coordinator: expected a non-empty string, got 5"),
    # unknown keys, with a suggestion
    ("unknown-top", with_value("modles", {}), "modles: unknown key; did you mean 'models'?"),
    ("unknown-proxy", with_value("proxy.max_draft_token", 4), "proxy.max_draft_token: unknown key; did you mean 'max_draft_tokens'?"),
    ("unknown-nested", with_value("workers[0].gpu", []), "workers[0].gpu: unknown key; did you mean 'gpus'?"),
    ("unknown-in-place-of-required", with_value("proxy.target", {"uri": "http://a:1"}), "proxy.target.uri: unknown key; did you mean 'url'?"),
    ("unknown-for-draft", with_value("proxy", {"drafts": [], "target": {"url": "http://a:1"}}), "proxy.drafts: unknown key; did you mean 'draft'?"),
    ("unknown-no-suggestion", with_value("verifier", {"zzz": 1}), "verifier.zzz: unknown key; valid keys: ctx_size, parallel"),
    ("rpc-port-on-host", with_value("hosts.gpu-box.gpus[0].rpc_port", 50052), "hosts.gpu-box.gpus[0].rpc_port: unknown key"),
    # URLs
    ("url-word", with_value("proxy.draft.url", "foo"), "proxy.draft.url: expected a URL like http://host:port, got 'foo'"),
    ("url-scheme", with_value("proxy.target.url", "ftp://10.0.0.1:21"), "proxy.target.url: expected a URL like http://host:port, got 'ftp://10.0.0.1:21'"),
    ("url-port", with_value("proxy.target.url", "http://h:99999"), "proxy.target.url: expected a URL like http://host:port"),
    ("url-missing", with_value("proxy.target", {"backend": "verifier"}), "proxy.target.url: is required"),
    # enums, each listing the valid values for its role
    ("draft-backend", with_value("proxy.draft.backend", "verifier"), "proxy.draft.backend: expected one of llamacpp, ollama, openai, got 'verifier'"),
    ("target-backend", with_value("proxy.target.backend", "ollama"), "proxy.target.backend: expected one of verifier, openai-echo, llamacpp, got 'ollama'"),
    ("mode", with_value("proxy.mode", "turbo"), "proxy.mode: expected one of fast, strict, got 'turbo'"),
    ("verifier-mode", with_value("verifier", {"mode": "lax"}), "verifier.mode: expected one of fast, strict, got 'lax'"),
    ("coordinator-backend", with_value("coordinator.backend", "metal"), "coordinator.backend: expected one of cpu, cuda, rocm, got 'metal'"),
    ("vendor", with_value("hosts.gpu-box.gpus[0].vendor", "intel"), "hosts.gpu-box.gpus[0].vendor: expected one of nvidia, amd, cpu, got 'intel'"),
    ("flash-attn", with_value("models.m.flash_attn", "maybe"), "models.m.flash_attn: expected one of auto, on, off, got 'maybe'"),
    # hosts and Docker endpoints
    ("tcp-without-tls", with_value("hosts.gpu-box.docker", "tcp://10.0.0.2:2376"), "hosts.gpu-box.tls: is required for a tcp:// docker endpoint"),
    ("tls-with-insecure", with_value("hosts.gpu-box", {"docker": "tcp://h:2376", "insecure": True, "tls": {"ca": "a", "cert": "b", "key": "c"}}), "hosts.gpu-box.insecure: contradicts tls"),
    ("tls-on-ssh", with_value("hosts.gpu-box.tls", {"ca": "a", "cert": "b", "key": "c"}), "hosts.gpu-box.tls: only applies to tcp:// endpoints, not ssh://"),
    ("tls-part", with_value("hosts.gpu-box", {"docker": "tcp://h:2376", "tls": {"ca": "a", "cert": "b"}}), "hosts.gpu-box.tls.key: is required"),
    ("docker-url", with_value("hosts.gpu-box.docker", "http://10.0.0.2"), "hosts.gpu-box.docker: expected unix:///path, tcp://host:port or ssh://user@host, got 'http://10.0.0.2'"),
    ("bind-any", with_value("hosts.gpu-box.cluster_address", "0.0.0.0"), "hosts.gpu-box.cluster_address: 0.0.0.0 is not an address the coordinator can connect to"),
    ("loopback", with_value("hosts.gpu-box.cluster_address", "127.0.0.1"), "hosts.gpu-box.cluster_address: 127.0.0.1 is a loopback address"),
    ("host-typo", with_value("workers[0].host", "gpu-bx"), "workers[0].host: 'gpu-bx' is not a hosts entry; did you mean 'gpu-box'?"),
    ("no-such-device", with_value("workers[0].gpus", [{"index": 3}]), "workers[0].gpus[0].index: the host has no device 3 (it has 0)"),
    ("vendor-mismatch", with_value("workers[0]", {"host": "gpu-box", "backend": "rocm", "gpus": [{"index": 0}]}), "workers[0].gpus[0].vendor: nvidia device under backend rocm"),
    ("mixed-vendors", with_value("hosts.gpu-box.gpus", [{"vendor": "nvidia", "vram_gb": 8}, {"vendor": "amd", "vram_gb": 8}]), "workers[0].backend: is required: hosts.gpu-box has amd, nvidia devices"),
    ("gpus-required", with_value("workers[0]", {"host": "10.0.0.3"}), "workers[0].gpus: is required when host is not a hosts entry"),
    ("gpus-empty", with_value("workers[0].gpus", []), "workers[0].gpus: needs at least one device"),
    ("duplicate-index", with_value("hosts.gpu-box.gpus[1]", {"vendor": "nvidia", "vram_gb": 8, "index": 0}, with_value("hosts.gpu-box.gpus", [{"vendor": "nvidia", "vram_gb": 8}, {}])), "hosts.gpu-box.gpus[1].index: device 0 is already listed as hosts.gpu-box.gpus[0]"),
    ("negative-vram", with_value("workers", [{"host": "gpu-box"}, {"host": "10.0.0.3", "gpus": [{"vram_gb": -3}]}]), "workers[1].gpus[0].vram_gb: expected a number > 0, got -3"),
    ("vram-missing", with_value("hosts.gpu-box.gpus[0]", {"vendor": "amd"}), "hosts.gpu-box.gpus[0].vram_gb: is required"),
    ("duplicate-rpc-port", with_value("workers", [{"host": "10.0.0.3", "gpus": [{"vram_gb": 8, "rpc_port": 50052}]}, {"host": "10.0.0.3", "gpus": [{"vram_gb": 8, "index": 1, "rpc_port": 50052}]}]), "workers[1].gpus[0].rpc_port: port 50052 on host '10.0.0.3' is already used by workers[0].gpus[0].rpc_port"),
    ("port-clash-coordinator", with_value("workers[0]", {"host": "127.0.0.1", "gpus": [{"vram_gb": 8, "rpc_port": 8080}]}), "workers[0].gpus[0].rpc_port: port 8080 on host '127.0.0.1' is already used by coordinator.port"),
    ("device-clash", with_value("coordinator.host", "gpu-box", with_value("coordinator.backend", None)), "workers[0].gpus[0]: device 0 on host 'gpu-box' is already used by coordinator.gpus[0]"),
    # models
    ("model-path", with_value("models.m.path", "/models/m.bin"), "models.m.path: expected a path to a .gguf file, got '/models/m.bin'"),
    ("model-path-missing", with_value("models.m", {"ctx_size": 4096}), "models.m.path: is required"),
    ("two-defaults", with_value("models.n", {"path": "/models/n.gguf", "default": True}), "models.n.default: only one model may be the default, but models.m.default is true too"),
    ("predict", with_value("models.m.predict", -2), "models.m.predict: expected an integer between -1 and 16777216, got -2"),
    # drafters
    ("no-draft", with_value("proxy", {"target": {"url": "http://a:1"}}), "proxy.draft: is required (or list several under proxy.drafters)"),
    ("no-target", with_value("proxy", {"draft": {"url": "http://a:1"}}), "proxy.target: is required"),
    ("draft-and-drafters", with_value("proxy.drafters", [{"name": "a", "url": "http://a:1"}]), "proxy.drafters: give either proxy.draft or proxy.drafters, not both"),
    ("drafter-name", with_value("proxy", {"target": {"url": "http://t:1"}, "drafters": [{"url": "http://a:1"}]}), "proxy.drafters[0].name: is required"),
    ("drafter-name-chars", with_value("proxy", {"target": {"url": "http://t:1"}, "drafters": [{"name": "a b", "url": "http://a:1"}]}), "proxy.drafters[0].name: expected a name of letters"),
    ("duplicate-drafters", with_value("proxy", {"target": {"url": "http://t:1"}, "drafters": [{"name": "a", "url": "http://a:1"}, {"name": "a", "url": "http://b:1"}]}), "proxy.drafters[1].name: duplicate drafter name 'a' (also proxy.drafters[0].name)"),
    ("no-drafters", with_value("proxy", {"target": {"url": "http://t:1"}, "drafters": []}), "proxy.drafters: needs at least one drafter"),
    ("strict-needs-strict-verifier", with_value("verifier", {"mode": "fast"}, with_value("proxy.mode", "strict")), "verifier.mode: is fast but proxy.mode is strict"),
]  # fmt: skip


@pytest.mark.parametrize(("data", "message"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_input_names_the_key(data: dict, message: str) -> None:
    error = config_error(data)
    assert str(error).startswith(message), str(error)
    assert error.key == message.split(": ", 1)[0]


def test_base_is_valid() -> None:
    parse_config(base())


def test_top_level_must_be_a_mapping() -> None:
    error = config_error(["proxy"], source="x.yaml")
    assert str(error) == "x.yaml: expected a mapping at the top level, got a list"


# --- files, YAML and the environment --------------------------------------------


def write(tmp_path: Path, text: str, name: str = "cluster.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


PROXY_YAML = """\
proxy:
  draft: {url: "http://127.0.0.1:8081"}
  target: {url: "http://127.0.0.1:8090"}
"""


def test_missing_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value).startswith(f"{path}: no such config file")


def test_missing_file_from_env_says_so(tmp_path: Path) -> None:
    path = tmp_path / "gone.yaml"
    with pytest.raises(ConfigError, match="named by TIGHTWAD_CONFIG") as info:
        load_config(env={"TIGHTWAD_CONFIG": str(path)})
    assert info.value.key == str(path)


def test_default_path_is_configs_cluster_yaml(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^configs/cluster\.yaml: no such config file"):
        load_config(env={})
    (tmp_path / "configs").mkdir()
    write(tmp_path / "configs", PROXY_YAML)
    assert load_config(env={}).source == "configs/cluster.yaml"


def test_tightwad_config_selects_the_file(tmp_path: Path) -> None:
    chosen = write(tmp_path, PROXY_YAML.replace("proxy:\n", "proxy:\n  port: 9001\n"), "a.yaml")
    other = write(tmp_path, PROXY_YAML, "b.yaml")
    config = load_config(env={"TIGHTWAD_CONFIG": str(chosen)})
    assert config.source == str(chosen) and config.require_proxy().port == 9001
    # an explicit path wins over the variable
    assert load_config(other, env={"TIGHTWAD_CONFIG": str(chosen)}).require_proxy().port == 8088


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "proxy:\n  port: 8088\n  host: [oops\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    message = str(info.value)
    assert message.startswith(f"{path}: invalid YAML at line ")
    assert re.search(r"line [34], column \d+", message), message


def test_yaml_duplicate_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "models:\n  m: {path: /a.gguf}\n  m: {path: /b.gguf}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value) == (
        f"{path}: invalid YAML at line 3, column 3: duplicate key 'm' (first given at line 2)"
    )


def test_yaml_merge_keys_still_work(tmp_path: Path) -> None:
    text = """\
models:
  base: &base {path: /a.gguf, ctx_size: 2048}
  long:
    <<: *base
    ctx_size: 32768
"""
    models = load_config(write(tmp_path, text), env={}).models
    assert (models["long"].path, models["long"].ctx_size) == ("/a.gguf", 32768)


def test_validation_errors_from_a_file_name_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, PROXY_YAML.replace("8081", "99999"))
    with pytest.raises(ConfigError, match=r"^proxy\.draft\.url: expected a URL"):
        load_config(path, env={})


def test_empty_file_is_an_empty_config(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "# nothing yet\n"), env={})
    assert config.proxy is None and config.coordinator is None


def test_relative_tls_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    text = """\
hosts:
  box:
    docker: tcp://10.0.0.2:2376
    tls: {ca: certs/ca.pem, cert: /abs/cert.pem, key: certs/key.pem}
"""
    tls = load_config(write(tmp_path, text), env={}).hosts["box"].tls
    assert tls is not None
    assert (tls.ca, tls.cert, tls.key) == (
        str(tmp_path / "certs/ca.pem"),
        "/abs/cert.pem",
        str(tmp_path / "certs/key.pem"),
    )


def test_insecure_tcp_is_allowed_when_asked() -> None:
    host = parse_config({"hosts": {"h": {"docker": "tcp://10.0.0.5", "insecure": True}}}).hosts["h"]
    assert (host.insecure, host.tls, host.cluster_address) == (True, None, "10.0.0.5")


def test_env_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, PROXY_YAML)
    env = {"TIGHTWAD_PROXY_PORT": "9999", "TIGHTWAD_API_KEY": "sk-env", "TIGHTWAD_MODE": "strict"}
    config = load_config(path, env=env)
    proxy = config.require_proxy()
    assert (proxy.port, proxy.api_key, proxy.mode) == (9999, "sk-env", "strict")
    assert config.verifier.mode == "strict"
    # without them, the file's values
    proxy = load_config(path, env={}).require_proxy()
    assert (proxy.port, proxy.api_key, proxy.mode) == (8088, None, "fast")


def test_env_api_key_beats_the_file() -> None:
    data = with_value("proxy.api_key", "from-file")
    assert parse_config(data).require_proxy().api_key == "from-file"
    proxy = parse_config(data, env={"TIGHTWAD_API_KEY": "from-env"}).require_proxy()
    assert proxy.api_key == "from-env"
    assert parse_config(data, env={"TIGHTWAD_API_KEY": ""}).require_proxy().api_key == "from-file"


def test_env_mode_overrides_an_explicit_verifier_mode() -> None:
    data = with_value("verifier", {"mode": "fast"})
    assert parse_config(data, env={"TIGHTWAD_MODE": "strict"}).verifier.mode == "strict"


def test_parse_config_ignores_the_process_environment(monkeypatch: Any) -> None:
    monkeypatch.setenv("TIGHTWAD_PROXY_PORT", "9999")
    assert parse_config(base()).require_proxy().port == 8088


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("TIGHTWAD_PROXY_PORT", "http", "TIGHTWAD_PROXY_PORT: expected an integer between 1 and 65535, got 'http'"),
        ("TIGHTWAD_PROXY_PORT", "0", "TIGHTWAD_PROXY_PORT: expected an integer between 1 and 65535, got '0'"),
        ("TIGHTWAD_MODE", "turbo", "TIGHTWAD_MODE: expected one of fast, strict, got 'turbo'"),
    ],
)  # fmt: skip
def test_bad_env_values_name_the_variable(name: str, value: str, message: str) -> None:
    error = config_error(base(), env={name: value})
    assert str(error) == message and error.key == name
