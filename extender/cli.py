"""`module-controller extender`: serve /filter, /prioritize and /bind until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import socket
import ssl

from extender.app import DEFAULT_MAX_BODY, Settings
from extender.policy import STRATEGIES
from extender.server import ExtenderServer
from koupleless import keys, runtime
from koupleless.http import ReloadingTLS
from koupleless.kube import KubeConfig, KubeConfigError, load_config
from koupleless.kube.leaderelection import LeaderElectionConfig

log = logging.getLogger("extender")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all)")
    parser.add_argument("--port", type=int, default=8888, help="port (0: pick a free one; default 8888)")
    parser.add_argument("--tls-cert-file", help="serve HTTPS with this certificate (PEM); reloaded on change")
    parser.add_argument("--tls-private-key-file", help="its private key (PEM)")
    parser.add_argument(
        "--kubeconfig",
        help="watch Nodes and module Pods and bind Pods through this API server (needed for "
        "nodeCacheCapable: true and bindVerb). Default: $KUBECONFIG, the in-cluster service account, "
        "~/.kube/config; with none of them, only full-Node requests (nodeCacheCapable: false) are served",
    )
    parser.add_argument("--context", help="kubeconfig context (default: its current-context)")
    parser.add_argument(
        "--no-kube", action="store_true",
        help="do not talk to the API server at all: full-Node mode, module counts from the Node annotation",
    )
    parser.add_argument(
        "--strategy", choices=STRATEGIES, default="spread",
        help="which fitting bases the filter passes: spread = fewest modules, then most free memory; binpack = "
        "the opposite; all of equal ones (default spread)",
    )
    parser.add_argument(
        "--burst-wait", type=float, default=1.0,
        help="seconds a filter may wait for the binding of a module Pod still in flight before counting "
        "a base's modules: at a replica that does not lead (the leader counts each Pod on the base it passes "
        "at once). Default 1.0; keep well under the scheduler's httpTimeout",
    )
    parser.add_argument(
        "--max-body-bytes", type=int, default=DEFAULT_MAX_BODY,
        help="largest request accepted (full-Node requests carry every Node; default %(default)s)",
    )
    election = parser.add_argument_group(
        "leader election", "for several replicas: one leads and labels its own Pod ($POD_NAMESPACE/$POD_NAME) "
        f"{keys.LABEL_EXTENDER_ROLE}={keys.EXTENDER_ROLE_LEADER}, which the Service selects, so kube-scheduler "
        "reaches the leader only; the others keep their caches warm and take over when its Lease expires. "
        "Every replica reports /readyz 200 once its cache is synced")
    election.add_argument("--leader-elect", action="store_true",
                          help="campaign for the Lease --leader-elect-namespace/--leader-elect-name (needs a kubeconfig)")
    election.add_argument("--leader-elect-namespace", default=None,
                          help="namespace of the Lease (default $POD_NAMESPACE, else module-controller)")
    election.add_argument("--leader-elect-name", default="module-controller-extender", help="name of the Lease")
    election.add_argument("--leader-elect-identity", default=None,
                          help="this replica's name in the Lease (default $POD_NAME or the host name, plus a random suffix)")
    election.add_argument("--leader-lease-duration", type=float, default=15.0,
                          help="seconds a standby waits after the Lease last changed before taking it (default 15)")
    election.add_argument("--leader-renew-deadline", type=float, default=10.0,
                          help="seconds the leader keeps trying to renew before it stops leading (default 10)")
    election.add_argument("--leader-retry-period", type=float, default=2.0,
                          help="seconds between tries to acquire or renew (default 2)")
    runtime.add_logging_arguments(parser)


def _election(args: argparse.Namespace) -> LeaderElectionConfig | None:
    if not args.leader_elect:
        return None
    # Unique per process: a restarted replica must not mistake its predecessor's Lease for its own.
    identity = args.leader_elect_identity or (
        f"{os.environ.get(keys.ENV_POD_NAME) or socket.gethostname()}_{secrets.token_hex(4)}")
    return LeaderElectionConfig(
        namespace=args.leader_elect_namespace or os.environ.get(keys.ENV_POD_NAMESPACE) or "module-controller",
        name=args.leader_elect_name,
        identity=identity,
        lease_duration=args.leader_lease_duration,
        renew_deadline=args.leader_renew_deadline,
        retry_period=args.leader_retry_period,
    )


def _leader_pod(election: LeaderElectionConfig | None) -> tuple[str, str] | None:
    """The Pod to label while leading: $POD_NAMESPACE (else the Lease's namespace) / $POD_NAME."""
    if election is None:
        return None
    name = os.environ.get(keys.ENV_POD_NAME)
    if not name:
        log.warning("--leader-elect without $%s: the leader's Pod is not labelled %s=%s, so a Service selecting "
                    "that label has no endpoints (set %s from the downward API, fieldPath metadata.name)",
                    keys.ENV_POD_NAME, keys.LABEL_EXTENDER_ROLE, keys.EXTENDER_ROLE_LEADER, keys.ENV_POD_NAME)
        return None
    return os.environ.get(keys.ENV_POD_NAMESPACE) or election.namespace, name


def _kube_config(args: argparse.Namespace) -> tuple[KubeConfig | None, str | None]:
    """(config, error). Without an explicit choice, a missing kubeconfig just means full-Node mode."""
    if args.no_kube:
        return None, None
    explicit = bool(args.kubeconfig or os.environ.get(keys.ENV_KUBECONFIG) or args.context)
    try:
        return load_config(args.kubeconfig, args.context), None
    except KubeConfigError as exc:
        if explicit:
            return None, str(exc)
        log.warning("%s; serving full-Node requests only (nodeCacheCapable: false, no bindVerb)", exc)
        return None, None


def run(args: argparse.Namespace) -> int:
    runtime.setup_logging(args.log_level, args.log_format)
    if bool(args.tls_cert_file) != bool(args.tls_private_key_file):
        log.error("give both --tls-cert-file and --tls-private-key-file, or neither (plain HTTP)")
        return 2
    tls: ReloadingTLS | None = None
    if args.tls_cert_file:
        try:
            tls = ReloadingTLS(args.tls_cert_file, args.tls_private_key_file)
        except (OSError, ssl.SSLError) as exc:
            log.error("cannot load the serving certificate %s / key %s: %s — write them with "
                      "`module-controller certs`", args.tls_cert_file, args.tls_private_key_file, exc)
            return 1
    kube, error = _kube_config(args)
    if error:
        log.error("%s", error)
        return 2
    election = _election(args)
    if election is not None:
        if kube is None:
            log.error("--leader-elect needs the API server: give --kubeconfig (or run in a cluster), "
                      "or drop --leader-elect")
            return 2
        problems = election.problems()
        if problems:
            log.error("%s", "; ".join(problems))
            return 2
    settings = Settings(strategy=args.strategy, burst_wait=args.burst_wait)

    async def main(stop: asyncio.Event) -> int:
        server = ExtenderServer(kube, host=args.host, port=args.port,
                                ssl_context=tls.context if tls else None, settings=settings,
                                max_body=args.max_body_bytes, election=election,
                                leader_pod=_leader_pod(election))
        try:
            await server.start(wait_synced=False)
        except OSError as exc:
            log.error("cannot listen on %s:%s: %s", args.host, args.port, exc)
            await server.stop()
            return 1
        if tls:
            tls.start()
        synced = asyncio.ensure_future(server.wait_synced())
        await stop.wait()
        synced.cancel()
        if tls:
            await tls.stop()
        await server.stop()
        return 0

    return runtime.run_until_stopped(main)
