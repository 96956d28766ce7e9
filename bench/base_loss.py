"""Base loss with the shipped defaults: how long from a base dying to its module Running again on another
base, and whether healthy bases whose heartbeats are merely late ever go NotReady.

The whole system as `module-controller dev` runs it (a real control plane, mosquitto with the shipped
broker security, the webhook, the extender registered with kube-scheduler, the provider, base-sim
processes), with one change to the local rig: kube-controller-manager and kube-apiserver run with
Kubernetes' own node-loss defaults (--node-monitor-period 5s, --node-monitor-grace-period 50s,
default not-ready/unreachable tolerations 300 s), as in a user's cluster, instead of the dev cluster's
shortened ones. The provider and the webhook run with their shipped defaults (--provider-arg /
--webhook-arg add flags, to measure other settings).

  [a] base loss -> replacement Running+Ready, --rounds times: the seed's sample Deployment (1 replica)
      runs on a pool of --pool-bases bases; the bench waits for the heartbeat of the base running it
      (seen on the broker) and kills that base at once (base-sim's kill: no more heartbeats, no
      answers, no goodbye, as a JVM killed with SIGKILL), so each round is the worst case: a full
      heartbeat interval of silence is already lost when the next beat would have come. Printed per
      round, in seconds from the kill as this process's watches saw it: the Node NotReady (provider),
      tainted not-ready:NoExecute (node lifecycle controller), the module Pod evicted (taint eviction
      controller, after the webhook's toleration), the replacement created (ReplicaSet), bound
      (kube-scheduler + extender) and Running+Ready (provider + base); then the killed base is
      restarted so the pool stays whole. Median, min and max beside the 45 s target.
  [b] false NotReady: --jitter-bases healthy bases (base-sim --heartbeat-jitter --jitter: each beat up to
      that far off its fixed-rate slot, independently, so gaps of interval +- 2 x jitter) for
      --jitter-minutes, while [a] runs; every transition of their Nodes' Ready condition away from True,
      from a watch, is counted (target 0). The longest heartbeat gap seen on the broker is printed
      beside the provider's NotReady threshold.

The load average is printed at the start and the end: the machine may be shared.

    python bench/base_loss.py                                   # 5 rounds; 50 bases jittered +-3 s, 10 min
    python bench/base_loss.py --rounds 2 --jitter-minutes 2     # quick
    python bench/base_loss.py --provider-arg=--missed-heartbeats=3 --webhook-arg=--eviction-toleration-seconds=30
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from devcluster.broker import FLEET_USER
from devcluster.cluster import Timings
from devcluster.stack import SAMPLE_NAME, DevStack, StackOptions
from koupleless import arklet, keys
from koupleless.kube import Informer, KubeClient, node_path, pod_path
from provider.bases import judge_period
from provider.basesim import default_id_prefix, sim_base_ids
from provider.controller import ProviderOptions
from provider.tunnel import BrokerOptions, MqttTunnel
from webhook.defaults import Defaults

TARGET_REPLACEMENT_S = 45.0
TARGET_FALSE_NOT_READY = 0
SAMPLE_POD_LABEL = "app=test-module-deployment-non-peer"
STEADY_NAME, STEADY_VERSION = "steady", "1.0.0"
#: Bounds of one round, so the bench always ends: waiting for the victim's heartbeat, for the
#: replacement to run, and for the restarted base's Node to be Ready and untainted again.
BEAT_WAIT_S = 30.0
REPLACEMENT_WAIT_S = 180.0
RECOVERY_WAIT_S = 120.0


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def node_ready(node: dict[str, Any]) -> str:
    for c in node.get("status", {}).get("conditions", []):
        if c.get("type") == "Ready":
            return str(c.get("status"))
    return "Unknown"


def eviction_tainted(node: dict[str, Any]) -> bool:
    return any(t.get("key") in (keys.TAINT_NOT_READY, keys.TAINT_UNREACHABLE) and t.get("effect") == "NoExecute"
               for t in node.get("spec", {}).get("taints") or [])


def pod_running_ready(pod: dict[str, Any]) -> bool:
    status = pod.get("status", {})
    return status.get("phase") == "Running" and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions", []))


@dataclass
class Watched:
    """What the watches and the broker showed, each with the monotonic time this process saw it."""

    not_ready: list[tuple[float, str]] = field(default_factory=list)  # (t, node) Ready True -> not True
    tainted: list[tuple[float, str]] = field(default_factory=list)  # (t, node) eviction taint appeared
    pod_created: dict[str, float] = field(default_factory=dict)  # uid -> t
    pod_bound: dict[str, float] = field(default_factory=dict)
    pod_deleting: dict[str, float] = field(default_factory=dict)
    pod_ready: dict[str, float] = field(default_factory=dict)
    last_beat: dict[str, float] = field(default_factory=dict)  # base ID -> t
    longest_gap: dict[str, float] = field(default_factory=dict)
    beat_waiters: dict[str, list[asyncio.Future[float]]] = field(default_factory=dict)

    def on_node(self, old: dict[str, Any] | None, new: dict[str, Any]) -> None:
        now, name = time.monotonic(), new["metadata"]["name"]
        if old is not None and node_ready(old) == "True" and node_ready(new) != "True":
            self.not_ready.append((now, name))
        if eviction_tainted(new) and not (old is not None and eviction_tainted(old)):
            self.tainted.append((now, name))

    def on_pod(self, pod: dict[str, Any]) -> None:
        now, uid = time.monotonic(), pod["metadata"]["uid"]
        self.pod_created.setdefault(uid, now)
        if pod["spec"].get("nodeName"):
            self.pod_bound.setdefault(uid, now)
        if pod["metadata"].get("deletionTimestamp"):
            self.pod_deleting.setdefault(uid, now)
        if pod_running_ready(pod):
            self.pod_ready.setdefault(uid, now)

    def on_heartbeat(self, topic: str, _payload: bytes) -> None:
        now = time.monotonic()
        base_id = topic.split("/")[1]
        last = self.last_beat.get(base_id)
        if last is not None:
            self.longest_gap[base_id] = max(self.longest_gap.get(base_id, 0.0), now - last)
        self.last_beat[base_id] = now
        for fut in self.beat_waiters.pop(base_id, []):
            if not fut.done():
                fut.set_result(now)

    def next_beat(self, base_id: str) -> asyncio.Future[float]:
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.beat_waiters.setdefault(base_id, []).append(fut)
        return fut


@dataclass
class Round:
    victim: str
    #: Monotonic times the base was killed and its Node was Ready again after its restart.
    killed: float = 0.0
    recovered: float = float("inf")
    beat_to_kill_ms: float = 0.0
    #: Seconds from the kill: NotReady, tainted, evicted, replacement created, bound, Running+Ready.
    steps: dict[str, float] = field(default_factory=dict)
    failed: str = ""


STEPS = ("NotReady", "tainted", "evicted", "created", "bound", "Running+Ready")


async def until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        await asyncio.sleep(0.05)
    raise TimeoutError(f"no {what} after {timeout:.0f}s")


async def one_round(n: int, w: Watched, pods: Informer, nodes: Informer, http: aiohttp.ClientSession,
                    pool_port: int) -> Round:
    def live_pod() -> dict[str, Any] | None:
        return next((p for p in pods.list() if not p["metadata"].get("deletionTimestamp") and pod_running_ready(p)),
                    None)

    pod = await until(live_pod, REPLACEMENT_WAIT_S, "Running+Ready sample Pod")
    victim_node = pod["spec"]["nodeName"]
    victim = victim_node.removeprefix(keys.VNODE_NAME_PREFIX)
    rnd = Round(victim)
    old_uid = pod["metadata"]["uid"]
    beat = await asyncio.wait_for(w.next_beat(victim), BEAT_WAIT_S)
    async with http.post(f"http://127.0.0.1:{pool_port}/bases/{victim}/kill") as resp:
        resp.raise_for_status()
    killed = rnd.killed = time.monotonic()
    rnd.beat_to_kill_ms = (killed - beat) * 1000
    print(f"    round {n}: killed base {victim} {rnd.beat_to_kill_ms:.0f} ms after its heartbeat", flush=True)

    def replacement() -> str | None:
        return next((p["metadata"]["uid"] for p in pods.list()
                     if p["metadata"]["uid"] != old_uid and not p["metadata"].get("deletionTimestamp")
                     and pod_running_ready(p)), None)

    try:
        new_uid = await until(replacement, REPLACEMENT_WAIT_S, "replacement Running+Ready")
    except TimeoutError as exc:
        rnd.failed = str(exc)
        new_uid = ""

    def first(events: list[tuple[float, str]]) -> float | None:
        return next((t for t, name in events if name == victim_node and t >= killed), None)

    found = {"NotReady": first(w.not_ready), "tainted": first(w.tainted), "evicted": w.pod_deleting.get(old_uid),
             "created": w.pod_created.get(new_uid), "bound": w.pod_bound.get(new_uid),
             "Running+Ready": w.pod_ready.get(new_uid)}
    rnd.steps = {k: t - killed for k, t in found.items() if t is not None}

    # the pool stays whole: the base comes back (empty), its Node Ready and untainted
    async with http.post(f"http://127.0.0.1:{pool_port}/bases/{victim}/restart") as resp:
        resp.raise_for_status()

    def recovered() -> bool:
        node = nodes.get(victim_node)
        return node is not None and node_ready(node) == "True" and not eviction_tainted(node)

    try:
        await until(recovered, RECOVERY_WAIT_S, f"Node {victim_node} Ready and untainted after the restart")
        rnd.recovered = time.monotonic()
    except TimeoutError as exc:
        rnd.failed = rnd.failed or str(exc)
    return rnd


async def measure(stack: DevStack, args: argparse.Namespace, pool_port: int, steady_ids: list[str]) -> int:
    w = Watched()
    client = KubeClient.from_kubeconfig(str(stack.plane.kubeconfig), qps=None)
    nodes = Informer(client, node_path(), label_selector=f"{keys.LABEL_COMPONENT_LEGACY}={keys.COMPONENT_VNODE}",
                     name="nodes")
    pods = Informer(client, pod_path("default"), label_selector=SAMPLE_POD_LABEL, name="pods")
    nodes.add_handler(lambda n: w.on_node(None, n), w.on_node)
    pods.add_handler(w.on_pod, lambda _old, new: w.on_pod(new))
    broker = stack.broker
    beats = MqttTunnel(BrokerOptions(broker.host, broker.port, username=FLEET_USER, password=broker.password(FLEET_USER)),
                       client_id=f"bench-base-loss-{os.getpid()}",
                       subscriptions=[(f"koupleless_{stack.options.env}/+/{arklet.HEART}", 1)],
                       on_message=w.on_heartbeat, persistent_session=False, name="bench")
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
    tasks = [nodes.start(), pods.start()]
    try:
        await beats.start()
        await asyncio.gather(nodes.wait_synced(), pods.wait_synced(), beats.connected.wait())
        steady_nodes = {keys.vnode_name(b) for b in steady_ids}
        await until(lambda: all((n := nodes.get(name)) is not None and node_ready(n) == "True" for name in steady_nodes),
                    120, f"{len(steady_nodes)} steady Nodes Ready")
        window_start = time.monotonic()
        window_end = window_start + args.jitter_minutes * 60
        print(f"[b] {len(steady_ids)} bases jittered +-{args.jitter:g} s: watching their Nodes for "
              f"{args.jitter_minutes:g} min (rounds of [a] run meanwhile)", flush=True)
        rounds: list[Round] = []
        for n in range(1, args.rounds + 1):
            try:
                rounds.append(await one_round(n, w, pods, nodes, http, pool_port))
            except (TimeoutError, aiohttp.ClientError) as exc:
                rounds.append(Round("?", failed=f"{type(exc).__name__}: {exc}"))
        await asyncio.sleep(max(0.0, window_end - time.monotonic()))
        window = time.monotonic() - window_start
        false_not_ready = [(t - window_start, name) for t, name in w.not_ready
                           if name in steady_nodes and window_start <= t]
        # the pool's bases too, outside the rounds that killed them
        pool_false = [(t - window_start, name) for t, name in w.not_ready if name not in steady_nodes and not any(
            keys.vnode_name(r.victim) == name and r.killed <= t <= r.recovered for r in rounds)]
        gaps = {b: g for b, g in w.longest_gap.items() if keys.vnode_name(b) in steady_nodes}
    finally:
        await http.close()
        await beats.stop()
        await nodes.stop()
        await pods.stop()
        for task in tasks:
            task.cancel()
        await client.close()
    report(args, rounds, false_not_ready, pool_false, gaps, window, len(steady_ids))
    ok = all(not r.failed for r in rounds)
    return 0 if ok else 1


def report(args: argparse.Namespace, rounds: list[Round], false_not_ready: list[tuple[float, str]],
           pool_false: list[tuple[float, str]], gaps: dict[str, float], window: float, steady: int) -> None:
    print()
    print(f"[a] base loss -> replacement Running+Ready, {len(rounds)} rounds, each base killed just after its "
          "heartbeat (seconds from the kill, as watched)")
    print("    round  " + "  ".join(f"{s:>13}" for s in STEPS) + "   beat->kill")
    for i, r in enumerate(rounds, 1):
        cells = "  ".join(f"{r.steps[s]:13.1f}" if s in r.steps else f"{'-':>13}" for s in STEPS)
        print(f"    {i:5}  {cells}   {r.beat_to_kill_ms:6.0f} ms" + (f"   FAILED: {r.failed}" if r.failed else ""))
    done = [r.steps["Running+Ready"] for r in rounds if "Running+Ready" in r.steps and not r.failed]
    if done:
        med, lo, hi = statistics.median(done), min(done), max(done)
        print(f"    replacement Running+Ready: median {med:.1f} s  min {lo:.1f} s  max {hi:.1f} s   target <= "
              f"{TARGET_REPLACEMENT_S:g} s (max/target {hi / TARGET_REPLACEMENT_S:.2f}; <= 1 meets it)")
        for a, b, what in (("", "NotReady", "kill -> NotReady (provider: missed heartbeats + judge period)"),
                           ("NotReady", "tainted", "NotReady -> tainted (node lifecycle controller's monitor period)"),
                           ("tainted", "evicted", "tainted -> evicted (the webhook's toleration)"),
                           ("evicted", "Running+Ready", "evicted -> replacement Running+Ready (RS, scheduler, "
                            "install)")):
            spans = [r.steps[b] - (r.steps[a] if a else 0.0) for r in rounds if b in r.steps and (not a or a in r.steps)]
            if spans:
                print(f"      {what}: median {statistics.median(spans):.1f} s, max {max(spans):.1f} s")
    else:
        print(f"    no round finished (target <= {TARGET_REPLACEMENT_S:g} s)")
    print()
    longest = max(gaps.values(), default=0.0)
    print(f"[b] false NotReady: {len(false_not_ready)} transitions away from Ready=True on {steady} healthy bases "
          f"jittered +-{args.jitter:g} s over {window / 60:.1f} min   target {TARGET_FALSE_NOT_READY}")
    for t, name in false_not_ready[:10]:
        print(f"      {t:7.1f} s  {name}")
    print(f"    and on the pool's {args.pool_bases} bases (10 s heartbeats on time), outside the rounds that killed "
          f"them: {len(pool_false)}" + "".join(f"; {t:.1f} s {name}" for t, name in pool_false[:10]))
    over = sum(1 for g in gaps.values() if g > args.interval + args.jitter)
    print(f"    longest heartbeat gap seen on the broker: {longest:.1f} s (bases with a gap over "
          f"{args.interval + args.jitter:g} s: {over}/{len(gaps)}); the provider marks NotReady after "
          f"{args.threshold:g} s of silence")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="bases killed one after another (default 5)")
    p.add_argument("--pool-bases", type=int, default=4, help="bases the sample module may run on (default 4)")
    p.add_argument("--jitter-bases", type=int, default=50, help="healthy bases with jittered heartbeats (default 50)")
    p.add_argument("--jitter", type=float, default=3.0, help="seconds each heartbeat may be off its slot (default 3)")
    p.add_argument("--jitter-minutes", type=float, default=10.0, help="how long they are watched (default 10)")
    p.add_argument("--provider-arg", action="append", default=[], help="extra provider flag (repeatable)")
    p.add_argument("--webhook-arg", action="append", default=[], help="extra webhook flag (repeatable)")
    p.add_argument("--workdir", help="keep logs here (default: a temp dir, removed)")
    args = p.parse_args()
    if args.rounds < 1 or args.pool_bases < 2:
        p.error("--rounds >= 1 and --pool-bases >= 2 (a killed base's module needs somewhere to go)")
    return args


def settings(args: argparse.Namespace) -> str:
    provider, webhook = ProviderOptions(), Defaults()
    interval, missed = provider.heartbeat_interval, provider.missed_heartbeats
    for flag in args.provider_arg:
        name, _, value = flag.partition("=")
        if name == "--missed-heartbeats":
            missed = int(value)
        elif name == "--heartbeat-interval":
            interval = float(value)
    toleration = webhook.eviction_toleration_seconds
    for flag in args.webhook_arg:
        name, _, value = flag.partition("=")
        if name == "--eviction-toleration-seconds":
            toleration = int(value)
    args.interval, args.threshold = interval, interval * missed
    return (f"provider --heartbeat-interval {interval:g} --missed-heartbeats {missed} (NotReady after "
            f"{interval * missed:g} s of silence, judged every {judge_period(interval):g} s); webhook "
            f"--eviction-toleration-seconds {toleration}; kube-controller-manager and kube-apiserver: Kubernetes' "
            f"defaults ({'; '.join(f'{k} {v}' for k, v in vars(Timings.kubernetes_defaults()).items())})"
            + (f"; extra: {' '.join(args.provider_arg + args.webhook_arg)}" if args.provider_arg or args.webhook_arg
               else ""))


def main() -> int:
    args = parse_args()
    print(f"load average at start: {loadavg()}")
    print(f"settings: {settings(args)}", flush=True)
    # A workdir named is kept (its logs are worth reading); else DevStack makes a temp one and removes it.
    stack = DevStack(StackOptions(bases=args.pool_bases, workdir=Path(args.workdir) if args.workdir else None,
                                  timings=Timings.kubernetes_defaults(),
                                  provider_args=tuple(args.provider_arg), webhook_args=tuple(args.webhook_arg)))
    try:
        stack.start()
        steady_ids = sim_base_ids(default_id_prefix(STEADY_NAME, STEADY_VERSION), args.jitter_bases)
        stack.start_base_sim("base-sim-steady", args.jitter_bases, STEADY_NAME, STEADY_VERSION,
                             "--heartbeat-jitter", str(args.jitter))
        print(f"[a] the seed's sample Deployment runs on a pool of {args.pool_bases} bases; "
              f"{SAMPLE_NAME} is moved {args.rounds} times", flush=True)
        code = asyncio.run(measure(stack, args, stack.base_sim_port, steady_ids))
    finally:
        stack.stop()
    print(f"load average at end: {loadavg()}")
    return code


if __name__ == "__main__":
    sys.exit(main())
