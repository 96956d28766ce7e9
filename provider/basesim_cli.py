"""`module-controller base-sim`: simulated bases for development, tests and benchmarks."""

from __future__ import annotations

import argparse
import asyncio
import logging

from aiohttp import web

from koupleless import keys, runtime
from koupleless.http import add_health_routes
from provider import basesim_dialects, basesim_logins
from provider.basesim import BaseSimulator, default_id_prefix, sim_base_ids
from provider.basesim_http import HttpBaseSimulator
from provider.tunnel import add_broker_arguments, broker_from_args

log = logging.getLogger(__name__)

EPILOG = """\
Habits of real arklet bases (each one a flag, on by default where arklet has it):
  --version-from-jar          install under the version in the jar's name (<artifact>-<version>-ark-biz.jar)
                              when it differs from bizVersion; the reply echoes the requested bizName/bizVersion,
                              response.data.bizInfos[0] and later simpleBiz show the installed version
  --late-health-metrics       the first health answer after each (re)start has no jvm and cpu
  --no-goodbye                a stopping base (SIGTERM, /shutdown) sends nothing; --goodbye sends one
                              DEACTIVATED heartbeat first
  always: queryBaseline then the first heartbeat on every (re)start; an installBiz of a name:version
  that is ACTIVATED is answered at once (before --install-delay) with FAILED "REPEAT_BIZ: ..."; a
  base/baseline command is batch-installed and answered on base/batchInstallBizResponse.

Runtime versions (--dialect):
  current   runtime >= 1.4: all of the above.
  1.3.0     runtime 1.3.0-1.3.1 / 2.1.5-2.1.6: heartbeat {masterBizInfo: {name, version}, networkInfo:
            {localIP, localHostName}, state: "ACTIVATED"} every 120 s (default) under a random UUID base ID,
            new on every restart; no queryBaseline, base/baseline ignored; queryAllBiz answered on base/biz
            {code, message, data: [ArkBizInfo]}; a successful install or uninstall answered only by an
            unsolicited base/biz full list, a failure by bizOperation {command, response} without bizName
            and bizVersion.
  1.3.2     runtime 1.3.2 / 2.1.7: the 1.3.0 heartbeat shape and UUID base IDs, but base/simpleBiz, 10 s
            heartbeats and bizOperation replies with bizName and bizVersion.

Inspecting and steering the bases (--status-port, HTTP on 127.0.0.1):
  GET  /bases                 JSON {"connected": bool, "bases": {baseID: {baseID, name, version, clusterName,
                              ip, alive, lifecycle (running|killed|stopped), installs (installs performed:
                              a module became ACTIVATED), install_commands (installBiz received), repeats
                              (REPEAT_BIZ answers), uninstalls (uninstallBiz received), baselines (baseline
                              commands answered), modules: [{name, version, url, state, message}]}}}
  POST /bases/<id>/kill       the base's JVM dies: no heartbeat, no answers, no goodbye
  POST /bases/<id>/shutdown   the base stops cleanly: silence like kill (with --goodbye: one DEACTIVATED
                              heartbeat first), lifecycle "stopped"
  POST /bases/<id>/restart    a fresh JVM with the same identity (1.3.x dialects: a new UUID; each entry's
                              "slot", <id-prefix><n>, stays): no modules, health metrics late again;
                              announces with queryBaseline (current dialect), then a heartbeat
  POST /bases/<id>/replay     republish the base's last bizOperation byte for byte (a duplicated or
                              replayed reply); 409 if it has sent none
Each action answers with the base's entry from /bases.
Base IDs are <id-prefix><n>, n = 0..count-1 (default prefix <name>-<version with dots as dashes>-); with
--dialect 1.3.0 or 1.3.2 they are random UUIDs and <id-prefix><n> is only the base's slot.

--tunnel http: the bases speak arklet's HTTP tunnel instead of MQTT (no broker): each serves arklet's
HTTP API on 127.0.0.1 at a port of its own (/bases shows it as "port", with "tunnel": "http") and POSTs
its heartbeat to <--http-heartbeat-endpoint>/heartbeat; replay answers 409 (replies are synchronous).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    add_broker_arguments(parser)
    for action in parser._actions:
        if action.dest == "mqtt_broker":
            action.required = False  # not for --tunnel http; run() asks for it with --tunnel mqtt
    parser.add_argument("--tunnel", choices=["mqtt", "http"], default="mqtt",
                        help="how the bases reach the controller: MQTT (default) or arklet's HTTP tunnel")
    parser.add_argument(
        "--http-heartbeat-endpoint", metavar="URL",
        help="with --tunnel http: the provider's HTTP tunnel, as koupleless.arklet.http.heartbeat.endpoint on a "
        "real base (e.g. http://127.0.0.1:7777, or .../t/<token> with --http-tunnel-token-file)",
    )
    parser.add_argument("--http-first-port", type=int, default=0, metavar="PORT",
                        help="with --tunnel http: base n serves arklet's HTTP API on PORT+n (default: free ports)")
    basesim_logins.add_arguments(parser)
    parser.add_argument("--env", default=keys.DEFAULT_ENV, help="topic env: koupleless_<env>/... (default dev)")
    parser.add_argument("--count", type=int, default=1, help="number of bases (default 1)")
    parser.add_argument("--name", default="base", help="base name label (default base)")
    parser.add_argument("--version", dest="base_version", default="1.1.1", help="base version (default 1.1.1)")
    parser.add_argument("--cluster-name", default="", help="base cluster name (default: the base name)")
    parser.add_argument("--id-prefix", default=None, help="base ID prefix (default <name>-<version>-)")
    parser.add_argument("--install-delay", type=float, default=0.0, metavar="S", help="seconds an install takes")
    parser.add_argument("--fail-rate", type=float, default=0.0, metavar="P", help="probability an install fails")
    parser.add_argument(
        "--fail-biz", action="append", default=[], metavar="NAME", help="always fail installs of this bizName"
    )
    parser.add_argument(
        "--dialect", choices=sorted(basesim_dialects.DIALECTS), default=basesim_dialects.CURRENT.name,
        help="the Koupleless runtime version whose MQTT messages the bases send (default current, >= 1.4)",
    )
    parser.add_argument(
        "--heartbeat-interval", type=float, default=None, metavar="S",
        help="seconds between heartbeats (default as the dialect's arklet: 10, 120 for 1.3.0)",
    )
    parser.add_argument(
        "--heartbeat-jitter", type=float, default=0.0, metavar="S",
        help="move each heartbeat off its fixed-rate slot by a random amount of up to S seconds either way, as "
        "network or GC delay would (under half the interval; default 0: arklet's exact timer)",
    )
    parser.add_argument("--memory-mb", type=int, default=4096, help="JVM max memory each base reports")
    parser.add_argument("--cpus", type=int, default=4, help="CPU count each base reports")
    parser.add_argument("--status-port", type=int, default=0, help="HTTP port on 127.0.0.1 for /bases (0: off)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for --fail-rate")
    parser.add_argument(
        "--version-from-jar", action=argparse.BooleanOptionalAction, default=True,
        help="install under the version in the jar's name when it differs from bizVersion, as arklet (default on)",
    )
    parser.add_argument(
        "--goodbye", action=argparse.BooleanOptionalAction, default=False,
        help="send one DEACTIVATED heartbeat when a base stops or shuts down; arklet sends none (default off)",
    )
    parser.add_argument(
        "--late-health-metrics", action=argparse.BooleanOptionalAction, default=True,
        help="leave jvm and cpu out of the first health answer after each start, as arklet (default on)",
    )
    runtime.add_logging_arguments(parser)


def make_app(sim: BaseSimulator) -> web.Application:
    app = web.Application()
    add_health_routes(app, ready=sim.connected)

    async def bases(_: web.Request) -> web.Response:
        return web.json_response(sim.snapshot())

    async def act(request: web.Request) -> web.Response:
        base_id, action = request.match_info["id"], request.match_info["action"]
        if base_id not in sim.bases:
            return web.json_response({"error": f"no base {base_id!r}; GET /bases lists them"}, status=404)
        handlers = {"kill": sim.kill, "shutdown": sim.shutdown}
        if action == "restart":
            base_id = sim.restart(base_id)  # a new ID in the 1.3.x dialects
        elif action == "replay":
            if not sim.replay(base_id):
                return web.json_response(
                    {"error": f"base {base_id!r} has sent no bizOperation yet; install or uninstall something first"},
                    status=409,
                )
        elif action in handlers:
            handlers[action](base_id)
        else:
            return web.json_response(
                {"error": f"unknown action {action!r}; use kill, shutdown, restart or replay"}, status=404
            )
        return web.json_response(sim.bases[base_id].snapshot())

    app.router.add_get("/bases", bases)
    app.router.add_post("/bases/{id}/{action}", act)
    return app


def run(args: argparse.Namespace) -> int:
    runtime.setup_logging(args.log_level, args.log_format)
    if args.count < 1:
        print("base-sim: --count must be at least 1", flush=True)
        return 2
    if not 0.0 <= args.fail_rate <= 1.0:
        print("base-sim: --fail-rate is a probability between 0 and 1", flush=True)
        return 2

    interval = args.heartbeat_interval or basesim_dialects.DIALECTS[args.dialect].heartbeat_s
    if not 0.0 <= args.heartbeat_jitter < interval / 2:
        print(f"base-sim: --heartbeat-jitter {args.heartbeat_jitter:g}: give 0 or more, under half the heartbeat "
              f"interval ({interval / 2:g} s), so each base's beats stay in order", flush=True)
        return 2

    if args.tunnel == "http" and not args.http_heartbeat_endpoint:
        print("base-sim: --tunnel http needs --http-heartbeat-endpoint URL (the provider's --http-tunnel-port)",
              flush=True)
        return 2
    if args.tunnel == "mqtt" and not args.mqtt_broker:
        print("base-sim: --mqtt-broker HOST:PORT is required (or --tunnel http)", flush=True)
        return 2
    try:
        broker = broker_from_args(args) if args.tunnel == "mqtt" else None
        prefix = args.id_prefix if args.id_prefix is not None else default_id_prefix(args.name, args.base_version)
        logins = basesim_logins.logins_from_args(args, broker, sim_base_ids(prefix, args.count)) if broker else None
        if logins is not None and basesim_dialects.DIALECTS[args.dialect].uuid_ids:
            raise ValueError(f"--dialect {args.dialect} names each base by a random UUID per JVM start, so no per-base "
                             "login can be issued ahead: drop --base-password-file/--base-cert-dir and use one login")
    except ValueError as exc:
        print(f"base-sim: {exc}", flush=True)
        return 2

    async def main(stop: asyncio.Event) -> int:
        sim_kwargs = dict(
            env=args.env,
            count=args.count,
            name=args.name,
            version=args.base_version,
            cluster_name=args.cluster_name,
            id_prefix=args.id_prefix,
            install_delay=args.install_delay,
            fail_rate=args.fail_rate,
            fail_biz=frozenset(args.fail_biz),
            heartbeat_interval=args.heartbeat_interval,
            heartbeat_jitter=args.heartbeat_jitter,
            memory_mb=args.memory_mb,
            cpus=args.cpus,
            seed=args.seed,
            version_from_jar=args.version_from_jar,
            goodbye=args.goodbye,
            late_health_metrics=args.late_health_metrics,
            dialect=args.dialect,
            logins=logins,
            client_prefix=args.client_id_prefix,
        )
        sim = BaseSimulator(broker, **sim_kwargs) if broker is not None else HttpBaseSimulator(
            args.http_heartbeat_endpoint, first_port=args.http_first_port, **sim_kwargs)
        runner = None
        if args.status_port:
            runner = web.AppRunner(make_app(sim), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", args.status_port).start()
        starting = asyncio.ensure_future(sim.start())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()
            log.info("base-sim: %d bases up (%s...)", len(sim.bases), next(iter(sim.bases)))
            await stopping
        else:
            starting.cancel()
        await sim.stop(graceful=True)
        if runner:
            await runner.cleanup()
        return 0

    return runtime.run_until_stopped(main)
