"""Provider at scale: a real control plane, mosquitto, the provider as a subprocess, and an instrumented
fleet of simulated bases in this process.

Measured, side by side in one run:
  1. bases registered per second: N bases start; time until N virtual Nodes are Ready;
  2. hop A, Pod bound -> installBiz published: one module Pod per base, created already bound
     (spec.nodeName); from the API server acknowledging the create to the base receiving installBiz
     (loopback MQTT, so receipt ~ publish; watch delivery to the provider included);
  3. hop B, ACTIVATED report -> Pod Ready: from the base publishing its install reply to this
     process's watch seeing Ready=True (watch delivery included: an upper bound);
     both hops twice: Pods created at --hop-rate a second (20, the pace kube-controller-manager's
     default client QPS gives a ReplicaSet), then back to back (saturation); each with the
     provider's own share and kube-apiserver's own time for the status PATCH;
  4. the provider's RSS and CPU with --scale-bases bases and --scale-modules modules (Pods of
     --containers-per-pod modules), in a steady window with heartbeats and Lease renewals running.
Targets from issue 4 are printed beside each figure as a ratio (figure / target; <= 1 meets it).

    python bench/provider_scale.py                      # 200 bases; 1,000 bases / 5,000 modules
    python bench/provider_scale.py --bases 50 --scale-bases 200 --scale-modules 500   # quick

A/B mode measures hops A and B only, for this tree and another source tree, in alternating rounds on
the same control plane (so a busy machine weighs on both alike), and prints both side by side:

    git archive <commit> | tar -x -C /tmp/baseline
    python bench/provider_scale.py --compare-with /tmp/baseline --rounds 4
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devcluster.broker import Broker
from devcluster.cluster import ControlPlane
from devcluster.processes import ManagedProcess, free_port
from koupleless import arklet, keys
from koupleless.kube import Informer, KubeClient, lease_path, namespace_path, node_path, pod_path
from provider.basesim import BaseSimulator, SimBase
from provider.tunnel import BrokerOptions

ENV = "bench"
REPO = Path(__file__).resolve().parents[1]


class TimedFleet(BaseSimulator):
    """base-sim that notes when each installBiz arrives and when each reply leaves."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.install_received: dict[tuple[str, str], float] = {}
        self.reply_sent: dict[tuple[str, str], float] = {}

    def _on_message(self, topic: str, payload: bytes) -> None:
        now = time.monotonic()
        if topic.endswith("/" + arklet.CMD_INSTALL_BIZ):
            base_id = topic.split("/")[1]
            try:
                name = arklet.parse_biz_model(payload).biz_name
                self.install_received.setdefault((base_id, name), now)
            except arklet.ArkletError:
                pass
        super()._on_message(topic, payload)

    def _install(self, base: SimBase, model: arklet.BizModel) -> None:
        super()._install(base, model)
        self.reply_sent[(base.base_id, model.biz_name)] = time.monotonic()


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def module_pod(ns: str, name: str, node: str, containers: int, prefix: str = "biz") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {keys.LABEL_COMPONENT: "module", "bench": "1"}},
        "spec": {
            "nodeName": node,
            "tolerations": [keys.vnode_toleration()],
            "containers": [
                {
                    "name": f"{prefix}{i}",
                    "image": f"https://example.com/modules/{prefix}{i}-1.0.{i}-ark-biz.jar",
                    "env": [{"name": "BIZ_VERSION", "value": f"1.0.{i}"}],
                }
                for i in range(containers)
            ],
        },
    }


def proc_stats(pid: int) -> tuple[float, float, float]:
    """(RSS MiB, peak RSS MiB, CPU seconds user+system) of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = {k: v.split()[0] for k, _, v in (line.partition(":") for line in status.splitlines()) if v.split()}
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields["VmRSS"]) / 1024, int(fields["VmHWM"]) / 1024, (int(stat[11]) + int(stat[12])) / ticks


def _http_ok(port: int) -> bool:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
        return bool(resp.status == 200)


def provider_buckets(port: int, name: str) -> dict[float, float]:
    """A provider histogram's cumulative buckets (le seconds -> count), from its /metrics."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float(le)] = float(line.rsplit(" ", 1)[1])
    return buckets


def counter_sums(port: int, name: str, label: str) -> dict[str, float]:
    """A provider counter's values summed by one label."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{") and f'{label}="' in line:
            value = line.split(f'{label}="', 1)[1].split('"', 1)[0]
            sums[value] = sums.get(value, 0.0) + float(line.rsplit(" ", 1)[1])
    return sums


def apiserver_buckets(cp: ControlPlane, verb: str, resource: str, subresource: str) -> dict[float, float]:
    """kube-apiserver's own apiserver_request_duration_seconds buckets (le -> count) for one kind of
    request: its share of a round trip, without the client, the network or the watch."""
    text = cp.kubectl("get", "--raw", "/metrics").stdout
    want = (f'resource="{resource}"', f'subresource="{subresource}"', f'verb="{verb}"')
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith("apiserver_request_duration_seconds_bucket{") and all(w in line for w in want):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float(le)] = buckets.get(float(le), 0.0) + float(line.rsplit(" ", 1)[1])
    return buckets


def bucket_quantiles(before: dict[float, float], after: dict[float, float], qs: tuple[float, ...] = (0.5, 0.99)) -> tuple[int, list[float]]:
    """(count, upper bucket bound in ms holding each quantile) of the requests between two snapshots."""
    diff = sorted((le, after[le] - before.get(le, 0.0)) for le in after)
    total = diff[-1][1] if diff else 0.0
    return int(total), [next((le * 1000 for le, c in diff if c >= q * total), float("inf")) for q in qs]


def ready(obj: dict[str, Any]) -> bool:
    return any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in (obj.get("status") or {}).get("conditions") or []
    )


async def wait_for(check: Any, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def create_pods(
    client: KubeClient, pods: list[dict[str, Any]], concurrency: int, rate: float = 0.0
) -> tuple[dict[str, float], dict[str, float]]:
    """Create, `concurrency` at a time, or at `rate` Pods a second when given (each on its own
    schedule, whatever the answers do); (send time, acknowledged time) per Pod name."""
    sent: dict[str, float] = {}
    acked: dict[str, float] = {}
    sem = asyncio.Semaphore(concurrency if not rate else len(pods) or 1)
    start = time.monotonic()

    async def one(i: int, p: dict[str, Any]) -> None:
        if rate:
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
        async with sem:
            sent[p["metadata"]["name"]] = time.monotonic()
            await client.create(pod_path(p["metadata"]["namespace"]), p)
            acked[p["metadata"]["name"]] = time.monotonic()

    await asyncio.gather(*(one(i, p) for i, p in enumerate(pods)))
    return sent, acked


async def watch_namespace(
    client: KubeClient, ns: str, env: str, tag: str
) -> tuple[Informer, Informer, dict[str, float]]:
    """A fresh namespace, synced informers on the env's vnodes and the namespace's Pods, and the
    monotonic time each Pod was first seen Ready (filled in as the watch delivers it)."""
    await client.create(namespace_path(), {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    nodes = Informer(client, node_path(), label_selector=f"{keys.LABEL_VNODE_ENV}={env}", name=f"nodes-{tag}")
    pods = Informer(client, pod_path(ns), name=f"pods-{tag}")
    pod_ready_at: dict[str, float] = {}

    def on_pod(obj: dict[str, Any]) -> None:
        if ready(obj):
            pod_ready_at.setdefault(obj["metadata"]["name"], time.monotonic())

    pods.add_handler(on_pod, lambda _o, n: on_pod(n))
    nodes.start()
    pods.start()
    await asyncio.gather(nodes.wait_synced(), pods.wait_synced())
    return nodes, pods, pod_ready_at


def hop_times(
    fleet: TimedFleet,
    names: list[str],
    node_names: list[str],
    module: str,
    acked: dict[str, float],
    pod_ready_at: dict[str, float],
) -> tuple[list[float], list[float]]:
    """(hop A ms, hop B ms) per Pod `names[i]`, which holds `module` on `node_names[i]`."""
    hop_a, hop_b = [], []
    for name, node in zip(names, node_names, strict=True):
        base_id = node[len(keys.VNODE_NAME_PREFIX):]
        hop_a.append((fleet.install_received[(base_id, module)] - acked[name]) * 1000)
        hop_b.append((pod_ready_at[name] - fleet.reply_sent[(base_id, module)]) * 1000)
    return hop_a, hop_b


async def measure_hops(
    label: str,
    prefix: str,
    rate: float,
    concurrency: int,
    client: KubeClient,
    cp: ControlPlane,
    fleet: TimedFleet,
    ns: str,
    node_names: list[str],
    pod_ready_at: dict[str, float],
    http_port: int,
) -> None:
    """One module Pod (module `<prefix>0`) per base; prints hops A and B as the bases and this
    process's watch saw them, then the provider's and kube-apiserver's own shares."""
    batch = [module_pod(ns, f"{prefix}-{i}", node, 1, prefix) for i, node in enumerate(node_names)]
    metrics = ("koupleless_provider_bound_to_install_seconds", "koupleless_provider_reply_to_status_patch_seconds",
               "koupleless_provider_reply_to_status_seconds")
    before = {m: provider_buckets(http_port, m) for m in metrics}
    patches0 = apiserver_buckets(cp, "PATCH", "pods", "status")
    sent, acked = await create_pods(client, batch, concurrency, rate)
    names = [p["metadata"]["name"] for p in batch]
    await wait_for(lambda: all(n in pod_ready_at for n in names), 300, "module Pods Ready")
    patches = bucket_quantiles(patches0, apiserver_buckets(cp, "PATCH", "pods", "status"))
    inside = {m: bucket_quantiles(before[m], provider_buckets(http_port, m)) for m in metrics}
    hop_a, hop_b = hop_times(fleet, names, node_names, f"{prefix}0", acked, pod_ready_at)
    api = [(acked[name] - sent[name]) * 1000 for name in names]
    took = max(acked.values()) - min(sent.values())
    print(f"[2] {len(batch)} Pods {label}: all created in {took:.1f}s; API server create round trip "
          f"p50={pct(api, 50):.1f} ms  p99={pct(api, 99):.1f} ms")
    for hop, values in (("A bound -> installBiz", hop_a), ("B ACTIVATED -> Ready", hop_b)):
        p50, p99 = pct(values, 50), pct(values, 99)
        print(f"    hop {hop:<22} n={len(values)} p50={p50:6.1f} ms  p99={p99:6.1f} ms  "
              f"(target p99 <= 100 ms: ratio {p99 / 100:.2f})")
    for share, metric in zip(("A bound -> installBiz", "B reply -> status PATCH sent", "B reply -> status stored"),
                             metrics, strict=True):
        n, (q50, q99) = inside[metric]
        print(f"    inside the provider, {share:<28} n={n} p50 <= {q50:g} ms  p99 <= {q99:g} ms (bucket bounds)")
    n, (q50, q99) = patches
    print(f"    inside kube-apiserver, pods/status PATCH        n={n} p50 <= {q50:g} ms  p99 <= {q99:g} ms "
          "(its own request duration buckets)")


async def bench(args: argparse.Namespace, cp: ControlPlane, broker: Broker) -> None:
    client = KubeClient.from_kubeconfig(str(cp.kubeconfig), qps=None)
    ns = f"bench-{os.getpid()}"
    nodes, pods, pod_ready_at = await watch_namespace(client, ns, ENV, "bench")

    http_port = free_port()
    provider = ManagedProcess(
        "provider",
        [
            sys.executable, "-m", "koupleless", "provider", "--kubeconfig", str(cp.kubeconfig),
            "--mqtt-broker", broker.address, "--env", ENV, "--identity", "bench-provider",
            "--http-host", "127.0.0.1", "--http-port", str(http_port), "--workers", str(args.workers),
            "--kube-qps", str(args.kube_qps), "--log-level", args.provider_log_level,
        ],
        Path(args.workdir) / "provider.log",
    ).start()
    opts = BrokerOptions(broker.host, broker.port)
    fleets: list[TimedFleet] = []
    try:
        await asyncio.to_thread(provider.wait_ready, lambda: _http_ok(http_port), 60)
        fleet = TimedFleet(opts, env=ENV, count=args.bases, id_prefix="b-", heartbeat_interval=10.0)
        fleets.append(fleet)
        t0 = time.monotonic()
        await fleet.start()
        took = await wait_for(lambda: sum(ready(n) for n in nodes.list()) >= args.bases, 300, f"{args.bases} Ready Nodes")
        rate = args.bases / took
        print(f"[1] {args.bases} bases Ready in {took:.1f}s: {rate:.0f} bases/s (from base-sim start, {time.monotonic()-t0:.1f}s)")

        # hop A and B: one single-module Pod per base, paced as a controller creates them, then all at once
        node_names = sorted(keys.vnode_name(b) for b in fleet.bases)
        paced = f"created at {args.hop_rate:g} Pods/s" if args.hop_rate else "created back to back"
        await measure_hops(f"{paced}", "biz", args.hop_rate, args.hop_concurrency, client, cp, fleet, ns, node_names,
                           pod_ready_at, http_port)
        if args.hop_rate:
            await measure_hops(f"created back to back, {args.hop_concurrency} at a time (saturation)", "hot", 0.0,
                               args.hop_concurrency, client, cp, fleet, ns, node_names, pod_ready_at, http_port)

        # scale: more bases, more modules
        extra = args.scale_bases - args.bases
        if extra > 0:
            more = TimedFleet(opts, env=ENV, count=extra, id_prefix="s-", heartbeat_interval=10.0)
            fleets.append(more)
            t1 = time.monotonic()
            await more.start()
            took = await wait_for(lambda: sum(ready(n) for n in nodes.list()) >= args.scale_bases, 600,
                                  f"{args.scale_bases} Ready Nodes")
            print(f"[3] +{extra} bases Ready in {took:.1f}s ({extra / took:.0f} bases/s); "
                  f"{args.scale_bases} bases total (target 1,000 within 60 s)  [{time.monotonic()-t1:.1f}s]")
        all_nodes = sorted(keys.vnode_name(b) for f in fleets for b in f.bases)
        have = len(pod_ready_at)  # the hop Pods, one module each
        want_pods = max(0, (args.scale_modules - have) // args.containers_per_pod)
        big = [module_pod(ns, f"s-{i}", all_nodes[i % len(all_nodes)], args.containers_per_pod)
               for i in range(want_pods)]
        t2 = time.monotonic()
        await create_pods(client, big, args.concurrency)
        total_pods = have + len(big)
        took = await wait_for(lambda: len(pod_ready_at) >= total_pods, 900, f"{total_pods} Pods Ready")
        modules = have + len(big) * args.containers_per_pod
        print(f"[4] {modules} modules in {total_pods} Pods on {len(all_nodes)} bases Ready in "
              f"{time.monotonic() - t2:.1f}s ({took:.1f}s after the last create)")

        rss0, _, cpu0 = proc_stats(provider.pid or 0)
        w0 = time.monotonic()
        await asyncio.sleep(args.steady_seconds)
        rss1, peak, cpu1 = proc_stats(provider.pid or 0)
        cpu_pct = (cpu1 - cpu0) / (time.monotonic() - w0) * 100
        print(f"[5] provider at {len(all_nodes)} bases / {modules} modules, steady {args.steady_seconds:.0f}s: "
              f"RSS {rss1:.0f} MiB (peak {peak:.0f} MiB; target <= 400 MiB: ratio {peak / 400:.2f}), "
              f"CPU {cpu_pct:.0f}% of one core")
        not_ready = [n for n in nodes.list() if not ready(n)]
        reasons = sorted({c.get("reason", "") for n in not_ready for c in n["status"].get("conditions", [])
                          if c.get("type") == "Ready"})
        print(f"    Nodes not Ready at the end: {len(not_ready)} {reasons}; "
              f"module Pods Ready: {len(pod_ready_at)}/{total_pods}")
        del rss0
    finally:
        for f in fleets:
            await f.stop(graceful=False)
        provider.stop()
        await nodes.stop()
        await pods.stop()
        try:
            await client.delete(namespace_path(ns))
        finally:
            await client.close()


async def hop_round(
    client: KubeClient, broker: Broker, args: argparse.Namespace, *, tag: str, source: str | None
) -> tuple[list[float], list[float], list[float]]:
    """One round on a fresh env and namespace: --bases bases, one module Pod per base, created one at
    a time; (hop A ms, hop B ms, provider's own reply->status bucket bounds [p50, p99])."""
    env = f"{ENV}{tag}"
    ns = f"bench-{tag}-{os.getpid()}"
    nodes, pods, pod_ready_at = await watch_namespace(client, ns, env, tag)
    http_port = free_port()
    provider = ManagedProcess(
        f"provider-{tag}",
        [
            # `python -m` would put this directory first on the path; the variant's tree must come first.
            sys.executable, "-c",
            "import runpy, sys; sys.path.insert(0, sys.argv.pop(1)); runpy.run_module('koupleless', run_name='__main__')",
            source or str(REPO),
            "provider", "--kubeconfig", args.kubeconfig,
            "--mqtt-broker", broker.address, "--env", env, "--identity", f"bench-{tag}",
            "--http-host", "127.0.0.1", "--http-port", str(http_port), "--workers", str(args.workers),
            "--kube-qps", str(args.kube_qps), "--log-level", args.provider_log_level,
        ],
        Path(args.workdir) / f"provider-{tag}.log",
    ).start()
    fleet = TimedFleet(BrokerOptions(broker.host, broker.port), env=env, count=args.bases, id_prefix=f"{tag}-",
                       heartbeat_interval=10.0)
    try:
        await asyncio.to_thread(provider.wait_ready, lambda: _http_ok(http_port), 60)
        await fleet.start()
        await wait_for(lambda: sum(ready(n) for n in nodes.list()) >= args.bases, 300, f"{args.bases} Ready Nodes")
        # Measure a fleet in its steady state: heartbeats and Lease renewals running, not just registered.
        await asyncio.sleep(args.settle_seconds)
        node_names = sorted(keys.vnode_name(b) for b in fleet.bases)
        batch = [module_pod(ns, f"m-{i}", node, 1) for i, node in enumerate(node_names)]
        writes0 = counter_sums(http_port, "koupleless_provider_api_writes_total", "what")
        calls0 = counter_sums(http_port, "koupleless_kube_requests_total", "verb")
        _, acked = await create_pods(client, batch, args.hop_concurrency, args.hop_rate)
        await wait_for(lambda: len(pod_ready_at) >= len(batch), 300, "module Pods Ready")
        writes1 = counter_sums(http_port, "koupleless_provider_api_writes_total", "what")
        calls1 = counter_sums(http_port, "koupleless_kube_requests_total", "verb")
        spent = {k: int(v - writes0.get(k, 0)) for k, v in writes1.items() if v > writes0.get(k, 0)}
        calls = {k: int(v - calls0.get(k, 0)) for k, v in calls1.items() if v > calls0.get(k, 0)}
        print(f"    {tag}: provider API requests while the Pods were created and became Ready: {calls} "
              f"(writes by kind: {spent})")
        hop_a, hop_b = hop_times(fleet, [p["metadata"]["name"] for p in batch], node_names, "biz0", acked, pod_ready_at)
        _, inside = bucket_quantiles({}, provider_buckets(http_port, "koupleless_provider_reply_to_status_seconds"))
        _, own = bucket_quantiles({}, provider_buckets(http_port, "koupleless_provider_reply_to_status_patch_seconds"))
        if own[0] != float("inf"):
            print(f"    {tag}: inside the provider, reply -> status PATCH sent p50 <= {own[0]:g} ms  p99 <= {own[1]:g} ms")
        return hop_a, hop_b, inside
    finally:
        await fleet.stop(graceful=False)
        provider.stop()
        await nodes.stop()
        await pods.stop()
        # No kubelet finalizes these Pods once the provider is gone: remove them outright, and the
        # round's Nodes and Leases, so later rounds run against the same cluster size.
        await client.request("DELETE", pod_path(ns), json={"gracePeriodSeconds": 0}, expected=(200,))
        await client.delete(namespace_path(ns))
        await client.request("DELETE", node_path(), params={"labelSelector": f"{keys.LABEL_VNODE_ENV}={env}"},
                             expected=(200,))
        await client.request("DELETE", lease_path("kube-node-lease"),
                             params={"labelSelector": f"{keys.LABEL_VNODE_ENV}={env}"}, expected=(200,))


async def compare(args: argparse.Namespace, cp: ControlPlane, broker: Broker) -> None:
    client = KubeClient.from_kubeconfig(str(cp.kubeconfig), qps=None)
    args.kubeconfig = str(cp.kubeconfig)
    hops: dict[str, tuple[list[float], list[float]]] = {"baseline": ([], []), "current": ([], [])}
    sources = {"baseline": args.compare_with, "current": None}
    try:
        for r in range(args.rounds):
            # Alternate who goes first, so neither always gets the warmer (or busier) slot.
            order = ["baseline", "current"] if r % 2 == 0 else ["current", "baseline"]
            for variant in order:
                a, b, inside = await hop_round(client, broker, args, tag=f"r{r}{variant[0]}", source=sources[variant])
                hops[variant][0].extend(a)
                hops[variant][1].extend(b)
                print(f"    round {r} {variant:<8}: hop A p50={pct(a, 50):5.1f} p99={pct(a, 99):6.1f} ms   "
                      f"hop B p50={pct(b, 50):5.1f} p99={pct(b, 99):6.1f} ms   "
                      f"inside reply->status p50<={inside[0]:g} p99<={inside[1]:g} ms", flush=True)
    finally:
        await client.close()
    print(f"A/B over {args.rounds} rounds x {args.bases} Pods each; baseline = {args.compare_with}")
    for label, idx in (("A bound -> installBiz", 0), ("B ACTIVATED -> Ready", 1)):
        base, cur = hops["baseline"][idx], hops["current"][idx]
        print(f"  hop {label:<22} baseline p50={pct(base, 50):6.1f} p99={pct(base, 99):6.1f} ms | "
              f"current p50={pct(cur, 50):6.1f} p99={pct(cur, 99):6.1f} ms | "
              f"current/baseline p50 {pct(cur, 50) / pct(base, 50):.2f} p99 {pct(cur, 99) / pct(base, 99):.2f}"
              f" | current p99 / 100 ms target {pct(cur, 99) / 100:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bases", type=int, default=200)
    parser.add_argument("--scale-bases", type=int, default=1000)
    parser.add_argument("--scale-modules", type=int, default=5000)
    parser.add_argument("--containers-per-pod", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=16, help="parallel Pod creates")
    parser.add_argument("--hop-rate", type=float, default=20.0,
                        help="Pods created per second while measuring the hops (default 20: kube-controller-manager's "
                             "default client QPS, the pace a ReplicaSet gets its Pods at); 0: back to back only")
    parser.add_argument("--hop-concurrency", type=int, default=1,
                        help="parallel creates in the back-to-back hop run (1: one create after the other)")
    parser.add_argument("--workers", type=int, default=32, help="provider --workers")
    parser.add_argument("--kube-qps", type=float, default=400.0, help="provider --kube-qps")
    parser.add_argument("--provider-log-level", default="warning")
    parser.add_argument("--steady-seconds", type=float, default=30.0)
    parser.add_argument("--workdir", default="/tmp/koupleless-bench-provider")
    parser.add_argument("--compare-with", default=None, metavar="DIR",
                        help="A/B: hops only, this tree vs the source tree DIR, in alternating rounds")
    parser.add_argument("--rounds", type=int, default=4, help="A/B rounds (each runs both variants)")
    parser.add_argument("--settle-seconds", type=float, default=12.0,
                        help="A/B: wait this long after the Nodes are Ready (one Lease renewal round) before the Pods")
    args = parser.parse_args()
    if args.compare_with and not (Path(args.compare_with) / "provider" / "controller.py").exists():
        parser.error(f"--compare-with {args.compare_with}: not a source tree (no provider/controller.py)")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    import uvloop

    with ControlPlane() as cp, Broker() as broker:
        uvloop.run(compare(args, cp, broker) if args.compare_with else bench(args, cp, broker))
    return 0


if __name__ == "__main__":
    sys.exit(main())
