"""Kube layer cost, measured side by side against a real local kube-apiserver.

  python bench/kube_list_watch.py [--pods 2000] [--kubeconfig PATH]

Without --kubeconfig a throwaway control plane is started (devcluster). It creates N Pods that no
scheduler picks up (schedulerName: none), then times, in the same run:
  - list all Pods: our KubeClient (paged, orjson dicts) vs the `kubernetes` package (generated models);
  - informer sync (list + store + two indexes) from cold;
  - applying recorded watch events to an informer store with two indexes (events/s).
Everything stays on loopback and the Pods are deleted with their namespace at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import statistics
import time
import uuid
from typing import Any

from koupleless.kube import Informer, KubeClient, namespace_path, pod_path


def pod(i: int) -> dict[str, Any]:
    return {
        "metadata": {
            "name": f"bench-{i}",
            "labels": {"module-controller.koupleless.io/component": "module", "app": f"app-{i % 20}"},
        },
        "spec": {
            "schedulerName": "none",
            "nodeName": "",
            "containers": [
                {
                    "name": "biz1",
                    "image": "https://example.com/biz1-0.0.1-ark-biz.jar",
                    "env": [{"name": "BIZ_VERSION", "value": "0.0.1"}] + [{"name": f"E{k}", "value": "v" * 20} for k in range(8)],
                    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                }
            ],
            "tolerations": [{"key": "schedule.koupleless.io/virtual-node", "operator": "Equal", "value": "True",
                             "effect": "NoExecute"}],
        },
    }


async def create_pods(client: KubeClient, namespace: str, count: int) -> None:
    gate = asyncio.Semaphore(32)

    async def one(i: int) -> None:
        async with gate:
            await client.create(pod_path(namespace), pod(i))

    await asyncio.gather(*(one(i) for i in range(count)))


def best_of(runs: list[float]) -> str:
    return f"best {min(runs) * 1000:8.1f} ms  median {statistics.median(runs) * 1000:8.1f} ms"


async def bench(kubeconfig: str, count: int, repeat: int) -> None:
    namespace = f"bench-{uuid.uuid4().hex[:6]}"
    async with KubeClient.from_kubeconfig(kubeconfig, qps=None) as client:
        await client.create(namespace_path(), {"metadata": {"name": namespace}})
        try:
            t0 = time.perf_counter()
            await create_pods(client, namespace, count)
            created = time.perf_counter() - t0
            print(f"created {count} Pods in {created:.1f} s ({count / created:.0f}/s, 32 in flight)")

            ours: list[float] = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                result = await client.list(pod_path(namespace))
                ours.append(time.perf_counter() - t0)
            assert len(result["items"]) == count

            from kubernetes import client as k8s_client
            from kubernetes import config as k8s_config

            api = k8s_client.CoreV1Api(k8s_config.new_client_from_config(config_file=kubeconfig))
            theirs: list[float] = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                # The generated client blocks; run it in a thread as an asyncio program would have to.
                listed = await asyncio.to_thread(api.list_namespaced_pod, namespace, limit=500)
                items = list(listed.items)
                cont = getattr(listed.metadata, "_continue", None)
                while cont:
                    listed = await asyncio.to_thread(api.list_namespaced_pod, namespace, limit=500, _continue=cont)
                    items += listed.items
                    cont = getattr(listed.metadata, "_continue", None)
                theirs.append(time.perf_counter() - t0)
            assert len(items) == count
            api.api_client.close()

            print(f"list {count} Pods, KubeClient (orjson dicts):   {best_of(ours)}")
            print(f"list {count} Pods, kubernetes 37 (models):      {best_of(theirs)}")
            print(f"  ratio (models / ours, best): {min(theirs) / min(ours):.1f}x")

            syncs: list[float] = []
            for _ in range(repeat):
                inf = Informer(
                    client, pod_path(namespace),
                    indexers={"app": lambda p: [p["metadata"]["labels"]["app"]],
                              "node": lambda p: [p["spec"].get("nodeName", "")]},
                )
                t0 = time.perf_counter()
                inf.start()
                await inf.wait_synced()
                syncs.append(time.perf_counter() - t0)
                await inf.stop()
            print(f"informer cold sync of {count} Pods (2 indexes): {best_of(syncs)}")

            events = [{"type": "MODIFIED", "object": copy.deepcopy(p)} for p in result["items"]]
            for i, e in enumerate(events):
                e["object"]["metadata"]["resourceVersion"] = str(10**7 + i)
                e["object"]["metadata"]["labels"]["app"] = f"app-{(i + 1) % 20}"
            applies: list[float] = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                for e in events:
                    inf.apply_event(e)
                applies.append(time.perf_counter() - t0)
            print(f"apply {len(events)} watch events (index moves):  {best_of(applies)}"
                  f"  = {len(events) / min(applies):,.0f} events/s")
        finally:
            await client.delete(namespace_path(namespace))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pods", type=int, default=2000, help="Pods to create (max 10000)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--kubeconfig", help="use this cluster instead of starting a local one")
    args = parser.parse_args()
    count = max(1, min(args.pods, 10000))
    if args.kubeconfig:
        asyncio.run(bench(args.kubeconfig, count, args.repeat))
        return 0
    from devcluster.cluster import ControlPlane

    with ControlPlane() as cp:
        asyncio.run(bench(str(cp.kubeconfig), count, args.repeat))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
