"""Access events per second through a plugin server, ours against kong-pdk's stock server, same driver.

The driver plays Kong's bridge loop (mp_rpc.lua) over the real Unix socket with a pool of connections and
answers the PDK calls an access phase makes (ours: consumer, set_header; the stock one also reads the body). It
reports events/s with the driver included (as the research notes measured the stock server) and the server's
own CPU per event, read from /proc, which is the figure that matters on a Kong node.

    python bench/plugin_server_events.py [--events 3000] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
from stack import cpu_seconds

ROOT = Path(__file__).resolve().parents[1]
BODY = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "x" * 900}]}).encode()
CONSUMER = {"id": "8f3a6c1e-8d2b-4b7e-9a57-1c0d9e2f4a11", "username": "alice"}
ANSWERS = {"kong.request.get_raw_body": ("plugin.Step", BODY),
           "kong.client.get_consumer": ("plugin.StepConsumer", CONSUMER)}


class Pool:
    """A LIFO pool of MessagePack-RPC connections, like OpenResty's cosocket keepalive pool."""

    def __init__(self, path: str) -> None:
        self.path, self.idle, self.msg_id = path, [], 0

    async def call(self, method: str, *params: object) -> object:
        if self.idle:
            reader, writer, unpacker = self.idle.pop()
        else:
            reader, writer = await asyncio.open_unix_connection(self.path)
            unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        self.msg_id += 1
        msg_id = self.msg_id
        writer.write(msgpack.packb([0, msg_id, method, list(params)], use_bin_type=True))
        while True:
            for message in unpacker:
                if message[0] == 1 and message[1] == msg_id:
                    self.idle.append((reader, writer, unpacker))
                    if message[2] is not None:
                        raise RuntimeError(message[2])
                    return message[3]
            unpacker.feed(await reader.read(65536))


async def access_event(pool: Pool, instance_id: int) -> None:
    reply = await pool.call("plugin.HandleEvent", {"InstanceId": instance_id, "EventName": "access"})
    while reply["Data"] != "ret":
        step, answer = ANSWERS.get(reply["Data"]["Method"], ("plugin.Step", None))
        reply = await pool.call(step, {"EventId": reply["EventId"], "Data": answer})


async def drive(socket_path: str, pid: int, config: dict, events: int, concurrency: int) -> dict[str, float]:
    pool = Pool(socket_path)
    name = config.pop("__name")
    conf = json.dumps(dict(config, __plugin_id="bench", __seq__=1, __key__="bench"))
    instance = (await pool.call("plugin.StartInstance", {"Name": name, "Config": conf}))["Id"]
    for _ in range(200):  # warm up
        await access_event(pool, instance)
    remaining = events

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await access_event(pool, instance)

    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    return {"events_per_s": events / elapsed, "server_cpu_ms_per_event": 1000 * cpu / events}


def wait_for(path: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"server did not start: {proc.args}")
        time.sleep(0.05)
    time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    prefix = tempfile.mkdtemp(prefix="bench-ps-")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "kong-plugins"))
    ours_config = {"__name": "llm-gateway", "models": [{"name": "demo", "deployments": [{"model": "demo/echo"}]}]}
    servers = [
        ("ours (asyncio)", [sys.executable, "-m", "llm_gateway", "serve", "--socket", f"{prefix}/ours.sock",
                            "--listen", "127.0.0.1:18987", "--demo-listen", "127.0.0.1:18988"],
         f"{prefix}/ours.sock", ours_config),
        ("kong-pdk stock (threads)", [sys.executable, str(ROOT / "bench/stock_pdk_plugin.py"), "-p", prefix],
         f"{prefix}/stock.sock", {"__name": "stock"}),
        ("kong-pdk stock (-g gevent)", [sys.executable, str(ROOT / "bench/stock_pdk_plugin.py"), "-p", prefix,
                                        "-g"], f"{prefix}/stock.sock", {"__name": "stock"}),
    ]
    print(f"| server | access events/s (driver included, c={args.concurrency}) | server CPU ms/event |")
    print("|---|---|---|")
    for label, cmd, path, config in servers:
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        try:
            wait_for(path, proc)
            result = asyncio.run(drive(path, proc.pid, dict(config), args.events, args.concurrency))
            print(f"| {label} | {result['events_per_s']:.0f} | {result['server_cpu_ms_per_event']:.3f} |")
        finally:
            proc.terminate()
            proc.wait(10)
            if os.path.exists(path):
                os.unlink(path)


if __name__ == "__main__":
    main()
