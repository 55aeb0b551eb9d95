"""The processes a benchmark measures, started the same way by every script in bench/.

* the mock provider (tests/mock_provider.py), in a process of its own (bench/mock_process.py) so that its CPU
  never shares a GIL with what is measured;
* our plugin path: the plugin server started as Kong's start_cmd would (tests/kong_harness.py
  start_plugin_server) and the Kong-side harness in front of it, exactly as the tests drive them;
* LiteLLM Proxy, one process, with the same models pointed at the same mock.

Plus the /proc readings the benchmarks report: CPU seconds, RSS, peak RSS.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from kong_harness import KongHarness, PluginServerProcess, start_plugin_server  # noqa: E402

PROVIDER_KEY = "bench-provider-key"
CLIENT_KEY = "bench-key"
CONSUMERS = {CLIENT_KEY: {"id": "c1", "username": "bench"}}
# LiteLLM would otherwise fetch its price map from the internet at import, with retries: seconds, and noise
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- /proc ----------------------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far (its threads included, its children not)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (/proc/stat: everything but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def calibration_ms() -> float:
    """Milliseconds for a fixed pure-Python loop, best of 3: this VM's speed drifts (2× between runs an hour
    apart, with no other process busy), and this is the figure that tells two runs' machines apart."""
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        sum(i * i for i in range(500_000))
        best = min(best, time.perf_counter() - started)
    return best * 1000


def _status_mb(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb(pid: int) -> float:
    """Resident set size now, MB."""
    return _status_mb(pid, "VmRSS")


def peak_rss_mb(pid: int) -> float:
    """Peak resident set size since the process started (VmHWM), MB."""
    return _status_mb(pid, "VmHWM")


def descendants(pid: int) -> list[int]:
    """pid and every process below it: a server that forks workers is measured as a whole."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").iterdir():
            children = (task / "children").read_text().split()
            queue.extend(int(c) for c in children)
    return found


# -- the mock provider -------------------------------------------------------------------------------------
@dataclass
class MockProcess:
    proc: subprocess.Popen
    base_url: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def openai_base(self) -> str:
        return self.base_url + "/v1"


@contextmanager
def mock_provider(required_key: str = PROVIDER_KEY) -> Iterator[MockProcess]:
    """tests/mock_provider.py's MockProvider in a child process; yields once it listens."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "mock_process.py"), required_key],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line.startswith("http://"):
            raise RuntimeError(f"mock provider did not start (exit {proc.poll()})")
        yield MockProcess(proc, line.strip())
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- our plugin path ---------------------------------------------------------------------------------------
def gateway_config(aliases: dict[str, str], api_base: str) -> dict[str, Any]:
    """The route's plugin config: one alias per (client model name → openai/<mock model>)."""
    return {"models": [{"name": alias, "deployments": [{"model": f"openai/{model}", "api_base": api_base,
                                                         "api_key_env": "BENCH_PROVIDER_KEY"}]}
                       for alias, model in aliases.items()]}


@dataclass
class PluginPath:
    server: PluginServerProcess
    kong: KongHarness

    @property
    def url(self) -> str:
        return self.kong.url


@contextmanager
def plugin_path(aliases: dict[str, str], mock: MockProcess,
                env: dict[str, str] | None = None) -> Iterator[PluginPath]:
    """The plugin server and the Kong-side harness in front of it, as tests/conftest.py builds them.

    Call it from the main thread: the plugin server asks Linux to end it when the thread that started it
    ends (PR_SET_PDEATHSIG)."""
    sock = str(Path(tempfile.mkdtemp(prefix="bench-kong-")) / "llm-gateway.sock")
    server = start_plugin_server(sock, f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}",
                                 env={"BENCH_PROVIDER_KEY": PROVIDER_KEY, **(env or {})})
    try:
        with KongHarness(sock, gateway_config(aliases, mock.openai_base), CONSUMERS,
                         service_url=f"http://{server.listen}") as kong:
            yield PluginPath(server, kong)
    finally:
        server.stop()


# -- LiteLLM Proxy -----------------------------------------------------------------------------------------
def litellm_proxy_installed() -> bool:
    """Whether the `litellm[proxy]` extra (our `bench` extra) looks installed: its server's own imports are
    there. Cheap on purpose; a proxy that still fails to import says so when it starts (ProxyMissing)."""
    return all(importlib.util.find_spec(name) is not None for name in ("fastapi", "uvicorn", "backoff", "yaml"))


class ProxyMissing(RuntimeError):
    """LiteLLM Proxy could not start for want of a dependency of the `litellm[proxy]` extra."""


def proxy_env() -> dict[str, str]:
    """What we set so that the proxy does only the proxying: no remote price map, errors-only logging (which
    also silences uvicorn's per-request access log), no DB, no callbacks."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "LITELLM_MASTER_KEY")}
    return {**env, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}


# The proxy refuses to start without a master key; clients authenticate with it, as ours do with key-auth.
# Generated per run (the proxy wants the "sk-" prefix), so no key-shaped literal sits in the repository.
PROXY_MASTER_KEY = "sk-" + secrets.token_hex(16)
PROXY_SETTINGS = {"general_settings": {"master_key": PROXY_MASTER_KEY, "disable_spend_logs": True,
                                       "disable_spend_updates": True},
                  "litellm_settings": {"set_verbose": False, "json_logs": False}}


@dataclass
class ProxyProcess:
    proc: subprocess.Popen
    url: str
    log_path: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 120) -> None:
        """Until /health/liveliness answers 200."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                missing = "litellm[proxy]" in tail or "ModuleNotFoundError" in tail
                raise (ProxyMissing if missing else RuntimeError)(
                    f"LiteLLM Proxy exited {self.proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(f"{self.url}/health/liveliness", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"LiteLLM Proxy never became ready:\n{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self) -> str:
        return Path(self.log_path).read_text(errors="replace")[-3000:]


@contextmanager
def litellm_proxy(aliases: dict[str, str], mock: MockProcess) -> Iterator[ProxyProcess]:
    """`litellm --config <yaml> --num_workers 1`: the same aliases → the same mock. Not yet ready when
    yielded (it imports for seconds): call wait_ready(), so that other servers can start meanwhile."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-litellm-"))
    model_list = [{"model_name": alias, "litellm_params": {"model": f"openai/{model}", "api_base": mock.openai_base,
                                                            "api_key": PROVIDER_KEY}}
                  for alias, model in aliases.items()]
    config = workdir / "config.yaml"
    config.write_text(json.dumps({"model_list": model_list, **PROXY_SETTINGS}, indent=2))  # JSON is YAML
    port = free_port()
    exe = shutil.which("litellm", path=str(Path(sys.executable).parent)) or "litellm"
    log_path = str(workdir / "proxy.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([exe, "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
                                 "--num_workers", "1"], cwd=workdir, env=proxy_env(), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log)
    try:
        yield ProxyProcess(proc, f"http://127.0.0.1:{port}", log_path)
    finally:
        _stop(proc)
