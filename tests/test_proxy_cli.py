"""``tightwad proxy start|status|stop`` as a user runs them, against real servers.

The CLI runs as a subprocess in an empty directory with ``TIGHTWAD_RUN_DIR``
pointing at a temporary directory, in front of the tiny pair (a llama-server
draft and a verifier target).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from servers import free_port
from test_proxy_api import Stack, client, status, write_config


@pytest.fixture(scope="module")
def tiny(servers) -> Stack:
    from tightwad import tinymodels

    draft, target = tinymodels.write_pair("medium")
    return Stack(servers("llama-server", draft, "--parallel", "4"),
                 servers("verifier", target, "--parallel", "4", "--strict"))


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    run_dir = tmp_path / "run"
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TIGHTWAD_")}
    return {**environ, "TIGHTWAD_RUN_DIR": str(run_dir)}


def tightwad(*args: str, env: dict[str, str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tightwad.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def config(tmp_path, tiny) -> Iterator[Path]:
    port = free_port()
    path = write_config(tmp_path / "cluster.yaml", draft_url=tiny.draft.url, target_url=tiny.target.url,
                        port=port)
    yield path
    # Whatever a test left running is stopped through its pid file.
    run_dir = tmp_path / "run"
    pid_file = run_dir / "proxy.pid"
    if pid_file.exists():
        subprocess.run([sys.executable, "-m", "tightwad.cli", "-c", str(path), "proxy", "stop"],
                       env={**os.environ, "TIGHTWAD_RUN_DIR": str(run_dir)}, timeout=60)


def _port(config: Path) -> int:
    return int(re.search(r"port: (\d+)", config.read_text()).group(1))


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.split()[2] != "Z"


def test_start_status_stop(tmp_path, env, config, tiny):
    cwd = tmp_path
    url = f"http://127.0.0.1:{_port(config)}"
    started = tightwad("-c", str(config), "proxy", "start", env=env, cwd=cwd)
    assert started.returncode == 0, started.stdout + started.stderr
    draft_where, target_where = (s.url.split("://")[1] for s in (tiny.draft, tiny.target))
    assert f"✓ Draft model healthy (medium-draft @ {draft_where})" in started.stdout, started.stdout
    assert f"✓ Target model healthy (medium-target @ {target_where})" in started.stdout, started.stdout
    assert "✓ Proxy running on" in started.stdout

    run_dir = Path(env["TIGHTWAD_RUN_DIR"])
    pid = int((run_dir / "proxy.pid").read_text())
    assert _alive(pid) and (run_dir / "proxy.log").exists()
    assert httpx.get(f"{url}/health").status_code == 200
    again = tightwad("-c", str(config), "proxy", "start", env=env, cwd=cwd)
    assert again.returncode == 0 and int((run_dir / "proxy.pid").read_text()) == pid

    proxy = types.SimpleNamespace(url=url)
    client(proxy).completions.create(model="tightwad", prompt="The quick brown fox", max_tokens=16,
                                     temperature=0)
    figures = status(proxy)
    shown = tightwad("-c", str(config), "proxy", "status", env=env, cwd=cwd)
    assert shown.returncode == 0, shown.stderr
    rate = f"{figures['acceptance_rate']:.1%}"
    assert re.search(rf"acceptance rate\s+{re.escape(rate)} \({figures['accepted_tokens']}/"
                     rf"{figures['drafted_tokens']} drafted tokens accepted\)", shown.stdout), shown.stdout
    assert re.search(rf"rounds\s+{figures['rounds']}\b", shown.stdout), shown.stdout
    assert re.search(rf"tokens saved\s+{figures['tokens_saved']}\b", shown.stdout), shown.stdout
    assert figures["rounds"] > 0 and figures["drafted_tokens"] > 0

    stopped = tightwad("-c", str(config), "proxy", "stop", env=env, cwd=cwd)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert not _alive(pid) and not (run_dir / "proxy.pid").exists()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{url}/health", timeout=2)
    again = tightwad("-c", str(config), "proxy", "stop", env=env, cwd=cwd)
    assert again.returncode == 0 and "not running" in again.stdout


def test_tightwad_config_selects_the_file(tmp_path, env, config):
    cwd = tmp_path
    run_dir = Path(env["TIGHTWAD_RUN_DIR"])
    # No -c, no configs/cluster.yaml here: the file comes from TIGHTWAD_CONFIG alone.
    missing = tightwad("proxy", "status", env=env, cwd=cwd)
    assert missing.returncode != 0 and "no such config file" in missing.stderr
    with_env = {**env, "TIGHTWAD_CONFIG": str(config)}
    started = tightwad("proxy", "start", env=with_env, cwd=cwd)
    assert started.returncode == 0, started.stdout + started.stderr
    assert f"127.0.0.1:{_port(config)}" in started.stdout
    shown = tightwad("proxy", "status", env=with_env, cwd=cwd)
    assert shown.returncode == 0 and "acceptance rate" in shown.stdout, shown.stdout + shown.stderr
    pid = int((run_dir / "proxy.pid").read_text())
    stopped = tightwad("proxy", "stop", env=with_env, cwd=cwd)
    assert stopped.returncode == 0 and not _alive(pid)


def test_start_refuses_without_a_target(tmp_path, env, tiny):
    path = write_config(tmp_path / "cluster.yaml", draft_url=tiny.draft.url,
                        target_url=f"http://127.0.0.1:{free_port()}", port=free_port())
    result = tightwad("-c", str(path), "proxy", "start", env=env, cwd=tmp_path)
    assert result.returncode != 0
    assert "✗ Target model NOT reachable" in result.stdout and "target must be up" in result.stderr
    assert not (Path(env["TIGHTWAD_RUN_DIR"]) / "proxy.pid").exists()


@pytest.mark.parametrize(("where", "edit", "key"), [
    ("proxy", ("  port:", "  prot:"), "proxy.prot"),
    ("draft", ("    backend: llamacpp", "    backend: llama"), "proxy.draft.backend"),
    ("target", ("    url: http", "    ur1: http"), "proxy.target.ur1"),
])
def test_a_bad_config_key_is_named(tmp_path, env, tiny, where, edit, key):
    path = write_config(tmp_path / "cluster.yaml", draft_url=tiny.draft.url, target_url=tiny.target.url,
                        port=free_port())
    old, new = edit
    text = path.read_text()
    if where == "target":
        head, _, tail = text.partition("  target:")
        text = head + "  target:" + tail.replace(old, new, 1)
    else:
        text = text.replace(old, new, 1)
    path.write_text(text)
    for args, extra in ((["-c", str(path)], {}), ([], {"TIGHTWAD_CONFIG": str(path)})):
        for command in ("start", "status"):
            result = tightwad(*args, "proxy", command, env={**env, **extra}, cwd=tmp_path)
            assert result.returncode != 0
            assert key in result.stderr, result.stderr
            assert "Traceback" not in result.stderr
    assert not (Path(env["TIGHTWAD_RUN_DIR"]) / "proxy.pid").exists()
