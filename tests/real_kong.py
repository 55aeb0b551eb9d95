"""A real Kong 3.9 for the real-Kong tests, started one of two ways with the same settings:

* ``LocalKong``: a ``kong`` binary on this machine (``KONG_BIN``, else ``kong`` on PATH), DB-less, from a
  kong.conf generated out of ``Dockerfile.kong``'s own ``ENV KONG_*`` lines (so the two cannot drift), with a
  prefix of its own under a temporary directory, on free loopback ports.
* ``DockerKong``: the image built from ``Dockerfile.kong`` (docker SDK), on the host's network, with the same
  overrides passed as ``KONG_*`` variables.

Either way the declarative config is the shipped ``kong.yml`` plus test aliases and routes to a mock provider
on loopback, and the plugin server's ports are free ones passed on its start_cmd. Only what a test changes
differs from the image: ports, prefix, log level, and (root without a world-readable Python) the workers' user.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "kong-llm-gateway:test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dockerfile_env(path: Path = ROOT / "Dockerfile.kong") -> dict[str, str]:
    """Every ``ENV`` the image sets, in order (``ENV A=1 \\ B="x y"`` forms)."""
    env: dict[str, str] = {}
    logical, pending = [], ""
    for line in path.read_text().splitlines():
        if pending or line.startswith("ENV "):
            pending += line.rstrip("\\").strip() + " "
            if not line.rstrip().endswith("\\"):
                logical.append(pending)
                pending = ""
    for statement in logical:
        for word in shlex.split(statement)[1:]:
            name, _, value = word.partition("=")
            env[name] = value
    return env


def kong_settings(env: dict[str, str]) -> dict[str, str]:
    """kong.conf settings (lower-case names) from ``KONG_*`` variables, as Kong itself reads them."""
    return {name[5:].lower(): value for name, value in env.items() if name.startswith("KONG_")}


@dataclass
class Ports:
    proxy: int = field(default_factory=free_port)
    admin: int = field(default_factory=free_port)
    listener: int = field(default_factory=free_port)
    demo: int = field(default_factory=free_port)
    metrics: int = field(default_factory=free_port)


def declarative_config(listener_port: int, mock_base: str, extra_models: list[dict[str, Any]],
                       mutate: Any = None) -> dict[str, Any]:
    """The shipped kong.yml, pointed at this run's listener, with the test aliases and routes:

    * the LLM route gets the mock-backed aliases, and a rate limit and budgets no test reaches;
    * ``/tight``: the same chain with rate-limiting at 2 a minute (Kong's own 429);
    * ``/short``: a Service with a 4 s read_timeout (the routing deadline must fit in it);
    * ``/echo``: the same front door, but the Service is the mock itself, which records what Kong forwarded.
    """
    doc = yaml.safe_load((ROOT / "kong.yml").read_text())
    service = doc["services"][0]
    service["url"] = f"http://127.0.0.1:{listener_port}"
    plugins = {p["name"]: p for p in service["plugins"]}
    plugins["rate-limiting"]["config"]["minute"] = 1_000_000
    for budget in plugins["llm-gateway"]["config"].get("budgets") or ():
        budget["tokens"] = 100_000_000  # what the tests send must not run into the demo budgets
    plugins["llm-gateway"]["config"]["models"] += extra_models
    front_door = [copy.deepcopy(plugins["pre-function"]), copy.deepcopy(plugins["key-auth"])]

    def variant(name: str, path: str, plugins_: list[dict[str, Any]]) -> dict[str, Any]:
        return {"name": name, "paths": [path], "strip_path": True, "methods": ["POST"],
                "response_buffering": False, "plugins": plugins_}

    tight = copy.deepcopy(plugins["rate-limiting"])
    tight["config"]["minute"] = 2
    service["routes"].append(variant("tight", "/tight", [*copy.deepcopy(front_door), tight,
                                                         copy.deepcopy(plugins["llm-gateway"])]))
    short = copy.deepcopy(service)
    short.pop("plugins")  # its route brings its own chain
    short.update(name="short-read-timeout", read_timeout=4000,
                 routes=[variant("short", "/short", [*copy.deepcopy(front_door),
                                                     copy.deepcopy(plugins["llm-gateway"])])])
    echo = {"name": "echo", "url": mock_base, "retries": 0,
            "routes": [variant("echo", "/echo", copy.deepcopy(front_door))]}
    doc["services"] += [short, echo]
    if mutate is not None:
        mutate(doc)
    return doc


def _world_can_run(path: str) -> bool:
    """Can an unprivileged user (nginx's workers, which start the plugin server) run this file?"""
    real = Path(os.path.realpath(path))
    return all(os.stat(p).st_mode & 0o001 for p in [*reversed(real.parents), real])


class RealKong:
    """What the tests need of a Kong, whichever way it runs."""

    url: str
    ports: Ports

    def inside_get(self, url: str) -> tuple[int, str]:
        """GET from Kong's network namespace (the listener, the plugin server's metrics)."""
        response = httpx.get(url, timeout=10)
        return response.status_code, response.text

    def inside_post(self, url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str]:
        response = httpx.post(url, content=body, headers=headers, timeout=30)
        return response.status_code, response.text

    def plugin_server_pid(self) -> int | None:
        raise NotImplementedError

    def plugin_server_env(self) -> dict[str, str]:
        raise NotImplementedError

    def kill_plugin_server(self) -> int:
        raise NotImplementedError

    def reload(self, doc: dict[str, Any]) -> None:
        raise NotImplementedError

    def error_log(self) -> str:
        raise NotImplementedError

    def worker_pids(self) -> list[int]:
        raise NotImplementedError

    def start_refused(self, doc: dict[str, Any]) -> tuple[bool, str]:
        """Start another Kong with ``doc``: (refused, what it said)."""
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


def _proc_pids(*needles: bytes) -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if all(n in argv for n in needles):
            pids.append(int(pid))
    return pids


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


class LocalKong(RealKong):
    """``kong start`` of a local binary in a prefix of its own."""

    def __init__(self, binary: str, doc: dict[str, Any], ports: Ports, env: dict[str, str],
                 workers: int = 2) -> None:
        self.binary, self.ports, self.env = binary, ports, env
        self.workdir = Path(tempfile.mkdtemp(prefix="real-kong-"))
        os.chmod(self.workdir, 0o755)
        self.prefix = self.workdir / "prefix"
        self.conf = self.write_conf(self.prefix, ports, self.workdir / "kong.yml", workers)
        self.write_doc(doc)
        self.url = f"http://127.0.0.1:{ports.proxy}"

    def write_doc(self, doc: dict[str, Any], path: Path | None = None) -> Path:
        path = path or self.workdir / "kong.yml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    def _server_command(self) -> Path:
        """The plugin as Kong's workers run it: this checkout's code, with this interpreter."""
        wrapper = self.workdir / "kong-llm-gateway"
        wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={shlex.quote(str(ROOT / 'kong-plugins'))} "
                           f"exec {shlex.quote(sys.executable)} -m llm_gateway \"$@\"\n")
        wrapper.chmod(0o755)
        return wrapper

    def write_conf(self, prefix: Path, ports: Ports, doc_path: Path, workers: int) -> Path:
        settings = kong_settings(dockerfile_env())
        command = self._server_command()
        sock = prefix / "llm-gateway.sock"
        settings.update({
            "prefix": str(prefix),
            "declarative_config": str(doc_path),
            "pluginserver_llm_gateway_socket": str(sock),
            "pluginserver_llm_gateway_start_cmd": (
                f"{command} serve --socket {sock} --listen 127.0.0.1:{ports.listener} "
                f"--demo-listen 127.0.0.1:{ports.demo} --metrics-listen 127.0.0.1:{ports.metrics}"),
            "pluginserver_llm_gateway_query_cmd": f"{command} dump",
            "proxy_listen": f"127.0.0.1:{ports.proxy}",
            "admin_listen": f"127.0.0.1:{ports.admin}",
            "proxy_access_log": "logs/access.log",
            "proxy_error_log": "logs/error.log",
            "error_template_json": str(ROOT / "docker" / "kong-error-template.json"),
            "log_level": "info",  # the plugin server's own lines reach Kong's error log at INFO
            "nginx_worker_processes": str(workers),
            # this build: the router and wasm the image has but a source build here may not
            "router_flavor": "traditional",
            "wasm": "off",
            "admin_gui_listen": "off",  # Kong Manager's fixed ports would clash with a second Kong (start_refused)
        })
        if os.geteuid() == 0 and not _world_can_run(sys.executable):
            settings["nginx_user"] = "root root"  # workers as nobody could not run a Python under /root
        conf = prefix.parent / f"{prefix.name}.conf"
        conf.write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        return conf

    def _kong(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        # the tests' own plugin servers run one process (conftest.py): Kong's runs the default, one per core,
        # unless this Kong's env says otherwise
        inherited = {k: v for k, v in os.environ.items() if k != "LLM_GATEWAY_PROCESSES"}
        return subprocess.run([self.binary, *args], capture_output=True, text=True, timeout=timeout,
                              env={**inherited, **self.env})

    def start(self) -> LocalKong:
        result = self._kong("start", "-c", str(self.conf))
        if result.returncode != 0:
            raise RuntimeError(f"kong start failed:\n{result.stdout}\n{result.stderr}\n{self.error_log()[-4000:]}")
        return self

    def stop(self) -> None:
        self._stop_prefix(self.prefix)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _stop_prefix(self, prefix: Path) -> None:
        """`kong stop`, then wait for nginx's master and workers to be gone (a graceful stop returns before its
        workers have exited), and kill whatever of this Kong is left: its workers would otherwise outlive the
        test, orphaned, their event loops retrying the master's broker for ever."""
        processes = set(_proc_pids(str(prefix).encode()))  # the master (its -p argument) and plugin servers
        for pid in list(processes):
            with contextlib.suppress(OSError):
                processes.update(int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split())
        self._kong("stop", "-p", str(prefix), timeout=60)
        deadline = time.monotonic() + 15
        while processes and time.monotonic() < deadline:
            processes = {pid for pid in processes if _running(pid)}
            time.sleep(0.1)
        for pid in processes:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def error_log(self) -> str:
        path = self.prefix / "logs" / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def plugin_server_pid(self) -> int | None:
        pids = _proc_pids(b"llm_gateway", b"serve", str(self.prefix).encode())
        return pids[0] if pids else None

    def plugin_server_env(self) -> dict[str, str]:
        pid = self.plugin_server_pid()
        if pid is None:
            return {}
        pairs = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        return dict(p.decode(errors="replace").split("=", 1) for p in pairs if b"=" in p)

    def kill_plugin_server(self) -> int:
        pid = self.plugin_server_pid()
        assert pid is not None, "no plugin server running"
        os.kill(pid, signal.SIGKILL)
        return pid

    def worker_pids(self) -> list[int]:
        master = int((self.prefix / "pids" / "nginx.pid").read_text())
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        return [int(pid) for pid in children
                if b"nginx: worker process" in Path(f"/proc/{pid}/cmdline").read_bytes()]

    def reload(self, doc: dict[str, Any]) -> None:
        self.write_doc(doc)
        result = self._kong("reload", "-c", str(self.conf))
        if result.returncode != 0:
            raise RuntimeError(f"kong reload failed:\n{result.stdout}\n{result.stderr}")

    def start_refused(self, doc: dict[str, Any]) -> tuple[bool, str]:
        other = self.workdir / "refused"
        conf = self.write_conf(other, Ports(), self.write_doc(doc, self.workdir / "refused.yml"), 1)
        result = self._kong("start", "-c", str(conf))
        log = (other / "logs" / "error.log")
        said = result.stdout + result.stderr + (log.read_text(errors="replace") if log.exists() else "")
        if result.returncode == 0:
            self._stop_prefix(other)
        return result.returncode != 0, said


class DockerKong(RealKong):
    """The image of ``Dockerfile.kong``, on the host's network so that loopback is shared with the tests."""

    def __init__(self, engine: Any, image: Any, doc: dict[str, Any], ports: Ports, env: dict[str, str]) -> None:
        self.engine, self.image, self.ports, self.env = engine, image, ports, env
        self.url = f"http://127.0.0.1:{ports.proxy}"
        self.container = self._run(doc, ports)

    @staticmethod
    def _overrides(ports: Ports) -> dict[str, str]:
        server = "/opt/llm-gateway/bin/kong-llm-gateway"
        sock = "/usr/local/kong/llm-gateway.sock"
        return {
            "KONG_PLUGINSERVER_LLM_GATEWAY_START_CMD": (
                f"{server} serve --socket {sock} --listen 127.0.0.1:{ports.listener} "
                f"--demo-listen 127.0.0.1:{ports.demo} --metrics-listen 127.0.0.1:{ports.metrics}"),
            "KONG_PROXY_LISTEN": f"127.0.0.1:{ports.proxy}",
            "KONG_ADMIN_LISTEN": f"127.0.0.1:{ports.admin}",
            "KONG_LOG_LEVEL": "info",
            "KONG_NGINX_WORKER_PROCESSES": "2",
            "KONG_ADMIN_GUI_LISTEN": "off",  # host network: Kong Manager's fixed ports would clash with a second Kong
        }

    def _put(self, container: Any, doc: dict[str, Any]) -> None:
        import io
        import tarfile

        data = yaml.safe_dump(doc, sort_keys=False).encode()
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w") as tar:
            info = tarfile.TarInfo("kong.yml")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
        container.put_archive("/kong", archive.getvalue())

    def _run(self, doc: dict[str, Any], ports: Ports, detach_check: bool = False) -> Any:
        container = self.engine.containers.create(self.image.id, network_mode="host",
                                                  environment={**self.env, **self._overrides(ports)})
        self._put(container, doc)
        container.start()
        return container

    def _exec(self, script: str) -> str:
        result = self.container.exec_run(["/opt/llm-gateway/bin/python", "-c", script])
        return result.output.decode(errors="replace")

    def plugin_server_pid(self) -> int | None:
        out = self._exec(_FIND_SERVER + "print(server() or '')").strip()
        return int(out) if out.isdigit() else None

    def plugin_server_env(self) -> dict[str, str]:
        import json

        out = self._exec(_FIND_SERVER + "import json\npid = server()\n"
                         "pairs = open(f'/proc/{pid}/environ','rb').read().split(b'\\0') if pid else []\n"
                         "print(json.dumps(dict(p.decode().split('=',1) for p in pairs if b'=' in p)))")
        return json.loads(out.strip().splitlines()[-1])

    def kill_plugin_server(self) -> int:
        out = self._exec(_FIND_SERVER + "import os, signal\npid = server()\nos.kill(pid, signal.SIGKILL)\n"
                         "print(pid)")
        return int(out.strip())

    def worker_pids(self) -> list[int]:
        out = self._exec("import os\nfor p in filter(str.isdigit, os.listdir('/proc')):\n"
                         "    try:\n        a = open(f'/proc/{p}/cmdline','rb').read()\n"
                         "    except OSError:\n        continue\n"
                         "    if b'nginx: worker process' in a: print(p)")
        return [int(line) for line in out.split()]

    def reload(self, doc: dict[str, Any]) -> None:
        self._put(self.container, doc)
        result = self.container.exec_run(["kong", "reload"])
        if result.exit_code != 0:
            raise RuntimeError(f"kong reload failed: {result.output.decode(errors='replace')}")

    def error_log(self) -> str:
        return self.container.logs().decode(errors="replace")

    def start_refused(self, doc: dict[str, Any]) -> tuple[bool, str]:
        container = self._run(doc, Ports())
        try:
            try:
                status = container.wait(timeout=60)["StatusCode"]
            except Exception:  # still running after a minute: Kong took the file
                return False, container.logs().decode(errors="replace")
            return status != 0, container.logs().decode(errors="replace")
        finally:
            container.remove(force=True)

    def stop(self) -> None:
        self.container.remove(force=True)


_FIND_SERVER = """
import os
def server():
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            argv = open(f'/proc/{pid}/cmdline', 'rb').read().split(b'\\0')
        except OSError:
            continue
        if any(a.endswith(b'kong-llm-gateway') for a in argv) and b'serve' in argv:
            return int(pid)
"""


def local_binary() -> tuple[str | None, str]:
    """(the kong binary, or None with the reason)."""
    configured = os.environ.get("KONG_BIN")
    if configured:
        return (configured, "") if os.access(configured, os.X_OK) else (None, f"KONG_BIN={configured} is not "
                                                                          "an executable")
    found = shutil.which("kong")
    return (found, "") if found else (None, "no kong binary (set KONG_BIN, or put kong on PATH)")


def wait_until_serving(kong: RealKong, body: dict[str, Any], key: str, timeout: float = 90) -> list[tuple]:
    """Poll from the moment Kong is up until the plugin server answers; every answer seen on the way."""
    seen: list[tuple] = []
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=30) as http:
        while time.monotonic() < deadline:
            try:
                response = http.post(f"{kong.url}/v1/chat/completions", json=body, headers={"apikey": key})
                seen.append((response.status_code, response.headers.get("content-type", ""), response.text[:500]))
                if response.status_code == 200:
                    return seen
            except httpx.HTTPError as exc:
                seen.append((0, "", type(exc).__name__))
            time.sleep(0.2)
    raise TimeoutError(f"Kong never served within {timeout} s; last answers: {seen[-5:]}\n{kong.error_log()[-4000:]}")
