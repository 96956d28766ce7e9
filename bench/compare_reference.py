"""This project beside the reference (koupleless/module-controller v2.2.0, Go), figure by figure.

Each round starts one controller against the same control plane, broker and simulated bases
(provider/basesim.py, arklet's MQTT protocol, which the reference speaks too), on an env and a
namespace of its own, and measures:

  3 bases -> 3 Ready Nodes          seconds from the bases starting
  release                           the seed's module Deployment created -> its Pod Running+Ready
  scale                             replicas 1 -> 2 -> the new Pod Running+Ready
  base lost                         a base running a replica stops heartbeating (no goodbye) -> the
                                    module Running+Ready on the third base
  delete                            the Deployment deleted -> its Pods on live bases gone
  200 bases -> 200 Ready Nodes      seconds from the bases starting
  200 bases -> their 200 Leases     the same, to the last of their Leases: the registration whole
                                    (no target; the CPU and API writes printed are up to here)
  RSS at 200 bases                  the controller's resident memory once they are Ready, and after
                                    --rss-seconds steady

Ours is `python -m koupleless provider` with its shipped defaults (or with what --provider-arg adds),
with the webhook and the scheduler extender deployed as devcluster/stack.py deploys them
(kube-scheduler restarted with the extender for the round, without it for the reference's). The reference is the binary given with
--reference-binary (built by the user; this script never fetches or builds anything), configured by
its own environment variables (ENV, ENABLE_MQTT_TUNNEL, MQTT_BROKER, MQTT_PORT, KUBECONFIG), its
defaults otherwise. The two get the Deployment each one's docs ask users to write: ours the seed's
sample unchanged (manifests/samples/module-deployment.yaml); the reference's the same but for its
own module label, no base.koupleless.io/stack term (its Nodes carry no such label), a toleration for
its second taint (schedule.koupleless.io/node-env), a podAntiAffinity on kubernetes.io/hostname (its
documented way to keep one copy per base: a second copy on a base fails, REPEAT_BIZ), and a selector
that matches the template's labels (the sample's does not, which only our webhook mends).

Rounds alternate who goes first, so a busy machine weighs on both alike; between runs every Node,
Lease, Pod and namespace of the run's env is deleted, and each run gets a fresh kube-controller-manager
(its rate-limited NoExecute-taint queue would otherwise still hold an earlier run's unreachable Nodes
and delay this run's eviction: seen as a base-lost figure of 118 s instead of 61); a run starts once
the namespaces of earlier ones are gone. Printed: each figure's median and min-max for each side,
ours/reference (< 1: ours is faster or smaller) of the medians and round by round, and each figure's
target (no more than the reference; base lost also at most 45 s, a registration of 1,000 bases at
most 3 s) with whether it was met; the load average at start and end.
Without --reference-binary only ours is measured.

    python bench/compare_reference.py --reference-binary /path/to/module-controller --rounds 3

The reference binds :8080 (its report server), :8081 (probes) and :9090 (metrics) on every interface:
its code fixes them, no setting moves them to loopback; a round stops at once if one is taken.
Everything this script starts itself binds 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.provider_scale import (
    _http_ok,
    cpu_by_process,
    end_phase,
    proc_stats,
    provider_command,
    ready,
    running_ready,
    watch_namespace,
)
from devcluster.broker import Broker
from devcluster.cluster import ControlPlane
from devcluster.processes import ManagedProcess, StartError, free_port, log_tail
from devcluster.stack import SAMPLE_DEPLOYMENT, SAMPLE_NAME, DevStack, StackOptions
from koupleless import keys
from koupleless.kube import ApiError, Informer, KubeClient, lease_path, resource_path
from provider import vnode
from provider.basesim import BaseSimulator
from provider.tunnel import BrokerOptions

OURS = "ours"
REFERENCE = "reference"
#: Ports the reference's code binds on every interface: report server, probes, metrics.
REFERENCE_PORTS = (8080, 8081, 9090)


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    unit: str
    #: The most ours may take besides "no more than the reference" (issue 14's base-loss target).
    limit: float | None = None
    #: The same, for a registration of so many bases only (issue 14: 1,000 bases in 3 s).
    limits_by_many: tuple[tuple[int, float], ...] = ()
    #: Whether "no more than the reference" is a target of this figure, or it is shown for context.
    compared: bool = True

    def limit_at(self, many: int) -> float | None:
        return self.limit if self.limit is not None else dict(self.limits_by_many).get(many)


FIGURES = (
    Figure("bases3", "3 bases -> 3 Ready Nodes", "s"),
    Figure("release", "release: Deployment -> Pod Running+Ready", "s"),
    Figure("scale", "scale 1 -> 2: new Pod Running+Ready", "s"),
    Figure("base_lost", "base lost -> module Running elsewhere", "s", limit=45.0),
    Figure("delete", "delete Deployment -> Pods gone", "s"),
    Figure("bases_many", "{many} bases -> {many} Ready Nodes", "s", limits_by_many=((1000, 3.0),)),
    Figure("leases_many", "{many} bases -> their {many} Leases", "s", compared=False),
    Figure("rss_ready", "controller RSS as {many} bases are Ready", "MiB"),
    Figure("rss", "controller RSS at {many} bases, steady", "MiB"),
)

Results = dict[str, dict[str, list[float | None]]]
#: The figures --registration-only measures.
REGISTRATIONS = ("bases3", "bases_many", "leases_many")


class RoundFailed(Exception):
    """A round cannot go on (its controller exited, or a figure never came): the rest is left out."""


# --- the table (pure) ------------------------------------------------------------------------------


def spread(values: Sequence[float | None]) -> tuple[float, float, float] | None:
    """(median, min, max) of the values measured, or None when none was."""
    got = [v for v in values if v is not None]
    if not got:
        return None
    return statistics.median(got), min(got), max(got)


def _cell(values: Sequence[float | None]) -> str:
    s = spread(values)
    missing = sum(v is None for v in values)
    text = "-" if s is None else f"{s[0]:.2f} [{s[1]:.2f}-{s[2]:.2f}]"
    return text + (f" ({missing}/{len(values)} failed)" if missing else "")


def paired_ratios(ours: Sequence[float | None], ref: Sequence[float | None]) -> list[float]:
    """ours/reference round by round, where both were measured: the two sides of one round ran
    back to back, so a machine that is slower for a while weighs on both sides of a ratio alike
    (the spread of the medians holds that drift too)."""
    return [a / b for a, b in zip(ours, ref, strict=False) if a is not None and b is not None and b > 0]


def verdict(f: Figure, ours: Sequence[float | None], ratios: Sequence[float] | None, many: int = 200) -> str:
    """The figure's target and whether the median met it: no more than the reference (the median
    of the round-by-round ratios at most 1) and, where the figure has one at this --many-bases, its
    own limit."""
    limit = f.limit_at(many)
    if not f.compared:
        ratios = None
    targets = (["<= reference"] if ratios is not None else []) + ([f"<= {limit:g} {f.unit}"] if limit else [])
    if not targets:
        return ""
    s = spread(ours)
    if s is None or (ratios is not None and not ratios):
        return f"{' and '.join(targets)}: -"
    met = (ratios is None or statistics.median(ratios) <= 1.0) and (limit is None or s[0] <= limit)
    return f"{' and '.join(targets)}: {'met' if met else 'NOT met'}"


def table(results: Results, many: int, only: Sequence[str] | None = None) -> list[str]:
    """One line per figure: ours median [min-max], the reference's when measured, the ratio
    ours/reference of the medians, the median [min-max] of the round-by-round ratios, and the
    target with whether it was met."""
    with_ref = REFERENCE in results
    head = f"{'figure':<46} {'ours median [min-max]':<28}"
    if with_ref:
        head += f" {'reference median [min-max]':<28} {'ours/reference':<15} {'by round [min-max]':<20}"
    lines = [head + " target"]
    for f in FIGURES:
        if only is not None and f.key not in only:
            continue
        label = f"{f.label.format(many=many)} ({f.unit})"
        ours = results.get(OURS, {}).get(f.key, [])
        line = f"{label:<46} {_cell(ours):<28}"
        ratios: list[float] | None = None
        if with_ref:
            ref = results[REFERENCE].get(f.key, [])
            a, b = spread(ours), spread(ref)
            ratio = f"{a[0] / b[0]:.3g}" if a and b and b[0] > 0 else "-"
            ratios = paired_ratios(ours, ref)
            by_round = (f"{statistics.median(ratios):.3g} [{min(ratios):.3g}-{max(ratios):.3g}]" if ratios else "-")
            line += f" {_cell(ref):<28} {ratio:<15} {by_round:<20}"
        lines.append(f"{line} {verdict(f, ours, ratios, many)}".rstrip())
    return lines


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-binary", metavar="PATH",
                        help="a koupleless/module-controller binary you built (its cmd/module-controller); "
                             "without it only ours is measured")
    numbers: tuple[tuple[str, type, float, str], ...] = (
        ("--rounds", int, 3, "rounds, each running every controller once"),
        ("--many-bases", int, 200, "bases of the large registration"),
        ("--rss-seconds", float, 20.0, "steady seconds at --many-bases bases before the RSS is read"),
        ("--timeout", float, 180.0, "seconds any one figure may take before its round is given up"),
        ("--loss-timeout", float, 300.0, "the same for the base-lost figure, which waits on node-loss timings"),
    )
    for flag, kind, default, what in numbers:
        parser.add_argument(flag, type=kind, default=kind(default), help=f"{what} (default {default:g})")
    parser.add_argument("--workdir", default="/tmp/koupleless-bench-compare", help="logs of every round go here")
    parser.add_argument("--provider-arg", action="append", default=[], metavar="FLAG",
                        help="a flag added to our provider's command line (repeatable; e.g. --provider-arg=--kube-qps=1000 "
                             "--provider-arg=--new-bases-per-minute=0 for --many-bases 1000); without it, its shipped defaults")
    parser.add_argument("--registration-only", action="store_true",
                        help="measure only the two registrations (3 and --many-bases bases); the large one with the "
                             "CPU seconds of every process, the least time it could take with a controller that "
                             "cost nothing, and the API writes made meanwhile; no RSS window")
    parser.add_argument("--apiserver-profile", metavar="DIR",
                        help="write kube-apiserver's CPU profile (pprof) of the 2 s from the start of each large "
                             "registration to DIR (made if missing), one file per controller and round; read it "
                             "with `go tool pprof -top FILE`")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: give at least 1")
    if args.many_bases < 1:
        parser.error(f"--many-bases {args.many_bases}: give at least 1")
    if args.reference_binary is not None:
        path = Path(args.reference_binary)
        if not path.is_file() or not os.access(path, os.X_OK):
            parser.error(f"--reference-binary {args.reference_binary}: not an executable file; build the reference's "
                         "cmd/module-controller (go build -o PATH ./cmd/module-controller) and give its path")
        args.reference_binary = str(path.resolve())
    if args.apiserver_profile is not None:
        try:
            Path(args.apiserver_profile).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            parser.error(f"--apiserver-profile {args.apiserver_profile}: cannot make that directory ({exc}); "
                         "give a directory this script can write to")
    return args


# --- the two controllers ---------------------------------------------------------------------------


def seed_deployment(ns: str) -> dict[str, Any]:
    dep: dict[str, Any] = yaml.safe_load(SAMPLE_DEPLOYMENT.read_text())
    dep["metadata"]["namespace"] = ns
    return dep


def reference_deployment(ns: str, env: str) -> dict[str, Any]:
    """The seed's Deployment as the reference's docs have users write it (see the module docstring)."""
    dep = seed_deployment(ns)
    template = dep["spec"]["template"]
    labels = template["metadata"]["labels"]
    labels[keys.LABEL_COMPONENT_LEGACY] = labels.pop(keys.LABEL_COMPONENT)
    spec = template["spec"]
    for term in spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]:
        term["matchExpressions"] = [e for e in term["matchExpressions"] if e["key"] != keys.LABEL_BASE_STACK]
    spec["tolerations"].append(keys.env_toleration(env))
    # The seed's selector (app=test-module-deployment) does not match its template's app label
    # (...-non-peer): our webhook reconciles them, kube-apiserver refuses it otherwise.
    app = {"app": labels["app"]}
    dep["spec"]["selector"]["matchLabels"] = app
    spec["affinity"]["podAntiAffinity"] = {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": app}, "topologyKey": keys.LABEL_HOSTNAME}]}
    return dep


class Ours:
    who = OURS

    def __init__(self, cp: ControlPlane, broker: Broker, env: str, workdir: Path, flags: Sequence[str] = ()) -> None:
        self.cp, self.env, self.workdir = cp, env, workdir
        self.port = free_port()
        self.process = ManagedProcess("provider", [*provider_command(cp, broker, env, f"cmp-{env}", self.port), *flags],
                                      workdir / "provider.log")
        self.stack = DevStack(StackOptions(env=env, workdir=workdir), progress=lambda _: None, shared_plane=cp)

    def node_name(self, base_id: str) -> str:
        return keys.vnode_name(base_id)

    def helper_pids(self) -> dict[str, int]:
        """The webhook and the extender: ours runs with both, and their watches share the cores."""
        return {name: p.pid for name, p in self.stack.components.items() if p.pid is not None}

    def deployment(self, ns: str) -> dict[str, Any]:
        return seed_deployment(ns)

    async def start(self) -> None:
        for step in (self.stack.install_rbac, self.stack.start_webhook, self.stack.start_extender):
            await asyncio.to_thread(step)
        self.process.start()
        await asyncio.to_thread(self.process.wait_ready, lambda: _http_ok(self.port), 60)

    async def cleanup(self) -> None:
        """Unregister the webhook, stop it and the extender, and give kube-scheduler back its plain
        configuration (the reference's rounds run without either)."""
        try:
            if "webhook" in self.stack.components:
                await asyncio.to_thread(self.stack.unregister_webhook)
        finally:
            self.stack.stop_components()
            await asyncio.to_thread(self.cp.start_scheduler)


class Reference:
    who = REFERENCE

    def __init__(self, binary: str, cp: ControlPlane, broker: Broker, env: str, workdir: Path) -> None:
        self.env = env
        self.log = workdir / "module-controller.log"
        # Its own settings (cmd/module-controller/main.go, koupleless_mqtt_tunnel/config.go); every
        # other one keeps its default.
        settings = {"KUBECONFIG": str(cp.kubeconfig), "ENV": env, "ENABLE_MQTT_TUNNEL": "true",
                    "MQTT_BROKER": broker.host, "MQTT_PORT": str(broker.port)}
        self.process = ManagedProcess("reference", [binary], self.log,
                                      env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **settings})

    def node_name(self, base_id: str) -> str:
        return f"vnode.{base_id}.{self.env}"  # virtual-kubelet's FormatNodeName

    def helper_pids(self) -> dict[str, int]:
        return {}

    def deployment(self, ns: str) -> dict[str, Any]:
        return reference_deployment(ns, self.env)

    async def start(self) -> None:
        taken = busy_ports(REFERENCE_PORTS)
        if taken:
            raise RoundFailed(f"the reference binds {', '.join(map(str, REFERENCE_PORTS))} on every interface, "
                              f"and {', '.join(map(str, taken))} is in use on this machine")
        self.process.start()

        def up() -> bool:
            # Its probes answer once its manager runs; its MQTT tunnel subscribes on connect.
            with urllib.request.urlopen("http://127.0.0.1:8081/readyz", timeout=2) as resp:
                return resp.status == 200 and b"MQTT client connected" in self.log.read_bytes()

        await asyncio.to_thread(self.process.wait_ready, up, 60)

    async def cleanup(self) -> None:
        return None


def registration_cpu(cp: ControlPlane, ctl: Ours | Reference) -> dict[str, float]:
    """CPU seconds so far of every process on the machine that takes part: the control plane, the
    controller ("provider"), our webhook and extender, and this process (the simulated bases)."""
    cpu = cpu_by_process(cp, ctl.process.pid or 0, ctl.helper_pids())
    cpu["controller"] = cpu.pop("provider", 0.0)
    return cpu


async def settle(cp: ControlPlane, ctl: Ours | Reference, *, idle_cpu: float = 0.1, window: float = 0.5,
                 deadline: float = 30.0) -> str:
    """Wait until the machine is quiet: every process that takes part together used under
    `idle_cpu` of a core over `window` seconds. A fresh kube-controller-manager, a restarted
    kube-scheduler and the controller's own start-up still list and sync for a while; measured
    from a busy start, a registration would be charged for them, and the side with the quicker
    start (the 3-base registration before it) the more. Returns "" once quiet, else what was busy."""
    end = time.monotonic() + deadline
    before = registration_cpu(cp, ctl)
    while True:
        await asyncio.sleep(window)  # sampling interval of a CPU-rate reading, not synchronisation
        now = registration_cpu(cp, ctl)
        used = {k: v - before.get(k, 0.0) for k, v in now.items()}
        if sum(used.values()) < idle_cpu * window:
            return ""
        if time.monotonic() >= end:
            busy = sorted(used.items(), key=lambda kv: -kv[1])[:3]
            return f"not quiet after {deadline:.0f}s (" + ", ".join(f"{k} {v / window:.0%}" for k, v in busy) + " of a core)"
        before = now


async def earlier_namespaces_gone(cp: ControlPlane, deadline: float = 120.0) -> str:
    """Wait until the namespaces of earlier rounds are gone. Each round deletes its own at the end,
    and the fresh kube-controller-manager of the next one empties and finalizes it: measured
    meanwhile, a registration would be charged for some 40 DELETE requests it did not make.
    Returns "" once gone, else which are left."""
    end = time.monotonic() + deadline
    while True:
        listed = await asyncio.to_thread(cp.kubectl, "get", "namespaces", "-o", "name")
        left = [n.removeprefix("namespace/") for n in listed.stdout.split() if n.startswith("namespace/cmp-")]
        if not left:
            return ""
        if time.monotonic() >= end:
            return f"earlier rounds' namespaces {', '.join(left)} still there after {deadline:.0f}s"
        await asyncio.sleep(0.5)  # poll interval


def apiserver_profile(cp: ControlPlane, seconds: int, out: Path) -> None:
    """kube-apiserver's own CPU profile over the next `seconds` (its /debug/pprof: the control plane
    is started with profiling on when --apiserver-profile is given). A profile that cannot be had
    is said and skipped: the round's figures do not depend on it."""
    assert cp.binaries is not None
    try:
        proc = subprocess.run([str(cp.binaries.kubectl), f"--kubeconfig={cp.kubeconfig}", "get", "--raw",
                               f"/debug/pprof/profile?seconds={seconds}"], capture_output=True, timeout=seconds + 60)
        if proc.returncode != 0:
            print(f"    kube-apiserver profile failed: {proc.stderr.decode(errors='replace').strip()}", flush=True)
            return
        out.write_bytes(proc.stdout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"    kube-apiserver profile to {out} failed: {exc}", flush=True)


def api_requests(cp: ControlPlane) -> dict[str, float]:
    """kube-apiserver's own count of write requests so far, by `VERB resource[/subresource]`."""
    counts: dict[str, float] = {}
    for line in cp.kubectl("get", "--raw", "/metrics").stdout.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(part.split("=", 1) for part in line[line.index("{") + 1:line.rindex("}")].split(","))
        verb = labels.get("verb", "").strip('"')
        if verb in ("GET", "LIST", "WATCH", "WATCHLIST", "CONNECT"):
            continue
        what = labels.get("resource", "").strip('"') + ("/" + labels["subresource"].strip('"')
                                                         if labels.get("subresource", '""') != '""' else "")
        key = f"{verb} {what}"
        counts[key] = counts.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def where_time_went(cpu: dict[str, float], before: dict[str, float], after: dict[str, float]) -> str:
    """CPU seconds by process and the API writes made meanwhile (by anyone), busiest first."""
    writes = {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0) > 0}
    cpus = os.cpu_count() or 1
    # A registration is CPU-bound: what every other process needed, spread over every core, is the
    # time it could take with a controller that cost nothing.
    others = sum(v for k, v in cpu.items() if k != "controller")
    return ("CPU s " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]))
            + f" (total {sum(cpu.values()):.2f} on {cpus} CPUs; without the controller {others:.2f},"
            f" at least {others / cpus:.2f} s of wall clock); API writes "
            + ", ".join(f"{k} {v:.0f}" for k, v in sorted(writes.items(), key=lambda kv: -kv[1])))


def exited(proc: ManagedProcess) -> str:
    """Why a controller stopped, as its log says (a Go panic's first line, else the last line)."""
    lines = log_tail(proc.log_path, 200).splitlines()
    why = next((line for line in lines if line.startswith("panic:")), lines[-1] if lines else "no log")
    return f"{proc.name} exited ({why.strip()[:300]}); see {proc.log_path}"


def busy_ports(ports: Sequence[int]) -> list[int]:
    taken = []
    for port in ports:
        with socket.socket() as s:
            # As Go's net.Listen does: connections of a previous run still in TIME_WAIT do not count.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                taken.append(port)
    return taken


# --- a round ---------------------------------------------------------------------------------------


class WatchedChanges:
    """Wakes a figure's wait at each watch event, so the figure ends at the event that completed it
    (a 50 ms poll made every sub-second figure a multiple of 50 ms: two controllers that both took
    60-100 ms to scale printed 0.10 alike). Keeps which Nodes are Ready and which Leases exist, so a
    200-base check costs a set intersection per event, not a walk of every object."""

    def __init__(self, nodes: Informer, pods: Informer, leases: Informer) -> None:
        self.ready_nodes: set[str] = set()
        self.leases: set[str] = set()
        self._changed = asyncio.Event()
        nodes.add_handler(self._on_node, lambda _old, new: self._on_node(new), self._on_node_gone)
        pods.add_handler(self._poke, lambda _old, _new: self._poke(), self._poke)
        leases.add_handler(self._on_lease, lambda _old, new: self._on_lease(new), self._on_lease_gone)

    def _poke(self, *_: object) -> None:
        self._changed.set()

    def _on_node(self, node: dict[str, Any]) -> None:
        name = node["metadata"]["name"]
        if ready(node):
            self.ready_nodes.add(name)
        else:
            self.ready_nodes.discard(name)
        self._changed.set()

    def _on_node_gone(self, node: dict[str, Any]) -> None:
        self.ready_nodes.discard(node["metadata"]["name"])
        self._changed.set()

    def _on_lease(self, lease: dict[str, Any]) -> None:
        self.leases.add(lease["metadata"]["name"])
        self._changed.set()

    def _on_lease_gone(self, lease: dict[str, Any]) -> None:
        self.leases.discard(lease["metadata"]["name"])
        self._changed.set()

    async def wait(self, cond: Callable[[], bool], timeout: float, what: str, tick: float = 0.5) -> float:
        """Seconds until `cond` held: checked at each event, and every `tick` seconds besides (for
        conditions on time, and for `cond` to notice a controller that exited)."""
        start = time.monotonic()
        while True:
            self._changed.clear()
            if cond():
                return time.monotonic() - start
            left = start + timeout - time.monotonic()
            if left <= 0:
                raise RoundFailed(f"timed out after {timeout:.0f}s waiting for {what}")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, tick)):
                    await self._changed.wait()


async def one_round(args: argparse.Namespace, cp: ControlPlane, broker: Broker, ctl: Ours | Reference
                    ) -> dict[str, float | None]:
    env = tag = ctl.env
    ns = f"cmp-{tag}"
    got: dict[str, float | None] = {f.key: None for f in FIGURES}
    client = KubeClient.from_kubeconfig(str(cp.kubeconfig), qps=None)
    nodes, pods, _ = await watch_namespace(client, ns, env, tag)
    leases = Informer(client, lease_path(vnode.LEASE_NAMESPACE), label_selector=f"{keys.LABEL_VNODE_ENV}={env}",
                      name=f"leases-{tag}")
    leases.start()
    await leases.wait_synced()
    changes = WatchedChanges(nodes, pods, leases)
    fleets: list[BaseSimulator] = []
    proc = ctl.process
    dep_path = resource_path("apps/v1", "deployments", ns)
    try:
        await ctl.start()

        def check(cond: Callable[[], bool]) -> Callable[[], bool]:
            def run() -> bool:
                if not proc.running():
                    raise RoundFailed(exited(proc))
                return cond()
            return run

        async def timed(cond: Callable[[], bool], what: str, timeout: float = args.timeout) -> float:
            return await changes.wait(check(cond), timeout, f"{what} ({ctl.who})")

        def live(lost: str = "") -> list[dict[str, Any]]:
            return [p for p in pods.list() if running_ready(p) and not p["metadata"].get("deletionTimestamp")
                    and p["spec"].get("nodeName") != lost]

        async def register(count: int, prefix: str, key: str) -> BaseSimulator:
            fleet = BaseSimulator(BrokerOptions(broker.host, broker.port), env=env, count=count, id_prefix=prefix)
            fleets.append(fleet)
            names = {ctl.node_name(b) for b in fleet.bases}
            explain = key == "bases_many"
            if explain:
                if busy := await settle(cp, ctl):
                    print(f"    {ctl.who}: the machine was {busy}; measuring anyway", flush=True)
                requests_before = await asyncio.to_thread(api_requests, cp)
                cpu_before = registration_cpu(cp, ctl)
            profile = None
            if explain and args.apiserver_profile:
                out = Path(args.apiserver_profile) / f"{ctl.env}-{ctl.who}.pprof"
                profile = asyncio.create_task(asyncio.to_thread(apiserver_profile, cp, 2, out))
            t0 = time.monotonic()
            await fleet.start()
            await timed(lambda: len(names & changes.ready_nodes) >= count, f"{count} Ready Nodes")
            got[key] = time.monotonic() - t0
            if explain:
                await timed(lambda: len(names & changes.leases) >= count, f"{count} Leases")
                got["leases_many"] = time.monotonic() - t0
                cpu = {k: v - cpu_before.get(k, 0.0) for k, v in registration_cpu(cp, ctl).items()}
                requests = await asyncio.to_thread(api_requests, cp)
                print(f"    {ctl.who} registering {count} bases: " + where_time_went(cpu, requests_before, requests),
                      flush=True)
            if profile is not None:
                await profile
            return fleet

        fleet = await register(3, f"{tag}-b", "bases3")
        if args.registration_only:
            await fleet.stop(graceful=False)
            await register(args.many_bases, f"{tag}-m", "bases_many")
            return got
        await client.create(dep_path, ctl.deployment(ns))
        got["release"] = await timed(lambda: len(live()) >= 1, "the released module Running+Ready")
        await client.patch(f"{dep_path}/{SAMPLE_NAME}", {"spec": {"replicas": 2}})
        got["scale"] = await timed(lambda: len(live()) >= 2, "2 replicas Running+Ready")

        lost = live()[0]["spec"]["nodeName"]
        fleet.kill(next(b for b in fleet.bases if ctl.node_name(b) == lost))
        got["base_lost"] = await timed(lambda: len(live(lost)) >= 2, "the lost base's module Running elsewhere",
                                       args.loss_timeout)
        await client.delete(f"{dep_path}/{SAMPLE_NAME}", propagation_policy="Background")
        got["delete"] = await timed(lambda: not [p for p in pods.list() if p["spec"].get("nodeName") != lost],
                                    "the Deployment's Pods gone")
        await fleet.stop(graceful=False)

        await register(args.many_bases, f"{tag}-m", "bases_many")
        got["rss_ready"] = proc_stats(proc.pid or 0)[0]
        steady_until = time.monotonic() + args.rss_seconds  # a crash meanwhile ends the round at once
        await timed(lambda: time.monotonic() >= steady_until, "the end of the steady window", args.rss_seconds + 60)
        got["rss"] = proc_stats(proc.pid or 0)[0]
    except (RoundFailed, StartError, ApiError, SystemExit) as exc:
        # provider_scale's helpers end a whole bench with SystemExit; here it ends this round only.
        print(f"    round {tag} given up: {exc}", flush=True)
    finally:
        with contextlib.suppress(Exception):
            await client.delete(f"{dep_path}/{SAMPLE_NAME}", propagation_policy="Background")
        try:
            await leases.stop()
            await end_phase(fleets, proc, nodes, pods, client, ns, env)
        finally:
            await ctl.cleanup()
    return got


async def run(args: argparse.Namespace, cp: ControlPlane, broker: Broker) -> Results:
    work = Path(args.workdir)
    results: Results = {}
    for r in range(args.rounds):
        controllers: list[Ours | Reference] = [Ours(cp, broker, f"cmp{r}o", work / f"r{r}-ours", args.provider_arg)]
        if args.reference_binary:
            controllers.append(Reference(args.reference_binary, cp, broker, f"cmp{r}r", work / f"r{r}-reference"))
        if r % 2:
            controllers.reverse()
        for ctl in controllers:
            await asyncio.to_thread(cp.restart_controller_manager)
            if left := await earlier_namespaces_gone(cp):
                print(f"    {ctl.who}: {left}; measuring anyway", flush=True)
            got = await one_round(args, cp, broker, ctl)
            for key, value in got.items():
                results.setdefault(ctl.who, {}).setdefault(key, []).append(value)
            print(f"    round {r} {ctl.who:<9}: " + ", ".join(
                f"{f.key} " + ("-" if got[f.key] is None else f"{got[f.key]:.2f}{f.unit}") for f in FIGURES), flush=True)
    return results


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    import uvloop

    print(f"load average at start: {load()} ({os.cpu_count()} CPUs)", flush=True)
    print(f"reference: {args.reference_binary or 'not given (ours only)'}; rounds: {args.rounds}, "
          f"{args.many_bases} bases in the large registration; control plane with devcluster's node-loss timings; "
          f"our provider's flags: {shlex.join(args.provider_arg) or 'its defaults'}", flush=True)
    try:
        # Anonymous broker, as provider_scale's: the reference logs in as its default user, and the
        # simulated bases share one connection.
        with ControlPlane(profiling=bool(args.apiserver_profile)) as cp, Broker(identity=False) as broker:
            results = uvloop.run(run(args, cp, broker))
        only = REGISTRATIONS if args.registration_only else None
        print("\n".join(table(results, args.many_bases, only)))
    finally:
        print(f"load average at end: {load()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
