"""Filter latency of the extender with a large cache: 5,000 virtual Nodes, 20,000 module Pods.

Measures, in one run and on the same cache:
  decide  - the filter decision alone (policy over the watch cache),
  handle  - what the server does per request: decode ExtenderArgs, decide, encode the answer,
  http    - the same request over loopback HTTP (aiohttp client -> extender app),
and the same three for prioritize; then full-Node mode (the scheduler sends whole Nodes) against
names mode for the same candidates, as a ratio. Prints p50/p99 in milliseconds.

    python bench/extender_filter.py [--nodes 5000] [--pods 20000] [--rounds 300]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extender import wire
from extender.app import Extender, Settings, make_app
from extender.server import freeze_heap
from extender.view import ClusterView
from tests.unit.extender.samples import module_pod, vnode

VERSIONS = ["1.1.1", "1.1.2", "1.2.0", "2.0.0"]


def build_cluster(n_nodes: int, n_pods: int, seed: int = 7) -> tuple[ClusterView, list[dict[str, Any]]]:
    rnd = random.Random(seed)
    view = ClusterView()
    nodes = []
    for i in range(n_nodes):
        node = vnode(f"virtual-node-{i:05d}", version=VERSIONS[i % len(VERSIONS)], max_modules=8,
                     ready=rnd.random() > 0.01)
        # Real Nodes carry more than labels: images, addresses, daemon endpoints, nodeInfo.
        node["status"]["nodeInfo"] = {"kubeletVersion": "v1.36.3-vk", "operatingSystem": "linux",
                                      "architecture": "amd64", "machineID": f"{i:032x}"}
        node["status"]["addresses"] = [{"type": "InternalIP", "address": f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"},
                                       {"type": "Hostname", "address": f"base-{i}"}]
        nodes.append(node)
        view.upsert_node(node)
    for j in range(n_pods):
        node = f"virtual-node-{rnd.randrange(n_nodes):05d}"
        view.observe_pod(module_pod(f"pod-{j}", bizs=(f"biz{j % 400}",), node=node, phase="Running",
                                    namespace=f"ns{j % 20}"))
    view.synced = True
    return view, nodes


def calibrate() -> float:
    table = {f"n{i}": i for i in range(5000)}
    keys = list(table)
    best = float("inf")
    for _ in range(20):
        t = time.perf_counter()
        hits = [k for k in keys if table.get(k) is not None]
        best = min(best, time.perf_counter() - t)
        assert len(hits) == 5000
    return best


def pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] * 1000


def report(label: str, samples: list[float]) -> tuple[float, float]:
    p50, p99 = pct(samples, 50), pct(samples, 99)
    print(f"  {label:<34} p50 {p50:7.3f} ms   p99 {p99:7.3f} ms   (n={len(samples)}, mean {statistics.mean(samples) * 1000:.3f})")
    return p50, p99


#: A plain blocking keep-alive client in its own process, so that client work does not share the
#: server's event loop (kube-scheduler is a separate process too). Prints one latency per line.
_CLIENT = """
import http.client, sys, time
port, path, body_file, rounds = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
body = open(body_file, 'rb').read()
conn = http.client.HTTPConnection('127.0.0.1', port)
headers = {'Content-Type': 'application/json'}
for i in range(rounds + 20):
    t = time.perf_counter()
    conn.request('POST', path, body, headers)
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200, resp.status
    if i >= 20:
        print(time.perf_counter() - t)
"""


async def remote_client(port: int, path: str, body: bytes, rounds: int) -> list[float]:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        f.write(body)
        f.flush()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _CLIENT, str(port), path, f.name, str(rounds), stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
    assert proc.returncode == 0, "client failed"
    return [float(line) for line in out.decode().split()]


#: CPU seconds of the last `timed` run per call: on a shared machine the wall clock's p99 is mostly
#: the process waiting for a core, which CPU time leaves out.
LAST_CPU: list[float] = []


async def timed(fn: Callable[[], Awaitable[Any]], rounds: int) -> list[float]:
    out = []
    LAST_CPU.clear()
    for _ in range(rounds):
        t, c = time.perf_counter(), time.process_time()
        await fn()
        out.append(time.perf_counter() - t)
        LAST_CPU.append(time.process_time() - c)
    return out


def report_cpu() -> None:
    print(f"  {'  same, CPU time only':<34} p50 {pct(LAST_CPU, 50):7.3f} ms   p99 {pct(LAST_CPU, 99):7.3f} ms")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--pods", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--full-nodes", type=int, default=500, help="candidates in the full-Node comparison")
    parser.add_argument("--freeze", action=argparse.BooleanOptionalAction, default=True,
                        help="gc.freeze() the synced cache, as the server does (default on)")
    args = parser.parse_args()

    print(f"calibration: a 5,000-step Python dict loop takes {calibrate() * 1000:.2f} ms on this machine now "
          "(~0.25 ms on an idle modern core; scale the figures below by it)")
    t0 = time.perf_counter()
    view, nodes = build_cluster(args.nodes, args.pods)
    if args.freeze:
        freeze_heap()
    print(f"cache: {len(view.bases)} virtual nodes, {len(view.usage)} module pods placed "
          f"(built in {time.perf_counter() - t0:.1f}s)")
    names = [n["metadata"]["name"] for n in nodes]
    # The Pod asks for one version: ~1/4 of the bases fit, the rest get a reason (the expensive path).
    pod = module_pod("new-module", bizs=("biz-new",), versions=("1.1.1",), memory="256Mi")
    extender = Extender(view, settings=Settings())
    body = orjson.dumps({"Pod": pod, "Nodes": None, "NodeNames": names})
    print(f"request: {len(names)} node names, {len(body) / 1024:.0f} KiB")

    def new_args() -> wire.ExtenderArgs:
        return wire.parse_extender_args(body)

    parsed = new_args()
    result = await extender.filter(parsed)
    print(f"answer: {len(result['NodeNames'])} pass, {len(result['FailedAndUnresolvableNodes'])} rejected "
          f"({len(orjson.dumps(result)) / 1024:.0f} KiB)")

    async def decide() -> None:
        await extender.filter(parsed)

    async def handle() -> None:
        orjson.dumps(await extender.filter(wire.parse_extender_args(body)))

    async def prioritize_handle() -> None:
        orjson.dumps(extender.prioritize(wire.parse_extender_args(prio_body)))

    passing = result["NodeNames"]
    prio_body = orjson.dumps({"Pod": pod, "Nodes": None, "NodeNames": passing})

    app = make_app(extender)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    results: dict[str, tuple[float, float]] = {}

    async def http(path: str, data: bytes) -> list[float]:
        # The client is another process, so this process's CPU time is the server's: per request it
        # is what the extender costs, whatever else the machine is doing.
        started = time.process_time()
        samples = await remote_client(port, path, data, args.rounds)
        server_cpu[path] = (time.process_time() - started) / (args.rounds + 20)
        return samples

    server_cpu: dict[str, float] = {}

    def report_server_cpu(path: str) -> None:
        print(f"  {'  server CPU per request (mean)':<34} {server_cpu[path] * 1000:7.3f} ms")

    for fn in (decide, handle):  # warm-up
        await timed(fn, 20)
    print(f"\nfilter, names mode (nodeCacheCapable), {len(names)} candidates:")
    results["decide"] = report("decide (policy over cache)", await timed(decide, args.rounds))
    report_cpu()
    results["handle"] = report("handle (decode+decide+encode)", await timed(handle, args.rounds))
    report_cpu()
    results["http"] = report("http round trip (client process)", await http("/filter", body))
    report_server_cpu("/filter")

    print(f"\nprioritize, names mode, {len(passing)} candidates:")
    report("handle (decode+score+encode)", await timed(prioritize_handle, args.rounds))
    report_cpu()
    report("http round trip (client process)", await http("/prioritize", prio_body))
    report_server_cpu("/prioritize")

    k = min(args.full_nodes, len(nodes))
    names_k = orjson.dumps({"Pod": pod, "Nodes": None, "NodeNames": names[:k]})
    full_k = orjson.dumps({"Pod": pod, "Nodes": {"metadata": {}, "items": nodes[:k]}, "NodeNames": None})
    print(f"\nfull-Node mode vs names mode, same {k} candidates ({len(full_k) / 1024:.0f} KiB vs "
          f"{len(names_k) / 1024:.0f} KiB):")
    full = report("full Nodes, http", await http("/filter", full_k))
    short = report("names, http", await http("/filter", names_k))
    print(f"  ratio full/names p50 {full[0] / short[0]:.1f}x")
    await runner.cleanup()
    target = 5.0
    p99 = results["http"][1]
    print(f"\nfilter p99 over HTTP with {len(view.bases)} nodes / {len(view.usage)} pods: {p99:.2f} ms "
          f"(target <= {target} ms: {'met' if p99 <= target else 'NOT met'}); load average now "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    try:
        import uvloop
        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
