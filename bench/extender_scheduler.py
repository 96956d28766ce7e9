"""The real kube-scheduler placing module Pods, with the extender against affinity alone.

One run, one local control plane (devcluster), 500 virtual Nodes (half of them the wanted base
version, capacity 8 modules each), 1,000 module Pods (100 modules x 10 replicas):

  affinity  default profile, no extender: base labels as required node affinity, capacity as the
            in-tree resource fit on koupleless.io/module, "one replica of a module per base" as
            required pod anti-affinity on kubernetes.io/hostname;
  extender  the shipped configuration (manifests/scheduler): module profile, the extender filtering
            (capacity, bizName and base labels checked by the extender, passing only the base it
            ranks best, so there is no prioritize call); kube-scheduler binds.

For each, the Pods are created while kube-scheduler is stopped, then it is started and every
binding is timed from a watch; throughput = Pods / (last binding - first binding). Every run must
end with every Pod placed, no base over capacity and no bizName twice on a base. The two alternate
for --rounds rounds; the ratio is each round's extender figure over the affinity figure just
before it, and the verdict is on their median. Each run starts once the previous one's namespace
is gone: deleting it deletes its Pods' Events too, which on 2 cores took CPU from the next run.

    python bench/extender_scheduler.py [--nodes 500] [--modules 100] [--replicas 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devcluster.cluster import ControlPlane
from devcluster.processes import ManagedProcess, free_port, tcp_open
from koupleless import keys
from koupleless.kube import ApiError, KubeClient, namespace_path, pod_path
from tests.e2e.extender.conftest import module_pod_spec
from tests.e2e.extender.vnodes import VirtualNodes

MANIFEST = Path(__file__).resolve().parents[1] / "manifests" / "scheduler" / "kube-scheduler-config.yaml"
MAX_MODULES = 8


def affinity_only_spec(biz: str, base: str) -> dict[str, Any]:
    spec = module_pod_spec(biz=biz, base=base)
    del spec["schedulerName"]
    spec["affinity"]["podAntiAffinity"] = {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"biz": biz}}, "topologyKey": keys.LABEL_HOSTNAME}
    ]}
    return spec


async def create_pods(client: KubeClient, namespace: str, specs: list[tuple[str, str, dict[str, Any]]]) -> None:
    await client.create(namespace_path(), {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    sem = asyncio.Semaphore(50)

    async def one(name: str, biz: str, spec: dict[str, Any]) -> None:
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": namespace,
                            "labels": {keys.LABEL_COMPONENT: keys.COMPONENT_MODULE, "biz": biz}},
               "spec": spec}
        async with sem:
            await client.create(pod_path(namespace), pod)

    await asyncio.gather(*(one(*s) for s in specs))


async def bind_times(client: KubeClient, namespace: str, total: int, deadline: float) -> dict[str, tuple[float, str]]:
    """Watch the namespace's Pods; the moment each is seen with a nodeName."""
    seen: dict[str, tuple[float, str]] = {}
    listed = await client.list(pod_path(namespace))
    rv = listed["metadata"]["resourceVersion"]
    for pod in listed["items"]:
        if pod["spec"].get("nodeName"):
            seen[pod["metadata"]["name"]] = (time.monotonic(), pod["spec"]["nodeName"])
    while len(seen) < total and time.monotonic() < deadline:
        params = {"resourceVersion": rv, "allowWatchBookmarks": True, "timeoutSeconds": 30}
        async for event in client.watch_stream(pod_path(namespace), params):
            obj = event.get("object") or {}
            rv = (obj.get("metadata") or {}).get("resourceVersion", rv)
            node = (obj.get("spec") or {}).get("nodeName")
            name = (obj.get("metadata") or {}).get("name")
            if node and name and name not in seen:
                seen[name] = (time.monotonic(), node)
            if len(seen) >= total or time.monotonic() > deadline:
                break
    return seen


def check(placements: dict[str, tuple[float, str]], biz_of: dict[str, str], total: int) -> str:
    per_node = Counter(node for _, node in placements.values())
    pairs = Counter((node, biz_of[name]) for name, (_, node) in placements.items())
    problems = []
    if len(placements) != total:
        problems.append(f"{total - len(placements)} Pods not placed")
    if per_node and max(per_node.values()) > MAX_MODULES:
        problems.append(f"a base holds {max(per_node.values())} modules > {MAX_MODULES}")
    if pairs and max(pairs.values()) > 1:
        problems.append("a bizName twice on one base")
    return "; ".join(problems) or "ok"


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User+system CPU each process has used so far (Linux /proc), children included."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for name, pid in pids.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[name] = sum(int(f) for f in fields[11:15]) / tick
    return out


async def scenario(plane: ControlPlane, client: KubeClient, label: str, specs: list[tuple[str, str, dict[str, Any]]],
                   scheduler: dict[str, Any], timeout: float, extra_pids: dict[str, int]) -> tuple[float, str, int]:
    namespace = f"bench-{label}-{uuid.uuid4().hex[:6]}"
    sched = plane.processes.pop("kube-scheduler", None)
    if sched is not None:
        sched.stop()
    await create_pods(client, namespace, specs)
    biz_of = {name: biz for name, biz, _ in specs}
    watcher = asyncio.ensure_future(bind_times(client, namespace, len(specs), time.monotonic() + timeout))
    await asyncio.sleep(0.5)  # the watch is open before the scheduler starts
    await asyncio.to_thread(lambda: plane.start_scheduler(**scheduler))
    before = cpu_seconds({**plane.pids, **extra_pids, "bench": os.getpid()})
    placements = await watcher
    after = cpu_seconds({**plane.pids, **extra_pids, "bench": os.getpid()})
    times = sorted(t for t, _ in placements.values())
    span = times[-1] - times[0] if len(times) > 1 else float("nan")
    rate = (len(times) - 1) / span if len(times) > 1 else 0.0
    verdict = check(placements, biz_of, len(specs))
    # The middle 90 % of bindings, so a few retried Pods in backoff do not decide the figure alone.
    lo, hi = (times[len(times) // 20], times[len(times) * 19 // 20 - 1]) if len(times) >= 20 else (0.0, 0.0)
    middle = (len(times) * 9 // 10 - 1) / (hi - lo) if hi > lo else float("nan")
    print(f"  {label:<9} {len(placements):5d}/{len(specs)} placed in {span:6.2f} s  ->  {rate:7.1f} pods/s "
          f"(middle 90%: {middle:6.1f} pods/s; {len(Counter(n for _, n in placements.values()))} bases used; "
          f"check: {verdict})")
    used = {name: after[name] - before.get(name, 0.0) for name in after}
    print("            CPU seconds meanwhile: " + ", ".join(f"{n} {v:.1f}" for n, v in sorted(used.items())))
    await remove_namespace(client, namespace, [name for name, _, _ in specs])
    return rate, verdict, len(placements)


async def remove_namespace(client: KubeClient, namespace: str, pods: list[str]) -> None:
    """Grace 0: no kubelet will ever confirm these Pods are gone, and the next run must not count them."""
    sem = asyncio.Semaphore(50)

    async def one(name: str) -> None:
        async with sem:
            await client.delete(pod_path(namespace, name), grace_period_seconds=0)

    await asyncio.gather(*(one(n) for n in pods))
    await client.delete(namespace_path(namespace))
    # The namespace controller deletes what is left (an Event per Pod scheduled) after this returns;
    # the namespace is gone only once its Pods are too.
    for _ in range(480):
        try:
            await client.get(namespace_path(namespace))
        except ApiError as exc:
            if exc.not_found:
                return
            raise
        await asyncio.sleep(0.5)  # poll interval
    raise SystemExit(f"namespace {namespace} still there 240 s after its deletion")


def print_extender_costs(port: int) -> None:
    """Where the extender's share of the time went, from its own /metrics."""
    import re
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()

    def value(metric: str, labels: str) -> float:
        match = re.search(re.escape(metric) + r"\{" + re.escape(labels) + r"\} ([0-9.e+-]+)", text)
        return float(match.group(1)) if match else 0.0

    parts = []
    for verb in ("filter", "prioritize", "bind"):
        count = value("koupleless_extender_request_duration_seconds_count", f'verb="{verb}"')
        total = value("koupleless_extender_request_duration_seconds_sum", f'verb="{verb}"')
        if count:
            parts.append(f"{verb} {int(count)} calls, mean {total / count * 1000:.2f} ms")
    posts = value("koupleless_kube_request_duration_seconds_count", 'verb="POST"')
    if posts:
        # The bind verb's cost beside the API call it makes: what binding through the extender adds.
        post_ms = value("koupleless_kube_request_duration_seconds_sum", 'verb="POST"') / posts * 1000
        parts.append(f"its Binding POSTs to the API server {int(posts)}, mean {post_ms:.2f} ms")
    binds = {o: int(value("koupleless_extender_binds_total", f'outcome="{o}"')) for o in ("bound", "refused", "failed")}
    parts.append("binds " + ", ".join(f"{n} {o}" for o, n in binds.items()))
    waits = value("koupleless_extender_burst_waits_total", 'outcome="settled"')
    timeouts = value("koupleless_extender_burst_waits_total", 'outcome="timeout"')
    print(f"  extender: {'; '.join(parts)}; filters that waited for an in-flight binding: {int(waits)} "
          f"(timed out: {int(timeouts)})")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=500)
    parser.add_argument("--modules", type=int, default=100)
    parser.add_argument("--replicas", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--rounds", type=int, default=3, help="affinity then extender, this many times")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: give at least 1 (each round runs affinity, then the extender)")
    total = args.modules * args.replicas

    plane = ControlPlane()
    print("starting the local control plane ...")
    await asyncio.to_thread(plane.start)
    vnodes: VirtualNodes | None = None
    extender: ManagedProcess | None = None
    client = KubeClient.from_kubeconfig(str(plane.kubeconfig), qps=None)
    try:
        vnodes = VirtualNodes(plane.kubeconfig, renew_every=8.0)
        half = args.nodes // 2
        t = time.monotonic()
        await asyncio.to_thread(vnodes.add_many, [f"virtual-node-bench-{i:04d}" for i in range(half)],
                                base="bench", version="1.1.1", max_modules=MAX_MODULES)
        await asyncio.to_thread(vnodes.add_many, [f"virtual-node-bench-{i:04d}" for i in range(half, args.nodes)],
                                base="bench", version="1.0.0", max_modules=MAX_MODULES)
        print(f"{args.nodes} virtual nodes ({half} with base version 1.1.1, capacity {MAX_MODULES}) "
              f"in {time.monotonic() - t:.1f}s; {total} module Pods ({args.modules} modules x {args.replicas})")

        port = free_port()
        extender = ManagedProcess("extender", [sys.executable, "-m", "koupleless", "extender", "--kubeconfig",
                                               str(plane.kubeconfig), "--host", "127.0.0.1", "--port", str(port)],
                                  plane.workdir / "logs" / "extender.log").start()
        extender.wait_ready(lambda: tcp_open("127.0.0.1", port), timeout=60)
        shipped = yaml.safe_load(MANIFEST.read_text())
        with_extender = {
            "extenders": [{**e, "urlPrefix": f"http://127.0.0.1:{port}"} for e in shipped["extenders"]],
            "extra_profiles": [p for p in shipped["profiles"] if p["schedulerName"] != "default-scheduler"],
        }
        names = [(f"m{m:03d}-r{r:02d}", f"biz{m:03d}") for m in range(args.modules) for r in range(args.replicas)]
        affinity_specs = [(n, b, affinity_only_spec(b, "bench")) for n, b in names]
        extender_specs = [(n, b, module_pod_spec(biz=b, base="bench")) for n, b in names]

        print("\nkube-scheduler throughput, binding timed from a watch:")
        pids = {"extender": extender.pid or 0}
        ratios: list[float] = []
        verdicts: set[str] = set()
        for round_no in range(args.rounds):
            print(f" round {round_no + 1} of {args.rounds}:")
            base_rate, base_ok, _ = await scenario(plane, client, "affinity", affinity_specs, {}, args.timeout, pids)
            ext_rate, ext_ok, _ = await scenario(plane, client, "extender", extender_specs, with_extender,
                                                 args.timeout, pids)
            verdicts |= {base_ok, ext_ok}
            ratios.append(ext_rate / base_rate if base_rate else float("nan"))
        print_extender_costs(port)
        ratio = statistics.median(ratios)
        print(f"\nratio extender/affinity: {ratio:.2f}, median of rounds {', '.join(f'{r:.2f}' for r in ratios)} "
              f"(target >= 0.8: {'met' if ratio >= 0.8 else 'NOT met'})")
        return 0 if verdicts == {"ok"} else 1
    finally:
        if extender is not None:
            extender.stop()
        await client.close()
        if vnodes is not None:
            await asyncio.to_thread(vnodes.close)
        await asyncio.to_thread(plane.stop)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
