"""`module-controller provider`: bases become virtual Nodes, module Pods become installs over MQTT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import socket

from aiohttp import web

from koupleless import keys, runtime
from koupleless.http import add_health_routes
from koupleless.kube.client import KubeClient
from koupleless.kube.config import KubeConfigError
from provider import admission, http_tunnel, kubelet_api, vnode
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
    g.add_argument("--missed-heartbeats", type=int, default=ProviderOptions().missed_heartbeats,
                   help="missed heartbeats before a Node goes NotReady: NotReady after this many heartbeat intervals of "
                   f"silence (default {ProviderOptions().missed_heartbeats})")
    g.add_argument(
        "--lease-duration", type=int, default=vnode.LEASE_DURATION_S, metavar="S",
        help="base Lease duration, renewed every quarter of it; with several replicas, a standby takes over "
        "a base this long after its holder stops (default 40; keep it under the controller-manager's "
        "--node-monitor-grace-period)",
    )
    g.add_argument("--gone-after", type=float, default=600.0, metavar="S", help="delete the Node of a base silent this long (default 600)")
    g = parser.add_argument_group("base admission (which bases may become Nodes; README: Security)")
    g.add_argument(
        "--base-id-pattern", metavar="REGEX",
        help="only bases whose ID fully matches this become Nodes; always also a lower-case DNS name of at most "
        f"{admission.MAX_BASE_ID_LENGTH} characters (default: a DNS label without dots, or an IPv4 address)",
    )
    g.add_argument("--allowed-base-names", metavar="NAME,...", default="",
                   help="only bases whose baseMetadata.name is one of these become Nodes (default: any)")
    g.add_argument("--allowed-cluster-names", metavar="NAME,...", default="",
                   help="only bases whose baseMetadata.clusterName is one of these become Nodes (default: any)")
    g.add_argument(
        "--new-bases-per-minute", type=int, default=admission.DEFAULT_NEW_BASES_PER_MINUTE, metavar="N",
        help="admit at most N bases new to this provider in any minute; the others try again on their next "
        "heartbeat. Bases whose Node exists already are not counted (0: no limit; default "
        f"{admission.DEFAULT_NEW_BASES_PER_MINUTE})",
    )
    g.add_argument(
        "--approve-new-bases", action="store_true",
        help=f"a new base's Node starts tainted {keys.TAINT_UNAPPROVED}=true:NoSchedule; removing the taint "
        "approves it (the provider never puts it back)",
    )
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
    parser.add_argument("--workers", type=int, default=16, help="concurrent Pod syncs (default 16)")
    parser.add_argument(
        "--node-workers", type=int, default=128,
        help="concurrent Node syncs (default 128). Each base's Lease renewal is one, every 10 s, so this must "
        "exceed bases / 10 x the API server's write latency in seconds (128: 5,000 bases at 250 ms), or "
        "renewals fall behind and healthy bases go NotReady",
    )
    parser.add_argument(
        "--kube-qps", type=float, default=200.0,
        help="API request rate limit, burst twice that (default 200/s), for everything but Lease renewals "
        "(one per base every 10 s, as each kubelet renews its own, never kept waiting by this limit). Each "
        "module install costs about two Events and a status write. The requests it paces share a pool of "
        "qps/8 connections to the API server (25 at the default); watches and renewals have their own",
    )
    g = parser.add_argument_group("kubelet API (kubectl logs / exec on module Pods)")
    g.add_argument(
        "--kubelet-port", type=int, default=kubelet_api.DEFAULT_PORT,
        help="serve the kubelet API of every virtual Node on this port over TLS: kube-apiserver calls it for "
        "kubectl logs, exec, attach and port-forward (the Nodes' daemonEndpoints port; 0: off, the Nodes name "
        "the bases' own hosts; default 10250)",
    )
    g.add_argument(
        "--kubelet-address", metavar="HOST",
        help="the address kube-apiserver dials for every virtual Node (their Hostname address): in a cluster "
        "the provider Service's DNS name, or its ClusterIP where kube-apiserver does not use cluster DNS; "
        "locally 127.0.0.1 (default: this host's name)",
    )
    g.add_argument("--kubelet-bind-address", default="0.0.0.0", metavar="ADDRESS",
                   help="address the kubelet API listens on (default 0.0.0.0)")
    g.add_argument("--kubelet-tls-cert", metavar="FILE",
                   help="its serving certificate (PEM), reloaded on change; names --kubelet-address when "
                   "kube-apiserver verifies kubelets (--kubelet-certificate-authority). Default: a self-signed "
                   "one made at start")
    g.add_argument("--kubelet-tls-key", metavar="FILE", help="the serving certificate's private key (PEM)")
    g.add_argument(
        "--kubelet-client-ca", metavar="FILE",
        help="CA bundle that signed kube-apiserver's --kubelet-client-certificate: only clients with a "
        f"certificate from it are served. Default: {kubelet_api.IN_CLUSTER_CA} when present (the cluster "
        "CA, which signs it on kubeadm clusters); with none, the kubelet API is off",
    )
    g.add_argument(
        "--kubelet-authorization", choices=["webhook", "alwaysallow"], default="webhook",
        help="webhook: ask the API server with a SubjectAccessReview whether the client may <verb> nodes/proxy "
        "of the Pod's Node, as kubelet's --authorization-mode=Webhook (needs create on "
        "subjectaccessreviews); alwaysallow: every client the CA vouches for (default webhook)",
    )
    g = parser.add_argument_group("HTTP tunnel (bases on arklet's HTTP tunnel, beside MQTT)")
    g.add_argument(
        "--http-tunnel-port", type=int, default=0, metavar="PORT",
        help="serve arklet's HTTP tunnel here: bases with koupleless.arklet.http.heartbeat.endpoint=<URL of this "
        f"port> POST /heartbeat to it, and get their commands at their own IP and arklet port (0: off; "
        f"arklet's and the manifest's port: {http_tunnel.DEFAULT_PORT})",
    )
    g.add_argument("--http-tunnel-bind-address", default="127.0.0.1", metavar="ADDRESS",
                   help="address the HTTP tunnel listens on (default 127.0.0.1; 0.0.0.0 in a cluster)")
    g.add_argument(
        "--http-tunnel-advertise-address", metavar="HOST:PORT",
        help="where the other provider replicas reach this one's HTTP tunnel, written on the Leases it holds: "
        "a heartbeat that reaches a replica not holding the base's Lease is forwarded there "
        "(default $POD_IP:<port>, else the bind address or this host's name)",
    )
    g.add_argument("--http-tunnel-tls-cert", metavar="FILE",
                   help="serve HTTPS with this certificate (PEM), reloaded on change; every replica mounts the same "
                   "one (a replica forwarding a heartbeat accepts exactly this certificate from the holder)")
    g.add_argument("--http-tunnel-tls-key", metavar="FILE", help="the certificate's private key (PEM)")
    g.add_argument("--http-tunnel-client-ca", metavar="FILE",
                   help="accept bases presenting a client certificate signed by this CA bundle (needs TLS)")
    g.add_argument(
        "--http-tunnel-token-file", metavar="FILE",
        help="accept bases sending one of these bearer tokens (one a line; reread on change): header "
        "'Authorization: Bearer <token>', or, as arklet's heartbeat sends no headers, an endpoint ending in "
        "/t/<token>. Replicas forward heartbeats with the first one. With neither this nor a client CA, anyone "
        "reaching the port can register a base",
    )
    g.add_argument("--http-heartbeat-interval", type=float, default=12.0, metavar="S",
                   help="heartbeat period of HTTP-tunnel bases, judged with --missed-heartbeats (default 12, arklet's)")
    parser.add_argument("--http-host", default="0.0.0.0", help="address for /healthz /readyz /metrics")
    parser.add_argument("--http-port", type=int, default=8081, help="port for /healthz /readyz /metrics (0: off)")
    runtime.add_logging_arguments(parser)


def kubelet_settings(args: argparse.Namespace) -> kubelet_api.KubeletSettings | None:
    """The kubelet API to serve, or None: --kubelet-port 0, or no CA to authenticate kube-apiserver
    with (serving it to anyone would hand out every module's history, so it stays off)."""
    if not getattr(args, "kubelet_port", 0):
        return None
    client_ca = args.kubelet_client_ca
    if client_ca is None and os.path.exists(kubelet_api.IN_CLUSTER_CA):
        client_ca = kubelet_api.IN_CLUSTER_CA
    if client_ca is None:
        return None
    return kubelet_api.KubeletSettings(
        port=args.kubelet_port, address=args.kubelet_address or socket.gethostname(), client_ca=client_ca,
        bind=args.kubelet_bind_address, cert_file=args.kubelet_tls_cert, key_file=args.kubelet_tls_key,
        authorization=args.kubelet_authorization,
    )


def http_tunnel_settings(args: argparse.Namespace) -> http_tunnel.HttpTunnelSettings | None:
    """The HTTP tunnel to serve, or None (--http-tunnel-port 0). Raises ValueError naming a bad flag."""
    port = getattr(args, "http_tunnel_port", 0)
    if not port:
        return None
    if not 0 < port < 65536:
        raise ValueError(f"--http-tunnel-port {port}: a TCP port, 1-65535 (0: off)")
    if bool(args.http_tunnel_tls_cert) != bool(args.http_tunnel_tls_key):
        raise ValueError("--http-tunnel-tls-cert and --http-tunnel-tls-key go together")
    if args.http_tunnel_client_ca and not args.http_tunnel_tls_cert:
        raise ValueError("--http-tunnel-client-ca needs TLS: add --http-tunnel-tls-cert and --http-tunnel-tls-key")
    for flag, path in (("--http-tunnel-tls-cert", args.http_tunnel_tls_cert), ("--http-tunnel-tls-key", args.http_tunnel_tls_key),
                       ("--http-tunnel-client-ca", args.http_tunnel_client_ca),
                       ("--http-tunnel-token-file", args.http_tunnel_token_file)):
        if path and not os.access(path, os.R_OK):
            raise ValueError(f"{flag} {path}: no such file, or not readable")
    if args.http_tunnel_token_file:
        http_tunnel.Tokens(args.http_tunnel_token_file)  # at least one token in it
    if args.http_heartbeat_interval <= 0:
        raise ValueError(f"--http-heartbeat-interval {args.http_heartbeat_interval}: a period in seconds, over 0")
    return http_tunnel.HttpTunnelSettings(
        port=port, bind=args.http_tunnel_bind_address,
        advertise=args.http_tunnel_advertise_address or http_tunnel.default_advertise(args.http_tunnel_bind_address, port),
        cert_file=args.http_tunnel_tls_cert, key_file=args.http_tunnel_tls_key, client_ca=args.http_tunnel_client_ca,
        token_file=args.http_tunnel_token_file,
    )


def options_from_args(args: argparse.Namespace) -> ProviderOptions:
    identity = args.identity or os.environ.get("POD_NAME") or socket.gethostname()
    for flag, n in (("--workers", args.workers), ("--node-workers", args.node_workers)):
        if n < 1:
            raise ValueError(f"{flag} {n}: at least 1 (syncs run at once)")
    kubelet = kubelet_settings(args)
    tunnel = http_tunnel_settings(args)
    return ProviderOptions(
        env=args.env,
        identity=identity,
        node=NodeOptions(env=args.env, max_pods=args.max_pods, max_modules=args.max_modules, env_taint=args.env_taint,
                         lease_duration_s=args.lease_duration, approve_new_bases=args.approve_new_bases,
                         kubelet_address=kubelet.address if kubelet else "", kubelet_port=kubelet.port if kubelet else 0,
                         http_tunnel_address=tunnel.advertise if tunnel else ""),
        lease_renew_interval=args.lease_duration / 4,
        heartbeat_interval=args.heartbeat_interval,
        missed_heartbeats=args.missed_heartbeats,
        gone_after=args.gone_after,
        resync_interval=args.resync_interval,
        health_interval=args.health_interval,
        install_timeout=args.install_timeout,
        orphan_policy=args.orphan_policy,
        workers=args.workers,
        node_workers=args.node_workers,
        admission=admission.AdmissionOptions(
            base_id_pattern=args.base_id_pattern or None,
            allowed_base_names=admission.parse_name_list(args.allowed_base_names),
            allowed_cluster_names=admission.parse_name_list(args.allowed_cluster_names),
            new_bases_per_minute=args.new_bases_per_minute,
        ),
        http_tunnel=tunnel,
        http_heartbeat_interval=getattr(args, "http_heartbeat_interval", 12.0),
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
    if bool(args.kubelet_tls_cert) != bool(args.kubelet_tls_key):
        log.error("--kubelet-tls-cert and --kubelet-tls-key go together: give both, or neither for a self-signed one")
        return 2
    if args.base_id_pattern:
        try:
            re.compile(args.base_id_pattern)
        except re.error as exc:
            log.error("--base-id-pattern %r is not a regular expression: %s", args.base_id_pattern, exc)
            return 2
    if args.missed_heartbeats < 1 or args.heartbeat_interval <= 0:
        log.error("--missed-heartbeats %d --heartbeat-interval %g: give 1 or more heartbeats and a period over 0 s "
                  "(a Node goes NotReady after their product in seconds of silence)",
                  args.missed_heartbeats, args.heartbeat_interval)
        return 2
    if args.new_bases_per_minute < 0:
        log.error("--new-bases-per-minute %d: give 0 (no limit) or more", args.new_bases_per_minute)
        return 2
    try:
        opts = options_from_args(args)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    kubelet = kubelet_settings(args)
    if kubelet is not None:
        for flag, path in (("--kubelet-client-ca", kubelet.client_ca), ("--kubelet-tls-cert", kubelet.cert_file),
                           ("--kubelet-tls-key", kubelet.key_file)):
            if path and not os.access(path, os.R_OK):
                log.error("%s %s: no such file, or not readable", flag, path)
                return 2
    if args.kubelet_port and kubelet is None:
        log.warning("kubelet API off: no --kubelet-client-ca (and no %s) to authenticate kube-apiserver with; "
                    "kubectl logs / exec on module Pods will not reach this provider", kubelet_api.IN_CLUSTER_CA)

    async def main(stop: asyncio.Event) -> int:
        try:
            kube = KubeClient.from_kubeconfig(args.kubeconfig, args.context, qps=args.kube_qps, burst=int(args.kube_qps * 2))
        except KubeConfigError as exc:
            log.error("%s", exc)
            return 2
        provider = Provider(kube, broker, opts)
        kubelet_server = None
        if kubelet is not None:
            kubelet_server = kubelet_api.KubeletServer(kubelet, kubelet_api.Sources(
                kube, cached_pod=provider.pods.get, base_for_node=provider.registry.for_node))
            try:
                await kubelet_server.start()
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                log.error("kubelet API on %s:%d: %s", kubelet.bind, kubelet.port, exc)
                await kube.close()
                return 2
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
        rc = 0
        if starting.done():
            try:
                starting.result()
                await stopping
            except OSError as exc:  # ssl.SSLError is one: a port taken, certificate files that do not load
                log.error("provider cannot start: %s", exc)
                stopping.cancel()
                rc = 2
        else:
            starting.cancel()
        await provider.stop()
        if kubelet_server:
            await kubelet_server.stop()
        if runner:
            await runner.cleanup()
        await kube.close()
        return rc

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
