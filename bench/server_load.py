"""Load on a real `sdgraph serve` over loopback, with toy nodes.

    python bench/server_load.py [--clients 20] [--prompts 1000]

1. N clients (each with its websocket open, draining its events) queue toy prompts as fast as they can:
   accepted prompts/s, and p50/p95 latency of POST /prompt.
2. While a long prompt runs, the clients keep queueing and polling: p50/p95 of POST /prompt and GET /queue.
3. The server's RSS after the first batch of prompts and after a second one of the same size (the history
   keeps --max-history entries in SQLite, not in memory, so RSS should not grow with the prompts run).

Traffic goes only to 127.0.0.1; every loop is bounded in count and time; the server is stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]


def start_server(root: Path, max_history: int) -> tuple[subprocess.Popen, str]:
    base = root / "base"
    (base / "custom_nodes").mkdir(parents=True)
    shutil.copy(REPO / "tests" / "engine" / "toy_nodes.py", base / "custom_nodes" / "toy_nodes.py")
    out = root / "server.out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    env.pop("SDGRAPH_TOKEN", None)
    with open(out, "wb") as stdout, open(root / "server.log", "wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", "import sys, cli; sys.exit(cli.main(['serve', *sys.argv[1:]]))",
                                 "--base-dir", str(base), "--port", "0", "--max-queue", "100000",
                                 "--max-history", str(max_history), "--log-level", "WARNING"],
                                stdout=stdout, stderr=stderr, env=env, cwd=base)
    for _ in range(600):
        found = re.search(r"listening on (http://\S+)", out.read_text())
        if found:
            return proc, found.group(1)
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {(root / 'server.log').read_text()}")
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("the server did not start in 30 s")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def cache_entries(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url + "/system_stats") as response:
        return (await response.json())["sdgraph"]["cache_entries"]


def toy_prompt(value: int) -> dict:
    return {"1": {"class_type": "Const", "inputs": {"value": value % 1000}},
            "2": {"class_type": "Add", "inputs": {"a": ["1", 0], "b": value}},
            "3": {"class_type": "Show", "inputs": {"value": ["2", 0]}}}


def percentiles(samples: list[float]) -> str:
    if len(samples) < 2:
        return "n/a"
    cuts = statistics.quantiles(samples, n=100)
    return f"p50 {cuts[49] * 1000:7.2f} ms   p95 {cuts[94] * 1000:7.2f} ms   (n={len(samples)})"


async def drain(ws: aiohttp.ClientWebSocketResponse) -> None:
    async for _ in ws:
        pass


async def post_prompt(session: aiohttp.ClientSession, url: str, body: dict, latencies: list[float]) -> None:
    started = time.perf_counter()
    async with session.post(url + "/prompt", json=body) as response:
        await response.read()
        if response.status != 200:
            raise SystemExit(f"POST /prompt answered {response.status}: {await response.text()}")
    latencies.append(time.perf_counter() - started)


async def post_free(session: aiohttp.ClientSession, url: str) -> None:
    async with session.post(url + "/free", json={"unload_models": True}) as response:
        await response.read()
    await asyncio.sleep(0.5)


async def wait_idle(session: aiohttp.ClientSession, url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        async with session.get(url + "/prompt") as response:
            if (await response.json())["exec_info"]["queue_remaining"] == 0:
                return
        await asyncio.sleep(0.05)
    raise SystemExit("the queue did not drain")


async def batch(session: aiohttp.ClientSession, url: str, clients: int, total: int, offset: int) -> tuple[float, list]:
    latencies: list[float] = []
    started = time.perf_counter()

    async def client(index: int) -> None:
        for k in range(index, total, clients):
            await post_prompt(session, url, {"prompt": toy_prompt(offset + k), "client_id": f"bench-{index}"},
                              latencies)
    await asyncio.gather(*(client(i) for i in range(clients)))
    return time.perf_counter() - started, latencies


async def while_running(session: aiohttp.ClientSession, url: str, clients: int, seconds: float) -> tuple[list, list]:
    posts: list[float] = []
    gets: list[float] = []
    slow = {"1": {"class_type": "Slow", "inputs": {"value": 1, "steps": int(seconds * 20) + 20, "delay": 0.05}},
            "2": {"class_type": "Sink", "inputs": {"value": ["1", 0]}}}
    await post_prompt(session, url, {"prompt": slow}, [])
    await asyncio.sleep(0.2)
    deadline = time.monotonic() + seconds

    async def client(index: int) -> None:
        n = 0
        while time.monotonic() < deadline:
            n += 1
            await post_prompt(session, url, {"prompt": toy_prompt(10**6 + index * 10**4 + n)}, posts)
            started = time.perf_counter()
            async with session.get(url + "/queue") as response:
                await response.read()
            gets.append(time.perf_counter() - started)
            await asyncio.sleep(0.02)
    await asyncio.gather(*(client(i) for i in range(clients)))
    return posts, gets


async def main_async(args: argparse.Namespace, proc: subprocess.Popen, url: str) -> None:
    connector = aiohttp.TCPConnector(limit=args.clients * 2)
    async with aiohttp.ClientSession(connector=connector) as session:
        sockets = [await session.ws_connect(f"{url}/ws?clientId=bench-{i}") for i in range(args.clients)]
        drains = [asyncio.create_task(drain(ws)) for ws in sockets]
        print(f"server RSS at start: {rss_mib(proc.pid):.1f} MiB")
        await post_prompt(session, url, {"prompt": toy_prompt(-1)}, [])  # warm-up: the runtime imports torch
        await wait_idle(session, url)
        print(f"server RSS after one prompt (the runtime's around_node has imported torch): "
              f"{rss_mib(proc.pid):.1f} MiB")
        elapsed, latencies = await batch(session, url, args.clients, args.prompts, 0)
        print(f"1. {args.clients} clients queued {args.prompts} prompts in {elapsed:.2f} s: "
              f"{args.prompts / elapsed:.0f} accepted prompts/s")
        print(f"   POST /prompt            {percentiles(latencies)}")
        await wait_idle(session, url)
        rss = [(args.prompts, rss_mib(proc.pid), await cache_entries(session, url))]
        posts, gets = await while_running(session, url, args.clients, args.seconds)
        print(f"2. while a prompt runs ({args.seconds:.0f} s, {args.clients} clients):")
        print(f"   POST /prompt            {percentiles(posts)}")
        print(f"   GET /queue              {percentiles(gets)}")
        await wait_idle(session, url)
        done = args.prompts + len(posts) + 1
        for round_ in (2, 3):
            await batch(session, url, args.clients, args.prompts, round_ * 10**6)
            await wait_idle(session, url)
            done += args.prompts
            rss.append((done, rss_mib(proc.pid), await cache_entries(session, url)))
        await post_free(session, url)
        await batch(session, url, args.clients, args.prompts, 4 * 10**6)
        await wait_idle(session, url)
        done += args.prompts
        rss.append((done, rss_mib(proc.pid), await cache_entries(session, url)))
        print(f"3. server RSS (history kept: {args.max_history} entries, in SQLite, not in memory):")
        for count, mib, entries in rss:
            print(f"   after {count:5d} prompts: {mib:6.1f} MiB   (output cache: {entries} entries)")
        print("   (the last after POST /free {unload_models: true}; the growth before it is the engine's output "
              "cache keeping every distinct prompt's results)")
        for ws in sockets:
            await ws.close()
        for task in drains:
            task.cancel()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the 'while a prompt runs' phase")
    parser.add_argument("--max-history", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sdgraph-bench-") as tmp:
        proc, url = start_server(Path(tmp), args.max_history)
        try:
            asyncio.run(main_async(args, proc, url))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
        print(f"server stopped with exit code {code}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
