"""Webhook throughput and latency, side by side with a bare aiohttp echo server, in one run.

Both servers run as their own processes on loopback TLS (ECDSA P-256) with keep-alive: the real
`module-controller webhook` answering /mutate, and an aiohttp handler that echoes the request body
on the same event loop (uvloop) and TLS setup. Both get the same 2.6 KB AdmissionReview of a
module Pod that the webhook patches, in two kinds of run: the same body every time (replicas of one
release, whose verdict the webhook keeps) and a new module version in every request (no verdict
reused). Prints admissions/s and p50/p99 for each, the webhook/echo ratio of each round (echo run
just before), and p99 at a fixed 500 requests/s (open loop: latency from the scheduled send time).

    python bench/webhook_throughput.py [--duration 3] [--rounds 5] [--connections 32] [--rate 500]

Load comes from `wrk` when it is installed (`apt-get install -y wrk`), else from an aiohttp client
in this process, which then shares the CPU with the servers and sends only the same-body run (the
generator used is printed): the distinct-bodies run and its target need wrk.
Everything binds 127.0.0.1, runs for a bounded time and stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from certs import pki  # noqa: E402

JAR = "https://repo.example.com/module-packages/stable/biz1-web-single-host-0.0.1-SNAPSHOT-ark-biz.jar"


def sample_review() -> dict[str, Any]:
    """What kube-apiserver sends for a ReplicaSet-created module Pod: generateName, the service
    account volume, the DefaultTolerationSeconds tolerations; no stack term and no BIZ_VERSION, so
    the webhook validates and patches."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "test-module-deployment-7c9f8d6b5-",
            "namespace": "default",
            "labels": {
                "module-controller.koupleless.io/component": "module",
                "app": "test-module-deployment-non-peer",
                "pod-template-hash": "7c9f8d6b5",
            },
            "ownerReferences": [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": "test-module-deployment-7c9f8d6b5",
                    "uid": "0b8e4a8e-3c55-4a6c-9d61-8f7f2a3c1d10",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {
            "volumes": [
                {
                    "name": "kube-api-access-x7k2p",
                    "projected": {
                        "sources": [
                            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                        ]
                    },
                }
            ],
            "containers": [
                {
                    "name": "biz1-web-single-host",
                    "image": JAR,
                    "resources": {},
                    "volumeMounts": [
                        {
                            "name": "kube-api-access-x7k2p",
                            "readOnly": True,
                            "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                        }
                    ],
                    "terminationMessagePath": "/dev/termination-log",
                    "terminationMessagePolicy": "File",
                    "imagePullPolicy": "IfNotPresent",
                }
            ],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "serviceAccountName": "default",
            "serviceAccount": "default",
            "securityContext": {},
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {
                                "matchExpressions": [
                                    {"key": "base.koupleless.io/version", "operator": "In", "values": ["1.1.1"]},
                                    {"key": "base.koupleless.io/name", "operator": "In", "values": ["base"]},
                                ]
                            }
                        ]
                    }
                }
            },
            "schedulerName": "default-scheduler",
            "tolerations": [
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
                {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
            ],
            "priority": 0,
            "enableServiceLinks": True,
            "preemptionPolicy": "PreemptLowerPriority",
        },
        "status": {},
    }
    gvk = {"group": "", "version": "v1", "kind": "Pod"}
    gvr = {"group": "", "version": "v1", "resource": "pods"}
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "9f2d6c1e-7b1a-4e0c-a3f5-1d2c3b4a5e6f",
            "kind": gvk,
            "resource": gvr,
            "requestKind": gvk,
            "requestResource": gvr,
            "namespace": "default",
            "operation": "CREATE",
            "userInfo": {
                "username": "system:serviceaccount:kube-system:replicaset-controller",
                "uid": "4c1f7a52-8d43-4bb1-9e0e-6f2a1b3c4d5e",
                "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system", "system:authenticated"],
            },
            "object": pod,
            "oldObject": None,
            "dryRun": False,
            "options": {"kind": "CreateOptions", "apiVersion": "meta.k8s.io/v1"},
        },
    }


# --- the echo server (run in its own process by this script) --------------------------------------


def serve_echo(port: int, cert: str, key: str) -> None:
    from aiohttp import web

    from koupleless.http import ReloadingTLS

    async def echo(request: web.Request) -> web.Response:
        return web.Response(body=await request.read(), content_type="application/json")

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def main(stop: asyncio.Event) -> None:
        app = web.Application(client_max_size=7 * 1024 * 1024)
        app.router.add_post("/mutate", echo)
        app.router.add_get("/healthz", healthz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ReloadingTLS(cert, key).context, backlog=1024).start()
        await stop.wait()
        await runner.cleanup()

    from koupleless.runtime import run_until_stopped

    async def runner_main(stop: asyncio.Event) -> int:
        await main(stop)
        return 0

    run_until_stopped(runner_main)


# --- load generation ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server {proc.args} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/healthz", context=ctx, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} not healthy after {timeout}s")


_WRK_LATENCY = re.compile(r"^\s*(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.M)
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc): per-request CPU cost does not depend on
    what else the machine is doing, unlike requests per second."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


#: wrk scripts. "same": every request carries the sample review, as every replica of one release
#: does in what the webhook reads. "distinct": each request a new module version in the jar name,
#: so no two Pods are alike and the webhook's kept verdicts never apply.
WRK_SCRIPTS = {
    "same": """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local f = io.open("{body}", "rb")
wrk.body = f:read("*a")
f:close()
""",
    "distinct": """
local f = io.open("{body}", "rb")
local template = f:read("*a")
f:close()
local counter = 0
local headers = {{["Content-Type"] = "application/json"}}
request = function()
  counter = counter + 1
  local body = template:gsub("0%.0%.1%-SNAPSHOT%-ark%-biz", "0.0." .. counter .. "-ark-biz", 1)
  return wrk.format("POST", nil, headers, body)
end
""",
}


def run_wrk(url: str, body_file: Path, bodies: str, duration: float, connections: int) -> dict[str, float]:
    script = body_file.with_name(f"{bodies}.lua")
    script.write_text(WRK_SCRIPTS[bodies].format(body=body_file))
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration:g}s", "--latency", "-s", str(script), url + "/mutate"],
        capture_output=True,
        text=True,
        check=True,
        timeout=duration + 60,
    ).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise SystemExit(f"wrk saw failed requests against {url}:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    lat = {p: float(v) * _UNITS[u] for p, v, u in _WRK_LATENCY.findall(out)}
    return {"rps": rps, "p50": lat["50"], "p99": lat["99"], "requests": total}


def pin(cpus: set[int] | None) -> Any:
    """A preexec_fn that keeps a child on these CPUs (None: anywhere)."""
    if cpus is None:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


def client_ssl() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # loopback, our own throwaway certificate
    return ctx


async def closed_loop(url: str, body: bytes, duration: float, connections: int) -> dict[str, float]:
    """Python fallback for wrk: `connections` workers, each sending as soon as its last answer came."""
    import aiohttp

    latencies: list[float] = []
    connector = aiohttp.TCPConnector(ssl=client_ssl(), limit=connections)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector) as session:
        end = time.perf_counter() + duration

        async def worker() -> None:
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                async with session.post(url + "/mutate", data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status != 200:
                        raise SystemExit(f"{url}: HTTP {resp.status}")
                latencies.append(time.perf_counter() - t0)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - start
    return {"rps": len(latencies) / elapsed, **percentiles(latencies), "requests": len(latencies)}


async def open_loop(url: str, body: bytes, rate: float, duration: float) -> dict[str, float]:
    """Requests sent on a fixed schedule whatever the answers do; latency from the scheduled time,
    so a stall is counted for every request it delays."""
    import aiohttp

    connector = aiohttp.TCPConnector(ssl=client_ssl(), limit=64)
    headers = {"Content-Type": "application/json"}
    latencies: list[float] = []
    failures = 0
    async with aiohttp.ClientSession(connector=connector) as session:
        # warm the keep-alive pool so connection setup is not part of the figure
        await asyncio.gather(*(session.post(url + "/mutate", data=body, headers=headers) for _ in range(8)))

        async def one(scheduled: float) -> None:
            nonlocal failures
            async with session.post(url + "/mutate", data=body, headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    failures += 1
            latencies.append(time.perf_counter() - scheduled)

        total = int(rate * duration)
        start = time.perf_counter()
        tasks = []
        for i in range(total):
            scheduled = start + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(scheduled)))
        await asyncio.gather(*tasks)
        achieved = total / (time.perf_counter() - start)
    if failures:
        raise SystemExit(f"{url}: {failures} failed requests at {rate}/s")
    return {"rps": achieved, **percentiles(latencies)}


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1e3 for s in seconds)
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return {"p50": q[49], "p99": q[98]}


def decide_cost(review: dict[str, Any], distinct: bool, n: int = 5000) -> float:
    """Microseconds per admission spent in our code alone (read + decide + encode), no HTTP."""
    from webhook.admission import decide, encode_response, read_review
    from webhook.defaults import Defaults

    raw = orjson.dumps(review)
    bodies = [raw.replace(b"0.0.1-SNAPSHOT-ark-biz", b"0.0.%d-ark-biz" % i, 1) for i in range(n)] if distinct else [raw] * n
    defaults = Defaults()
    start = time.perf_counter()
    for body in bodies:
        parsed = read_review(body)
        encode_response(parsed.uid, decide(parsed, defaults))
    return (time.perf_counter() - start) / n * 1e6


# --- the run --------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per throughput run (default 3)")
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections (default 32)")
    parser.add_argument(
        "--rounds", type=int, default=5, help="echo/webhook alternations per body kind; medians are quoted (default 5)"
    )
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="let the OS place the servers and the load generator (default: servers on the last CPU, "
        "the generator on the others, which steadies the figures on a small machine)",
    )
    parser.add_argument("--rate", type=float, default=500.0, help="fixed request rate for the latency run")
    parser.add_argument("--rate-duration", type=float, default=10.0, help="seconds of the fixed-rate run")
    parser.add_argument("--generator", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--serve-echo", nargs=3, metavar=("PORT", "CERT", "KEY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_echo:
        serve_echo(int(args.serve_echo[0]), args.serve_echo[1], args.serve_echo[2])
        return 0

    generator = args.generator
    if generator == "auto":
        generator = "wrk" if shutil.which("wrk") else "python"
    review = sample_review()
    body = orjson.dumps(review)
    cpus = sorted(os.sched_getaffinity(0))
    server_cpus = {cpus[-1]} if args.pin and len(cpus) >= 2 else None
    if server_cpus:
        os.sched_setaffinity(0, set(cpus[:-1]))  # this process and wrk
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="webhook-bench-") as tmp:
        work = Path(tmp)
        ca = pki.new_ca(days=1)
        pki.issue(ca, "127.0.0.1", ips=["127.0.0.1"], days=1).write(work / "tls.crt", work / "tls.key")
        body_file = work / "review.json"
        body_file.write_bytes(body)
        echo_port, hook_port = free_port(), free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        try:
            procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--serve-echo", str(echo_port), str(work / "tls.crt"), str(work / "tls.key")],
                    env=env,
                    preexec_fn=pin(server_cpus),
                )
            )
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable, "-m", "koupleless", "webhook", "--host=127.0.0.1", f"--port={hook_port}",
                        f"--tls-cert-file={work / 'tls.crt'}", f"--tls-private-key-file={work / 'tls.key'}",
                        "--log-level=warning",
                    ],
                    env=env,
                    preexec_fn=pin(server_cpus),
                )
            )
            echo_url, hook_url = f"https://127.0.0.1:{echo_port}", f"https://127.0.0.1:{hook_port}"
            wait_healthy(echo_url, procs[0])
            wait_healthy(hook_url, procs[1])
            check_answer(hook_url, body)
            pids = {"echo": procs[0].pid, "mutate": procs[1].pid}
            return report(args, generator, review, body, body_file, echo_url, hook_url, pids, server_cpus)
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()


def check_answer(hook_url: str, body: bytes) -> None:
    """Measure the real path: the webhook must answer this review with a patch."""
    request = urllib.request.Request(hook_url + "/mutate", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, context=client_ssl(), timeout=5) as resp:
        answer = orjson.loads(resp.read())["response"]
    if not (answer["allowed"] and answer.get("patchType") == "JSONPatch"):
        raise SystemExit(f"the sample review was not patched: {answer}")


def report(
    args: argparse.Namespace,
    generator: str,
    review: dict[str, Any],
    body: bytes,
    body_file: Path,
    echo_url: str,
    hook_url: str,
    pids: dict[str, int],
    server_cpus: set[int] | None,
) -> int:
    def throughput(name: str, url: str, bodies: str) -> dict[str, float]:
        cpu_before = cpu_seconds(pids[name])
        if generator == "wrk":
            result = run_wrk(url, body_file, bodies, args.duration, args.connections)
        else:
            result = asyncio.run(closed_loop(url, body, args.duration, args.connections))
        result["cpu_us"] = (cpu_seconds(pids[name]) - cpu_before) / result["requests"] * 1e6
        return result

    kinds = ["same", "distinct"] if generator == "wrk" else ["same"]
    runs: dict[tuple[str, str], list[dict[str, float]]] = {}
    ratios: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(args.rounds):
        for kind in kinds:
            # side by side: each round's webhook figure is divided by the echo figure just before it
            echo = throughput("echo", echo_url, kind)
            mutate = throughput("mutate", hook_url, kind)
            runs.setdefault(("echo", kind), []).append(echo)
            runs.setdefault(("mutate", kind), []).append(mutate)
            ratios[kind].append(mutate["rps"] / echo["rps"])
    fixed = {name: asyncio.run(open_loop(url, body, args.rate, args.rate_duration)) for name, url in
             (("echo", echo_url), ("mutate", hook_url))}

    def median(name: str, kind: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[(name, kind)])

    placement = f"servers on CPU {sorted(server_cpus)}, generator on the others" if server_cpus else "unpinned"
    print(f"webhook throughput: {len(body)} B AdmissionReview (module Pod, patched), loopback TLS ECDSA P-256, "
          f"keep-alive, {os.cpu_count()} CPUs ({placement}), load average {os.getloadavg()[0]:.1f}")
    print(f"load generator: {generator}; {args.connections} connections x {args.duration:g}s; {args.rounds} rounds, "
          "echo then webhook in each; medians")
    print("bodies: same = the sample review every time (replicas of one release: the webhook keeps its verdict);")
    print("        distinct = a new module version in each request (no verdict is ever reused)")
    print(f"{'server':<28}{'bodies':>9}{'admissions/s':>14}{'p50 ms':>10}{'p99 ms':>10}{'server CPU us/req':>19}")
    for kind in kinds:
        for name, label in (("echo", "aiohttp echo (same body)"), ("mutate", "module-controller webhook")):
            print(f"{label:<28}{kind:>9}{median(name, kind, 'rps'):>14,.0f}{median(name, kind, 'p50'):>10.2f}"
                  f"{median(name, kind, 'p99'):>10.2f}{median(name, kind, 'cpu_us'):>19.0f}")
    for kind in kinds:
        ratio = statistics.median(ratios[kind])
        spread = f"{min(ratios[kind]):.2f}-{max(ratios[kind]):.2f}"
        target = 0.6 if kind == "same" else 0.5
        verdict = f"   (target >= {target:.2f}: {'met' if ratio >= target else 'NOT met'})"
        print(f"ratio webhook/echo, {kind} bodies: {ratio:.2f} median of rounds {spread}{verdict}")
    print(f"fixed rate {args.rate:g} req/s for {args.rate_duration:g}s (open loop, python client, same bodies):")
    for name in ("echo", "mutate"):
        r = fixed[name]
        print(f"  {name:<8} achieved {r['rps']:>6.0f}/s   p50 {r['p50']:.2f} ms   p99 {r['p99']:.2f} ms")
    p99 = fixed["mutate"]["p99"]
    print(f"webhook p99 at {args.rate:g}/s: {p99:.2f} ms   (target <= 5 ms: {'met' if p99 <= 5 else 'NOT met'})")
    print("our code per admission (read + validate + patch + encode, no HTTP, one process): "
          f"same {decide_cost(review, distinct=False):.0f} us, distinct {decide_cost(review, distinct=True):.0f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
