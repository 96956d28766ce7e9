"""`module-controller webhook`: serve /mutate over HTTPS until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import ssl

from aiohttp import web

from koupleless import keys, runtime
from koupleless.http import ReloadingTLS
from webhook.defaults import Defaults
from webhook.server import MUTATE_PATH, create_app

log = logging.getLogger("webhook")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: all)")
    parser.add_argument(
        "--port", type=int, default=9443, help="HTTPS port (0: pick a free one; default 9443)"
    )
    parser.add_argument(
        "--tls-cert-file", required=True, help="serving certificate (PEM); reloaded on change"
    )
    parser.add_argument(
        "--tls-private-key-file", required=True, help="its private key (PEM); reloaded on change"
    )
    parser.add_argument(
        "--tls-reload-interval",
        type=float,
        default=1.0,
        help="seconds between checks of the certificate files",
    )
    parser.add_argument("--env", default=keys.DEFAULT_ENV, help="the provider's env (default %(default)s)")
    parser.add_argument(
        "--env-taint",
        action="store_true",
        help=f"the provider taints vnodes with {keys.TAINT_NODE_ENV}=<env>: add its toleration to module Pods",
    )
    parser.add_argument(
        "--eviction-toleration-seconds",
        type=int,
        default=Defaults().eviction_toleration_seconds,
        help="how long a module stays on a base that stopped answering before it is evicted, counted from its Node's "
        f"not-ready taint (default {Defaults().eviction_toleration_seconds})",
    )
    parser.add_argument(
        "--apiserver-toleration-seconds",
        type=int,
        default=300,
        help="the apiserver's --default-not-ready-toleration-seconds; tolerations with this value are "
        "the apiserver's, and are shortened to --eviction-toleration-seconds (default 300)",
    )
    parser.add_argument(
        "--scheduler-name",
        default="",
        metavar="NAME",
        help="set spec.schedulerName of new module Pods that use the default scheduler to NAME: the "
        "scheduler profile registered with the extender (koupleless-module-scheduler in manifests/); "
        "default: leave it alone",
    )
    parser.add_argument(
        "--shutdown-delay",
        type=float,
        default=0.0,
        help="seconds to answer /readyz 503 before closing, so endpoints drain (in a cluster: 5)",
    )
    runtime.add_logging_arguments(parser)


def run(args: argparse.Namespace) -> int:
    runtime.setup_logging(args.log_level, args.log_format)
    defaults = Defaults(
        env=args.env,
        env_taint=args.env_taint,
        eviction_toleration_seconds=args.eviction_toleration_seconds,
        apiserver_toleration_seconds=args.apiserver_toleration_seconds,
        scheduler_name=args.scheduler_name,
    )
    try:
        tls = ReloadingTLS(args.tls_cert_file, args.tls_private_key_file, args.tls_reload_interval)
    except (OSError, ssl.SSLError) as exc:
        log.error(
            "cannot load the serving certificate %s / key %s: %s — write them with `module-controller certs`",
            args.tls_cert_file,
            args.tls_private_key_file,
            exc,
        )
        return 1

    async def main(stop: asyncio.Event) -> int:
        return await serve(defaults, tls, args.host, args.port, stop, shutdown_delay=args.shutdown_delay)

    return runtime.run_until_stopped(main)


async def serve(
    defaults: Defaults,
    tls: ReloadingTLS,
    host: str,
    port: int,
    stop: asyncio.Event,
    *,
    shutdown_delay: float = 0.0,
) -> int:
    ready = True
    app = create_app(defaults, ready=lambda: ready)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=10)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=tls.context, backlog=1024)
    try:
        await site.start()
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", host, port, exc)
        await runner.cleanup()
        return 1
    tls.start()
    # Everything alive now lives as long as the process: keep it out of the collector's scans, so
    # collections during admissions only walk the objects of the requests in flight.
    gc.collect()
    gc.freeze()
    for address in runner.addresses:
        log.info("serving https://%s:%s%s", address[0], address[1], MUTATE_PATH)
    await stop.wait()
    ready = False
    if shutdown_delay > 0:
        log.info("shutting down: /readyz answers 503 for %.1fs first", shutdown_delay)
        await asyncio.sleep(shutdown_delay)
    await tls.stop()
    await runner.cleanup()
    return 0
