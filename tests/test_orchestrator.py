"""The orchestrator's pure parts: the GGUF header reader, placement, the lifecycle table,
container specs, vendor-tool parsing and the `tightwad plan` dry run. No Docker here;
tests/test_orchestrator_docker.py runs the real thing against two daemons."""

from __future__ import annotations

import bisect
import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from tightwad import cli
from tightwad.config import parse_config
from tightwad.orchestrator import containers as ct
from tightwad.orchestrator.cluster import Orchestrator
from tightwad.orchestrator.cluster_status import WorkerStatus
from tightwad.orchestrator.containers import placement_label as _placement_label
from tightwad.orchestrator.errors import DoesNotFit, GgufError, InvalidTransition, UnknownModel
from tightwad.orchestrator.gguf import NeedMoreBytes, parse_header, read_header
from tightwad.orchestrator.hosts import ContainerState
from tightwad.orchestrator.lifecycle import TRANSITIONS, Lifecycle, State
from tightwad.orchestrator.placement import GIB, Device, footprint, place, placement_dict
from tightwad.orchestrator.vram import parse_nvidia_smi, parse_rocm_smi

QWEN_1_5B = "qwen2.5-coder-1.5b-instruct-q4_k_m"


def mixed_config(model_path: Path, *, cpu_gb: float = 1.0, nvidia_gb: float = 1.0,
                 amd_gb: float = 1.0) -> dict:
    """A CPU coordinator (nas) with a CUDA worker (gaming-pc, TLS) and a ROCm worker
    (workstation, ssh): the README's homelab, with small memory figures."""
    return {
        "hosts": {
            "nas": {"docker": "unix:///var/run/docker.sock", "cluster_address": "192.168.1.10",
                    "gpus": [{"vendor": "cpu", "name": "Ryzen 7 5700G (RAM)", "vram_gb": cpu_gb}]},
            "gaming-pc": {"docker": "tcp://192.168.1.20:2376",
                          "tls": {"ca": "ca.pem", "cert": "cert.pem", "key": "key.pem"},
                          "gpus": [{"vendor": "nvidia", "name": "RTX 4070 Ti Super",
                                    "vram_gb": nvidia_gb, "index": 0}]},
            "workstation": {"docker": "ssh://tightwad@192.168.1.30",
                            "gpus": [{"vendor": "amd", "name": "RX 7900 XTX", "vram_gb": amd_gb}]},
        },
        "coordinator": {"host": "nas", "port": 8080},
        "workers": [{"host": "gaming-pc"}, {"host": "workstation"}],
        "models": {"qwen2.5-coder-1.5b-instruct": {"path": str(model_path), "ctx_size": 4096,
                                                   "default": True}},
    }


@pytest.fixture(scope="module")
def qwen15(qwen_target: Path) -> Path:
    return qwen_target


# --- the GGUF header reader ---------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["smollm", "qwen_draft"])
def test_gguf_reader_matches_the_gguf_package(fixture: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(fixture)
    header = read_header(path)
    reference = GGUFReader(path)
    assert header.data_offset == reference.data_offset
    assert {t.name: (t.n_bytes, t.ggml_type, tuple(reversed(t.shape))) for t in header.tensors} == {
        t.name: (int(t.n_bytes), int(t.tensor_type), tuple(int(d) for d in reversed(t.shape)))
        for t in reference.tensors}
    assert header.arch("block_count") == int(reference.fields[
        f"{header.architecture}.block_count"].contents())
    assert header.n_vocab == len(reference.fields["tokenizer.ggml.tokens"].data)
    # the data section holds exactly the tensors (plus alignment padding)
    assert 0 <= Path(path).stat().st_size - header.data_offset - header.tensor_bytes < 32 * len(header.tensors)


def test_gguf_reader_needs_more_bytes_and_rejects_garbage(smollm: Path) -> None:
    data = smollm.read_bytes()[: 4 * 1024**2]
    header = parse_header(data)
    with pytest.raises(NeedMoreBytes) as exc:
        parse_header(data[: header.data_offset // 2])
    assert exc.value.needed > header.data_offset // 2
    with pytest.raises(GgufError, match="not a GGUF file"):
        parse_header(b"PK\x03\x04" + bytes(64))
    with pytest.raises(GgufError, match="version 7"):
        parse_header(b"GGUF" + struct.pack("<IQQ", 7, 0, 0))


def test_footprint_of_smollm_tied_embeddings(smollm: Path) -> None:
    header = read_header(smollm)
    fp = footprint(header, 2048)
    assert fp.n_layer == 30 and fp.n_ctx == 2048 and fp.n_vocab == 49152
    # SmolLM2 ties its output to token_embd: the offloaded output layer carries a copy.
    embd = next(t.n_bytes for t in header.tensors if t.name == "token_embd.weight")
    assert fp.output_tied_bytes == embd
    assert fp.unit_weights(30, on_cpu=True) == fp.output_bytes - embd
    assert fp.weights_bytes == header.tensor_bytes
    # KV: 30 layers x 2048 tokens x (K 64 + V 64) x 3 KV heads x 2 bytes (f16)
    assert fp.kv_bytes == 30 * 2048 * 128 * 3 * 2


# --- placement ---------------------------------------------------------------------------------


def _llama_cpp_devices(n_layer: int, ngl: int, split: tuple[int, ...]) -> list[int]:
    """llama.cpp's own layer -> device rule (src/llama-model.cpp, load_tensors), in float32:
    -1 for the CPU, else the index among the offload devices."""
    i_gpu_start = max(n_layer + 1 - ngl, 0)
    act = min(ngl, n_layer + 1)
    if ngl == 0:
        return [-1] * (n_layer + 1)
    sums = np.cumsum(np.array(split or (1,), dtype=np.float32), dtype=np.float32)
    splits = list(sums / sums[-1])
    out = []
    for il in range(n_layer + 1):
        if il < i_gpu_start or il - i_gpu_start >= act:
            out.append(-1)
        else:
            out.append(bisect.bisect_right(splits, float(np.float32(il - i_gpu_start) / np.float32(act))))
    return out


def _devices(cpu_gb: float, *gpus: tuple[str, str, float]) -> list[Device]:
    out = [Device("nas/0", "nas", "RAM", "cpu", "cpu", int(cpu_gb * GIB), int(cpu_gb * GIB))]
    for i, (host, vendor, gb) in enumerate(gpus):
        out.append(Device(f"{host}/0", host, f"{vendor} card", vendor, "rpc", int(gb * GIB),
                          int(gb * GIB), endpoint=f"10.0.0.{i + 2}:50052"))
    return out


@pytest.mark.parametrize("memory", [(1.0, 1.0, 0.75), (0.3, 2.0, 2.0), (4.0, 0.4, 0.4), (0.25, 0.8, 1.2)])
def test_placement_is_what_llama_cpp_will_do(qwen15: Path, memory: tuple[float, float, float]) -> None:
    fp = footprint(read_header(qwen15), 4096)
    cpu_gb, nv_gb, amd_gb = memory
    p = place(fp, _devices(cpu_gb, ("gaming-pc", "nvidia", nv_gb), ("workstation", "amd", amd_gb)),
              model="qwen")
    assert [s.device.kind for s in p.shares] == ["cpu", "rpc", "rpc"]
    assert sum(s.n_units for s in p.shares) == fp.n_layer + 1
    expected = []
    for k, s in enumerate(p.shares):
        expected += [k - 1] * s.n_units  # the CPU is -1, then the offload devices 0, 1
    assert _llama_cpp_devices(fp.n_layer, p.n_gpu_layers, p.tensor_split) == expected
    assert all(s.headroom_bytes >= 0 for s in p.shares), [s.headroom_bytes for s in p.shares]
    args = p.llama_args()
    assert args[:2] == ["-ngl", str(p.n_gpu_layers)]
    assert "--rpc" in args and args[args.index("--rpc") + 1] == "10.0.0.2:50052,10.0.0.3:50052"


def test_placement_follows_free_memory(qwen15: Path) -> None:
    fp = footprint(read_header(qwen15), 4096)
    small = place(fp, _devices(0.3, ("a", "nvidia", 1.0), ("b", "amd", 3.0)), model="m")
    big = place(fp, _devices(0.3, ("a", "nvidia", 3.0), ("b", "amd", 1.0)), model="m")
    assert small.tensor_split[0] < small.tensor_split[1]
    assert big.tensor_split[0] > big.tensor_split[1]


def test_does_not_fit_says_by_how_much(qwen15: Path) -> None:
    fp = footprint(read_header(qwen15), 4096)
    with pytest.raises(DoesNotFit) as exc:
        place(fp, _devices(0.2, ("gaming-pc", "nvidia", 0.5), ("workstation", "amd", 0.3)), model="qwen")
    assert "does not fit" in exc.value.message and "short by" in exc.value.message
    assert 0.4 * GIB < exc.value.short_bytes < 0.8 * GIB
    assert "gaming-pc/0 0.50 GiB" in exc.value.message


def test_plan_mixed_vendors_through_the_cli(qwen15: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """`tightwad plan --offline`: a CPU coordinator, a CUDA worker and a ROCm worker."""
    import yaml

    config_file = tmp_path / "cluster.yaml"
    config_file.write_text(yaml.safe_dump(mixed_config(qwen15)))
    assert cli.main(["-c", str(config_file), "plan", "--offline"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    table = [line.split()[0] for line in lines if line.startswith("  nas/") or line.startswith("  gaming")
             or line.startswith("  workstation")]
    assert table == ["nas/0", "gaming-pc/0", "workstation/0"]  # llama.cpp's order: CPU, --rpc order
    assert "cpu (coordinator)" in out and "rpc worker" in out
    args_line = next(line for line in lines if "coordinator args:" in line)
    assert "--rpc 192.168.1.20:50052,192.168.1.30:50052" in args_line
    assert "--tensor-split" in args_line
    assert "--gpus driver=nvidia,device=0" in out
    assert "--device /dev/kfd --device /dev/dri --group-add video --group-add render" in out
    assert "publish 192.168.1.20:50052" in out and "0.0.0.0" not in out.replace("-H 0.0.0.0", "")

    assert cli.main(["-c", str(config_file), "plan", "--offline", "--json"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    assert [d["vendor"] for d in data["devices"]] == ["cpu", "nvidia", "amd"]
    assert sum(d["n_units"] for d in data["devices"]) == data["n_layer"] + 1


def test_plan_refuses_a_model_that_does_not_fit(qwen15: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    config_file = tmp_path / "cluster.yaml"
    config_file.write_text(yaml.safe_dump(mixed_config(qwen15, cpu_gb=0.2, nvidia_gb=0.4, amd_gb=0.3)))
    assert cli.main(["-c", str(config_file), "plan", "--offline"]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "short by" in err and "Traceback" not in err


def test_unknown_model_lists_the_known_ones(qwen15: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    config_file = tmp_path / "cluster.yaml"
    config_file.write_text(yaml.safe_dump(mixed_config(qwen15)))
    for command in (["plan", "nope", "--offline"], ["swap", "nope"], ["start", "-m", "nope"]):
        assert cli.main(["-c", str(config_file), *command]) == 2
        err = capsys.readouterr().err
        assert "no model named 'nope'; known models: qwen2.5-coder-1.5b-instruct" in err
    with pytest.raises(UnknownModel):
        Orchestrator(parse_config(mixed_config(qwen15))).model("nope")


# --- the lifecycle state machine -------------------------------------------------------------


def test_transitions_table() -> None:
    assert TRANSITIONS == {
        State.STOPPED: {State.STARTING, State.SHUTDOWN},
        State.STARTING: {State.READY, State.STOPPING},
        State.READY: {State.STOPPING},
        State.STOPPING: {State.STOPPED},
        State.SHUTDOWN: set(),
    }
    seen: list[tuple[str, State]] = []
    lc = Lifecycle("m", on_change=lambda name, state: seen.append((name, state)))
    for state in (State.STARTING, State.READY, State.STOPPING, State.STOPPED):
        lc.to(state)
    assert [s for _, s in seen] == [State.STOPPED, State.STARTING, State.READY, State.STOPPING,
                                    State.STOPPED]


@pytest.mark.parametrize("path", [(State.READY,), (State.STOPPING,),
                                  (State.STARTING, State.STOPPED), (State.SHUTDOWN, State.STARTING)])
def test_invalid_transitions_are_refused(path: tuple[State, ...]) -> None:
    lc = Lifecycle("m")
    with pytest.raises(InvalidTransition):
        for state in path:
            lc.to(state)


def test_transition_is_a_compare_and_swap() -> None:
    lc = Lifecycle("m")
    lc.transition(State.STOPPED, State.STARTING)
    with pytest.raises(InvalidTransition, match="expected to be stopped"):
        lc.transition(State.STOPPED, State.STARTING)  # someone else already started it
    assert lc.state is State.STARTING


# --- container specs --------------------------------------------------------------------------


def test_worker_specs_per_vendor(qwen15: Path) -> None:
    config = parse_config(mixed_config(qwen15))
    nvidia = ct.worker_spec(config, "default", config.workers[0], config.workers[0].gpus[0])
    amd = ct.worker_spec(config, "default", config.workers[1], config.workers[1].gpus[0])
    assert nvidia.image == "tightwad/llama.cpp:cuda" and amd.image == "tightwad/llama.cpp:rocm"
    assert nvidia.gpu_requests == (("nvidia", ("0",)),) and not nvidia.devices
    assert amd.devices == ("/dev/kfd", "/dev/dri") and amd.group_add == ("video", "render")
    assert amd.environment["HIP_VISIBLE_DEVICES"] == "0" and not amd.gpu_requests
    assert nvidia.ports == {"50052/tcp": ("192.168.1.20", 50052)}  # the cluster address only
    assert amd.ports == {"50052/tcp": ("192.168.1.30", 50052)}
    assert nvidia.command[:1] == ("rpc-server",) and nvidia.restart == "unless-stopped"
    assert nvidia.labels[ct.LABEL_ROLE] == "rpc-worker" and nvidia.labels[ct.LABEL_GPU] == "0"
    assert nvidia.labels[ct.LABEL_VENDOR] == "nvidia" and nvidia.labels[ct.LABEL_MANAGED] == "true"

    cpu_config = parse_config({
        "hosts": {"a": {}, "b": {"docker": "ssh://b", "gpus": [{"vendor": "cpu", "vram_gb": 4}]}},
        "coordinator": {"host": "a"}, "workers": [{"host": "b"}],
        "models": {"m": {"path": "/m.gguf"}}})
    cpu = ct.worker_spec(cpu_config, "t", cpu_config.workers[0], cpu_config.workers[0].gpus[0])
    assert not cpu.gpu_requests and not cpu.devices and not cpu.group_add
    assert cpu.image == "tightwad/llama.cpp:cpu" and cpu.name == "tightwad-t-rpc-b-0"
    assert nvidia.network == "tightwad-net" and cpu.network == "tightwad-t-net"  # not the default bridge


def test_coordinator_command_llama_server_and_verifier(qwen15: Path) -> None:
    data = mixed_config(qwen15)
    config = parse_config(data)
    model = config.models["qwen2.5-coder-1.5b-instruct"]
    p = place(footprint(read_header(qwen15), 4096), Orchestrator(config)._configured_devices(),
              model=model.name, path=model.path)
    spec = ct.coordinator_spec(config, "default", model, p, kind="llama-server", host_port=8080)
    cmd = list(spec.command)
    assert cmd[:3] == ["llama-server", "-m", f"/models/{qwen15.name}"]
    assert cmd[cmd.index("--rpc") + 1] == "192.168.1.20:50052,192.168.1.30:50052"
    assert cmd[cmd.index("--tensor-split") + 1] == ",".join(map(str, p.tensor_split))
    assert cmd[cmd.index("-ngl") + 1] == str(p.n_gpu_layers)
    assert spec.ports == {"8080/tcp": ("192.168.1.10", 8080)}
    assert spec.volumes == {str(qwen15.parent): ("/models", "ro")}
    assert _placement_label(ContainerState("x", "x", "i", "running", 0, spec.labels, {}))["split"] == list(
        p.tensor_split)

    data["proxy"] = {"draft": {"url": "http://127.0.0.1:8081"},
                     "target": {"url": "http://nas:8080", "backend": "verifier"}}
    config = parse_config(data)
    assert ct.coordinator_kind(config) == "verifier"
    spec = ct.coordinator_spec(config, "default", model, p, kind="verifier", host_port=8080)
    assert spec.command[:3] == ("verifier", "--model", f"/models/{qwen15.name}")
    assert "--rpc" in spec.command and "--n-gpu-layers" in spec.command


def test_status_warns_about_public_rpc(qwen15: Path) -> None:
    config = parse_config(mixed_config(qwen15))
    o = Orchestrator(config)
    gpu = config.workers[0].gpus[0]

    def worker(ip: str) -> WorkerStatus:
        state = ContainerState("c", "w", "i", "running", 0, {}, {"50052/tcp": ((ip, 50052),)})
        return WorkerStatus("gaming-pc", gpu, f"{ip}:50052", True, state, True, "open")

    assert o._exposure_warnings([worker("192.168.1.20")]) == []
    assert "every interface" in o._exposure_warnings([worker("0.0.0.0")])[0]
    assert "public address 8.8.4.4" in o._exposure_warnings([worker("8.8.4.4")])[0]


# --- vendor tools ------------------------------------------------------------------------------


def test_parse_nvidia_smi_maps_container_indices_back() -> None:
    found = parse_nvidia_smi("0, 15000, 16376\n1, 100, 24564\n", [3, 1])
    assert found[1].free_bytes == 15000 * 1024**2 and found[3].total_bytes == 24564 * 1024**2
    with pytest.raises(ValueError):
        parse_nvidia_smi("NVIDIA-SMI has failed", [0])


def test_parse_rocm_smi() -> None:
    out = ('WARNING: something\n{"card0": {"VRAM Total Memory (B)": "25753026560", '
           '"VRAM Total Used Memory (B)": "1048576"}, "system": {}}')
    found = parse_rocm_smi(out, [0, 1])
    assert found == {0: found[0]} and found[0].free_bytes == 25753026560 - 1048576


def test_placement_dict_round_trips(qwen15: Path) -> None:
    fp = footprint(read_header(qwen15), 4096)
    p = place(fp, _devices(1, ("a", "nvidia", 1), ("b", "amd", 1)), model="m")
    d = placement_dict(p)
    assert d["tensor_split"] == list(p.tensor_split) and d["llama_args"] == p.llama_args()
