"""`module-controller provider`: bases become virtual Nodes, module Pods become installs over MQTT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket

from aiohttp import web

from koupleless import keys, runtime
from koupleless.http import add_health_routes
from koupleless.kube.client import KubeClient
from koupleless.kube.config import KubeConfigError
from provider import vnode
from provider.controller import Provider, ProviderOptions
from provider.tunnel import add_broker_arguments, broker_from_args
from provider.vnode import NodeOptions

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG, in-cluster, ~/.kube/config)")
    parser.add_argument("--context", default=None, help="kubeconfig context")
    add_broker_arguments(parser)
    parser.add_argument("--env", default=keys.DEFAULT_ENV, help="env of the bases: topics koupleless_<env>/..., Node label (default dev)")
    parser.add_argument(
        "--identity", default=None,
        help="this replica's name: Lease holder and MQTT client id (default $POD_NAME or the host name); keep it stable",
    )
    g = parser.add_argument_group("virtual Nodes")
    g.add_argument("--max-pods", type=int, default=110, help="Node capacity 'pods' (default 110)")
    g.add_argument("--max-modules", type=int, default=10, help=f"Node capacity '{keys.RESOURCE_MODULE}' per base (default 10)")
    g.add_argument("--env-taint", action="store_true", help=f"also taint Nodes {keys.TAINT_NODE_ENV}=<env>:NoExecute")
    g.add_argument("--heartbeat-interval", type=float, default=10.0, metavar="S", help="bases' heartbeat period (default 10)")
    g.add_argument("--missed-heartbeats", type=int, default=3, help="missed heartbeats before a Node goes NotReady (default 3)")
    g.add_argument(
        "--lease-duration", type=int, default=vnode.LEASE_DURATION_S, metavar="S",
        help="base Lease duration, renewed every quarter of it; with several replicas, a standby takes over "
        "a base this long after its holder stops (default 40; keep it under the controller-manager's "
        "--node-monitor-grace-period)",
    )
    g.add_argument("--gone-after", type=float, default=600.0, metavar="S", help="delete the Node of a base silent this long (default 600)")
    g = parser.add_argument_group("modules")
    g.add_argument("--resync-interval", type=float, default=30.0, metavar="S", help="queryAllBiz every base this often (default 30)")
    g.add_argument("--health-interval", type=float, default=30.0, metavar="S", help="ask every base for health this often (default 30)")
    g.add_argument("--install-timeout", type=float, default=120.0, metavar="S", help="an install unanswered this long is tried again, with back-off from 10 s to 5 min as kubelet restarts "
        "a container; the base's module list can settle it sooner (default 120)")
    g.add_argument(
        "--orphan-policy", choices=["report", "uninstall"], default="report",
        help="modules installed outside Kubernetes (no Pod asks for them, and this controller did not install "
        "them): report them (Event, metric, log), or also uninstall them. Modules this controller installed for a "
        "Pod that is gone are always uninstalled",
    )
    parser.add_argument("--workers", type=int, default=16, help="concurrent Pod and Node syncs (default 16)")
    parser.add_argument(
        "--kube-qps", type=float, default=200.0,
        help="API request rate limit, burst twice that (default 200/s). Lease renewals alone take bases/10 per "
        "second (every base's Lease every 10 s), and each module install two Events and a status write: with "
        "more than ~500 bases raise it, or status writes wait in this limiter behind renewals",
    )
    parser.add_argument("--http-host", default="0.0.0.0", help="address for /healthz /readyz /metrics")
    parser.add_argument("--http-port", type=int, default=8081, help="port for /healthz /readyz /metrics (0: off)")
    runtime.add_logging_arguments(parser)


def options_from_args(args: argparse.Namespace) -> ProviderOptions:
    identity = args.identity or os.environ.get("POD_NAME") or socket.gethostname()
    return ProviderOptions(
        env=args.env,
        identity=identity,
        node=NodeOptions(env=args.env, max_pods=args.max_pods, max_modules=args.max_modules, env_taint=args.env_taint,
                         lease_duration_s=args.lease_duration),
        lease_renew_interval=args.lease_duration / 4,
        heartbeat_interval=args.heartbeat_interval,
        missed_heartbeats=args.missed_heartbeats,
        gone_after=args.gone_after,
        resync_interval=args.resync_interval,
        health_interval=args.health_interval,
        install_timeout=args.install_timeout,
        orphan_policy=args.orphan_policy,
        workers=args.workers,
    )


def run(args: argparse.Namespace) -> int:
    runtime.setup_logging(args.log_level, args.log_format)
    try:
        broker = broker_from_args(args)
    except (ValueError, OSError) as exc:
        log.error("%s", exc)
        return 2
    if args.lease_duration < 4:
        log.error("--lease-duration %s: at least 4 seconds (the Lease is renewed every quarter of it)", args.lease_duration)
        return 2
    opts = options_from_args(args)

    async def main(stop: asyncio.Event) -> int:
        try:
            kube = KubeClient.from_kubeconfig(args.kubeconfig, args.context, qps=args.kube_qps, burst=int(args.kube_qps * 2))
        except KubeConfigError as exc:
            log.error("%s", exc)
            return 2
        provider = Provider(kube, broker, opts)
        runner = None
        if args.http_port:
            app = web.Application()
            add_health_routes(app, ready=provider.ready, problems=provider.problems)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, args.http_host, args.http_port).start()
        starting = asyncio.ensure_future(provider.start())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()
            await stopping
        else:
            starting.cancel()
        await provider.stop()
        if runner:
            await runner.cleanup()
        await kube.close()
        return 0

    profile_to = os.environ.get("KOUPLELESS_PROFILE")
    if not profile_to:
        return runtime.run_until_stopped(main)
    # For bench/: the event loop thread's Python time, written as pstats when the process stops.
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        return runtime.run_until_stopped(main)
    finally:
        profiler.disable()
        profiler.dump_stats(profile_to)
        log.info("profile written to %s", profile_to)
